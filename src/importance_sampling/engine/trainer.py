"""The training loop: steps, timing, evaluation, checkpoints.

One step = load a presample -> the sampler selects the points to train on and their weights ->
forward -> weighted loss -> backward -> the sampler updates (tau, histories) -> optimizer step.
``train_time`` counts only the steps (loading and scoring included), never evaluation, so
samplers are compared on the time they spend training.

The other concerns live beside it: budget.py (when to stop, when to write a row, the learning
rate schedule), runtime.py (device, autocast, compile, DDP), sources.py (where presamples come
from), outputs.py (metrics.csv, summary.json, progress), checkpoints.py (checkpoint.pt, resume).
With several data-parallel
ranks every rank runs this loop; the clock is rank 0's, so the ranks stop and evaluate at the
same step, and rank 0 alone writes files.

SIGTERM and SIGUSR1 (a cluster's time limit, scancel, preemption) stop the loop after the step in
flight, with checkpoint.pt and summary.json written (stopping.py); with several ranks the stop
travels with rank 0's clock, so every rank stops after the same step.
"""

from __future__ import annotations

import logging
import math
import signal
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.order import mix_seed
from ..core.samplers import Sampler
from ..core.scores import LossFn, cross_entropy
from . import checkpoints
from .budget import Budget, Clock, LRSchedule
from .callbacks import Callback
from .data import StreamingDataset, TensorDataset
from .machine import MachineShare, starved
from .outputs import MetricsFile, ProgressBar, SummaryFile, json_safe
from .reference import ReferenceWorkload
from .runtime import Runtime
from .sources import LoaderOptions, make_source
from .stopping import StopRequest, TrainingStopped

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or scores); metrics so far are on disk."""


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFn = cross_entropy,
    runtime: Runtime | None = None,
) -> tuple[float, float]:
    """Mean per-sample loss and classification error of ``model`` (in eval mode) over
    ``batches`` of (x, y), summed over every rank's share."""
    runtime = runtime or Runtime("cpu")
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # loss, errors, points
    for x, y in batches:
        with runtime.autocast():
            logits = model(x)
        sums[0] += loss_fn(logits, y).double().sum()
        sums[1] += (logits.argmax(1) != y).sum()
        sums[2] += len(y)
    model.train(was_training)
    loss, wrong, n = runtime.dist.all_reduce_(sums).tolist()
    return loss / max(n, 1), wrong / max(n, 1)


