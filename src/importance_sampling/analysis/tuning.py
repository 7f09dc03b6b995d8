"""Tuned comparisons: every sampler with its own learning rate and schedule, chosen on a
validation split, then compared on the test set (scripts/tuned_comparison.py runs the protocol).

Two phases, each a set of train.py runs:

- **selection**: every sampler x learning rate x schedule, one seed, trained without a
  validation split carved from the training set (``dataset.validation_size``) and evaluated on
  it: those runs never load the test set (data.hold_out_validation). Each sampler keeps the
  setting with the lowest validation error at the end of the budget (``choose``);
- **final**: each sampler's chosen setting, several seeds, on the whole training set, evaluated
  on the test set at equal train_time (analysis.py's tables, plus ``report`` here).

Data flows as in analysis.py: run directories -> ``collect`` (the tidy frame plus each run's
lr, schedule and evaluation split) -> ``selection_table`` / ``choose`` -> ``report`` -> ``save``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .compare import (
    at_time,
    default_accuracy_targets,
    default_targets,
    equal_time_at,
    equal_time_table,
    paired_ratios,
    speedup,
    time_to_accuracy,
    time_to_loss,
)
from .drift import drift_markdown
from .figures import legend_below, plot_curves, plot_time_to_loss
from .runs import (
    RUN_COLUMNS,
    collect_runs,
    plural,
    samplers_in_order,
    starved_note,
    starved_runs,
    with_run_columns,
)
from .runs import title as runs_title
from .styles import sampler_style
from .switch import cost_markdown, plot_switch
from .tables import LOSS, fmt, markdown_table, ratio_cell, time_to_loss_markdown

SELECT_BY = {  # criterion -> the columns of selection_table compared, in order (ties: the next)
    "error": ("val_error", "val_loss"),
    "loss": ("val_loss", "val_error"),
}
SETTING_COLUMNS = ("lr", "lr_schedule", "eval_split", "validation_size")


@dataclass(frozen=True)
class Setting:
    """One point of the grid: a sampler, its base learning rate and its schedule."""

    sampler: str
    lr: float
    schedule: str

    def overrides(self) -> list[str]:
        """train.py overrides that select this setting."""
        return [
            f"sampler={self.sampler}",
            f"optimizer.lr={self.lr!r}",
            f"trainer.lr_schedule={self.schedule}",
        ]

    @property
    def name(self) -> str:
        return f"{self.sampler}_lr{self.lr:g}_{self.schedule}"


def grid(samplers: Sequence[str], lrs: Sequence[float], schedules: Sequence[str]) -> list[Setting]:
    """Every sampler x lr x schedule, the samplers innermost: run in this order, consecutive runs
    belong to different samplers, so a slow period of the machine does not fall on one alone."""
    return [Setting(s, float(lr), c) for lr in lrs for c in schedules for s in samplers]


# ---------------------------------------------------------------- runs -> tables
def read_setting(run_dir: str | Path) -> dict:
    """A run's lr, lr_schedule and validation_size (its .hydra/config.yaml) and eval_split (its
    summary.json; "test" for runs written before the split existed)."""
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "lr": (config.get("optimizer") or {}).get("lr"),
        "lr_schedule": (config.get("trainer") or {}).get("lr_schedule", "constant"),
        "eval_split": summary.get("eval_split", "test"),
        "validation_size": (config.get("dataset") or {}).get("validation_size"),
    }


def collect(root: str | Path) -> pd.DataFrame:
    """collect_runs plus, per row, its run's SETTING_COLUMNS (after RUN_COLUMNS)."""
    root = Path(root)
    runs = collect_runs(root)
    settings = pd.DataFrame(
        [{"run": run, **read_setting(root / run)} for run in runs["run"].unique()]
    )
    runs = runs.merge(settings, on="run", how="left", sort=False)
    front = [c for c in RUN_COLUMNS if c in runs.columns] + list(SETTING_COLUMNS)
    return runs[front + [c for c in runs.columns if c not in front]]


