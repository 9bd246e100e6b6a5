"""What a dynamic height and width costs in onnxruntime: the dynamic file against static files.

One Swin-T file with a dynamic height and width serves every side from 33 up (see
``swinkit.export``); a ``--static-size`` file serves one size with a leaner graph. This script
exports both (random weights), then times onnxruntime on each size in interleaved rounds (each
round runs every file once per size) and prints medians and the dynamic / static ratio.

    python benchmarks/onnx_dynamic.py [--model swin_t] [--sizes 224,288] [--batch 8]
        [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import swinkit
from swinkit.export import export_onnx_model, onnx_session


def seconds(session, images) -> float:
    feed = {session.get_inputs()[0].name: images}
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--sizes", default="224,288", help="image sides, comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(side) for side in args.sizes.split(",")]
    model = swinkit.create_model(args.model).eval()
    folder = Path(tempfile.mkdtemp())
    sessions = {"dynamic": onnx_session(export_onnx_model(model, folder / "dynamic.onnx"), args.threads)}
    for side in sizes:
        example = torch.randn(2, 3, side, side)
        path = export_onnx_model(model, folder / f"static{side}.onnx", example, dynamic_size=False)
        sessions[f"static {side}"] = onnx_session(path, args.threads)
    images = {side: torch.randn(args.batch, 3, side, side).numpy() for side in sizes}
    times: dict[tuple[str, int], list[float]] = {}
    for side in sizes:  # warm-up: first runs plan memory and pick kernels
        for name in ("dynamic", f"static {side}"):
            seconds(sessions[name], images[side])
    for _ in range(args.rounds):
        for side in sizes:
            for name in ("dynamic", f"static {side}"):
                times.setdefault((name, side), []).append(seconds(sessions[name], images[side]))
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds, medians")
    for side in sizes:
        dynamic = statistics.median(times[("dynamic", side)])
        static = statistics.median(times[(f"static {side}", side)])
        rate = args.batch / dynamic, args.batch / static
        ratio = static / dynamic
        print(f"{side}x{side}: dynamic {rate[0]:.2f} img/s, static {rate[1]:.2f} img/s, dynamic/static {ratio:.3f}x")


if __name__ == "__main__":
    main()
