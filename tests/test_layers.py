"""The package's layers import only downward (core <- engine <- config; analysis reads files and
imports none of them), each layer uses only its own third-party packages, and every option has
one default: the YAML value and the constructor's default agree."""

import ast
import dataclasses
import functools
import inspect
import sys
from pathlib import Path

import pytest
from hydra.utils import get_method
from omegaconf import OmegaConf

from importance_sampling.config import schema
from importance_sampling.config.builder import TRAINER_PARTS, parameters, split_section
from importance_sampling.engine.sources import LoaderOptions
from importance_sampling.engine.variance import VarianceCallback

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "importance_sampling"
LAYERS = ("core", "engine", "config", "analysis")
MAY_IMPORT = {  # layer -> the package's layers it may import
    "core": {"core"},
    "engine": {"core", "engine"},
    "config": {"core", "engine", "config"},
    "analysis": {"analysis"},
}
THIRD_PARTY = {  # layer -> the third-party packages its modules may import (besides the stdlib)
    "core": {"torch", "numpy"},
    "engine": {"torch", "numpy", "torchvision", "PIL", "sklearn", "scipy", "tqdm", "wandb"},
    "config": {"torch", "hydra", "omegaconf", "yaml", "tqdm", "submitit"},
    "analysis": {"numpy", "pandas", "matplotlib", "scipy", "yaml", "wandb"},  # wandb: load_wandb
}


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" names a module x of the package
                names |= {f"{prefix}.{a.name}" for a in node.names} if not node.module else set()
                names.add(prefix)
            else:
                names.add(node.module)
    return names


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def test_the_tree_is_the_four_layers():
    top = {p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    assert top == set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    wrong = []
    for path in modules(layer):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "importance_sampling" and len(parts) > 1:
                if parts[1] not in MAY_IMPORT[layer]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_uses_only_its_own_third_party_packages(layer):
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for path in modules(layer):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top not in stdlib and top != "importance_sampling" and top not in THIRD_PARTY[layer]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong


def test_the_package_itself_is_the_core_loaded_on_first_use():
    """``import importance_sampling`` names the core's public objects and imports them when one
    is used: the analysis layer (pandas, matplotlib) loads without torch."""
    import subprocess

    import importance_sampling

    for name in importance_sampling.__all__:
        assert getattr(importance_sampling, name).__module__.startswith("importance_sampling.core")
    check = (
        "import sys, importance_sampling, importance_sampling.analysis\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from importance_sampling import ImportanceSampler\n"
        "assert 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- one option, one default
@functools.cache
def composed_node(group_file: str):
    """conf/<group_file> composed with its defaults list (schemas, shared files), typed."""
    from hydra import compose, initialize_config_dir

    group, _, name = group_file.rpartition("/")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [f"{group}={name}"] if group else [])
    return cfg[group] if group else cfg


def composed(group_file: str) -> dict:
    return OmegaConf.to_container(composed_node(group_file), resolve=False)


def defaults(constructor) -> dict:
    """Parameter -> default of a constructor (``**kwargs`` followed into the parent class)."""
    out = {}
    for cls in getattr(constructor, "__mro__", (constructor,)):
        if cls is object:
            break
        params = inspect.signature(cls).parameters.values()
        for p in params:
            if p.default is not p.empty:
                out.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def same(yaml_value, default) -> bool:
    if isinstance(default, tuple):
        default = list(default)
    return yaml_value == default and type(yaml_value) in (type(default), int, float, type(None))


BUILDER_KEYS = {"_target_", "stream", "validation_size", "validation_seed"}  # read by the builder
GROUP_FILES = sorted(
    f"{p.parent.name}/{p.stem}"
    for g in ("sampler", "dataset", "model", "logger")
    for p in (ROOT / "conf" / g).glob("*.yaml")
)


def variant_keys(group_file: str) -> set[str]:
    """The keys a file sets on top of another option it extends (sampler/loss.yaml sets
    ``score`` over the shared importance_sampler.yaml): they define the variant, they are not
    defaults."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / f"{group_file}.yaml"))
    extends = [d for d in raw.get("defaults", []) if isinstance(d, str) and "schema/" not in d]
    return set(raw) - {"defaults"} if [d for d in extends if d != "_self_"] else set()


@pytest.mark.parametrize("group_file", GROUP_FILES)
def test_every_yaml_default_is_the_constructors_default(group_file):
    node = composed(group_file)
    if "_target_" not in node:  # logger=none: nothing is built
        return
    constructor = get_method(node["_target_"])
    known = defaults(constructor)
    accepted = set(parameters(constructor)) | {"input_shape", "num_classes"}
    unknown = [k for k in node if k not in BUILDER_KEYS and k not in accepted]
    assert not unknown, f"{group_file}: no parameter for {unknown}"
    chosen = variant_keys(group_file)
    drift = [
        f"{k}: yaml {v!r}, constructor {known[k]!r}"
        for k, v in node.items()
        if k in known
        and k not in chosen
        and not (isinstance(v, str) and v.startswith("${"))
        and not same(v, known[k])
    ]
    assert not drift, f"{group_file}: {drift}"


def test_the_trainer_loader_and_variance_sections_default_as_their_constructors():
    cfg = composed("config")
    parts = split_section(cfg["trainer"], TRAINER_PARTS)
    drift = []
    for constructor, options in [
        *zip(TRAINER_PARTS, parts, strict=True),
        (LoaderOptions, cfg["loader"]),
        (VarianceCallback, {k: v for k, v in cfg["variance"].items() if k != "every_rows"}),
    ]:
        known = defaults(constructor)
        for k, v in options.items():
            if k not in known or not same(v, known[k]):
                drift.append(
                    f"{constructor.__name__}.{k}: yaml {v!r}, constructor {known.get(k)!r}"
                )
    assert not drift


def test_every_schema_field_is_a_parameter_of_its_constructor():
    """A schema types exactly what its YAML file sets; the YAML file's keys are the
    constructor's parameters (above): so an option is declared by its constructor alone."""
    missing = []
    for group_file in GROUP_FILES:
        node = composed(group_file)
        if "_target_" not in node:
            continue
        params = set(parameters(get_method(node["_target_"]))) | BUILDER_KEYS
        schema_type = OmegaConf.get_type(composed_node(group_file))
        for f in dataclasses.fields(schema_type):
            if f.name not in params and f.name != "_partial_":
                missing.append(f"{group_file}: {f.name}")
    assert not missing


def test_config_errors_know_their_group_without_reading_the_message():
    error = schema.ConfigCheckError("trainer.amp", "whatever the words")
    assert error.group == "trainer"
    assert schema.ConfigCheckError("threads", "x").group == "config"
