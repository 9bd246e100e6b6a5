"""Dense metrics: mIoU / pixel accuracy from a confusion matrix, and COCO box / mask mAP (pycocotools)."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Semantic segmentation
# ---------------------------------------------------------------------------------------------


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(K, K)`` int64 counts, rows the true class, columns the predicted one; ignored pixels left out."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + prediction[keep].long()
    return torch.bincount(index.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(confusion: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mean accuracy and pixel accuracy (percent) as ``mmseg`` computes them.

    A class absent from both ground truth and prediction has no IoU (NaN) and is left out of the
    means; per-class values are listed under ``per_class``.
    """
    confusion = confusion.double()
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


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary ``(H, W)`` mask as COCO's compressed RLE, JSON-ready (``counts`` as text)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
