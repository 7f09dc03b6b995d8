"""A bare ``pip install`` of the package is the core: it pulls torch and numpy only, and the
README's own-loop example runs there, without train.py, Hydra, the engine's packages or this
checkout on the path. The extras are what the other layers need."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def own_loop_example() -> str:
    """The README's first Python block that uses the package (the own-loop example)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if "importance_sampling" in b)


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_make_setup_pins_exactly_what_the_extras_ask_for():
    """requirements.txt (the pins `make setup` installs under) names every package of [dev],
    which includes [all], and nothing else but what those packages need pinned."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(extras["all"][0].split("[")[1].rstrip("]").split(",")) == set(extras) - {
        "all",
        "dev",
    }
    wanted = {requirement_name(s) for s in project["dependencies"]}
    for specs in extras.values():
        wanted |= {requirement_name(s) for s in specs if not s.startswith("importance_sampling")}
    pinned = {
        requirement_name(line)
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert wanted - pinned == set(), "extras without a pin in requirements.txt"
    assert pinned - wanted <= {"submitit"}, "pins of packages no extra asks for"


@pytest.mark.slow
def test_a_bare_pip_install_is_the_core_and_runs_the_readmes_own_loop(tmp_path):
    """What a bare install pulls is pip's own answer (a dry run's report, in a fresh venv); the
    package itself is then built from a copy and installed into that venv, which sees this
    environment's torch through a .pth file (copying torch's 5 GB again would say nothing more),
    and the README's own loop runs there importing nothing but torch and the core."""
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

    def pip(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(python), "-m", "pip", *args], env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    report = tmp_path / "report.json"
    pip(
        "install",
        "--quiet",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
        str(source),
    )
    pulled = {
        requirement_name(item["metadata"]["name"])
        for item in json.loads(report.read_text())["install"]
    }
    assert {"importance-sampling", "torch", "numpy"} <= pulled
    for package in ("hydra-core", "omegaconf", "pandas", "matplotlib", "torchvision", "tqdm"):
        assert package not in pulled, f"{package} would come with a bare install"

    pip("install", "--quiet", "--no-deps", str(source))
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    torch_dir = Path(__import__("torch").__file__).parents[1]
    (Path(site) / "outer_torch.pth").write_text(f"{torch_dir}\n")  # appended after its own

    check = (
        own_loop_example()
        + """
import sys
import importance_sampling
assert "site-packages" in importance_sampling.__file__, importance_sampling.__file__
assert str(importance_sampling.__file__).startswith(sys.prefix), importance_sampling.__file__
outside = {m.split(".")[0] for m in sys.modules} & {  # (torch itself imports tqdm if it is there)
    "hydra", "omegaconf", "pandas", "matplotlib", "torchvision", "sklearn", "train"
}
assert not outside, outside
assert not any(m.startswith("importance_sampling.engine") for m in sys.modules)
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
    final = float(re.search(r"training loss ([\d.]+)", run.stdout).group(1))
    assert final < 0.1
