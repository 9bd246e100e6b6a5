"""What a dynamic height and width costs in onnxruntime: the dynamic file against static files.

One file with a dynamic height and width serves every side from 1 up (see
``swinkit.export``); a ``--static-size`` file serves one size with a leaner graph. This script
exports both (random weights), then times onnxruntime on each size in interleaved rounds (each
round runs every file once per size) and prints medians and the dynamic / static ratio.

    python benchmarks/onnx_dynamic.py [--model swin_t] [--sizes 224,288] [--batch 8]
        [--rounds 7] [--threads 2] [--profile]

``--profile`` also prints onnxruntime's time per operator type for both files at the first size
(its own profiler, over ``--rounds`` runs after one warm-up run that is left out, per run).
"""

from __future__ import annotations

import argparse
import collections
import json
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


def profile(path: Path, images, runs: int, threads: int) -> collections.Counter:
    """Milliseconds per run by operator type, from onnxruntime's profiler, after one untimed warm-up run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images}
    for _ in range(runs + 1):  # the first run is a warm-up (memory planning, kernel choice), left out below
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    warm_up = min((event for event in events if event["name"] == "model_run"), key=lambda event: event["ts"])
    warm_up_end = warm_up["ts"] + warm_up["dur"]
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm_up_end:
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--sizes", default="224,288", help="image sides, comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="time per operator type, both files")
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
    if args.profile:
        side = sizes[0]
        files = {"dynamic": folder / "dynamic.onnx", "static": folder / f"static{side}.onnx"}
        totals = {name: profile(path, images[side], args.rounds, args.threads) for name, path in files.items()}
        print(f"onnxruntime profile at {side}x{side}, ms per run: operator, dynamic, static")
        print(f"  total: {sum(totals['dynamic'].values()):.1f}, {sum(totals['static'].values()):.1f}")
        for op in sorted(set(totals["dynamic"]) | set(totals["static"]), key=lambda o: -totals["dynamic"][o]):
            print(f"  {op}: {totals['dynamic'][op]:.1f}, {totals['static'][op]:.1f}")


if __name__ == "__main__":
    main()
