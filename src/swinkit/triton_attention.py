"""The ``triton`` block path: window attention in one kernel that reads and writes the map itself.

The reference block copies the whole map for every step of (S)W-MSA: pad, roll, partition,
permute q / k / v into heads, attend, permute back, reverse, roll back, crop. Here the qkv
projection runs on the map as it is, and one Triton kernel (``swinkit._triton_kernels``) does the
rest per (image, window, head): it reads each window's tokens straight from the map through a
precomputed index table (shift, padding and partition in one read; a padded token's q, k, v are
the qkv bias, as the reference's zero padding gives), adds the position bias and shift mask,
takes the softmax in float32, multiplies by v and writes the result back to the tokens' map
positions. No per-window copy of the map and no ``(windows, heads, N, N)`` tensor is ever made.

A block also takes each of its LayerNorms in one kernel with the residual add next to it and the
cast to the linear layers' dtype: V1's add before its second norm (:func:`norm_rows`, in training
with a backward kernel), V2's add after each norm (:func:`residual_plus_norm`, eval inference).

The backward pass is two more kernels in the same layout (flash-attention style, from the
forward's saved log-sum-exp): one per key tile for dK, dV, the bias gradient and V2's scale
gradient, one per query tile for dQ; V2's normalisation is differentiated inside them. Gradients
of padded tokens go to the qkv bias. Only the bias gradient, ``(windows, heads, N, N)`` per image
before it is summed, is materialised, as every implementation must for a learned bias.

The kernels are compiled for CUDA GPUs. On CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is imported; slow): that is how the test suite checks it
on machines without a GPU. ``attn_impl="auto"`` picks it for bf16 / fp16 work on Ampere and
newer CUDA GPUs: measured on an H200 it is the fastest path there (see
:func:`swinkit.attention.cuda_auto_impl`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .attention import reference_attention
from .fast import attention_bias, fused_block_forward, window_order
from .model import Pair, window_and_shift

# The norm kernels (:func:`norm_rows`, :func:`residual_plus_norm`); False: PyTorch's LayerNorm,
# casts and adds, for measuring the kernels against them (benchmarks/triton_norms.py).
NORM_KERNEL = True
WIDE_DTYPES = (torch.float32, torch.float64)  # a residual stream V2's kernel takes


def triton_available() -> bool:
    """Whether Triton can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The block's function on ``(B, H, W, C)`` (V1 or V2), its attention done by the kernel."""
    check_runnable(x.device)
    attn = block.attn
    if attn.training and attn.attn_drop > 0:
        return fused_block_forward(block, x)  # the kernel has no attention dropout
    B, H, W, C = x.shape
    window, shift = window_and_shift(H, W, block.window_size, block.shift_size, block.always_shift)
    geometry = kernel_index(H, W, window, shift, x.device)
    Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
    bias = attention_bias(attn, window, shift, Hp, Wp, x.dtype).combined
    post_norm = hasattr(block, "norm3")  # V2: res-post-norm, attention on the block input itself
    if NORM_KERNEL and not post_norm:
        return _v1_with_norm_kernels(block, x, bias, geometry)
    if NORM_KERNEL and not torch.is_grad_enabled() and not block.training and x.dtype in WIDE_DTYPES:
        return _v2_without_autograd(block, x, bias, geometry)  # in eval: no drop path between norm and add
    tokens = (x if post_norm else block.norm1(x)).reshape(B, H * W, C)
    attended = attn.proj_drop(attn.proj(_attend(attn, tokens, bias, geometry))).view_as(x)
    if post_norm:
        x = x + block.drop_path(block.norm1(attended))
        x = x + block.drop_path(block.norm2(block.mlp(x)))
        return block.norm3(x)
    x = x + block.drop_path(attended)
    return x + block.drop_path(block.mlp(block.norm2(x)))


