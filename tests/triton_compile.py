"""Compile the Triton kernels of ``attn_impl="triton"`` for NVIDIA GPUs, on any machine.

Run as a script (``python tests/triton_compile.py ARCH...``, e.g. ``90`` for H100 / H200): Triton
lowers each kernel through its IR to PTX and a cubin with the ``ptxas`` its wheel ships, which
needs no GPU. Prints one JSON line per compiled variant. Run without ``TRITON_INTERPRET``: the
interpreter replaces the kernels with Python functions that cannot be compiled.
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from swinkit import _triton_kernels as kernels

# Element types of the pointer arguments: the data's own, the float32 / float64 accumulator's,
# or fixed. Every other argument is an int32 size, except eps.
DATA = {"qkv", "qkv_bias", "out", "out_grad", "qkv_grad", "branch"}
WIDE = {"scales", "lse", "delta", "pad_grad", "bias_grad", "scale_grad"}
# The norm kernels' residual stream (x, total) and its gradients are float32, as autocast keeps them.
FIXED = {"index": "*i32", "bias": "*fp32", "eps": "fp32", "x": "*fp32", "total": "*fp32", "weight": "*fp32"}
FIXED |= {"mean": "*fp32", "rstd": "*fp32", "total_grad": "*fp32", "x_grad": "*fp32", "weight_grad": "*fp32"}
TRITON_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def variants() -> list[tuple[str, str, dict, int]]:
    """(kernel, dtype, flags, warps): every attention kernel in bf16 (V1 and V2) with 4 warps, and
    V2's with 8 (the other setting the autotuner tries), float16 / float32 forwards, a float32
    backward; the norm kernels with bf16 output (V1's with and without its residual add, the
    second saving its statistics for the backward kernel, which is compiled too)."""
    names = ("window_attention_forward", "window_attention_backward_keys", "window_attention_backward_queries")
    chosen = [(name, "bfloat16", {"COSINE": cosine}, 4) for name in names for cosine in (False, True)]
    chosen += [(name, "bfloat16", {"COSINE": True}, 8) for name in names]
    chosen += [("window_attention_forward", "float16", {"COSINE": False}, 4)]
    chosen += [("window_attention_forward", "float32", {"COSINE": True}, 4)]
    chosen += [("window_attention_backward_keys", "float32", {"COSINE": True}, 4)]
    chosen += [("layer_norm_rows", "bfloat16", {"HAS_BRANCH": branch, "SAVE_STATS": branch}, 4) for branch in (0, 1)]
    chosen += [("layer_norm_rows_backward", "bfloat16", {"HAS_TOTAL_GRAD": True}, 4)]
    chosen += [("residual_plus_layer_norm_rows", "bfloat16", {"WRITE_OUT": True}, 4)]
    return chosen


def compile_variant(name: str, dtype: str, flags: dict, warps: int, arch: int) -> dict:
    fn = getattr(kernels, name)
    data, wide = TRITON_NAMES[dtype], "fp64" if dtype == "float64" else "fp32"
    constants = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "ACC": tl.float64 if wide == "fp64" else tl.float32}
    constants |= {"BLOCK_ROWS": 8, "BLOCK_C": 128}  # the norm kernels' tile for Swin-T's 96 channels
    constants |= {"SAVE_LSE": True, "BIAS_GRAD": True, "SCALE_GRAD": True} | flags
    constants = {key: value for key, value in constants.items() if key in fn.arg_names}
    signature = {}
    for argument in fn.arg_names:
        if argument in constants:
            signature[argument] = "constexpr"
        elif argument in DATA:
            signature[argument] = f"*{data}"
        elif argument in WIDE:
            signature[argument] = f"*{wide}"
        else:
            signature[argument] = FIXED.get(argument, "i32")
    source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return {
        "kernel": name,
        "dtype": dtype,
        "cosine": flags.get("COSINE"),
        "warps": compiled.metadata.num_warps,
        "arch": arch,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared_bytes": compiled.metadata.shared,
        "mma": "mma" in compiled.asm["ptx"],
    }


if __name__ == "__main__":
    for arch in [int(a) for a in sys.argv[1:]] or [90]:
        for name, dtype, flags, warps in variants():
            print(json.dumps(compile_variant(name, dtype, flags, warps, arch)), flush=True)
