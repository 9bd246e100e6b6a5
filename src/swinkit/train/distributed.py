"""Process-group setup for ``torchrun`` (DDP, FSDP) and the small collective helpers the loop needs.

A worker that ran a process group leaves through :func:`leave_worker` (the CLI calls it): Python's
own exit path aborted an FSDP rank in about one CI run in eight ("terminate called without an
active exception"; never reproduced on the development machine, 80 launches under load). Measured:
FSDP's DTensor caches keep the gloo group alive past ``destroy_process_group``, its C++ threads
(``pt_gloo_runloop``, ``gloo_tcp_loop``) still running when the command returns, so they meet
Python's finalisation. The likely cause: finalisation ends a C++ thread that asks for the GIL by
unwinding it, and unwinding through a C++ destructor terminates the process. ``os._exit``, once
every rank has passed the final barrier, after the ``atexit`` functions and flushed streams, skips
finalisation altogether.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..devices import check_device


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over all processes (float64 to keep counts exact)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.cpu()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def choose_device(name: str, local_rank: int) -> torch.device:
    """The device of this process: ``auto`` is its local GPU where CUDA is available, else the CPU; any
    other name checked."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return check_device(name)


def setup(device_name: str = "auto") -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=choose_device(device_name, 0))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


_group_used = False  # this process joined a process group (see leave_worker)


def teardown() -> None:
    """Destroy the process group, if one was set up."""
    global _group_used
    if dist.is_available() and dist.is_initialized():
        _group_used = True
        dist.destroy_process_group()


def leave_worker(code: int) -> int:
    """Exit now with ``code`` if this process ran a process group, without Python's finalisation
    (see the module docstring); otherwise return ``code``. Output files are closed by then, the
    ``atexit`` functions run and the standard streams are flushed first."""
    if not _group_used:
        return code
    logging.shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def process_group(device_name: str = "auto") -> Iterator[Distributed]:
    """:func:`setup` on entry, :func:`teardown` on exit; after a run that finished, every rank
    first waits for the others, so that none closes its connections while another may still have
    a collective in flight (a gloo rank was once aborted at exit: "terminate called without an
    active exception"). After an error there is no wait: the other ranks may never arrive.
    """
    group = setup(device_name)
    try:
        yield group
        group.barrier()
    finally:
        teardown()
