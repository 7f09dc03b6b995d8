"""Running sweeps of train.py from the scripts: one progress bar over the run directories of a
sweep, and the command-line split between a script's options and train.py's overrides."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from tqdm.auto import tqdm

SAMPLERS = ["uniform", "loss", "upper_bound", "gradient_norm"]  # the paper's four


def split_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """(the script's options, train.py's key=value overrides). The overrides may follow list
    options (--seeds 0 1 2 trainer.x=5): they are taken out first, so that argparse does not read
    them as more seeds or samplers."""
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args, unknown = parser.parse_known_args([a for a in argv if a not in overrides])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are key=value)")
    return args, overrides


def run_fraction(run_dir: Path, budget: dict) -> float:
    """How far a run in progress is (0-1): its last metrics row against its budget (time, steps
    or epochs, whichever it will hit first)."""
    try:
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return 0.0
    if not rows:
        return 0.0
    last = rows[-1]
    fractions = [
        float(last[column]) / float(limit)
        for column, limit in (
            ("train_time", budget.get("time_budget")),
            ("step", budget.get("max_steps")),
            ("epoch", budget.get("max_epochs")),
        )
        if limit and last.get(column) not in (None, "")
    ]
    return min(max(fractions, default=0.0), 0.99)


class SweepProgress:
    """One progress bar over a sweep, read from the run directories as they appear: the runs
    done (summary.json), the runs in progress (how far each is), and the time left. The jobs'
    result lines (from the sweep's log) are printed above the bar as they come."""

    def __init__(
        self, sweep_dir: Path, total: int, log: Path, pattern: str = "*/.hydra/config.yaml"
    ):
        # pattern: where the runs' configs are under sweep_dir (tuned_comparison.py: two levels)
        self.sweep_dir, self.total, self.log, self.pattern = sweep_dir, total, log, pattern
        self.budgets: dict[Path, dict] = {}
        self.log_offset = 0
        self.first_poll = True
        self.bar = tqdm(
            total=total,
            unit="run",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}] {postfix}",
        )

    def budget(self, run_dir: Path) -> dict:
        if run_dir not in self.budgets:
            config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
            self.budgets[run_dir] = config.get("trainer") or {}
        return self.budgets[run_dir]

    def poll(self) -> None:
        started = sorted(
            p.parent.parent for p in self.sweep_dir.glob(self.pattern)
        )  # a job writes its config first
        done = [r for r in started if (r / "summary.json").is_file()]
        running = [r for r in started if not (r / "summary.json").is_file()]
        progress = {r.name: run_fraction(r, self.budget(r)) for r in running}
        self.bar.total = max(self.total, len(started))
        self.bar.n = len(done) + sum(progress.values())
        if self.first_poll:  # a resumed sweep: the time left counts only this session's pace
            self.bar.initial, self.first_poll = self.bar.n, False
        now = ", ".join(f"{k} {100 * v:.0f}%" for k, v in progress.items())
        self.bar.set_postfix_str(f"now: {now}" if now else "")
        self._echo_results()

    def _echo_results(self) -> None:
        """Each job's one-line result (and any error) from the log, above the bar."""
        try:
            with open(self.log, errors="replace") as f:
                f.seek(self.log_offset)
                text = f.read()
        except OSError:
            return
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits
        self.log_offset += len(complete.encode())
        for line in complete.splitlines():
            if " | results in " in line or line.startswith("error:"):
                self.bar.write(line)

    def close(self) -> None:
        self.poll()
        self.bar.close()
