"""What each sampler does to the gradient's variance over a training run
(docs/method.md#variance-reduction-measured-exactly): a tidy table, a figure and a summary.

    # train a run with the measurement on (train.py overrides after the run dir), then report
    python scripts/variance_reduction.py --train outputs/vr_mlp dataset=fashion_mnist model=mlp \\
        trainer.time_budget=75 trainer.eval_every_seconds=5
    # report on a run that measured already (variance.every_rows > 0); a run that did not but
    # left a checkpoint.pt (trainer.checkpoint_every) is measured once, at its checkpoint
    python scripts/variance_reduction.py outputs/vr_mlp
    # ... and copy its variance.csv, metrics.csv, config and figure as a reference result
    # (regenerating the committed one: the only way this script writes under results/)
    python scripts/variance_reduction.py outputs/vr_mlp --results results/variance_reduction/fashion_mnist_mlp
    # redraw a committed reference figure from its variance.csv (after changing the plot)
    python scripts/variance_reduction.py results/variance_reduction/fashion_mnist_mlp \\
        --results results/variance_reduction/fashion_mnist_mlp

Writes ``<run dir>/variance_reduction.png`` (a directory under results/ only when --results names
it) and prints, per score, the median over measurement points of the variance reduction,
measured and estimated tau, and distances to the gradient-norm distribution, and how often the
paper's orderings hold.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from importance_sampling.analysis import DATASET_NAMES
from importance_sampling.analysis.variance import (
    ordering_by_step,
    ordering_holds,
    plot_variance,
    read_variance,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def train(run_dir: Path, every_rows: int, overrides: list[str]) -> None:
    """train.py with the measurement callback on, into ``run_dir`` (a normal run directory)."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"variance.every_rows={every_rows}",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def measure_checkpoint(run_dir: Path) -> None:
    """One measurement of the model in ``run_dir/checkpoint.pt``, built from the run's own config,
    on the presample the run would have measured (same seed): writes ``run_dir/variance.csv``."""
    from omegaconf import OmegaConf

    from importance_sampling.config.builder import build_trainer
    from importance_sampling.engine.checkpoints import load_checkpoint, restore
    from importance_sampling.engine.variance import VarianceCallback

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.trainer.progress, cfg.logger = False, {}  # nothing but the measurement
    cfg.variance.every_rows = 0
    trainer = build_trainer(cfg, run_dir)
    # the model, and the sampler for the trainer's tau at the checkpoint
    restore(trainer, load_checkpoint(run_dir / "checkpoint.pt", trainer.device))
    options = {k: v for k, v in cfg.get("variance", {}).items() if k != "every_rows"}
    VarianceCallback(every_rows=1, **options).measure(trainer)
    print(f"measured the checkpoint at step {trainer.step}", flush=True)


def describe(config: Path) -> str:
    """``MLP on fashion_mnist, upper_bound sampler`` from a run's config.yaml ('' without one)."""
    if not config.is_file():
        return ""
    import yaml

    cfg = yaml.safe_load(config.read_text()) or {}
    target = lambda node: str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]  # noqa: E731
    sampler = cfg.get("sampler") or {}
    name = sampler.get("score") or target(sampler).removesuffix("Sampler").lower()
    dataset = target(cfg.get("dataset"))
    what = f"{target(cfg.get('model'))} on {DATASET_NAMES.get(dataset, dataset)}"
    return f"{what}, {name} sampler" if name else what


def report(run_dir: Path, results: Path | None = None) -> str:
    """Figure in ``results`` if given, else in the run dir; summary as text; copies the small
    files to ``results`` if given."""
    import matplotlib

    matplotlib.use("Agg")
    table = read_variance(run_dir)
    config = next(
        (p for p in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml") if p.is_file()),
        run_dir / ".hydra" / "config.yaml",
    )
    what = describe(config) or run_dir.name
    title = f"{what}: exact Tr Cov of the weighted minibatch gradient on a fixed presample"
    fig = plot_variance(table, title)
    figure_dir = results if results is not None else run_dir
    figure_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure_dir / "variance_reduction.png", dpi=90)
    holds, by_step = ordering_holds(table), ordering_by_step(table)
    text = "\n".join(
        [
            f"{run_dir.name}: {holds['points']} measurement points "
            f"(B = {table.presample_size.iloc[0]}, b = {table.batch_size.iloc[0]})",
            "median over measurement points (variance reduction = 1 - TrCov_q / TrCov_uniform):",
            summarize(table).to_string(float_format=lambda v: f"{v:.4f}"),
            f"gradient_norm >= upper_bound > loss > uniform in variance reduction at "
            f"{100 * holds['variance']:.0f}% of the points; upper_bound closer than loss to the "
            f"gradient-norm distribution (TV) at {100 * holds['distance']:.0f}%",
            f"steps where the variance ordering fails: {list(by_step.index[~by_step.variance])}; "
            f"where the distance ordering fails: {list(by_step.index[~by_step.distance])}",
        ]
    )
    if results is not None:
        for source, name in (
            (run_dir / "variance.csv", "variance.csv"),
            (run_dir / "metrics.csv", "metrics.csv"),
            (config, "config.yaml"),
        ):
            if source.is_file() and source.resolve() != (results / name).resolve():
                shutil.copy(source, results / name)
        (results / "summary.txt").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory (with --train: where to train)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (with --train)")
    parser.add_argument("--train", action="store_true", help="train a run with measurements first")
    parser.add_argument(
        "--every-rows",
        type=int,
        default=1,
        help="with --train: measure every this many metrics rows (default 1)",
    )
    parser.add_argument("--results", type=Path, help="copy the tidy table, metrics and figure here")
    args = parser.parse_intermixed_args()
    if args.train:
        train(args.run_dir.resolve(), args.every_rows, args.overrides)
    elif args.overrides:
        parser.error("overrides are for --train")
    if not (args.run_dir / "variance.csv").is_file():
        if not (args.run_dir / "checkpoint.pt").is_file():
            parser.error(
                f"{args.run_dir} has neither variance.csv nor checkpoint.pt: train with "
                "variance.every_rows > 0 (or use --train)"
            )
        measure_checkpoint(args.run_dir)
    print(report(args.run_dir, args.results))


if __name__ == "__main__":
    main()
