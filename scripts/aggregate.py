"""Collect every run under a sweep directory into one tidy table, and write the comparison.

    python scripts/aggregate.py multirun/2026-01-01_12-00-00          # files into that folder
    python scripts/aggregate.py multirun/... --targets 0.3 0.2 --at 60 --baseline uniform
    python scripts/aggregate.py results/fashion_mnist_mlp/runs.csv    # redraw from a runs.csv
    python scripts/aggregate.py --wandb multirun/wandb-<sweep id>       # its offline W&B runs
    python scripts/aggregate.py --wandb <entity>/<project>/<sweep id>   # from W&B's servers

Writes runs.csv (one row per run and evaluation), time_to_loss.csv, equal_time.csv, table.md and
figure.png to --out; by default into the sweep directory itself, or, for a runs.csv (e.g. a
committed reference result), into outputs/aggregate/<its folder's name>/: a reference result is
only overwritten when --out names it; for --wandb, into outputs/aggregate/wandb-<sweep id>/.
Runs of different experiments (preset, dataset or model) are not mixed in one comparison:
--experiment picks one; runs of one sweep folder that differ in anything but sampler and seed
are refused. See importance_sampling.analysis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

from importance_sampling import analysis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def default_out(source: Path) -> Path:
    """Where the outputs go without --out: the sweep directory itself, or outputs/aggregate/<name>
    for a runs.csv (a directory holding one and no runs counts as a runs.csv)."""
    if source.is_file():
        return ROOT / "outputs" / "aggregate" / source.resolve().parent.name
    if not analysis.find_runs(source):
        return ROOT / "outputs" / "aggregate" / source.resolve().name
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep",
        type=Path,
        nargs="?",
        help="a sweep directory (runs with metrics.csv) or a runs.csv",
    )
    parser.add_argument(
        "--wandb",
        metavar="SWEEP",
        default=None,
        help="read a W&B sweep instead: a folder of its offline runs (offline-run-*), or "
        "<entity>/<project>/<sweep id> through W&B's API (needs wandb login and the network)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: the sweep's; outputs/aggregate/<name> for a runs.csv)",
    )
    parser.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=None,
        help="target training losses (default: 2, 1.5 and 1 x the baseline's worst final loss)",
    )
    parser.add_argument(
        "--at",
        type=float,
        default=None,
        help="train_time of the equal-time table (default: the end of the shortest run)",
    )
    parser.add_argument(
        "--baseline", default="uniform", help="the sampler speedups are relative to"
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="keep only the runs of this experiment preset or dataset (a folder of several)",
    )
    parser.add_argument(
        "--title", default=None, help="figure and table title (default: from the runs' data)"
    )
    args = parser.parse_args(argv)
    if (args.sweep is None) == (args.wandb is None):
        parser.error("give a sweep directory or --wandb SWEEP (one of the two)")

    source = Path(args.wandb.rstrip("/")) if args.wandb else args.sweep
    try:
        runs = analysis.load_wandb(args.wandb) if args.wandb else analysis.load(args.sweep)
        if args.experiment:
            runs = analysis.select_experiment(runs, args.experiment)
        analysis.check_one_experiment(runs, None if args.wandb else args.sweep)
    except (FileNotFoundError, analysis.WandbUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except analysis.MixedRunsError as e:
        print(
            f"error: {source}: {e}. A comparison needs runs of one setting that differ in "
            "sampler and seed only: aggregate each sweep folder on its own, or pick one "
            "experiment with --experiment NAME.",
            file=sys.stderr,
        )
        return 1
    at, warning = analysis.equal_time_at(runs, args.at)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.wandb:
        out = args.out or ROOT / "outputs" / "aggregate" / f"wandb-{source.name}"
    else:
        out = args.out or default_out(args.sweep)
    title = args.title or analysis.title(runs)
    paths = analysis.save(runs, out, args.targets, at, args.baseline, title)
    n = runs["run"].nunique()
    print(paths["table"].read_text())
    print(f"{n} runs, {len(runs)} rows -> " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
