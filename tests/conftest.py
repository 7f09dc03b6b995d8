import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def compose(tmp_path, monkeypatch):
    """Compose the project's Hydra config with overrides, as train.py would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    monkeypatch.setenv("IS_DATA_DIR", str(tmp_path / "data"))

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


def load_script(name: str):
    """scripts/<name>.py as a module (its main() and helpers), without touching sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
