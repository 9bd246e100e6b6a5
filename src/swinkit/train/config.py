"""Training configuration: one dataclass, named recipes, YAML files and command-line flags.

Values resolve in this order, later winning: the dataclass defaults (the official ImageNet-1K
recipe), the chosen ``recipe``, a YAML file (``--config``), then explicit command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import os
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..attention import ATTENTION_IMPLS
from ..checkpoint.adapt import TABLE_RESIZES
from ..evaluate import AMP_DTYPES


@dataclass(frozen=True)
class Limit:
    """The values an option accepts (every element, for a tuple option), and how to say so."""

    accepts: Callable[[Any], bool]
    text: str


AT_LEAST_ONE = Limit(lambda value: value >= 1, "at least 1")
NOT_NEGATIVE = Limit(lambda value: 0 <= value < math.inf, "0 or more")
POSITIVE = Limit(lambda value: 0 < value < math.inf, "above 0")
PROBABILITY = Limit(lambda value: 0 <= value <= 1, "between 0 and 1")
BELOW_ONE = Limit(lambda value: 0 <= value < 1, "at least 0 and below 1")


def one_of(names: Any) -> Limit:
    """The limit of a choice among ``names``."""
    return Limit(lambda value: value in names, f"one of {', '.join(names)}")


# Choices that mean the same in every options class that has the field (training, pretraining, dense).
SHARED_LIMITS: dict[str, Limit] = {"amp": one_of(tuple(AMP_DTYPES)), "attn_impl": one_of(ATTENTION_IMPLS)}


def check_limits(options: Any) -> None:
    """Check every field's type as a YAML value's (:func:`_coerce`, without reading numbers from text)
    and store it converted (an int where a float is expected, a list for a tuple); then refuse an
    option outside its ``LIMITS`` (or a pair in ``ORDERED`` given high first) by name, before a run
    starts: ``epochs=1.5`` or ``batch_size=True`` trained, a batch of 0 divided by zero deep in the
    loop, a negative rate or a probability of 3 trained without a word."""
    kind = type(options)
    for f in dataclasses.fields(options):
        object.__setattr__(options, f.name, _coerce(f.name, getattr(options, f.name), kind, from_text=False))
    limits = {name: limit for name, limit in SHARED_LIMITS.items() if name in kind.__dataclass_fields__}
    for name, limit in (limits | kind.LIMITS).items():
        value = getattr(options, name)
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(limit.accepts(v) for v in values):
            each = " each" if isinstance(value, tuple) else ""
            raise ValueError(f"training option {name!r} must be {limit.text}{each}, got {value!r}")
    for name in type(options).ORDERED:
        value = getattr(options, name)
        if value is not None and list(value) != sorted(value):
            raise ValueError(f"training option {name!r} must be given low to high, got {value!r}")


def _schedule_name(options: Any) -> str:
    """The learning-rate schedule ``options`` runs (classification has only the cosine)."""
    return getattr(options, "schedule", getattr(options, "lr_schedule", "cosine"))


def check_rates(options: Any) -> None:
    """Refuse a ``min_lr`` above ``base_lr`` where the schedule ends at ``min_lr`` (cosine, poly):
    the rate would rise as training goes on, which no recipe means (a small ``base_lr`` given
    alone, below the default ``min_lr``, did it without a word)."""
    schedule = _schedule_name(options)
    if schedule in ("cosine", "poly") and options.min_lr > options.base_lr:
        raise ValueError(
            f"training option 'min_lr' ({options.min_lr:g}) is above 'base_lr' ({options.base_lr:g}): the {schedule} "
            f"schedule would raise the rate as training goes on; give min_lr at or below base_lr (0 ends at zero)"
        )


def schedule_notes(options: Any, steps_per_epoch: int) -> list[str]:
    """What in the learning-rate schedule of ``options`` is valid but likely not meant: a warm-up
    that outlasts the run, a milestone the run never reaches, a warm-up that lowers the rate."""
    total = options.epochs * steps_per_epoch
    if hasattr(options, "warmup_epochs"):
        warmup, given = round(options.warmup_epochs * steps_per_epoch), f"warmup_epochs {options.warmup_epochs:g}"
    else:
        warmup, given = options.warmup_steps, f"warmup_steps {options.warmup_steps}"
    notes = []
    if warmup >= total:
        notes.append(
            f"the warm-up ({given}: {warmup} steps) lasts the whole run ({options.epochs} epoch(s) of "
            f"{steps_per_epoch} steps): the rate never reaches base_lr"
        )
    if _schedule_name(options) in ("step", "multistep"):
        milestones = getattr(options, "milestones", getattr(options, "lr_milestones", ()))
        late = [epoch for epoch in milestones if epoch >= options.epochs]
        if late:
            notes.append(
                f"milestone epoch(s) {late} come at or after the end of the run ({options.epochs} epochs): "
                "the rate is not multiplied by gamma there"
            )
    if warmup and options.warmup_lr > options.base_lr:
        notes.append(
            f"warmup_lr ({options.warmup_lr:g}) is above base_lr ({options.base_lr:g}): the warm-up lowers the rate"
        )
    return notes


class BatchScaling:
    """The official linear scaling of learning rates with the total batch (``batch_size``,
    ``accum_steps`` fields), shared by the training and pretraining options."""

    def total_batch(self, world_size: int) -> int:
        return self.batch_size * world_size * self.accum_steps

    def scaled(self, value: float, world_size: int) -> float:
        """Rates are given for a total batch of 512."""
        return value * self.total_batch(world_size) / 512.0


@dataclass
class TrainConfig(BatchScaling):
    """Everything a training run depends on; saved as ``config.yaml`` beside its checkpoints."""

    # Data: an image folder (with train/ and val/ sub-folders, or class folders split by
    # val_fraction) or a CSV list of path,label; None trains on the bundled handwritten digits.
    data: str | None = None
    val_data: str | None = None
    val_fraction: float = 0.2
    strict_data: bool = False
    workers: int = 2
    # Model and fine-tuning.
    model: str = "swin_t"
    checkpoint: str | None = None
    img_size: int | None = None
    window_size: int | None = None
    drop_path_rate: float | None = None
    layer_decay: float | None = None
    table_resize: str = "bicubic"
    freeze_stages: int = 0
    grad_checkpointing: bool = False
    compile: bool = False
    attn_impl: str = "auto"
    # Optimisation: AdamW, linear warm-up then cosine, per iteration; lr scaled by batch / 512.
    epochs: int = 300
    batch_size: int = 128
    accum_steps: int = 1
    base_lr: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    # Augmentation (timm's building blocks).
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    hflip: float = 0.5
    color_jitter: float = 0.4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    # Machinery.
    amp: str = "none"
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 0
    deterministic: bool = False
    fsdp: bool = False
    device: str = "auto"
    # Output.
    output: str = "runs/train"
    resume: str = "auto"
    checkpoint_every: int = 0
    max_steps: int = 0
    progress: bool = True
    recipe: str = "imagenet"

    # One line per field for --help (add_arguments adds the default).
    HELP: ClassVar[dict[str, str]] = {
        "data": "training images: a folder (with train/ and val/, or class sub-folders) or a CSV of path,label; "
        "None: the bundled handwritten digits",
        "val_data": "validation images: a folder of class sub-folders or a CSV (default: taken from --data)",
        "val_fraction": "share of --data held out for validation when it has no val/ and no --val-data is given "
        "(stratified, fixed seed)",
        "strict_data": "stop at the first undecodable image instead of skipping it",
        "workers": "data-loading worker processes, per process (0: load in the main process)",
        "model": "model preset (swinkit info --list)",
        "checkpoint": "initialise from this file (any supported format); another class count re-initialises the head",
        "img_size": "input size in pixels (None: the preset's)",
        "window_size": "attention window (None: the preset's); a checkpoint's bias tables are resized to it",
        "drop_path_rate": "stochastic depth rate (None: the preset's)",
        "layer_decay": "layer-wise learning-rate decay for fine-tuning, e.g. 0.9: each layer's rate is the next "
        "higher layer's times this (None: off)",
        "table_resize": "how a V1 checkpoint's bias tables go to another window: bicubic, or geometric "
        "(SimMIM fine-tuning's)",
        "freeze_stages": "freeze the patch embedding and the first K stages (0: train everything); frozen parts stay "
        "in eval mode",
        "grad_checkpointing": "recompute each block in the backward pass instead of storing its activations "
        "(less memory, slower)",
        "compile": "torch.compile the model",
        "attn_impl": f"window-attention implementation: {', '.join(ATTENTION_IMPLS)} "
        "(auto: the fastest exact one for the device)",
        "epochs": "training epochs",
        "batch_size": "images per step, per process (the official 1024 is 128 on each of 8 GPUs)",
        "accum_steps": "micro-batches accumulated into each optimizer step (the total batch is batch size x "
        "processes x this)",
        "base_lr": "peak learning rate per 512 images: scaled by the total batch / 512",
        "warmup_lr": "learning rate the linear warm-up starts from, per 512 images",
        "min_lr": "learning rate the cosine ends at, per 512 images",
        "warmup_epochs": "epochs of linear warm-up (fractions allowed)",
        "weight_decay": "AdamW weight decay (none on norms, biases and position tables)",
        "betas": "AdamW's two betas",
        "eps": "AdamW's epsilon",
        "clip_grad": "clip the gradient norm to this (0 disables clipping)",
        "label_smoothing": "label smoothing of the cross-entropy targets",
        "mixup": "mixup alpha (0 disables mixup); batches of an odd size are not mixed",
        "cutmix": "cutmix alpha (0 disables cutmix)",
        "mixup_prob": "probability that a batch is mixed (by mixup or cutmix)",
        "mixup_switch_prob": "probability of cutmix rather than mixup when both are on",
        "auto_augment": "timm augmentation policy, e.g. rand-m9-mstd0.5-inc1 (the official RandAugment), or none",
        "reprob": "random erasing probability",
        "hflip": "horizontal flip probability",
        "color_jitter": "colour jitter strength (0 disables); timm ignores it while an --auto-augment policy other "
        "than 3a is set",
        "crop_scale": "random resized crop: the range of the image's area kept, low and high",
        "crop_ratio": "random resized crop: the range of aspect ratios, low and high",
        "amp": "mixed precision: none, bf16 or fp16 (fp16 with a gradient scaler)",
        "ema": "keep an exponential moving average of the weights, validated beside them and saved as "
        "model-ema.safetensors (not with --fsdp)",
        "ema_decay": "EMA decay per optimizer step",
        "seed": "random seed of initialisation, data order, augmentation, dropout and drop path",
        "deterministic": "use PyTorch's deterministic algorithms only (an operation without one stops the run)",
        "fsdp": "shard the model over the processes with FSDP (torchrun with several processes)",
        "device": "auto (each process's GPU if CUDA is available, else the CPU), cpu, cuda, cuda:N or mps",
        "output": "folder for checkpoints, metrics and the trained model",
        "resume": "auto (continue the run in --output if it left a checkpoint), never, or a checkpoint path",
        "checkpoint_every": "also save the training state every N optimizer steps (0: at epoch ends only)",
        "max_steps": "stop after N optimizer steps (0: run every epoch); for tests and smoke runs",
        "progress": "show a progress bar (main process, on a terminal)",
        "recipe": "named set of option values, listed below (default: imagenet with --data, digits without)",
    }

    LIMITS: ClassVar[dict[str, Limit]] = {
        "val_fraction": BELOW_ONE,
        "workers": NOT_NEGATIVE,
        "img_size": AT_LEAST_ONE,
        "window_size": AT_LEAST_ONE,
        "drop_path_rate": BELOW_ONE,
        "layer_decay": POSITIVE,
        "epochs": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
        "accum_steps": AT_LEAST_ONE,
        **dict.fromkeys(["base_lr", "warmup_lr", "min_lr", "warmup_epochs", "weight_decay"], NOT_NEGATIVE),
        "betas": BELOW_ONE,
        "eps": POSITIVE,
        **dict.fromkeys(["clip_grad", "mixup", "cutmix", "color_jitter"], NOT_NEGATIVE),
        "label_smoothing": BELOW_ONE,
        **dict.fromkeys(["mixup_prob", "mixup_switch_prob", "reprob", "hflip", "ema_decay"], PROBABILITY),
        "crop_scale": Limit(lambda value: 0 < value <= 1, "above 0 and at most 1"),
        "crop_ratio": POSITIVE,
        "checkpoint_every": NOT_NEGATIVE,
        "max_steps": NOT_NEGATIVE,
    }
    ORDERED: ClassVar[tuple[str, ...]] = ("crop_scale", "crop_ratio")

    def __post_init__(self) -> None:
        check_limits(self)
        check_rates(self)
        if self.table_resize not in TABLE_RESIZES:
            raise ValueError(f"table_resize must be one of {', '.join(TABLE_RESIZES)}, got {self.table_resize!r}")


_SIMMIM_FINETUNE: dict[str, Any] = dict(
    img_size=224,
    epochs=100,
    warmup_epochs=20,
    base_lr=1.25e-3,
    warmup_lr=2.5e-7,
    min_lr=2.5e-7,
    weight_decay=0.05,
    table_resize="geometric",
)

RECIPES: dict[str, dict[str, Any]] = {
    # The official ImageNet-1K recipe is the dataclass defaults.
    "imagenet": {},
    # Official 22K -> 1K fine-tuning (drop path: RECIPE_MODELS has Swin-T's own).
    "finetune": dict(
        epochs=30, warmup_epochs=5, base_lr=2e-5, warmup_lr=2e-8, min_lr=2e-7, weight_decay=1e-8, drop_path_rate=0.2
    ),
    # Fine-tuning a SimMIM-pretrained encoder (swinkit pretrain) at 224: the official recipes, each
    # after its pretraining recipe of the same name (SimMIM's 100-epoch Swin-B; the Swin Transformer
    # repository's 800-epoch ones): layer-wise rate decay, 20 warm-up epochs of 100.
    "simmim-finetune": dict(_SIMMIM_FINETUNE, model="swin_b", window_size=7, drop_path_rate=0.1, layer_decay=0.9),
    "simmim-finetune-swin-b-800ep": dict(
        _SIMMIM_FINETUNE, model="swin_b", window_size=7, drop_path_rate=0.1, layer_decay=0.8
    ),
    "simmim-finetune-swin-l-800ep": dict(
        _SIMMIM_FINETUNE, model="swin_l", window_size=14, drop_path_rate=0.2, layer_decay=0.7
    ),
    "simmim-finetune-swinv2-b-800ep": dict(
        _SIMMIM_FINETUNE, model="swinv2_b", window_size=14, drop_path_rate=0.1, layer_decay=0.75
    ),
    # The bundled 8x8 digits: a small model, light augmentation (no flips: a flipped 2 is no digit).
    "digits": dict(
        model="swin_digits",
        epochs=20,
        batch_size=64,
        base_lr=8e-3,
        warmup_lr=8e-6,
        min_lr=8e-5,
        warmup_epochs=2,
        mixup=0.0,
        cutmix=0.0,
        auto_augment="none",
        reprob=0.0,
        hflip=0.0,
        color_jitter=0.0,
        crop_scale=(0.7, 1.0),
        crop_ratio=(0.85, 1.15),
        output="runs/digits",
    ),
}


@functools.cache
def _augment_policy(name: str) -> bool:
    """Whether timm builds the augmentation policy ``name`` (``none`` or empty: no policy), as
    :func:`~swinkit.data.transforms.train_transform` will ask it to."""
    if name in ("", "none"):
        return True
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    # timm's create_transform picks the parser by the name's start, as here.
    build = (
        rand_augment_transform
        if name.startswith("rand")
        else augment_and_mix_transform
        if name.startswith("augmix")
        else auto_augment_transform
    )
    try:
        build(name, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, IndexError, KeyError, ValueError):  # timm asserts on a name it does not know
        return False
    return True


# The choices named only below the class: its recipes and timm's policies (checked when built, not
# when the run's transforms are).
TrainConfig.LIMITS |= {
    "recipe": one_of(RECIPES),
    "auto_augment": Limit(
        _augment_policy,
        "'none' or a policy timm reads (RandAugment 'rand-m9-mstd0.5-inc1' as the paper, 'augmix-...', or "
        "AutoAugment's 'v0', 'v0r', 'original', 'originalr', '3a')",
    ),
}


@functools.cache
def _field_types(options: type = TrainConfig) -> dict[str, Any]:
    return typing.get_type_hints(options)


def _without_none(kind: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def _coerce(name: str, value: Any, options: type = TrainConfig, from_text: bool = True) -> Any:
    """Check and convert a value from YAML or the command line (``from_text``: numbers may be
    given as text) or from Python (a value of the field's type, numbers not read from strings, a
    path for a string) to the field's type."""
    declared = _field_types(options)[name]
    kind = _without_none(declared)
    if value is None:
        if kind is not declared:  # an Optional field: null means none
            return None
        given = "null (YAML's null, ~ or an empty value)" if from_text else "None"
        raise ValueError(
            f"training option {name!r} cannot be {given}; give a "
            f"{getattr(kind, '__name__', kind)}, or leave the key out for the default"
        )
    origin = typing.get_origin(kind)
    if origin is tuple:
        items = typing.get_args(kind)
        variable = items[-1] is Ellipsis
        # A list of any length may be empty where the default is, or where the options say so
        # (no milestones: a step schedule at one rate).
        may_be_empty = options.__dataclass_fields__[name].default == () or name in getattr(options, "MAY_BE_EMPTY", ())
        required = variable and not may_be_empty
        count = ("one or more" if required else "zero or more") if variable else len(items)
        if (
            not isinstance(value, (list, tuple))
            or (not variable and len(value) != len(items))
            or (required and not value)
        ):
            raise ValueError(f"training option {name!r} must be a list of {count} numbers, got {value!r}")
    try:
        if origin is tuple:
            return tuple(_convert(items[0], v, from_text) for v in value)
        return _convert(kind, value, from_text)
    except (TypeError, ValueError):
        raise ValueError(f"training option {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}") from None


