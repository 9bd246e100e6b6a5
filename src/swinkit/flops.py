"""Analytic FLOPs the way the Swin papers count them: multiply-adds of linear layers, the two
attention matmuls and the LayerNorms (one per element); softmax, GELU, adds and the V2 position-bias
MLP are not counted (the dense count, :mod:`swinkit.dense.flops`, counts the MLP as its counter
does). At the construction size the totals equal the papers' tables.

Counts follow the actual input size: padding to the patch size, the window clamp or shift rule,
padding to a multiple of the window (padded tokens are computed, so they are counted) and odd maps
padded before merging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .model import drop_path_rates, stage_window, window_and_shift
from .model_v2 import CPB_HIDDEN
from .variants import SwinConfig


@dataclass
class FlopsReport:
    """Multiply-adds per part of the network for one image of ``input_size`` ``(C, H, W)``."""

    input_size: tuple[int, int, int]
    patch_embed: int
    stages: list[int]
    head: int
    stage_shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (C, H, W) of each stage

    @property
    def total(self) -> int:
        return self.patch_embed + sum(self.stages) + self.head

    def __str__(self) -> str:
        lines = [f"FLOPs for input {self.input_size}: {self.total / 1e9:.2f} G"]
        lines.append(f"  patch embed     {self.patch_embed / 1e9:8.3f} G")
        for i, (count, shape) in enumerate(zip(self.stages, self.stage_shapes, strict=True)):
            lines.append(f"  stage {i} {shape!s:<16} {count / 1e9:8.3f} G")
        lines.append(f"  norm + head     {self.head / 1e9:8.3f} G")
        return "\n".join(lines)


def _block_flops(dim: int, H: int, W: int, window: tuple[int, int], mlp_ratio: float, norm_cost: int) -> int:
    Hp, Wp = math.ceil(H / window[0]) * window[0], math.ceil(W / window[1]) * window[1]
    N = window[0] * window[1]
    windows = (Hp * Wp) // N
    attention = N * dim * 3 * dim + 2 * N * N * dim + N * dim * dim  # qkv, q @ k^T and attn @ v, proj
    return 2 * norm_cost * dim * H * W + windows * attention + int(2 * H * W * dim * dim * mlp_ratio)


def _position_mlp_flops(window: tuple[int, int], heads: int) -> int:
    """V2's position-bias MLP (2 -> 512 -> ReLU -> heads) on a window's log-spaced coordinate table,
    as OpenMMLab's counter sees it: the two linear layers' multiply-adds and one per ReLU output."""
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    return entries * (2 * CPB_HIDDEN + CPB_HIDDEN + CPB_HIDDEN * heads)


def _merge_flops(dim: int, H: int, W: int, family: str, norm_cost: int) -> int:
    tokens = math.ceil(H / 2) * math.ceil(W / 2)
    norm = tokens * (4 * dim if family == "v1" else 2 * dim)  # V2 normalises after the reduction
    return norm_cost * norm + tokens * 4 * dim * 2 * dim


def count_flops(
    config: SwinConfig,
    input_size: tuple[int, int, int] = (3, 224, 224),
    skip_dropped: bool = False,
    *,
    norm_cost: int = 1,
    conv_bias: bool = False,
    position_mlp: bool = False,
) -> FlopsReport:
    """FLOPs of ``config`` on one image of ``input_size`` ``(C, H, W)``.

    ``skip_dropped``: the expected work of a training forward that skips the images stochastic
    depth drops (swinkit's fused CPU path): each block counted times its keep rate ``1 - p``.
    ``norm_cost`` (operations per normalised element) and ``conv_bias`` (the patch embedding's
    bias counted) are the paper's 1 and False; OpenMMLab's counter, behind the dense papers'
    figures (:mod:`swinkit.dense.flops`), counts 2 and True, and ``position_mlp``: V2's
    position-bias MLP, which each block runs once per forward (:func:`_position_mlp_flops`).
    """
    _check_input_size(input_size, config.in_chans)
    _, H, W = input_size
    p, C = config.patch_size, config.embed_dim
    H, W = math.ceil(H / p), math.ceil(W / p)
    patch_embed = H * W * C * (config.in_chans * p * p + conv_bias + (norm_cost if config.patch_norm else 0))
    stages, shapes = [], []
    last = len(config.depths) - 1
    for i, (depth, rates) in enumerate(zip(config.depths, drop_path_rates(config), strict=True)):
        dim, table = config.embed_dim * 2**i, stage_window(config, i)
        shapes.append((dim, H, W))
        count = 0
        for j in range(depth):
            window, _ = window_and_shift(H, W, table, 0 if j % 2 == 0 else table // 2, config.always_shift)
            kept = 1 - rates[j] if skip_dropped else 1
            block = _block_flops(dim, H, W, window, config.mlp_ratio, norm_cost)
            if position_mlp and config.family == "v2":
                block += _position_mlp_flops(window, config.num_heads[i])
            count += round(kept * block)
            if config.extra_norm_period and (j + 1) % config.extra_norm_period == 0:
                count += norm_cost * dim * H * W
        if config.stage_norms and i in config.out_indices:
            count += norm_cost * dim * H * W
        if i < last:
            count += _merge_flops(dim, H, W, config.family, norm_cost)
            H, W = math.ceil(H / 2), math.ceil(W / 2)
        stages.append(count)
    head = 0 if config.features_only else config.num_features * H * W + config.num_features * config.num_classes
    return FlopsReport((config.in_chans, *input_size[1:]), patch_embed, stages, head, shapes)


def _check_input_size(input_size: Any, channels: int) -> None:
    """``(C, H, W)`` of one image, the model's channels and positive sides, or an error naming it."""
    fits = isinstance(input_size, (tuple, list)) and len(input_size) == 3
    if not fits or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size):
        raise ValueError(f"input_size must be (C, H, W) of one image, three whole numbers above 0; got {input_size!r}")
    if input_size[0] != channels:
        raise ValueError(f"input_size {tuple(input_size)} has {input_size[0]} channels; the model takes {channels}")


def flops(model: nn.Module | SwinConfig, input_size: tuple[int, int, int] = (3, 224, 224)) -> FlopsReport:
    """FLOPs of a swinkit model (or config) on one image of ``input_size`` ``(C, H, W)``."""
    config = model if isinstance(model, SwinConfig) else getattr(model, "config", None)
    if not isinstance(config, SwinConfig):
        raise TypeError(f"flops takes a swinkit model or SwinConfig, got {type(model).__name__}")
    return count_flops(config, input_size)  # which checks input_size


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
