"""Swin as a backbone for dense heads: four NCHW maps, a LayerNorm per output stage, frozen stages.

This is the official detection / segmentation backbone (``mmdet`` / ``mmseg`` ``SwinTransformer``):
the stage outputs before patch merging, each through its own ``norm{i}``, with the window rule
that always shifts and pads. It wraps whatever ``create_model(..., features_only=True)`` builds
(V1 or V2), so it depends only on that forward contract.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from ..factory import build_model, create_model
from ..variants import SwinConfig


class SwinBackbone(nn.Module):
    """A ``features_only`` Swin model with stages frozen the way ``mmdet`` freezes them.

    Args:
        swin: a model built with ``features_only=True`` (its ``forward`` returns NCHW maps).
        frozen_stages: -1 trains everything; 0 freezes the patch embedding (and absolute position
            embedding); ``k >= 1`` also freezes stages ``0..k-1`` and their output norms. Frozen
            parts get ``requires_grad=False`` here, at construction (so before any DDP wrapping),
            and stay in eval mode whatever :meth:`train` is called with.

    ``out_channels`` and ``strides`` describe the maps :meth:`forward` returns, in order.
    """

    def __init__(self, swin: nn.Module, frozen_stages: int = -1) -> None:
        super().__init__()
        if not isinstance(getattr(swin, "config", None), SwinConfig):
            raise TypeError(
                f"SwinBackbone wraps a swinkit Swin model (create_model(..., features_only=True)), "
                f"got {type(swin).__name__}"
            )
        config: SwinConfig = swin.config
        if not config.features_only:
            raise ValueError("SwinBackbone needs a model built with features_only=True")
        stages = len(config.depths)
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= stages:
            raise ValueError(f"frozen_stages must be an int between -1 and {stages}, got {frozen_stages!r}")
        self.swin = swin
        self.frozen_stages = frozen_stages
        self.out_indices = tuple(config.out_indices)
        self.out_channels = [config.embed_dim * 2**i for i in self.out_indices]
        self.strides = [config.patch_size * 2**i for i in self.out_indices]
        for module in self.frozen_modules():
            module.requires_grad_(False)
        if frozen_stages >= 0 and getattr(swin, "absolute_pos_embed", None) is not None:
            swin.absolute_pos_embed.requires_grad_(False)

    @property
    def config(self) -> SwinConfig:
        return self.swin.config

    def frozen_modules(self) -> list[nn.Module]:
        """The modules :attr:`frozen_stages` freezes: patch embedding, then whole stages with their norms."""
        if self.frozen_stages < 0:
            return []
        modules = [self.swin.patch_embed]
        for stage in range(self.frozen_stages):
            modules.append(self.swin.layers[stage])
            norm = getattr(self.swin, f"norm{stage}", None)
            if norm is not None:
                modules.append(norm)
        return modules

    def train(self, mode: bool = True) -> SwinBackbone:
        """Set train / eval mode; frozen parts always stay in eval mode (no dropout, drop path or stats)."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` images of any size -> one ``(B, C_i, ceil(H / s_i), ceil(W / s_i))`` map per output."""
        return self.swin(images)


def create_backbone(
    name: str = "swin_t",
    checkpoint: str | os.PathLike | None = None,
    *,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    frozen_stages: int = -1,
    always_shift: bool = True,
    strict: bool = True,
    **overrides: Any,
) -> SwinBackbone:
    """A Swin backbone for dense prediction, optionally initialised from ``checkpoint``.

    ``checkpoint`` may be any file ``create_model`` reads: an ImageNet classifier (its head and final
    norm are dropped, the output norms start fresh) or an official detection / segmentation file
    (its ``backbone.`` weights, ``norm0..norm3`` included, are taken; neck and heads are ignored).
    ``always_shift`` (the official dense rule) is the default here; ``overrides`` change any
    :class:`~swinkit.variants.SwinConfig` field (``drop_path_rate``, ``window_size``, ...).
    """
    if "features_only" in overrides:  # else "got multiple values for keyword argument"
        raise ValueError("a dense backbone always gives feature maps (features_only=True); leave features_only out")
    swin = create_model(
        name,
        checkpoint=checkpoint,
        strict=strict,
        features_only=True,
        stage_norms=True,
        out_indices=tuple(out_indices),
        always_shift=always_shift,
        **overrides,
    )
    return SwinBackbone(swin, frozen_stages)


def backbone_from_config(config: SwinConfig, frozen_stages: int = -1) -> SwinBackbone:
    """A randomly initialised backbone for a stored ``features_only`` config (weights are loaded after)."""
    return SwinBackbone(build_model(config), frozen_stages)
