"""The training loop: steps, timing, evaluation, metrics files.

One step = sampler picks indices and weights -> forward -> weighted loss -> backward -> SGD step.
``train_time`` counts only the steps (scoring included), never evaluation, so samplers are
compared on the time they spend training. Outputs, in ``out_dir``:

- ``metrics.csv``   one row per evaluation (columns: ``METRICS_COLUMNS``), flushed as written;
- ``summary.json``  the last row plus totals, written when the run ends (also after an error);
- ``checkpoint.pt``  everything needed to resume exactly (with ``checkpoint_every``), written
                     atomically at metrics rows whose losses are finite and at the end (never on failure).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import TensorDataset
from .sampling import NonFiniteScoresError, Sampler
from .scores import LossFn, cross_entropy

METRICS_COLUMNS = (
    "step",  # optimizer steps so far
    "samples",  # training points back-propagated so far (b per step)
    "epoch",  # samples / training-set size
    "train_time",  # seconds in training steps, scoring included, evaluation excluded
    "wall_time",  # seconds since fit() started, evaluation included
    "train_loss",  # unweighted mean loss over the train-eval set (see Trainer.train_eval_size)
    "train_error",  # its classification error
    "test_loss",
    "test_error",
    "tau",  # the sampler's moving average of the equivalent batch-size increment
    "is_fraction",  # share of steps since the previous row that used importance sampling
    "scored",  # points scored by the sampler so far (presample forwards)
    "fallbacks",  # importance steps whose scores were all equal or zero (so a uniform step)
)  # then the sampler's own columns, if any (Sampler.metrics(): e.g. the measured tau_threshold)


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


class Callback:
    """Hook into a run without touching the loop: logging, measurements, checkpoints.
    Both methods are called outside the timed steps (their cost is not train_time)."""

    def on_row(self, trainer: Trainer, row: dict) -> None:
        """After each metrics row is written."""

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        """When the run ends, whatever the status (also after an error)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or scores); metrics so far are on disk."""


def _check(name: str, value: float | None, minimum: float = 0.0, allow_none: bool = True) -> None:
    """Raise a one-line ValueError naming ``trainer.<name>`` unless value > minimum (or None)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > minimum:
        raise ValueError(f"trainer.{name} must be a number > {minimum:g}, got {value!r}")


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers, no pickled code."""
    return torch.load(path, map_location=device, weights_only=True)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU; a CUDA device that is not there is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and (
        not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"{device} was asked for, but this machine has "
            f"{torch.cuda.device_count()} CUDA devices (use device=auto or cpu)"
        )
    return resolved


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy,
    batch_size: int = 4096,
    autocast: Callable = nullcontext,
) -> tuple[float, float]:
    """Mean per-sample loss and classification error of ``model`` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch_size):
        with autocast():
            logits = model(x[i : i + batch_size])
        loss_sum += loss_fn(logits, y[i : i + batch_size]).float().sum()
        wrong += (logits.argmax(1) != y[i : i + batch_size]).sum()
    model.train(was_training)
    return loss_sum.item() / len(x), wrong.item() / len(x)


