"""The tuned comparison: the validation split (the test set is never read while choosing), time to
a test accuracy and intervals over seeds, the choice of each sampler's setting, and the whole
protocol of scripts/tuned_comparison.py on digits."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import load_script

from importance_sampling import analysis
from importance_sampling.analysis import tuning
from importance_sampling.engine.data import (
    digits,
    hold_out_validation,
    validation_count,
    validation_indices,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.time_budget=null",
    "trainer.max_steps=20",
    "trainer.eval_every_seconds=null",
    "trainer.eval_every_steps=10",
    "trainer.progress=false",
    "threads=1",
]


# ---------------------------------------------------------------- the validation split
def test_a_validation_split_moves_training_points_to_the_evaluation_split():
    data = digits()
    held = hold_out_validation(data, 300, seed=0)
    train_idx, val_idx = validation_indices(len(data), 300, seed=0)
    assert (len(held.train_x), len(held.test_x), held.eval_split) == (1137, 300, "validation")
    # the validation points are training points, the rest is the new training set, in order
    torch.testing.assert_close(held.test_x, data.train_x[val_idx])
    torch.testing.assert_close(held.test_y, data.train_y[val_idx])
    torch.testing.assert_close(held.train_x, data.train_x[train_idx])
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(len(data)))
    # fixed by its own seed; another seed, another split
    assert torch.equal(validation_indices(len(data), 300, 0)[1], val_idx)
    assert not torch.equal(validation_indices(len(data), 300, 1)[1], val_idx)
    assert "1137 train / 300 validation" in repr(held)
    assert validation_count(0.2, 1437) == 287
    for bad in (0, -3, 1437, 1.5, True, "ten"):
        with pytest.raises(ValueError, match="dataset.validation_size"):
            validation_count(bad, 1437)
    with pytest.raises(ValueError, match="already has a validation split"):
        hold_out_validation(held, 10)
    # the streaming path holds out the same points, without the training augmentation
    streamed = hold_out_validation(data.streaming(), 300, seed=0)
    assert (len(streamed.train), len(streamed.test), streamed.eval_split) == (
        1137,
        300,
        "validation",
    )
    x, y = streamed.test[5]
    torch.testing.assert_close(x, data.train_x[val_idx[5]])
    assert int(y) == int(data.train_y[val_idx[5]])


def test_a_run_with_a_validation_split_never_reads_the_test_set(compose, tmp_path, monkeypatch):
    """The test set is poisoned (NaN inputs): a run that evaluated it would stop with a NaN test
    loss. With dataset.validation_size the run completes and reports on the validation split."""
    from importance_sampling.config import builder
    from importance_sampling.engine import data
    from importance_sampling.engine.trainer import TrainingError

    real = data.digits

    def poisoned(**kwargs):
        d = real(**kwargs)
        return replace(d, test_x=torch.full_like(d.test_x, math.nan))

    monkeypatch.setattr(data, "digits", poisoned)
    cfg = compose("dataset.validation_size=300", "sampler.batch_size=32", *TINY)
    summary = builder.run(cfg, tmp_path / "validation")
    assert summary["status"] == "completed" and summary["eval_split"] == "validation"
    assert math.isfinite(summary["test_loss"]) and summary["test_error"] < 0.5
    assert summary["samples"] / summary["epoch"] == pytest.approx(1137)  # trained without them
    line = builder.format_summary(summary, tmp_path)
    assert "validation error" in line and "test error" not in line
    with pytest.raises(TrainingError, match="test_loss is nan"):  # the poison is real
        builder.run(compose("sampler.batch_size=32", *TINY), tmp_path / "test")
    bad = compose("dataset.validation_size=5000", *TINY)
    with pytest.raises(builder.ConfigError, match=r"^dataset: dataset.validation_size=5000"):
        builder.build_trainer(bad, tmp_path / "bad")


# ---------------------------------------------------------------- accuracy targets, intervals
def tidy(curves: dict) -> pd.DataFrame:
    """(sampler, seed) -> (times, test errors) as a tidy frame of runs."""
    rows = []
    for (sampler, seed), (times, errors) in curves.items():
        for t, e in zip(times, errors, strict=True):
            rows.append(
                {
                    "run": f"{sampler}_{seed}",
                    "sampler": sampler,
                    "seed": seed,
                    "train_time": t,
                    "test_error": e,
                    "train_loss": e,
                }
            )
    return pd.DataFrame(rows)


def test_time_to_accuracy_interpolates_the_test_error_and_censors():
    runs = tidy(
        {
            ("uniform", 0): ([0, 10, 20], [0.9, 0.2, 0.1]),  # 90% accuracy at exactly t = 20
            ("uniform", 1): ([0, 10, 20], [0.9, 0.1, 0.05]),  # at t = 10
            ("upper_bound", 0): ([0, 10, 20], [0.9, 0.05, 0.05]),  # 0.9 - 0.1 = 0.8 of 0.85: t=9.41
            ("upper_bound", 1): ([0, 10, 20], [0.9, 0.3, 0.2]),  # never: censored at 20
        }
    )
    table = analysis.time_to_accuracy(runs, 0.9).set_index("run")
    assert table.loc["uniform_0", "time"] == 20.0  # 1 - 0.9 is not 0.1 in floating point
    assert table.loc["upper_bound_0", "time"] == pytest.approx(10 * 0.8 / 0.85)
    assert not table.loc["upper_bound_1", "reached"]
    assert table.loc["upper_bound_1", "censored_at"] == 20.0
    assert table["accuracy"].tolist() == pytest.approx([0.9] * 4)
    speed = analysis.speedup(analysis.time_to_accuracy(runs, 0.9)).set_index("sampler")
    ub = speed.loc["upper_bound"]
    # seed 0: 20 / 9.41; seed 1 never reached it, uniform did at 10: < 10 / 20
    assert ub.speedup_bound == "<" and ub.pairs == 2
    assert ub.speedup_gmean == pytest.approx(math.sqrt(20 / (10 * 0.8 / 0.85) * 0.5))
    # the worst final uniform error is 0.1: targets 1 - 0.12, 1 - 0.11, 1 - 0.1
    assert analysis.default_accuracy_targets(runs) == pytest.approx([0.88, 0.89, 0.9])


def test_intervals_over_seeds_are_student_t_on_log_ratios():
    assert analysis.log_ratio_interval([2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0, 2.0))
    # logs 0 and ln 4: mean ln 2, sd ln 4 / sqrt 2, t(1 dof, 97.5%) = 12.706
    gmean, low, high = analysis.log_ratio_interval([1.0, 4.0])
    assert gmean == pytest.approx(2.0)
    assert (math.log2(low), math.log2(high)) == pytest.approx((1 - 12.7062, 1 + 12.7062), abs=1e-3)
    assert math.isnan(analysis.log_ratio_interval([3.0])[1])
    assert math.isnan(analysis.log_ratio_interval([])[0])
    values = pd.DataFrame(
        {
            "sampler": ["uniform", "uniform", "loss", "loss", "loss"],
            "seed": [0, 1, 0, 1, 2],  # seed 2 has no uniform run: not paired
            "train_loss": [1.0, 2.0, 0.5, 0.5, 100.0],
        }
    )
    ratios = analysis.paired_ratios(values, "train_loss").set_index("sampler")
    assert ratios.loc["loss", "pairs"] == 2
    assert ratios.loc["loss", "ratio_gmean"] == pytest.approx(math.sqrt(0.5 * 0.25))


# ---------------------------------------------------------------- choosing a setting
def selection(rows: list[tuple]) -> pd.DataFrame:
    """(sampler, lr, schedule, status, val_error, val_loss) rows as selection_table output."""
    return pd.DataFrame(
        [
            {
                "run": f"{s}_{lr}_{c}",
                "sampler": s,
                "lr": lr,
                "lr_schedule": c,
                "seed": 0,
                "status": status,
                "eval_split": "validation",
                "train_time": 10.0,
                "val_error": e,
                "val_loss": v,
                "train_loss": v,
            }
            for s, lr, c, status, e, v in rows
        ]
    )


def test_each_sampler_keeps_its_best_completed_setting_on_validation():
    table = selection(
        [
            ("uniform", 0.01, "constant", "completed", 0.12, 0.40),
            ("uniform", 0.05, "constant", "completed", 0.10, 0.35),
            ("uniform", 0.05, "cosine", "completed", 0.10, 0.30),  # tie on error: lower loss
            ("uniform", 0.2, "cosine", "failed", 0.02, 0.01),  # diverged: never chosen
            ("loss", 0.01, "constant", "completed", 0.09, 0.50),  # best, at the grid's edge
            ("loss", 0.05, "constant", "completed", 0.11, 0.20),
        ]
    )
    chosen = tuning.choose(table)
    picks = {(s.sampler, s.lr, s.schedule) for s in tuning.chosen_settings(chosen)}
    assert picks == {("uniform", 0.05, "cosine"), ("loss", 0.01, "constant")}
    edges = chosen[chosen["chosen"]].set_index("sampler")["edge"]
    assert not edges["uniform"] and edges["loss"]
    by_loss = tuning.chosen_settings(tuning.choose(table, by="loss"))
    assert {(s.sampler, s.lr) for s in by_loss} == {("uniform", 0.05), ("loss", 0.05)}
    text = tuning.selection_markdown(chosen)
    assert "| uniform | cosine |  | **10.00** | failed |" in text
    assert "| loss | constant | **9.00** † | 11.00 |  |" in text


def test_a_choice_at_the_edge_of_its_grid_widens_it_one_step_beyond():
    table = selection(
        [
            ("uniform", 0.05, "step", "completed", 0.071, 0.2),
            ("uniform", 0.1, "step", "completed", 0.070, 0.2),  # interior: no widening
            ("uniform", 0.2, "step", "completed", 0.088, 0.3),
            ("upper_bound", 0.05, "step", "completed", 0.073, 0.2),  # the smallest: lr 0.025
            ("upper_bound", 0.1, "step", "completed", 0.076, 0.2),
            ("upper_bound", 0.2, "step", "completed", 0.090, 0.3),
            ("loss", 0.01, "constant", "completed", 0.12, 0.4),
            ("loss", 0.03, "constant", "completed", 0.10, 0.3),  # the largest: lr 0.09
            ("loss", 0.09, "constant", "failed", 0.02, 0.0),  # ... unless it diverged there
        ]
    )
    wider = tuning.widened(tuning.choose(table))
    assert wider == [tuning.Setting("upper_bound", 0.025, "step")]
    wider = tuning.widened(tuning.choose(table.iloc[:-1]))
    assert set(wider) == {
        tuning.Setting("upper_bound", 0.025, "step"),
        tuning.Setting("loss", 0.09, "constant"),
    }
    assert tuning.widened(tuning.choose(table.iloc[3:4])) == []  # a grid of one lr: no edge


def test_the_protocol_runs_a_widened_selection_before_its_final_stage(tmp_path, monkeypatch):
    """--widen-edges N: the script's loop, with the runs replaced by a validation error that
    favours upper_bound's smallest lr at every round and uniform's middle one."""
    script = load_script("tuned_comparison")
    batches: list[list[str]] = []  # the runs of each run_all call, as "phase sampler lr"

    def setting(cmd: list[str], key: str) -> str:
        return next(a.split("=", 1)[1] for a in cmd if a.startswith(key + "="))

    def fake_run_all(jobs, log_path, progress, parallel):
        batches.append(
            [
                f"{d.parent.name} {setting(c, 'sampler')} {setting(c, 'optimizer.lr')}"
                for d, c in jobs
            ]
        )

    def fake_selection(runs):
        ran = [r.split() for batch in batches for r in batch if r.startswith("selection")]
        return selection(
            [
                (s, float(lr), "constant", "completed", error, 0.3)
                for _, s, lr in ran
                for error in [float(lr) if s == "upper_bound" else abs(float(lr) - 0.02)]
            ]
        )

    monkeypatch.setattr(script, "run_all", fake_run_all)
    monkeypatch.setattr(script, "evaluation_seconds", lambda cfg: 0.0)
    monkeypatch.setattr(script, "write_report", lambda args, folder, protocol: 0)
    monkeypatch.setattr(tuning, "collect", lambda root: None)
    monkeypatch.setattr(tuning, "selection_table", fake_selection)
    argv = ["digits_mlp", "--samplers", "uniform", "upper_bound", "--lrs", "0.01", "0.02", "0.04"]
    argv += ["--schedules", "constant", "--seeds", "0", "--protocol-dir", str(tmp_path / "p")]
    assert script.main([*argv, "--widen-edges", "2"]) == 0
    assert batches[1:] == [
        ["selection upper_bound 0.005"],  # the edge, one step beyond, twice (N = 2)
        ["selection upper_bound 0.0025"],
        ["final uniform 0.02", "final upper_bound 0.0025"],
    ]
    assert len(batches[0]) == 6
    assert json.loads((tmp_path / "p" / "protocol.json").read_text())["widen_edges"] == 2
    batches.clear()
    assert script.main(argv) == 0  # by default the grid stays as given
    assert batches[1] == ["final uniform 0.02", "final upper_bound 0.01"]


def test_the_final_stage_runs_whole_seed_pairs_back_to_back(tmp_path, monkeypatch):
    """Pairs (uniform first), a pair left half done is run again whole, --max-pairs stops
    after that many pairs run now."""
    script = load_script("tuned_comparison")
    ran: list[list[str]] = []

    def fake_run_all(jobs, log_path, progress, parallel):
        ran.append([d.name for d, _ in jobs])
        for d, _ in jobs:
            assert not d.exists()  # nothing of a half-done pair is kept
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"status": "completed"}))

    monkeypatch.setattr(script, "run_all", fake_run_all)
    picks = [tuning.Setting("upper_bound", 0.05, "step"), tuning.Setting("uniform", 0.1, "step")]
    pairs = script.seed_pairs(tmp_path, picks, [0, 1, 2], "digits_mlp", ["threads=2"])
    assert [[d.name for d, _ in pair] for pair in pairs][0] == [
        "uniform_seed0",
        "upper_bound_seed0",
    ]
    assert pairs[1][1][1][-1] == "threads=2" and "seed=1" in pairs[1][1][1]
    fake_run_all(pairs[0], None, None, 1)  # seed 0: done in an earlier working period
    fake_run_all(pairs[1][:1], None, None, 1)  # seed 1: its uniform run only
    ran.clear()
    log = tmp_path / "protocol.log"
    assert script.run_pairs(pairs, log, None, 1, max_pairs=1) == 2
    assert ran == [["uniform_seed1", "upper_bound_seed1"]]  # whole, and no further
    assert "run again whole" in log.read_text()
    assert script.run_pairs(pairs, log, None, 1) == 3
    assert ran[1:] == [["uniform_seed2", "upper_bound_seed2"]]


def test_choosing_refuses_runs_on_the_test_set_and_samplers_without_a_usable_run():
    table = selection([("uniform", 0.05, "constant", "completed", 0.1, 0.3)])
    with pytest.raises(tuning.SelectionError, match="evaluated on the test split"):
        tuning.choose(table.assign(eval_split="test"))
    with pytest.raises(tuning.SelectionError, match="no selection run of uniform completed"):
        tuning.choose(table.assign(status="failed"))


# ---------------------------------------------------------------- the whole protocol
def final_row(run_dir: Path) -> dict:
    return pd.read_csv(run_dir / "metrics.csv").iloc[-1].to_dict()


@pytest.mark.slow
def test_the_protocol_chooses_on_validation_and_reports_on_the_test_set(tmp_path):
    def snapshot(folder: Path) -> dict:
        return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}

    before = snapshot(ROOT / "results")
    protocol, out = tmp_path / "protocol", tmp_path / "report"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "tuned_comparison.py"),
        "digits_mlp",
        "--samplers",
        "uniform",
        "upper_bound",
        "--lrs",
        "0.0001",  # barely moves in 1 s: the known loser
        "0.05",
        "--schedules",  # one schedule: the choice among schedules is the unit test's above
        "cosine",
        "--seeds",
        "0",
        "1",
        "--validation-size",
        "300",
        "trainer.time_budget=1",
        "trainer.eval_every_seconds=0.25",
        "--jobs",
        "2",
        "--allow-starved",  # two runs at a time beside the rest of the suite: starved, known
        "--protocol-dir",
        str(protocol),
        "--out",
        str(out),
    ]
    env = {**os.environ, "IS_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "estimated duration:" in proc.stdout and "8.0/8 runs" in proc.stderr.replace("\r", "\n")

    # selection: 2 samplers x 2 lrs x 1 schedule, every one on the validation split only
    selection_runs = sorted((protocol / "selection").iterdir())
    assert len(selection_runs) == 4
    for run in selection_runs:
        summary = json.loads((run / "summary.json").read_text())
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert summary["eval_split"] == "validation" and config["dataset"]["validation_size"] == 300
        assert summary["samples"] / summary["epoch"] == pytest.approx(1137)
    log = (protocol / "protocol.log").read_text()
    assert log.count("1137 train / 300 validation") == 4  # what each selection run evaluated
    # the choice is the best validation error of each sampler (ties: validation loss), which
    # the slow learning rate never is
    best = {}
    for run in selection_runs:
        row, setting = final_row(run), tuning.read_setting(run)
        key = (row["test_error"], row["test_loss"])
        sampler = run.name.split("_lr")[0]
        if sampler not in best or key < best[sampler][0]:
            best[sampler] = (key, setting["lr"], setting["lr_schedule"])
    runs, chosen, saved = tuning.load_saved(out)
    picks = chosen[chosen["chosen"]].set_index("sampler")
    for sampler, (_, lr, schedule) in best.items():
        assert (picks.loc[sampler, "lr"], picks.loc[sampler, "lr_schedule"]) == (lr, schedule)
        assert lr == 0.05
    # final: the chosen settings, 2 seeds, the whole training set, the test set
    assert runs["run"].nunique() == 4 and set(runs["eval_split"]) == {"test"}
    assert set(runs["seed"]) == {0, 1}
    for sampler, rows in runs.groupby("sampler"):
        assert set(rows["lr"]) == {picks.loc[sampler, "lr"]}
        assert set(rows["lr_schedule"]) == {picks.loc[sampler, "lr_schedule"]}
    assert saved["validation_size"] == 300 and saved["lrs"] == [0.0001, 0.05]

    # the report reads back, and regenerates identically from its own files
    table = (out / "table.md").read_text()
    assert "| uniform | 0.05 |" in table and "test accuracy" in table
    # every run timed the reference workload: the report sets the pairs' speeds side by side
    assert (runs.drop_duplicates("run")["run_reference_ms"] > 0).all()
    assert "## Machine speed in each pair" in table and "in reference steps" in table
    assert (out / "figure.png").stat().st_size > 20_000
    accuracy = pd.read_csv(out / "time_to_accuracy.csv")
    assert set(accuracy["sampler"]) == {"uniform", "upper_bound"}
    assert accuracy[accuracy["sampler"] == "uniform"]["reached"].eq(2).all()
    script = load_script("tuned_comparison")
    assert (
        script.main(
            ["digits_mlp", "--report-only", str(out), "--out", str(tmp_path / "again")]
            + ["--allow-starved"]
        )
        == 0
    )
    assert (tmp_path / "again" / "table.md").read_text() == table
    assert snapshot(ROOT / "results") == before

    # the final stage for one more seed, from the saved report: its runs join the saved ones
    extended = tmp_path / "extended"
    more = [
        sys.executable,
        str(ROOT / "scripts" / "tuned_comparison.py"),
        "digits_mlp",
        "--final-only",
        str(out),
        "--seeds",
        "2",
        "--allow-starved",
        "--protocol-dir",
        str(tmp_path / "more"),
        "--out",
        str(extended),
    ]
    proc = subprocess.run(more, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs, chosen_again, saved = tuning.load_saved(extended)
    assert set(runs["seed"]) == {0, 1, 2} and runs["run"].nunique() == 6
    assert saved["seeds"] == [0, 1, 2] and saved["final_only"]["seeds_run"] == [2]
    assert "run again (seeds 2; seeds 0, 1 kept from before)" in (extended / "table.md").read_text()

    def picked(table):
        return table[table["chosen"]][["sampler", "lr", "lr_schedule"]].values.tolist()

    assert picked(chosen_again) == picked(chosen)  # the choice is the saved one
    new = runs[runs["seed"] == 2]
    assert set(new["lr"]) == {0.05} and set(new["eval_split"]) == {"test"}

    # an unfinished protocol (a selection run and the final stage still to do): a PARTIAL report
    # of the runs done, nothing chosen
    unfinished = tmp_path / "unfinished"
    shutil.copytree(protocol, unfinished, symlinks=True)
    shutil.rmtree(unfinished / "final")
    (sorted((unfinished / "selection").iterdir())[0] / "summary.json").unlink()  # still running
    partial = ["digits_mlp", "--report-only", str(unfinished), "--out", str(tmp_path / "partial")]
    assert script.main([*partial, "--allow-starved"]) == 0
    text = (tmp_path / "partial" / "table.md").read_text()
    assert "**PARTIAL**: 3 of 4 selection runs and 0 of 4 final runs done" in text
    assert "**" not in text.split("done;")[1]  # no setting chosen in bold
    assert not (tmp_path / "partial" / "runs.csv").exists()
    assert len(pd.read_csv(tmp_path / "partial" / "selection.csv")) == 3

    # a final run that flagged itself starved: the protocol refuses to compare, unless told to
    # (every run first marked as having had the machine, as on an idle one)
    for summary_file in protocol.glob("*/*/summary.json"):
        idle = {**json.loads(summary_file.read_text()), "machine_share": 1.0, "starved": False}
        summary_file.write_text(json.dumps(idle))
    again = ["digits_mlp", "--report-only", str(protocol), "--out", str(tmp_path / "idle")]
    assert script.main(again) == 0
    flagged = sorted((protocol / "final").iterdir())[0]
    summary = json.loads((flagged / "summary.json").read_text())
    (flagged / "summary.json").write_text(
        json.dumps({**summary, "machine_share": 0.4, "starved": True})
    )
    again = ["digits_mlp", "--report-only", str(protocol), "--out", str(tmp_path / "starved")]
    assert script.main(again) == 1
    assert script.main([*again, "--allow-starved"]) == 0
    assert "STARVED: 1 run" in (tmp_path / "starved" / "table.md").read_text()


@pytest.mark.slow
def test_the_protocol_refuses_overrides_it_sets_itself(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tuned_comparison.py"), "digits_mlp", "seed=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "seed is set by the protocol" in proc.stderr
