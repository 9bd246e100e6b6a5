"""Two versions of the native kernel's source, side by side inside a model: seconds per window and head.

Where ``native_attention.py`` turns the kernel off and on, this compares two builds of it: the
current ``csrc/window_attention.c`` against an older one (for example
``git show REV:src/swinkit/csrc/window_attention.c > /tmp/old.c``). One thread (one image-parallel
worker's share), one process, rounds interleaved between the builds after one untimed pass of each
build (forward and training step), so that no build's first timed round pays first-call costs. It
times every kernel call of a no-grad forward per (channels, shifted), that is per stage and shift,
and the whole forward; then forward + backward of a training step (stochastic depth off, so that
both builds see the same work). Gradients must come out the same. Both sources must take this
swinkit's kernel arguments (``native.ABI``, 3; sources before the bfloat16 entry point are ABI 2
and are refused: to time one of those, give a copy of it the bfloat16 entry and ``abi`` of today's
source).

    python benchmarks/kernel_versions.py /tmp/old.c [--model swin_t] [--batch 8] [--rounds 7] [--bf16]

``--bf16`` runs both under CPU bfloat16 autocast, which takes the kernel's bfloat16 entry points.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import swinkit
from swinkit import native


def build(source: Path) -> native.Kernels:
    """The kernels of ``source`` for this CPU, built into the usual cache (named by the source's hash)."""
    saved = native.SOURCE
    native.SOURCE = source
    try:
        native.reset()
        kernels = native.kernel()
        if kernels is None:
            raise SystemExit(native.status())
        return kernels
    finally:
        native.SOURCE = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="the older window_attention.c")
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bf16", action="store_true", help="under CPU bfloat16 autocast")
    args = parser.parse_args()
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    torch.set_num_threads(1)
    builds = {"baseline": build(args.baseline), "current": build(native.SOURCE)}
    per_head = collections.defaultdict(list)  # (build, channels, shifted) -> seconds per window and head
    calls = {"build": None}
    timed = native.window_attention

    def window_attention(qkv, heads, bias, *rest, **options):
        start = time.perf_counter()
        out = timed(qkv, heads, bias, *rest, **options)
        shifted = options.get("mask") is not None or bias.shape[0] > 1
        per_head[(calls["build"], qkv.shape[-1] // 3, shifted)].append(
            (time.perf_counter() - start) / (qkv.shape[0] * heads)
        )
        return out

    native.window_attention = window_attention
    torch.manual_seed(0)
    model = swinkit.create_model(args.model, drop_path_rate=0.0)
    size = model.config.img_size
    images = torch.randn(args.batch, 3, size, size)
    labels = torch.randint(0, model.config.num_classes, (args.batch,))
    forward, training, gradients = collections.defaultdict(list), collections.defaultdict(list), {}
    for kernels in builds.values():  # one untimed pass per build and mode: first-call costs fall here
        native._kernels[native.cpu_variant()] = kernels
        calls["build"] = None
        model.eval()
        with torch.inference_mode(), precision:
            model(images)
        model.train().zero_grad(set_to_none=True)
        with precision:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
    for _ in range(args.rounds):
        for name, kernels in builds.items():
            native._kernels[native.cpu_variant()] = kernels
            calls["build"] = name
            model.eval()
            with torch.inference_mode(), precision:
                start = time.perf_counter()
                model(images)
                forward[name].append(time.perf_counter() - start)
            calls["build"] = None  # the training step's calls are not counted per head
            model.train().zero_grad(set_to_none=True)
            start = time.perf_counter()
            with precision:
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            training[name].append(time.perf_counter() - start)
            gradients[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    native.reset()
    keys = sorted({key[1:] for key in per_head if key[0] is not None})
    dtype = "bfloat16 autocast" if args.bf16 else "float32"
    print(
        f"{args.model}, batch {args.batch}, {dtype}, one thread, "
        f"medians of {args.rounds} interleaved rounds after one untimed warm-up each"
    )
    print("per window and head, microseconds (channels, shifted):")
    for channels, shifted in keys:
        old, new = (statistics.median(per_head[(name, channels, shifted)]) * 1e6 for name in builds)
        print(f"  ({channels:4d}, {shifted!s:>5})  baseline {old:6.2f}  current {new:6.2f}  {old / new:5.2f}x")
    for label, times in (("forward (no grad)", forward), ("forward + backward", training)):
        old, new = (statistics.median(times[name]) for name in builds)
        print(f"{label:<20} baseline {old * 1e3:7.1f} ms  current {new * 1e3:7.1f} ms  {old / new:5.3f}x")
    difference = (gradients["current"] - gradients["baseline"]).abs().max().item()
    print(f"largest difference between the two builds' gradients: {difference:.1e}")


if __name__ == "__main__":
    main()