class Trainer:
    """Trains ``model`` on ``data`` with ``sampler`` until a budget is spent.

    Args:
        time_budget: stop after this many seconds of train_time (None: no time limit).
        max_steps / max_epochs: stop after this many steps / passes over the data (None: no limit).
        eval_every_seconds / eval_every_steps: write a metrics row at this cadence of train_time
            or steps (whichever comes first; at least one must be set).
        train_eval_size: train_loss is measured on a fixed random subset of this many training
            points (None: the whole training set), drawn once with ``seed``.
        eval_batch_size: points per forward pass during evaluation.
        amp: bf16 autocast ("auto": on when the device is CUDA, off on the CPU).
        progress: show a tqdm progress bar.
        checkpoint_every: write ``checkpoint.pt`` at the first metrics row after this many
            ``checkpoint_unit`` ("seconds" of train_time or "steps"), and at the end (None: never).
            A row whose train or test loss is not finite stops the run instead: the checkpoint on
            disk is always a model that was healthy.
        resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        lr_schedule: ``constant``, ``step`` (times ``lr_gamma`` at each of ``lr_milestones``) or
            ``cosine``, over the run's progress: the largest fraction used of the time, step or
            epoch budget (so milestones are fractions, e.g. 0.5 and 0.8).
        channels_last: NHWC memory format for 4-d inputs ("auto": on CUDA only).
        compile: torch.compile the model.
        check_finite: ``step`` checks the loss at every step (the error names the exact step; one
            host synchronisation per step), ``row`` at each metrics row; ``auto``: step on the
            CPU, row on CUDA.
        callbacks: ``Callback`` objects told of every metrics row and of the end of the run.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: Sampler,
        data: TensorDataset,
        out_dir: str | Path,
        loss_fn: LossFn = cross_entropy,
        device: torch.device | str = "cpu",
        seed: int = 0,
        time_budget: float | None = 60.0,
        max_steps: int | None = None,
        max_epochs: float | None = None,
        eval_every_seconds: float | None = 2.0,
        eval_every_steps: int | None = None,
        train_eval_size: int | None = 10_000,
        eval_batch_size: int = 4096,
        amp: bool | str = "auto",
        progress: bool = True,
        checkpoint_every: float | None = None,
        checkpoint_unit: str = "seconds",
        resume: bool = False,
        lr_schedule: str = "constant",
        lr_milestones: Sequence[float] = (0.5, 0.8),
        lr_gamma: float = 0.2,
        channels_last: bool | str = "auto",
        compile: bool = False,
        check_finite: str = "auto",
        callbacks: Sequence[Callback] = (),
    ):
        for name, value in [
            ("time_budget", time_budget),
            ("max_steps", max_steps),
            ("max_epochs", max_epochs),
            ("eval_every_seconds", eval_every_seconds),
            ("eval_every_steps", eval_every_steps),
            ("train_eval_size", train_eval_size),
            ("eval_batch_size", eval_batch_size),
            ("checkpoint_every", checkpoint_every),
        ]:
            _check(name, value, allow_none=name != "eval_batch_size")
        if time_budget is None and max_steps is None and max_epochs is None:
            raise ValueError(
                "set at least one of trainer.time_budget, trainer.max_steps, trainer.max_epochs"
            )
        if eval_every_seconds is None and eval_every_steps is None:
            raise ValueError("set trainer.eval_every_seconds or trainer.eval_every_steps")
        if checkpoint_unit not in ("seconds", "steps"):
            raise ValueError(
                f"trainer.checkpoint_unit must be seconds or steps, got {checkpoint_unit!r}"
            )
        if amp not in ("auto", True, False):
            raise ValueError(f"trainer.amp must be auto, true or false, got {amp!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"trainer.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}"
            )
        if not all(0 < m < 1 for m in lr_milestones) or not 0 < lr_gamma <= 1:
            raise ValueError(
                "trainer.lr_milestones must be fractions in (0, 1) of the budget and "
                f"trainer.lr_gamma in (0, 1], got {list(lr_milestones)} and {lr_gamma}"
            )
        if check_finite not in ("auto", "step", "row"):
            raise ValueError(
                f"trainer.check_finite must be auto, step or row, got {check_finite!r}"
            )
        self.device = torch.device(device)
        self.model, self.optimizer, self.sampler, self.loss_fn = model, optimizer, sampler, loss_fn
        self.data = data.to(self.device)
        self.out_dir = Path(out_dir)
        self.time_budget, self.max_steps, self.max_epochs = time_budget, max_steps, max_epochs
        self.eval_every_seconds, self.eval_every_steps = eval_every_seconds, eval_every_steps
        self.eval_batch_size, self.progress = eval_batch_size, progress
        self.checkpoint_every, self.checkpoint_unit, self.resume = (
            checkpoint_every,
            checkpoint_unit,
            resume,
        )
        self.callbacks = list(callbacks)
        self.lr_schedule, self.lr_milestones, self.lr_gamma = (
            lr_schedule,
            tuple(lr_milestones),
            lr_gamma,
        )
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        on_cuda = self.device.type == "cuda"
        self.check_finite_every_step = check_finite == "step" or (
            check_finite == "auto" and not on_cuda
        )
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        if (channels_last == "auto" and on_cuda) or channels_last is True:
            self.model.to(memory_format=torch.channels_last)
            if self.data.train_x.dim() == 4:
                self.data.train_x = self.data.train_x.contiguous(memory_format=torch.channels_last)
                self.data.test_x = self.data.test_x.contiguous(memory_format=torch.channels_last)
        # the compiled module shares its parameters with model; state_dicts use the original
        self.forward = torch.compile(model) if compile else model
        use_amp = self.device.type == "cuda" if amp == "auto" else bool(amp)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if use_amp
            else nullcontext
        )
        self.generator = torch.Generator(self.device).manual_seed(seed)
        n = len(self.data.train_x)
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[
            : train_eval_size or n
        ]
        self.train_eval_idx = subset.sort().values.to(self.device)
        self.sampler.setup(n, self.generator, self.device)
        # Counters; with the model, optimizer, sampler and generators they are the state of a run.
        self.step = self.samples = self.importance_steps = 0
        self.train_time = self.wall_offset = 0.0
        self.steps_since_row = self.is_steps_since_row = 0
        self.last_checkpoint = 0.0  # train_time or step of the last checkpoint
        self.rows: list[dict] = []

    # ---------------------------------------------------------------- the step
    def fetch(self, indices: Tensor) -> Tensor:
        """Training inputs at ``indices``, augmented on the device when the dataset asks for it."""
        x = self.data.train_x[indices]
        return x if self.data.augment is None else self.data.augment(x, self.generator)

    def train_step(self) -> tuple[Tensor, bool]:
        """One SGD step; returns (the weighted loss, whether importance sampling chose the batch)."""
        with self.autocast():
            batch = self.sampler.sample(self.forward, self.fetch, self.data.train_y, self.loss_fn)
            x = self.fetch(batch.indices) if batch.inputs is None else batch.inputs
            y = self.data.train_y[batch.indices]
            logits = self.forward(x)
            losses = self.loss_fn(logits, y)
            loss = losses.mean() if batch.weights is None else (batch.weights * losses).mean()
        if self.check_finite_every_step:
            if not torch.isfinite(loss):  # stop at the exact step, before the update
                raise TrainingError(
                    f"the training loss is {loss.item()} at step {self.step + 1}: "
                    "the run diverged (lower the learning rate?)"
                )
        else:  # no host synchronisation: checked at the next metrics row
            self._finite &= torch.isfinite(loss)
        with self.autocast():
            self.sampler.observe(batch, self.forward, x, y, logits.detach(), self.loss_fn)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.samples += len(batch.indices)
        self.importance_steps += batch.importance
        self.steps_since_row += 1
        self.is_steps_since_row += batch.importance
        return loss.detach(), batch.importance

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train until a budget is spent; returns the summary (also written to summary.json)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start_wall = time.perf_counter()
        status, error = "completed", None
        if self.resume and (self.out_dir / "checkpoint.pt").is_file():
            self.load_state_dict(load_checkpoint(self.out_dir / "checkpoint.pt", self.device))
            self._rewrite_metrics()
        elif not self.rows:
            self._log_row()
        bar = tqdm(
            total=self._bar_total(),
            disable=not self.progress,
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
            desc=f"{self.sampler.name}",
        )
        self._update_bar(bar, self.rows[-1])
        try:
            self.model.train()
            interval_start = time.perf_counter()
            while True:
                elapsed = self.train_time + time.perf_counter() - interval_start
                done = self._budget_spent(elapsed)
                self._set_lr(self._progress(elapsed))
                if done or self._row_due(elapsed):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()  # count queued GPU work in this interval
                    self.train_time += time.perf_counter() - interval_start
                    if not self.check_finite_every_step and not self._finite.item():
                        raise TrainingError(
                            f"the training loss was not finite between step "
                            f"{self.rows[-1]['step']} and step {self.step}: the run "
                            "diverged (lower the learning rate?)"
                        )
                    if self.steps_since_row or not done:
                        row = self._log_row()
                        self._update_bar(bar, row)
                        bad = [k for k in ("train_loss", "test_loss") if not math.isfinite(row[k])]
                        if bad:  # the model is broken: stop, and never checkpoint it
                            raise TrainingError(
                                f"the {bad[0]} is {row[bad[0]]} at step {self.step}: "
                                "the run diverged (lower the learning rate?)"
                            )
                        if self._checkpoint_due() or (done and self.checkpoint_every):
                            self.save()
                    if done:
                        break
                    interval_start = time.perf_counter()
                self.train_step()
        except (TrainingError, NonFiniteScoresError) as e:
            status, error = (
                "failed",
                str(e)
                if isinstance(e, TrainingError)
                else f"importance scores are not finite at step {self.step + 1} ({e})",
            )
            # The model that gave a non-finite loss is broken (the update before it blew up), so
            # it is not saved: a checkpoint.pt on disk is from the last row whose losses were finite.
            kept = "metrics so far are in"
            if (self.out_dir / "checkpoint.pt").is_file():
                kept = "metrics so far and the last healthy checkpoint (checkpoint.pt) are in"
            raise TrainingError(f"{error}; {kept} {self.out_dir}") from None
        except KeyboardInterrupt:
            status, error = "interrupted", "KeyboardInterrupt"
            raise
        finally:
            bar.close()
            summary = self._write_summary(status, error)
        return summary

    def _budget_spent(self, elapsed: float) -> bool:
        return (
            (self.time_budget is not None and elapsed >= self.time_budget)
            or (self.max_steps is not None and self.step >= self.max_steps)
            or (
                self.max_epochs is not None
                and self.samples >= self.max_epochs * len(self.data.train_x)
            )
        )

    def _progress(self, elapsed: float) -> float:
        """Fraction of the budget used: the largest of the time, step and epoch fractions."""
        fractions = [0.0]
        if self.time_budget is not None:
            fractions.append(elapsed / self.time_budget)
        if self.max_steps is not None:
            fractions.append(self.step / self.max_steps)
        if self.max_epochs is not None:
            fractions.append(self.samples / (self.max_epochs * len(self.data.train_x)))
        return min(max(fractions), 1.0)

    def _set_lr(self, progress: float) -> None:
        self.sampler.progress = progress  # e.g. InfoBatch anneals on the budget, not on epochs
        if self.lr_schedule == "constant":
            return
        factor = lr_factor(self.lr_schedule, progress, self.lr_milestones, self.lr_gamma)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def _row_due(self, elapsed: float) -> bool:
        last = self.rows[-1]
        return (
            self.eval_every_steps is not None and self.step - last["step"] >= self.eval_every_steps
        ) or (
            self.eval_every_seconds is not None
            and elapsed - last["train_time"] >= self.eval_every_seconds
        )

    def _checkpoint_due(self) -> bool:
        if not self.checkpoint_every:
            return False
        now = self.train_time if self.checkpoint_unit == "seconds" else self.step
        return now - self.last_checkpoint >= self.checkpoint_every

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "counters": {
                k: getattr(self, k)
                for k in (
                    "step",
                    "samples",
                    "importance_steps",
                    "train_time",
                    "steps_since_row",
                    "is_steps_since_row",
                    "last_checkpoint",
                )
            },
            "wall_time": self.wall_offset + time.perf_counter() - self._start_wall,
            "rows": self.rows,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        for k, v in state["counters"].items():
            setattr(self, k, v)
        self.wall_offset = state["wall_time"]
        self.rows = list(state["rows"])

    def save(self) -> None:
        """Write checkpoint.pt atomically."""
        self.last_checkpoint = self.train_time if self.checkpoint_unit == "seconds" else self.step
        save_checkpoint(self.state_dict(), self.out_dir / "checkpoint.pt")

    # ---------------------------------------------------------------- outputs
    def _bar_total(self) -> float:
        if self.time_budget is not None:
            return self.time_budget
        if self.max_steps is not None:
            return self.max_steps
        return self.max_epochs * len(self.data.train_x) / self.sampler.batch_size

    def _update_bar(self, bar: tqdm, row: dict) -> None:
        bar.n = min(row["train_time"] if self.time_budget is not None else row["step"], bar.total)
        on = "on" if row["is_fraction"] > 0.5 else "off"
        bar.set_postfix_str(
            f"loss={row['train_loss']:.4f} err={row['test_error']:.3f} "
            f"tau={row['tau']:.2f} IS={on}",
            refresh=True,
        )

    def _log_row(self) -> dict:
        idx = self.train_eval_idx
        train_loss, train_error = evaluate(
            self.model,
            self.data.train_x[idx],
            self.data.train_y[idx],
            self.loss_fn,
            self.eval_batch_size,
            self.autocast,
        )
        test_loss, test_error = evaluate(
            self.model,
            self.data.test_x,
            self.data.test_y,
            self.loss_fn,
            self.eval_batch_size,
            self.autocast,
        )
        row = {
            "step": self.step,
            "samples": self.samples,
            "epoch": self.samples / len(self.data.train_x),
            "train_time": self.train_time,
            "wall_time": self.wall_offset + time.perf_counter() - self._start_wall,
            "train_loss": train_loss,
            "train_error": train_error,
            "test_loss": test_loss,
            "test_error": test_error,
            "tau": self.sampler.tau,
            "is_fraction": self.is_steps_since_row / max(self.steps_since_row, 1),
            "scored": self.sampler.scored,
            "fallbacks": self.sampler.fallbacks,
            **self.sampler.metrics(),
        }
        self.steps_since_row = self.is_steps_since_row = 0
        self._append_metrics([row], header=not self.rows)
        self.rows.append(row)
        for callback in self.callbacks:
            callback.on_row(self, row)
        return row

    def _append_metrics(self, rows: list[dict], header: bool) -> None:
        # open-write-close per row: a crash loses at most the row being evaluated
        with open(self.out_dir / "metrics.csv", "w" if header else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else METRICS_COLUMNS)
            if header:
                writer.writeheader()
            writer.writerows(rows)

    def _rewrite_metrics(self) -> None:
        """On resume, metrics.csv holds exactly the checkpoint's rows (later ones are redone)."""
        self._append_metrics(self.rows, header=True)

    def _write_summary(self, status: str, error: str | None) -> dict:
        last = self.rows[-1] if self.rows else {}
        summary = {
            **last,
            "status": status,
            "error": error,
            "sampler": self.sampler.name,
            "dataset": self.data.name,
            "device": str(self.device),
            "importance_steps": self.importance_steps,
            "best_test_error": min((r["test_error"] for r in self.rows), default=None),
            "wall_time": self.wall_offset + time.perf_counter() - self._start_wall,
        }
        # strict JSON: NaN (e.g. the tau of the uniform sampler) is written as null
        summary = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in summary.items()
        }
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.out_dir / "summary.json")
        for callback in self.callbacks:
            callback.on_end(self, summary)
        return summary
