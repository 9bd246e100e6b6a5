"""Detection and instance segmentation: torchvision's Faster R-CNN / Mask R-CNN on a Swin backbone + FPN.

Everything after the backbone is torchvision's detection engine (FPN, anchors, RPN, RoIAlign, box
and mask heads, losses, resizing and batching): swinkit only supplies the backbone, as the paper
plugs Swin into the standard frameworks.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..variants import is_real, is_whole
from .backbone import SwinBackbone, create_backbone
from .cascade import (
    CASCADE_BOX_WEIGHTS,
    CASCADE_IOUS,
    POSITIVE_FRACTION,
    BoxPredictor,
    CascadeRoIHeads,
)
from .config import DetectionConfig
from .detection_augment import View, detect_augmented
from .detection_data import CocoDetection
from .mmdet import (
    GEOMETRIES,
    LOSSES,
    MASK_RCNN_TRAIN_PROPOSALS,
    RPN_MIN_POSITIVE_IOU,
    AlignedRoIPool,
    DetectionTransform,
    MinimumIoUMatcher,
    MmdetTransform,
    UnroundedAnchorGenerator,
    _tracing,
    check_detection_images,
    check_detection_targets,
    l1_region_proposals,
    l1_roi_heads,
    transform_like,
)

# The paper's multi-scale training: shorter side 480..800 (step 32), longer side at most 1333.
MIN_SIZES = tuple(range(480, 801, 32))


class SwinFPN(nn.Module):
    """Swin maps through torchvision's FPN (+ a max-pooled P6): the backbone torchvision's detectors take."""

    def __init__(self, body: SwinBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(images)
        return self.fpn(OrderedDict((str(i), x) for i, x in enumerate(maps)))


class _CheckedInputs:
    """torchvision's detector ``forward`` after a check of the inputs' kinds: its first lines read
    ``img.shape`` and, in training, ``target["boxes"]`` of whatever they are given (a path, a dict of
    targets), before the transform checks images and targets in full (:class:`DetectionTransform`)."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if not _tracing():
            check_detection_images(images, values=False)
            # Read from the heads now: fine-tuning replaces the predictors (torchvision's recipe).
            classes, masks = detector_classes(self), detector_has_masks(self)
            self.transform.num_classes, self.transform.masks = classes, masks  # what the transform checks
            check_detection_targets(images, targets, self.training, classes, masks, values=False)
        return super().forward(images, targets)


def detector_classes(model: nn.Module) -> int | None:
    """A torchvision detector's object classes: its (last) box predictor's logits, the background's
    less; None where its predictor has no ``cls_score``."""
    predictors = [module for name, module in model.roi_heads.named_modules() if name.endswith("box_predictor")]
    scores = getattr(predictors[-1], "cls_score", None) if predictors else None
    return scores.out_features - 1 if isinstance(scores, nn.Linear) else None


def detector_has_masks(model: nn.Module) -> bool:
    """Whether a torchvision detector (a cascade's included) has a mask head now."""
    heads = model.roi_heads
    return heads.has_masks if isinstance(heads, CascadeRoIHeads) else heads.has_mask()


class SwinFasterRCNN(_CheckedInputs, FasterRCNN):
    """torchvision's ``FasterRCNN``, its inputs checked (:class:`_CheckedInputs`)."""


class SwinMaskRCNN(_CheckedInputs, MaskRCNN):
    """torchvision's ``MaskRCNN``, its inputs checked (:class:`_CheckedInputs`)."""


# build_detector's options -> DetectionConfig's fields, whose limits they share with the CLI.
_LIMITED_OPTIONS = {
    "min_size": "min_sizes",
    "max_size": "max_size",
    "fpn_channels": "fpn_channels",
    "anchor_sizes": "anchor_sizes",
    "box_head_dim": "box_head_dim",
    "mask_head_dim": "mask_head_dim",
    "roi_batch_size": "roi_batch_size",
    "score_threshold": "score_threshold",
    "detections_per_img": "detections_per_img",
}


