"""Figures of a comparison: training loss and test error against train_time, and time-to-loss bars."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .compare import curves
from .runs import plural, samplers_in_order
from .styles import plain_log_ticks, sampler_style

# ---------------------------------------------------------------- figures
# Every sampler keeps one colour, line style and marker in every figure (styles.py).
CENSORED_HATCH = "////"
FEW_SEEDS = 3  # up to this many seeds, curves show each seed rather than a min-max band


def _seeds_label(runs: pd.DataFrame, sampler: str) -> str:
    mine = runs[runs["sampler"] == sampler].drop_duplicates("run")
    starved = int(mine["starved"].astype(bool).sum()) if "starved" in mine else 0
    flag = f", {starved} STARVED" if starved else ""
    return f"{sampler} ({plural(len(mine), 'seed')}{flag})"


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
    """``metric`` against train_time: the median over seeds per sampler at the metrics rows, and
    the spread of the seeds: with up to ``FEW_SEEDS`` seeds each seed's own curve, thin (a band
    between two or three crossing curves reads as noise, not as a range), with more a min-max
    band.

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
            markevery=max(1, len(c) // 10),
            label=_seeds_label(runs, sampler),
            **style,
        )
        mine = runs[runs["sampler"] == sampler]
        if mine["run"].nunique() <= FEW_SEEDS:
            end = c["train_time"].max()
            for _, rows in mine.groupby("run", sort=False):
                rows = rows[rows["train_time"] <= end].sort_values("train_time")
                ax.plot(
                    rows["train_time"],
                    scale * rows[metric],
                    color=style["color"],
                    lw=0.7,
                    alpha=0.45,
                )
        else:
            ax.fill_between(
                c["train_time"], c["min"], c["max"], color=style["color"], alpha=0.15, lw=0
            )
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
    ax.set_ylabel("train_time to reach it (s): median over seeds, whiskers min-max")
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


def _curves_note():
    """The legend's last entry: what the curves and the bars are (no line, a label): their bands
    and whiskers are min-max over seeds, where the tables' ratios carry 95% intervals."""
    from matplotlib.lines import Line2D

    return Line2D(
        [],
        [],
        lw=0,
        label="curves: median over seeds at the metrics rows, thin lines each seed (band: "
        f"min-max over more than {FEW_SEEDS}), up to the shortest run's end;\n"
        "bars: median over seeds, whiskers min-max (not a 95% interval)",
    )


def legend_below(fig, handles: list, ncols: int, title: str | None = None):
    """One legend for all of a figure's panels, under them (the censored-bar entry last), and
    the figure's title."""
    handles = [*handles, censored_patch(), _curves_note()]
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
