"""Swin's official detectors (the mmdet 2.x configs of Swin-Transformer-Object-Detection): geometry,
losses and files.

* The test-time geometry where mmdet and torchvision differ (``geometry="mmdet"`` in
  :func:`~swinkit.dense.build_detector`): mmdet's anchors are not rounded to whole pixels, and its
  RoI extractor pools with mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)`` from level
  ``floor(log2(sqrt(area) / 56))``. torchvision rounds its cell anchors and pools with
  ``aligned=False`` and two samples per bin side.
* Images are resized as mmcv's ``imrescale`` resizes them: the same scale as torchvision's, each side
  rounded (``int(side * scale + 0.5)``) where torchvision floors, so a side can be a pixel longer.
* Masks are pasted into the image as mmdet pastes them (``FCNMaskHead``'s ``_do_paste_mask``, as on
  the GPUs the published results came from): the 28 x 28 probabilities sampled bilinearly at each
  image pixel's centre mapped into the float box. torchvision widens the mask by a pixel, rounds
  the box to whole pixels and resizes the mask to it.
* The training rules of Swin's configs (``losses="mmdet"``): Mask R-CNN's L1 box losses in the RPN
  and the box head (torchvision: smooth L1, beta 1/9) and 1000 proposals a training image; the
  RPN's low-quality matches only for objects some anchor overlaps at IoU 0.3 (``min_pos_iou``),
  each such anchor to the object it is best for (``MaxIoUAssigner``'s loop over the objects).
* The official Mask R-CNN and Cascade Mask R-CNN checkpoints (``backbone.``, ``neck.``,
  ``rpn_head.``, ``roi_head.``) to and from swinkit's detection files. mmdet puts the background
  class last and has no box or mask row for it; torchvision puts it first, with a box and a mask
  row that inference never reads: those rows are zero when a file is read and dropped when one is
  written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import roi_align

from ..checkpoint.io import CheckpointError, StateDict

GEOMETRIES = ("mmdet", "torchvision")
LOSSES = ("mmdet", "torchvision")
MASK_RCNN_TRAIN_PROPOSALS = 1000  # Swin's Mask R-CNN config (its cascade keeps torchvision's 2000)
RPN_MIN_POSITIVE_IOU = 0.3  # both configs' RPN assigner: a low-quality match needs this overlap
FINEST_SCALE = 56  # mmdet's SingleRoIExtractor: a box of sqrt(area) below 112 pools from the finest level
# Detector images are RGB in [0, 1]. Resizing with overshooting kernels (bicubic, antialiasing) or a
# colour jitter leaves values a little outside; 0..255 pixels (up to 255) and images already
# normalised with a mean and std (ImageNet's: about -2.1 to 2.6) lie far outside this range.
IMAGE_RANGE = (-0.5, 1.5)

# The 80 COCO classes in mmdet's order (category ids ascending) and their category ids.
COCO_CLASSES = (  # noqa: SIM905 (80 names read better as one string)
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,"
    "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,"
    "handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,"
    "surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,"
    "broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,laptop,"
    "mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,"
    "teddy bear,hair drier,toothbrush"
).split(",")
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


class UnroundedAnchorGenerator(AnchorGenerator):
    """torchvision's anchors with mmdet's cell anchors: centred on 0, half sides not rounded.

    mmdet's ``AnchorGenerator`` (``center_offset=0``): for size ``s`` and ratio ``r = h / w`` the
    anchor is ``(-w/2, -h/2, w/2, h/2)`` with ``w = s / sqrt(r)``, ``h = s * sqrt(r)``. torchvision
    rounds these to whole pixels (``r = 0.5`` at 32: 23 x 11 half sides instead of 22.6 x 11.3).
    """

    def generate_anchors(
        self,
        scales: Sequence[int],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),  # noqa: B008 (torchvision's signature)
    ) -> Tensor:
        sizes = torch.as_tensor(scales, dtype=dtype, device=device)
        root = torch.as_tensor(aspect_ratios, dtype=dtype, device=device).sqrt()
        half_widths = (sizes[None, :] / root[:, None]).reshape(-1) / 2  # ratio-major, as mmdet orders them
        half_heights = (sizes[None, :] * root[:, None]).reshape(-1) / 2
        return torch.stack([-half_widths, -half_heights, half_widths, half_heights], dim=1)


class AlignedRoIPool(nn.Module):
    """mmdet's ``SingleRoIExtractor`` with mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``.

    A box of ``sqrt(area) = a`` pools from FPN level ``floor(log2(a / 56 + 1e-6))``, clamped to the
    levels; on its level, bins of the box scaled by ``1 / stride`` and shifted by half a pixel,
    ``ceil(bin side)`` samples per bin side, averaged. torchvision's ``MultiScaleRoIAlign``
    interface: ``(features, boxes per image, image sizes) -> (boxes, C, size, size)``.
    """

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"one stride per feature map: {list(featmap_names)} vs {list(strides)}")
        self.featmap_names = list(featmap_names)
        self.strides = list(strides)
        self.output_size = (output_size, output_size)

    def levels(self, boxes: Tensor) -> Tensor:
        """The level each ``(x1, y1, x2, y2)`` box pools from (mmdet's ``map_roi_levels``)."""
        scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
        return torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(0, len(self.strides) - 1).long()

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = [features[name] for name in self.featmap_names]
        # Counts read as .shape[0], not len(): the ONNX exporter's tracer keeps those variable.
        rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.levels(rois[:, 1:])
        pooled = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(maps, self.strides, strict=True)):
            index = torch.where(levels == level)[0]
            selected = rois[index].to(feature.dtype)
            found = roi_align(feature, selected, self.output_size, 1.0 / stride, 0, aligned=True).to(pooled.dtype)
            # A scatter, not `pooled[index] = found`: traced for ONNX, that assignment fixes a level's
            # region count at 1 where the trace saw one region there (as torchvision's ONNX merge).
            pooled.scatter_(0, index.view(-1, 1, 1, 1).expand_as(found), found)
        return pooled


