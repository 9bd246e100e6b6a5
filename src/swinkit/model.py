"""Swin Transformer V1 (Liu et al., "Hierarchical Vision Transformer using Shifted Windows", ICCV 2021).

Read it beside the paper's Section 3: patch partition and linear embedding (3.1), window
partition, W-MSA with the relative position bias (3.2, Eq. 4), SW-MSA with the cyclic shift and
its mask (3.2, "efficient batch computation"), the Swin Transformer block (Eq. 3), patch merging
(3.1) and the stages. Parameter names are the official checkpoint's, so an official ``.pth``
loads after dropping its derived buffers.

Inside the backbone tensors are channels-last ``(B, H, W, C)``; images in and maps out are NCHW.
Nothing here depends on a stored input size: padding, window clamp, shift mask and index tables
follow the actual feature size and are cached by (size, dtype, device).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .attention import check_impl, combine_bias_and_mask, resolve_impl, window_attention
from .parallel import compile_forward, drop_path_scales, forward_function, image_splits, run_split
from .variants import SwinConfig

Pair = tuple[int, int]
POSITION_PARAMETERS = ("absolute_pos_embed", "relative_position_bias_table")

# ---------------------------------------------------------------------------------------------
# 3.1 Patch partition and linear embedding
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Split the image into ``patch_size`` x ``patch_size`` patches and project each to ``embed_dim``.

    A strided convolution is the patch partition and the linear embedding in one op. The image is
    padded right/bottom to a multiple of the patch size (never cropped).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        p = self.patch_size
        x = pad_end(x, (cells(H, p) * p, cells(W, p) * p), first_dim=2)
        if x.device.type == "cpu" and not tracing():
            # Channels-last: oneDNN's convolution is about 2.5x faster on it, and its output is
            # then already (B, H/p, W/p, C) in memory (measured; benchmarks/RESULTS.md).
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# 3.2 Window partition, relative position bias, shift mask
# ---------------------------------------------------------------------------------------------


def cells(length: int, size: int) -> int:
    """How many cells of ``size`` cover ``length`` (the last one padded): ``ceil(length / size)``.

    Sizes are written as such counts times the cell size, never as ``length + (-length % size)``
    or with ``-1`` in reshapes: under torch.compile / torch.export the sizes are symbolic, and
    these plain floor divisions keep their expressions small enough to simplify quickly. Inside
    :func:`derived_once_per_trace` a count of a count is one division (:func:`_traced_cells`).
    """
    if _known_equal(length, size):  # a side clamped to its window; symbolic (2n-1)//n stays unsimplified
        return 1
    memo = _TRACE_MEMO.get() if isinstance(length, torch.SymInt) and isinstance(size, int) else None
    if memo is None:
        return (length + size - 1) // size
    return _traced_cells(length, size, memo)


def _known_equal(length: int, size: int) -> bool:
    """``length == size`` where it is known without a guard; the shape engine (and sympy, half a
    second of every ``import swinkit``) is imported only when a size is symbolic, under tracing."""
    if isinstance(length, int) and isinstance(size, int):
        return length == size
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(length == size)


def _traced_cells(length: torch.SymInt, size: int, memo: dict) -> torch.SymInt:
    """``ceil(length / size)`` as ``ceil(a / (d * size))`` where ``length`` is a traced ``ceil(a / d)``.

    Equal for positive integers, and every stage's side becomes one floor division of the image's
    instead of one nested in another per stage: the shape engine proves the reshapes of a
    dynamic-size trace on those expressions, and nesting made it slower at every stage (exporting
    Swin-T took 1.11-1.19x as long; benchmarks/RESULTS.md).
    """
    numerator, divisor = memo.get(("cells", length.node.expr), (length, 1))
    count = (numerator + divisor * size - 1) // (divisor * size)
    if isinstance(count, torch.SymInt):
        memo[("cells", count.node.expr)] = (numerator, divisor * size)
    return count


def pad_end(x: Tensor, size: Pair, first_dim: int = 1) -> Tensor:
    """Zero-pad the two dims from ``first_dim`` (rows, columns) at their end to ``size``.

    With a symbolic (traced, dynamic) height or width, a gather and a select pad instead of
    ``F.pad``: the padding op's shape function branches on a pad being zero, which would tie an
    exported graph with dynamic height and width to the example's padding pattern.
    """
    H, W = x.shape[first_dim : first_dim + 2]
    if not symbolic(H, W, *size):
        if tuple(size) == (H, W):
            return x  # nothing to pad: no copy
        return F.pad(x, (0, 0) * (x.dim() - first_dim - 2) + (0, size[1] - W, 0, size[0] - H))
    for dim, (length, target) in enumerate(zip((H, W), size, strict=True), start=first_dim):
        positions = torch.arange(target, device=x.device)
        x = x.index_select(dim, positions.clamp(max=length - 1))  # repeat the last row / column
        inside = (positions < length).view([-1 if d == dim else 1 for d in range(x.dim())])
        x = torch.where(inside, x, 0.0)
    return x


def crop_end(x: Tensor, size: Pair) -> Tensor:
    """Inverse of :func:`pad_end` on ``(B, H, W, C)``: keep the first ``size`` rows and columns.

    With a symbolic size, a gather instead of a slice, for the reason :func:`pad_end` gives: the
    slice's layout (a view or not) depends on whether anything was padded.
    """
    if not symbolic(*x.shape[1:3], *size):
        return x if tuple(x.shape[1:3]) == tuple(size) else x[:, : size[0], : size[1]]
    for dim, length in enumerate(size, start=1):
        x = x.index_select(dim, torch.arange(length, device=x.device))
    return x


def window_partition(x: Tensor, window: Pair, counts: Pair | None = None) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, Wh * Ww, C)``; windows batch-major, then row, then column.

    ``counts``, the windows per column and per row when the caller knows them, spares a traced
    graph the floor divisions of symbolic sizes (a quarter of a second each for the shape engine).
    """
    B, H, W, C = x.shape
    Wh, Ww = window
    rows, cols = counts if counts is not None else (H // Wh, W // Ww)
    x = x.reshape(B, rows, Wh, cols, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B * rows * cols, Wh * Ww, C)


def window_table(table: Tensor, window: Pair, counts: Pair | None = None) -> Tensor:
    """A per-position ``(H, W)`` table (indices, regions, flags) -> ``(nW, N)``, in window order."""
    rows, cols = counts if counts is not None else (table.shape[0] // window[0], table.shape[1] // window[1])
    return window_partition(table[None, :, :, None], window, (rows, cols)).view(rows * cols, window[0] * window[1])


def window_reverse(windows: Tensor, window: Pair, B: int, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`window_partition` for ``B`` images of ``rows`` x ``cols`` windows -> ``(B, H, W, C)``."""
    Wh, Ww = window
    C = windows.shape[-1]
    x = windows.view(B, rows, cols, Wh, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, rows * Wh, cols * Ww, C)


def window_and_shift(H: int, W: int, window_size: int, shift_size: int, always_shift: bool) -> tuple[Pair, Pair]:
    """The window and shift a block uses on an ``H`` x ``W`` map.

    Classification rule (official code): along a side no longer than the window, the window
    shrinks to the side and does not shift (so Swin-T at 224 does not shift in stage 4).
    Detection rule (``always_shift``): the window and shift stay; the map is padded instead.

    Traced with a symbolic size (torch.export with a dynamic height and width), the classification
    rule is written as arithmetic on the symbols: the window is ``min(side, window_size)`` and the
    shift ``shift_size * [side > window_size]``. Comparisons would tie the graph to the example's
    clamps; symbols keep one graph exact, and as small as eager's, at every size.
    """
    if always_shift:
        return (window_size, window_size), (shift_size, shift_size)
    if symbolic(H, W):
        return (torch.sym_min(H, window_size), torch.sym_min(W, window_size)), (
            _shift_unless_fits(H, window_size, shift_size),
            _shift_unless_fits(W, window_size, shift_size),
        )
    window_h, shift_h = (H, 0) if window_size >= H else (window_size, shift_size)
    window_w, shift_w = (W, 0) if window_size >= W else (window_size, shift_size)
    return (window_h, window_w), (shift_h, shift_w)


def _shift_unless_fits(length: int, window_size: int, shift_size: int) -> int:
    """``shift_size`` if ``length > window_size`` else 0, without a comparison (a symbolic ``length``)."""
    if shift_size == 0:
        return 0
    return shift_size * torch.sym_min(1, torch.sym_max(0, length - window_size))


def _derived(fn):
    """Cache a derived tensor by its arguments; built outside autograd and inference mode.

    Inference-mode tensors cannot be saved for backward, so a table first built under
    ``torch.inference_mode`` must still be an ordinary tensor when training uses it later.
    While tracing, the tensor is part of the graph: built anew, or once per trace inside
    :func:`derived_once_per_trace`.
    """

    @functools.lru_cache(maxsize=256)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args)

    @functools.wraps(fn)
    def derived(*args):
        if not tracing():
            return cached(*args)
        memo = _TRACE_MEMO.get()
        if memo is None:
            return fn(*args)
        key = (fn, _expression(args))
        if key not in memo:
            memo[key] = fn(*args)
        return memo[key]

    return derived


# The tables of the trace under way: they are fake tensors of that trace, so they live no longer.
_TRACE_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("swinkit_trace_memo", default=None)


def _expression(value: Any) -> Any:
    """``value`` with each symbolic size replaced by its expression: hashable, and equal where the
    sizes are equal for every input (the blocks of a stage see the same expressions)."""
    if isinstance(value, torch.SymInt):
        return ("symbol", value.node.expr)
    if isinstance(value, tuple):
        return tuple(_expression(item) for item in value)
    return value


@contextlib.contextmanager
def derived_once_per_trace() -> Iterator[None]:
    """Inside, a trace builds each derived table (index tables, masks) once per set of sizes and
    shares it between the blocks that ask for it, as eager's cache does.

    Without it every block of a traced graph builds its own copy: for Swin-T at a dynamic size
    exporting took 1.16x (ONNX) to 1.22x (``.pt2``) as long (benchmarks/RESULTS.md).
    """
    token = _TRACE_MEMO.set({})
    try:
        yield
    finally:
        _TRACE_MEMO.reset(token)


def symbolic(*sizes: int) -> bool:
    """True for sizes torch.export / torch.compile traces as symbols (a dynamic height or width)."""
    return any(isinstance(size, torch.SymInt) for size in sizes)


def tracing() -> bool:
    """True while torch.compile or torch.export traces: tensors made then are fake, not cacheable."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


@_derived
def relative_position_index(window: Pair, table_window: Pair, device: torch.device) -> Tensor:
    """Index of Eq. 4's bias table for every token pair of a window, flattened to ``(N * N,)``.

    ``index[i, j] = (h_i - h_j + Th - 1) * (2 Tw - 1) + (w_i - w_j + Tw - 1)`` into a table of
    ``(2 Th - 1) * (2 Tw - 1)`` rows built for windows of ``table_window``; a smaller ``window``
    (a clamped one) reads the central part of the table.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    relative = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    index = (relative[0] + table_window[0] - 1) * (2 * table_window[1] - 1) + (relative[1] + table_window[1] - 1)
    return index.flatten().to(device)


def _bands(length: int, window: int, shift: int) -> Tensor:
    """Region of each row of a shifted side: 0 before the last window, 1 and 2 inside it.

    After a cyclic shift by ``-shift`` the last window holds rows from two regions: those from
    ``[length - window, length - shift)`` and those wrapped around from the start. With no shift
    bands 0 and 1 never share a window, so the same formula serves unshifted sides.
    """
    rows = torch.arange(length)
    return (rows >= length - window).long() + (rows >= length - shift).long()


@_derived
def shift_window_mask(
    H: int, W: int, window: Pair, shift: Pair, dtype: torch.dtype, device: torch.device, counts: Pair | None = None
) -> Tensor:
    """SW-MSA mask for a padded ``H`` x ``W`` map: ``(nW, N, N)``, ``-100`` across regions, else 0.

    The shifted map is cut into up to 3 x 3 regions that were not adjacent before the shift;
    tokens of one window in different regions must not attend to each other. The official code
    adds ``-100`` (not ``-inf``), which we keep: it changes the softmax by ``e^-100``. ``counts``:
    see :func:`window_partition`.
    """
    regions = _bands(H, window[0], shift[0])[:, None] * 3 + _bands(W, window[1], shift[1])[None, :]  # (H, W)
    regions = window_table(regions, window, counts)  # (nW, N)
    different = regions.unsqueeze(1) != regions.unsqueeze(2)  # (nW, N, N)
    return torch.zeros(different.shape, dtype=dtype).masked_fill(different, -100.0).to(device)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    return x * drop_path_scales(x, p)


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """The block's two-layer MLP with GELU (exact erf form)."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """W-MSA: multi-head self-attention inside each window, with relative position bias (Eq. 4).

    Args:
        dim: channels of the tokens.
        num_heads: attention heads; ``dim`` must divide by it.
        table_window: window the bias table is built for (the block's construction window).
        qkv_bias: learnable bias on q, k and v.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int, table_window: int, qkv_bias: bool, attn_drop: float, proj_drop: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.table_window = (table_window, table_window)
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.attn_impl = "auto"
        # \hat{B} of Eq. 4: one learnable bias per relative offset and head.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * table_window - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self, window: Pair) -> Tensor:
        """B of Eq. 4 for ``window``: ``(nH, N, N)``."""
        N = window[0] * window[1]
        index = relative_position_index(window, self.table_window, self.relative_position_bias_table.device)
        return self.relative_position_bias_table[index].view(N, N, self.num_heads).permute(2, 0, 1)

    def combined_qkv_bias(self) -> Tensor | None:
        """The bias of the ``(3C,)`` q, k, v projection (None without one)."""
        return self.qkv.bias

    def project_qkv(self, x: Tensor) -> Tensor:
        """``(..., C)`` tokens -> their ``(..., 3 C)`` q, k, v projection."""
        return self.qkv(x)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B * nW, N, C)`` windows -> q (scaled by ``d**-0.5``), k, v, each ``(B * nW, nH, N, d)``."""
        return self.split_heads(self.project_qkv(x))

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``qkv`` projection ``(B * nW, N, 3 C)`` -> q (scaled), k, v, each ``(B * nW, nH, N, d)``."""
        q, k, v = split_qkv(qkv, self.num_heads)
        return q * self.scale, k, v

    def forward(self, x: Tensor, window: Pair, mask: Tensor | None) -> Tensor:
        """``x``: ``(B * nW, N, C)`` windows; ``mask``: ``(nW, N, N)`` or None."""
        B_, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        bias = combine_bias_and_mask(self.relative_position_bias(window), mask)
        x = window_attention(q, k, v, bias, self.attn_drop, self.training, self.attn_impl)
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


def split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B * nW, N, 3 C)`` -> q, k, v views, each ``(B * nW, nH, N, d)``."""
    B_, N, C3 = qkv.shape
    return qkv.reshape(B_, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def shifted_window_attention(x: Tensor, attn: nn.Module, window: Pair, shift: Pair) -> Tensor:
    """(S)W-MSA on a ``(B, H, W, C)`` map: pad, cyclic shift, partition, attend, reverse, crop.

    Padding comes before the shift (right/bottom, to a multiple of the window), so the mask is
    built on the padded map, as in the official detection code. A trace with a symbolic size
    takes :func:`traced_window_attention`.
    """
    B, H, W, _ = x.shape
    if symbolic(H, W):
        return traced_window_attention(x, attn, window, shift)
    rows, cols = cells(H, window[0]), cells(W, window[1])
    Hp, Wp = rows * window[0], cols * window[1]
    x = pad_end(x, (Hp, Wp))
    shifted = shift[0] > 0 or shift[1] > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    mask = shift_window_mask(Hp, Wp, window, shift, x.dtype, x.device) if shifted else None
    windows = attn(window_partition(x, window), window, mask)  # (B*nW, N, C)
    x = window_reverse(windows, window, B, rows, cols)
    if shifted:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return crop_end(x, (H, W))


def traced_window_attention(x: Tensor, attn: nn.Module, window: Pair, shift: Pair) -> Tensor:
    """:func:`shifted_window_attention` as traced with a symbolic size: one gather each way.

    Padding, cyclic shift and partition are one gather from the map plus a zero token, and
    reverse, shift back and crop one gather back (:func:`window_gather_indices`); a graph that
    cannot know whether anything is padded would otherwise copy the map for each step. ``window``
    and ``shift`` may be symbolic (see :func:`window_and_shift`).
    """
    B, H, W, C = x.shape
    rows, cols = cells(H, window[0]), cells(W, window[1])
    Hp, Wp = rows * window[0], cols * window[1]
    to_windows, to_map = window_gather_indices((H, W), window, shift, (rows, cols), x.device)
    tokens = torch.cat((x.reshape(B, H * W, C), x.new_zeros(B, 1, C)), dim=1)
    windows = tokens.index_select(1, to_windows).reshape(B * rows * cols, window[0] * window[1], C)
    shifted = symbolic(*shift) or shift[0] > 0 or shift[1] > 0
    mask = shift_window_mask(Hp, Wp, window, shift, x.dtype, x.device, (rows, cols)) if shifted else None
    windows = attn(windows, window, mask)  # (B*nW, N, C)
    return windows.reshape(B, rows * cols * window[0] * window[1], C).index_select(1, to_map).view(B, H, W, C)


@_derived
def window_gather_indices(
    size: Pair, window: Pair, shift: Pair, counts: Pair, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Index tables of :func:`traced_window_attention` for an ``H`` x ``W`` map of ``rows`` x ``cols`` windows.

    ``to_windows`` ``(nW * N,)``: for every window token, in window order, the map token it holds
    after padding and the cyclic shift by ``-shift`` (row-major; ``H * W`` is the zero token
    standing for padding). ``to_map`` ``(H * W,)``: for every map token, its place among the
    window tokens. Indices wrap by comparisons: torch's ONNX exporter takes no remainder by a symbolic size.
    """
    (H, W), (Wh, Ww), (rows, cols) = size, window, counts
    Hp, Wp = rows * Wh, cols * Ww
    source_rows = _wrapped(torch.arange(Hp, device=device) + shift[0], Hp)  # shifted row i holds row i + s
    source_cols = _wrapped(torch.arange(Wp, device=device) + shift[1], Wp)
    inside = (source_rows < H)[:, None] & (source_cols < W)[None, :]
    source = torch.where(inside, source_rows[:, None] * W + source_cols[None, :], H * W)  # (Hp, Wp)
    to_windows = window_table(source, window, counts).reshape(-1)
    map_rows = _wrapped(torch.arange(H, device=device) - shift[0], Hp)  # where each row went
    map_cols = _wrapped(torch.arange(W, device=device) - shift[1], Wp)
    window_rows, window_cols = map_rows // Wh, map_cols // Ww
    within_rows, within_cols = map_rows - window_rows * Wh, map_cols - window_cols * Ww  # no remainder op (above)
    window_index = window_rows[:, None] * cols + window_cols[None, :]
    to_map = (window_index * Wh + within_rows[:, None]) * Ww + within_cols[None, :]
    return to_windows, to_map.reshape(-1)


def _wrapped(index: Tensor, length: int) -> Tensor:
    """``index`` modulo ``length`` for values in ``(-length, 2 * length)``."""
    index = torch.where(index < 0, index + length, index)
    return torch.where(index >= length, index - length, index)


def block_path(block: nn.Module, x: Tensor) -> Callable[[nn.Module, Tensor], Tensor] | None:
    """The block-level fast path ``block.attn.attn_impl`` names on ``x``'s device, or None.

    ``fused`` (swinkit.fast) and ``triton`` (swinkit.triton_attention) compute the same function as
    the blocks below in another order. Under torch.compile ``fused`` keeps its order on the CPU (the
    native kernel enters the graph as an operator) and the rest run as written; torch.export always
    traces the blocks as written, for runtimes that know only standard operators.
    """
    if torch.compiler.is_exporting():
        return None
    impl = resolve_impl(block.attn.attn_impl, x.device, x.dtype)
    if impl == "fused" and (x.device.type == "cpu" or not tracing()):
        from .fast import fused_block_forward

        return fused_block_forward
    if impl == "triton" and not tracing():
        from .triton_attention import triton_block_forward

        return triton_block_forward
    return None


class SwinTransformerBlock(nn.Module):
    """Eq. 3, pre-norm: ``x + DropPath((S)W-MSA(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: construction window (the bias table's size).
        shift_size: cyclic shift of SW-MSA blocks (``window_size // 2``), 0 for W-MSA blocks.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias, drop, attn_drop: see :class:`WindowAttention`.
        drop_path: stochastic depth rate of both residual branches.
        always_shift: the detection-style window rule (see :func:`window_and_shift`).
        attn: the attention module, if not :class:`WindowAttention` built from the arguments above
            (Swin V2's block passes its own).
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
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.always_shift = always_shift
        if attn is None:
            attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor) -> Tensor:
        fast = block_path(self, x)
        if fast is not None:
            return fast(self, x)
        H, W = x.shape[1:3]
        window, shift = window_and_shift(H, W, self.window_size, self.shift_size, self.always_shift)
        attention = shifted_window_attention(self.norm1(x), self.attn, window, shift)
        x = x + self.drop_path(attention)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"


# ---------------------------------------------------------------------------------------------
# 3.1 Patch merging and the stages
# ---------------------------------------------------------------------------------------------


def merge_patches(x: Tensor) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 4C)``: concatenate each 2 x 2 group.

    Odd sides are padded right/bottom first. The order ``(0,0), (1,0), (0,1), (1,1)`` (row,
    column offsets) is the official one; the reduction weights depend on it.
    """
    B, H, W, C = x.shape
    rows, cols = cells(H, 2), cells(W, 2)
    x = pad_end(x, (2 * rows, 2 * cols)).reshape(B, rows, 2, cols, 2, C)
    # (row offset, column offset) -> channel group ``2 * column + row``: the official order.
    return x.permute(0, 1, 3, 4, 2, 5).reshape(B, rows, cols, 4 * C)


class PatchMerging(nn.Module):
    """Halve the resolution and double the channels: gather 2 x 2, ``LayerNorm(4C)``, ``Linear(4C, 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(merge_patches(x)))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating W-MSA and SW-MSA, then (optionally) patch merging.

    Merging sits at the end of the stage, as in the official code (keys ``layers.{i}.downsample``).
    """

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the stage's output map (before merging) and the next stage's input."""
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


def stage_window(config: SwinConfig, stage: int) -> int:
    """The window a stage is built with: clamped to its map at ``img_size`` unless ``always_shift``."""
    side = config.img_size // config.patch_size // 2**stage
    if config.always_shift or side > config.window_size:
        return config.window_size
    return max(side, 1)


def drop_path_rates(config: SwinConfig) -> list[list[float]]:
    """Stochastic depth grows linearly over all blocks: ``linspace(0, rate, sum(depths))``."""
    # On the CPU explicitly, so that models can be built under ``torch.device("meta")`` (huge models, FSDP).
    rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
    starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
    return [rates[start : start + depth] for start, depth in zip(starts, config.depths, strict=True)]


# ---------------------------------------------------------------------------------------------
# The whole network
# ---------------------------------------------------------------------------------------------


class SwinTransformer(nn.Module):
    """Swin Transformer V1 for classification, or as a backbone (``config.features_only``).

    ``forward(x)`` maps ``(B, in_chans, H, W)`` images of any size to ``(B, num_classes)`` logits
    (or, for a backbone, to the list of maps :meth:`forward_features` gives). Swin V2
    (:class:`swinkit.model_v2.SwinTransformerV2`) is this network with other blocks and merging:
    it overrides :attr:`family`, :attr:`block_class`, :attr:`merging_class` and :meth:`_block_options`.
    """

    family = "v1"
    image_parallel = True  # CPU batches of the fused path split over threads (swinkit.parallel)
    block_class: type[nn.Module] = SwinTransformerBlock
    merging_class: type[nn.Module] = PatchMerging

    def __init__(self, config: SwinConfig, attn_impl: str = "auto") -> None:
        super().__init__()
        if config.family != self.family:
            raise ValueError(
                f"{type(self).__name__} builds Swin {self.family.upper()} configs; got family {config.family!r} "
                "(build_model / create_model pick the class from the config)"
            )
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, config.patch_norm)
        self.grid = config.img_size // config.patch_size
        if config.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, config.embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.layers = nn.ModuleList(self._build_stage(i, rates) for i, rates in enumerate(drop_path_rates(config)))
        self._build_outputs()
        self.apply(_init_weights)
        self.set_attn_impl(attn_impl)

    def _build_stage(self, stage: int, rates: list[float]) -> BasicLayer:
        c = self.config
        dim, window = c.embed_dim * 2**stage, stage_window(c, stage)
        blocks = [
            self.block_class(
                dim,
                c.num_heads[stage],
                window_size=window,
                shift_size=0 if j % 2 == 0 else window // 2,
                mlp_ratio=c.mlp_ratio,
                qkv_bias=c.qkv_bias,
                drop=c.drop_rate,
                attn_drop=c.attn_drop_rate,
                drop_path=rate,
                always_shift=c.always_shift,
                **self._block_options(stage, j),
            )
            for j, rate in enumerate(rates)
        ]
        last = stage == len(c.depths) - 1
        return BasicLayer(blocks, None if last else self.merging_class(dim))

    def _block_options(self, stage: int, index: int) -> dict[str, Any]:
        """Keyword arguments of block ``index`` of ``stage`` beyond V1's (for subclasses' blocks)."""
        return {}

    def _build_outputs(self) -> None:
        c = self.config
        if c.stage_norms:
            for i in c.out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(c.embed_dim * 2**i))
        if not c.features_only:
            self.norm = nn.LayerNorm(c.num_features)
            self.head = nn.Linear(c.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()

    # -- configuration ------------------------------------------------------------------------

    def set_attn_impl(self, impl: str) -> None:
        """Choose the attention implementation of every block (see :mod:`swinkit.attention`)."""
        check_impl(impl)
        for module in self.modules():
            if hasattr(module, "attn_impl"):
                module.attn_impl = impl

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        if not isinstance(enable, bool):  # "no" would turn it on
            raise TypeError(f"set_grad_checkpointing takes True or False, got {enable!r}")
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0: no head)."""
        if self.config.features_only:
            raise ValueError("a features_only backbone has no classifier to reset")
        config = self.config.replace(num_classes=num_classes)  # checked there: a whole number, 0 or more
        self.head = nn.Linear(config.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)
        self.config = config

    def no_weight_decay(self) -> set[str]:
        """Position tables and embeddings: trained without weight decay, like norms and biases."""
        return {name for name, _ in self.named_parameters() if name.endswith(POSITION_PARAMETERS)}

    # -- forward --------------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, H/4, W/4, C)`` with the optional absolute position."""
        check_images(x, self.config.in_chans, self.patch_embed.proj.weight.dtype)
        static_size_under_compile(x)
        return self.add_position(self.patch_embed(x))

    def add_position(self, x: Tensor) -> Tensor:
        """Patch tokens ``(B, H/4, W/4, C)`` plus the optional absolute position, then dropout
        (SimMIM puts its mask token in between: :mod:`swinkit.pretrain`)."""
        if self.config.ape:
            x = x + resize_pos_embed(self.absolute_pos_embed, self.grid, x.shape[1:3])
        return self.pos_drop(x)

    def stage_maps(self, x: Tensor, last_stage: int | None = None) -> list[Tensor]:
        """Channels-last output of each stage up to ``last_stage`` (before its patch merging)."""
        last_stage = len(self.layers) - 1 if last_stage is None else last_stage
        x = self.embed(x)
        maps = []
        for layer in self.layers[: last_stage + 1]:
            out, x = layer(x)
            maps.append(out)
        return maps

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The maps of ``config.out_indices`` as NCHW tensors (strides 4, 8, 16, 32; C, 2C, 4C, 8C).

        With ``config.stage_norms`` each map passes its own LayerNorm (``norm{i}``) first.
        """
        maps = self.stage_maps(x, max(self.config.out_indices))
        outputs = []
        for i in self.config.out_indices:
            out = getattr(self, f"norm{i}")(maps[i]) if self.config.stage_norms else maps[i]
            outputs.append(out.permute(0, 3, 1, 2).contiguous())
        return outputs

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Last stage map ``(B, H, W, C)`` -> final norm, global average pool, head."""
        x = self.norm(x).mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        check_images(x, self.config.in_chans, self.patch_embed.proj.weight.dtype)
        parts = image_splits(self, x)  # fused CPU path: images over worker threads (swinkit.parallel)
        if parts > 1:
            return run_split(forward_function(self, split=True), x, parts, self)
        return forward_function(self, split=False)(x)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` this model in place (``torch.nn.Module.compile``), keeping its batch split.

        ``torch.compile(model)`` traces :meth:`forward` whole, so a CPU batch runs unsplit on all the
        intra-op threads. Here the compiled function is each share's forward: a CPU batch still splits
        over the image-parallel workers (:mod:`swinkit.parallel`), each running its images through
        the compiled graph on one thread. ``args`` and ``kwargs`` are torch.compile's. Dynamo's
        reordering of compiled graphs (an LRU list) is turned off for the whole process: workers
        looking up one function at once otherwise compiled a graph again.
        """
        compile_forward(self, *args, **kwargs)

    def _forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.config.features_only:
            return self.forward_features(x)
        return self.forward_head(self.stage_maps(x)[-1])


def check_images(x: Tensor, in_chans: int, dtype: torch.dtype | None = None) -> None:
    """Fail early, naming the shape or dtype, instead of deep inside a convolution. ``dtype``: the
    model's; the images must have it unless autocast casts them."""
    if torch.jit.is_tracing():
        # The jit tracer hands sizes over as tensors and records only this thread's PyTorch
        # operations: a trace failed, or (with the native kernel or the worker threads) stored their
        # results as constants and computed wrong outputs for other images.
        raise RuntimeError(
            "torch.jit.trace cannot trace swinkit models (nor can torch.onnx.export(..., dynamo=False), "
            "which uses it). For a graph, use swinkit.export.export(model, 'model.onnx') or "
            "fmt='torch-export' (the `swinkit export` command), or torch.compile."
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of images (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images (normalised), got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"expected a non-empty batch of images, got shape {tuple(x.shape)}")
    # Not while compiling: there the autocast query doubled the time to compile a training step
    # (swin_test: 17 -> 37 s); a compiled graph's own dtype error names the dtypes too.
    if (
        dtype is not None
        and x.dtype != dtype
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
    ):
        raise TypeError(
            f"images of dtype {x.dtype} for a model in {dtype}: convert one to the other (images.to(...) "
            "or model.to(...)), or run under torch.autocast"
        )


def static_size_under_compile(x: Tensor) -> None:
    """Under ``torch.compile``, compile one graph per image height and width (the batch may vary).

    With a symbolic height and width, torch 2.14's inductor spends minutes simplifying Swin's nested
    padding arithmetic (``swin_test``: 135 s at a second image size, 405 s at a third, against 26
    and 40 s for a graph of fixed size), so ``operator.index`` makes dynamo guard on their values.
    ``torch.export`` keeps them symbolic: its size-generic graph is built for that
    (``model.traced_window_attention``).
    """
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        operator.index(x.shape[2])
        operator.index(x.shape[3])


def resize_pos_embed(pos_embed: Tensor, grid: int, size: torch.Size | tuple[int, int]) -> Tensor:
    """Absolute position embedding ``(1, grid*grid, C)`` as a ``(1, H, W, C)`` map, bicubic if resized."""
    H, W = size
    embed = pos_embed.view(1, grid, grid, -1)
    if (grid, grid) == (H, W):
        return embed
    embed = F.interpolate(embed.permute(0, 3, 1, 2), size=(H, W), mode="bicubic", align_corners=False)
    return embed.permute(0, 2, 3, 1)


def _init_weights(module: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.02) linears, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = [
    "PatchEmbed",
    "PatchMerging",
    "SwinTransformer",
    "SwinTransformerBlock",
    "WindowAttention",
    "relative_position_index",
    "shift_window_mask",
    "window_and_shift",
    "window_partition",
    "window_reverse",
]
