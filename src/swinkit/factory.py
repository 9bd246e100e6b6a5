"""Building models from a preset name, a config, or a checkpoint file."""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from .checkpoint.formats import infer_config
from .checkpoint.io import CheckpointError
from .checkpoint.load import Checkpoint, load_checkpoint, read_any
from .checkpoint.native import config_from_metadata
from .variants import Preprocessing, SwinConfig, get_config

logger = logging.getLogger(__name__)

# The construction sizes of the published V1 checkpoints, by window (a file does not store it).
_V1_SIZE_FOR_WINDOW = {7: 224, 12: 384}


def build_model(config: SwinConfig, attn_impl: str = "auto") -> nn.Module:
    """A randomly initialised model for ``config`` (V1 or V2)."""
    if not isinstance(config, SwinConfig):  # a preset's name: create_model's
        raise TypeError(f"build_model takes a SwinConfig, got {config!r}; create_model(name) builds a preset")
    if config.family == "v2":
        from .model_v2 import SwinTransformerV2

        return SwinTransformerV2(config, attn_impl=attn_impl)
    from .model import SwinTransformer

    return SwinTransformer(config, attn_impl=attn_impl)


def config_from_checkpoint(checkpoint: Checkpoint, say_assumed: bool = True) -> SwinConfig:
    """The config stored in a swinkit file, or the one the weights of a foreign file imply.

    ``say_assumed``: note in ``checkpoint.notes`` what the file does not hold and was assumed (a
    torchvision file's image size)."""
    if checkpoint.format == "swinkit":
        return config_from_metadata(checkpoint.metadata, checkpoint.source)
    if checkpoint.geometry_assumed:
        logger.warning("%s: %s", checkpoint.source, checkpoint.geometry_assumed)
    fields = {**infer_config(checkpoint.state_dict), **checkpoint.hints}
    if "img_size" not in fields and fields["family"] == "v1":
        fields["img_size"] = _V1_SIZE_FOR_WINDOW.get(fields.get("window_size", 7), 224)
    img_size = fields.get("img_size", 224)
    if say_assumed and checkpoint.format == "torchvision":
        published = "Swin V2 files are at 256" if fields["family"] == "v2" else "Swin files are at 224"
        _note_once(
            checkpoint,
            f"torchvision files do not hold the image size: taken as {img_size} px (torchvision's published "
            f"{published}); it sets the preprocessing of predict and eval: if the model was trained at another, "
            "load it with create_model(checkpoint=..., img_size=...) and save it",
        )
    if say_assumed and checkpoint.format == "hf" and "img_size" not in checkpoint.hints:
        _note_once(
            checkpoint,
            f"no config.json with an image_size beside the weights: taken as {img_size} px; it sets "
            "the preprocessing of predict and eval: if the model was trained at another, load it with "
            "create_model(checkpoint=..., img_size=...) and save it",
        )
    # The official evaluation: center crop at 224 and below; the fine-tuned larger models without crop.
    fields["preprocessing"] = (
        Preprocessing(resize=img_size, crop=img_size) if img_size > 224 else Preprocessing.for_size(img_size)
    )
    # Through replace: a file of another number of stages brings its own out_indices (every stage).
    try:
        return SwinConfig().replace(**fields)
    except (ValueError, TypeError) as error:  # a config.json's values (the weights' own always fit)
        where = "its config.json describes" if checkpoint.format == "hf" else "its weights describe"
        raise CheckpointError(f"{checkpoint.source}: the architecture {where} is invalid: {error}") from None


def _note_once(checkpoint: Checkpoint, note: str) -> None:
    if note not in checkpoint.notes:
        checkpoint.notes.append(note)


