"""Detectors exported to ONNX: one file for any image size, from the image to the detections.

The file takes one RGB image ``(3, H, W)`` in [0, 1] (``image``) and returns what the detector
returns for it: ``boxes`` ``(K, 4)`` in the image's pixels, ``labels`` ``(K,)`` (1 = the first
class), ``scores`` ``(K,)`` and, for Mask R-CNN, ``masks`` ``(K, 1, H, W)`` probabilities. Resizing
to the test scale, padding, anchors, proposals, NMS and mask pasting are in the graph.

It is built from two exports, because neither exporter takes the whole detector:

- torchvision's detection engine exports with torch's TorchScript exporter (``dynamo=False``),
  through the ONNX branches torchvision wrote for its tracer (sizes as tensors, NMS, pasting
  loops); a Swin backbone does not (its sizes drive Python arithmetic the tracer would freeze into
  constants: :func:`swinkit.model.check_images` refuses it);
- the backbone + FPN exports with the dynamo exporter as a classifier's does, one graph for
  every size (:func:`swinkit.export.export_program`); torchvision's data-dependent loops do not.

So the detector is traced with its backbone as one placeholder node (:class:`_BackbonePlaceholder`, the
maps computed eagerly while the tracer looks away), and the backbone's graph is written in its
place (:func:`_inline`). Two steps that torchvision's traced graph computes differently from eager
are replaced while tracing: the resized size (torchvision's graph scales in float32, so a 200-pixel
side times 0.8 floors to 159 where eager Python gets 160; here in float64, as eager) and mmdet's
mask pasting (:func:`~swinkit.dense.mmdet.paste_masks` is written without a loop over the masks).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..checkpoint.io import atomic_write, export_destination
from ..export import DEFAULT_OPSET, MIN_OPSET, _at_opset, _quiet, export_program, onnx_session
from ..variants import SwinConfig
from .mmdet import MmdetTransform, check_detection_images, transform_like
from .weights import DenseSpec, check_spec

INPUT = "image"
OUTPUTS = ("boxes", "labels", "scores", "masks")
PLACEHOLDER_DOMAIN = "swinkit_export"  # the backbone node's domain while the two graphs are apart
BACKBONE_PREFIX = "backbone_graph/"  # the inlined backbone's node and value names start with it
OUTPUTS_KEY = "swinkit.detection_outputs"  # the metadata entry that marks a detector's file
# Marks files whose RoI pooling merges its levels by a scatter (2026-12-07): older files can fail in
# onnxruntime on images with another count of regions on a level than their trace saw.
POOLING_KEY = "swinkit.roi_levels_merged"
MAX_OPSET = 20  # the TorchScript exporter's last (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


class _BackboneMaps(nn.Module):
    """The detector's backbone + FPN with the maps as a tuple (exporters take tensors, not dicts)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def config(self) -> SwinConfig:  # read by the exporter for its trace sizes
        return self.backbone.body.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.body.swin.layers

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone(x).values())


@contextlib.contextmanager
def _tracer_away() -> Iterator[None]:
    """Run eagerly inside a TorchScript trace: the tracer records nothing until it is back."""
    state = torch._C._get_tracing_state()  # the same private hook torchvision's _is_tracing reads
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class _PlaceholderNode(torch.autograd.Function):
    """The backbone as one ONNX node: eager maps for the trace, a placeholder in the graph."""

    @staticmethod
    def forward(ctx: Any, images: Tensor, backbone: nn.Module) -> tuple[Tensor, ...]:
        with _tracer_away():
            return tuple(backbone(images).values())

    @staticmethod
    def symbolic(g: Any, images: Any, backbone: nn.Module) -> Any:
        maps = g.op(f"{PLACEHOLDER_DOMAIN}::FeatureMaps", images, outputs=len(backbone.fpn.layer_blocks) + 1)
        for output in maps:  # 4-d float maps of sizes the graph reads at run time (the exporter asks)
            output.setType(images.type().with_sizes([None] * 4))
        return maps