class Trainer:
    """Trains ``model`` on ``data`` with ``sampler`` until the budget is spent.

    Args:
        data: a TensorDataset (kept on the device) or a StreamingDataset (read by a DataLoader
            with ``loader`` options).
        budget: when to stop and when to write a metrics row (default: Budget()'s).
        runtime: device, autocast, channels_last, compile, DDP, finiteness checks.
        schedule: the learning-rate schedule over the budget.
        train_eval_size: train_loss is measured on a fixed random subset of this many training
            points (None: all of them), drawn once with ``seed``.
        eval_batch_size: points per forward pass during evaluation (None: the device's
            default, runtime.EVAL_BATCH_SIZE: 4096 on CUDA, 128 on the CPU).
        checkpoint_every: write ``checkpoint.pt`` at the first metrics row after this many
            ``checkpoint_unit`` ("seconds" of train_time or "steps"), and at the end (None: never).
            A row whose train or test loss is not finite stops the run instead: the checkpoint on
            disk is always a model that was healthy.
        resume: ``False``; ``True``: continue from ``out_dir/checkpoint.pt`` when it exists,
            else start a new run; ``"must"``: the checkpoint must exist.
        progress: show a progress bar.
        reference_steps: at every metrics row, outside train_time, time this many steps of a
            fixed reference workload (reference.py): how fast the machine was (0: not measured).
        callbacks: told of every metrics row and of the end of the run (rank 0 only).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: Sampler,
        data: TensorDataset | StreamingDataset,
        out_dir: str | Path,
        loss_fn: LossFn = cross_entropy,
        seed: int = 0,
        budget: Budget | None = None,
        runtime: Runtime | None = None,
        schedule: LRSchedule | None = None,
        train_eval_size: int | None = 10_000,
        eval_batch_size: int | None = None,
        loader: LoaderOptions | None = None,
        checkpoint_every: float | None = None,
        checkpoint_unit: str = "seconds",
        resume: bool | str = False,
        progress: bool = True,
        reference_steps: int = 5,
        callbacks: Sequence[Callback] = (),
    ):
        for name, value in [
            ("train_eval_size", train_eval_size),
            ("checkpoint_every", checkpoint_every),
            ("eval_batch_size", eval_batch_size),
        ]:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"trainer.{name} must be a number > 0, got {value!r}")
        if checkpoint_unit not in ("seconds", "steps"):
            raise ValueError(
                f"trainer.checkpoint_unit must be seconds or steps, got {checkpoint_unit!r}"
            )
        if resume not in (True, False, "must"):
            raise ValueError(f"trainer.resume must be true, false or must, got {resume!r}")
        self.budget, self.schedule = budget or Budget(), schedule or LRSchedule()
        self.runtime = runtime or Runtime()
        self.dist, self.device = self.runtime.dist, self.runtime.device
        self.model, self.optimizer, self.sampler, self.loss_fn = model, optimizer, sampler, loss_fn
        self.out_dir, self.seed = Path(out_dir), seed
        self.checkpoint_every, self.checkpoint_unit = checkpoint_every, checkpoint_unit
        self.resume = resume
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        # the step calls train_model (DDP-wrapped with several ranks); scoring and evaluation
        # call forward (never the DDP wrapper); both share the parameters of model
        self.train_model, self.forward = self.runtime.prepare(model)
        if self.dist.enabled:  # dropout differs between ranks; the initial weights come from rank 0
            torch.manual_seed(mix_seed(seed, self.dist.rank))
        self.data, self.num_samples = data, len(data)
        self.sampler.setup(self.num_samples, seed, self.device, self.dist)
        self.source = make_source(
            data, sampler, self.runtime, seed, train_eval_size, eval_batch_size, loader
        )
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)  # losses so far
        self.callbacks: list[Callback] = []
        if self.dist.is_main:
            self.metrics_file = MetricsFile(self.out_dir / "metrics.csv")
            self.callbacks = [self.metrics_file, SummaryFile(self.out_dir / "summary.json")]
            if progress:
                self.callbacks.append(self._progress_bar())
            self.callbacks += list(callbacks)
        # Counters (checkpoints.COUNTERS); with the model, optimizer, sampler and source they
        # are the state of a run.
        self.step = self.samples = self.importance_steps = 0
        self.train_time = self.wall_offset = 0.0
        self.steps_since_row = self.is_steps_since_row = 0
        self.last_checkpoint = 0.0  # train_time or step of the last checkpoint
        self.rows: list[dict] = []
        self.started = time.perf_counter()  # wall clock of this process's fit
        self.stop = StopRequest()  # SIGTERM / SIGUSR1 while fit runs
        self.stopped_by = 0  # the signal that stopped the last fit (0: none)
        self.machine = MachineShare()  # how much of the CPUs the timed steps got (machine.py)
        self.machine_share = math.nan  # over the whole run, the slowest rank's (at the last row)
        self.steal = math.nan  # the hypervisor's share of the CPUs over the whole run (machine.py)
        self.reference = ReferenceWorkload(reference_steps, sampler.batch_size)

    def _progress_bar(self) -> ProgressBar:
        """Over seconds of train_time, else over steps (the step budget, or the steps that the
        epoch or pass budget amounts to)."""
        limits = self.budget.limits
        if limits["train_time"] is not None:
            return ProgressBar(limits["train_time"], True, self.sampler.name)
        per_epoch = self.num_samples / self.sampler.batch_size
        totals = [
            limits["step"],
            limits["epoch"] and limits["epoch"] * per_epoch,
            limits["passes"] and limits["passes"] * per_epoch,
        ]
        return ProgressBar(min(t for t in totals if t), False, self.sampler.name)

    @property
    def clock(self) -> Clock:
        return Clock(
            self.train_time, self.step, self.samples / self.num_samples, self.sampler.passes
        )

    def wall_time(self) -> float:
        """Seconds since the run started, evaluation included (over resumes)."""
        return self.wall_offset + time.perf_counter() - self.started

    # ---------------------------------------------------------------- the step
    def train_step(self) -> None:
        """One SGD step on the points the sampler selects from the next presample."""
        presample = next(self.source)
        autocast, sampler = self.runtime.autocast, self.sampler
        with autocast():
            chosen = sampler.select(self.forward, presample, self.loss_fn, self.source.__next__)
        with autocast(), sampler.watch(self.train_model, chosen):
            logits = self.train_model(chosen.x)
            loss = chosen.weighted_mean(self.loss_fn(logits, chosen.y))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with autocast():
            sampler.update(chosen, logits.detach(), self.loss_fn, self.forward)
        if self.runtime.check_every_step:  # stop at the exact step, before the update
            self._check_finite(math.isfinite(loss.item()), loss)  # a float: no tensor to build
        else:  # no host synchronisation: checked at the next metrics row
            self._finite &= torch.isfinite(loss.detach())
        self.optimizer.step()
        self.step += 1
        self.samples += len(chosen) * self.dist.world_size
        self.importance_steps += chosen.importance
        self.steps_since_row += 1
        self.is_steps_since_row += chosen.importance

    def _check_finite(self, loss_finite: Tensor | bool, loss: Tensor | None = None) -> None:
        """Raise if the loss or the sampler's scores so far were not finite, on any rank (every
        rank then raises at the same step)."""
        if not self.dist.enabled and bool(loss_finite) and bool(self.sampler.finite):
            return  # one process: the flags are read where they are
        loss_finite = torch.as_tensor(loss_finite, device=self.device)
        bad = torch.stack([~loss_finite, ~self.sampler.finite]).float()
        loss_bad, scores_bad = self.dist.all_reduce_(bad).tolist()
        if self.runtime.check_every_step:
            where = f"at step {self.step + 1}"
        else:
            where = f"between step {self.rows[-1]['step']} and step {self.step}"
        if loss_bad:
            value = f"is {loss.item()}" if loss is not None else "was not finite"
            raise TrainingError(
                f"the training loss {value} {where}: the run diverged (lower the learning rate?)"
            )
        if scores_bad:
            raise TrainingError(
                f"importance scores are not finite {where}: the run diverged (lower the "
                "learning rate?)"
            )

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train until the budget is spent; returns the summary (also written to summary.json).

        Raises TrainingStopped when SIGTERM or SIGUSR1 stopped the run (its state saved first)."""
        with self.stop:  # while training, SIGTERM / SIGUSR1 only set self.stop.signum
            summary = self._fit()
        if summary["status"] == "preempted":
            if self.stop.ignored and self.dist.is_main:
                log.warning("%d more stop signals came while saving: ignored", self.stop.ignored)
            raise TrainingStopped(self.stopped_by, self.step, self.out_dir)
        return summary

    def _loop(self) -> int:
        """Steps and metrics rows until the budget is spent (returns 0) or a stop signal came
        (returns its number, on every rank after the same step)."""
        self.train_model.train()
        interval_start = time.perf_counter()
        self.machine.start()
        while True:
            clock = self.clock
            clock.train_time, stop = self._shared(
                self.train_time + time.perf_counter() - interval_start
            )
            progress = self.budget.progress(clock)
            self.schedule.apply(self.optimizer, self.base_lrs, progress)
            self.sampler.before_step(progress)
            done = self.budget.spent(clock)
            if not (done or stop or self.budget.row_due(clock, self.rows[-1])):
                self.train_step()
                continue
            self.runtime.synchronize()  # count queued GPU work in this interval
            self.machine.stop()
            self.train_time, _ = self._shared(
                self.train_time + time.perf_counter() - interval_start
            )
            if not self.runtime.check_every_step:
                self._check_finite(self._finite)
            if stop and not done:  # no row: a resumed run writes the rows it would have
                return stop
            if self.steps_since_row or not done:
                self._row()
            if done:
                return 0
            interval_start = time.perf_counter()  # a signal during the row stops at the top
            self.machine.start()

    def _fit(self) -> dict:
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        resumed = checkpoints.resume(self)  # before anything is written: a bad file changes nothing
        if resumed and self.dist.is_main:
            self.metrics_file.rewrite(self.rows)
        status, error = "failed", None
        try:
            if not resumed:
                self._row()  # the model before training
            stop = self._loop()
            if stop:  # the state after the last step, whatever the cadence
                checkpoints.write(self)
                status, self.stopped_by = "preempted", stop  # any rank's signal, the same on all
                error = f"stopped by {signal.Signals(stop).name} after step {self.step}"
            else:
                status = "completed"
        except TrainingError as e:
            error = str(e)
            # The model that gave a non-finite loss is broken (the update before it blew up), so
            # it is not saved: a checkpoint.pt on disk is from the last row whose losses were finite.
            kept = "metrics so far are in"
            if (self.out_dir / "checkpoint.pt").is_file():
                kept = "metrics so far and the last healthy checkpoint (checkpoint.pt) are in"
            raise TrainingError(f"{error}; {kept} {self.out_dir}") from None
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C; submitit's requeue (SIGUSR2)
            status, error = "interrupted", type(e).__name__
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            summary = self._finish(status, error)
        return summary

    def _shared(self, seconds: float) -> tuple[float, int]:
        """Rank 0's clock reading and the stop signal that any rank received (0: none), on
        every rank, so that every rank takes the same decisions at the same step: one
        all-reduce (max) of [rank 0's seconds (-inf elsewhere), signal number]."""
        if not self.dist.enabled:
            return seconds, self.stop.signum
        mine = seconds if self.dist.is_main else -math.inf
        clock, signum = self.dist.max_floats([mine, float(self.stop.signum)])
        return clock, int(signum)

    def _machine_shares(self) -> tuple[float, float]:
        """The share of the machine the steps since the last row got and the CPU time stolen
        by the hypervisor meanwhile; the same over the whole run in self.machine_share and
        self.steal. With several ranks, the lowest share and the highest steal of any rank
        (the slowest rank sets the pace)."""
        (interval, steal), total = self.machine.take_interval(), self.machine.share
        self.steal = self.machine.steal
        if self.dist.enabled:  # NaN (not measured) stays NaN: -max(-x) over the ranks
            interval, total, steal, self.steal = self.dist.max_floats(
                [-interval, -total, steal, self.steal]
            )
            interval, total = -interval, -total
        self.machine_share = total
        return interval, steal

    def _reference_ms(self) -> float:
        """Milliseconds of one reference step now (reference.py), the slowest rank's."""
        ms = self.reference.ms_per_step(
            self.model, lambda: self.source.eval_batches("test"), self.loss_fn, self.runtime
        )
        return self.dist.max_floats([ms])[0] if self.dist.enabled else ms

    def _row(self) -> dict:
        started = time.perf_counter()
        share, steal = self._machine_shares()
        reference_ms = self._reference_ms()
        train_loss, train_error = evaluate(
            self.forward, self.source.eval_batches("train"), self.loss_fn, self.runtime
        )
        test_loss, test_error = evaluate(
            self.forward, self.source.eval_batches("test"), self.loss_fn, self.runtime
        )
        row = {
            "step": self.step,
            "samples": self.samples,
            "epoch": self.samples / self.num_samples,
            "train_time": self.train_time,
            "wall_time": self.wall_time(),
            "train_loss": train_loss,
            "train_error": train_error,
            "test_loss": test_loss,
            "test_error": test_error,
            "tau": self.sampler.tau,
            "is_fraction": self.is_steps_since_row / max(self.steps_since_row, 1),
            "scored": self.sampler.scored,
            "fallbacks": self.sampler.fallbacks,
            "world_size": self.dist.world_size,
            "machine_share": share,
            "steal": steal,
            "reference_ms": reference_ms,
            # wall seconds of this row's evaluation (and reference steps): outside train_time
            "eval_seconds": time.perf_counter() - started,
            **self.sampler.metrics(),
        }
        self.steps_since_row = self.is_steps_since_row = 0
        self.rows.append(row)
        for callback in self.callbacks:
            callback.on_row(self, row)
        # the next rows due by seconds wait long enough for evaluation to keep its share of the
        # wall time (trainer.eval_share); the slowest rank's figure, so every rank decides alike
        seconds = time.perf_counter() - started
        self.budget.evaluated(self.dist.max_floats([seconds])[0] if self.dist.enabled else seconds)
        bad = [k for k in ("train_loss", "test_loss") if not math.isfinite(row[k])]
        if bad:  # the model is broken: stop, and never checkpoint it
            raise TrainingError(
                f"the {bad[0]} is {row[bad[0]]} at step {self.step}: "
                "the run diverged (lower the learning rate?)"
            )
        if self._checkpoint_due() or (self.budget.spent(self.clock) and self.checkpoint_every):
            self.save()
        return row

    def _checkpoint_due(self) -> bool:
        if not self.checkpoint_every or len(self.rows) == 1:
            return False
        now = self.train_time if self.checkpoint_unit == "seconds" else self.step
        return now - self.last_checkpoint >= self.checkpoint_every

    def save(self) -> None:
        """Write checkpoint.pt atomically (every rank takes part; rank 0 writes) and start the
        checkpoint cadence over (a stop signal's save does not: checkpoints.write)."""
        self.last_checkpoint = self.train_time if self.checkpoint_unit == "seconds" else self.step
        checkpoints.write(self)

    def _finish(self, status: str, error: str | None) -> dict:
        last = self.rows[-1] if self.rows else {}
        summary = json_safe(
            {
                **last,
                "status": status,
                "error": error,
                "sampler": self.sampler.name,
                "dataset": self.data.name,
                # test_loss / test_error are on this split: "test" or "validation"
                "eval_split": getattr(self.data, "eval_split", "test"),
                "device": str(self.device),
                "importance_steps": self.importance_steps,
                "best_test_error": min((r["test_error"] for r in self.rows), default=None),
                "wall_time": self.wall_time(),
                "machine_share": self.machine_share,
                "starved": starved(self.machine_share),
                "steal": self.steal,
                # the machine's speed over the run: the median over its rows (reference.py)
                "reference_ms": _median([r.get("reference_ms", math.nan) for r in self.rows]),
                # the share of the run's wall time spent in metrics rows (trainer.eval_share)
                "eval_fraction": sum(r.get("eval_seconds", 0.0) for r in self.rows)
                / max(self.wall_time(), 1e-9),
            }
        )
        for callback in self.callbacks:
            callback.on_end(self, summary)
        return summary


def _median(values: list[float]) -> float:
    """The median of the measured values (NaN when none was)."""
    kept = sorted(v for v in values if not math.isnan(v))
    return statistics.median(kept) if kept else math.nan
