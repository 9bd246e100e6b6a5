"""Dense heads in plain PyTorch: FPN neck, pyramid pooling, UPerNet and the auxiliary FCN head.

Module and parameter names are ``mmseg``'s (``lateral_convs.{i}.conv``, ``psp_modules``,
``bottleneck``, ``fpn_bottleneck``, ``conv_seg``, ``convs.0.bn``, ...), so the decode and
auxiliary heads of an official Swin UPerNet checkpoint load by name.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises a lone value per channel with its running statistics instead of failing.

    The PPM's 1x1 pooled map of a batch of one image (one image per process, or a batch left with
    one good image) has no batch statistics; plain BatchNorm raises there in training mode.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ConvModule(nn.Sequential):
    """Conv, then BatchNorm (``norm``; the conv then has no bias) and ReLU (``act``), named as ``mmcv``'s."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, norm: bool = True, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        if norm:
            self.bn = BatchNorm2d(out_channels)
        if act:
            self.activate = nn.ReLU(inplace=True)


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize with ``align_corners=False`` (the setting of the official Swin UPerNet configs)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def top_down(laterals: list[Tensor]) -> list[Tensor]:
    """FPN's top-down pathway: from the coarsest level down, add each level's upsampled sum to the next."""
    laterals = list(laterals)
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
    return laterals


class FPNNeck(nn.Module):
    """Feature pyramid network (Lin et al. 2017): every level to ``channels``, fused top-down.

    1x1 lateral convs, the top-down sum, then a 3x3 conv per level; ``norm`` adds BatchNorm + ReLU
    (``False`` is the detection FPN: convs with bias, no activation).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, norm: bool = False) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm, act=norm) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, norm, act=norm) for _ in in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        laterals = top_down([conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)])
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)``; under ``torch.export`` the same bins as two averaging matrices.

    With a symbolic height and width the exported adaptive pooling ran in torch but not in
    onnxruntime (the ONNX conversion gathered bins by indices fixed at the traced size). Output bin
    ``i`` of ``s`` averages rows ``floor(i L / s)`` to ``ceil((i + 1) L / s) - 1``, as PyTorch's;
    written as ``rows @ x @ columns^T`` every size stays symbolic. The sums run in another order,
    so exported outputs differ from eager by float rounding.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_exporting():
            return F.adaptive_avg_pool2d(x, self.size)
        rows, columns = (_bin_means(length, self.size, x) for length in x.shape[-2:])
        return rows @ x @ columns.transpose(0, 1)


def _bin_means(length: Any, bins: int, like: Tensor) -> Tensor:
    """``(bins, length)``: row ``i`` averages the positions of adaptive pooling's bin ``i``."""
    index = torch.arange(bins, device=like.device)
    start = (index * length) // bins
    end = ((index + 1) * length + bins - 1) // bins
    position = torch.arange(length, device=like.device)
    inside = (position >= start[:, None]) & (position < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class PPM(nn.ModuleList):
    """Pyramid pooling module (Zhao et al., PSPNet): average-pool to each scale, 1x1 conv, upsample back."""

    def __init__(self, scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(nn.Sequential(AdaptiveAvgPool(s), ConvModule(in_channels, channels, 1)) for s in scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [resize(branch(x), x.shape[-2:]) for branch in self]


class DecodeHead(nn.Module):
    """What every segmentation head ends with: dropout, then a 1x1 classifier (``conv_seg``)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(DecodeHead):
    """UPerNet (Xiao et al. 2018) as Swin's ADE20K setup uses it: PPM on the last map, FPN fusion of all.

    Input: the backbone's maps, finest first. Output: ``(B, num_classes, H_0, W_0)`` logits at the
    finest map's resolution (stride 4).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        *finer, last = in_channels
        self.psp_modules = PPM(pool_scales, last, channels)
        self.bottleneck = ConvModule(last + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in finer)
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in finer)
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        *finer, last = features
        # The PPM output (with the last map itself) stands in for the coarsest lateral.
        pooled = self.bottleneck(torch.cat([last, *self.psp_modules(last)], dim=1))
        laterals = top_down([conv(x) for conv, x in zip(self.lateral_convs, finer, strict=True)] + [pooled])
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(x, size) for x in outputs], dim=1))
        return self.classify(fused)


class FCNHead(DecodeHead):
    """The auxiliary head: ``num_convs`` 3x3 conv-BN-ReLU on one map (stage 3 in the paper), then classify."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        in_index: int,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(a, b, 3) for a, b in itertools.pairwise(widths)))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.classify(self.convs(features[self.in_index]))
