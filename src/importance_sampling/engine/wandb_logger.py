"""Weights & Biases logging as a trainer ``Callback``: one W&B run per training run.

The W&B run starts at the first metrics row (inside ``Trainer.fit``, whose ``finally`` always
reaches ``on_end``) and is finished in ``on_end``, whatever the status. So a job that fails never
leaves a run open, and jobs that share a worker process (Hydra's basic and joblib launchers reuse
them) never merge into one run. The logger keeps all its state on the instance.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .callbacks import Callback

if TYPE_CHECKING:
    from .trainer import Trainer

MODES = ("online", "offline", "disabled")


def resolve_mode(mode: str | None) -> str:
    """The W&B mode to use: ``mode`` (default offline), unless WANDB_MODE=disabled forces it off.

    Offline never blocks and needs neither an account nor a network; CI sets WANDB_MODE=disabled.
    """
    if os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    mode = mode or "offline"
    if mode not in MODES:
        raise ValueError(f"logger.mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def sweep_ids() -> tuple[str, str] | None:
    """(sweep id, run id) of a job that ``wandb agent`` started (it sets both variables in the
    job's environment); None otherwise."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return (sweep, run) if sweep and run else None


def run_name(sampler: str, seed: int | None) -> str:
    """``<sampler>_seed<seed>``, and ``_<run id>`` in a W&B sweep: the name of the W&B run and
    of the job's folder under ``multirun/wandb-<sweep id>/`` (train.py)."""
    ids = sweep_ids()
    return f"{sampler}_seed{seed}" + (f"_{ids[1]}" if ids else "")


class WandbLogger(Callback):
    """Logs the resolved config, every metrics row (against ``train_time``) and the summary.

    Args:
        project / entity: where the runs go (entity None: the account's default).
        group: W&B group, e.g. the experiment preset (None: ``<dataset>_<model>``).
        tags: extra tags; ``sampler=<name>`` and ``seed=<seed>`` are always added.
        mode: online | offline | disabled (see ``resolve_mode``).
        dir: where W&B writes its files (None: ``out_dir``, beside metrics.csv).
        out_dir: the run directory.
        run_config: the full resolved config, stored with the run.
        seed: the run's seed (for the tag and the run name).
    """

    def __init__(
        self,
        project: str = "importance-sampling",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = "offline",
        dir: str | Path | None = None,
        out_dir: str | Path = ".",
        run_config: dict[str, Any] | None = None,
        seed: int | None = None,
    ):
        self.project, self.entity, self.group = project, entity, group
        self.tags = list(tags)
        self.mode = resolve_mode(mode)
        self.out_dir = Path(out_dir)
        self.dir = Path(dir) if dir else self.out_dir
        self.config = dict(run_config or {})
        self.seed = seed
        self.run = None
        self.failed = False  # after a W&B error: stop logging, keep training

    def _start(self, trainer: Trainer):
        import wandb  # imported here: a run without this logger never pays for it

        sampler, dataset = trainer.sampler.name, trainer.data.name
        group = self.group or f"{dataset}_{type(trainer.model).__name__.lower()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=group,
            job_type="train",
            name=run_name(sampler, self.seed),
            tags=[f"sampler={sampler}", f"seed={self.seed}", *self.tags],
            config={**self.config, "run_dir": str(self.out_dir)},
            dir=str(self.dir),
            mode=self.mode,
            # a run left open by an earlier job in this process is closed, never continued
            reinit="finish_previous",
            # the run directory already has the console log (train.log); no system-metrics thread
            # competing with the timed steps on a small CPU
            # online: give up on an unreachable server after 30 s (then offline), not W&B's 90 s
            settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=30),
        )
        # the paper's x-axis: every metric is plotted against seconds of training
        run.define_metric("train_time")
        run.define_metric("*", step_metric="train_time")
        return run

    def on_row(self, trainer: Trainer, row: dict) -> None:
        if self.failed:
            return
        try:
            if self.run is None:
                self.run = self._start_or_go_offline(trainer)
            self.run.log(dict(row))
        except Exception as e:  # W&B must never stop a training run: metrics.csv has every row
            self._give_up(
                f"W&B logging failed ({type(e).__name__}: {e}); training goes on, "
                "metrics.csv still has every row"
            )

    def _start_or_go_offline(self, trainer: Trainer):
        try:
            return self._start(trainer)
        except Exception as e:
            if self.mode != "online":
                raise
            warnings.warn(
                f"W&B is unreachable or not logged in ({type(e).__name__}: {e}); "
                f"logging offline to {self.dir} instead (upload later with wandb sync)",
                stacklevel=2,
            )
            self.mode = "offline"
            return self._start(trainer)

    def _give_up(self, message: str) -> None:
        warnings.warn(message, stacklevel=2)
        self.failed = True
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.summary.update(
                {
                    k: v
                    for k, v in summary.items()
                    if v is not None and not (isinstance(v, float) and math.isnan(v))
                }
            )
            run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
        except Exception as e:
            self.run = run
            self._give_up(f"W&B could not close its run ({type(e).__name__}: {e})")
