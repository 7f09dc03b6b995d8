"""A W&B sweep end to end, as its agent runs it: one folder per sweep, the same comparison from
the run directories and from the offline W&B runs (aggregate.py and the notebook), and one line
where W&B's servers cannot be read."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from test_sweeps import SWEPT, TINY, read_wandb_records

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a W&B sweep, as its agent runs it
AGENT_SWEEP = "sweep42"  # the id W&B would give the sweep


@pytest.fixture(scope="module")
def agent_sweep(tmp_path_factory):
    """A 2-sampler x 2-seed W&B sweep run the way ``wandb agent`` runs its jobs: the command
    built by wandb's own functions from the sweep file's ``command``, the arguments of each job
    formatted by them, and the agent's environment (WANDB_SWEEP_ID, WANDB_RUN_ID, the parameter
    file); W&B offline. Returns the working directory the agent ran in."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    tmp = tmp_path_factory.mktemp("agent_sweep")
    definition = yaml.safe_load((ROOT / "sweeps" / "digits_mlp.yaml").read_text())
    command = create_sweep_command(definition["command"])
    fixed = {"experiment": "digits_mlp", "logger": "wandb", "logger.mode": "offline"}
    fixed |= dict(a.split("=", 1) for a in TINY)
    for i, (sampler, seed) in enumerate(itertools.product(SWEPT, (0, 1))):
        params = {**fixed, "sampler": sampler, "seed": seed}
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
        run_id = f"r{i}x"
        param_file = tmp / "wandb" / f"sweep-{AGENT_SWEEP}" / f"config-{run_id}.yaml"
        param_file.parent.mkdir(parents=True, exist_ok=True)
        param_file.write_text(yaml.safe_dump({k: {"value": v} for k, v in params.items()}))
        values = {
            "env": ["/usr/bin/env"] if Path("/usr/bin/env").exists() else [],
            "interpreter": [sys.executable],
            "program": [str(ROOT / definition["program"])],
            "args_no_hyphens": args["args_no_hyphens"],
        }
        cmd = [w for c in command for w in (values[c[2:-1]] if c.startswith("${") else [c])]
        env = {
            **os.environ,
            "IS_DATA_DIR": str(tmp / "data"),
            "WANDB_SWEEP_ID": AGENT_SWEEP,
            "WANDB_RUN_ID": run_id,
            "WANDB_SWEEP_PARAM_PATH": str(param_file),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
        }
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_a_wandb_sweep_lands_in_one_folder_and_reads_the_same_from_its_offline_runs(
    agent_sweep, tmp_path
):
    from importance_sampling import analysis

    folder = agent_sweep / "multirun" / f"wandb-{AGENT_SWEEP}"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        f"{s}_seed{seed}_r{i}x" for i, (s, seed) in enumerate(itertools.product(SWEPT, (0, 1)))
    )
    assert not (agent_sweep / "outputs").exists()  # nothing mixed with other runs
    for name in names:
        summary = json.loads((folder / name / "summary.json").read_text())
        assert (summary["wandb_sweep_id"], summary["wandb_run_id"]) == (AGENT_SWEEP, name[-3:])
        (wandb_run,) = (folder / name / "wandb").glob("offline-run-*")
        assert read_wandb_records(wandb_run)["run"][0].display_name == name  # named alike

    tables = {}
    for source in ([str(folder)], ["--wandb", str(folder)]):
        out = tmp_path / source[0].strip("-")
        cmd = [sys.executable, str(ROOT / "scripts" / "aggregate.py"), *source, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        tables[source[0]] = pd.read_csv(out / "time_to_loss.csv")
    local, offline = tables.values()
    pd.testing.assert_frame_equal(local, offline)  # one conversion, whichever the source
    runs = analysis.load_wandb(folder)
    assert runs["run"].nunique() == 4 and set(runs["experiment"]) == {"digits_mlp"}
    assert (runs.drop_duplicates("run")["run_reference_ms"] > 0).all()


@pytest.mark.slow
def test_the_notebook_reads_a_wandb_sweep_folder_as_its_run_directories(
    agent_sweep, tmp_path, monkeypatch
):
    """SWEEP_DIR=the sweep's folder and WANDB_SWEEP=the same folder (its offline W&B runs) give
    the same tables."""
    from nbclient import NotebookClient

    folder = agent_sweep / "multirun" / f"wandb-{AGENT_SWEEP}"
    monkeypatch.setenv("MPLBACKEND", "agg")
    tables = []
    for variable, other in (("SWEEP_DIR", "WANDB_SWEEP"), ("WANDB_SWEEP", "SWEEP_DIR")):
        monkeypatch.setenv(variable, str(folder))
        monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv("SAVE_TO", str(tmp_path / variable))
        notebook = nbformat.read(ROOT / "notebooks" / "time_to_loss.ipynb", as_version=4)
        NotebookClient(
            notebook,
            timeout=180,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
        outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        assert "4 runs, 20 metrics rows" in "".join(o.get("text", "") for o in outputs)
        tables.append(
            [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
        )
    assert tables[0] and tables[0] == tables[1]


def test_reading_wandb_without_an_account_or_network_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "scripts" / "aggregate.py"), "--wandb", "me/proj/nosuch"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: cannot read the W&B sweep me/proj/nosuch"
    )
    assert "wandb login" in lines[0]
