"""How fast the machine was while a run trained: a fixed reference workload, timed at every
metrics row, outside train_time.

The machine share (machine.py) sees other processes on this machine; it cannot see a slower
host, a CPU clocked down, or a hypervisor that gives the virtual machine less (steal, which
machine.py reads beside it). Two runs compared at equal wall-clock time are only comparable if
the machine ran at one speed for both, so every run times the same work at every row: ``steps``
uniform training steps (forward, mean loss, backward; no optimizer step, so the weights and the
work never change) of a copy of its own model as it was before training, on one fixed batch of
b points (the first of the evaluation split, the same for every seed). ``reference_ms`` is their
mean: time shared with another process counts, as it does in training (a median of steps
shorter than the scheduler's time slice would miss it); a run's figure is the median over its
rows, which a single disturbed row does not move. Runs of one preset do the
same work, so their reference times compare directly: a pair of runs whose reference times
differ by a few percent ran on machines of different speed, and ``train_time / reference_ms``
(train_time in units of the reference step) takes that drift out of a comparison.

The copy runs under ``torch.random.fork_rng``: the reference steps draw nothing from the run's
random streams (dropout), so a run trains the same with or without them.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..core.scores import LossFn
from .runtime import Runtime


class ReferenceWorkload:
    """``ms_per_step()``: the mean milliseconds of one reference step, now (NaN when ``steps``
    is 0: not measured)."""

    def __init__(self, steps: int = 5, batch_size: int = 128) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"trainer.reference_steps must be an integer >= 0, got {steps!r}")
        self.steps, self.batch_size = steps, batch_size
        self._model: nn.Module | None = None
        self._batch: tuple[Tensor, Tensor] | None = None

    def ms_per_step(
        self,
        model: nn.Module,
        batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
        loss_fn: LossFn,
        runtime: Runtime,
    ) -> float:
        """Time ``steps`` reference steps. The first call copies ``model`` (pass the run's
        unwrapped model) and takes the first batch of ``batches()``; later calls reuse both."""
        if not self.steps:
            return math.nan
        devices = [runtime.device] if runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self._model is None:
                self._model = copy.deepcopy(model).train()
                x, y = next(iter(batches()))
                self._batch = (x[: self.batch_size], y[: self.batch_size])
                self._step(loss_fn, runtime)  # warm-up: allocations, lazy initialisation
            runtime.synchronize()
            start = time.perf_counter()
            for _ in range(self.steps):
                self._step(loss_fn, runtime)
            runtime.synchronize()
        return 1000 * (time.perf_counter() - start) / self.steps

    def _step(self, loss_fn: LossFn, runtime: Runtime) -> None:
        x, y = self._batch
        self._model.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = loss_fn(self._model(x), y).float().mean()
        loss.backward()