def paste_masks(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> Tensor:
    """``(N, 1, M, M)`` mask probabilities into ``(N, 1, H, W)`` images, mmdet's way (the module docstring).

    Each image pixel ``(x, y)`` samples the mask bilinearly at its centre's place in the box, in
    mask cells ``u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5`` (``grid_sample`` with
    ``align_corners=False`` and zeros outside). Bilinear sampling on a grid of rows times columns
    is separable: a cell ``j`` weighs ``max(0, 1 - |u - j|)`` in each direction, so each pasted
    mask is ``rows @ mask @ columns^T``, with no loop over the masks and no size read back from
    them (the same graph for every count and image size when exported).
    """
    height, width = image_shape
    cells = masks.shape[-1]

    def weights(side: int | Tensor, low: Tensor, high: Tensor) -> Tensor:  # (N, side, M)
        centres = torch.arange(side, dtype=masks.dtype, device=masks.device) + 0.5
        place = (centres[None, :] - low[:, None]) / (high - low)[:, None] * cells - 0.5
        grid = torch.arange(cells, dtype=masks.dtype, device=masks.device)
        return (1 - (place[:, :, None] - grid).abs()).clamp(min=0)

    rows, columns = weights(height, boxes[:, 1], boxes[:, 3]), weights(width, boxes[:, 0], boxes[:, 2])
    return (rows @ masks[:, 0] @ columns.transpose(1, 2))[:, None]


def rescaled_size(height: int, width: int, short: int, long: int, offset: float = 0.5) -> tuple[int, int]:
    """The size an image is resized to, keeping its ratio, shorter side ``short`` and longer side at most
    ``long`` (mmcv's ``rescale_size``): each side times the scale, plus ``offset`` (mmcv's rounding;
    0 is torchvision's floor), truncated."""
    scale = min(short / min(height, width), long / max(height, width))
    return int(height * scale + offset), int(width * scale + offset)


def check_detection_images(images: Any, who: str = "the detector", values: bool = True) -> None:
    """Refuse anything but a non-empty list of float RGB images ``(3, H, W)`` in [0, 1] (within
    :data:`IMAGE_RANGE`), naming the image. ``values``: also read each image's extremes (one
    reduction per image); without it only types and shapes are checked."""
    if not isinstance(images, (list, tuple)):
        shape = f" of shape {tuple(images.shape)}" if isinstance(images, Tensor) else ""
        raise TypeError(
            f"{who} takes a list of RGB images (3, H, W) in [0, 1], one tensor per image; got a "
            f"{type(images).__name__}{shape}"
        )
    if not images:
        raise ValueError(f"{who} takes a list of RGB images (3, H, W) in [0, 1]; got an empty one")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise TypeError(f"images[{i}] is a {type(image).__name__}; {who} takes RGB image tensors (3, H, W)")
        if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
            raise ValueError(
                f"{who} takes RGB images (3, H, W), H and W 1 or more; got {tuple(image.shape)} for images[{i}]"
            )
        if not image.is_floating_point():
            raise TypeError(
                f"images[{i}] is {image.dtype}; {who} takes float RGB images in [0, 1] (divide 0..255 pixels by 255)"
            )
    if not values:
        return
    low_limit, high_limit = IMAGE_RANGE
    for i, image in enumerate(images):
        with torch.no_grad():
            low, high = torch.stack(image.aminmax()).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"images[{i}] holds NaN or infinite values; {who} takes RGB images in [0, 1]")
        if low < low_limit or high > high_limit:
            raise ValueError(
                f"images[{i}] holds values from {low:.4g} to {high:.4g}; {who} takes RGB images in [0, 1] (values "
                f"{low_limit} to {high_limit} pass): divide 0..255 pixels by 255, and do not normalise them (the "
                f"detector normalises with its backbone's mean and std)"
            )


