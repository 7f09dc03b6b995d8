"""How the points a sampler chose reach the training step, and how evaluation data is read.

- ``TensorSource``: the dataset lives on the training device as tensors; a presample is an
  index lookup plus, for images, a batched random crop and flip on the device. Nothing waits for
  the host. The default for every dataset that fits in device memory.
- ``LoaderSource``: a ``torch.utils.data.DataLoader`` over a map-style dataset, with the
  sampler's index stream as its ``batch_sampler``: each presample is read, decoded and augmented
  once, in worker processes, and the points chosen from it are trained on as those same views.

Both are iterators of ``Presample`` (x, y, indices) on the training device. Evaluation data comes
from ``eval_batches``, each rank reading its share of the points.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..core.collectives import Distributed
from ..core.order import mix_seed
from ..core.samplers import Presample, Sampler
from .data import StreamingDataset, TensorDataset
from .runtime import Runtime, default_eval_batch_size


@dataclass
class LoaderOptions:
    """DataLoader settings of the streaming path (config group ``loader``)."""

    num_workers: int = 2  # worker processes that read and augment (0: in the main process)
    pin_memory: bool | str = (
        "auto"  # page-locked batches for fast copies to the GPU (auto: on CUDA)
    )
    prefetch_factor: int = 2  # batches each worker loads ahead
    persistent_workers: bool = True  # keep the workers between evaluations

    def __post_init__(self):
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int):
            raise ValueError(
                f"loader.num_workers must be an integer >= 0, got {self.num_workers!r}"
            )
        if self.num_workers < 0:
            raise ValueError(f"loader.num_workers must be >= 0, got {self.num_workers}")
        if not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1:
            raise ValueError(f"loader.prefetch_factor must be >= 1, got {self.prefetch_factor!r}")
        if self.pin_memory not in ("auto", True, False):
            raise ValueError(
                f"loader.pin_memory must be auto, true or false, got {self.pin_memory!r}"
            )


def train_eval_indices(num_samples: int, size: int | None, seed: int) -> Tensor:
    """The fixed random subset of training points whose loss the metrics rows report (sorted)."""
    subset = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return subset[: size or num_samples].sort().values


class TensorSource:
    """Presamples gathered from tensors on the training device (see the module docstring)."""

    def __init__(
        self,
        data: TensorDataset,
        sampler: Sampler,
        runtime: Runtime,
        seed: int = 0,
        train_eval_size: int | None = 10_000,
        eval_batch_size: int | None = None,
    ):
        device, dist = runtime.device, runtime.dist
        self.data = data.to(device)
        self.data.train_x = runtime.layout(self.data.train_x)
        self.data.test_x = runtime.layout(self.data.test_x)
        self.sampler, self.dist = sampler, dist
        self.eval_batch_size = eval_batch_size or default_eval_batch_size(device)
        # the augmentation's randomness, one stream per rank
        self.generator = torch.Generator(device).manual_seed(mix_seed(seed, dist.rank, 0xA6))
        self.train_eval = train_eval_indices(len(data), train_eval_size, seed).to(device)
        self._batches = sampler.batches()

    def __iter__(self) -> Iterator[Presample]:
        return self

    def __next__(self) -> Presample:
        idx = next(self._batches)
        x = self.data.train_x[idx]
        if self.data.augment is not None:
            x = self.data.augment(x, self.generator)
        return Presample(x, self.data.train_y[idx], idx)

    def eval_inputs(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Training points (without augmentation) on the device, e.g. for a measurement."""
        indices = indices.to(self.data.train_x.device)
        return self.data.train_x[indices], self.data.train_y[indices]

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the train-eval subset (``train``) or the test set, in batches."""
        if split == "train":
            x, y = self.data.train_x[self.train_eval], self.data.train_y[self.train_eval]
        else:
            x, y = self.data.test_x, self.data.test_y
        x, y = x[self.dist.rank :: self.dist.world_size], y[self.dist.rank :: self.dist.world_size]
        for i in range(0, len(x), self.eval_batch_size):
            yield x[i : i + self.eval_batch_size], y[i : i + self.eval_batch_size]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())


class SeededItems(Dataset):
    """Item ``(index, seed)`` is ``dataset[index]`` drawn with torch's random generator seeded by
    ``seed`` (and restored afterwards), plus the index: an item's random augmentation is then a
    function of its draw, whichever worker process loads it, and after a resume."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        index, seed = key
        generator = torch.default_generator  # what transforms draw from (CPU; not CUDA's)
        state = generator.get_state()
        generator.manual_seed(seed)  # ~1 us, where torch.manual_seed costs ~60 us
        try:
            x, y = self.dataset[index]
        finally:
            generator.set_state(state)
        return x, torch.as_tensor(y), index

    def __getitems__(self, keys: list[tuple[int, int]]):
        """A whole batch (the DataLoader's fetcher calls this when it exists): at once, as
        (x, y, index) tensors, from a dataset that can (``batch``: items without randomness,
        which need no seeds); else item by item, each with its seed."""
        batch = getattr(self.dataset, "batch", None)
        if batch is not None:
            indices = [index for index, _ in keys]
            items = batch(indices)
            if items is not None:
                x, y = items
                return x, torch.as_tensor(y), torch.as_tensor(indices, dtype=torch.int64)
        return [self[key] for key in keys]


