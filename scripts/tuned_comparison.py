"""A comparison with tuned baselines, in one command: every sampler gets its own learning rate
and schedule, chosen on a validation split, then all are compared on the test set.

    python scripts/tuned_comparison.py fashion_mnist_mlp                 # the whole protocol
    python scripts/tuned_comparison.py fashion_mnist_mlp --out results/fashion_mnist_mlp_tuned
    python scripts/tuned_comparison.py digits_mlp --samplers uniform upper_bound --lrs 0.01 0.05 \\
        --seeds 0 1 2 --validation-size 300 trainer.time_budget=2
    python scripts/tuned_comparison.py fashion_mnist_mlp --report-only multirun/fashion_mnist_mlp_tuned/<time>

1. Selection: each sampler x learning rate (default: the preset's x 1/4, 1/2, 1, 2) x schedule
   (constant, cosine over the budget), seed --selection-seed, trained without a validation split
   of the training set (dataset.validation_size, fixed by --validation-seed) and evaluated on it:
   these runs never load the test set. Each sampler keeps its lowest validation error at the end
   of the budget (--select-by loss: the lowest validation loss).
2. Final: each sampler's chosen setting with every --seeds, on the whole training set, evaluated
   on the test set, compared at equal train_time.

Every run is one train.py process (a diverging learning rate ends its own run, where it would end
a Hydra multirun of the grid), composed by Hydra from conf/experiment/<experiment>.yaml; the runs
alternate between samplers in time. Runs go to multirun/<experiment>_tuned/<date>_<time>/
{selection,final}/<run>/ (--protocol-dir: another folder; run again with the same folder to
finish an interrupted protocol: completed runs are kept). One progress bar follows the whole
protocol. Any key=value argument is passed to every run (e.g. trainer.time_budget=60 threads=2).
The report (table.md, figure.png, runs.csv, selection.csv, equal_time.csv, time_to_accuracy.csv,
time_to_loss.csv, protocol.json) goes to the protocol folder, or --out (a committed reference:
--out results/<name>). See importance_sampling.analysis.tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from importance_sampling.config import builder
from importance_sampling.config.sweeps import SAMPLERS, SweepProgress, split_overrides

ROOT = Path(__file__).resolve().parent.parent

LR_FACTORS = [0.25, 0.5, 1.0, 2.0]
SCHEDULES = ["constant", "cosine"]
LOG = "protocol.log"
START_UP = 7.0  # seconds to start a run and load its data (Fashion-MNIST, this 2-core CPU)


def compose(experiment: str, overrides: list[str]):
    """The preset's config as train.py composes it (checks the overrides before hours of runs)."""
    return builder.compose(f"experiment={experiment}", *overrides)


def evaluation_seconds(cfg) -> float:
    """Seconds one run spends evaluating (not train_time): its metrics rows x the points each
    row evaluates (train-eval subset + evaluation split) x a forward pass per point, timed here
    on one evaluation batch of the preset's model (on a busy machine, an overestimate). 0 when
    it cannot be measured."""
    import torch
    from hydra.utils import instantiate

    from importance_sampling.config.builder import build_dataset
    from importance_sampling.engine.data import TensorDataset
    from importance_sampling.engine.runtime import default_eval_batch_size

    t = cfg.trainer
    if not t.eval_every_seconds:
        return 0.0
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        data = build_dataset(cfg.dataset)
        if not isinstance(data, TensorDataset):
            return 0.0
        model = instantiate(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes)
        x = data.train_x[: t.eval_batch_size or default_eval_batch_size(torch.device("cpu"))]
        with torch.inference_mode():
            model.eval()(x)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    except Exception:  # an estimate only: a failing preset says so when its run starts
        return 0.0
    points = min(t.train_eval_size or len(data), len(data)) + len(data.test_y)
    rows = t.time_budget / t.eval_every_seconds + 1
    return rows * points * min(times) / len(x)