def _v1_with_norm_kernels(block: nn.Module, x: Tensor, bias: Tensor, geometry: tuple[Tensor, Tensor, int]) -> Tensor:
    """A V1 block whose norms are one kernel each (:func:`norm_rows`, with autograd a backward
    kernel too), each also casting to the linear layers' input dtype, the second with the residual
    add before it. On a GPU the passes over the map (norms, casts, adds), not the matrix products,
    took most of a forward (benchmarks/RESULTS.md, "GPU (H200, bf16)"); a block's elementwise
    passes go from seven (two norms, two casts to bf16, two residual adds, GELU) to four."""
    attn, dtype, rows = block.attn, _linear_input_dtype(x), x.flatten(1, 2)  # (B, H * W, C)
    _, tokens = norm_rows(block.norm1, rows, dtype)
    attended = block.drop_path(attn.proj_drop(attn.proj(_attend(attn, tokens, bias, geometry))))
    rows, hidden = norm_rows(block.norm2, rows, dtype, branch=attended)
    return (rows + block.drop_path(block.mlp(hidden))).view_as(x)


def _v2_without_autograd(block: nn.Module, x: Tensor, bias: Tensor, geometry: tuple[Tensor, Tensor, int]) -> Tensor:
    """A V2 block in eval without autograd, its float32 residual stream ``x``: each norm and the add
    after it in one kernel (:func:`residual_plus_norm`), the first also writing the sum in the MLP's
    input dtype. A block's elementwise passes go from seven (two norms, two adds, two casts, GELU) to
    four (the attention's input cast, two kernels, GELU)."""
    attn, dtype, rows = block.attn, _linear_input_dtype(x), x.flatten(1, 2)  # (B, H * W, C)
    attended = attn.proj_drop(attn.proj(_attend(attn, rows, bias, geometry)))
    rows, tokens = residual_plus_norm(block.norm1, rows, attended, dtype)
    rows, _ = residual_plus_norm(block.norm2, rows, block.mlp(tokens))
    return block.norm3(rows.view_as(x))


