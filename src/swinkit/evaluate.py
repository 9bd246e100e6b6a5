"""Evaluation: top-1 / top-5 / loss / per-class accuracy / confusion matrix, and throughput."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    count: int
    confusion: torch.Tensor  # (true class, predicted class) counts
    bad_items: list[str] = field(default_factory=list)

    @property
    def per_class_accuracy(self) -> list[float | None]:
        """Top-1 accuracy (%) of each true class; ``None`` for a class with no image in the data
        (its accuracy is undefined, not 0: ``null`` in the JSON metrics)."""
        totals = self.confusion.sum(dim=1)
        accuracy = (self.confusion.diag() / totals.clamp(min=1) * 100.0).tolist()
        return [value if total > 0 else None for value, total in zip(accuracy, totals.tolist(), strict=True)]

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(class_names) if class_names else [str(i) for i in range(self.confusion.shape[0])]
        return {
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "images": self.count,
            "bad_images": len(self.bad_items),
            "per_class_accuracy": dict(zip(names, self.per_class_accuracy, strict=True)),
        }


# Mixed precision by name, as train, eval and predict take it: autocast to this dtype, or none.
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype named ``name`` (``none``, ``bf16``, ``fp16``); other names are refused."""
    if name not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[name]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    distributed: Any = None,
) -> EvalResult:
    """Run ``model`` over ``loader`` (batches from :func:`swinkit.data.collate_skipping_bad`)."""
    was_training = model.training
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0.0, 0.0, 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    bad: list[str] = []
    for batch in loader:
        bad += batch["bad"]
        if batch["images"] is None:
            continue
        images, labels = batch["images"].to(device), batch["labels"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        count += len(labels)
        confusion.index_put_(
            (labels.cpu(), top[:, 0].cpu()), torch.ones(len(labels), dtype=torch.float64), accumulate=True
        )
    if distributed is not None and distributed.enabled:
        loss_sum, correct1, correct5, count = distributed.sum([loss_sum, correct1, correct5, count])
        confusion = distributed.sum_tensor(confusion)
    model.train(was_training)
    total = max(count, 1.0)
    return EvalResult(loss_sum / total, correct1 / total * 100, correct5 / total * 100, int(count), confusion, bad)


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalised confusion matrix as a PNG (class names on the axes when there are few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(12.0, 3.0 + 0.4 * len(class_names))
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(class_names) <= 40:
        ticks = range(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=90)
        axis.set_yticks(ticks, class_names)
        if len(class_names) <= 15:
            for i in ticks:
                for j in ticks:
                    if confusion[i, j] > 0:
                        axis.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8)
    axis.set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalised)")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@torch.no_grad()
@torch.no_grad()
def throughput(model: nn.Module, images: torch.Tensor, warmup: int = 50, iterations: int = 30) -> float:
    """Images per second the way the official code measures it: eval mode, no gradients, a fixed
    batch, warm-up first (in the caller's autocast, if any)."""
    model.eval()
    for _ in range(warmup):
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return iterations * images.shape[0] / (time.perf_counter() - start)


def _label_map(folder_classes: Sequence[str], model_classes: Sequence[str], named: bool, source: str) -> list[int]:
    """Model class index of each folder class: by name when the checkpoint has names, else by position."""
    if named:
        unknown = [name for name in folder_classes if name not in model_classes]
        if unknown:
            raise ValueError(
                f"{source} has classes the model does not know: {unknown[:10]}; the model's classes are "
                f"{list(model_classes)[:20]}"
            )
        return [list(model_classes).index(name) for name in folder_classes]
    if len(folder_classes) > len(model_classes):
        raise ValueError(f"{source} has {len(folder_classes)} classes but the model predicts {len(model_classes)}")
    if list(folder_classes) != [str(i) for i in range(len(folder_classes))]:  # named, not class indices
        logger.warning(
            "%s: the checkpoint stores no class names, so its classes %s are matched to the model's classes "
            "0..%d by position (sorted names); a file saved with class names is matched by name",
            source,
            list(folder_classes)[:5] + (["..."] if len(folder_classes) > 5 else []),
            len(folder_classes) - 1,
        )
    return list(range(len(folder_classes)))


def validation_part(data: str | os.PathLike) -> str | os.PathLike:
    """``data/val`` for a folder in training's layout (``train/`` and ``val/`` beside each other, as
    ``swinkit train --data`` reads it), else ``data``: the same folder serves both commands."""
    from pathlib import Path

    root = Path(data)
    if root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir():
        logger.info("%s holds train/ and val/ (training's layout): evaluating %s", root, root / "val")
        return root / "val"
    return data


def evaluate_checkpoint(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    batch_size: int = 64,
    workers: int = 2,
    output: str | os.PathLike | None = None,
    strict_data: bool = False,
    measure_throughput: bool = False,
    device: str = "cpu",
    amp: str = "none",
    int8: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint on an image folder or CSV list with the preprocessing stored in the file
    (a folder in training's layout: its ``val/``, :func:`validation_part`).

    ``amp`` (``bf16``, ``fp16``) runs the model under autocast; metrics are computed in float32.
    ``int8``: the linear layers int8 dynamic-quantized (:func:`~swinkit.predict.load_classifier`),
    to measure what quantization does to the accuracy on your data.

    Writes ``metrics.json`` and ``confusion.png`` to ``output`` when given; returns the metrics.
    """
    import json

    from torch.utils.data import DataLoader

    from .checkpoint.io import check_folder, make_folder
    from .data import collate_skipping_bad, csv_list, eval_transform, image_folder, require_some_read
    from .predict import load_classifier

    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch size must be at least 1 and workers 0 or more, got {batch_size} and {workers}")
    if output is not None:  # before the evaluation: a file in the way is refused now, not after it
        check_folder(output)
    dtype = amp_dtype(amp)
    model, stored = load_classifier(checkpoint, device, amp, int8)
    names = stored or [str(i) for i in range(model.config.num_classes)]
    data = validation_part(data)
    transform = eval_transform(model.config.preprocessing)
    if str(data).lower().endswith(".csv"):
        dataset = csv_list(data, transform=transform, strict=strict_data)
    else:  # an empty class folder scores null (a held-out set may lack a class), with a warning
        dataset = image_folder(data, transform=transform, strict=strict_data, allow_empty=True)
    mapping = _label_map(dataset.classes, names, stored is not None, str(data))
    dataset.samples = [type(s)(s.path, mapping[s.label]) for s in dataset.samples]
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_bad)
    result = evaluate(model, loader, len(names), torch.device(device), dtype)
    require_some_read(result.count, result.bad_items, str(data))
    metrics = result.summary(names)
    if result.bad_items:
        metrics["bad_image_paths"] = result.bad_items
    if measure_throughput:
        first = next(batch for batch in loader if batch["images"] is not None)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):  # as scored
            speed = throughput(model, first["images"].to(device), warmup=5, iterations=10)
        metrics["throughput_images_per_second"] = speed
    if output is not None:
        folder = make_folder(output)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_confusion(result.confusion, names, folder / "confusion.png")
    return metrics
