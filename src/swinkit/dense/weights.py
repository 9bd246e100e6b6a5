"""Dense model files: weights in the official layout plus everything needed to rebuild the model.

Files are safetensors whose keys follow the official dense checkpoints: the Swin backbone under
``backbone.`` (``norm0..norm3`` included), so ``create_model`` / ``create_backbone`` read the
backbone of any swinkit dense file, and an official ``mmseg`` UPerNet file (``decode_head.``,
``auxiliary_head.``) loads into a segmentor by name. Detection files keep torchvision's names after
the backbone (``neck.`` for its FPN, ``rpn.``, ``roi_heads.``). The metadata key ``swinkit_dense``
holds a :class:`DenseSpec` as JSON. :func:`load_dense` also reads official files whole: an mmdet
Mask R-CNN / Cascade Mask R-CNN (:mod:`swinkit.dense.mmdet`; :func:`save_mmdet` writes one) or an
mmseg UPerNet.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import official
from ..checkpoint.io import CheckpointError, read_checkpoint, save_safetensors, save_torch
from ..checkpoint.load import refuse_non_finite
from ..checkpoint.official import is_derived
from ..variants import SwinConfig, get_config, is_real, is_whole
from .backbone import backbone_from_config
from .mmdet import (
    COCO_CLASSES,
    from_mmdet,
    is_mmdet_detector,
    mmdet_category_ids,
    mmdet_classes,
    mmdet_head_options,
    to_mmdet,
)

ADE20K_CLASSES = 150
COCO_CLASS_COUNT = len(COCO_CLASSES)

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

    def __post_init__(self) -> None:
        check_task(self.task)
        if not isinstance(self.backbone, SwinConfig):
            raise TypeError(f"a dense spec's backbone must be a SwinConfig, got a {type(self.backbone).__name__}")
        if not self.backbone.features_only:
            raise ValueError(
                "a dense spec's backbone must be a features_only SwinConfig (the dense backbone's: "
                "create_backbone(...).config), got features_only=False"
            )
        classes = self.classes
        if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"a dense spec's classes must be a non-empty list of class names (str), got {classes!r}")
        self.classes = list(classes)
        stages = len(self.backbone.depths)
        frozen = self.frozen_stages
        if isinstance(frozen, bool) or not isinstance(frozen, int) or not -1 <= frozen <= stages:
            raise ValueError(f"a dense spec's frozen_stages must be a whole number in -1..{stages}, got {frozen!r}")
        for name in ("head", "inference"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"a dense spec's {name} must be a dict, got a {type(getattr(self, name)).__name__}")
        problems = _inference_problems(self.task, self.inference, len(self.classes))
        if problems:
            raise ValueError("a dense spec's inference settings are invalid: " + "; ".join(problems))

    def heads(self) -> str:
        """The heads in words: ``UPerNet + FCN auxiliary head``, ``Cascade Mask R-CNN``, ..."""
        if self.task == "segment":
            return "UPerNet" + (" + FCN auxiliary head" if self.head.get("aux", True) else "")
        kind = "Mask R-CNN" if self.head.get("masks") else "Faster R-CNN"
        return "Cascade " + kind if self.head.get("cascade") else kind

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


def _inference_problems(task: str, inference: dict[str, Any], classes: int) -> list[str]:
    """What is wrong with the test settings a file stores (each is read as it is when the model
    runs: a category id list shorter than the classes failed at the first detection of the last)."""
    problems = []
    ids = inference.get("category_ids")
    if task == "detect" and ids is not None:
        listed = isinstance(ids, (list, tuple)) and all(is_whole(i) for i in ids)
        if not listed or len(ids) != classes or len(set(ids)) != len(ids):
            problems.append(f"category_ids must be {classes} distinct whole numbers, one per class, got {ids!r}")
    if task == "segment":
        if "mode" in inference and inference["mode"] not in ("whole", "slide"):
            problems.append(f"mode must be 'whole' or 'slide', got {inference['mode']!r}")
        scale = inference.get("scale")  # None: each image at its own size
        if scale is not None and not (
            isinstance(scale, (list, tuple)) and len(scale) == 2 and all(is_real(v) and v > 0 for v in scale)
        ):
            problems.append(f"scale must be 2 positive numbers (long side, short side) or null, got {scale!r}")
        for key in ("crop_size", "stride"):
            if key in inference and not (is_whole(inference[key]) and inference[key] >= 1):
                problems.append(f"{key} must be a whole number of pixels of 1 or more, got {inference[key]!r}")
    return problems


def check_task(task: Any) -> None:
    """Refuse a dense task other than ``segment`` and ``detect`` (:data:`FILE_PREFIXES`)."""
    if task not in FILE_PREFIXES:
        raise ValueError(f"unknown dense task {task!r}; accepted: {', '.join(FILE_PREFIXES)}")


def check_spec(spec: DenseSpec, state_dict: dict[str, Tensor], what: str = "the model", heads: bool = True) -> None:
    """Refuse to describe ``state_dict`` (model keys) with ``spec`` unless the model ``spec`` builds
    (on the meta device: no memory, no initialisation) has the same keys and shapes, so that a file
    written with both loads as it was written; a ValueError names the first differences. Without
    ``heads`` only the backbone and the class count are compared (what an mmdet or mmseg file takes
    from a spec: its heads are read from its weights)."""
    if not isinstance(spec, DenseSpec):
        raise TypeError(f"spec must be a swinkit.dense.DenseSpec, got a {type(spec).__name__}")
    try:
        with torch.device("meta"):
            described = build_dense_model(spec).state_dict()
    except (ValueError, TypeError) as error:
        raise ValueError(f"the spec does not describe a model: {error}") from None
    own = {k: v for k, v in state_dict.items() if not is_derived(k)}
    classes = _class_rows(own), _class_rows(described)
    if not heads:
        backbone = FILE_PREFIXES[spec.task][0][0]
        own, described = ({k: v for k, v in d.items() if k.startswith(backbone)} for d in (own, described))
    missing, unexpected, mismatched = _differences(own, described)
    parts = [
        f"{label} {names[:6]}" + (f" ({len(names)} in all)" if len(names) > 6 else "")
        for label, names in (
            ("shapes differ (model vs spec)", mismatched),
            ("only the spec's model has", missing),
            ("only this model has", unexpected),
        )
        if names
    ]
    if None not in classes and classes[0] != classes[1]:
        background = classes[1] - len(spec.classes)  # a detector's class scores have the background's row
        parts.insert(0, f"the model has {classes[0] - background} classes")
    if parts:
        raise ValueError(
            f"the spec ({spec.task}: {spec.heads()}, {len(spec.classes)} classes) does not describe {what}: "
            + "; ".join(parts)
        )


def _class_rows(state_dict: dict[str, Tensor]) -> int | None:
    """The rows of a segmentor's or detector's (first) class scores; None for another model."""
    for key, value in state_dict.items():
        if key.endswith(("box_predictor.cls_score.weight", "decode_head.conv_seg.weight")):
            return value.shape[0]
    return None


def _differences(state_dict: dict[str, Tensor], expected: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """The keys of ``expected`` that ``state_dict`` lacks, those it has in excess, and those of other shapes."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def build_dense_model(spec: DenseSpec) -> nn.Module:
    """A randomly initialised segmentor or detector as ``spec`` describes it."""
    backbone = backbone_from_config(spec.backbone, spec.frozen_stages)
    if spec.task == "segment":
        from .segmentation import build_segmentor

        return build_segmentor(backbone, len(spec.classes), **spec.head)
    if spec.task == "detect":
        from .detection import build_detector

        return build_detector(backbone, len(spec.classes), **head_options(spec))
    raise ValueError(f"unknown dense task {spec.task!r}; accepted: {', '.join(FILE_PREFIXES)}")


