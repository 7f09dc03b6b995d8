"""From a composed Hydra config to a ready Trainer: the one module of the package that reads
configs (train.py, the scripts and the tests call it).

    trainer = build_trainer(cfg, out_dir)     # checked: a bad option is one ConfigError line
    summary = trainer.fit()                   # or run(cfg, out_dir), which also prints a line

The types of the options are checked when Hydra composes the config (schema.py, imported here so
that composing finds the schemas); their ranges are checked by the constructors they reach.
Groups with a ``_target_`` (dataset, model, sampler, optimizer, logger) are instantiated by
Hydra. The config's ``trainer`` section is split by the constructors' own signatures among the
objects that own each concern (``TRAINER_PARTS``): Budget (time_budget, max_steps, ...,
eval_every_*), Runtime (amp, channels_last, compile, check_finite), LRSchedule (lr_*) and the
Trainer's own options (evaluation, checkpoints, resume, progress): a key goes to the one
constructor that has a parameter of its name, so no list of keys is kept by hand here.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from ..core.collectives import Distributed
from ..engine.budget import Budget, LRSchedule
from ..engine.callbacks import Callback
from ..engine.data import DataError, StreamingDataset, TensorDataset, hold_out_validation
from ..engine.machine import starved_warning
from ..engine.outputs import SummaryFile
from ..engine.runtime import Runtime, resolve_device
from ..engine.sources import LoaderOptions
from ..engine.trainer import Trainer
from ..engine.wandb_logger import sweep_ids
from .launch import init_distributed
from .schema import ConfigCheckError, check_config

log = logging.getLogger("train")

# the repository's conf/ (train.py sets PROJECT_ROOT; a checkout has conf/ three levels up)
PROJECT_ROOT = Path(os.environ.get("PROJECT_ROOT", Path(__file__).resolve().parents[3]))

TRAINER_PARTS = (Budget, Runtime, LRSchedule, Trainer)  # what the trainer section configures


class ConfigError(ValueError):
    """A config value is invalid; the message names the option."""


@contextmanager
def group(name: str):
    """Turn a constructor's ValueError or TypeError into a ConfigError prefixed by the config
    group whose values it was given (``sampler: sampler.batch_size must be ...``)."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None


def compose(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """The project's config composed with ``overrides`` as train.py composes it (for scripts,
    notebooks and tests; train.py itself is composed by @hydra.main)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", list(overrides), return_hydra_config=return_hydra_config)


def build(node: DictConfig | dict, what: str, **kwargs):
    """instantiate() that turns a failing constructor into one readable line naming the group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, DataError):
            raise cause from None
        raise ConfigError(f"{what}: {cause}") from None


def parameters(constructor: Callable) -> list[str]:
    """The names a constructor takes by keyword (``**kwargs`` followed into the parent class)."""
    names = []
    for cls in getattr(constructor, "__mro__", (constructor,)):
        if cls is object:
            break
        params = inspect.signature(cls).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def split_section(section: dict, constructors: tuple[Callable, ...]) -> list[dict]:
    """The keys of a config section, one dict per constructor: each key goes to the constructor
    that has a parameter of that name (KeyError for a key that none or several have)."""
    parts: list[dict] = [{} for _ in constructors]
    for key, value in section.items():
        owners = [i for i, c in enumerate(constructors) if key in parameters(c)]
        if len(owners) != 1:
            names = ", ".join(c.__name__ for c in constructors)
            raise KeyError(f"{key} is a parameter of {len(owners)} of {names}, not of exactly one")
        parts[owners[0]][key] = value
    return parts


