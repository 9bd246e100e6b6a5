"""Dense metrics: mIoU / pixel accuracy from a confusion matrix, and COCO box / mask mAP (pycocotools)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..variants import is_real, is_whole

# ---------------------------------------------------------------------------------------------
# Semantic segmentation
# ---------------------------------------------------------------------------------------------


def check_ignore_index(ignore_index: int | Tensor, num_classes: int) -> int:
    """``ignore_index`` as an int (a 0-d integer tensor is taken too), once it is not one of the
    classes: that class would silently drop out of the loss and the metrics."""
    if isinstance(ignore_index, Tensor) and ignore_index.dim() == 0 and not ignore_index.is_floating_point():
        ignore_index = ignore_index.item() if ignore_index.dtype != torch.bool else ignore_index
    if not is_whole(ignore_index):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        outside = 255 if num_classes <= 255 else -1
        raise ValueError(
            f"ignore_index {ignore_index} is one of the {num_classes} classes (0..{num_classes - 1}): that class "
            f"would count for nothing in the loss and the metrics; use a label outside them, e.g. {outside} (to "
            "leave out label 0, ADE20K's 'other', use reduce_zero_label)"
        )
    return int(ignore_index)


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(K, K)`` int64 counts, rows the true class, columns the predicted one; ignored pixels left out.

    ``prediction`` and ``target`` are integer label maps of one shape (an argmax over the classes,
    not logits), with labels in ``0..K-1`` (``target`` also ``ignore_index``).
    """
    _check_label_maps(prediction, target, num_classes)
    ignore_index = check_ignore_index(ignore_index, num_classes)
    keep = target != ignore_index
    kept_target, kept_prediction = target[keep].long(), prediction[keep].long()
    for name, labels in (("target", kept_target), ("prediction", kept_prediction)):
        # Out of range, a label would be counted in another class's cell (target * K + prediction).
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if len(outside):
            also = f" or ignore_index {ignore_index}" if name == "target" else ""
            raise ValueError(
                f"{name} holds class {outside[0].item()}, outside 0..{num_classes - 1}{also} "
                f"(num_classes={num_classes})"
            )
    index = kept_target * num_classes + kept_prediction
    return torch.bincount(index.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def _check_label_maps(prediction: Tensor, target: Tensor, num_classes: int) -> None:
    if not is_whole(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an int of 1 or more, got {num_classes!r}")
    for name, labels in (("prediction", prediction), ("target", target)):
        if not isinstance(labels, Tensor):
            raise TypeError(f"{name} must be a tensor of class labels, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class labels, got {labels.dtype} (take the argmax over classes)")
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape: "
            "pass label maps (the argmax over classes), not logits"
        )


def segmentation_scores(confusion: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mean accuracy and pixel accuracy (percent) as ``mmseg`` computes them.

    A class absent from both ground truth and prediction has no IoU (NaN) and is left out of the
    means; per-class values are listed under ``per_class``.
    """
    confusion = _check_confusion(confusion, class_names)
    true_positive = confusion.diag()
    labelled = confusion.sum(dim=1)
    union = labelled + confusion.sum(dim=0) - true_positive
    iou = true_positive / union  # NaN where union == 0
    accuracy = true_positive / labelled
    names = list(class_names) if class_names else [str(i) for i in range(len(confusion))]
    return {
        "mIoU": _nanmean(iou) * 100,
        "mAcc": _nanmean(accuracy) * 100,
        "aAcc": (true_positive.sum() / confusion.sum().clamp(min=1)).item() * 100,
        "pixels": int(confusion.sum().item()),
        "per_class": {
            name: {"IoU": _percent(i), "Acc": _percent(a)} for name, i, a in zip(names, iou, accuracy, strict=True)
        },
    }


def _check_confusion(confusion: Any, class_names: Sequence[str] | None) -> Tensor:
    """``confusion`` as a float64 tensor once it is a square matrix of counts (a numpy array is taken)."""
    if isinstance(confusion, np.ndarray):
        confusion = torch.from_numpy(confusion)
    if not isinstance(confusion, Tensor):
        raise TypeError(f"confusion must be a (K, K) tensor of counts, got {type(confusion).__name__}")
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix of counts, got shape {tuple(confusion.shape)}")
    confusion = confusion.double()
    if not confusion.isfinite().all() or (confusion < 0).any():
        raise ValueError("confusion must hold counts (finite, 0 or more); it holds negative or non-finite values")
    if class_names is not None and len(class_names) not in (0, len(confusion)):
        raise ValueError(f"{len(class_names)} class_names for a {len(confusion)}-class confusion matrix")
    return confusion


def _nanmean(values: Tensor) -> float:
    present = values[~values.isnan()]
    return present.mean().item() if len(present) else 0.0


def _percent(value: Tensor) -> float | None:
    return None if value.isnan() else value.item() * 100


# ---------------------------------------------------------------------------------------------
# COCO detection and instance segmentation
# ---------------------------------------------------------------------------------------------

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_map(ground_truth: dict[str, Any], results: list[dict[str, Any]], iou_type: str = "bbox") -> dict[str, float]:
    """COCO mAP (percent) of ``results`` against ``ground_truth``, both in COCO's JSON format.

    ``results``: ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}`` (plus
    ``"segmentation"``, an RLE, for ``iou_type="segm"``). Returns AP over IoU 0.5:0.95, AP50, AP75
    and AP for small / medium / large objects; no results score 0.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_ground_truth(ground_truth)
    _check_results(results, ground_truth, iou_type)
    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)
    # pycocotools reports progress on stdout; the library stays quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(ground_truth)
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # stats[i] is -1 where a category of objects (e.g. small ones) has no ground truth.
    return {name: max(float(value), 0.0) * 100 for name, value in zip(COCO_METRICS, evaluation.stats, strict=False)}