# Model kinds a preset backbone can be described with (``swinkit info NAME --dense KIND``).
DENSE_KINDS = {
    "mask_rcnn": ("detect", {"masks": True}),
    "faster_rcnn": ("detect", {"masks": False}),
    "cascade_mask_rcnn": ("detect", {"masks": True, "cascade": True}),
    "cascade_rcnn": ("detect", {"masks": False, "cascade": True}),
    "upernet": ("segment", {}),
}


def preset_spec(name: str, kind: str, num_classes: int | None = None) -> DenseSpec:
    """The spec of a ``kind`` model (:data:`DENSE_KINDS`) on preset ``name``'s backbone, as Swin's
    configs build it, for ``num_classes`` classes (default: COCO's 80, ADE20K's 150)."""
    if kind not in DENSE_KINDS:
        raise ValueError(f"unknown dense model kind {kind!r}; accepted: {', '.join(DENSE_KINDS)}")
    task, head = DENSE_KINDS[kind]
    if task == "detect":
        head = {**head, "geometry": "mmdet", "agnostic_boxes": False, "losses": "mmdet"}
    count = num_classes if num_classes is not None else COCO_CLASS_COUNT if task == "detect" else ADE20K_CLASSES
    if count < 1:
        raise ValueError(f"the number of classes must be positive, got {count}")
    names = list(COCO_CLASSES) if task == "detect" and count == COCO_CLASS_COUNT else [str(i) for i in range(count)]
    config = get_config(name, features_only=True, stage_norms=True, out_indices=(0, 1, 2, 3), always_shift=True)
    if task == "detect":
        inference: dict[str, Any] = {"category_ids": mmdet_category_ids(names)}
    else:
        inference = ade20k_inference(count)
    return DenseSpec(task, config, names, head=head, inference=inference)  # predict and eval need inference


