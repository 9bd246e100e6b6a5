"""Images in parallel: a no-grad CPU batch split across worker threads, one core each.

PyTorch spreads every operation over its intra-op threads and joins them at the end of it. Swin's
fused path issues thousands of small operations per batch (per-head matmuls and softmaxes,
layer norms and gathers on one image's tokens), many below PyTorch's grain size, so they run on
one core while the others wait, and each of the rest pays a fork and a join. Images are
independent, so the batch is split instead: each worker thread runs its share of the images from
start to end with one intra-op thread, and every core stays busy (1.02-1.14x on two cores across
runs, see benchmarks/RESULTS.md). Each image's numbers are those of the serial fused path up to the
rounding of matrix products of another row count.

Workers copy the caller's thread-local state that matters (inference mode, CPU autocast: 1.14x
for Swin-T under bfloat16 autocast on an AVX-512 BF16 CPU); the split is skipped where it could
change results or semantics: with autograd on, in training mode (dropout would draw its random
numbers in another order), while tracing, inside a worker, or when there is one thread or one
image. ``model.image_parallel = False`` turns it off (for callers that run their own threads).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from .attention import resolve_impl

_local = threading.local()
_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def _worker_setup() -> None:
    _local.worker = True
    torch.set_num_threads(1)  # this thread's OpenMP and MKL setting (both thread-local)
    # PyTorch sets a thread's OpenMP team lazily, on its first parallel operation, from the
    # process-wide count just set: do it now, before the caller restores that count.
    torch.ones(1 << 16).add_(1)


def worker_pool() -> ThreadPoolExecutor:
    """The shared pool, one worker per intra-op thread (``torch.get_num_threads()``); callers submit
    as many shares as they need, up to that. Rebuilt after a fork (threads do not survive one) or
    when the thread count changes (the old pool's threads are let go)."""
    global _pool
    workers = max(1, torch.get_num_threads())
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            executor = ThreadPoolExecutor(workers, thread_name_prefix="swinkit-images")
            # Start every worker now, each waiting on the barrier so that no thread runs two setups.
            barrier = threading.Barrier(workers)
            list(executor.map(lambda _: (_worker_setup(), barrier.wait()), range(workers)))
            torch.set_num_threads(workers)  # the process-wide count, as the caller had it
            _pool = (os.getpid(), workers, executor)
        return _pool[2]


def image_splits(model: torch.nn.Module, x: Tensor) -> int:
    """How many worker threads to split ``x``'s batch over (1: run it as it is).

    Only the fused path splits: the other paths work on whole-batch tensors, large enough for
    PyTorch's own threading.
    """
    if (
        not getattr(model, "image_parallel", False)
        or resolve_impl(model.layers[0].blocks[0].attn.attn_impl, x.device) != "fused"
        or x.device.type != "cpu"
        or x.shape[0] < 2
        or torch.is_grad_enabled()
        or model.training
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or getattr(_local, "worker", False)
    ):
        return 1
    return min(torch.get_num_threads(), x.shape[0])


def run_split(function: Callable[[Tensor], Any], x: Tensor, parts: int) -> Any:
    """``function(x)`` computed on ``parts`` slices of the batch in worker threads, joined again.

    ``function`` returns a tensor or a list / tuple of tensors whose first dimension is the batch.
    """
    inference = torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def work(images: Tensor) -> Any:
        with (
            torch.inference_mode(inference),
            torch.no_grad(),
            torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast),
        ):
            return function(images)

    results = list(worker_pool().map(work, x.tensor_split(parts)))
    if isinstance(results[0], Tensor):
        return torch.cat(results)
    return type(results[0])(torch.cat(outputs) for outputs in zip(*results, strict=True))
