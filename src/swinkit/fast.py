"""The ``fused`` block path: the same function as the reference blocks, computed in window order.

The reference block pads, rolls, partitions, attends, reverses, rolls back and crops, and every
step copies the whole map. Here one precomputed gather takes the map straight into window order
(shift, padding and partition at once) and one gather takes it back; everything between is
per token or per window, so the whole block (norm, attention, projection, residual, MLP, residual)
runs in window order. Without autograd it runs a few images at a time, so the large intermediates
(``qkv``, the MLP's hidden layer) stay small and cache-resident instead of being fresh
page-faulting allocations, and the bias is added into the linear outputs instead of copied. In
float32 the linear layers run through oneDNN (``_linear``): without autograd with packed weights
and GELU / the residual add applied in the same call, in training through ``OneDNNLinear``. Under
CPU bfloat16 autocast without autograd they run through oneDNN in bfloat16 from weights converted
and packed once (autocast's F.linear converts them on every call), and the attention through the
native kernel in float32.

Padded tokens enter attention as zeros after the first norm, exactly like the reference (the
official detection code's padding), and are dropped on the way back.

Under torch.compile (CPU) the same window-order blocks are traced, the whole batch (or with
``model.compile()`` a worker's share of it) at once, with the native kernel and oneDNN's linears as
operators (``swinkit::window_attention``, ``swinkit::linear``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import native
from .attention import reference_attention
from .model import (
    Pair,
    cells,
    shift_window_mask,
    tracing,
    window_and_shift,
    window_gather_indices,
)
from .parallel import drop_path_scales, sole_gradient
from .quantize import is_int8

WindowOrder = tuple[Tensor, Tensor, Tensor | None]

FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32

# Tokens per chunk when no gradient is needed: about 1.5-5 MB per intermediate for Swin-T.
CHUNK_TOKENS = 4096

# oneDNN's float32 linear runs 3-16% faster than the MKL GEMM behind F.linear on AVX-512 CPUs for
# Swin's shapes (level on AVX2), and applies GELU or a residual add before its output leaves the cache.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# The input gradient of a training linear: MKL's GEMM on Intel CPUs (13% faster than oneDNN over
# Swin-T's shapes on a Xeon with AVX-512, 1.9x at stage 4's fc2, where oneDNN reorders the transposed
# weight on every call); oneDNN elsewhere (10-20% faster than MKL on an AMD EPYC).
MKL_INPUT_GRADIENT = native.cpu_vendor() == "GenuineIntel"


def window_order(
    H: int, W: int, window: Pair, shift: Pair, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gather indices between a row-major ``H`` x ``W`` map and its shifted, padded windows (cached).

    Returns ``index`` (``nW * N``: the map position each window token reads; padded tokens read
    position 0 and are masked), ``inverse`` (``H * W``: the window token each map position comes
    back from) and ``padded`` (``nW * N`` booleans, or None without padding).
    """
    if tracing():
        return _window_order(H, W, window, shift, device)
    return _cached_window_order(H, W, window, shift, device)


