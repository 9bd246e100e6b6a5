"""COCO-format detection data, validated: bad annotations are repaired or skipped and reported, never fatal.

Checked once when the file is read (counted by kind and logged as one summary):
annotations of unknown images or with unknown category ids, an ``iscrowd`` not 0 or 1, boxes
that are malformed, empty or entirely outside their image (skipped), boxes partly outside
(clipped), instances without a usable mask when masks are trained (skipped), RLE masks of another
size than their image's or whose counts do not cover it exactly, and polygons with a coordinate
that is not a finite number within an image size of the image (skipped, crowd regions too). Crowd
regions are not trained on but count in evaluation, as COCO's evaluation expects. An image file
that is missing or cannot be decoded, or whose size differs from the file's, is a
:class:`~swinkit.data.BadItem` when loaded (reported, skipped by the loader, left out of the
scores); an image folder holding none of the files is an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ..data import BadImageError, BadItem, load_image
from .data import Problems, photometric_distortion
from .mmdet import rescaled_size

logger = logging.getLogger(__name__)

MIN_BOX_SIDE = 1.0  # pixels; a box thinner than this after clipping is treated as outside the image
INVALID_RLE = "invalid RLE masks"  # the problem kind of an RLE that is not a mask of its image
INVALID_POLYGON = "invalid polygons"  # the problem kind of a polygon pycocotools cannot rasterise safely
# How far (in image sizes) a polygon may reach outside its image: pycocotools' memory and time grow
# with the coordinates' range, and a NaN, infinite or huge one (1e7) asks it for tens of gigabytes.
POLYGON_MARGIN = 1.0


@dataclass
class ImageRecord:
    """One image of the file and its validated annotations (boxes ``[x1, y1, x2, y2]``, labels 1..K)."""

    id: Any
    path: str
    width: int
    height: int
    annotations: list[dict[str, Any]] = field(default_factory=list)  # trained on
    crowd: list[dict[str, Any]] = field(default_factory=list)  # evaluation only


class CocoDetection(Dataset):
    """A COCO JSON file (``images``, ``annotations``, ``categories``) and its image folder.

    Items are ``(PIL image, target)`` with torchvision's target keys: ``boxes`` (N, 4) float32 in
    pixels, ``labels`` (N,) int64 in ``1..K`` (0 is the background), ``masks`` (N, H, W) uint8
    when ``masks``, and ``image_id``. Category ids map to labels in sorted id order.

    ``filter_empty`` (training): leave out the images no annotation of a listed category names, as
    mmdet's ``CocoDataset`` does by default (``filter_empty_gt``; an image whose annotations are all
    crowd regions or unusable boxes stays, as there). ``min_side`` (training): leave out the images
    whose width or height in the JSON file is under it, as the same mmdet filter does (32 there).
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        images: str | os.PathLike | None = None,
        masks: bool = True,
        strict: bool = False,
        filter_empty: bool = False,
        min_side: int = 0,
    ) -> None:
        for name, value in {"masks": masks, "strict": strict, "filter_empty": filter_empty}.items():
            if not isinstance(value, bool):  # "no" would be true
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.source = Path(annotation_file)
        self.root = Path(images) if images is not None else self.source.parent
        self.masks, self.strict = masks, strict
        data = read_coco_json(self.source)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in self.categories]
        self.classes = [str(c.get("name", c["id"])) for c in self.categories]
        self.label_of = {cid: label for label, cid in enumerate(self.category_ids, start=1)}
        self.problems = Problems(str(self.source))
        self.records = self._read_images(data["images"])
        by_id = {record.id: record for record in self.records}
        self.annotated: set[Any] = set()  # ids of the images some annotation of a listed category names
        for annotation in data["annotations"]:
            self._add_annotation(annotation, by_id)
        self.problems.log()
        if not self.records:
            raise ValueError(f"{self.source} lists no usable images")
        self._check_image_folder(images is None)
        if filter_empty:
            self._leave_out(lambda record: record.id in self.annotated, "have no annotation")
        if min_side > 0:
            small = f"have a side under {min_side} pixels"
            self._leave_out(lambda record: min(record.width, record.height) >= min_side, small)

    def leave_out_too_elongated(self, short: int, long: int, size_offset: float) -> None:
        """Leave out the images a detector that resizes to shorter side ``short``, longer at most ``long``
        (each side ``int(side * scale + size_offset)``), cannot take: a side would be 0 pixels. Judged by
        their size in the file (an image of another size is a bad item when loaded). The detector refuses
        such an image, and with it its whole batch: here it is reported and left out, or with ``strict``
        stops the command, naming it."""

        def resized(record: ImageRecord) -> tuple[int, int]:
            return rescaled_size(record.height, record.width, short, long, size_offset)

        elongated = [record for record in self.records if min(resized(record)) < 1]
        if not elongated:
            return
        first = elongated[0]
        height, width = resized(first)
        problem = (
            f"{first.path}: an image of {first.height}x{first.width} resizes to {height}x{width} at the detector's "
            f"scale (shorter side {short}, longer at most {long}): too elongated to detect in (sizes are height x "
            "width, in pixels)"
        )
        if self.strict:
            raise ValueError(problem)
        if len(elongated) == len(self.records):
            raise ValueError(f"{self.source}: none left: all {len(self.records)} of its images, e.g. {problem}")
        self.records = [record for record in self.records if min(resized(record)) >= 1]
        logger.warning(
            "%s: %d of %d images left out, too elongated to detect in: %s",
            self.source, len(elongated), len(elongated) + len(self.records), problem,
        )  # fmt: skip

    def _leave_out(self, keep: Callable[[ImageRecord], bool], reason: str) -> None:
        """Training's filters of mmdet's ``CocoDataset._filter_imgs``: the records ``keep`` accepts."""
        kept = [record for record in self.records if keep(record)]
        if not kept:
            raise ValueError(f"{self.source}: none left to train on: all {len(self.records)} of its images {reason}")
        if len(kept) < len(self.records):
            logger.info(
                "%s: %d of %d images %s and are left out of training (mmdet's filter)",
                self.source, len(self.records) - len(kept), len(self.records), reason,
            )  # fmt: skip
        self.records = kept

    def _check_image_folder(self, default: bool) -> None:
        """Stop where none of the listed image files exists (the wrong image folder), naming the
        folder; where some do, the missing ones are reported one by one as they are loaded."""
        if any(os.path.isfile(record.path) for record in self.records):  # stops at the first found
            return
        first = Path(self.records[0].path).name
        listed = f"none of the {len(self.records)} images {self.source} lists (e.g. {first}) is in {self.root}"
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist ({self.source} lists {len(self.records)} images, e.g. "
                f"{first}): give the folder holding them with --images (or --val-images)"
            )
        if default:
            raise FileNotFoundError(f"{listed}, the JSON file's folder: give the folder holding them (--images)")
        raise FileNotFoundError(f"{listed}: is --images (or --val-images) the folder holding them?")

    def _read_images(self, entries: list[Any]) -> list[ImageRecord]:
        records, seen = [], set()
        for entry in entries:
            try:
                record = ImageRecord(
                    entry["id"], str(self.root / entry["file_name"]), int(entry["width"]), int(entry["height"])
                )
            except (KeyError, TypeError, ValueError):
                self.problems.add("invalid image entries", repr(entry)[:80])
                continue
            if not is_id(record.id) or record.id in seen or record.width < 1 or record.height < 1:
                self.problems.add("invalid image entries", f"image id {record.id!r}")
                continue
            seen.add(record.id)
            records.append(record)
        return records

    def _add_annotation(self, annotation: Any, by_id: dict[Any, ImageRecord]) -> None:
        ident = f"annotation {annotation.get('id', '?')}" if isinstance(annotation, dict) else repr(annotation)[:40]
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        record = by_id.get(image_id) if is_id(image_id) else None
        if record is None:
            self.problems.add("annotations of unknown images", f"{ident}: image_id {image_id!r}")
            return
        if not is_id(annotation.get("category_id")) or annotation.get("category_id") not in self.label_of:
            self.problems.add("unknown category ids", f"{ident}: category_id {annotation.get('category_id')!r}")
            return
        self.annotated.add(record.id)
        box = self._checked_box(annotation.get("bbox"), record, ident)
        if box is None:
            return
        crowd = annotation.get("iscrowd", 0)
        if crowd not in (0, 1):  # "0" is truthy: it made a region that was silently never trained on
            self.problems.add("invalid iscrowd values", f"{ident}: iscrowd {crowd!r} (accepted: 0 or 1)")
            return
        crowd = bool(crowd)
        segmentation = annotation.get("segmentation")
        problem = mask_problem(segmentation, record.height, record.width) if self.masks else None
        if problem is not None and (not crowd or problem[0] in (INVALID_RLE, INVALID_POLYGON)):  # may have no mask
            kind, detail = problem
            self.problems.add(kind, f"{ident}: {detail}" if detail else ident)
            return
        x1, y1, x2, y2 = box
        area = annotation.get("area")
        clean = {
            "id": annotation.get("id", len(record.annotations) + len(record.crowd) + 1),
            "label": self.label_of[annotation["category_id"]],
            "category_id": annotation["category_id"],
            "box": box,
            "area": float(area) if isinstance(area, int | float) and area > 0 else (x2 - x1) * (y2 - y1),
            "segmentation": segmentation,
        }
        (record.crowd if crowd else record.annotations).append(clean)

    def _checked_box(self, bbox: Any, record: ImageRecord, ident: str) -> list[float] | None:
        """``[x, y, w, h]`` -> clipped ``[x1, y1, x2, y2]``, or None (reported) when unusable."""
        if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
            self.problems.add("malformed boxes", f"{ident}: bbox {bbox!r}")
            return None
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            self.problems.add("empty or non-finite boxes", f"{ident}: bbox {bbox!r}")
            return None
        clipped = [min(max(x, 0.0), record.width), min(max(y, 0.0), record.height)]
        clipped += [min(max(x + w, 0.0), record.width), min(max(y + h, 0.0), record.height)]
        if clipped[2] - clipped[0] < MIN_BOX_SIDE or clipped[3] - clipped[1] < MIN_BOX_SIDE:
            self.problems.add("boxes outside the image", f"{ident}: bbox {bbox!r} in {record.width}x{record.height}")
            return None
        if clipped != [x, y, x + w, y + h]:
            self.problems.add("boxes clipped to the image", f"{ident}: bbox {bbox!r}")
        return clipped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Image.Image, dict[str, Any]] | BadItem:
        record = self.records[index]
        try:
            if not os.path.isfile(record.path):
                raise BadImageError(f"missing image {record.path} (image id {record.id!r} of {self.source})")
            image = load_image(record.path)
            if image.size != (record.width, record.height):
                raise BadImageError(
                    f"image {record.path} is {image.size[0]}x{image.size[1]}, "
                    f"the annotation file says {record.width}x{record.height}"
                )
        except BadImageError as error:
            if self.strict:
                raise
            logger.warning("skipping %s", error)
            return BadItem(record.path, str(error))
        return image, self.target(index)

    def target(self, index: int) -> dict[str, Any]:
        """The torchvision target of image ``index`` (boxes, labels, masks, image_id)."""
        record = self.records[index]
        annotations = record.annotations
        target: dict[str, Any] = {
            "boxes": torch.tensor([a["box"] for a in annotations], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["label"] for a in annotations], dtype=torch.int64),
            "image_id": index,
        }
        if self.masks:
            decoded = [decode_segmentation(a["segmentation"], record.height, record.width) for a in annotations]
            stacked = np.stack(decoded) if decoded else np.zeros((0, record.height, record.width), np.uint8)
            target["masks"] = torch.from_numpy(stacked)
        return target

    def ground_truth(self, left_out: Collection[str] = ()) -> dict[str, Any]:
        """The validated annotations (boxes clipped) as COCO JSON, for :func:`~swinkit.dense.metrics.coco_map`.

        ``left_out``: paths of images that could not be read (:class:`~swinkit.data.BadItem`), left out
        with their annotations: nothing was detected in them, and their objects would count as missed."""
        images, annotations = [], []
        skipped = set(left_out)
        for record in self.records:
            if record.path in skipped:
                continue
            images.append({"id": record.id, "width": record.width, "height": record.height})
            for a, crowd in [(a, 0) for a in record.annotations] + [(a, 1) for a in record.crowd]:
                x1, y1, x2, y2 = a["box"]
                entry = {
                    "id": len(annotations) + 1,
                    "image_id": record.id,
                    "category_id": a["category_id"],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": a["area"],
                    "iscrowd": crowd,
                }
                if self.masks and a["segmentation"]:
                    entry["segmentation"] = a["segmentation"]
                annotations.append(entry)
        return {"images": images, "annotations": annotations, "categories": self.categories}


