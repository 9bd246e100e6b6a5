"""Building the training and validation data for a run, and the sampler that makes resuming exact."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..data import (
    AugmentedDataset,
    DigitsDataset,
    FileDataset,
    SeededTransform,
    collate_skipping_bad,
    csv_list,
    eval_transform,
    image_folder,
    split_dataset,
)
from ..variants import Preprocessing
from .config import TrainConfig
from .distributed import Distributed

SPLIT_SEED = 0  # the train/val split by fraction never changes with the training seed


@dataclass
class RunData:
    train: FileDataset
    val: FileDataset
    classes: list[str]
    source: str


SPLIT_FOLDERS = ("train", "val")


def _load(path: str, strict: bool, held_out: bool = False) -> FileDataset:
    """A CSV list or class folders; held-out images may leave a class folder empty (a warning)."""
    if Path(path).suffix.lower() == ".csv":
        return csv_list(path, strict=strict)
    dataset = image_folder(path, strict=strict, allow_empty=held_out)
    _refuse_split_folders_as_classes(path, dataset.classes)
    return dataset


def _refuse_split_folders_as_classes(path: str, classes: list[str]) -> None:
    """Refuse class folders that are only ``train/`` or ``val/``: half of the split layout, which as
    class folders trains a one-class model named after the split ("100%" held-out accuracy)."""
    if not set(classes) <= set(SPLIT_FOLDERS):
        return
    missing = [name for name in SPLIT_FOLDERS if name not in classes]
    train = "--data and --val-data each naming a folder of class folders"
    if not missing:
        raise ValueError(
            f"{path} has train/ and val/, split folders, not classes: leave out --val-data (val/ is the "
            f"held-out part), or {train}"
        )
    raise ValueError(
        f"{path} has {classes[0]}/ but no {missing[0]}/: split folders, not classes. Give {path} both train/ "
        f"and val/ (each holding class folders), or class folders alone ({path}/<class>/<images>, split by "
        f"--val-fraction), or {train}"
    )


def load_datasets(config: TrainConfig) -> RunData:
    """Train / val datasets (without transforms): bundled digits, a folder, or a CSV list."""
    if config.data is None:
        train, val = split_dataset(DigitsDataset(), config.val_fraction, SPLIT_SEED)
        return RunData(train, val, train.classes, "bundled handwritten digits")
    root = Path(config.data)
    if config.val_data is not None:
        train, val = _load(config.data, config.strict_data), _load(config.val_data, config.strict_data, held_out=True)
    elif root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir():
        train, val = (
            image_folder(root / "train", strict=config.strict_data),
            image_folder(root / "val", strict=config.strict_data, allow_empty=True),
        )
    else:
        train, val = split_dataset(_load(config.data, config.strict_data), config.val_fraction, SPLIT_SEED)
    if train.classes != val.classes:
        raise ValueError(
            f"train and val classes differ: {sorted(set(train.classes) ^ set(val.classes))[:10]} are in only one"
        )
    if len(train.classes) < 2:  # cross-entropy over one class is 0 whatever the model: nothing is learned
        raise ValueError(
            f"{config.data} has one class ({train.classes[0]!r}): a classifier needs at least two; add the "
            "other classes' folders (or CSV rows)"
        )
    return RunData(train, val, train.classes, str(config.data))


def validation_source(config: Any) -> str:
    """The held-out images of a run (a training or pretraining config) as messages name them."""
    if config.val_data is not None:
        return f"the validation set ({config.val_data})"
    if config.data is None:
        return "the validation set (the held-out part of the bundled digits)"
    root = Path(config.data)
    if root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir():
        return f"the validation set ({root / 'val'})"
    return f"the validation set (the part of {config.data} held out by --val-fraction)"


class EpochBatchSampler(Sampler[list[int]]):
    """This process's share of each global batch, in an order fixed by (seed, epoch).

    Global step ``s`` of an epoch covers items ``perm[s*G:(s+1)*G]`` (``G`` = batch x world size);
    rank ``r`` takes every ``world``-th of them, so any number of processes sees the same global
    batches. Incomplete global batches are dropped. ``start_step`` skips steps a resumed run did.
    """

    def __init__(self, size: int, batch_size: int, seed: int, dist: Distributed) -> None:
        self.size, self.batch_size, self.seed, self.dist = size, batch_size, seed, dist
        self.epoch, self.start_step = 0, 0

    @property
    def steps(self) -> int:
        return self.size // (self.batch_size * self.dist.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        global_batch = self.batch_size * self.dist.world_size
        for step in range(self.start_step, self.steps):
            chunk = order[step * global_batch : (step + 1) * global_batch]
            yield chunk[self.dist.rank :: self.dist.world_size]


def train_loader(
    dataset: FileDataset, transform: Any, config: TrainConfig, dist: Distributed
) -> tuple[DataLoader, EpochBatchSampler, AugmentedDataset]:
    """Batches of ``dataset`` through ``transform`` (seeded per item), this process's share of each
    global batch (``config``: ``batch_size``, ``seed``, ``workers``)."""
    augmented = AugmentedDataset(dataset, SeededTransform(transform, config.seed))
    sampler = EpochBatchSampler(len(dataset), config.batch_size, config.seed, dist)
    if sampler.steps == 0:
        raise ValueError(
            f"the training set has {len(dataset)} images, fewer than one global batch "
            f"({config.batch_size} x {dist.world_size} processes); lower --batch-size"
        )
    loader = DataLoader(
        augmented,
        batch_sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate_skipping_bad,
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=dist.device.type == "cuda",
    )
    return loader, sampler, augmented


def eval_loader(
    dataset: FileDataset, preprocessing: Preprocessing, batch_size: int, workers: int, dist: Distributed
) -> DataLoader:
    """Each process evaluates every ``world``-th item (no padding, so summed metrics are exact)."""
    dataset.transform = eval_transform(preprocessing)
    shard = list(range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        generator=torch.Generator().manual_seed(0),
    )
