"""From run directories to the paper's comparisons: which sampler reaches which loss first.

Data flows one way: run directories (metrics.csv, summary.json, .hydra/) -> ``collect_runs`` ->
one tidy DataFrame, one row per run and evaluation -> time-to-loss, equal-time tables, figures.

- ``time_to_loss``: for a target training loss, the train_time at which each run first reaches it,
  linearly interpolated between the two metrics rows around the crossing; a run that never
  reaches it is *censored* (time NaN, ``reached`` False, ``censored_at`` its last train_time).
- ``speedup``: per seed, t_baseline / t_sampler, summarised by the median, min and max over seeds;
  with a censored run the ratio is a bound (see ``speedup``).
- ``at_time`` / ``equal_time_table``: training loss and test error at equal train_time (the
  paper's table form), interpolated the same way.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .styles import SAMPLER_ORDER, plain_log_ticks, sampler_style

# columns that name a run; every other column of the tidy frame is a metric of METRICS_COLUMNS
RUN_COLUMNS = ("run", "experiment", "dataset", "model", "sampler", "optimizer", "seed", "status")
RUNS_CSV = "runs.csv"


# ---------------------------------------------------------------- collecting runs
def find_runs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds a metrics.csv, sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("metrics.csv") if ".submitit" not in p.parts)


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_run(run_dir: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """One run's metrics.csv with the columns that name it (RUN_COLUMNS) in front.

    Names come from the run's Hydra files (the group choices, e.g. sampler=upper_bound) and fall
    back on summary.json, except ``dataset``: summary.json's name of the data actually used
    (``pixel_fashion_mnist`` for dataset=pixel_mnist dataset.images=fashion_mnist) comes first.
    ``run`` is the directory relative to ``root``.
    """
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    choices = _read_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra", {}).get("runtime", {})
    choices = choices.get("choices", {}) or {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    metrics = pd.read_csv(run_dir / "metrics.csv")
    names = {
        "run": str(run_dir.relative_to(root)) if root is not None else str(run_dir),
        "experiment": choices.get("experiment"),
        "dataset": summary.get("dataset") or choices.get("dataset"),
        "model": choices.get("model"),
        "sampler": choices.get("sampler") or summary.get("sampler"),
        "optimizer": choices.get("optimizer"),
        "seed": config.get("seed"),
        # no summary.json: the run is still going or was killed
        "status": summary.get("status", "running"),
    }
    for i, (key, value) in enumerate(names.items()):
        metrics.insert(i, key, value)
    return metrics


def collect_runs(root: str | Path) -> pd.DataFrame:
    """Every run under ``root`` in one tidy frame: one row per run and evaluation.

    Columns: RUN_COLUMNS, then the metrics (trainer.METRICS_COLUMNS)."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run (a directory with metrics.csv) under {root}")
    frame = pd.concat([read_run(r, root) for r in runs], ignore_index=True)
    return frame.sort_values(["sampler", "seed", "run", "step"], kind="stable", ignore_index=True)


def load(path: str | Path) -> pd.DataFrame:
    """The tidy frame of a sweep directory (its runs), or of a runs.csv written by ``save``.

    A directory without run directories but with a runs.csv (e.g. results/<name>/) is read from it.
    """
    path = Path(path)
    if path.is_file():
        return pd.read_csv(path)
    if find_runs(path):
        return collect_runs(path)
    if (path / RUNS_CSV).is_file():
        return pd.read_csv(path / RUNS_CSV)
    raise FileNotFoundError(f"no run (a directory with metrics.csv) and no {RUNS_CSV} under {path}")


