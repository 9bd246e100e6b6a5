"""Prediction on image files: top-k classes and probabilities, batched; bad images reported."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint.io import missing_file
from .checkpoint.load import Checkpoint, read_any
from .checkpoint.native import class_names_from_metadata
from .data import IMAGE_EXTENSIONS, BadImageError, eval_transform, load_image, transform_image
from .data.images import find_image_files
from .evaluate import amp_dtype
from .factory import create_model
from .quantize import quantize_dynamic
from .variants import SwinConfig

logger = logging.getLogger(__name__)


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files given directly, plus the image files found (recursively, sorted) in folders. One
    path given alone (not in a list) is one input, not a sequence of one-letter paths."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, (bytes, torch.Tensor, np.ndarray)) or not isinstance(inputs, Iterable):
        raise TypeError(f"inputs are image files or folders: a path or a list of paths, got {type(inputs).__name__}")
    paths: list[Path] = []
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"inputs are paths of image files or folders, got a {type(item).__name__}")
        path = Path(item)
        if path.is_dir():
            found = find_image_files(path)  # a sub-folder that cannot be read is named, not skipped
            if not found:  # a wrong folder would otherwise "succeed" with nothing done
                raise FileNotFoundError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise missing_file(path)
    return paths


def load_classifier(
    checkpoint: str | os.PathLike, device: str = "cpu", amp: str = "none", int8: bool = False
) -> tuple[nn.Module, list[str] | None]:
    """A model in eval mode and the class names its file stores (None when it stores none).

    A ``.onnx`` file written by ``swinkit export`` runs in onnxruntime on the CPU
    (:class:`~swinkit.export.OnnxClassifier`), a ``.pt2`` program as a ``torch.export`` program on
    ``device`` (:class:`~swinkit.export.ProgramClassifier`), each in the precision it was exported in.
    ``int8``: the linear layers int8 dynamic-quantized after loading (:mod:`swinkit.quantize`; CPU,
    float32 checkpoints in any supported format, no ``amp``).
    """
    suffix = Path(checkpoint).suffix.lower()
    if int8 and (suffix in (".onnx", ".pt2") or torch.device(device).type != "cpu" or amp != "none"):
        raise ValueError(
            f"{checkpoint}: int8 quantizes a checkpoint's linear layers for the CPU; it takes no .onnx or .pt2 file, "
            f"no device other than cpu and no amp (got device {device!r}, amp {amp!r})"
        )
    if suffix == ".onnx" and (torch.device(device).type != "cpu" or amp != "none"):
        raise ValueError(
            f"{checkpoint}: an ONNX file runs in onnxruntime on the CPU in its exported precision; "
            f"got device {device!r} and amp {amp!r} (accepted: cpu and none)"
        )
    if suffix == ".pt2" and amp != "none":
        raise ValueError(
            f"{checkpoint}: a .pt2 program runs in its exported precision; got amp {amp!r} (accepted: none)"
        )
    if suffix in (".onnx", ".pt2"):
        from .export import OnnxClassifier, ProgramClassifier

        model = OnnxClassifier(checkpoint) if suffix == ".onnx" else ProgramClassifier(checkpoint, device)
        _refuse_headless(checkpoint, model.config)
        return model.eval(), model.class_names
    loaded = read_any(checkpoint)
    refuse_dense_file(checkpoint, loaded)
    model = create_model(checkpoint=loaded).to(device).eval()
    _refuse_headless(checkpoint, model.config)
    # What the reader parsed: a swinkit file's names, or a Hugging Face config's id2label.
    names = loaded.class_names or class_names_from_metadata(loaded.metadata)
    return quantize_dynamic(model) if int8 else model, names


def _refuse_headless(checkpoint: str | os.PathLike, config: SwinConfig) -> None:
    """A model without a classifier (a pretrained encoder, or a backbone: its outputs are features,
    not classes)."""
    if config.num_classes >= 1 and not config.features_only:
        return
    if Path(checkpoint).suffix.lower() in (".onnx", ".pt2"):
        advice = "export a classifier (a model file with a head) instead"
    else:
        advice = f"fine-tune it into a classifier first (swinkit train --checkpoint {checkpoint} ...)"
    kind = (
        "features_only: a backbone's feature maps"
        if config.features_only
        else "num_classes 0: a pretrained encoder, e.g. from swinkit pretrain"
    )
    raise ValueError(f"{checkpoint} holds no classifier head ({kind}): {advice}")


def refuse_dense_file(checkpoint: str | os.PathLike, loaded: Checkpoint) -> None:
    """Refuse a segmentation or detection model file (swinkit's or an official mmdet / mmseg one) where
    a classifier is wanted, naming the commands that take it (``create_model`` alone reads its
    backbone, which these commands would run headless)."""
    description = loaded.metadata.get("swinkit_dense")
    if description is not None:
        try:
            task = json.loads(description)["task"]
        except (ValueError, KeyError, TypeError):
            task = "dense"
        owner = f"a swinkit {task} model file"
    elif {"rpn_head", "roi_head"} <= set(loaded.dense_parts):
        task, owner = "detect", "an official mmdet detector file"
    elif "decode_head" in loaded.dense_parts:
        task, owner = "segment", "an official mmseg segmentation file"
    else:
        return
    actions = "train, eval, predict, explain" + (", export, convert" if task in ("segment", "detect") else "")
    raise ValueError(f"{checkpoint} is {owner}, not a classifier: the swinkit {task} commands ({actions}) take it")


@torch.no_grad()
def predict(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    topk: int = 5,
    batch_size: int = 32,
    device: str = "cpu",
    amp: str = "none",
    int8: bool = False,
) -> list[dict[str, Any]]:
    """Classify every image in ``inputs``; one result per file, in order.

    A result is ``{"path", "predictions": [{"class", "index", "probability"}, ...]}``, or
    ``{"path", "error"}`` for a file that could not be decoded. ``amp`` (``bf16``, ``fp16``) runs
    the model under autocast; probabilities are computed in float32. ``int8``: see
    :func:`load_classifier`.
    """
    if topk < 1 or batch_size < 1:
        raise ValueError(f"topk and batch size must be at least 1, got {topk} and {batch_size}")
    dtype = amp_dtype(amp)
    paths = expand_inputs(inputs)
    model, stored = load_classifier(checkpoint, device, amp, int8)
    names = stored or [str(i) for i in range(model.config.num_classes)]
    transform = eval_transform(model.config.preprocessing)
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        batch, good = [], []
        for path in paths[start : start + batch_size]:
            try:
                batch.append(transform_image(transform, load_image(path), path))
                good.append(len(results))
                results.append({"path": str(path)})
            except BadImageError as error:
                logger.warning("%s", error)
                results.append({"path": str(path), "error": str(error)})
        if batch:
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                logits = model(torch.stack(batch).to(device))
            probabilities = logits.float().softmax(dim=-1)
            values, indices = probabilities.topk(min(topk, probabilities.shape[-1]), dim=-1)
            for position, top_values, top_indices in zip(good, values.tolist(), indices.tolist(), strict=True):
                results[position]["predictions"] = [
                    {"class": names[i], "index": i, "probability": p}
                    for p, i in zip(top_values, top_indices, strict=True)
                ]
    return results


def load_or_report(
    path: Path, results: list[dict[str, Any]], transform: Callable[[Image.Image], Any] | None = None
) -> Image.Image | tuple[Image.Image, Any] | None:
    """The decoded image at ``path`` (with ``transform``: the pair of it and its transformed version),
    or None after logging and appending ``{"path", "error"}``."""
    try:
        image = load_image(path)
        return image if transform is None else (image, transform_image(transform, image, path))
    except BadImageError as error:
        logger.warning("%s", error)
        results.append({"path": str(path), "error": str(error)})
        return None


def format_lines(results: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str]) -> str:
    """One line per result: ``path: <describe(result)>``, or ``path: ERROR ...`` for a failed one."""
    return "\n".join(
        f"{r['path']}: ERROR {r['error']}" if "error" in r else f"{r['path']}: {describe(r)}" for r in results
    )


def format_results(results: list[dict[str, Any]]) -> str:
    """One line per image: ``path: class (probability), ...`` or ``path: ERROR ...``."""
    return format_lines(
        results, lambda result: ", ".join(f"{p['class']} ({p['probability']:.3f})" for p in result["predictions"])
    )
