"""What does the exact gradient-norm score cost, next to a forward + backward pass?

For each model (random weights, random inputs of the experiment's shapes, eval mode as the sampler
scores), times side by side in one process, interleaved, median of ``--reps``:
  upper_bound  a no-grad forward over the B presampled points + the upper-bound scores;
  fwd_bwd      one ordinary forward + backward of the mean loss over the same B points;
  new          the exact gradient norms (grad_norms.gradient_norm_scores: one forward + backward with
               closed forms per layer, grad_norms.py);
  vmap         the same norms by torch.func (grad_norms.gradient_norm_scores_vmap: every per-sample
               gradient materialised).
and prints new / fwd_bwd and vmap / fwd_bwd (targets: new / fwd_bwd <= 1.5 for mlp, cnn and wrn;
new never slower than vmap), with the largest relative difference between the two exact paths.
``--memory`` also measures the peak memory of each path on WRN-28-2 at B = 384 (the paper's
presample), each in a fresh subprocess (CPU: rise of the peak RSS; CUDA: max_memory_allocated).

    python scripts/benchmark_scores.py                         # scale=cpu models, one thread
    python scripts/benchmark_scores.py --scale paper --memory  # + WRN-28-2 at B = 384
    python scripts/benchmark_scores.py --device cuda --amp     # bf16 autocast, as the trainer
    python scripts/benchmark_scores.py --out results/benchmark_scores.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from importance_sampling.core.grad_norms import gradient_norm_scores, gradient_norm_scores_vmap
from importance_sampling.core.scores import cross_entropy, upper_bound_scores
from importance_sampling.engine.models import CNN, MLP, LSTMClassifier, WideResNet

CHUNK = 1024  # the sampler's score_chunk_size: B <= 1024 is scored in one chunk

# name -> (model factory, input shape, B): the scale=cpu presets (conf/experiment_scale) ...
CPU = {
    "mlp": (lambda: MLP((1, 28, 28), 10, (256, 256)), (1, 28, 28), 384),
    "cnn": (lambda: CNN((1, 28, 28), 10, (32, 64), 128), (1, 28, 28), 384),
    "wrn-10-1": (lambda: WideResNet((3, 32, 32), 10, 10, 1), (3, 32, 32), 96),
    "wrn-16-2": (lambda: WideResNet((3, 32, 32), 10, 16, 2), (3, 32, 32), 96),
    "lstm-32": (lambda: LSTMClassifier((49, 1), 10, 32), (49, 1), 96),
}
# ... and the paper's CIFAR network at its presample size (B = 3 b = 384)
PAPER = {"wrn-28-2": (lambda: WideResNet((3, 32, 32), 10, 28, 2), (3, 32, 32), 384)}


def problem(name: str, device: torch.device, seed: int = 0):
    make, shape, batch = {**CPU, **PAPER}[name]
    torch.manual_seed(seed)
    model = make().to(device).eval()
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def paths(model, x, y, amp: Callable) -> dict[str, Callable[[], object]]:
    def upper_bound():
        with amp(), torch.inference_mode():
            return upper_bound_scores(model(x), y)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with amp():
            loss = cross_entropy(model(x), y).mean()
        loss.backward()

    def new():
        with amp():  # the scores turn autocast off themselves (the exact oracle is float32)
            return gradient_norm_scores(model, x, y, cross_entropy, CHUNK)

    def vmap():
        with amp():
            return gradient_norm_scores_vmap(model, x, y, cross_entropy, CHUNK)

    return {"upper_bound": upper_bound, "fwd_bwd": fwd_bwd, "new": new, "vmap": vmap}


def timed(fn: Callable, device: torch.device) -> float:
    """Seconds of one call: wall clock on CUDA (synchronised); on the CPU the process's CPU time,
    which a shared machine's other processes do not inflate (one thread: CPU time = wall time)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench(name: str, device: torch.device, amp: Callable, reps: int) -> dict:
    model, x, y = problem(name, device)
    fns = paths(model, x, y, amp)
    new, ref = fns["new"](), fns["vmap"]()  # warm-up, and the two exact paths side by side
    diff = ((new - ref).abs() / ref.abs().clamp(min=1e-12)).max().item()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):  # interleaved: a slow moment of a shared machine hits every path
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"model": name, "B": len(x), **ms, "max_rel_diff": diff}


