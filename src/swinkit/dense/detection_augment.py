"""Multi-scale and flip testing of a detector: mmdet 2.x's ``aug_test`` of two-stage detectors.

Each view is the image resized to one test scale (shorter side, longer side at most), mirrored or
not. As mmdet merges views (``TwoStageDetector.aug_test``; ``CascadeRoIHead.aug_test`` for the
cascade):

1. every view's RPN proposals, with their objectness, are mapped back to the image's pixels and
   pooled; one NMS over all of them (the RPN's IoU, 0.7) keeps the best 1000 (the RPN's test count):
   the regions every view then classifies (``merge_aug_proposals``);
2. each view classifies those regions, mapped into its pixels, and decodes a box per class (the
   cascade: its three stages as at a single scale); the boxes, mapped back, and the class
   probabilities are averaged over the views (``merge_aug_bboxes``), then the detector's own
   score threshold, per-class NMS and top 100 pick the detections;
3. for Mask R-CNN, each view's mask head (each stage's, for the cascade) sees the detections'
   boxes mapped into its pixels; the 28 x 28 probabilities, mirrored back for a mirrored view, are
   averaged (``merge_aug_masks``) and pasted into the image as at a single scale.

One view is the detector's own single-scale path (mmdet too tests one view with ``simple_test``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from .cascade import CascadeRoIHeads, _box_forward, _mask_forward
from .detection_data import mirror_boxes
from .segmentation import check_test_ratios

# Swin's detection configs test at one scale; these (with flip) are swinkit's --aug-test for
# detectors: the test scale (800, at most 1333 for the longer side) times each ratio.
AUG_TEST_RATIOS = (0.75, 1.0, 1.25)


@dataclass(frozen=True)
class View:
    """One test view: the image resized to shorter side ``short`` (longer at most ``long``), mirrored if ``flip``."""

    short: int
    long: int
    flip: bool = False

    def __post_init__(self) -> None:
        whole = [isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in (self.short, self.long)]
        if not all(whole):
            raise ValueError(
                f"a view's sides are whole pixels, 1 or more; got short={self.short!r}, long={self.long!r}"
            )
        if not isinstance(self.flip, bool):
            raise ValueError(f"a view's flip is True or False, got {self.flip!r}")


@dataclass
class _Seen:
    """What one view's backbone and RPN gave: FPN maps, the resized size, proposals in image pixels."""

    view: View
    features: dict[str, Tensor]
    size: tuple[int, int]
    proposals: Tensor
    objectness: Tensor


def augmented_views(model: nn.Module, ratios: Sequence[float] | None = None, flip: bool = False) -> list[View]:
    """The views of ``ratios`` of the detector's test scale (None: the test scale), each also mirrored if ``flip``."""
    if not isinstance(model, GeneralizedRCNN):
        raise TypeError(f"augmented_views needs a detector (swinkit.dense.create_detector), got {type(model).__name__}")
    check_test_ratios(ratios)
    if not isinstance(flip, bool):
        raise ValueError(f"flip is True or False, got {flip!r}")
    short, long = model.transform.min_size[-1], model.transform.max_size
    views = []
    for ratio in ratios if ratios is not None else (1.0,):
        scale = (max(1, math.floor(short * ratio + 0.5)), max(1, math.floor(long * ratio + 0.5)))
        views += [View(*scale, mirrored) for mirrored in ((False, True) if flip else (False,))]
    return views


@torch.no_grad()
def detect_augmented(model: nn.Module, image: Tensor, views: Sequence[View]) -> dict[str, Tensor]:
    """The detections of one RGB image ``(3, H, W)`` in [0, 1] from ``views`` merged as mmdet merges
    them (the module docstring), in the model's output format (``boxes`` in the image's pixels,
    ``labels``, ``scores``, ``masks`` for Mask R-CNN)."""
    check_detector(model)
    if not views:
        raise ValueError("detect_augmented needs at least one view")
    if not all(isinstance(view, View) for view in views):
        raise TypeError("detect_augmented's views are View objects (swinkit.dense.augmented_views makes them)")
    if model.training:
        raise ValueError("detect_augmented tests a detector in eval mode; call model.eval() first")
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"detect_augmented takes one RGB image (3, H, W) in [0, 1], got {_described(image)}")
    original = (image.shape[-2], image.shape[-1])
    seen = [_see(model, image, view) for view in views]
    proposals = _merged_proposals(seen, model.rpn.nms_thresh, model.rpn.post_nms_top_n())
    heads = model.roi_heads
    outputs = [_box_predictions(heads, s, proposals, original) for s in seen]
    boxes = torch.stack([b for b, _ in outputs]).mean(dim=0)
    scores = torch.stack([p for _, p in outputs]).mean(dim=0)
    result = _kept_detections(heads.stages[-1] if isinstance(heads, CascadeRoIHeads) else heads, boxes, scores)
    if _has_masks(heads):
        masks = [m for s in seen for m in _mask_probabilities(heads, s, result, original)]
        result["masks"] = torch.stack(masks).mean(dim=0)
    return model.transform.postprocess([result], [original], [original])[0]


def _described(image: object) -> str:
    return f"shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__


