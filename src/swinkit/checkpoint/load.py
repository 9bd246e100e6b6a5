"""Loading any supported checkpoint into a swinkit model, with a report of what happened."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..variants import SwinConfig
from . import adapt, hf, official, timm, torchvision
from .formats import (
    check_stage_windows,
    describe,
    detect_family,
    detect_format,
    infer_config,
    v2_geometry_from_name,
)
from .io import CheckpointError, StateDict, read_checkpoint, unwrap_state_dict
from .native import class_names_from_metadata, config_from_metadata

logger = logging.getLogger(__name__)

# One converter module per layout: ``to_swinkit(state_dict)`` and ``from_swinkit(state_dict, config)``.
CONVERTERS = {"official": official, "swinkit": official, "timm": timm, "torchvision": torchvision, "hf": hf}


@dataclass
class LoadReport:
    """What a load did: the file's layout and family, keys that did not fit, parts re-initialised."""

    source: str
    format: str
    family: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model parameter was loaded from the file and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} ({self.format} layout, Swin {self.family.upper()})"]
        for title, items in (("missing from the file", self.missing), ("unexpected in the file", self.unexpected)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                lines.append(f"  {title}: {shown}")
        for key, model_shape, file_shape in self.mismatched[:10]:
            lines.append(f"  shape mismatch {key}: model {model_shape}, file {file_shape}")
        if len(self.mismatched) > 10:
            lines.append(f"  ... {len(self.mismatched)} shape mismatches in all")
        lines += [f"  re-initialised: {item}" for item in self.reinitialized]
        lines += [f"  adapted: {item}" for item in self.adapted]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class Checkpoint:
    """A checkpoint read into memory and brought to swinkit's key names."""

    source: str
    format: str
    family: str
    state_dict: StateDict
    metadata: dict[str, str]
    # Config fields the file fixes beyond its weights (construction size, V2 pretrained windows, ...).
    hints: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    # The top-level names of a dense model file's other parts (``neck``, ``rpn_head``, ``decode_head`` ...).
    dense_parts: list[str] = field(default_factory=list)
    # For V2 weights whose window nothing names: the note saying what was assumed (also in ``notes``).
    geometry_assumed: str = ""


def read_any(source: str | os.PathLike | Mapping[str, Any]) -> Checkpoint:
    """Read a file or Hugging Face directory (or take an in-memory state dict) and convert it to swinkit's layout."""
    if isinstance(source, Mapping):
        state_dict, metadata, label = unwrap_state_dict(source, "state dict"), {}, "state dict"
    else:
        state_dict, metadata = read_checkpoint(source)
        label = str(Path(source))
    state_dict, pretraining_parts = simmim_encoder(state_dict)
    try:
        fmt = "swinkit" if "swinkit_config" in metadata else detect_format(state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"{label}: {error}") from None
    converted = CONVERTERS[fmt].to_swinkit(state_dict)
    _refuse_malformed(converted, label)
    refuse_non_finite(converted, label)
    checkpoint = Checkpoint(label, fmt, detect_family(converted), converted, metadata)
    if fmt == "swinkit":
        checkpoint.class_names = class_names_from_metadata(metadata, label)
        _check_own_config(checkpoint)
    elif fmt == "hf" and "hf_config" in metadata:
        hf_config = _hf_config(metadata["hf_config"], label)
        checkpoint.hints, checkpoint.class_names = hf.config_hints(hf_config), _hf_class_names(hf_config, label)
        _check_class_count(checkpoint, "its config.json's id2label")
    elif fmt in ("official", "torchvision"):
        checkpoint.hints = CONVERTERS[fmt].config_hints(state_dict)
    if checkpoint.family == "v1":
        check_stage_windows(converted, label)
    elif fmt != "swinkit" and "window_size" not in checkpoint.hints:
        _name_v2_geometry(checkpoint, _names(label, metadata))
    _, others = official.split_backbone(state_dict) if fmt == "official" else (None, [])
    checkpoint.dense_parts = others
    if others:
        checkpoint.notes.append(f"took the backbone of a dense model; its other parts are not loaded: {others}")
    if pretraining_parts:
        checkpoint.notes.append(
            f"took the encoder of a SimMIM pretraining checkpoint; its mask token and decoder are not part of an "
            f"encoder (swinkit pretrain --checkpoint continues from them): {pretraining_parts}"
        )
    return checkpoint


# The tensors whose shape the reading itself relies on (the layout hints, window and head
# adaptation), as key suffixes with the number of dimensions each must have.
RANKS = {"head.weight": 2, "patch_embed.proj.weight": 4, "relative_position_bias_table": 2, "absolute_pos_embed": 3}


def _refuse_malformed(state_dict: StateDict, label: str) -> None:
    """Weights that are not floating point, empty, or of a rank (or a bias table of a size) that no
    Swin has: refused by name here, before they are read as a Swin's (an IndexError or a
    division by zero deep in the reading, or weights cast to float without a word)."""
    problems = [
        f"{key} is {value.dtype}, not floating point"
        for key, value in state_dict.items()
        if not value.is_floating_point()
    ]
    problems += [f"{key} is empty {tuple(value.shape)}" for key, value in state_dict.items() if value.numel() == 0]
    for key, value in state_dict.items():
        rank = next((rank for suffix, rank in RANKS.items() if key.endswith(suffix)), None)
        if rank is not None and value.dim() != rank:
            problems.append(f"{key} has shape {tuple(value.shape)}, not {rank}-d")
        elif key.endswith("relative_position_bias_table") and not _is_odd_square(value.shape[0]):
            problems.append(f"{key} has {value.shape[0]} rows, not (2 window - 1)^2")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise CheckpointError(f"{label}: not the weights of a Swin model: {shown}")


def _is_odd_square(count: int) -> bool:
    side = math.isqrt(count)
    return side * side == count and side % 2 == 1


def refuse_non_finite(state_dict: StateDict, label: str) -> None:
    """Weights holding NaN or infinity give NaN for every image: refuse them, naming the tensors
    (a classifier's, a backbone's, a dense model's)."""
    broken = [key for key, value in state_dict.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        shown = ", ".join(broken[:5]) + (f", ... ({len(broken)} in all)" if len(broken) > 5 else "")
        raise CheckpointError(
            f"{label}: non-finite values (NaN or infinity) in {shown}: these weights give NaN for every "
            "image (saved from a run that diverged?)"
        )


def _hf_config(text: str, label: str) -> dict[str, Any]:
    """The transformers ``config.json`` beside the weights, once it is a JSON object."""
    try:
        config = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{label}: its config.json is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{label}: its config.json must be a JSON object (a transformers config), got {type(config).__name__}"
        )
    return config


def _hf_class_names(hf_config: dict[str, Any], label: str) -> list[str] | None:
    """``id2label``'s names in index order, once its keys are indices and its names strings."""
    labels = hf_config.get("id2label") or {}
    if not isinstance(labels, dict) or not all(
        str(key).isdigit() and isinstance(name, str) for key, name in labels.items()
    ):
        raise CheckpointError(
            f"{label}: its config.json's id2label must map class indices to names, got {str(labels)[:100]}"
        )
    return hf.class_names(hf_config)


def _check_class_count(checkpoint: Checkpoint, where: str) -> None:
    """As many class names as the head has rows: a file that contradicts itself is refused."""
    head, names = checkpoint.state_dict.get("head.weight"), checkpoint.class_names
    if head is not None and names is not None and len(names) != head.shape[0]:
        raise CheckpointError(
            f"{checkpoint.source}: {where} has {len(names)} class names but the head has {head.shape[0]} classes: "
            "the file contradicts itself; give one name per class"
        )


def _check_own_config(checkpoint: Checkpoint) -> None:
    """A swinkit file's config and class names must fit its own weights: a file that contradicts
    itself (edited by hand, or by another tool) would otherwise get a random head or crash later."""
    config = config_from_metadata(checkpoint.metadata, checkpoint.source)
    head = checkpoint.state_dict.get("head.weight")
    rows = 0 if head is None else head.shape[0]
    if not config.features_only and rows != config.num_classes:
        raise CheckpointError(
            f"{checkpoint.source}: its config says {config.num_classes} classes but its head has {rows} rows: "
            "the file contradicts itself (edited by hand?); re-save the model with swinkit.save"
        )
    names = checkpoint.class_names
    if names is not None and len(names) != config.num_classes:
        raise CheckpointError(
            f"{checkpoint.source}: {len(names)} class names for {config.num_classes} classes: the file "
            "contradicts itself (edited by hand?); re-save it with the right names (swinkit.save(..., class_names=))"
        )


def _names(label: str, metadata: dict[str, str]) -> list[str]:
    """Names that may state a V2 file's geometry: the architecture in a timm ``config.json`` beside
    the weights, and the file's (or folder's) own name."""
    names = [Path(label).name]
    try:
        architecture = json.loads(metadata.get("hf_config", "{}")).get("architecture")
    except (ValueError, AttributeError):
        architecture = None
    return [architecture, *names] if isinstance(architecture, str) else names


def _name_v2_geometry(checkpoint: Checkpoint, names: list[str]) -> None:
    """V2 weights do not show their window (the position bias is an MLP of coordinates) and timm's
    and some Hugging Face files carry no buffer or config that does: take it from a published name
    (``swinv2_tiny_window16_256``), else assume the published geometry and say so."""
    fields = infer_config(checkpoint.state_dict)
    for name in names:
        named = v2_geometry_from_name(name, len(fields["depths"]), fields["patch_size"])
        if named:
            checkpoint.hints.update(named)
            trained = (
                f", pretrained windows {named['pretrained_window_sizes']}" if "pretrained_window_sizes" in named else ""
            )
            checkpoint.notes.append(
                f"window {named['window_size']} at {named['img_size']} px{trained} taken from the name {name!r} "
                "(Swin V2 weights do not show their window)"
            )
            return
    window, size = fields["window_size"], fields["img_size"]
    if fields.get("num_classes") == adapt.IMAGENET22K_CLASSES:  # one published geometry: no doubt
        checkpoint.notes.append(f"window {window} at {size} px, as every published ImageNet-22K Swin V2 file")
        return
    checkpoint.geometry_assumed = (
        f"Swin V2 weights do not show their window and nothing names this file's: assumed window {window} at "
        f"{size} px (the published swinv2_*_window8_256); if it is another (timm's *_window16_256, "
        "*_window12to16_192to256, ...), name its preset or give window_size, img_size, pretrained_window_sizes"
    )
    checkpoint.notes.append(checkpoint.geometry_assumed)


def simmim_encoder(state_dict: StateDict) -> tuple[StateDict, list[str]]:
    """The encoder of a SimMIM pretraining state dict, and the keys left out (mask token, decoder).

    The official code's and ``swinkit pretrain``'s keep the encoder under ``encoder.`` (the official
    layout inside); Hugging Face's ``Swin*ForMaskedImageModeling`` keep it under ``swin.`` /
    ``swinv2.`` beside ``decoder.0.*``. Any other state dict comes back as it is.
    """
    if "encoder.patch_embed.proj.weight" in state_dict:
        encoder = {key[len("encoder.") :]: value for key, value in state_dict.items() if key.startswith("encoder.")}
        encoder.pop("mask_token", None)
        return encoder, [key for key in state_dict if key.removeprefix("encoder.") not in encoder]
    if "decoder.0.weight" in state_dict and any(key.endswith("embeddings.mask_token") for key in state_dict):
        others = [key for key in state_dict if key.startswith("decoder.") or key.endswith("embeddings.mask_token")]
        return {key: value for key, value in state_dict.items() if key not in others}, others
    return state_dict, []


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    strict: bool = True,
    table_resize: str = "bicubic",
) -> LoadReport:
    """Load ``source`` (a file path, a state dict in any supported layout, or a :class:`Checkpoint`).

    ``load_checkpoint(source, model)`` (the other order) works too. With ``strict`` (the default)
    any missing, unexpected or mis-shaped key raises :class:`CheckpointError` naming them. Not
    errors, but adaptations the report lists: a V1 window change (bias tables resized bicubic),
    a resolution change with an absolute position embedding (resized bicubic), an ImageNet-22K
    head into a 1000-class model (the ImageNet-1K rows selected) and any other classifier size
    (the head re-initialised). ``table_resize="geometric"`` resizes V1 bias tables by the official
    SimMIM fine-tuning's rule instead (:func:`~swinkit.checkpoint.adapt.resize_relative_position_table_geometric`).
    Returns the :class:`LoadReport` (also logged).
    """
    if isinstance(source, nn.Module) and not isinstance(model, nn.Module):
        model, source = source, model
    if table_resize not in adapt.TABLE_RESIZES:
        raise ValueError(f"table_resize must be one of {', '.join(adapt.TABLE_RESIZES)}, got {table_resize!r}")
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, SwinConfig):
        raise TypeError(
            f"load_checkpoint needs a swinkit model (swinkit.create_model / build_model), got {type(model).__name__}"
        )
    checkpoint = source if isinstance(source, Checkpoint) else read_any(source)
    report = LoadReport(checkpoint.source, checkpoint.format, checkpoint.family, notes=list(checkpoint.notes))
    if checkpoint.family != config.family:
        raise CheckpointError(
            f"{checkpoint.source} is a Swin {checkpoint.family.upper()} checkpoint but the model is Swin "
            f"{config.family.upper()}; create a {'swinv2_*' if checkpoint.family == 'v2' else 'swin_*'} model "
            "for it (or load it with create_model(checkpoint=...) and no name)"
        )
    state_dict = _adapt_positions(dict(checkpoint.state_dict), model.state_dict(), report, table_resize)
    state_dict = _adapt_outputs(state_dict, model, report)
    compare_keys(state_dict, model.state_dict(), report)
    if strict and not report.ok:
        raise CheckpointError(mismatch_message(checkpoint, model, report))
    expected = model.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(fitting, strict=False)
    logger.log(logging.INFO if report.ok and not report.reinitialized else logging.WARNING, "%s", report)
    return report


