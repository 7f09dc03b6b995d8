import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from importance_sampling.engine.outputs import METRICS_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["uniform", "loss", "upper_bound", "gradient_norm"]
CONTRACT = [
    "step",
    "samples",
    "epoch",
    "train_time",
    "wall_time",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "tau",
    "is_fraction",
]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def options(group: str) -> list[str]:
    return sorted(
        p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if not p.stem.startswith("_")
    )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_trains_on_digits_and_writes_the_contract(sampler, compose, tmp_path):
    from importance_sampling.config import builder

    cfg = compose(
        f"sampler={sampler}",
        "trainer.time_budget=null",
        "trainer.max_steps=40",
        "trainer.eval_every_seconds=null",
        "trainer.eval_every_steps=10",
        "trainer.progress=false",
        "sampler.batch_size=32",
        # switch importance sampling on as soon as tau > 1 so the test exercises it
        *(["sampler.tau_threshold=1.0"] if sampler != "uniform" else []),
    )
    summary = builder.run(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert list(rows[0]) == list(METRICS_COLUMNS) and set(CONTRACT) <= set(METRICS_COLUMNS)
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30, 40]
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    assert int(rows[-1]["samples"]) == 40 * 32
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["status"] == "completed" and saved["step"] == 40 and saved == summary
    if sampler == "uniform":
        assert summary["importance_steps"] == 0
    else:
        assert summary["importance_steps"] > 10 and float(rows[-1]["is_fraction"]) > 0
        assert float(rows[-1]["tau"]) > 1


def test_time_budget_stops_the_run(compose, tmp_path):
    from importance_sampling.config import builder

    cfg = compose(
        "trainer.time_budget=1.5", "trainer.eval_every_seconds=0.5", "trainer.progress=false"
    )
    summary = builder.run(cfg, tmp_path)
    assert 1.5 <= summary["train_time"] < 2.5
    times = [float(r["train_time"]) for r in read_metrics(tmp_path)]
    assert times == sorted(times) and len(times) >= 4


def test_rows_due_by_seconds_wait_for_evaluation_to_keep_its_share():
    from importance_sampling.engine.budget import Budget, Clock

    start = {"step": 0, "train_time": 0.0}
    budget = Budget(time_budget=60, eval_every_seconds=1.0, eval_every_steps=50, eval_share=0.25)
    assert budget.row_due(Clock(train_time=1.0), start)
    budget.evaluated(2.0)  # a row took 2 s: the next after 6 s of steps (2 s of 8: a quarter)
    assert not budget.row_due(Clock(train_time=5.9, step=10), start)
    assert budget.row_due(Clock(train_time=6.0, step=10), start)
    assert budget.row_due(Clock(train_time=0.1, step=50), start)  # by steps: never delayed
    near_end = {"step": 0, "train_time": 50.0}  # 4 s left of 60, less than the 6 s gap
    assert not budget.row_due(Clock(train_time=56.0, step=10), near_end)
    budget.evaluated(0.1)  # cheap again: the cadence rules
    assert budget.row_due(Clock(train_time=1.0), start)
    fixed = Budget(time_budget=60, eval_every_seconds=1.0, eval_share=None)
    fixed.evaluated(100.0)
    assert fixed.row_due(Clock(train_time=1.0), start)
    with pytest.raises(ValueError, match=r"trainer.eval_share must be in \(0, 1\) or null"):
        Budget(eval_share=1.5)


def test_evaluation_keeps_its_share_of_the_wall_time_by_default(compose, tmp_path):
    """Rows asked for every 10 ms: by default evaluation still takes about a quarter of the
    wall time; with eval_share=null every row comes, and evaluation takes more."""
    from importance_sampling.config import builder

    summaries, rows = {}, {}
    for share in ("0.25", "null"):
        cfg = compose(
            "trainer.time_budget=1",
            "trainer.eval_every_seconds=0.01",
            f"trainer.eval_share={share}",
            "trainer.progress=false",
            "trainer.train_eval_size=null",
        )
        summaries[share] = builder.run(cfg, tmp_path / share)
        rows[share] = read_metrics(tmp_path / share)
        assert all(float(r["eval_seconds"]) > 0 for r in rows[share])
    assert summaries["0.25"]["eval_fraction"] < 0.35 < summaries["null"]["eval_fraction"]
    assert len(rows["0.25"]) < len(rows["null"])


