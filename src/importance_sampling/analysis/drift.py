"""Did the machine keep its speed? Runs compared at equal wall-clock time, seed by seed.

Every run times a fixed reference workload at each metrics row (engine/reference.py) and
records the median, ``run_reference_ms``, with the CPU time the hypervisor stole
(``run_steal``). The runs of one seed form a *pair* (the baseline and each other sampler, run
back to back): if their reference times differ by more than ``TOLERANCE`` the machine changed
speed between them, and their wall-clock comparison says as much about the machine as about the
samplers. Two views take that out:

- ``pair_speeds``: the reference time of each run beside its pair's baseline, flagged beyond
  ``TOLERANCE``;
- ``in_reference_units``: train_time divided by the run's reference time (then multiplied by the
  median reference time of all runs, so that the unit still reads as seconds): the time a run
  took in steps of the reference workload. A conclusion that holds in seconds and in these
  units does not depend on drift.
"""

from __future__ import annotations

import math

import pandas as pd

from .compare import at_time, paired_ratios, speedup, time_to_accuracy, time_to_loss
from .runs import samplers_in_order
from .tables import markdown_table, ratio_cell

TOLERANCE = 0.03  # reference times of one pair further apart than this: flagged


def run_speeds(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: sampler, seed, run_reference_ms, run_steal (NaN: not measured)."""
    columns = ["run", "sampler", "seed", "run_reference_ms", "run_steal"]
    frame = runs.copy()
    for column in ("run_reference_ms", "run_steal"):
        if column not in frame:
            frame[column] = math.nan
    return frame[columns].drop_duplicates("run").reset_index(drop=True)


def measured(runs: pd.DataFrame) -> bool:
    """Whether every run recorded its reference time."""
    speeds = run_speeds(runs)["run_reference_ms"]
    return len(speeds) > 0 and bool(speeds.notna().all())


def pair_speeds(
    runs: pd.DataFrame, baseline: str = "uniform", tolerance: float = TOLERANCE
) -> pd.DataFrame:
    """Per seed and sampler other than ``baseline``: both runs' reference times, their ratio
    (sampler / baseline: > 1, the sampler's machine was slower) and ``flagged`` where it is
    further than ``tolerance`` from 1."""
    speeds = run_speeds(runs)
    base = speeds[speeds["sampler"] == baseline].set_index("seed")
    out = []
    for sampler in samplers_in_order(speeds["sampler"]):
        if sampler == baseline:
            continue
        for r in speeds[speeds["sampler"] == sampler].sort_values("seed").itertuples():
            if r.seed not in base.index:
                continue
            b = base.loc[r.seed]
            ratio = r.run_reference_ms / b["run_reference_ms"]
            out.append(
                {
                    "seed": r.seed,
                    "sampler": sampler,
                    "baseline_ms": b["run_reference_ms"],
                    "sampler_ms": r.run_reference_ms,
                    "ratio": ratio,
                    "baseline_steal": b["run_steal"],
                    "sampler_steal": r.run_steal,
                    "flagged": bool(abs(ratio - 1) > tolerance),
                }
            )
    columns = ["seed", "sampler", "baseline_ms", "sampler_ms", "ratio"]
    return pd.DataFrame(out, columns=[*columns, "baseline_steal", "sampler_steal", "flagged"])


def in_reference_units(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with train_time in steps of the reference workload, scaled by the median
    reference time of all runs (seconds at the median machine speed)."""
    speeds = run_speeds(runs).set_index("run")["run_reference_ms"]
    scale = speeds.median() / runs["run"].map(speeds)
    return runs.assign(train_time=runs["train_time"] * scale)


def drift_markdown(
    runs: pd.DataFrame,
    at: float,
    baseline: str = "uniform",
    accuracies: list[float] | None = None,
    loss_targets: list[float] | None = None,
    tolerance: float = TOLERANCE,
) -> str:
    """The report's section: every pair's reference times, flagged beyond ``tolerance``; the
    speedups to each test accuracy (or, without ``accuracies``, each training loss of
    ``loss_targets``) in seconds and in reference units; and, where pairs are flagged, the
    equal-time ratios without them. '' when the runs did not measure their speed."""
    if not measured(runs):
        return ""
    pairs = pair_speeds(runs, baseline, tolerance)
    rows = [
        [
            str(r.seed),
            r.sampler,
            f"{r.baseline_ms:.2f}",
            f"{r.sampler_ms:.2f}",
            f"{r.ratio:.3f}" + (" ⚠" if r.flagged else ""),
            f"{100 * r.baseline_steal:.1f} / {100 * r.sampler_steal:.1f}",
        ]
        for r in pairs.itertuples()
    ]
    lines = [
        "## Machine speed in each pair\n",
        "Milliseconds of one step of the fixed reference workload (the run's model before "
        "training, one fixed batch, timed at every metrics row outside train_time; the run's "
        "median), and the CPU time stolen by the hypervisor (%). A ratio further than "
        f"{tolerance:.0%} from 1 (⚠) means the machine changed speed between the two runs "
        "of the pair.\n",
        markdown_table(
            ["seed", "sampler", f"{baseline} (ms)", "sampler (ms)", "ratio", "steal (%)"], rows
        ),
        "",
    ]
    if accuracies is not None:
        level, what = "test accuracy (%)", "each test accuracy"

        def times(frame):
            return speedup(time_to_accuracy(frame, accuracies), baseline)

        def name(target):
            return f"{100 * (1 - target):.2f}"
    else:
        level, what = "training loss", "each training loss"

        def times(frame):
            return speedup(time_to_loss(frame, loss_targets or []), baseline)

        def name(target):
            return f"{target:.3g}"

    wall, ref = times(runs), times(in_reference_units(runs))
    cells = []
    for w, r in zip(wall.itertuples(), ref.itertuples(), strict=True):
        if w.sampler == baseline or not w.pairs:
            continue
        cells.append(
            [
                name(w.target),
                w.sampler,
                ratio_cell(w.speedup_gmean, w.speedup_ci_low, w.speedup_ci_high, w.speedup_bound),
                ratio_cell(r.speedup_gmean, r.speedup_ci_low, r.speedup_ci_high, r.speedup_bound),
            ]
        )
    if cells:
        lines += [
            f"Speedup over {baseline} to {what}, in seconds of train_time and in steps of the "
            "reference workload (geometric mean over seeds [95% interval]):\n",
            markdown_table([level, "sampler", "in seconds", "in reference steps"], cells),
            "",
        ]
    flagged = pairs[pairs["flagged"]]
    if len(flagged):
        bad = set(zip(flagged["sampler"], flagged["seed"], strict=True))
        kept = runs[
            [
                (sa, se) not in bad and not (sa == baseline and se in set(flagged["seed"]))
                for sa, se in zip(runs["sampler"], runs["seed"], strict=True)
            ]
        ]
        values = at_time(kept, at, ("train_loss", "test_error")) if len(kept) else None
        without = []
        for metric in ("train_loss", "test_error"):
            if values is None:
                without = ["no pair is left"]
                break
            for r in paired_ratios(values, metric, baseline).itertuples():
                if r.sampler != baseline:
                    without.append(
                        f"{metric} × {baseline} of {r.sampler} "
                        f"{ratio_cell(r.ratio_gmean, r.ratio_ci_low, r.ratio_ci_high)} "
                        f"over {r.pairs} pairs"
                    )
        lines += [
            f"{len(flagged)} pair(s) flagged (seeds "
            f"{', '.join(str(s) for s in sorted(set(flagged['seed'])))}). Without them, at "
            f"{at:.0f} s: " + "; ".join(without) + " (95% intervals).",
            "",
        ]
    else:
        lines += [f"No pair's reference times differ by more than {tolerance:.0%}.", ""]
    return "\n".join(lines)