def _adapt_positions(
    state_dict: StateDict, expected: dict[str, Tensor], report: LoadReport, table_resize: str = "bicubic"
) -> StateDict:
    """Resize V1 bias tables to the model's windows and an absolute position embedding to its grid."""
    resize = {
        "bicubic": adapt.resize_relative_position_table,
        "geometric": adapt.resize_relative_position_table_geometric,
    }[table_resize]
    rule = "the official " + {"bicubic": "fine-tuning rule", "geometric": "SimMIM fine-tuning rule"}[table_resize]
    resized: dict[tuple[int, int], list[int]] = {}
    for key, value in list(state_dict.items()):
        target = expected.get(key)
        if not key.endswith("relative_position_bias_table") or target is None or value.shape == target.shape:
            continue
        if value.dim() == 2 and value.shape[1] == target.shape[1]:
            state_dict[key] = resize(value, target.shape[0])
            sides = (math.isqrt(value.shape[0]), math.isqrt(target.shape[0]))
            resized.setdefault(sides, []).append(int(key.split(".")[1]))
    for (old, new), stages in resized.items():
        report.adapted.append(
            f"relative position bias tables of stages {sorted(set(stages))} resized {table_resize} from {old}x{old} "
            f"to {new}x{new} (window {(old + 1) // 2} -> {(new + 1) // 2}, {rule})"
        )
    embed, target = state_dict.get("absolute_pos_embed"), expected.get("absolute_pos_embed")
    if embed is not None and target is not None and embed.shape != target.shape and embed.shape[2] == target.shape[2]:
        state_dict["absolute_pos_embed"] = adapt.resize_absolute_pos_embed(embed, target.shape[1])
        old, new = math.isqrt(embed.shape[1]), math.isqrt(target.shape[1])
        report.adapted.append(f"absolute position embedding resized bicubic from a {old}x{old} to a {new}x{new} grid")
    return state_dict


