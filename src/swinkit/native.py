"""The native CPU kernel: window attention in one pass per window and head (``csrc/window_attention.c``).

The fused path (:mod:`swinkit.fast`) runs its attention through this kernel where it can (with
autograd on, :class:`WindowAttention` pairs it with a backward kernel): float32, or bfloat16
(widened to float32 per window and head, the results rounded back), on an x86-64 Linux CPU with
AVX-512 or AVX2, head size 32 (every Swin configuration),
windows of at most 1024 tokens (32 x 32), at most :data:`MAX_THREADS` intra-op threads. The kernel
itself runs on one: the image-parallel workers of :mod:`swinkit.parallel` have one each, and where a
batch is not split (batch 1, ``image_parallel = False``) on two threads, the kernel on one was still
faster than PyTorch's operations on two (benchmarks/RESULTS.md). (Sharing one batch's windows over
the workers instead was 0.97-0.99x PyTorch's two-thread path at batch 16 and 1.01-1.03x at batch 1:
not kept.) Under torch.compile the kernel runs as an operator (:mod:`swinkit.fast`) with the
windows split over the running thread's intra-op threads, whole images to each: all of them where
the graph takes a whole batch (``torch.compile(model)``), one in a worker (``model.compile()``).
Anywhere else the PyTorch operations run instead, with the same results up to float rounding.

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) for the
instruction set PyTorch uses on this CPU, into ``~/.cache/swinkit`` (or ``$XDG_CACHE_HOME/swinkit``,
or ``CACHE_DIR``), named by a hash of its sources and flags, and loaded with ``ctypes``: no build
step at install time. If there is no compiler, or the build fails, the PyTorch path is used and
:func:`status` says why. ``ENABLED = False`` turns the kernel off (as
``benchmarks/native_attention.py`` does to measure it). The same library holds the passes around an
int8 product of :mod:`swinkit.quantize` (``csrc/int8_rows.c``): :func:`quantize_rows` and
:func:`dequantize_rows`; and GELU's gradient (``csrc/gelu.c``): :class:`GELU`, which the fused path's
training step uses (PyTorch's ``gelu_backward`` took twice a GELU's time, 3% of a Swin-T step).
The sources share their vector helpers through ``csrc/vector.h``.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import os
import platform
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .parallel import worker_pool

ENABLED = True
CACHE_DIR: str | os.PathLike | None = None  # None: $XDG_CACHE_HOME/swinkit or ~/.cache/swinkit
SOURCE = Path(__file__).with_name("csrc") / "window_attention.c"
# Built into the same library: the passes around an int8 product (swinkit.quantize.Int8Linear),
# GELU's gradient, and the vector helpers they share (a header).
INT8_SOURCE = SOURCE.with_name("int8_rows.c")
GELU_SOURCE = SOURCE.with_name("gelu.c")
HEADER = SOURCE.with_name("vector.h")
FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
# Per instruction set: vector width (LANES floats), keys per pass (TILE) and query rows per register
# block (ROWS), the fastest of the combinations timed on Swin's shapes (benchmarks/RESULTS.md).
VARIANTS = {
    "avx512": ("-mavx512f", "-mfma", "-DLANES=16", "-DTILE=64", "-DROWS=4"),
    "avx2": ("-mavx2", "-mfma", "-DLANES=8", "-DTILE=16", "-DROWS=4"),
}
CAPABILITIES = {"AVX512": "avx512", "AVX2": "avx2"}  # torch.backends.cpu.get_cpu_capability() -> variant
HEAD_SIZE = 32
# The kernel runs on one thread. With two intra-op threads it was still faster than PyTorch's
# operations on both (a batch of one 1.17x, a serial batch of 16 1.08x, a serial training step 1.40x,
# Swin-T, benchmarks/RESULTS.md); with more, PyTorch's operations, which use them all, are taken
# (not measured: the machine had two cores).
MAX_THREADS = 2
MAX_TOKENS = 1024
# Inputs the kernel takes: float32, and bfloat16 (CPU autocast), which it widens to float32 as it goes.
INPUT_DTYPES = (torch.float32, torch.bfloat16)
ABI = 3  # swinkit_window_attention_abi() of a build whose entry points take the arguments below
X86_LINUX = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")

_lock = threading.Lock()
_kernels: dict[str, Kernels | str] = {}  # variant -> the loaded kernels, or why there are none


def cpu_vendor() -> str:
    """The x86 vendor string (``GenuineIntel``, ``AuthenticAMD``), or "" where Linux does not say."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# Where the kernel prefetches the next window-head's rows to: L1 on Intel CPUs, where it was tuned,
