"""What a run leaves in its directory, and the hooks that write it (rank 0 only).

- ``metrics.csv``   one row per evaluation (columns: ``METRICS_COLUMNS``), flushed as written;
- ``summary.json``  the last row plus totals, written when the run ends (also after an error);
- ``checkpoint.pt`` everything needed to resume exactly, written atomically and loaded with
                    ``weights_only=True`` (tensors and plain containers: no pickled code), with
                    what identifies the run's configuration (``identity``), checked on resume.

Callbacks (``Callback``) are told of every metrics row and of the end of a run, outside the
timed steps: the metrics file, the progress bar, the W&B logger and the variance measurement
are callbacks.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

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
)  # then the sampler's own columns, if any (Sampler.metrics(): e.g. the measured tau_threshold)


class Callback:
    """Hook into a run without touching the loop: logging, measurements, outputs.
    Called on rank 0 only, outside the timed steps (their cost is not train_time)."""

    def on_row(self, trainer: Trainer, row: dict) -> None:
        """After each metrics row is made (``trainer.rows[-1]`` is ``row``)."""

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        """When the run ends, whatever the status (also after an error)."""


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
        self.bar = tqdm(
            total=total,
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
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


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message says why and what to do."""


PROJECT = "importance_sampling"  # identity["project"] of every checkpoint this package writes
RUN_KEYS = {"model", "optimizer", "counters", "rows", "ranks"}  # what every checkpoint has
ELSEWHERE = "delete it, or point hydra.run.dir elsewhere to start a new run"


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers, no pickled code."""
    return torch.load(path, map_location=device, weights_only=True)


def read_checkpoint(path: Path, identity: dict, device: torch.device | str = "cpu") -> dict:
    """The state in ``path``, if it is a checkpoint of this project written by a run of the same
    configuration as ``identity`` (see ``Trainer.identity``); else a one-line CheckpointError
    naming the file, what is wrong and what to do. PyTorch's own message is never shown: for a
    file it cannot read it advises ``weights_only=False``, which would run code from the file."""
    path = Path(path)
    try:
        state = load_checkpoint(path, device)
    except Exception as e:  # unpickling errors of a damaged file come in many types
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes zip archives
        what = "a truncated or damaged checkpoint" if zipped else "not a checkpoint file"
        raise CheckpointError(
            f"{path} is unreadable ({what}, {type(e).__name__}): {ELSEWHERE}"
        ) from None
    saved = state.get("identity", {}) if isinstance(state, dict) else {}
    if not isinstance(state, dict) or not RUN_KEYS <= state.keys() or not isinstance(saved, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no training run in it): {ELSEWHERE}"
        )
    if saved.get("project", PROJECT) != PROJECT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (it says {saved.get('project')!r}): "
            f"{ELSEWHERE}"
        )
    differences = compare_identity(state, identity)
    if differences:
        raise CheckpointError(
            f"{path} is from another configuration ({'; '.join(differences)}): resume with the "
            f"options it was written with, or {ELSEWHERE}"
        )
    return state


def compare_identity(state: dict, identity: dict) -> list[str]:
    """What differs between the run that wrote ``state`` and the run ``identity`` describes, one
    phrase per part: model, optimizer, sampler, dataset, world size. A checkpoint written before
    identities were stored is compared on its parameters and world size."""
    saved = dict(state.get("identity") or {})
    saved.setdefault("world_size", state.get("world_size", 1))
    saved.setdefault(
        "parameters",
        {k: list(v.shape) for k, v in state["model"].items() if isinstance(v, torch.Tensor)},
    )
    differences = []
    if saved.get("model", identity["model"]) != identity["model"]:
        differences.append(f"model: {saved['model']} there, {identity['model']} here")
    else:
        there, here = saved["parameters"], identity["parameters"]
        changed = [k for k in here if k in there and list(there[k]) != list(here[k])]
        missing = [k for k in here if k not in there] + [k for k in there if k not in here]
        if changed:
            k = changed[0]
            differences.append(
                f"model: {identity['model']} with {k} of shape {list(there[k])} there, "
                f"{list(here[k])} here"
            )
        elif missing:
            differences.append(
                f"model: {identity['model']} with other parameters ({missing[0]} is in one only)"
            )
    for part in ("optimizer", "sampler"):
        if saved.get(part, identity[part]) != identity[part]:
            differences.append(f"{part}: {saved[part]} there, {identity[part]} here")
    dataset = [saved.get(k, identity[k]) for k in ("dataset", "train_size")]
    if dataset != [identity["dataset"], identity["train_size"]]:
        differences.append(
            f"dataset: {dataset[0]} of {dataset[1]} training points there, "
            f"{identity['dataset']} of {identity['train_size']} here"
        )
    if saved["world_size"] != identity["world_size"]:
        differences.append(
            f"world size: {saved['world_size']} processes there, {identity['world_size']} here"
        )
    return differences


def to_cpu(obj):
    """``obj`` with every tensor in it moved to the CPU (to gather states across ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
