"""The training loop: steps, timing, evaluation, metrics files.

One step = sampler picks indices and weights -> forward -> weighted loss -> backward -> SGD step.
``train_time`` counts only the steps (scoring included), never evaluation, so samplers are
compared on the time they spend training. Outputs, in ``out_dir``:

- ``metrics.csv``   one row per evaluation (columns: ``METRICS_COLUMNS``), flushed as written;
- ``summary.json``  the last row plus totals, written when the run ends (also after an error).
"""

from __future__ import annotations

import csv
import json
import math
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
    "step",          # optimizer steps so far
    "samples",       # training points back-propagated so far (b per step)
    "epoch",         # samples / training-set size
    "train_time",    # seconds in training steps, scoring included, evaluation excluded
    "wall_time",     # seconds since fit() started, evaluation included
    "train_loss",    # unweighted mean loss over the train-eval set (see Trainer.train_eval_size)
    "train_error",   # its classification error
    "test_loss",
    "test_error",
    "tau",           # the sampler's moving average of the equivalent batch-size increment
    "is_fraction",   # share of steps since the previous row that used importance sampling
    "scored",        # points scored by the sampler so far (presample forwards)
    "fallbacks",     # importance steps whose scores were all zero (uniform weights used)
)


class Callback:
    """Hook into a run without touching the loop: logging, measurements, checkpoints.
    Both methods are called outside the timed steps (their cost is not train_time)."""

    def on_row(self, trainer: Trainer, row: dict) -> None:
        """After each metrics row is written."""

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        """When the run ends, whatever the status (also after an error)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or scores); metrics so far are on disk."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = cross_entropy,
             batch_size: int = 4096, autocast: Callable = nullcontext) -> tuple[float, float]:
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
        amp: bf16 autocast on CUDA ("auto": on when the device is CUDA; never on CPU).
        progress: show a tqdm progress bar.
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
        callbacks: Sequence[Callback] = (),
    ):
        if time_budget is None and max_steps is None and max_epochs is None:
            raise ValueError("set at least one of trainer.time_budget, trainer.max_steps, trainer.max_epochs")
        if eval_every_seconds is None and eval_every_steps is None:
            raise ValueError("set trainer.eval_every_seconds or trainer.eval_every_steps")
        self.device = torch.device(device)
        self.model, self.optimizer, self.sampler, self.loss_fn = model, optimizer, sampler, loss_fn
        self.data = data.to(self.device)
        self.out_dir = Path(out_dir)
        self.time_budget, self.max_steps, self.max_epochs = time_budget, max_steps, max_epochs
        self.eval_every_seconds, self.eval_every_steps = eval_every_seconds, eval_every_steps
        self.eval_batch_size, self.progress = eval_batch_size, progress
        self.callbacks = list(callbacks)
        use_amp = self.device.type == "cuda" if amp == "auto" else bool(amp)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_amp else nullcontext
        )
        self.generator = torch.Generator(self.device).manual_seed(seed)
        n = len(self.data.train_x)
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: train_eval_size or n]
        self.train_eval_idx = subset.sort().values.to(self.device)
        self.sampler.setup(n, self.generator, self.device)
        # Counters; together with the model and optimizer they are the whole state of a run.
        self.step = self.samples = self.importance_steps = 0
        self.train_time = 0.0
        self.rows: list[dict] = []

    # ---------------------------------------------------------------- the step
    def train_step(self) -> tuple[Tensor, bool]:
        """One SGD step; returns (the weighted loss, whether importance sampling chose the batch)."""
        x_all, y_all = self.data.train_x, self.data.train_y
        with self.autocast():
            batch = self.sampler.sample(self.model, x_all, y_all, self.loss_fn)
            x, y = x_all[batch.indices], y_all[batch.indices]
            logits = self.model(x)
            losses = self.loss_fn(logits, y)
            loss = losses.mean() if batch.weights is None else (batch.weights * losses).mean()
            self.sampler.observe(batch, self.model, x, y, logits.detach(), self.loss_fn)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.samples += len(batch.indices)
        self.importance_steps += batch.importance
        return loss.detach(), batch.importance

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train until a budget is spent; returns the summary (also written to summary.json)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start_wall = time.perf_counter()
        n = len(self.data.train_x)
        status, error = "completed", None
        is_steps = steps_since_row = 0
        self._log_row(is_fraction=0.0)
        next_eval_time = self.eval_every_seconds or math.inf
        next_eval_step = self.eval_every_steps or math.inf
        bar = tqdm(total=self._bar_total(), disable=not self.progress, unit="s" if self.time_budget else "step",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
                   desc=f"{self.sampler.name}")
        try:
            self.model.train()
            interval_start = time.perf_counter()
            while True:
                elapsed = self.train_time + time.perf_counter() - interval_start
                done = (
                    (self.time_budget is not None and elapsed >= self.time_budget)
                    or (self.max_steps is not None and self.step >= self.max_steps)
                    or (self.max_epochs is not None and self.samples >= self.max_epochs * n)
                )
                if done or elapsed >= next_eval_time or self.step >= next_eval_step:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()  # count queued GPU work in this interval
                    self.train_time += time.perf_counter() - interval_start
                    if steps_since_row or not done:
                        row = self._log_row(is_fraction=is_steps / max(steps_since_row, 1))
                        is_steps = steps_since_row = 0
                        self._update_bar(bar, row)
                        if not math.isfinite(row["train_loss"]):
                            raise TrainingError(
                                f"training loss is {row['train_loss']} at step {self.step}: the run "
                                "diverged (lower the learning rate?)")
                    while next_eval_time <= self.train_time:
                        next_eval_time += self.eval_every_seconds
                    while next_eval_step <= self.step:
                        next_eval_step += self.eval_every_steps
                    if done:
                        break
                    interval_start = time.perf_counter()
                _, importance = self.train_step()
                is_steps += importance
                steps_since_row += 1
        except NonFiniteScoresError as e:
            status, error = "failed", f"step {self.step}: {e}"
            raise TrainingError(f"importance scores are not finite at step {self.step} ({e})") from e
        except TrainingError as e:
            status, error = "failed", str(e)
            raise
        except KeyboardInterrupt:
            status, error = "interrupted", "KeyboardInterrupt"
            raise
        finally:
            bar.close()
            summary = self._write_summary(status, error)
        return summary

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
        bar.set_postfix_str(f"loss={row['train_loss']:.4f} err={row['test_error']:.3f} "
                            f"tau={row['tau']:.2f} IS={on}", refresh=True)

    def _log_row(self, is_fraction: float) -> dict:
        idx = self.train_eval_idx
        train_loss, train_error = evaluate(self.model, self.data.train_x[idx], self.data.train_y[idx],
                                           self.loss_fn, self.eval_batch_size, self.autocast)
        test_loss, test_error = evaluate(self.model, self.data.test_x, self.data.test_y,
                                         self.loss_fn, self.eval_batch_size, self.autocast)
        row = {
            "step": self.step,
            "samples": self.samples,
            "epoch": self.samples / len(self.data.train_x),
            "train_time": self.train_time,
            "wall_time": time.perf_counter() - self._start_wall,
            "train_loss": train_loss,
            "train_error": train_error,
            "test_loss": test_loss,
            "test_error": test_error,
            "tau": self.sampler.tau,
            "is_fraction": is_fraction,
            "scored": self.sampler.scored,
            "fallbacks": self.sampler.fallbacks,
        }
        path = self.out_dir / "metrics.csv"
        with open(path, "a" if self.rows else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
            if not self.rows:
                writer.writeheader()
            writer.writerow(row)
        self.rows.append(row)
        for callback in self.callbacks:
            callback.on_row(self, row)
        return row

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
            "wall_time": time.perf_counter() - self._start_wall,
        }
        # strict JSON: NaN (e.g. the tau of the uniform sampler) is written as null
        summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                   for k, v in summary.items()}
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.out_dir / "summary.json")
        for callback in self.callbacks:
            callback.on_end(self, summary)
        return summary