def _adapt_outputs(state_dict: StateDict, model: nn.Module, report: LoadReport) -> StateDict:
    """Fit the file's classifier / output norms to the model's: re-initialise or drop, and say so."""
    config = model.config
    expected = model.state_dict()
    if config.features_only:
        dropped = [k for k in state_dict if k.startswith(("head.", "norm.")) and k not in expected]
        for key in dropped:
            del state_dict[key]
        if dropped:
            report.notes.append("the file's classifier head and final norm are not used by a features_only backbone")
        fresh = [k for k in expected if k.split(".")[0] in {f"norm{i}" for i in config.out_indices}]
        fresh = [k for k in fresh if k not in state_dict]
        if fresh:
            report.reinitialized.append(f"output norms {sorted({k.split('.')[0] for k in fresh})} (not in the file)")
            for key in fresh:
                state_dict[key] = expected[key]
        return state_dict
    file_head = state_dict.get("head.weight")
    model_head = expected.get("head.weight")
    if file_head is not None and model_head is not None and _is_imagenet22k_into_1k(file_head, model_head):
        state_dict["head.weight"] = adapt.select_imagenet1k_rows(file_head)
        state_dict["head.bias"] = adapt.select_imagenet1k_rows(state_dict["head.bias"])
        report.adapted.append(
            "head: the 1000 ImageNet-1K rows of the file's 21841-class ImageNet-22K classifier "
            "(the official map22kto1k index list)"
        )
        return state_dict
    if file_head is not None and (model_head is None or file_head.shape != model_head.shape):
        model_classes = 0 if model_head is None else model_head.shape[0]
        if model_head is not None and model_classes == file_head.shape[0]:  # as many classes, another width
            differs = f"{model_classes} classes of {file_head.shape[1]} features, the model's of {model_head.shape[1]}"
        else:
            differs = f"{file_head.shape[0]} classes, the model {model_classes}"
        report.reinitialized.append(f"head: the file has {differs}; the model keeps its own head")
        return _keep_model_head(state_dict, expected)
    if file_head is None and model_head is not None:
        report.reinitialized.append("head: the file has no classifier; the model keeps its own head")
        return _keep_model_head(state_dict, expected)
    return state_dict


