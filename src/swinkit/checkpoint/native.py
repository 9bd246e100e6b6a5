"""swinkit's own format: a safetensors file whose metadata carries the model's whole config,
the class names and the preprocessing, so that nothing else is needed to predict or evaluate."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from torch import Tensor, nn

from ..quantize import refuse_int8
from ..variants import SwinConfig
from .io import CheckpointError, save_safetensors


def _version() -> str:
    try:
        return version("swinkit")
    except PackageNotFoundError:
        return "unknown"


def save(
    model: nn.Module,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> None:
    """Write ``model`` as a swinkit safetensors file (atomically): weights, config, class names.

    ``state_dict`` replaces ``model.state_dict()`` (e.g. the gathered weights of a sharded model).
    """
    refuse_int8(model, "save")
    write(model.state_dict() if state_dict is None else state_dict, model.config, path, class_names)


def write(
    state_dict: dict[str, Tensor],
    config: SwinConfig,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
) -> None:
    """Write swinkit-layout weights with ``config`` (architecture, num_classes, preprocessing) and class names."""
    if class_names is not None and (isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names)):
        raise TypeError(f"class_names must be a list of strings, one per class; got {class_names!r}")
    if class_names is not None and len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names given for a model with {config.num_classes} classes")
    metadata = {"format": "pt", "swinkit_config": json.dumps(config.to_dict()), "swinkit_version": _version()}
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    save_safetensors(state_dict, path, metadata)


def config_from_metadata(metadata: dict[str, str], source: str) -> SwinConfig:
    """The :class:`SwinConfig` a swinkit file stores in its metadata; a ``CheckpointError`` naming
    ``source`` if it is missing or invalid."""
    try:
        return SwinConfig.from_dict(json.loads(metadata["swinkit_config"]))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{source}: the swinkit config in the file's metadata is invalid: {error}") from None


def class_names_from_metadata(metadata: dict[str, str], source: str = "the file") -> list[str] | None:
    """The class names a swinkit file stores, or None when it stores none; a ``CheckpointError``
    naming ``source`` if they are not a JSON list of strings."""
    names = metadata.get("class_names")
    if not names:
        return None
    try:
        names = json.loads(names)
    except ValueError as error:
        raise CheckpointError(f"{source}: the class names in the file's metadata are not valid JSON: {error}") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{source}: the class names in the file's metadata must be a list of strings")
    return names
