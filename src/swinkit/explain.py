"""Visual explanations of a Swin classifier: Grad-CAM on a stage's map and attention rollout.

- ``gradcam`` (Selvaraju et al., 2017): the channels of a stage's output map weighted by the
  spatial mean of the target class's logit gradient, summed, ReLU. Class-specific; at the stage's
  stride (32 for the last stage, the usual choice).
- ``rollout`` (Abnar & Zuidema, 2020), carried through Swin's windows: each block's attention,
  averaged over heads, with the residual as ``0.5 A + 0.5 I``, from the mean-pooled output back
  through every block and patch merging to a stage's tokens (stride 4 at stage 0). Windows shift
  between blocks, so relevance crosses window borders block by block. Class-agnostic: it says
  which tokens the pooled representation draws on, not why a class won. MLPs are not followed.

- ``explain_segmentation``: Seg-Grad-CAM (Vinogradova et al., 2020) of a semantic segmentation
  model (:mod:`swinkit.dense`): Grad-CAM of the class's logits summed over the pixels predicted
  as that class, on a stage of the Swin backbone. ``explain_detection``: Grad-CAM of a detector's
  top detection score.

:func:`explain` returns the maps at the input's size, scaled to ``[0, 1]``; :func:`overlay`
colours one over the image; :func:`explain_files` is ``swinkit explain`` (and
:func:`swinkit.dense.predict.explain_segments` / ``explain_detections`` are ``swinkit segment
explain`` / ``swinkit detect explain``).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import Tensor, nn

from .attention import combine_bias_and_mask, reference_attention
from .checkpoint.io import check_folder, make_folder, writable_file
from .data import eval_crop, eval_transform
from .model import SwinTransformer, cells, check_images, window_and_shift, window_gather_indices

METHODS = ("gradcam", "rollout")
# Grad-CAM's default stage: the deepest whose map is at least this many tokens on each side (the
# last for Swin-T at 224, 7 x 7); below it the map says little (a 1 x 1 map says nothing).
GRADCAM_MIN_SIDE = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Explanation:
    """What :func:`explain` found for a batch.

    Attributes:
        maps: ``(B, H, W)``, the input's size, each scaled to ``[0, 1]`` (all zero where the raw
            map is flat).
        raw: ``(B, h, w)``, the unscaled map at the stage's resolution. A rollout's sums to 1.
        targets: the class explained for each image.
        probabilities: ``(B, num_classes)`` softmax of the logits; for a segmentation, the
            fraction of the pixels predicted as each class.
        method, stage, stride: what was computed, where; ``stride`` is the stage's in pixels.
        boxes: for a detection, ``(B, 4)`` the box explained (``x1, y1, x2, y2`` in the image's
            pixels); ``probabilities`` then holds its score, ``targets`` its class label.
    """

    maps: Tensor
    raw: Tensor
    targets: list[int]
    probabilities: Tensor
    method: str
    stage: int
    stride: int
    boxes: Tensor | None = None


def check_method(method: str) -> None:
    """Refuse, by name, an explanation method that is not one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; accepted: {', '.join(METHODS)}")


def explain(
    model: nn.Module,
    images: Tensor,
    method: str = "gradcam",
    target: int | Sequence[int] | None = None,
    stage: int | None = None,
) -> Explanation:
    """Explain ``model``'s classification of ``images`` ``(B, C, H, W)`` (normalized, any size).

    ``target``: the class to explain, one for all images or one per image (default: each image's
    top class; ``rollout`` does not depend on it). ``stage``: the stage whose map is returned
    (negative counts from the end). By default Grad-CAM uses the deepest stage whose map is at least
    :data:`GRADCAM_MIN_SIDE` tokens on each side (the last stage for Swin-T at 224), and rollout
    goes down to stage 0. The model runs in eval mode
    and is left in the mode it had.
    """
    check_method(method)
    _check_swin(model, "explain", "a classifier")
    config = model.config
    check_images(images, config.in_chans, next(model.parameters()).dtype)  # before gradients are asked of them
    if config.features_only or config.num_classes <= 0:
        raise ValueError("explanations need a classifier; this model has no head (features_only or num_classes 0)")
    stage = _chosen_stage(method, images, config.patch_size, len(model.layers), stage)
    if method == "gradcam":
        with _explaining(model, reference_attention=False):
            logits, raw, targets = _gradcam(model.layers[stage], functools.partial(_class_score, model, target), images)
    else:
        logits, raw = _rollout(model, images, stage)
        targets = _targets(target, logits)
    stride = config.patch_size * 2**stage
    return Explanation(
        maps=_to_image(raw, stride, images.shape[-2:]),
        raw=raw,
        targets=targets.tolist(),
        probabilities=logits.float().softmax(dim=-1),
        method=method,
        stage=stage,
        stride=stride,
    )