def collate_items(items) -> tuple[Tensor, ...]:
    """A batch of ``SeededItems`` (a list of items, or the (x, y, index) tensors of
    ``__getitems__``) as (x, [y, index]) when the labels are integers: two tensors to hand from
    a worker to the training process, not three (each costs a handshake of torch's
    file-descriptor sharing, about 1 ms a tensor: a third of a streamed MLP step). Other
    targets (vectors, floats) come as (x, y, index)."""
    if isinstance(items, tuple):
        x, y, index = items
    else:
        xs, ys, indices = zip(*items, strict=True)
        x, y = torch.stack(xs), torch.stack(ys)
        index = torch.tensor(indices, dtype=torch.int64)
    if y.dim() == 1 and not y.is_floating_point():
        return x, torch.stack([y.long(), index], 1)
    return x, y, index


class _DrawnBatches:
    """The sampler's index stream as a DataLoader ``batch_sampler`` of (index, seed) pairs.

    The DataLoader draws ``prefetch_factor x num_workers`` batches ahead of the step that trains
    on them; the ones drawn and not consumed yet are ``pending``. A checkpoint stores them, and a
    resumed run loads them first, then continues from the sampler's restored position: the
    resumed run reads exactly the batches the uninterrupted one would have read."""

    def __init__(self, sampler: Sampler, generator: torch.Generator):
        self.sampler, self.generator = sampler, generator
        self.pending: deque[tuple[Tensor, Tensor]] = deque()
        self.replay: list[tuple[Tensor, Tensor]] = []

    def _live(self) -> Iterator[tuple[Tensor, Tensor]]:
        for indices in self.sampler.batches():
            seeds = torch.randint(1 << 62, (len(indices),), generator=self.generator)
            yield indices.cpu(), seeds

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        replay, self.replay = self.replay, []
        for indices, seeds in itertools.chain(replay, self._live()):
            self.pending.append((indices, seeds))
            yield list(zip(indices.tolist(), seeds.tolist(), strict=True))

    def consumed(self) -> None:
        self.pending.popleft()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.replay = [(i.cpu(), s.cpu()) for i, s in state["pending"]]


class LoaderSource:
    """Presamples read through a DataLoader (see the module docstring)."""

    def __init__(
        self,
        data: StreamingDataset,
        sampler: Sampler,
        runtime: Runtime,
        seed: int = 0,
        train_eval_size: int | None = 10_000,
        eval_batch_size: int | None = None,
        options: LoaderOptions | None = None,
    ):
        self.options = options = options or LoaderOptions()
        self.data, self.sampler, self.runtime = data, sampler, runtime
        self.device, self.dist = runtime.device, runtime.dist
        self.pin = (
            self.device.type == "cuda" if options.pin_memory == "auto" else options.pin_memory
        )
        workers = options.num_workers
        self._loader_kwargs = dict(
            num_workers=workers,
            pin_memory=self.pin,
            prefetch_factor=options.prefetch_factor if workers else None,
            persistent_workers=options.persistent_workers and workers > 0,
            # CUDA and fork do not mix: workers of a CUDA process start from a fresh interpreter
            multiprocessing_context="forkserver"
            if workers and self.device.type == "cuda"
            else None,
        )
        generator = torch.Generator().manual_seed(mix_seed(seed, self.dist.rank, 0xA6))
        self.batch_sampler = _DrawnBatches(sampler, generator)
        self.loader = DataLoader(
            SeededItems(data.train),
            batch_sampler=self.batch_sampler,
            collate_fn=collate_items,
            **self._loader_kwargs,
        )
        self._it: Iterator | None = None
        self.eval_batch_size = eval_batch_size or default_eval_batch_size(self.device)
        eval_idx = train_eval_indices(len(data), train_eval_size, seed)
        self._eval_sets = {
            "train": Subset(data.train_eval, _share(eval_idx, self.dist).tolist()),
            "test": Subset(data.test, _share(torch.arange(len(data.test)), self.dist).tolist()),
        }
        self._eval_loaders: dict[str, DataLoader] = {}

    def __iter__(self) -> Iterator[Presample]:
        return self

    def __next__(self) -> Presample:
        if self._it is None:
            self._it = iter(self.loader)
        x, *rest = next(self._it)
        self.batch_sampler.consumed()
        y, indices = rest if len(rest) == 2 else rest[0].unbind(1)
        return Presample(self._to_device(x), self._to_device(y), self._to_device(indices))

    def _to_device(self, t: Tensor) -> Tensor:
        t = t.to(self.device, non_blocking=self.pin)
        return self.runtime.layout(t)

    def eval_inputs(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        items = [self.data.train_eval[i] for i in indices.tolist()]
        x = torch.stack([x for x, _ in items])
        y = torch.as_tensor([int(y) for _, y in items])
        return self._to_device(x), self._to_device(y)

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        if split not in self._eval_loaders:
            self._eval_loaders[split] = DataLoader(
                self._eval_sets[split], batch_size=self.eval_batch_size, **self._loader_kwargs
            )
        for x, y in self._eval_loaders[split]:
            yield self._to_device(x), self._to_device(torch.as_tensor(y))

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("load the loader's state before the first batch is read")
        self.batch_sampler.load_state_dict(state)


def _share(indices: Tensor, dist: Distributed) -> Tensor:
    return indices[dist.rank :: dist.world_size]


def make_source(
    data: TensorDataset | StreamingDataset,
    sampler: Sampler,
    runtime: Runtime,
    seed: int = 0,
    train_eval_size: int | None = 10_000,
    eval_batch_size: int | None = None,
    loader: LoaderOptions | None = None,
) -> TensorSource | LoaderSource:
    """A TensorSource for tensors, a LoaderSource for a streaming dataset."""
    if isinstance(data, StreamingDataset):
        return LoaderSource(data, sampler, runtime, seed, train_eval_size, eval_batch_size, loader)
    return TensorSource(data, sampler, runtime, seed, train_eval_size, eval_batch_size)
