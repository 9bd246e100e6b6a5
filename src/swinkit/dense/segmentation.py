"""Semantic segmentation: Swin + UPerNet (+ auxiliary FCN head), its loss, whole / sliding-window
inference and multi-scale + flip testing."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..variants import is_real, is_whole
from .backbone import SwinBackbone, create_backbone
from .heads import FCNHead, UPerHead, resize
from .metrics import check_ignore_index, confusion_matrix

# The auxiliary head reads stage 3 (index 2), as in the paper's ADE20K setup.
AUX_STAGE = 2

# mmseg's `--aug-test` (the Swin paper's multi-scale ADE20K results): the test scale times each
# ratio, each view also mirrored.
AUG_TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


class Segmentor(nn.Module):
    """Backbone, optional neck, decode head and optional auxiliary head (``mmseg``'s EncoderDecoder).

    ``forward(images)`` returns ``{"out": (B, K, H, W)}`` logits at the input resolution, plus
    ``"aux"`` (at the auxiliary map's resolution) when there is an auxiliary head.
    """

    def __init__(
        self,
        backbone: SwinBackbone,
        decode_head: nn.Module,
        auxiliary_head: nn.Module | None = None,
        neck: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head

    @property
    def num_classes(self) -> int:
        return self.decode_head.conv_seg.out_channels

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(images)
        if self.neck is not None:
            features = self.neck(features)
        outputs = {"out": resize(self.decode_head(features), images.shape[-2:])}
        if self.auxiliary_head is not None:
            outputs["aux"] = self.auxiliary_head(features)
        return outputs


def build_segmentor(
    backbone: SwinBackbone, num_classes: int, channels: int = 512, aux_channels: int = 256, aux: bool = True
) -> Segmentor:
    """UPerNet on all four maps of ``backbone`` and (``aux``) an FCN head on stage 3."""
    if not isinstance(backbone, SwinBackbone):
        raise TypeError(
            f"build_segmentor needs a SwinBackbone (swinkit.dense.create_backbone), got {type(backbone).__name__}"
        )
    sizes = {"num_classes": num_classes, "channels": channels, **({"aux_channels": aux_channels} if aux else {})}
    for name, value in sizes.items():
        if not _positive_int(value):
            raise ValueError(f"{name} must be an int of 1 or more, got {value!r}")
    num_classes, channels, aux_channels = int(num_classes), int(channels), int(aux_channels)  # numpy's: Python's
    if tuple(backbone.out_indices) != (0, 1, 2, 3):
        raise ValueError(f"UPerNet takes the four stage maps; the backbone gives stages {backbone.out_indices}")
    decode_head = UPerHead(backbone.out_channels, num_classes, channels)
    auxiliary_head = FCNHead(backbone.out_channels[AUX_STAGE], num_classes, AUX_STAGE, aux_channels) if aux else None
    return Segmentor(backbone, decode_head, auxiliary_head)


def create_segmentor(
    name: str = "swin_t",
    num_classes: int = 150,
    checkpoint: str | os.PathLike | None = None,
    *,
    frozen_stages: int = -1,
    channels: int = 512,
    aux_channels: int = 256,
    aux: bool = True,
    always_shift: bool = True,
    **overrides: Any,
) -> Segmentor:
    """Swin + UPerNet for ``num_classes`` classes; ``checkpoint`` initialises the backbone (any format).

    ``overrides`` change the backbone's :class:`~swinkit.variants.SwinConfig` (``drop_path_rate``, ...).
    """
    backbone = create_backbone(name, checkpoint, frozen_stages=frozen_stages, always_shift=always_shift, **overrides)
    return build_segmentor(backbone, num_classes, channels, aux_channels, aux)


def segmentation_loss(
    outputs: dict[str, Tensor], masks: Tensor, ignore_index: int = 255, aux_weight: float = 0.4
) -> Tensor:
    """Cross-entropy over labelled pixels of the main logits, plus ``aux_weight`` times the auxiliary one.

    Logits are resized (bilinear) to the masks' size first. A batch without a labelled pixel gives a
    zero loss (not NaN), so a crop of ignored pixels cannot poison a run.
    """
    return sum(segmentation_losses(outputs, masks, ignore_index, aux_weight).values())


def segmentation_losses(
    outputs: dict[str, Tensor], masks: Tensor, ignore_index: int = 255, aux_weight: float = 0.4
) -> dict[str, Tensor]:
    """The terms of :func:`segmentation_loss`: ``loss_decode`` (UPerNet's) and, with an auxiliary
    head and weight, ``loss_aux`` (weighted), as mmseg logs them."""
    if not isinstance(outputs, dict) or "out" not in outputs:
        raise TypeError("outputs must be a segmentation model's output, a dict with 'out' logits (B, K, H, W)")
    if not math.isfinite(aux_weight) or aux_weight < 0:
        raise ValueError(f"aux_weight must be 0 or more, got {aux_weight!r}")
    ignore_index = check_ignore_index(ignore_index, outputs["out"].shape[1])
    masks = _checked_masks(masks, outputs["out"], ignore_index)
    losses = {"loss_decode": pixel_cross_entropy(outputs["out"], masks, ignore_index)}
    if "aux" in outputs and aux_weight > 0:
        losses["loss_aux"] = aux_weight * pixel_cross_entropy(outputs["aux"], masks, ignore_index)
    return losses


def _checked_masks(masks: Tensor, logits: Tensor, ignore_index: int) -> Tensor:
    """``masks`` as int64 ``(B, H, W)`` labels, once they are labels of ``logits``' classes."""
    if not isinstance(masks, Tensor) or masks.is_floating_point() or masks.dtype == torch.bool or masks.dim() != 3:
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"masks must be integer label maps (B, H, W), got {got}")
    if len(masks) != len(logits):
        raise ValueError(f"{len(masks)} masks for a batch of {len(logits)} images")
    masks = masks.long()
    num_classes = logits.shape[1]
    outside = (masks != ignore_index) & ((masks < 0) | (masks >= num_classes))
    if outside.any():
        raise ValueError(
            f"masks hold label {masks[outside][0].item()}, neither a class (0..{num_classes - 1}) "
            f"nor ignore_index {ignore_index}"
        )
    return masks


def pixel_cross_entropy(logits: Tensor, masks: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy over the labelled pixels, the logits resized to the masks first; 0 when no
    pixel is labelled."""
    logits = resize(logits.float(), masks.shape[-2:])
    total = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum")
    return total / (masks != ignore_index).sum().clamp(min=1)


@torch.no_grad()
def infer(model: nn.Module, images: Tensor, mode: str = "whole", crop_size: int = 512, stride: int = 341) -> Tensor:
    """Logits ``(B, K, H, W)`` for ``images``: one pass (``whole``) or overlapping crops (``slide``).

    Sliding windows of ``crop_size`` every ``stride`` pixels, the last one flush with the border,
    average the logits where they overlap (``mmseg``'s slide inference); an image no larger than the
    crop is one window.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}")
    if mode == "whole":
        return _logits(model, images)
    if not (is_whole(crop_size) and is_whole(stride)):
        raise ValueError(f"crop_size and stride must be ints, got {crop_size!r} and {stride!r}")
    crop_size, stride = int(crop_size), int(stride)
    if not 0 < stride <= crop_size:
        raise ValueError(f"slide stride must be between 1 and the crop size {crop_size}, got {stride}")
    H, W = images.shape[-2:]
    logits: Tensor | None = None
    counts = images.new_zeros(1, 1, H, W)
    for top in _starts(H, crop_size, stride):
        for left in _starts(W, crop_size, stride):
            window = (slice(None), slice(None), slice(top, top + crop_size), slice(left, left + crop_size))
            out = _logits(model, images[window]).float()
            if logits is None:
                logits = images.new_zeros(images.shape[0], out.shape[1], H, W, dtype=torch.float32)
            logits[window] += out
            counts[window] += 1
    return logits / counts


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    outputs = model(images)
    if not isinstance(outputs, dict) or "out" not in outputs:
        raise TypeError(
            f"infer needs a segmentation model (swinkit.dense Segmentor, whose output is a dict with 'out'), "
            f"got {type(model).__name__}"
        )
    return outputs["out"]


def _starts(length: int, crop: int, stride: int) -> list[int]:
    steps = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, length - crop), 0) for i in range(steps)]