def _check_options(num_classes: Any, flags: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse a class count, flag or size build_detector's parts would take without a word or fail on later."""
    if not is_whole(num_classes):
        raise TypeError(f"num_classes must be a whole number (the object classes), got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be 1 or more (the background is not counted), got {num_classes}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"detector option {name!r} must be True or False, got {value!r}")
    if flags["agnostic_boxes"] and not flags["cascade"]:
        raise ValueError("agnostic_boxes (one box for every class) is an option of the cascade's heads only")
    for name, field in _LIMITED_OPTIONS.items():
        value = settings[name]
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        fits = is_real if name == "score_threshold" else is_whole
        what = "a number" if fits is is_real else "a whole number"
        what += " or a non-empty list of them" if name in ("min_size", "anchor_sizes") else ""
        if not values or not all(map(fits, values)):
            raise TypeError(f"detector option {name!r} must be {what}, got {value!r}")
        limit = DetectionConfig.LIMITS[field]
        if not all(limit.accepts(v) for v in values):
            each = " each" if isinstance(value, (list, tuple)) else ""
            raise ValueError(f"detector option {name!r} must be {limit.text}{each}, got {value!r}")
    min_size, max_size = settings["min_size"], settings["max_size"]
    if max_size < (max(min_size) if isinstance(min_size, (list, tuple)) else min_size):
        raise ValueError(
            f"detector option 'max_size' ({max_size}, the most pixels of the longer side) is below the shorter "
            f"side's min_size {min_size!r}"
        )


def build_detector(
    backbone: SwinBackbone,
    num_classes: int,
    masks: bool = True,
    *,
    min_size: int | tuple[int, ...] = MIN_SIZES,
    max_size: int = 1333,
    fpn_channels: int = 256,
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
    box_head_dim: int = 1024,
    mask_head_dim: int = 256,
    roi_batch_size: int = 512,
    score_threshold: float = 0.05,
    detections_per_img: int = 100,
    cascade: bool = False,
    geometry: str = "mmdet",
    agnostic_boxes: bool = False,
    losses: str = "mmdet",
) -> FasterRCNN:
    """torchvision's ``MaskRCNN`` (``masks``) or ``FasterRCNN`` for ``num_classes`` object classes.

    ``num_classes`` excludes the background (torchvision's label 0). In training a ``min_size``
    tuple picks a random shorter side per image (as mmdet and torchvision draw it); evaluation uses
    its last value. Images go in as RGB in [0, 1]; the detector normalises them with the backbone's
    mean and std. ``cascade``: Cascade (Mask) R-CNN's three box stages
    (:mod:`swinkit.dense.cascade`) instead of one, each box head four convolutions of
    ``fpn_channels`` and one layer of ``box_head_dim``, and a box per class (Swin's configs), or
    with ``agnostic_boxes`` one box for every class.
    ``geometry``: ``"mmdet"`` (Swin's official detectors: anchors not rounded, RoIAlign with
    ``aligned=True`` and adaptive sampling, masks pasted into the float box,
    :mod:`swinkit.dense.mmdet`) or ``"torchvision"`` (torchvision's rounded anchors,
    ``MultiScaleRoIAlign`` and mask pasting; files written before swinkit had the choice).
    ``losses`` (training only): ``"mmdet"``, as Swin's configs train each detector (Mask / Faster
    R-CNN: L1 box losses in the RPN and the box head, 1000 proposals a training image; the cascade:
    torchvision's RPN loss and 2000 proposals, its own GIoU box losses; both: the RPN's low-quality
    matches only at IoU 0.3 or more), or ``"torchvision"`` (smooth L1, beta 1/9, 2000 proposals,
    every object's best anchors matched).
    """
    if not isinstance(backbone, SwinBackbone):
        raise TypeError(
            f"build_detector needs a SwinBackbone (swinkit.dense.create_backbone; create_detector builds the "
            f"whole detector), got a {type(backbone).__name__}"
        )
    flags = dict(masks=masks, cascade=cascade, agnostic_boxes=agnostic_boxes)
    settings = dict(
        min_size=min_size,
        max_size=max_size,
        fpn_channels=fpn_channels,
        anchor_sizes=anchor_sizes,
        box_head_dim=box_head_dim,
        mask_head_dim=mask_head_dim,
        roi_batch_size=roi_batch_size,
        score_threshold=score_threshold,
        detections_per_img=detections_per_img,
    )
    _check_options(num_classes, flags, settings)
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    if losses not in LOSSES:
        raise ValueError(f"losses must be one of {', '.join(LOSSES)}, got {losses!r}")
    fpn = SwinFPN(backbone, fpn_channels)
    levels = len(backbone.out_channels) + 1  # the FPN adds a max-pooled level
    if len(anchor_sizes) != levels:
        raise ValueError(f"anchor_sizes needs one size per FPN level ({levels}), got {anchor_sizes}")
    generator = UnroundedAnchorGenerator if geometry == "mmdet" else AnchorGenerator
    anchors = generator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    resolution = 7  # RoIAlign output of the box head
    preprocessing = backbone.config.preprocessing
    options: dict[str, Any] = dict(
        min_size=min_size,
        max_size=max_size,
        image_mean=list(preprocessing.mean),
        image_std=list(preprocessing.std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        box_head=TwoMLPHead(fpn_channels * resolution**2, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        box_batch_size_per_image=roi_batch_size,
        box_score_thresh=score_threshold,
        box_detections_per_img=detections_per_img,
    )
    if masks:
        options["mask_head"] = MaskRCNNHeads(fpn_channels, [mask_head_dim] * 4, 1)
        options["mask_predictor"] = MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes + 1)
    detector = SwinMaskRCNN(fpn, **options) if masks else SwinFasterRCNN(fpn, **options)
    # (torchvision's constructors only take its own pooling and transform classes)
    detector.transform = transform_like(
        detector.transform, MmdetTransform if geometry == "mmdet" else DetectionTransform
    )
    detector.transform.num_classes, detector.transform.masks = num_classes, masks  # what targets are checked by
    if geometry == "mmdet":
        _pool_as_mmdet(detector.roi_heads, backbone.strides)
    if losses == "mmdet" and not cascade:
        detector.rpn = l1_region_proposals(detector.rpn, MASK_RCNN_TRAIN_PROPOSALS)
        detector.roi_heads = l1_roi_heads(detector.roi_heads)
    if losses == "mmdet":
        matcher = detector.rpn.proposal_matcher
        detector.rpn.proposal_matcher = MinimumIoUMatcher(
            matcher.high_threshold, matcher.low_threshold, RPN_MIN_POSITIVE_IOU
        )
    if cascade:
        detector.roi_heads = _cascade_heads(
            detector.roi_heads, num_classes, fpn_channels, box_head_dim, mask_head_dim, agnostic_boxes
        )
    return detector


def _pool_as_mmdet(heads: RoIHeads, strides: list[int]) -> None:
    """mmdet's RoI extractors in place of torchvision's, from the backbone's levels (not the max-pooled one)."""
    names = [str(i) for i in range(len(strides))]
    heads.box_roi_pool = AlignedRoIPool(names, strides, heads.box_roi_pool.output_size[0])
    if heads.has_mask():
        heads.mask_roi_pool = AlignedRoIPool(names, strides, heads.mask_roi_pool.output_size[0])


def _cascade_heads(
    single: RoIHeads, num_classes: int, channels: int, box_head_dim: int, mask_head_dim: int, agnostic_boxes: bool
) -> CascadeRoIHeads:
    """The cascade's stages, with ``single``'s pooling, sampling size and test settings."""
    resolution = single.box_roi_pool.output_size[0]
    masks = single.has_mask()
    stages = []
    for iou, weights in zip(CASCADE_IOUS, CASCADE_BOX_WEIGHTS, strict=True):
        stage = RoIHeads(
            single.box_roi_pool,
            FastRCNNConvFCHead((channels, resolution, resolution), [channels] * 4, [box_head_dim], nn.BatchNorm2d),
            BoxPredictor(box_head_dim, num_classes + 1, agnostic_boxes),
            iou,
            iou,
            single.fg_bg_sampler.batch_size_per_image,
            POSITIVE_FRACTION,
            weights,
            single.score_thresh,
            single.nms_thresh,
            single.detections_per_img,
            single.mask_roi_pool if masks else None,
            MaskRCNNHeads(channels, [mask_head_dim] * 4, 1) if masks else None,
            MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes + 1) if masks else None,
        )
        stages.append(stage)
    return CascadeRoIHeads(stages)


def create_detector(
    name: str = "swin_t",
    num_classes: int = 80,
    checkpoint: str | os.PathLike | None = None,
    *,
    masks: bool = True,
    frozen_stages: int = -1,
    always_shift: bool = True,
    detector_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> FasterRCNN:
    """Swin + FPN + Mask R-CNN (``masks``) or Faster R-CNN; ``checkpoint`` initialises the backbone.

    ``detector_options`` go to :func:`build_detector` (``min_size``, ``max_size``, ``anchor_sizes``, ...);
    ``overrides`` change the backbone's :class:`~swinkit.variants.SwinConfig`.
    """
    backbone = create_backbone(name, checkpoint, frozen_stages=frozen_stages, always_shift=always_shift, **overrides)
    return build_detector(backbone, num_classes, masks, **(detector_options or {}))


def to_coco_results(
    output: dict[str, Tensor], image_id: Any, category_ids: list[int], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's torchvision detections as COCO result entries (``bbox`` ``[x, y, w, h]``, mask RLE)."""
    from .metrics import mask_to_rle

    boxes = output["boxes"].detach().cpu().tolist()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    masks = output["masks"][:, 0].detach().cpu() > mask_threshold if "masks" in output else None
    results = []
    for i, ((x1, y1, x2, y2), score, label) in enumerate(zip(boxes, scores, labels, strict=True)):
        entry = {"image_id": image_id, "category_id": category_ids[label - 1], "bbox": [x1, y1, x2 - x1, y2 - y1]}
        entry["score"] = score
        if masks is not None:
            entry["segmentation"] = mask_to_rle(masks[i].numpy())
        results.append(entry)
    return results


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, loader: Any, dataset: Any, distributed: Any = None, views: Sequence[View] | None = None
) -> dict[str, Any]:
    """COCO box (and, for Mask R-CNN, mask) mAP of ``model`` on ``dataset`` (a :class:`CocoDetection`).

    ``loader`` yields :func:`~swinkit.dense.data.collate_lists` batches of that dataset (or a shard of
    it per process: results are gathered before scoring). ``views``: each image tested at these
    scales and mirrorings, merged (:func:`~swinkit.dense.detection_augment.detect_augmented`).
    Returns ``bbox_AP``, ``bbox_AP50``, ..., ``segm_AP``, ... in percent, and ``bad_images``: the images
    that could not be read, left out of the scores with their annotations.
    """
    from .metrics import coco_map
    from .segmentation import model_device

    if not isinstance(dataset, CocoDetection):
        raise TypeError(
            f"evaluate_detection scores against a swinkit.dense.CocoDetection (the dataset the loader reads), "
            f"got a {type(dataset).__name__}"
        )
    was_training = model.training
    model.eval()
    device = model_device(model)
    results: list[dict[str, Any]] = []
    bad: list[str] = []
    for batch in loader:
        bad += batch["bad"]
        if batch["images"] is None:
            continue
        images = [image.to(device) for image in batch["images"]]
        try:
            outputs = [detect_augmented(model, image, views) for image in images] if views else model(images)
        except ValueError as error:  # an image the detector cannot take (too elongated for its scale)
            paths = ", ".join(dataset.records[target["image_id"]].path for target in batch["targets"])
            raise ValueError(f"{paths}: {error}") from None
        for output, target in zip(outputs, batch["targets"], strict=True):
            image_id = dataset.records[target["image_id"]].id
            results += to_coco_results(output, image_id, dataset.category_ids)
    if distributed is not None and distributed.enabled:
        results, bad = _gather(results), _gather(bad)
    model.train(was_training)
    ground_truth = dataset.ground_truth(left_out=bad)  # unreadable images: not scored
    scores: dict[str, Any] = {f"bbox_{k}": v for k, v in coco_map(ground_truth, results, "bbox").items()}
    if dataset.masks:
        scores.update({f"segm_{k}": v for k, v in coco_map(ground_truth, results, "segm").items()})
    scores["bad_images"] = len(bad)
    return scores


def _gather(items: list[Any]) -> list[Any]:
    import torch.distributed as dist

    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
