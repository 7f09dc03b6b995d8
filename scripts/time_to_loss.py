"""One command per comparison: run the sampler sweep of an experiment preset, then write its
figure and tables beside the runs.

    python scripts/time_to_loss.py fashion_mnist_mlp                      # 4 samplers x 2 seeds
    python scripts/time_to_loss.py fashion_mnist_mlp --jobs 2 trainer.time_budget=30
    python scripts/time_to_loss.py digits_mlp --seeds 0 1 2 --samplers uniform upper_bound
    python scripts/time_to_loss.py fashion_mnist_mlp --aggregate-only multirun/fashion_mnist_mlp/<time>

The sweep is one Hydra multirun of train.py (conf/experiment/<experiment>.yaml) into
multirun/<experiment>/<date>_<time>/, one run directory per job; --jobs > 1 runs it with the
joblib launcher, each job limited to cores // jobs torch threads. Any extra argument is passed to
train.py as an override. One progress bar follows the sweep (runs done, the runs in progress, time
left); the jobs' own output goes to sweep.log in the sweep directory. Outputs (into the sweep
directory unless --out): runs.csv, time_to_loss.csv, equal_time.csv, table.md, figure.png; see
scripts/aggregate.py for the options of the analysis. The committed reference results are only
rewritten when --out names them (e.g. --out results/fashion_mnist_mlp).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from importance_sampling.config.sweeps import SAMPLERS, SweepProgress, split_overrides

ROOT = Path(__file__).resolve().parents[1]
LOG = "sweep.log"


def sweep_command(
    experiment: str,
    samplers: list[str],
    seeds: list[int],
    jobs: int,
    sweep_dir: Path,
    overrides: list[str],
) -> list[str]:
    """The train.py multirun command line of the comparison."""
    # seeds before samplers: Hydra runs the product in this order, so the samplers alternate in
    # time and a change in the machine's load does not fall on one sampler only
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"experiment={experiment}",
        f"seed={','.join(map(str, seeds))}",
        f"sampler={','.join(samplers)}",
        "trainer.progress=false",  # one bar over the sweep instead (SweepProgress)
        f"hydra.sweep.dir={sweep_dir}",
    ]
    if jobs > 1:
        # parallel jobs share the cores: each gets its share of torch threads
        threads = max(1, (os.cpu_count() or 1) // jobs)
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"threads={threads}"]
    return cmd + overrides


def expected_runs(samplers: list[str], seeds: list[int], overrides: list[str]) -> int:
    """How many jobs the sweep launches: samplers x seeds x any comma-separated override."""
    n = len(samplers) * len(seeds)
    for override in overrides:
        key, _, value = override.partition("=")
        if "," in value and not key.startswith("hydra") and value[:1] not in "[{'\"":
            n *= len(value.split(","))
    return n


def run_sweep(cmd: list[str], sweep_dir: Path, total: int) -> int:
    """Run the multirun with its output in sweep.log and one progress bar; its exit status."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log_path = sweep_dir / LOG
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        progress = SweepProgress(sweep_dir, total, log_path)
        try:
            while proc.poll() is None:
                progress.poll()
                time.sleep(1.0)
        except KeyboardInterrupt:
            proc.wait()  # the jobs got the interrupt too: let them write what they have
            raise
        finally:
            progress.close()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", help="a preset of conf/experiment/, e.g. fashion_mnist_mlp")
    parser.add_argument("--samplers", nargs="+", default=SAMPLERS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--jobs", type=int, default=1, help="parallel jobs (joblib launcher when > 1)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: the sweep directory (multirun/...)"
    )
    parser.add_argument(
        "--targets", type=float, nargs="+", default=None, help="target training losses"
    )
    parser.add_argument("--at", type=float, default=None, help="train_time of the equal-time table")
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help="where the runs go (default: multirun/<experiment>/<date>_<time>)",
    )
    parser.add_argument(
        "--aggregate-only",
        type=Path,
        default=None,
        metavar="SWEEP_DIR",
        help="skip training: aggregate this existing sweep directory",
    )
    args, overrides = split_overrides(parser, argv)

    if not (ROOT / "conf" / "experiment" / f"{args.experiment}.yaml").is_file():
        print(f"error: no preset conf/experiment/{args.experiment}.yaml", file=sys.stderr)
        return 1
    sweep_dir = args.aggregate_only
    if sweep_dir is None:
        sweep_dir = args.sweep_dir or (
            ROOT / "multirun" / args.experiment / time.strftime("%Y-%m-%d_%H-%M-%S")
        )
        cmd = sweep_command(
            args.experiment, args.samplers, args.seeds, args.jobs, sweep_dir, overrides
        )
        print("+", " ".join(cmd[1:]), flush=True)
        print(f"runs and their output ({LOG}) in {sweep_dir}", flush=True)
        total = expected_runs(args.samplers, args.seeds, overrides)
        returncode = run_sweep(cmd, sweep_dir, total)
        if returncode != 0:
            print(
                f"error: the sweep failed (exit {returncode}); runs so far and {LOG} are in "
                f"{sweep_dir}",
                file=sys.stderr,
            )
            return returncode

    out = args.out or sweep_dir
    extra = ["--targets", *map(str, args.targets)] if args.targets else []
    extra += ["--at", str(args.at)] if args.at is not None else []
    aggregate = [sys.executable, str(ROOT / "scripts" / "aggregate.py"), str(sweep_dir)]
    return subprocess.run([*aggregate, "--out", str(out), *extra]).returncode


if __name__ == "__main__":
    sys.exit(main())
