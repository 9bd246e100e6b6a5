"""The ``triton`` path's norm kernels on and off, inference and training, interleaved in one process.

    python benchmarks/triton_norms.py [--model swin_t] [--batch 128] [--train-batch 128]
        [--modes inference,training] [--rounds 9] [--dtype bfloat16]

A V1 block of ``attn_impl="triton"`` takes its two LayerNorms with the residual add before the
second and the casts to the linear layers' dtype in two kernels (``triton_attention.norm_rows``,
with a backward kernel in training); a V2 block in eval inference takes each norm with the add
after it (``residual_plus_norm``, e.g. ``--model swinv2_t``). With
``triton_attention.NORM_KERNEL = False`` they run PyTorch's LayerNorms, casts and adds instead.
Prints images/s of both per round (inference under ``torch.inference_mode``; a training step is
forward, backward and a fused AdamW step, all under autocast), their medians and ratio, and how
far apart the two inference outputs are. For a CUDA GPU; on a CPU only as a smoke run under
Triton's interpreter (``TRITON_INTERPRET=1``, a tiny model: ``--model swin_test --batch 1
--train-batch 2 --rounds 1 --repeats 1 --size 64 --dtype float16``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import swinkit
from swinkit import triton_attention


def images_per_second(step: Callable[[], object], images: int, device: torch.device, repeats: int) -> float:
    step()  # warm: kernels compiled and tuned, caches built
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * images / (time.perf_counter() - start)


def contenders(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, tuple]:
    """Per mode: the step to time and the images it takes."""
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    images = torch.randn(args.train_batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, model.config.num_classes, (args.train_batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def infer() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
            return model.eval()(x)

    def train() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model.train()(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"inference": (infer, args.batch), "training": (train, args.train_batch)}
    return {mode: steps[mode] for mode in args.modes.split(",")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=10, help="steps timed per contender and round")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    interpreted = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")
    if not torch.cuda.is_available() and not interpreted:
        raise SystemExit(
            "triton_norms.py needs a CUDA GPU, or TRITON_INTERPRET=1 for a CPU smoke run under Triton's interpreter"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = swinkit.create_model(args.model, attn_impl="triton").to(device)
    steps = contenders(model, args, device)
    if "inference" in steps:
        infer = steps["inference"][0]
        triton_attention.NORM_KERNEL = True
        with_kernels = infer().float()
        triton_attention.NORM_KERNEL = False
        without = infer().float()
        difference = ((with_kernels - without).norm() / without.norm()).item()
        print(f"{args.model}, {args.dtype}, {device}: inference outputs apart by {difference:.2e} (relative)")
    for mode, (step, images) in steps.items():
        rates: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(args.rounds):
            for on in (True, False) if round_ % 2 == 0 else (False, True):
                triton_attention.NORM_KERNEL = on
                rates[on].append(images_per_second(step, images, device, args.repeats))
            latest = f"norm kernels {rates[True][-1]:.1f}, PyTorch's norms {rates[False][-1]:.1f} images/s"
            print(f"{mode}, batch {images}, round {round_ + 1}: {latest}")
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"{mode} median: norm kernels {on:.1f}, PyTorch's norms {off:.1f} images/s, ratio {on / off:.3f}")
    triton_attention.NORM_KERNEL = True


if __name__ == "__main__":
    main()
