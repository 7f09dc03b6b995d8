"""Datasets, in two forms:

- ``TensorDataset``: small datasets that live whole on the training device as tensors (float
  inputs (n, C, H, W), already normalised; int64 labels (n,)): no DataLoader, no worker
  processes, an index tensor is a minibatch, augmentation runs on the device. The fast default.
- ``StreamingDataset``: map-style datasets that return (x, y) and are read through a DataLoader
  (sources.py), decoded and augmented in worker processes: datasets larger than memory.
  Any ``TensorDataset`` streams too (``.streaming()``), e.g. to compare the two paths.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = (  # MNIST and Fashion-MNIST, as torchvision keeps them in <root>/<Name>/raw
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataError(RuntimeError):
    """The data is missing or unreadable; the message says what to do."""


@dataclass
class TensorDataset:
    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    # Random training-time augmentation of a batch on its device: (x, generator) -> x.
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    # What test_x, test_y hold: "test", or "validation" (points carved out of the training set
    # by hold_out_validation: the test set is then not in the dataset at all)
    eval_split: str = "test"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str) -> TensorDataset:
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def __len__(self) -> int:
        return len(self.train_x)

    def __repr__(self) -> str:
        return (
            f"{self.name}: {len(self.train_x)} train / {len(self.test_x)} {self.eval_split}, "
            f"inputs {self.input_shape}, {self.num_classes} classes"
        )

    def streaming(self) -> StreamingDataset:
        """The same data as map-style datasets, augmented item by item (in DataLoader workers)."""
        return StreamingDataset(
            self.name,
            TensorItems(self.train_x, self.train_y, self.augment),
            TensorItems(self.train_x, self.train_y),
            TensorItems(self.test_x, self.test_y),
            self.num_classes,
            self.input_shape,
            self.eval_split,
        )


class TensorItems(Dataset):
    """Map-style view of tensors: item i is (x[i], y[i]), with ``augment`` applied to it alone
    (drawing from torch's global random generator, which sources.py seeds item by item)."""

    def __init__(self, x: Tensor, y: Tensor, augment: Callable | None = None):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i]
        if self.augment is not None:
            x = self.augment(x[None])[0]
        return x, self.y[i]

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor] | None:
        """Items ``indices`` at once, (x (n, ...), y (n,)), when they involve no randomness (no
        augmentation; None otherwise): one gather instead of n item lookups."""
        if self.augment is not None:
            return None
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.x[index], self.y[index]


@dataclass
class StreamingDataset:
    """A dataset read through a DataLoader: map-style datasets that return (x, y) tensors.
    ``train`` applies the training-time augmentation; ``train_eval`` holds the same points
    without it (train_loss is measured on them); ``test`` is the evaluation split: the test set,
    or a validation split (``eval_split``, see hold_out_validation)."""

    name: str
    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    eval_split: str = "test"

    def __len__(self) -> int:
        return len(self.train)

    def __repr__(self) -> str:
        return (
            f"{self.name} (streamed): {len(self.train)} train / {len(self.test)} {self.eval_split}, "
            f"inputs {self.input_shape}, {self.num_classes} classes"
        )


def _standardise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Scale both splits by the training set's mean and std (one scalar each)."""
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, (test_x - mean) / std


