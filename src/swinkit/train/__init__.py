"""Training: configuration, optimizer groups and schedule, EMA, checkpoints, the loop."""

from .config import RECIPES, TrainConfig, resolve_config
from .loop import Trainer, TrainResult, fit
from .optim import WarmupCosine, WarmupPoly, WarmupStep, layer_id, parameter_groups, uses_weight_decay

__all__ = [
    "RECIPES",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "WarmupPoly",
    "WarmupStep",
    "fit",
    "layer_id",
    "parameter_groups",
    "resolve_config",
    "uses_weight_decay",
]
