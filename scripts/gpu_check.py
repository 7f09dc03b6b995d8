"""Every GPU figure the docs leave open, in one command of a few minutes (make gpu-check).

    python scripts/gpu_check.py                   # on a machine with a GPU: results/gpu_<name>.md
    python scripts/gpu_check.py --dry-run         # the same code on the CPU at tiny sizes (tests)

Without a CUDA device (and without --dry-run) it says so in one line and exits with 0. On one:
  1. the step at the paper's scale (cifar10_wrn, WRN-28-2, b = 128, B = 384, bf16 autocast,
     channels_last; CIFAR-10's shapes and augmentation on synthetic data): a uniform step
     against a bare bf16 loop, an importance step against a uniform step plus its scoring, and
     the scoring's cost per point against the training forward's;
  2. host synchronisations per step, counted with torch.cuda.set_sync_debug_mode("warn") over
     steps of the uniform and of the importance sampler (one is expected: the switch's
     decision, read a step late; none should wait for the GPU's work);
  3. the exact gradient norms' CUDA column under bf16 autocast (WRN-16-2 at B = 96, WRN-28-2
     at B = 384), against a forward + backward;
  4. a one-GPU torchrun (NCCL) run of cifar10_wrn on synthetic data for a few hundred steps.
Each part is timed, and a part that fails is reported as failed without stopping the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_part(dry: bool) -> list[str]:
    step = script("benchmark_step")
    overrides = ["device=cpu", "dataset.train_size=512", "sampler.batch_size=8"] if dry else []
    r = step.benchmark("cifar10_wrn", "cpu" if dry else "gpu", 2 if dry else 20, True, overrides)
    return [
        "| uniform step (ms) | bare bf16 loop (ms) | uniform / bare | scoring over B (ms) "
        "| scoring per point / training forward per point | importance step (ms) "
        "| IS / (uniform + score) | uniform epoch (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['uniform']:.2f} | {r['bare']:.2f} | {r['uniform'] / r['bare']:.2f} | "
        f"{r['score']:.2f} (chunks of {r['chunk']}) | {r['per_point']:.2f} | {r['is_step']:.2f} "
        f"| {r['ratio']:.2f} | {r['epoch_s']:.1f} |",
        "",
        f"cifar10_wrn at the paper's scale: b = {r['b']}, B = {r['B']}, {r['data']}, "
        f"device {r['device']}, medians of interleaved repetitions.",
    ]


def syncs_part(dry: bool) -> list[str]:
    from importance_sampling.config import builder
    from importance_sampling.engine.data import synthetic

    lines = ["| sampler | steps | host synchronisations | per step |", "|---|---|---|---|"]
    device = "cpu" if dry else "cuda"
    size = 512 if dry else 50_000
    data = synthetic((3, 32, 32), 10, size, 256, augment=True)
    for sampler in ("uniform", "upper_bound"):
        cfg = builder.compose(
            "experiment=cifar10_wrn",
            f"scale={'cpu' if dry else 'gpu'}",
            f"sampler={sampler}",
            f"device={device}",
            "trainer.progress=false",
            *(
                ["sampler.tau_threshold=1", "sampler.tau_momentum=0"]
                if sampler != "uniform"
                else []
            ),
        )
        trainer = builder.build_trainer(cfg, tempfile.mkdtemp(), data)
        trainer.train_model.train()
        for _ in range(2 if dry else 5):  # warm-up; the switch turns importance sampling on
            trainer.train_step()
        steps, count = 5 if dry else 20, -1
        if not dry:
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(steps):
                        trainer.train_step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            count = sum("synchroniz" in str(w.message) for w in caught)
        else:
            for _ in range(steps):
                trainer.train_step()
        per_step = f"{count / steps:.2f}" if count >= 0 else "n/a (CPU)"
        shown = count if count >= 0 else "n/a"
        lines.append(f"| {sampler} | {steps} | {shown} | {per_step} |")
    return lines


def norms_part(dry: bool) -> list[str]:
    scores = script("benchmark_scores")
    device = torch.device("cpu" if dry else "cuda")

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    lines = [
        "| model | B | upper bound (ms) | forward + backward (ms) | exact norms (ms) "
        "| exact / (fwd+bwd) | max rel. diff to vmap |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ["wrn-10-1"] if dry else ["wrn-16-2", "wrn-28-2"]:
        r = scores.bench(name, device, amp, 1 if dry else 10)
        lines.append(
            f"| {name} | {r['B']} | {r['upper_bound']:.1f} | {r['fwd_bwd']:.1f} | {r['new']:.1f} "
            f"| {r['new'] / r['fwd_bwd']:.2f} | {r['max_rel_diff']:.0e} |"
        )
    return lines


def torchrun_part(dry: bool) -> list[str]:
    out = Path(tempfile.mkdtemp()) / "run"
    steps = 5 if dry else 300
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(ROOT / "train.py"),
        "experiment=cifar10_wrn",
        "dataset=synthetic",
        "dataset.augment=true",
        "trainer.time_budget=null",
        f"trainer.max_steps={steps}",
        "trainer.eval_every_seconds=null",
        f"trainer.eval_every_steps={steps}",
        "trainer.progress=false",
        f"hydra.run.dir={out}",
    ]
    if dry:
        cmd += ["scale=cpu", "device=cpu", "dataset.train_size=512", "dataset.test_size=64"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with {done.returncode}: {done.stderr[-1500:]}")
    s = json.loads((out / "summary.json").read_text())
    backend = "gloo (CPU)" if dry else "NCCL"
    return [
        f"torchrun --nproc_per_node=1, {backend}: {s['step']} steps in {s['train_time']:.1f} s of "
        f"train_time ({1000 * s['train_time'] / s['step']:.1f} ms a step), "
        f"{s['importance_steps']} importance steps, status {s['status']}, "
        f"machine share {s.get('machine_share') or float('nan'):.2f}.",
    ]


PARTS = {
    "The step at the paper's scale": step_part,
    "Host synchronisations per step": syncs_part,
    "Exact gradient norms under bf16 autocast": norms_part,
    "One GPU through torchrun (NCCL)": torchrun_part,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run every part on the CPU at tiny sizes"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: results/gpu_<name>.md")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: nothing to measure (make gpu-check on a GPU)")
        return 0
    name = "cpu dry run" if args.dry_run else torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = args.out or (
        ROOT / "outputs" / f"gpu_{slug}.md" if args.dry_run else ROOT / "results" / f"gpu_{slug}.md"
    )
    started = time.perf_counter()
    text = [
        f"# GPU check: {name}",
        "",
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}"
        + ("" if args.dry_run else f", CUDA {torch.version.cuda}"),
        "Command: python scripts/gpu_check.py" + (" --dry-run" if args.dry_run else ""),
    ]
    failed = 0
    for title, part in PARTS.items():
        part_start = time.perf_counter()
        print(f"gpu_check: {title} ...", flush=True)
        try:
            body = part(args.dry_run)
        except Exception as e:  # report it, go on with the other parts
            failed += 1
            body = [f"FAILED: {type(e).__name__}: {e}", "", "```", traceback.format_exc(), "```"]
        text += ["", f"## {title}", "", *body, "", f"({time.perf_counter() - part_start:.0f} s)"]
        print("\n".join(body), flush=True)
    text.append(f"\nTotal: {time.perf_counter() - started:.0f} s.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print(f"gpu_check: {len(PARTS) - failed}/{len(PARTS)} parts done -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
