"""Registers the config schemas (importance_sampling/config/schema.py) in Hydra's ConfigStore.

conf/*.yaml name their schemas in their defaults lists (``- /schema/optimizer/sgd@_here_``), so
the schemas must be registered before any config is composed. Hydra imports every module of the
``hydra_plugins`` namespace when it starts (to find plugins), so this import runs wherever this
repository's configs are composed: train.py, the compose API in a script, a test or a notebook.
"""

import importance_sampling.config.schema  # noqa: F401  (registers on import)
