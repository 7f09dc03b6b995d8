"""Does the sampler add anything beyond the extra forward pass the algorithm needs?

For each experiment preset, times side by side in one process (interleaved, median of many; the
uniform and the bare step timed warm, after an untimed uniform step, in alternating order):
  uniform   one uniform SGD step on b points;
  bare      the same step written as a plain PyTorch loop (random indices into the same tensors,
            the same augmentation, forward, loss, backward, optimizer step): what the trainer,
            the sampler and the data path add to a uniform step;
  forward   the training forward of that step alone (b points, autograd on, train mode);
  score     the sampler's scoring forward over B points (no autograd; the upper-bound score);
  is_step   one importance-sampling step (presample B, score, resample b, weighted SGD step).
It reports is_step / (uniform + score), which should stay near 1 (the sampler adds nothing but
its scoring), and the scoring cost per point over the training forward's per point, which the
paper's cost model takes as 1 (at most 1.2 here). The last column, uniform step x steps per
epoch, is the expected time of an epoch at that scale (--scale gpu on a GPU for the paper's).

    python scripts/benchmark_step.py                      # every preset at CPU scale (scale=cpu)
    python scripts/benchmark_step.py --scale gpu          # the paper's scale (on a GPU)
    python scripts/benchmark_step.py --presets cifar10_wrn --reps 50

Datasets that are not on disk are replaced by random tensors of the same shape, size and
augmentation (``--synthetic``, on by default), and pretrained weights by a random
initialisation: the timings depend on shapes only. Writes a markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from importance_sampling.config import builder
from importance_sampling.config.builder import build_dataset, build_trainer
from importance_sampling.config.schema import config_error_line
from importance_sampling.config.sweeps import split_overrides
from importance_sampling.core.samplers import ImportanceSampler
from importance_sampling.engine.data import DataError, RandomCropFlip, TensorDataset, synthetic

ROOT = Path(__file__).resolve().parents[1]

PRESETS = [
    "fashion_mnist_mlp",
    "cifar10_wrn",
    "cifar100_wrn",
    "finetune_resnet",
    "pixel_mnist_lstm",
]


def compose(preset: str, scale: str, overrides: list[str], sampler: str = "upper_bound"):
    """The preset with ``sampler``; ``sampler.*`` overrides reach the importance sampler only."""
    if sampler == "uniform":
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("sampler.")]
    return builder.compose(
        f"experiment={preset}",
        f"scale={scale}",
        f"sampler={sampler}",
        "trainer.progress=false",
        *overrides,
    )


# Training-set sizes of the real datasets (MIT67: 80 training images for each of 67 classes).
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "image_folder": 5_360}


def synthetic_like(cfg) -> TensorDataset:
    """Random tensors with the shape, size and augmentation the preset's dataset would have."""
    d = cfg.dataset
    target = d._target_.rsplit(".", 1)[-1]
    augment = None
    if target == "pixel_mnist":
        shape, classes = ((28 // d.downsample) ** 2, 1), 10
    elif target == "image_folder":
        shape, classes = (3, d.image_size, d.image_size), 67
        augment = RandomCropFlip(d.image_size // 8) if d.augment else None
    elif target in ("cifar10", "cifar100", "svhn"):
        shape, classes = (3, 32, 32), 100 if target == "cifar100" else 10
        augment = RandomCropFlip(4) if d.get("augment") else None
    else:
        shape, classes = (1, 28, 28), 10
    n = d.get("train_size") or TRAIN_SIZES.get(target, 60_000)
    n_test = d.get("test_size") or 1000  # evaluation is not timed
    data = synthetic(shape, classes, n, n_test, name=f"synthetic_{target}")
    data.augment = augment
    return data


def preset_data(cfg, synthetic: bool = True) -> TensorDataset:
    """The preset's dataset, or (``synthetic``, when it is not on disk) random tensors like it."""
    try:
        return build_dataset(cfg.dataset)
    except DataError:
        if not synthetic:
            raise
        return synthetic_like(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def benchmark(preset: str, scale: str, reps: int, synthetic: bool, overrides: list[str]) -> dict:
    cfg = compose(preset, scale, overrides)
    if cfg.model.get("weights"):  # random init: the timings do not depend on the weights' values
        overrides = [*overrides, "model.weights=null"]
        cfg = compose(preset, scale, overrides)
    data = preset_data(cfg, synthetic)
    # two trainers of the same network on the same data: one samples uniformly, one by importance
    trainers = {
        sampler: build_trainer(compose(preset, scale, overrides, sampler), tempfile.mkdtemp(), data)
        for sampler in ("uniform", "upper_bound")
    }
    trainer = trainers["upper_bound"]
    importance = trainer.sampler
    assert isinstance(importance, ImportanceSampler)
    b, B = importance.batch_size, importance.presample_size
    importance.switch.tau = float("inf")  # always on: every presample has B points

    def uniform_step():
        trainers["uniform"].train_step()

    def is_step():
        trainer.train_step()

    def score():
        presample = next(trainer.source)
        with trainer.runtime.autocast():
            importance.scores(trainer.forward, presample.x, presample.y, trainer.loss_fn)

    uniform = trainers["uniform"]

    def forward():  # the training forward of a uniform step: b points, autograd on
        presample = next(uniform.source)
        with uniform.runtime.autocast():
            uniform.loss_fn(uniform.train_model(presample.x), presample.y).mean()

    tensors = uniform.source.data  # the training set, on the device
    generator = torch.Generator(uniform.device).manual_seed(0)

    def bare_step():  # a plain loop: indices, gather, augment, forward, loss, backward, step
        idx = torch.randint(len(tensors.train_y), (b,), device=uniform.device, generator=generator)
        x = tensors.train_x[idx]
        if tensors.augment is not None:
            x = tensors.augment(x, generator)
        with uniform.runtime.autocast():
            loss = torch.nn.functional.cross_entropy(uniform.train_model(x), tensors.train_y[idx])
        uniform.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        uniform.optimizer.step()

    for t in trainers.values():
        t.train_model.train()
    for fn in (uniform_step, bare_step, forward, score, is_step):  # warm-up (allocator, ...)
        for _ in range(3):
            fn()
    times = {"uniform": [], "bare": [], "forward": [], "score": [], "is_step": []}
    pair = [("uniform", uniform_step), ("bare", bare_step)]
    for _ in tqdm(range(reps), desc=preset, leave=False):  # interleaved: drifts hit them all
        # The uniform and the bare step share one network: an untimed step brings its weights,
        # gradients and optimizer state back into the caches after the importance trainer's
        # steps, then both are timed warm, first one then the other (whichever went first paid
        # for the other network's steps: 10% of a Fashion-MNIST MLP step)
        uniform_step()
        for name, fn in pair:
            times[name].append(timed(fn, trainer.device))
        pair.reverse()
        times["forward"].append(timed(forward, trainer.device))
        times["score"].append(timed(score, trainer.device))
        times["is_step"].append(timed(is_step, trainer.device))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    ratio = med["is_step"] / (med["uniform"] + med["score"])
    per_point = (med["score"] / B) / (med["forward"] / b)
    return {
        "preset": preset,
        "data": data.name,
        "b": b,
        "B": B,
        **med,
        "ratio": ratio,
        "ok": ratio <= 1.10,
        "per_point": per_point,
        "chunk": importance.chunk_size,
        # a uniform epoch over this scale's training set: the expected time per epoch
        "epoch_s": med["uniform"] / 1000 * math.ceil(trainer.num_samples / b),
        "device": str(trainer.device),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=PRESETS, metavar="PRESET")
    parser.add_argument("--scale", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--reps", type=int, default=30, help="timed repetitions of each measurement"
    )
    parser.add_argument(
        "--no-synthetic",
        dest="synthetic",
        action="store_false",
        help="fail when a dataset is missing instead of using random tensors",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the table as markdown here")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with 1 when an importance step costs more than 1.10 x (uniform + score)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides (key=value), e.g. threads=2 device=cuda"
    )
    args, overrides = split_overrides(parser)  # a key=value may follow --presets
    args.overrides = overrides

    rows = []
    header = (
        "| preset | data | b | B | uniform step (ms) | bare loop step (ms) | uniform / bare "
        "| training forward over b (ms) | scoring over B (ms) "
        "| scoring per point / training forward per point | importance step (ms) "
        "| IS / (uniform + score) | uniform epoch (s) |"
    )
    lines = [header, "|" + "---|" * 13]
    print(header)
    for preset in args.presets:
        try:
            r = benchmark(preset, args.scale, args.reps, args.synthetic, args.overrides)
        except (HydraException, OmegaConfBaseException) as e:  # a preset or override that is wrong
            print(f"error: {config_error_line(e)}", file=sys.stderr)
            return 2
        rows.append(r)
        line = (
            f"| {r['preset']} | {r['data']} | {r['b']} | {r['B']} | {r['uniform']:.2f} | "
            f"{r['bare']:.2f} | {r['uniform'] / r['bare']:.2f} | "
            f"{r['forward']:.2f} | {r['score']:.2f} (chunks of {r['chunk']}) | "
            f"{r['per_point']:.2f} | {r['is_step']:.2f} | "
            f"{r['ratio']:.2f} {'ok' if r['ok'] else 'OVER 1.10'} | {r['epoch_s']:.1f} |"
        )
        lines.append(line)
        print(line, flush=True)
    device = rows[0]["device"] if rows else "?"
    note = (
        f"\nscale={args.scale}, device={device}, torch threads={torch.get_num_threads()}, "
        f"median of {args.reps} interleaved repetitions."
    )
    print(note)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n" + note + "\n")
    over = [r["preset"] for r in rows if not r["ok"]]
    if over:  # a busy machine does this too: timings need an idle one
        print(f"over 1.10: {', '.join(over)} (on an otherwise idle machine, this is overhead)")
    return 1 if over and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
