"""Sweeps end to end: presets, W&B logging (real offline mode), the joblib and submitit launchers,
W&B sweep definitions, and the analysis of a real sweep by the script and the notebook."""

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from conftest import documented_shell_lines, load_script

from importance_sampling.config.sweeps import SweepProgress, run_fraction

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["uniform", "loss", "upper_bound", "gradient_norm"]
SWEPT = ["uniform", "upper_bound"]  # the real sweeps of these tests: 2 samplers x 2 seeds
TINY = [
    "trainer.time_budget=null",
    "trainer.max_steps=20",
    "trainer.eval_every_seconds=null",
    "trainer.eval_every_steps=5",
    "trainer.progress=false",
    "threads=1",
]


def presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("experiment", presets())
def test_every_experiment_preset_composes_with_every_sampler(experiment, compose):
    from hydra.utils import instantiate

    for sampler in SAMPLERS:
        cfg = compose(f"experiment={experiment}", f"sampler={sampler}", "seed=3")
        instantiate(cfg.sampler)
        assert cfg.seed == 3 and cfg.sampler.batch_size > 0
    # a preset overrides the base config, the command line overrides the preset
    cfg = compose(f"experiment={experiment}", "trainer.time_budget=7")
    assert cfg.trainer.time_budget == 7


def test_fashion_mnist_mlp_preset_bundles_dataset_model_optimizer_budget(compose):
    cfg = compose("experiment=fashion_mnist_mlp")
    assert cfg.dataset._target_.endswith("fashion_mnist") and cfg.model._target_.endswith("MLP")
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.trainer.time_budget, cfg.trainer.eval_every_seconds) == (120, 2.0)


def sweep_definitions() -> list[Path]:
    return sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", sweep_definitions(), ids=lambda p: p.stem)
def test_wandb_sweep_definitions_are_valid_hydra_overrides(path, compose):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and (ROOT / sweep["program"]).is_file()
    # Hydra rejects --key=value: the agent must pass key=value
    assert sweep["command"][-1] == "${args_no_hyphens}"
    params = sweep["parameters"]
    assert (ROOT / "conf" / "experiment" / f"{params['experiment']['value']}.yaml").is_file()
    names = list(params)
    grid = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    for combo in itertools.product(*grid):
        # the arguments exactly as the W&B agent formats them for ${args_no_hyphens}
        args = create_sweep_command_args(
            {"args": {k: {"value": v} for k, v in zip(names, combo, strict=True)}}
        )["args_no_hyphens"]
        cfg = compose(*args)
        assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.mode == "online"
        assert cfg.seed == combo[names.index("seed")]


# ---------------------------------------------------------------- W&B, real offline mode
def read_wandb_records(run_dir: Path, timeout: float = 60.0) -> dict[str, list]:
    """The records of an offline W&B run, once its service has written them all (the run's exit
    record): wandb's service process may still be writing when wandb.finish() returns."""
    from importance_sampling.analysis.wandb_runs import read_records

    deadline = time.monotonic() + timeout
    while True:
        records = read_records(run_dir)
        if "exit" in records or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(records: dict) -> list[dict]:
    return [
        {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in h.item}
        for h in records.get("history", [])
    ]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb_dir" / "wandb"


