"""Ablation of the native window-attention kernel: the same models with and without it, beside timm.

``swinkit.native`` runs the no-grad fused path's attention (q k^T, scale, bias, softmax, times v,
heads interleaved back) as one compiled AVX-512 pass per window and head, in the one-thread
image-parallel workers. This script first times that kernel alone against the PyTorch per-head
path it replaces (``swinkit.fast.heads_attention``), one thread, on one chunk of each Swin-T stage
(and SwinV2-T's 8x8 cosine windows), then turns it off and on by ``swinkit.native.ENABLED``,
interleaving per round: swinkit with the kernel, timm, swinkit without, for Swin-T and SwinV2-T.

    python benchmarks/native_attention.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import functools

import torch
from ablation import arguments, median_seconds, report, switched

from swinkit import fast, native
from swinkit.bench import BenchResult, Target, _interleave, build

# (name, windows in one chunk of the no-grad path, window tokens, heads, shift groups, cosine)
STAGES = [
    ("Swin-T stage 1", 64, 49, 3, 64, False),
    ("Swin-T stage 2", 80, 49, 6, 16, False),
    ("Swin-T stage 3", 80, 49, 12, 4, False),
    ("Swin-T stage 4", 83, 49, 24, 1, False),
    ("SwinV2-T stage 1", 64, 64, 3, 64, True),
    ("SwinV2-T stage 3", 64, 64, 12, 4, True),
]


def kernel_alone() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("one thread, ms per chunk:  PyTorch per head  native  speed-up")
    for name, windows, tokens, heads, groups, cosine in STAGES:
        qkv = torch.randn(windows, tokens, 3 * heads * native.HEAD_SIZE)
        bias = torch.randn(groups, heads, tokens, tokens)
        scales = torch.full((heads,), native.HEAD_SIZE**-0.5)
        torch_path = functools.partial(fast.heads_attention, qkv, heads, groups, bias, scales.tolist(), cosine)
        kernel = functools.partial(native.window_attention, qkv, heads, bias, scales, cosine)
        before, after = median_seconds(torch_path), median_seconds(kernel)
        print(f"{name:<24} {1e3 * before:17.2f} {1e3 * after:7.2f} {before / after:9.2f}")
    torch.set_num_threads(threads)


def models(model_name: str, size: int, rounds: int) -> None:
    swinkit, timm = build("swinkit", model_name).eval(), build("timm", model_name).eval()
    x = torch.randn(16, 3, size, size)
    result = BenchResult("inference", 16)
    calls = [("swinkit", switched(native, "ENABLED", True, lambda: swinkit(x))), ("timm", lambda: timm(x))]
    calls.append(("swinkit:no-native", switched(native, "ENABLED", False, lambda: swinkit(x))))
    with torch.inference_mode():
        _interleave(result, calls, rounds, 2, Target())
    print(model_name)
    report(result, "swinkit", "swinkit:no-native", "native kernel speed-up")


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    print(native.status())
    if native.kernel() is None:
        raise SystemExit("nothing to compare: the native kernel does not run here")
    torch.manual_seed(0)
    with torch.inference_mode():
        kernel_alone()
    models("swin_t", 224, args.rounds)
    models("swinv2_t", 256, args.rounds)


if __name__ == "__main__":
    main()
