"""Bad inputs fail fast with one readable line; bad numbers stop cleanly; unusable checkpoints
are refused with one line and change nothing; stopped and killed runs resume exactly."""

import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from importance_sampling.config import schema
from importance_sampling.engine.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

BAD_INPUTS = [
    # (command-line overrides, a piece of the one-line message)
    (["sampler=foo"], "Could not find 'sampler/foo'"),
    (["model=transformer"], "Available options in 'model'"),
    (["dataset=imagenet"], "Could not find 'dataset/imagenet'"),
    (["optimizer=lbfgs"], "Could not find 'optimizer/lbfgs'"),
    (
        ["sampler.presample_size=16", "sampler.batch_size=32"],
        "presample_size (B=16) must be larger than sampler.batch_size (b=32)",
    ),
    (
        ["sampler.batch_size=5000"],
        "sampler.batch_size=5000 is larger than the training set (1437 samples)",
    ),
    (
        ["sampler.presample_size=3000"],
        "sampler.presample_size=3000 is larger than the training set",
    ),
    (["sampler.batch_size=0"], "sampler.batch_size must be an integer >= 1, got 0"),
    (["sampler.tau_threshold=0.5"], "sampler.tau_threshold must be >= 1"),
    (["sampler.tau_momentum=1.0"], "sampler.tau_momentum must be in [0, 1), got 1.0"),
    (["sampler.tau_momentum=-0.5"], "sampler.tau_momentum must be in [0, 1), got -0.5"),
    (["sampler.tau_kind=cubic"], "sampler.tau_kind='cubic' is not one of variance, std"),
    (
        ["sampler.score=entropy"],
        "sampler.score='entropy' is not one of loss, upper_bound, gradient_norm",
    ),
    (["optimizer.lr=0"], "optimizer.lr must be > 0, got 0"),
    (["optimizer.lr=-0.1"], "optimizer: Invalid learning rate: -0.1"),
    (["trainer.time_budget=0"], "trainer.time_budget must be a number > 0, got 0"),
    (["trainer.time_budget=-5"], "trainer.time_budget must be a number > 0, got -5"),
    (["trainer.time_budget=abc"], "trainer.time_budget must be a number or null, got 'abc'"),
    (["trainer.max_steps=0"], "trainer.max_steps must be a number > 0"),
    (["trainer.eval_every_seconds=0"], "trainer.eval_every_seconds must be a number > 0"),
    (["trainer.eval_every_steps=-1"], "trainer.eval_every_steps must be a number > 0"),
    (
        ["trainer.time_budget=null"],
        "set at least one of trainer.time_budget, trainer.max_steps, trainer.max_epochs",
    ),
    (
        ["trainer.eval_every_seconds=null"],
        "set trainer.eval_every_seconds or trainer.eval_every_steps",
    ),
    (["trainer.checkpoint_unit=hours"], "trainer.checkpoint_unit must be seconds or steps"),
    (["trainer.amp=maybe"], "trainer.amp must be auto, true or false"),
    (["trainer.warmup=3"], "trainer.warmup is not an option: trainer has time_budget, max_steps"),
    (["+trainer.warmup=3"], "trainer.warmup is not an option: trainer has time_budget, max_steps"),
    (["optimizer.lr=abc"], "optimizer.lr must be a number, got 'abc'"),
    (["sampler.batch_size=1.5"], "sampler.batch_size must be an integer, got 1.5"),
    (["model.hidden_sizes=[64,x]"], "model.hidden_sizes[1] must be an integer, got 'x'"),
    (["dataset.download=true"], "dataset.download is not an option: dataset has"),
    (["trainer.resume=maybe"], "trainer.resume must be true, false or must, got 'maybe'"),
    (
        ["sampler.tau_threshold=abc"],
        "sampler.tau_threshold must be a number, auto or null, got 'abc'",
    ),
    (["trainer.max_steps=[1]"], "trainer.max_steps"),
    (["seed=null"], "seed must be an integer, got null"),
    (["trainer.lr_milestones=[0.5"], "cannot read the override 'trainer.lr_milestones=[0.5'"),
    (
        ["dataset=fashion_mnist", "data_dir=${oc.env:IS_UNSET_VARIABLE}"],
        "dataset.data_dir: KeyError raised while resolving interpolation",
    ),
    (["device=cuda:7"], "device: cuda:7 was asked for"),
    (["threads=0"], "threads must be a positive integer, auto or null, got 0"),
    (["model._target_=torch.nn.Linear"], "model: "),
    (
        ["dataset=fashion_mnist", "dataset.debian_dir=/nonexistent"],
        "apt-get install dataset-fashion-mnist",
    ),
]


