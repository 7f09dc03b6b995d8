"""Every run measures how much of the machine it got, and a starved run says so: in its summary,
its metrics rows, its last line, a sweep's report, the comparison tables and the tuned protocol."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from importance_sampling import analysis
from importance_sampling.config.hydra_callbacks import sweep_report
from importance_sampling.engine import machine
from importance_sampling.engine.machine import MachineShare, starved, starved_warning

ROOT = Path(__file__).resolve().parents[1]


def fake_clock(monkeypatch, readings: list[dict]):
    """thread_times() returns these readings, one per call ({tid: (run ns, wait ns)})."""
    calls = iter(readings)
    monkeypatch.setattr(machine, "thread_times", lambda pid=None: next(calls))


def test_the_share_is_run_over_run_plus_wait_summed_over_threads(monkeypatch):
    fake_clock(
        monkeypatch,
        [
            {1: (0, 0)},  # __init__: available
            {1: (100, 10), 2: (50, 0)},  # start
            {1: (300, 10), 2: (150, 0), 3: (40, 60)},  # stop: thread 3 started in between
            {1: (300, 10), 2: (150, 0), 3: (40, 60)},  # start
            {1: (400, 110), 2: (150, 0), 3: (40, 60)},  # stop: thread 1 waited as long as it ran
            {1: (0, 0)},  # a second MachineShare's __init__
        ],
    )
    share = MachineShare()
    share.start()
    share.stop()
    assert share.take_interval()[0] == pytest.approx(340 / 400)  # (200 + 100 + 40) / (+ 60 wait)
    share.start()
    share.stop()
    assert share.take_interval()[0] == pytest.approx(0.5)
    assert share.share == pytest.approx(440 / 600)
    resumed = MachineShare()
    resumed.load_state_dict(share.state_dict())
    assert resumed.share == pytest.approx(share.share)


def test_without_schedstat_nothing_is_measured_and_nothing_is_flagged(monkeypatch):
    monkeypatch.setattr(machine, "thread_times", lambda pid=None: None)
    share = MachineShare()
    share.start()
    share.stop()
    assert math.isnan(share.take_interval()[0]) and math.isnan(share.share)
    assert not starved(share.share) and starved(0.5) and not starved(0.95)
    assert starved_warning({"machine_share": None, "starved": False}) is None
    line = starved_warning({"machine_share": 0.42, "starved": True})
    assert line.startswith("warning: ") and "machine_share 0.42 < 0.9" in line
    assert "\n" not in line and "idle machine" in line


def test_steal_is_the_hypervisors_share_of_every_cpu_over_the_timed_intervals(monkeypatch):
    ticks = iter([(10, 1000), (30, 1200), (30, 1300), (130, 1500), (200, 2000), (200, 2100)])
    monkeypatch.setattr(machine, "cpu_times", lambda: next(ticks))
    share = MachineShare()
    share.start()
    share.stop()  # 20 of 200 ticks stolen
    assert share.take_interval()[1] == pytest.approx(0.1)
    share.start()
    share.stop()  # 100 of 200; the time between the intervals (evaluation) does not count
    share.start()
    share.stop()  # none of 100
    assert share.take_interval()[1] == pytest.approx(100 / 300)
    assert share.steal == pytest.approx(120 / 500)
    resumed = MachineShare()
    resumed.load_state_dict(share.state_dict())
    assert resumed.steal == pytest.approx(share.steal)
    resumed.load_state_dict({"run_ns": 1, "wait_ns": 0})  # a checkpoint from before steal
    assert math.isnan(resumed.steal)


def test_proc_stat_is_read_where_linux_has_it():
    times = machine.cpu_times()
    if not Path("/proc/stat").is_file():
        assert times is None
        return
    stolen, every = times
    assert 0 <= stolen <= every and every > 0


def run_train(run_dir: Path, preexec, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "threads=1",
        "trainer.time_budget=1.5",
        "trainer.eval_every_seconds=0.5",
        "trainer.progress=false",
        "trainer.reference_steps=40",  # ~40 ms: several of the scheduler's time slices
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def on_cpu(cpu: int, realtime: bool = False):
    def preexec():
        os.sched_setaffinity(0, {cpu})
        if realtime:  # no ordinary process can take the CPU from it (xdist workers included)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))

    return preexec


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_starved_run_is_flagged_and_a_run_with_the_cpu_to_itself_is_not(tmp_path):
    if machine.thread_times() is None:
        pytest.skip("the kernel does not account run-queue waits (no schedstat)")
    cpu = min(os.sched_getaffinity(0))
    # starved on purpose: a busy process on the one CPU the run may use
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=on_cpu(cpu))
    try:
        proc = run_train(tmp_path / "starved", on_cpu(cpu))
    finally:
        busy.kill()
        busy.wait()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "starved" / "summary.json").read_text())
    assert summary["starved"] and summary["machine_share"] < 0.75
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "machine_share" in warning[0]
    rows = pd.read_csv(tmp_path / "starved" / "metrics.csv")
    assert math.isnan(rows["machine_share"].iloc[0])  # the row before training: nothing yet
    assert (rows["machine_share"].iloc[1:] < 0.75).all()

    # the CPU to itself: a real-time run is never preempted by ordinary processes
    if os.geteuid() != 0:
        pytest.skip("the run with the CPU to itself is a real-time process: needs root")
    proc = run_train(tmp_path / "alone", on_cpu(cpu, realtime=True))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert not summary["starved"] and summary["machine_share"] > 0.9
    assert "warning: " not in proc.stderr
    # the reference workload ran at the speed the run got: about half with the CPU shared
    slow = json.loads((tmp_path / "starved" / "summary.json").read_text())["reference_ms"]
    assert slow > 1.5 * summary["reference_ms"] > 0
    rows = pd.read_csv(tmp_path / "alone" / "metrics.csv")
    assert (rows["reference_ms"] > 0).all() and rows["steal"].iloc[1:].between(0, 1).all()

    # the sweep's report and the comparison tables mark the starved run, and only it
    report = sweep_report(tmp_path).splitlines()
    flagged = [line for line in report if line.startswith("  ") and "[STARVED]" in line]
    assert len(flagged) == 1 and flagged[0].startswith("  starved: completed")
    assert "machine share" in flagged[0] and report[-2].startswith("1 run(s) [STARVED]")
    runs = analysis.collect_runs(tmp_path)
    assert list(analysis.starved_runs(runs)["run"]) == ["starved"]
    assert "STARVED: 1 run " in analysis.starved_note(runs)


def test_tables_and_figures_mark_starved_runs():
    rows = []
    for seed, flagged in ((0, False), (1, True)):
        for sampler in ("uniform", "upper_bound"):
            for t in (0.0, 1.0, 2.0):
                rows.append(
                    {
                        "run": f"{sampler}_{seed}",
                        "sampler": sampler,
                        "seed": seed,
                        "status": "completed",
                        "run_machine_share": 0.5 if flagged and sampler == "uniform" else 0.99,
                        "starved": flagged and sampler == "uniform",
                        "step": int(10 * t),
                        "epoch": t,
                        "train_time": t,
                        "train_loss": 1.0 / (1 + t),
                        "test_error": 0.3,
                    }
                )
    runs = analysis.with_run_columns(pd.DataFrame(rows))
    equal = analysis.equal_time_table(runs)
    assert dict(zip(equal["sampler"], equal["starved"], strict=True)) == {
        "uniform": 1,
        "upper_bound": 0,
    }
    markdown = analysis.equal_time_markdown(equal)
    assert "starved runs" in markdown and "| 1 ⚠ |" in markdown
    _, _, text = analysis.report(runs)
    assert "STARVED: 1 run " in text and "uniform_1 (0.50)" in text
    # a runs.csv written before the column existed reads as "not measured, not starved"
    old = runs.drop(columns=["run_machine_share", "starved"])
    assert not analysis.with_run_columns(old)["starved"].any()


def test_pairs_whose_machine_changed_speed_are_flagged_and_timed_in_reference_units():
    """Seed 1's upper_bound ran on a machine 10% slower: flagged, and in reference steps its
    time to the target shrinks by that much; seed 0's pair (2% apart) is not flagged."""
    from importance_sampling.analysis import drift

    rows = []
    speeds = {("uniform", 0): 10.0, ("upper_bound", 0): 10.2, ("uniform", 1): 10.0}
    speeds[("upper_bound", 1)] = 11.0
    for (sampler, seed), ms in speeds.items():
        for t in (0.0, 10.0, 20.0):
            error = 0.5 - t / (50 if sampler == "upper_bound" else 100)
            rows.append(
                {
                    "run": f"{sampler}_{seed}",
                    "sampler": sampler,
                    "seed": seed,
                    "run_reference_ms": ms,
                    "run_steal": 0.0,
                    "train_time": t,
                    "train_loss": error,
                    "test_error": error,
                }
            )
    runs = pd.DataFrame(rows)
    pairs = drift.pair_speeds(runs)
    assert list(pairs["flagged"]) == [False, True]
    assert pairs["ratio"].tolist() == pytest.approx([1.02, 1.1])
    scaled = drift.in_reference_units(runs)
    median = 10.1  # of the four runs' reference times (10, 10, 10.2, 11)
    slow = scaled[scaled["run"] == "upper_bound_1"]["train_time"]
    assert slow.tolist() == pytest.approx([0, 10 * median / 11, 20 * median / 11])
    text = drift.drift_markdown(runs, 20.0, accuracies=[0.7])
    assert "| 1 | upper_bound | 10.00 | 11.00 | 1.100 ⚠ |" in text
    assert "1 pair(s) flagged (seeds 1). Without them" in text and "over 1 pairs" in text
    assert "in reference steps" in text and "| 70.00 | upper_bound |" in text
    by_loss = drift.drift_markdown(runs, 20.0, loss_targets=[0.3])
    assert "| training loss | sampler |" in by_loss and "| 0.3 | upper_bound |" in by_loss
    # runs written before the reference workload: no section
    assert (
        drift.drift_markdown(runs.drop(columns=["run_reference_ms"]), 20.0, accuracies=[0.7]) == ""
    )
