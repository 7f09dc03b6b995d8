"""Hook into a run without touching the loop: the metrics file, the progress bar, the W&B
logger and the variance measurement are callbacks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Hook into a run without touching the loop: logging, measurements, outputs.
    Called on rank 0 only, outside the timed steps (their cost is not train_time)."""

    def on_row(self, trainer: Trainer, row: dict) -> None:
        """After each metrics row is made (``trainer.rows[-1]`` is ``row``)."""

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        """When the run ends, whatever the status (also after an error)."""