def build_dataset(node: DictConfig) -> TensorDataset | StreamingDataset:
    """The dataset of ``cfg.dataset``; ``stream: true`` reads it through a DataLoader: loaders
    that can stream from disk themselves (image_folder) are asked to, any other dataset is
    loaded as tensors and read item by item. ``validation_size`` (points or a fraction; null:
    none) moves that many training points, drawn with ``validation_seed``, to a validation
    split that replaces the test set in the evaluation rows (data.hold_out_validation): one
    place for every dataset."""
    spec = OmegaConf.to_container(node, resolve=True)
    stream = spec.pop("stream", False)
    validation_size = spec.pop("validation_size", None)
    validation_seed = spec.pop("validation_seed", 0)
    if stream not in (True, False):
        raise ConfigError(f"dataset: dataset.stream must be true or false, got {stream!r}")
    if isinstance(validation_seed, bool) or not isinstance(validation_seed, int):
        raise ConfigError(
            f"dataset: dataset.validation_seed must be an integer, got {validation_seed!r}"
        )
    if "stream" in inspect.signature(get_method(spec["_target_"])).parameters:
        data = build(spec, "dataset", stream=stream)
    else:
        data = build(spec, "dataset")
    if validation_size is not None:
        try:
            data = hold_out_validation(data, validation_size, validation_seed)
        except ValueError as e:
            raise ConfigError(f"dataset: {e}") from None
    return data.streaming() if stream and isinstance(data, TensorDataset) else data


def sample_inputs(data: TensorDataset | StreamingDataset, n: int = 2) -> torch.Tensor:
    """The first ``n`` training inputs (n, ...), without augmentation."""
    if isinstance(data, TensorDataset):
        return data.train_x[:n]
    return torch.stack([data.train_eval[i][0] for i in range(n)])


def check_model_output(
    model: torch.nn.Module, data: TensorDataset | StreamingDataset, device: torch.device
) -> None:
    """The sampler needs logits of shape (n, num_classes): check once before training."""
    with torch.no_grad():
        out = model(sample_inputs(data).to(device))
    if tuple(out.shape) != (2, data.num_classes):
        raise ConfigError(
            f"model: output shape {tuple(out.shape)} for 2 inputs does not match the "
            f"dataset's {data.num_classes} classes (expected (2, {data.num_classes}))"
        )


def make_callbacks(cfg: DictConfig, out_dir: str | Path) -> list[Callback]:
    """Callbacks (logging, measurements) the config asks for; the trainer calls them at each row."""
    from hydra.core.hydra_config import HydraConfig

    from ..engine.variance import VarianceCallback

    callbacks: list[Callback] = []
    if cfg.get("variance") and cfg.variance.every_rows:
        with group("variance"):
            callbacks.append(VarianceCallback(**cfg.variance))
    if cfg.logger.get("_target_"):  # logger=wandb (conf/logger/); logger=none has no target
        # W&B groups runs by the experiment preset; without one the logger uses <dataset>_<model>
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        callbacks.append(
            build(
                cfg.logger,
                "logger",
                _recursive_=False,
                _convert_="all",
                out_dir=str(out_dir),
                seed=cfg.seed,
                group=cfg.logger.group or choices.get("experiment"),
                # the group choices name the run in the analysis (analysis/wandb_runs.py)
                run_config={
                    **OmegaConf.to_container(cfg, resolve=True),
                    "hydra_choices": {k: v for k, v in choices.items() if v is not None},
                },
            )
        )
    return callbacks


TORCH_THREADS = torch.get_num_threads()  # torch's own default (all cores), before any run sets it