def head_options(spec: DenseSpec) -> dict[str, Any]:
    """The build options of ``spec``'s heads, a detector's missing ones as files from before they
    were choices were trained: torchvision's geometry and losses, a cascade's class-agnostic boxes."""
    if spec.task != "detect":
        return dict(spec.head)
    cascade = bool(spec.head.get("cascade", False))
    return {"geometry": "torchvision", "agnostic_boxes": cascade, "losses": "torchvision", **spec.head}


def mmdet_spec(state_dict: dict[str, Tensor], metadata: dict[str, str], source: str) -> DenseSpec:
    """The model an official mmdet detector file holds: the backbone its weights imply, mmdet's heads and
    test settings (:mod:`swinkit.dense.mmdet`), the file's class names (``meta.CLASSES``; COCO's for 80)."""
    head = mmdet_head_options(state_dict, source)
    classes, category_ids = mmdet_classes(state_dict, _class_names(metadata))
    config = _official_backbone(state_dict, source)
    return DenseSpec("detect", config, classes, head=head, inference={"category_ids": category_ids})


def is_mmseg_segmentor(state_dict: dict[str, Tensor]) -> bool:
    """Whether ``state_dict`` is an mmseg segmentor's (it has a decode head's final classifier)."""
    return "decode_head.conv_seg.weight" in state_dict


def mmseg_spec(state_dict: dict[str, Tensor], metadata: dict[str, str], source: str) -> DenseSpec:
    """The model an official mmseg UPerNet file holds, with the test settings of Swin's ADE20K configs.

    Whole-image testing at scale (2048, 512); a 150-class file is taken for ADE20K, whose label maps
    need ``reduce_zero_label`` (0 is "other"). Class names: the file's ``meta.CLASSES`` or ``0 .. K-1``.
    """
    decode = state_dict["decode_head.conv_seg.weight"]
    auxiliary = state_dict.get("auxiliary_head.conv_seg.weight")
    head: dict[str, Any] = {"channels": decode.shape[1], "aux": auxiliary is not None}
    if auxiliary is not None:
        head["aux_channels"] = auxiliary.shape[1]
    count = decode.shape[0]
    names = _class_names(metadata)
    classes = names if names is not None and len(names) == count else [str(i) for i in range(count)]
    inference = ade20k_inference(count)
    return DenseSpec("segment", _official_backbone(state_dict, source), classes, head=head, inference=inference)


def ade20k_inference(count: int) -> dict[str, Any]:
    """The test settings of Swin's ADE20K configs: whole images at scale (2048, 512); a 150-class
    model is taken for ADE20K, whose label maps need ``reduce_zero_label`` (0 is "other")."""
    return {"ignore_index": 255, "reduce_zero_label": count == ADE20K_CLASSES, "mode": "whole",
            "crop_size": 512, "stride": 341, "scale": [2048, 512]}  # fmt: skip


