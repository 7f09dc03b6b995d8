"""The tau switch over training, against what an importance step costs: does tau stay above the
cost of the steps it switches on?

From the metrics rows of a comparison (the tidy frame of runs.py):
- ``step_costs``: per run, the median train_time of a step over the intervals between rows
  whose steps were all uniform (``is_fraction`` 0) and all importance steps (1);
- ``cost_ratio``: per importance sampler, its importance step over the uniform sampler's
  uniform step (median over seeds): the cost that importance sampling has to repay;
- ``plot_switch``: tau (median over seeds) and the share of importance steps against
  train_time, beside the fixed threshold (B + 3b)/3b, the measured cost ratio and, for
  ``tau_threshold=auto``, the threshold it measured during the run.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .compare import curves
from .runs import samplers_in_order
from .styles import sampler_style


def step_costs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: run, sampler, seed, uniform_ms and importance_ms (median ms a step over
    the row intervals of only that kind of step; NaN where there is none)."""
    out = []
    for run, rows in runs.groupby("run", sort=False):
        rows = rows.sort_values("step")
        steps, seconds = rows["step"].diff(), rows["train_time"].diff()
        per_step = 1000 * seconds / steps
        kinds = {}
        for name, share in (("uniform_ms", 0.0), ("importance_ms", 1.0)):
            mask = (steps > 0) & (rows["is_fraction"] == share)
            kinds[name] = float(per_step[mask].median()) if mask.any() else math.nan
        first = rows.iloc[0]
        out.append({"run": run, "sampler": first["sampler"], "seed": first["seed"], **kinds})
    return pd.DataFrame(out)


def cost_ratio(runs: pd.DataFrame, baseline: str = "uniform") -> pd.DataFrame:
    """Per importance sampler: its importance step (ms, median over seeds), the baseline's
    uniform step (ms) and their ratio, the cost an importance step has to repay."""
    costs = step_costs(runs)
    uniform = costs.loc[costs["sampler"] == baseline, "uniform_ms"].median()
    out = []
    for sampler in samplers_in_order(costs["sampler"]):
        if sampler == baseline:
            continue
        importance = costs.loc[costs["sampler"] == sampler, "importance_ms"].median()
        out.append(
            {
                "sampler": sampler,
                "importance_step_ms": importance,
                "uniform_step_ms": uniform,
                "cost_ratio": importance / uniform if uniform > 0 else math.nan,
            }
        )
    return pd.DataFrame(out)


def cost_markdown(runs: pd.DataFrame, baseline: str = "uniform") -> str:
    table = cost_ratio(runs, baseline)
    if table.empty or table["cost_ratio"].isna().all():
        return ""
    lines = [
        f"| sampler | importance step (ms) | {baseline} step (ms) | cost ratio |",
        "|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.sampler} | {r.importance_step_ms:.1f} | {r.uniform_step_ms:.1f} | "
            f"{r.cost_ratio:.2f} |"
        )
    return "\n".join(lines)


def plot_switch(runs: pd.DataFrame, baseline: str = "uniform", title: str | None = None):
    """Two panels against train_time: tau of each importance sampler (median over seeds, band
    min-max), with the thresholds and the measured cost ratio; the share of importance steps."""
    import matplotlib.pyplot as plt

    fig, (ax_tau, ax_share) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    importance = [s for s in samplers_in_order(runs["sampler"]) if s != baseline]
    ratios = cost_ratio(runs, baseline).set_index("sampler")["cost_ratio"]
    for sampler in importance:
        mine = runs[runs["sampler"] == sampler]
        style = sampler_style(sampler)
        for metric, ax in (("tau", ax_tau), ("is_fraction", ax_share)):
            c = curves(mine.assign(tau=mine["tau"].where(mine["tau"] > 0)), metric)
            ax.plot(
                c["train_time"], c["median"], lw=1.8, ms=4, markevery=0.1, label=sampler, **style
            )
            ax.fill_between(
                c["train_time"], c["min"], c["max"], color=style["color"], alpha=0.15, lw=0
            )
        if "tau_threshold" in mine and mine["tau_threshold"].notna().any():
            c = curves(mine, "tau_threshold")
            ax_tau.plot(
                c["train_time"],
                c["median"],
                color=style["color"],
                lw=1.2,
                ls=(0, (1, 2)),
                label=f"{sampler}: its measured threshold",
            )
        if sampler in ratios and np.isfinite(ratios[sampler]):
            ax_tau.axhline(
                ratios[sampler],
                color=style["color"],
                lw=1.0,
                ls="--",
                label=f"{sampler}: measured cost ratio {ratios[sampler]:.2f}",
            )
    if importance:
        ax_tau.axhline(2.0, color="black", lw=1.0, ls=":", label="(B + 3b) / 3b = 2 (B = 3b)")
    ax_tau.set(xlabel="train_time (s)", ylabel="tau (moving average)", yscale="log")
    ax_share.set(
        xlabel="train_time (s)",
        ylabel="share of importance steps since the last row",
        ylim=(-0.02, 1.02),
    )
    for ax in (ax_tau, ax_share):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
