"""What the scale-out paths cost, measured side by side on this machine.

    python scripts/benchmark_scale.py loading    # in memory vs streamed vs a bare DataLoader loop
    python scripts/benchmark_scale.py ddp        # 2 data-parallel CPU processes vs 1 process

``loading``: on Fashion-MNIST with the MLP, importance steps of the upper-bound sampler (b = 128
of B = 384), steps/s of the in-memory path (tensors on the device) and of the streaming path
(the same data read item by item through a DataLoader with worker processes), and the
streaming path's overhead over a bare loop that does the same steps by hand over a plain
DataLoader of presamples (score, resample, weighted step) with the same workers. The three are
timed in interleaved blocks in one process; the medians of the blocks are reported.

``ddp``: one training run of the same global batch on 1 process and on 2 processes (torchrun,
gloo, one thread each), from the runs' own train_time; on a 2-core CPU two processes share the
cores the single one had, so this measures the overhead of the collectives, not a speedup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def loading(args) -> list[str]:
    from torch.utils.data import DataLoader

    from importance_sampling.core.samplers import ImportanceSampler
    from importance_sampling.core.sampling import importance_probabilities, resample
    from importance_sampling.core.scores import cross_entropy, upper_bound_scores
    from importance_sampling.engine.budget import Budget
    from importance_sampling.engine.data import fashion_mnist
    from importance_sampling.engine.models import MLP
    from importance_sampling.engine.runtime import Runtime
    from importance_sampling.engine.sources import LoaderOptions
    from importance_sampling.engine.trainer import Trainer

    torch.set_num_threads(args.threads)
    data = fashion_mnist(ROOT / "data")
    streamed = data.streaming()

    def make(d):
        torch.manual_seed(0)
        model = MLP(data.input_shape, data.num_classes)
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            ImportanceSampler("upper_bound", 128, 384),
            d,
            tempfile.mkdtemp(),
            budget=Budget(None, max_steps=10**9, eval_every_seconds=None, eval_every_steps=10**9),
            runtime=Runtime(args.device),
            loader=LoaderOptions(num_workers=args.workers),
            progress=False,
        )
        trainer.train_model.train()
        return trainer

    memory, stream = make(data), make(streamed)
    for t in (memory, stream):
        t.sampler.switch.tau = float("inf")  # every step an importance step
    # the same importance steps written by hand over a plain DataLoader of presamples
    torch.manual_seed(0)
    bare_model = MLP(data.input_shape, data.num_classes).to(memory.device)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.05, momentum=0.9)
    bare_loader = DataLoader(
        streamed.train,
        batch_size=384,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        drop_last=True,
    )

    def bare_batches():
        while True:
            yield from bare_loader

    bare_it = bare_batches()

    def bare_step():
        x, y = next(bare_it)
        x, y = x.to(memory.device), y.to(memory.device)
        with torch.no_grad():  # in forwards of b points, as the sampler scores
            scores = upper_bound_scores(torch.cat([bare_model(c) for c in x.split(128)]), y)
        positions, weights = resample(importance_probabilities(scores, check=False), 128)
        loss = (weights * cross_entropy(bare_model(x[positions]), y[positions])).mean()
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    paths = {
        "in memory": memory.train_step,
        "streamed": stream.train_step,
        "bare DataLoader": bare_step,
    }
    for fn in paths.values():  # warm-up: workers started, the switch on
        for _ in range(20):
            fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.blocks):
        for name, fn in paths.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            memory.runtime.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        "| path | ms per step | steps/s | vs in memory |",
        "|---|---|---|---|",
        *(
            f"| {k} | {1000 * v:.2f} | {1 / v:.0f} | {v / med['in memory']:.2f} |"
            for k, v in med.items()
        ),
        "",
        f"streamed / bare DataLoader loop: {med['streamed'] / med['bare DataLoader']:.2f}",
        f"Fashion-MNIST MLP, importance steps (upper bound, b = 128 of B = 384), "
        f"device={memory.device}, torch threads={args.threads}, DataLoader workers="
        f"{args.workers}, medians of {args.blocks} interleaved blocks of {args.steps} steps",
    ]


def ddp(args) -> list[str]:
    common = [
        "dataset=fashion_mnist",
        "sampler=upper_bound",
        "trainer.time_budget=null",
        f"trainer.max_steps={args.ddp_steps}",
        "trainer.eval_every_seconds=null",
        f"trainer.eval_every_steps={args.ddp_steps}",
        "trainer.progress=false",
    ]
    out = Path(tempfile.mkdtemp())
    runs = {
        "1 process, 2 threads": [sys.executable, str(ROOT / "train.py"), "threads=2"],
        "1 process, 1 thread": [sys.executable, str(ROOT / "train.py"), "threads=1"],
        "2 processes (gloo), 1 thread each": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            "threads=1",
        ],
    }
    if getattr(args, "parallel_only", False):  # a check of the code, not a figure
        runs = {name: cmd for name, cmd in runs.items() if "gloo" in name}
    lines = [
        "| run | steps | train_time (s) | ms per step | importance steps |",
        "|---|---|---|---|---|",
    ]
    for name, cmd in runs.items():
        run_dir = out / "".join(c if c.isalnum() else "_" for c in name)
        subprocess.run([*cmd, *common, f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
        s = json.loads((run_dir / "summary.json").read_text())
        lines.append(
            f"| {name} | {s['step']} | {s['train_time']:.1f} | "
            f"{1000 * s['train_time'] / s['step']:.1f} | {s['importance_steps']} |"
        )
    lines.append(
        "\nFashion-MNIST MLP, upper_bound, b = 128 and B = 384 in total (64 and 192 per process "
        "with 2), the same seed; one run after another."
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["loading", "ddp"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (loading)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (loading)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed block (loading)")
    parser.add_argument("--blocks", type=int, default=10, help="timed blocks per path (loading)")
    parser.add_argument("--ddp-steps", type=int, default=1000, help="steps per run (ddp)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    lines = loading(args) if args.what == "loading" else ddp(args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