class _BackbonePlaceholder(nn.Module):
    """Stands in for the detector's backbone while the rest is traced."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone
        self.out_channels = backbone.out_channels
        self.names = [str(i) for i in range(len(backbone.fpn.layer_blocks))] + ["pool"]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict(zip(self.names, _PlaceholderNode.apply(images, self.inner), strict=True))


class _ExportResize:
    """The test-time resize (to ``min_size[-1]``, the longer side at most ``max_size``; swinkit's
    detectors have no ``fixed_size``) with the size computed in float64, as eager Python computes
    it; each side floored after adding ``size_offset`` (the transform's rounding)."""

    size_offset: float

    def resize(self, image: Tensor, target: Any = None) -> tuple[Tensor, Any]:
        sides = torch._shape_as_tensor(image)[-2:].double()  # a traced size, not a constant
        # The bounds as a float64 tensor: a Python number over a tensor exports as float32.
        bounds = torch.tensor([self.min_size[-1], self.max_size], dtype=torch.float64)
        scale = (bounds / torch.stack([sides.min(), sides.max()])).min()
        size = torch.floor(sides * scale + self.size_offset).long()
        return F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)[0], target


class _TorchvisionExportTransform(_ExportResize, GeneralizedRCNNTransform):
    size_offset = 0.0  # torchvision floors a resized side


class _MmdetExportTransform(_ExportResize, MmdetTransform):
    pass


def _export_transform(transform: GeneralizedRCNNTransform) -> GeneralizedRCNNTransform:
    mmdet = isinstance(transform, MmdetTransform)
    return transform_like(transform, _MmdetExportTransform if mmdet else _TorchvisionExportTransform)


