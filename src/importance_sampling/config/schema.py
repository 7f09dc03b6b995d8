"""The types of every config option: one dataclass per config file, registered in Hydra's
ConfigStore under ``schema/<group>/<name>``.

The YAML files in conf/ keep the values users read and change; each names its schema first in
its defaults list (``- /schema/optimizer/sgd@_here_``), so that OmegaConf checks every value's
type when the config is composed (YAML files, presets and command-line overrides alike) and a
key that does not exist is an error. The schemas hold no values of their own (every field is
MISSING until its YAML file sets it): the YAML file is the one place a default lives.

Types only; ranges (``batch_size >= 1``, ``0 <= tau_momentum < 1``) stay with the constructors
that use the values. OmegaConf has no unions of a number and a word, so the options that take
several kinds of values (``tau_threshold``: a number, ``auto`` or null; ``amp``: ``auto``, true
or false) are ``Any`` here with the kinds they accept declared by ``one_of``; ``check_config``
checks those after composition.

Importing this module registers the schemas; Hydra imports it when it starts, wherever these
configs are composed (src/hydra_plugins/importance_sampling_schema), and so does the builder.
"""

import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

M: Any = MISSING  # every value comes from the YAML file


def one_of(*kinds: Any) -> Any:
    """A field of type Any that accepts values of these kinds: a Python type (bool, int, float,
    str) or a literal (``"auto"``, ``None``); checked by ``check_config``."""
    return field(default=MISSING, metadata={"kinds": kinds})


# ---------------------------------------------------------------- the top level and its sections
@dataclass
class TrainerConf:
    time_budget: float | None = M
    max_steps: int | None = M
    max_epochs: float | None = M
    max_passes: float | None = M
    eval_every_seconds: float | None = M
    eval_every_steps: int | None = M
    eval_share: float | None = M
    train_eval_size: int | None = M
    eval_batch_size: int | None = M
    amp: Any = one_of("auto", bool)
    progress: bool = M
    reference_steps: int = M
    checkpoint_every: float | None = M
    checkpoint_unit: str = M
    resume: Any = one_of(bool, "must")
    lr_schedule: str = M
    lr_milestones: list[float] = M
    lr_gamma: float = M
    channels_last: Any = one_of("auto", bool)
    compile: bool = M
    check_finite: str = M


@dataclass
class LoaderConf:
    num_workers: int = M
    pin_memory: Any = one_of("auto", bool)
    prefetch_factor: int = M
    persistent_workers: bool = M


@dataclass
class VarianceConf:
    every_rows: int = M
    presample_size: int | None = M
    batch_size: int | None = M
    seed: int = M
    chunk_size: int = M


@dataclass
class Config:
    """conf/config.yaml; the groups' own schemas type dataset, model, sampler, optimizer, logger."""

    seed: int = M
    device: str = M
    threads: Any = one_of(int, "auto", None)
    data_dir: str = M
    trainer: TrainerConf = M
    loader: LoaderConf = M
    variance: VarianceConf = M
    dataset: Any = M
    model: Any = M
    sampler: Any = M
    optimizer: Any = M
    logger: Any = M


# ---------------------------------------------------------------- dataset/
@dataclass
class DatasetConf:
    _target_: str = M
    stream: bool = M
    validation_size: float | None = M
    validation_seed: int = M


@dataclass
class DigitsConf(DatasetConf):
    test_fraction: float = M
    seed: int = M
    train_size: int | None = M


@dataclass
class TorchvisionConf(DatasetConf):
    """mnist, svhn: torchvision's files in data_dir."""

    data_dir: str = M
    download: bool = M
    train_size: int | None = M
    test_size: int | None = M


@dataclass
class MNISTConf(TorchvisionConf):
    augment: bool = M


@dataclass
class FashionMNISTConf(MNISTConf):
    debian_dir: str = M


@dataclass
class CIFARConf(TorchvisionConf):
    augment: bool = M


@dataclass
class PixelMNISTConf(TorchvisionConf):
    permute: bool = M
    permutation_seed: int = M
    downsample: int = M
    images: str = M
    debian_dir: str = M


@dataclass
class ImageFolderConf(DatasetConf):
    root: str = M
    test_root: str | None = M
    image_size: int = M
    test_fraction: float = M
    seed: int = M
    train_size: int | None = M
    test_size: int | None = M
    augment: bool = M
    channels: int | None = M


@dataclass
class SyntheticConf(DatasetConf):
    shape: list[int] = M
    num_classes: int = M
    train_size: int = M
    test_size: int = M
    augment: bool = M
    seed: int = M
    name: str = M


