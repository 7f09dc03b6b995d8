"""Where and how the network runs: the device, bf16 autocast, channels_last, torch.compile,
data-parallel wrapping, and how often the loss is checked for NaN.

``prepare`` returns two views of one network: the one the training step calls (wrapped in
DistributedDataParallel when there are several ranks) and the one that scores and evaluates
(never the DDP wrapper: its forward is a synchronisation point that other ranks must join).
Both share the parameters of the plain module, whose ``state_dict`` checkpoints use.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from ..core.collectives import Distributed

# Points per evaluation forward when none is given: a GPU wants large batches; on a CPU a
# batch whose activations stay in cache is faster (the CNN's evaluation forward per point is
# about 2.2x as fast at 128 as at 4096, with the same loss and error: scripts/bench.py's
# evaluation section).
EVAL_BATCH_SIZE = {"cuda": 4096, "cpu": 128}


def default_eval_batch_size(device: torch.device) -> int:
    return EVAL_BATCH_SIZE.get(device.type, EVAL_BATCH_SIZE["cpu"])


def resolve_device(device: str = "auto", dist: Distributed | None = None) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU; a CUDA device that is not there is an
    error. With several ranks on CUDA each rank takes the GPU of its LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dist is not None and dist.enabled and resolved.index is None and count:
            resolved = torch.device("cuda", dist.local_rank % count)
        if not count or (resolved.index or 0) >= count:
            raise ValueError(
                f"{device} was asked for, but this machine has {count} CUDA devices "
                "(use device=auto or cpu)"
            )
    return resolved


class Runtime:
    """Args:
    device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
    amp: bf16 autocast ("auto": on when the device is CUDA, off on the CPU).
    channels_last: NHWC memory format for 4-d inputs ("auto": on CUDA only).
    compile: torch.compile the model.
    check_finite: ``step`` checks the loss at every step (the error names the exact step; one
        host synchronisation per step), ``row`` at each metrics row; ``auto``: step on the CPU,
        row on CUDA.
    dist: the data-parallel ranks (default: one process).
    """

    def __init__(
        self,
        device: str | torch.device = "auto",
        amp: bool | str = "auto",
        channels_last: bool | str = "auto",
        compile: bool = False,
        check_finite: str = "auto",
        dist: Distributed | None = None,
    ):
        if amp not in ("auto", True, False):
            raise ValueError(f"trainer.amp must be auto, true or false, got {amp!r}")
        if channels_last not in ("auto", True, False):
            raise ValueError(
                f"trainer.channels_last must be auto, true or false, got {channels_last!r}"
            )
        if check_finite not in ("auto", "step", "row"):
            raise ValueError(
                f"trainer.check_finite must be auto, step or row, got {check_finite!r}"
            )
        self.dist = dist or Distributed()
        self.device = resolve_device(str(device), self.dist)
        on_cuda = self.device.type == "cuda"
        self.use_amp = on_cuda if amp == "auto" else bool(amp)
        self.channels_last = on_cuda if channels_last == "auto" else bool(channels_last)
        self.compile = bool(compile)
        self.check_every_step = check_finite == "step" or (check_finite == "auto" and not on_cuda)

    def autocast(self) -> AbstractContextManager:
        if not self.use_amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def layout(self, x: Tensor) -> Tensor:
        """``x`` in the memory format the network runs in (NHWC for images with channels_last)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Move ``model`` to the device (in place) and return (the module the training step
        calls, the module that scores and evaluates)."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if self.compile else model
        if not self.dist.enabled:
            return forward, forward
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(forward, device_ids=ids), forward

    def synchronize(self) -> None:
        """Wait for the queued GPU work (before reading a clock)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