# else L2. On an AMD EPYC (32 KB of L1 per core) the next head's rows in L1 pushed out the current
# head's: with L2, Swin-T's forward kernel ran 1.03-1.12x and its backward 1.06-1.08x faster per
# stage (benchmarks/RESULTS.md, 2026-12-06). Part of the build's flags (and of its file name).
PREFETCH_TO_L1 = cpu_vendor() == "GenuineIntel"


def build_flags(variant: str) -> tuple[str, ...]:
    """The compiler flags of ``variant``'s build on this machine."""
    prefetch = () if PREFETCH_TO_L1 else ("-DPREFETCH_HINT=_MM_HINT_T1",)
    return FLAGS + VARIANTS[variant] + prefetch


def cache_dir() -> Path:
    """Where built kernels are kept: ``CACHE_DIR`` if set, else the user's cache directory."""
    if CACHE_DIR is not None:
        return Path(CACHE_DIR)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "swinkit"


def reset() -> None:
    """Forget loaded kernels and build failures: the next call builds or loads again."""
    with _lock:
        _kernels.clear()


def cpu_variant() -> str | None:
    """The kernel variant for this machine: the instruction set PyTorch's own kernels use here."""
    return CAPABILITIES.get(torch.backends.cpu.get_cpu_capability()) if X86_LINUX else None


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernel (None: it can, given a C compiler)."""
    if cpu_variant() is not None:
        return None
    if not X86_LINUX:
        return f"the kernel is built for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    return f"no AVX-512 or AVX2 (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"


def sources() -> tuple[Path, ...]:
    """The C files built into the library (they include :data:`HEADER`)."""
    return SOURCE, INT8_SOURCE, GELU_SOURCE


def _build(target: Path, flags: tuple[str, ...]) -> None:
    """Compile :func:`sources` into ``target``, written under a temporary name and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        include = f"-I{HEADER.parent}"
        command = [os.environ.get("CC", "cc"), *flags, include, *map(str, sources()), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)


def library_path(variant: str) -> Path:
    """The cached build of ``variant``: named by the hash of the sources, the header and the flags."""
    flags = build_flags(variant)
    text = b"".join(path.read_bytes() for path in (*sources(), HEADER)) + " ".join(flags).encode()
    tag = hashlib.sha256(text).hexdigest()[:16]
    return cache_dir() / f"window_attention-{variant}-{tag}.so"