def sweep_start(sweep_dir: str | Path) -> float:
    """When a sweep started, in seconds since the epoch: the date and time its directory is named
    after (``<date>_<time>`` as train.py and time_to_loss.py name them, or Hydra's
    ``<date>/<time>``), else the earliest file written at its launch (multirun.yaml, the runs'
    .hydra/config.yaml). Never the last modification, which aggregating an old sweep updates."""
    sweep_dir = Path(sweep_dir)
    for name, fmt in (
        (sweep_dir.name, "%Y-%m-%d_%H-%M-%S"),
        (f"{sweep_dir.parent.name}/{sweep_dir.name}", "%Y-%m-%d/%H-%M-%S"),
    ):
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}[_/]\d{2}-\d{2}-\d{2}", name):
            return time.mktime(time.strptime(name, fmt))
    launched = [sweep_dir / "multirun.yaml", *sweep_dir.glob("*/.hydra/config.yaml")]
    times = [p.stat().st_mtime for p in launched if p.is_file()]
    return min(times) if times else math.nan


def newest_sweep(root: str | Path) -> Path | None:
    """The sweep under ``root`` (a directory with a multirun.yaml) that started last, or None."""
    sweeps = [p.parent for p in Path(root).rglob("multirun.yaml")]
    started = [(sweep_start(s), s) for s in sweeps]
    started = [(t, s) for t, s in started if not math.isnan(t)]
    return max(started)[1] if started else None


def samplers_in_order(names: Iterable[str]) -> list[str]:
    """The paper's order (uniform first), then the samplers beyond the paper (styles.py's order),
    then any other sampler alphabetically."""
    names = set(names)
    return [s for s in SAMPLER_ORDER if s in names] + sorted(names - set(SAMPLER_ORDER))


# ---------------------------------------------------------------- one experiment per comparison
class MixedRunsError(ValueError):
    """The runs come from more than one experiment (preset, dataset or model): comparing their
    samplers in one table would mix unrelated numbers."""


