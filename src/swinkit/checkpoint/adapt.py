"""The explicit adaptations a load may make to fit a file to a model, each reported.

- V1 window change: each head's ``(2W-1) x (2W-1)`` relative position bias table is resized by
  bicubic interpolation (the official fine-tuning rule, ``utils.load_pretrained``).
- Resolution change with an absolute position embedding: the embedding grid is resized bicubic.
- ImageNet-22K classifier into a 1000-class model: the 1000 ImageNet-1K rows are selected with
  the official 22k-to-1k index list (``assets/map22kto1k.txt``).
"""

from __future__ import annotations

import functools
import math
from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET22K_CLASSES = 21841
IMAGENET1K_CLASSES = 1000


def _bicubic(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize of ``(1, C, H, W)``; half precision is computed in float32 (CPU has no half bicubic)."""
    low_precision = grid.dtype in (torch.float16, torch.bfloat16)
    resized = F.interpolate(grid.float() if low_precision else grid, size=size, mode="bicubic", align_corners=False)
    return resized.to(grid.dtype)


def resize_relative_position_table(table: Tensor, rows: int) -> Tensor:
    """``((2W-1)^2, nH)`` -> ``(rows, nH)``: each head's square table resized bicubic."""
    old_rows, heads = table.shape
    old_side, new_side = math.isqrt(old_rows), math.isqrt(rows)
    grid = table.permute(1, 0).reshape(1, heads, old_side, old_side)
    return _bicubic(grid, (new_side, new_side)).reshape(heads, rows).permute(1, 0).contiguous()


def resize_absolute_pos_embed(embed: Tensor, tokens: int) -> Tensor:
    """``(1, G*G, C)`` -> ``(1, tokens, C)`` for a square grid, bicubic."""
    _, old_tokens, channels = embed.shape
    old_side, new_side = math.isqrt(old_tokens), math.isqrt(tokens)
    grid = embed.reshape(1, old_side, old_side, channels).permute(0, 3, 1, 2)
    return _bicubic(grid, (new_side, new_side)).permute(0, 2, 3, 1).reshape(1, tokens, channels)


@functools.cache
def imagenet22k_to_1k() -> tuple[int, ...]:
    """For each ImageNet-1K class, the row of the 21841-class ImageNet-22K classifier that is the same class."""
    text = resources.files("swinkit").joinpath("assets/map22kto1k.txt").read_text()
    indices = tuple(int(line) for line in text.split())
    assert len(indices) == IMAGENET1K_CLASSES, f"map22kto1k.txt has {len(indices)} entries"
    return indices


def select_imagenet1k_rows(head: Tensor) -> Tensor:
    """The 1000 ImageNet-1K rows of an ImageNet-22K classifier weight ``(21841, C)`` or bias ``(21841,)``."""
    return head[torch.tensor(imagenet22k_to_1k(), device=head.device)]
