import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
# One thread per pytest-xdist worker (and per train.py it starts, through OMP_NUM_THREADS, which
# torch's default reads): several workers that each use every core would stall each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def compose(tmp_path, monkeypatch):
    """Compose the project's Hydra config with overrides, as train.py would."""
    from importance_sampling.config.builder import compose as compose_config

    monkeypatch.setenv("IS_DATA_DIR", str(tmp_path / "data"))
    return compose_config


def load_script(name: str):
    """scripts/<name>.py as a module (its main() and helpers), without touching sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_shell_lines() -> list[str]:
    """Every line of the ```bash blocks of the README and docs/*.md, in order (continuation
    lines joined, comment lines dropped; a trailing comment is kept)."""
    import re

    lines = []
    for path in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    lines.append(line)
    return lines


# The longest scopes first (a module, or a class of test_readme_commands.py: the units that
# pytest-xdist's --dist loadscope hands out; make test passes --no-loadscope-reorder so that this
# order is kept): the long ones start at once instead of leaving one worker alone at the end.
# Ordered by their measured duration (make test ARGS=--durations=0, summed per scope).
FIRST = [
    "test_reliability.py",
    "test_slurm.py",
    "test_sweeps.py",
    "test_train.py",
    "test_readme_commands.py::TestCommandsOf_usage",
    "test_paper_experiments.py",
    "test_readme_commands.py::TestCommandsOf_experiments",
    "test_readme_commands.py::TestCommandsOf_README",
    "test_tuned_comparison.py",
    "test_wandb_sweep.py",
    "test_distributed.py",
    "test_readme_commands.py::TestCommandsOf_benchmarks",
    "test_readme_commands.py::TestCommandsOf_scale_out",
    "test_bench.py",
    "test_streaming.py",
    "test_install.py",
    "test_variance.py",
    "test_machine.py",
]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        cls = getattr(item, "cls", None)
        for scope in ([f"{name}::{cls.__name__}"] if cls else []) + [name]:
            if scope in FIRST:
                return FIRST.index(scope)
        return len(FIRST)

    items[:] = sorted(items, key=rank)  # stable: the order within a scope is kept
