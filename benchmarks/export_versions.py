"""Two versions of swinkit side by side: seconds of ``swinkit export``, in alternating fresh processes.

Exporting with a dynamic height and width is dominated by torch's shape engine, so a change to how
the traced model writes its sizes shows only in a whole export. This runs ``python -m swinkit
export --model MODEL --format FORMAT`` (random weights; with the export's own check against eager
unless ``--no-check``) with ``PYTHONPATH`` set to each version's ``src`` folder in turn, rounds
alternating between the versions, and prints each run, the medians and their ratio. The baseline is
a copy of an older ``src``, for example::

    mkdir -p /tmp/old && git archive REV src | tar -x -C /tmp/old
    python benchmarks/export_versions.py /tmp/old/src [--model swin_t] [--formats onnx,torch-export] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import swinkit

SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}


def imported_from(source: Path) -> Path:
    """The package a Python started with ``source`` on ``PYTHONPATH`` imports (checked, not assumed)."""
    command = [sys.executable, "-c", "import swinkit; print(swinkit.__file__)"]
    out = subprocess.run(command, env=environment(source), capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()).parent


def environment(source: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(source)}


def export_seconds(source: Path, model: str, fmt: str, check: bool, folder: Path) -> float:
    """Wall-clock seconds of one ``swinkit export`` run by the swinkit under ``source``."""
    output = folder / f"model{SUFFIXES[fmt]}"
    command = [sys.executable, "-m", "swinkit", "export", "--model", model, "--format", fmt, str(output)]
    if not check:
        command.append("--no-check")
    start = time.perf_counter()
    result = subprocess.run(command, env=environment(source), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} (PYTHONPATH={source}) failed:\n{result.stderr[-2000:]}")
    output.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="the older version's src folder")
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--formats", default="onnx,torch-export", help="comma-separated: onnx, torch-export")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-check", action="store_true", help="skip each export's comparison with eager")
    args = parser.parse_args()
    formats = args.formats.split(",")
    unknown = [fmt for fmt in formats if fmt not in SUFFIXES]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; accepted: {', '.join(SUFFIXES)}")
    versions = {"baseline": args.baseline.resolve(), "current": Path(swinkit.__file__).resolve().parents[1]}
    for name, source in versions.items():
        package = imported_from(source)
        if package.parent != source:
            raise SystemExit(f"{name}: PYTHONPATH={source} imports swinkit from {package}, not from there")
        print(f"{name}: {package}")
    seconds: dict[tuple[str, str], list[float]] = {(name, fmt): [] for name in versions for fmt in formats}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for name, source in versions.items():
                for fmt in formats:
                    took = export_seconds(source, args.model, fmt, not args.no_check, Path(folder))
                    seconds[name, fmt].append(took)
                    print(f"round {round_index + 1} {name:8} {fmt:12} {took:6.1f} s", flush=True)
    for fmt in formats:
        baseline, current = (statistics.median(seconds[name, fmt]) for name in versions)
        print(f"{fmt:12} baseline {baseline:6.1f} s  current {current:6.1f} s  speed-up {baseline / current:.2f}x")


if __name__ == "__main__":
    main()
