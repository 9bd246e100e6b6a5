"""Swin Transformer V2 (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022).

Read it beside the paper's Section 3. V2 keeps V1's network (patch embedding, shifted windows and
their mask, the stages, the window clamp; all from :mod:`swinkit.model`) and changes:

- 3.2 res-post-norm: each residual branch is normalised at its *end*, ``x + LN(F(x))``;
- 3.2 scaled cosine attention (Eq. 2): ``cos(q, k) / tau`` with a learnable ``tau >= 0.01`` per
  head and block, stored as ``logit_scale = log(1 / tau)`` and clamped at ``log(100)``;
- 3.3 continuous relative position bias (Eq. 3) from log-spaced coordinates (Eq. 4): a small MLP
  ``G`` maps each relative offset to one bias per head, so a window other than the pretraining one
  needs no table resizing: the MLP is evaluated at the new offsets;
- 3.6 the huge and giant models: one more LayerNorm on the main branch every 6 blocks (of a stage);
- from the official code: the bias is ``16 * sigmoid(G(.))``, q and v have biases but k has none,
  and patch merging normalises after its reduction, ``LN(2C)`` instead of ``LN(4C)`` before it.

Parameter names are the official checkpoint's (``attn.logit_scale``, ``attn.cpb_mlp``,
``attn.q_bias`` / ``attn.v_bias``). The coordinate table, index and masks are derived from the
actual window and cached; the bias itself depends on the weights, so it is computed each forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import combine_bias_and_mask, window_attention
from .model import (
    Pair,
    SwinTransformer,
    SwinTransformerBlock,
    _derived,
    block_path,
    merge_patches,
    relative_position_index,
    shifted_window_attention,
    split_qkv,
    window_and_shift,
)
from .quantize import is_int8
from .variants import SwinConfig

# Sec. 3.2: tau > 0.01, so the logit scale 1 / tau is at most 100.
MAX_LOGIT_SCALE = math.log(100.0)
# Official initial tau = 0.1.
INIT_LOGIT_SCALE = math.log(10.0)
# Width of the hidden layer of the position-bias MLP G (official code).
CPB_HIDDEN = 512
# The official code bounds the bias to (0, 16) by 16 * sigmoid.
CPB_BIAS_RANGE = 16.0
# Eq. 4 after the official normalisation: the pretrained window's largest offset maps to +-8.
COORDS_RANGE = 8.0


# ---------------------------------------------------------------------------------------------
# 3.3 Log-spaced continuous position bias
# ---------------------------------------------------------------------------------------------


@_derived
def log_spaced_coords(window: Pair, scale_window: Pair, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Eq. 4 for every relative offset of ``window``: ``((2 Wh - 1) * (2 Ww - 1), 2)``, rows ``(dh, dw)``.

    Offsets in ``[-(W - 1), W - 1]`` are divided by ``scale_window - 1`` (the pretraining window, or
    the block's own), times 8, then ``sign(t) * log2(1 + |t|) / log2(8)``. Computed in float32 in the
    official op order (the official ``relative_coords_table`` buffer is float32), then cast to
    ``dtype``. A window of 1 has only the offset 0, so its divisor is kept at 1 instead of 0.
    Row ``r`` belongs to offset ``(r // (2 Ww - 1) - Wh + 1, r % (2 Ww - 1) - Ww + 1)``, the order
    :func:`~swinkit.model.relative_position_index` indexes.
    """
    rows = torch.arange(-(window[0] - 1), window[0], dtype=torch.float32) / max(scale_window[0] - 1, 1)
    cols = torch.arange(-(window[1] - 1), window[1], dtype=torch.float32) / max(scale_window[1] - 1, 1)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).view(-1, 2) * COORDS_RANGE
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(COORDS_RANGE)
    return coords.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# 3.2 Scaled cosine attention with the continuous position bias
# ---------------------------------------------------------------------------------------------


