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


# The longest modules first: pytest-xdist (make test) hands out modules in this order, so the
# long ones start at once instead of leaving one worker alone at the end.
FIRST = [
    "test_readme_commands.py",
    "test_slurm.py",
    "test_tuned_comparison.py",
    "test_install.py",
    "test_distributed.py",
    "test_reliability.py",
    "test_sweeps.py",
]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items[:] = sorted(items, key=rank)  # stable: the order within a module is kept