def _check_swin(model: Any, function: str, kind: str) -> None:
    """Refuse, naming what ``function`` takes, a model that is not a swinkit Swin (a dense model's
    explanations have their own functions)."""
    if not isinstance(model, SwinTransformer):
        raise TypeError(
            f"{function} needs {kind} (swinkit SwinTransformer, swinkit.create_model), got {type(model).__name__}; "
            "explain_segmentation explains a segmentation model, explain_detection a detector"
        )


def _chosen_stage(method: str, images: Tensor, patch_size: int, stages: int, stage: int | None) -> int:
    """``stage`` checked and made non-negative, or the method's default for ``images``' size."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    stage = _default_stage(method, images.shape[-2:], patch_size, stages) if stage is None else stage
    if not -stages <= stage < stages:
        raise ValueError(f"stage must be in {-stages}..{stages - 1} for this model, got {stage}")
    return stage % stages


def _default_stage(method: str, size: Sequence[int], patch_size: int, stages: int) -> int:
    if method == "rollout":
        return 0
    side = -(-min(size) // patch_size)  # the model pads: ceil at every stage
    deepest = 0
    for stage in range(1, stages):
        side = -(-side // 2)
        if side >= GRADCAM_MIN_SIDE:
            deepest = stage
    return deepest


@contextlib.contextmanager
def _explaining(model: nn.Module, reference_attention: bool) -> Iterator[None]:
    """Eval mode (and the reference attention path, whose seam rollout reads), restored after."""
    training = model.training
    impls = {module: module.attn_impl for module in model.modules() if hasattr(module, "attn_impl")}
    model.eval()
    if reference_attention:
        model.set_attn_impl("reference")
    try:
        yield
    finally:
        model.train(training)
        for module, impl in impls.items():
            module.attn_impl = impl


def _targets(target: int | Sequence[int] | None, logits: Tensor) -> Tensor:
    """One class index per image: ``target`` broadcast and checked, or the top class."""
    if target is None:
        return logits.argmax(dim=-1)
    return _given_targets(target, *logits.shape[:2], logits.device)


def _given_targets(target: int | Sequence[int], batch: int, classes: int, device: torch.device) -> Tensor:
    """``target`` as one class index per image, checked: an int (a 0-d tensor and a numpy integer
    count as one) or a sequence of them."""
    refused = ValueError(f"target must be one class in 0..{classes - 1} or one per image ({batch}), got {target!r}")
    try:
        chosen = [operator.index(target)] * batch
    except TypeError:
        try:
            chosen = [operator.index(t) for t in target]
        except TypeError:  # not an integer, nor a sequence of them (a float, a string of names, ...)
            raise refused from None
    if len(chosen) != batch or any(not 0 <= t < classes for t in chosen):
        raise refused
    return torch.tensor(chosen, device=device)


def _gradcam(
    layer: nn.Module, score: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], images: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Grad-CAM of ``layer``'s (a stage's) output map for ``score(images)`` -> ``(outputs to return,
    the score summed over the batch, the classes explained)``; returns the outputs, the ``(B, h, w)``
    map and the classes."""
    captured: list[Tensor] = []
    # The stage's output before patch merging, channels-last ``(B, h, w, C)``: BasicLayer's first output.
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output[0]))
    try:
        with torch.enable_grad():
            # Inputs that require grad: the map then does even where the parameters are frozen.
            outputs, total, targets = score(images.detach().requires_grad_(True))
            (gradient,) = torch.autograd.grad(total, captured[0])
    finally:
        handle.remove()
    weights = gradient.mean(dim=(1, 2), keepdim=True)  # alpha_k^c of the paper: one per channel
    cam = F.relu((weights * captured[0]).sum(dim=-1))
    return outputs, cam.detach(), targets


