"""Training checkpoints: everything needed to continue a run exactly, written atomically."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.io import CheckpointError, save_torch

TRAIN_CHECKPOINT = "checkpoint-last.pt"
FORMAT = "swinkit-train-v1"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: torch (CPU and CUDA), numpy (mixup) and Python."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray, which weights_only loading refuses: keep it as a tensor.
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the torch, CUDA, NumPy and Python random states :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically, with this process's random states."""
    save_torch({"format": FORMAT, **state, "rng": rng_state()}, path)


def _reason(error: Exception) -> str:
    """torch's first sentence, without its advice to unpickle with ``weights_only=False`` (for a
    corrupt file, wrong and unsafe)."""
    if isinstance(error, pickle.UnpicklingError):
        return "it is not an archive torch.save wrote"
    text = str(error).strip()
    return text.split(". ")[0].rstrip(".") if text else type(error).__name__


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only``); raises a clear error for any other file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"--resume {path} is a folder: give its {TRAIN_CHECKPOINT}, or --resume auto (the default) with "
            f"--output {path}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # refused for safety, not damaged: say so (nothing ran)
            raise CheckpointError(
                f"refusing to read training checkpoint {path}: it is a pickle that needs to import and run code "
                "to load; swinkit's training checkpoints hold tensors and plain values only (weights_only)"
            ) from None
        raise CheckpointError(_damaged(path, error)) from None
    except Exception as error:  # any failure to read is the same user-facing problem
        raise CheckpointError(_damaged(path, error)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a swinkit training checkpoint (expected format {FORMAT}); "
            "to fine-tune from model weights use --checkpoint instead of --resume"
        )
    return state


def _damaged(path: Path, error: BaseException) -> str:
    return (
        f"cannot read training checkpoint {path} ({_reason(error)}): the file is truncated or corrupt "
        "(swinkit writes it whole, then renames it: was it copied or edited?); delete it, or pass "
        "--resume never, to start the run over"
    )


def written_by(state: dict[str, Any]) -> str:
    """The swinkit command whose run wrote training checkpoint ``state``: a dense run's holds its
    model's description, a SimMIM run's model its mask token."""
    if isinstance(state.get("spec"), str):
        try:
            return f"{json.loads(state['spec'])['task']} train"
        except (ValueError, KeyError, TypeError):
            return "segment or detect train"
    model = state.get("model")
    return "pretrain" if isinstance(model, dict) and "mask_token" in model else "train"


def check_written_by(state: dict[str, Any], command: str, path: str | os.PathLike) -> None:
    """Refuse to resume another command's checkpoint: its options were all reported as changed."""
    writer = written_by(state)
    if writer != command:
        raise CheckpointError(
            f"{path} is a swinkit {writer} checkpoint: resume it with swinkit {writer} --resume; to start "
            f"swinkit {command} from its model's weights, give them with --checkpoint (its model-*.safetensors)"
        )