def _check_ground_truth(ground_truth: Any) -> None:
    """The fields pycocotools reads, named here rather than as its ``KeyError``."""
    if not isinstance(ground_truth, dict):
        raise TypeError(
            f"ground_truth must be COCO's JSON as a dict (json.load the file), got {type(ground_truth).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(ground_truth.get(key), list):
            raise ValueError(f"ground_truth must have a list under {key!r} (COCO's format)")
    for index, annotation in enumerate(ground_truth["annotations"]):
        missing = [key for key in ("id", "image_id", "category_id", "bbox", "area") if key not in annotation]
        if missing:
            raise ValueError(f"ground_truth['annotations'][{index}] has no {', '.join(map(repr, missing))}")


def _check_results(results: Any, ground_truth: dict[str, Any], iou_type: str) -> None:
    """Refuse a result pycocotools would score wrongly or fail on: an IoU with a NaN box fails its
    ``iou < threshold`` test, so a NaN box *matches* an object (two of them scored AP 100)."""
    if not isinstance(results, (list, tuple)):
        raise TypeError(f"results must be a list of dicts (COCO's result format), got {type(results).__name__}")
    image_ids = {image["id"] for image in ground_truth["images"]}
    shape = "'segmentation' (an RLE)" if iou_type == "segm" else "'bbox' ([x, y, width, height])"
    for index, result in enumerate(results):
        where = f"results[{index}]"
        if not isinstance(result, dict):
            raise TypeError(f"{where} must be a dict, got {type(result).__name__}")
        needed = ("image_id", "category_id", "score", "segmentation" if iou_type == "segm" else "bbox")
        missing = [key for key in needed if key not in result]
        if missing:
            named = ", ".join(map(repr, missing))
            raise ValueError(f"{where} has no {named}; each result needs {shape}, a score and the ids")
        if result["image_id"] not in image_ids:
            raise ValueError(f"{where}: image_id {result['image_id']!r} is not one of ground_truth's images")
        if not _finite_number(result["score"]):
            raise ValueError(f"{where}: score {result['score']!r} is not a finite number")
        if "bbox" in result:
            _check_box(result["bbox"], where)


def _check_box(box: Any, where: str) -> None:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_finite_number(value) for value in box):
        raise ValueError(f"{where}: bbox {box!r} must be 4 finite numbers, COCO's [x, y, width, height]")
    if box[2] < 0 or box[3] < 0:
        raise ValueError(f"{where}: bbox {list(box)} has a negative width or height (COCO's is [x, y, width, height])")


def _finite_number(value: Any) -> bool:
    return is_real(value) and math.isfinite(value)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary ``(H, W)`` mask as COCO's compressed RLE, JSON-ready (``counts`` as text)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