@torch.no_grad()
def infer_augmented(
    model: nn.Module,
    views: Sequence[Tensor],
    size: Sequence[int],
    flip: bool = False,
    mode: str = "whole",
    crop_size: int = 512,
    stride: int = 341,
) -> Tensor:
    """Class probabilities ``(B, K, *size)`` averaged over ``views`` (the images at several scales)
    and, with ``flip``, over their mirror images too (``mmseg``'s ``aug_test``).

    Each view's logits (:func:`infer` with ``mode``) are resized to ``size``, turned into
    probabilities, and mirrored back where the view was mirrored, in that order, as mmseg does.
    """
    _check_views(views, size)
    total: Tensor | None = None
    for view in views:
        for mirrored in (False, True) if flip else (False,):
            logits = infer(model, view.flip(-1) if mirrored else view, mode, crop_size, stride)
            probabilities = resize(logits.float(), tuple(size)).softmax(dim=1)
            probabilities = probabilities.flip(-1) if mirrored else probabilities
            total = probabilities if total is None else total + probabilities
    assert total is not None
    return total / (len(views) * (2 if flip else 1))


def _check_views(views: Sequence[Tensor], size: Sequence[int]) -> None:
    """Views of one batch: a list of ``(B, C, h, w)`` tensors of one ``B`` (tensors of other batch
    sizes would broadcast into a wrong average), and an output ``size`` of two positive ints."""
    if not isinstance(views, (list, tuple)):
        raise TypeError(f"views must be a list of (B, C, H, W) tensors, one per scale; got {type(views).__name__}")
    if not views:
        raise ValueError("infer_augmented needs at least one view of the images")
    if not all(isinstance(view, Tensor) and view.dim() == 4 for view in views):
        raise ValueError("views must be (B, C, H, W) tensors, one per scale")
    batches = {len(view) for view in views}
    if len(batches) > 1:
        raise ValueError(f"views must be of the same images; they have batch sizes {sorted(batches)}")
    size = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else size
    if not isinstance(size, tuple) or len(size) != 2 or not all(_positive_int(side) for side in size):
        raise ValueError(f"size must be (height, width), two ints of 1 or more; got {size!r}")


