"""variance.csv (written by the training engine's VarianceCallback) -> the paper's orderings,
a summary per score, and the figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .styles import plain_log_ticks, sampler_style

DISTRIBUTIONS = ("uniform", "loss", "upper_bound", "gradient_norm")  # the order of the columns


def read_variance(run_dir: str | Path) -> pd.DataFrame:
    """``run_dir/variance.csv`` as a pandas DataFrame."""
    return pd.read_csv(Path(run_dir) / "variance.csv")


def ordering_by_step(table):
    """Per measurement point (index: step), whether the paper's orderings hold: ``variance``
    (gradient_norm >= upper_bound > loss > uniform in variance reduction) and ``distance`` (the
    upper bound closer than the loss to the gradient-norm distribution, in TV distance)."""
    wide = table.pivot_table(
        index="step", columns="score", values=["variance_reduction", "tv_distance"]
    )
    vr, tv = wide["variance_reduction"], wide["tv_distance"]
    variance = (
        (vr.gradient_norm >= vr.upper_bound - 1e-12)
        & (vr.upper_bound > vr.loss)
        & (vr.loss > vr.uniform)
    )
    return variance.to_frame("variance").assign(distance=tv.upper_bound < tv.loss)


def ordering_holds(table) -> dict:
    """The share of measurement points where each of the paper's orderings holds (see
    ``ordering_by_step``), and ``points``, the number of measurement points."""
    by_step = ordering_by_step(table)
    return {
        "points": len(by_step),
        "variance": float(by_step.variance.mean()),
        "distance": float(by_step.distance.mean()),
    }


def summarize(table):
    """Per score: the median over measurement points of the measured quantities."""
    columns = [
        "variance_reduction",
        "tau_measured",
        "tau_hat",
        "tv_distance",
        "l2_distance",
        "spearman",
    ]
    return table.groupby("score", sort=False)[columns].median().reindex(list(DISTRIBUTIONS))


def plot_variance(table, title: str = ""):
    """Four panels over training steps: variance reduction of each score, its TV distance and
    rank correlation to the gradient-norm distribution, and tau (measured vs estimated). Each
    score keeps its colour, line style and marker (styles.py). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
    (ax_vr, ax_tv), (ax_rank, ax_tau) = axes
    by_score = {name: g.sort_values("step") for name, g in table.groupby("score")}
    span = float(table.step.max() - table.step.min()) or 1.0

    def line(ax, name: str, y, offset: float = 0.0, **kwargs) -> None:
        g = by_score[name]
        style = {**sampler_style(name), "ms": 5, "lw": 1.6, **kwargs}
        ax.plot(g.step + offset * span, y(g), **style)

    for name in DISTRIBUTIONS:
        if name in by_score:
            line(ax_vr, name, lambda g: g.variance_reduction, label=name)
    ax_vr.set(xlabel="step", ylabel="variance reduction  1 - TrCov_q / TrCov_uniform")
    for name in ("uniform", "loss", "upper_bound"):
        if name in by_score:
            line(ax_tv, name, lambda g: g.tv_distance, label=name)
    ax_tv.set(xlabel="step", ylabel="TV distance to the gradient-norm distribution")
    # Both rank correlations sit near 1 after the first steps: 1 - rho on a log axis separates
    # them, and the loss's markers are hollow and nudged sideways so neither hides the other.
    for name, offset, hollow in (("loss", -0.006, True), ("upper_bound", 0.006, False)):
        if name in by_score:
            line(
                ax_rank,
                name,
                lambda g: (1 - g.spearman).clip(lower=1e-6),
                offset,
                label=name,
                **({"mfc": "white"} if hollow else {}),
            )
    ax_rank.set(
        xlabel="step",
        ylabel="1 - Spearman rank correlation with the gradient norm",
        yscale="log",
    )
    ax_rank.set_title("lower = ranks points more like the gradient norm", fontsize=9, loc="right")
    plain_log_ticks(ax_rank)
    for name in ("loss", "upper_bound", "gradient_norm"):
        if name in by_score:
            line(
                ax_tau, name, lambda g: g.tau_measured, label=f"{name}: measured TrCov_u / TrCov_q"
            )
            line(
                ax_tau,
                name,
                lambda g: g.tau_hat,
                marker="",
                linestyle=(0, (2, 2)),
                lw=1.2,
                label=f"{name}: tau_hat = B sum q^2",
            )
    g = by_score.get("uniform", table)
    tau = g.trainer_tau.where(g.trainer_tau > 0)  # 0 before the first step (Algorithm 1)
    ax_tau.plot(
        g.step, tau, color="black", linestyle=":", lw=1.6, label="trainer's tau (moving average)"
    )
    ax_tau.set(xlabel="step", ylabel="equivalent batch increment tau", yscale="log")
    plain_log_ticks(ax_tau)
    for ax in axes.ravel():
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8 if ax is not ax_tau else 7, handlelength=3.5)
    if title:
        fig.suptitle(title)
    return fig
