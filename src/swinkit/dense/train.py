"""Dense training loops: semantic segmentation (UPerNet) and detection (Faster / Mask R-CNN).

Built from classification's machinery (:mod:`swinkit.train`): AdamW groups without weight decay on
norms, biases and position tables, a per-step schedule (cosine, or the official poly / step),
atomic training checkpoints with RNG states, ``torchrun`` process groups, the epoch batch sampler
and per-(seed, rank, step) seeding, so a resumed run ends with the same weights as an
uninterrupted one. :class:`DenseTrainer` holds what both tasks share; each task supplies data,
model, loss and evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint.io import make_folder
from ..data import collate_skipping_bad, require_some_read
from ..evaluate import amp_dtype
from ..train import distributed
from ..train.config import schedule_notes
from ..train.data import EpochBatchSampler
from ..train.loop import TrainingLoop, held_out_bad, plain, warn_bad_images
from ..train.metrics import MetricsLog
from ..train.optim import WarmupCosine, WarmupPoly, WarmupSchedule, WarmupStep, build_optimizer
from ..train.state import TRAIN_CHECKPOINT, save_training_state, set_rng_state
from .backbone import create_backbone
from .config import SCHEDULES, DenseConfig, DetectionConfig, SegmentationConfig
from .data import Augmented, Transformed, collate_lists
from .detection import build_detector, evaluate_detection
from .detection_data import CocoDetection, DetectionTrainTransform, detection_eval_transform, detector_scale
from .metrics import segmentation_scores
from .segmentation import build_segmentor, evaluate_segmentation, segmentation_losses
from .segmentation_data import (
    SegmentationEvalTransform,
    SegmentationFolder,
    SegmentationTrainTransform,
    find_split,
    read_class_names,
)
from .weights import DenseSpec, load_dense_heads, save_dense

logger = logging.getLogger(__name__)


@dataclass
class DenseResult:
    """Where a finished run left its files, and its headline number (``metric``, higher is better)."""

    output: Path
    final_model: Path
    best_model: Path | None
    metric: str
    best: float
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    seconds: float = 0.0
    is_main: bool = True  # False in the other processes of a torchrun run, which write and report nothing


def check_schedule(name: str) -> None:
    """Refuse, by name, a schedule that is not one of :data:`SCHEDULES`."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def build_schedule(config: DenseConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> WarmupSchedule:
    """The per-step learning-rate schedule ``config.schedule`` names, over ``config.epochs`` epochs."""
    check_schedule(config.schedule)
    total = config.epochs * steps_per_epoch
    warmup = dict(lr=config.base_lr, warmup_lr=config.warmup_lr, warmup_steps=config.warmup_steps)
    if config.schedule == "poly":
        return WarmupPoly(optimizer, **warmup, min_lr=config.min_lr, total_steps=total, power=config.poly_power)
    if config.schedule == "step":
        milestones = [epoch * steps_per_epoch for epoch in config.milestones]
        return WarmupStep(optimizer, **warmup, milestones=milestones, gamma=config.gamma)
    return WarmupCosine(optimizer, **warmup, min_lr=config.min_lr, total_steps=total)