def run_main(argv, tmp_path, monkeypatch, capsys, run_dir=None, out=False):
    """Run train.py in this process as the command line would (faster than a subprocess); the
    exit code and stderr (and stdout with ``out``). Exit code 0 when train.py returns."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    run_dir = run_dir or tmp_path / "run"
    monkeypatch.setenv("IS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(
        sys,
        "argv",
        ["train.py", *argv, f"hydra.run.dir={run_dir}", "trainer.progress=false"],
    )
    GlobalHydra.instance().clear()
    code = 0
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return (code, captured.out, captured.err) if out else (code, captured.err)


def one_line(err: str) -> str:
    """The single line of stderr (fails if there are more: a message is one line)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_fails_before_training_with_a_readable_message(
    argv, message, tmp_path, monkeypatch, capsys
):
    if "cuda" in argv[0] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, err = run_main(argv, tmp_path, monkeypatch, capsys)
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err
    if "apt-get" in message:  # missing data: the commands that get it, one per line (data.py)
        assert message in err
    else:
        assert message in one_line(err)
    assert not (tmp_path / "run" / "metrics.csv").exists()  # nothing was trained


# ------------------------------------------------------------------ wrong types, from the schemas
def numeric_fields(node_type: type) -> list[tuple[str, str, str]]:
    """(key, bad value, what the message says after the key) for every numeric option of a
    schema: the types OmegaConf checks (int, float, their lists, nullable) and the options that
    take a number or a word."""
    cases = []
    for f in fields(node_type):
        hint = typing.get_type_hints(node_type)[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = type(None) in typing.get_args(hint)
        base = args[0] if nullable else hint
        kinds = f.metadata.get("kinds", ())
        if typing.get_origin(base) is list and typing.get_args(base)[0] in (int, float):
            word = "an integer" if typing.get_args(base)[0] is int else "a number"
            cases.append((f.name, "[abc]", f"[0] must be {word}, got 'abc'"))
        elif base is int:
            cases.append((f.name, "1.5", f" must be an integer{' or null' * nullable}, got 1.5"))
        elif base is float:
            cases.append((f.name, "abc", f" must be a number{' or null' * nullable}, got 'abc'"))
        elif float in kinds:
            cases.append((f.name, "abc", " must be a number, auto or null, got 'abc'"))
    return cases


def wrong_type_cases() -> list[tuple[list[str], str, str, str]]:
    """(group choice, key, bad value, expected) for every numeric key of every schema: each
    group's options (one per schema) and the sections of config.yaml."""
    from importance_sampling.config.builder import compose

    cases, seen = [], set()
    for group in ("dataset", "model", "sampler", "optimizer", "logger"):
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            node_type = OmegaConf.get_type(compose(f"{group}={option}")[group])
            if is_dataclass(node_type) and node_type not in seen:
                seen.add(node_type)
                cases += [
                    ([f"{group}={option}"], f"{group}.{key}", bad, expected)
                    for key, bad, expected in numeric_fields(node_type)
                ]
    for section, node_type in [
        ("", schema.Config),
        ("trainer.", schema.TrainerConf),
        ("loader.", schema.LoaderConf),
        ("variance.", schema.VarianceConf),
    ]:
        cases += [([], f"{section}{key}", bad, exp) for key, bad, exp in numeric_fields(node_type)]
    return cases


WRONG_TYPES = wrong_type_cases()


def test_every_group_and_section_has_wrong_type_cases():
    """The generated table covers each schema (a schema with no numeric option needs none)."""
    keys = {key for _, key, _, _ in WRONG_TYPES}
    for expected in (
        "dataset.train_size",
        "model.hidden_sizes",
        "sampler.tau_threshold",
        "sampler.uniform_mix",
        "optimizer.lr",
        "optimizer.betas",
        "seed",
        "trainer.lr_milestones",
        "loader.num_workers",
        "variance.chunk_size",
    ):
        assert expected in keys
    assert len(WRONG_TYPES) > 60


@pytest.mark.slow
@pytest.mark.parametrize(
    "choice, key, bad, expected", WRONG_TYPES, ids=[f"{k}={b}" for _, k, b, _ in WRONG_TYPES]
)
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(
    choice, key, bad, expected, tmp_path, monkeypatch, capsys
):
    code, err = run_main([*choice, f"{key}={bad}"], tmp_path, monkeypatch, capsys)
    line = one_line(err)
    assert code == 1 and line.startswith("error: ")
    assert f"{key}{expected}" in line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.csv"))


def test_every_option_of_every_group_sets_every_key_of_its_schema(compose):
    """The schemas hold no values: each YAML file (with the config.yaml around it) sets them all."""
    for group in ("dataset", "model", "sampler", "optimizer", "logger"):
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            cfg = compose(f"{group}={option}")
            assert OmegaConf.missing_keys(cfg) == set(), (group, option)


def test_corrupt_dataset_files_name_the_directory(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    code, err = run_main(["dataset=fashion_mnist"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "truncated or corrupt" in err and str(raw) in err


def test_model_whose_output_does_not_match_the_classes_is_rejected():
    from importance_sampling.config import builder
    from importance_sampling.engine.data import digits

    with pytest.raises(builder.ConfigError, match=r"output shape \(2, 7\) .* 10 classes"):
        builder.check_model_output(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7)),
            digits(),
            torch.device("cpu"),
        )


def test_diverging_run_stops_with_the_step_and_keeps_its_results(compose, tmp_path):
    from importance_sampling.config import builder
    from importance_sampling.engine.trainer import TrainingError

    cfg = compose(
        "optimizer.lr=1e6",
        "optimizer.momentum=0.99",
        "sampler=uniform",
        "trainer.time_budget=null",
        "trainer.max_steps=500",
        "trainer.eval_every_steps=1",
        "trainer.progress=false",
    )
    with pytest.raises(
        TrainingError, match=r"the (training loss|train_loss) is (nan|inf) at step \d+"
    ):
        builder.run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "at step" in summary["error"]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) >= 1
    assert not (tmp_path / "checkpoint.pt").exists()  # the broken model is never saved


def test_divergence_keeps_the_checkpoint_of_the_last_healthy_row(compose, tmp_path):
    """check_finite=row (the CUDA default: no host sync per step) notices at the next metrics row
    at the latest; the model is broken by then, so checkpoint.pt stays the last healthy row's."""
    from importance_sampling.config import builder
    from importance_sampling.engine.checkpoints import load_checkpoint
    from importance_sampling.engine.trainer import TrainingError

    cfg = compose(
        "optimizer.lr=1e6",
        "optimizer.momentum=0.99",
        "sampler=uniform",
        "trainer.check_finite=row",
        "trainer.checkpoint_every=1",
        "trainer.checkpoint_unit=steps",
        "trainer.time_budget=null",
        "trainer.max_steps=500",
        "trainer.eval_every_steps=1",
        "trainer.progress=false",
    )
    with pytest.raises(TrainingError, match="diverged.*last healthy checkpoint"):
        builder.run(cfg, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    healthy = [r for r in rows if math.isfinite(float(r["train_loss"]))]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["counters"]["step"] == int(healthy[-1]["step"])  # the last healthy row's state
    assert all(torch.isfinite(p).all() for p in state["model"].values())


@pytest.mark.parametrize(
    "nan_in, tau_threshold",
    [
        ("uniform steps", 1000),  # tau stays on the device: the switch checks it when read
        ("presamples", 1),  # uniform steps switch importance sampling on, then the presample is NaN
    ],
)
def test_non_finite_scores_stop_the_run(nan_in, tau_threshold, compose, tmp_path, monkeypatch):
    from importance_sampling.config import builder
    from importance_sampling.core import samplers
    from importance_sampling.engine.trainer import TrainingError

    def scores(logits, targets, loss_fn):
        if nan_in == "presamples" and len(logits) != 384:
            return torch.rand(len(logits)) + 0.1
        return torch.full((len(logits),), float("nan"))

    monkeypatch.setattr(samplers, "upper_bound_scores", scores)
    cfg = compose(
        f"sampler.tau_threshold={tau_threshold}",
        "trainer.time_budget=null",
        "trainer.max_steps=200",
        "trainer.eval_every_steps=50",
        "trainer.progress=false",
        "sampler.tau_momentum=0",
    )
    with pytest.raises(TrainingError, match=r"importance scores are not finite at step \d+"):
        builder.run(cfg, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_all_equal_scores_fall_back_to_uniform_and_are_counted(compose, tmp_path, monkeypatch):
    from importance_sampling.config import builder
    from importance_sampling.core import samplers

    monkeypatch.setattr(samplers, "upper_bound_scores", lambda logits, *a: torch.ones(len(logits)))
    cfg = compose(
        "sampler.tau_threshold=1",
        "trainer.time_budget=null",
        "trainer.max_steps=30",
        "trainer.eval_every_steps=10",
        "trainer.progress=false",
    )
    sampler = builder.build(cfg.sampler, "sampler")
    sampler.switch.tau = 2.0  # on; equal scores then keep tau at 1 -> decays towards off
    summary = builder.run(cfg, tmp_path)
    assert summary["fallbacks"] >= 1 or summary["importance_steps"] == 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[-1]["tau"]) <= 1.0 + 1e-6  # equal scores: no variance to reduce


# ------------------------------------------------------------------ kill and resume
COMMON = [
    "sampler=upper_bound",
    "sampler.batch_size=32",
    "sampler.tau_threshold=1.2",
    "threads=1",
    "trainer.time_budget=null",
    "trainer.max_steps=1500",
    "trainer.eval_every_steps=125",
    "trainer.eval_every_seconds=null",
    "trainer.checkpoint_every=250",
    "trainer.checkpoint_unit=steps",
    "trainer.progress=false",
]
COMPARED = [
    "step",
    "samples",
    "epoch",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "tau",
    "is_fraction",
    "scored",
    "fallbacks",
]


def cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *COMMON, f"hydra.run.dir={run_dir}", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of COMMON, through train.py."""
    tmp = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "IS_DATA_DIR": str(tmp / "data")}
    subprocess.run(cli(tmp / "run"), env=env, check=True, capture_output=True, timeout=600)
    return tmp / "run"


def start_and_wait_for_rows(
    run_dir: Path, env: dict, stderr=subprocess.DEVNULL
) -> subprocess.Popen:
    """train.py with COMMON, returned once a mid-run checkpoint and 4 metrics rows exist."""
    proc = subprocess.Popen(cli(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "checkpoint.pt").exists() and len(metrics(run_dir)) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped; make it longer"
    return proc


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_metrics(reference, tmp_path):
    env = {**os.environ, "IS_DATA_DIR": str(tmp_path / "data")}
    killed = tmp_path / "killed"
    proc = start_and_wait_for_rows(killed, env)  # kill it once a mid-run checkpoint exists
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = len(metrics(killed))
    assert rows_at_kill < len(metrics(reference))

    resumed = subprocess.run(
        cli(killed, "trainer.resume=true"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(killed) == metrics(reference)
    assert json.loads((killed / "summary.json").read_text())["step"] == 1500


@pytest.mark.slow
def test_sigterm_stops_after_the_step_in_flight_and_resumes_to_the_same_metrics(
    reference, tmp_path
):
    """What SLURM does at a time limit, on scancel or preemption: SIGTERM, then SIGKILL later."""
    env = {**os.environ, "IS_DATA_DIR": str(tmp_path / "data")}
    stopped = tmp_path / "stopped"
    proc = start_and_wait_for_rows(stopped, env, stderr=subprocess.PIPE)
    rows_before = metrics(stopped)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143  # 128 + SIGTERM
    line = one_line(err.decode())
    step = int(line.split("stopped after step ")[1].split(";")[0])
    assert line.startswith("stopped: SIGTERM received: stopped after step ")
    assert line.endswith("to continue, run the same command with trainer.resume=true")
    # the state after the last step is saved, not only the last periodic checkpoint's
    state = load_checkpoint(stopped / "checkpoint.pt")
    assert state["counters"]["step"] == step and len(state["rows"]) >= len(rows_before)
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["error"].endswith(f"after step {step}")
    assert metrics(stopped)[: len(rows_before)] == rows_before  # nothing lost
    assert int(metrics(stopped)[-1]["step"]) <= step < 1500

    resumed = subprocess.run(
        cli(stopped, "trainer.resume=true"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(stopped) == metrics(reference)


def test_checkpoint_loads_with_weights_only(compose, tmp_path):
    from importance_sampling.config import builder
    from importance_sampling.engine.checkpoints import load_checkpoint

    cfg = compose(
        "trainer.time_budget=null",
        "trainer.max_steps=20",
        "trainer.eval_every_steps=10",
        "trainer.eval_every_seconds=null",
        "trainer.checkpoint_every=10",
        "trainer.checkpoint_unit=steps",
        "trainer.progress=false",
    )
    builder.run(cfg, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True inside
    assert state["counters"]["step"] == 20 and len(state["rows"]) == 3
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


# ------------------------------------------------------------------ checkpoints that cannot be resumed
SMALL = [
    "trainer.time_budget=null",
    "trainer.max_steps=20",
    "trainer.eval_every_steps=10",
    "trainer.eval_every_seconds=null",
    "trainer.checkpoint_every=10",
    "trainer.checkpoint_unit=steps",
]


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory) -> Path:
    """A finished run directory (metrics.csv, summary.json, checkpoint.pt) of the default
    configuration: upper_bound, MLP [256, 256], SGD, digits."""
    from importance_sampling.config import builder

    run = tmp_path_factory.mktemp("healthy")
    builder.run(builder.compose(*SMALL, "trainer.progress=false"), run)
    return run


def damage(path: Path, how: str) -> None:
    if how == "random bytes":
        path.write_bytes(random.Random(0).randbytes(100))
    elif how == "half a checkpoint":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "another program's file":
        torch.save({"weights": torch.ones(3), "epoch": 4}, path)
    elif how == "two ranks":  # as a 2-process run would have written it
        state = load_checkpoint(path)
        state["identity"]["world_size"] = state["world_size"] = 2
        state["ranks"] = state["ranks"] * 2
        torch.save(state, path)


CHECKPOINTS = [
    # (what the checkpoint is, overrides of the resuming run, a piece of the one-line message)
    ("random bytes", [], "is unreadable (not a checkpoint file"),
    ("half a checkpoint", [], "is unreadable (a truncated or damaged checkpoint"),
    ("another program's file", [], "is not a checkpoint of this project"),
    (
        "healthy",
        ["model.hidden_sizes=[64]"],
        "is from another configuration (model: MLP with net.1.weight of shape [256, 64] there, "
        "[64, 64] here)",
    ),
    ("healthy", ["model=cnn"], "is from another configuration (model: MLP there, CNN here)"),
    ("healthy", ["optimizer=adam"], "(optimizer: SGD there, Adam here)"),
    ("healthy", ["sampler=uniform"], "(sampler: upper_bound there, uniform here)"),
    (
        "healthy",
        ["dataset.train_size=1000"],
        "(dataset: digits of 1437 training points there, digits of 1000 here)",
    ),
    ("two ranks", [], "is from another configuration (world size: 2 processes there, 1 here)"),
]


@pytest.mark.parametrize(
    "how, overrides, message",
    CHECKPOINTS,
    ids=[f"{how} {' '.join(o)}".strip() for how, o, _ in CHECKPOINTS],
)
def test_a_checkpoint_that_cannot_be_resumed_is_one_line_and_changes_nothing(
    how, overrides, message, healthy_run, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(healthy_run, run)
    damage(run / "checkpoint.pt", how)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, err = run_main([*SMALL, "trainer.resume=true", *overrides], tmp_path, monkeypatch, capsys)
    line = one_line(err)
    assert code == 1
    assert line.startswith(f"error: {run / 'checkpoint.pt'} ") and message in line
    assert "delete it, or point hydra.run.dir elsewhere" in line
    assert "weights_only" not in line  # PyTorch's advice would run code from an unknown file
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_checkpoint_written_before_identities_still_resumes(
    healthy_run, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(healthy_run, run)
    state = load_checkpoint(run / "checkpoint.pt")
    del state["identity"]
    torch.save(state, run / "checkpoint.pt")
    code, err = run_main(
        [*SMALL, "trainer.resume=true", "trainer.max_steps=30"], tmp_path, monkeypatch, capsys
    )
    assert code == 0, err
    assert [r["step"] for r in metrics(run)] == ["0", "10", "20", "30"]


# ------------------------------------------------------------------ a graceful stop on SIGTERM
SHORT = [
    "threads=1",  # two threads on a busy 2-core machine are many times slower
    "sampler=upper_bound",
    "sampler.batch_size=32",
    "sampler.tau_threshold=1.2",
    "trainer.time_budget=null",
    "trainer.max_steps=300",
    "trainer.eval_every_steps=50",
    "trainer.eval_every_seconds=null",
]


@pytest.fixture
def keep_threads():
    """threads=1 runs in this process set torch's thread count: put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_sigterm_during_evaluation_finishes_the_row_then_stops_and_resumes_exactly(
    tmp_path, monkeypatch, capsys, keep_threads
):
    from importance_sampling.engine import trainer

    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert run_main(SHORT, tmp_path, monkeypatch, capsys, run_dir=reference)[0] == 0
    handler = signal.getsignal(signal.SIGTERM)
    evaluate, calls = trainer.evaluate, []

    def evaluate_and_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the test set of the row at step 100 (two evaluations per row)
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate_and_signal)
    code, err = run_main(SHORT, tmp_path, monkeypatch, capsys, run_dir=stopped)
    assert code == 143
    assert one_line(err) == (
        f"stopped: SIGTERM received: stopped after step 100; checkpoint.pt and summary.json "
        f'("status": "preempted") are in {stopped}; to continue, run the same command with '
        "trainer.resume=true"
    )
    assert signal.getsignal(signal.SIGTERM) is handler  # fit restored the handler it replaced
    # the row finished, no step after it: the rows so far, the state at the row
    assert [r["step"] for r in metrics(stopped)] == ["0", "50", "100"]
    assert metrics(stopped) == metrics(reference)[:3]
    summary = json.loads((stopped / "summary.json").read_text())
    assert (
        summary["status"] == "preempted" and summary["error"] == "stopped by SIGTERM after step 100"
    )
    assert load_checkpoint(stopped / "checkpoint.pt")["counters"]["step"] == 100

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    code, err = run_main(
        [*SHORT, "trainer.resume=true"], tmp_path, monkeypatch, capsys, run_dir=stopped
    )
    assert code == 0, err
    assert metrics(stopped) == metrics(reference)


