"""One command per comparison: run the sampler sweep of an experiment preset, then write its
figure and tables to results/<experiment>/.

    python scripts/time_to_loss.py fashion_mnist_mlp                      # 4 samplers x 2 seeds
    python scripts/time_to_loss.py fashion_mnist_mlp --jobs 2 trainer.time_budget=30
    python scripts/time_to_loss.py digits_mlp --seeds 0 1 2 --samplers uniform upper_bound
    python scripts/time_to_loss.py fashion_mnist_mlp --aggregate-only multirun/fashion_mnist_mlp/<time>

The sweep is one Hydra multirun of train.py (conf/experiment/<experiment>.yaml), in
multirun/<experiment>/<time>/; --jobs > 1 runs it with the joblib launcher, each job limited to
cores // jobs torch threads. Any extra argument is passed to train.py as an override. Outputs
(results/<experiment>/ unless --out): runs.csv, time_to_loss.csv, equal_time.csv, table.md,
figure.png; see scripts/aggregate.py for the options of the analysis.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["uniform", "loss", "upper_bound", "gradient_norm"]


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
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    if jobs > 1:
        # parallel jobs share the cores: each gets its share of torch threads
        threads = max(1, (os.cpu_count() or 1) // jobs)
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"threads={threads}"]
    return cmd + overrides


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
    parser.add_argument("--out", type=Path, default=None, help="default: results/<experiment>")
    parser.add_argument(
        "--targets", type=float, nargs="+", default=None, help="target training losses"
    )
    parser.add_argument("--at", type=float, default=None, help="train_time of the equal-time table")
    parser.add_argument(
        "--aggregate-only",
        type=Path,
        default=None,
        metavar="SWEEP_DIR",
        help="skip training: aggregate this existing sweep directory",
    )
    args, overrides = parser.parse_known_args(argv)

    if not (ROOT / "conf" / "experiment" / f"{args.experiment}.yaml").is_file():
        print(f"error: no preset conf/experiment/{args.experiment}.yaml", file=sys.stderr)
        return 1
    sweep_dir = args.aggregate_only
    if sweep_dir is None:
        sweep_dir = ROOT / "multirun" / args.experiment / time.strftime("%Y-%m-%d_%H-%M-%S")
        cmd = sweep_command(
            args.experiment, args.samplers, args.seeds, args.jobs, sweep_dir, overrides
        )
        print("+", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            print(
                f"error: the sweep failed (exit {proc.returncode}); runs so far are in {sweep_dir}",
                file=sys.stderr,
            )
            return proc.returncode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import aggregate

    out = args.out or ROOT / "results" / args.experiment
    extra = ["--targets", *map(str, args.targets)] if args.targets else []
    extra += ["--at", str(args.at)] if args.at is not None else []
    return aggregate.main([str(sweep_dir), "--out", str(out), "--title", args.experiment, *extra])


if __name__ == "__main__":
    sys.exit(main())
