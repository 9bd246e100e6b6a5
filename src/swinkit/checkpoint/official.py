"""The official Microsoft layout (``{"model": state_dict}``): swinkit's own parameter names.

Official files also carry derived buffers (``relative_position_index``, ``attn_mask``, V2's
``relative_coords_table``); swinkit rebuilds those for the actual input size, so they are dropped
on the way in and regenerated for the construction size on the way out. Detection / segmentation
files put the backbone under ``backbone.`` next to neck and head weights, with a LayerNorm per
output stage (``norm0`` .. ``norm3``).
"""

from __future__ import annotations

from typing import Any

from ..model import stage_window
from ..variants import SwinConfig
from . import buffers
from .formats import require_representable
from .io import StateDict

DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")
BACKBONE_PREFIX = "backbone."


def is_derived(key: str) -> bool:
    """Whether ``key`` is a buffer the model computes itself (index tables, masks), never read from a file."""
    return key.rsplit(".", 1)[-1] in DERIVED_BUFFERS


def split_backbone(state_dict: StateDict) -> tuple[StateDict, list[str]]:
    """A dense-model file's ``backbone.`` weights (prefix removed) and the other keys' top-level names."""
    if not any(key.startswith(BACKBONE_PREFIX) for key in state_dict):
        return state_dict, []
    backbone = {k[len(BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    others = sorted({k.split(".")[0] for k in state_dict if not k.startswith(BACKBONE_PREFIX)})
    return backbone, others


def to_swinkit(state_dict: StateDict) -> StateDict:
    """Official (classification or ``backbone.``-prefixed dense) keys -> swinkit keys."""
    state_dict, _ = split_backbone(state_dict)
    return {key: value for key, value in state_dict.items() if not is_derived(key)}


def from_swinkit(state_dict: StateDict, config: SwinConfig) -> StateDict:
    """swinkit keys -> the official layout, with the buffers the official model registers.

    A ``features_only`` model is written as the official detection backbone: ``backbone.`` keys.
    """
    # The official classification code clamps windows to small maps; its detection backbone never does.
    official = config.replace(always_shift=config.features_only)
    differing = [i for i in range(len(config.depths)) if stage_window(config, i) != stage_window(official, i)]
    require_representable(
        "official",
        {
            f"the official {'detection' if config.features_only else 'classification'} code builds the bias "
            f"tables of stages {differing} for another window at img_size {config.img_size}": bool(differing)
        },
    )
    out = dict(state_dict)
    out.update(buffers.official_buffers(official))
    if config.features_only:
        out = {BACKBONE_PREFIX + key: value for key, value in out.items()}
    return out


def config_hints(state_dict: StateDict) -> dict[str, Any]:
    """What an official file tells beyond its weights: the window rule, construction size, V2's windows."""
    backbone, _ = split_backbone(state_dict)
    # The official detection backbone always shifts and pads (never clamps the window).
    hints: dict[str, Any] = {"always_shift": True} if backbone is not state_dict else {}
    state_dict = backbone
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is not None:
        img_size = buffers.inferred_img_size(state_dict, proj.shape[-1])
        if img_size:
            hints["img_size"] = img_size
    tables = {
        int(k.split(".")[1]): v for k, v in state_dict.items() if k.endswith("blocks.0.attn.relative_coords_table")
    }
    if tables and sorted(tables) == list(range(len(tables))):  # V2: the window only the buffers show
        hints.update(buffers.v2_window_hints([tables[i] for i in range(len(tables))]))
    return hints
