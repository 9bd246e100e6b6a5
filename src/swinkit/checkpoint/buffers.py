"""The derived tensors other layouts keep beside the weights, rebuilt from a config.

Official files hold ``relative_position_index`` per block and ``attn_mask`` per shifted block
(built for the construction size), V2 files also ``relative_coords_table``; torchvision keeps the
index (flattened) and V2's coordinate table as persistent buffers its ``load_state_dict(strict=True)``
requires. swinkit stores none of them (it builds them for the actual input size), so importing
drops them and exporting rebuilds them here with the model's own functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..model import relative_position_index, shift_window_mask, stage_window, window_and_shift
from ..variants import SwinConfig
from .io import StateDict

Pair = tuple[int, int]
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class BlockGeometry:
    """Where one block sits and the window it uses at the construction size."""

    stage: int
    block: int
    side: int  # the stage's map side at ``config.img_size``
    table_window: int  # the window its position table is built for
    window: Pair
    shift: Pair

    @property
    def prefix(self) -> str:
        return f"layers.{self.stage}.blocks.{self.block}."


def construction_geometry(config: SwinConfig) -> list[BlockGeometry]:
    """Every block's window and shift at ``config.img_size``, by the same rules the model applies."""
    blocks = []
    for stage, depth in enumerate(config.depths):
        side = config.img_size // config.patch_size // 2**stage
        table = stage_window(config, stage)
        for j in range(depth):
            window, shift = window_and_shift(side, side, table, 0 if j % 2 == 0 else table // 2, config.always_shift)
            blocks.append(BlockGeometry(stage, j, side, table, window, shift))
    return blocks


def clamped_stages(config: SwinConfig) -> list[int]:
    """Stages whose table is built for a window smaller than ``config.window_size`` (map not larger)."""
    return [i for i in range(len(config.depths)) if stage_window(config, i) != config.window_size]


def position_index(window: int, flat: bool) -> Tensor:
    """The relative position index of a square window: ``(N, N)`` (official) or ``(N * N,)`` (torchvision)."""
    index = relative_position_index((window, window), (window, window), _CPU).clone()
    return index if flat else index.view(window * window, window * window)


def coords_table(window: int, pretrained_window: int) -> Tensor:
    """V2's ``relative_coords_table`` ``(1, 2W-1, 2W-1, 2)`` (float32) for a square window.

    Offsets ``(dh, dw)`` in ``[-(W-1), W-1]`` over ``P - 1`` (``P`` the pretrained window, else
    ``W``), times 8, then ``sign(t) log2(1 + |t|) / log2(8)``, in the official op order.
    """
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).unsqueeze(0)
    table = table / ((pretrained_window if pretrained_window > 0 else window) - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def shift_mask(block: BlockGeometry) -> Tensor | None:
    """The official ``attn_mask`` buffer of a block (float32, ``(nW, N, N)``), None for unshifted blocks."""
    if block.shift == (0, 0):
        return None
    padded = [math.ceil(block.side / w) * w for w in block.window]
    return shift_window_mask(padded[0], padded[1], block.window, block.shift, torch.float32, _CPU).clone()


def official_buffers(config: SwinConfig) -> StateDict:
    """The buffers an official model registers: index per block, mask per shifted block, V2 coordinates.

    The official detection backbone (``features_only``) builds its masks in ``forward``, so it
    keeps only the index.
    """
    buffers: StateDict = {}
    for block in construction_geometry(config):
        buffers[block.prefix + "attn.relative_position_index"] = position_index(block.table_window, flat=False)
        if config.family == "v2":
            pretrained = config.pretrained_window_sizes[block.stage]
            buffers[block.prefix + "attn.relative_coords_table"] = coords_table(block.table_window, pretrained)
        mask = None if config.features_only else shift_mask(block)
        if mask is not None:
            buffers[block.prefix + "attn_mask"] = mask
    return buffers


def inferred_img_size(state_dict: StateDict, patch_size: int) -> int | None:
    """The construction size an official file's ``attn_mask`` buffers were built for, if it has any."""
    for key, mask in state_dict.items():
        if key.endswith(".attn_mask") and mask.dim() == 3:
            stage = int(key.split(".")[1])
            side = math.isqrt(mask.shape[0]) * math.isqrt(mask.shape[1])
            return side * 2**stage * patch_size
    return None


def inferred_pretrained_window(table: Tensor) -> int:
    """The pretrained window a V2 ``relative_coords_table`` ``(1, 2W-1, 2W-1, 2)`` was normalised by (0: W).

    Its largest offset ``W - 1`` was mapped to ``t = 8 (W - 1) / (P - 1)`` and stored as
    ``log2(1 + t) / 3``; solving for ``P`` recovers the pretrained window.
    """
    window = (table.shape[1] + 1) // 2
    if window < 2:
        return 0
    stored = table[0, -1, window - 1, 0].double().item()
    t = 2.0 ** (3.0 * stored) - 1.0
    pretrained = round(8.0 * (window - 1) / t) + 1
    return 0 if pretrained == window else pretrained


def v2_window_hints(tables: list[Tensor]) -> dict[str, Any]:
    """``window_size`` (stage 0's) and ``pretrained_window_sizes`` from each stage's V2 coordinate table."""
    return {
        "window_size": (tables[0].shape[1] + 1) // 2,
        "pretrained_window_sizes": tuple(inferred_pretrained_window(table) for table in tables),
    }
