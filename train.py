"""Train a network with importance sampling: compose the config -> build -> fit -> write results.

    python train.py                                   # upper_bound sampler, digits, MLP
    python train.py sampler=uniform dataset=fashion_mnist trainer.time_budget=120
    python train.py -m sampler=uniform,loss,upper_bound,gradient_norm seed=0,1

Each run writes metrics.csv, summary.json and its composed config (.hydra/) to its run directory.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from importance_sampling.data import DataError, TensorDataset  # noqa: E402
from importance_sampling.trainer import Callback, Trainer, TrainingError, resolve_device  # noqa: E402
from importance_sampling.variance import VarianceCallback  # noqa: E402

log = logging.getLogger("train")


class ConfigError(ValueError):
    """A config value is invalid; the message names the option."""


def build(node: DictConfig, what: str, **kwargs):
    """instantiate() that turns a failing constructor into one readable line naming the group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, DataError):
            raise cause from None
        raise ConfigError(f"{what}: {cause}") from None


def make_callbacks(cfg: DictConfig, out_dir: str | Path) -> list[Callback]:
    """Callbacks (logging, measurements) the config asks for; the trainer calls them at each row."""
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


def check_model_output(model: torch.nn.Module, data, device: torch.device) -> None:
    """The sampler needs logits of shape (n, num_classes): check once before training."""
    with torch.no_grad():
        out = model(data.train_x[:2].to(device))
    if tuple(out.shape) != (2, data.num_classes):
        raise ConfigError(
            f"model: output shape {tuple(out.shape)} for 2 inputs does not match the "
            f"dataset's {data.num_classes} classes (expected (2, {data.num_classes}))"
        )


def build_trainer(
    cfg: DictConfig, out_dir: str | Path, data: TensorDataset | None = None
) -> Trainer:
    """Everything a run needs, built and checked from ``cfg`` (``data``: use these tensors
    instead of building cfg.dataset, e.g. synthetic data in a benchmark)."""
    if cfg.threads is not None:
        if not isinstance(cfg.threads, int) or cfg.threads < 1:
            raise ConfigError(f"threads must be a positive integer or null, got {cfg.threads!r}")
        torch.set_num_threads(cfg.threads)
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    torch.manual_seed(cfg.seed)
    try:
        device = resolve_device(cfg.device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device: {e}") from None
    sampler = build(cfg.sampler, "sampler")  # cheap: its option errors come first
    data = data or build(cfg.dataset, "dataset")
    model = build(cfg.model, "model", input_shape=data.input_shape, num_classes=data.num_classes)
    check_model_output(model.to(device), data, device)
    try:
        optimizer = build(cfg.optimizer, "optimizer")(model.parameters())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer: {e}") from None
    if not all(group["lr"] > 0 for group in optimizer.param_groups):
        raise ConfigError(f"optimizer.lr must be > 0, got {optimizer.param_groups[0]['lr']}")
    log.info(
        "%r | %s | %d parameters | %s",
        data,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()),
        device,
    )
    try:
        return Trainer(
            model,
            optimizer,
            sampler,
            data,
            out_dir,
            device=device,
            seed=cfg.seed,
            callbacks=make_callbacks(cfg, out_dir),
            **cfg.trainer,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"trainer: {e}") from None


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Build everything from ``cfg``, train, and return the summary (also in out_dir)."""
    summary = build_trainer(cfg, out_dir).fit()
    print(format_summary(summary, out_dir))
    return summary


def format_summary(s: dict, out_dir: str | Path) -> str:
    return (
        f"{s['sampler']} on {s['dataset']}: {s['step']} steps ({s['epoch']:.1f} epochs) in "
        f"{s['train_time']:.1f} s of training, importance sampling on {s['importance_steps']} steps | "
        f"train loss {s['train_loss']:.4f} | test loss {s['test_loss']:.4f} | "
        f"test error {100 * s['test_error']:.2f}% | results in {out_dir}"
    )


@hydra.main(
    version_base="1.3",
    config_path=str(Path(__file__).resolve().parent / "conf"),
    config_name="config",
)
def main(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        return run(cfg, out_dir)["train_loss"]
    except (ConfigError, DataError, TrainingError) as e:
        # One readable message instead of a stack trace; metrics so far are already on disk.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
