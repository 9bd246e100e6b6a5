"""Classification datasets: image folders, CSV lists and the bundled handwritten digits.

Every dataset yields ``(image, label)`` for good items and ``None`` for an image that cannot be
decoded (unless built ``strict``); :func:`collate_skipping_bad` drops the ``None`` items and
counts them, so one bad file never stops a run.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .images import IMAGE_EXTENSIONS, BadImageError, find_image_files, list_folder, load_image

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Any]


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


class FileDataset(Dataset):
    """Images listed as (path, label) samples; decoding failures give ``None`` (or raise if ``strict``)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        transform: Transform | None = None,
        strict: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.strict = strict

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        return load_image(self.samples[index].path)

    def label(self, index: int) -> int:
        return self.samples[index].label

    def name(self, index: int) -> str:
        return self.samples[index].path

    def __getitem__(self, index: int) -> tuple[Any, int] | BadItem:
        try:
            image = self.load(index)
            if self.transform:
                image = transform_image(self.transform, image, self.name(index))
        except BadImageError as error:
            return self.bad_item(index, error)
        return image, self.label(index)

    def bad_item(self, index: int, error: BadImageError) -> BadItem:
        """Item ``index`` reported as bad and skipped, or ``error`` raised where the dataset is ``strict``."""
        if self.strict:
            raise error
        logger.warning("skipping %s", error)
        return BadItem(self.name(index), str(error))


def transform_image(transform: Transform, image: Image.Image, path: str | os.PathLike) -> Any:
    """``transform(image)``; a :class:`BadImageError` it raises (an image it refuses, e.g. too elongated
    to resize) names ``path``."""
    try:
        return transform(image)
    except BadImageError as error:
        raise BadImageError(f"image {path}: {error}") from None


@dataclass(frozen=True)
class BadItem:
    """Stands in for an item whose image could not be decoded."""

    path: str
    reason: str


def require_some_read(read: int, bad: Sequence[str] | int, source: str) -> None:
    """Stop a pass over ``source`` that could read none of its images: scores of 0 over no images
    would otherwise pass for a result. ``bad``: the unreadable items (or their count)."""
    count = bad if isinstance(bad, int) else len(bad)
    if read == 0 and count:
        first = "" if isinstance(bad, int) else f" (the first: {bad[0]})"
        raise ValueError(f"no image of {source} could be read: all {count} failed{first}")


