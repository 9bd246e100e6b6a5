"""Options of the dense training runs: one dataclass per task, the paper's recipes as defaults.

They resolve like classification's :class:`~swinkit.train.TrainConfig` (defaults, recipe, YAML
file, command-line flags, later winning) through the same functions. Learning rates here are
absolute, as in the official dense configs (no scaling by batch size).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from ..train.config import (
    AT_LEAST_ONE,
    BELOW_ONE,
    NOT_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    Limit,
    TrainConfig,
    add_arguments,
    check_limits,
    check_rates,
    explicit_options,
    one_of,
    recipe_note,
    resolve_options,
)
from .metrics import check_ignore_index
from .mmdet import GEOMETRIES, LOSSES

SCHEDULES = ("cosine", "poly", "step")  # the dense runs' learning-rate schedules

# The options whose --help text is classification's.
CLASSIFICATION_HELP = [
    "workers",
    "betas",
    "eps",
    "clip_grad",
    "amp",
    "seed",
    "device",
    "output",
    "resume",
    "checkpoint_every",
    "max_steps",
    "progress",
]


@dataclass
class DenseConfig:
    """What segmentation and detection runs share: backbone, optimisation, machinery, output."""

    data: str | None = None
    val_data: str | None = None
    strict_data: bool = False
    workers: int = 2
    # Backbone: a preset; ``checkpoint`` initialises it from any file swinkit reads (ImageNet or dense);
    # a dense file of the same task (swinkit, mmdet, mmseg) also gives the heads every tensor that fits.
    model: str = "swin_t"
    checkpoint: str | None = None
    window_size: int | None = None
    drop_path_rate: float = 0.2
    frozen_stages: int = -1
    always_shift: bool = True
    # Optimisation: AdamW (no weight decay on norms, biases, position tables), a per-step schedule:
    # cosine (warm-up, then cosine to min_lr), poly (the official segmentation schedule) or step
    # (the official detection schedule: the rate times gamma at each milestone epoch).
    epochs: int = 36
    batch_size: int = 16
    accum_steps: int = 1
    base_lr: float = 1e-4
    warmup_lr: float = 1e-7
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    schedule: str = "cosine"
    poly_power: float = 1.0
    milestones: tuple[int, ...] = (27, 33)
    gamma: float = 0.1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0
    # Machinery.
    amp: str = "none"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    output: str = "runs/dense"
    resume: str = "auto"
    checkpoint_every: int = 0
    max_steps: int = 0
    progress: bool = True
    recipe: str = ""

    LIMITS: ClassVar[dict[str, Limit]] = {
        "workers": NOT_NEGATIVE,
        "window_size": AT_LEAST_ONE,
        "drop_path_rate": BELOW_ONE,
        **dict.fromkeys(["epochs", "batch_size", "accum_steps"], AT_LEAST_ONE),
        **dict.fromkeys(["base_lr", "warmup_lr", "min_lr", "warmup_steps", "weight_decay"], NOT_NEGATIVE),
        **dict.fromkeys(["poly_power", "gamma", "eps"], POSITIVE),
        "milestones": NOT_NEGATIVE,
        "schedule": one_of(SCHEDULES),
        "betas": BELOW_ONE,
        **dict.fromkeys(["clip_grad", "checkpoint_every", "max_steps"], NOT_NEGATIVE),
    }
    ORDERED: ClassVar[tuple[str, ...]] = ("milestones",)
    MAY_BE_EMPTY: ClassVar[tuple[str, ...]] = ("milestones",)  # a step schedule without them keeps one rate
    # One line per field for --help (add_arguments adds the default).
    HELP: ClassVar[dict[str, str]] = {
        **{name: TrainConfig.HELP[name] for name in CLASSIFICATION_HELP},
        "data": "training data (required)",
        "val_data": "validation data",
        "strict_data": "stop at the first bad image (or label map) instead of skipping it",
        "model": "backbone preset (swinkit info --list)",
        "checkpoint": "initialise the backbone from this file (ImageNet or dense, any format swinkit reads); a dense "
        "file of the same task also initialises the heads where the shapes fit",
        "window_size": "attention window (None: the preset's)",
        "drop_path_rate": "stochastic depth rate of the backbone",
        "frozen_stages": "-1: train everything; 0: freeze the patch embedding; K: also stages 0..K-1 and their "
        "norms (mmdet's)",
        "always_shift": "the official dense window rule: shift and pad to whole windows even where a map is no "
        "larger than a window; --no-always-shift gives classification's rule",
        "epochs": "training epochs",
        "batch_size": "images per step, per process; the official recipes' 16 is the total over all processes "
        "(rates are not scaled with it)",
        "accum_steps": "micro-batches accumulated into each optimizer step",
        "base_lr": "peak AdamW learning rate (absolute: not scaled by the batch)",
        "warmup_lr": "learning rate at the first warm-up step",
        "min_lr": "learning rate the cosine and poly schedules end at",
        "warmup_steps": "optimizer steps of warm-up",
        "schedule": "cosine (linear warm-up, then cosine to --min-lr), poly (the official segmentation schedule) "
        "or step (the official detection schedule)",
        "poly_power": "exponent of the poly schedule's decay",
        "milestones": "epochs at which the step schedule multiplies the rate by --gamma",
        "gamma": "the step schedule's factor at each milestone",
        "weight_decay": "AdamW weight decay (none on norms, biases and position tables)",
        "deterministic": "use PyTorch's deterministic algorithms, warning where an operation has none (RoIAlign's "
        "CUDA backward)",
        "recipe": "named set of option values, listed below (default: the task's)",
    }

    def __post_init__(self) -> None:
        check_limits(self)
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule 'step' needs milestones: the epochs at which to multiply the rate by gamma")
        check_rates(self)


TEST_MODES = ("whole", "slide")  # segmentation's inference: the image at once, or mmseg's sliding crops


@dataclass
class SegmentationConfig(DenseConfig):
    """Semantic segmentation with UPerNet. ``data``: a folder with ``images/`` and ``annotations/``
    (each with ``training/`` and ``validation/`` sub-folders, ADE20K's layout, or the files directly);
    masks are PNG label maps named like their images."""

    num_classes: int | None = None
    reduce_zero_label: bool = False
    ignore_index: int = 255
    train_split: str = "training"
    val_split: str = "validation"
    crop_size: int = 512
    scale: tuple[int, int] | None = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    channels: int = 512
    aux_channels: int = 256
    aux_weight: float = 0.4
    test_mode: str = "whole"
    slide_stride: int = 341

    LIMITS: ClassVar[dict[str, Limit]] = {
        **DenseConfig.LIMITS,
        **dict.fromkeys(["num_classes", "crop_size", "scale", "channels", "aux_channels"], AT_LEAST_ONE),
        "slide_stride": AT_LEAST_ONE,
        "ratio_range": POSITIVE,
        "cat_max_ratio": Limit(lambda value: 0 < value <= 1, "above 0 and at most 1"),
        "hflip": PROBABILITY,
        "aux_weight": NOT_NEGATIVE,
    }
    ORDERED: ClassVar[tuple[str, ...]] = (*DenseConfig.ORDERED, "ratio_range")
    HELP: ClassVar[dict[str, str]] = {
        **DenseConfig.HELP,
        "data": "folder with images/ and annotations/ (or masks/), each holding the split sub-folders or the files "
        "directly; PNG label maps named like their images (required)",
        "val_data": "another such folder to validate on (default: --data)",
        "recipe": "named set of option values, listed below (default: ade20k)",
        "num_classes": "number of classes (None: the lines of classes.txt in --data; given both, they must agree)",
        "reduce_zero_label": "label 0 is ignored and the others shift down by one (ADE20K: 1..150 become 0..149)",
        "ignore_index": "label of the pixels that count for nothing in the loss and the metrics",
        "train_split": "sub-folder of images/ and annotations/ to train on",
        "val_split": "sub-folder of images/ and annotations/ to validate on",
        "crop_size": "side of the square training crops in pixels (and of --test-mode slide's windows)",
        "scale": "long and short side an image is rescaled to fit, keeping its ratio, in training (before the "
        "random ratio) and testing; null in a --config file: the image's own size",
        "ratio_range": "low and high bound of the random rescale ratio in training",
        "cat_max_ratio": "re-draw a training crop (up to 10 times) while one class covers this share of its "
        "labelled pixels or more",
        "hflip": "horizontal flip probability in training",
        "photometric": "mmseg's photometric distortion (brightness, contrast, saturation, hue) in training",
        "channels": "UPerNet's channel width",
        "aux_channels": "the auxiliary FCN head's channel width",
        "aux_weight": "weight of the loss of the auxiliary FCN head on the third stage (0 disables the head)",
        "test_mode": "inference of validation, eval and predict: whole (the image in one pass) or slide (mmseg's "
        "overlapping --crop-size windows)",
        "slide_stride": "step between the sliding windows in pixels (--test-mode slide)",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_mode not in TEST_MODES:  # validation would meet it only after the first epoch
            raise ValueError(f"test_mode must be one of {', '.join(TEST_MODES)}, got {self.test_mode!r}")
        if self.num_classes is not None:  # else checked once classes.txt gives the count
            check_ignore_index(self.ignore_index, self.num_classes)


@dataclass
class DetectionConfig(DenseConfig):
    """Detection (Faster R-CNN) or instance segmentation (Mask R-CNN) with torchvision's engine.
    ``data`` / ``val_data``: COCO-format JSON files; images are looked up under ``images`` /
    ``val_images`` (default: the JSON file's folder)."""

    images: str | None = None
    val_images: str | None = None
    masks: bool = True
    cascade: bool = False
    geometry: str = "mmdet"
    losses: str = "mmdet"
    min_sizes: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    hflip: float = 0.5
    crop_policy: float = 0.5
    filter_empty: bool = True
    min_image_side: int = 32
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_dim: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    roi_batch_size: int = 512
    score_threshold: float = 0.05
    detections_per_img: int = 100

    LIMITS: ClassVar[dict[str, Limit]] = {
        **DenseConfig.LIMITS,
        **dict.fromkeys(["min_sizes", "max_size", "fpn_channels", "box_head_dim", "mask_head_dim"], AT_LEAST_ONE),
        **dict.fromkeys(["anchor_sizes", "roi_batch_size", "detections_per_img"], AT_LEAST_ONE),
        "hflip": PROBABILITY,
        "crop_policy": PROBABILITY,
        "min_image_side": NOT_NEGATIVE,
        "score_threshold": PROBABILITY,
        "geometry": Limit(lambda value: value in GEOMETRIES, " or ".join(GEOMETRIES)),
        "losses": Limit(lambda value: value in LOSSES, " or ".join(LOSSES)),
    }
    HELP: ClassVar[dict[str, str]] = {
        **DenseConfig.HELP,
        "data": "COCO JSON annotation file of the training images (required)",
        "val_data": "COCO JSON annotation file of the validation images (required)",
        "recipe": "named set of option values, listed below (default: coco)",
        "images": "folder of the training images (default: the --data file's folder)",
        "val_images": "folder of the validation images (default: the --val-data file's folder)",
        "masks": "Mask R-CNN; --no-masks gives Faster R-CNN (boxes only)",
        "cascade": "Cascade (Mask) R-CNN: three box stages trained at IoU 0.5, 0.6 and 0.7 (Swin's mmdet configs)",
        "geometry": "anchors, RoIAlign, resizing and mask pasting: mmdet's (as Swin's official detectors) or "
        "torchvision's",
        "losses": "box losses and training proposals: mmdet's (as Swin's configs train) or torchvision's",
        "min_sizes": "shorter sides to resize training images to, one drawn per image; testing uses the last",
        "max_size": "the most pixels the longer side is resized to",
        "hflip": "horizontal flip probability in training",
        "crop_policy": "share of training images first resized to a shorter side of 400, 500 or 600 and cropped "
        "to 384..600 pixels a side (Swin's AutoAugment; 0 disables)",
        "filter_empty": "leave out training images no annotation names (mmdet's filter_empty_gt); "
        "--no-filter-empty keeps them",
        "min_image_side": "leave out training images with a side under this many pixels (mmdet's min_size; "
        "0 keeps them)",
        "fpn_channels": "FPN channel width (and of the cascade's box-head convolutions)",
        "box_head_dim": "width of the box head's fully connected layers",
        "mask_head_dim": "channels of the mask head's four convolutions",
        "anchor_sizes": "anchor size in pixels on each of the five FPN levels",
        "roi_batch_size": "proposals sampled per image for the box head's loss",
        "score_threshold": "detections scoring below this are dropped at test time",
        "detections_per_img": "the most detections kept per image at test time",
    }


SEGMENTATION_RECIPES: dict[str, dict[str, Any]] = {
    # Swin + UPerNet on ADE20K: AdamW 6e-5, weight decay 0.01, 1500 warm-up iterations, 160k iterations
    # of batch 16 (about 128 epochs of 20,210 images), drop path 0.3, 512 crops; the rate decays
    # linearly to 0 (poly, power 1) after a warm-up from 1e-6 of it. For ADE20K add --reduce-zero-label.
    "ade20k": dict(
        base_lr=6e-5,
        warmup_lr=6e-11,
        min_lr=0.0,
        schedule="poly",
        poly_power=1.0,
        weight_decay=0.01,
        warmup_steps=1500,
        epochs=128,
        batch_size=16,
        drop_path_rate=0.3,
        output="runs/segment",
    ),
}

DETECTION_RECIPES: dict[str, dict[str, Any]] = {
    # Swin + Mask R-CNN on COCO, the 3x multi-scale schedule: AdamW 1e-4, weight decay 0.05, 1000
    # warm-up iterations from 0.001 of the rate, 36 epochs of batch 16, drop path 0.2, shorter side
    # 480..800, longer <= 1333; the rate drops 10x at epochs 27 and 33.
    "coco": dict(schedule="step", milestones=(27, 33), gamma=0.1, output="runs/detect"),
    # Swin + Cascade Mask R-CNN (the paper's main COCO detector, its 3x configs): the same schedule
    # and rates, three box stages of four convolutions + one layer with GIoU box losses.
    "coco-cascade": dict(schedule="step", milestones=(27, 33), gamma=0.1, cascade=True, output="runs/detect"),
}

# What each default recipe is, for --help.
RECIPE_SUMMARIES = {
    "ade20k": "the official Swin + UPerNet recipe on ADE20K",
    "coco": "the official Swin + Mask R-CNN 3x recipe on COCO",
}

TASKS: dict[str, tuple[type, dict[str, dict[str, Any]], str]] = {
    "segment": (SegmentationConfig, SEGMENTATION_RECIPES, "ade20k"),
    "detect": (DetectionConfig, DETECTION_RECIPES, "coco"),
}


def resolve_dense_config(
    task: str, explicit: dict[str, Any] | None = None, config_file: str | os.PathLike | None = None
) -> DenseConfig:
    """Defaults, then the task's recipe, then ``config_file`` (YAML), then ``explicit`` values."""
    if task not in TASKS:
        raise ValueError(f"unknown dense task {task!r}; accepted: {', '.join(TASKS)}")
    options, recipes, default = TASKS[task]
    return resolve_options(options, recipes, explicit, config_file, lambda values: default)


def add_train_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """One ``--flag`` per option of ``task``'s config (``--config FILE`` for a YAML file)."""
    options, recipes, default = TASKS[task]
    add_arguments(parser, options, shown=recipes[default])  # the default recipe always applies
    parser.epilog = recipe_note(recipes, default, RECIPE_SUMMARIES[default])


def config_from_args(args: argparse.Namespace, task: str) -> DenseConfig:
    """The dense training config of ``task`` from the command line: recipe, then ``--config`` file, then flags given."""
    return resolve_dense_config(task, explicit_options(args, TASKS[task][0]), getattr(args, "config", None))