def setups(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct (experiment, dataset, model) among the runs: ``name``, ``runs`` (how
    many) and ``example`` (one of its runs)."""
    keys = [k for k in ("experiment", "dataset", "model") if k in runs.columns]
    per_run = runs.groupby("run", sort=False)[keys].first()
    rows = []
    for values, group in per_run.groupby(keys, dropna=False, sort=True):
        named = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        rows.append({**named, "name": setup_name(**named), "runs": len(group)})
        rows[-1]["example"] = group.index[0]
    return pd.DataFrame(rows)


def setup_name(experiment=None, dataset=None, model=None) -> str:
    """``experiment (dataset, model)``, e.g. ``fashion_mnist_mlp (fashion_mnist, mlp)``."""
    inner = ", ".join(str(v) for v in (dataset, model) if isinstance(v, str))
    if isinstance(experiment, str):
        return f"{experiment} ({inner})" if inner else experiment
    return inner or "unnamed"


def check_one_experiment(runs: pd.DataFrame) -> None:
    """Raise MixedRunsError naming every experiment when the runs come from more than one."""
    found = setups(runs)
    if len(found) > 1:
        listed = "; ".join(
            f"{r.name}: {r.runs} run{'s' if r.runs != 1 else ''}, e.g. {r.example}"
            for r in found.itertuples()
        )
        raise MixedRunsError(f"the runs come from {len(found)} experiments: {listed}")


def select_experiment(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    """The runs whose experiment preset or dataset is ``name``."""
    keep = pd.Series(False, index=runs.index)
    for column in ("experiment", "dataset"):
        if column in runs.columns:
            keep |= runs[column] == name
    if not keep.any():
        names = ", ".join(setups(runs)["name"])
        raise MixedRunsError(f"no run of experiment or dataset {name!r} (found: {names})")
    return runs[keep].reset_index(drop=True)


DATASET_NAMES = {
    "digits": "digits",
    "fashion_mnist": "Fashion-MNIST",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "svhn": "SVHN",
    "pixel_mnist": "pixel-by-pixel MNIST",
    "pixel_fashion_mnist": "pixel-by-pixel Fashion-MNIST",
    "permuted_pixel_mnist": "permuted pixel-by-pixel MNIST",
    "permuted_pixel_fashion_mnist": "permuted pixel-by-pixel Fashion-MNIST",
}
MODEL_NAMES = {"mlp": "MLP", "cnn": "CNN", "lstm": "LSTM", "wrn": "WRN", "resnet": "ResNet"}


def title(runs: pd.DataFrame) -> str:
    """A figure title from the runs themselves, e.g. ``LSTM on pixel-by-pixel Fashion-MNIST
    (preset pixel_mnist_lstm)``: the data actually used, not the preset's name alone."""
    parts = []
    for r in setups(runs).to_dict("records"):
        dataset, model, experiment = r.get("dataset"), r.get("model"), r.get("experiment")
        what = " on ".join(
            n
            for n in (
                MODEL_NAMES.get(model, model) if isinstance(model, str) else None,
                DATASET_NAMES.get(dataset, dataset) if isinstance(dataset, str) else None,
            )
            if n
        )
        preset = f"preset {experiment}" if isinstance(experiment, str) else ""
        parts.append(f"{what} ({preset})" if what and preset else what or preset or "runs")
    return " + ".join(parts)


def plural(n: int, word: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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
def curves(runs: pd.DataFrame, metric: str, points: int = 200) -> pd.DataFrame:
    """Per sampler, ``metric`` on a common train_time grid: median, min and max over its runs.

    Each run is interpolated on the grid up to its own last row (NaN after)."""
    grid = np.linspace(0.0, runs["train_time"].max(), points)
    out = []
    for sampler in samplers_in_order(runs["sampler"]):
        per_run = np.array(
            [
                [value_at(rows["train_time"], rows[metric], t) for t in grid]
                for _, rows in _by_run(runs[runs["sampler"] == sampler])
            ]
        )
        keep = ~np.all(np.isnan(per_run), axis=0)
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


# ---------------------------------------------------------------- figures
# Every sampler keeps one colour, line style and marker in every figure (styles.py).
CENSORED_HATCH = "////"


def _seeds_label(runs: pd.DataFrame, sampler: str) -> str:
    return f"{sampler} ({plural(runs.loc[runs['sampler'] == sampler, 'run'].nunique(), 'seed')})"


def focus_range(table: pd.DataFrame, skip: float = 0.1) -> tuple[float, float]:
    """A y-range for a ``curves`` table that leaves out the first ``skip`` of the time axis (the
    first seconds, where every run starts from chance and would squash the rest), padded by 8%."""
    late = table[table["train_time"] >= skip * table["train_time"].max()]
    low, high = float(late["min"].min()), float(late["max"].max())
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 1.0
    return low - pad, high + pad


def plot_curves(
    runs: pd.DataFrame,
    metric: str,
    ax=None,
    log: bool = False,
    ylabel: str | None = None,
    scale: float = 1.0,
    focus: bool = False,
    legend: bool = True,
):
    """``metric`` against train_time: the median over seeds per sampler and a min-max band.

    ``scale`` multiplies the values (100: a rate in %); ``focus`` zooms the y-axis past the first
    10% of train_time (see ``focus_range``) and says so in the panel's title."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    table = curves(runs, metric)
    table[["median", "min", "max"]] *= scale
    for sampler in samplers_in_order(table["sampler"]):
        c = table[table["sampler"] == sampler]
        style = sampler_style(sampler)
        ax.plot(
            c["train_time"],
            c["median"],
            lw=1.8,
            ms=4,
            markevery=0.1,
            label=_seeds_label(runs, sampler),
            **style,
        )
        ax.fill_between(c["train_time"], c["min"], c["max"], color=style["color"], alpha=0.15, lw=0)
    if log:
        ax.set_yscale("log")
        plain_log_ticks(ax)
    if focus:
        ax.set_ylim(*focus_range(table))
        start = 0.1 * table["train_time"].max()
        ax.set_title(f"y-axis zoomed on train_time ≥ {start:.0f} s", fontsize=9, loc="right")
    ax.set_xlabel("train_time (s)")
    ax.set_ylabel(ylabel or metric)
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=8)
    return ax


def censored_patch():
    """Legend entry that explains a censored (hatched) time-to-loss bar."""
    from matplotlib.patches import Patch

    return Patch(
        facecolor="white",
        edgecolor="0.3",
        hatch=CENSORED_HATCH,
        label="hatched: no run reached the target,\nbar = its budget (k/n: runs that did)",
    )


def plot_time_to_loss(
    table: pd.DataFrame,
    ax=None,
    legend: bool = True,
    xlabel: str = "target training loss",
    labels: Sequence[str] | None = None,
):
    """Bars of the median time to each target per sampler (``speedup`` output), with min-max
    whiskers over the runs that reached it. A sampler none of whose runs reached a target gets a
    hatched bar in its colour up to its budget (censored); ``k/n`` over a bar says that only k of
    its n runs reached the target. ``labels``: the targets' tick labels (default: their values),
    e.g. accuracies in % for ``time_to_accuracy`` targets, with ``xlabel`` to match."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    ax = ax or plt.gca()
    targets = list(dict.fromkeys(table["target"]))
    samplers = samplers_in_order(table["sampler"])
    width = 0.8 / len(samplers)
    handles = []
    for j, sampler in enumerate(samplers):
        rows = table[table["sampler"] == sampler].set_index("target").reindex(targets)
        x = np.arange(len(targets)) + (j - (len(samplers) - 1) / 2) * width
        color = sampler_style(sampler)["color"]
        reached = rows["reached"].to_numpy() > 0
        med = rows["time_median"].to_numpy()
        err = np.array([med - rows["time_min"].to_numpy(), rows["time_max"].to_numpy() - med])
        ax.bar(x[reached], med[reached], width, color=color, yerr=err[:, reached], capsize=2)
        censored_at = rows["censored_at"].to_numpy()
        ax.bar(
            x[~reached],
            censored_at[~reached],
            width,
            facecolor=to_rgba(color, 0.12),
            edgecolor=color,
            hatch=CENSORED_HATCH,
            lw=1,
        )
        handles.append(Patch(color=color, label=sampler))
        tops = np.where(reached, rows["time_max"].to_numpy(), censored_at)
        for xi, top, r, n in zip(x, tops, rows["reached"], rows["runs"], strict=True):
            if r < n:  # some runs never reached the target: say how many did
                ax.annotate(
                    f"{r}/{n}",
                    (xi, top),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                )
    ax.set_xticks(np.arange(len(targets)), labels or [f"{t:g}" for t in targets])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("train_time to reach it (s), median over seeds")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the k/n labels
    ax.grid(alpha=0.3, axis="y")
    if legend:  # beside the axes: the bars fill the panel up to the longest budget
        ax.legend(
            handles=[*handles, censored_patch()],
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
        )
    return ax


def figure(runs: pd.DataFrame, table: pd.DataFrame, title: str | None = None):
    """The three panels: training loss (log), test error (%, zoomed past the first seconds), time
    to loss; one legend for the three, under them."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4), layout="constrained")
    plot_curves(runs, "train_loss", axes[0], log=True, ylabel="training loss", legend=False)
    plot_curves(
        runs,
        "test_error",
        axes[1],
        ylabel="test error (%)",
        scale=100,
        focus=True,
        legend=False,
    )
    plot_time_to_loss(table, axes[2], legend=False)
    handles = [
        Line2D([], [], lw=2, ms=5, label=_seeds_label(runs, s), **sampler_style(s))
        for s in samplers_in_order(runs["sampler"])
    ]
    return legend_below(fig, handles, ncols=5, title=title)


def legend_below(fig, handles: list, ncols: int, title: str | None = None):
    """One legend for all of a figure's panels, under them (the censored-bar entry last), and
    the figure's title."""
    handles = [*handles, censored_patch()]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), ncols),
        fontsize=9,
        handlelength=3.5,
        frameon=False,
    )
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- tables
def _fmt(x: float, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "∞"
    return format(x, spec)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def time_to_loss_markdown(table: pd.DataFrame, baseline: str = "uniform") -> str:
    """``speedup`` output as a markdown table: median [min, max] over seeds."""
    rows = []
    for r in table.itertuples():
        if r.reached:
            time = f"{_fmt(r.time_median, '.1f')} [{_fmt(r.time_min, '.1f')}, {_fmt(r.time_max, '.1f')}]"
        else:
            time = f"> {_fmt(r.censored_at, '.1f')}"
        bound = (
            ""
            if r.speedup_bound == "="
            else "~ "
            if r.speedup_bound == "?"
            else f"{r.speedup_bound} "
        )
        speed = (
            f"{bound}{_fmt(r.speedup_median, '.2f')}× [{_fmt(r.speedup_min, '.2f')}, "
            f"{_fmt(r.speedup_max, '.2f')}]"
            if r.pairs
            else "–"
        )
        rows.append([f"{r.target:g}", r.sampler, f"{r.reached}/{r.runs}", time, speed])
    return markdown_table(
        ["target loss", "sampler", "reached", "train_time (s)", f"speedup over {baseline}"], rows
    )


def equal_time_markdown(table: pd.DataFrame, baseline: str = "uniform") -> str:
    """``equal_time_table`` output as a markdown table: median [min, max] over seeds."""
    rows = []
    for r in table.to_dict("records"):
        rows.append(
            [
                r["sampler"],
                str(r["runs"]),
                f"{_fmt(r['train_loss_median'], '.4f')} [{_fmt(r['train_loss_min'], '.4f')}, "
                f"{_fmt(r['train_loss_max'], '.4f')}]",
                _fmt(r[f"train_loss_vs_{baseline}"], ".2f"),
                f"{_fmt(100 * r['test_error_median'], '.2f')} [{_fmt(100 * r['test_error_min'], '.2f')}, "
                f"{_fmt(100 * r['test_error_max'], '.2f')}]",
                _fmt(r[f"test_error_vs_{baseline}"], ".2f"),
                _fmt(r.get("epoch_median", math.nan), ".2f"),
            ]
        )
    return markdown_table(
        [
            "sampler",
            "seeds",
            "training loss",
            f"vs {baseline}",
            "test error (%)",
            f"vs {baseline}",
            "epochs",
        ],
        rows,
    )


def report(
    runs: pd.DataFrame,
    targets: Sequence[float] | None = None,
    at: float | None = None,
    baseline: str = "uniform",
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(speedup table, equal-time table, markdown of both) with the defaults above."""
    targets = default_targets(runs, baseline) if targets is None else list(targets)
    table = speedup(time_to_loss(runs, targets), baseline)
    at, warning = equal_time_at(runs, at)
    equal = equal_time_table(runs, at, baseline)
    seeds = int(runs.groupby("sampler")["run"].nunique().max())
    text = (
        f"Time to reach a training loss (train_time, median [min, max] over "
        f"{plural(seeds, 'seed')}; "
        f"'> t': no run reached it within t s; speedup = t_{baseline} / t_sampler per seed, "
        f"'<' / '>': a bound, as some runs never reached the target):\n\n"
        f"{time_to_loss_markdown(table, baseline)}\n\n"
        f"At equal train_time = {equal['train_time'].iloc[0]:.1f} s (median [min, max] over seeds; "
        f"'vs {baseline}' = ratio of medians):\n\n"
        f"{equal_time_markdown(equal, baseline)}\n"
    )
    if warning:
        text += f"\nWarning: {warning}.\n"
    return table, equal, text


def save(
    runs: pd.DataFrame,
    out_dir: str | Path,
    targets: Sequence[float] | None = None,
    at: float | None = None,
    baseline: str = "uniform",
    title: str | None = None,
) -> dict:
    """Write runs.csv, time_to_loss.csv, equal_time.csv, table.md and figure.png to ``out_dir``."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, equal, text = report(runs, targets, at, baseline)
    paths = {
        "runs": out / RUNS_CSV,
        "time_to_loss": out / "time_to_loss.csv",
        "equal_time": out / "equal_time.csv",
        "table": out / "table.md",
        "figure": out / "figure.png",
    }
    runs.to_csv(paths["runs"], index=False)
    table.to_csv(paths["time_to_loss"], index=False)
    equal.to_csv(paths["equal_time"], index=False)
    paths["table"].write_text((f"# {title}\n\n" if title else "") + text)
    fig = figure(runs, table, title)
    fig.savefig(paths["figure"], dpi=110)
    plt.close(fig)
    return paths
