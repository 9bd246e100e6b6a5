"""Segmentation models exported: an ONNX file or a ``torch.export`` program for any batch and size.

The exported graph takes normalised images ``(N, 3, H, W)`` and returns the decode head's logits
``(N, K, H, W)`` at the input's size (``images`` -> ``logits`` in ONNX), one graph for every height
and width from 1 to :data:`~swinkit.export.SIDE_RANGE`'s end, as a classifier's export does (the
same size-generic trace of the Swin backbone; the pyramid pooling as averaging matrices,
:class:`~swinkit.dense.heads.AdaptiveAvgPool`). A whole-image pass: a file trained with
``--test-mode slide`` is exported whole, and the metadata says so. The file's metadata holds the
model description (classes, preprocessing, test scale), so a runtime needs nothing else.
Detection models export to ONNX by :mod:`swinkit.dense.detection_export`; :func:`load_dense_file`
reads either kind of exported file.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint.io import export_destination, missing_file
from ..devices import check_device
from ..export import (
    DEFAULT_OPSET,
    FORMATS,
    PROGRAM_METADATA,
    SIDE_RANGE,
    _at_opset,
    _quiet,
    _save_onnx,
    check_export,
    check_image_size,
    check_opset,
    check_suffix,
    export_program,
    judge_check,
    onnx_session,
    read_program,
    refuse_non_float32,
    size_ranges,
    staged,
)
from ..variants import SwinConfig
from .detection_export import OUTPUTS_KEY, ExportedDetector
from .weights import DenseSpec, load_dense

logger = logging.getLogger(__name__)


class SegmentationLogits(nn.Module):
    """A segmentor's logits alone, ``(N, K, H, W)``; ``config`` and ``layers`` are its Swin
    backbone's, which the exporter reads for the sizes it traces with."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    @property
    def config(self) -> SwinConfig:
        return self.segmentor.backbone.swin.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.segmentor.backbone.swin.layers

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentor(x)["out"]


def export_segmentation(
    model: nn.Module,
    spec: DenseSpec,
    path: str | os.PathLike,
    fmt: str = "onnx",
    img_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    static_size: bool = False,
) -> dict[str, Any]:
    """Write segmentor ``model`` (described by ``spec``) as ONNX (``.onnx``) or a program (``.pt2``).

    ``img_size`` (default: the file's crop size) is the first size checked against eager and, with
    ``static_size``, the only size the file takes. Returns ``{"path", "format", "example_size",
    "size_range", "max_abs_error", "max_relative_error", "checked"}`` (errors against eager PyTorch at
    batch 1 and 3, two sizes; relative to the largest logit). A file whose check fails is not
    written (:func:`~swinkit.export.judge_check`); ``model`` stays in the mode it was in.
    """
    if spec.task != "segment":
        raise ValueError(f"export_segmentation exports segmentation models; this is a {spec.task} model")
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")
    refuse_non_float32(model)
    if fmt == "onnx":
        check_opset(opset)
    path = export_destination(path)
    check_suffix(path, fmt)
    size = tuple(img_size or (spec.inference["crop_size"],) * 2)
    low, high = SIDE_RANGE
    if not static_size and not all(low <= side <= high for side in size):
        raise ValueError(f"image size {size[0]}x{size[1]} is outside {low}..{high}; use --static-size")
    wrapped = SegmentationLogits(model)
    example = torch.randn(2, wrapped.config.in_chans, *size)
    metadata = {
        "swinkit.dense": spec.to_json(),
        "swinkit.size_range": json.dumps(size_ranges(size, static_size)),
        "swinkit.test_mode": "whole",
    }
    report: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "example_size": list(size),
        "size_range": size_ranges(size, static_size),
    }
    with staged(path) as temporary:
        if fmt == "onnx":
            _write_onnx(wrapped, temporary, example, opset, not static_size, metadata)
        else:
            program = export_program(wrapped, size, not static_size, example)
            extra = {PROGRAM_METADATA: json.dumps(metadata)}
            torch.export.save(program, str(temporary), extra_files=extra)  # staged: moved into place once checked
        if check:
            report.update(judge_check(path, check_export(wrapped, temporary, fmt, size, static_size), fmt))
    return report


