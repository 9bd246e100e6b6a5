"""The attention seam: one signature, the reference math and the fast implementations.

Every implementation computes ``softmax(q @ k^T + bias) @ v`` over the windows of a batch:

- ``q, k, v``: ``(B * nW, nH, N, d)``; ``q`` already carries its scale (``d**-0.5`` in V1, the
  clamped ``exp(logit_scale)`` of cosine attention in V2);
- ``bias``: ``(nH, N, N)`` (relative position bias only) or ``(nW, nH, N, N)`` (bias plus the
  shift mask of each of the ``nW`` windows; windows are batch-major, so window ``i`` of the
  flattened batch uses ``bias[i % nW]``).

The result is ``(B * nW, nH, N, d)``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

# ``fused`` (swinkit.fast: whole blocks in window order) and ``triton`` (swinkit.triton_attention:
# one kernel reading the map through an index table) are block-level paths; where a block still
# reaches this seam (tracing, export) they are the reference. ``auto`` picks per device.
ATTENTION_IMPLS = ("auto", "reference", "sdpa", "fused", "triton")

# The fastest exact implementation per device type, as measured (benchmarks/RESULTS.md). CUDA
# GPUs: see :func:`cuda_auto_impl`.
AUTO_IMPL = {"cpu": "fused"}
HALF_DTYPES = (torch.bfloat16, torch.float16)  # 16-bit work, for which CUDA's choice differs


def reference_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, training: bool) -> Tensor:
    """The paper's Eq. 4, written out: the path tests and exports compare against."""
    windows, heads, tokens, _ = q.shape
    attn = q @ k.transpose(-2, -1)  # (B*nW, nH, N, N)
    groups = bias.shape[0] if bias.dim() == 4 else 1
    attn = attn.view(windows // groups, groups, heads, tokens, tokens) + bias
    attn = attn.view(windows, heads, tokens, tokens).softmax(dim=-1)
    attn = F.dropout(attn, dropout_p, training=training)
    return attn @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, training: bool) -> Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` with the bias as an additive float mask."""
    windows, heads, tokens, _ = q.shape
    if bias.dim() == 4:
        groups = bias.shape[0]
        mask = bias.unsqueeze(0).expand(windows // groups, -1, -1, -1, -1).reshape(windows, heads, tokens, tokens)
    else:
        mask = bias.unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0, scale=1.0)


_IMPLEMENTATIONS = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "fused": reference_attention,
    "triton": reference_attention,
}


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, training: bool, impl: str = "reference"
) -> Tensor:
    """Dispatch to the implementation named ``impl`` (one of :data:`ATTENTION_IMPLS`)."""
    return _IMPLEMENTATIONS[resolve_impl(impl, q.device)](q, k, v, bias, dropout_p, training)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """``auto`` -> the implementation chosen for ``device`` (and, on CUDA, for the precision of
    ``dtype`` or of the autocast around the call); other names unchanged."""
    if impl != "auto":
        return impl
    if device.type != "cuda":
        return AUTO_IMPL.get(device.type, "reference")
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        # Traced blocks run as written, where the triton path's seam is the reference anyway; and
        # the device query below is no graph material.
        return "reference"
    half = dtype in HALF_DTYPES or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in HALF_DTYPES
    )
    return _cuda_auto_impl(device.index, half)


def cuda_auto_impl(capability: tuple[int, int], has_triton: bool, half: bool = True) -> str:
    """``auto`` on a CUDA GPU of compute ``capability``, for 16-bit work (``half``: bf16 / fp16,
    autocast or a half model) or not: the Triton kernel for 16-bit work where Triton is installed
    and the GPU is an Ampere or newer one (its bf16 tensor-core products), else the reference path.

    Measured on an H200, Swin-T, bf16, batch 128 (benchmarks/RESULTS.md): inference ``triton``
    1.43x timm, ``fused`` 1.09x, ``reference`` 1.02x, ``sdpa`` 0.88x (profiled, and attributed by
    kernel counts: cuDNN's fused kernel ran for the 5 shifted blocks, slower per block than the
    reference's batched products and softmax, and a float32 fallback for the 7 unshifted ones,
    whose mask is broadcast over the windows); training all within 0.93-1.06x. float32 was not
    timed; the kernels' IEEE float32 form spills registers (ptxas, see RESULTS), so float32 work
    keeps the reference path.
    """
    return "triton" if half and has_triton and capability >= (8, 0) else "reference"


@functools.lru_cache(maxsize=32)
def _cuda_auto_impl(index: int | None, half: bool) -> str:
    has_triton = importlib.util.find_spec("triton") is not None
    return cuda_auto_impl(torch.cuda.get_device_capability(index), has_triton, half)


def check_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`ATTENTION_IMPLS`; a ``ValueError`` naming the accepted ones otherwise."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attn_impl {impl!r}; accepted: {', '.join(ATTENTION_IMPLS)}")
    return impl


def combine_bias_and_mask(bias: Tensor, mask: Tensor | None) -> Tensor:
    """``(nH, N, N)`` bias and ``(nW, N, N)`` mask -> ``(nW, nH, N, N)`` (or the bias alone)."""
    if mask is None:
        return bias
    return bias.unsqueeze(0) + mask.unsqueeze(1)