def _convert(kind: Any, value: Any, from_text: bool = True) -> Any:
    """``kind(value)`` without the silent changes Python allows: a bool is not a number (``True`` is
    not a batch of 1), nor a number a bool, and a whole number is not 2.5 truncated to 2. Not
    ``from_text``: a string is no number (``batch_size="8"``) and only a string or a path is a string."""
    if (kind is bool) != isinstance(value, bool):
        raise ValueError
    if kind is int and isinstance(value, numbers.Real) and not float(value).is_integer():
        raise ValueError
    if not from_text:
        if kind is str:
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError
            return os.fspath(value)
        if isinstance(value, (str, bytes)):
            raise ValueError
    return kind(value)


# What a recipe sets otherwise for one model: the official 22K -> 1K fine-tuning configs give
# Swin-T drop path 0.1, the others (Swin-S, B, L, SwinV2-B) 0.2.
RECIPE_MODELS: dict[str, dict[str, dict[str, Any]]] = {"finetune": {"swin_t": dict(drop_path_rate=0.1)}}


def resolve_config(explicit: dict[str, Any] | None = None, config_file: str | os.PathLike | None = None) -> TrainConfig:
    """Defaults, then the recipe, then ``config_file`` (YAML), then ``explicit`` values."""
    return resolve_options(
        TrainConfig,
        RECIPES,
        explicit,
        config_file,
        lambda values: "imagenet" if values.get("data") is not None else "digits",
        RECIPE_MODELS,
    )


