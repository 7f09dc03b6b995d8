"""The aggregation maths on hand-made metrics: interpolation, censoring, speedups, tables."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import load_script

from importance_sampling import analysis
from importance_sampling.analysis import first_crossing, value_at
from importance_sampling.engine.outputs import METRICS_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def tidy(curves: dict[tuple[str, int], tuple[list[float], list[float]]]) -> pd.DataFrame:
    """A tidy frame from {(sampler, seed): (train_times, train_losses)}; test_error = loss / 10,
    epoch = step / 10."""
    rows = []
    for (sampler, seed), (times, losses) in curves.items():
        for step, (t, loss) in enumerate(zip(times, losses, strict=True)):
            rows.append(
                {
                    "run": f"{sampler}_seed{seed}",
                    "sampler": sampler,
                    "seed": seed,
                    "step": step,
                    "epoch": step / 10,
                    "train_time": t,
                    "train_loss": loss,
                    "test_error": loss / 10,
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- interpolation
@pytest.mark.parametrize(
    "target, expected",
    [
        (0.75, 1.5),  # between (1, 1.0) and (2, 0.5): 1 + (1.0 - 0.75) / 0.5
        (1.0, 1.0),  # a row exactly at the target
        (0.3, 2.8),  # between (2, 0.5) and (3, 0.25): 2 + 0.2 / 0.25
        (2.0, 0.0),  # the first row is already there
        (5.0, 0.0),
    ],
)
def test_first_crossing_interpolates_linearly(target, expected):
    assert first_crossing([0, 1, 2, 3], [2.0, 1.0, 0.5, 0.25], target) == pytest.approx(expected)


def test_first_crossing_is_the_first_one_and_nan_when_never_reached():
    # reaches 1.0 between t=0 and t=1, goes back up, comes down again: the first crossing counts
    assert first_crossing([0, 1, 2, 3], [2.5, 0.5, 1.5, 0.2], 1.0) == pytest.approx(0.75)
    assert math.isnan(first_crossing([0, 1, 2], [2.0, 1.0, 0.5], 0.4))
    assert math.isnan(first_crossing([0, 1], [2.0, math.nan], 0.1))  # diverged: never reached
    assert math.isnan(first_crossing([], [], 1.0))


def test_value_at_interpolates_inside_the_run_and_is_nan_outside():
    times, values = [0, 2, 4], [1.0, 0.5, 0.1]
    assert value_at(times, values, 1.0) == pytest.approx(0.75)
    assert value_at(times, values, 3.0) == pytest.approx(0.3)
    assert value_at(times, values, 4.0) == pytest.approx(0.1)
    assert math.isnan(value_at(times, values, 4.5))  # the run ended before


# ---------------------------------------------------------------- time to loss and speedup
@pytest.fixture
def sweep():
    """uniform reaches 0.5 at t = 4 (seed 0) and 6 (seed 1); upper_bound at t = 2 and 2;
    loss reaches it on seed 0 only (t = 3; seed 1 stops at 0.6 after 5 s: censored)."""
    return tidy(
        {
            ("uniform", 0): ([0, 2, 4, 8], [2.0, 1.0, 0.5, 0.3]),
            ("uniform", 1): ([0, 3, 6, 8], [2.0, 1.0, 0.5, 0.4]),
            ("upper_bound", 0): ([0, 1, 3, 8], [2.0, 1.0, 0.0, 0.0]),  # 0.5 at t = 1 + 0.5 * 2 = 2
            ("upper_bound", 1): ([0, 2, 8], [2.0, 0.5, 0.1]),
            ("loss", 0): ([0, 2, 4], [2.0, 1.0, 0.0]),  # 0.5 at t = 3
            ("loss", 1): ([0, 5], [2.0, 0.6]),
        }
    )


def test_time_to_loss_marks_runs_that_never_reach_the_target_as_censored(sweep):
    ttl = analysis.time_to_loss(sweep, 0.5).set_index("run")
    assert ttl.loc["uniform_seed0", "time"] == pytest.approx(4.0)
    assert ttl.loc["uniform_seed1", "time"] == pytest.approx(6.0)
    assert ttl.loc["upper_bound_seed0", "time"] == pytest.approx(2.0)
    assert ttl.loc["loss_seed0", "time"] == pytest.approx(3.0)
    assert not ttl.loc["loss_seed1", "reached"] and math.isnan(ttl.loc["loss_seed1", "time"])
    assert ttl.loc["loss_seed1", "censored_at"] == 5.0
    assert ttl["reached"].sum() == 5


def test_speedup_pairs_seeds_with_the_baseline(sweep):
    table = analysis.speedup(analysis.time_to_loss(sweep, [0.5])).set_index("sampler")
    assert list(table.index) == ["uniform", "loss", "upper_bound"]  # the paper's order
    ub = table.loc["upper_bound"]
    # seed 0: 4 / 2 = 2, seed 1: 6 / 2 = 3
    assert (ub.speedup_median, ub.speedup_min, ub.speedup_max) == pytest.approx((2.5, 2.0, 3.0))
    assert ub.speedup_bound == "=" and ub.pairs == 2 and ub.reached == 2
    assert (ub.time_median, ub.time_min, ub.time_max) == (2.0, 2.0, 2.0)
    u = table.loc["uniform"]
    assert (u.speedup_median, u.time_median, u.time_min, u.time_max) == (1.0, 5.0, 4.0, 6.0)


def test_a_censored_sampler_gives_an_upper_bound_on_its_speedup(sweep):
    loss = analysis.speedup(analysis.time_to_loss(sweep, 0.5)).set_index("sampler").loc["loss"]
    # seed 0: 4 / 3; seed 1 never reached 0.5 within 5 s: speedup < 6 / 5
    assert (loss.speedup_min, loss.speedup_max) == pytest.approx((6 / 5, 4 / 3))
    assert loss.speedup_median == pytest.approx((4 / 3 + 6 / 5) / 2)
    assert loss.speedup_bound == "<" and loss.reached == 1 and loss.runs == 2
    assert loss.time_median == 3.0  # over the runs that reached it


def test_a_censored_baseline_gives_a_lower_bound_and_neither_reaching_gives_nothing():
    runs = tidy(
        {
            ("uniform", 0): ([0, 10], [2.0, 1.0]),  # never reaches 0.5 within 10 s
            ("uniform", 1): ([0, 10], [2.0, 1.0]),
            ("upper_bound", 0): ([0, 4], [2.0, 0.0]),  # 0.5 at t = 3
            ("upper_bound", 1): ([0, 10], [2.0, 0.8]),  # never: no information on this seed
        }
    )
    ub = analysis.speedup(analysis.time_to_loss(runs, 0.5)).set_index("sampler").loc["upper_bound"]
    assert ub.speedup_median == pytest.approx(10 / 3) and ub.pairs == 1 and ub.speedup_bound == ">"
    u = analysis.speedup(analysis.time_to_loss(runs, 0.5)).set_index("sampler").loc["uniform"]
    assert u.pairs == 0 and math.isnan(u.speedup_median) and u.reached == 0


def test_bounds_both_ways_are_not_a_bound():
    runs = tidy(
        {
            ("uniform", 0): ([0, 10], [2.0, 1.0]),  # censored at 10
            ("uniform", 1): ([0, 4], [2.0, 0.0]),  # 0.5 at 3
            ("loss", 0): ([0, 4], [2.0, 0.0]),  # 0.5 at 3: > 10 / 3
            ("loss", 1): ([0, 6], [2.0, 1.0]),  # censored at 6: < 3 / 6
        }
    )
    loss = analysis.speedup(analysis.time_to_loss(runs, 0.5)).set_index("sampler").loc["loss"]
    assert loss.speedup_bound == "?"
    assert (loss.speedup_min, loss.speedup_max) == pytest.approx((0.5, 10 / 3))


def test_default_targets_are_reached_by_every_baseline_run(sweep):
    # the worst final uniform loss is 0.4 (seed 1)
    assert analysis.default_targets(sweep) == pytest.approx([0.8, 0.6, 0.4])
    ttl = analysis.time_to_loss(sweep, analysis.default_targets(sweep))
    assert ttl[ttl["sampler"] == "uniform"]["reached"].all()
    assert analysis.round_up(0.2312) == pytest.approx(0.24)
    assert analysis.round_up(0.0005) == pytest.approx(0.0005)
    assert analysis.round_up(12.01) == pytest.approx(13)


# ---------------------------------------------------------------- equal train_time
def test_equal_time_table_interpolates_every_run_at_the_same_train_time(sweep):
    table = analysis.equal_time_table(sweep, at=4.0).set_index("sampler")
    # uniform: 0.5 (seed 0) and 1.0 - 0.5 / 3 (seed 1, between (3, 1.0) and (6, 0.5))
    u1 = 1.0 - 0.5 / 3
    assert table.loc["uniform", "train_loss_median"] == pytest.approx((0.5 + u1) / 2)
    assert table.loc["uniform", "train_loss_max"] == pytest.approx(u1)
    # upper_bound: 0.0 and 0.5 - 0.4 * 2 / 6
    ub1 = 0.5 - 0.4 * 2 / 6
    assert table.loc["upper_bound", "train_loss_median"] == pytest.approx(ub1 / 2)
    assert table.loc["upper_bound", "train_loss_vs_uniform"] == pytest.approx(
        (ub1 / 2) / ((0.5 + u1) / 2)
    )
    assert table.loc["upper_bound", "test_error_median"] == pytest.approx(ub1 / 20)
    # loss seed 1 ended at t = 5 > 4: both seeds count; at t = 4: 0.0 and 2.0 - 1.4 * 4 / 5
    assert table.loc["loss", "train_loss_median"] == pytest.approx((2.0 - 1.4 * 4 / 5) / 2)
    # how far each got: uniform seed 0 is at its step 2, seed 1 a third of the way from 1 to 2
    assert table.loc["uniform", "epoch_median"] == pytest.approx((0.2 + 0.1 + 0.1 / 3) / 2)
    text = analysis.equal_time_markdown(table.reset_index())
    # epochs: 0.2 + 0.1 / 5 (seed 0) and 0.1 + 0.1 / 3 (seed 1)
    assert (
        "| upper_bound | 2 | 0.1833 [0.000, 0.3667] | 0.27 | 1.83 [0.00, 3.67] | 0.27 | 0.18 |"
        in text
    )
    # a loss far below 1e-4 keeps its digits (it printed as 0.0000 beside a ratio of 3.08)
    from importance_sampling.analysis.tables import LOSS

    assert [analysis.fmt(x, LOSS) for x in (2.513e-05, 0.2016, 1.0)] == [
        "2.513e-05",
        "0.2016",
        "1.000",
    ]


def test_equal_time_defaults_to_the_end_of_the_shortest_run(sweep):
    assert analysis.common_time(sweep) == 4.0
    assert analysis.equal_time_table(sweep)["train_time"].eq(4.0).all()
    # a time some runs never reached: they are left out of the median, not extrapolated
    late = analysis.equal_time_table(sweep, at=8.0).set_index("sampler")
    assert math.isnan(late.loc["loss", "train_loss_median"])
    assert late.loc["uniform", "train_loss_median"] == pytest.approx(0.35)


def test_curves_take_the_median_and_band_over_seeds(sweep):
    c = analysis.curves(sweep[sweep["sampler"] == "uniform"], "train_loss", points=9)  # grid 0..8
    at6 = c[c["train_time"] == 6.0].iloc[0]
    # seed 0 at 6: 0.5 - 0.2 * 2 / 4 = 0.4; seed 1: 0.5
    assert (at6["median"], at6["min"], at6["max"], at6["runs"]) == pytest.approx(
        (0.45, 0.4, 0.5, 2)
    )


def test_markdown_says_which_numbers_are_bounds(sweep):
    table = analysis.speedup(analysis.time_to_loss(sweep, [0.5, 0.01]))
    text = analysis.time_to_loss_markdown(table)
    assert "| 0.5 | upper_bound | 2/2 | 2.0 [2.0, 2.0] | 2.50× [2.00, 3.00] |" in text
    assert "| 0.5 | loss | 1/2 | 3.0 [3.0, 3.0] | < 1.27× [1.20, 1.33] |" in text
    assert "| 0.01 | uniform | 0/2 | > 8.0 | – |" in text


# ---------------------------------------------------------------- run directories -> tidy frame
def write_run(run_dir: Path, sampler: str, seed: int, losses: list[float], summary: bool = True):
    (run_dir / ".hydra").mkdir(parents=True)
    rows = [
        {c: 0 for c in METRICS_COLUMNS} | {"step": 10 * i, "train_time": float(i), "train_loss": v}
        for i, v in enumerate(losses)
    ]
    pd.DataFrame(rows, columns=list(METRICS_COLUMNS)).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "sampler": {}}))
    choices = {
        "dataset": "digits",
        "model": "mlp",
        "sampler": sampler,
        "optimizer": "sgd",
        "experiment": "digits_mlp",
        "logger": "none",
    }
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    if summary:
        (run_dir / "summary.json").write_text(
            json.dumps({"status": "completed", "sampler": sampler})
        )


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    write_run(root / "uniform_seed0_0", "uniform", 0, [2.0, 1.0, 0.5])
    write_run(root / "uniform_seed1_1", "uniform", 1, [2.0, 1.2, 0.6])
    write_run(root / "upper_bound_seed0_2", "upper_bound", 0, [2.0, 0.5, 0.2])
    write_run(root / "upper_bound_seed1_3", "upper_bound", 1, [2.0, 0.6], summary=False)
    (root / "multirun.yaml").write_text("{}\n")
    return root


def test_collect_runs_gives_one_row_per_run_and_evaluation(sweep_dir):
    runs = analysis.collect_runs(sweep_dir)
    assert len(runs) == 3 + 3 + 3 + 2 and runs["run"].nunique() == 4
    assert list(runs.columns) == list(analysis.RUN_COLUMNS) + list(METRICS_COLUMNS)
    first = runs.iloc[0]
    assert (
        first.run,
        first.experiment,
        first.dataset,
        first.model,
        first.sampler,
        first.optimizer,
        first.seed,
        first.status,
    ) == ("uniform_seed0_0", "digits_mlp", "digits", "mlp", "uniform", "sgd", 0, "completed")
    # no summary.json: still running, or killed
    assert set(runs[runs["run"] == "upper_bound_seed1_3"]["status"]) == {"running"}
    assert runs.groupby("run")["step"].apply(list)["uniform_seed1_1"] == [0, 10, 20]


def test_load_reads_a_sweep_or_the_runs_csv_written_from_it(sweep_dir, tmp_path):
    runs = analysis.collect_runs(sweep_dir)
    paths = analysis.save(runs, tmp_path / "results", targets=[1.0, 0.6])
    for source in (tmp_path / "results", paths["runs"]):
        pd.testing.assert_frame_equal(analysis.load(source), runs, check_dtype=False)
    ttl = pd.read_csv(paths["time_to_loss"]).set_index(["target", "sampler"])
    # uniform reaches 1.0 at t = 1 and 1 + 0.2 / 0.6; upper_bound at 1 / 1.5 and 1 / 1.4
    assert ttl.loc[(1.0, "upper_bound"), "speedup_median"] == pytest.approx(
        (1.5 + (4 / 3) * 1.4) / 2
    )
    assert paths["figure"].stat().st_size > 10_000
    assert "| 0.6 | upper_bound | 2/2 |" in paths["table"].read_text()
    with pytest.raises(FileNotFoundError, match="no run"):
        analysis.load(tmp_path / "empty")


def test_aggregate_script_writes_the_tables_and_the_figure(sweep_dir, tmp_path, capsys):
    aggregate = load_script("aggregate")

    assert aggregate.main([str(sweep_dir), "--out", str(tmp_path / "out"), "--targets", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 11 rows" in out and "| 1 | upper_bound | 2/2 |" in out
    for name in ("runs.csv", "time_to_loss.csv", "equal_time.csv", "table.md", "figure.png"):
        assert (tmp_path / "out" / name).is_file()
    assert aggregate.main([str(tmp_path / "nothing")]) == 1


# ---------------------------------------------------------------- one experiment per comparison
def test_a_folder_of_several_experiments_is_refused_naming_them(sweep_dir, tmp_path, capsys):
    aggregate = load_script("aggregate")

    other = sweep_dir.parent / "2026-01-02_00-00-00"
    write_run(other / "uniform_seed0_0", "uniform", 0, [2.0, 1.0])
    hydra = yaml.safe_load((other / "uniform_seed0_0" / ".hydra" / "hydra.yaml").read_text())
    hydra["hydra"]["runtime"]["choices"] |= {"experiment": "fashion_mnist_mlp"}
    (other / "uniform_seed0_0" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))

    runs = analysis.collect_runs(sweep_dir.parent)
    with pytest.raises(analysis.MixedRunsError, match="2 experiments") as e:
        analysis.check_one_experiment(runs)
    assert "digits_mlp (digits, mlp): 4 runs" in str(e.value)
    assert "fashion_mnist_mlp (digits, mlp): 1 run," in str(e.value)

    out = tmp_path / "out"
    assert aggregate.main([str(sweep_dir.parent), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "digits_mlp" in err and "fashion_mnist_mlp" in err and "--experiment" in err
    assert not out.exists()
    assert (
        aggregate.main([str(sweep_dir.parent), "--out", str(out), "--experiment", "digits_mlp"])
        == 0
    )
    assert pd.read_csv(out / "runs.csv")["run"].nunique() == 4


def test_runs_that_differ_in_more_than_sampler_and_seed_are_never_pooled(
    sweep_dir, tmp_path, capsys
):
    """Two sweeps of one preset with different budgets in one folder: refused, naming the
    budget and how many runs have each; what may differ (sampler, seed, logger) is not named."""
    aggregate = load_script("aggregate")
    for i, run in enumerate(sorted(p for p in sweep_dir.iterdir() if p.is_dir())):
        config = {"seed": i % 2, "sampler": {"name": run.name}, "logger": {"mode": str(i)}}
        config["trainer"] = {"time_budget": 10.0 if i < 3 else 3.0, "progress": i == 0}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    runs = analysis.collect_runs(sweep_dir)
    with pytest.raises(analysis.MixedRunsError) as e:
        analysis.check_one_experiment(runs, sweep_dir)
    assert str(e.value) == (
        "the runs differ in more than sampler and seed: trainer.time_budget (10.0: 3 runs, "
        "3.0: 1 run)"
    )
    analysis.check_one_experiment(runs)  # without the folder: the configs are not read
    out = tmp_path / "out"
    assert aggregate.main([str(sweep_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.time_budget" in err[0] and not out.exists()


def test_at_after_every_run_warns_and_uses_the_end_of_the_shortest(sweep_dir, tmp_path, capsys):
    aggregate = load_script("aggregate")

    runs = analysis.collect_runs(sweep_dir)
    at, warning = analysis.equal_time_at(runs, 60)
    assert at == 1.0 and "after the end of every run (the longest ends at 2.0 s)" in warning
    at, warning = analysis.equal_time_at(runs, 1.5)  # upper_bound seed 1 ends at 1.0
    assert at == 1.5 and warning.startswith("1 of 4 runs end before train_time 1.5 s")
    assert analysis.equal_time_at(runs, 1.0) == (1.0, None)

    assert aggregate.main([str(sweep_dir), "--out", str(tmp_path / "o"), "--at", "60"]) == 0
    captured = capsys.readouterr()
    assert "warning: train_time 60 s is after the end of every run" in captured.err
    assert "At equal train_time = 1.0 s" in captured.out
    equal = pd.read_csv(tmp_path / "o" / "equal_time.csv")
    assert equal["train_loss_median"].notna().all()


@pytest.mark.slow
def test_aggregating_a_runs_csv_never_writes_beside_it(sweep_dir, tmp_path, monkeypatch):
    aggregate = load_script("aggregate")

    reference = tmp_path / "results" / "my_reference"
    analysis.save(analysis.collect_runs(sweep_dir), reference)
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    monkeypatch.setattr(aggregate, "ROOT", tmp_path)
    for source in (reference / "runs.csv", reference):
        assert aggregate.main([str(source)]) == 0
        assert {p.name: p.read_bytes() for p in reference.iterdir()} == before
        assert (tmp_path / "outputs" / "aggregate" / "my_reference" / "figure.png").is_file()
    # a sweep directory gets its outputs inside it
    assert aggregate.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "table.md").is_file()


def test_titles_name_the_data_actually_used_and_seeds_agree_in_number():
    runs = tidy({("uniform", 0): ([0, 1], [2.0, 1.0]), ("upper_bound", 0): ([0, 1], [2.0, 0.5])})
    runs = runs.assign(experiment="pixel_mnist_lstm", dataset="pixel_fashion_mnist", model="lstm")
    assert analysis.title(runs) == "LSTM on pixel-by-pixel Fashion-MNIST (preset pixel_mnist_lstm)"
    _, _, text = analysis.report(runs, targets=[1.0])
    assert "over 1 seed;" in text
    assert analysis.plural(1, "seed") == "1 seed" and analysis.plural(2, "seed") == "2 seeds"


# ---------------------------------------------------------------- figures
def test_every_sampler_has_its_own_colour_and_line_style_in_every_figure():
    from importance_sampling.analysis.styles import SAMPLER_STYLES, sampler_style

    samplers = {p.stem for p in (ROOT / "conf" / "sampler").glob("*.yaml")}
    assert samplers <= set(SAMPLER_STYLES)
    for key in ("color", "linestyle", "marker"):
        values = [str(style[key]) for style in SAMPLER_STYLES.values()]
        assert len(set(values)) == len(values), key
    assert sampler_style("my_own") == sampler_style("my_own")  # unknown names: stable


def test_the_figure_draws_each_sampler_in_its_style_and_hatches_censored_bars(sweep):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import to_rgba

    from importance_sampling.analysis.styles import sampler_style

    table = analysis.speedup(analysis.time_to_loss(sweep, [0.5, 0.01]))
    fig = analysis.figure(sweep, table, "title")
    loss_ax, error_ax, bars_ax = fig.axes[:3]
    medians = [line for line in loss_ax.get_lines() if not line.get_label().startswith("_")]
    for line in medians:
        sampler = line.get_label().split(" (")[0]
        assert to_rgba(line.get_color()) == to_rgba(sampler_style(sampler)["color"])
    assert {line.get_label() for line in medians} == {
        "uniform (2 seeds)",
        "loss (2 seeds)",
        "upper_bound (2 seeds)",
    }
    # two seeds: each seed's own thin line in its sampler's colour, no band
    seeds = [line for line in loss_ax.get_lines() if line.get_label().startswith("_")]
    assert len(seeds) == 6 and not loss_ax.collections
    assert {to_rgba(line.get_color()) for line in seeds} == {
        to_rgba(sampler_style(s)["color"]) for s in ("uniform", "loss", "upper_bound")
    }
    # target 0.01: no uniform run reaches it (a hatched bar in uniform's colour); loss and
    # upper_bound reach it on seed 0 only, as loss does 0.5: three "1/2" labels
    (hatched,) = [p for p in bars_ax.patches if p.get_hatch()]
    assert to_rgba(hatched.get_edgecolor()) == to_rgba(sampler_style("uniform")["color"])
    assert hatched.get_height() == 8.0  # up to the budget (the runs' last train_time)
    texts = sorted(t.get_text() for t in bars_ax.texts)
    assert texts == ["0/2", "1/2", "1/2", "1/2"]
    legend = fig.legends[0]
    assert any("no run reached the target" in t.get_text() for t in legend.get_texts())
    # the test-error panel is zoomed past the first 10% of train_time (chance-level errors)
    low, high = error_ax.get_ylim()
    assert high < 100 * 2.0 / 10 and "zoomed" in error_ax.get_title(loc="right")


def test_the_newest_sweep_is_the_one_that_started_last_not_the_last_touched(tmp_path):
    import os

    multirun = tmp_path / "multirun"
    old = multirun / "digits_mlp" / "2026-01-01_10-00-00"
    new = multirun / "2026-01-02_09-00-00"
    hydra_style = multirun / "2026-01-01" / "23-00-00"
    for sweep in (old, new, hydra_style):
        sweep.mkdir(parents=True)
        (sweep / "multirun.yaml").write_text("{}\n")
    (old / "runs.csv").write_text("aggregated today\n")  # touching an old sweep ...
    os.utime(old, (2e9, 2e9))
    os.utime(old / "multirun.yaml", (2e9, 2e9))
    assert analysis.newest_sweep(multirun) == new  # ... does not make it the newest
    assert analysis.sweep_start(hydra_style) < analysis.sweep_start(new)
    # a sweep directory named by the user: the earliest file written at its launch
    named = multirun / "my_sweep"
    (named / "run_0" / ".hydra").mkdir(parents=True)
    (named / "multirun.yaml").write_text("{}\n")
    (named / "run_0" / ".hydra" / "config.yaml").write_text("{}\n")
    os.utime(named / "multirun.yaml", (2.1e9, 2.1e9))
    os.utime(named / "run_0" / ".hydra" / "config.yaml", (2.05e9, 2.05e9))
    assert analysis.sweep_start(named) == 2.05e9
    assert analysis.newest_sweep(multirun) == named
    assert analysis.newest_sweep(tmp_path / "nothing") is None


def test_curves_stop_where_the_shortest_seed_ends_so_the_median_never_jumps():
    """Runs of one budget end a little apart; past the first end the median would be the last
    seed alone (a jump no run made). The curve stops where every seed still has data."""
    rows = []
    for seed, end, final in ((0, 10.0, 0.0003), (1, 10.3, 0.0095), (2, 10.1, 0.0002)):
        for t in [*range(0, 10), end]:
            loss = 1.0 / (1 + t) if t < 9 else final
            rows.append(
                {
                    "run": f"r{seed}",
                    "sampler": "upper_bound",
                    "seed": seed,
                    "train_time": float(t),
                    "train_loss": loss,
                }
            )
    runs = pd.DataFrame(rows)
    table = analysis.curves(runs, "train_loss", points=400)
    assert table["train_time"].max() <= 10.0 + 1e-9
    assert (table["runs"] == 3).all()
    last = table.iloc[-1]
    assert last["median"] == pytest.approx(0.0003)  # the median of the three, not seed 1 alone
    assert table["median"].iloc[-5:].max() < 0.01


def test_the_cost_of_each_kind_of_step_and_the_switch_figure():
    """Step costs from the row intervals of only one kind of step; the cost ratio over the
    uniform sampler's step; the figure draws tau against it."""
    rows = []
    for seed in (0, 1):
        for i in range(6):  # uniform: 10 steps a second
            rows.append(
                {
                    "run": f"u{seed}",
                    "sampler": "uniform",
                    "seed": seed,
                    "step": 10 * i,
                    "train_time": float(i),
                    "tau": float("nan"),
                    "is_fraction": 0.0,
                }
            )
        for i in range(6):  # 2 uniform rows (10 steps/s), then importance steps at 4 a second
            t, step, share = (float(i), 10 * i, 0.0) if i < 3 else (float(i), 20 + 4 * (i - 2), 1.0)
            rows.append(
                {
                    "run": f"ub{seed}",
                    "sampler": "upper_bound",
                    "seed": seed,
                    "step": step,
                    "train_time": t,
                    "tau": 1.0 + i,
                    "is_fraction": share if i else 0.0,
                }
            )
    runs = pd.DataFrame(rows)
    costs = analysis.switch.step_costs(runs).set_index("run")
    assert costs.loc["u0", "uniform_ms"] == pytest.approx(100.0)
    assert math.isnan(costs.loc["u0", "importance_ms"])
    assert costs.loc["ub1", "importance_ms"] == pytest.approx(250.0)
    ratio = analysis.switch.cost_ratio(runs)
    assert ratio["cost_ratio"].tolist() == pytest.approx([2.5])
    assert "| upper_bound | 250.0 | 100.0 | 2.50 |" in analysis.switch.cost_markdown(runs)
    fig = analysis.switch.plot_switch(runs)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("measured cost ratio 2.50" in label for label in labels)