def check_detection_targets(
    images: Sequence[Tensor],
    targets: Any,
    training: bool,
    num_classes: int | None = None,
    masks: bool = False,
    values: bool = True,
) -> None:
    """Refuse targets torchvision would train on wrongly or fail on deep inside, naming the item: one
    dict per image of ``boxes`` (float ``(N, 4)``, x1, y1, x2, y2 in the image's pixels, x2 > x1 and
    y2 > y1), ``labels`` (int64 ``(N,)`` in 1..``num_classes``; 0 is the background) and, needed
    in training where ``masks``, ``masks`` (``(N, H, W)`` of 0 and 1 at the image's size).
    ``values``: also read the values (a reduction or two per target), not only types and shapes."""
    wanted = "boxes, labels" + (" and masks" if masks else "")
    if targets is None:
        if training:
            raise ValueError(f"a detector in training mode needs targets: a list of one dict per image ({wanted})")
        return
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of one dict per image ({wanted}), got a {type(targets).__name__}")
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets: give one target dict per image")
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise TypeError(f"targets[{i}] is a {type(target).__name__}; a target is a dict of {wanted}")
        needed = ("boxes", "labels", "masks") if masks and training else ("boxes", "labels")
        absent = [key for key in needed if key not in target]
        if absent:
            raise ValueError(f"targets[{i}] has no {', '.join(absent)}; a target is a dict of {wanted}")
        _check_target(f"targets[{i}]", target, images[i], num_classes, values)


def _check_target(name: str, target: dict[str, Any], image: Tensor, num_classes: int | None, values: bool) -> None:
    boxes, labels = target["boxes"], target["labels"]
    if not isinstance(boxes, Tensor) or not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f'{name}["boxes"] must be a float tensor (N, 4) of x1, y1, x2, y2; got {_described(boxes)}')
    count = boxes.shape[0]
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (count,):
        raise ValueError(f'{name}["labels"] must be an int64 tensor ({count},), one per box; got {_described(labels)}')
    found = target.get("masks")
    height, width = image.shape[-2:]
    if found is not None and (not isinstance(found, Tensor) or tuple(found.shape) != (count, height, width)):
        raise ValueError(
            f'{name}["masks"] must be a tensor (N, H, W) = ({count}, {height}, {width}): one per box, at its '
            f"image's size; got {_described(found)}"
        )
    for key in ("boxes", "labels", "masks"):
        if isinstance(target.get(key), Tensor) and target[key].device != image.device:
            raise ValueError(f'{name}["{key}"] is on {target[key].device}, its image on {image.device}')
    if not values or count == 0:
        return
    with torch.no_grad():
        wrong = ~(boxes.isfinite().all(dim=1) & (boxes[:, 2:] > boxes[:, :2]).all(dim=1))
        if wrong.any():
            box = boxes[int(wrong.nonzero()[0])].tolist()
            raise ValueError(
                f'{name}["boxes"] holds {box}: boxes are x1, y1, x2, y2 in pixels, finite, with x2 > x1 and '
                f"y2 > y1 (COCO's x, y, width, height need converting)"
            )
        low, high = torch.stack(labels.aminmax()).tolist()
        if low < 1 or (num_classes is not None and high > num_classes):
            span = f"1..{num_classes}" if num_classes is not None else "1 or more"
            raise ValueError(
                f'{name}["labels"] holds {low if low < 1 else high}: labels count from 1 (0 is the background), '
                f"{span} for this detector"
            )
        if found is not None and ((found != 0) & (found != 1)).any():
            value = found[(found != 0) & (found != 1)][0].item()
            raise ValueError(f'{name}["masks"] holds {value}; masks are 0 (not the object) or 1 per pixel')


