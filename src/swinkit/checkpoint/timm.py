"""timm's layout: the official block names, but patch merging at the *start* of stages 1..3
(``layers.{i+1}.downsample``) and the classifier under ``head.fc``."""

from __future__ import annotations

import re

from .io import StateDict
from .official import is_derived

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def to_swinkit(state_dict: StateDict) -> StateDict:
    out = {}
    for key, value in state_dict.items():
        if is_derived(key):
            continue
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        out[key.replace("head.fc.", "head.", 1) if key.startswith("head.fc.") else key] = value
    return out


def from_swinkit(state_dict: StateDict) -> StateDict:
    out = {}
    for key, value in state_dict.items():
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out["head.fc." + key[len("head.") :] if key.startswith("head.") else key] = value
    return out