class DenseTrainer(TrainingLoop):
    """A dense training run. Subclasses set :attr:`metric` and implement the task-specific methods."""

    metric = ""

    def __init__(self, config: DenseConfig, dist: distributed.Distributed) -> None:
        if config.data is None:
            raise ValueError("--data is required for dense training")
        amp_dtype(config.amp)  # bad names stop the run before any data is read
        check_schedule(config.schedule)
        self.config, self.dist = config, dist
        self.output = make_folder(config.output)  # first: a file in the way is refused before any work
        self.train_set, self.val_set = self.load_data()
        self.model = self.build_model().to(dist.device)
        self.spec = self.describe()
        self.sampler = EpochBatchSampler(len(self.train_set), config.batch_size, config.seed, dist)
        self.steps_per_epoch = self.sampler.steps // config.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.train_set)} images, fewer than one global batch "
                f"({config.batch_size} x {dist.world_size} processes); lower --batch-size"
            )
        if dist.is_main:  # --batch-size is per process; the recipes' absolute rates are for a total of 16
            logger.info(
                "total batch %d: %d per process x %d processes x %d accumulated (Swin's recipes: 16 in all)",
                config.batch_size * dist.world_size * config.accum_steps, config.batch_size, dist.world_size,
                config.accum_steps,
            )  # fmt: skip
        self.augmented = Augmented(self.train_set, self.train_transform(), config.seed)
        self.loader = self._loader(self.augmented, batch_sampler=self.sampler)
        self.forward_model = self._wrap(self.model)
        self.optimizer = build_optimizer(self.model, config.weight_decay, None, betas=config.betas, eps=config.eps)
        self.scheduler = build_schedule(config, self.optimizer, self.steps_per_epoch)
        for note in schedule_notes(config, self.steps_per_epoch):
            logger.warning(note)
        self.amp_dtype = amp_dtype(config.amp)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=config.amp == "fp16")
        self.epoch, self.step_in_epoch, self.global_step, self.skipped_steps = 0, 0, 0, 0
        self.best = -1.0
        self.epoch_totals = {"loss": 0.0, "images": 0.0, "bad": 0.0}
        self.metrics = MetricsLog(self.output) if dist.is_main else None

    # -- what each task supplies -------------------------------------------------------------------

    def load_data(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def describe(self) -> DenseSpec:
        raise NotImplementedError

    def train_transform(self) -> Any:
        raise NotImplementedError

    collate = staticmethod(collate_skipping_bad)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def empty_batch(self) -> dict[str, Any]:
        """A batch that yields a (zero-weighted) loss, for a process whose whole batch was bad."""
        raise NotImplementedError

    def named_terms(self, losses: dict[str, Tensor]) -> Tensor:
        """The loss, the sum of ``losses``; their values kept as ``loss_parts`` (logged per epoch as
        ``train_loss_*``), in one transfer from the device (a cascade has 11)."""
        values = torch.stack([value.detach().float() for value in losses.values()]).tolist()
        self.loss_parts = dict(zip(losses, values, strict=True))
        return sum(losses.values())

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    # -- set-up -----------------------------------------------------------------------------------

    def backbone_options(self) -> dict[str, Any]:
        c = self.config
        overrides: dict[str, Any] = {"drop_path_rate": c.drop_path_rate}
        if c.window_size is not None:
            overrides["window_size"] = c.window_size
        return dict(checkpoint=c.checkpoint, frozen_stages=c.frozen_stages, always_shift=c.always_shift, **overrides)

    def create_backbone(self) -> nn.Module:
        return create_backbone(self.config.model, **self.backbone_options())  # its load report is logged

    def with_file_heads(self, model: nn.Module, task: str) -> nn.Module:
        """A dense ``--checkpoint`` of this task also initialises the heads (mmdet's ``load_from``)."""
        if self.config.checkpoint is None:
            return model
        report = load_dense_heads(model, self.config.checkpoint, task)
        if report["taken"] or report["skipped"]:
            logger.info(
                "heads from %s: %d tensors taken; not taken (another shape: the classes differ): %s",
                self.config.checkpoint, len(report["taken"]), report["skipped"] or "none",
            )  # fmt: skip
        return model

    def _loader(self, dataset: Dataset, **options: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.config.workers,
            collate_fn=self.collate,
            # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
            generator=torch.Generator().manual_seed(self.config.seed),
            pin_memory=self.dist.device.type == "cuda",
            **options,
        )

    def eval_loader(self, transform: Any, batch_size: int) -> DataLoader:
        """Each process evaluates every ``world``-th item (no padding, so summed metrics are exact)."""
        shard = list(range(self.dist.rank, len(self.val_set), self.dist.world_size))
        return self._loader(torch.utils.data.Subset(Transformed(self.val_set, transform), shard), batch_size=batch_size)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        if self.dist.device.type == "cuda":
            # The heads' BatchNorm sees a few images per GPU: synchronise its statistics (mmseg's SyncBN).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # -- checkpoints ------------------------------------------------------------------------------

    def model_state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def save(self) -> None:
        """Write the full training state atomically (rank 0)."""
        totals = self.summed_totals()
        if not self.dist.is_main:
            return
        state = {
            "config": plain(dataclasses.asdict(self.config)),
            "spec": self.spec.to_json(),
            "model": self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "best": self.best,
            "epoch_totals": totals,
            **self.run_setting(),
        }
        save_training_state(self.output / TRAIN_CHECKPOINT, state)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.skipped_steps = state["global_step"], state["skipped_steps"]
        self.best = state["best"]
        self.restore_totals(state["epoch_totals"])
        set_rng_state(state["rng"])

    # -- training ---------------------------------------------------------------------------------

    def _forward_backward(self, batch: dict[str, Any]) -> tuple[float, int]:
        weight = 1.0
        if batch["images"] is None:
            if not self.dist.enabled:
                return 0.0, 0
            # Every process must join the gradient all-reduce: an all-bad batch contributes zero.
            batch, weight = self.empty_batch(), 0.0
        with torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.loss(batch)
        self.scaler.scale(loss * weight / self.config.accum_steps).backward()
        return loss.item(), int(weight * len(batch["images"]))

    # -- the whole run ----------------------------------------------------------------------------

    def _finish(self, best_path: Path, seconds: float) -> DenseResult:
        final_path = self.output / "model-final.safetensors"
        history: list[dict[str, Any]] = []
        if self.dist.is_main:
            save_dense(self.model, self.spec, final_path, self.model_state())
            history = self.metrics.history()
            self.metrics.close()
        best = best_path if best_path.exists() else None
        return DenseResult(
            self.output, final_path, best, self.metric, self.best, history, self.skipped_steps, seconds,
            self.dist.is_main,
        )  # fmt: skip

    def _log_epoch(self, row: dict[str, Any], best_path: Path) -> None:
        if not self.dist.is_main:
            return
        self.metrics.append(row)
        scores = "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("val_") and isinstance(v, float))
        logger.info(
            "epoch %d/%d  train loss %.4f  %s  lr %.2e  %.1f img/s",
            row["epoch"] + 1,
            self.config.epochs,
            row["train_loss"],
            scores,
            row["lr"],
            row["images_per_second"],
        )
        parts = "  ".join(f"{k[len('train_loss_') :]} {v:.4f}" for k, v in row.items() if k.startswith("train_loss_"))
        if parts:
            logger.info("epoch %d/%d  loss terms: %s", row["epoch"] + 1, self.config.epochs, parts)
        warn_bad_images(row)
        if row[f"val_{self.metric}"] > self.best:
            self.best = row[f"val_{self.metric}"]
            save_dense(self.model, self.spec, best_path, self.model_state())


class SegmentationTrainer(DenseTrainer):
    """Swin + UPerNet (+ auxiliary FCN head) on image / label-map folders; best model by validation mIoU."""

    metric = "mIoU"
    command = "segment train"
    config: SegmentationConfig

    def load_data(self) -> tuple[Dataset, Dataset]:
        c = self.config
        self.classes = segmentation_classes(c.data, c.num_classes)
        train = find_split(c.data, c.train_split)
        val = find_split(c.val_data or c.data, c.val_split)
        if c.val_data is None and val == train:
            raise ValueError(f"{c.data} has no {c.val_split}/ split; add one or pass --val-data")
        return tuple(
            SegmentationFolder(images, masks, len(self.classes), c.reduce_zero_label, c.ignore_index, c.strict_data)
            for images, masks in (train, val)
        )

    def head_options(self) -> dict[str, Any]:
        c = self.config
        return {"channels": c.channels, "aux_channels": c.aux_channels, "aux": c.aux_weight > 0}

    def build_model(self) -> nn.Module:
        model = build_segmentor(self.create_backbone(), len(self.classes), **self.head_options())
        return self.with_file_heads(model, "segment")

    def describe(self) -> DenseSpec:
        c = self.config
        inference = {
            "ignore_index": c.ignore_index,
            "reduce_zero_label": c.reduce_zero_label,
            "mode": c.test_mode,
            "crop_size": c.crop_size,
            "stride": c.slide_stride,
            "scale": c.scale,
        }
        return DenseSpec(
            "segment", self.model.backbone.config, self.classes, c.frozen_stages, self.head_options(), inference
        )

    def train_transform(self) -> Any:
        c, p = self.config, self.model.backbone.config.preprocessing
        return SegmentationTrainTransform(
            c.crop_size, c.scale, c.ratio_range, p.mean, p.std, c.cat_max_ratio, c.hflip, c.photometric, c.ignore_index
        )

    def loss(self, batch: dict[str, Any]) -> Tensor:
        images = batch["images"].to(self.dist.device, non_blocking=True)
        masks = batch["labels"].to(self.dist.device, non_blocking=True)
        c = self.config
        return self.named_terms(segmentation_losses(self.forward_model(images), masks, c.ignore_index, c.aux_weight))

    def empty_batch(self) -> dict[str, Any]:
        size = self.config.crop_size
        return {
            "images": torch.zeros(1, 3, size, size),
            "labels": torch.full((1, size, size), self.config.ignore_index),
        }

    def validate(self) -> dict[str, float]:
        c, p = self.config, self.model.backbone.config.preprocessing
        loader = self.eval_loader(SegmentationEvalTransform(c.scale, p.mean, p.std), batch_size=1)
        confusion, bad = evaluate_segmentation(
            self.model, loader, len(self.classes), c.ignore_index, c.test_mode, c.crop_size, c.slide_stride, self.dist
        )
        (val_bad,) = self.dist.sum([len(bad)])  # each process's part of the held-out images
        # Scores of 0 over no image would pass for a result, and pick a "best" model.
        source = f"the validation set ({self.val_set.images})"
        require_some_read(len(self.val_set) - int(val_bad), held_out_bad(bad, val_bad), source)
        scores = segmentation_scores(confusion)
        return {**{f"val_{name}": scores[name] for name in ("mIoU", "mAcc", "aAcc")}, "val_bad_images": int(val_bad)}


class DetectionTrainer(DenseTrainer):
    """Swin + FPN + torchvision Mask / Faster R-CNN on COCO JSON files; best model by validation box AP."""

    metric = "bbox_AP"
    command = "detect train"
    config: DetectionConfig
    collate = staticmethod(collate_lists)

    def load_data(self) -> tuple[Dataset, Dataset]:
        c = self.config
        if c.val_data is None:
            raise ValueError("--val-data is required: a COCO JSON file of held-out images to measure mAP on")
        train = CocoDetection(c.data, c.images, c.masks, c.strict_data, c.filter_empty, c.min_image_side)
        val = CocoDetection(c.val_data, c.val_images, c.masks, c.strict_data)
        if train.category_ids != val.category_ids:
            raise ValueError(
                f"{c.data} and {c.val_data} have different categories: {train.category_ids} vs {val.category_ids}"
            )
        self.classes = train.classes
        return train, val

    def head_options(self) -> dict[str, Any]:
        c = self.config
        return {
            "masks": c.masks,
            "cascade": c.cascade,
            "geometry": c.geometry,
            "losses": c.losses,
            "agnostic_boxes": False,  # a box per class, as Swin's cascade configs
            "min_size": c.min_sizes,
            "max_size": c.max_size,
            "fpn_channels": c.fpn_channels,
            "anchor_sizes": c.anchor_sizes,
            "roi_batch_size": c.roi_batch_size,
            "box_head_dim": c.box_head_dim,
            "mask_head_dim": c.mask_head_dim,
            "score_threshold": c.score_threshold,
            "detections_per_img": c.detections_per_img,
        }

    def build_model(self) -> nn.Module:
        model = build_detector(self.create_backbone(), len(self.classes), **self.head_options())
        # Images its resize cannot take stopped the run, naming the whole batch: left out by name first.
        for dataset in (self.train_set, self.val_set):
            dataset.leave_out_too_elongated(*detector_scale(model))
        return self.with_file_heads(model, "detect")

    def describe(self) -> DenseSpec:
        c = self.config
        inference = {"category_ids": self.train_set.category_ids}
        return DenseSpec(
            "detect", self.model.backbone.body.config, self.classes, c.frozen_stages, self.head_options(), inference
        )

    def train_transform(self) -> Any:
        return DetectionTrainTransform(self.config.hflip, crop_policy=self.config.crop_policy)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        device = self.dist.device
        images = [image.to(device, non_blocking=True) for image in batch["images"]]
        targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in batch["targets"]]
        return self.named_terms(self.forward_model(images, targets))

    def empty_batch(self) -> dict[str, Any]:
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": -1}
        if self.config.masks:
            target["masks"] = torch.zeros(0, 64, 64, dtype=torch.uint8)
        return {"images": [torch.zeros(3, 64, 64)], "targets": [target]}

    def validate(self) -> dict[str, float]:
        loader = self.eval_loader(detection_eval_transform, batch_size=self.config.batch_size)
        scores = evaluate_detection(self.model, loader, self.val_set, self.dist)  # bad images gathered there
        source = f"the validation set ({self.config.val_data}, images in {self.val_set.root})"
        require_some_read(len(self.val_set) - scores["bad_images"], scores["bad_images"], source)
        row = {f"val_{k}": v for k, v in scores.items() if k.endswith(("_AP", "_AP50", "_AP75"))}
        return {**row, "val_bad_images": scores["bad_images"]}