def _described(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _tracing() -> bool:
    """Whether a tracer or exporter is recording the call: the checks' Python decisions would be
    recorded as constants (they ran on the example)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform, its resize written out so that an image too elongated for
    the detector's scale (a side that would resize to 0 pixels) is refused by name rather than by
    torch's ``interpolate``. Each resized side is ``int(side * scale + size_offset)``: with the
    offset 0 that is torchvision's own floor, and the same size, image and boxes as its resize.

    Images and targets are checked first (:func:`check_detection_images`,
    :func:`check_detection_targets`), against ``num_classes`` and ``masks`` (the detector's, set by
    :func:`~swinkit.dense.build_detector`; None: labels are only checked to be 1 or more)."""

    size_offset = 0.0  # added before the floor (torchvision floors)
    num_classes: int | None = None
    masks = False

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if not _tracing():
            check_detection_images(images)
            check_detection_targets(images, targets, self.training, self.num_classes, self.masks)
        return super().forward(images, targets)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        if self.training and self._skip_resize:
            return image, target
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        height, width = image.shape[-2:]
        size = rescaled_size(height, width, short, self.max_size, self.size_offset)
        if min(size) < 1:
            raise ValueError(
                f"an image of {height}x{width} resizes to {size[0]}x{size[1]} at the detector's scale "
                f"(shorter side {short}, longer at most {self.max_size}): too elongated to detect in "
                f"(sizes are height x width, in pixels)"
            )
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], (height, width), size)
        if "masks" in target:  # nearest, as torchvision and mmdet's BitmapMasks resize them
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target


class MmdetTransform(DetectionTransform):
    """The detection transform with mmdet's geometry: each resized side rounded as mmcv's
    ``imrescale`` rounds it, ``int(side * scale + 0.5)`` where torchvision floors (training and
    test; the scale is the same, ``min(short / shorter side, max_size / longer side)``), and the
    masks pasted by :func:`paste_masks`."""

    size_offset = 0.5  # mmcv's rounding of a resized side

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for prediction, shape, original in zip(result, image_shapes, original_sizes, strict=True):
            prediction["boxes"] = resize_boxes(prediction["boxes"], shape, original)
            if "masks" in prediction:
                prediction["masks"] = paste_masks(prediction["masks"], prediction["boxes"], original)
        return result


def transform_like(transform: GeneralizedRCNNTransform, kind: type[GeneralizedRCNNTransform]) -> Any:
    """A ``kind`` transform with ``transform``'s settings (sizes, normalisation, padding)."""
    settings = ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size")
    return kind(*(getattr(transform, name) for name in settings))