def create_model(
    name: str | None = None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    *,
    strict: bool = True,
    attn_impl: str = "auto",
    table_resize: str = "bicubic",
    **overrides: Any,
) -> nn.Module:
    """Build a Swin model by preset ``name``, optionally loading ``checkpoint`` (any supported layout).

    ``overrides`` change any :class:`~swinkit.variants.SwinConfig` field (``num_classes``,
    ``img_size``, ``window_size``, ``drop_path_rate``, ``features_only``, ``out_indices``, ...).
    With no ``name`` the architecture comes from the checkpoint. Without an explicit
    ``num_classes`` the model takes the checkpoint's classifier size; with one, a different head
    in the file is re-initialised (see the load report, logged and kept in ``model.load_report``).
    ``table_resize`` is :func:`~swinkit.checkpoint.load_checkpoint`'s (V1 bias tables of another window).
    """
    if name is None and checkpoint is None:
        raise ValueError("create_model needs a model name or a checkpoint (or both)")
    loaded = checkpoint if isinstance(checkpoint, Checkpoint) or checkpoint is None else read_any(checkpoint)
    if name is None:
        config = config_from_checkpoint(loaded, say_assumed="img_size" not in overrides).replace(**overrides)
    else:
        if loaded is not None and "num_classes" not in overrides and "head.weight" in loaded.state_dict:
            overrides["num_classes"] = loaded.state_dict["head.weight"].shape[0]
        config = get_config(name, **overrides)
    windows = ""
    geometry_given = name is not None or {"window_size", "img_size"} & set(overrides)  # else the file's own
    if loaded is not None and geometry_given and "pretrained_window_sizes" not in overrides:
        config, windows = _with_pretrained_windows(config, loaded)
    model = build_model(config, attn_impl=attn_impl)
    if loaded is not None:
        model.load_report = report = load_checkpoint(model, loaded, strict=strict, table_resize=table_resize)
        if windows and loaded.geometry_assumed:  # taken to be the model's: the file's assumed geometry is not used
            report.notes = [note for note in report.notes if note != loaded.geometry_assumed] + [windows]
        elif windows:
            report.adapted.append(windows)
    return model


def _with_pretrained_windows(config: SwinConfig, loaded: Checkpoint) -> tuple[SwinConfig, str]:
    """V2 transfer: a model whose window differs from the file's scales its position coordinates by
    the windows the file was trained with (the official fine-tuning rule), unless told otherwise.
    A file whose window nothing shows is taken to be the model's. Returns the config and what was done."""
    if config.family != "v2" or loaded.family != "v2":
        return config, ""
    if loaded.geometry_assumed:
        note = (
            f"the file's window is unknown (Swin V2 weights do not show it): taken to be the model's, window "
            f"{config.window_size} at {config.img_size} px with pretrained windows {config.pretrained_window_sizes}; "
            "if it was trained at another, pass pretrained_window_sizes (the windows it had there)"
        )
        logger.warning("%s: %s", loaded.source, note)
        return config, note
    source = config_from_checkpoint(loaded, say_assumed=False)  # its windows alone: the model's geometry is given
    trained_with = _coordinate_windows(source)
    if trained_with == _coordinate_windows(config):
        return config, ""
    if source.window_size == config.window_size and source.img_size == config.img_size:
        windows = source.pretrained_window_sizes  # the file's own, where the preset's differ
        note = (
            f"pretrained_window_sizes {windows} taken from the file (the model's were {config.pretrained_window_sizes})"
        )
    else:
        windows = trained_with
        note = (
            f"the file has window {source.window_size} at {source.img_size} px, the model {config.window_size} at "
            f"{config.img_size}: its coordinates are scaled by the windows the file was trained with, "
            f"pretrained_window_sizes {windows} (the official fine-tuning rule)"
        )
    return config.replace(pretrained_window_sizes=windows), note


def _coordinate_windows(config: SwinConfig) -> tuple[int, ...]:
    """The window each stage's relative coordinates are divided by (less one): the pretrained
    window where one is set, else the stage's own."""
    from .model import stage_window

    return tuple(
        pretrained or stage_window(config, stage) for stage, pretrained in enumerate(config.pretrained_window_sizes)
    )