def detector_scale(model: Any) -> tuple[int, int, float] | None:
    """The test scale of a detector (eager or exported) as :meth:`CocoDetection.leave_out_too_elongated`
    takes it: shorter side, longer side's bound, rounding offset; None where the file does not say."""
    transform = getattr(model, "transform", None)
    if transform is not None:
        return transform.min_size[-1], transform.max_size, transform.size_offset
    resize = getattr(model, "resize", None)  # an exported file's, from its metadata
    return (resize["short"], resize["long"], resize["offset"]) if isinstance(resize, dict) else None


def is_id(value: Any) -> bool:
    """Whether a JSON value can be an id: not a list or an object (they cannot be looked up), nor
    true / false (which Python would take for the ids 1 and 0)."""
    return not isinstance(value, list | dict | bool)


def read_coco_json(path: Path) -> dict[str, Any]:
    """Read and check the top-level structure of a COCO file; errors name the file and the key."""
    if not path.is_file():
        state = "is a folder: give the COCO JSON file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"annotation file {path} {state}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: key {key!r} must be a list, got {type(data.get(key)).__name__}")
    bad = [c for c in data["categories"] if not isinstance(c, dict) or not isinstance(c.get("id"), int)]
    if bad or not data["categories"]:
        raise ValueError(f"{path}: categories must be objects with an integer 'id'; bad entries: {bad[:3]}")
    ids = [c["id"] for c in data["categories"]]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:  # one id, two names: its objects would be trained under one of them, the other never seen
        raise ValueError(f"{path}: categories repeat the ids {repeated}; each category needs its own id")
    return data


