"""The ``triton`` block path: window attention in one kernel that reads and writes the map itself.

The reference block copies the whole map for every step of (S)W-MSA: pad, roll, partition,
permute q / k / v into heads, attend, permute back, reverse, roll back, crop. Here the qkv
projection runs on the map as it is, and one Triton kernel (``swinkit._triton_kernels``) does the
rest per (image, window, head): it reads each window's tokens straight from the map through a
precomputed index table (shift, padding and partition in one read; a padded token's q, k, v are
the qkv bias, as the reference's zero padding gives), adds the position bias and shift mask,
takes the softmax in float32, multiplies by v and writes the result back to the tokens' map
positions. No per-window copy of the map and no ``(windows, heads, N, N)`` tensor is ever made.

The backward pass recomputes the same function with PyTorch ops (:func:`map_window_attention`)
and differentiates that: exact gradients, but no faster than the reference path's backward.

The kernel is compiled for CUDA GPUs. On CPU it runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is imported; slow): that is how the test suite checks it
on machines without a GPU. Not chosen by ``attn_impl="auto"``: its speed against
PyTorch's SDPA has not been measured on a GPU yet (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import reference_attention
from .fast import attention_bias, fused_block_forward, window_order
from .model import Pair, window_and_shift


def triton_available() -> bool:
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
    index, inverse = kernel_index(H, W, window, shift, x.device)
    Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
    bias = attention_bias(attn, window, shift, Hp, Wp, x.dtype)
    post_norm = hasattr(block, "norm3")  # V2: res-post-norm, attention on the block input itself
    tokens = (x if post_norm else block.norm1(x)).reshape(B, H * W, C)
    attended = attn.proj_drop(attn.proj(_attend(attn, tokens, bias, index, inverse))).view_as(x)
    if post_norm:
        x = x + block.drop_path(block.norm1(attended))
        x = x + block.drop_path(block.norm2(block.mlp(x)))
        return block.norm3(x)
    x = x + block.drop_path(attended)
    return x + block.drop_path(block.mlp(block.norm2(x)))


@functools.lru_cache(maxsize=128)
def kernel_index(H: int, W: int, window: Pair, shift: Pair, device: torch.device) -> tuple[Tensor, Tensor]:
    """``index`` (``nW * N`` int32, -1 for padded tokens) and ``inverse`` of :func:`~swinkit.fast.window_order`."""
    index, inverse, padded = window_order(H, W, window, shift, device)
    if padded is not None:
        index = torch.where(padded, -1, index)
    return index.to(torch.int32), inverse


def _attend(attn: nn.Module, tokens: Tensor, bias: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """Attention of every map token of ``tokens`` ``(B, L, C)``, before the output projection."""
    C = tokens.shape[-1]
    cosine = hasattr(attn, "logit_scale")
    if cosine:  # V2: q and v biases, none for k
        from .model_v2 import MAX_LOGIT_SCALE

        qkv_bias = None if attn.q_bias is None else torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        scales = torch.clamp(attn.logit_scale, max=MAX_LOGIT_SCALE).exp().flatten()
    else:
        qkv_bias = attn.qkv.bias
        scales = torch.full((attn.num_heads,), attn.scale, dtype=torch.float64, device=tokens.device)
    qkv = F.linear(tokens, attn.qkv.weight, qkv_bias)
    if qkv_bias is None:
        qkv_bias = torch.zeros(3 * C, dtype=qkv.dtype, device=qkv.device)
    eps = max(1e-12, torch.finfo(tokens.dtype).tiny)
    return MapWindowAttention.apply(qkv, qkv_bias, bias, scales, index, inverse, attn.num_heads, cosine, eps)


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
    """The kernel forward; the backward differentiates :func:`map_window_attention` (recomputed)."""

    @staticmethod
    def forward(ctx, qkv, qkv_bias, bias, scales, index, inverse, heads, cosine, eps):
        ctx.save_for_backward(qkv, qkv_bias, bias, scales, index, inverse)
        ctx.settings = (heads, cosine, eps)
        return launch(qkv, qkv_bias, bias, scales, index, heads, cosine, eps)

    @staticmethod
    def backward(ctx, grad):
        qkv, qkv_bias, bias, scales, index, inverse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        inputs = [t.detach().requires_grad_(need) for t, need in zip((qkv, qkv_bias, bias, scales), needs, strict=True)]
        with torch.enable_grad():
            out = map_window_attention(*inputs, index, inverse, *ctx.settings)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None, None, None)


def launch(
    qkv: Tensor, qkv_bias: Tensor, bias: Tensor, scales: Tensor, index: Tensor, heads: int, cosine: bool, eps: float
) -> Tensor:
    """Run the kernel: ``(B, L, 3C)`` map-order qkv -> ``(B, L, C)`` attention output."""
    B, L, three_C = qkv.shape
    C, N = three_C // 3, bias.shape[-1]
    d = C // heads
    windows = index.numel() // N
    out = torch.empty(B, L, C, dtype=qkv.dtype, device=qkv.device)
    block_m = min(64, max(16, _power_of_two(N)))
    grid = (B * windows * heads, -(-N // block_m))
    wide = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    _kernel()[grid](
        qkv.contiguous(),
        qkv_bias.to(qkv.dtype).contiguous(),
        index,
        bias.contiguous(),
        scales.to(wide).contiguous(),
        out,
        L,
        N,
        windows,
        heads,
        bias.shape[0],
        d,
        C,
        eps,
        COSINE=cosine,
        BLOCK_M=block_m,
        BLOCK_N=block_m,
        BLOCK_D=max(16, _power_of_two(d)),
        ACC=_triton_dtype(wide),
    )
    return out


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.cache
def _kernel():
    """The kernel, compiled by ``triton.jit`` (an interpreted function under ``TRITON_INTERPRET=1``)."""
    import triton

    from ._triton_kernels import window_attention_forward

    return triton.jit(window_attention_forward)


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