class MinimumIoUMatcher(Matcher):
    """torchvision's ``Matcher`` with mmdet's low-quality matches (``MaxIoUAssigner(min_pos_iou=...,
    gt_max_assign_all=True)``): a truth whose best overlap reaches ``min_iou`` takes every anchor of
    that overlap, truths in order, so an anchor that is the best of two truths goes to the later one,
    and one that is a truth's best goes to it even where it overlaps another truth more.
    torchvision gives every truth its best anchors however little they overlap it, each anchor to
    the truth it overlaps most."""

    def __init__(self, high_threshold: float, low_threshold: float, min_iou: float) -> None:
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=True)
        self.min_iou = min_iou

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor) -> None:
        highest = match_quality_matrix.max(dim=1, keepdim=True).values
        best = (match_quality_matrix == highest) & (highest >= self.min_iou)  # (truths, anchors)
        truths = torch.arange(best.shape[0], device=best.device)[:, None].expand_as(best)
        last = torch.where(best, truths, -1).max(dim=0).values  # the last truth each anchor is best for
        matches[last >= 0] = last[last >= 0]


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with the box loss of Swin's Mask R-CNN config: L1 on the positive anchors'
    deltas (mmdet's ``L1Loss``) instead of smooth L1 (beta 1/9), over the sampled anchors as before."""

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        positive, negative = (torch.cat(masks).bool() for masks in self.fg_bg_sampler(labels))
        sampled = positive | negative
        targets = torch.cat(regression_targets)
        box = F.l1_loss(pred_bbox_deltas[positive], targets[positive], reduction="sum") / sampled.sum().clamp_min(1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box


class L1RoIHeads(RoIHeads):
    """torchvision's box and mask heads trained with the box loss of Swin's Mask R-CNN config: L1 on the
    positive regions' deltas for their truth's class, over the sampled regions (mmdet's ``L1Loss``
    with ``avg_factor`` the sampled count) where torchvision's ``RoIHeads`` take smooth L1 (beta
    1/9). Sampling, the other losses and inference are torchvision's."""

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("the detector's heads in training mode need targets")
        from .cascade import _box_forward, _class_deltas, _mask_loss, _matched_truths, _sample

        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        sampled, matched, labels, _ = _sample(self, proposals, gt_boxes, [t["labels"] for t in targets])
        logits, deltas = _box_forward(self, features, sampled, image_shapes)
        wanted = torch.cat(self.box_coder.encode(_matched_truths(gt_boxes, matched), sampled))
        classes = torch.cat(labels)
        positive = torch.where(classes > 0)[0]
        chosen = _class_deltas(deltas[positive], classes[positive])
        losses = {
            "loss_classifier": F.cross_entropy(logits, classes),
            "loss_box_reg": F.l1_loss(chosen, wanted[positive], reduction="sum") / max(len(classes), 1),
        }
        if self.has_mask():
            losses["loss_mask"] = _mask_loss(self, features, sampled, matched, labels, image_shapes, targets)
        return [], losses


# Key templates, mmdet's name -> swinkit's file name ({a}, {b}: indices). Mask R-CNN's box head is
# mmdet's Shared2FCBBoxHead; the cascade's is ConvFCBBoxHead with 4 convolutions (ConvModule: .conv,
# .bn) and one fully connected layer, torchvision's FastRCNNConvFCHead (a Flatten at index 4).
_KEY_TEMPLATES = (
    ("neck.lateral_convs.{a}.conv.", "neck.inner_blocks.{a}.0."),
    ("neck.fpn_convs.{a}.conv.", "neck.layer_blocks.{a}.0."),
    ("rpn_head.rpn_conv.", "rpn.head.conv.0.0."),
    ("rpn_head.rpn_cls.", "rpn.head.cls_logits."),
    ("rpn_head.rpn_reg.", "rpn.head.bbox_pred."),
    ("roi_head.bbox_head.shared_fcs.0.", "roi_heads.box_head.fc6."),
    ("roi_head.bbox_head.shared_fcs.1.", "roi_heads.box_head.fc7."),
    ("roi_head.bbox_head.fc_cls.", "roi_heads.box_predictor.cls_score."),
    ("roi_head.bbox_head.fc_reg.", "roi_heads.box_predictor.bbox_pred."),
    ("roi_head.mask_head.convs.{a}.conv.", "roi_heads.mask_head.{a}.0."),
    ("roi_head.mask_head.upsample.", "roi_heads.mask_predictor.conv5_mask."),
    ("roi_head.mask_head.conv_logits.", "roi_heads.mask_predictor.mask_fcn_logits."),
    ("roi_head.bbox_head.{a}.shared_convs.{b}.conv.", "roi_heads.stages.{a}.box_head.{b}.0."),
    ("roi_head.bbox_head.{a}.shared_convs.{b}.bn.", "roi_heads.stages.{a}.box_head.{b}.1."),
    ("roi_head.bbox_head.{a}.shared_fcs.0.", "roi_heads.stages.{a}.box_head.5."),
    ("roi_head.bbox_head.{a}.fc_cls.", "roi_heads.stages.{a}.box_predictor.cls_score."),
    ("roi_head.bbox_head.{a}.fc_reg.", "roi_heads.stages.{a}.box_predictor.bbox_pred."),
    ("roi_head.mask_head.{a}.convs.{b}.conv.", "roi_heads.stages.{a}.mask_head.{b}.0."),
    ("roi_head.mask_head.{a}.upsample.", "roi_heads.stages.{a}.mask_predictor.conv5_mask."),
    ("roi_head.mask_head.{a}.conv_logits.", "roi_heads.stages.{a}.mask_predictor.mask_fcn_logits."),
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)"))


_TO_SWINKIT = [(_pattern(mmdet), swinkit) for mmdet, swinkit in _KEY_TEMPLATES]
_TO_MMDET = [(_pattern(swinkit), mmdet) for mmdet, swinkit in _KEY_TEMPLATES]


def _renamed(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict()) + key[match.end() :]
    return None


def _background_rows(key: str, rows: int) -> int:
    """How many leading rows of a swinkit tensor (``rows`` of them in a file on either side) belong to
    torchvision's background class, which mmdet has none of."""
    if ".mask_predictor.mask_fcn_logits." in key:
        return 1
    if key.startswith("roi_heads.box_predictor.bbox_pred."):  # Mask R-CNN: a box per class, always
        return 4
    # A cascade stage: a box per class (4 or more classes' rows), or one for every class (4 rows;
    # a one-class file's box per class is the same function).
    if ".box_predictor.bbox_pred." in key and rows > 4:
        return 4
    return 0


def is_mmdet_detector(state_dict: StateDict) -> bool:
    """Whether a state dict is laid out as an mmdet two-stage detector (``rpn_head.`` and ``roi_head.``)."""
    return any(k.startswith("rpn_head.") for k in state_dict) and any(k.startswith("roi_head.") for k in state_dict)


def _is_class_score(swinkit_key: str) -> bool:
    return swinkit_key.endswith((".cls_score.weight", ".cls_score.bias"))


def _converted(
    state_dict: StateDict, rules: list[tuple[re.Pattern[str], str]], convert: Callable[[str, str, Tensor], Tensor]
) -> tuple[StateDict, list[str]]:
    """Keys renamed by ``rules`` and values by ``convert(key, new key, value)``; backbone keys kept; unknown keys."""
    out: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        name = key if key.startswith("backbone.") else _renamed(key, rules)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value if name == key else convert(key, name, value)
    return out, unknown


def _from_mmdet_value(key: str, name: str, value: Tensor) -> Tensor:
    if _is_class_score(name):
        value = torch.cat([value[-1:], value[:-1]])  # background: last in mmdet, first in torchvision
    rows = _background_rows(name, value.shape[0] if value.dim() else 0)
    return torch.cat([value.new_zeros((rows, *value.shape[1:])), value]) if rows else value


def _to_mmdet_value(key: str, name: str, value: Tensor) -> Tensor:
    rows = _background_rows(key, value.shape[0] if value.dim() else 0)
    value = value[rows:] if rows else value
    return torch.cat([value[1:], value[:1]]) if _is_class_score(key) else value


def from_mmdet(state_dict: StateDict, source: str = "the file") -> StateDict:
    """An official (mmdet) Mask R-CNN / Cascade Mask R-CNN state dict in swinkit's detection-file keys.

    The backbone keys stay as they are (swinkit's files use the official backbone layout). A key
    no rule knows (another head: HTC's semantic branch, a mask IoU head, ...) is an error naming it.
    """
    out, unknown = _converted(state_dict, _TO_SWINKIT, _from_mmdet_value)
    if unknown:
        raise CheckpointError(
            f"{source}: keys {unknown[:6]} ({len(unknown)} in all) have no counterpart in swinkit's detectors; "
            "swinkit reads mmdet's Mask R-CNN, Faster R-CNN and Cascade (Mask) R-CNN with Swin's heads"
        )
    return out


def to_mmdet(state_dict: StateDict) -> StateDict:
    """swinkit's detection-file keys -> the official mmdet layout (the background rows dropped)."""
    out, unknown = _converted(state_dict, _TO_MMDET, _to_mmdet_value)
    if unknown:
        raise ValueError(f"{unknown[:6]} have no counterpart in mmdet's detectors")
    return out


def mmdet_head_options(state_dict: StateDict, source: str = "the file") -> dict[str, Any]:
    """The :func:`~swinkit.dense.build_detector` options an mmdet state dict implies, with mmdet's test settings."""
    cascade = "roi_head.bbox_head.0.fc_cls.weight" in state_dict
    box = "roi_head.bbox_head.0." if cascade else "roi_head.bbox_head."
    mask = "roi_head.mask_head.0." if cascade else "roi_head.mask_head."
    required = ["neck.lateral_convs.0.conv.weight", "rpn_head.rpn_cls.weight", box + "fc_cls.weight"]
    absent = [key for key in required if key not in state_dict]
    if absent:
        raise CheckpointError(f"{source}: not an mmdet Mask R-CNN / Cascade R-CNN file: no {absent}")
    anchors = state_dict["rpn_head.rpn_cls.weight"].shape[0]
    if anchors != 3:
        raise CheckpointError(
            f"{source}: rpn_head.rpn_cls has {anchors} anchors per position; swinkit's detectors have Swin's 3 "
            "(one size per level, ratios 0.5, 1, 2)"
        )
    masks = mask + "conv_logits.weight" in state_dict
    options = {
        "masks": masks,
        "cascade": cascade,
        "agnostic_boxes": cascade and state_dict[box + "fc_reg.weight"].shape[0] == 4,
        "losses": "mmdet",
        "geometry": "mmdet",
        "fpn_channels": state_dict["neck.lateral_convs.0.conv.weight"].shape[0],
        "box_head_dim": state_dict[box + "shared_fcs.0.weight"].shape[0],
        # mmdet's test_cfg of Swin's configs: 800 x 1333 images, scores above 0.05, 100 detections
        "min_size": 800,
        "max_size": 1333,
        "score_threshold": 0.05,
        "detections_per_img": 100,
    }
    if masks:
        options["mask_head_dim"] = state_dict[mask + "conv_logits.weight"].shape[1]
    return options


def mmdet_classes(state_dict: StateDict, names: list[str] | None) -> tuple[list[str], list[int]]:
    """Class names (the file's ``meta.CLASSES``, else COCO's for 80 classes) and the COCO category ids they take."""
    key = "roi_head.bbox_head.0.fc_cls.weight"
    key = key if key in state_dict else "roi_head.bbox_head.fc_cls.weight"
    count = state_dict[key].shape[0] - 1
    if names is None or len(names) != count:
        names = list(COCO_CLASSES) if count == len(COCO_CLASSES) else [f"class{i}" for i in range(count)]
    return names, mmdet_category_ids(names)


def mmdet_category_ids(names: list[str]) -> list[int]:
    """The COCO category ids of ``names``: COCO's own for its 80 classes, else 1..K."""
    return list(COCO_CATEGORY_IDS) if list(names) == list(COCO_CLASSES) else list(range(1, len(names) + 1))


def l1_region_proposals(rpn: RegionProposalNetwork, train_proposals: int) -> L1RegionProposalNetwork:
    """``rpn``'s parts and settings with Swin's Mask R-CNN loss and ``train_proposals`` kept after NMS in training."""
    return L1RegionProposalNetwork(
        rpn.anchor_generator,
        rpn.head,
        rpn.proposal_matcher.high_threshold,
        rpn.proposal_matcher.low_threshold,
        rpn.fg_bg_sampler.batch_size_per_image,
        rpn.fg_bg_sampler.positive_fraction,
        dict(rpn._pre_nms_top_n),
        {**rpn._post_nms_top_n, "training": train_proposals},
        rpn.nms_thresh,
        rpn.score_thresh,
    )


def l1_roi_heads(heads: RoIHeads) -> L1RoIHeads:
    """``heads``' parts and settings with Swin's Mask R-CNN box loss."""
    return L1RoIHeads(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        heads.proposal_matcher.high_threshold,
        heads.proposal_matcher.low_threshold,
        heads.fg_bg_sampler.batch_size_per_image,
        heads.fg_bg_sampler.positive_fraction,
        heads.box_coder.weights,
        heads.score_thresh,
        heads.nms_thresh,
        heads.detections_per_img,
        heads.mask_roi_pool,
        heads.mask_head,
        heads.mask_predictor,
    )
