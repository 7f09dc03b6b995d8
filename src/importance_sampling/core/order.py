"""Which training points to load, and in what order, on each data-parallel rank.

``EpochOrder`` is what a shuffling ``DistributedSampler`` does, as an endless stream that any
batch size can be taken from: epoch e is a permutation of the N points seeded by (seed, e),
the same on every rank; rank r owns every W-th entry of it (after dropping the N mod W last
ones, so every rank owns N // W points), and takes consecutive chunks of its share. So the W
chunks of one step are W * k consecutive entries of one seeded permutation, every rank rolls
over to the next epoch at the same step, and the position is two integers (epoch, cursor):
resuming restores it exactly. One process (W = 1) is the special case r = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, rank, epoch, ...), different for each tuple."""
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = ((value ^ (int(p) + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    return value % (1 << 63)


def shard(items: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th entry after dropping the
    len mod world_size last ones (drop_last, so every rank gets the same number)."""
    usable = len(items) // world_size * world_size
    return items[:usable][rank::world_size]


class EpochOrder:
    """Uniform draws without replacement within an epoch, sharded over ranks (see the module)."""

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.shard_size = self.num_samples // world_size
        self.epoch, self.cursor = 0, 0
        self._share: Tensor | None = None

    def _make_share(self) -> Tensor:
        generator = torch.Generator(self.device).manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=generator, device=self.device)
        return shard(perm, self.rank, self.world_size)

    def take(self, k: int) -> Tensor:
        """The next ``k`` indices of this rank's share (k,); a new epoch when it runs out."""
        if k > self.shard_size:
            raise ValueError(
                f"cannot draw {k} distinct samples from a share of {self.shard_size} "
                f"({self.num_samples} samples over {self.world_size} processes)"
            )
        if self.cursor + k > self.shard_size:
            self.epoch, self.cursor, self._share = self.epoch + 1, 0, None
        if self._share is None:
            self._share = self._make_share()
        out = self._share[self.cursor : self.cursor + k]
        self.cursor += k
        return out

    @property
    def passes(self) -> float:
        """Passes over the data so far (epochs, with the current one's fraction)."""
        return self.epoch + self.cursor / max(self.shard_size, 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._share = int(state["epoch"]), int(state["cursor"]), None
