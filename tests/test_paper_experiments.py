"""The paper's datasets, networks and presets (issue: CIFAR/WRN, fine-tuning, pixel MNIST LSTM).

Every loader reads small files that the tests write in the real on-disk format (idx files, CIFAR
python pickles, SVHN .mat files, an ImageFolder tree of PNGs); every preset trains a few steps
at CPU scale with every sampler through train.py's run().
"""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from importance_sampling.core.scores import cross_entropy, upper_bound_scores
from importance_sampling.engine.data import (
    DataError,
    RandomCropFlip,
    cifar10,
    cifar100,
    image_folder,
    mnist,
    pixel_mnist,
    svhn,
)
from importance_sampling.engine.models import (
    CNN,
    MLP,
    LSTMClassifier,
    TorchvisionResNet,
    WideResNet,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["uniform", "loss", "upper_bound", "gradient_norm"]
PRESETS = ["cifar10_wrn", "cifar100_wrn", "finetune_resnet", "pixel_mnist_lstm"]
FOUR_STEPS = [  # a preset at scale=cpu, cut to 4 steps with a metrics row every 2
    "threads=1",
    "trainer.time_budget=null",
    "trainer.max_steps=4",
    "trainer.eval_every_steps=2",
    "trainer.eval_every_seconds=null",
    "trainer.progress=false",
    "trainer.train_eval_size=64",
    "dataset.test_size=32",
]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_cifar(folder: Path, files: dict[str, int], label_key: bytes, classes: int, rng) -> None:
    folder.mkdir(parents=True)
    for name, n in files.items():
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [i % classes for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory holding every dataset, tiny, in its real on-disk format."""
    from PIL import Image
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 200), ("t10k", 50)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    write_cifar(
        root / "cifar-10-batches-py",
        {**{f"data_batch_{i}": 40 for i in range(1, 6)}, "test_batch": 50},
        b"labels",
        10,
        rng,
    )
    write_cifar(root / "cifar-100-python", {"train": 200, "test": 50}, b"fine_labels", 100, rng)
    (root / "svhn").mkdir()
    for split, n in (("train", 120), ("test", 30)):
        savemat(
            root / "svhn" / f"{split}_32x32.mat",
            {
                "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                "y": (np.arange(n) % 10 + 1).reshape(-1, 1),
            },
        )  # labels 1..10, 10 is the digit 0
    for split, n in (("train", 64), ("test", 16)):
        for c in ("bedroom", "kitchen", "library", "office"):
            folder = root / "mit67" / split / c
            folder.mkdir(parents=True)
            for i in range(n // 4):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png"
                )
    return root


def test_mnist_and_pixel_mnist(data_dir):
    data = mnist(data_dir)
    assert data.train_x.shape == (200, 1, 28, 28) and data.test_y.tolist()[:3] == [0, 1, 2]
    seq = pixel_mnist(data_dir)
    assert seq.input_shape == (784, 1)
    torch.testing.assert_close(seq.train_x[:, :, 0], data.train_x.flatten(1))
    permuted = pixel_mnist(data_dir, permute=True)
    assert not torch.equal(permuted.train_x, seq.train_x)
    torch.testing.assert_close(permuted.train_x.sort(1).values, seq.train_x.sort(1).values)
    assert pixel_mnist(data_dir, downsample=4).input_shape == (49, 1)


@pytest.mark.parametrize("loader, classes", [(cifar10, 10), (cifar100, 100)])
def test_cifar_pickles(loader, classes, data_dir):
    data = loader(data_dir, train_size=150)
    assert data.train_x.shape == (150, 3, 32, 32) and data.num_classes == classes
    assert data.train_y.tolist()[:3] == [0, 1, 2] and len(data.test_x) == 50
    assert isinstance(data.augment, RandomCropFlip)
    assert data.train_x.mean(dim=(0, 2, 3)).abs().max() < 0.1  # per-channel standardised


def test_svhn_mat_files_map_label_10_to_digit_0(data_dir):
    data = svhn(data_dir)
    assert data.train_x.shape == (120, 3, 32, 32)
    assert data.train_y.tolist()[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_image_folder(data_dir):
    data = image_folder(data_dir / "mit67" / "train", data_dir / "mit67" / "test", image_size=32)
    assert data.train_x.shape == (64, 3, 32, 32) and data.test_x.shape == (16, 3, 32, 32)
    assert data.num_classes == 4 and data.name == "mit67"  # the split folder's parent
    split = image_folder(data_dir / "mit67" / "train", image_size=16, test_fraction=0.25)
    assert len(split.train_x) == 48 and torch.bincount(split.test_y).tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: mnist(d / "nothing"), "dataset=mnist dataset.download=true"),
        (lambda d: cifar10(d / "nothing"), "dataset=cifar10 dataset.download=true"),
        (lambda d: cifar100(d / "nothing"), "dataset=cifar100 dataset.download=true"),
        (lambda d: svhn(d / "nothing"), "dataset=svhn dataset.download=true"),
        (
            lambda d: image_folder(d / "nothing"),
            "set dataset.root to a folder of class sub-folders",
        ),
    ],
)
def test_missing_data_says_how_to_get_it(call, message, tmp_path):
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        call(tmp_path)


def test_truncated_cifar_pickle_is_a_clear_error(data_dir, tmp_path):
    import shutil

    shutil.copytree(data_dir / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        cifar10(tmp_path)


def test_random_crop_flip_shifts_and_mirrors_each_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(x, gen), x)
    flipped = RandomCropFlip(padding=0, flip=True)(x.repeat(20, 1, 1, 1), gen)
    kinds = {
        (torch.equal(f, o), torch.equal(f, o.flip(2)))
        for f, o in zip(flipped, x.repeat(20, 1, 1, 1), strict=True)
    }
    assert kinds == {(True, False), (False, True)}  # both outcomes happen, nothing else
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for out, p in zip(RandomCropFlip(padding=2, flip=False)(x, gen), padded, strict=True):
        windows = [p[:, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out, w) for w in windows)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: MLP((1, 8, 8), 10), (1, 8, 8)),
        (lambda: CNN((1, 8, 8), 10), (1, 8, 8)),
        (lambda: WideResNet((3, 32, 32), 10, depth=10, widen_factor=1), (3, 32, 32)),
        (lambda: TorchvisionResNet((3, 32, 32), 10, arch="resnet18", weights=None), (3, 32, 32)),
        (lambda: LSTMClassifier((20, 1), 10, hidden_size=8), (20, 1)),
    ],
)
def test_upper_bound_of_every_model_equals_autograd_on_its_logits(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x, y = torch.randn(6, *shape), torch.randint(0, 10, (6,))
    logits = model(x)
    logits.retain_grad()
    cross_entropy(logits, y).sum().backward()  # d(sum_i L_i)/dz_i = dL_i/dz_i
    torch.testing.assert_close(upper_bound_scores(logits, y), logits.grad.norm(dim=1))


def test_frozen_backbone_trains_only_the_head():
    model = TorchvisionResNet((3, 32, 32), 5, arch="resnet18", weights=None, freeze="backbone")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["net.fc.weight", "net.fc.bias"]


def test_pretrained_weights_load_from_a_file_or_say_how_to_get_them(tmp_path, monkeypatch):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    model = TorchvisionResNet((3, 32, 32), 3, arch="resnet18", weights=str(path))
    torch.testing.assert_close(model.net.conv1.weight, torch.load(path)["conv1.weight"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="weights='IMAGENET1K_V1'"):
        TorchvisionResNet((3, 32, 32), 3, arch="resnet18", weights="imagenet")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_at_cpu_scale_with_every_sampler(
    preset, sampler, data_dir, compose, tmp_path, monkeypatch
):
    from importance_sampling.config import builder

    monkeypatch.setenv("IS_DATA_DIR", str(data_dir))
    cfg = compose(
        f"experiment={preset}",
        "scale=cpu",
        f"sampler={sampler}",
        *FOUR_STEPS,
        *([] if sampler == "uniform" else ["sampler.tau_threshold=1", "sampler.tau_momentum=0"]),
        # the ResNet's cpu scale (64 pixels) runs with the uniform sampler; the importance
        # samplers run the same code at 32 pixels, a quarter of the time
        *(
            ["dataset.image_size=32"]
            if preset == "finetune_resnet" and sampler != "uniform"
            else []
        ),
    )
    summary = builder.run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["step"] == 4
    if sampler != "uniform":
        assert summary["importance_steps"] >= 2  # tau from the first uniform step switches it on
    assert (tmp_path / "metrics.csv").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_the_cuda_code_paths_run_on_the_cpu(preset, data_dir, compose, tmp_path, monkeypatch):
    """bf16 autocast and channels_last are on by default on CUDA only; forcing them on the CPU
    runs the same code (scoring under autocast, NHWC data, row-level finiteness checks)."""
    from importance_sampling.config import builder

    monkeypatch.setenv("IS_DATA_DIR", str(data_dir))
    cfg = compose(
        f"experiment={preset}",
        "scale=cpu",
        "sampler=upper_bound",
        "trainer.amp=true",
        "trainer.channels_last=true",
        "trainer.check_finite=row",
        *FOUR_STEPS,
        "sampler.tau_threshold=1",
        "sampler.tau_momentum=0",
        # bf16 convolutions are slow on a CPU: the ResNet at 32 pixels runs the same code
        *(["dataset.image_size=32"] if preset == "finetune_resnet" else []),
    )
    trainer = builder.build_trainer(cfg, tmp_path)
    x = trainer.source.data.train_x[:4]
    if x.dim() == 4:
        assert x.is_contiguous(memory_format=torch.channels_last)
    with trainer.runtime.autocast():
        assert trainer.forward(x).dtype == torch.bfloat16
    summary = trainer.fit()
    assert summary["status"] == "completed" and summary["importance_steps"] >= 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
def test_benchmark_script_prints_the_three_timings(tmp_path):
    """Smoke test only: the speed target itself is read off the script's output, not asserted."""
    import subprocess
    import sys

    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark_step.py"),
            "--presets",
            "pixel_mnist_lstm",
            "--reps",
            "2",
            "--out",
            str(out),
            "threads=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "IS_DATA_DIR": str(tmp_path / "none")},
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "| pixel_mnist_lstm | synthetic_pixel_mnist | 32 | 96 |" in out.read_text()


def test_the_step_benchmark_times_a_pretrained_preset_at_random_init(tmp_path, monkeypatch):
    """A preset with pretrained weights (finetune_resnet at the paper's scale asks for
    ImageNet's) is timed at random init: the weights' values do not change the timings, and
    the file may not be there (no hub cache here)."""
    from conftest import load_script

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_hub_cache"))
    monkeypatch.setenv("IS_DATA_DIR", str(tmp_path / "none"))
    step = load_script("benchmark_step")
    result = step.benchmark("finetune_resnet", "cpu", 1, True, ["model.weights=imagenet"])
    assert result["data"] == "synthetic_image_folder" and result["uniform"] > 0


def test_mnist_family_augmentation_is_off_by_default_and_crops_on_request(data_dir):
    assert mnist(data_dir).augment is None
    crop = mnist(data_dir, augment=True).augment
    assert isinstance(crop, RandomCropFlip) and (crop.padding, crop.flip) == (3, False)


def test_the_long_regime_preset_trains_augmented_with_the_step_schedule(compose, tmp_path):
    """experiment=fashion_mnist_cnn_long at scale=cpu (Debian's Fashion-MNIST files): the
    augmentation is on (crop and flip), the schedule is cifar10_wrn's step schedule, and the run
    records the measured costs that the auto threshold compares tau with."""
    from importance_sampling.config import builder
    from importance_sampling.engine.data import DEBIAN_FASHION_MNIST

    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (make data)")
    cfg = compose(
        "experiment=fashion_mnist_cnn_long",
        "scale=cpu",
        "sampler=upper_bound_auto",
        "trainer.time_budget=null",
        "trainer.max_steps=10",
        "trainer.eval_every_steps=5",
        "trainer.eval_every_seconds=null",
        "trainer.progress=false",
        "threads=1",
    )
    assert cfg.dataset.augment and cfg.trainer.lr_schedule == "step"
    assert (list(cfg.trainer.lr_milestones), cfg.trainer.lr_gamma) == ([0.5, 0.8], 0.2)
    data = builder.build_dataset(cfg.dataset)
    assert (data.augment.padding, data.augment.flip) == (3, True)
    summary = builder.run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["step"] == 10
    assert summary["cost_step_ms"] > 0 and summary["tau_threshold"] > 1
