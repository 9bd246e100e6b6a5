"""The native CPU kernel: window attention in one pass per window and head (``csrc/window_attention.c``).

The no-grad fused path (:mod:`swinkit.fast`) runs its attention through this kernel where it can:
float32 on an AVX-512 CPU under Linux, head size 32 (every Swin configuration), windows of at
most 64 tokens (7 x 7 in V1, 8 x 8 in V2), one intra-op thread (what the image-parallel workers
of :mod:`swinkit.parallel` run with). Anywhere else the PyTorch operations run instead, with
the same results up to float rounding.

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``~/.cache/swinkit`` (or ``$XDG_CACHE_HOME/swinkit``, or ``CACHE_DIR``), named by a hash of its source and flags,
and loaded with ``ctypes``; no build step at install time. If there is no compiler, or the
build fails, the PyTorch path is used and :func:`status` says why. ``ENABLED = False`` turns
the kernel off (the ablation in ``benchmarks/native_attention.py`` does).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

ENABLED = True
SOURCE = Path(__file__).with_name("csrc") / "window_attention.c"
FLAGS = ("-O3", "-mavx512f", "-mfma", "-fno-math-errno", "-shared", "-fPIC")
LIBRARIES = ("-lm",)
HEAD_SIZE = 32
MAX_TOKENS = 64
CACHE_DIR: str | os.PathLike | None = None  # None: $XDG_CACHE_HOME/swinkit or ~/.cache/swinkit

_lock = threading.Lock()
_kernel: ctypes._CFuncPtr | None = None
_failure: str | None = None  # why the kernel is not available, once a build was tried


def cache_dir() -> Path:
    """Where the built kernel is kept: ``CACHE_DIR`` if set, else the user's cache directory."""
    if CACHE_DIR is not None:
        return Path(CACHE_DIR)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "swinkit"


def reset() -> None:
    """Forget the loaded kernel or the reason it is missing: the next call builds or loads again."""
    global _kernel, _failure
    with _lock:
        _kernel, _failure = None, None


def _build(target: Path) -> None:
    """Compile ``SOURCE`` into ``target``, written under a temporary name and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", str(built), *LIBRARIES]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)


def _load() -> ctypes._CFuncPtr:
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS + LIBRARIES).encode()).hexdigest()[:16]
    target = cache_dir() / f"window_attention-{tag}.so"
    if not target.exists():
        _build(target)
    function = ctypes.CDLL(str(target)).swinkit_window_attention
    size, pointer = ctypes.c_long, ctypes.c_void_p
    function.argtypes = [pointer, size, size, size, size, pointer, size, pointer, ctypes.c_int, pointer]
    function.restype = None
    return function


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernel (None: it can, given a C compiler)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is built for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"the CPU has no AVX-512 (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"
    return None


def kernel() -> ctypes._CFuncPtr | None:
    """The compiled kernel, built on the first call; None where it cannot be (see :func:`status`)."""
    global _kernel, _failure
    if _kernel is not None or _failure is not None:
        return _kernel
    with _lock:  # image-parallel workers may all ask at once: one build
        if _kernel is None and _failure is None:
            _failure = unsupported_reason()
            if _failure is None:
                try:
                    _kernel = _load()
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _failure = f"could not build {SOURCE.name}: {error}"
    return _kernel


def status() -> str:
    """One line: whether the native kernel runs here, and if not, why."""
    if not ENABLED:
        return "native window attention: off (swinkit.native.ENABLED = False)"
    if kernel() is None:
        return f"native window attention: not used ({_failure})"
    return "native window attention: on (AVX-512, float32, one thread per worker)"


def applies(qkv: Tensor, heads: int, tokens: int, bias: Tensor) -> bool:
    """Whether the kernel can take this no-grad attention call (checked per call, cheaply)."""
    return (
        ENABLED
        and qkv.dtype == torch.float32
        and qkv.device.type == "cpu"
        and qkv.is_contiguous()
        and qkv.shape[-1] == 3 * heads * HEAD_SIZE
        and tokens <= MAX_TOKENS
        and bias.dtype == torch.float32
        and torch.get_num_threads() == 1
        and not torch.is_grad_enabled()
        and kernel() is not None
    )


def window_attention(qkv: Tensor, heads: int, bias: Tensor, scales: Tensor, cosine: bool) -> Tensor:
    """``softmax(scale * q k^T + bias) v`` for every window and head, heads side by side.

    ``qkv``: ``(windows, N, 3C)``; ``bias``: ``(groups, heads, N, N)``, window ``w`` using
    ``bias[w % groups]``; ``scales``: ``(heads,)`` float32. Returns ``(windows, N, C)``.
    """
    windows, tokens, width = qkv.shape
    bias = bias.contiguous()
    out = torch.empty(windows, tokens, width // 3, dtype=qkv.dtype)
    kernel()(
        qkv.data_ptr(),
        windows,
        tokens,
        width // 3,
        heads,
        bias.data_ptr(),
        bias.shape[0],
        scales.data_ptr(),
        int(cosine),
        out.data_ptr(),
    )
    return out