def test_signals_while_saving_are_ignored_and_the_checkpoint_is_whole(
    tmp_path, monkeypatch, capsys, keep_threads
):
    """SIGUSR1 in the middle of a step: the step finishes, the state after it is saved; two
    SIGTERMs while it is being written change nothing; the exit code is SIGUSR1's."""
    from importance_sampling.engine.trainer import Trainer

    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert run_main(SHORT, tmp_path, monkeypatch, capsys, run_dir=reference)[0] == 0
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    train_step, save, saves_after_the_signal = Trainer.train_step, torch.save, []

    def step_and_signal(self):
        if self.step == 119:  # in the middle of step 120
            os.kill(os.getpid(), signal.SIGUSR1)
        train_step(self)

    def save_and_signal(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if not isinstance(obj, dict) or "counters" not in obj or obj["counters"]["step"] != 120:
            return
        saves_after_the_signal.append(path)  # written to checkpoint.pt.tmp, not yet renamed
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train_step", step_and_signal)
    monkeypatch.setattr(torch, "save", save_and_signal)
    code, out, err = run_main(SHORT, tmp_path, monkeypatch, capsys, run_dir=stopped, out=True)
    assert code == 138  # 128 + SIGUSR1
    assert one_line(err).startswith("stopped: SIGUSR1 received: stopped after step 120; ")
    assert "2 more stop signals came while saving: ignored" in out
    assert [Path(p).name for p in saves_after_the_signal] == ["checkpoint.pt.tmp"]
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
    assert sorted(p.name for p in stopped.iterdir()) == [
        ".hydra",
        "checkpoint.pt",
        "metrics.csv",
        "summary.json",
        "train.log",
    ]
    assert load_checkpoint(stopped / "checkpoint.pt")["counters"]["step"] == 120
    assert json.loads((stopped / "summary.json").read_text())["status"] == "preempted"

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(torch, "save", save)
    code, err = run_main(
        [*SHORT, "trainer.resume=true"], tmp_path, monkeypatch, capsys, run_dir=stopped
    )
    assert code == 0, err
    assert metrics(stopped) == metrics(reference)


def test_a_process_forked_during_a_run_still_ends_on_sigterm():
    """A DataLoader worker forked while fit runs inherits its handler; SIGTERM must still end it
    (the stop is the training process's, not the worker's)."""
    from importance_sampling.engine.stopping import StopRequest

    with StopRequest() as stop:
        pid = os.fork()
        if pid == 0:  # the child: wait for the signal, which should end it
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert stop.signum == 0  # the parent was not asked to stop