def test_the_evaluation_batch_size_changes_the_speed_not_the_metrics(compose, tmp_path):
    from importance_sampling.config import builder

    rows = {}
    for size in ("null", "50", "4096"):  # null: the device's default, 128 on the CPU
        cfg = compose(
            "trainer.time_budget=null",
            "trainer.max_steps=20",
            "trainer.eval_every_seconds=null",
            "trainer.eval_every_steps=10",
            "trainer.progress=false",
            f"trainer.eval_batch_size={size}",
        )
        if size == "null":
            trainer = builder.build_trainer(
                cfg, tmp_path / "built", builder.build_dataset(cfg.dataset)
            )
            assert trainer.source.eval_batch_size == 128
        builder.run(cfg, tmp_path / size)
        rows[size] = read_metrics(tmp_path / size)
    assert len(rows["null"]) == 3
    for size in ("50", "4096"):  # the same training, evaluated in batches of 128, 50 or all
        for ours, theirs in zip(rows["null"], rows[size], strict=True):
            for key in ("train_loss", "test_loss"):
                assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-6)
            for key in ("train_error", "test_error", "step"):
                assert ours[key] == theirs[key]


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_the_plain_module(compose, tmp_path):
    """trainer.compile=true (torch.compile; inductor needs a C compiler, as on this CPU): the
    sampler scores through the compiled module and the checkpoint holds the original one's keys."""
    import torch

    from importance_sampling.config import builder
    from importance_sampling.engine.checkpoints import load_checkpoint
    from importance_sampling.engine.models import MLP

    cfg = compose(
        "trainer.compile=true",
        "trainer.time_budget=null",
        "trainer.max_steps=30",
        "trainer.eval_every_steps=10",
        "trainer.eval_every_seconds=null",
        "trainer.checkpoint_every=10",
        "trainer.checkpoint_unit=steps",
        "trainer.progress=false",
        "sampler.batch_size=32",
        "sampler.tau_threshold=1",
        "sampler.tau_momentum=0",
    )
    summary = builder.run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["importance_steps"] > 20
    rows = read_metrics(tmp_path)
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    state = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    MLP((1, 8, 8), 10).load_state_dict(state)  # no "_orig_mod." prefix
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("group", ["dataset", "model", "sampler", "optimizer"])
def test_every_config_option_composes(group, compose):
    from hydra.utils import instantiate

    for name in options(group):
        cfg = compose(f"{group}={name}")
        if group == "sampler":
            instantiate(cfg.sampler)  # constructors validate their options


# The values the importance samplers composed to when the shared options were a file of the
# sampler group (sampler/_importance.yaml): moving them out of the group must not change them.
SHARED = {
    "_target_": "importance_sampling.core.samplers.ImportanceSampler",
    "batch_size": 128,
    "presample_size": None,
    "tau_threshold": None,
    "tau_momentum": 0.9,
    "tau_kind": "variance",
    "smoothing": 0.0,
    "score_chunk_size": None,
}