def test_wandb_logs_config_rows_and_summary_and_jobs_in_one_process_never_merge(
    compose, tmp_path, wandb_offline
):
    import wandb

    from importance_sampling.config import builder
    from importance_sampling.engine.trainer import TrainingError

    summaries = []
    for seed in (0, 1):
        cfg = compose("logger=wandb", "sampler=upper_bound", f"seed={seed}", *TINY)
        summaries.append(builder.run(cfg, tmp_path / f"run{seed}"))
        assert wandb.run is None  # finished by on_end
    # a job that fails: its W&B run is finished too (exit code 1), the next job gets its own
    cfg = compose("logger=wandb", "sampler=uniform", "optimizer.lr=1e6", "seed=2", *TINY)
    with pytest.raises(TrainingError):
        builder.run(cfg, tmp_path / "diverged")
    assert wandb.run is None

    runs = sorted(wandb_offline.glob("offline-run-*"))
    assert len(runs) == 3
    by_name = {}
    for run_dir in runs:
        records = read_wandb_records(run_dir)
        (run,) = records["run"]
        by_name[run.display_name] = (run, records)
    assert set(by_name) == {"upper_bound_seed0", "upper_bound_seed1", "uniform_seed2"}
    for seed in (0, 1):
        run, records = by_name[f"upper_bound_seed{seed}"]
        assert run.run_group == "digits_mlp" and run.project == "importance-sampling"
        assert set(run.tags) == {"sampler=upper_bound", f"seed={seed}"}
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["seed"] == seed and config["sampler"]["score"] == "upper_bound"
        assert config["trainer"]["max_steps"] == 20 and config["run_dir"].endswith(f"run{seed}")
        rows = history(records)
        metrics = pd.read_csv(tmp_path / f"run{seed}" / "metrics.csv")
        assert [r["step"] for r in rows] == metrics["step"].tolist() == [0, 5, 10, 15, 20]
        assert [r["train_loss"] for r in rows] == pytest.approx(metrics["train_loss"].tolist())
        summary = {
            u.key or u.nested_key[0]: json.loads(u.value_json)
            for s in records["summary"]
            for u in s.update
        }
        assert summary["status"] == "completed" and summary["step"] == 20
        assert records["exit"][-1].exit_code == 0
    _, failed = by_name["uniform_seed2"]
    assert failed["exit"][-1].exit_code == 1
    assert len(history(failed)) == len(pd.read_csv(tmp_path / "diverged" / "metrics.csv"))


def test_wandb_mode_follows_wandb_mode_and_disabled_always_wins(compose, monkeypatch):
    from importance_sampling.engine.wandb_logger import resolve_mode

    monkeypatch.setenv("WANDB_MODE", "online")
    assert compose("logger=wandb").logger.mode == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert compose("logger=wandb").logger.mode == "offline"  # the default never needs a network
    assert resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # CI
    assert resolve_mode("online") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ValueError, match="logger.mode must be one of"):
        resolve_mode("sometimes")


