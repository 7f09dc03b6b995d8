import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from importance_sampling.engine.data import (
    DEBIAN_FASHION_MNIST,
    DataError,
    digits,
    fashion_mnist,
    pixel_mnist,
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the idx format of MNIST/Fashion-MNIST, gzipped like Debian's."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_debian_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "debian"
    d.mkdir()
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return d


def test_digits_is_a_fixed_standardised_split():
    data = digits()
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train_x) + len(data.test_x) == 1797
    assert abs(data.train_x.mean().item()) < 1e-5 and abs(data.train_x.std().item() - 1) < 1e-4
    assert torch.equal(digits().test_y, data.test_y)
    assert len(digits(train_size=100).train_x) == 100


def test_fashion_mnist_loads_idx_files_through_torchvision(tiny_debian_dir, tmp_path):
    data = fashion_mnist(tmp_path / "data", debian_dir=tiny_debian_dir)
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (10, 1, 28, 28)
    assert data.train_y.tolist() == [i % 10 for i in range(30)]
    assert (tmp_path / "data/FashionMNIST/raw/train-images-idx3-ubyte").is_file()
    # second time: read from data_dir even when the Debian files are gone
    for f in tiny_debian_dir.iterdir():
        f.unlink()
    assert len(fashion_mnist(tmp_path / "data", debian_dir=tiny_debian_dir).train_x) == 30


def test_pixel_sequences_of_fashion_mnist_need_no_download(tiny_debian_dir, tmp_path):
    """dataset=pixel_mnist dataset.images=fashion_mnist: the sequence experiment on real data
    installed offline (the same idx format as MNIST)."""
    images = fashion_mnist(tmp_path / "data", debian_dir=tiny_debian_dir, test_size=5)
    assert len(images.test_x) == 5
    seq = pixel_mnist(
        tmp_path / "data",
        images="fashion_mnist",
        debian_dir=tiny_debian_dir,
        downsample=4,
        test_size=5,
    )
    assert seq.name == "pixel_fashion_mnist" and seq.input_shape == (49, 1)
    pooled = torch.nn.functional.avg_pool2d(images.train_x, 4).flatten(1)
    torch.testing.assert_close(seq.train_x[:, :, 0], pooled)
    assert torch.equal(seq.test_y, images.test_y)
    with pytest.raises(ValueError, match="dataset.images must be mnist or fashion_mnist"):
        pixel_mnist(tmp_path / "data", images="cifar10")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path / "data", debian_dir=tmp_path / "nowhere")


def test_truncated_fashion_mnist_file_is_a_clear_error(tiny_debian_dir, tmp_path):
    fashion_mnist(tmp_path / "data", debian_dir=tiny_debian_dir)
    images = tmp_path / "data/FashionMNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        fashion_mnist(tmp_path / "data", debian_dir=tiny_debian_dir)


def test_real_fashion_mnist_from_debian_package(tmp_path):
    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        msg = "Debian's dataset-fashion-mnist is not installed (make data installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    data = fashion_mnist(tmp_path / "data")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10


@pytest.mark.parametrize("test_fraction, seed", [(0.2, 0), (0.2, 7), (0.35, 3), (0.1, 123)])
def test_the_digits_split_is_scikit_learns_stratified_split(test_fraction, seed):
    """digits() reads scikit-learn's file and splits it without importing scikit-learn: the
    same points, in the same order, as train_test_split(..., stratify=labels)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from importance_sampling.engine.data import _digits_file, stratified_split

    images, labels = load_digits(return_X_y=True)
    ours_images, ours_labels = _digits_file()
    assert np.array_equal(images, ours_images) and np.array_equal(labels, ours_labels)
    expected = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    for mine, theirs in zip(stratified_split(labels, test_fraction, seed), expected, strict=True):
        assert np.array_equal(mine, theirs)


def test_uint8_images_are_standardised_as_their_float_values_would_be():
    """The histogram path for idx images gives what the float path gives (to float32 rounding)."""
    from importance_sampling.engine.data import _standardise, _standardise_bytes

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (500, 1, 28, 28), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 120, (100, 1, 28, 28), generator=g, dtype=torch.uint8)
    fast = _standardise_bytes(train, test)
    slow = _standardise(train.float() / 255.0, test.float() / 255.0)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert abs(fast[0].mean().item()) < 1e-5 and abs(fast[0].std().item() - 1) < 1e-5
