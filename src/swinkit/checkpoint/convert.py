"""Converting a checkpoint from any supported layout to any other, without changing a tensor.

Reading brings the file to swinkit's names (dropping only derived buffers); the weights are
checked against the architecture they imply, key by key and shape by shape; writing maps them to
the target's names and adds the buffers the target library registers. Tensors keep their dtype
and values, so a conversion there and back gives bit-identical weights (where a layout has no
place for a parameter, such as torchvision V2's always-zero k bias, the value is its fixed one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..variants import SwinConfig
from . import hf, native
from .formats import FORMATS
from .io import CheckpointError, StateDict, atomic_write, save_safetensors, save_torch
from .load import CONVERTERS, Checkpoint, LoadReport, compare_keys, mismatch_message, read_any

_SAFETENSORS_METADATA = {"format": "pt"}  # what transformers and timm expect in a safetensors header


@dataclass
class Conversion:
    """What :func:`convert` did."""

    source: str
    source_format: str
    target: str
    target_format: str
    family: str
    tensors: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        line = (
            f"wrote {self.target} ({self.target_format} layout, Swin {self.family.upper()}, {self.tensors} tensors) "
            f"from {self.source} ({self.source_format} layout)"
        )
        return "\n".join([line] + [f"  note: {note}" for note in self.notes])


def export_state_dict(state_dict: StateDict, config: SwinConfig, fmt: str) -> StateDict:
    """swinkit-layout weights -> the state dict of layout ``fmt`` (raises if ``config`` has no place there)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return dict(state_dict) if fmt == "swinkit" else CONVERTERS[fmt].from_swinkit(state_dict, config)


def write_checkpoint(
    state_dict: StateDict,
    config: SwinConfig,
    path: str | os.PathLike,
    fmt: str,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write swinkit-layout weights as layout ``fmt``, the way that library's users load files.

    - ``swinkit``: a safetensors file with the config and class names in its metadata.
    - ``official``: ``{"model": state_dict}`` in a ``.pth`` (a plain state dict for ``.safetensors``).
    - ``timm`` / ``torchvision``: a state dict, ``.safetensors`` or ``.pth`` by the extension.
    - ``hf``: a directory with ``config.json`` and ``model.safetensors`` for ``from_pretrained``.
    """
    path = Path(path)
    exported = export_state_dict(state_dict, config, fmt)
    safetensors = path.suffix == ".safetensors"
    if fmt == "swinkit":
        native.write(exported, config, path, class_names)
    elif fmt == "hf":
        if path.exists() and not path.is_dir():
            raise ValueError(f"--to hf writes a directory (config.json + model.safetensors), but {path} is a file")
        save_safetensors(exported, path / "model.safetensors", _SAFETENSORS_METADATA)
        text = json.dumps(hf.config_dict(config, list(class_names) if class_names else None), indent=2)
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    elif safetensors:
        save_safetensors(exported, path, _SAFETENSORS_METADATA)
    else:
        save_torch({"model": exported} if fmt == "official" else exported, path)
    return path


def convert(
    source: str | os.PathLike,
    target: str | os.PathLike,
    to: str = "swinkit",
    class_names: Sequence[str] | None = None,
) -> Conversion:
    """Convert checkpoint ``source`` (any supported layout) to layout ``to`` at ``target``.

    The architecture comes from the file (swinkit metadata, a transformers ``config.json``, or the
    weights' shapes); class names from the file unless given. Raises :class:`CheckpointError` if
    the weights do not form one complete model: nothing is dropped silently.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; accepted: {', '.join(FORMATS)}")
    if Path(target).suffix.lower() in (".onnx", ".pt2"):  # a checkpoint under an export's name: refused later
        raise ValueError(
            f"{target}: convert writes checkpoints (.safetensors, .pth, .bin); "
            f"'swinkit export' writes {Path(target).suffix.lower()} files"
        )
    if Path(source).resolve() == Path(target).resolve():
        raise ValueError(f"{target} is the file being converted: writing it would replace the original; give another")
    checkpoint = read_any(source)
    config, state_dict, notes = _checked(checkpoint)
    names = list(class_names) if class_names is not None else checkpoint.class_names
    if names is not None and len(names) != config.num_classes:
        notes.append(f"{len(names)} class names do not fit {config.num_classes} classes; not written")
        names = None
    path = write_checkpoint(state_dict, config, target, to, names)
    # Returned, not logged: `swinkit convert` prints it, once.
    return Conversion(str(source), checkpoint.format, str(path), to, config.family, len(state_dict), notes)


def _checked(checkpoint: Checkpoint) -> tuple[SwinConfig, StateDict, list[str]]:
    """The file's config and weights, verified key by key and shape by shape against a model of that config."""
    from ..factory import build_model, config_from_checkpoint

    config = config_from_checkpoint(checkpoint)
    with torch.no_grad():
        model = build_model(config)
    expected = model.state_dict()
    state_dict, notes = dict(checkpoint.state_dict), list(checkpoint.notes)
    unused = [k for k in state_dict if k.startswith(("head.", "norm.")) and config.features_only and k not in expected]
    if unused:
        notes.append(f"a backbone file's classifier / final norm are not part of the backbone: {unused}")
        state_dict = {k: v for k, v in state_dict.items() if k not in unused}
    report = LoadReport(checkpoint.source, checkpoint.format, checkpoint.family)
    compare_keys(state_dict, expected, report)
    if not report.ok:
        raise CheckpointError(mismatch_message(checkpoint, model, report))
    return config, state_dict, notes
