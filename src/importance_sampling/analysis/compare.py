"""The paper's comparisons from the tidy frame of runs: which sampler reaches which loss first.

- ``time_to_loss``: for a target training loss, the train_time at which each run first reaches it,
  linearly interpolated between the two metrics rows around the crossing; a run that never
  reaches it is *censored* (time NaN, ``reached`` False, ``censored_at`` its last train_time).
- ``speedup``: per seed, t_baseline / t_sampler, summarised by the median, min and max over seeds;
  with a censored run the ratio is a bound (see ``speedup``).
- ``at_time`` / ``equal_time_table``: training loss and test error at equal train_time (the
  paper's table form), interpolated the same way.
- ``curves``: a metric against train_time, median and range over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .runs import RUN_COLUMNS, samplers_in_order


# ---------------------------------------------------------------- interpolation
def first_crossing(times: Sequence[float], values: Sequence[float], target: float) -> float:
    """The first time at which ``values`` reaches ``target`` or below, NaN if it never does.

    Linear interpolation between the last row above the target and the first row at or below it
    (a run that starts at or below the target reaches it at its first time).
    """
    t = np.asarray(times, dtype=float)
    v = np.asarray(values, dtype=float)
    below = np.flatnonzero(v <= target)  # NaN (a diverged run) compares False: never reached
    if len(below) == 0:
        return math.nan
    i = below[0]
    if i == 0:
        return float(t[0])
    t0, t1, v0, v1 = t[i - 1], t[i], v[i - 1], v[i]
    if not math.isfinite(v0):  # nothing to interpolate from: the row where it is reached
        return float(t1)
    return float(t0 + (v0 - target) / (v0 - v1) * (t1 - t0))


def value_at(times: Sequence[float], values: Sequence[float], at: float) -> float:
    """``values`` linearly interpolated at time ``at``; NaN outside [times[0], times[-1]]."""
    t = np.asarray(times, dtype=float)
    v = np.asarray(values, dtype=float)
    if len(t) == 0 or at < t[0] or at > t[-1]:
        return math.nan
    return float(np.interp(at, t, v))


def _by_run(runs: pd.DataFrame):
    keys = [c for c in RUN_COLUMNS if c in runs.columns]
    for _, rows in runs.groupby("run", sort=False):
        rows = rows.sort_values("train_time", kind="stable")
        yield {k: rows[k].iloc[0] for k in keys}, rows


# ---------------------------------------------------------------- time to loss
def time_to_loss(
    runs: pd.DataFrame, targets: float | Sequence[float], metric: str = "train_loss"
) -> pd.DataFrame:
    """One row per run and target: the train_time at which ``metric`` first reaches the target.

    Columns: the run's names, target, time (NaN when censored), reached, censored_at (the run's
    last train_time: a censored run needs more than that)."""
    targets = [targets] if np.isscalar(targets) else list(targets)
    out = []
    for names, rows in _by_run(runs):
        for target in targets:
            t = first_crossing(rows["train_time"], rows[metric], target)
            out.append(
                {
                    **names,
                    "target": float(target),
                    "time": t,
                    "reached": not math.isnan(t),
                    "censored_at": float(rows["train_time"].iloc[-1]),
                }
            )
    return pd.DataFrame(out)


def speedup(ttl: pd.DataFrame, baseline: str = "uniform") -> pd.DataFrame:
    """Per sampler and target: the time to target over seeds and the speedup over ``baseline``.

    Speedup of one seed = t_baseline / t_sampler (same seed and target). A censored time is
    replaced by its censoring time, which turns the ratio into a bound: an upper bound ("<") when
    only the sampler never reached the target, a lower bound (">") when only the baseline never
    did; seeds where neither did carry no information and are left out. Median, min and max are
    monotone, so their values inherit the bound; ``speedup_bound`` says which: "=" (all exact),
    "<", ">", or "?" (bounds both ways: not bounded).

    Columns: target, sampler, runs, reached, time_median/min/max (over the runs that reached the
    target), censored_at (the shortest run's last train_time), speedup_median/min/max,
    speedup_bound, pairs (the seeds compared), speedup_gmean and speedup_ci_low/high (the
    geometric mean of the per-seed ratios and its 95% interval, ``log_ratio_interval``).
    """
    out = []
    for target, at_target in ttl.groupby("target", sort=False):
        base = at_target[at_target["sampler"] == baseline].set_index("seed")
        for sampler in samplers_in_order(at_target["sampler"]):
            mine = at_target[at_target["sampler"] == sampler]
            pairs = mine.set_index("seed").join(base, how="inner", rsuffix="_base")
            pairs = pairs[pairs["reached"] | pairs["reached_base"]]
            t = pairs["time"].where(pairs["reached"], pairs["censored_at"])
            t_base = pairs["time_base"].where(pairs["reached_base"], pairs["censored_at_base"])
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = (t_base / t).to_numpy(dtype=float)
            kinds = {
                "<" if not r else ">" if not rb else "="
                for r, rb in zip(pairs["reached"], pairs["reached_base"], strict=True)
            } - {"="}
            reached = mine[mine["reached"]]["time"]
            gmean, low, high = log_ratio_interval(ratios)
            out.append(
                {
                    "target": target,
                    "sampler": sampler,
                    "runs": len(mine),
                    "reached": int(mine["reached"].sum()),
                    "time_median": reached.median() if len(reached) else math.nan,
                    "time_min": reached.min() if len(reached) else math.nan,
                    "time_max": reached.max() if len(reached) else math.nan,
                    "censored_at": mine["censored_at"].min(),
                    "speedup_median": float(np.median(ratios)) if len(ratios) else math.nan,
                    "speedup_min": float(ratios.min()) if len(ratios) else math.nan,
                    "speedup_max": float(ratios.max()) if len(ratios) else math.nan,
                    "speedup_bound": kinds.pop() if len(kinds) == 1 else "?" if kinds else "=",
                    "pairs": len(ratios),
                    "speedup_gmean": gmean,
                    "speedup_ci_low": low,
                    "speedup_ci_high": high,
                }
            )
    return pd.DataFrame(out)


def default_targets(
    runs: pd.DataFrame,
    baseline: str = "uniform",
    metric: str = "train_loss",
    factors: Sequence[float] = (2.0, 1.5, 1.0),
) -> list[float]:
    """Targets every ``baseline`` run reaches: its worst final ``metric`` (rounded up to two
    significant digits) times each factor. Falls back on all runs if there is no baseline."""
    base = runs[runs["sampler"] == baseline] if (runs["sampler"] == baseline).any() else runs
    final = base.sort_values("train_time").groupby("run")[metric].last().max()
    return [round_up(final * f) for f in factors]


def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (0.2312 -> 0.24)."""
    if not math.isfinite(x) or x <= 0:
        return x
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return round(math.ceil(round(x / scale, 9)) * scale, 12)


# ---------------------------------------------------------------- intervals over seeds
def log_ratio_interval(ratios: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, low, high) of per-seed ratios r_s: a Student-t interval on the mean of
    log r_s, exp(mean ± t_{n-1} sd / sqrt(n)), from the seeds' spread alone (no resampling: with
    3 seeds a bootstrap has 10 distinct resamples and understates the spread). Non-finite or
    non-positive ratios are left out; the interval is NaN with fewer than 2 ratios."""
    from scipy import stats

    logs = np.log(np.asarray([r for r in ratios if math.isfinite(r) and r > 0], dtype=float))
    if len(logs) == 0:
        return math.nan, math.nan, math.nan
    mean = float(logs.mean())
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def paired_ratios(
    values: pd.DataFrame, metric: str, baseline: str = "uniform", level: float = 0.95
) -> pd.DataFrame:
    """Per sampler: ``metric`` over the baseline's, seed by seed (``values``: one row per run with
    ``sampler``, ``seed`` and the metric, e.g. ``at_time`` output), as the geometric mean of the
    per-seed ratios and its interval (``log_ratio_interval``). Columns: sampler, pairs,
    ratio_gmean, ratio_ci_low, ratio_ci_high."""
    base = values[values["sampler"] == baseline].set_index("seed")[metric]
    out = []
    for sampler in samplers_in_order(values["sampler"]):
        mine = values[values["sampler"] == sampler].set_index("seed")[metric]
        pairs = pd.concat([mine, base], axis=1, join="inner", keys=["mine", "base"]).dropna()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = (pairs["mine"] / pairs["base"]).to_numpy(dtype=float)
        gmean, low, high = log_ratio_interval(ratios, level)
        out.append(
            {
                "sampler": sampler,
                "pairs": len(pairs),
                "ratio_gmean": gmean,
                "ratio_ci_low": low,
                "ratio_ci_high": high,
            }
        )
    return pd.DataFrame(out)


# ---------------------------------------------------------------- time to a test accuracy
def accuracy_to_error(accuracy: float) -> float:
    """1 - accuracy, rounded to 12 decimals so that an error of exactly 0.1 reaches a target
    accuracy of 0.9 (1 - 0.9 is 0.09999999999999998 in floating point)."""
    return round(1.0 - float(accuracy), 12)


def time_to_accuracy(
    runs: pd.DataFrame, accuracies: float | Sequence[float], metric: str = "test_error"
) -> pd.DataFrame:
    """``time_to_loss`` for target accuracies: the first train_time at which the error
    ``metric`` (test_error: the evaluation split's) falls to 1 - accuracy or below, with the same
    interpolation and censoring. ``target`` is the error; ``accuracy`` is added."""
    accuracies = [accuracies] if np.isscalar(accuracies) else list(accuracies)
    table = time_to_loss(runs, [accuracy_to_error(a) for a in accuracies], metric)
    table.insert(table.columns.get_loc("target"), "accuracy", 1.0 - table["target"])
    return table


def default_accuracy_targets(
    runs: pd.DataFrame, baseline: str = "uniform", factors: Sequence[float] = (1.2, 1.1, 1.0)
) -> list[float]:
    """Target accuracies every ``baseline`` run reaches: 1 - its worst final test error (rounded
    up to 3 significant digits) times each factor, e.g. a worst final error of 11.1% gives
    86.6%, 87.7% and 88.9%. Falls back on all runs if there is no baseline."""
    base = runs[runs["sampler"] == baseline] if (runs["sampler"] == baseline).any() else runs
    final = base.sort_values("train_time").groupby("run")["test_error"].last().max()
    return [round(1.0 - round_up(final * f, 3), 12) for f in factors]


# ---------------------------------------------------------------- equal train_time
def at_time(
    runs: pd.DataFrame, at: float, metrics: Sequence[str] = ("train_loss", "test_error")
) -> pd.DataFrame:
    """One row per run: each metric interpolated at train_time ``at`` (NaN if the run ended before)."""
    out = []
    for names, rows in _by_run(runs):
        out.append(
            {
                **names,
                "train_time": float(at),
                **{m: value_at(rows["train_time"], rows[m], at) for m in metrics},
            }
        )
    return pd.DataFrame(out)


def common_time(runs: pd.DataFrame) -> float:
    """The longest train_time every run reached (the end of the shortest run)."""
    return float(runs.groupby("run")["train_time"].max().min())


def equal_time_at(runs: pd.DataFrame, at: float | None) -> tuple[float, str | None]:
    """The train_time of the equal-time table and a warning when ``at`` does not fit the runs.

    ``at`` None: the end of the shortest run, no warning. ``at`` after the end of every run: a
    table of '–' would say nothing, so the end of the shortest run is used instead, with a
    warning. ``at`` after the end of some runs: kept, with a warning naming how many show '–'."""
    common = common_time(runs)
    if at is None:
        return common, None
    ends = runs.groupby("run")["train_time"].max()
    if at > ends.max():
        return common, (
            f"train_time {at:g} s is after the end of every run (the longest ends at "
            f"{ends.max():.1f} s): the equal-time table uses the end of the shortest run, "
            f"{common:.1f} s, instead"
        )
    short = int((ends < at).sum())
    if short:
        return float(at), (
            f"{short} of {len(ends)} runs end before train_time {at:g} s (the shortest at "
            f"{ends.min():.1f} s): their values show as '–' in the equal-time table"
        )
    return float(at), None


def equal_time_table(
    runs: pd.DataFrame,
    at: float | None = None,
    baseline: str = "uniform",
    metrics: Sequence[str] = ("train_loss", "test_error", "epoch"),
) -> pd.DataFrame:
    """Per sampler: the median, min and max over seeds of each metric at train_time ``at``
    (default: ``common_time``), and the median relative to the baseline's median (1 = equal).
    ``epoch`` (passes over the data so far) shows how much each sampler's steps cost."""
    at = common_time(runs) if at is None else at
    metrics = [m for m in metrics if m in runs.columns]
    values = at_time(runs, at, metrics)
    out = []
    base = values[values["sampler"] == baseline]
    for sampler in samplers_in_order(values["sampler"]):
        mine = values[values["sampler"] == sampler]
        row = {"sampler": sampler, "train_time": at, "runs": len(mine)}
        flags = runs[runs["sampler"] == sampler].drop_duplicates("run")
        row["starved"] = int(flags["starved"].astype(bool).sum()) if "starved" in flags else 0
        for m in metrics:
            row[f"{m}_median"] = mine[m].median()
            row[f"{m}_min"], row[f"{m}_max"] = mine[m].min(), mine[m].max()
            with np.errstate(divide="ignore", invalid="ignore"):
                row[f"{m}_vs_{baseline}"] = (
                    mine[m].median() / base[m].median() if len(base) else math.nan
                )
        out.append(row)
    return pd.DataFrame(out)


# ---------------------------------------------------------------- curves over seeds
def curves(runs: pd.DataFrame, metric: str, points: int | None = None) -> pd.DataFrame:
    """Per sampler, ``metric`` on a common train_time grid: median, min and max over its runs.

    The grid is the train_time of the metrics rows of the sampler's first run (``points``: an
    even grid of that many points instead), so a curve has a point where a row was measured and
    nowhere else: a line drawn through the points joins measurements, without interpolated
    points that a log axis would bend. Each run is interpolated on the grid up to its own last
    row (the rows of one cadence fall at nearly the same train_time in every run), and a
    sampler's curve stops at its shortest run's end: past it the median would be over fewer
    seeds than before (runs of one budget end a few milliseconds apart), and a curve that falls
    back on the last seed alone draws a jump that no run made."""
    even = np.linspace(0.0, runs["train_time"].max(), points) if points else None
    out = []
    for sampler in samplers_in_order(runs["sampler"]):
        mine = list(_by_run(runs[runs["sampler"] == sampler]))
        grid = even if even is not None else mine[0][1]["train_time"].to_numpy(dtype=float)
        per_run = np.array(
            [[value_at(rows["train_time"], rows[metric], t) for t in grid] for _, rows in mine]
        )
        keep = ~np.any(np.isnan(per_run), axis=0)  # where every run has data
        with np.errstate(all="ignore"):
            out.append(
                pd.DataFrame(
                    {
                        "sampler": sampler,
                        "train_time": grid[keep],
                        "median": np.nanmedian(per_run[:, keep], axis=0),
                        "min": np.nanmin(per_run[:, keep], axis=0),
                        "max": np.nanmax(per_run[:, keep], axis=0),
                        "runs": (~np.isnan(per_run[:, keep])).sum(axis=0),
                    }
                )
            )
    return pd.concat(out, ignore_index=True)