def _class_score(model: nn.Module, target: Any, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The logits, the explained classes' logits summed (images do not interact in eval, so one
    backward gives each image its own gradient) and the classes."""
    logits = model(images)
    targets = _targets(target, logits)
    return logits.detach(), logits.gather(1, targets[:, None]).sum(), targets


def explain_segmentation(
    model: nn.Module, images: Tensor, target: int | Sequence[int] | None = None, stage: int | None = None
) -> Explanation:
    """Seg-Grad-CAM of a semantic segmentation ``model`` (:class:`~swinkit.dense.Segmentor`) on
    ``images`` ``(B, C, H, W)`` (normalized, one whole pass, any size).

    The score is the ``target`` class's logits summed over the pixels the model assigns to it (all
    pixels if it assigns it none); Grad-CAM is taken on a stage of the Swin backbone. ``target``:
    one class for all images or one per image (default: each image's most frequent predicted
    class). ``stage``: as for :func:`explain` (default: the deepest with a map of at least
    :data:`GRADCAM_MIN_SIDE` tokens a side). ``probabilities`` holds each class's fraction of pixels.
    """
    swin = getattr(getattr(model, "backbone", None), "swin", None)
    if swin is None or not hasattr(model, "decode_head"):
        raise TypeError(
            "explain_segmentation needs a segmentation model (swinkit.dense Segmentor, "
            f"create_segmentor), got {type(model).__name__}"
        )
    check_images(images, swin.config.in_chans, next(model.parameters()).dtype)  # before gradients are asked of them
    classes = model.num_classes
    if target is not None:  # before the model runs
        target = _given_targets(target, len(images), classes, images.device)
    stage = _chosen_stage("gradcam", images, swin.config.patch_size, len(swin.layers), stage)
    with _explaining(model, reference_attention=False):
        labels, raw, targets = _gradcam(swin.layers[stage], functools.partial(_region_score, model, target), images)
    fractions = torch.stack([torch.bincount(row.flatten(), minlength=classes) for row in labels]).float()
    stride = swin.config.patch_size * 2**stage
    return Explanation(
        maps=_to_image(raw, stride, images.shape[-2:]),
        raw=raw,
        targets=targets.tolist(),
        probabilities=fractions / labels[0].numel(),
        method="gradcam",
        stage=stage,
        stride=stride,
    )


class NothingDetected(ValueError):
    """:func:`explain_detection` found no detection (of the class asked for) to explain."""


def explain_detection(
    model: nn.Module,
    image: Tensor,
    label: int | None = None,
    stage: int | None = None,
    box: Sequence[float] | None = None,
) -> Explanation:
    """Grad-CAM of one detection of a detector (:func:`~swinkit.dense.create_detector`) on ``image``
    ``(3, H, W)`` in ``[0, 1]`` (as the detector takes it; it resizes and normalizes itself).

    The score explained is the highest-scoring detection's (of class ``label`` if given, labels
    counting from 1 as the detector's), or with ``box`` ``(x1, y1, x2, y2)`` in image pixels the
    detection overlapping it most (highest IoU; ties to the higher score), through its box head,
    on a stage of the Swin backbone, as seen at the detector's resized scale and drawn back at the
    image's size. ``stage``: as for :func:`explain`, for the resized image. Refused when the image
    has no such detection.
    """
    if box is not None and (len(box) != 4 or not box[0] < box[2] or not box[1] < box[3]):
        raise ValueError(f"box must be x1 y1 x2 y2 with x1 < x2 and y1 < y2, got {list(box)}")
    swin = getattr(getattr(getattr(model, "backbone", None), "body", None), "swin", None)
    if swin is None or not hasattr(model, "roi_heads"):
        raise TypeError(
            f"explain_detection needs a detector (swinkit.dense create_detector), got {type(model).__name__}"
        )
    if not isinstance(image, Tensor) or image.dim() != 3:
        shown = f"shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be one (3, H, W) tensor in [0, 1], got {shown}")
    check_images(image[None], 3, next(model.parameters()).dtype)  # before gradients are asked of it
    if label is not None:  # before the model runs: a class it has not is not "nothing found"
        from .dense.detection import detector_classes

        classes = detector_classes(model)
        if classes is not None:
            _check_label(label, classes)
    with _explaining(model, reference_attention=False):
        with torch.no_grad():  # resized and padded as the detector will (eval: no random size)
            batch, _ = model.transform([image])
        size, padded = batch.image_sizes[0], batch.tensors.shape[-2:]
        stage = _chosen_stage("gradcam", image.new_zeros(1, 1, *size), swin.config.patch_size, len(swin.layers), stage)
        score = functools.partial(_detection_score, model, label, box)
        detection, raw, _ = _gradcam(swin.layers[stage], score, image)
    stride = swin.config.patch_size * 2**stage
    # The map covers the padded batch; its resized image's part, scaled back to the image.
    heat = _to_image(raw, stride, padded)[:, None, : size[0], : size[1]]
    heat = F.interpolate(heat, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    low, high = heat.amin(), heat.amax()
    maps = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    return Explanation(
        maps=maps,
        raw=raw,
        targets=[int(detection["label"])],
        probabilities=detection["score"].reshape(1, 1),
        method="gradcam",
        stage=stage,
        stride=stride,
        boxes=detection["box"].reshape(1, 4),
    )


def _check_label(label: Any, classes: int) -> None:
    """A detector's class label: an int in ``1..classes`` (0 is the background)."""
    try:
        value = operator.index(label)
    except TypeError:
        value = None
    if isinstance(label, bool) or value is None or not 1 <= value <= classes:
        raise ValueError(
            f"label must be a class of the detector, an int in 1..{classes} (0 is the background), got {label!r}"
        )


