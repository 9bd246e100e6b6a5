"""Semantic segmentation data: image folders with PNG label maps (ADE20K's layout) and their transforms.

A dataset item is ``(PIL image, (H, W) int64 label map)``; a sample whose image or mask cannot be
read, whose mask does not match its image, or that has no labelled pixel is a
:class:`~swinkit.data.BadItem` (reported, then skipped by the loader) unless the dataset is
``strict``. Label values that are not classes become the ignore index and are reported.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ..data import BadImageError, BadItem, load_image
from ..data.images import find_image_files
from ..variants import is_whole
from .data import photometric_distortion
from .metrics import check_ignore_index

logger = logging.getLogger(__name__)

MASK_FOLDERS = ("annotations", "masks", "labels")
# Single-channel PIL modes whose pixel values are class indices (P: the palette index, as in VOC).
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class SegmentationSample:
    image: str
    mask: str


class BadMaskError(ValueError):
    """A label map that cannot be used (unreadable, wrong size, nothing labelled)."""


class SegmentationFolder(Dataset):
    """Images and same-named PNG label maps (pixel value = class index).

    Args:
        images: folder of images (searched recursively).
        masks: folder of ``.png`` label maps at the same relative paths (stem + ``.png``).
        num_classes: labels ``0 .. num_classes - 1`` (after ``reduce_zero_label``) are classes.
        reduce_zero_label: ADE20K's convention: 0 is "other" and ignored, the rest shift down by one.
        ignore_index: the label of pixels that count for nothing (loss and metrics).
        strict: raise on the first bad sample instead of returning a ``BadItem``.
    """

    def __init__(
        self,
        images: str | os.PathLike,
        masks: str | os.PathLike,
        num_classes: int,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        strict: bool = False,
    ) -> None:
        self.images, self.masks = Path(images), Path(masks)
        for folder in (self.images, self.masks):
            if not folder.is_dir():
                raise FileNotFoundError(f"segmentation folder {folder} does not exist")
        if not is_whole(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be an int of 1 or more, got {num_classes!r}")
        check_ignore_index(ignore_index, num_classes)
        for name, value in {"reduce_zero_label": reduce_zero_label, "strict": strict}.items():
            if not isinstance(value, bool):  # "no" would be true
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.ignore_index, self.strict = ignore_index, strict
        self.samples, missing = self._pair_files()
        if missing:
            logger.warning(
                "%s: %d images have no label map in %s and are left out (e.g. %s)",
                self.images,
                len(missing),
                self.masks,
                ", ".join(missing[:3]),
            )
        if not self.samples:
            raise ValueError(f"{self.images} has no images with a label map (<stem>.png) in {self.masks}")

    def _pair_files(self) -> tuple[list[SegmentationSample], list[str]]:
        samples, missing = [], []
        for path in find_image_files(self.images, "image folder"):
            mask = (self.masks / path.relative_to(self.images)).with_suffix(".png")
            if mask.is_file():
                samples.append(SegmentationSample(str(path), str(mask)))
            else:
                missing.append(path.name)
        return samples, missing

    def __len__(self) -> int:
        return len(self.samples)

    def load_mask(self, index: int, size: tuple[int, int]) -> np.ndarray:
        """The label map of sample ``index`` as ``(H, W)`` int64 with classes ``0..K-1`` and the ignore index."""
        path = self.samples[index].mask
        try:
            with Image.open(path) as mask:
                mask.load()
                mode = mask.mode
                labels = np.array(mask, dtype=np.int64)
        except (OSError, ValueError, SyntaxError) as error:
            raise BadMaskError(f"cannot decode label map {path}: {error}") from None
        if mode not in LABEL_MODES:
            raise BadMaskError(f"label map {path} has mode {mode}; expected one channel of class indices {LABEL_MODES}")
        if labels.ndim != 2 or (labels.shape[1], labels.shape[0]) != size:
            shape = "x".join(map(str, labels.shape[::-1]))
            raise BadMaskError(f"label map {path} is {shape}, its image {size[0]}x{size[1]}")
        if self.reduce_zero_label:
            labels = np.where(labels == 0, self.ignore_index, labels - 1)
        unknown = (labels >= self.num_classes) & (labels != self.ignore_index) | (labels < 0)
        if unknown.any():
            values = sorted(np.unique(labels[unknown]).tolist())
            logger.warning(
                "%s: %d pixels with labels %s (not in 0..%d) are ignored",
                path,
                int(unknown.sum()),
                values[:10],
                self.num_classes - 1,
            )
            labels[unknown] = self.ignore_index
        if (labels == self.ignore_index).all():
            raise BadMaskError(f"label map {path} has no labelled pixel")
        return labels

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray] | BadItem:
        try:
            image = load_image(self.samples[index].image)
            return image, self.load_mask(index, image.size)
        except (BadImageError, BadMaskError) as error:
            if self.strict:
                raise
            logger.warning("skipping %s", error)
            return BadItem(self.samples[index].image, str(error))


def find_split(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The image and mask folders of ``split`` under ``root``: ``images/<split>`` and ``annotations/<split>``.

    Without a ``<split>`` sub-folder the ``images`` and ``annotations`` (or ``masks``) folders are used directly.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation folder {root} does not exist or is not a folder")
    images = root / "images"
    masks = next((root / name for name in MASK_FOLDERS if (root / name).is_dir()), None)
    if not images.is_dir() or masks is None:
        raise FileNotFoundError(
            f"{root} must hold images/ and annotations/ (or masks/) folders, each with {split}/ or the files directly"
        )
    if (images / split).is_dir() and (masks / split).is_dir():
        return images / split, masks / split
    # Split folders but not this one: the files of every split together would pass for it.
    splits = sorted(p.name for p in images.iterdir() if p.is_dir() and (masks / p.name).is_dir())
    if splits or (images / split).is_dir():
        raise FileNotFoundError(
            f"{root} has no split {split!r} (images/{split}/ with {masks.name}/{split}/); its splits: "
            f"{', '.join(splits) or 'none complete'}"
        )
    return images, masks


def read_class_names(root: str | os.PathLike) -> list[str] | None:
    """Class names, one per line, from ``classes.txt`` in ``root`` (None when there is none)."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no class names")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # two classes of one name: results by name would merge them
        raise ValueError(f"{path} lists a class name more than once: {', '.join(repeated)}")
    return names


