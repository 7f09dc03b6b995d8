"""Data-parallel ranks: who this process is, and the few collectives the samplers and the
trainer need. With one process every call here is a no-op, so no code has ``if ddp:`` branches.

``Distributed.current()`` describes the process group already initialised (by the command
line's launch helpers, importance_sampling.config.launch, or by your own DDP script). One
process group carries everything: CUDA tensors through NCCL, CPU tensors through gloo, so the
host-side values every rank must agree on (the clock, checkpoint states) never wait for a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that writes files, logs and shows progress."""
        return self.rank == 0

    @classmethod
    def current(cls) -> Distributed:
        """The process group already initialised (by the launch helpers, or by the caller in
        their own DDP loop), or a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place, on its device (no host synchronisation)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` (the same shape on every rank) along dim 0, in
        rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast_floats(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (host-side values: through gloo, never the GPU)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0)
        return t.tolist()

    def max_floats(self, values: list[float]) -> list[float]:
        """The element-wise maximum of every rank's ``values`` (host-side values: through gloo,
        never the GPU); e.g. rank 0's clock with -inf on the other ranks, and a flag of any rank."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable ``obj`` on rank 0 (in rank order); None on the other ranks."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
