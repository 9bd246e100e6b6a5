"""timm's layout: the official block names, but patch merging at the *start* of stages 1..3
(``layers.{i+1}.downsample``), the classifier under ``head.fc`` and no derived buffers."""

from __future__ import annotations

import re

from ..variants import SwinConfig
from .formats import require_representable
from .io import StateDict
from .official import is_derived

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def to_swinkit(state_dict: StateDict) -> StateDict:
    """A timm state dict under swinkit's key names (downsample moved to the stage before it,
    ``head.fc`` to ``head``), derived buffers dropped."""
    out = {}
    for key, value in state_dict.items():
        if is_derived(key):
            continue
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        out[key.replace("head.fc.", "head.", 1) if key.startswith("head.fc.") else key] = value
    return out


def from_swinkit(state_dict: StateDict, config: SwinConfig) -> StateDict:
    """swinkit keys -> timm's ``SwinTransformer`` / ``SwinTransformerV2`` state dict."""
    require_representable(
        "timm",
        {
            "timm has no backbone state dict of its own (features_only; use official or hf)": config.features_only,
            "timm's Swin has no absolute position embedding (ape=True)": config.ape,
            "timm's Swin always has the patch-embedding LayerNorm (patch_norm=False)": not config.patch_norm,
        },
    )
    out = {}
    for key, value in state_dict.items():
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out["head.fc." + key[len("head.") :] if key.startswith("head.") else key] = value
    return out