def _is_imagenet22k_into_1k(file_head: Tensor, model_head: Tensor) -> bool:
    return (
        file_head.shape[0] == adapt.IMAGENET22K_CLASSES
        and model_head.shape[0] == adapt.IMAGENET1K_CLASSES
        and file_head.shape[1:] == model_head.shape[1:]
    )


def _keep_model_head(state_dict: StateDict, expected: dict[str, Tensor]) -> StateDict:
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    state_dict.update({k: v for k, v in expected.items() if k.startswith("head.")})
    return state_dict


def compare_keys(state_dict: StateDict, expected: dict[str, Tensor], report: LoadReport) -> None:
    """Fill ``report`` with the keys missing from, unexpected in and mis-shaped in ``state_dict``."""
    report.missing = [k for k in expected if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in expected]
    report.mismatched = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]


def mismatch_message(checkpoint: Checkpoint, model: nn.Module, report: LoadReport) -> str:
    """The error for a file that does not fit: both architectures, then the report."""
    try:
        file_arch = describe(infer_config(checkpoint.state_dict))
    except (CheckpointError, KeyError):
        file_arch = "an architecture swinkit could not identify"
    model_arch = describe(model.config.to_dict())
    if file_arch == model_arch:  # the same architecture: the file's own weights disagree with it
        return (
            f"{checkpoint.source} does not fit the model, {model_arch}, though its weights name that "
            f"architecture: some of them have other shapes or names than it has (a file edited or cut short?).\n"
            f"{report}"
        )
    return (
        f"{checkpoint.source} does not fit the model: the file is {file_arch}, the model is {model_arch}.\n"
        f"{report}\nThe model must have the file's architecture: name its preset, or build it from the file "
        "alone (create_model(checkpoint=path), swinkit info --checkpoint FILE); strict=False loads only what fits."
    )