def _linear_input_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes ``x`` in: autocast's where it is on, else ``x``'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def norm_rows(norm: nn.LayerNorm, x: Tensor, dtype: torch.dtype, branch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``norm(x)``, or ``norm(x + branch)``, over the last dimension in one kernel.

    Returns the rows normalised (``x + branch`` in the dtype the add would give, or ``x`` itself)
    and ``norm`` of them in ``dtype``: computed in float32 (float64 for float64 rows) and rounded
    once, as autocast's float32 LayerNorm and its cast to the next linear layer's dtype round it.
    With autograd, differentiable in ``x``, ``branch`` and the norm's weight and bias
    (:class:`_NormRows`; first derivatives only).
    """
    inputs = (x, branch, norm.weight, norm.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        if branch is None:
            return x, _NormRows.apply(x, norm.weight, norm.bias, norm.eps, dtype)
        return _NormRowsAfterAdd.apply(x, branch, norm.weight, norm.bias, norm.eps, dtype)
    total, out, _, _ = _norm_rows(x, branch, norm.weight, norm.bias, norm.eps, dtype)
    return total, out


def _norm_rows(
    x: Tensor, branch: Tensor | None, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype, stats: bool = False
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The forward kernel: the rows (``x + branch`` or ``x``), their norm in ``dtype``, and with
    ``stats`` each row's mean and reciprocal standard deviation."""
    x = x.contiguous()
    total, other = x, x  # without a branch the kernel reads neither of the last two
    if branch is not None:
        other = branch.contiguous()
        total = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    tiles = _RowTiles.of(total)
    mean = torch.empty(tiles.rows, dtype=tiles.wide, device=x.device) if stats else out
    rstd = torch.empty(tiles.rows, dtype=tiles.wide, device=x.device) if stats else out
    _kernel("layer_norm_rows")[(tiles.programs,)](
        x, other, total, out, weight, bias, mean, rstd, tiles.rows, tiles.C, eps,
        HAS_BRANCH=branch is not None, SAVE_STATS=stats, **tiles.constants(),
    )  # fmt: skip
    return total, out, (mean if stats else None), (rstd if stats else None)


def _norm_rows_backward(
    saved: tuple[Tensor, Tensor, Tensor, Tensor], out_grad: Tensor | None, total_grad: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel: the gradients of the rows, of the weight and of the bias."""
    total, mean, rstd, weight = saved
    tiles = _RowTiles.of(total)
    out_grad = torch.zeros_like(total) if out_grad is None else out_grad.contiguous()
    x_grad = torch.empty_like(total)
    partial = torch.empty(2, tiles.programs, tiles.C, dtype=tiles.wide, device=total.device)
    _kernel("layer_norm_rows_backward")[(tiles.programs,)](
        total, mean, rstd, out_grad, out_grad if total_grad is None else total_grad.contiguous(), weight,
        x_grad, partial[0], partial[1], tiles.rows, tiles.C,
        HAS_TOTAL_GRAD=total_grad is not None, **tiles.constants(),
    )  # fmt: skip
    weight_grad, bias_grad = partial.sum(1).to(weight.dtype)  # per-program sums, in a fixed order
    return x_grad, weight_grad, bias_grad


class _NormRows(torch.autograd.Function):
    """``norm(x)`` in ``dtype`` by the kernels, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, dtype):
        _, out, mean, rstd = _norm_rows(x, None, weight, bias, eps, dtype, stats=True)
        ctx.save_for_backward(x.contiguous(), mean, rstd, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        x_grad, weight_grad, bias_grad = _norm_rows_backward(ctx.saved_tensors, out_grad, None)
        return x_grad, weight_grad, bias_grad, None, None


class _NormRowsAfterAdd(torch.autograd.Function):
    """``x + branch`` and its norm in ``dtype`` by the kernels, forward and backward: the sum's
    gradient is the rows' (the norm's and the sum's own, from its later uses) for both addends."""

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, dtype):
        total, out, mean, rstd = _norm_rows(x, branch, weight, bias, eps, dtype, stats=True)
        ctx.save_for_backward(total, mean, rstd, weight)
        ctx.dtypes = x.dtype, branch.dtype
        return total, out

    @staticmethod
    @once_differentiable
    def backward(ctx, total_grad, out_grad):
        rows_grad, weight_grad, bias_grad = _norm_rows_backward(ctx.saved_tensors, out_grad, total_grad)
        return rows_grad.to(ctx.dtypes[0]), rows_grad.to(ctx.dtypes[1]), weight_grad, bias_grad, None, None


def residual_plus_norm(
    norm: nn.LayerNorm, x: Tensor, branch: Tensor, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor | None]:
    """``x + norm(branch)`` over the last dimension in one kernel, without autograd (V2's
    res-post-norm); ``x`` float32 (or float64), and the norm computed in it as autocast's LayerNorm
    is. Returns the sum and, for a ``dtype`` other than ``x``'s, the sum in it (the next linear
    layer's input: autocast's cast, in the same pass)."""
    x, branch = x.contiguous(), branch.contiguous()
    total = torch.empty_like(x)
    out = torch.empty(x.shape, dtype=dtype, device=x.device) if dtype not in (None, x.dtype) else None
    tiles = _RowTiles.of(x)
    _kernel("residual_plus_layer_norm_rows")[(tiles.programs,)](
        x, branch, total, total if out is None else out, norm.weight, norm.bias, tiles.rows, tiles.C, norm.eps,
        WRITE_OUT=out is not None, **tiles.constants(),
    )  # fmt: skip
    return total, (total if dtype == x.dtype else out)


class _RowTiles(NamedTuple):
    """How the norm kernels split ``rows`` rows of ``C`` channels: ``per_program`` rows a program."""

    rows: int
    C: int
    per_program: int
    wide: torch.dtype  # the dtype they compute in

    @classmethod
    def of(cls, x: Tensor) -> _RowTiles:
        C = x.shape[-1]
        # 1024 values a program (8 rows of Swin-T's 96 channels, 8 values a thread): these kernels
        # wait on memory, and at sm_90 ptxas gave them 48-64 registers a thread, where 4096 values
        # took 196-255 and would leave a quarter as many warps in flight to hide that wait.
        per_program = max(1, 1024 // _power_of_two(C))
        return cls(x.numel() // C, C, per_program, _accumulator_dtype(x.dtype))

    @property
    def programs(self) -> int:
        return -(-self.rows // self.per_program)

    def constants(self) -> dict:
        return {"BLOCK_ROWS": self.per_program, "BLOCK_C": _power_of_two(self.C), "ACC": _triton_dtype(self.wide)}


@functools.lru_cache(maxsize=128)
def kernel_index(H: int, W: int, window: Pair, shift: Pair, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """``index``, ``inverse`` and the padded-token count of one map geometry (cached).

    ``index`` (``nW * N`` int32) is :func:`~swinkit.fast.window_order`'s, except that padded
    token ``s`` (in window order) is ``-1 - s``: the kernels read the qkv bias for it, and the
    backward pass writes its gradient to slot ``s``.
    """
    # Built as normal tensors even under inference mode: the cache outlives it, and the training
    # kernels save the index for backward, which an inference tensor may not be.
    with torch.inference_mode(False), torch.no_grad():
        index, inverse, padded = window_order(H, W, window, shift, device)
        if padded is None:
            return index.to(torch.int32), inverse, 0
        slots = -torch.cumsum(padded.long(), 0)  # -1, -2, ... at the padded tokens
        return torch.where(padded, slots, index).to(torch.int32), inverse, int(padded.sum())


def _attend(attn: nn.Module, tokens: Tensor, bias: Tensor, geometry: tuple[Tensor, Tensor, int]) -> Tensor:
    """Attention of every map token of ``tokens`` ``(B, L, C)``, before the output projection."""
    C = tokens.shape[-1]
    cosine = hasattr(attn, "logit_scales")  # V2's cosine attention
    qkv_bias = attn.combined_qkv_bias()
    if cosine:
        scales = attn.logit_scales().flatten()
    else:
        scales = torch.full((attn.num_heads,), attn.scale, dtype=torch.float64, device=tokens.device)
    qkv = F.linear(tokens, attn.qkv.weight, qkv_bias)
    if qkv_bias is None:
        qkv_bias = torch.zeros(3 * C, dtype=qkv.dtype, device=qkv.device)
    eps = max(1e-12, torch.finfo(tokens.dtype).tiny)
    if not torch.is_grad_enabled():  # eval / inference: no log-sum-exp to keep, no autograd node
        return launch(qkv, qkv_bias, bias, scales, geometry[0], Settings(attn.num_heads, cosine, eps))[0]
    return MapWindowAttention.apply(qkv, qkv_bias, bias, scales, geometry, attn.num_heads, cosine, eps)


def map_window_attention(
    qkv: Tensor,
    qkv_bias: Tensor,
    bias: Tensor,
    scales: Tensor,
    index: Tensor,
    inverse: Tensor,
    heads: int,
    cosine: bool,
    eps: float,
) -> Tensor:
    """What the kernel computes, in PyTorch ops: ``(B, L, 3C)`` map-order qkv -> ``(B, L, C)``.

    Like the kernel, it computes in float32 at least (float16 / bfloat16 inputs from autocast), and
    returns ``qkv``'s dtype.
    """
    B, L, three_C = qkv.shape
    C, N = three_C // 3, bias.shape[-1]
    windows = index.numel() // N
    wide = torch.promote_types(qkv.dtype, torch.float32)
    if qkv.dtype != wide:
        plain = map_window_attention(qkv.to(wide), qkv_bias, bias, scales, index, inverse, heads, cosine, eps)
        return plain.to(qkv.dtype)
    qkv_bias, bias = qkv_bias.to(wide), bias.to(wide)
    rows = torch.cat((qkv, qkv_bias.expand(B, 1, three_C)), dim=1)  # row L: a padded token
    tokens = rows.index_select(1, torch.where(index < 0, L, index.long()))
    q, k, v = tokens.view(B * windows, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if cosine:
        q, k = F.normalize(q, dim=-1, eps=eps), F.normalize(k, dim=-1, eps=eps)
    out = reference_attention(q * scales.view(heads, 1, 1).to(q.dtype), k, v, bias, 0.0, False)
    return out.transpose(1, 2).reshape(B, windows * N, C).index_select(1, inverse)


class MapWindowAttention(torch.autograd.Function):
    """Forward and backward by the kernels; gradients for qkv, the qkv bias, the bias and the scales."""

    @staticmethod
    def forward(ctx, qkv, qkv_bias, bias, scales, geometry, heads, cosine, eps):
        index, _, padded_count = geometry
        settings = Settings(heads, cosine, eps)
        out, lse = launch(qkv, qkv_bias, bias, scales, index, settings, save_lse=True)
        ctx.save_for_backward(qkv, qkv_bias, bias, scales, index, out, lse)
        ctx.settings, ctx.padded_count = settings, padded_count
        return out

    @staticmethod
    def backward(ctx, grad):
        qkv, qkv_bias, bias, scales, index, out, lse = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        grads = launch_backward(
            qkv, qkv_bias, bias, scales, index, out, lse, grad, ctx.settings, ctx.padded_count, wanted[2], wanted[3]
        )
        return (*grads, None, None, None, None)


class Settings(NamedTuple):
    heads: int
    cosine: bool
    eps: float


def launch(
    qkv: Tensor,
    qkv_bias: Tensor,
    bias: Tensor,
    scales: Tensor,
    index: Tensor,
    settings: Settings,
    save_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The forward kernel: ``(B, L, 3C)`` map-order qkv -> ``(B, L, C)`` output (and the log-sum-exp)."""
    shape = _Shape.of(qkv, bias, index, settings.heads)
    out = torch.empty(shape.B, shape.L, shape.C, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(shape.programs, shape.N, dtype=shape.wide, device=qkv.device) if save_lse else out
    _kernel("window_attention_forward")[(shape.programs, shape.tiles)](
        qkv.contiguous(),
        qkv_bias.to(qkv.dtype).contiguous(),
        index,
        bias.contiguous(),
        scales.to(shape.wide).contiguous(),
        out,
        lse,
        *shape.sizes(),
        settings.eps,
        COSINE=settings.cosine,
        SAVE_LSE=save_lse,
        **shape.blocks(),
    )
    return out, (lse if save_lse else None)


def launch_backward(
    qkv: Tensor,
    qkv_bias: Tensor,
    bias: Tensor,
    scales: Tensor,
    index: Tensor,
    out: Tensor,
    lse: Tensor,
    grad: Tensor,
    settings: Settings,
    padded_count: int,
    bias_grad: bool = True,
    scale_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The two backward kernels: gradients of ``qkv``, ``qkv_bias``, ``bias`` and ``scales``."""
    shape = _Shape.of(qkv, bias, index, settings.heads)
    device, wide = qkv.device, shape.wide
    qkv, qkv_bias, bias = qkv.contiguous(), qkv_bias.to(qkv.dtype).contiguous(), bias.contiguous()
    grad = grad.to(qkv.dtype).contiguous()
    scales_wide = scales.to(wide).contiguous()
    delta = (grad.to(wide) * out.to(wide)).view(shape.B, shape.L, settings.heads, -1).sum(-1)
    qkv_grad = torch.empty_like(qkv)
    pad_grad = torch.empty(shape.B, max(padded_count, 1), 3 * shape.C, dtype=wide, device=device)
    dS = torch.empty(shape.programs, shape.N, shape.N, dtype=wide, device=device) if bias_grad else lse
    scale_parts = torch.empty(shape.programs, shape.tiles, dtype=wide, device=device) if scale_grad else lse
    common = (qkv, qkv_bias, index, bias, scales_wide, lse, delta, grad, qkv_grad, pad_grad)
    sizes = (*shape.sizes(), padded_count, settings.eps)
    _kernel("window_attention_backward_keys")[(shape.programs, shape.tiles)](
        *common, dS, scale_parts, *sizes,
        COSINE=settings.cosine, BIAS_GRAD=bias_grad, SCALE_GRAD=scale_grad, **shape.blocks(),
    )  # fmt: skip
    _kernel("window_attention_backward_queries")[(shape.programs, shape.tiles)](
        *common, *sizes, COSINE=settings.cosine, **shape.blocks()
    )
    qkv_bias_grad = pad_grad[:, :padded_count].sum((0, 1)).to(qkv_bias.dtype)
    if bias_grad:  # window w used bias[w % nWb]: sum over images and the windows sharing one
        dS = dS.view(shape.B, shape.windows // bias.shape[0], *bias.shape).sum((0, 1)).to(bias.dtype)
    if scale_grad:
        scale_parts = scale_parts.view(-1, settings.heads, shape.tiles).sum((0, 2)).to(scales.dtype)
    return qkv_grad, qkv_bias_grad, dS if bias_grad else None, scale_parts if scale_grad else None


class _Shape(NamedTuple):
    """Sizes of one launch: images, map tokens, channels, window tokens, windows, heads, bias windows."""

    B: int
    L: int
    C: int
    N: int
    windows: int
    heads: int
    bias_windows: int
    wide: torch.dtype

    @classmethod
    def of(cls, qkv: Tensor, bias: Tensor, index: Tensor, heads: int) -> _Shape:
        B, L, three_C = qkv.shape
        N = bias.shape[-1]
        return cls(B, L, three_C // 3, N, index.numel() // N, heads, bias.shape[0], _accumulator_dtype(qkv.dtype))

    @property
    def programs(self) -> int:
        return self.B * self.windows * self.heads

    @property
    def block(self) -> int:  # tokens per tile: a 7 x 7 window is one 64-token tile
        return min(64, max(16, _power_of_two(self.N)))

    @property
    def tiles(self) -> int:
        return -(-self.N // self.block)

    def sizes(self) -> tuple[int, ...]:
        return (self.L, self.N, self.windows, self.heads, self.bias_windows, self.C // self.heads, self.C)

    def blocks(self) -> dict:
        d = self.C // self.heads
        return {
            "BLOCK_M": self.block,
            "BLOCK_N": self.block,
            "BLOCK_D": max(16, _power_of_two(d)),
            "ACC": _triton_dtype(self.wide),
        }


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute ``dtype`` data in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# Compiled kernels are tuned on their first call per (window tokens, head dim, channels, dtypes):
# 4 warps keep register pressure high (205 registers a thread for the bf16 forward on sm_90, a few
# bytes spilled in the backward), 8 warps halve it; which runs faster is the GPU's to say.
WARPS = (4, 8)
TUNED = ("window_attention_forward", "window_attention_backward_keys", "window_attention_backward_queries")


@functools.cache
def _kernel(name: str):
    """A kernel of ``swinkit._triton_kernels`` (importing it imports triton, whose interpreter
    setting is read then), wrapped in ``triton.autotune`` over :data:`WARPS` when compiled."""
    import triton
    from triton.runtime.jit import JITFunction

    from . import _triton_kernels

    kernel = getattr(_triton_kernels, name)
    if not isinstance(kernel, JITFunction) or name not in TUNED:  # interpreted, or the norm kernel: not tuned
        return kernel
    configs = [triton.Config({}, num_warps=warps) for warps in WARPS]
    return triton.autotune(configs=configs, key=["N", "d", "C"])(kernel)


def check_runnable(device: torch.device) -> None:
    """Refuse, by name, a device the kernel cannot run on, before any work is done."""
    if not triton_available():
        raise ValueError("attn_impl='triton' needs the triton package (pip install triton); or use 'auto'")
    if device.type == "cuda":
        return
    import triton

    if not triton.knobs.runtime.interpret:
        raise ValueError(
            f"attn_impl='triton' runs on CUDA GPUs, not on {device.type} tensors (except under Triton's "
            "interpreter, TRITON_INTERPRET=1, set before triton is imported: slow, for testing); "
            "use 'auto' (fused on CPU)"
        )
