"""Datasets as tensors. Small datasets live whole on the training device: no DataLoader, no
worker processes, an index tensor is a minibatch.

Every loader returns a ``TensorDataset`` with float inputs (n, C, H, W), already normalised, and
int64 labels (n,).
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
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

    def __repr__(self) -> str:
        return (f"{self.name}: {len(self.train_x)} train / {len(self.test_x)} test, "
                f"inputs {self.input_shape}, {self.num_classes} classes")


def _standardise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Scale both splits by the training set's mean and std (one scalar each)."""
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, (test_x - mean) / std


def _limit(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    return (x, y) if n is None else (x[:n], y[:n])


def digits(test_fraction: float = 0.2, seed: int = 0, train_size: int | None = None) -> TensorDataset:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 grey images, 10 classes, no download.

    Split into train/test with a fixed stratified split (``test_fraction``, ``seed``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels
    )
    train_x, test_x = _standardise(x[train_idx], x[test_idx])
    train_x, train_y = _limit(train_x, y[train_idx], train_size)
    return TensorDataset("digits", train_x, train_y, test_x, y[test_idx], 10)


def _install_debian_files(debian_dir: Path, raw: Path) -> bool:
    """Decompress Debian's dataset-fashion-mnist .gz files into torchvision's raw folder."""
    sources = [debian_dir / f"{name}.gz" for name in FASHION_MNIST_FILES]
    if not all(s.is_file() for s in sources):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for src, name in zip(sources, FASHION_MNIST_FILES, strict=True):
        tmp = raw / f".{name}.tmp"
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(raw / name)  # atomic: an interrupted copy never looks like a complete file
    return True


def fashion_mnist(
    data_dir: str | Path,
    download: bool = False,
    debian_dir: str | Path = DEBIAN_FASHION_MNIST,
    train_size: int | None = None,
) -> TensorDataset:
    """Fashion-MNIST (60k/10k 28x28 grey images, 10 classes) through torchvision's FashionMNIST.

    Looks in ``data_dir/FashionMNIST/raw``; if the files are not there, copies them from Debian's
    ``dataset-fashion-mnist`` package when it is installed, else downloads them when ``download``.
    """
    from torchvision.datasets import FashionMNIST

    root = Path(data_dir).expanduser()
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        if not _install_debian_files(Path(debian_dir), raw) and not download:
            raise DataError(
                f"Fashion-MNIST is not in {raw}. Get it with one of:\n"
                f"  apt-get install dataset-fashion-mnist   (Debian/Ubuntu, offline; files in {debian_dir})\n"
                f"  python train.py dataset=fashion_mnist dataset.download=true   (needs internet)"
            )
    try:
        train = FashionMNIST(root, train=True, download=download)
        test = FashionMNIST(root, train=False, download=download)
    except (RuntimeError, ValueError, AssertionError, OSError) as e:
        raise DataError(
            f"could not read Fashion-MNIST from {raw} ({type(e).__name__}: {e}). The files may be "
            f"truncated or corrupt: delete {raw} and run again to recreate them."
        ) from e
    train_x, test_x = _standardise(
        train.data.float().unsqueeze(1) / 255.0, test.data.float().unsqueeze(1) / 255.0
    )
    train_x, train_y = _limit(train_x, train.targets.long(), train_size)
    return TensorDataset("fashion_mnist", train_x, train_y, test_x, test.targets.long(), 10)