def _class_names(metadata: dict[str, str]) -> list[str] | None:
    return json.loads(metadata["class_names"]) if "class_names" in metadata else None


def _official_backbone(state_dict: dict[str, Tensor], source: str) -> SwinConfig:
    """The Swin config an official dense file's ``backbone.`` weights imply (the dense window rule)."""
    from ..checkpoint.load import read_any
    from ..factory import config_from_checkpoint

    backbone = {key: value for key, value in state_dict.items() if key.startswith("backbone.")}
    if not backbone:
        raise CheckpointError(f"{source}: a dense model without backbone. weights")
    try:
        return config_from_checkpoint(read_any(backbone))
    except CheckpointError as error:
        raise CheckpointError(f"{source}: its backbone is not a Swin Transformer: {error}") from None


def save_mmdet(model: nn.Module, spec: DenseSpec, path: str | os.PathLike) -> None:
    """Write a detector as an official mmdet checkpoint (``state_dict``, ``meta.CLASSES``), atomically.

    The backbone gets the buffers the official backbone registers; the heads get mmdet's names and
    class order. mmdet's file holds no test settings: mmdet's config gives them.
    """
    _save_openmmlab(model, spec, path, "detect", to_mmdet)


def save_mmseg(model: nn.Module, spec: DenseSpec, path: str | os.PathLike) -> None:
    """Write a segmentor as an official mmseg checkpoint (``state_dict``, ``meta.CLASSES``), atomically.

    swinkit's UPerNet already has mmseg's names; the backbone gets the official buffers.
    """
    _save_openmmlab(model, spec, path, "segment", dict)


def _save_openmmlab(model: nn.Module, spec: DenseSpec, path: str | os.PathLike, task: str, heads_renamed: Any) -> None:
    _check_model(model, "the model to write")
    if not isinstance(spec, DenseSpec):
        raise TypeError(f"spec must be a swinkit.dense.DenseSpec, got a {type(spec).__name__}")
    if spec.task != task:
        layout = {"detect": "mmdet", "segment": "mmseg"}[task]
        raise ValueError(f"only {task} models are written in {layout}'s layout; this is a {spec.task} model")
    own = model.state_dict()
    check_spec(spec, own, f"this {task} model (nothing written to {path})", heads=False)
    weights = to_file_keys(own, task)
    prefix = "backbone."
    backbone = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
    heads = {key: value for key, value in weights.items() if not key.startswith(prefix)}
    state_dict = {**official.from_swinkit(backbone, spec.backbone), **heads_renamed(heads)}
    save_torch({"meta": {"CLASSES": tuple(spec.classes)}, "state_dict": state_dict}, path)


