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
import logging
import math
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

from ..checkpoint.io import export_destination
from ..export import (
    DEFAULT_OPSET,
    MIN_OPSET,
    _at_opset,
    _quiet,
    eval_mode,
    export_program,
    onnx_session,
    refuse_non_float32,
    staged,
)
from ..variants import SwinConfig
from .mmdet import MmdetTransform, check_detection_images, rescaled_size, transform_like
from .weights import DenseSpec, check_spec

logger = logging.getLogger(__name__)

INPUT = "image"
OUTPUTS = ("boxes", "labels", "scores", "masks")
PLACEHOLDER_DOMAIN = "swinkit_export"  # the backbone node's domain while the two graphs are apart
BACKBONE_PREFIX = "backbone_graph/"  # the inlined backbone's node and value names start with it
OUTPUTS_KEY = "swinkit.detection_outputs"  # the metadata entry that marks a detector's file
# Marks files whose RoI pooling merges its levels by a scatter (2026-12-07): older files can fail in
# onnxruntime on images with another count of regions on a level than their trace saw.
POOLING_KEY = "swinkit.roi_levels_merged"
# The test-time resize in the graph, {"short", "long", "offset"} (:func:`~swinkit.dense.mmdet.rescaled_size`),
# so that an image too elongated for it is refused by name before onnxruntime fails on it (older
# files lack it: onnxruntime's error is reported for them).
RESIZE_KEY = "swinkit.test_resize"
MAX_OPSET = 20  # the TorchScript exporter's last (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
# What the check accepts between onnxruntime's detections and eager's, float32 through a whole
# detector. Measured on random test detectors: boxes 3.8e-5 px below 600 x 800 and 9.8e-4 px at it,
# scores 6.6e-6, pasted mask probabilities 2.8e-4 (a box a thousandth of a pixel off moves a pixel's
# place in a small box's 28 x 28 mask by a few thousandths of a cell).
BOX_TOLERANCE = 1e-5  # of the image's longer side, and at least MIN_BOX_TOLERANCE pixels
MIN_BOX_TOLERANCE = 1e-2
SCORE_TOLERANCE = 1e-4
MASK_TOLERANCE = 1e-2
TIE_BREAKING_NOISE = 1e-3  # of the [0, 1] pixel range: no two regions of a constant image score alike after it
BOUNDARY_NOTE = (
    "a detection sits on a decision boundary there (a score at the threshold, the top-100 cut or an NMS overlap, "
    f"within float32 rounding); with noise of {TIE_BREAKING_NOISE:g} added to the image every detection agrees"
)
TIES_NOTE = (
    "they differ among exactly tied scores: eager ranked equal scores there (a constant image or region gives many "
    "regions the same one), torch and onnxruntime break such ties in different orders, so other regions survive; "
    f"with the ties broken (noise of {TIE_BREAKING_NOISE:g} added to the image) every detection agrees"
)


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