def run_command(
    experiment: str, overrides: list[str], run_dir: Path, extra: list[str]
) -> list[str]:
    """One train.py run: the preset, the run's own overrides, then the user's."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"experiment={experiment}",
        *overrides,
        "trainer.progress=false",  # one bar over the protocol instead
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def finished(run_dir: Path) -> bool:
    """A run that ended by itself: completed, or diverged (status failed, metrics kept)."""
    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return False
    return status in ("completed", "failed")


def run_all(
    jobs: list[tuple[Path, list[str]]], log_path: Path, progress: SweepProgress, parallel: int
) -> None:
    """Run every (run_dir, command) not finished yet, ``parallel`` at a time; stop at the first
    run that fails without a summary (a bad option or missing data: every run would)."""
    pending = [(d, c) for d, c in jobs if not finished(d)]
    running: list[tuple[Path, subprocess.Popen]] = []
    with open(log_path, "a") as log:
        while pending or running:
            while pending and len(running) < parallel:
                run_dir, cmd = pending.pop(0)
                shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again
                log.write(f"+ {shlex.join(cmd[1:])}\n")
                log.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                running.append((run_dir, proc))
            progress.poll()
            time.sleep(0.5)
            for run_dir, proc in list(running):
                if proc.poll() is None:
                    continue
                running.remove((run_dir, proc))
                if proc.returncode != 0 and not finished(run_dir):
                    for _, other in running:
                        other.terminate()
                        other.wait()
                    raise RuntimeError(
                        f"the run in {run_dir} failed before training (exit {proc.returncode}); "
                        f"its output is at the end of {log_path}"
                    )


def seed_pairs(
    folder: Path, picks: list, seeds: list[int], experiment: str, overrides: list[str]
) -> list[list[tuple[Path, list[str]]]]:
    """The final stage as pairs: per seed, the uniform run, then each other sampler's, run back
    to back so that the runs compared with each other share the machine and the hour."""
    picks = sorted(picks, key=lambda s: s.sampler != "uniform")
    return [
        [
            (
                d := folder / "final" / f"{s.sampler}_seed{seed}",
                run_command(
                    experiment,
                    s.overrides() + [f"seed={seed}", "dataset.validation_size=null"],
                    d,
                    overrides,
                ),
            )
            for s in picks
        ]
        for seed in seeds
    ]


def run_pairs(
    pairs: list[list[tuple[Path, list[str]]]],
    log_path: Path,
    progress: SweepProgress,
    parallel: int,
    max_pairs: int | None = None,
) -> int:
    """Run the pairs not finished yet, one whole pair after another, at most ``max_pairs`` of
    them; return how many pairs are finished. A pair left half done (a session that ended
    between its runs) is run again whole: a pair never mixes two working periods."""
    started = 0
    with open(log_path, "a") as log:
        for pair in pairs:
            if all(finished(d) for d, _ in pair):
                continue
            if max_pairs is not None and started >= max_pairs:
                break
            if half := [d for d, _ in pair if finished(d)]:
                log.write(f"# a pair left half done is run again whole: {pair[0][0].name} ...\n")
                for d in half:
                    shutil.rmtree(d)
            started += 1
            log.flush()
            run_all(pair, log_path, progress, parallel)
    return sum(all(finished(d) for d, _ in pair) for pair in pairs)


def choose_in(folder: Path, by: str):
    """The selection runs of a protocol folder, each sampler's choice marked (tuning.choose)."""
    from importance_sampling.analysis import tuning

    return tuning.choose(tuning.selection_table(tuning.collect(folder / "selection")), by)


