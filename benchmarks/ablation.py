"""What the ablation scripts share: a module switch flipped around one call, medians, the report."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from swinkit.bench import BenchResult


def switched(module: ModuleType, name: str, value: Any, call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` run with ``module.name`` set to ``value``, restored to what it was afterwards."""

    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return call()
        finally:
            setattr(module, name, saved)

    return run


def median_seconds(call: Callable[[], Any], repeats: int = 15) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(result: BenchResult, on: str, off: str, label: str) -> None:
    """Each contender's images/s and ratio to timm, then ``label``: the ``off`` -> ``on`` speed-up."""
    base = result.images_per_second("timm")
    for name in result.times:
        speed = result.images_per_second(name)
        print(f"{result.mode:<10} {name:<22} {speed:7.2f} img/s  {speed / base:5.2f}x timm")
    print(f"{result.mode:<10} {label} {statistics.median(result.times[off]) / statistics.median(result.times[on]):.3f}")


def arguments(description: str) -> argparse.Namespace:
    """``--rounds`` and ``--threads`` (the latter applied to torch at once)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args