# ---------------------------------------------------------------- model/
@dataclass
class MLPConf:
    _target_: str = M
    hidden_sizes: list[int] = M


@dataclass
class CNNConf:
    _target_: str = M
    channels: list[int] = M
    hidden_size: int = M


@dataclass
class LSTMConf:
    _target_: str = M
    hidden_size: int = M
    num_layers: int = M


@dataclass
class ResNetConf:
    _target_: str = M
    arch: str = M
    weights: str | None = M
    freeze: str = M


@dataclass
class WRNConf:
    _target_: str = M
    depth: int = M
    widen_factor: int = M
    dropout: float = M


# ---------------------------------------------------------------- optimizer/
@dataclass
class SGDConf:
    _target_: str = M
    _partial_: bool = M
    lr: float = M
    momentum: float = M
    nesterov: bool = M
    weight_decay: float = M


@dataclass
class AdamConf:
    _target_: str = M
    _partial_: bool = M
    lr: float = M
    betas: list[float] = M
    weight_decay: float = M


# ---------------------------------------------------------------- sampler/
@dataclass
class SamplerConf:
    _target_: str = M
    batch_size: int = M
    presample_size: int | None = M


@dataclass
class ImportanceConf(SamplerConf):
    """importance_sampler.yaml, shared by loss, upper_bound, gradient_norm, upper_bound_auto."""

    score: str = M
    tau_threshold: Any = one_of(float, "auto", None)
    tau_momentum: float = M
    tau_kind: str = M
    smoothing: float = M
    score_chunk_size: int | None = M


@dataclass
class HistoryConf(ImportanceConf):
    staleness: int | None = M
    uniform_mix: float = M


@dataclass
class OnlineBatchConf(SamplerConf):
    selection_pressure: float = M
    resort_every: int = M


@dataclass
class SelectiveBackpropConf(SamplerConf):
    beta: float = M
    history_size: int = M
    score_chunk_size: int | None = M


@dataclass
class InfoBatchConf(SamplerConf):
    prune_ratio: float = M
    anneal: float = M
    num_passes: int | None = M


# ---------------------------------------------------------------- logger/
@dataclass
class WandbConf:
    _target_: str = M
    project: str = M
    entity: str | None = M
    group: str | None = M
    tags: list[str] = M
    mode: str = M
    dir: str | None = M


SCHEMAS: dict[str, dict[str, type]] = {  # group -> {schema name: dataclass}
    "": {"config": Config},
    "dataset": {
        "digits": DigitsConf,
        "fashion_mnist": FashionMNISTConf,
        "torchvision": TorchvisionConf,
        "mnist": MNISTConf,
        "cifar": CIFARConf,
        "pixel_mnist": PixelMNISTConf,
        "image_folder": ImageFolderConf,
        "synthetic": SyntheticConf,
    },
    "model": {
        "mlp": MLPConf,
        "cnn": CNNConf,
        "lstm": LSTMConf,
        "resnet": ResNetConf,
        "wrn": WRNConf,
    },
    "optimizer": {"sgd": SGDConf, "adam": AdamConf},
    "sampler": {
        "uniform": SamplerConf,
        "importance": ImportanceConf,
        "history": HistoryConf,
        "online_batch": OnlineBatchConf,
        "selective_backprop": SelectiveBackpropConf,
        "infobatch": InfoBatchConf,
    },
    "logger": {"wandb": WandbConf},
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group="/".join(filter(None, ("schema", group))), name=name, node=node)


register()


