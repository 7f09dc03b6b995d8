"""Every performance figure the docs quote, measured on this machine, into one markdown report.

    make bench                                     # = python scripts/bench.py --out results/bench_cpu.md
    python scripts/bench.py --out outputs/bench.md --threads 2
    python scripts/bench.py --quick                # a minute: every section, tiny sizes (the tests)

Sections, each timed side by side in one process (interleaved repetitions, medians) so that its
ratios hold on a machine that drifts:
  1. the step (scripts/benchmark_step.py): a uniform step against a bare PyTorch loop doing the
     same work, an importance step against a uniform step plus its scoring, and the scoring's
     cost per point against the training forward's, for the presets at scale=cpu;
  2. the exact gradient norms against a forward + backward over the same points, with the
     columns of BackPACK (BatchL2Grad) and Opacus (per-sample gradients, ghost clipping) when
     they are installed (pip install backpack-for-pytorch opacus), checked against ours;
  3. loading (scripts/benchmark_scale.py loading): in memory, streamed, and a bare DataLoader
     loop doing the same importance steps;
  4. data-parallel (scripts/benchmark_scale.py ddp): 2 gloo processes against 1;
  5. evaluation: the trainer's evaluation forward per point at several eval_batch_size values
     (what trainer.eval_batch_size=null chooses on this device, and why), with the loss and
     error each gives, which must not depend on the batch size.
The report says how much of the machine the benchmark got (the run-queue share of its threads
and children, as a training run measures it): figures measured on a busy machine are marked.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from importance_sampling.config.sweeps import split_overrides
from importance_sampling.engine.machine import STARVED_BELOW, MachineShare

ROOT = Path(__file__).resolve().parent.parent
STEP_PRESETS = [
    "fashion_mnist_mlp",
    "fashion_mnist_cnn",
    "cifar10_wrn",
    "finetune_resnet",
    "pixel_mnist_lstm",
]
NORM_MODELS = ["mlp", "cnn", "wrn-10-1", "lstm-32"]  # scripts/benchmark_scores.py's CPU models
LIBRARY_MODELS = ["mlp", "cnn"]  # what BackPACK and Opacus both support among them


def script(name: str):
    """scripts/<name>.py as a module (its functions, without running its main)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- 1. the step