def threads_for(threads, dist: Distributed, device: torch.device) -> int | None:
    """The number of CPU threads a run uses (None: leave torch's default).

    ``auto`` (the default) leaves one core to the rest of the machine: torch's default minus
    one. Torch's threads wait for each other at every parallel operation, so a run that uses
    every core stalls whenever one other process takes one of them (docs/reliability.md has the
    measurement). With several ranks on the CPU each rank takes its share of the cores (or the
    cores a cluster bound it to)."""
    if threads is None or threads == "auto":
        if dist.enabled and device.type == "cpu":
            total = os.cpu_count() or 1
            mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
            return max(1, mine // per_node if mine == total else mine)
        return max(1, TORCH_THREADS - 1) if threads == "auto" else None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, auto or null, got {threads!r}")
    return threads


def build_trainer(
    cfg: DictConfig,
    out_dir: str | Path,
    data: TensorDataset | StreamingDataset | None = None,
) -> Trainer:
    """Everything a run needs, built and checked from ``cfg`` (``data``: use this dataset
    instead of building cfg.dataset, e.g. synthetic data in a benchmark)."""
    try:
        check_config(cfg)  # what composing cannot check: tau_threshold, amp, ...; +keys
    except ConfigCheckError as e:
        raise ConfigError(f"{e.group}: {e}") from None
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    with group("device"):
        device_type = resolve_device(cfg.device).type
    dist = init_distributed(device_type)
    threads = threads_for(cfg.threads, dist, torch.device(device_type))
    if threads is not None:
        torch.set_num_threads(threads)
    budget_options, runtime_options, schedule_options, trainer_options = split_section(
        OmegaConf.to_container(cfg.trainer, resolve=True), TRAINER_PARTS
    )
    with group("trainer"):
        runtime = Runtime(cfg.device, **runtime_options, dist=dist)
        budget = Budget(**budget_options)
        schedule = LRSchedule(**schedule_options)
    with group("loader"):
        loader = LoaderOptions(**cfg.get("loader", {}))
    torch.manual_seed(cfg.seed)
    sampler = build(cfg.sampler, "sampler")  # cheap: its option errors come first
    if data is None:
        # rank 0 first: a first use may copy or download the files, which every rank then reads
        if dist.enabled and not dist.is_main:
            dist.barrier()
        data = build_dataset(cfg.dataset)
        if dist.enabled and dist.is_main:
            dist.barrier()
    model = build(cfg.model, "model", input_shape=data.input_shape, num_classes=data.num_classes)
    check_model_output(model.to(runtime.device), data, runtime.device)
    with group("optimizer"):
        optimizer = build(cfg.optimizer, "optimizer")(model.parameters())
    if not all(g["lr"] > 0 for g in optimizer.param_groups):
        raise ConfigError(f"optimizer.lr must be > 0, got {optimizer.param_groups[0]['lr']}")
    if dist.is_main:
        log.info(
            "%r | %s | %d parameters | %s%s",
            data,
            type(model).__name__,
            sum(p.numel() for p in model.parameters()),
            runtime.device,
            f" x {dist.world_size} processes" if dist.enabled else "",
        )
    callbacks = make_callbacks(cfg, out_dir) if dist.is_main else []
    with group("trainer"):
        return Trainer(
            model,
            optimizer,
            sampler,
            data,
            out_dir,
            seed=cfg.seed,
            budget=budget,
            runtime=runtime,
            schedule=schedule,
            loader=loader,
            callbacks=callbacks,
            **trainer_options,
        )


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Build everything from ``cfg``, train, and return the summary (also in out_dir)."""
    trainer = build_trainer(cfg, out_dir)
    summary = trainer.fit()
    if trainer.dist.is_main and (ids := sweep_ids()):  # a job of `wandb agent`: say which
        summary.update(wandb_sweep_id=ids[0], wandb_run_id=ids[1])
        SummaryFile(Path(out_dir) / "summary.json").on_end(trainer, summary)
    if trainer.dist.is_main:
        print(format_summary(summary, out_dir))
        if warning := starved_warning(summary):
            print(warning, file=sys.stderr, flush=True)
    return summary


def format_summary(s: dict, out_dir: str | Path) -> str:
    split = s.get("eval_split", "test")  # the test_* values are validation ones with a split
    return (
        f"{s['sampler']} on {s['dataset']}: {s['step']} steps ({s['epoch']:.1f} epochs) in "
        f"{s['train_time']:.1f} s of training, importance sampling on {s['importance_steps']} steps | "
        f"train loss {s['train_loss']:.4f} | {split} loss {s['test_loss']:.4f} | "
        f"{split} error {100 * s['test_error']:.2f}% | results in {out_dir}"
    )