def _load(variant: str) -> Kernels:
    flags, target = build_flags(variant), library_path(variant)
    if not target.exists():
        _build(target, flags)
    try:
        library = ctypes.CDLL(str(target))
    except OSError:  # a damaged file in the cache (builds are renamed into place whole): build anew
        _build(target, flags)
        library = ctypes.CDLL(str(target))
    abi = getattr(library, "swinkit_window_attention_abi", None)
    if abi is None or abi() != ABI:
        raise RuntimeError(f"{target} takes other arguments than this swinkit passes (kernel ABI {ABI})")
    size, pointer = ctypes.c_long, ctypes.c_void_p
    # qkv, windows, N, C, heads, bias, groups, mask, mask_index, mask_windows, scales, cosine
    layout = [pointer, size, size, size, size, pointer, size, pointer, pointer, size, pointer, ctypes.c_int]
    forward, forward_bfloat16 = library.swinkit_window_attention, library.swinkit_window_attention_bf16
    forward.argtypes = forward_bfloat16.argtypes = [*layout, pointer]
    backward, backward_bfloat16 = (
        library.swinkit_window_attention_backward,
        library.swinkit_window_attention_backward_bf16,
    )
    backward.argtypes = backward_bfloat16.argtypes = [*layout, pointer, pointer, pointer, pointer]
    for entry in (forward, forward_bfloat16, backward, backward_bfloat16):
        entry.restype = ctypes.c_int
    quantize, dequantize = library.swinkit_quantize_rows, library.swinkit_dequantize_rows
    quantize.argtypes = [pointer, size, size, size, pointer, pointer]  # x, rows, cols, stride, q, scale
    # acc, rows, cols, row_scale, column_scale, bias, residual, out
    dequantize.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer, pointer]
    quantize.restype = dequantize.restype = None
    gelu_backward = library.swinkit_gelu_backward
    gelu_backward.argtypes = [pointer, pointer, pointer, size]  # grad, x, out, count
    gelu_backward.restype = None
    return Kernels(forward, backward, forward_bfloat16, backward_bfloat16, quantize, dequantize, gelu_backward)


class ShiftMask(NamedTuple):
    """A shifted block's mask as the kernel takes it: ``patterns`` ``(P, N, N)`` float32, the distinct
    masks of its windows, and ``index`` ``(nW,)`` int32, the pattern window ``w`` of each image adds
    (-1: none). Windows of a chunk are whole images, so window ``w`` of a chunk is ``w % nW``."""

    patterns: Tensor
    index: Tensor

    @classmethod
    def of(cls, mask: Tensor) -> ShiftMask:
        """The patterns of a ``(nW, N, N)`` mask; windows without any masked pair get none."""
        rows = mask.flatten(1)
        masked = rows.any(1)
        patterns, which = torch.unique(rows[masked], dim=0, return_inverse=True)
        index = torch.full((rows.shape[0],), -1, dtype=torch.int32)
        index[masked] = which.to(torch.int32)
        return cls(patterns.view(-1, *mask.shape[1:]).to(torch.float32).contiguous(), index)

    def full(self) -> Tensor:
        """The ``(nW, N, N)`` mask again."""
        padded = torch.cat([self.patterns.new_zeros(1, *self.patterns.shape[1:]), self.patterns])
        return padded[self.index.long() + 1]


class Kernels(NamedTuple):
    """The loaded library's entry points."""

    forward: Callable[..., int]
    backward: Callable[..., int]
    forward_bfloat16: Callable[..., int]  # the forward on bfloat16 qkv and output
    backward_bfloat16: Callable[..., int]  # the backward on bfloat16 qkv, output gradient and qkv gradient
    quantize_rows: Callable[..., None]  # csrc/int8_rows.c
    dequantize_rows: Callable[..., None]
    gelu_backward: Callable[..., None]  # csrc/gelu.c


def kernel(variant: str | None = None) -> Kernels | None:
    """The compiled kernels (this CPU's variant unless named), built on first use; None where they
    cannot be (see :func:`status`)."""
    variant = variant or cpu_variant()
    if variant is None:
        return None
    loaded = _kernels.get(variant)
    if loaded is None:
        with _lock:  # image-parallel workers may all ask at once: one build
            loaded = _kernels.get(variant)
            if loaded is None:
                try:
                    loaded = _load(variant)
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    loaded = f"could not build {', '.join(path.name for path in sources())}: {error}"
                _kernels[variant] = loaded
    return None if isinstance(loaded, str) else loaded


def status() -> str:
    """One line: whether the native kernel runs here, and if not, why."""
    if not ENABLED:
        return "native window attention: off (swinkit.native.ENABLED = False)"
    if kernel() is None:
        return f"native window attention: not used ({unsupported_reason() or _kernels[cpu_variant()]})"
    return f"native window attention: on ({cpu_variant()}, float32 and bfloat16)"