def selection_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per selection run: sampler, lr, lr_schedule, status, eval_split, train_time (its
    end), val_error, val_loss (the evaluation split's, at its last row) and train_loss."""
    out = []
    for _, rows in runs.groupby("run", sort=False):
        last = rows.sort_values("train_time", kind="stable").iloc[-1]
        out.append(
            {
                "run": last["run"],
                "sampler": last["sampler"],
                "lr": float(last["lr"]),
                "lr_schedule": last["lr_schedule"],
                "seed": last["seed"],
                "status": last["status"],
                "starved": bool(last.get("starved", False)),
                "run_machine_share": float(last.get("run_machine_share", math.nan)),
                "eval_split": last["eval_split"],
                "train_time": float(last["train_time"]),
                "val_error": float(last["test_error"]),
                "val_loss": float(last["test_loss"]),
                "train_loss": float(last["train_loss"]),
            }
        )
    table = pd.DataFrame(out)
    order = {s: i for i, s in enumerate(samplers_in_order(table["sampler"]))}
    return table.sort_values(
        ["sampler", "lr_schedule", "lr"], key=lambda c: c.map(order) if c.name == "sampler" else c
    ).reset_index(drop=True)


class SelectionError(ValueError):
    """A sampler has no usable selection run, or the runs evaluated the wrong split."""


def choose(selection: pd.DataFrame, by: str = "error") -> pd.DataFrame:
    """``selection`` with ``chosen`` (the best setting of each sampler) and ``edge`` (the chosen
    lr is the smallest or the largest of its grid: the grid may be too narrow).

    Best = the lowest validation error at the end of the budget, ties broken by the validation
    loss (``by="error"``), or the other way round (``by="loss"``). Runs that did not complete
    (diverged: status failed; killed: running) are never chosen. Every run must have been
    evaluated on the validation split, never the test set."""
    if by not in SELECT_BY:
        raise SelectionError(f"select by error or loss, got {by!r}")
    wrong = selection[selection["eval_split"] != "validation"]
    if len(wrong):
        raise SelectionError(
            f"{len(wrong)} selection runs were evaluated on the {wrong['eval_split'].iloc[0]} "
            f"split, not a validation split (e.g. {wrong['run'].iloc[0]}): a setting is chosen "
            "on dataset.validation_size runs only"
        )
    table = selection.copy()
    table["chosen"] = False
    table["edge"] = False
    for sampler, rows in table.groupby("sampler", sort=False):
        usable = rows[(rows["status"] == "completed") & np.isfinite(rows["val_error"])]
        if usable.empty:
            raise SelectionError(
                f"no selection run of {sampler} completed ({len(rows)} tried, statuses: "
                f"{', '.join(sorted(set(rows['status'])))}): lower the learning rates"
            )
        best = usable.sort_values(list(SELECT_BY[by]), kind="stable").index[0]
        table.loc[best, "chosen"] = True
        lr, lrs = table.loc[best, "lr"], rows["lr"]
        table.loc[best, "edge"] = lrs.nunique() > 1 and lr in (lrs.min(), lrs.max())
    return table


def chosen_settings(table: pd.DataFrame) -> list[Setting]:
    """The chosen row of each sampler (``choose`` output) as Settings, in the paper's order."""
    rows = table[table["chosen"]].set_index("sampler")
    return [
        Setting(s, float(rows.loc[s, "lr"]), str(rows.loc[s, "lr_schedule"]))
        for s in samplers_in_order(rows.index)
    ]


def widened(table: pd.DataFrame) -> list[Setting]:
    """One more learning rate for each sampler whose choice (``choose`` output) is at the edge of
    its grid: a step of the grid's ratio beyond it (0.05 chosen of 0.05, 0.1, 0.2 -> 0.025)."""
    out = []
    for _, row in table[table["chosen"] & table["edge"]].iterrows():
        lrs = sorted(set(table.loc[table["sampler"] == row["sampler"], "lr"]))
        lr = float(row["lr"])
        beyond = lr * lr / lrs[1] if lr == lrs[0] else lr * lr / lrs[-2]
        out.append(Setting(row["sampler"], round(beyond, 10), str(row["lr_schedule"])))
    return out


# ---------------------------------------------------------------- the report
@dataclass
class Report:
    """The tables of a tuned comparison (``report``) and their markdown."""

    equal_time: pd.DataFrame  # per sampler: its setting, metrics at equal time, ratios to baseline
    accuracy: pd.DataFrame  # speedup over time_to_accuracy targets (+ accuracy)
    loss: pd.DataFrame  # speedup over training-loss targets
    markdown: str


def _pm(median: float, low: float, high: float, spec: str, scale: float = 1.0) -> str:
    f = fmt
    return f"{f(scale * median, spec)} [{f(scale * low, spec)}, {f(scale * high, spec)}]"


def _seconds(x: float) -> str:
    """Whole seconds from 10 s on, tenths below (a tiny budget in the tests)."""
    return fmt(x, ".0f" if x >= 10 else ".1f")


def _time_cell(r) -> str:
    """'t s [min, max]' over the runs that reached the target, '(k/n)' if not all did; '> t s'
    when none did within t s (censored)."""
    if not r.reached:
        return f"> {_seconds(r.censored_at)} s (0/{r.runs})"
    spread = f"{_seconds(r.time_median)} s [{_seconds(r.time_min)}, {_seconds(r.time_max)}]"
    return spread + (f" ({r.reached}/{r.runs})" if r.reached < r.runs else "")


def selection_markdown(table: pd.DataFrame) -> str:
    """Validation error (%) of every setting: a row per sampler and schedule, a column per lr;
    the chosen setting in bold (with † at the edge of the grid), a run that did not complete as
    its status ('failed': diverged, most often)."""
    lrs = sorted(set(table["lr"]))
    rows = []
    for sampler in samplers_in_order(table["sampler"]):
        mine = table[table["sampler"] == sampler]
        for schedule in sorted(set(mine["lr_schedule"])):
            cells = []
            for lr in lrs:
                hit = mine[(mine["lr_schedule"] == schedule) & (mine["lr"] == lr)]
                if hit.empty:
                    cells.append("")
                    continue
                r = hit.iloc[0]
                # a run that failed (diverged, most often) or never ended shows its status
                cell = f"{100 * r['val_error']:.2f}" if r["status"] == "completed" else r["status"]
                if r.get("chosen", False):
                    cell = f"**{cell}**" + (" †" if r.get("edge", False) else "")
                cells.append(cell)
            rows.append([sampler, schedule, *cells])
    return markdown_table(["sampler", "schedule", *[f"lr {lr:g}" for lr in lrs]], rows)


def report(
    runs: pd.DataFrame,
    selection: pd.DataFrame,
    at: float | None = None,
    accuracies: Sequence[float] | None = None,
    loss_targets: Sequence[float] | None = None,
    baseline: str = "uniform",
    protocol: dict | None = None,
) -> Report:
    """The tables of the final runs (``runs``: ``collect`` of the final phase, on the test set)
    and their markdown, with the selection (``choose`` output) and the ``protocol``'s
    parameters (budget, grid, seeds, validation split) in the text."""
    if set(runs["eval_split"]) != {"test"}:
        raise SelectionError("the final runs must be evaluated on the test set")
    at, warning = equal_time_at(runs, at)
    accuracies = default_accuracy_targets(runs, baseline) if accuracies is None else accuracies
    loss_targets = default_targets(runs, baseline) if loss_targets is None else loss_targets
    acc = speedup(time_to_accuracy(runs, accuracies), baseline)
    acc.insert(0, "accuracy", [round(1 - t, 12) for t in acc["target"]])
    loss = speedup(time_to_loss(runs, loss_targets), baseline)

    equal = equal_time_table(runs, at, baseline)
    values = at_time(runs, at, ("train_loss", "test_error"))
    settings = runs.groupby("sampler")[["lr", "lr_schedule"]].first()
    for metric in ("train_loss", "test_error"):
        ratios = paired_ratios(values, metric, baseline).set_index("sampler")
        for column in ("ratio_gmean", "ratio_ci_low", "ratio_ci_high"):
            equal[f"{metric}_{column}"] = equal["sampler"].map(ratios[column])
    equal.insert(1, "lr", equal["sampler"].map(settings["lr"]))
    equal.insert(2, "lr_schedule", equal["sampler"].map(settings["lr_schedule"]))

    headline = acc[acc["accuracy"] == max(acc["accuracy"])].set_index("sampler")
    seeds = int(runs.groupby("sampler")["run"].nunique().max())
    rows = []
    for r in equal.to_dict("records"):
        s = r["sampler"]
        h = headline.loc[s]
        rows.append(
            [
                s,
                f"{r['lr']:g}",
                r["lr_schedule"],
                _pm(r["train_loss_median"], r["train_loss_min"], r["train_loss_max"], LOSS),
                "–"
                if s == baseline
                else ratio_cell(
                    r["train_loss_ratio_gmean"],
                    r["train_loss_ratio_ci_low"],
                    r["train_loss_ratio_ci_high"],
                ),
                _pm(r["test_error_median"], r["test_error_min"], r["test_error_max"], ".2f", 100),
                "–"
                if s == baseline
                else ratio_cell(
                    r["test_error_ratio_gmean"],
                    r["test_error_ratio_ci_low"],
                    r["test_error_ratio_ci_high"],
                ),
                _time_cell(h),
                "–"
                if s == baseline
                else ratio_cell(
                    h.speedup_gmean, h.speedup_ci_low, h.speedup_ci_high, h.speedup_bound
                ),
            ]
        )
    target = 100 * max(acc["accuracy"])
    headline_md = markdown_table(
        [
            "sampler",
            "lr",
            "schedule",
            "training loss",
            f"× {baseline}",
            "test error (%)",
            f"× {baseline}",
            f"time to {target:.2f}% test accuracy",
            f"speedup over {baseline}",
        ],
        rows,
    )
    acc_rows = []
    for r in acc.itertuples():
        acc_rows.append(
            [
                f"{100 * r.accuracy:.2f}",
                r.sampler,
                _time_cell(r),
                "–"
                if r.sampler == baseline or not r.pairs
                else ratio_cell(
                    r.speedup_gmean, r.speedup_ci_low, r.speedup_ci_high, r.speedup_bound
                ),
                "–"
                if r.sampler == baseline or not r.pairs
                else _pm(r.speedup_median, r.speedup_min, r.speedup_max, ".2f"),
            ]
        )
    acc_md = markdown_table(
        [
            "test accuracy (%)",
            "sampler",
            "train_time to reach it",
            f"speedup over {baseline} (95% CI)",
            "per-seed median [min, max]",
        ],
        acc_rows,
    )
    text = [protocol_markdown(protocol or {}, selection, seeds, at)]
    text += [
        f"## Result at equal train_time = {at:.0f} s (test set)\n",
        f"Median [min, max] over {plural(seeds, 'seed')}; '× {baseline}': the geometric "
        f"mean over seeds of the per-seed ratio to the tuned {baseline} run of the same seed, "
        "[95% interval: Student t on the log ratios]; time to the test accuracy of the worst "
        f"tuned {baseline} run at its end, censored ('> t': not reached within t s; 'k/n': only "
        f"k of n runs reached it), speedup = t_{baseline} / t_sampler per seed ('<' / '>': a "
        "bound, as some runs never reached the target).\n",
        headline_md,
        "\n## Time to a test accuracy\n",
        acc_md,
        "\n## Time to a training loss\n",
        time_to_loss_markdown(loss, baseline),
        "",
    ]
    if costs := cost_markdown(runs, baseline):
        text += [
            "## The switch: tau against the cost of a step\n",
            "Median ms of a step over the intervals between metrics rows whose steps were all "
            f"importance steps (the sampler's runs) or all uniform ({baseline}'s runs), median "
            "over seeds: the cost ratio is what an importance step has to repay in variance "
            "(switch.png: tau over training against it).\n",
            costs,
            "",
        ]
    if drift := drift_markdown(runs, at, baseline, accuracies=list(accuracies)):
        text.append(drift)
    if warning:
        text.append(f"Warning: {warning}.\n")
    for phase, frame in (("final", runs), ("selection", selection)):
        if note := starved_note(frame):
            text.append(f"{note} ({phase} runs)\n")
    return Report(equal, acc, loss, "\n".join(text))


def starved_in(runs: pd.DataFrame, selection: pd.DataFrame) -> list[str]:
    """The runs of a protocol, selection or final, that flagged themselves starved."""
    return [*starved_runs(selection)["run"], *starved_runs(runs)["run"]]


def protocol_markdown(protocol: dict, selection: pd.DataFrame, seeds: int, at: float) -> str:
    """The protocol in words, then the selection table."""
    p = protocol
    lrs = ", ".join(f"{lr:g}" for lr in sorted(set(selection["lr"])))
    schedules = " and ".join(sorted(set(selection["lr_schedule"])))
    budget = p.get("selection_budget")
    val = p.get("validation_size", "?")
    by = p.get("select_by", "error")
    criterion = {
        "error": "the lowest validation error (ties: validation loss)",
        "loss": "the lowest validation loss (ties: validation error)",
    }[by]
    lines = [
        "## Protocol\n",
        f"1. Selection: every sampler with learning rates {lrs} x {schedules} schedules, seed "
        f"{p.get('selection_seed', '?')}, {f'{budget:g} s' if budget else 'the preset budget'}"
        f" of train_time per run, trained on the training set less a validation split of {val} "
        f"points (dataset.validation_size={val}, dataset.validation_seed="
        f"{p.get('validation_seed', '?')}) and evaluated on that split; the test set is not "
        f"loaded. Each sampler keeps {criterion} at the end of the budget.",
        f"2. Final: each sampler's chosen setting, {plural(seeds, 'seed')}, the whole "
        f"training set, evaluated on the test set; compared at equal train_time ({at:.0f} s).",
        "",
        "Validation error (%) at the end of each selection run (chosen: **bold**; † the chosen "
        "lr is at the edge of the grid):\n",
        selection_markdown(selection),
    ]
    edges = selection[selection["edge"] & selection["chosen"]]
    if len(edges):
        lines.append(
            f"\n† At the edge of the grid: {', '.join(edges['sampler'])} (a wider grid may "
            "choose another lr)."
        )
    if p.get("command"):
        lines += ["", f"Command: `{p['command']}`"]
    again = p.get("final_only")
    if again:
        kept = again.get("seeds_kept") or []
        lines += [
            "",
            f"The final stage was run again (seeds {', '.join(map(str, again['seeds_run']))}"
            + (f"; seeds {', '.join(map(str, kept))} kept from before" if kept else "")
            + f") from the selection above: `{again['command']}`",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the figure
def plot_selection(selection: pd.DataFrame, ax=None):
    """Validation error (%) at the end of each selection run against its lr: a line per sampler
    and schedule (constant: the sampler's line, filled markers; cosine: thin, open markers);
    the chosen setting ringed; runs that did not complete (diverged) as an x at the top."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ok = selection[selection["status"] == "completed"]
    for sampler in samplers_in_order(selection["sampler"]):
        style = sampler_style(sampler)
        for schedule in sorted(set(selection["lr_schedule"])):
            rows = ok[(ok["sampler"] == sampler) & (ok["lr_schedule"] == schedule)]
            rows = rows.sort_values("lr")
            constant = schedule == "constant"
            ax.plot(
                rows["lr"],
                100 * rows["val_error"],
                lw=1.8 if constant else 1.0,
                ms=6,
                markerfacecolor=style["color"] if constant else "white",
                label=f"{sampler}, {schedule}",
                **style,
            )
    chosen = selection[selection["chosen"]]
    ax.scatter(
        chosen["lr"],
        100 * chosen["val_error"],
        s=220,
        facecolors="none",
        edgecolors="black",
        lw=1.5,
        label="chosen",
        zorder=5,
    )
    failed = selection[selection["status"] != "completed"]
    if len(failed):
        top = ax.get_ylim()[1]
        for r in failed.itertuples():
            ax.plot(r.lr, top, "x", color=sampler_style(r.sampler)["color"], ms=8, mew=2)
        ax.annotate(
            "x: failed (diverged)", (0.99, 0.99), xycoords="axes fraction", ha="right", va="top"
        )
    ax.set_xscale("log")
    lrs = sorted(set(selection["lr"]))
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation error (%) at the end")
    ax.set_title("selection (validation split, 1 seed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return ax


def figure(runs: pd.DataFrame, selection: pd.DataFrame, accuracy: pd.DataFrame, title: str = ""):
    """Four panels: the selection, then the final runs' training loss (log), test error (%),
    and time to each target test accuracy."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 2, figsize=(14, 10), layout="constrained")
    plot_selection(selection, axes[0, 0])
    plot_curves(runs, "train_loss", axes[0, 1], log=True, ylabel="training loss", legend=False)
    plot_curves(
        runs,
        "test_error",
        axes[1, 0],
        ylabel="test error (%)",
        scale=100,
        focus=True,
        legend=False,
    )
    plot_time_to_loss(
        accuracy,
        axes[1, 1],
        legend=False,
        xlabel="target test accuracy (%)",
        labels=[f"{100 * a:.2f}" for a in dict.fromkeys(accuracy["accuracy"])],
    )
    settings = runs.groupby("sampler")[["lr", "lr_schedule"]].first()
    handles = [
        Line2D(
            [],
            [],
            lw=2,
            ms=5,
            label=f"{s}: lr {settings.loc[s, 'lr']:g}, {settings.loc[s, 'lr_schedule']} "
            f"({plural(runs.loc[runs['sampler'] == s, 'run'].nunique(), 'seed')})",
            **sampler_style(s),
        )
        for s in samplers_in_order(runs["sampler"])
    ]
    return legend_below(fig, handles, ncols=3, title=title)


# ---------------------------------------------------------------- files
FILES = {
    "runs": "runs.csv",  # the final runs, one row per run and evaluation (collect)
    "selection": "selection.csv",  # one row per selection run, chosen and edge marked
    "equal_time": "equal_time.csv",
    "time_to_accuracy": "time_to_accuracy.csv",
    "time_to_loss": "time_to_loss.csv",
    "protocol": "protocol.json",
    "table": "table.md",
    "figure": "figure.png",
    "switch": "switch.png",  # tau and the share of importance steps over training (switch.py)
}


def save(
    runs: pd.DataFrame,
    selection: pd.DataFrame,
    out_dir: str | Path,
    protocol: dict | None = None,
    at: float | None = None,
    accuracies: Sequence[float] | None = None,
    loss_targets: Sequence[float] | None = None,
    baseline: str = "uniform",
) -> dict[str, Path]:
    """Write FILES to ``out_dir``; ``load_saved`` reads runs, selection and protocol back."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report(runs, selection, at, accuracies, loss_targets, baseline, protocol)
    paths = {k: out / v for k, v in FILES.items()}
    runs.to_csv(paths["runs"], index=False)
    selection.to_csv(paths["selection"], index=False)
    rep.equal_time.to_csv(paths["equal_time"], index=False)
    rep.accuracy.to_csv(paths["time_to_accuracy"], index=False)
    rep.loss.to_csv(paths["time_to_loss"], index=False)
    paths["protocol"].write_text(json.dumps(protocol or {}, indent=1) + "\n")
    title, markdown = f"Tuned comparison: {runs_title(runs)}", rep.markdown
    if partial := (protocol or {}).get("partial_pairs"):  # a final stage not run to its end
        title = f"Tuned comparison, PARTIAL: {runs_title(runs)}"
        markdown = (
            f"**PARTIAL**: {partial['done']} of {partial['planned']} planned seed pairs done "
            f"(seeds {', '.join(map(str, partial['seeds_done']))}); the intervals are over "
            "these seeds only, not the protocol's result.\n\n" + markdown
        )
    paths["table"].write_text(f"# {title}\n\n{markdown}")
    fig = figure(runs, selection, rep.accuracy, title)
    fig.savefig(paths["figure"], dpi=100)
    plt.close(fig)
    fig = plot_switch(runs, baseline, f"The switch: {runs_title(runs)}")
    fig.savefig(paths["switch"], dpi=100)
    plt.close(fig)
    return paths


def load_saved(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(runs, selection, protocol) from a folder written by ``save``."""
    folder = Path(folder)
    missing = [FILES[k] for k in ("runs", "selection") if not (folder / FILES[k]).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' and no '.join(missing)}")
    protocol_path = folder / FILES["protocol"]
    protocol = json.loads(protocol_path.read_text()) if protocol_path.is_file() else {}
    selection = pd.read_csv(folder / FILES["selection"])
    return with_run_columns(pd.read_csv(folder / FILES["runs"])), selection, protocol


# ---------------------------------------------------------------- an unfinished protocol
def planned_runs(protocol: dict) -> tuple[int, int]:
    """(selection, final) run counts that a protocol.json plans."""
    n = len(protocol["samplers"])
    return n * len(protocol["lrs"]) * len(protocol["schedules"]), n * len(protocol["seeds"])


def partial_markdown(
    protocol: dict, selection: pd.DataFrame, final: pd.DataFrame | None, started: int = 0
) -> str:
    """The report of a protocol that has not finished: labelled PARTIAL, what is done of what
    is planned, the selection runs so far (nothing is chosen until every one has run) and the
    final runs so far, each with the share of the machine it got. ``started``: the selection
    runs begun, more than planned where --widen-edges added some."""
    plan_selection, plan_final = planned_runs(protocol)
    plan_selection = max(plan_selection, started, len(selection))
    done = int((selection["status"] == "completed").sum()) if len(selection) else 0
    final_rows = [] if final is None or final.empty else list(final.groupby("run", sort=False))
    final_done = sum(rows["status"].iloc[-1] == "completed" for _, rows in final_rows)
    lines = [
        f"**PARTIAL**: {done} of {plan_selection} selection runs and {final_done} of "
        f"{plan_final} final runs done; nothing is chosen or compared until every selection run "
        "has completed. Numbers here are single runs, not a result.",
        "",
        f"Command: `{protocol.get('command', '')}` (run again with `--protocol-dir` on the "
        "folder of these runs to go on).",
        "",
    ]
    if len(selection):
        lines += [
            "Validation error (%) at the end of each selection run so far:\n",
            selection_markdown(selection),
            "",
            markdown_table(
                [
                    "run",
                    "status",
                    "train_time (s)",
                    "validation error (%)",
                    "validation loss",
                    "training loss",
                    "machine share",
                ],
                [
                    [
                        r.run,
                        r.status + (" (STARVED)" if r.starved else ""),
                        f"{r.train_time:.0f}",
                        f"{100 * r.val_error:.2f}",
                        fmt(r.val_loss, LOSS),
                        fmt(r.train_loss, LOSS),
                        f"{r.run_machine_share:.3f}",
                    ]
                    for r in selection.itertuples()
                ],
            ),
        ]
    if final_rows:
        lines += ["", "Final runs so far (test set, at their last row):", ""]
        rows = []
        for run, frame in final_rows:
            last = frame.sort_values("train_time", kind="stable").iloc[-1]
            rows.append(
                [
                    run,
                    last["status"],
                    f"{last['train_time']:.0f}",
                    f"{100 * last['test_error']:.2f}",
                    fmt(last["train_loss"], LOSS),
                    f"{last.get('run_machine_share', math.nan):.3f}",
                    f"{last.get('run_reference_ms', math.nan):.2f}",
                ]
            )
        header = ["run", "status", "train_time (s)", "test error (%)", "training loss"]
        header += ["machine share", "reference step (ms)"]
        lines.append(markdown_table(header, rows))
    return "\n".join(lines) + "\n"


def save_partial(
    selection: pd.DataFrame,
    final: pd.DataFrame | None,
    out_dir: str | Path,
    protocol: dict,
    started: int = 0,
) -> dict[str, Path]:
    """table.md (``partial_markdown``), selection.csv, protocol.json of an unfinished protocol."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / FILES[k] for k in ("table", "selection", "protocol")}
    selection.to_csv(paths["selection"], index=False)
    paths["protocol"].write_text(json.dumps({**protocol, "partial": True}, indent=1) + "\n")
    title = f"Tuned comparison, PARTIAL: preset {protocol.get('experiment', '?')}"
    paths["table"].write_text(
        f"# {title}\n\n{partial_markdown(protocol, selection, final, started)}"
    )
    return paths
