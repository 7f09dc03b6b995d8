"""What a run leaves in its directory, and the hooks that write it (rank 0 only).

- ``metrics.csv``   one row per evaluation (columns: ``METRICS_COLUMNS``), flushed as written;
- ``summary.json``  the last row plus totals, written when the run ends (also after an error);
- a progress bar over the budget.

Each is a ``Callback`` (callbacks.py), told of every metrics row and of the end of a run,
outside the timed steps. checkpoint.pt is checkpoints.py's.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .callbacks import Callback

if TYPE_CHECKING:
    from .trainer import Trainer

METRICS_COLUMNS = (
    "step",  # optimizer steps so far
    "samples",  # training points back-propagated so far (b per step, all ranks together)
    "epoch",  # samples / training-set size
    "train_time",  # seconds in training steps, scoring included, evaluation excluded
    "wall_time",  # seconds since fit() started, evaluation included
    "train_loss",  # unweighted mean loss over the train-eval set (trainer.train_eval_size)
    "train_error",  # its classification error
    "test_loss",
    "test_error",
    "tau",  # the sampler's moving average of the equivalent batch-size increment
    "is_fraction",  # share of steps since the previous row that used importance sampling
    "scored",  # points scored by the sampler so far (presample forwards, all ranks)
    "fallbacks",  # importance steps whose scores were all equal or zero (so a uniform step)
    "world_size",  # data-parallel processes
    "machine_share",  # share of the time the run's threads were ready that they ran (machine.py)
    "steal",  # share of the CPUs' time the hypervisor gave to other machines meanwhile (machine.py)
    "reference_ms",  # ms of one step of the fixed reference workload, now (reference.py)
    "eval_seconds",  # wall seconds this row's evaluation took (outside train_time)
)  # then the sampler's own columns, if any (Sampler.metrics(): e.g. the measured tau_threshold)


class MetricsFile(Callback):
    """metrics.csv: a row appended at each evaluation (open-write-close: a crash loses at most
    the row being evaluated). On resume the file is rewritten with the checkpoint's rows, so
    the rows after the checkpoint are redone, not doubled."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rewrite(self, rows: list[dict]) -> None:
        self._write(rows, header=True)

    def on_row(self, trainer: Trainer, row: dict) -> None:
        self._write([row], header=len(trainer.rows) == 1)

    def _write(self, rows: list[dict], header: bool) -> None:
        with open(self.path, "w" if header else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else METRICS_COLUMNS)
            if header:
                writer.writeheader()
            writer.writerows(rows)


class SummaryFile(Callback):
    """summary.json: strict JSON (a NaN, e.g. the tau of the uniform sampler, is null), written
    atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.path)


def json_safe(summary: dict) -> dict:
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()
    }


class ProgressBar(Callback):
    """A tqdm bar over the budget (seconds of train_time, else steps), updated at every row with
    the training loss, the test error, tau and whether importance sampling is on."""

    def __init__(self, total: float, unit_is_time: bool, desc: str):
        self.unit_is_time = unit_is_time
        # n counts seconds of training (or steps); elapsed and remaining are wall time,
        # evaluation included (tqdm's rate is n per wall second)
        unit = "s of training" if unit_is_time else "steps"
        self.bar = tqdm(
            total=total,
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} "
            + unit
            + " [wall {elapsed}, ~{remaining} left{postfix}]",
            desc=desc,
        )

    def on_row(self, trainer: Trainer, row: dict) -> None:
        done = row["train_time"] if self.unit_is_time else row["step"]
        self.bar.n = min(done, self.bar.total)
        on = "on" if row["is_fraction"] > 0.5 else "off"
        self.bar.set_postfix_str(
            f"loss={row['train_loss']:.4f} err={row['test_error']:.3f} "
            f"tau={row['tau']:.2f} IS={on}",
            refresh=True,
        )

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        self.bar.close()
