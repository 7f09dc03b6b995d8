"""When a run stops, when it writes a metrics row, and how the learning rate follows its progress.

Budgets and cadences are read off one ``Clock`` (train_time, steps, epochs, passes); with several
data-parallel ranks the trainer builds it from rank 0's clock, so every rank takes the same
decision at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Clock:
    """Where a run stands: seconds of train_time, optimizer steps, epochs (training points
    back-propagated / dataset size) and passes of the sampler over its data (for samplers whose
    passes are shorter than the dataset, such as InfoBatch)."""

    train_time: float = 0.0
    step: int = 0
    epoch: float = 0.0
    passes: float = 0.0


def _check(name: str, value, allow_none: bool = True) -> None:
    """Raise a one-line ValueError naming ``trainer.<name>`` unless value > 0 (or None)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"trainer.{name} must be a number > 0, got {value!r}")


class Budget:
    """Stop after ``time_budget`` seconds of train_time, ``max_steps`` steps, ``max_epochs``
    epochs or ``max_passes`` passes, whichever comes first; a metrics row every
    ``eval_every_seconds`` of train_time or ``eval_every_steps`` steps, whichever comes first.

    ``eval_share`` bounds the wall time spent evaluating: a row due by seconds waits until the
    steps since the last row took at least (1 - share) / share times what that row's evaluation
    took (``evaluated``), and is left out when less than that is left of the time budget (the
    final row comes at the end anyway), so evaluation takes about that share of the run's wall
    time besides the rows before and after training. None: the cadence alone (the timed
    comparisons' presets fix theirs). A row due by steps is never delayed."""

    def __init__(
        self,
        time_budget: float | None = 30.0,
        max_steps: int | None = None,
        max_epochs: float | None = None,
        max_passes: float | None = None,
        eval_every_seconds: float | None = 1.0,
        eval_every_steps: int | None = None,
        eval_share: float | None = 0.25,
    ):
        for name, value in [
            ("time_budget", time_budget),
            ("max_steps", max_steps),
            ("max_epochs", max_epochs),
            ("max_passes", max_passes),
            ("eval_every_seconds", eval_every_seconds),
            ("eval_every_steps", eval_every_steps),
        ]:
            _check(name, value)
        if all(v is None for v in (time_budget, max_steps, max_epochs, max_passes)):
            raise ValueError(
                "set at least one of trainer.time_budget, trainer.max_steps, trainer.max_epochs, "
                "trainer.max_passes"
            )
        if eval_every_seconds is None and eval_every_steps is None:
            raise ValueError("set trainer.eval_every_seconds or trainer.eval_every_steps")
        if eval_share is not None and (
            isinstance(eval_share, bool)
            or not isinstance(eval_share, int | float)
            or not 0 < eval_share < 1
        ):
            raise ValueError(f"trainer.eval_share must be in (0, 1) or null, got {eval_share!r}")
        self.limits = {  # Clock field -> limit
            "train_time": time_budget,
            "step": max_steps,
            "epoch": max_epochs,
            "passes": max_passes,
        }
        self._set = [(field, limit) for field, limit in self.limits.items() if limit is not None]
        self.eval_every_seconds, self.eval_every_steps = eval_every_seconds, eval_every_steps
        self.eval_share = eval_share
        self.gap = eval_every_seconds  # seconds of train_time between rows due by seconds

    def evaluated(self, seconds: float) -> None:
        """A row's evaluation took ``seconds`` of wall time: the next rows due by seconds come
        no sooner than ``eval_share`` allows."""
        if self.eval_share is not None and self.eval_every_seconds is not None:
            least = seconds * (1 - self.eval_share) / self.eval_share
            self.gap = max(self.eval_every_seconds, least)

    # spent, progress and row_due run before every step: the limits that are set are listed once
    def spent(self, clock: Clock) -> bool:
        return any(getattr(clock, field) >= limit for field, limit in self._set)

    def progress(self, clock: Clock) -> float:
        """Fraction of the budget used: the largest of the time, step, epoch and pass fractions."""
        fractions = [getattr(clock, field) / limit for field, limit in self._set]
        return min(max(fractions, default=0.0), 1.0)

    def row_due(self, clock: Clock, last_row: dict) -> bool:
        return (
            self.eval_every_steps is not None
            and clock.step - last_row["step"] >= self.eval_every_steps
        ) or (
            self.gap is not None
            and clock.train_time - last_row["train_time"] >= self.gap
            # evaluation is what sets the gap: no row so close to the end, whose own row comes
            and not (self.gap > self.eval_every_seconds and self._time_left(clock) < self.gap)
        )

    def _time_left(self, clock: Clock) -> float:
        limit = self.limits["train_time"]
        return math.inf if limit is None else limit - clock.train_time


LR_SCHEDULES = ("constant", "step", "cosine")


def lr_factor(
    schedule: str, progress: float, milestones: Sequence[float] = (0.5, 0.8), gamma: float = 0.2
) -> float:
    """Multiplier of the base learning rate at ``progress`` in [0, 1] of the budget."""
    if schedule == "step":
        return gamma ** sum(progress >= m for m in milestones)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class LRSchedule:
    """``constant``, ``step`` (times ``lr_gamma`` at each of ``lr_milestones``) or ``cosine``, over the
    run's progress (the largest fraction used of its budgets, so milestones are fractions)."""

    def __init__(
        self,
        lr_schedule: str = "constant",
        lr_milestones: Sequence[float] = (0.5, 0.8),
        lr_gamma: float = 0.2,
    ):
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"trainer.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}"
            )
        if not all(0 < m < 1 for m in lr_milestones) or not 0 < lr_gamma <= 1:
            raise ValueError(
                "trainer.lr_milestones must be fractions in (0, 1) of the budget and "
                f"trainer.lr_gamma in (0, 1], got {list(lr_milestones)} and {lr_gamma}"
            )
        self.schedule, self.milestones, self.gamma = lr_schedule, tuple(lr_milestones), lr_gamma

    def apply(
        self, optimizer: torch.optim.Optimizer, base_lrs: list[float], progress: float
    ) -> None:
        if self.schedule == "constant":
            return
        factor = lr_factor(self.schedule, progress, self.milestones, self.gamma)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