def _write_onnx(
    model: SegmentationLogits,
    path: Path,
    example: Tensor,
    opset: int,
    dynamic_size: bool,
    metadata: dict[str, str],
) -> None:
    program = export_program(model, dynamic_size=dynamic_size, example=example, nan_outside_range=True)
    with warnings.catch_warnings(), torch.no_grad(), _quiet("onnxscript", "onnx_ir", "torch.onnx"):
        warnings.simplefilter("ignore")  # the exporter's own deprecation notes and optimizer logs
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=max(opset, DEFAULT_OPSET),
            input_names=["images"],
            output_names=["logits"],
            optimize=True,
            verbose=False,
        )
    onnx_program.model = _at_opset(onnx_program.model, opset)
    onnx_program.model.metadata_props.update(metadata)
    _save_onnx(onnx_program, path, None)


EXPORTED_SUFFIXES = (".onnx", ".pt2")


class ExportedSegmentor(nn.Module):
    """A file written by ``swinkit segment export``, used like the segmentor it came from.

    ``forward(images)`` returns ``{"out": logits}``; ``spec`` is the model description in the file's
    metadata. An ``.onnx`` file runs in onnxruntime, a ``.pt2`` program in PyTorch, both on the CPU,
    so that ``swinkit segment predict`` and ``eval`` check the deployed file itself.
    """

    def __init__(self, path: str | os.PathLike, session: Any = None) -> None:
        super().__init__()
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            session = session or onnx_session(path)
            metadata = session.get_modelmeta().custom_metadata_map
            self.run = _onnx_runner(path, session)
        else:
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder, not a .pt2 program")
            if not path.is_file():
                raise missing_file(path)
            program, metadata = read_program(path)
            self.run = program.module()
        if "swinkit.config" in metadata and "swinkit.dense" not in metadata:
            raise ValueError(f"{path} is a classifier's export (swinkit export): swinkit predict and eval run it")
        if "swinkit.dense" not in metadata:
            raise ValueError(
                f"{path} was not written by swinkit segment export or detect export (no 'swinkit.dense' metadata)"
            )
        self.spec = DenseSpec.from_json(metadata["swinkit.dense"], str(path))
        self.path = path
        self.size_range = json.loads(metadata.get("swinkit.size_range", "null")) or size_ranges((1, 1))

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The one (height, width) the file takes (exported with ``--static-size``), else None."""
        (low_height, high_height), (low_width, high_width) = self.size_range["height"], self.size_range["width"]
        return (low_height, low_width) if low_height == high_height and low_width == high_width else None

    def resized_test(self, inference: dict[str, Any]) -> tuple[int, int] | None:
        """The size a test with ``inference`` settings must resize images to for this file: its one
        size, unless the test feeds it crops of that size (a slide test at the crop size, what
        ``segment export --static-size`` traces by default); None where the file takes what the
        test gives it."""
        fixed = self.fixed_size
        crops = inference.get("mode") == "slide" and fixed == (inference.get("crop_size"),) * 2
        return None if fixed is None or crops else fixed

    def train(self, mode: bool = True) -> ExportedSegmentor:
        # The exported graph is the eval-mode function (and a program's module refuses train()).
        if mode:
            raise ValueError("an exported segmentation file computes the model in eval mode only; it cannot train")
        self.training = False
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        check_image_size(self.path, self.size_range, images)
        return {"out": self.run(images.detach().cpu().float()).to(images.device)}


def load_dense_file(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, DenseSpec]:
    """A dense model file (:func:`~swinkit.dense.weights.load_dense`), or an exported one on the CPU
    (a segmentor's ``.onnx`` / ``.pt2``: :class:`ExportedSegmentor`; a detector's ``.onnx``:
    :class:`~swinkit.dense.detection_export.ExportedDetector`), and its description."""
    path = Path(path)
    check_device(device)
    if path.suffix.lower() not in EXPORTED_SUFFIXES:
        return load_dense(path, device)
    if torch.device(device).type != "cpu":
        raise ValueError(f"{path}: an exported file runs on the CPU; got device {device!r}")
    if path.suffix.lower() == ".onnx":
        session = onnx_session(path)
        if OUTPUTS_KEY in session.get_modelmeta().custom_metadata_map:
            model: nn.Module = ExportedDetector(path, session).eval()
        else:
            model = ExportedSegmentor(path, session).eval()
    else:
        model = ExportedSegmentor(path).eval()
    resized = model.resized_test(model.spec.inference) if isinstance(model, ExportedSegmentor) else None
    if resized:
        logger.warning(
            "%s takes %dx%d images only (exported with --static-size): segment predict and eval resize each image "
            "to it, its aspect ratio not kept, in one pass (not at the file's test scale), and the result back",
            path,
            *resized,
        )
    return model, model.spec


def _onnx_runner(path: Path, session: Any = None) -> Any:
    session = session or onnx_session(path)

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])

    return run
