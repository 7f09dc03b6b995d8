"""Train a network with importance sampling: compose the config -> build -> fit -> write results.

    python train.py                                   # upper_bound sampler, digits, MLP
    python train.py sampler=uniform dataset=fashion_mnist trainer.time_budget=120
    python train.py -m sampler=uniform,loss,upper_bound,gradient_norm seed=0,1
    torchrun --standalone --nproc_per_node=2 train.py dataset=fashion_mnist   # data-parallel

Each run writes metrics.csv, summary.json and its composed config (.hydra/) to its run directory.
The library (src/importance_sampling) does the work; importance_sampling.config.builder reads
the config.

Exit status: 0 done; 1 a bad option, missing data, a diverged run or an unusable checkpoint (one
line on stderr, starting with "error:"); 128 + the signal's number when SIGTERM (143) or SIGUSR1
(138) stopped the run, its state saved: run the same command with trainer.resume=true.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

try:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    from importance_sampling.config.builder import ConfigError, run
    from importance_sampling.config.launch import close_ranks, launched_ranks, shared_run_stamp
    from importance_sampling.config.schema import config_error_line
    from importance_sampling.engine.checkpoints import CheckpointError
    from importance_sampling.engine.data import DataError
    from importance_sampling.engine.stopping import TrainingStopped
    from importance_sampling.engine.trainer import TrainingError
except ModuleNotFoundError as e:  # outside the venv: one line, not a traceback
    sys.exit(
        f"error: {sys.executable} has no module {e.name!r}: activate the project's venv "
        "(source .venv/bin/activate) or run `make train`, which sets it up"
    )


def remove_if_empty(out_dir: str | Path) -> None:
    """A run that failed before it wrote anything (bad input) leaves no folder behind: only
    Hydra's files (.hydra/, train.log) were there."""
    out = Path(out_dir)
    if int(os.environ.get("RANK", 0)) > 0 or not out.is_dir():
        return
    if all(p.name in (".hydra", "train.log") for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


@hydra.main(
    version_base="1.3",
    config_path=str(Path(__file__).resolve().parent / "conf"),
    config_name="config",
)
def main(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        return run(cfg, out_dir)["train_loss"]
    except (ConfigError, DataError, TrainingError, CheckpointError) as e:
        # One readable message instead of a stack trace; metrics so far are already on disk.
        print(f"error: {e}", file=sys.stderr)
        remove_if_empty(out_dir)
        sys.exit(1)
    except OmegaConfBaseException as e:  # a value read while building, e.g. ${oc.env:UNSET}
        print(f"error: {config_error_line(e)}", file=sys.stderr)
        remove_if_empty(out_dir)
        sys.exit(1)
    except TrainingStopped as e:  # SIGTERM / SIGUSR1: saved, to be resumed
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main_with_one_line_errors() -> None:
    """main(), with Hydra's composition errors (an option of the wrong type, a key or a group
    option that does not exist, a malformed override) as one line instead of Hydra's report.
    HYDRA_FULL_ERROR=1 makes Hydra raise them here; a user who set it gets the traceback."""
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        if wants_traceback:
            raise
        print(f"error: {config_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if not wants_traceback:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def prepare_ranks() -> None:
    """Several processes of one run (torchrun): the same run directory on every rank (rank 0's
    clock names it), and Hydra's files and logs from rank 0 only."""
    if launched_ranks() <= 1:
        return
    os.environ.setdefault("IS_RUN_STAMP", shared_run_stamp())
    if int(os.environ.get("RANK", 0)) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


def agent_run_dir() -> None:
    """A job that ``wandb agent`` started (WANDB_SWEEP_ID and WANDB_RUN_ID in its environment)
    writes its run directory under one folder per sweep, as a Hydra multirun does:
    multirun/wandb-<sweep id>/<sampler>_seed<seed>_<run id>/ (unless hydra.run.dir is given), so
    that SWEEP_DIR=multirun/wandb-<sweep id> selects that sweep's runs and nothing else."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not (sweep and run) or any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
        return
    name = "${hydra:runtime.choices.sampler}_seed${seed}_" + run
    sys.argv.append(f"hydra.run.dir=multirun/wandb-{sweep}/{name}")


if __name__ == "__main__":
    prepare_ranks()
    agent_run_dir()
    main_with_one_line_errors()  # an error exits here: no goodbye with ranks that may be elsewhere
    close_ranks()