def resolve_options(
    options: type,
    recipes: dict[str, dict[str, Any]],
    explicit: dict[str, Any] | None,
    config_file: str | os.PathLike | None,
    default_recipe: Callable[[dict[str, Any]], str],
    recipe_models: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> Any:
    """Build the ``options`` dataclass (one with a ``recipe`` field): defaults, recipe, YAML, explicit values.

    ``default_recipe`` picks the recipe from the file and explicit values when neither names one;
    ``recipe_models`` holds what a recipe sets otherwise for one model (recipe -> model -> values).
    """
    explicit = dict(explicit or {})
    from_file = load_yaml(config_file) if config_file else {}
    known = {f.name for f in dataclasses.fields(options)}
    unknown = sorted((set(from_file) | set(explicit)) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; accepted: {sorted(known)}")
    recipe = explicit.get("recipe", from_file.get("recipe", default_recipe({**from_file, **explicit})))
    if recipe not in recipes:
        raise ValueError(f"unknown recipe {recipe!r}; accepted: {', '.join(recipes)}")
    given = {**recipes[recipe], **from_file, **explicit}
    model = given.get("model", options.__dataclass_fields__["model"].default)
    for_model = (recipe_models or {}).get(recipe, {}).get(model, {})
    values = {**recipes[recipe], **for_model, **from_file, **explicit, "recipe": recipe}
    return options(**{name: _coerce(name, value, options) for name, value in values.items()})


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The options of a YAML config file (dashes in keys read as underscores); a clear error for a
    missing, binary or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: a config file is YAML (option: value lines)") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, got {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def save_yaml(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (tuples as lists), as the run's ``config.yaml``."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def add_arguments(
    parser: argparse.ArgumentParser,
    options: type = TrainConfig,
    shown: dict[str, Any] | None = None,
    without_data: dict[str, Any] | None = None,
) -> None:
    """One ``--flag`` per field of ``options``, its help from ``options.HELP`` and its default: the
    dataclass's, or ``shown``'s (a recipe that always applies) where it has one; ``without_data``:
    the recipe chosen when no ``--data`` is given, whose values are shown beside where they differ.
    A text that gives its own default, as ``recipe``'s does, or ends in "(required)" shows no
    other. Unset flags keep the recipe / file value."""
    parser.formatter_class = HyphenKeepingFormatter
    parser.add_argument("--config", help="YAML file of training options (flags given here win)")
    for f in dataclasses.fields(options):
        flag = "--" + f.name.replace("_", "-")
        kind = _without_none(_field_types(options)[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (shown or {}).get(f.name, default)  # the default recipe's value, where it sets one
        help_text = options.HELP[f.name]
        if "(default: " not in help_text and not help_text.endswith("(required)"):
            help_text = f"{help_text} (default: {_shown(default)}{_without_data(f.name, default, without_data)})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is tuple:
            items = typing.get_args(kind)
            variable = "*" if f.name in getattr(options, "MAY_BE_EMPTY", ()) else "+"
            count = variable if items[-1] is Ellipsis else len(items)
            parser.add_argument(flag, nargs=count, type=items[0], default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text)


class HyphenKeepingFormatter(argparse.HelpFormatter):
    """argparse's help layout, without breaking lines at hyphens (recipe names, file names)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in self._split_lines(text, width))


def _without_data(name: str, default: Any, recipe: dict[str, Any] | None) -> str:
    """What the recipe used without ``--data`` sets ``name`` to, where it differs from ``default``."""
    if recipe is None or name not in recipe or recipe[name] == default:
        return ""
    return f"; without --data: {_shown(recipe[name])}"


def _shown(value: Any) -> str:
    """A default as its flag takes it: a tuple's numbers separated by spaces."""
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def recipe_note(recipes: dict[str, dict[str, Any]], default: str, what: str, without_data: str | None = None) -> str:
    """The epilog of a training command: the defaults ``--help`` shows are the default recipe's
    (``what``; ``without_data``: the one chosen without ``--data``); the recipes."""
    note = f"Defaults shown are those of the default recipe, {default} ({what})"
    if without_data:
        note += f", used with --data; without --data the default recipe is {without_data}"
    return (
        f"{note}. The recipes (--recipe NAME, see README): {', '.join(recipes)}. "
        "Values resolve in this order, later winning: defaults, recipe, --config file, flags."
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``swinkit train``'s flags, and the note on its defaults and recipes."""
    add_arguments(parser, TrainConfig, without_data=RECIPES["digits"])
    parser.epilog = recipe_note(
        RECIPES, "imagenet", "the official ImageNet-1K recipe", without_data="digits (the bundled handwritten digits)"
    )


def explicit_options(args: argparse.Namespace, options: type) -> dict[str, Any]:
    """The fields of ``options`` given on the command line (unset flags are absent from ``args``)."""
    names = {f.name for f in dataclasses.fields(options)}
    return {name: value for name, value in vars(args).items() if name in names}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training config from the command line: recipe, then ``--config`` file, then flags given."""
    return resolve_config(explicit_options(args, TrainConfig), getattr(args, "config", None))
