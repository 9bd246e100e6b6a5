"""The official Microsoft layout (``{"model": state_dict}``): swinkit's own parameter names.

Official files also carry derived buffers (``relative_position_index``, ``attn_mask``, V2's
``relative_coords_table``); swinkit rebuilds those for the actual input size, so they are dropped.
Detection / segmentation files put the backbone under ``backbone.`` next to neck and head weights.
"""

from __future__ import annotations

from .io import StateDict

DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def is_derived(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in DERIVED_BUFFERS


def to_swinkit(state_dict: StateDict) -> StateDict:
    """Official (classification or ``backbone.``-prefixed dense) keys -> swinkit keys."""
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {
            key[len("backbone.") :]: value for key, value in state_dict.items() if key.startswith("backbone.")
        }
    return {key: value for key, value in state_dict.items() if not is_derived(key)}
