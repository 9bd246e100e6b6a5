"""swinkit: Swin Transformer V1 / V2 for PyTorch, exact to the official code.

The public API: build models, load and save checkpoints, count FLOPs.
"""

from . import fast  # noqa: F401  registers the native kernel's operators before anything compiles
from .checkpoint import CheckpointError, LoadReport, load_checkpoint, save
from .factory import build_model, create_model
from .flops import FlopsReport, count_parameters, flops
from .quantize import quantize_dynamic
from .variants import PRESETS, Preprocessing, SwinConfig, get_config, variant_names

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "FlopsReport",
    "LoadReport",
    "Preprocessing",
    "SwinConfig",
    "build_model",
    "count_parameters",
    "create_model",
    "flops",
    "get_config",
    "load_checkpoint",
    "quantize_dynamic",
    "save",
    "variant_names",
]
