"""Recognising a checkpoint: which layout (format), which family (V1 / V2), which architecture."""

from __future__ import annotations

import math
import re
from typing import Any

from .adapt import IMAGENET22K_CLASSES
from .io import CheckpointError, StateDict, unwrap_state_dict

FORMATS = ("official", "timm", "torchvision", "hf", "swinkit")

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def detect_format(state_dict: StateDict) -> str:
    """Name the layout of a state dict: one of :data:`FORMATS` (``swinkit`` is the official layout).

    Training-checkpoint wrappers and DDP / ``torch.compile`` prefixes are looked through. Raises
    :class:`CheckpointError` when the keys are not those of any Swin layout.
    """
    keys = list(unwrap_state_dict(state_dict, "the state dict"))
    if any(key.startswith("features.0.0.") for key in keys):
        return "torchvision"
    if any(key.startswith(("swin.", "swinv2.", "embeddings.patch_embeddings", "encoder.layers.")) for key in keys):
        return "hf"
    keys = [key[len("backbone.") :] if key.startswith("backbone.") else key for key in keys]
    if any(_BLOCK.match(key) for key in keys) and any(key.startswith("patch_embed.") for key in keys):
        if any(re.match(r"^layers\.0\.downsample\.", key) for key in keys):
            return "official"
        if any(re.match(r"^layers\.[1-9]\d*\.downsample\.", key) for key in keys) or "head.fc.weight" in keys:
            return "timm"
        return "official"
    sample = ", ".join(keys[:5])
    raise CheckpointError(
        f"the state dict is not a Swin Transformer checkpoint of any known layout "
        f"({', '.join(FORMATS)}); its first keys are: {sample}"
    )


def detect_family(state_dict: StateDict) -> str:
    """``"v2"`` if the weights have V2's cosine attention / continuous position bias, else ``"v1"``."""
    v2_markers = ("logit_scale", "cpb_mlp", "continuous_position_bias_mlp")
    return "v2" if any(marker in key for key in state_dict for marker in v2_markers) else "v1"


