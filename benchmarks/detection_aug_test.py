"""Seconds per image of a detector tested at one scale and with multi-scale + flip views.

    python benchmarks/detection_aug_test.py [--model swin_t] [--cascade] [--size 480x640] [--rounds 3]

Random weights with a score threshold of 0, so every image has its 100 detections (a trained COCO
detector at 0.05 usually has them too): the mask heads and the pasting run for all of them. The
contenders alternate within each round: the detector's forward (one view), and
``detect_augmented`` with ``--ratios`` of the test scale, each also mirrored (``swinkit detect
eval --aug-test``'s views by default). Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from swinkit.dense import augmented_views, create_detector, detect_augmented
from swinkit.dense.detection_augment import AUG_TEST_RATIOS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--cascade", action="store_true")
    parser.add_argument("--size", default="480x640", help="HxW of the test image (COCO's most common)")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(AUG_TEST_RATIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = {"cascade": args.cascade, "score_threshold": 0.0}
    model = create_detector(args.model, 80, detector_options=options).eval()
    height, width = (int(side) for side in args.size.split("x"))
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))
    views = augmented_views(model, args.ratios, flip=True)
    contenders = {
        "one view": lambda: model([image])[0],
        f"{len(views)} views": lambda: detect_augmented(model, image, views),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.no_grad():
        for run in contenders.values():  # warm-up
            run()
        for _ in range(args.rounds):
            for name, run in contenders.items():
                start = time.perf_counter()
                found = run()
                times[name].append(time.perf_counter() - start)
                assert len(found["boxes"]) == 100, (name, len(found["boxes"]))
    kind = "Cascade Mask R-CNN" if args.cascade else "Mask R-CNN"
    print(f"{args.model} {kind}, image {height}x{width}, {args.threads} threads, {args.rounds} rounds")
    print("views: " + ", ".join(f"{v.short}/{v.long}{' mirrored' if v.flip else ''}" for v in views))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:>10}: {median:.2f} s per image (runs {', '.join(f'{t:.2f}' for t in times[name])})")
    first, second = medians.values()
    print(f"ratio: {second / first:.2f}x the time of one view")


if __name__ == "__main__":
    main()