def check_detector(model: nn.Module, source: str | os.PathLike = "the model") -> None:
    """Refuse a model whose parts cannot be run one by one (an exported detector's file)."""
    if not isinstance(model, GeneralizedRCNN):
        raise ValueError(
            f"{source}: multi-scale and flip testing runs a detector's backbone, RPN and heads one by one, "
            f"which a {type(model).__name__} does not have; give the model file written by training "
            f"(an exported detector tests at its one scale)"
        )


@contextlib.contextmanager
def _test_scale(transform: nn.Module, view: View) -> Iterator[None]:
    """The detector's transform resizing to ``view``'s scale for as long as the block runs."""
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (view.short,), view.long
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


def _see(model: nn.Module, image: Tensor, view: View) -> _Seen:
    """One view through the transform, backbone and RPN: proposals and objectness as the RPN keeps them."""
    with _test_scale(model.transform, view):
        images, _ = model.transform([image.flip(-1) if view.flip else image])
    features = model.backbone(images.tensors)
    size = images.image_sizes[0]
    rpn = model.rpn
    maps = list(features.values())
    objectness, deltas = rpn.head(maps)
    anchors = rpn.anchor_generator(images, maps)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    decoded = rpn.box_coder.decode(deltas, anchors).view(1, -1, 4)
    boxes, scores = rpn.filter_proposals(decoded, objectness, images.image_sizes, per_level)
    original = (image.shape[-2], image.shape[-1])
    return _Seen(view, features, size, _from_view(boxes[0], view, size, original), scores[0])


def _to_view(boxes: Tensor, view: View, size: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """``(..., 4)`` boxes in the image's pixels into the view's (mmdet's ``bbox_mapping``: scale, then mirror)."""
    scaled = boxes * _scale_factors(boxes, size, original)
    return mirror_boxes(scaled, size[1]) if view.flip else scaled


def _from_view(boxes: Tensor, view: View, size: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """``(..., 4)`` boxes in the view's pixels back into the image's (``bbox_mapping_back``)."""
    unmirrored = mirror_boxes(boxes, size[1]) if view.flip else boxes
    return unmirrored / _scale_factors(boxes, size, original)


def _scale_factors(boxes: Tensor, size: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """mmdet's ``scale_factor``: the view's width and height over the image's, for ``x1, y1, x2, y2``."""
    (height, width), (original_height, original_width) = size, original
    factors = [width / original_width, height / original_height] * 2
    return torch.tensor(factors, dtype=boxes.dtype, device=boxes.device)


def _merged_proposals(seen: list[_Seen], iou: float, count: int) -> Tensor:
    """The regions every view classifies: all views' proposals, one NMS at ``iou``, the best ``count``.

    A single view's proposals are kept as its RPN gave them (the detector's own path)."""
    if len(seen) == 1:
        return seen[0].proposals
    boxes = torch.cat([s.proposals for s in seen])
    keep = box_ops.nms(boxes, torch.cat([s.objectness for s in seen]), iou)  # by falling objectness
    return boxes[keep[:count]]


def _box_predictions(
    heads: nn.Module, seen: _Seen, proposals: Tensor, original: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """One view's box per class ``(N, C, 4)`` in the image's pixels and class probabilities ``(N, C)``."""
    regions = [_to_view(proposals, seen.view, seen.size, original)]
    if isinstance(heads, CascadeRoIHeads):
        logits, deltas, regions = heads.box_outputs(seen.features, regions, [seen.size])
        coder = heads.stages[-1].box_coder
    else:
        logits, deltas = _box_forward(heads, seen.features, regions, [seen.size])
        coder = heads.box_coder
    boxes = box_ops.clip_boxes_to_image(coder.decode(deltas, regions), seen.size)
    return _from_view(boxes, seen.view, seen.size, original), F.softmax(logits, dim=-1)


def _kept_detections(heads: nn.Module, boxes: Tensor, scores: Tensor) -> dict[str, Tensor]:
    """torchvision's ``postprocess_detections`` after its decoding: the background dropped, the
    score threshold, boxes under 0.01 pixels dropped, NMS per class, the top ``detections_per_img``."""
    labels = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    keep = torch.where(scores > heads.score_thresh)[0]
    keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
    keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], heads.nms_thresh)]
    keep = keep[: heads.detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _has_masks(heads: nn.Module) -> bool:
    return heads.has_masks if isinstance(heads, CascadeRoIHeads) else heads.has_mask()


def _mask_probabilities(
    heads: nn.Module, seen: _Seen, detections: dict[str, Tensor], original: tuple[int, int]
) -> list[Tensor]:
    """One view's ``(K, 1, 28, 28)`` mask probabilities of each detection's class, one per mask head
    (the cascade has one a stage), in the image's left-to-right order."""
    boxes = [_to_view(detections["boxes"], seen.view, seen.size, original)]
    stages = heads.stages if isinstance(heads, CascadeRoIHeads) else [heads]
    found = []
    for stage in stages:
        probabilities = maskrcnn_inference(
            _mask_forward(stage, seen.features, boxes, [seen.size]), [detections["labels"]]
        )[0]
        found.append(probabilities.flip(-1) if seen.view.flip else probabilities)
    return found
