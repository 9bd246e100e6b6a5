"""A synthetic dense dataset: shapes with exact masks and boxes on textured backgrounds.

For smoke tests and the CPU benchmark: no download, any size, and the labels are exact (each
instance's mask is the set of pixels it was drawn on, its box that mask's extent). One folder
serves both tasks: ADE20K-style ``images/<split>`` + ``annotations/<split>`` label maps with
``classes.txt`` for segmentation, and ``instances_<split>.json`` (COCO, RLE masks) for detection.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def _texture(rng: random.Random, size: int) -> np.ndarray:
    """Stripes at a random angle and frequency, a colour gradient and pixel noise: ``(size, size, 3)`` float."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle, frequency = rng.uniform(0, math.pi), rng.uniform(2, 9)
    stripes = np.sin(2 * math.pi * frequency * (x * math.cos(angle) + y * math.sin(angle)))
    # Near-grey backgrounds (a slight tint) and saturated shapes: where a shape is is easy, which shape is not.
    base = rng.uniform(40, 215) + np.array([rng.uniform(-12, 12) for _ in range(3)])
    tint, ramp = (np.array([rng.uniform(40, 215) for _ in range(3)]) for _ in range(2))
    pixels = base + 35 * stripes[..., None] * (tint / 255) + 40 * (x[..., None] - 0.5) * (ramp / 255 - 0.5)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 8, (size, size, 3))
    return pixels + noise


def _polygon(rng: random.Random, shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    corners = {"circle": 48, "square": 4, "triangle": 3}[shape]
    start = rng.uniform(0, 2 * math.pi)
    return [
        (
            cx + radius * math.cos(start + 2 * math.pi * k / corners),
            cy + radius * math.sin(start + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def render_scene(rng: random.Random, size: int, max_shapes: int = 3) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image and its instances ``{"label": 1..3, "mask": (H, W) bool}``; shapes do not overlap."""
    pixels = _texture(rng, size)
    taken = np.zeros((size, size), dtype=bool)
    instances = []
    for _ in range(rng.randint(1, max_shapes)):
        shape = rng.randrange(len(SHAPES))
        radius = rng.uniform(0.12, 0.28) * size
        cx, cy = rng.uniform(radius * 0.7, size - radius * 0.7), rng.uniform(radius * 0.7, size - radius * 0.7)
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).polygon(_polygon(rng, SHAPES[shape], cx, cy, radius), fill=1)
        mask = np.asarray(canvas, dtype=bool)
        if mask.sum() < 16 or (mask & taken).any():
            continue
        color = 255 * np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)))
        shade = np.random.default_rng(rng.randrange(2**32)).normal(0, 4, (size, size, 1))
        pixels[mask] = (color + shade)[mask]
        taken |= mask
        instances.append({"label": shape + 1, "mask": mask})
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), instances


def _coco_annotation(instance: dict[str, Any], image_id: int, annotation_id: int) -> dict[str, Any]:
    from .metrics import mask_to_rle

    rows, cols = np.nonzero(instance["mask"])
    x, y = int(cols.min()), int(rows.min())
    w, h = int(cols.max()) + 1 - x, int(rows.max()) + 1 - y
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": instance["label"],
        "bbox": [x, y, w, h],
        "area": int(instance["mask"].sum()),
        "iscrowd": 0,
        "segmentation": mask_to_rle(instance["mask"]),
    }


def write_shapes_dataset(
    root: str | os.PathLike, splits: dict[str, int], size: int = 96, seed: int = 0, max_shapes: int = 3
) -> Path:
    """Write ``splits`` (name -> image count) of rendered scenes under ``root``; returns ``root``.

    Label maps hold 0 for background and 1..3 for circle, square, triangle; the COCO files use
    category ids 1..3 for the same shapes.
    """
    root = Path(root)
    rng = random.Random(seed)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(("background", *SHAPES)) + "\n")
    for split, count in splits.items():
        images, masks = root / "images" / split, root / "annotations" / split
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
        coco["categories"] = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES)]
        for index in range(count):
            image, instances = render_scene(rng, size, max_shapes)
            labels = np.zeros((size, size), dtype=np.uint8)
            for instance in instances:
                labels[instance["mask"]] = instance["label"]
            name = f"{split}_{index:05d}"
            image.save(images / f"{name}.png")
            Image.fromarray(labels).save(masks / f"{name}.png")
            coco["images"].append({"id": index + 1, "file_name": f"{name}.png", "width": size, "height": size})
            for instance in instances:
                coco["annotations"].append(_coco_annotation(instance, index + 1, len(coco["annotations"]) + 1))
        (root / f"instances_{split}.json").write_text(json.dumps(coco))
    return root