# ---------------------------------------------------------------- checks and messages
WORDS = {  # type -> (one value, several)
    float: ("a number", "numbers"),
    int: ("an integer", "integers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
}


def describe_type(annotation: Any) -> str:
    """What a user must write for a field of this type: 'a number', 'an integer or null',
    'a list of integers', ..."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if type(None) in typing.get_args(annotation):
        return f"{describe_type(args[0])} or null"
    if typing.get_origin(annotation) is list:
        return f"a list of {WORDS[args[0]][1]}" if args[0] in WORDS else "a list"
    return WORDS[annotation][0] if annotation in WORDS else getattr(annotation, "__name__", "?")


def _kinds_text(kinds: tuple) -> str:
    words = []
    for kind in kinds:
        if kind is bool:
            words += ["true", "false"]
        elif kind in (float, int):
            words.append("a number")
        elif kind is None:
            words.append("null")
        else:
            words.append(str(kind))
    return ", ".join(words[:-1]) + " or " + words[-1]


def _accepts(kinds: tuple, value: Any) -> bool:
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return True
        if kind in (float, int) and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind is None and value is None:
            return True
        if isinstance(kind, str) and value == kind:
            return True
    return False


class ConfigCheckError(ValueError):
    """A value that composing let through; ``group`` is the config group (or section) of its
    key, ``config`` for a key of the top level."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.group = key.split(".", 1)[0] if "." in key else "config"


def check_config(cfg: DictConfig, prefix: str = "") -> None:
    """The checks that composing cannot do, as a one-line ConfigCheckError: a value of a ``one_of``
    field that is none of its kinds (``trainer.amp must be auto, true or false, got 'maybe'``),
    and a key added with ``+`` to a section that the builder reads by name (the top level,
    trainer, loader, variance), which would be ignored without a word."""
    schema = OmegaConf.get_type(cfg)
    declared = {f.name: f for f in fields(schema)} if is_dataclass(schema) else {}
    for key in cfg:
        name = f"{prefix}{key}"
        if schema in OWN_SECTIONS and key not in declared:
            raise ConfigCheckError(name, unknown_key(name, schema))
        if OmegaConf.is_missing(cfg, key) or OmegaConf.is_interpolation(cfg, key):
            continue  # an interpolation is checked where it is read (its error names it there)
        value = cfg[key]
        if isinstance(value, DictConfig):
            check_config(value, f"{name}.")
            continue
        kinds = declared[key].metadata.get("kinds") if key in declared else None
        if kinds and not _accepts(kinds, value):
            raise ConfigCheckError(name, f"{name} must be {_kinds_text(kinds)}, got {value!r}")


OWN_SECTIONS = (Config, TrainerConf, LoaderConf, VarianceConf)


def unknown_key(key: str, schema: type) -> str:
    """``trainer.warmup is not an option: trainer has time_budget, ...``"""
    where = f"{key.rsplit('.', 1)[0]} has" if "." in key else "the top level has"
    known = ", ".join(f.name for f in fields(schema) if not f.name.startswith("_"))
    return f"{key} is not an option: {where} {known}"


_CONVERSION = re.compile(
    r"Value '(?P<value>.*)' (of type '(?P<type>\w+)' could not be converted|is not a valid)"
)


def _type_error(cause: Any) -> str | None:
    """``key must be <type>, got <value>`` for OmegaConf's ValidationError of a typed value."""
    key, first = cause.full_key, str(cause.msg).splitlines()[0]
    found = _CONVERSION.match(first)
    expected = None
    if is_dataclass(cause.object_type):
        expected = typing.get_type_hints(cause.object_type).get(str(cause.key))
    elif isinstance(cause.parent_node, ListConfig):  # an element of a typed list
        expected = cause.parent_node._metadata.element_type
    if not key:
        return None
    if expected is not None and "is not Optional" in first:  # key=null
        return f"{key} must be {describe_type(expected)}, got null"
    if expected is None or found is None:
        return f"{key}: {first}"
    value = found["value"] if found["type"] in ("int", "float") else repr(found["value"])
    return f"{key} must be {describe_type(expected)}, got {value}"


def config_error_line(error: BaseException) -> str:
    """One line for an error of Hydra or OmegaConf while composing or reading the config: the
    key, what it must be and what it got; a group option that does not exist, with the ones
    that do."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        OmegaConfBaseException,
        ValidationError,
    )

    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(cause, ValidationError) and (line := _type_error(cause)):
        return line
    key = getattr(cause, "full_key", None)
    unknown = isinstance(cause, ConfigKeyError | ConfigAttributeError)
    if unknown and key and is_dataclass(cause.object_type):
        return unknown_key(key, cause.object_type)
    text = str(error).split("\nConfig search path:")[0]
    if isinstance(error, MissingConfigException):  # a group option: list the ones there are
        head, _, options = text.partition("\nAvailable options in ")
        group, _, names = options.partition(":")
        listed = ", ".join(n.strip() for n in names.split() if n.strip())
        head = " ".join(line.strip() for line in head.splitlines() if line.strip())
        return f"{head}. Available options in {group}: {listed}" if options else head
    if isinstance(cause, OmegaConfBaseException) and cause is error:  # OmegaConf's own
        return f"{key}: {str(cause.msg).splitlines()[0]}" if key else str(cause.msg)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if isinstance(error, OverrideParseException):  # a malformed key=value
        return f"cannot read the override {error.override!r}: {text}"
    if isinstance(cause, OmegaConfBaseException):  # Hydra's words, then OmegaConf's
        text += f": {str(cause.msg).splitlines()[0]}" + (f" ({key})" if key else "")
    return text
