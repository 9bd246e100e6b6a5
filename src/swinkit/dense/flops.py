"""Whole-model FLOPs of the detectors and segmentors, counted as Swin's dense results are published.

The published figures (Mask R-CNN Swin-T 267G, Cascade Mask R-CNN Swin-T / S / B 745G / 838G /
982G at 1280 x 800; UPerNet Swin-T / S / B 945G / 1038G / 1188G at 512 x 2048) come from
OpenMMLab's counter, which adds up what module hooks see when mmdet's ``forward_dummy`` or mmseg's
``encode_decode`` runs. Its terms, which this module sums from the model's description:

- convolutions and linear layers: multiply-adds, plus one per output element for a convolution's
  bias (a linear layer's bias is not counted); transposed convolutions likewise;
- LayerNorm (the backbone's): two per element; ReLU modules: one per element; adaptive pooling:
  one per input element;
- the attention's two products, ``q k^T`` and ``attn v``, over the padded windows;
- for a V2 backbone, the position-bias MLP's linear layers and ReLU on each block's coordinate
  table, once per block and forward. Its q, k, v projection is counted too, though the counter
  would miss it (the official V2 block calls ``F.linear`` with the q and v biases, not the module).
  No dense V2 figure is published to check these against.

Not counted, as there: GELU, softmax, additions, upsampling, RoIAlign, the max pooling that makes
P6, and the heads' normalisation (SyncBatchNorm in Swin's configs, which the counter does not
know). Box heads see 1000 proposals and mask heads the first 100 of them (``forward_dummy``'s
random proposals); a segmentor counts its decode head only (the auxiliary head is for training).
These terms reproduce all eight published figures (tests/test_dense_flops.py); swinkit's own
classification count (:mod:`swinkit.flops`) follows the classification paper instead (norms one
per element, no biases), which is why a backbone's share differs from ``swinkit info``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..flops import count_flops
from ..variants import SwinConfig

if TYPE_CHECKING:
    from .weights import DenseSpec

# The sizes the papers quote dense FLOPs at (H, W): detection at 1280 x 800, segmentation at 512 x 2048.
DENSE_SIZES = {"detect": (800, 1280), "segment": (512, 2048)}
PROPOSALS = 1000  # mmdet's forward_dummy: random proposals through every box head
MASK_PROPOSALS = 100  # and the first 100 of them through every mask head
ANCHORS_PER_LOCATION = 3  # aspect ratios 0.5, 1, 2 at one size per level
ROI_SIZE, MASK_ROI_SIZE = 7, 14
MASK_HEAD_CONVS = CASCADE_BOX_CONVS = 4
POOL_SCALES = (1, 2, 3, 6)  # UPerNet's pyramid pooling


@dataclass
class DenseFlopsReport:
    """Multiply-adds per part of a dense model for one image of ``input_size`` ``(H, W)``."""

    input_size: tuple[int, int]
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        H, W = self.input_size
        lines = [f"FLOPs of the whole model at {H}x{W}: {self.total / 1e9:.2f} G (counted as the dense papers)"]
        lines += [f"  {name:<14} {count / 1e9:9.2f} G" for name, count in self.parts.items()]
        return "\n".join(lines)


def _conv(in_channels: int, out_channels: int, kernel: int, H: int, W: int, bias: bool = True) -> int:
    return H * W * (kernel * kernel * in_channels * out_channels + (out_channels if bias else 0))


def _conv_relu(in_channels: int, out_channels: int, kernel: int, H: int, W: int, bias: bool = True) -> int:
    return _conv(in_channels, out_channels, kernel, H, W, bias) + out_channels * H * W


def backbone_flops(config: SwinConfig, H: int, W: int) -> tuple[int, list[tuple[int, int, int]]]:
    """The backbone's count at an ``H`` x ``W`` image and its stage maps ``(C, H, W)``: the
    classification count's terms with OpenMMLab's norms (two per element), patch-embedding bias and,
    for V2, the position-bias MLP each block runs (linear layers and a ReLU module, so it sees them)."""
    report = count_flops(config, (config.in_chans, H, W), norm_cost=2, conv_bias=True, position_mlp=True)
    return report.patch_embed + sum(report.stages), report.stage_shapes


def _detector_parts(head: dict, classes: int, shapes: list[tuple[int, int, int]]) -> dict[str, int]:
    F = head.get("fpn_channels", 256)
    box_dim, mask_dim = head.get("box_head_dim", 1024), head.get("mask_head_dim", 256)
    neck = sum(_conv(C, F, 1, H, W) + _conv(F, F, 3, H, W) for C, H, W in shapes)
    levels = [(H, W) for _, H, W in shapes] + [(math.ceil(shapes[-1][1] / 2), math.ceil(shapes[-1][2] / 2))]
    A = ANCHORS_PER_LOCATION
    rpn = sum(_conv(F, F, 3, H, W) + _conv(F, A, 1, H, W) + _conv(F, 4 * A, 1, H, W) for H, W in levels)
    cascade = head.get("cascade", False)
    stages = 3 if cascade else 1
    agnostic = cascade and head.get("agnostic_boxes", False)
    flat = F * ROI_SIZE**2
    if cascade:  # four convolutions (normalised: no bias) and one layer
        box = CASCADE_BOX_CONVS * _conv_relu(F, F, 3, ROI_SIZE, ROI_SIZE, bias=False) + flat * box_dim + box_dim
    else:  # two layers
        box = flat * box_dim + box_dim + box_dim * box_dim + box_dim
    box += box_dim * (classes + 1) + box_dim * (4 if agnostic else 4 * classes)
    parts = {"neck (FPN)": neck, "RPN": rpn, "box heads": stages * PROPOSALS * box}
    if head.get("masks", True):
        side, up = MASK_ROI_SIZE, 2 * MASK_ROI_SIZE
        later = _conv_relu(mask_dim, mask_dim, 3, side, side)
        convs = _conv_relu(F, mask_dim, 3, side, side) + (MASK_HEAD_CONVS - 1) * later
        upsample = side * side * 4 * mask_dim * mask_dim + 2 * mask_dim * up * up  # transposed conv, bias, ReLU
        mask = convs + upsample + _conv(mask_dim, classes, 1, up, up)
        parts["mask heads"] = stages * MASK_PROPOSALS * mask
    return parts


def _upernet_flops(head: dict, classes: int, shapes: list[tuple[int, int, int]]) -> int:
    channels = head.get("channels", 512)
    last, H, W = shapes[-1]
    count = sum(last * H * W + _conv_relu(last, channels, 1, s, s, bias=False) for s in POOL_SCALES)
    count += _conv_relu(last + len(POOL_SCALES) * channels, channels, 3, H, W, bias=False)
    for C, h, w in shapes[:-1]:  # lateral and output convolutions of the finer levels
        count += _conv_relu(C, channels, 1, h, w, bias=False) + _conv_relu(channels, channels, 3, h, w, bias=False)
    _, h, w = shapes[0]
    count += _conv_relu(len(shapes) * channels, channels, 3, h, w, bias=False)
    return count + _conv(channels, classes, 1, h, w)


def dense_flops(spec: DenseSpec, input_size: tuple[int, int] | None = None) -> DenseFlopsReport:
    """The count of the dense model ``spec`` (a :class:`~swinkit.dense.weights.DenseSpec`) describes,
    on one image of ``input_size`` ``(H, W)`` (default: the papers' size for its task)."""
    from .weights import head_options

    H, W = input_size or DENSE_SIZES[spec.task]
    backbone, shapes = backbone_flops(spec.backbone, H, W)
    classes, head = len(spec.classes), head_options(spec)
    report = DenseFlopsReport((H, W), {"backbone": backbone})
    if spec.task == "segment":
        report.parts["decode head"] = _upernet_flops(head, classes, shapes)
    else:
        report.parts.update(_detector_parts(head, classes, shapes))
    return report
