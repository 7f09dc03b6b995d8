"""Markdown tables of a comparison, and the files a sweep's report writes (runs.csv, tables, figure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from .compare import default_targets, equal_time_at, equal_time_table, speedup, time_to_loss
from .figures import figure
from .runs import RUNS_CSV, plural, starved_note

# ---------------------------------------------------------------- tables
# losses keep 4 significant digits whatever their scale (0.2016, 2.513e-05): a fixed number of
# decimals prints a loss that has fallen below 1e-4 as 0.0000 beside a ratio that says otherwise
LOSS = "#.4g"


def fmt(x: float, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "∞"
    return format(x, spec)


def ratio_cell(gmean: float, low: float, high: float, bound: str = "=") -> str:
    """'1.23× [1.01, 1.50]': a geometric mean ratio and its 95% interval ('–' when not
    measured, no brackets with one seed); a censored speedup's bound ('<', '>', '~') in front."""
    prefix = "" if bound == "=" else "~ " if bound == "?" else f"{bound} "
    if math.isnan(gmean):
        return "–"
    interval = f" [{fmt(low, '.2f')}, {fmt(high, '.2f')}]" if not math.isnan(low) else ""
    return f"{prefix}{fmt(gmean, '.2f')}×{interval}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def time_to_loss_markdown(table: pd.DataFrame, baseline: str = "uniform") -> str:
    """``speedup`` output as a markdown table: median [min, max] over seeds."""
    rows = []
    for r in table.itertuples():
        if r.reached:
            time = (
                f"{fmt(r.time_median, '.1f')} [{fmt(r.time_min, '.1f')}, {fmt(r.time_max, '.1f')}]"
            )
        else:
            time = f"> {fmt(r.censored_at, '.1f')}"
        bound = (
            ""
            if r.speedup_bound == "="
            else "~ "
            if r.speedup_bound == "?"
            else f"{r.speedup_bound} "
        )
        speed = (
            f"{bound}{fmt(r.speedup_median, '.2f')}× [{fmt(r.speedup_min, '.2f')}, "
            f"{fmt(r.speedup_max, '.2f')}]"
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
                f"{fmt(r['train_loss_median'], LOSS)} [{fmt(r['train_loss_min'], LOSS)}, "
                f"{fmt(r['train_loss_max'], LOSS)}]",
                fmt(r[f"train_loss_vs_{baseline}"], ".2f"),
                f"{fmt(100 * r['test_error_median'], '.2f')} [{fmt(100 * r['test_error_min'], '.2f')}, "
                f"{fmt(100 * r['test_error_max'], '.2f')}]",
                fmt(r[f"test_error_vs_{baseline}"], ".2f"),
                fmt(r.get("epoch_median", math.nan), ".2f"),
                f"{r['starved']} ⚠" if r.get("starved") else "0",
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
            "starved runs",
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
        f"its median [min, max] over seeds, not a 95% interval; "
        f"'<' / '>': a bound, as some runs never reached the target):\n\n"
        f"{time_to_loss_markdown(table, baseline)}\n\n"
        f"At equal train_time = {equal['train_time'].iloc[0]:.1f} s (median [min, max] over seeds; "
        f"'vs {baseline}' = ratio of medians):\n\n"
        f"{equal_time_markdown(equal, baseline)}\n"
    )
    from .drift import drift_markdown  # drift.py formats with this module's helpers

    if drift := drift_markdown(runs, at, baseline, loss_targets=targets):
        text += f"\n{drift}"
    if warning:
        text += f"\nWarning: {warning}.\n"
    if note := starved_note(runs):
        text += f"\n{note}\n"
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
