"""Run directories (metrics.csv, summary.json, .hydra/) -> one tidy DataFrame, one row per run and
evaluation; which runs make one comparison (one experiment), and how to name it."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import yaml

from .styles import SAMPLER_ORDER

RUN_COLUMNS = (
    "run",
    "experiment",
    "dataset",
    "model",
    "sampler",
    "optimizer",
    "seed",
    "status",
    "run_machine_share",  # the share of the machine the whole run got (NaN: not measured)
    "starved",  # flagged by the run itself: its share was below the threshold (engine/machine.py)
    "run_reference_ms",  # the machine's speed over the run: ms of a reference step (reference.py)
    "run_steal",  # share of the CPUs' time the hypervisor took over the run (engine/machine.py)
)
RUNS_CSV = "runs.csv"


# ---------------------------------------------------------------- collecting runs
def find_runs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds a metrics.csv, sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("metrics.csv") if ".submitit" not in p.parts)


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_run(run_dir: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """One run's metrics.csv with the columns that name it (RUN_COLUMNS) in front
    (``run_table``); ``run`` is the directory relative to ``root``."""
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    choices = _read_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra", {}).get("runtime", {})
    choices = choices.get("choices", {}) or {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    name = str(run_dir.relative_to(root)) if root is not None else str(run_dir)
    return run_table(name, pd.read_csv(run_dir / "metrics.csv"), config, choices, summary)


def run_table(
    run: str, metrics: pd.DataFrame, config: dict, choices: dict, summary: dict
) -> pd.DataFrame:
    """The one conversion of a run, however it was read (its directory, an offline W&B run,
    W&B's API: wandb_runs.py): its metrics rows with the columns that name it (RUN_COLUMNS) in
    front. Names come from the Hydra group choices (e.g. sampler=upper_bound) and fall back on
    the summary, except ``dataset``: the summary's name of the data actually used
    (``pixel_fashion_mnist`` for dataset=pixel_mnist dataset.images=fashion_mnist) comes first.
    """
    metrics = metrics.copy()
    names = {
        "run": run,
        "experiment": choices.get("experiment"),
        "dataset": summary.get("dataset") or choices.get("dataset"),
        "model": choices.get("model"),
        "sampler": choices.get("sampler") or summary.get("sampler"),
        "optimizer": choices.get("optimizer"),
        "seed": config.get("seed"),
        # no summary.json: the run is still going or was killed
        "status": summary.get("status", "running"),
        "run_machine_share": summary.get("machine_share", math.nan),
        "starved": bool(summary.get("starved", False)),
        "run_reference_ms": summary.get("reference_ms", math.nan),
        "run_steal": summary.get("steal", math.nan),
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
        return with_run_columns(pd.read_csv(path))
    if find_runs(path):
        return collect_runs(path)
    if (path / RUNS_CSV).is_file():
        return with_run_columns(pd.read_csv(path / RUNS_CSV))
    raise FileNotFoundError(f"no run (a directory with metrics.csv) and no {RUNS_CSV} under {path}")


def with_run_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """A runs.csv written before a run column existed, with that column (machine share,
    reference speed, steal: not measured; never starved) in its place."""
    defaults = {
        "run_machine_share": math.nan,
        "starved": False,
        "run_reference_ms": math.nan,
        "run_steal": math.nan,
    }
    for i, column in enumerate(RUN_COLUMNS):
        if column not in runs.columns:
            runs.insert(i, column, defaults.get(column))
    return runs


def starved_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run that flagged itself starved (another process took its CPUs): run,
    sampler, seed, its machine share."""
    columns = ["run", "sampler", "seed", "run_machine_share"]
    if "starved" not in runs:
        return pd.DataFrame(columns=columns)
    flagged = with_run_columns(runs[runs["starved"].astype(bool)].copy())
    return flagged[columns].drop_duplicates("run").reset_index(drop=True)


def starved_note(runs: pd.DataFrame) -> str:
    """A line for a report that names the starved runs ('' when there are none)."""
    flagged = starved_runs(runs)
    if flagged.empty:
        return ""
    names = ", ".join(
        f"{r.run} ({r.run_machine_share:.2f})" for r in flagged.itertuples(index=False)
    )
    return (
        f"STARVED: {plural(len(flagged), 'run')} got less than the whole machine (machine share "
        f"in brackets; other processes took the CPUs), so their timings do not compare: "
        f"{names}. Rerun them one at a time on an otherwise idle machine."
    )


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


# what may differ between the runs of one comparison: the sampler and the seed, and what does not
# change what is measured (where results are logged, checkpoints, the progress bar)
FREE_KEYS = ("seed", "sampler", "logger", "data_dir", "trainer.progress", "trainer.resume")
FREE_KEYS += ("trainer.checkpoint_every", "trainer.checkpoint_unit")


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if any(name == k or name.startswith(k + ".") for k in FREE_KEYS):
            continue
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = repr(value)
    return out


def config_differences(runs: pd.DataFrame, root: str | Path) -> dict[str, dict[str, int]]:
    """The config keys (other than FREE_KEYS) whose values differ between the runs under
    ``root`` (from each run's .hydra/config.yaml): {key: {value: runs}}. Runs without a
    config (a runs.csv) are not compared."""
    values: dict[str, dict[str, int]] = {}
    configs = []
    for run in runs["run"].unique():
        path = Path(root) / str(run) / ".hydra" / "config.yaml"
        if path.is_file():
            configs.append(_flat(_read_yaml(path)))
    for key in sorted({k for c in configs for k in c}):
        counts: dict[str, int] = {}
        for config in configs:
            value = config.get(key, "(unset)")
            counts[value] = counts.get(value, 0) + 1
        if len(counts) > 1:
            values[key] = counts
    return values


def check_one_experiment(runs: pd.DataFrame, root: str | Path | None = None) -> None:
    """Raise MixedRunsError naming every experiment when the runs come from more than one,
    and, given the ``root`` they were read from, naming the settings they differ in when they
    differ in anything but sampler and seed (a budget, a learning rate, the threads): such runs
    are not one comparison."""
    found = setups(runs)
    if len(found) > 1:
        listed = "; ".join(
            f"{r.name}: {r.runs} run{'s' if r.runs != 1 else ''}, e.g. {r.example}"
            for r in found.itertuples()
        )
        raise MixedRunsError(f"the runs come from {len(found)} experiments: {listed}")
    if root is None or not (differences := config_differences(runs, root)):
        return

    def counted(counts: dict[str, int]) -> str:
        return ", ".join(f"{value}: {plural(n, 'run')}" for value, n in counts.items())

    listed = "; ".join(f"{k} ({counted(c)})" for k, c in list(differences.items())[:3])
    more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
    raise MixedRunsError(f"the runs differ in more than sampler and seed: {listed}{more}")


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