def _standardise_bytes(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """``_standardise`` of uint8 images scaled to [0, 1]: the mean and std from the histogram
    of the 256 values (float64, exact), then one scaled conversion per split (a third of the
    passes over the data: it matters for a 60k-image dataset loaded by every run of a sweep)."""
    counts = torch.bincount(train.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    std = ((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt()
    scale, shift = float(1.0 / (255.0 * std)), float(mean / std)
    return train.float().mul_(scale).sub_(shift), test.float().mul_(scale).sub_(shift)


def _limit(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    return (x, y) if n is None else (x[:n], y[:n])


def digits(
    test_fraction: float = 0.2, seed: int = 0, train_size: int | None = None
) -> TensorDataset:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 grey images, 10 classes, no download.

    Split into train/test with a fixed stratified split (``test_fraction``, ``seed``): the split
    of scikit-learn's ``train_test_split(..., stratify=labels, random_state=seed)``, point for
    point (tests/test_data.py checks it), computed here because importing scikit-learn costs
    more than a short run (the file is read from its package without importing it).
    """
    images, labels = _digits_file()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    train_x, test_x = _standardise(x[train_idx], x[test_idx])
    train_x, train_y = _limit(train_x, y[train_idx], train_size)
    return TensorDataset("digits", train_x, train_y, test_x, y[test_idx], 10)


def _digits_file():
    """(images (1797, 64) float, labels (1797,) int) from scikit-learn's digits.csv.gz."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the digits dataset ships with scikit-learn: pip install scikit-learn "
            "(or pip install 'importance_sampling[engine]')"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def stratified_split(labels, test_fraction: float, seed: int):
    """(train indices, test indices) of scikit-learn's ``StratifiedShuffleSplit`` with one
    split, as ``train_test_split(range(n), test_size=test_fraction, random_state=seed,
    stratify=labels)`` draws it: per class, the most likely counts of the multivariate
    hypergeometric (ties broken at random), then a permutation of each class and of each
    split, all from one ``numpy.random.RandomState(seed)``."""
    import math

    import numpy as np

    labels = np.asarray(labels)
    n = len(labels)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i in range(len(classes)):
        permutation = rng.permutation(class_counts[i])
        ordered = class_indices[i].take(permutation, mode="clip")
        train.extend(ordered[: n_i[i]])
        test.extend(ordered[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts, n_draws: int, rng):
    """The approximate mode of a multivariate hypergeometric (draws per class), as
    scikit-learn's ``_approximate_mode``: floor the expected counts, then add the missing
    draws to the largest remainders, ties broken by ``rng``."""
    import numpy as np

    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _install_debian_files(debian_dir: Path, raw: Path) -> bool:
    """Decompress Debian's dataset-fashion-mnist .gz files into torchvision's raw folder."""
    sources = [debian_dir / f"{name}.gz" for name in IDX_FILES]
    if not all(s.is_file() for s in sources):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for src, name in zip(sources, IDX_FILES, strict=True):
        # a file of this process's own (two runs may fill one data folder at once), renamed
        # atomically: an interrupted copy never looks like a complete file
        tmp = raw / f".{name}.{os.getpid()}.tmp"
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(raw / name)
    return True


def fashion_mnist(
    data_dir: str | Path,
    download: bool = False,
    debian_dir: str | Path = DEBIAN_FASHION_MNIST,
    train_size: int | None = None,
    test_size: int | None = None,
    augment: bool = False,
) -> TensorDataset:
    """Fashion-MNIST (60k/10k 28x28 grey images, 10 classes) through torchvision's FashionMNIST.

    Looks in ``data_dir/FashionMNIST/raw``; if the files are not there, copies them from Debian's
    ``dataset-fashion-mnist`` package when it is installed, else downloads them when ``download``.
    ``augment``: a random crop of the image padded by 3 pixels and a horizontal flip, on the
    device, batch by batch (the CIFAR augmentation at this size; clothes are mirror-symmetric).
    """
    from torchvision.datasets import FashionMNIST

    raw = Path(data_dir).expanduser() / "FashionMNIST" / "raw"
    if not all((raw / name).is_file() for name in IDX_FILES):
        if not _install_debian_files(Path(debian_dir), raw) and not download:
            raise DataError(
                f"Fashion-MNIST is not in {raw}. Get it with one of:\n"
                f"  apt-get install dataset-fashion-mnist   (Debian/Ubuntu, offline; files in {debian_dir})\n"
                f"  python train.py dataset=fashion_mnist dataset.download=true   (needs internet)"
            )
    data = _idx_images(FashionMNIST, "fashion_mnist", raw, download, train_size, test_size)
    data.augment = RandomCropFlip(28 // 8) if augment else None
    return data


def _idx_images(
    cls,
    name: str,
    raw: Path,
    download: bool,
    train_size: int | None,
    test_size: int | None,
    again: str = "run again to recreate them",
) -> TensorDataset:
    """A torchvision MNIST-format dataset (``cls``) whose idx files are in ``raw``, scaled to
    [0, 1] and standardised; unreadable files are a DataError that says which folder to delete."""
    root = raw.parent.parent
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except (RuntimeError, ValueError, AssertionError, OSError) as e:
        raise DataError(
            f"could not read {name} from {raw} ({type(e).__name__}: {e}). The files may be "
            f"truncated or corrupt: delete {raw} and {again}."
        ) from e
    train_x, test_x = _standardise_bytes(train.data.unsqueeze(1), test.data.unsqueeze(1))
    return _make(
        name,
        (train_x, train.targets.long()),
        (test_x, test.targets.long()),
        10,
        train_size,
        test_size,
    )


def synthetic(
    shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    train_size: int = 50_000,
    test_size: int = 10_000,
    augment: bool = False,
    seed: int = 0,
    name: str = "synthetic",
) -> TensorDataset:
    """Random inputs of ``shape`` (standard normal) and random labels: for timing a network and
    a pipeline at a real dataset's sizes without the dataset (nothing to learn; no download).
    ``augment``: the CIFAR crop (padding shape[-1] / 8) and flip, for image shapes."""
    shape = tuple(int(d) for d in shape)
    g = torch.Generator().manual_seed(seed)
    crop = RandomCropFlip(max(1, shape[-1] // 8)) if augment and len(shape) == 3 else None
    return TensorDataset(
        name,
        torch.randn(train_size, *shape, generator=g),
        torch.randint(0, num_classes, (train_size,), generator=g),
        torch.randn(test_size, *shape, generator=g),
        torch.randint(0, num_classes, (test_size,), generator=g),
        num_classes,
        crop,
    )


# ------------------------------------------------------------------ the paper's datasets
class RandomCropFlip:
    """The paper's CIFAR augmentation, done on a whole batch on its device: a random crop of the
    image zero-padded by ``padding`` pixels (zero is the mean after normalisation) and a random
    horizontal flip. Called as ``augment(x (n, C, H, W), generator) -> (n, C, H, W)``."""

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding, self.flip = padding, flip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, _, h, w = x.shape
        p = self.padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator, device=x.device)
        dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator, device=x.device)
        rows = dy + torch.arange(h, device=x.device)[None, :, None]  # (n, h, 1)
        cols = dx + torch.arange(w, device=x.device)[None, None, :]  # (n, 1, w)
        out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # (n, h, w, C)
        out = out.permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(n, generator=generator, device=x.device) < 0.5
            out = torch.where(flip[:, None, None, None], out.flip(3), out)
        return out.contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"


def _standardise_channels(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std of the training set applied to both splits, (n, C, H, W)."""
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    return (train_x - mean) / std, (test_x - mean) / std


def _make(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    train_size: int | None,
    test_size: int | None,
    augment=None,
) -> TensorDataset:
    (train_x, train_y), (test_x, test_y) = _limit(*train, train_size), _limit(*test, test_size)
    return TensorDataset(name, train_x, train_y, test_x, test_y, num_classes, augment)


def _missing(name: str, where: Path, dataset: str) -> DataError:
    return DataError(
        f"{name} is not in {where}. Download it (needs internet) with:\n"
        f"  python train.py dataset={dataset} dataset.download=true\n"
        f"or set data_dir (or IS_DATA_DIR) to a directory that holds it."
        + (
            "\nWithout internet, the pixel-sequence experiment (dataset=pixel_mnist) runs on "
            "Fashion-MNIST's images instead (same format, Debian's dataset-fashion-mnist): "
            "dataset.images=fashion_mnist"
            if name == "MNIST"
            else ""
        )
    )


def mnist(
    data_dir: str | Path,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
    augment: bool = False,
) -> TensorDataset:
    """MNIST (60k/10k 28x28 digits) through torchvision's MNIST, from ``data_dir/MNIST/raw``.
    ``augment``: a random crop of the image padded by 3 pixels, on the device, batch by batch
    (no flip: a mirrored digit is another shape)."""
    from torchvision.datasets import MNIST

    raw = Path(data_dir).expanduser() / "MNIST" / "raw"
    if not download and not all((raw / n).is_file() for n in IDX_FILES):
        raise _missing("MNIST", raw, "mnist")
    again = "download again (dataset.download=true)"
    data = _idx_images(MNIST, "mnist", raw, download, train_size, test_size, again)
    data.augment = RandomCropFlip(28 // 8, flip=False) if augment else None
    return data


def pixel_mnist(
    data_dir: str | Path,
    download: bool = False,
    permute: bool = False,
    permutation_seed: int = 0,
    downsample: int = 1,
    train_size: int | None = None,
    test_size: int | None = None,
    images: str = "mnist",
    debian_dir: str | Path = DEBIAN_FASHION_MNIST,
) -> TensorDataset:
    """MNIST as pixel sequences for recurrent models: inputs (n, L, 1) with L = (28/downsample)^2
    (784 pixels by default), optionally in a fixed random order (permuted pixel MNIST).

    ``images``: ``mnist`` (the paper's) or ``fashion_mnist``, the same format and size, which
    installs offline (Debian's dataset-fashion-mnist): the sequence experiment on real data
    without a download."""
    if images == "mnist":
        data = mnist(data_dir, download, train_size, test_size)
    elif images == "fashion_mnist":
        data = fashion_mnist(data_dir, download, debian_dir, train_size, test_size)
    else:
        raise ValueError(f"dataset.images must be mnist or fashion_mnist, got {images!r}")

    def to_sequence(x: Tensor) -> Tensor:
        if downsample > 1:
            x = torch.nn.functional.avg_pool2d(x, downsample)
        return x.flatten(1).unsqueeze(2)

    train_x, test_x = to_sequence(data.train_x), to_sequence(data.test_x)
    if permute:
        order = torch.randperm(
            train_x.shape[1], generator=torch.Generator().manual_seed(permutation_seed)
        )
        train_x, test_x = train_x[:, order], test_x[:, order]
    name = ("permuted_pixel_" if permute else "pixel_") + images
    return TensorDataset(name, train_x, data.train_y, test_x, data.test_y, 10)


def _read_cifar_batches(folder: Path, files: list[str], label_key: bytes) -> tuple[Tensor, Tensor]:
    import pickle

    xs, ys = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(batch[label_key], dtype=torch.int64))
    return torch.cat(xs).float() / 255, torch.cat(ys)


def _cifar(
    num_classes: int,
    data_dir: str | Path,
    download: bool,
    train_size: int | None,
    test_size: int | None,
    augment: bool,
) -> TensorDataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder_name, train_files, test_files, label_key = {
        10: (
            CIFAR10,
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        ),
        100: (CIFAR100, "cifar-100-python", ["train"], ["test"], b"fine_labels"),
    }[num_classes]
    root = Path(data_dir).expanduser()
    folder = root / folder_name
    name = f"cifar{num_classes}"
    if not all((folder / f).is_file() for f in train_files + test_files):
        if not download:
            raise _missing(f"CIFAR-{num_classes}", folder, name)
        cls(root, train=True, download=True)  # torchvision downloads and checks the archive
    try:
        train = _read_cifar_batches(folder, train_files, label_key)
        test = _read_cifar_batches(folder, test_files, label_key)
    except Exception as e:  # pickle raises many types on a truncated file
        raise DataError(
            f"could not read CIFAR-{num_classes} from {folder} ({type(e).__name__}: {e}). "
            f"The files may be truncated or corrupt: delete {folder} and download again."
        ) from e
    train_x, test_x = _standardise_channels(train[0], test[0])
    return _make(
        name,
        (train_x, train[1]),
        (test_x, test[1]),
        num_classes,
        train_size,
        test_size,
        RandomCropFlip(4) if augment else None,
    )


def cifar10(
    data_dir: str | Path,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
    augment: bool = True,
) -> TensorDataset:
    """CIFAR-10 (50k/10k 32x32 colour images) from torchvision's python pickles in
    ``data_dir/cifar-10-batches-py``; ``augment``: random crop (padding 4) and flip."""
    return _cifar(10, data_dir, download, train_size, test_size, augment)


def cifar100(
    data_dir: str | Path,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
    augment: bool = True,
) -> TensorDataset:
    """CIFAR-100 (fine labels) from ``data_dir/cifar-100-python``; as ``cifar10``."""
    return _cifar(100, data_dir, download, train_size, test_size, augment)


def svhn(
    data_dir: str | Path,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
) -> TensorDataset:
    """SVHN (73,257/26,032 32x32 house-number digits) from torchvision's .mat files in
    ``data_dir/svhn`` (label 10 in the files is the digit 0)."""
    from scipy.io import loadmat
    from torchvision.datasets import SVHN

    folder = Path(data_dir).expanduser() / "svhn"
    files = {"train": folder / "train_32x32.mat", "test": folder / "test_32x32.mat"}
    if not all(f.is_file() for f in files.values()):
        if not download:
            raise _missing("SVHN", folder, "svhn")
        for split in files:
            SVHN(folder, split=split, download=True)
    splits = {}
    for split, path in files.items():
        try:
            mat = loadmat(path)
        except Exception as e:
            raise DataError(
                f"could not read {path} ({type(e).__name__}: {e}). The file may be "
                f"truncated or corrupt: delete it and download again."
            ) from e
        x = (
            torch.as_tensor(mat["X"]).permute(3, 2, 0, 1).float() / 255
        )  # (32, 32, 3, n) -> (n, 3, 32, 32)
        splits[split] = (x, torch.as_tensor(mat["y"].reshape(-1).astype("int64")) % 10)
    train_x, test_x = _standardise_channels(splits["train"][0], splits["test"][0])
    return _make(
        "svhn",
        (train_x, splits["train"][1]),
        (test_x, splits["test"][1]),
        10,
        train_size,
        test_size,
    )


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_folder(
    root: str | Path,
    test_root: str | Path | None = None,
    image_size: int = 224,
    test_fraction: float = 0.2,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    augment: bool = True,
    stream: bool = False,
    channels: int | None = None,
) -> TensorDataset | StreamingDataset:
    """Any folder of class sub-folders (``root/<class>/<image>``), e.g. MIT67 indoor scenes or
    ImageNet, with ImageNet normalisation (for pretrained networks). Test split: ``test_root``
    with the same classes, or a stratified ``test_fraction`` of ``root``. The dataset is named
    after ``root``, or after its parent when ``root`` is a split's folder (``.../mit67/train``:
    ``mit67``). ``channels``: 1 (grey) or 3 (RGB); None: the images' own (1 when the first image
    is greyscale, e.g. Fashion-MNIST written as PNG files).

    ``stream=False`` loads every image once into memory at ``image_size`` (resize + centre crop;
    n x 3 x image_size^2 floats), augmented on the device by random crops and flips.
    ``stream=True`` reads images from disk batch by batch (sources.py), decoded and augmented in
    DataLoader workers by a random-resized crop and a flip: a dataset larger than memory works.
    Evaluation views are resized and centre-cropped in both cases."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist: set dataset.root to a folder of "
            f"class sub-folders (root/<class>/<image>)"
        )
    if channels not in (None, 1, 3):
        raise ValueError(f"dataset.channels must be 1, 3 or null, got {channels!r}")
    if channels is None:  # the images' own: look at the first one
        first = _first_image(root)
        channels = 1 if first is not None and PILImage.is_grey(first) else 3
    name = root.name if root.name.lower() not in SPLIT_FOLDERS else root.parent.name
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels != 1 else (GREY_MEAN, GREY_STD)
    normalise = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    eval_tf = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), *normalise]
    )
    train_tf = eval_tf
    if augment and stream:
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                *normalise,
            ]
        )

    def folder(path: Path, tf, classes: list[str] | None = None) -> ImageFolder:
        try:
            ds = ImageFolder(path, transform=tf, loader=PILImage("L" if channels == 1 else "RGB"))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"could not read images from {path}: {e}") from e
        if classes is not None and ds.classes != classes:
            raise DataError(f"{path} has classes {ds.classes[:5]}..., unlike {root}")
        return ds

    train_ds = folder(root, train_tf)
    classes = train_ds.classes
    if test_root is not None:
        test_ds = folder(Path(test_root).expanduser(), eval_tf, classes)
        train_idx, test_idx = list(range(len(train_ds))), list(range(len(test_ds)))
    else:
        from sklearn.model_selection import train_test_split

        test_ds = folder(root, eval_tf)
        train_idx, test_idx = train_test_split(
            list(range(len(train_ds))),
            test_size=test_fraction,
            random_state=seed,
            stratify=train_ds.targets,
        )
    train_idx, test_idx = train_idx[:train_size], test_idx[:test_size]
    if stream:
        eval_train = train_ds if train_tf is eval_tf else folder(root, eval_tf)
        return StreamingDataset(
            name,
            Subset(train_ds, train_idx),
            Subset(eval_train, train_idx),
            Subset(test_ds, test_idx),
            len(classes),
            (channels, image_size, image_size),
        )

    def load(ds: ImageFolder, indices: list[int]) -> tuple[Tensor, Tensor]:
        try:
            xs, ys = zip(*(ds[i] for i in indices), strict=True)
        except OSError as e:
            raise DataError(f"could not read images from {ds.root}: {e}") from e
        return torch.stack(xs), torch.tensor(ys)

    return TensorDataset(
        name,
        *load(train_ds, train_idx),
        *load(test_ds, test_idx),
        len(classes),
        RandomCropFlip(image_size // 8) if augment else None,
    )


SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "testing"}
GREY_MEAN, GREY_STD = [0.449], [0.226]  # ImageNet's channel means and stds, averaged


def _first_image(root: Path) -> Path | None:
    """The first image file of the first class folder (ImageFolder's order), or None."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(IMG_EXTENSIONS):
                    return Path(dirpath) / name
    return None


class PILImage:
    """ImageFolder's loader: the image file as a PIL image in ``mode`` ("L": grey, "RGB")
    (a class, not a closure: DataLoader workers started by forkserver unpickle it)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, path: str):
        from PIL import Image

        with open(path, "rb") as f:
            return Image.open(f).convert(self.mode)

    @staticmethod
    def is_grey(path: str) -> bool:
        from PIL import Image

        with Image.open(path) as image:
            return image.mode in ("1", "L", "LA", "I", "I;16", "F")