# ------------------------------------------------------------------ peak memory, one path a process
def memory_child(name: str, path: str, device: torch.device) -> dict:
    model, x, y = problem(name, device)
    fn = paths(model, x, y, nullcontext)[path]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: reset the peak RSS to the current one, run, read the peak
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib(status, "VmRSS")
        fn()
        return {"peak_mib": (_status_kib(status, "VmHWM") - before) / 1024}
    # elsewhere: ru_maxrss (the process's peak; it may carry the parent's peak across exec)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return {"peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20}


def _status_kib(status: Path, field: str) -> int:
    line = next(x for x in status.read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def memory(name: str, device: torch.device, threads: int) -> dict:
    out = {}
    for path in ("fwd_bwd", "new", "vmap"):
        cmd = [sys.executable, __file__, "--memory-child", name, path, "--device", str(device)]
        cmd += ["--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode:
            raise SystemExit(f"memory measurement of {path} failed:\n{done.stderr[-2000:]}")
        out[path] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


# ------------------------------------------------------------------ report
def table(rows: list[dict], device: str, amp: bool) -> str:
    lines = [
        f"Scoring B points, {device}{' (bf16 autocast)' if amp else ''}; median ms of interleaved"
        " repetitions (CPU: process CPU time; CUDA: synchronised wall clock); ratios to a forward"
        " + backward over the same B points.",
        "",
        "| model | B | upper bound | fwd+bwd | new | vmap | new / (fwd+bwd) | vmap / (fwd+bwd) "
        "| vmap / new | max rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = r["fwd_bwd"]
        lines.append(
            f"| {r['model']} | {r['B']} | {r['upper_bound']:.1f} | {f:.1f} | {r['new']:.1f} "
            f"| {r['vmap']:.1f} | {r['new'] / f:.2f} | {r['vmap'] / f:.2f} "
            f"| {r['vmap'] / r['new']:.1f} | {r['max_rel_diff']:.0e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["cpu", "paper"], default="cpu")
    parser.add_argument("--models", nargs="*", help="a subset of the scale's models")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when there is one) | cpu | cuda"
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast, as the trainer on CUDA")
    parser.add_argument("--memory", action="store_true", help="peak memory on WRN-28-2, B = 384")
    parser.add_argument("--memory-only", action="store_true", help="only the peak memory")
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, device)))
        return
    if args.amp:

        def amp():
            return torch.autocast(device.type, dtype=torch.bfloat16)

    else:
        amp = nullcontext
    names = args.models or list(CPU if args.scale == "cpu" else {**CPU, **PAPER})
    unknown = sorted(set(names) - {*CPU, *PAPER})
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted({*CPU, *PAPER})}")
    where = f"{device.type}" + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
    rows = []
    for name in [] if args.memory_only else names:
        rows.append(bench(name, device, amp, args.reps))
        r = rows[-1]
        print(
            f"{name:>9} B={r['B']:<4} upper_bound {r['upper_bound']:8.1f} ms  fwd_bwd "
            f"{r['fwd_bwd']:8.1f} ms  new {r['new']:8.1f} ms  vmap {r['vmap']:9.1f} ms  "
            f"new/fb {r['new'] / r['fwd_bwd']:.2f}  vmap/fb {r['vmap'] / r['fwd_bwd']:.2f}",
            flush=True,
        )
    text = table(rows, where, args.amp) if rows else ""
    if args.memory or args.memory_only:
        peak = memory("wrn-28-2", device, args.threads)
        kind = "rise of the peak RSS" if device.type == "cpu" else "max_memory_allocated"
        text += (
            f"\n\nPeak memory, WRN-28-2 at B = 384 ({kind}, each path in a fresh process, one "
            f"chunk of {CHUNK}): " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peak.items())
        )
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
