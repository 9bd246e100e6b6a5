"""The explicit adaptations a load may make to fit a file to a model, each reported.

- V1 window change: each head's ``(2W-1) x (2W-1)`` relative position bias table is resized by
  bicubic interpolation (the official fine-tuning rule, ``utils.load_pretrained``), or, for a
  SimMIM-pretrained encoder, by the official SimMIM fine-tuning's geometric rule
  (``utils_simmim.remap_pretrained_keys_swin``, :func:`resize_relative_position_table_geometric`).
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


TABLE_RESIZES = ("bicubic", "geometric")


def resize_relative_position_table_geometric(table: Tensor, rows: int) -> Tensor:
    """``((2W-1)^2, nH)`` -> ``(rows, nH)`` as the official SimMIM fine-tuning does (from BEiT).

    The old table's offsets are spread out geometrically (:func:`geometric_offsets`) so that they
    span the new table's, and each head's table is interpolated at the new integer offsets by the
    bicubic spline through its values (scipy's ``interp2d(kind="cubic")`` there: FITPACK's
    interpolating spline, whose knots leave out the second and the last-but-one point, i.e. the
    not-a-knot spline, evaluated at points outside the old span as at its ends). Computed in float64.
    """
    old_rows, heads = table.shape
    old_side, new_side = math.isqrt(old_rows), math.isqrt(rows)
    if old_side < 4:
        raise ValueError(f"a geometric resize needs a window of 3 or more (a 5x5 table), got {old_side}x{old_side}")
    source = torch.tensor(geometric_offsets(old_side // 2, new_side // 2), dtype=torch.float64)
    target = torch.arange(-(new_side // 2), new_side // 2 + 1, dtype=torch.float64)
    weights = _not_a_knot_weights(source, target)  # (new_side, old_side)
    grid = table.detach().to(torch.float64, copy=True).permute(1, 0).reshape(heads, old_side, old_side)
    resized = weights @ grid @ weights.T  # rows along one offset, columns along the other: separable
    return resized.reshape(heads, rows).permute(1, 0).to(table.dtype).contiguous()


def geometric_offsets(half: int, new_half: int) -> list[float]:
    """The ``2 * half + 1`` positions the official SimMIM rule gives a table's offsets ``-half..half``:
    ``0`` and ``+-(1 + q + ... + q**k)`` for ``k < half``, with ``q`` found by bisection in
    ``[1.01, 1.5]`` (to 1e-6, the last midpoint kept) so that the largest comes near ``new_half``."""
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**half) / (1.0 - q) > new_half:
            right = q
        else:
            left = q
    distances, current = [], 1.0
    for step in range(half):
        distances.append(current)
        current += q ** (step + 1)
    return [-d for d in reversed(distances)] + [0.0] + distances


def _not_a_knot_weights(x: Tensor, points: Tensor) -> Tensor:
    """``W`` ``(len(points), len(x))``: ``W @ y`` is the not-a-knot cubic spline through ``(x, y)``
    at ``points`` (clamped to ``x``'s span), for any ``y``. Float64 ``x`` increasing, 4 points or more."""
    n = len(x)
    h = x[1:] - x[:-1]
    # Second derivatives m from A m = B y: continuity of the first derivative at the interior points,
    # and of the third at x[1] and x[n-2] (no knot there).
    A = torch.zeros(n, n, dtype=torch.float64)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        B[i, i - 1], B[i, i], B[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    A[0, 0], A[0, 1], A[0, 2] = h[1], -(h[0] + h[1]), h[0]
    A[-1, -3], A[-1, -2], A[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    second = torch.linalg.solve(A, B)  # m = second @ y
    t = points.clamp(x[0], x[-1])
    j = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)
    span = h[j]
    before, after = (x[j + 1] - t) / span, (t - x[j]) / span  # barycentric weights in the interval
    rows = torch.arange(len(t))
    values = torch.zeros(len(t), n, dtype=torch.float64)
    values[rows, j], values[rows, j + 1] = before, after
    curvature = torch.zeros(len(t), n, dtype=torch.float64)
    curvature[rows, j] = (before**3 - before) * span**2 / 6
    curvature[rows, j + 1] = (after**3 - after) * span**2 / 6
    return values + curvature @ second


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
