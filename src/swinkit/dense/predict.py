"""Evaluating and running trained dense models: metrics on a labelled set, overlays and JSON on images."""

from __future__ import annotations

import colorsys
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..checkpoint.io import check_folder, make_folder
from ..data import require_some_read
from ..predict import expand_inputs, load_or_report
from .data import Transformed, collate_lists
from .export import load_dense_file
from .weights import DenseSpec, load_dense

if TYPE_CHECKING:
    from .segmentation_data import SegmentationEvalTransform

logger = logging.getLogger(__name__)


def palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` well-separated RGB colours (golden-ratio hues), the same for every run."""
    colors = []
    for i in range(count):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


# ---------------------------------------------------------------------------------------------
# Semantic segmentation
# ---------------------------------------------------------------------------------------------


def segment_image(
    model: nn.Module,
    spec: DenseSpec,
    image: Image.Image,
    ratios: Sequence[float] | None = None,
    flip: bool = False,
) -> Tensor:
    """The ``(H, W)`` class map of one image at its own size, with the file's test settings.

    ``ratios``: test at the file's test scale times each ratio (``AUG_TEST_RATIOS``: mmseg's
    ``--aug-test``); ``flip``: with each view mirrored too. Their probabilities are averaged.
    """
    from .segmentation import check_test_ratios, infer_augmented, model_device

    check_test_ratios(ratios)
    transform, s = inference_setup(model, spec, ratios)
    device = model_device(model)
    views = [view[None].to(device) for view in transform.views(image)]
    size = (image.height, image.width)
    probabilities = infer_augmented(model, views, size, flip, s["mode"], s["crop_size"], s["stride"])
    return probabilities.argmax(dim=1)[0].cpu()


def inference_setup(
    model: nn.Module, spec: DenseSpec, ratios: Sequence[float] | None = None
) -> tuple[SegmentationEvalTransform, dict[str, Any]]:
    """The image transform and inference settings (``mode``, ``crop_size``, ``stride``) of a test:
    the file's own (``spec.inference``), or for a file exported for one size (``--static-size``)
    that the file's own test would not feed that size (a whole-image test), the image resized to it
    exactly, in one pass, as a fixed-shape deployment runs it."""
    from .export import ExportedSegmentor
    from .segmentation_data import FixedSizeEvalTransform, SegmentationEvalTransform

    s, preprocessing = spec.inference, spec.backbone.preprocessing
    fixed = model.resized_test(s) if isinstance(model, ExportedSegmentor) else None
    if fixed is None:
        return SegmentationEvalTransform(s["scale"], preprocessing.mean, preprocessing.std, ratios), s
    if ratios is not None:
        raise ValueError(
            f"{model.path} takes {fixed[0]}x{fixed[1]} images only, which each image is resized to: it cannot "
            "test at other scales (--aug-test, --test-ratios); export it without --static-size for that"
        )
    return FixedSizeEvalTransform(fixed, preprocessing.mean, preprocessing.std), {**s, "mode": "whole"}


def segmentation_overlay(image: Image.Image, labels: Tensor, num_classes: int, alpha: float = 0.5) -> Image.Image:
    """The image with each pixel tinted by its class colour."""
    colors = np.array(palette(num_classes), dtype=np.float32)
    tint = colors[labels.numpy()]
    blended = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * tint
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def _segment_result(
    model: nn.Module, spec: DenseSpec, image: Image.Image, stem: Path, ratios: Sequence[float] | None, flip: bool
) -> dict[str, Any]:
    labels = segment_image(model, spec, image, ratios, flip)
    segmentation_overlay(image, labels, len(spec.classes)).save(f"{stem}_overlay.png")
    Image.fromarray(labels.numpy().astype(np.uint8 if len(spec.classes) <= 256 else np.int32)).save(
        f"{stem}_labels.png"
    )
    counts = torch.bincount(labels.flatten(), minlength=len(spec.classes)).tolist()
    total = labels.numel()
    fractions = {name: count / total for name, count in zip(spec.classes, counts, strict=True) if count}
    return {"overlay": f"{stem}_overlay.png", "labels": f"{stem}_labels.png", "class_fractions": fractions}


def _model_to_explain(
    checkpoint: str | os.PathLike, task: str, target: str | None, alpha: float, device: str
) -> tuple[nn.Module, DenseSpec, int | None]:
    """The ``task`` model of ``checkpoint``, its spec and the class index ``target`` names (checked)."""
    from ..explain import _class_index
    from .export import EXPORTED_SUFFIXES

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if Path(checkpoint).suffix.lower() in EXPORTED_SUFFIXES:
        raise ValueError(
            f"{checkpoint}: explanations need the model's weights and gradients; give the model file written by "
            f"training, not an exported .onnx or .pt2 file"
        )
    model, spec = load_dense(checkpoint, device)
    if spec.task != task:
        raise ValueError(f"{checkpoint} is a {spec.task} model; swinkit {task} explain explains {task} models")
    return model, spec, _class_index(target, list(spec.classes))


def _explain_each(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    explained: Callable[[Image.Image], tuple[Image.Image, dict[str, Any]]],
) -> list[dict[str, Any]]:
    """``explained(image)`` -> (overlay picture, result) for every image of ``inputs``, each picture
    saved as ``output/<stem>.gradcam.png`` (or as ``output`` where it names one ``.png`` / ``.jpg``
    file, for one image); a file that cannot be decoded, or an image with nothing to explain
    (:class:`~swinkit.explain.NothingDetected`), is reported and the others go on."""
    from ..explain import NothingDetected, overlay_destinations

    paths = expand_inputs(inputs)
    destination_of = overlay_destinations(output, paths, "gradcam")
    results: list[dict[str, Any]] = []
    for path in paths:
        image = load_or_report(path, results)
        if image is None:
            continue
        try:
            picture, result = explained(image)
        except NothingDetected as error:
            results.append({"path": str(path), "error": str(error)})
            continue
        destination = destination_of(path)
        picture.save(destination)
        results.append({"path": str(path), **result, "output": str(destination)})
    return results


def explain_segments(
    inputs: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    target: str | None = None,
    stage: int | None = None,
    alpha: float = 0.5,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """``swinkit segment explain``: one Seg-Grad-CAM overlay PNG per image (``<stem>.gradcam.png`` in
    ``output``), over the image at its own size; the model sees it at the file's test scale, whole.

    ``target``: a class name of the file or an index (default: the class covering most of each
    image). A result is ``{"path", "class", "index", "pixels", "stage", "output"}`` (``pixels``: the
    fraction of the image predicted as the class), or ``{"path", "error"}`` for a bad file.
    """
    from ..explain import explain_segmentation, overlay
    from .segmentation_data import SegmentationEvalTransform

    model, spec, index = _model_to_explain(checkpoint, "segment", target, alpha, device)
    preprocessing = spec.backbone.preprocessing
    transform = SegmentationEvalTransform(spec.inference["scale"], preprocessing.mean, preprocessing.std)

    def explained(image: Image.Image) -> tuple[Image.Image, dict[str, Any]]:
        found = explain_segmentation(model, transform.image(image)[None].to(device), index, stage)
        heat = F.interpolate(found.maps[None], size=(image.height, image.width), mode="bilinear")[0, 0]
        chosen = found.targets[0]
        result = {"class": spec.classes[chosen], "index": chosen, "pixels": found.probabilities[0, chosen].item()}
        return overlay(image, heat.clamp(0, 1), alpha), {**result, "stage": found.stage}

    return _explain_each(inputs, output, explained)


# ---------------------------------------------------------------------------------------------
# Detection and instance segmentation
# ---------------------------------------------------------------------------------------------


def detection_overlay(
    image: Image.Image, detections: dict[str, Tensor], classes: Sequence[str], mask_threshold: float = 0.5
) -> Image.Image:
    """Boxes with ``class score`` labels, and masks (Mask R-CNN) tinted in the class colour."""
    canvas = TF.pil_to_tensor(image)
    colors = palette(len(classes))
    chosen = [colors[label - 1] for label in detections["labels"].tolist()]
    if len(chosen) and "masks" in detections:
        masks = detections["masks"][:, 0] > mask_threshold
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=chosen)
    if len(chosen):
        names = [
            f"{classes[label - 1]} {score:.2f}"
            for label, score in zip(detections["labels"].tolist(), detections["scores"].tolist(), strict=True)
        ]
        canvas = draw_bounding_boxes(canvas, detections["boxes"], labels=names, colors=chosen, width=2)
    return TF.to_pil_image(canvas)


def _detect_result(
    model: nn.Module, spec: DenseSpec, image: Image.Image, stem: Path, score_threshold: float, views: list[Any]
) -> dict[str, Any]:
    from .detection import to_coco_results
    from .detection_augment import detect_augmented
    from .segmentation import model_device

    tensor = TF.to_tensor(image).to(model_device(model))
    output = detect_augmented(model, tensor, views) if views else model([tensor])[0]
    output = {k: v.cpu() for k, v in output.items()}
    keep = output["scores"] >= score_threshold
    output = {k: v[keep] for k, v in output.items()}
    detection_overlay(image, output, spec.classes).save(f"{stem}_overlay.png")
    detections = []
    for entry, label in zip(
        to_coco_results(output, None, spec.inference["category_ids"]), output["labels"].tolist(), strict=True
    ):
        x, y, w, h = entry["bbox"]
        detection = {
            "class": spec.classes[label - 1],
            "category_id": entry["category_id"],
            "score": entry["score"],
            "box": [x, y, x + w, y + h],
        }
        if "segmentation" in entry:
            detection["mask_rle"] = entry["segmentation"]
        detections.append(detection)
    return {"overlay": f"{stem}_overlay.png", "detections": detections}


def explain_detections(
    inputs: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    target: str | None = None,
    stage: int | None = None,
    alpha: float = 0.5,
    device: str = "cpu",
    box: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """``swinkit detect explain``: one Grad-CAM overlay PNG per image (``<stem>.gradcam.png``) for
    its highest-scoring detection (of class ``target``, a name of the file or an index, if given),
    or the detection overlapping ``box`` (``x1 y1 x2 y2`` in image pixels, e.g. one of ``swinkit
    detect predict``'s) most, with the detection's box drawn. A result is ``{"path", "class", "score", "box", "stage",
    "output"}``, or ``{"path", "error"}`` for a bad file or an image without such a detection."""
    from ..explain import explain_detection, overlay

    model, spec, index = _model_to_explain(checkpoint, "detect", target, alpha, device)

    def explained(image: Image.Image) -> tuple[Image.Image, dict[str, Any]]:
        label = None if index is None else index + 1  # the detector counts classes from 1
        found = explain_detection(model, TF.to_tensor(image).to(device), label, stage, box)
        label, chosen = found.targets[0], found.boxes[0].cpu()
        picture = TF.pil_to_tensor(overlay(image, found.maps[0].cpu(), alpha))
        color = palette(len(spec.classes))[label - 1]
        picture = draw_bounding_boxes(picture, chosen[None], labels=[spec.classes[label - 1]], colors=[color], width=2)
        result = {"class": spec.classes[label - 1], "score": found.probabilities[0, 0].item()}
        return TF.to_pil_image(picture), {**result, "box": [round(v, 2) for v in chosen.tolist()], "stage": found.stage}

    return _explain_each(inputs, output, explained)


# ---------------------------------------------------------------------------------------------
# The commands' library functions
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_dense(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    device: str = "cpu",
    score_threshold: float = 0.5,
    ratios: Sequence[float] | None = None,
    flip: bool = False,
    task: str | None = None,
) -> list[dict[str, Any]]:
    """Run a dense model file on images; writes ``<name>_overlay.png`` (and ``_labels.png``) and ``results.json``.

    One result per image: ``{"path", "overlay", ...}`` with ``class_fractions`` (segmentation) or
    ``detections`` (class, category id, score, box ``[x1, y1, x2, y2]``, mask RLE); ``{"path",
    "error"}`` for a file that cannot be decoded. Detections below ``score_threshold`` are dropped.
    ``ratios`` / ``flip``: multi-scale / mirrored testing, ratios of the test scale (a segmentation
    model: :func:`segment_image`; a detector: :func:`~swinkit.dense.detection_augment.detect_augmented`).
    The model may also be its exported file (``swinkit segment export``, ``swinkit detect export``),
    which a detector's multi-scale or flip testing cannot take. ``task`` (``segment`` or ``detect``):
    refuse a file of the other task. ``score_threshold`` (0..1) applies to detections.
    """
    if not 0 <= score_threshold <= 1:
        raise ValueError(f"score threshold must be between 0 and 1 (a detection's probability), got {score_threshold}")
    paths = expand_inputs(inputs)
    model, spec = load_dense_file(checkpoint, device)
    _refuse_other_task(checkpoint, spec, task, "predict", "runs")
    if spec.task == "detect":
        _lower_score_floor(model, spec, score_threshold, checkpoint)
    views = _test_augmentation(checkpoint, model, spec, ratios, flip)
    folder = make_folder(output)
    results: list[dict[str, Any]] = []
    for index, path in enumerate(paths):
        image = load_or_report(path, results)
        if image is None:
            continue
        stem = folder / f"{index:04d}_{path.stem}"
        try:
            if spec.task == "segment":
                result = _segment_result(model, spec, image, stem, ratios, flip)
            else:
                result = _detect_result(model, spec, image, stem, score_threshold, views)
        except ValueError as error:  # this image's own problem (e.g. too elongated for the scale): reported
            logger.warning("%s: %s", path, error)
            result = {"error": str(error)}
        results.append({"path": str(path), **result})
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _lower_score_floor(model: nn.Module, spec: DenseSpec, threshold: float, checkpoint: str | os.PathLike) -> None:
    """A detector keeps only detections above its own floor (``score_threshold``, 0.05 as mmdet tests):
    a lower ``threshold`` lowers it in a model file, and is said to find nothing more in an exported
    one, whose floor is in its graph."""
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        for stage in heads.modules():  # a cascade's stages each hold one
            if hasattr(stage, "score_thresh"):
                stage.score_thresh = min(stage.score_thresh, threshold)
        return
    floor = spec.head.get("score_threshold", 0.05)
    if threshold < floor:
        logger.warning(
            "%s keeps detections of score %g or more (fixed when it was exported): a score threshold of %g "
            "finds no more than that; run the model file for lower scores",
            checkpoint,
            floor,
            threshold,
        )


def _refuse_other_task(
    checkpoint: str | os.PathLike, spec: DenseSpec, task: str | None, action: str, verb: str
) -> None:
    if task not in (None, "segment", "detect"):
        raise ValueError(f"task must be 'segment' or 'detect' (or None: the file's), got {task!r}")
    if task is not None and spec.task != task:
        raise ValueError(f"{checkpoint} is a {spec.task} model; 'swinkit {task} {action}' {verb} {task} models")


def evaluate_dense(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    split: str = "validation",
    output: str | os.PathLike | None = None,
    device: str = "cpu",
    workers: int = 2,
    strict_data: bool = False,
    ratios: Sequence[float] | None = None,
    flip: bool = False,
    task: str | None = None,
) -> dict[str, Any]:
    """Score a dense model file: mIoU / accuracies on a segmentation folder (``data``, its ``split``), or
    COCO box / mask mAP on a COCO JSON file (``data``, images under ``images``). Writes ``metrics.json``
    to ``output`` when given. ``ratios`` / ``flip``: multi-scale / mirrored testing at these ratios of
    the test scale (segmentation: ``AUG_TEST_RATIOS`` with ``flip`` is mmseg's ``--aug-test``;
    detection: mmdet's merging, :mod:`swinkit.dense.detection_augment`), recorded in the metrics.
    The model may also be its exported file (``swinkit segment export``, ``swinkit detect export``).
    ``task`` (``segment`` or ``detect``): refuse a file of the other task."""
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    if output is not None:  # before the evaluation: a file in the way is refused now, not after it
        check_folder(output)
    model, spec = load_dense_file(checkpoint, device)
    _refuse_other_task(checkpoint, spec, task, "eval", "evaluates")
    views = _test_augmentation(checkpoint, model, spec, ratios, flip)
    if spec.task == "segment":
        if images is not None:  # a segmentation folder holds its images; a silently unused path misleads
            raise ValueError(f"images is for a detector's COCO JSON; {checkpoint} is a segmentation model")
        metrics = _evaluate_segmentation(model, spec, data, split, workers, strict_data, ratios, flip)
    else:
        metrics = _evaluate_detection(model, spec, data, images, workers, strict_data, views)
        metrics |= {"test_ratios": [float(r) for r in ratios] if ratios is not None else [1.0], "test_flip": flip}
    if output is not None:
        (make_folder(output) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _test_augmentation(
    checkpoint: str | os.PathLike, model: nn.Module, spec: DenseSpec, ratios: Sequence[float] | None, flip: bool
) -> list[Any]:
    """The ratios checked; a detector's views where ratios or flip are asked for, else []."""
    from .detection_augment import augmented_views, check_detector
    from .segmentation import check_test_ratios

    check_test_ratios(ratios)
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    if spec.task == "segment":
        inference_setup(model, spec, ratios)  # refused here, not once an image
        return []
    if ratios is None and not flip:
        return []
    check_detector(model, checkpoint)
    return augmented_views(model, ratios, flip)


def _evaluate_segmentation(
    model: nn.Module,
    spec: DenseSpec,
    data: str | os.PathLike,
    split: str,
    workers: int,
    strict: bool,
    ratios: Sequence[float] | None,
    flip: bool,
) -> dict[str, Any]:
    from ..data import collate_skipping_bad
    from .metrics import segmentation_scores
    from .segmentation import evaluate_segmentation
    from .segmentation_data import SegmentationFolder, find_split

    transform, s = inference_setup(model, spec, ratios)
    dataset = SegmentationFolder(
        *find_split(data, split), len(spec.classes), s["reduce_zero_label"], s["ignore_index"], strict
    )
    loader = DataLoader(
        Transformed(dataset, transform), batch_size=1, num_workers=workers, collate_fn=collate_skipping_bad
    )
    confusion, bad = evaluate_segmentation(
        model, loader, len(spec.classes), s["ignore_index"], s["mode"], s["crop_size"], s["stride"], flip=flip
    )
    read = len(dataset) - len(bad)
    require_some_read(read, bad, str(data))
    scores = segmentation_scores(confusion, spec.classes)
    testing = {"test_ratios": [float(r) for r in ratios] if ratios is not None else [1.0], "test_flip": flip}
    return {**scores, **testing, "images": read, "bad_images": bad}


def _evaluate_detection(
    model: nn.Module,
    spec: DenseSpec,
    data: str | os.PathLike,
    images: Any,
    workers: int,
    strict: bool,
    views: list[Any],
) -> dict[str, Any]:
    from .detection import evaluate_detection
    from .detection_data import CocoDetection, detection_eval_transform, detector_scale

    dataset = CocoDetection(data, images, masks=spec.head.get("masks", False), strict=strict)
    if dataset.category_ids != spec.inference["category_ids"]:
        raise ValueError(
            f"{data} has categories {dataset.category_ids}, the model was trained on {spec.inference['category_ids']}"
        )
    if (scale := detector_scale(model)) is not None:  # such an image stopped the whole evaluation
        dataset.leave_out_too_elongated(*scale)
    loader = DataLoader(
        Transformed(dataset, detection_eval_transform), batch_size=2, num_workers=workers, collate_fn=collate_lists
    )
    scores = evaluate_detection(model, loader, dataset, views=views)
    read = len(dataset) - scores["bad_images"]
    require_some_read(read, scores["bad_images"], f"{data} (images in {dataset.root})")
    problems = dict(dataset.problems.counts)
    return {**scores, "images": read, "annotation_problems": problems}