# ---------------------------------------------------------------------------------------------
# Transforms: (PIL image, label map) -> (normalised (3, H, W) tensor, (H, W) int64 tensor)
# ---------------------------------------------------------------------------------------------


def rescale_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """``mmseg``'s keep-ratio rescale: the largest ``(w, h)`` with long side <= ``scale[0]``, short <= ``scale[1]``."""
    w, h = size
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5))


def normalise(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``image`` as a normalised float tensor (channels first)."""
    return TF.normalize(TF.to_tensor(image), mean, std)


class SegmentationTrainTransform:
    """Random rescale (ratio range), random crop (``cat_max_ratio``), flip, photometric, normalise, pad.

    The official ADE20K pipeline: ``scale`` ``(2048, 512)`` times a ratio in ``(0.5, 2.0)``, 512 crops
    where no class covers more than 75%, horizontal flip, PhotoMetricDistortion; images and masks
    smaller than the crop are padded (0 and the ignore index). Draws from :mod:`random`.
    """

    def __init__(
        self,
        crop_size: int,
        scale: tuple[int, int] | None,
        ratio_range: tuple[float, float],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
    ) -> None:
        self.crop_size, self.scale, self.ratio_range = crop_size, scale, ratio_range
        self.mean, self.std = mean, std
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.ignore_index = ignore_index

    def __call__(self, item: tuple[Image.Image, np.ndarray]) -> tuple[Tensor, Tensor]:
        image, labels = item
        ratio = random.uniform(*self.ratio_range)
        base = self.scale or image.size
        size = rescale_size(image.size, (int(max(base) * ratio), int(min(base) * ratio)))
        image = image.resize(size, Image.BILINEAR)
        mask = Image.fromarray(labels.astype(np.int32), mode="I").resize(size, Image.NEAREST)
        image, mask = self._crop(image, np.asarray(mask, dtype=np.int64))
        if random.random() < self.hflip:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image)
        return self._pad(normalise(image, self.mean, self.std), torch.from_numpy(mask.copy()))

    def _crop(self, image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        w, h = image.size
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        for _ in range(10):
            top, left = random.randint(0, h - ch), random.randint(0, w - cw)
            crop = mask[top : top + ch, left : left + cw]
            labels, counts = np.unique(crop[crop != self.ignore_index], return_counts=True)
            if len(labels) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image.crop((left, top, left + cw, top + ch)), crop

    def _pad(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        bottom, right = self.crop_size - image.shape[1], self.crop_size - image.shape[2]
        if bottom or right:
            image = torch.nn.functional.pad(image, (0, right, 0, bottom))
            mask = torch.nn.functional.pad(mask, (0, right, 0, bottom), value=self.ignore_index)
        return image, mask


class SegmentationEvalTransform:
    """Rescale the image (keep ratio) to ``scale`` if given, normalise; the label map stays at full size.

    With ``ratios`` (multi-scale testing) an item's image is a list of views, one per ratio: the
    image rescaled to ``scale`` times the ratio (``mmseg``'s ``MultiScaleFlipAug``: the scale's sides
    times the ratio, truncated), or to its own size times the ratio where ``scale`` is None.
    """

    def __init__(
        self,
        scale: tuple[int, int] | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        ratios: Sequence[float] | None = None,
    ) -> None:
        self.scale, self.mean, self.std = scale, mean, std
        self.ratios = None if ratios is None else tuple(ratios)

    def __call__(self, item: tuple[Image.Image, np.ndarray]) -> tuple[Tensor | list[Tensor], Tensor]:
        image, labels = item
        return (self.image(image) if self.ratios is None else self.views(image)), torch.from_numpy(labels)

    def image(self, image: Image.Image) -> Tensor:
        if self.scale is not None:
            image = image.resize(rescale_size(image.size, self.scale), Image.BILINEAR)
        return normalise(image, self.mean, self.std)

    def views(self, image: Image.Image) -> list[Tensor]:
        """The image at each of ``ratios`` (or at the test scale alone without them), normalised."""
        if self.ratios is None:
            return [self.image(image)]
        return [normalise(self._rescaled(image, ratio), self.mean, self.std) for ratio in self.ratios]

    def _rescaled(self, image: Image.Image, ratio: float) -> Image.Image:
        sides = self.scale if self.scale is not None else image.size
        size = rescale_size(image.size, (int(sides[0] * ratio), int(sides[1] * ratio)))
        return image if size == image.size else image.resize(size, Image.BILINEAR)


class FixedSizeEvalTransform(SegmentationEvalTransform):
    """Resize the image to ``size`` (height, width) exactly, its aspect ratio not kept, and normalise:
    what a fixed-shape deployment feeds a file exported for one size (``--static-size``). The
    probabilities go back to the image's size as at any test scale; the label map stays as it is."""

    def __init__(self, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(None, mean, std)
        self.size = (int(size[0]), int(size[1]))

    def image(self, image: Image.Image) -> Tensor:
        height, width = self.size
        if (image.height, image.width) != self.size:
            image = image.resize((width, height), Image.BILINEAR)
        return normalise(image, self.mean, self.std)
