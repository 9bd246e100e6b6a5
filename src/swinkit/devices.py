"""The devices swinkit runs on, checked by name before any work starts."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ACCEPTED = "cpu, cuda or cuda:INDEX (mps where PyTorch has it)"


def check_device(name: str, here: bool = True) -> torch.device:
    """``name`` as a ``torch.device``, refused by name when it is not one swinkit runs on, or (``here``)
    when this machine does not have it.

    torch's own errors come late and from deep inside (a CUDA device asked for on a machine without
    one fails at the first tensor moved), so each is checked here: the type, the GPU, its index.
    """
    import torch  # here: the command line parses its arguments before torch is imported

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device: use {ACCEPTED}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not one swinkit runs on: use {ACCEPTED}")
    if here and device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if here and device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use --device cpu")
    return device


def device_argument(text: str) -> str:
    """argparse ``type`` of ``--device``: the name unchanged once it is a device swinkit runs on. Whether
    this machine has it is checked when the command runs (a command can be parsed on another machine)."""
    try:
        check_device(text, here=False)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