def _positive_int(value: Any) -> bool:
    return is_whole(value) and value >= 1


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are; the CPU for a model without any (an exported file's)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def check_test_ratios(ratios: Sequence[float] | None) -> None:
    """Ratios of the test scale: None (one scale) or finite numbers above 0, at least one."""
    if ratios is None:
        return
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (Sequence, np.ndarray)):
        raise TypeError(f"test ratios must be a list of numbers, got {ratios!r}")
    if len(ratios) == 0 or not all(is_real(r) and math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"test ratios must be one or more numbers above 0, got {list(ratios)}")


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    ignore_index: int = 255,
    mode: str = "whole",
    crop_size: int = 512,
    stride: int = 341,
    distributed: Any = None,
    flip: bool = False,
) -> tuple[Tensor, list[str]]:
    """The confusion matrix of ``model`` over ``loader`` (batches of one image and its full-size label map).

    Logits are resized to the label map's size and turned into probabilities before the argmax (as
    mmseg does; float32 probabilities can tie where logits differ by less than about 1e-7), so
    scores are at the original resolution whatever the test scale. A batch whose ``images`` is a
    list holds views of one image at several scales (``SegmentationEvalTransform`` with
    ``ratios``): their probabilities are averaged, with mirrored views too if ``flip``
    (:func:`infer_augmented`). Returns the ``(K, K)`` counts (summed over processes) and the paths
    of bad items.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    bad: list[str] = []
    for batch in loader:
        bad += batch["bad"]
        if batch["images"] is None:
            continue
        masks = batch["labels"]
        images = batch["images"]
        views = [view.to(device) for view in (images if isinstance(images, list) else [images])]
        probabilities = infer_augmented(model, views, masks.shape[-2:], flip, mode, crop_size, stride)
        prediction = probabilities.argmax(dim=1).cpu()
        confusion += confusion_matrix(prediction, masks, num_classes, ignore_index)
    if distributed is not None and distributed.enabled:
        confusion = distributed.sum_tensor(confusion)
    model.train(was_training)
    return confusion, bad
