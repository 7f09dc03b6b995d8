"""checkpoint.pt: everything needed to resume a run exactly, what identifies the run's
configuration, and the refusal, in one line, of a file that cannot be resumed.

Written atomically and loaded with ``weights_only=True`` (tensors and plain containers: no
pickled code). A checkpoint stores its ``identity`` (the model's class and parameter shapes,
the optimizer's class, the sampler, the dataset and its size, the number of ranks), compared on
resume; the other options (budget, cadence, learning rate) may change.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------- a trainer's run as a checkpoint
COUNTERS = (  # the Trainer's counters; with the model, optimizer, sampler and source: its state
    "step",
    "samples",
    "importance_steps",
    "train_time",
    "steps_since_row",
    "is_steps_since_row",
    "last_checkpoint",
)


def identity(trainer: Trainer) -> dict:
    """What a checkpoint must match to be resumed by this run (stored in it, compared on
    resume): the model's class and parameter shapes, the optimizer's class, the sampler, the
    dataset and its size, the number of ranks."""
    return {
        "project": PROJECT,
        "model": type(trainer.model).__name__,
        "parameters": {k: list(v.shape) for k, v in trainer.model.state_dict().items()},
        "optimizer": type(trainer.optimizer).__name__,
        "sampler": trainer.sampler.name,
        "dataset": trainer.data.name,
        "train_size": trainer.num_samples,
        "world_size": trainer.dist.world_size,
    }


def rank_state(trainer: Trainer) -> dict:
    """What differs between ranks: the sampler's and the source's positions and randomness."""
    state = {
        "sampler": trainer.sampler.state_dict(),
        "source": trainer.source.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "machine": trainer.machine.state_dict(),
    }
    if trainer.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(trainer.device)
    return state


def run_state(trainer: Trainer) -> dict:
    """The whole run on rank 0 (every rank's part gathered; {} on the other ranks)."""
    ranks = trainer.dist.gather_objects(to_cpu(rank_state(trainer)))
    if not trainer.dist.is_main:
        return {}
    return {
        "identity": identity(trainer),
        "world_size": trainer.dist.world_size,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "counters": {k: getattr(trainer, k) for k in COUNTERS},
        "wall_time": trainer.wall_time(),
        "rows": trainer.rows,
        "ranks": ranks,
    }


def restore(trainer: Trainer, state: dict) -> None:
    """Put ``state`` (``run_state`` of an earlier run) back into ``trainer``."""
    saved_world = state.get("world_size", 1)
    if saved_world != trainer.dist.world_size:
        raise CheckpointError(
            f"the checkpoint was written by {saved_world} processes and this run has "
            f"{trainer.dist.world_size}: resume with the same number of processes"
        )
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    mine = state["ranks"][trainer.dist.rank]
    trainer.sampler.load_state_dict(mine["sampler"])
    trainer.source.load_state_dict(mine["source"])
    torch.set_rng_state(mine["torch_rng"].cpu())
    if "machine" in mine:  # a checkpoint of before the machine share: it starts over
        trainer.machine.load_state_dict(mine["machine"])
    if "cuda_rng" in mine and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"].cpu(), trainer.device)
    for k, v in state["counters"].items():
        setattr(trainer, k, v)
    trainer.wall_offset = state["wall_time"]
    trainer.rows = list(state["rows"])


def write(trainer: Trainer) -> None:
    """out_dir/checkpoint.pt now (every rank takes part; rank 0 writes)."""
    state = run_state(trainer)
    if trainer.dist.is_main:
        save_checkpoint(state, trainer.out_dir / "checkpoint.pt")


def resume(trainer: Trainer) -> bool:
    """Load out_dir/checkpoint.pt into ``trainer`` when it resumes (``trainer.resume``); True if
    a run was resumed. A file that cannot be resumed is a one-line CheckpointError."""
    path = trainer.out_dir / "checkpoint.pt"
    if trainer.resume and path.is_file():
        state = read_checkpoint(path, identity(trainer), trainer.device)
        try:
            restore(trainer, state)
        except CheckpointError:
            raise
        except Exception as e:  # e.g. a sampler state of other options (presample size)
            raise CheckpointError(
                f"{path} does not fit this run ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}): resume with the options it was "
                "written with, or delete it, or point hydra.run.dir elsewhere"
            ) from None
        if trainer.dist.is_main:
            log.info("resuming from step %d of %s", trainer.step, path)
        return True
    if trainer.resume == "must":
        raise CheckpointError(
            f"no checkpoint in {trainer.out_dir}: nothing to resume (trainer.resume=must); "
            "run without it to start a new run"
        )
    if trainer.resume and trainer.dist.is_main:  # a line of its own, above any progress bar
        tqdm.write(
            f"note: trainer.resume=true but {path} does not exist: starting a new run "
            "(a mistyped hydra.run.dir? trainer.resume=must refuses to start without one)",
            file=sys.stderr,
        )
        log.info("no checkpoint in %s: starting a new run", trainer.out_dir)
    return False