class _Traced(nn.Module):
    """The detector as the TorchScript exporter sees it: one image in, a tuple of tensors out."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        # A shallow copy with its own table of sub-modules: the caller's detector keeps its backbone
        # and transform, and no weight is copied.
        self.detector = copy.copy(detector)
        self.detector._modules = dict(detector._modules)
        self.detector.backbone = _BackbonePlaceholder(detector.backbone)
        self.detector.transform = _export_transform(detector.transform)
        self.outputs = OUTPUTS if _has_mask(detector) else OUTPUTS[:3]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        detections = self.detector([image])[0]
        return tuple(detections[name] for name in self.outputs)


def _has_mask(detector: nn.Module) -> bool:
    heads = detector.roi_heads
    return bool(heads.has_masks) if hasattr(heads, "has_masks") else heads.has_mask()


def check_sizes_for(detector: nn.Module, img_size: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The two image sizes an export is checked at: ``img_size`` (default: the test scale, 4:3) and
    a portrait size that is no multiple of the padding (so both resize bounds and a padded edge run)."""
    short = detector.transform.min_size[-1]
    height, width = img_size or (short, short * 4 // 3)
    return [(height, width), (width + 13, height * 3 // 4 + 1)]


def export_detection(
    model: nn.Module,
    spec: DenseSpec,
    path: str | os.PathLike,
    img_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    check_images: list[Tensor] | None = None,
) -> dict[str, Any]:
    """Write detector ``model`` (described by ``spec``) as an ONNX file for images of any size.

    ``img_size`` is the size traced with and the first one checked. The check runs the file in
    onnxruntime and the model eagerly on the same images (``check_images``, RGB ``(3, H, W)`` in
    [0, 1], or noise at two sizes, :func:`check_sizes_for`) and reports the largest differences of
    the boxes (pixels), scores and mask probabilities and whether the detections agree in number
    and class. Returns ``{"path", "format", "example_size", "outputs", ...}``.
    """
    import onnx

    if not isinstance(model, GeneralizedRCNN):
        raise TypeError(
            f"export_detection exports a detector (swinkit.dense.create_detector, or load_dense of a detection "
            f"file), got a {type(model).__name__}"
        )
    if not isinstance(spec, DenseSpec):
        raise TypeError(f"spec must be a swinkit.dense.DenseSpec, got a {type(spec).__name__}")
    if spec.task != "detect":
        raise ValueError(f"export_detection exports detection models; this is a {spec.task} model")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"a detector exports at ONNX opsets {MIN_OPSET}..{MAX_OPSET} (LayerNormalization's first; the last "
            f"torch's TorchScript exporter, which traces torchvision's detection code, writes), got {opset}"
        )
    path = export_destination(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"{path}: a detector exports to ONNX only (.onnx); torch.export cannot take its loops")
    check_spec(spec, model.state_dict(), f"this detector (nothing written to {path})")  # classes, masks, cascade
    model = model.eval()
    size = check_sizes_for(model, img_size)[0]
    if min(size) < 1:
        raise ValueError(f"image size must be positive, got {size[0]}x{size[1]}")
    traced = _Traced(model).eval()
    example = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    merged = _inline(_trace_heads(traced, example, opset), _backbone_graph(model.backbone, opset))
    merged.metadata_props.extend(
        [onnx.StringStringEntryProto(key=k, value=v) for k, v in _metadata(spec, traced.outputs).items()]
    )
    onnx.checker.check_model(merged)
    atomic_write(path, lambda temporary: onnx.save(merged, temporary))
    report: dict[str, Any] = {
        "path": str(path),
        "format": "onnx",
        "example_size": list(size),
        "outputs": list(traced.outputs),
    }
    if check:
        images = check_images or [
            torch.rand(3, *hw, generator=torch.Generator().manual_seed(i))
            for i, hw in enumerate(check_sizes_for(model, img_size))
        ]
        report.update(compare_with_eager(model, ExportedDetector(path), images))
    return report


def _metadata(spec: DenseSpec, outputs: tuple[str, ...]) -> dict[str, str]:
    return {"swinkit.dense": spec.to_json(), OUTPUTS_KEY: json.dumps(list(outputs)), POOLING_KEY: "scatter"}


def _trace_heads(traced: _Traced, example: Tensor, opset: int) -> Any:
    """The detector with the backbone as a placeholder node, from torch's TorchScript exporter."""
    import onnx

    axes = {INPUT: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in traced.outputs}}
    if "masks" in traced.outputs:
        axes["masks"].update({2: "height", 3: "width"})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")  # the tracer's notes on each size it records as a tensor
        torch.onnx.export(
            traced,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(traced.outputs),
            dynamic_axes=axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def _backbone_graph(backbone: nn.Module, opset: int) -> Any:
    """The backbone + FPN from the dynamo exporter: a padded batch of any size to the FPN's maps."""
    import onnx_ir

    program = export_program(_BackboneMaps(backbone), dynamic_size=True)
    with warnings.catch_warnings(), torch.no_grad(), _quiet("onnxscript", "onnx_ir", "torch.onnx"):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=max(opset, DEFAULT_OPSET), optimize=True, verbose=False
        )
    return onnx_ir.to_proto(_at_opset(onnx_program.model, opset))


def _inline(heads: Any, backbone: Any) -> Any:
    """``heads`` with ``backbone``'s graph in place of its placeholder node (the backbone's input the
    node's input, its outputs the node's outputs, everything else renamed under :data:`BACKBONE_PREFIX`)."""
    import onnx

    graph = heads.graph
    found = [i for i, node in enumerate(graph.node) if node.domain == PLACEHOLDER_DOMAIN]
    if len(found) != 1 or len(backbone.graph.input) != 1:
        raise RuntimeError(f"expected one backbone node and one backbone input, got {len(found)} and "
                           f"{len(backbone.graph.input)}")  # fmt: skip
    placeholder = graph.node[found[0]]
    if len(backbone.graph.output) != len(placeholder.output):
        raise RuntimeError(f"the backbone graph has {len(backbone.graph.output)} maps, the detector takes "
                           f"{len(placeholder.output)}")  # fmt: skip
    names = {backbone.graph.input[0].name: placeholder.input[0]}
    names.update({value.name: name for value, name in zip(backbone.graph.output, placeholder.output, strict=True)})

    def renamed(name: str) -> str:
        return names.get(name, BACKBONE_PREFIX + name) if name else name

    nodes = []
    for node in backbone.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise RuntimeError(f"the backbone graph has a sub-graph ({node.op_type}); inlining takes flat graphs")
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        copied.name = BACKBONE_PREFIX + node.name
        copied.input[:] = [renamed(name) for name in node.input]
        copied.output[:] = [renamed(name) for name in node.output]
        nodes.append(copied)
    for tensor in backbone.graph.initializer:
        copied = onnx.TensorProto()
        copied.CopyFrom(tensor)
        copied.name = renamed(tensor.name)
        graph.initializer.append(copied)
    before, after = list(graph.node[: found[0]]), list(graph.node[found[0] + 1 :])
    del graph.node[:]
    graph.node.extend(before + nodes + after)
    heads.functions.extend(backbone.functions)
    versions = {entry.domain: entry.version for entry in heads.opset_import if entry.domain != PLACEHOLDER_DOMAIN}
    for entry in backbone.opset_import:
        versions.setdefault(entry.domain, entry.version)
    del heads.opset_import[:]
    heads.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())
    heads.ir_version = max(heads.ir_version, backbone.ir_version)
    return heads


