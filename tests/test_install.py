"""The package installs into a fresh environment with its declared dependencies, and the README's
own-loop example runs there, without train.py, Hydra or this checkout on the path."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def own_loop_example() -> str:
    """The README's first Python block that uses the package (the own-loop example)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if "importance_sampling" in b)


@pytest.mark.slow
def test_a_bare_pip_install_into_a_fresh_venv_runs_the_readmes_own_loop(tmp_path):
    # a copy, so that the build (setuptools builds in the source tree) leaves the checkout alone
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "multirun", "data", "wandb", "*.egg-info", "__pycache__"
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # a bare install: the dependencies come from pyproject.toml alone (pip's cache is reused)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    check = (
        own_loop_example()
        + """
import sys
import importance_sampling
assert "site-packages" in importance_sampling.__file__, importance_sampling.__file__
assert "hydra" not in sys.modules and "train" not in sys.modules
with torch.no_grad():
    final = torch.nn.functional.cross_entropy(model(data.train_x), data.train_y).item()
print(f"final training loss {final:.4f}, tau {sampler.tau:.2f}")
assert final < 0.3 and sampler.tau > 1
"""
    )
    run = subprocess.run(
        [str(python), "-c", check],
        cwd=tmp_path,  # not the checkout: the installed package is the one imported
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "final training loss" in run.stdout
    # the declared dependencies cover the command line too (train.py's imports)
    imports = subprocess.run(
        [str(python), "-c", "import hydra, omegaconf, pandas, matplotlib, sklearn, tqdm, yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imports.returncode == 0, imports.stderr[-2000:]
