"""The ``triton`` path's norm kernels on and off: inference under autocast, interleaved in one process.

    python benchmarks/triton_norms.py [--model swin_t] [--batch 128] [--rounds 9] [--dtype bfloat16]

Without autograd a block of ``attn_impl="triton"`` takes its two LayerNorms with the residual adds
next to them and the casts to the linear layers' dtype in two kernels (``triton_attention.norm_rows``
for V1, ``residual_plus_norm`` for V2, e.g. ``--model swinv2_t``); with
``triton_attention.NORM_KERNEL = False`` it runs PyTorch's LayerNorms, casts and adds instead.
Prints images/s of both per round, their medians and ratio, and how far apart their outputs are.
For a CUDA GPU; on a CPU only as a smoke run under Triton's interpreter (``TRITON_INTERPRET=1``,
a tiny model: ``--model swin_test --batch 1 --rounds 1 --size 64 --dtype float16``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import swinkit
from swinkit import triton_attention


def images_per_second(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, repeats: int) -> float:
    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype):
            return model(x)

    forward()  # warm: kernels compiled and tuned, caches built
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * x.shape[0] / (time.perf_counter() - start)


def outputs(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    results = []
    for on in (True, False):
        triton_attention.NORM_KERNEL = on
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype):
            results.append(model(x).float())
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=10, help="forwards timed per contender and round")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = swinkit.create_model(args.model, attn_impl="triton").to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    with_kernel, without = outputs(model, x, dtype)
    difference = ((with_kernel - without).norm() / without.norm()).item()
    print(f"{args.model}, batch {args.batch}, {args.dtype}, {device}: outputs apart by {difference:.2e} (relative)")
    rates: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for on in (True, False) if round_ % 2 == 0 else (False, True):
            triton_attention.NORM_KERNEL = on
            rates[on].append(images_per_second(model, x, dtype, args.repeats))
        latest = f"norm kernels {rates[True][-1]:.1f}, PyTorch's norms {rates[False][-1]:.1f} images/s"
        print(f"round {round_ + 1}: {latest}")
    triton_attention.NORM_KERNEL = True
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"median: norm kernels {on:.1f}, PyTorch's norms {off:.1f} images/s, ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
