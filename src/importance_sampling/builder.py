"""From a composed Hydra config to a ready Trainer: the one module of the package that reads
configs (train.py, the scripts and the tests call it).

    trainer = build_trainer(cfg, out_dir)     # checked: a bad option is one ConfigError line
    summary = trainer.fit()                   # or run(cfg, out_dir), which also prints a line

The types of the options are checked when Hydra composes the config (schema.py, imported here so
that composing finds the schemas); their ranges are checked by the constructors they reach.
The config's ``trainer`` section is split here into the objects that own each concern:
``Budget`` (time_budget, max_steps, max_epochs, max_passes, eval_every_*), ``Runtime`` (device,
amp, channels_last, compile, check_finite, the data-parallel ranks), ``LRSchedule`` (lr_*),
and the Trainer's own options (evaluation, checkpoints, resume, progress).
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from .budget import Budget, LRSchedule
from .data import DataError, StreamingDataset, TensorDataset, hold_out_validation
from .distributed import Distributed, init_distributed
from .outputs import Callback
from .runtime import Runtime, resolve_device
from .schema import check_config
from .sources import LoaderOptions
from .trainer import Trainer

log = logging.getLogger("train")

BUDGET_KEYS = (
    "time_budget",
    "max_steps",
    "max_epochs",
    "max_passes",
    "eval_every_seconds",
    "eval_every_steps",
)
RUNTIME_KEYS = ("amp", "channels_last", "compile", "check_finite")
SCHEDULE_KEYS = {"lr_schedule": "schedule", "lr_milestones": "milestones", "lr_gamma": "gamma"}
GROUPS = ("sampler", "trainer", "loader", "dataset", "model", "optimizer", "variance", "logger")


class ConfigError(ValueError):
    """A config value is invalid; the message names the option."""


def build(node: DictConfig | dict, what: str, **kwargs):
    """instantiate() that turns a failing constructor into one readable line naming the group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, DataError):
            raise cause from None
        raise ConfigError(f"{what}: {cause}") from None


def _config_error(error: Exception, default: str = "trainer") -> ConfigError:
    """A ValueError of a constructor as a ConfigError prefixed by the group its message names."""
    message = str(error)
    group = message.split(".", 1)[0]
    return ConfigError(f"{group if group in GROUPS else default}: {message}")


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

    from .variance import VarianceCallback

    callbacks: list[Callback] = []
    if cfg.get("variance") and cfg.variance.every_rows:
        try:
            callbacks.append(VarianceCallback(**cfg.variance))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"variance: {e}") from None
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
                run_config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return callbacks


def _set_threads(threads, dist: Distributed, device: torch.device) -> None:
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer or null, got {threads!r}")
        torch.set_num_threads(threads)
    elif dist.enabled and device.type == "cpu":
        # the cores this process may run on: all of the machine's, shared by its ranks, or its own
        # (a cluster that binds each task to cpus_per_task cores)
        total = os.cpu_count() or 1
        mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        torch.set_num_threads(max(1, mine // per_node if mine == total else mine))


def build_trainer(
    cfg: DictConfig,
    out_dir: str | Path,
    data: TensorDataset | StreamingDataset | None = None,
) -> Trainer:
    """Everything a run needs, built and checked from ``cfg`` (``data``: use this dataset
    instead of building cfg.dataset, e.g. synthetic data in a benchmark)."""
    try:
        check_config(cfg)  # what composing cannot check: tau_threshold, amp, ...; +keys
    except ValueError as e:
        raise _config_error(e) from None
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    try:
        device_type = resolve_device(cfg.device).type
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device: {e}") from None
    dist = init_distributed(device_type)
    _set_threads(cfg.threads, dist, torch.device(device_type))
    t = cfg.trainer
    try:
        runtime = Runtime(cfg.device, **{k: t[k] for k in RUNTIME_KEYS}, dist=dist)
        budget = Budget(**{k: t.get(k) for k in BUDGET_KEYS})
        schedule = LRSchedule(**{v: t[k] for k, v in SCHEDULE_KEYS.items()})
        loader = LoaderOptions(**cfg.get("loader", {}))
    except (TypeError, ValueError) as e:
        raise _config_error(e) from None
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
    try:
        optimizer = build(cfg.optimizer, "optimizer")(model.parameters())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer: {e}") from None
    if not all(group["lr"] > 0 for group in optimizer.param_groups):
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
    try:
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
            train_eval_size=t.train_eval_size,
            eval_batch_size=t.eval_batch_size,
            loader=loader,
            checkpoint_every=t.checkpoint_every,
            checkpoint_unit=t.checkpoint_unit,
            resume=t.resume,
            progress=t.progress,
            callbacks=callbacks,
        )
    except (TypeError, ValueError) as e:
        raise _config_error(e) from None


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Build everything from ``cfg``, train, and return the summary (also in out_dir)."""
    trainer = build_trainer(cfg, out_dir)
    summary = trainer.fit()
    if trainer.dist.is_main:
        print(format_summary(summary, out_dir))
    return summary


def format_summary(s: dict, out_dir: str | Path) -> str:
    split = s.get("eval_split", "test")  # the test_* values are validation ones with a split
    return (
        f"{s['sampler']} on {s['dataset']}: {s['step']} steps ({s['epoch']:.1f} epochs) in "
        f"{s['train_time']:.1f} s of training, importance sampling on {s['importance_steps']} steps | "
        f"train loss {s['train_loss']:.4f} | {split} loss {s['test_loss']:.4f} | "
        f"{split} error {100 * s['test_error']:.2f}% | results in {out_dir}"
    )
