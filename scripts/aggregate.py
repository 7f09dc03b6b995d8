"""Collect every run under a sweep directory into one tidy table, and write the comparison.

    python scripts/aggregate.py multirun/2026-01-01_12-00-00 --out results/my_sweep
    python scripts/aggregate.py multirun/... --targets 0.3 0.2 --at 60 --baseline uniform

Writes to --out (default: the sweep directory itself): runs.csv (one row per run and evaluation),
time_to_loss.csv, equal_time.csv, table.md and figure.png. See importance_sampling.analysis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

from importance_sampling import analysis  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep", type=Path, help="a sweep directory (runs with metrics.csv) or a runs.csv"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: the sweep's)"
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
        "--title", default=None, help="figure and table title (default: the sweep's name)"
    )
    args = parser.parse_args(argv)

    try:
        runs = analysis.load(args.sweep)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = args.out or (args.sweep.parent if args.sweep.is_file() else args.sweep)
    title = args.title or (
        runs["experiment"].dropna().iloc[0]
        if runs["experiment"].notna().any()
        else args.sweep.resolve().name
    )
    paths = analysis.save(runs, out, args.targets, args.at, args.baseline, title)
    n = runs["run"].nunique()
    print(paths["table"].read_text())
    print(f"{n} runs, {len(runs)} rows -> " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
