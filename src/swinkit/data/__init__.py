"""Datasets, image decoding and transforms."""

from .datasets import (
    AugmentedDataset,
    BadItem,
    DigitsDataset,
    FileDataset,
    SeededTransform,
    collate_skipping_bad,
    csv_list,
    image_folder,
    require_some_read,
    split_dataset,
    transform_image,
)
from .images import IMAGE_EXTENSIONS, BadImageError, load_image
from .transforms import eval_crop, eval_transform, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "AugmentedDataset",
    "BadImageError",
    "BadItem",
    "DigitsDataset",
    "FileDataset",
    "SeededTransform",
    "collate_skipping_bad",
    "csv_list",
    "eval_crop",
    "eval_transform",
    "image_folder",
    "load_image",
    "require_some_read",
    "split_dataset",
    "train_transform",
    "transform_image",
]