def _detection_score(
    model: nn.Module, label: int | None, box: Sequence[float] | None, image: Tensor
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The chosen detection (box, label, score, detached), its score, and its label."""
    from torchvision.ops import box_iou

    found = model([image])[0]
    candidates = torch.arange(len(found["scores"]), device=found["scores"].device)
    if label is not None:
        candidates = candidates[found["labels"] == label]
    wanted = "" if label is None else f" of class {label}"
    if len(candidates) == 0:
        raise NothingDetected(f"the detector finds nothing{wanted} in this image (above its score threshold)")
    if box is not None:  # the largest overlap; among equal overlaps the higher score
        given = torch.tensor([list(box)], dtype=found["boxes"].dtype, device=found["boxes"].device)
        overlap = box_iou(given, found["boxes"][candidates].detach())[0]
        if overlap.max() <= 0:
            raise NothingDetected(f"no detection{wanted} overlaps the box {list(box)}")
        candidates = candidates[overlap == overlap.max()]
    best = candidates[found["scores"][candidates].argmax()]
    detection = {"box": found["boxes"][best], "label": found["labels"][best], "score": found["scores"][best]}
    return {key: value.detach() for key, value in detection.items()}, found["scores"][best], found["labels"][best]


def _region_score(model: nn.Module, targets: Tensor | None, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The predicted labels ``(B, H, W)``, the explained classes' logits summed over their pixels,
    and the classes (``targets``, checked, or each image's most frequent; Seg-Grad-CAM's score)."""
    logits = model(images)["out"]  # (B, K, H, W)
    labels = logits.argmax(dim=1)
    if targets is None:
        targets = torch.stack([torch.bincount(row.flatten(), minlength=logits.shape[1]).argmax() for row in labels])
    region = labels == targets[:, None, None]
    region |= ~region.flatten(1).any(dim=1)[:, None, None]  # a class predicted nowhere: the whole image
    class_logits = logits.gather(1, targets[:, None, None, None].expand(-1, 1, *logits.shape[-2:]))[:, 0]
    return labels, (class_logits * region).sum(), targets


@dataclass
class BlockAttention:
    """One block's attention weights, in window order, and where its window tokens sit on the map.

    Attributes:
        size: the block's map, ``(H, W)``.
        to_windows: ``(nW * N,)`` the map index (row-major) of each window token after padding
            and the cyclic shift; ``H * W`` stands for padding.
        weights: ``(B, nW, nH, N, N)`` softmax rows over each window's keys (padding included).
    """

    size: tuple[int, int]
    to_windows: Tensor
    weights: Tensor | None = None

    def dense(self) -> Tensor:
        """``(B, nH, H*W, H*W)``: the weights on the map's own tokens, zero between tokens that do not
        share a window (and the weight on padded keys left out)."""
        batch, count, heads, tokens, _ = self.weights.shape
        cells = self.size[0] * self.size[1]
        index = self.to_windows.view(count, tokens)
        rows = index[:, :, None].expand(count, tokens, tokens).reshape(-1)
        columns = index[:, None, :].expand(count, tokens, tokens).reshape(-1)
        values = self.weights.permute(0, 2, 1, 3, 4).reshape(batch, heads, -1)
        full = values.new_zeros(batch, heads, (cells + 1) * (cells + 1))
        full.index_put_(
            (
                torch.arange(batch, device=values.device)[:, None, None],
                torch.arange(heads, device=values.device)[None, :, None],
                (rows * (cells + 1) + columns)[None, None],
            ),
            values,
            accumulate=True,
        )
        return full.view(batch, heads, cells + 1, cells + 1)[:, :, :cells, :cells]


def record_attention(model: nn.Module, images: Tensor, first_stage: int = 0) -> tuple[Tensor, list[BlockAttention]]:
    """Run ``model`` on ``images`` (no gradients) and keep the attention weights of every block from
    stage ``first_stage`` on, in forward order. The blocks run the reference path for this call."""
    _check_swin(model, "record_attention", "a Swin classifier or encoder")
    if not 0 <= first_stage < len(model.layers):
        raise ValueError(f"first_stage must be in 0..{len(model.layers) - 1} for this model, got {first_stage}")
    records: list[BlockAttention] = []
    handles = []
    for layer in model.layers[first_stage:]:
        for block in layer.blocks:
            handles.append(block.register_forward_pre_hook(_block_recorder(block, records)))
            handles.append(block.attn.register_forward_pre_hook(_attention_recorder(records)))
    try:
        with _explaining(model, reference_attention=True), torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, records


def _block_recorder(block: nn.Module, records: list[BlockAttention]) -> Any:
    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        H, W = args[0].shape[1:3]
        window, shift = window_and_shift(H, W, block.window_size, block.shift_size, block.always_shift)
        counts = (cells(H, window[0]), cells(W, window[1]))
        to_windows, _ = window_gather_indices((H, W), window, shift, counts, args[0].device)
        records.append(BlockAttention((H, W), to_windows))

    return record


def _attention_recorder(records: list[BlockAttention]) -> Any:
    def record(attn: nn.Module, args: tuple[Any, ...]) -> None:
        windows, window, mask = args  # (B * nW, N, C) as WindowAttention.forward takes them
        q, k, _ = attn.qkv_heads(windows)
        bias = combine_bias_and_mask(attn.relative_position_bias(window), mask)
        count, heads, tokens, _ = q.shape
        # The seam's own softmax: attention times the identity is the attention itself.
        identity = torch.eye(tokens, dtype=q.dtype, device=q.device).expand(count, heads, tokens, tokens)
        weights = reference_attention(q, k, identity, bias, 0.0, False)
        nW = records[-1].to_windows.numel() // tokens
        records[-1].weights = weights.view(-1, nW, heads, tokens, tokens)

    return record


def _rollout(model: nn.Module, images: Tensor, stage: int) -> tuple[Tensor, Tensor]:
    """Logits and the ``(B, h, w)`` attention rollout onto stage ``stage``'s first block's input."""
    logits, records = record_attention(model, images, stage)
    # The head averages the last map's tokens: relevance starts uniform there.
    H, W = records[-1].size
    dtype = torch.promote_types(records[-1].weights.dtype, torch.float32)  # bf16 -> float32; float64 stays
    relevance = images.new_full((images.shape[0], H * W), 1.0 / (H * W), dtype=dtype)
    for record in reversed(records):
        if record.size != (H, W):  # patch merging between this block and the one after it
            relevance = _unmerge(relevance.view(-1, H, W), record.size).flatten(1)
            H, W = record.size
        relevance = 0.5 * relevance + 0.5 * _through_attention(relevance, record)
    return logits, relevance.view(-1, H, W)


def _through_attention(relevance: Tensor, record: BlockAttention) -> Tensor:
    """``r A``: relevance of a block's output tokens ``(B, H*W)`` carried to the tokens they attend,
    with ``A`` averaged over heads and its rows renormalized over real tokens (padding carries no
    relevance), so the total is kept."""
    batch, count = relevance.shape
    real = (record.to_windows < count).view(record.weights.shape[1], 1, -1)  # (nW, 1, N) keys
    weights = record.weights.to(relevance.dtype).mean(dim=2) * real  # (B, nW, N, N)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    padded = torch.cat((relevance, relevance.new_zeros(batch, 1)), dim=1)
    by_window = padded[:, record.to_windows].view(weights.shape[:3])  # (B, nW, N) queries
    carried = torch.einsum("bwq,bwqk->bwk", by_window, weights).reshape(batch, -1)
    return padded.new_zeros(batch, count + 1).index_add_(1, record.to_windows, carried)[:, :count]


def _unmerge(relevance: Tensor, size: tuple[int, int]) -> Tensor:
    """Relevance of merged tokens ``(B, h', w')`` shared equally by the (real) 2 x 2 tokens they gather."""
    H, W = size
    spread = relevance.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :H, :W]
    present = relevance.new_ones(1, 1, H, W)
    per_cell = F.pad(present, (0, 2 * relevance.shape[2] - W, 0, 2 * relevance.shape[1] - H))
    per_cell = F.avg_pool2d(per_cell, 2) * 4  # real tokens in each merged cell: 1, 2 or 4
    shares = per_cell[0, 0].repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)[:H, :W]
    return spread / shares


