"""torchvision's layout: one flat ``features`` Sequential.

``features.0`` is the patch embedding (``0`` the conv, ``2`` the LayerNorm), ``features.{2i+1}`` the
blocks of stage ``i``, ``features.{2i+2}`` the patch merging after it; a block's MLP linears are
``mlp.0`` and ``mlp.3``. Every block stores its flattened ``relative_position_index`` (V2 also its
``relative_coords_table``) as persistent buffers, and V2 keeps a full ``qkv.bias`` whose k third
torchvision zeroes in ``forward``: swinkit's ``q_bias`` / ``v_bias`` are its outer thirds.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..variants import SwinConfig
from . import buffers
from .formats import require_representable
from .io import StateDict
from .official import is_derived

_FEATURES = re.compile(r"^features\.(\d+)\.(.*)$")
_LAYERS = re.compile(r"^layers\.(\d+)\.(blocks\.\d+|downsample)\.(.*)$")
_STEM = {"0": "patch_embed.proj", "2": "patch_embed.norm"}
_MLP = {"mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}


def _rename(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if text.startswith(old):
            return new + text[len(old) :]
    return text


def _key_to_swinkit(key: str) -> str:
    match = _FEATURES.match(key)
    if not match:
        return key  # norm.*, head.*
    index, rest = int(match.group(1)), match.group(2)
    if index == 0:
        module, _, param = rest.partition(".")
        return f"{_STEM[module]}.{param}" if module in _STEM else key
    if index % 2 == 1:
        block, _, inner = rest.partition(".")
        return f"layers.{(index - 1) // 2}.blocks.{block}.{_rename(inner, _MLP)}"
    return f"layers.{index // 2 - 1}.downsample.{rest}"


def _key_from_swinkit(key: str) -> str:
    for module, name in _STEM.items():
        if key.startswith(name + "."):
            return f"features.0.{module}.{key[len(name) + 1 :]}"
    match = _LAYERS.match(key)
    if not match:
        return key
    stage, part, inner = int(match.group(1)), match.group(2), match.group(3)
    if part == "downsample":
        return f"features.{2 * stage + 2}.{inner}"
    inverse = {new: old for old, new in _MLP.items()}
    return f"features.{2 * stage + 1}.{part.split('.')[1]}.{_rename(inner, inverse)}"


def to_swinkit(state_dict: StateDict) -> StateDict:
    """A torchvision state dict under swinkit's key names; V2's qkv bias split into the q and v biases
    (the k third is unused)."""
    out = {_key_to_swinkit(key): value for key, value in state_dict.items() if not is_derived(key)}
    for key in [k for k in out if k.endswith(".attn.qkv.bias")]:
        prefix = key[: -len("qkv.bias")]
        if prefix + "logit_scale" in out:  # V2: the k third is zeroed in torchvision's forward, never used
            q_bias, _, v_bias = out.pop(key).chunk(3)
            out[prefix + "q_bias"], out[prefix + "v_bias"] = q_bias, v_bias
    return out


def from_swinkit(state_dict: StateDict, config: SwinConfig) -> StateDict:
    """swinkit keys -> torchvision's ``SwinTransformer`` state dict, buffers included.

    torchvision always has q/k/v biases: a model without them gets zeros (the same function).
    """
    clamped = buffers.clamped_stages(config)
    require_representable(
        "torchvision",
        {
            "torchvision's Swin is a classifier only (features_only)": config.features_only,
            "torchvision's Swin always has a classifier head (num_classes=0)": config.num_classes == 0,
            "torchvision's patch embedding takes 3 channels": config.in_chans != 3,
            "torchvision's Swin has no absolute position embedding (ape=True)": config.ape,
            "torchvision's Swin always has the patch-embedding LayerNorm (patch_norm=False)": not config.patch_norm,
            f"torchvision builds every stage with window {config.window_size}, but stages {clamped} of this model "
            f"are clamped to their smaller maps at img_size {config.img_size}": bool(clamped),
        },
    )
    out = {_key_from_swinkit(key): value for key, value in state_dict.items()}
    for block in buffers.construction_geometry(config):
        prefix = f"features.{2 * block.stage + 1}.{block.block}.attn."
        out[prefix + "relative_position_index"] = buffers.position_index(config.window_size, flat=True)
        weight = out[prefix + "qkv.weight"]
        if config.family == "v2":
            pretrained = config.pretrained_window_sizes[block.stage]
            out[prefix + "relative_coords_table"] = buffers.coords_table(config.window_size, pretrained)
            q_bias = out.pop(prefix + "q_bias", None)
            v_bias = out.pop(prefix + "v_bias", None)
            if q_bias is not None and v_bias is not None:
                out[prefix + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        if prefix + "qkv.bias" not in out:
            out[prefix + "qkv.bias"] = weight.new_zeros(weight.shape[0])
    return out


def config_hints(state_dict: StateDict) -> dict[str, Any]:
    """V2 files: the window and pretrained windows their ``relative_coords_table`` buffers were built with."""
    tables = {}
    for key, value in state_dict.items():
        match = _FEATURES.match(key)
        if match and match.group(2) == "0.attn.relative_coords_table":
            tables[(int(match.group(1)) - 1) // 2] = value
    return buffers.v2_window_hints([tables[i] for i in sorted(tables)]) if tables else {}