class InvalidMaskError(ValueError):
    """A segmentation that is not a mask of its image (an RLE of another size, or counts not covering it)."""


class InvalidPolygonError(InvalidMaskError):
    """A polygon with a coordinate that is not a finite number near its image (pycocotools would
    allocate memory in proportion to the coordinates' range: gigabytes, or a crash, for NaN or 1e7)."""


def _rle(segmentation: Any, height: int, width: int) -> Any:
    """COCO polygons / uncompressed RLE / compressed RLE -> one compressed RLE (pycocotools).

    An RLE is checked first (:class:`InvalidMaskError`): its ``size`` must be the image's
    ``[height, width]`` and its counts must cover the image's pixels exactly; pycocotools
    decodes others into memory it never wrote (values other than 0 and 1). So are polygons
    (:class:`InvalidPolygonError`, :func:`check_polygon`)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            raise ValueError("no polygon with at least three points")
        for polygon in polygons:
            check_polygon(polygon, height, width)
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        _check_rle(segmentation, height, width)
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"segmentation must be polygons or an RLE, got {type(segmentation).__name__}")


def check_polygon(polygon: list[Any], height: int, width: int) -> None:
    """Raise :class:`InvalidPolygonError` unless every coordinate of ``polygon`` (``[x1, y1, x2, y2, ...]``)
    is a finite number at most :data:`POLYGON_MARGIN` image sizes outside a ``height`` x ``width`` image."""
    for index, value in enumerate(polygon):
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidPolygonError(f"polygon coordinate {index} is {value!r}, not a finite number")
        size = height if index % 2 else width
        if not -POLYGON_MARGIN * size <= value <= (1 + POLYGON_MARGIN) * size:
            axis = "y" if index % 2 else "x"
            raise InvalidPolygonError(
                f"polygon coordinate {index} ({axis} = {value!r}) is far outside its {width}x{height} image "
                f"(accepted: {-POLYGON_MARGIN * size:g} to {(1 + POLYGON_MARGIN) * size:g})"
            )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_rle(rle: dict[str, Any], height: int, width: int) -> None:
    """Raise :class:`InvalidMaskError` unless ``rle`` is a mask of a ``height`` x ``width`` image."""
    size, counts = rle.get("size"), rle["counts"]
    if not isinstance(size, list | tuple) or len(size) != 2 or not all(_is_count(v) for v in size):
        raise InvalidMaskError(f"RLE size {size!r} is not [height, width]")
    if list(size) != [height, width]:
        raise InvalidMaskError(
            f"RLE size {list(size)} is not its image's [{height}, {width}] (COCO's order: [height, width])"
        )
    if isinstance(counts, list):
        if not all(_is_count(v) for v in counts):
            raise InvalidMaskError(f"RLE counts must be whole numbers of 0 or more, got {_shown(counts)}")
    elif isinstance(counts, str | bytes):
        decoded = compressed_counts(counts)
        if decoded is None:
            raise InvalidMaskError(f"RLE counts {_shown(counts)} are not COCO's compressed RLE")
        counts = decoded
    else:
        raise InvalidMaskError(f"RLE counts must be a list or COCO's compressed string, got {type(counts).__name__}")
    if sum(counts) != height * width:
        raise InvalidMaskError(
            f"RLE counts add up to {sum(counts)} pixels, its image has {height * width} ({height}x{width})"
        )


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value.decode("latin-1") if isinstance(value, bytes) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compressed_counts(text: str | bytes) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string, or None where ``text`` is not one.

    Each run length is written in groups of 5 bits, lowest first, one character (``48 + group``,
    bit 5 set where another group follows) a group; the last group's bit 4 is the sign. From the
    fourth run on, the value written is the difference from the run two before."""
    data = text.encode() if isinstance(text, str) else text  # other than ASCII: bytes over 127, refused
    counts: list[int] = []
    value, shift = 0, 0
    for byte in data:
        group = byte - 48
        if not 0 <= group < 64:
            return None
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:  # negative: extend the sign
            value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
        value, shift = 0, 0
    return counts if shift == 0 else None  # not cut off inside a run