def trace_size_for(detector: nn.Module, img_size: tuple[int, int] | None) -> tuple[int, int]:
    """The image size an export traces with: ``img_size``, or the test scale at 4:3."""
    short = detector.transform.min_size[-1]
    return tuple(img_size) if img_size else (short, short * 4 // 3)


def check_sizes_for(detector: nn.Module, img_size: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The two image sizes an export is checked at on noise, neither the traced one
    (:func:`trace_size_for`): a portrait size elongated enough that the longer side's bound sets the
    scale (its longer side longer than the trace's), and a landscape one where the shorter side's
    does (larger than the trace both ways); neither side a multiple of the padding, so that a
    constant frozen into the trace would show."""
    height, width = trace_size_for(detector, img_size)
    longer, shorter = max(height, width), min(height, width)
    return [(longer + 13, shorter * 3 // 4 + 1), (shorter + 7, shorter * 4 // 3 + 11)]


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

    ``img_size`` is the size traced with (:func:`trace_size_for`). The check runs the file in
    onnxruntime and the model eagerly on the same images (``check_images``, RGB ``(3, H, W)`` in
    [0, 1], or noise at two other sizes, :func:`check_sizes_for`) and compares their detections
    (:func:`compare_with_eager`). Where an image's detections differ beyond the tolerances, the file
    is not written: a ``ValueError`` names the image's size and the differences; unless they differ
    only among exactly tied scores (a constant image or region: torch and onnxruntime break ties in
    different orders; ``differ_among_ties``), which is logged as a warning and the file kept.
    Returns ``{"path", "format", "example_size", "outputs", ...}`` and the comparison's report;
    ``model`` stays in the mode it was in.
    """
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
        got = repr(path.suffix) if path.suffix else "no suffix"
        raise ValueError(
            f"{path}: a detector exports to ONNX only (.onnx; torch.export cannot take its loops), and the commands "
            f"that read it go by its name; got {got}: name it {path.stem}.onnx"
        )
    check_spec(spec, model.state_dict(), f"this detector (nothing written to {path})")  # classes, masks, cascade
    refuse_non_float32(model)
    size = trace_size_for(model, img_size)
    if min(size) < 1:
        raise ValueError(f"image size must be positive, got {size[0]}x{size[1]}")
    with eval_mode(model), staged(path) as temporary:
        outputs = _write(model, spec, temporary, size, opset)
        report: dict[str, Any] = {"path": str(path), "format": "onnx", "example_size": list(size), "outputs": outputs}
        if check:
            images = check_images or [
                torch.rand(3, *hw, generator=torch.Generator().manual_seed(seed))
                for seed, hw in enumerate(check_sizes_for(model, img_size), start=1)
            ]
            report.update(compare_with_eager(model, ExportedDetector(temporary), images))
            _judge(path, report)
    return report


def _write(model: nn.Module, spec: DenseSpec, path: Path, size: tuple[int, int], opset: int) -> list[str]:
    """Trace ``model`` (in eval mode) at ``size``, join the graphs, write them to ``path``; the outputs' names."""
    import onnx

    traced = _Traced(model).eval()
    example = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    merged = _inline(_trace_heads(traced, example, opset), _backbone_graph(model.backbone, opset))
    resize = _export_transform(model.transform)
    metadata = _metadata(spec, traced.outputs, (resize.min_size[-1], resize.max_size, resize.size_offset))
    merged.metadata_props.extend([onnx.StringStringEntryProto(key=k, value=v) for k, v in metadata.items()])
    onnx.checker.check_model(merged)
    onnx.save(merged, str(path))
    return list(traced.outputs)


def _judge(path: Path, report: dict[str, Any]) -> None:
    """Refuse the file where an image's detections differ and eager's scores held no ties there;
    log the images where they differ among tied scores."""
    for entry in report["images"]:
        if not entry["differing"]:
            continue
        what = describe_differences(entry)
        if entry["agree_with_noise"] and not entry["tied_scores"]:
            logger.warning("%s: %s; %s", path, what, BOUNDARY_NOTE)
            continue
        if not entry["differ_among_ties"]:
            tolerances = ", ".join(f"{name} {value:.0e}" for name, value in report["tolerances"].items())
            if entry["tied_scores"]:  # an image of one pixel, for one, stays constant whatever noise is added
                what += f"; eager ranked exactly tied scores there, but with noise of {TIE_BREAKING_NOISE:g} added "
                what += "they still differ (check on another image)"
            raise ValueError(
                f"{path} was not written: the exported detector does not detect what the model does: {what}; "
                f"tolerances: {tolerances}"
            )
        logger.warning("%s: %s; %s", path, what, TIES_NOTE)


def _metadata(spec: DenseSpec, outputs: tuple[str, ...], resize: tuple[int, int, float]) -> dict[str, str]:
    short, long, offset = resize
    return {
        "swinkit.dense": spec.to_json(),
        OUTPUTS_KEY: json.dumps(list(outputs)),
        POOLING_KEY: "scatter",
        RESIZE_KEY: json.dumps({"short": short, "long": long, "offset": offset}),
    }


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
        self.resize = json.loads(metadata.get(RESIZE_KEY, "null"))  # None: exported before it was stored

    def train(self, mode: bool = True) -> ExportedDetector:
        if mode:
            raise ValueError("an exported detection file computes the model in eval mode only; it cannot train")
        self.training = False
        return self

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        check_detection_images(images, str(self.path))
        for image in images:
            self._check_scale(image)
        results = []
        for image in images:
            values = self._run(image)
            results.append(
                {name: torch.from_numpy(v).to(image.device) for name, v in zip(self.outputs, values, strict=True)}
            )
        return results

    def _check_scale(self, image: Tensor) -> None:
        """Refuse an image too elongated for the test scale, as the eager detector does
        (:class:`~swinkit.dense.mmdet.DetectionTransform`), where onnxruntime would fail in its resize."""
        if self.resize is None:
            return
        height, width = image.shape[-2:]
        short, long = self.resize["short"], self.resize["long"]
        size = rescaled_size(height, width, short, long, self.resize["offset"])
        if min(size) < 1:
            raise ValueError(
                f"{self.path}: an image of {height}x{width} resizes to {size[0]}x{size[1]} at the detector's scale "
                f"(shorter side {short}, longer at most {long}): too elongated to detect in (sizes are height x "
                "width, in pixels)"
            )

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
    """``exported``'s detections against ``model``'s (run in eval mode) on ``images``, image by image.

    Detections are paired by class and nearest box, not by rank: two scores a rounding apart may
    come in either order. A pair agrees when its boxes (pixels), scores and masks are within the
    tolerances (:data:`BOX_TOLERANCE`, :data:`SCORE_TOLERANCE`, :data:`MASK_TOLERANCE`). Each entry
    of ``images`` holds the image's ``size``, the counts (``detections``: eager's,
    ``exported_detections``), ``unpaired`` (of eager's and of the file's detections, those without
    an agreeing partner), ``differing`` (their sum) and the largest differences of the pairs
    (``box_error``, ``score_error``, ``mask_error``). Where detections differ, ``tied_scores`` says
    whether eager ranked exactly equal scores there (:func:`ranked_ties`; a constant image or region
    gives many), and ``differ_among_ties`` whether they differ only as such ties let them: with the
    ties broken (noise of :data:`TIE_BREAKING_NOISE` added to the image) every detection agrees. torch and onnxruntime
    break ties in different orders (top-k, NMS), so other regions survive. Beside the entries:
    ``same_detections`` (every detection of every image agrees), ``checked_sizes``, ``detections``,
    ``max_box_error``, ``max_score_error`` (and ``max_mask_error``) over every image, and the
    ``tolerances``.
    """
    entries = []
    with eval_mode(model):
        for image in images:
            entry, tied = _compare_image(model, exported, image)
            if entry["differing"]:
                # Re-checked with a little noise whether or not eager saw ties: float32 rounding can also
                # move a trained detector's detection across its score threshold, top-k cut or NMS overlap.
                agree = not _compare_image(model, exported, _ties_broken(image))[0]["differing"]
                entry["tied_scores"], entry["agree_with_noise"] = tied, agree
                entry["differ_among_ties"] = tied and agree
            entries.append(entry)
    report: dict[str, Any] = {
        "same_detections": not any(entry["differing"] for entry in entries),
        "checked_sizes": [entry["size"] for entry in entries],
        "detections": [entry["detections"] for entry in entries],
    }
    for key in ERROR_KEYS.values():
        if all(key in entry for entry in entries):
            report[f"max_{key}"] = max((entry[key] for entry in entries), default=0.0)
    longest = max((max(image.shape[-2:]) for image in images), default=0)
    report["tolerances"] = {
        "boxes_px": max(MIN_BOX_TOLERANCE, BOX_TOLERANCE * longest),
        "scores": SCORE_TOLERANCE,
        "masks": MASK_TOLERANCE,
    }
    report["images"] = entries
    return report


ERROR_KEYS = {"boxes": "box_error", "scores": "score_error", "masks": "mask_error"}


def _compare_image(model: nn.Module, exported: nn.Module, image: Tensor) -> tuple[dict[str, Any], bool]:
    """One image's entry of :func:`compare_with_eager`, and whether eager ranked exactly tied scores in it."""
    with _proposal_scores(model) as scores:
        expected = model([image])[0]
    tied = ranked_ties(scores, _top_proposals(model)) or _repeats(expected["scores"])
    return _compare_detections(expected, exported([image])[0], image.shape[-2:]), tied


def _ties_broken(image: Tensor) -> Tensor:
    """``image`` with noise of :data:`TIE_BREAKING_NOISE` either way (a fixed draw), kept in [0, 1]."""
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return (image + TIE_BREAKING_NOISE * noise.to(image)).clamp(0, 1)


def _compare_detections(expected: dict[str, Tensor], found: dict[str, Tensor], size: Any) -> dict[str, Any]:
    """One image's entry of :func:`compare_with_eager`, without ``tied_scores``."""
    height, width = (int(side) for side in size)
    pairs = _partners(expected, found)
    tolerances = {
        "boxes": max(MIN_BOX_TOLERANCE, BOX_TOLERANCE * max(height, width)),
        "scores": SCORE_TOLERANCE,
        "masks": MASK_TOLERANCE,
    }
    entry: dict[str, Any] = {"size": [height, width]}
    agree = torch.ones(len(pairs), dtype=torch.bool)
    for name, tolerance in tolerances.items():
        if name not in expected:
            continue
        errors = torch.zeros(len(pairs))
        if len(pairs):  # the largest difference of each pair's box corners, score, or mask pixels
            difference = found[name][pairs[:, 1]].float() - expected[name][pairs[:, 0]].float()
            errors = difference.abs().reshape(len(pairs), -1).amax(1).nan_to_num(nan=math.inf)  # NaN: no agreement
        entry[ERROR_KEYS[name]] = float(errors.max()) if len(errors) else 0.0
        agree &= errors <= tolerance
    counts = len(expected["boxes"]), len(found["boxes"])
    agreed = int(agree.sum())
    entry.update(detections=counts[0], exported_detections=counts[1], unpaired=[count - agreed for count in counts])
    entry["differing"] = sum(entry["unpaired"])
    return entry


def _partners(expected: dict[str, Tensor], found: dict[str, Tensor]) -> Tensor:
    """``(P, 2)`` pairs of (expected, found) indices: each expected detection, by rank, takes the found one
    of its class with the nearest box (the largest coordinate difference) not yet taken, where there is one."""
    distance = (expected["boxes"][:, None] - found["boxes"][None]).abs().amax(dim=-1)
    distance[expected["labels"][:, None] != found["labels"][None]] = math.inf
    distance = distance.nan_to_num(nan=math.inf)
    pairs = []
    for row, distances in enumerate(distance):
        if not len(distances):
            break
        column = int(distances.argmin())
        if math.isinf(distances[column]):
            continue
        pairs.append((row, column))
        distance[:, column] = math.inf
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def describe_differences(entry: dict[str, Any]) -> str:
    """One image's differing detections (an entry of :func:`compare_with_eager`'s ``images``) in words."""
    height, width = entry["size"]
    eager, exported = entry["unpaired"]
    errors = f"boxes {entry['box_error']:.1e} px, scores {entry['score_error']:.1e}"
    if "mask_error" in entry:
        errors += f", masks {entry['mask_error']:.1e}"
    return (
        f"at {height}x{width} {eager} of eager's {entry['detections']} detections and {exported} of onnxruntime's "
        f"{entry['exported_detections']} have no partner within the tolerances (largest differences of the paired "
        f"ones: {errors})"
    )


@contextlib.contextmanager
def _proposal_scores(model: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, the list gets the region proposal network's objectness maps of each call."""
    scores: list[Tensor] = []
    head = getattr(getattr(model, "rpn", None), "head", None)
    if head is None:  # not a torchvision R-CNN: nothing to watch
        yield scores
        return
    handle = head.register_forward_hook(lambda module, inputs, outputs: scores.extend(outputs[0]))
    try:
        yield scores
    finally:
        handle.remove()


def _top_proposals(model: nn.Module) -> int:
    rpn = getattr(model, "rpn", None)
    return rpn.pre_nms_top_n() if hasattr(rpn, "pre_nms_top_n") else 0


def ranked_ties(objectness: list[Tensor], top: int) -> bool:
    """Whether a level's ``top`` best proposal scores (and the next one, which top-k leaves out) hold
    two equal ones, as the region proposal network ranks them (top-k, then NMS by probability:
    sigmoid, where large logits also meet at 1.0). torch and onnxruntime order such ties differently."""
    for level in objectness:
        flat = level.flatten()
        best = flat.topk(min(top + 1, flat.numel())).values.sigmoid()
        if _repeats(best):
            return True
    return False


def _repeats(values: Tensor) -> bool:
    return values.unique().numel() < values.numel()