def _to_image(raw: Tensor, stride: int, size: Sequence[int]) -> Tensor:
    """``(B, h, w)`` at ``stride`` -> ``(B, H, W)`` in [0, 1]: each cell covers ``stride`` pixels
    from the top left (the model pads right / bottom), bilinear between cell centres."""
    h, w = raw.shape[-2:]
    maps = F.interpolate(raw[:, None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    maps = maps[:, 0, : size[0], : size[1]]
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)


# A perceptually ordered blue -> cyan -> green -> yellow -> red ramp, linear between the stops.
COLOR_STOPS = torch.tensor(
    [[0.05, 0.05, 0.45], [0.0, 0.45, 0.95], [0.1, 0.8, 0.7], [0.55, 0.9, 0.2], [1.0, 0.8, 0.0], [0.85, 0.1, 0.05]]
)


def colorize(heat: Tensor) -> Tensor:
    """``(H, W)`` values in [0, 1] -> ``(H, W, 3)`` RGB in [0, 1] on the blue-to-red ramp."""
    if heat.isnan().any():  # NaN has no colour (as an index it is INT64_MIN)
        raise ValueError(
            f"the heat map holds NaN ({int(heat.isnan().sum())} of {heat.numel()} values); maps are values in [0, 1]"
        )
    position = heat.clamp(0, 1).float() * (len(COLOR_STOPS) - 1)
    low = position.floor().long().clamp(max=len(COLOR_STOPS) - 2)
    fraction = (position - low)[..., None]
    return COLOR_STOPS[low] * (1 - fraction) + COLOR_STOPS[low + 1] * fraction


def overlay(image: Image.Image, heat: Tensor, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``heat`` ``(H, W)`` in [0, 1] coloured over it, ``alpha`` the colour's weight."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if (image.height, image.width) != tuple(heat.shape):
        raise ValueError(f"heat map {tuple(heat.shape)} does not match the image ({image.height}, {image.width})")
    pixels = T.functional.pil_to_tensor(image.convert("RGB")).permute(1, 2, 0).float() / 255
    blended = (1 - alpha) * pixels + alpha * colorize(heat.cpu())
    return Image.fromarray((blended * 255).round().clamp(0, 255).to(torch.uint8).numpy())


def explain_files(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "gradcam",
    target: str | None = None,
    stage: int | None = None,
    alpha: float = 0.5,
    device: str = "cpu",
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """``swinkit explain``: one overlay PNG per image, the map over the crop the model saw.

    ``out``: a folder (``<stem>.<method>.png`` each), or a ``.png`` / ``.jpg`` file for a single
    image. ``target``: a class name the checkpoint stores or a class index (default: the top
    class). Images go through the model ``batch_size`` at a time (each image's map is its own: the
    classifier has no batch statistics). A result is ``{"path", "class", "index", "probability",
    "method", "stage", "output"}``, or ``{"path", "error"}`` for a file that could not be decoded,
    in the order of the inputs.
    """
    from .predict import expand_inputs, load_classifier

    check_method(method)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if Path(checkpoint).suffix.lower() in (".onnx", ".pt2"):
        raise ValueError(
            f"{checkpoint}: explanations need the model's weights and gradients; give a checkpoint, "
            "not an exported .onnx or .pt2 file"
        )
    paths = expand_inputs(inputs)
    destination_of = overlay_destinations(out, paths, method)
    model, stored = load_classifier(checkpoint, device)
    names = stored or [str(i) for i in range(model.config.num_classes)]
    index = _class_index(target, names)
    transform, view = eval_transform(model.config.preprocessing), eval_crop(model.config.preprocessing)
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        loaded = _load_batch(paths[start : start + batch_size], transform)
        decoded = [item for _, item in loaded if isinstance(item, tuple)]
        found = None
        if decoded:
            images = torch.stack([tensor for _, tensor in decoded]).to(device)
            found = explain(model, images, method, index, stage)
        row = 0
        for path, item in loaded:
            if not isinstance(item, tuple):
                results.append(item)
                continue
            image = item[0]
            assert found is not None
            destination = destination_of(path)
            overlay(view(image), found.maps[row], alpha).save(destination)
            chosen = found.targets[row]
            probability = found.probabilities[row, chosen].item()
            results.append(
                {"path": str(path), "class": names[chosen], "index": chosen, "probability": probability,
                 "method": method, "stage": found.stage, "output": str(destination)}
            )  # fmt: skip
            row += 1
    return results


def _load_batch(
    paths: Sequence[Path], transform: Callable[[Image.Image], Tensor]
) -> list[tuple[Path, tuple[Image.Image, Tensor] | dict[str, Any]]]:
    """Each path with its decoded image and the model's input, or with the ``{"path", "error"}`` result
    reporting it (an image that cannot be decoded, or that the transform refuses: too elongated)."""
    from .predict import load_or_report

    loaded: list[tuple[Path, tuple[Image.Image, Tensor] | dict[str, Any]]] = []
    for path in paths:
        reported: list[dict[str, Any]] = []
        pair = load_or_report(path, reported, transform)
        loaded.append((path, pair if pair is not None else reported[0]))
    return loaded


def _class_index(target: str | None, names: list[str]) -> int | None:
    """A class given by name (as the checkpoint stores it) or by index; None stays None (top class)."""
    if target is None:
        return None
    if target in names:
        return names.index(target)
    if target.isdigit() and int(target) < len(names):
        return int(target)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    raise ValueError(
        f"class {target!r} is neither a class name of the checkpoint ({shown}) nor an index 0..{len(names) - 1}"
    )


def overlay_destinations(out: str | os.PathLike, paths: Sequence[Path], method: str) -> Callable[[Path], Path]:
    """Where each image's overlay goes: ``out`` itself where it names a ``.png`` / ``.jpg`` file
    (one image only), else ``out/<stem>.<method>.png``, a name no other image of the run took. A
    file or folder in the way is refused here, before the work, not after it; the folder itself is
    made at the first overlay written (a run refused before, say for its checkpoint, leaves none)."""
    single_file = Path(out).suffix.lower() in IMAGE_SUFFIXES
    if single_file and len(paths) != 1:
        raise ValueError(f"--out {out} names one image file, but {len(paths)} images were given; give a folder")
    if single_file:
        file = Path(out)
        if file.is_dir():
            raise ValueError(f"{file} is a folder: give the name of the file to write")
        check_folder(file.parent)
        return lambda path: writable_file(file)
    folder = check_folder(out)
    used: set[Path] = set()
    return lambda path: _free_name(make_folder(folder), path.stem, method, used)


def _free_name(folder: Path, stem: str, method: str, used: set[Path]) -> Path:
    """``folder/<stem>.<method>.png``, numbered when two inputs share a stem."""
    candidate, number = folder / f"{stem}.{method}.png", 1
    while candidate in used:
        number += 1
        candidate = folder / f"{stem}-{number}.{method}.png"
    used.add(candidate)
    return candidate


def format_results(results: list[dict[str, Any]]) -> str:
    """One line per image: ``path: class (probability) -> output`` or ``path: ERROR ...``."""
    from .predict import format_lines

    return format_lines(results, lambda r: f"{r['class']} ({r['probability']:.3f}) -> {r['output']}")