def mask_problem(segmentation: Any, height: int, width: int) -> tuple[str, str] | None:
    """Why ``segmentation`` cannot be a training mask of a ``height`` x ``width`` image, as a
    problem kind and its detail, or None when it decodes to a mask with at least one pixel."""
    from pycocotools import mask as mask_utils

    try:
        if mask_utils.area(_rle(segmentation, height, width)) > 0:
            return None
    except InvalidPolygonError as error:
        return INVALID_POLYGON, str(error)
    except InvalidMaskError as error:
        return INVALID_RLE, str(error)
    except (ValueError, TypeError, KeyError):
        pass
    return "empty or missing masks", ""


def has_area(segmentation: Any, height: int, width: int) -> bool:
    """Whether ``segmentation`` decodes to a mask with at least one pixel."""
    return mask_problem(segmentation, height, width) is None


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """``(H, W)`` uint8 binary mask of a COCO segmentation."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_rle(segmentation, height, width)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Transforms: (PIL image, target) -> ((3, H, W) float tensor in [0, 1], target); torchvision's
# detector resizes (multi-scale in training) and normalises.
# ---------------------------------------------------------------------------------------------


# Swin's detection recipes (mmdet's AutoAugment, from DETR): half the images reach the detector as
# they are (it resizes them to a random shorter side of 480..800); the other half are first resized
# to a shorter side of 400, 500 or 600 (longer side at most 1333) and cropped to a random window
# 384..600 pixels a side, then resized by the detector the same way.
CROP_SHORTER_SIDES = (400, 500, 600)
CROP_RANGE = (384, 600)


class DetectionTrainTransform:
    """Horizontal flip (boxes and masks with it); with probability ``crop_policy`` Swin's resize and
    random crop (:func:`resize_and_crop`); optionally photometric distortion. Draws from :mod:`random`."""

    def __init__(self, hflip: float = 0.5, photometric: bool = False, crop_policy: float = 0.0) -> None:
        self.hflip, self.photometric, self.crop_policy = hflip, photometric, crop_policy

    def __call__(self, item: tuple[Image.Image, dict[str, Any]]) -> tuple[Tensor, dict[str, Any]]:
        image, target = item
        if random.random() < self.hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            target = flip_target(target, image.size[0])
        if random.random() < self.crop_policy:
            image, target = resize_and_crop(image, target)
        if self.photometric:
            image = photometric_distortion(image)
        return TF.to_tensor(image), target


def resize_and_crop(
    image: Image.Image, target: dict[str, Any], rng: Any = random, max_size: int = 1333
) -> tuple[Image.Image, dict[str, Any]]:
    """mmdet's ``Resize`` to a shorter side of 400, 500 or 600 (keeping the ratio, longer side at most
    ``max_size``), then ``RandomCrop(crop_type="absolute_range", crop_size=(384, 600),
    allow_negative_crop=True)``: a window of random height and width in 384..600 (the whole side
    when shorter) at a random place; boxes shifted and clipped to it, instances left without area
    dropped (an image may keep none), masks resized (nearest) and cropped with them."""
    width, height = image.size
    shorter = rng.choice(CROP_SHORTER_SIDES)
    new_height, new_width = rescaled_size(height, width, shorter, max_size)  # mmcv's rounding
    size = (new_width, new_height)  # PIL's order
    image = image.resize(size, Image.BILINEAR)
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([size[0] / width, size[1] / height] * 2)
    if "masks" in target:
        masks = target["masks"][:, None].float()  # instances as the batch: an image may have none
        target["masks"] = F.interpolate(masks, size=(size[1], size[0]), mode="nearest")[:, 0].to(torch.uint8)
    low, high = CROP_RANGE
    crop_height = rng.randint(min(size[1], low), min(size[1], high))
    crop_width = rng.randint(min(size[0], low), min(size[0], high))
    top = rng.randint(0, size[1] - crop_height)
    left = rng.randint(0, size[0] - crop_width)
    image = image.crop((left, top, left + crop_width, top + crop_height))
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, crop_width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, crop_height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target["boxes"], target["labels"] = boxes[keep], target["labels"][keep]
    if "masks" in target:
        target["masks"] = target["masks"][keep, top : top + crop_height, left : left + crop_width]
    return image, target


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """``(..., 4)`` boxes in an image ``width`` pixels wide, mirrored left to right: ``x -> width - x``
    (mmdet 2's ``bbox_flip``)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def flip_target(target: dict[str, Any], width: int) -> dict[str, Any]:
    """Mirror boxes (:func:`mirror_boxes`) and masks left to right."""
    flipped = dict(target)
    flipped["boxes"] = mirror_boxes(target["boxes"], width)
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return flipped


def detection_eval_transform(item: tuple[Image.Image, dict[str, Any]]) -> tuple[Tensor, dict[str, Any]]:
    """An evaluation item as a detector takes it: the image as a float tensor in [0, 1], the target unchanged."""
    image, target = item
    return TF.to_tensor(image), target
