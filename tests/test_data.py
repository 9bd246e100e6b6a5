"""Datasets and image decoding: folders, CSV lists, bad files, image modes, deterministic splits."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import bomb_png, write_digit_folder
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


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_eval_crop_is_torchvisions_resize_and_center_crop_exactly(interpolation):
    from torchvision import transforms as T

    from swinkit.data import eval_crop
    from swinkit.data.transforms import interpolation_mode

    generator = np.random.default_rng(0)
    mode = interpolation_mode(interpolation)
    for width, height, resize, crop in [(64, 48, 36, 32), (30, 90, 40, 32), (2000, 7, 20, 16), (16, 16, 24, 32)]:
        image = Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop)])(image)
        found = eval_crop(Preprocessing(resize=resize, crop=crop, interpolation=interpolation))(image)
        assert found.size == expected.size and np.array_equal(np.asarray(found), np.asarray(expected))


def test_an_image_too_elongated_to_resize_for_evaluation_is_a_bad_image_naming_it(tmp_path):
    # A 105-byte 8000x1 PNG took 2 GB to resize to a short side of 256, one of 100000x1 25 GB (killed).
    root = write_digit_folder(tmp_path / "data", classes=(0,), per_class=1, formats=("png",))
    long = root / "digit0" / "long.png"
    Image.new("RGB", (40000, 1)).save(long)  # resized to 1440000x36: over 2**25 pixels
    transform = eval_transform(Preprocessing(resize=36, crop=32))
    dataset = image_folder(root, transform=transform)
    items = {Path(dataset.name(i)).name: dataset[i] for i in range(len(dataset))}
    assert len(items) == 2 and items.pop("long.png") == BadItem(
        str(long),
        f"image {long}: an image of 40000x1 pixels is too elongated to evaluate: resizing its shorter side to 36 "
        "makes it 1440000x36, over the 33554432 pixels accepted",
    )
    assert [image.shape for image, _ in items.values()] == [(3, 32, 32)]
    index = [dataset.name(i) for i in range(len(dataset))].index(str(long))
    with pytest.raises(BadImageError, match=f"image {re.escape(str(long))}: an image of 40000x1 pixels is too"):
        image_folder(root, transform=transform, strict=True)[index]
    # Pretraining's held-out images take evaluation's crop through a seeded wrapper: the same.
    augmented = AugmentedDataset(image_folder(root), SeededTransform(transform, seed=0))
    assert isinstance(augmented[index], BadItem) and "too elongated" in augmented[index].reason
    tall = tmp_path / "tall.png"
    Image.new("RGB", (1, 40000)).save(tall)
    with pytest.raises(BadImageError, match="1x40000 pixels .* makes it 36x1440000"):
        transform(load_image(tall))


def test_a_symbolic_link_that_leads_nowhere_is_a_bad_image_not_lost(tmp_path):
    # A dangling link in a class folder vanished without a word: "(8 images, 0 unreadable)".
    root = write_digit_folder(tmp_path / "data", classes=(0, 1), per_class=1, formats=("png",))
    broken = root / "digit1" / "broken.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    (root / "digit1" / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # not an image's name: not listed
    dataset = image_folder(root)
    assert len(dataset) == 3 and str(broken) in [sample.path for sample in dataset.samples]
    index = [sample.path for sample in dataset.samples].index(str(broken))
    reason = f"cannot decode image {broken}: a symbolic link to {tmp_path / 'nowhere.png'} that leads to no file"
    assert isinstance(dataset[index], BadItem) and dataset[index].reason.startswith(reason)
    with pytest.raises(BadImageError, match=re.escape(reason)):
        image_folder(root, strict=True)[index]


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


def test_decompression_bomb_is_a_bad_image_and_the_limit_stays(tmp_path):
    # It was a raw PIL.Image.DecompressionBombError (not an OSError) that killed predict and training.
    root = write_digit_folder(tmp_path / "data", classes=(0,), per_class=2)
    bomb = bomb_png(root / "digit0" / "bomb.png")
    limit = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(
        BadImageError, match=rf"cannot decode image .*bomb\.png: 400000000 pixels is over PIL's limit of {limit} pixels"
    ):
        load_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's guard is kept, not switched off
    dataset = image_folder(root, transform=eval_transform(Preprocessing(resize=32, crop=32)))
    batch = collate_skipping_bad([dataset[i] for i in range(len(dataset))])
    assert batch["bad"] == [str(bomb)] and batch["images"].shape == (2, 3, 32, 32)
    strict = image_folder(root, strict=True)
    with pytest.raises(BadImageError, match="over PIL's limit"):
        strict[[s.path for s in strict.samples].index(str(bomb))]


def test_empty_class_folder_is_refused_by_name_unless_allowed(tmp_path, caplog):
    root = write_digit_folder(tmp_path / "data", classes=(0, 1), per_class=2)
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("no images")
    with pytest.raises(
        ValueError, match=rf"no image files \(.*\) in 1 of 3 class folders: {re.escape(str(root / 'zebra'))}; the model"
    ):
        image_folder(root)
    with caplog.at_level("WARNING"):
        dataset = image_folder(root, allow_empty=True)
    assert dataset.classes == ["digit0", "digit1", "zebra"] and len(dataset) == 4
    assert f"{root / 'zebra'}; the model would get a class it never sees" in caplog.text
    (root / "zebra").rename(root / ".zebra")  # the way out the message gives: not a class
    assert image_folder(root).classes == ["digit0", "digit1"]


def test_unreadable_class_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    # rglob skipped a folder it could not list: the class silently had no images.
    root = write_digit_folder(tmp_path / "data", classes=(0, 1, 2), per_class=2)
    hidden = root / "digit1" / "more"
    hidden.mkdir()
    real_scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) in (str(root / "digit2"), str(hidden)):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(
        PermissionError, match=rf"^cannot read class folder {re.escape(str(hidden))}: Permission denied$"
    ):
        image_folder(root)
    hidden.rmdir()
    with pytest.raises(
        PermissionError, match=rf"^cannot read class folder {re.escape(str(root / 'digit2'))}: Permission denied$"
    ):
        image_folder(root)


def test_unreadable_class_folder_on_disk(tmp_path):
    root = write_digit_folder(tmp_path / "data", classes=(0, 1), per_class=2)
    locked = root / "digit1"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("this process reads a mode-000 folder (root with CAP_DAC_OVERRIDE)")
        with pytest.raises(
            PermissionError, match=f"cannot read class folder {re.escape(str(locked))}: Permission denied"
        ):
            image_folder(root)
    finally:
        locked.chmod(0o755)


def _csv(tmp_path, text, name="list.csv", encoding="utf-8"):
    (tmp_path / name).write_text(text, encoding=encoding)
    return tmp_path / name


def test_csv_header_in_other_words_or_after_a_bom_is_not_a_data_row(tmp_path):
    root = write_digit_folder(tmp_path / "data", classes=(3, 5), per_class=2)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("*.*"))]
    for header, encoding in [("path,label", "utf-8-sig"), ("file,class", "utf-8"), (" Image , Target", "utf-8")]:
        dataset = csv_list(_csv(tmp_path, "\n".join([header, *rows]) + "\n", encoding=encoding))
        assert dataset.classes == ["digit3", "digit5"] and len(dataset) == 4, header
    # An Excel export: BOM, CRLF, a blank row written as ",".
    text = "\ufeffpath,label\r\n" + "\r\n".join(rows) + "\r\n,\r\n"
    (tmp_path / "excel.csv").write_bytes(text.encode("utf-8"))
    assert csv_list(tmp_path / "excel.csv").classes == ["digit3", "digit5"]
    # No header at all still works.
    assert len(csv_list(_csv(tmp_path, "\n".join(rows) + "\n"))) == 4


def test_csv_unknown_header_or_missing_first_file_is_named(tmp_path):
    root = write_digit_folder(tmp_path / "data", classes=(3, 5), per_class=2)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("*.*"))]
    listing = _csv(tmp_path, "\n".join(["# my images", "picture,kind", *rows]) + "\n")
    with pytest.raises(ValueError, match=r"list\.csv: row 2 \('picture,kind'\) names a file that does not exist"):
        csv_list(listing)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        csv_list(_csv(tmp_path, "path,label\nchat\xe9.png,cat\n", encoding="latin-1"))


def _rows(files, labels):
    return [f"{file},{label}" for file, label in zip(files, labels, strict=True)]


def test_csv_labels_mostly_integers_name_the_rows_that_are_not(tmp_path):
    root = write_digit_folder(tmp_path / "data", classes=(0,), per_class=5)
    files = [p.relative_to(tmp_path) for p in sorted(root.rglob("*.*"))]
    labels = ["0", "1", "2", "10", "1o"]
    listing = _csv(tmp_path, "\n".join(["path,label", *_rows(files, labels)]) + "\n")
    with pytest.raises(ValueError, match=r"4 of 5 labels are integers \(class indices\) but 1 are not \(row 6: '1o'\)"):
        csv_list(listing)
    # All integers: the integers are the class indices, as documented (classes 0 .. the largest).
    labels[-1] = "01"
    listing = _csv(tmp_path, "\n".join(_rows(files, labels)) + "\n")
    dataset = csv_list(listing)
    assert dataset.classes == [str(i) for i in range(11)]
    assert [s.label for s in dataset.samples] == [0, 1, 2, 10, 1]
    # All names (or names with a few digit-like ones): sorted names.
    labels = ["cat", "dog", "eel", "7", "cat"]
    listing = _csv(tmp_path, "\n".join(_rows(files, labels)) + "\n")
    assert csv_list(listing).classes == ["7", "cat", "dog", "eel"]
