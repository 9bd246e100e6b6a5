"""Dense model files: weights in the official layout plus everything needed to rebuild the model.

Files are safetensors whose keys follow the official dense checkpoints: the Swin backbone under
``backbone.`` (``norm0..norm3`` included), so ``create_model`` / ``create_backbone`` read the
backbone of any swinkit dense file, and an official ``mmseg`` UPerNet file (``decode_head.``,
``auxiliary_head.``) loads into a segmentor by name. Detection files keep torchvision's names after
the backbone (``neck.`` for its FPN, ``rpn.``, ``roi_heads.``). The metadata key ``swinkit_dense``
holds a :class:`DenseSpec` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..checkpoint.io import CheckpointError, read_checkpoint, save_safetensors
from ..checkpoint.official import is_derived
from ..variants import SwinConfig
from .backbone import backbone_from_config

# Module prefixes in the model -> in the file, per task.
FILE_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "segment": [("backbone.swin.", "backbone.")],
    "detect": [("backbone.body.swin.", "backbone."), ("backbone.fpn.", "neck.")],
}


@dataclass
class DenseSpec:
    """What a dense model file says about its model: task, backbone, heads, classes, inference settings."""

    task: str  # "segment" or "detect"
    backbone: SwinConfig
    classes: list[str]
    frozen_stages: int = -1
    head: dict[str, Any] = field(default_factory=dict)  # build options of the heads
    inference: dict[str, Any] = field(default_factory=dict)  # e.g. ignore index, test mode, category ids

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["backbone"] = self.backbone.to_dict()
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str, source: str) -> DenseSpec:
        try:
            values = json.loads(text)
            values["backbone"] = SwinConfig.from_dict(values["backbone"])
            return cls(**values)
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(
                f"{source}: the dense model description in the metadata is invalid: {error}"
            ) from None


def build_dense_model(spec: DenseSpec) -> nn.Module:
    """A randomly initialised segmentor or detector as ``spec`` describes it."""
    backbone = backbone_from_config(spec.backbone, spec.frozen_stages)
    if spec.task == "segment":
        from .segmentation import build_segmentor

        return build_segmentor(backbone, len(spec.classes), **spec.head)
    if spec.task == "detect":
        from .detection import build_detector

        return build_detector(backbone, len(spec.classes), **spec.head)
    raise ValueError(f"unknown dense task {spec.task!r}; accepted: {', '.join(FILE_PREFIXES)}")


def _rename(state_dict: dict[str, Tensor], pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        prefix = next(((old, new) for old, new in pairs if key.startswith(old)), None)
        out[key if prefix is None else prefix[1] + key[len(prefix[0]) :]] = value
    return out


def to_file_keys(state_dict: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    return _rename(state_dict, FILE_PREFIXES[task])


def from_file_keys(state_dict: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    return _rename(state_dict, [(new, old) for old, new in FILE_PREFIXES[task]])


def save_dense(
    model: nn.Module, spec: DenseSpec, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None
) -> None:
    """Write ``model`` (or ``state_dict``) and ``spec`` as one safetensors file, atomically."""
    weights = model.state_dict() if state_dict is None else state_dict
    save_safetensors(to_file_keys(weights, spec.task), path, {"format": "pt", "swinkit_dense": spec.to_json()})


def load_dense_weights(model: nn.Module, path: str | os.PathLike, task: str) -> None:
    """Load a dense file (swinkit's, or an official one with the same architecture) into ``model``, strictly.

    Derived buffers of official files (``relative_position_index``, ``attn_mask``) are dropped; any
    missing, unexpected or mis-shaped key is an error that names it.
    """
    _fit(model, read_checkpoint(path)[0], path, task)


def _fit(model: nn.Module, state_dict: dict[str, Tensor], path: str | os.PathLike, task: str) -> None:
    state_dict = from_file_keys({k: v for k, v in state_dict.items() if not is_derived(k)}, task)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path} does not fit the {task} model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches (file vs model) {mismatched[:8]}"
        )
    model.load_state_dict(state_dict)


def load_dense(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, DenseSpec]:
    """Rebuild the model a swinkit dense file describes, load its weights; returns it in eval mode and its spec."""
    state_dict, metadata = read_checkpoint(path)
    if "swinkit_dense" not in metadata:
        raise CheckpointError(
            f"{path} is not a swinkit dense model file (no 'swinkit_dense' metadata); files written by "
            "'swinkit segment train' / 'swinkit detect train' are"
        )
    spec = DenseSpec.from_json(metadata["swinkit_dense"], str(path))
    model = build_dense_model(spec)
    _fit(model, state_dict, path, spec.task)
    return model.to(device).eval(), spec
