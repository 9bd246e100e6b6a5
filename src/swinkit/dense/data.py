"""What the dense datasets share: seeded augmentation of (image, target) pairs, photometric distortion,
problem counting, and batching that skips bad items."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..data import BadItem, SeededTransform

logger = logging.getLogger(__name__)

PairTransform = Callable[[tuple[Any, Any]], tuple[Any, Any]]


class Augmented(Dataset):
    """Apply a random ``(image, target) -> (image, target)`` transform seeded by (seed, epoch, index).

    The same item drawn in the same epoch is augmented identically whatever the worker, rank or
    resume point: the condition for an exact resume.
    """

    def __init__(self, dataset: Dataset, transform: PairTransform, seed: int) -> None:
        self.dataset = dataset
        self.transform = SeededTransform(transform, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.transform.epoch = epoch

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return item if isinstance(item, BadItem) else self.transform(item, index)


class Transformed(Dataset):
    """Apply a deterministic pair transform (evaluation)."""

    def __init__(self, dataset: Dataset, transform: PairTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return item if isinstance(item, BadItem) else self.transform(item)


def collate_lists(items: list[Any]) -> dict[str, Any]:
    """Batch good ``(image, target)`` items as lists (images of different sizes); bad ones by path under ``bad``."""
    good = [item for item in items if not isinstance(item, BadItem)]
    bad = [item.path for item in items if isinstance(item, BadItem)]
    return {"images": [image for image, _ in good] or None, "targets": [target for _, target in good], "bad": bad}


class Problems:
    """Counts of annotation problems by kind, with the first few examples, logged as one summary."""

    def __init__(self, source: str, examples: int = 5) -> None:
        self.source = source
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.limit = examples

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.limit:
            shown.append(example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def summary(self) -> str:
        parts = [f"{count} {kind} (e.g. {'; '.join(self.examples[kind])})" for kind, count in self.counts.items()]
        return f"{self.source}: skipped or repaired " + ", ".join(parts)

    def log(self) -> None:
        if self:
            logger.warning("%s", self.summary())


def photometric_distortion(image: Image.Image) -> Image.Image:
    """``mmseg``'s PhotoMetricDistortion: brightness, contrast, saturation and hue, each with probability 0.5.

    Brightness adds up to +-32, contrast and saturation scale by 0.5..1.5, hue shifts by up to
    +-18 OpenCV units (36 degrees); contrast goes first or last at random. Uses :mod:`random`.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if random.random() < 0.5:
        pixels = pixels + random.uniform(-32, 32)
    contrast_first = random.random() < 0.5
    contrast = random.uniform(0.5, 1.5) if random.random() < 0.5 else 1.0
    if contrast_first:
        pixels = pixels * contrast
    hsv = np.asarray(Image.fromarray(_to_uint8(pixels)).convert("HSV"), dtype=np.float32)
    if random.random() < 0.5:
        hsv[..., 1] = hsv[..., 1] * random.uniform(0.5, 1.5)
    if random.random() < 0.5:
        hsv[..., 0] = (hsv[..., 0] + random.uniform(-18, 18) * 256.0 / 180.0) % 256.0
    pixels = np.asarray(Image.fromarray(_to_uint8(hsv), mode="HSV").convert("RGB"), dtype=np.float32)
    if not contrast_first:
        pixels = pixels * contrast
    return Image.fromarray(_to_uint8(pixels))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
