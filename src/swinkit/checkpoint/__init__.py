"""Checkpoints: read any supported layout safely, load it with a report, convert between layouts,
save swinkit's own format, download the published weights."""

from .convert import Conversion, convert, export_state_dict, write_checkpoint
from .formats import FORMATS, detect_family, detect_format, infer_config
from .hub import PUBLISHED, download, published_names
from .io import CheckpointError, read_checkpoint
from .load import Checkpoint, LoadReport, load_checkpoint, read_any
from .native import save

__all__ = [
    "FORMATS",
    "PUBLISHED",
    "Checkpoint",
    "CheckpointError",
    "Conversion",
    "LoadReport",
    "convert",
    "detect_family",
    "detect_format",
    "download",
    "export_state_dict",
    "infer_config",
    "load_checkpoint",
    "published_names",
    "read_any",
    "read_checkpoint",
    "save",
    "write_checkpoint",
]
