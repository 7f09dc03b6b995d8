"""Data-parallel training with 2 processes on the CPU (gloo, one thread each).

The ranks are forked with a file rendezvous and joined with a timeout, so a hang fails the test
instead of blocking CI; the checks that need a running process group share one launch.
"""

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from importance_sampling.core.baselines import (
    HistorySampler,
    InfoBatchSampler,
    OnlineBatchSampler,
    SelectiveBackpropSampler,
)
from importance_sampling.core.collectives import Distributed
from importance_sampling.core.samplers import ImportanceSampler, UniformSampler
from importance_sampling.core.scores import cross_entropy
from importance_sampling.engine.budget import Budget
from importance_sampling.engine.data import digits
from importance_sampling.engine.models import MLP
from importance_sampling.engine.runtime import Runtime
from importance_sampling.engine.stopping import TrainingStopped
from importance_sampling.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def run_ranks(fn, *args, timeout: float = 120.0) -> None:
    """fn(rank, *args) in WORLD forked processes; fails if one fails or they are not done in time."""
    context = mp.get_context("fork")
    procs = [context.Process(target=fn, args=(rank, *args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} rank(s) still running after {timeout} s: a hang"
    assert [p.exitcode for p in procs] == [0] * WORLD, "a rank failed (its traceback is above)"


def uniform_trainer(data, out_dir, batch_size, dist_ctx, steps=20):
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes)
    return Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        UniformSampler(batch_size),
        data,
        out_dir,
        budget=Budget(None, max_steps=steps, eval_every_seconds=None, eval_every_steps=10),
        runtime=Runtime("cpu", dist=dist_ctx),
        checkpoint_every=10,
        checkpoint_unit="steps",
        progress=False,
    )


class FlipScores(ImportanceSampler):
    """Deliberately different score distributions per rank: rank 0's are flat, rank 1's are
    skewed from its 10th to its 40th scoring, so the combined tau rises past the threshold and
    falls back. Records what each rank decides at every step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.record = 0, []

    def scores(self, model, inputs, targets, loss_fn, logits=None):
        s = torch.ones(len(inputs))
        if self.dist.rank == 1 and 10 <= self.calls < 40:
            s[: len(s) // 8] = 50.0
        self.calls += 1
        return s

    def select(self, model, presample, loss_fn, more=None):
        self.record.append((round(self.switch.tau, 9), self.switch.on, len(presample)))
        return super().select(model, presample, loss_fn, more)


def check_injected_weights_give_the_single_process_gradient(rank, data):
    """Each rank trains on fixed positions of its presample with fixed weights; DDP's averaged
    gradient equals the gradient of the average of the ranks' weighted losses in one process."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    reference = copy.deepcopy(net)
    ddp = nn.parallel.DistributedDataParallel(net)
    positions = [torch.tensor([0, 0, 3]), torch.tensor([1, 2, 2])]
    weights = [torch.tensor([0.5, 0.5, 2.0]), torch.tensor([1.5, 0.7, 0.7])]
    presamples = [
        (data.train_x[4 * r : 4 * r + 4], data.train_y[4 * r : 4 * r + 4]) for r in range(WORLD)
    ]

    def weighted_loss(model, r):
        x, y = presamples[r]
        return (weights[r] * cross_entropy(model(x[positions[r]]), y[positions[r]])).mean()

    weighted_loss(ddp, rank).backward()
    (sum(weighted_loss(reference, r) for r in range(WORLD)) / WORLD).backward()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


EVERY_SAMPLER = {  # tau_threshold=1, no moving average: importance sampling from the 2nd step
    "loss": lambda: ImportanceSampler("loss", 32, tau_threshold=1.0, tau_momentum=0.0),
    "upper_bound": lambda: ImportanceSampler(
        "upper_bound", 32, tau_threshold=1.0, tau_momentum=0.0
    ),
    "gradient_norm": lambda: ImportanceSampler(
        "gradient_norm", 32, tau_threshold=1.0, tau_momentum=0.0
    ),
    "history": lambda: HistorySampler(
        "upper_bound", batch_size=32, tau_threshold=1.0, tau_momentum=0.0
    ),
    "online_batch": lambda: OnlineBatchSampler(32),
    "selective_backprop": lambda: SelectiveBackpropSampler(32),
    "infobatch": lambda: InfoBatchSampler(32, num_passes=1),
}