def segmentation_classes(root: str | os.PathLike, num_classes: int | None) -> list[str]:
    """Class names from ``root/classes.txt``, or ``"0" .. "K-1"`` for ``num_classes``; they must agree."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"segmentation data folder {root} does not exist")
    names = read_class_names(root)
    if names is None and num_classes is None:
        raise ValueError(f"give --num-classes or list the class names, one a line, in {Path(root) / 'classes.txt'}")
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{Path(root) / 'classes.txt'} lists {len(names)} classes but --num-classes is {num_classes}")
    return names or [str(i) for i in range(num_classes)]


def fit_dense(config: DenseConfig) -> DenseResult:
    """Train as ``config`` says (one process, or each process of a ``torchrun`` launch)."""
    trainers = {SegmentationConfig: SegmentationTrainer, DetectionConfig: DetectionTrainer}
    if type(config) not in trainers:
        raise TypeError(f"expected a SegmentationConfig or DetectionConfig, got {type(config).__name__}")
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # RoIAlign's CUDA backward has no deterministic version: warn about it rather than stop.
        torch.use_deterministic_algorithms(True, warn_only=True)
    with distributed.process_group(config.device) as dist:
        # The same seed on every rank: each builds the same initial model.
        torch.manual_seed(config.seed)
        return trainers[type(config)](config, dist).run()