def infer_config(state_dict: StateDict) -> dict[str, Any]:
    """Architecture fields that a swinkit-layout state dict determines (a partial :class:`SwinConfig`)."""
    try:
        proj = state_dict["patch_embed.proj.weight"]
    except KeyError:
        raise CheckpointError("the state dict has no patch_embed.proj.weight: not a Swin checkpoint") from None
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    depths: dict[int, int] = {}
    for key in state_dict:
        match = _BLOCK.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    stages = range(len(depths))
    family = detect_family(state_dict)
    fields: dict[str, Any] = {
        "family": family,
        "embed_dim": embed_dim,
        "in_chans": in_chans,
        "patch_size": patch_size,
        "depths": tuple(depths[i] for i in stages),
        "num_heads": tuple(_heads(state_dict, i, family) for i in stages),
        "mlp_ratio": state_dict["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        "patch_norm": "patch_embed.norm.weight" in state_dict,
        "ape": "absolute_pos_embed" in state_dict,
    }
    if family == "v1":
        rows = state_dict["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
        fields["window_size"] = (math.isqrt(rows) + 1) // 2
        construction = _clamped_size(state_dict, fields["window_size"], patch_size, len(depths))
        if construction:
            fields["img_size"] = construction
        fields["qkv_bias"] = "layers.0.blocks.0.attn.qkv.bias" in state_dict
    else:
        fields["qkv_bias"] = "layers.0.blocks.0.attn.q_bias" in state_dict
        fields.update(_v2_geometry(state_dict))
    stage_norms = tuple(i for i in stages if f"norm{i}.weight" in state_dict)
    if "head.weight" in state_dict:
        fields["num_classes"] = state_dict["head.weight"].shape[0]
    elif stage_norms or "norm.weight" not in state_dict:
        fields["features_only"] = True
        fields["out_indices"] = stage_norms or tuple(stages)
        fields["stage_norms"] = bool(stage_norms)
    else:
        fields["num_classes"] = 0
    if fields["ape"]:
        fields["img_size"] = math.isqrt(state_dict["absolute_pos_embed"].shape[1]) * patch_size
    return fields


def check_stage_windows(state_dict: StateDict, label: str) -> None:
    """Refuse V1 weights whose windows vary by stage in a way no Swin has: one window for all stages,
    smaller only in a stage whose map is smaller (so never larger than an earlier stage's)."""
    sides = []
    while (key := f"layers.{len(sides)}.blocks.0.attn.relative_position_bias_table") in state_dict:
        sides.append((math.isqrt(state_dict[key].shape[0]) + 1) // 2)
    for stage, side in enumerate(sides):
        if stage and side > min(sides[:stage]):
            raise CheckpointError(
                f"{label}: stage {stage}'s relative position bias tables are for window {side}, stage 0's for "
                f"{sides[0]} (windows by stage {sides}): per-stage windows, as in timm's swin_s3_* "
                "(AutoFormerV2) models, are not a Swin Transformer; swinkit reads Swin V1 and V2 files"
            )


def _clamped_size(state_dict: StateDict, window: int, patch_size: int, stages: int) -> int | None:
    """The construction size implied by a stage whose bias table was clamped below the window."""
    for stage in range(stages):
        rows = state_dict[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"].shape[0]
        side = (math.isqrt(rows) + 1) // 2
        if side < window:
            return side * 2**stage * patch_size
    return None


# A published name's geometry: window12to16_192to256 (timm, the official files), window12to16-192to256 (Hugging Face).
_NAMED_GEOMETRY = re.compile(r"window(\d+)(?:to(\d+))?[_-](\d+)(?:to(\d+))?")


def v2_geometry_from_name(name: str, stages: int, patch_size: int) -> dict[str, Any]:
    """The window, size and pretrained windows a published V2 model's name states (``{}`` if none).

    ``swinv2_tiny_window16_256`` is window 16 at 256 px; ``swinv2_base_window12to16_192to256`` was
    fine-tuned to window 16 at 256 from window 12 at 192, so its coordinates are scaled by the
    windows its stages had there, (12, 12, 12, 6): the official fine-tuning rule, as timm builds it.
    """
    match = _NAMED_GEOMETRY.search(name)
    if not match:
        return {}
    first_window, window, first_size, size = (int(group) if group else None for group in match.groups())
    fields: dict[str, Any] = {"window_size": window or first_window, "img_size": size or first_size}
    if fields["img_size"] < patch_size * 2 ** (stages - 1) or not fields["window_size"]:  # "window8_2": no size
        return {}
    if window:
        sides = (first_size // (patch_size * 2**stage) for stage in range(stages))
        fields["pretrained_window_sizes"] = tuple(max(min(first_window, side), 1) for side in sides)
    return fields


# The published V2 geometries: ImageNet-22K pretraining at 192 px with window 12, ImageNet-1K at 256 with window 8.
_V2_PRETRAINING = {"window_size": 12, "img_size": 192}
_V2_DEFAULT = {"window_size": 8, "img_size": 256}
_EXTRA_NORM = re.compile(r"^layers\.\d+\.blocks\.(\d+)\.norm3\.")


def _v2_geometry(state_dict: StateDict) -> dict[str, Any]:
    """Window, construction size and extra-norm period of V2 weights.

    The continuous position bias is an MLP, so no V2 parameter shape shows the window. Official
    files carry ``relative_coords_table`` buffers, from which the reader takes the window, the
    pretrained windows and the size (config hints, which override what is returned here); for
    timm's the reader looks for a published name (:func:`v2_geometry_from_name`). Otherwise the
    published geometry is assumed: 192 px with window 12 for an ImageNet-22K head, else 256 px with
    window 8 (the reader notes the assumption).
    """
    head = state_dict.get("head.weight")
    fields = dict(_V2_PRETRAINING if head is not None and head.shape[0] == IMAGENET22K_CLASSES else _V2_DEFAULT)
    extra = sorted({int(match.group(1)) for key in state_dict if (match := _EXTRA_NORM.match(key))})
    if extra:  # the huge / giant models: ``norm3`` ends every ``period``-th block of a stage
        fields["extra_norm_period"] = extra[0] + 1
    return fields


def _heads(state_dict: StateDict, stage: int, family: str) -> int:
    prefix = f"layers.{stage}.blocks.0.attn."
    if family == "v1":
        return state_dict[prefix + "relative_position_bias_table"].shape[1]
    return state_dict[prefix + "logit_scale"].shape[0]


def describe(fields: dict[str, Any]) -> str:
    """A short human description of an architecture, for error messages."""
    parts = [f"Swin {fields.get('family', 'v1').upper()}"]
    for name in ("embed_dim", "depths", "num_heads", "window_size", "num_classes"):
        if name in fields:
            parts.append(f"{name}={fields[name]}")
    return " ".join(parts)


def require_representable(fmt: str, problems: dict[str, bool]) -> None:
    """Raise naming every problem whose condition holds: the ways a model cannot be written as ``fmt``."""
    found = [problem for problem, present in problems.items() if present]
    if found:
        raise ValueError(f"this model cannot be written in the {fmt} layout: " + "; ".join(found))