def ranks_worker(rank, tmp, data):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    ctx = Distributed(rank, WORLD)
    out = {}
    # uniform, 2 ranks x b/2, one run directory
    trainer = uniform_trainer(data, tmp / "uniform", 32, ctx)  # b global: 16 per rank
    trainer.fit()
    out["params"] = [p.detach().clone() for p in trainer.model.parameters()]
    check_injected_weights_give_the_single_process_gradient(rank, data)
    # tau and the switch, with different scores on each rank, through DDP training steps
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes)
    sampler = FlipScores(batch_size=32, presample_size=96)
    Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        sampler,
        data,
        tmp / "switch",
        budget=Budget(None, max_steps=70, eval_every_seconds=None, eval_every_steps=70),
        runtime=Runtime("cpu", dist=ctx),
        progress=False,
    ).fit()
    out["record"] = sampler.record
    # the shards: the points each rank loaded in the first epoch (uniform steps, no overlap)
    order_sampler = UniformSampler(32)
    order_sampler.setup(len(data), seed=0, dist=ctx)
    batches = order_sampler.batches()
    loaded = [next(batches) for _ in range(len(data) // 32 + 1)]  # one epoch and one more batch
    out["loaded"] = loaded
    # every other sampler trains data-parallel too: same parameters on both ranks, no hang
    out["samplers"] = {}
    for name, make in EVERY_SAMPLER.items():
        torch.manual_seed(0)
        model = MLP(data.input_shape, data.num_classes)
        summary = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            make(),
            data,
            tmp / name,
            budget=Budget(None, max_steps=12, eval_every_seconds=None, eval_every_steps=6),
            runtime=Runtime("cpu", dist=ctx),
            progress=False,
        ).fit()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        out["samplers"][name] = (summary, params)
    torch.save(out, tmp / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = digits()
    run_ranks(ranks_worker, tmp, data)
    return tmp, data, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_of_half_the_batch_train_like_one_rank_of_the_whole(two_ranks, tmp_path):
    tmp, data, results = two_ranks
    single = uniform_trainer(data, tmp_path, 32, Distributed())
    single.fit()
    for rank in range(WORLD):
        for p, q in zip(results[rank]["params"], single.model.parameters(), strict=True):
            torch.testing.assert_close(p, q.detach(), atol=1e-5, rtol=1e-4)
    # one run directory: one metrics.csv (rows counted over both ranks) and one checkpoint
    rows = list(csv.DictReader(open(tmp / "uniform" / "metrics.csv")))
    reference = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "10", "20"]
    assert [r["world_size"] for r in rows] == ["2"] * 3 and rows[-1]["samples"] == "640"
    for r, s in zip(rows, reference, strict=True):  # evaluation sharded over ranks, then summed
        assert float(r["train_loss"]) == pytest.approx(float(s["train_loss"]), rel=1e-4)
        assert float(r["test_error"]) == pytest.approx(float(s["test_error"]), abs=1e-9)
    state = torch.load(tmp / "uniform" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert sorted(p.name for p in (tmp / "uniform").iterdir()) == [
        "checkpoint.pt",
        "metrics.csv",
        "summary.json",
    ]


def test_ranks_with_different_scores_agree_on_tau_and_the_switch_at_every_step(two_ranks):
    _, _, results = two_ranks
    records = [r["record"] for r in results]
    assert len(records[0]) == 70 and records[0] == records[1]
    switched = [on for _, on, _ in records[0]]
    assert any(switched) and not switched[-1]  # on, then off again
    flips = sum(a != b for a, b in zip(switched, switched[1:], strict=False))
    assert flips >= 2
    # the presample each rank loaded followed the decision: B/W points when on, b/W when off
    assert all(size == (48 if on else 16) for _, on, size in records[0])


@pytest.mark.parametrize("name", EVERY_SAMPLER)
def test_every_sampler_trains_one_model_over_two_ranks(name, two_ranks):
    _, _, results = two_ranks
    (summary0, params0), (summary1, params1) = (r["samplers"][name] for r in results)
    assert summary0["status"] == summary1["status"] == "completed" and summary0["step"] == 12
    assert summary0["world_size"] == 2 and summary0["samples"] == 12 * 32
    torch.testing.assert_close(params0, params1)  # one model: DDP kept the ranks equal
    if name in ("loss", "upper_bound", "gradient_norm", "history"):
        assert summary0["importance_steps"] >= 5
    assert summary0["train_loss"] < 2.0


def test_shards_are_disjoint_cover_the_data_and_change_with_the_epoch(two_ranks):
    _, data, results = two_ranks
    per_epoch = (len(data) // WORLD) // 16  # full batches of 16 in each rank's share
    epochs = [[torch.cat(r["loaded"][:per_epoch]), r["loaded"][per_epoch]] for r in results]
    first = [set(e[0].tolist()) for e in epochs]
    assert not first[0] & first[1]  # disjoint
    assert len(first[0] | first[1]) == 2 * per_epoch * 16  # every point of the epoch once
    assert len(first[0] | first[1]) > 0.97 * len(data)
    # the next epoch is another permutation: its first batches differ from the first epoch's
    assert not torch.equal(epochs[0][1], results[0]["loaded"][0])


# ------------------------------------------------------------------ SIGTERM on one rank
class SignalAt(ImportanceSampler):
    """Sends ``signum`` to its own process in the middle of its ``at``-th step (None: never)."""

    def __init__(self, at=None, signum=signal.SIGTERM, **kwargs):
        super().__init__(**kwargs)
        self.at, self.signum, self.calls = at, signum, 0

    def select(self, model, presample, loss_fn, more=None):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return super().select(model, presample, loss_fn, more)


def stop_worker(rank, tmp, data, run, signal_rank, resume):
    """A 2-rank upper_bound run in tmp/run; rank ``signal_rank`` gets SIGTERM in step 37.
    Writes what fit did on this rank to tmp/<run><rank>.pt."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous_{run}_{resume}", rank=rank, world_size=WORLD
    )
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        SignalAt(37 if rank == signal_rank else None, batch_size=32, tau_threshold=1.2),
        data,
        tmp / run,
        budget=Budget(None, max_steps=100, eval_every_seconds=None, eval_every_steps=20),
        runtime=Runtime("cpu", dist=Distributed(rank, WORLD)),
        resume=resume,
        progress=False,
    )
    handler = signal.getsignal(signal.SIGTERM)
    try:
        trainer.fit()
        out = {"stopped": None, "step": trainer.step}
    except TrainingStopped as e:
        out = {"stopped": e.signum, "step": e.step, "exit_code": e.exit_code}
    out["handler_restored"] = signal.getsignal(signal.SIGTERM) is handler
    torch.save(out, tmp / f"{run}{rank}_{resume}.pt")
    dist.destroy_process_group()


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(tmp_path):
    data = digits()
    run_ranks(stop_worker, tmp_path, data, "reference", None, False)
    run_ranks(stop_worker, tmp_path, data, "run", 1, False)  # rank 1 alone gets the signal
    stopped = [torch.load(tmp_path / f"run{r}_False.pt") for r in range(WORLD)]
    for out in stopped:  # rank 0 heard of it through the clock's all-reduce, at the same step
        assert out == {
            "stopped": signal.SIGTERM,
            "step": 37,
            "exit_code": 143,
            "handler_restored": True,
        }
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.csv", "summary.json"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["counters"]["step"] == 37 and len(state["ranks"]) == WORLD
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["world_size"] == WORLD
    assert [r["step"] for r in metrics(run)] == ["0", "20"]

    run_ranks(stop_worker, tmp_path, data, "run", None, True)
    resumed = [torch.load(tmp_path / f"run{r}_True.pt") for r in range(WORLD)]
    assert [out["step"] for out in resumed] == [100, 100]
    assert metrics(run) == metrics(tmp_path / "reference")
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ torchrun end to end
TORCHRUN_RUN = [
    "sampler=upper_bound",
    "dataset=digits",
    "sampler.batch_size=32",
    "sampler.tau_threshold=1.2",
    "trainer.time_budget=null",
    "trainer.max_steps=300",
    "trainer.eval_every_seconds=null",
    "trainer.eval_every_steps=30",
    "trainer.checkpoint_every=60",
    "trainer.checkpoint_unit=steps",
    "trainer.progress=false",
]
COMPARED = [
    "step",
    "samples",
    "train_loss",
    "test_loss",
    "test_error",
    "tau",
    "is_fraction",
    "scored",
]


def torchrun(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(ROOT / "train.py"),
        *TORCHRUN_RUN,
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "IS_DATA_DIR": str(run_dir.parent / "data")}
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def metrics(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.mark.slow
def test_torchrun_trains_and_a_killed_run_resumes_to_the_same_metrics(tmp_path):
    reference = tmp_path / "reference"
    proc = torchrun(reference)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "upper_bound on digits: 300 steps" in out and "2 processes" in out
    rows = metrics(reference)
    assert len(rows) == 11 and float(rows[-1]["is_fraction"]) > 0
    assert json.loads((reference / "summary.json").read_text())["world_size"] == 2

    killed = tmp_path / "killed"
    proc = torchrun(killed)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # kill once a checkpoint exists
        if (killed / "checkpoint.pt").exists() and len(metrics(killed)) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    while time.monotonic() < deadline:  # until the ranks are gone too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert len(metrics(killed)) < len(rows)
    proc = torchrun(killed, "trainer.resume=true")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert metrics(killed) == rows


@pytest.mark.slow
def test_torchrun_streams_each_ranks_share_through_worker_processes(tmp_path):
    run_dir = tmp_path / "stream"
    proc = torchrun(
        run_dir,
        "dataset.stream=true",
        "loader.num_workers=1",
        "trainer.max_steps=60",
        "trainer.checkpoint_every=null",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows[-1]["step"] == "60" and rows[-1]["world_size"] == "2"
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])


def test_slurm_tasks_are_ranks_that_meet_whatever_the_submitting_shell_left(monkeypatch):
    """Each task of a SLURM job of 2 tasks (hydra/launcher=slurm with tasks_per_node=2, here on
    2 nodes) is one rank, and both reach the same address. sbatch copies the submitting shell's
    environment into the job: a MASTER_ADDR left there (a torchrun session) must not win."""
    from importance_sampling.config.launch import _from_slurm, launched_ranks

    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    job = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node[7-8]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "0",
    }
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    for key in (*exported, "MASTER_ADDR"):  # export() writes them: restore them after the test
        monkeypatch.setenv(key, "")
    seen = []
    for rank in (0, 1):
        for key in exported:
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("MASTER_ADDR", "stale-host")
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_NODEID", str(rank))
        assert launched_ranks() == 2
        _from_slurm()
        assert [os.environ[key] for key in exported[:4]] == [str(rank), "2", "0", "1"]
        seen.append((os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]))
    assert seen[0] == seen[1] and seen[0][0] == "node7"  # the job's first node, a port of its id