def _rename(state_dict: dict[str, Tensor], pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        prefix = next(((old, new) for old, new in pairs if key.startswith(old)), None)
        out[key if prefix is None else prefix[1] + key[len(prefix[0]) :]] = value
    return out


def to_file_keys(state_dict: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    """``state_dict`` with the backbone (and FPN) under the names official mmdet / mmseg files of ``task`` use."""
    return _rename(state_dict, FILE_PREFIXES[task])


def from_file_keys(state_dict: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    """The inverse of :func:`to_file_keys`: a dense file's keys under the model's names."""
    return _rename(state_dict, [(new, old) for old, new in FILE_PREFIXES[task]])


def save_dense(
    model: nn.Module, spec: DenseSpec, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None
) -> None:
    """Write ``model`` (or ``state_dict``, in the model's keys) and ``spec`` as one safetensors file,
    atomically; refused where ``spec`` does not describe those weights (:func:`check_spec`)."""
    if state_dict is None:
        _check_model(model, "the model to write")
    weights = model.state_dict() if state_dict is None else state_dict
    check_spec(spec, weights, f"the weights to write (nothing written to {path})")
    save_safetensors(to_file_keys(weights, spec.task), path, {"format": "pt", "swinkit_dense": spec.to_json()})


def load_dense_weights(model: nn.Module, path: str | os.PathLike, task: str) -> None:
    """Load a dense file (swinkit's, or an official one with the same architecture) into ``model``, strictly.

    Derived buffers of official files (``relative_position_index``, ``attn_mask``) are dropped; any
    missing, unexpected or mis-shaped key is an error that names it.
    """
    _check_model(model, "load_dense_weights' model")
    check_task(task)
    _fit(model, read_checkpoint(path)[0], path, task)


def _check_model(model: Any, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a segmentor or detector (a torch.nn.Module), got a {type(model).__name__}")


def _fit(model: nn.Module, state_dict: dict[str, Tensor], path: str | os.PathLike, task: str) -> None:
    state_dict = from_file_keys({k: v for k, v in state_dict.items() if not is_derived(k)}, task)
    missing, unexpected, mismatched = _differences(state_dict, model.state_dict())
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path} does not fit the {task} model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches (file vs model) {mismatched[:8]}"
        )
    refuse_non_finite(state_dict, str(path))
    model.load_state_dict(state_dict)


def read_dense_file(path: str | os.PathLike) -> tuple[DenseSpec, dict[str, Tensor]] | None:
    """The spec and weights (in swinkit's file keys) of a dense file: swinkit's, an official mmdet
    Mask R-CNN / Cascade Mask R-CNN (:func:`mmdet_spec`) or mmseg UPerNet (:func:`mmseg_spec`);
    None for any other checkpoint."""
    state_dict, metadata = read_checkpoint(path)
    if "swinkit_dense" in metadata:
        return DenseSpec.from_json(metadata["swinkit_dense"], str(path)), state_dict
    if is_mmdet_detector(state_dict):
        return mmdet_spec(state_dict, metadata, str(path)), from_mmdet(state_dict, str(path))
    if is_mmseg_segmentor(state_dict):
        return mmseg_spec(state_dict, metadata, str(path)), state_dict
    return None


def load_dense_heads(model: nn.Module, path: str | os.PathLike, task: str) -> dict[str, list[str]]:
    """mmdet's ``load_from`` for fine-tuning: the heads (and a detector's FPN) of a dense file of
    ``task`` (swinkit's, or an official mmdet / mmseg one) loaded into ``model``, each tensor whose
    name and shape fit; the class-dependent layers of a file with another class count stay as
    they are. The backbone is not touched (``create_backbone`` reads it from the same file).

    Returns ``{"taken": [...], "skipped": [...]}`` (the file's head keys in the model's names); a
    file of another task, or no dense file at all, gives nothing taken.
    """
    check_task(task)
    found = read_dense_file(path)
    if found is None or found[0].task != task:
        return {"taken": [], "skipped": []}
    own = model.state_dict()
    backbone = FILE_PREFIXES[task][0][0]  # the backbone's prefix in the model
    heads = {k: v for k, v in from_file_keys(found[1], task).items() if not k.startswith(backbone)}
    taken = {k: v for k, v in heads.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(taken, strict=False)
    return {"taken": sorted(taken), "skipped": sorted(set(heads) - set(taken))}


def load_dense(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, DenseSpec]:
    """Rebuild the model a dense file describes (:func:`read_dense_file`), load its weights;
    returns it in eval mode and its spec."""
    found = read_dense_file(path)
    if found is None:
        raise CheckpointError(
            f"{path} is not a dense model file: neither a swinkit one (no 'swinkit_dense' metadata; "
            "'swinkit segment train' / 'swinkit detect train' write them) nor an official mmdet detector "
            "or mmseg UPerNet"
        )
    return rebuild_dense(*found, path, device), found[0]


def rebuild_dense(
    spec: DenseSpec, state_dict: dict[str, Tensor], source: str | os.PathLike, device: str = "cpu"
) -> nn.Module:
    """The model ``spec`` describes with ``state_dict`` (file keys) loaded strictly, in eval mode."""
    try:
        model = build_dense_model(spec)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: its model description cannot be built: {error}") from None
    _fit(model, state_dict, source, spec.task)
    return model.to(device).eval()