def image_folder(
    root: str | os.PathLike, transform: Transform | None = None, strict: bool = False, allow_empty: bool = False
) -> FileDataset:
    """One sub-folder per class (sorted names are the classes), like torchvision's ImageFolder.

    A class folder (or a folder inside one) that cannot be read is an error naming it. So is a class
    folder with no image files, as in torchvision: a model would get a class it never sees, almost
    surely a mistake (a misnamed or misplaced folder). ``allow_empty`` turns that into a warning.
    Folders whose names start with ``.`` are not classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder")
    entries = list_folder(root, "dataset folder")
    classes = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    found = {name: find_image_files(root / name, "class folder") for name in classes}
    samples = [Sample(str(path), label) for label, name in enumerate(classes) for path in found[name]]
    if not samples:
        raise ValueError(f"{root} has class folders {classes[:5]} but no image files ({', '.join(IMAGE_EXTENSIONS)})")
    empty = [name for name in classes if not found[name]]
    if empty:
        folders = ", ".join(str(root / name) for name in empty[:10]) + (", ..." if len(empty) > 10 else "")
        message = (
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {len(empty)} of {len(classes)} class folders: "
            f"{folders}; the model would get a class it never sees"
        )
        if not allow_empty:
            raise ValueError(
                f"{message}. Add images to them, or remove them (or rename them to start with '.', "
                "which is not a class) to leave those classes out"
            )
        logger.warning("%s", message)
    return FileDataset(samples, classes, transform, strict)


# First-row names that make it a header: path column, label column (compared case-insensitively).
CSV_PATH_HEADERS = ("path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "img")
CSV_LABEL_HEADERS = ("label", "class", "class_name", "target", "category", "y")


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, row) of every row but blank ones and ``#`` comments; a UTF-8 BOM (Excel) is dropped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = []
            for row in reader:
                # Blank rows (Excel writes ",") and comments are skipped; a row with an empty cell is not.
                if any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#"):
                    rows.append((reader.line_num, row))
            return rows
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}): "
            "expected a UTF-8 CSV file of 'path,label' rows; save it as UTF-8"
        ) from None
    except csv.Error as error:
        raise ValueError(f"{path} is not a readable CSV file: {error}") from None


def _is_integer(label: str) -> bool:
    return label.isascii() and label.isdigit()


def csv_list(path: str | os.PathLike, transform: Transform | None = None, strict: bool = False) -> FileDataset:
    """A CSV file of ``path,label`` rows; paths are relative to the file.

    A first row is a header when its columns are named as in :data:`CSV_PATH_HEADERS` and
    :data:`CSV_LABEL_HEADERS` (``path,label``, ``file,class``, ``image,target``, ...; any case); a
    UTF-8 BOM (Excel's "CSV UTF-8") is ignored. A first row naming a file that does not exist is an
    error (an unknown header would otherwise become a data row and a class). Labels are either all
    class names (sorted to give class indices) or all non-negative integers (the class indices
    themselves: classes ``0`` .. the largest); when most labels are integers, the rows whose labels
    are not are an error naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV list {path} does not exist")
    rows = _read_csv_rows(path)
    if rows and len(rows[0][1]) >= 2:
        line, first = rows[0]
        names = [cell.strip().lower() for cell in first[:2]]
        if names[0] in CSV_PATH_HEADERS and names[1] in CSV_LABEL_HEADERS:
            rows = rows[1:]
        elif first[0].strip() and not (path.parent / first[0].strip()).exists():
            raise ValueError(
                f"{path}: row {line} ({','.join(first)!r}) names a file that does not exist "
                f"({path.parent / first[0].strip()}); if it is a header, name its columns 'path,label' "
                f"(a path column named one of {', '.join(CSV_PATH_HEADERS)}; a label column one of "
                f"{', '.join(CSV_LABEL_HEADERS)}), else fix the path (relative to the CSV file's folder)"
            )
    if not rows:
        raise ValueError(f"{path} lists no images: expected rows 'path,label' (a header row is allowed)")
    bad = [line for line, row in rows if len(row) < 2 or not row[0].strip() or not row[1].strip()]
    if bad:
        raise ValueError(f"{path}: expected rows 'path,label'; rows {bad[:5]} are malformed or missing")
    labels = [row[1].strip() for _, row in rows]
    integers = sum(map(_is_integer, labels))
    numeric = integers == len(labels)
    if integers * 2 > len(labels) and not numeric:
        others = [(line, label) for (line, _), label in zip(rows, labels, strict=True) if not _is_integer(label)]
        shown = ", ".join(f"row {line}: {label!r}" for line, label in others[:10])
        shown += ", ..." if len(others) > 10 else ""
        raise ValueError(
            f"{path}: {integers} of {len(labels)} labels are integers (class indices) but {len(others)} are not "
            f"({shown}); labels must be all integers 0, 1, ... or all class names: fix those rows"
        )
    classes = [str(i) for i in range(max(map(int, labels)) + 1)] if numeric else sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    samples = [
        Sample(str(path.parent / row[0].strip()), int(label) if numeric else index[label])
        for (_, row), label in zip(rows, labels, strict=True)
    ]
    return FileDataset(samples, classes, transform, strict)


class DigitsDataset(FileDataset):
    """The bundled 8x8 handwritten digits (UCI / scikit-learn; see ``swinkit/assets/README.md``)."""

    def __init__(self, transform: Transform | None = None, indices: Sequence[int] | None = None) -> None:
        with np.load(files("swinkit") / "assets" / "digits.npz") as data:
            images, labels = data["images"], data["labels"]
        keep = range(len(labels)) if indices is None else indices
        self.images = images
        super().__init__([Sample(f"digits[{i}]", int(labels[i])) for i in keep], [str(d) for d in range(10)], transform)

    def load(self, index: int) -> Image.Image:
        position = int(self.samples[index].path[len("digits[") : -1])
        # Values 0..16 (counts of set pixels in 4x4 blocks of the original 32x32 bitmap).
        pixels = (self.images[position].astype(np.float32) * (255.0 / 16.0)).round().astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")


def split_dataset(dataset: FileDataset, val_fraction: float, seed: int) -> tuple[FileDataset, FileDataset]:
    """Stratified split by a fraction with a fixed seed: the same files land in val on every run."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be above 0 and below 1 to split a validation set from the training data "
            f"(or give --val-data), got {val_fraction}"
        )
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, sample in enumerate(dataset.samples):
        by_class.setdefault(sample.label, []).append(i)
    train, val = [], []
    for indices in by_class.values():
        rng.shuffle(indices)
        cut = max(1, round(len(indices) * val_fraction)) if len(indices) > 1 else 0
        val += indices[:cut]
        train += indices[cut:]
    return _subset(dataset, sorted(train)), _subset(dataset, sorted(val))


def _subset(dataset: FileDataset, indices: list[int]) -> FileDataset:
    subset = object.__new__(type(dataset))
    subset.__dict__.update(dataset.__dict__)
    subset.samples = [dataset.samples[i] for i in indices]
    return subset


class SeededTransform:
    """Apply a random transform with RNGs seeded by (seed, epoch, index).

    Augmentation then depends only on which item is drawn in which epoch, not on worker count,
    process rank or where a resumed run restarts, which is what makes resuming exact.
    """

    def __init__(self, transform: Transform, seed: int) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __call__(self, image: Image.Image, index: int) -> Any:
        seed = (self.seed * 1_000_003 + self.epoch * 7_919 + index) % (2**31)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(image)
        finally:
            # The caller's RNG streams (dropout, mixup) must not depend on how many items were loaded.
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class AugmentedDataset(Dataset):
    """Wrap a dataset (built without transform) with a :class:`SeededTransform`."""

    def __init__(self, dataset: FileDataset, transform: SeededTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.transform.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Any, int] | BadItem:
        item = self.dataset[index]
        if isinstance(item, BadItem):
            return item
        image, label = item
        try:
            return transform_image(lambda image: self.transform(image, index), image, self.dataset.name(index)), label
        except BadImageError as error:  # an image the transform refuses (evaluation's, too elongated)
            return self.dataset.bad_item(index, error)


def collate_skipping_bad(items: list[Any]) -> dict[str, Any]:
    """Batch the good items; report the bad ones by path under ``"bad"``."""
    good = [item for item in items if not isinstance(item, BadItem)]
    bad = [item.path for item in items if isinstance(item, BadItem)]
    if not good:
        return {"images": None, "labels": None, "bad": bad}
    images, labels = default_collate(good)
    return {"images": images, "labels": labels, "bad": bad}