# ------------------------------------------------------------------ a validation split
def validation_count(size: int | float, num_train: int) -> int:
    """Points of a validation split: ``size`` points (an integer >= 1) or that fraction of the
    ``num_train`` training points (a float in (0, 1)); at least one training point must be left."""
    if isinstance(size, bool) or not isinstance(size, int | float) or size <= 0:
        raise ValueError(
            f"dataset.validation_size must be a number of points (>= 1), a fraction in (0, 1) "
            f"or null, got {size!r}"
        )
    count = round(size * num_train) if size < 1 else size
    if count != int(count) or not 1 <= count < num_train:
        raise ValueError(
            f"dataset.validation_size={size} must leave training points and be a whole number of "
            f"points: the training set has {num_train} (e.g. dataset.validation_size=0.1)"
        )
    return int(count)


def validation_indices(num_train: int, size: int | float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train, validation) indices into a training set of ``num_train`` points: a random split,
    fixed by ``seed`` alone (not by the run's seed: every run of a sweep sees the same split),
    both sorted."""
    count = validation_count(size, num_train)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[count:].sort().values, order[:count].sort().values


def hold_out_validation(
    data: TensorDataset | StreamingDataset, size: int | float, seed: int = 0
) -> TensorDataset | StreamingDataset:
    """The dataset with ``size`` training points (or that fraction) moved to a validation split
    that takes the test set's place: training runs on the rest, and the evaluation rows report on
    the validation points (``eval_split == "validation"``). The test set is left out of the
    returned dataset entirely, so nothing that trains or evaluates on it can read the test set:
    learning rates and schedules chosen on it never see the test data.

    The inputs keep the normalisation computed when the data was loaded (one mean and std over
    the whole training set, validation points included: no label information, and the test set
    is never part of it)."""
    if data.eval_split != "test":
        raise ValueError("the dataset already has a validation split")
    if isinstance(data, StreamingDataset):
        train_idx, val_idx = validation_indices(len(data.train), size, seed)
        keep, held = train_idx.tolist(), val_idx.tolist()
        return replace(
            data,
            train=Subset(data.train, keep),
            train_eval=Subset(data.train_eval, keep),
            test=Subset(data.train_eval, held),  # without the training augmentation
            eval_split="validation",
        )
    train_idx, val_idx = validation_indices(len(data.train_x), size, seed)
    return replace(
        data,
        train_x=data.train_x[train_idx],
        train_y=data.train_y[train_idx],
        test_x=data.train_x[val_idx],
        test_y=data.train_y[val_idx],
        eval_split="validation",
    )