def _window_order(
    H: int, W: int, window: Pair, shift: Pair, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    with torch.inference_mode(False), torch.no_grad():
        counts = (cells(H, window[0]), cells(W, window[1]))
        source, inverse = window_gather_indices((H, W), window, shift, counts, torch.device("cpu"))
        valid = source < H * W  # H * W is the zero token standing for padding
        index = torch.where(valid, source, 0)
        # Padding is there exactly when the windows overhang the map (decided without reading
        # `valid`, so that torch.compile traces no data-dependent branch).
        overhang = counts[0] * window[0] != H or counts[1] * window[1] != W
        padded = (~valid).to(device) if overhang else None
        return index.to(device), inverse.to(device), padded


_cached_window_order = functools.lru_cache(maxsize=128)(_window_order)


# Part of every cache key below, bumped by forget_cached_weights(): a parameter written without its
# version counter moving (FSDP gathers the trained shards into the same unsharded storage each
# forward, uncounted) must not serve the caches of before the write.
_generation = 0


def forget_cached_weights() -> None:
    """Drop what the no-grad caches derived from parameters (packed linear weights, position biases):
    the next forward rebuilds it. An optimizer step over sharded (FSDP) parameters does this, and the
    training loop before each validation; call it after writing parameters in a way torch does not
    count. (Not at every optimizer step: a frozen Swin run under no_grad beside a module that trains
    would rebuild its caches each step, twice as slow.)"""
    global _generation
    _generation += 1


def _is_sharded(parameter: Tensor) -> bool:
    sharded = _sharded_type()
    return sharded is not None and isinstance(parameter, sharded)


@functools.cache
def _sharded_type() -> type | None:
    """FSDP's parameter type, DTensor; imported on first use (None in a torch built without distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _count_fused_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """After every optimizer step: a fused one (``fused=True``, which swinkit's ``build_optimizer``
    picks) writes the parameters in place without counting it in their version counters (torch
    2.14; the foreach and for-loop forms count it), and the caches here are keyed by those counters.
    Without this, a no-grad forward after training steps ran on the packed linear weights and
    position biases of before them: the demo's validation during training read 94% where the
    trained model gave 99%. Counted here for every parameter of the fused groups, as the other
    forms do. A step over FSDP's sharded parameters (DTensors) starts a new cache generation: the
    unsharded ones it gathers later move no counter."""
    if any(_is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
        forget_cached_weights()
    for group in optimizer.param_groups:
        if group.get("fused"):
            torch.autograd.graph.increment_version([p for p in group["params"] if not p.is_inference()])


register_optimizer_step_post_hook(_count_fused_step)


def _parameter_versions(module: nn.Module) -> tuple[int | tuple[int, int], ...]:
    # The cache generation, then each parameter's storage address with its version counter: an
    # in-place write bumps the counter, and a replaced parameter (`load_state_dict(assign=True)`,
    # `param.data = ...`) is new storage, whose counter may well be the old one's (0 for two loads
    # in a row: the counters alone served the first load's position bias after the second).
    # Parameters made under torch.inference_mode have no version counter, so their address alone (a
    # model built that way is not trained, and loads into it copy in place under inference mode,
    # untracked anyway).
    versions = (p.data_ptr() if p.is_inference() else (p.data_ptr(), p._version) for p in module.parameters())
    return (_generation, *versions)


class WindowBias:
    """A block's attention bias: the relative position bias ``position``, ``(1, nH, N, N)``, and in a
    shifted block the shift mask ``mask``, ``(nW, N, N)`` (else None).

    The native kernel takes the two apart, the mask as its few distinct patterns (``patterns``); the
    PyTorch paths add ``combined``, the two added per window, ``(nW or 1, nH, N, N)``. Both are
    built on first use.
    """

    def __init__(self, position: Tensor, mask: Tensor | None, geometry: tuple[int, int, Pair, Pair]) -> None:
        self.position, self.mask, self.geometry = position, mask, geometry
        self._combined: Tensor | None = None

    @property
    def combined(self) -> Tensor:
        # Kept by hand: functools.cached_property takes a lock on Python 3.11, which torch.compile
        # cannot trace. Two image-parallel workers may both build it; either result is the same.
        if self._combined is None:
            self._combined = self.position if self.mask is None else self.position + self.mask.unsqueeze(1)
        return self._combined

    @functools.cached_property
    def patterns(self) -> native.ShiftMask | None:
        return None if self.mask is None else _shift_mask_patterns(*self.geometry)

    def shift_geometry(self) -> list[int]:
        """``[Hp, Wp, window h, window w, shift h, shift w]`` of a shifted block, ``[]`` otherwise."""
        Hp, Wp, window, shift = self.geometry
        return [] if self.mask is None else [Hp, Wp, *window, *shift]


@functools.lru_cache(maxsize=128)
def _shift_mask_patterns(Hp: int, Wp: int, window: Pair, shift: Pair) -> native.ShiftMask:
    return native.ShiftMask.of(shift_window_mask(Hp, Wp, window, shift, torch.float32, torch.device("cpu")))


def attention_bias(attn: nn.Module, window: Pair, shift: Pair, Hp: int, Wp: int, dtype: torch.dtype) -> WindowBias:
    """The block's position bias and shift mask (:class:`WindowBias`); cached without autograd.

    The cache key holds the version counters of the module's parameters, so loading or
    training new weights rebuilds it.
    """
    device = next(attn.parameters()).device
    if torch.is_grad_enabled() or tracing():
        return _build_bias(attn, window, shift, Hp, Wp, dtype, device)
    key = (window, shift, Hp, Wp, dtype, device, _parameter_versions(attn))
    cache = attn.__dict__.setdefault("_fused_bias_cache", {})
    bias = cache.get(key)  # one read: image-parallel workers (swinkit.parallel) share this cache
    if bias is None:
        bias = _build_bias(attn, window, shift, Hp, Wp, dtype, device)
        cache.clear()  # one geometry per block at a time keeps memory flat
        cache[key] = bias
    return bias


def _build_bias(attn: nn.Module, window: Pair, shift: Pair, Hp: int, Wp: int, dtype, device) -> WindowBias:
    position = attn.relative_position_bias(window).to(dtype).unsqueeze(0)
    mask = shift_window_mask(Hp, Wp, window, shift, dtype, device) if shift[0] or shift[1] else None
    return WindowBias(position, mask, (Hp, Wp, window, shift))


def _attend(attn: nn.Module, h: Tensor, window_count: int, bias: WindowBias) -> Tensor:
    """Attention of ``h`` (``(c * nW, N, C)`` windows) through the output projection, before its bias."""
    # One head at a time pays on CPU caches; a GPU wants the few large batched products instead.
    if (attn.training and attn.attn_drop > 0) or h.device.type != "cpu":
        return _attend_batched(attn, h, window_count, bias)
    if torch.is_grad_enabled():
        windows, N, C = h.shape
        qkv = _qkv_linear(attn, h).view(windows, N, 3 * C)
        out = _native_attention(attn, qkv, bias)
        return out if out is not None else _attend_batched(attn, h, window_count, bias, qkv)
    return _attend_by_head(attn, h, window_count, bias)


def _attend_batched(
    attn: nn.Module, h: Tensor, window_count: int, bias: WindowBias, qkv: Tensor | None = None
) -> Tensor:
    """All heads and windows at once through the reference seam (autograd, dropout, GPUs)."""
    windows, N, C = h.shape
    q, k, v = attn.split_heads(_qkv_linear(attn, h) if qkv is None else qkv)  # each (c*nW, nH, N, d), q scaled
    # Per-window bias as the reference seam expects it.
    combined = bias.combined.expand(window_count, -1, -1, -1)
    out = reference_attention(q, k, v, combined, attn.attn_drop, attn.training)
    return out.transpose(1, 2).reshape(windows * N, C)


def _attend_by_head(attn: nn.Module, h: Tensor, window_count: int, bias: WindowBias) -> Tensor:
    """No-grad attention of ``h`` (``(c * nW, N, C)`` windows): the native kernel where it applies
    (:mod:`swinkit.native`), else :func:`heads_attention`."""
    windows, N, C = h.shape
    qkv = _qkv_linear(attn, h).view(windows, N, 3 * C)
    out = _native_attention(attn, qkv, bias)
    if out is not None:
        return out
    cosine = hasattr(attn, "logit_scale")
    return heads_attention(qkv, attn.num_heads, window_count, bias.combined, _head_scales(attn), cosine)


def _native_attention(attn: nn.Module, qkv: Tensor, bias: WindowBias) -> Tensor | None:
    """Attention of ``qkv`` (``(windows, N, 3C)``) through the native kernel, as ``(windows * N, C)``;
    None where the kernel does not apply."""
    windows, N, width = qkv.shape
    if compiling():  # the operator splits the windows over the threads itself: any thread count
        usable = native.takes(qkv, attn.num_heads, N, bias.position) and native.built()
    else:
        usable = native.applies(qkv, attn.num_heads, N, bias.position) and not tracing()
    if not usable:
        return None
    cosine = hasattr(attn, "logit_scale")
    # V2's learned logit scales as a tensor, so that in training they get their gradient too.
    scales = attn.logit_scales().flatten() if cosine else torch.full((attn.num_heads,), attn.scale)
    scales = scales.to(torch.float32)
    if compiling():
        position = bias.position.float().contiguous()
        out = torch.ops.swinkit.window_attention(qkv, position, scales, attn.num_heads, cosine, bias.shift_geometry())
    else:
        out = native.window_attention(qkv, attn.num_heads, bias.position, scales, cosine, mask=bias.patterns)
    return out.view(windows * N, width // 3)


def compiling() -> bool:
    """Whether torch.compile traces (torch.export traces the blocks as written, for other runtimes)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


# The native kernel as operators that torch.compile keeps whole in its graphs (their arguments are
# tensors and plain numbers; a shifted block's mask patterns are found from its geometry when the
# operator runs). There it takes the running thread's intra-op threads, its windows split over
# them: all of them for a graph of torch.compile(model), which runs the whole batch in the caller's
# thread; one in a worker running its share under model.compile().


@torch.library.custom_op("swinkit::window_attention", mutates_args=(), device_types="cpu")
def _compiled_attention(
    qkv: Tensor, position: Tensor, scales: Tensor, heads: int, cosine: bool, shift_geometry: list[int]
) -> Tensor:
    """:func:`native.window_attention` of ``qkv`` with the ``position`` bias and the shift mask of
    ``shift_geometry`` (:meth:`WindowBias.shift_geometry`)."""
    mask = _geometry_mask(shift_geometry)
    return native._forward(qkv.contiguous(), heads, position, scales, cosine, None, mask, torch.get_num_threads())


@_compiled_attention.register_fake
def _(qkv: Tensor, position: Tensor, scales: Tensor, heads: int, cosine: bool, shift_geometry: list[int]) -> Tensor:
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


@torch.library.custom_op("swinkit::window_attention_backward", mutates_args=(), device_types="cpu")
def _compiled_attention_backward(
    qkv: Tensor, grad: Tensor, position: Tensor, scales: Tensor, heads: int, cosine: bool, shift_geometry: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`native.window_attention_backward`: the gradients of ``qkv``, ``position`` and ``scales``."""
    mask = _geometry_mask(shift_geometry)
    parts = torch.get_num_threads()
    return native.window_attention_backward(qkv, grad, heads, position, scales, cosine, None, mask, parts)


@_compiled_attention_backward.register_fake
def _(
    qkv: Tensor, grad: Tensor, position: Tensor, scales: Tensor, heads: int, cosine: bool, shift_geometry: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    return qkv.new_empty(qkv.shape), position.new_empty(position.shape), scales.new_empty(scales.shape)


def _keep_for_backward(ctx, inputs: tuple, output: Tensor) -> None:
    qkv, position, scales, ctx.heads, ctx.cosine, ctx.shift_geometry = inputs
    ctx.save_for_backward(qkv, position, scales)


def _compiled_attention_gradients(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    qkv, position, scales = ctx.saved_tensors
    backward = torch.ops.swinkit.window_attention_backward
    return *backward(qkv, grad, position, scales, ctx.heads, ctx.cosine, ctx.shift_geometry), None, None, None


_compiled_attention.register_autograd(_compiled_attention_gradients, setup_context=_keep_for_backward)


def _geometry_mask(shift_geometry: list[int]) -> native.ShiftMask | None:
    if not shift_geometry:
        return None
    Hp, Wp, window_h, window_w, shift_h, shift_w = shift_geometry
    return _shift_mask_patterns(Hp, Wp, (window_h, window_w), (shift_h, shift_w))


def heads_attention(
    qkv: Tensor, heads: int, window_count: int, bias: Tensor, scales: list[float] | Tensor, cosine: bool
) -> Tensor:
    """Attention one head at a time in PyTorch operations, on each head's q, k, v as strided slices
    of ``qkv`` (``(windows, N, 3C)``); returns ``(windows * N, C)``, the heads side by side.

    Permuting the whole ``qkv`` tensor into head-major layout is a strided copy that costs as much
    as the attention itself at 12 heads; ``bmm`` reads the per-head slices in place (row stride
    ``3C``), a little faster than copying them out first (torch 2.14).
    """
    windows, N, width = qkv.shape
    C, d = width // 3, width // 3 // heads
    eps = max(1e-12, torch.finfo(qkv.dtype).tiny)
    out = torch.empty(heads, windows, N, d, dtype=qkv.dtype, device=qkv.device)
    images = windows // window_count
    # The shift mask's -100 leaves probabilities below float32's normal range, and every product
    # with one takes a microcode assist (the shifted blocks' bmm ran 8x slower on two threads). They
    # are set to zero, as a thread that flushes subnormals (an image-parallel worker) computes them;
    # bfloat16 has float32's range and is multiplied in float32. Float64 and float16 are left alone.
    flush = qkv.dtype in (torch.float32, torch.bfloat16)
    for head in range(heads):
        q, k, v = (qkv[:, :, part * C + head * d : part * C + (head + 1) * d] for part in range(3))
        if cosine:
            q, k = F.normalize(q, dim=-1, eps=eps), F.normalize(k, dim=-1, eps=eps)
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scales[head])  # (c*nW, N, N)
        scores.view(images, window_count, N, N).add_(bias[:, head])
        probabilities = torch.softmax(scores, dim=-1)
        if flush:
            F.threshold(probabilities, FLOAT32_TINY, 0.0, inplace=True)
        torch.bmm(probabilities, v, out=out[head])
    return out.permute(1, 2, 0, 3).reshape(windows * N, C)


def _onednn(x: Tensor) -> bool:
    """oneDNN takes the linear layers of float32 CPU work, eager or under torch.compile (as
    ``swinkit::linear``), unless ``torch.backends.mkldnn`` is turned off. Not under torch.export (no
    export form) or autocast (F.linear picks the reduced dtype)."""
    return (
        ONEDNN_LINEAR
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_exporting()
    )


# oneDNN's bfloat16 linears on CPUs with native bfloat16 (AMX, AVX-512 BF16): 4-10x its float32 rate
# per core for Swin's shapes on a Xeon with AMX, and 1.0-1.5x autocast's F.linear on the same CPU
# (weights packed once instead of cast on every call).
ONEDNN_BFLOAT16 = ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_bfloat16(x: Tensor) -> bool:
    """No-grad CPU work under bfloat16 autocast (``--amp bf16``) on a CPU with native bfloat16:
    the linear layers run through oneDNN in bfloat16, as autocast's F.linear would, from weights
    converted and packed once."""
    return (
        ONEDNN_BFLOAT16
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)  # what autocast would run in bfloat16
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not torch.is_grad_enabled()
        and not tracing()
    )


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    # For GELU, algorithm "none" is the exact (erf) form, as nn.GELU's default.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


_packed_weights = WeakIdKeyDictionary()  # weight -> {dtype: (its version, the weight in oneDNN's layout)}


def _packed(weight: Tensor, rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``weight`` in ``dtype``, reordered once into oneDNN's blocked layout (2-4% faster than a
    reorder per call, the same numbers), kept until the weight changes; it costs a second copy of
    the linear weights (per dtype used)."""
    if weight.is_inference():
        # No version counter to see an in-place load by: converted and reordered per call instead.
        return weight.to(dtype)
    version = (_generation, weight.data_ptr(), weight._version)
    per_dtype = _packed_weights.setdefault(weight, {})
    cached = per_dtype.get(dtype)
    if cached is None or cached[0] != version:
        cached = (version, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows))
        per_dtype[dtype] = cached
    return cached[1]


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN for the forward, MKL for the weight gradient (there oneDNN is slower)
    and, for the input gradient, whichever of the two :data:`MKL_INPUT_GRADIENT` picks for this CPU."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        # A leaf (a parameter used as it is) gets its gradient from here alone. A computed weight
        # (a parametrization's original + A B) may hand the same gradient tensor to several inputs.
        ctx.leaves = (weight.is_leaf, bias is not None and bias.is_leaf)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        # Under create_graph=True the MKL product is differentiable: second-order gradients.
        by_mkl = torch.is_grad_enabled() or MKL_INPUT_GRADIENT
        grad_x, *grads = _linear_gradients(grad, x, weight, ctx.has_bias, ctx.needs_input_grad, by_mkl)
        marked = [sole_gradient(g) if g is not None and leaf else g for g, leaf in zip(grads, ctx.leaves, strict=True)]
        return grad_x, *marked


def _linear_gradients(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, needed: tuple[bool, ...], input_by_mkl: bool = True
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``x``, ``weight`` and the bias of ``x W^T + b`` given ``grad`` of its output,
    those ``needed``; the input gradient by MKL's GEMM or, if not ``input_by_mkl``, oneDNN's."""
    rows = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_weight = grad_bias = None
    if needed[0]:
        grad_x = rows.mm(weight) if input_by_mkl else _onednn_linear(rows, weight.t(), None)
        grad_x = grad_x.view(x.shape)
    if needed[1]:
        grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1]))
    if has_bias and needed[2]:
        grad_bias = rows.sum(0)
    return grad_x, grad_weight, grad_bias


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """``x W^T + b``, then GELU (exact, erf) if asked, through oneDNN where ``_onednn`` or
    ``_onednn_bfloat16`` allows."""
    if _onednn_bfloat16(x):
        rows = x.numel() // x.shape[-1]
        weight = _packed(weight, rows, torch.bfloat16)
        return _onednn_linear(x.to(torch.bfloat16), weight, bias, "gelu" if gelu else "none")
    if not _onednn(x):
        out = F.linear(x, weight, bias)
    elif compiling():
        if not torch.is_grad_enabled():
            return torch.ops.swinkit.linear(x, weight, bias, gelu, None, True)
        out = torch.ops.swinkit.linear(x, weight, bias, False, None, False)
    elif torch.is_grad_enabled():
        out = OneDNNLinear.apply(x, weight, bias)
    else:
        return _onednn_linear(x, _packed(weight, x.numel() // x.shape[-1]), bias, "gelu" if gelu else "none")
    return _gelu(out) if gelu else out


def _gelu(out: Tensor) -> Tensor:
    # In place without autograd: about 1.5x faster than a fresh output. With autograd, the gradient by
    # the native pass where it applies (torch.compile and torch.export keep PyTorch's, which they trace).
    if not torch.is_grad_enabled():
        return torch.ops.aten.gelu_(out)
    if not tracing() and native.gelu_applies(out):
        return native.GELU.apply(out)
    return F.gelu(out)


# oneDNN's linear as an operator for torch.compile, which would otherwise run each linear layer as
# addmm after copying the bias into its output (a sixth of a compiled Swin-T forward's GEMM time).


@torch.library.custom_op("swinkit::linear", mutates_args=(), device_types="cpu")
def _compiled_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool, residual: Tensor | None, packed: bool
) -> Tensor:
    """``x W^T + b`` through oneDNN, then GELU (exact) if ``gelu``, or plus ``residual`` (2-D ``x``);
    ``packed``: from the weight reordered once and kept (:func:`_packed`), for graphs without
    autograd (in training the weights change every step)."""
    if packed:
        weight = _packed(weight, x.numel() // x.shape[-1])
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return _onednn_linear(x, weight, bias, "gelu" if gelu else "none")


@_compiled_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool, residual: Tensor | None, packed: bool) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _keep_linear_inputs(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, ctx.gelu, residual, _ = inputs
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.save_for_backward(x, weight, bias)


def _compiled_linear_gradients(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, bias = ctx.saved_tensors
    grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[4] else None
    if ctx.gelu:  # GELU's gradient at the linear output, recomputed (swinkit passes gelu without autograd only)
        grad = torch.ops.aten.gelu_backward(grad, F.linear(x, weight, bias))
    return *_linear_gradients(grad, x, weight, ctx.has_bias, ctx.needs_input_grad), None, grad_residual, None


_compiled_linear.register_autograd(_compiled_linear_gradients, setup_context=_keep_linear_inputs)


def _qkv_linear(attn: nn.Module, h: Tensor) -> Tensor:
    if is_int8(attn.qkv):
        return attn.project_qkv(h)
    return _linear(h, attn.qkv.weight, attn.combined_qkv_bias())


def _apply(linear: nn.Linear, x: Tensor, gelu: bool = False) -> Tensor:
    """``linear(x)``, then GELU if asked: :func:`_linear` on its weights, or its own forward where it
    is int8 (:mod:`swinkit.quantize`)."""
    if not is_int8(linear):
        return _linear(x, linear.weight, linear.bias, gelu)
    out = linear(x)
    return _gelu(out) if gelu else out


def _head_scales(attn: nn.Module) -> list[float] | Tensor:
    if hasattr(attn, "logit_scales"):
        scales = attn.logit_scales().flatten()
        # Numbers multiply a little faster; a traced graph cannot read them out of a tensor (dynamo:
        # a graph break per block).
        return scales if compiling() else scales.tolist()
    return [attn.scale] * attn.num_heads


def _linear_into(residual: Tensor, x: Tensor, linear: nn.Linear) -> Tensor:
    """``residual + linear(x)`` with one GEMM writing onto the residual (no separate bias copy)."""
    if is_int8(linear):
        return linear(x, residual=residual)
    if _onednn_bfloat16(x):
        return residual + _linear(x, linear.weight, linear.bias)
    if torch.is_autocast_enabled(x.device.type):
        # Autocast would run addmm, residual included, in the reduced dtype; the reference adds the
        # reduced-precision branch to the residual stream in the stream's own dtype (float32 on CUDA).
        return residual + F.linear(x, linear.weight, linear.bias)
    if _onednn(x):
        if compiling() and torch.is_grad_enabled():
            return residual + torch.ops.swinkit.linear(x, linear.weight, linear.bias, False, None, False)
        if compiling():
            return torch.ops.swinkit.linear(x, linear.weight, linear.bias, False, residual, True)
        if torch.is_grad_enabled():
            return residual + OneDNNLinear.apply(x, linear.weight, linear.bias)
        weight = _packed(linear.weight, x.shape[0])
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, linear.bias, "add")
    out = torch.addmm(residual, x, linear.weight.t())
    return out.add_(linear.bias) if linear.bias is not None else out


def _mlp_hidden(mlp: nn.Module, x: Tensor) -> Tensor:
    if mlp.training and mlp.drop.p > 0:
        return mlp.drop(_apply(mlp.fc1, x, gelu=True))
    return _apply(mlp.fc1, x, gelu=True)


def _chunk_v1(block: nn.Module, x: Tensor, pad: Tensor | None, nW: int, N: int, bias: WindowBias) -> Tensor:
    """V1 block (pre-norm) on ``x``: ``(c * nW * N, C)`` tokens in window order."""
    C = x.shape[-1]
    if _plain_residuals(block):
        x = _linear_into(x, _attention_v1(block, x, pad, nW, N, bias), block.attn.proj)
        hidden = _mlp_hidden(block.mlp, F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, block.norm2.eps))
        return _linear_into(x, hidden, block.mlp.fc2)
    proj, fc2 = block.attn.proj, block.mlp.fc2

    def attention(x: Tensor) -> Tensor:
        return block.attn.proj_drop(_apply(proj, _attention_v1(block, x, pad, nW, N, bias)))

    def mlp(x: Tensor) -> Tensor:
        return block.mlp.drop(_apply(fc2, _mlp_hidden(block.mlp, block.norm2(x))))

    x = _residual(block, x, attention, nW * N)
    return _residual(block, x, mlp, nW * N)


def _attention_v1(block: nn.Module, x: Tensor, pad: Tensor | None, nW: int, N: int, bias: WindowBias) -> Tensor:
    """V1's first norm and attention of ``x``, before the output projection's bias."""
    C = x.shape[-1]
    h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    if pad is not None:
        h = h.view(-1, pad.numel(), C).masked_fill(pad[None, :, None], 0.0).view(-1, C)
    return _attend(block.attn, h.view(-1, N, C), nW, bias)


def _chunk_v2(block: nn.Module, x: Tensor, pad: Tensor | None, nW: int, N: int, bias: WindowBias) -> Tensor:
    """V2 block (res-post-norm) on ``x``: ``(c * nW * N, C)`` tokens in window order."""
    proj, fc2 = block.attn.proj, block.mlp.fc2

    def attention(x: Tensor) -> Tensor:
        C = x.shape[-1]
        h = x if pad is None else x.view(-1, pad.numel(), C).masked_fill(pad[None, :, None], 0.0).view(-1, C)
        attended = _apply(proj, _attend(block.attn, h.view(-1, N, C), nW, bias))
        return block.norm1(block.attn.proj_drop(attended))

    def mlp(x: Tensor) -> Tensor:
        return block.norm2(block.mlp.drop(_apply(fc2, _mlp_hidden(block.mlp, x))))

    x = _residual(block, x, attention, nW * N)
    return block.norm3(_residual(block, x, mlp, nW * N))


def _plain_residuals(block: nn.Module) -> bool:
    """No dropout or drop path is active, so the residual adds can be fused into the GEMMs."""
    if not block.training:
        return True
    return block.drop_path.p == 0 and block.attn.proj_drop.p == 0 and block.mlp.drop.p == 0


def _residual(block: nn.Module, x: Tensor, branch: Callable[[Tensor], Tensor], tokens_per_image: int) -> Tensor:
    """``x + drop_path(branch(x))`` on ``(images * tokens_per_image, C)`` tokens.

    With stochastic depth active it is one multiply-add per image, and on the CPU the branch is
    computed only for the images it keeps (see :func:`_skips_dropped_images`).
    """
    if not block.training or block.drop_path.p == 0:
        return x + branch(x)
    p, C = block.drop_path.p, x.shape[-1]
    images = x.view(-1, tokens_per_image, C)
    if not _skips_dropped_images(block, x):
        out = branch(x).view_as(images)
        return torch.addcmul(images, out, drop_path_scales(out, p)).view_as(x)
    kept, scale = drop_path_scales(images, p).view(-1).nonzero().view(-1), 1 / (1 - p)
    if kept.numel() == images.shape[0]:
        return torch.add(images, branch(x).view_as(images), alpha=scale).view_as(x)
    if kept.numel() == 0:
        # Every image dropped: the branch still runs on one, times zero, so that its parameters get
        # zero gradients as in the reference. None instead would make AdamW skip them (no weight
        # decay, no momentum step) and DDP wait for them.
        kept, scale = kept.new_zeros(1), 0.0
    subset = images.index_select(0, kept)
    out = branch(subset.view(-1, C)).view_as(subset)
    # Under autocast a float32 stream may get a bfloat16 branch: promoted, as the reference's sum is.
    dtype = torch.promote_types(images.dtype, out.dtype)
    return images.to(dtype).index_add(0, kept, out.to(dtype), alpha=scale).view_as(x)


def _skips_dropped_images(block: nn.Module, x: Tensor) -> bool:
    """Whether stochastic depth draws before its branch, which then runs on the kept images only.

    A dropped image's branch is multiplied by zero: its value and its gradients (zero) need no
    computing, which saves about the drop rate's share of a block's work (the original stochastic
    depth paper's point). It needs the draws first; they are the same draws in the same order as
    the reference blocks' only while no dropout draws in between. Not on a GPU, where reading the
    kept count back would wait for the stream at every block, and not in a torch.compile graph,
    where the kept count would be data-dependent.
    """
    no_dropout = block.attn.attn_drop == 0 and block.attn.proj_drop.p == 0 and block.mlp.drop.p == 0
    return no_dropout and x.device.type == "cpu" and not tracing()


def fused_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The block's function on ``(B, H, W, C)``, computed in window order (see the module docstring)."""
    B, H, W, C = x.shape
    window, shift = window_and_shift(H, W, block.window_size, block.shift_size, block.always_shift)
    index, inverse, pad = window_order(H, W, window, shift, x.device)
    N = window[0] * window[1]
    nW = index.numel() // N
    Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
    bias = attention_bias(block.attn, window, shift, Hp, Wp, x.dtype)
    chunk = _chunk_v2 if hasattr(block, "norm3") else _chunk_v1
    flat = x.reshape(B, H * W, C)
    if torch.is_grad_enabled():
        tokens = ToWindows.apply(flat, index, inverse, pad)  # (B, nW*N, C) in window order
        out = chunk(block, tokens.view(-1, C), pad, nW, N, bias).view(B, -1, C)
        return ToMap.apply(out, index, inverse, pad, x.shape)
    if tracing():  # torch.compile: the whole batch at once, as its size is symbolic (no chunk loop)
        tokens = flat.index_select(1, index)
        result = chunk(block, tokens.view(-1, C), pad, nW, N, bias).view_as(tokens)
        return result.index_select(1, inverse).view_as(x)
    # A few images at a time: gathered into window order, through the block and scattered back
    # while they are in cache, so the map is read once and written once (CPU; a GPU takes the
    # whole batch at once: small chunks would leave it idle between launches).
    per = max(1, CHUNK_TOKENS // (nW * N)) if x.device.type == "cpu" else B
    out = None
    for start in range(0, B, per):
        tokens = flat[start : start + per].index_select(1, index)
        result = chunk(block, tokens.view(-1, C), pad, nW, N, bias).view_as(tokens)
        if out is None:  # the block's output dtype, which autocast may make differ from its input's
            out = flat.new_empty(flat.shape, dtype=result.dtype)
        torch.index_select(result, 1, inverse, out=out[start : start + per])
    return out.view_as(x)


# The gathers into window order and back, with gathers for gradients: autograd's own gradient of a
# gather is a scatter-add into a zeroed tensor (measured in a worker's Swin-T training step: 16 ms
# against the gather's 6, of about 1 s).


class ToWindows(torch.autograd.Function):
    """``x[:, index]``: a ``(B, H * W, C)`` map into window order (padded tokens read position 0)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor, pad: Tensor | None) -> Tensor:
        ctx.orders = index, inverse, pad
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        index, inverse, pad = ctx.orders
        # Each map position is read by one window token, position 0 also by the padded ones.
        grad_map = ToMap.apply(grad, index, inverse, pad, None)
        if pad is not None:  # masked rather than indexed by pad: a shape that depends on no data (torch.compile)
            grad_map[:, 0] += torch.where(pad[:, None], grad, 0.0).sum(1)
        return grad_map, None, None, None


class ToMap(torch.autograd.Function):
    """``tokens[:, inverse]``: window-order tokens back to the ``(B, H * W, C)`` map, padded ones dropped.

    With ``shape`` (the ``(B, H, W, C)`` map's) the result is a tensor of that shape, not a view of
    one: FSDP warns of a module returning a view (an in-place op on it would skip its hooks).
    """

    @staticmethod
    def forward(
        ctx, tokens: Tensor, index: Tensor, inverse: Tensor, pad: Tensor | None, shape: torch.Size | None
    ) -> Tensor:
        ctx.orders = index, inverse, pad
        B, C = tokens.shape[0], tokens.shape[-1]
        result = tokens.new_empty(shape or (B, inverse.numel(), C))
        torch.index_select(tokens, 1, inverse, out=result.view(B, -1, C))
        return result

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        index, inverse, pad = ctx.orders
        grad_tokens = ToWindows.apply(grad.reshape(grad.shape[0], -1, grad.shape[-1]), index, inverse, pad)
        if pad is not None:
            grad_tokens = grad_tokens.masked_fill(pad[None, :, None], 0.0)  # dropped tokens: no gradient
        return grad_tokens, None, None, None, None
