"""Datasets and image decoding: folders, CSV lists, bad files, image modes, deterministic splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_digit_folder
from swinkit.data import (
    AugmentedDataset,
    BadImageError,
    BadItem,
    DigitsDataset,
    SeededTransform,
    collate_skipping_bad,
    csv_list,
    image_folder,
    load_image,
    split_dataset,
)
from swinkit.data.transforms import eval_transform
from swinkit.variants import Preprocessing


def test_image_folder_classes_and_files(tmp_path):
    root = write_digit_folder(tmp_path / "data")
    (root / "digit0" / "notes.txt").write_text("not an image")
    dataset = image_folder(root)
    assert dataset.classes == ["digit0", "digit1", "digit2"]
    assert len(dataset) == 18 and {s.label for s in dataset.samples} == {0, 1, 2}
    image, label = dataset[0]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 0


def test_bad_files_are_skipped_and_counted(tmp_path):
    root = write_digit_folder(tmp_path / "data", classes=(0,), per_class=4)
    good = next((root / "digit0").glob("*.png")).read_bytes()
    (root / "digit0" / "zero.png").write_bytes(b"")
    (root / "digit0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "digit0" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "digit0" / "text.png").write_text("hello, I am not a picture")
    dataset = image_folder(root, transform=eval_transform(Preprocessing(resize=32, crop=32)))
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate_skipping_bad(items)
    assert len(batch["bad"]) == 4 and batch["images"].shape == (4, 3, 32, 32)
    assert {p.rsplit("/", 1)[-1] for p in batch["bad"]} == {"zero.png", "truncated.png", "random.jpg", "text.png"}
    strict = image_folder(root, strict=True)
    with pytest.raises(BadImageError, match="cannot decode image"):
        for i in range(len(strict)):
            strict[i]


def test_all_bad_batch_collates_to_none():
    batch = collate_skipping_bad([BadItem("a.png", "x"), BadItem("b.png", "y")])
    assert batch["images"] is None and batch["bad"] == ["a.png", "b.png"]


def test_image_modes_are_converted(tmp_path):
    gray = Image.fromarray(np.full((4, 4), 100, dtype=np.uint8), mode="L")
    rgba = Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), mode="RGBA")  # fully transparent
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    palette = gray.convert("P")
    for name, image in {"gray": gray, "rgba": rgba, "deep": deep, "palette": palette}.items():
        image.save(tmp_path / f"{name}.png")
    assert np.asarray(load_image(tmp_path / "gray.png"))[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(load_image(tmp_path / "rgba.png"))[0, 0].tolist() == [255, 255, 255]  # on white
    assert np.asarray(load_image(tmp_path / "deep.png"))[0, 0].tolist() == [255, 255, 255]  # 16-bit scaled
    assert load_image(tmp_path / "palette.png").mode == "RGB"


def test_csv_list(tmp_path):
    root = write_digit_folder(tmp_path / "data", classes=(3, 5), per_class=2)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("*.*"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    dataset = csv_list(tmp_path / "list.csv")
    assert dataset.classes == ["digit3", "digit5"] and len(dataset) == 4
    assert dataset[0][0].size == (32, 32)
    (tmp_path / "bad.csv").write_text("a.png\n")
    with pytest.raises(ValueError, match=r"bad\.csv: expected rows 'path,label'"):
        csv_list(tmp_path / "bad.csv")


def test_split_is_stratified_and_fixed():
    digits = DigitsDataset()
    train, val = split_dataset(digits, 0.2, seed=0)
    _, again_val = split_dataset(digits, 0.2, seed=0)
    assert [s.path for s in val.samples] == [s.path for s in again_val.samples]
    assert len(train) + len(val) == len(digits) == 1797
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    counts = np.bincount([s.label for s in val.samples])
    assert counts.min() >= 34 and counts.max() <= 38  # about 20% of every class (174..183 images each)


def test_seeded_augmentation_depends_only_on_epoch_and_index():
    from torchvision import transforms as T

    digits = DigitsDataset(indices=range(4))
    transform = SeededTransform(T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0)), T.ToTensor()]), seed=1)
    augmented = AugmentedDataset(digits, transform)
    first = augmented[2][0]
    torch.rand(10)  # global RNG use in between must not matter
    assert torch.equal(augmented[2][0], first)
    augmented.set_epoch(1)
    assert not torch.equal(augmented[2][0], first)


def test_missing_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class sub-folders"):
        image_folder(tmp_path / "flat")
