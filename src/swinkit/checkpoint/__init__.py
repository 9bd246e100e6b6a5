"""Checkpoints: read any supported layout safely, load it with a report, save swinkit's own format."""

from .formats import FORMATS, detect_family, detect_format, infer_config
from .io import CheckpointError, read_checkpoint
from .load import Checkpoint, LoadReport, load_checkpoint, read_any
from .native import save

__all__ = [
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "LoadReport",
    "detect_family",
    "detect_format",
    "infer_config",
    "load_checkpoint",
    "read_any",
    "read_checkpoint",
    "save",
]