def duration(seconds: float) -> str:
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)  # recorded in protocol.json
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", help="a preset of conf/experiment/, e.g. fashion_mnist_mlp")
    parser.add_argument("--samplers", nargs="+", default=SAMPLERS)
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="learning rates (default: factors)"
    )
    parser.add_argument(
        "--lr-factors",
        type=float,
        nargs="+",
        default=LR_FACTORS,
        help="the grid as multiples of the preset's lr (default: 0.25 0.5 1 2)",
    )
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="final runs")
    parser.add_argument(
        "--max-pairs",
        type=int,
        default=None,
        metavar="N",
        help="run at most N seed pairs of the final stage now (a working period's share), then "
        "report what is done, labelled PARTIAL; the same command with --protocol-dir goes on",
    )
    parser.add_argument("--selection-seed", type=int, default=0)
    parser.add_argument(
        "--widen-edges",
        type=int,
        default=0,
        metavar="N",
        help="up to N times: a sampler whose chosen lr is the smallest or largest of its grid gets "
        "one more selection run a grid step beyond it, and chooses again (default 0)",
    )
    parser.add_argument(
        "--selection-budget",
        type=float,
        default=None,
        help="train_time of a selection run (default: the final runs'; shorter favours settings "
        "that start fast)",
    )
    parser.add_argument(
        "--validation-size",
        type=float,
        default=10000,
        help="training points held out for selection, or a fraction < 1 (default 10000)",
    )
    parser.add_argument("--validation-seed", type=int, default=0)
    parser.add_argument("--select-by", choices=sorted(["error", "loss"]), default="error")
    parser.add_argument(
        "--accuracies",
        type=float,
        nargs="+",
        default=None,
        help="target test accuracies (default: the tuned uniform's worst final one, and 1.1x, "
        "1.2x its error)",
    )
    parser.add_argument(
        "--targets", type=float, nargs="+", default=None, help="target training losses"
    )
    parser.add_argument("--at", type=float, default=None, help="train_time of the equal-time table")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (each with cores // jobs threads; parallel runs share the machine, "
        "which changes their timings)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and the estimate, run nothing"
    )
    parser.add_argument("--protocol-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: the protocol folder")
    parser.add_argument(
        "--allow-starved",
        action="store_true",
        help="report even when runs flagged themselves starved (a busy machine; marked in the "
        "report)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="DIR",
        help="no training: the report of a protocol folder, or of a folder written by --out",
    )
    parser.add_argument(
        "--final-only",
        type=Path,
        default=None,
        metavar="DIR",
        help="no selection: the final runs of the settings a saved report (DIR, written by --out) "
        "chose, for --seeds and --samplers, with its protocol's budget and overrides; the runs "
        "of other seeds in DIR are kept in the report (e.g. to add seeds to it)",
    )
    args, extra = split_overrides(parser, argv)
    for key in ("sampler=", "optimizer.lr=", "trainer.lr_schedule=", "seed=", "dataset.validation"):
        if any(a.startswith(key) for a in extra):
            parser.error(f"{key.rstrip('=')} is set by the protocol: use its options instead")
    if "uniform" not in args.samplers:
        parser.error("--samplers must include uniform: the report compares with the tuned uniform")
    if not (ROOT / "conf" / "experiment" / f"{args.experiment}.yaml").is_file():
        print(f"error: no preset conf/experiment/{args.experiment}.yaml", file=sys.stderr)
        return 1

    import matplotlib

    matplotlib.use("Agg")
    from importance_sampling.analysis import tuning

    if args.report_only is not None:
        return write_report(args, args.report_only, None)
    if args.final_only is not None:
        return final_only(args, argv, extra)

    cfg = compose(args.experiment, extra)
    budget = cfg.trainer.time_budget
    if not budget:
        print(
            "error: trainer.time_budget is null: samplers are compared at equal train_time, "
            "so the runs need a time budget (e.g. trainer.time_budget=120)",
            file=sys.stderr,
        )
        return 1
    selection_budget = args.selection_budget or budget
    lrs = args.lrs or [round(cfg.optimizer.lr * f, 10) for f in args.lr_factors]
    size = args.validation_size
    size = int(size) if size >= 1 else size
    if args.jobs > 1 and not any(a.startswith("threads=") for a in extra):
        extra.append(f"threads={max(1, (os.cpu_count() or 1) // args.jobs)}")

    folder = args.protocol_dir or (
        ROOT / "multirun" / f"{args.experiment}_tuned" / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    folder = folder.resolve()
    settings = tuning.grid(args.samplers, lrs, args.schedules)
    validation = [
        f"dataset.validation_size={size}",
        f"dataset.validation_seed={args.validation_seed}",
    ]
    selection_budget_override = (
        [f"trainer.time_budget={selection_budget}"] if args.selection_budget else []
    )

    def selection_job(s: tuning.Setting) -> tuple[Path, list[str]]:
        return (
            folder / "selection" / f"{s.name}_seed{args.selection_seed}",
            s.overrides() + [f"seed={args.selection_seed}", *validation],
        )

    selection_jobs = [selection_job(s) for s in settings]
    n_final = len(args.samplers) * len(args.seeds)
    total = len(selection_jobs) + n_final
    protocol = {
        "experiment": args.experiment,
        "samplers": args.samplers,
        "lrs": lrs,
        "schedules": args.schedules,
        "selection_seed": args.selection_seed,
        "selection_budget": selection_budget,
        "budget": budget,
        "validation_size": size,
        "validation_seed": args.validation_seed,
        "select_by": args.select_by,
        "widen_edges": args.widen_edges,
        "seeds": args.seeds,
        "overrides": extra,
        "command": "python scripts/tuned_comparison.py " + shlex.join(argv),
    }
    print(
        f"{args.experiment}: {len(selection_jobs)} selection runs ({len(args.samplers)} samplers "
        f"x {len(lrs)} lrs {', '.join(f'{lr:g}' for lr in lrs)} x {len(args.schedules)} "
        f"schedules, {selection_budget:g} s each on a validation split of {size}), then "
        f"{n_final} final runs ({len(args.samplers)} samplers x {len(args.seeds)} seeds, "
        f"{budget:g} s each, on the test set)",
        flush=True,
    )
    seconds = len(selection_jobs) * selection_budget + n_final * budget
    evaluation = evaluation_seconds(cfg)
    print(
        f"estimated duration: {duration((seconds + total * (evaluation + START_UP)) / args.jobs)}"
        f" ({duration(seconds)} of train_time, plus per run about {evaluation:.0f} s of "
        f"evaluation (measured on the model here) and {START_UP:.0f} s to start; "
        f"{args.jobs} run(s) at a time; the bar's estimate follows the runs done)",
        flush=True,
    )
    if args.dry_run:
        first = run_command(args.experiment, selection_jobs[0][1], selection_jobs[0][0], extra)
        print("first run:", shlex.join(first[1:] + selection_budget_override))
        return 0
    print(f"runs and their output ({LOG}) in {folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "protocol.json").write_text(json.dumps(protocol, indent=1) + "\n")
    progress = SweepProgress(folder, total, folder / LOG, pattern="*/*/.hydra/config.yaml")
    try:
        commands = [
            (d, run_command(args.experiment, o, d, extra + selection_budget_override))
            for d, o in selection_jobs
        ]
        run_all(commands, folder / LOG, progress, args.jobs)
        chosen = choose_in(folder, args.select_by)
        for _ in range(args.widen_edges):  # a choice at the grid's edge: one step beyond it
            wider = tuning.widened(chosen)
            if not wider:
                break
            progress.total += len(wider)
            progress.bar.write(
                "at the edge of the grid, widened: "
                + "; ".join(f"{s.sampler} lr {s.lr:g}" for s in wider)
            )
            commands = [
                (d, run_command(args.experiment, o, d, extra + selection_budget_override))
                for d, o in map(selection_job, wider)
            ]
            run_all(commands, folder / LOG, progress, args.jobs)
            chosen = choose_in(folder, args.select_by)
        starved = list(tuning.starved_runs(chosen)["run"])
        if starved and not args.allow_starved:  # a choice made on a busy machine: redo first
            raise RuntimeError(
                f"{len(starved)} selection run(s) flagged themselves starved (another process "
                f"took their CPUs): {', '.join(starved)}. Delete them and run the same command "
                f"with --protocol-dir {folder} on an otherwise idle machine, or pass "
                "--allow-starved"
            )
        picks = tuning.chosen_settings(chosen)
        progress.bar.write(
            "chosen on the validation split: "
            + "; ".join(f"{s.sampler} lr {s.lr:g} {s.schedule}" for s in picks)
        )
        pairs = seed_pairs(folder, picks, args.seeds, args.experiment, extra)
        run_pairs(pairs, folder / LOG, progress, args.jobs, args.max_pairs)
    except (RuntimeError, tuning.SelectionError) as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: run the same command with --protocol-dir {folder} to go on")
        raise
    progress.close()
    return write_report(args, folder, protocol)


def final_only(args, argv: list[str], extra: list[str]) -> int:
    """The final stage again (new code, a quieter machine) or for more seeds, from the choice
    recorded in a saved report; the saved runs of the seeds not run here stay in the report."""
    from importance_sampling.analysis import tuning

    saved = args.final_only
    try:
        old_runs, selection, protocol = tuning.load_saved(saved)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    samplers = [s for s in args.samplers if s in set(selection["sampler"])]
    picks = [s for s in tuning.chosen_settings(selection) if s.sampler in samplers]
    overrides = list(protocol.get("overrides", [])) + extra
    folder = (
        args.protocol_dir
        or ROOT / "multirun" / f"{args.experiment}_tuned" / time.strftime("%Y-%m-%d_%H-%M-%S")
    ).resolve()
    pairs = seed_pairs(folder, picks, args.seeds, args.experiment, overrides)
    print(
        f"{args.experiment}: {len(args.seeds)} seed pairs of final runs "
        f"({', '.join(s.sampler for s in picks)} x "
        f"seeds {' '.join(map(str, args.seeds))}) of the settings chosen in {saved}, "
        f"into {folder}",
        flush=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(map(len, pairs))
    progress = SweepProgress(folder, total, folder / LOG, pattern="*/*/.hydra/config.yaml")
    try:
        done = run_pairs(pairs, folder / LOG, progress, args.jobs, args.max_pairs)
    except RuntimeError as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress.close()
    seeds_done = [
        seed
        for seed, pair in zip(args.seeds, pairs, strict=True)
        if all(finished(d) for d, _ in pair)
    ]
    if not seeds_done:
        print(f"error: no seed pair of {folder / 'final'} has finished", file=sys.stderr)
        return 1
    new_runs = tuning.collect(folder / "final")
    new_runs = new_runs[new_runs["seed"].isin(seeds_done)]  # whole pairs only
    kept = old_runs[
        [
            sa in samplers and se not in args.seeds
            for sa, se in zip(old_runs["sampler"], old_runs["seed"], strict=True)
        ]
    ]
    runs = pd.concat([kept, new_runs], ignore_index=True)
    seeds = sorted(set(int(s) for s in runs["seed"]))
    protocol = {
        **{k: v for k, v in protocol.items() if k != "partial_pairs"},
        "seeds": seeds,
        "final_only": {
            "from": str(saved),
            "seeds_run": args.seeds,
            "seeds_kept": sorted(set(int(s) for s in kept["seed"])),
            "command": "python scripts/tuned_comparison.py " + shlex.join(argv),
        },
    }
    if done < len(pairs):
        protocol["partial_pairs"] = {
            "done": done,
            "planned": len(pairs),
            "seeds_done": seeds_done,
        }
    (folder / "protocol.json").write_text(json.dumps(protocol, indent=1) + "\n")
    starved = tuning.starved_in(new_runs, selection.iloc[:0])
    if starved and not args.allow_starved:
        print(f"error: runs flagged themselves starved: {', '.join(starved)}", file=sys.stderr)
        return 1
    out = args.out or folder
    paths = tuning.save(runs, selection, out, protocol, args.at, args.accuracies, args.targets)
    print(paths["table"].read_text())
    print(f"{runs['run'].nunique()} final runs -> " + ", ".join(str(p) for p in paths.values()))
    return 0


def write_report(args, folder: Path, protocol: dict | None) -> int:
    """The report of a protocol folder (selection/ and final/ runs) or of a saved report (into
    outputs/tuned/<its name>/ unless --out: a committed reference is only rewritten when --out
    names it)."""
    from importance_sampling.analysis import tuning

    try:
        if (folder / "selection").is_dir() and (folder / "protocol.json").is_file():
            saved = json.loads((folder / "protocol.json").read_text())
            if not protocol_finished(folder, saved):
                return write_partial(args, folder, saved)
        if (folder / "selection").is_dir() and (folder / "final").is_dir():
            selection = choose_in(folder, args.select_by)
            runs = tuning.collect(folder / "final")
            if protocol is None and (folder / "protocol.json").is_file():
                protocol = json.loads((folder / "protocol.json").read_text())
            out = args.out or folder
        else:
            runs, selection, protocol = tuning.load_saved(folder)
            out = args.out or ROOT / "outputs" / "tuned" / folder.resolve().name
    except (FileNotFoundError, tuning.SelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    starved = tuning.starved_in(runs, selection)
    if starved and not args.allow_starved:
        print(
            f"error: {len(starved)} run(s) flagged themselves starved (another process took "
            f"their CPUs, so their timings do not compare): {', '.join(starved)}. Delete them "
            "and run the same command with --protocol-dir to redo them on an otherwise idle "
            "machine, or pass --allow-starved to report anyway (the report marks them)",
            file=sys.stderr,
        )
        return 1
    paths = tuning.save(runs, selection, out, protocol, args.at, args.accuracies, args.targets)
    print(paths["table"].read_text())
    print(
        f"{runs['run'].nunique()} final runs, {len(selection)} selection runs -> "
        + ", ".join(str(p) for p in paths.values())
    )
    return 0


def protocol_finished(folder: Path, protocol: dict) -> bool:
    """Every planned selection and final run of a protocol folder has ended (summary.json)."""
    from importance_sampling.analysis import tuning

    plan_selection, plan_final = tuning.planned_runs(protocol)
    ended = [len(list((folder / p).glob("*/summary.json"))) for p in ("selection", "final")]
    return ended[0] >= plan_selection and ended[1] >= plan_final


def write_partial(args, folder: Path, protocol: dict) -> int:
    """The report of an unfinished protocol, labelled PARTIAL (tuning.save_partial): the runs
    done so far, nothing chosen or compared."""
    from importance_sampling.analysis import tuning

    def ended(phase: str):
        dirs = [d for d in sorted((folder / phase).glob("*")) if (d / "summary.json").is_file()]
        if not dirs:
            return None
        with tempfile.TemporaryDirectory() as tmp:  # collect reads a folder of runs
            for d in dirs:
                shutil.copytree(d, Path(tmp) / d.name, ignore=shutil.ignore_patterns("*.pt"))
            return tuning.collect(tmp)

    runs = ended("selection")
    selection = tuning.selection_table(runs) if runs is not None else pd.DataFrame()
    final = ended("final") if (folder / "final").is_dir() else None
    starved = [*tuning.starved_runs(selection)["run"]] if len(selection) else []
    if starved and not args.allow_starved:
        print(
            f"error: {len(starved)} run(s) flagged themselves starved: {', '.join(starved)}. "
            "Delete them and go on with --protocol-dir on an otherwise idle machine",
            file=sys.stderr,
        )
        return 1
    out = args.out or ROOT / "outputs" / "tuned" / folder.resolve().name
    started = len(list((folder / "selection").glob("*/.hydra/config.yaml")))
    paths = tuning.save_partial(selection, final, out, protocol, started)
    print(paths["table"].read_text())
    print("PARTIAL report -> " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
