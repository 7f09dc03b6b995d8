"""Write Fashion-MNIST as PNG files in class folders (ImageNet's layout), once, to try and test
the streaming path (``dataset=image_folder dataset.stream=true``) on real data offline.

    python scripts/fashion_mnist_png.py data/fashion_mnist_png            # 60,000 + 10,000 images
    python scripts/fashion_mnist_png.py /tmp/fm --train-size 2000 --test-size 500
    python train.py dataset=image_folder dataset.root=data/fashion_mnist_png/train \\
        dataset.test_root=data/fashion_mnist_png/test dataset.image_size=28 dataset.stream=true

Reads the idx files from Debian's dataset-fashion-mnist package (or torchvision's raw folder);
writes <out>/{train,test}/<class>/<index>.png. A folder that is already complete is left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from importance_sampling.engine.data import (
    DEBIAN_FASHION_MNIST,
    IDX_FILES,
    DataError,
    fashion_mnist,
)

CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)


def raw_folder(data_dir: Path) -> Path:
    """torchvision's raw Fashion-MNIST folder under ``data_dir``, filled from Debian's package
    the first time (the project's loader does that and says how to get the files otherwise)."""
    fashion_mnist(data_dir, train_size=1, test_size=1)
    return data_dir / "FashionMNIST" / "raw"


def write_split(images, labels, out: Path, size: int | None) -> int:
    n = len(labels) if size is None else min(size, len(labels))
    done = out / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return 0
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.asarray(images[i])).save(out / CLASSES[int(labels[i])] / f"{i:05d}.png")
    done.write_text(str(n))
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder to write train/ and test/ into")
    parser.add_argument("--train-size", type=int, default=None, help="first n training images")
    parser.add_argument("--test-size", type=int, default=None, help="first n test images")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help=f"where the idx files are or go (copied from {DEBIAN_FASHION_MNIST})",
    )
    args = parser.parse_args(argv)
    try:
        raw = raw_folder(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train_images, train_labels, test_images, test_labels = (
        read_image_file(str(raw / IDX_FILES[0])),
        read_label_file(str(raw / IDX_FILES[1])),
        read_image_file(str(raw / IDX_FILES[2])),
        read_label_file(str(raw / IDX_FILES[3])),
    )
    written = write_split(train_images, train_labels, args.out / "train", args.train_size)
    written += write_split(test_images, test_labels, args.out / "test", args.test_size)
    print(f"{written} images written to {args.out}" if written else f"{args.out} is complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