def step_section(presets: list[str], reps: int, overrides: list[str]) -> list[str]:
    step = script("benchmark_step")
    lines = [
        "## The step",
        "",
        "uniform / bare: a uniform step of the trainer against the same step written as a plain "
        "loop (indices, gather, augmentation, forward, loss, backward, optimizer step), both "
        "timed warm (after an untimed uniform step of the same network) in alternating order. "
        "IS / (uniform + score): an importance step against a uniform step plus the sampler's "
        "scoring forward over B (1: the sampler adds nothing else). Scoring per point / "
        "training forward per point: the paper's cost model takes it as 1.",
        "",
        "| preset | b | B | uniform step (ms) | uniform / bare | scoring over B (ms) "
        "| scoring per point / training forward per point | importance step (ms) "
        "| IS / (uniform + score) | uniform epoch (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in presets:
        r = step.benchmark(preset, "cpu", reps, True, overrides)
        lines.append(
            f"| {preset} | {r['b']} | {r['B']} | {r['uniform']:.2f} | "
            f"{r['uniform'] / r['bare']:.2f} | {r['score']:.2f} | {r['per_point']:.2f} | "
            f"{r['is_step']:.2f} | {r['ratio']:.2f} | {r['epoch_s']:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------- 2. the exact norms
def library_paths(make: Callable, model: torch.nn.Module, chunk: int) -> dict[str, Callable]:
    """BackPACK's and Opacus' per-sample gradient norms of a copy of ``model``, chunk by chunk,
    for the libraries that are installed."""
    from importance_sampling.core.scores import cross_entropy  # noqa: F401 (the same loss)

    out: dict[str, Callable] = {}

    def chunked(fn):
        return lambda x, y: torch.cat(
            [fn(x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(x), chunk)]
        )

    def copy():  # train mode: Opacus records activations only there (no dropout, no BatchNorm)
        m = make()
        m.load_state_dict(model.state_dict())
        return m.train()

    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        bp_model = extend(copy())
        bp_loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

        def backpack_norms(x, y):
            bp_model.zero_grad()
            with backpack(BatchL2Grad()):
                bp_loss(bp_model(x), y).backward()
            return sum(p.batch_l2 for p in bp_model.parameters()).sqrt()

        out["BackPACK BatchL2Grad"] = chunked(backpack_norms)
    except ImportError:
        pass
    try:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        per_sample_model = copy()
        per_sample = GradSampleModule(per_sample_model, loss_reduction="sum")
        ghost = GradSampleModuleFastGradientClipping(
            copy(), max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="sum"
        )

        def opacus_norms(x, y):
            per_sample.zero_grad()
            torch.nn.functional.cross_entropy(per_sample(x), y, reduction="sum").backward()
            squares = [p.grad_sample.flatten(1).pow(2).sum(1) for p in per_sample.parameters()]
            return torch.stack(squares).sum(0).sqrt()

        def ghost_norms(x, y):
            ghost.zero_grad()
            torch.nn.functional.cross_entropy(ghost(x), y, reduction="sum").backward()
            return ghost.get_norm_sample()

        out["Opacus ghost clipping"] = chunked(ghost_norms)
        out["Opacus per-sample gradients"] = chunked(opacus_norms)
    except ImportError:
        pass
    return out


def norms_section(models: list[str], reps: int, quick: bool) -> list[str]:
    from importance_sampling.core.grad_norms import gradient_norm_scores
    from importance_sampling.core.scores import cross_entropy

    scores = script("benchmark_scores")
    rows, libraries = [], []
    for name in models:
        make, shape, B = scores.CPU[name]
        B = 48 if quick else B
        chunk = B // 3  # the sampler scores in chunks of b = B / 3
        torch.manual_seed(0)
        model = make().eval()
        x, y = torch.randn(B, *shape), torch.randint(0, 10, (B,))

        def fwd_bwd(model=model, x=x, y=y, chunk=chunk):
            for i in range(0, len(x), chunk):
                model.zero_grad(set_to_none=True)
                cross_entropy(model(x[i : i + chunk]), y[i : i + chunk]).mean().backward()

        def ours(model=model, x=x, y=y, chunk=chunk):
            return gradient_norm_scores(model, x, y, cross_entropy, chunk)

        paths = {"forward + backward": fwd_bwd, "ours": ours}
        if name in LIBRARY_MODELS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for label, fn in library_paths(make, model, chunk).items():
                    paths[label] = lambda fn=fn, x=x, y=y: fn(x, y)
        reference = ours()
        differences = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for label, fn in paths.items():
                if label not in ("forward + backward", "ours"):
                    got = fn()
                    differences[label] = ((got - reference).abs() / reference).max().item()
                    if label not in libraries:
                        libraries.append(label)
            times = {label: [] for label in paths}
            for _ in range(reps):
                for label, fn in paths.items():
                    start = time.process_time()
                    fn()
                    times[label].append(time.process_time() - start)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        rows.append((name, B, chunk, med, differences))
        print(
            name, {k: round(v / med["forward + backward"], 2) for k, v in med.items()}, flush=True
        )
    columns = ["ours", *libraries]
    lines = [
        "## The exact gradient norm",
        "",
        "Per-sample gradient norms of B points in chunks of b = B/3 (as the sampler scores), "
        "over a forward + backward of the same chunks: median process CPU time of interleaved "
        "repetitions. The libraries' norms are checked against ours (largest relative "
        "difference in brackets)."
        + ("" if libraries else " BackPACK and Opacus are not installed here."),
        "",
        "| model | B | forward + backward (ms) | "
        + " | ".join(f"{c} / (fwd+bwd)" for c in columns)
        + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for name, B, _, med, diffs in rows:
        cells = []
        for c in columns:
            if c not in med:
                cells.append("–")
            else:
                diff = f" [{diffs[c]:.0e}]" if c in diffs else ""
                cells.append(f"{med[c] / med['forward + backward']:.2f}{diff}")
        lines.append(
            f"| {name} | {B} | {med['forward + backward']:.1f} | " + " | ".join(cells) + " |"
        )
    return lines


# ---------------------------------------------------------------- 3, 4. loading and ranks
def loading_section(threads: int, quick: bool) -> list[str]:
    scale = script("benchmark_scale")
    args = SimpleNamespace(
        device="cpu",
        threads=threads,
        workers=1,
        steps=5 if quick else 50,
        blocks=1 if quick else 20,
    )
    return ["## Loading", "", *scale.loading(args)]


def ddp_section(quick: bool) -> list[str]:
    scale = script("benchmark_scale")
    return [
        "## Two ranks against one",
        "",
        *scale.ddp(SimpleNamespace(ddp_steps=20 if quick else 500, parallel_only=quick)),
    ]


# ---------------------------------------------------------------- 5. evaluation
EVAL_PRESETS = ["fashion_mnist_mlp", "fashion_mnist_cnn", "pixel_mnist_lstm"]
EVAL_BATCH_SIZES = [64, 128, 256, 1024, 4096]


def eval_section(presets: list[str], reps: int, quick: bool, overrides: list[str]) -> list[str]:
    from importance_sampling.engine.runtime import default_eval_batch_size
    from importance_sampling.engine.trainer import evaluate

    step = script("benchmark_step")
    points = 512 if quick else 4096
    reps = max(2, reps // 4)  # an evaluation is seconds long: fewer repetitions suffice
    sizes = EVAL_BATCH_SIZES[:3] if quick else EVAL_BATCH_SIZES
    default = default_eval_batch_size(torch.device("cpu"))
    lines = [
        "## Evaluation",
        "",
        f"The trainer's evaluation (loss and error, inference mode) over {points} training "
        "points, in ms per point, at each eval_batch_size; trainer.eval_batch_size=null "
        f"chooses {default} on a CPU (marked *). Loss difference: the largest relative "
        "difference from the first column's loss (the error must be equal).",
        "",
        "| preset | "
        + " | ".join(f"{s}{'*' if s == default else ''}" for s in sizes)
        + " | loss difference | error equal |",
        "|---|" + "---|" * (len(sizes) + 2),
    ]
    for preset in presets:
        cfg = step.compose(preset, "cpu", overrides)
        trainer = step.build_trainer(cfg, tempfile.mkdtemp(), step.preset_data(cfg))
        x, y = trainer.source.eval_inputs(torch.arange(min(points, trainer.num_samples)))

        def run(size: int, x=x, y=y, trainer=trainer) -> tuple[float, float]:
            batches = ((x[i : i + size], y[i : i + size]) for i in range(0, len(x), size))
            return evaluate(trainer.forward, batches, trainer.loss_fn, trainer.runtime)

        results = {size: run(size) for size in sizes}  # also the warm-up
        times: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(reps):  # interleaved: a drifting machine affects every size alike
            for size in sizes:
                start = time.perf_counter()
                run(size)
                times[size].append(time.perf_counter() - start)
        loss0, error0 = results[sizes[0]]
        diff = max(abs(loss - loss0) / max(abs(loss0), 1e-12) for loss, _ in results.values())
        same = all(error == error0 for _, error in results.values())
        cells = [f"{statistics.median(times[s]) / len(x) * 1e3:.3f}" for s in sizes]
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {diff:.1e} | {same} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write the report here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (step, norms)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks, not figures")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["step", "norms", "loading", "ddp", "eval"],
        choices=["step", "norms", "loading", "ddp", "eval"],
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the step section")
    args, overrides = split_overrides(parser, argv)
    torch.set_num_threads(args.threads)
    reps = 2 if args.quick else args.reps
    overrides = [f"threads={args.threads}", *overrides]
    if args.quick:  # the presets' smallest
        overrides += ["dataset.train_size=2000", "dataset.test_size=200"]
    started, machine = time.perf_counter(), MachineShare()
    machine.start()
    sections = {
        "step": lambda: step_section(
            STEP_PRESETS[:1] if args.quick else STEP_PRESETS, reps, overrides
        ),
        "norms": lambda: norms_section(
            NORM_MODELS[:2] if args.quick else NORM_MODELS, reps, args.quick
        ),
        "loading": lambda: loading_section(args.threads, args.quick),
        "ddp": lambda: ddp_section(args.quick),
        "eval": lambda: eval_section(
            EVAL_PRESETS[:2] if args.quick else EVAL_PRESETS, reps, args.quick, overrides
        ),
    }
    body: list[str] = []
    for name in args.sections:
        body += ["", *sections[name]()]
    machine.stop()
    share = machine.share
    flag = (
        f" **Busy machine: the benchmark got {share:.0%} of the time its threads were ready to "
        "run; rerun it on an otherwise idle machine before quoting these figures.**"
        if share < STARVED_BELOW
        else ""
    )
    header = [
        "# Benchmarks" + (" (quick: sizes for a check, not figures)" if args.quick else ""),
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch thread(s), "
        f"device cpu; {time.perf_counter() - started:.0f} s; machine share {share:.2f}.{flag}",
        "Command: python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
    ]
    text = "\n".join(header + body) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
