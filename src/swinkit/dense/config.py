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
    add_arguments,
    check_limits,
    explicit_options,
    resolve_options,
)
from .mmdet import GEOMETRIES, LOSSES


@dataclass
class DenseConfig:
    """What segmentation and detection runs share: backbone, optimisation, machinery, output."""

    data: str | None = None
    val_data: str | None = None
    strict_data: bool = False  # stop at the first bad image instead of skipping it
    workers: int = 2
    # Backbone: a preset; ``checkpoint`` initialises it from any file swinkit reads (ImageNet or dense);
    # a dense file of the same task (swinkit, mmdet, mmseg) also gives the heads every tensor that fits.
    model: str = "swin_t"
    checkpoint: str | None = None
    window_size: int | None = None
    drop_path_rate: float = 0.2
    frozen_stages: int = -1  # -1 none, 0 patch embedding, k: also stages 0..k-1
    always_shift: bool = True  # the official dense window rule
    # Optimisation: AdamW (no weight decay on norms, biases, position tables), a per-step schedule:
    # cosine (warm-up, then cosine to min_lr), poly (the official segmentation schedule) or step
    # (the official detection schedule: the rate times gamma at each milestone epoch).
    epochs: int = 36
    batch_size: int = 16  # per process
    accum_steps: int = 1
    base_lr: float = 1e-4
    warmup_lr: float = 1e-7
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    schedule: str = "cosine"  # cosine, poly or step
    poly_power: float = 1.0
    milestones: tuple[int, ...] = (27, 33)  # epochs, for the step schedule
    gamma: float = 0.1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0  # 0 disables clipping
    # Machinery.
    amp: str = "none"  # none, bf16, fp16
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    output: str = "runs/dense"
    resume: str = "auto"  # auto, never, or a checkpoint path
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
        "betas": BELOW_ONE,
        **dict.fromkeys(["clip_grad", "checkpoint_every", "max_steps"], NOT_NEGATIVE),
    }
    ORDERED: ClassVar[tuple[str, ...]] = ("milestones",)

    def __post_init__(self) -> None:
        check_limits(self)


TEST_MODES = ("whole", "slide")  # segmentation's inference: the image at once, or mmseg's sliding crops


@dataclass
class SegmentationConfig(DenseConfig):
    """Semantic segmentation with UPerNet. ``data``: a folder with ``images/`` and ``annotations/``
    (each with ``training/`` and ``validation/`` sub-folders, ADE20K's layout, or the files directly);
    masks are PNG label maps named like their images."""

    num_classes: int | None = None  # None: the lines of classes.txt in the data folder
    reduce_zero_label: bool = False  # ADE20K: label 0 is "other" and ignored, 1..150 become 0..149
    ignore_index: int = 255
    train_split: str = "training"
    val_split: str = "validation"
    crop_size: int = 512
    scale: tuple[int, int] | None = (2048, 512)  # (long, short) before the random ratio; None: the image's own
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # re-draw crops where one class covers more than this
    hflip: float = 0.5
    photometric: bool = True
    channels: int = 512  # UPerNet width
    aux_channels: int = 256
    aux_weight: float = 0.4  # 0 disables the auxiliary FCN head on stage 3
    test_mode: str = "whole"  # whole or slide
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_mode not in TEST_MODES:  # validation would meet it only after the first epoch
            raise ValueError(f"test_mode must be one of {', '.join(TEST_MODES)}, got {self.test_mode!r}")


@dataclass
class DetectionConfig(DenseConfig):
    """Detection (Faster R-CNN) or instance segmentation (Mask R-CNN) with torchvision's engine.
    ``data`` / ``val_data``: COCO-format JSON files; images are looked up under ``images`` /
    ``val_images`` (default: the JSON file's folder)."""

    images: str | None = None
    val_images: str | None = None
    masks: bool = True  # Mask R-CNN; --no-masks gives Faster R-CNN
    cascade: bool = False  # Cascade (Mask) R-CNN: three box stages, IoU 0.5 / 0.6 / 0.7 (Swin's mmdet configs)
    geometry: str = "mmdet"  # anchors and RoIAlign: mmdet's (Swin's official detectors) or torchvision's
    losses: str = "mmdet"  # box losses and training proposals: Swin's configs' (mmdet) or torchvision's
    min_sizes: tuple[int, ...] = tuple(range(480, 801, 32))  # multi-scale training; testing uses the last
    max_size: int = 1333
    hflip: float = 0.5
    # Swin's AutoAugment: the share of images resized to 400/500/600 and cropped to 384..600 first
    crop_policy: float = 0.5
    # Training images no annotation names left out (mmdet's filter_empty_gt); --no-filter-empty keeps them
    filter_empty: bool = True
    # Training images with a side under this many pixels left out (mmdet's min_size; 0 keeps them)
    min_image_side: int = 32
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_dim: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    roi_batch_size: int = 512  # sampled proposals per image for the box head's loss
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
    add_arguments(parser, TASKS[task][0])


def config_from_args(args: argparse.Namespace, task: str) -> DenseConfig:
    return resolve_dense_config(task, explicit_options(args, TASKS[task][0]), getattr(args, "config", None))