@pytest.mark.parametrize(
    "sampler, own",
    [
        ("loss", {"score": "loss"}),
        ("upper_bound", {"score": "upper_bound"}),
        ("gradient_norm", {"score": "gradient_norm"}),
        ("upper_bound_auto", {"score": "upper_bound", "tau_threshold": "auto"}),
    ],
)
def test_importance_samplers_compose_the_shared_options(sampler, own, compose):
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(compose(f"sampler={sampler}").sampler) == {**SHARED, **own}
    # a preset still overrides the shared options (it comes after the sampler in the defaults)
    cfg = compose(f"sampler={sampler}", "experiment=pixel_mnist_lstm")
    assert (cfg.sampler.batch_size, cfg.sampler.presample_size) == (32, 96)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IS_DATA_DIR": str(cwd / "data")}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_train_py_writes_config_metrics_and_summary_in_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "sampler=upper_bound",
        "model=cnn",
        "trainer.time_budget=null",
        "trainer.max_steps=15",
        "trainer.eval_every_steps=5",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "upper_bound on digits: 15 steps" in proc.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert len(read_metrics(run_dir)) == 4
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 15


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [  # through a real process; test_reliability.py's BAD_INPUTS has many more, in-process
        (
            ["sampler.presample_size=16", "sampler.batch_size=32"],
            "sampler: sampler.presample_size (B=16) must be larger than sampler.batch_size",
        ),
        (
            ["experiment=pixel_mnist_lstm", "scale=cpu"],
            "runs on Fashion-MNIST's images instead (same format, Debian's dataset-fashion-mnist): "
            "dataset.images=fashion_mnist",
        ),
    ],
)
def test_bad_input_is_one_readable_line(args, message, tmp_path):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_trains_on_fashion_mnist_from_the_debian_files(sampler, compose, tmp_path):
    from importance_sampling.config import builder
    from importance_sampling.engine.data import DEBIAN_FASHION_MNIST

    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        msg = "Debian's dataset-fashion-mnist is not installed (make data installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    cfg = compose(
        "dataset=fashion_mnist",
        f"sampler={sampler}",
        "dataset.train_size=3000",
        "sampler.batch_size=64",
        "trainer.time_budget=null",
        "trainer.max_steps=30",
        "trainer.eval_every_seconds=null",
        "trainer.eval_every_steps=15",
        "trainer.train_eval_size=1000",
        "trainer.progress=false",
        *(["sampler.tau_threshold=1.0"] if sampler != "uniform" else []),
    )
    summary = builder.run(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert summary["dataset"] == "fashion_mnist" and summary["step"] == 30
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.slow
def test_help_lists_only_real_samplers_and_the_shared_base_is_no_choice(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("sampler: ")]
    listed = line.removeprefix("sampler: ").split(", ")
    assert listed == sorted(p.stem for p in (ROOT / "conf" / "sampler").glob("*.yaml"))
    assert set(listed) == {
        "uniform",
        "loss",
        "upper_bound",
        "gradient_norm",
        "upper_bound_auto",
        "history",
        "online_batch",
        "selective_backprop",
        "infobatch",
    }
    for name in ("_importance", "importance_sampler"):
        proc = run_cli(f"sampler={name}", "trainer.max_steps=1", cwd=tmp_path)
        assert proc.returncode == 1
        assert f"Could not find 'sampler/{name}'" in proc.stderr


@pytest.mark.slow
def test_resume_says_what_it_does(tmp_path):
    """resume=true on a directory without a checkpoint says it starts anew; resume=must refuses;
    with a checkpoint it says the step it resumes from."""
    run_dir = tmp_path / "run"
    common = [
        "trainer.time_budget=null",
        "trainer.eval_every_seconds=null",
        "trainer.eval_every_steps=5",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    must = run_cli(*common, "trainer.max_steps=10", "trainer.resume=must", cwd=tmp_path)
    assert must.returncode == 1 and "Traceback" not in must.stderr
    assert (
        f"error: no checkpoint in {run_dir}: nothing to resume (trainer.resume=must)" in must.stderr
    )
    assert not run_dir.exists()  # a run that failed on bad input leaves no empty folder
    fresh = run_cli(
        *common,
        "trainer.max_steps=10",
        "trainer.resume=true",
        "trainer.checkpoint_every=5",
        "trainer.checkpoint_unit=steps",
        cwd=tmp_path,
    )
    assert fresh.returncode == 0, fresh.stderr
    note = f"note: trainer.resume=true but {run_dir / 'checkpoint.pt'} does not exist"
    assert any(line.startswith(note) for line in fresh.stderr.splitlines()), fresh.stderr
    resumed = run_cli(*common, "trainer.max_steps=15", "trainer.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 10" in resumed.stdout + resumed.stderr
    assert [int(r["step"]) for r in read_metrics(run_dir)] == [0, 5, 10, 15]


def test_outside_the_venv_train_py_says_so_in_one_line():
    """A Python without the packages (here: the venv's, without site-packages)."""
    proc = subprocess.run(
        [sys.executable, "-S", str(ROOT / "train.py")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "venv" in lines[0], lines
