"""The exact variance of every sampler's gradient estimator, measured during training: a
callback that writes ``variance.csv`` in the run directory (the maths is in
importance_sampling.core.variance; importance_sampling.analysis.variance reads the file)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..core.variance import VARIANCE_COLUMNS, measure
from .callbacks import Callback

if TYPE_CHECKING:
    from .trainer import Trainer


class VarianceCallback(Callback):
    """Measure every ``every_rows`` metrics rows (the first row, before training, included, and the
    final state when the run completes) on a fixed presample drawn once with ``seed``.

    Args:
        every_rows: measure at rows 0, every_rows, 2 every_rows, ... of metrics.csv.
        presample_size: B; None = the trainer's sampler's presample size (3 b for uniform).
        batch_size: b; None = the trainer's sampler's batch size.
        seed: seeds the choice of the presample (the same points at every measurement).
        chunk_size: gradients computed this many points at a time (one forward + backward each).
        filename: written in the trainer's out_dir.
    """

    def __init__(
        self,
        every_rows: int,
        presample_size: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        chunk_size: int = 128,
        filename: str = "variance.csv",
    ):
        if every_rows < 1:
            raise ValueError(f"variance.every_rows must be >= 1 to measure, got {every_rows}")
        self.every_rows, self.seed, self.chunk_size = int(every_rows), int(seed), int(chunk_size)
        self.presample_size, self.batch_size, self.filename = presample_size, batch_size, filename
        self.presample: Tensor | None = None
        self.rows: list[dict] = []  # every measurement so far, as written (e.g. for a logger)
        self.measured_steps: list[int] = []

    def _setup(self, trainer: Trainer) -> None:
        sampler, n = trainer.sampler, trainer.num_samples
        self.batch_size = int(self.batch_size or sampler.batch_size)
        size = int(
            self.presample_size or getattr(sampler, "presample_size", 3 * sampler.batch_size)
        )
        if size > n:  # a measurement should never stop a training run: measure all the data
            warnings.warn(
                f"variance.presample_size={size} is larger than the training set ({n}); "
                f"measuring on all {n} points",
                stacklevel=2,
            )
            size = n
        generator = torch.Generator().manual_seed(self.seed)
        self.presample = torch.randperm(n, generator=generator)[:size]
        self.path = Path(trainer.out_dir) / self.filename
        # A resumed run (first row seen is not the run's first) keeps the measurements up to the
        # checkpoint's last row; later ones are redone, as the trainer redoes its metrics rows.
        kept = []
        if len(trainer.rows) > 1 and self.path.is_file():
            resumed_through = trainer.rows[-2]["step"]
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_through]
            self.measured_steps = sorted({int(r["step"]) for r in kept})
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=VARIANCE_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def measure(self, trainer: Trainer) -> list[dict]:
        """Measure now and append the rows to the file."""
        if self.presample is None:
            self._setup(trainer)
        x, y = trainer.source.eval_inputs(self.presample)
        rows = measure(
            trainer.model,
            x,
            y,
            self.batch_size,
            trainer.loss_fn,
            getattr(trainer.sampler, "smoothing", 0.0),
            self.chunk_size,
        )
        when = {
            "step": trainer.step,
            "epoch": trainer.samples / trainer.num_samples,
            "train_time": trainer.train_time,
            "trainer_tau": trainer.sampler.tau,
        }
        rows = [{**when, **r} for r in rows]
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=VARIANCE_COLUMNS).writerows(rows)
        self.measured_steps.append(trainer.step)
        self.rows += rows
        return rows

    def on_row(self, trainer: Trainer, row: dict) -> None:
        # the row's index in metrics.csv (the trainer appends it before calling back)
        if (len(trainer.rows) - 1) % self.every_rows == 0:
            self.measure(trainer)

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        if summary["status"] == "completed" and trainer.step not in self.measured_steps:
            self.measure(trainer)
