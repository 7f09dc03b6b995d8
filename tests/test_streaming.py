"""The streaming path: a DataLoader with worker processes reads each presample from disk, on real
data (Fashion-MNIST written once as PNG files in class folders by scripts/fashion_mnist_png.py)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from importance_sampling.core.samplers import ImportanceSampler, UniformSampler
from importance_sampling.engine.budget import Budget
from importance_sampling.engine.data import DEBIAN_FASHION_MNIST, TensorDataset, image_folder
from importance_sampling.engine.models import MLP
from importance_sampling.engine.runtime import Runtime
from importance_sampling.engine.sources import LoaderOptions, LoaderSource, TensorSource
from importance_sampling.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
COMPARED = [
    "step",
    "samples",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "tau",
    "scored",
]


@pytest.fixture(scope="module")
def png_tree(tmp_path_factory):
    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        msg = "Debian's dataset-fashion-mnist is not installed (make data installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("png")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "fashion_mnist_png.py"),
            str(out / "fm"),
            "--train-size",
            "2000",
            "--test-size",
            "500",
            "--data-dir",
            str(out / "data"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out / "fm"


def folder(png_tree, **kwargs):
    return image_folder(
        png_tree / "train", png_tree / "test", image_size=28, **{"augment": False, **kwargs}
    )


def train(
    data, out_dir, steps=30, workers=2, resume=False, checkpoint_every=None, uniform=False
) -> list[dict]:
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes, hidden_sizes=(64,))
    sampler = ImportanceSampler("upper_bound", batch_size=32, tau_threshold=1.0, tau_momentum=0.5)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        UniformSampler(32) if uniform else sampler,
        data,
        out_dir,
        budget=Budget(None, max_steps=steps, eval_every_seconds=None, eval_every_steps=10),
        runtime=Runtime("cpu"),
        train_eval_size=500,
        eval_batch_size=256,
        loader=LoaderOptions(num_workers=workers, prefetch_factor=2),
        checkpoint_every=checkpoint_every,
        checkpoint_unit="steps",
        resume=resume,
        progress=False,
    )
    assert isinstance(
        trainer.source, LoaderSource if not isinstance(data, TensorDataset) else TensorSource
    )
    summary = trainer.fit()
    assert summary["status"] == "completed"
    return [
        {k: r[k] for k in COMPARED} for r in csv.DictReader(open(Path(out_dir) / "metrics.csv"))
    ]


def assert_same_rows(a_rows, b_rows):
    assert len(a_rows) == len(b_rows)
    for a, b in zip(a_rows, b_rows, strict=True):
        for k in COMPARED:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-7, nan_ok=True), k


@pytest.mark.slow
@pytest.mark.parametrize("uniform, workers", [(True, 2), (False, 0)])
def test_streaming_trains_exactly_like_the_in_memory_path(uniform, workers, png_tree, tmp_path):
    """Without augmentation both paths see the same pixels in the same order: the same run.
    (With worker processes the loader draws batches ahead, so an importance sampler's switch
    acts a few steps later than in memory: exact for uniform sampling, or without workers.)"""
    in_memory = train(folder(png_tree), tmp_path / "memory", uniform=uniform)
    streamed = train(
        folder(png_tree, stream=True), tmp_path / "stream", workers=workers, uniform=uniform
    )
    assert float(in_memory[-1]["train_loss"]) < 0.9 * float(in_memory[0]["train_loss"])
    assert_same_rows(in_memory, streamed)


@pytest.mark.slow
def test_importance_sampling_through_worker_processes_learns_like_in_memory(png_tree, tmp_path):
    in_memory = train(folder(png_tree), tmp_path / "memory", steps=60)
    streamed = train(folder(png_tree, stream=True), tmp_path / "stream", steps=60, workers=2)
    assert float(streamed[-1]["scored"]) > 0  # importance sampling was on
    # the mean training loss of the last three rows: down alike, within the runs' noise
    final = [sum(float(row["train_loss"]) for row in r[-3:]) / 3 for r in (in_memory, streamed)]
    assert final[1] < 0.5 * float(streamed[0]["train_loss"])
    assert final[1] == pytest.approx(final[0], rel=0.3)


@pytest.mark.slow
def test_streaming_with_augmentation_in_the_workers_trains(png_tree, tmp_path):
    rows = train(folder(png_tree, stream=True, augment=True), tmp_path, steps=40)
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])


@pytest.mark.slow
def test_a_resumed_streaming_run_reads_the_same_batches_and_views(png_tree, tmp_path):
    """Augmentation is seeded per draw and the loader's prefetched batches are checkpointed:
    20 steps = 10 steps, a checkpoint, and 10 more steps resumed from it."""
    data = folder(png_tree, stream=True, augment=True)
    reference = train(data, tmp_path / "reference", steps=20)
    train(data, tmp_path / "resumed", steps=10, checkpoint_every=10)
    resumed = train(data, tmp_path / "resumed", steps=20, resume=True, checkpoint_every=10)
    assert resumed == reference


def test_any_tensor_dataset_streams_item_by_item(tmp_path):
    from importance_sampling.engine.data import digits

    data = digits()
    streamed = data.streaming()
    x, y = streamed.train[5]
    assert torch.equal(x, data.train_x[5]) and int(y) == int(data.train_y[5])
    rows = train(streamed, tmp_path, steps=20, workers=0)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.slow
def test_grey_pngs_stay_one_channel_and_a_split_folder_is_named_after_its_dataset(png_tree):
    streamed = folder(png_tree, stream=True)
    assert streamed.input_shape == (1, 28, 28) and streamed.name == png_tree.name
    x, _ = streamed.train_eval[0]
    assert x.shape == (1, 28, 28)
    in_memory = folder(png_tree)
    assert in_memory.train_x.shape[1:] == (1, 28, 28) and in_memory.name == png_tree.name
    rgb = folder(png_tree, channels=3)  # a network that asks for three gets three
    assert rgb.train_x.shape[1:] == (3, 28, 28)
    torch.testing.assert_close(rgb.train_x[:, 0] * 0.229 + 0.485, rgb.train_x[:, 1] * 0.224 + 0.456)
    with pytest.raises(ValueError, match="dataset.channels must be 1, 3 or null"):
        folder(png_tree, channels=2)


@pytest.mark.slow
def test_a_torchvision_resnet_takes_grey_images_as_three_equal_channels():
    from importance_sampling.engine.models import TorchvisionResNet

    torch.manual_seed(0)
    model = TorchvisionResNet((1, 32, 32), 10, arch="resnet18", weights=None).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x.expand(-1, 3, -1, -1)))