class WindowAttentionV2(nn.Module):
    """W-MSA with scaled cosine attention (Eq. 2) and the continuous relative position bias (Eq. 3).

    Args:
        dim: channels of the tokens.
        num_heads: attention heads; ``dim`` must divide by it.
        table_window: the block's construction window (clamped to its map at ``img_size``).
        pretrained_window: window the weights were pretrained with; its largest offset maps to the
            coordinate 8 (0: ``table_window``). This is what lets a window-12 model run at window 24.
        qkv_bias: learnable biases on q and v (V2 has no k bias).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        table_window: int,
        pretrained_window: int,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        scale_window = pretrained_window if pretrained_window > 0 else table_window
        self.scale_window = (scale_window, scale_window)
        self.attn_drop = attn_drop
        self.attn_impl = "auto"
        # log(1 / tau) of Eq. 2, one per head.
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), INIT_LOGIT_SCALE))
        # G of Eq. 3: 2 -> 512 -> ReLU -> num_heads.
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True), nn.Linear(CPB_HIDDEN, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, window: Pair) -> Tensor:
        """``16 * sigmoid(G(coords))`` of every token pair of ``window``: ``(nH, N, N)``."""
        N = window[0] * window[1]
        weight = self.cpb_mlp[0].weight
        coords = log_spaced_coords(window, self.scale_window, weight.dtype, weight.device)
        table = CPB_BIAS_RANGE * torch.sigmoid(self.cpb_mlp(coords))  # ((2Wh-1)(2Ww-1), nH)
        index = relative_position_index(window, window, weight.device)
        return table[index].view(N, N, self.num_heads).permute(2, 0, 1)

    def combined_qkv_bias(self) -> Tensor | None:
        """The ``(3C,)`` bias of the q, k, v projection: q and v biases, none for k (None without them)."""
        return None if self.q_bias is None else torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def logit_scales(self) -> Tensor:
        """``1 / tau`` of Eq. 2 per head, ``(nH, 1, 1)``: the learned log-scale clamped at log(100)."""
        return torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()

    def project_qkv(self, x: Tensor) -> Tensor:
        """``(..., C)`` tokens -> their ``(..., 3 C)`` q, k, v projection, with the q and v biases."""
        if is_int8(self.qkv):  # swinkit.quantize_dynamic: only the layer's own forward reads its weights
            bias = self.combined_qkv_bias()
            return self.qkv(x) if bias is None else self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, self.combined_qkv_bias())

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B * nW, N, C)`` windows -> unit q times ``1 / tau``, unit k, and v, each ``(B * nW, nH, N, d)``."""
        return self.split_heads(self.project_qkv(x))

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``qkv`` projection ``(B * nW, N, 3 C)`` -> unit q times ``1 / tau``, unit k, and v."""
        q, k, v = split_qkv(qkv, self.num_heads)
        # cos(q, k) / tau: unit q and k, with 1 / tau folded into q so the seam computes q @ k^T + B.
        scale = self.logit_scales()  # (nH, 1, 1)
        # Padded tokens have k = 0 (no k bias): F.normalize's eps 1e-12 is 0 in float16, which would give 0 / 0.
        eps = max(1e-12, torch.finfo(qkv.dtype).tiny)
        return F.normalize(q, dim=-1, eps=eps) * scale, F.normalize(k, dim=-1, eps=eps), v

    def forward(self, x: Tensor, window: Pair, mask: Tensor | None) -> Tensor:
        """``x``: ``(B * nW, N, C)`` windows; ``mask``: ``(nW, N, N)`` or None."""
        B_, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        attn_bias = combine_bias_and_mask(self.relative_position_bias(window), mask)
        x = window_attention(q, k, v, attn_bias, self.attn_drop, self.training, self.attn_impl)
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


# ---------------------------------------------------------------------------------------------
# 3.2 Res-post-norm block, 3.6 the extra main-branch norm
# ---------------------------------------------------------------------------------------------


class SwinTransformerBlockV2(SwinTransformerBlock):
    """Res-post-norm (Sec. 3.2): ``x + DropPath(LN((S)W-MSA(x)))``, then ``x + DropPath(LN(MLP(x)))``.

    V1's block (:class:`~swinkit.model.SwinTransformerBlock`, same parts) with
    :class:`WindowAttentionV2` and the norms moved to the ends of the branches.

    Args:
        dim, num_heads, window_size, shift_size, mlp_ratio, qkv_bias, drop, attn_drop, drop_path,
            always_shift: as for :class:`~swinkit.model.SwinTransformerBlock`.
        pretrained_window: see :class:`WindowAttentionV2`.
        extra_norm: end the block with a LayerNorm on the main branch (``norm3``; Sec. 3.6, huge
            and giant models).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        always_shift: bool,
        pretrained_window: int = 0,
        extra_norm: bool = False,
    ) -> None:
        attn = WindowAttentionV2(dim, num_heads, window_size, pretrained_window, qkv_bias, attn_drop, drop)
        args = (dim, num_heads, window_size, shift_size, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, always_shift)
        super().__init__(*args, attn=attn)
        self.norm3 = nn.LayerNorm(dim) if extra_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        fast = block_path(self, x)
        if fast is not None:
            return fast(self, x)
        H, W = x.shape[1:3]
        window, shift = window_and_shift(H, W, self.window_size, self.shift_size, self.always_shift)
        attention = shifted_window_attention(x, self.attn, window, shift)
        x = x + self.drop_path(self.norm1(attention))
        x = x + self.drop_path(self.norm2(self.mlp(x)))
        return self.norm3(x)


class PatchMergingV2(nn.Module):
    """Halve the resolution and double the channels: gather 2 x 2, ``Linear(4C, 2C)``, then ``LayerNorm(2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(merge_patches(x)))


# ---------------------------------------------------------------------------------------------
# The whole network
# ---------------------------------------------------------------------------------------------


class SwinTransformerV2(SwinTransformer):
    """Swin Transformer V2 for classification, or as a backbone (``config.features_only``).

    The V1 network (:class:`~swinkit.model.SwinTransformer`: embedding, forward, features, head,
    gradient checkpointing) with V2 stages. ``config.pretrained_window_sizes`` gives each stage's
    pretraining window (0: its own), ``config.extra_norm_period`` the main-branch LayerNorm period
    (0: none). Block norms start at zero (official initialisation), so every block starts as the
    identity.

    Args:
        config: a ``family="v2"`` configuration (see :mod:`swinkit.variants`).
        attn_impl: the attention implementation (see :meth:`set_attn_impl`).
    """

    family = "v2"
    block_class = SwinTransformerBlockV2
    merging_class = PatchMergingV2

    def __init__(self, config: SwinConfig, attn_impl: str = "auto") -> None:
        super().__init__(config, attn_impl)
        for layer in self.layers:
            for block in layer.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def _block_options(self, stage: int, index: int) -> dict[str, Any]:
        c = self.config
        return {
            "pretrained_window": c.pretrained_window_sizes[stage],
            "extra_norm": c.extra_norm_period > 0 and (index + 1) % c.extra_norm_period == 0,
        }

    def no_weight_decay(self) -> set[str]:
        """V1's position parameters plus the position-bias MLP and the logit scales (official recipe)."""
        names = {name for name, _ in self.named_parameters() if ".cpb_mlp." in name or name.endswith(".logit_scale")}
        return super().no_weight_decay() | names


__all__ = [
    "PatchMergingV2",
    "SwinTransformerBlockV2",
    "SwinTransformerV2",
    "WindowAttentionV2",
    "log_spaced_coords",
]