class ExportedDetector(nn.Module):
    """A file written by ``swinkit detect export``, used like the detector it came from.

    ``forward(images)`` takes a list of RGB ``(3, H, W)`` images in [0, 1] and returns one dict of
    ``boxes``, ``labels``, ``scores`` (and ``masks``) per image, as torchvision's detectors do in
    eval mode, and refuses what they refuse (:func:`~swinkit.dense.mmdet.check_detection_images`);
    onnxruntime runs the file on the CPU in float32. ``spec`` is the description in its metadata,
    so ``swinkit detect predict`` and ``eval`` check the deployed file itself.
    """

    def __init__(self, path: str | os.PathLike, session: Any = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = session or onnx_session(self.path)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "swinkit.dense" not in metadata:
            raise ValueError(f"{self.path} was not written by swinkit detect export (no 'swinkit.dense' metadata)")
        self.spec = DenseSpec.from_json(metadata["swinkit.dense"], str(self.path))
        self.outputs = [output.name for output in self.session.get_outputs()]
        self.merges_by_scatter = POOLING_KEY in metadata

    def train(self, mode: bool = True) -> ExportedDetector:
        if mode:
            raise ValueError("an exported detection file computes the model in eval mode only; it cannot train")
        self.training = False
        return self

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        check_detection_images(images, str(self.path))
        results = []
        for image in images:
            values = self._run(image)
            results.append(
                {name: torch.from_numpy(v).to(image.device) for name, v in zip(self.outputs, values, strict=True)}
            )
        return results

    def _run(self, image: Tensor) -> list[Any]:
        try:
            # The graph takes float32; forward refused anything but float RGB in [0, 1] (never 0..255 integers).
            return self.session.run(None, {INPUT: image.detach().cpu().float().numpy()})
        except Exception as error:  # onnxruntime's own classes (Fail, InvalidArgument, ...)
            size = "x".join(str(side) for side in image.shape[1:])
            text = f"{self.path}: onnxruntime failed on a {size} image: {str(error).splitlines()[0]}"
            if not self.merges_by_scatter:
                text += (
                    "; this file was exported before swinkit's fix of 2026-12-07 (its RoI pooling can fail on "
                    "images with another count of regions on an FPN level than it was traced with): export it again"
                )
            raise ValueError(text) from None


@torch.no_grad()
def compare_with_eager(model: nn.Module, exported: nn.Module, images: list[Tensor]) -> dict[str, Any]:
    """The largest differences between ``exported``'s detections and ``model``'s on ``images``.

    Detections are paired by class and nearest box, not by rank: two scores a rounding apart may
    come in either order. ``same_detections`` is false where the counts differ or a class has no partner.
    """
    report: dict[str, Any] = {"checked_sizes": [list(image.shape[-2:]) for image in images], "detections": []}
    report.update(same_detections=True, max_box_error=0.0, max_score_error=0.0)
    for image in images:
        expected, found = model([image])[0], exported([image])[0]
        report["detections"].append(len(expected["boxes"]))
        order = _partners(expected, found)
        if order is None:
            report["same_detections"] = False
            continue
        for name, key in (("boxes", "max_box_error"), ("scores", "max_score_error"), ("masks", "max_mask_error")):
            if name in expected and len(order):
                error = float((found[name][order] - expected[name]).abs().max())
                report[key] = max(report.get(key, 0.0), error)
    return report


def _partners(expected: dict[str, Tensor], found: dict[str, Tensor]) -> Tensor | None:
    """For each expected detection, the found one of its class with the nearest box (each taken once)."""
    if len(found["boxes"]) != len(expected["boxes"]):
        return None
    distance = (expected["boxes"][:, None] - found["boxes"][None]).abs().amax(dim=-1)
    distance[expected["labels"][:, None] != found["labels"][None]] = float("inf")
    order = []
    for row in distance:
        index = int(row.argmin())
        if row[index] == float("inf"):
            return None
        order.append(index)
        distance[:, index] = float("inf")
    return torch.tensor(order, dtype=torch.long)