# ---------------------------------------------------------------- launchers, script, notebook
def run_train(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "IS_DATA_DIR": str(cwd / "data"), **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    """A real 2-sampler x 2-seed multirun on digits with the joblib launcher (2 workers, reused by
    the 4 jobs) and offline W&B logging. (The 4-sampler sweep is scripts/time_to_loss.py's.)"""
    tmp = tmp_path_factory.mktemp("joblib_sweep")
    sweep = tmp / "sweep"
    run_train(
        "-m",
        "experiment=digits_mlp",
        f"sampler={','.join(SWEPT)}",
        "seed=0,1",
        *TINY,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    return sweep


@pytest.mark.slow
def test_joblib_multirun_writes_every_run_and_one_wandb_run_per_job(joblib_sweep):
    from importance_sampling import analysis

    runs = analysis.find_runs(joblib_sweep)
    assert sorted(r.name.rsplit("_", 1)[0] for r in runs) == sorted(
        f"{s}_seed{seed}" for s in SWEPT for seed in (0, 1)
    )
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        (wandb_run,) = (run / "wandb").glob("offline-run-*")  # its own W&B run, beside its metrics
        records = read_wandb_records(wandb_run)
        (meta,) = records["run"]
        assert meta.display_name == run.name.rsplit("_", 1)[0] and meta.run_group == "digits_mlp"
        assert len(history(records)) == 5


@pytest.mark.slow
def test_aggregation_script_on_a_real_sweep(joblib_sweep, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "aggregate.py"),
            str(joblib_sweep),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 * 5 and runs["run"].nunique() == 4
    assert set(runs["sampler"]) == set(SWEPT) and set(runs["experiment"]) == {"digits_mlp"}
    table = pd.read_csv(out / "time_to_loss.csv")
    assert set(table["sampler"]) == set(SWEPT) and len(table) == 3 * 2
    assert "speedup over uniform" in (out / "table.md").read_text()
    assert (out / "figure.png").stat().st_size > 10_000


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_a_real_sweep(joblib_sweep, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "time_to_loss.ipynb"
    committed = nbformat.read(path, as_version=4)
    assert all(
        not c.get("outputs") and not c.get("execution_count")
        for c in committed.cells
        if c.cell_type == "code"
    ), "strip the notebook's outputs"
    monkeypatch.setenv("SWEEP_DIR", str(joblib_sweep))
    monkeypatch.setenv("SAVE_TO", str(tmp_path / "saved"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    NotebookClient(
        committed,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for c in committed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 runs, 20 metrics rows" in text
    assert (tmp_path / "saved" / "figure.png").is_file()


def documented_commands(containing: str) -> list[str]:
    """The documented shell lines (README, docs/) that contain ``containing``, comments cut off."""
    lines = [line.split("  #")[0].strip() for line in documented_shell_lines()]
    return [line for line in lines if containing in line]


def repository_copy(dest: Path) -> Path:
    """The repository's files (tracked, or new and not ignored) copied to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_the_documented_notebook_commands_run_as_written(joblib_sweep, tmp_path):
    """The documented nbconvert commands, exactly, from the root of a copy of the repository with a
    sweep in multirun/ and a run in outputs/vr_mlp (relative paths, as the README writes them);
    then `make notebooks` (its recipe, with this interpreter for the venv's)."""
    repo = repository_copy(tmp_path / "repo")
    shutil.copytree(joblib_sweep, repo / "multirun" / "2026-01-01_00-00-00")
    shutil.copytree(
        ROOT / "results" / "variance_reduction" / "fashion_mnist_mlp", repo / "outputs" / "vr_mlp"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEP_DIR", "RUN_DIR", "MPLBACKEND")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
    }

    def shell(command: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            command, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, command + "\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    commands = documented_commands("jupyter nbconvert")
    assert len(commands) == 2
    for command in commands:
        shell(command.replace("<time>", "2026-01-01_00-00-00"))
    html = repo / "outputs" / "notebooks"
    assert (
        "2026-01-01_00-00-00: 4 runs, 20 metrics rows" in (html / "time_to_loss.html").read_text()
    )
    assert "vr_mlp" in (html / "variance_reduction.html").read_text()
    shutil.rmtree(html)

    assert "make notebooks" in documented_commands("make notebooks")
    shell(f"make -o setup notebooks PY={sys.executable}")  # the newest sweep, the references
    assert "2026-01-01_00-00-00: 4 runs" in (html / "time_to_loss.html").read_text()
    assert "fashion_mnist_cnn" in (html / "variance_reduction.html").read_text()
    assert shell("jupyter lab --version").stdout.strip()  # what the README's `jupyter lab` needs
    for name in ("time_to_loss.ipynb", "variance_reduction.ipynb"):  # never rewritten
        assert (repo / "notebooks" / name).read_bytes() == (ROOT / "notebooks" / name).read_bytes()


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_small_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "sampler=uniform,upper_bound",
        *TINY,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    for name in ("uniform_seed0_0", "upper_bound_seed0_1"):
        summary = json.loads((sweep / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["step"] == 20
    assert list((sweep / ".submitit").iterdir())  # the jobs went through submitit
    # the jobs printed into submitit's logs: the launching terminal still learns where they went
    assert f"multirun: 2 runs in {sweep.resolve()}" in proc.stdout
    assert "  upper_bound_seed0_1: completed, 20 steps, train loss" in proc.stdout


@pytest.mark.slow
def test_a_multirun_reports_where_its_runs_went(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "sampler=uniform,loss", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    report = proc.stdout[proc.stdout.index("multirun: ") :]
    assert report.splitlines()[0] == f"multirun: 2 runs in {sweep.resolve()}"
    assert "  uniform_seed0_0: completed, 20 steps, train loss " in report
    assert "  loss_seed0_1: completed, 20 steps" in report
    assert f"python scripts/aggregate.py {sweep.resolve()}" in report


# ---------------------------------------------------------------- scripts/time_to_loss.py
def test_time_to_loss_counts_the_runs_and_follows_each_from_its_metrics(tmp_path):
    ttl = load_script("time_to_loss")
    assert ttl.expected_runs(["uniform", "loss"], [0, 1, 2], ["trainer.time_budget=5"]) == 6
    assert ttl.expected_runs(["uniform"], [0], ["optimizer.lr=0.1,0.05", "threads=1"]) == 2
    run = tmp_path / "run"
    run.mkdir()
    assert run_fraction(run, {"time_budget": 10}) == 0.0  # no metrics yet
    (run / "metrics.csv").write_text("step,epoch,train_time\n0,0,0.0\n50,0.5,2.5\n")
    assert run_fraction(run, {"time_budget": 10, "max_steps": None}) == 0.25
    assert run_fraction(run, {"time_budget": None, "max_steps": 100}) == 0.5
    assert run_fraction(run, {"time_budget": 10, "max_epochs": 1}) == 0.5  # the first limit


def test_a_resumed_sweeps_time_left_counts_only_the_new_runs(tmp_path):
    """An interrupted protocol run again finds runs already done: they must not count as done in
    this session's first second, or the bar promises the rest in a minute."""
    sweep = tmp_path / "sweep"
    for i in range(3):
        run = sweep / f"done{i}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("trainer: {time_budget: 10}\n")
        (run / "summary.json").write_text("{}")
    progress = SweepProgress(sweep, total=6, log=tmp_path / "none.log")
    progress.poll()
    assert progress.bar.n == 3 and progress.bar.initial == 3
    started = progress.bar.start_t
    progress.bar.start_t = started - 100  # 100 s later, one more run done
    run = sweep / "new"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("trainer: {time_budget: 10}\n")
    (run / "summary.json").write_text("{}")
    progress.poll()
    meter = progress.bar.format_dict
    rate = (meter["n"] - meter["initial"]) / meter["elapsed"]
    assert rate == pytest.approx(1 / 100, rel=0.05)  # one run per 100 s, not four
    progress.close()


@pytest.mark.slow
def test_time_to_loss_shows_one_bar_over_the_sweep_and_leaves_results_alone(tmp_path):
    def snapshot(folder: Path) -> dict:
        return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}

    before = snapshot(ROOT / "results")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "time_to_loss.py"),
            "digits_mlp",
            "--samplers",
            "uniform",
            "upper_bound",
            "--seeds",
            "0",
            "trainer.time_budget=2",  # an override after a list option is not read as a seed
            "threads=1",
            "--sweep-dir",
            str(sweep),
        ],
        cwd=tmp_path,
        env={**os.environ, "IS_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bar = proc.stderr.replace("\r", "\n")
    assert "2.0/2 runs" in bar and "now: upper_bound_seed0_1" in bar  # one bar, the run in progress
    results = [line for line in proc.stdout.splitlines() if " | results in " in line]
    assert [line.split(" on ")[0] for line in results] == ["uniform", "upper_bound"]
    assert "multirun: 2 runs in" in (sweep / "sweep.log").read_text()  # the jobs' own output
    for name in ("runs.csv", "table.md", "figure.png"):
        assert (sweep / name).is_file()
    assert snapshot(ROOT / "results") == before


def test_unreachable_wandb_degrades_to_offline_with_one_warning(
    compose, tmp_path, wandb_offline, monkeypatch
):
    """Online mode without a network (or a login): one warning, the run is logged offline."""
    import wandb

    from importance_sampling.config import builder

    real_init = wandb.init
    modes = []

    def init(*args, **kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("failed to reach the server")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    cfg = compose("logger=wandb", "logger.mode=online", *TINY)
    with pytest.warns(UserWarning, match="logging offline"):
        summary = builder.run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and modes == ["online", "offline"]
    assert len(list(wandb_offline.glob("offline-run-*"))) == 1


def test_wandb_failing_mid_run_never_stops_training(compose, tmp_path, wandb_offline, monkeypatch):
    import wandb

    from importance_sampling.config import builder

    calls = []

    def broken_log(self, *args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
    cfg = compose("logger=wandb", *TINY)
    with pytest.warns(UserWarning, match="W&B logging failed"):
        summary = builder.run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["step"] == 20
    assert len(calls) == 1  # gave up after the first failure
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 5
    assert wandb.run is None