def applies(qkv: Tensor, heads: int, tokens: int, bias: Tensor) -> bool:
    """Whether the kernel can take this eager attention call (checked per call, cheaply)."""
    return (
        takes(qkv, heads, tokens, bias)
        and torch.get_num_threads() <= MAX_THREADS  # one in every image-parallel worker
        and built()
    )


def takes(qkv: Tensor, heads: int, tokens: int, bias: Tensor) -> bool:
    """Whether the kernel, if built, computes attention of these shapes and dtypes."""
    return (
        ENABLED
        and qkv.dtype in INPUT_DTYPES
        and qkv.device.type == "cpu"
        and qkv.is_contiguous()
        and qkv.shape[-1] == 3 * heads * HEAD_SIZE
        and tokens <= MAX_TOKENS
        and bias.dtype in INPUT_DTYPES
    )


def _constant_under_compile(function: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` (torch.compile asks once, while it traces) without
    its import of torch._dynamo, a second of every ``import swinkit``: it only sets this mark, which
    dynamo reads when it traces (a test checks that torch's decorator sets the same)."""
    function._dynamo_marked_constant = True
    return function


@_constant_under_compile
def built() -> bool:
    """Whether the kernel for this CPU is built and loaded (building it on first call)."""
    return kernel() is not None


def window_attention(
    qkv: Tensor,
    heads: int,
    bias: Tensor,
    scales: Tensor,
    cosine: bool,
    variant: str | None = None,
    mask: ShiftMask | None = None,
) -> Tensor:
    """``softmax(scale * q k^T + bias + mask) v`` for every window and head, heads side by side.

    ``qkv``: ``(windows, N, 3C)``; ``bias``: ``(groups, heads, N, N)``, window ``w`` using
    ``bias[w % groups]``; ``scales``: ``(heads,)`` float32; ``mask``: a shifted block's mask
    (:class:`ShiftMask`), or None. Returns ``(windows, N, C)``. With autograd on, differentiable
    in ``qkv``, ``bias`` and ``scales`` (V2's ``scales`` come from its learned logit scales).
    """
    # bfloat16 (CPU autocast, a bfloat16 model) is attended in float32, more precisely than bfloat16
    # products: the kernel widens each window-head's rows as it goes and rounds the output (and in
    # the backward the qkv gradient) back to bfloat16.
    bias = bias.float()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, bias, scales)):
        return WindowAttention.apply(qkv, bias, scales, heads, cosine, variant, mask)
    return _forward(qkv.detach(), heads, bias.detach(), scales.detach(), cosine, variant, mask)


def _forward(
    qkv: Tensor,
    heads: int,
    bias: Tensor,
    scales: Tensor,
    cosine: bool,
    variant: str | None,
    mask: ShiftMask | None,
    parts: int = 1,
) -> Tensor:
    windows, tokens, width = qkv.shape
    bias, scales = bias.contiguous(), scales.contiguous()
    out = torch.empty(windows, tokens, width // 3, dtype=qkv.dtype)
    kernels = kernel(variant)
    forward = kernels.forward_bfloat16 if qkv.dtype == torch.bfloat16 else kernels.forward

    def share_forward(share: slice) -> None:
        code = forward(*_layout(qkv[share], heads, bias, mask, scales), cosine, out[share].data_ptr())
        _check(code, qkv[share], heads, bias, mask)

    _each_share(share_forward, windows, bias, mask, parts)
    return out


def window_attention_backward(
    qkv: Tensor,
    grad: Tensor,
    heads: int,
    bias: Tensor,
    scales: Tensor,
    cosine: bool,
    variant: str | None = None,
    mask: ShiftMask | None = None,
    parts: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`window_attention` with respect to ``qkv``, ``bias`` (summed over the
    windows that share each bias group) and ``scales`` (zero without cosine: V1's is not learned),
    given ``grad`` of its output. ``parts``: see :func:`_each_share`."""
    qkv, bias, scales = qkv.contiguous(), bias.contiguous(), scales.contiguous()
    grad = grad.to(qkv.dtype).contiguous()
    grad_qkv = torch.empty_like(qkv)
    kernels = kernel(variant)
    backward = kernels.backward_bfloat16 if qkv.dtype == torch.bfloat16 else kernels.backward

    def share_backward(share: slice) -> tuple[Tensor, Tensor]:
        grad_bias, grad_scales = torch.zeros_like(bias), torch.zeros_like(scales)
        pointers = grad[share].data_ptr(), grad_qkv[share].data_ptr(), grad_bias.data_ptr(), grad_scales.data_ptr()
        code = backward(*_layout(qkv[share], heads, bias, mask, scales), cosine, *pointers)
        _check(code, qkv[share], heads, bias, mask)
        return grad_bias, grad_scales

    shares = _each_share(share_backward, qkv.shape[0], bias, mask, parts)
    grad_bias, grad_scales = shares[0]
    for share_bias, share_scales in shares[1:]:  # summed in the shares' order: the same sums every run
        grad_bias += share_bias
        grad_scales += share_scales
    return grad_qkv, grad_bias, grad_scales


def _each_share(
    function: Callable[[slice], object], windows: int, bias: Tensor, mask: ShiftMask | None, parts: int
) -> list:
    """``function`` of each of up to ``parts`` runs of windows, in the image-parallel workers' threads
    when there are several (``ctypes`` lets go of the GIL for each call); returns the results in order.

    Runs start at multiples of the period over which the windows' bias groups and mask patterns
    repeat, so that each run indexes them from its own window 0 as the whole would.
    """
    period = math.lcm(bias.shape[0], mask.index.numel() if mask is not None else 1)
    groups = windows // period
    bounds = [period * (groups * part // parts) for part in range(parts)] + [windows]
    shares = [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a] or [slice(0, windows)]
    if len(shares) == 1:
        return [function(shares[0])]
    return list(worker_pool().map(function, shares))


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``x`` (2-D float32, rows contiguous) as int8 rows and their ``(rows, 1)`` scales, in one pass
    (:func:`swinkit.quantize.Int8Linear.forward` has the same arithmetic in PyTorch operations);
    None where the native library is not available."""
    kernels = kernel() if ENABLED else None
    if kernels is None:
        return None
    rows, cols = x.shape
    quantized = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, 1)
    kernels.quantize_rows(x.data_ptr(), rows, cols, x.stride(0), quantized.data_ptr(), scale.data_ptr())
    return quantized, scale


def dequantize_rows(
    acc: Tensor, row_scale: Tensor, column_scale: Tensor, bias: Tensor | None, residual: Tensor | None
) -> Tensor:
    """``(acc * row_scale) * column_scale + bias (+ residual)`` in one pass, as float32 written over
    ``acc`` (returned as its float32 view: a fresh output of that size took 2.5x the pass's time in
    page faults and cache misses); ``acc`` ``(rows, cols)`` int32 and ``residual`` contiguous (only
    after :func:`quantize_rows` gave a result)."""
    out = acc.view(torch.float32)
    pointers = [None if t is None else t.data_ptr() for t in (bias, residual)]
    kernel().dequantize_rows(
        acc.data_ptr(), *acc.shape, row_scale.data_ptr(), column_scale.data_ptr(), *pointers, out.data_ptr()
    )
    return out


def gelu_applies(x: Tensor) -> bool:
    """Whether :class:`GELU` takes ``x`` (float32 and contiguous on the CPU, at most
    :data:`MAX_THREADS` intra-op threads, the library built)."""
    return (
        ENABLED
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and torch.get_num_threads() <= MAX_THREADS
        and built()
    )


class GELU(torch.autograd.Function):
    """Exact (erf) GELU: PyTorch's forward, the gradient by the native pass (:func:`gelu_backward`).
    Second-order gradients go through PyTorch's ``gelu_backward``, which is differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return torch.ops.aten.gelu_backward(grad, x)
        return gelu_backward(grad, x)


def gelu_backward(grad: Tensor, x: Tensor) -> Tensor:
    """``grad * GELU'(x)`` in one pass on this thread (``x`` as :func:`gelu_applies` takes it)."""
    grad = grad.contiguous()
    out = torch.empty_like(x)
    kernel().gelu_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel())
    return out


def _layout(qkv: Tensor, heads: int, bias: Tensor, mask: ShiftMask | None, scales: Tensor) -> tuple[int, ...]:
    """The arguments both entry points start with: qkv and its sizes, the bias and its groups, the
    mask's patterns, their index and its length, the scales."""
    windows, tokens, width = qkv.shape
    masking = (0, 0, 1) if mask is None else (mask.patterns.data_ptr(), mask.index.data_ptr(), mask.index.numel())
    return (
        qkv.data_ptr(),
        windows,
        tokens,
        width // 3,
        heads,
        bias.data_ptr(),
        bias.shape[0],
        *masking,
        scales.data_ptr(),
    )


def _check(code: int, qkv: Tensor, heads: int, bias: Tensor, mask: ShiftMask | None) -> None:
    if code:
        masking = (
            "" if mask is None else f", mask patterns {tuple(mask.patterns.shape)} over {mask.index.numel()} windows"
        )
        raise ValueError(
            f"the native kernel refused qkv {tuple(qkv.shape)}, {heads} heads, bias {tuple(bias.shape)}{masking}"
        )


class WindowAttention(torch.autograd.Function):
    """Window attention with the native forward and backward (the probabilities are recomputed in
    the backward, not stored). Second-order gradients go through PyTorch's operations."""

    @staticmethod
    def forward(
        ctx,
        qkv: Tensor,
        bias: Tensor,
        scales: Tensor,
        heads: int,
        cosine: bool,
        variant: str | None,
        mask: ShiftMask | None,
    ) -> Tensor:
        ctx.save_for_backward(qkv, bias, scales)
        ctx.heads, ctx.cosine, ctx.variant, ctx.mask = heads, cosine, variant, mask
        return _forward(qkv, heads, bias, scales, cosine, variant, mask)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        qkv, bias, scales = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _differentiable_backward(qkv, grad, ctx.heads, bias, scales, ctx.cosine, ctx.mask)
        else:
            grads = window_attention_backward(qkv, grad, ctx.heads, bias, scales, ctx.cosine, ctx.variant, ctx.mask)
        wanted = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3], strict=True)]
        return *wanted, None, None, None, None


def _differentiable_backward(
    qkv: Tensor, grad: Tensor, heads: int, bias: Tensor, scales: Tensor, cosine: bool, mask: ShiftMask | None
) -> tuple[Tensor | None, ...]:
    """The backward in PyTorch operations, itself differentiable (for second-order gradients)."""
    # From the saved tensors themselves, not detached copies: the gradients then carry their history.
    with torch.enable_grad():
        windows, tokens, width = qkv.shape
        # In float32 as the kernel computes (bfloat16 qkv widened; its gradient comes back bfloat16).
        wide = qkv.float().view(windows, tokens, 3, heads, HEAD_SIZE)
        q, k, v = wide.permute(2, 0, 3, 1, 4).unbind(0)
        if cosine:
            q, k = F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12)
        logits = (q * scales.view(1, heads, 1, 1)) @ k.transpose(-2, -1)
        logits = logits.view(-1, bias.shape[0], heads, tokens, tokens) + bias
        if mask is not None:
            logits = logits.view(-1, mask.index.numel(), heads, tokens, tokens) + mask.full().unsqueeze(1)
        out = logits.softmax(-1).view(windows, heads, tokens, tokens) @ v
        out = out.transpose(1, 2).reshape(windows, tokens, width // 3)
        inputs = (qkv, bias, scales)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype), create_graph=True))
        return tuple(next(grads) if t.requires_grad else None for t in inputs)
