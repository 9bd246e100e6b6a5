"""SimMIM pretraining step on the CPU: the batch split over the image-parallel workers against serial.

    python benchmarks/simmim_split.py [--model swin_t] [--batch 8] [--rounds 10] [--threads 2]

One process; a training step (loss, backward, fused AdamW) of ``SimMIM`` on a 192-pixel encoder
with window 6 (the SimMIM recipes' size), stochastic depth 0.1, a 0.6 mask of 32-pixel squares.
The two settings alternate (the order flips every round), the first round is a warm-up; prints
images/s medians and the quartiles of the paired ratios. Numbers go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import swinkit
from swinkit.pretrain import SimMIM, random_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = swinkit.create_model(args.model, img_size=192, window_size=6, num_classes=0, drop_path_rate=0.1)
    model = SimMIM(encoder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(args.batch, 3, 192, 192)
    mask = torch.stack([random_mask((192, 192)) for _ in range(args.batch)])

    def step(split: bool) -> float:
        model.image_parallel = split
        start = time.perf_counter()
        model(images, mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds + 1):
        for split in (True, False) if round_ % 2 else (False, True):
            seconds = step(split)
            if round_:
                times[split].append(seconds)
    ratios = sorted(serial / split for split, serial in zip(times[True], times[False], strict=True))
    split, serial = statistics.median(times[True]), statistics.median(times[False])
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(
        f"{args.model} SimMIM step, batch {args.batch}: split {args.batch / split:.2f} images/s, serial "
        f"{args.batch / serial:.2f}, ratio {serial / split:.3f} (paired quartiles "
        f"{ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f})"
    )


if __name__ == "__main__":
    main()
