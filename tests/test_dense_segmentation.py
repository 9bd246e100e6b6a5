"""Semantic segmentation: mIoU by hand, PNG mask folders with bad items, training, inference, CLI, resume, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torchvision.transforms import functional as TF

from helpers import relative_error
from swinkit.cli import main
from swinkit.data import BadItem
from swinkit.dense import (
    AUG_TEST_RATIOS,
    SegmentationFolder,
    confusion_matrix,
    create_backbone,
    create_segmentor,
    fit_dense,
    infer,
    infer_augmented,
    load_dense,
    resolve_dense_config,
    segmentation_loss,
    segmentation_scores,
)
from swinkit.dense.export import load_dense_file
from swinkit.dense.heads import _bin_means, resize
from swinkit.dense.predict import segment_image
from swinkit.dense.segmentation_data import SegmentationEvalTransform, SegmentationTrainTransform, find_split
from swinkit.dense.shapes import write_shapes_dataset
from swinkit.dense.train import build_schedule
from swinkit.dense.weights import DenseSpec, build_dense_model, save_dense
from swinkit.export import load_program, onnx_session
from swinkit.train.optim import build_optimizer

# A tiny, fast run: swin_test backbone, narrow heads, 64-pixel scenes.
FAST = ["--model", "swin_test", "--crop-size", "64", "--scale", "64", "64", "--channels", "16", "--aux-channels", "8",
        "--workers", "0", "--no-progress", "--warmup-steps", "1", "--base-lr", "1e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), {"training": 8, "validation": 4}, size=64)


def test_miou_and_accuracy_match_a_hand_computed_example():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 2], [2, 2, 1, 0]])
    confusion = confusion_matrix(prediction, target, num_classes=4)
    assert confusion.tolist() == [[3, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion, ["a", "b", "c", "never seen"])
    # IoU: a 3/(4+4-3) = 0.6, b 2/(3+4-2) = 0.4, c 2/(3+2-2) = 2/3; the fourth class has no pixels: left out.
    assert scores["mIoU"] == pytest.approx((0.6 + 0.4 + 2 / 3) / 3 * 100)
    assert scores["mAcc"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3 * 100)
    assert scores["aAcc"] == pytest.approx(7 / 10 * 100) and scores["pixels"] == 10
    assert scores["per_class"]["never seen"] == {"IoU": None, "Acc": None}
    # A class predicted but absent from the ground truth has IoU 0 and counts in the mean.
    assert segmentation_scores(confusion_matrix(torch.tensor([1]), torch.tensor([0]), 2))["mIoU"] == 0.0


def _write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def test_folder_reports_and_skips_bad_samples(tmp_path, caplog):
    images, masks = tmp_path / "images", tmp_path / "annotations"
    rgb = np.full((12, 16, 3), 100)
    labels = np.ones((12, 16))
    labels[:, :8] = 3  # with reduce_zero_label: class 2
    _write(images / "good.png", rgb)
    _write(masks / "good.png", labels)
    _write(images / "unknown.png", rgb)
    _write(masks / "unknown.png", np.full((12, 16), 9))  # label 8 after reduction: not a class
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    _write(masks / "broken.png", labels)
    _write(images / "small_mask.png", rgb)
    _write(masks / "small_mask.png", labels[:6])
    _write(images / "all_zero.png", rgb)
    _write(masks / "all_zero.png", np.zeros((12, 16)))  # label 0 is ignored by reduce_zero_label
    _write(images / "no_mask.png", rgb)
    with caplog.at_level("WARNING"):
        dataset = SegmentationFolder(images, masks, num_classes=3, reduce_zero_label=True)
        items = {os.path.basename(s.image): dataset[i] for i, s in enumerate(dataset.samples)}
    assert "1 images have no label map" in caplog.text and "no_mask.png" in caplog.text
    image, mask = items["good.png"]
    assert image.size == (16, 12) and mask.dtype == np.int64
    assert (mask[:, :8] == 2).all() and (mask[:, 8:] == 0).all()
    assert isinstance(items["unknown.png"], BadItem) and "no labelled pixel" in items["unknown.png"].reason
    assert "labels [8]" in caplog.text
    assert "cannot decode image" in items["broken.png"].reason
    assert "is 16x6, its image 16x12" in items["small_mask.png"].reason
    assert "no labelled pixel" in items["all_zero.png"].reason
    strict = SegmentationFolder(images, masks, num_classes=3, reduce_zero_label=True, strict=True)
    with pytest.raises(ValueError, match="all_zero.png has no labelled pixel"):
        [strict[i] for i in range(len(strict))]


def test_train_transform_crops_flips_and_pads_with_the_ignore_index():
    transform = SegmentationTrainTransform(32, None, (0.5, 0.5), (0.5,) * 3, (0.25,) * 3, hflip=1.0)
    image = Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))
    labels = np.zeros((40, 50), dtype=np.int64)
    labels[:, :10] = 1
    pixels, mask = transform((image, labels))
    assert pixels.shape == (3, 32, 32) and mask.shape == (32, 32)
    # Rescaled by 0.5 to 25x20: the crop covers it all, flipped (class 1 on the right), padded with 255.
    assert (mask[:20, 20:25] == 1).all() and (mask[:20, :20] == 0).all()
    assert (mask[20:] == 255).all() and (mask[:, 25:] == 255).all() and (pixels[:, 20:] == 0).all()


@pytest.mark.parametrize("aux", [True, False])
def test_one_training_step_lowers_the_loss_on_a_fixed_batch(aux):
    model = create_segmentor("swin_test", num_classes=4, channels=16, aux_channels=8, aux=aux).train()
    images, masks = torch.randn(2, 3, 48, 48), torch.randint(0, 4, (2, 48, 48))
    masks[0, :4] = 255
    optimizer = build_optimizer(model, 0.05, None, lr=1e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout draws before and after the step
        return segmentation_loss(model(images), masks)

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_an_all_ignored_batch_gives_zero_loss_not_nan():
    model = create_segmentor("swin_test", num_classes=3, channels=16, aux_channels=8)
    loss = segmentation_loss(model(torch.randn(1, 3, 32, 32)), torch.full((1, 32, 32), 255))
    assert loss.item() == 0.0


class PixelClassifier(nn.Module):
    """A per-pixel model: sliding windows must then reproduce the whole-image logits exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(images)}


def test_sliding_window_inference_covers_the_image_and_averages_overlaps():
    model, images = PixelClassifier(), torch.randn(2, 3, 50, 77)
    whole = infer(model, images)
    for crop, stride in [(32, 20), (16, 16), (64, 10), (50, 1)]:
        assert torch.allclose(infer(model, images, "slide", crop, stride), whole, atol=1e-6), (crop, stride)
    real = create_segmentor("swin_test", num_classes=3, channels=16, aux_channels=8).eval()
    assert torch.equal(infer(real, images, "slide", 96, 64), infer(real, images))
    assert infer(real, images, "slide", 32, 24).shape == (2, 3, 50, 77)
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        infer(model, images, "tiles")


def test_multi_scale_views_are_the_test_scale_times_each_ratio_as_mmseg_rescales():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = SegmentationEvalTransform((2048, 512), mean, std, AUG_TEST_RATIOS)
    views = transform.views(image)
    # mmseg: scale (int(2048 r), int(512 r)), then the largest size of the image's shape inside it,
    # sides rounded half up: 640 x 480 at r = 0.5 is inside (1024, 256) at factor 256 / 480.
    sizes = [tuple(view.shape[1:]) for view in views]
    assert sizes == [(256, 341), (384, 512), (512, 683), (640, 853), (768, 1024), (896, 1195)]
    assert torch.equal(views[2], SegmentationEvalTransform((2048, 512), mean, std).image(image))
    expected = TF.normalize(TF.to_tensor(image.resize((512, 384), Image.BILINEAR)), mean, std)
    assert torch.equal(views[1], expected)
    # Without a test scale the ratios are of the image's own size; ratio 1 is the image as it is.
    own = SegmentationEvalTransform(None, mean, std, (0.5, 1.0)).views(image)
    assert [tuple(view.shape[1:]) for view in own] == [(240, 320), (480, 640)]
    assert torch.equal(own[1], TF.normalize(TF.to_tensor(image), mean, std))
    item, labels = transform((image, np.zeros((480, 640), dtype=np.int64)))
    assert isinstance(item, list) and len(item) == 6 and labels.shape == (480, 640)


def test_aug_test_averages_the_probabilities_of_scaled_and_mirrored_views():
    torch.manual_seed(0)
    model = create_segmentor("swin_test", num_classes=4, channels=16, aux_channels=8).eval()
    small, large = torch.randn(1, 3, 40, 56), torch.randn(1, 3, 72, 100)
    size = (60, 84)

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.interpolate(model(images)["out"], size=size, mode="bilinear")
        return logits.softmax(dim=1)

    found = infer_augmented(model, [small, large], size, flip=True)
    mirrored = [probabilities(v.flip(-1)).flip(-1) for v in (small, large)]
    expected = (probabilities(small) + probabilities(large) + sum(mirrored)) / 4
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(found.sum(dim=1), torch.ones(1, *size))
    # One view, no flip: the single-scale probabilities; with flip, a mirrored input gives the
    # mirrored result (the flipped pass is undone before averaging).
    assert torch.equal(infer_augmented(model, [large], size), resize(infer(model, large), size).softmax(dim=1))
    both = infer_augmented(model, [large], size, flip=True)
    torch.testing.assert_close(infer_augmented(model, [large.flip(-1)], size, flip=True), both.flip(-1))
    assert not torch.allclose(both, infer_augmented(model, [large], size), atol=1e-3)
    # Sliding windows work per view as in a single-scale test (per-pixel model: slide == whole).
    pixel = PixelClassifier()
    slide = infer_augmented(pixel, [small, large], (72, 100), True, "slide", 32, 24)
    torch.testing.assert_close(slide, infer_augmented(pixel, [small, large], (72, 100), True))
    with pytest.raises(ValueError, match="at least one view"):
        infer_augmented(model, [], size)


def test_pyramid_pooling_bins_as_matrices_are_adaptive_average_pooling():
    for height, width in [(1, 1), (2, 3), (5, 7), (6, 13), (10, 11), (3, 2)]:
        x = torch.randn(2, 3, height, width, dtype=torch.float64)
        for bins in (1, 2, 3, 6):
            rows, columns = _bin_means(height, bins, x), _bin_means(width, bins, x)
            expected = torch.nn.functional.adaptive_avg_pool2d(x, bins)
            torch.testing.assert_close(rows @ x @ columns.T, expected, rtol=1e-12, atol=1e-12)


def test_a_validation_split_of_which_no_image_can_be_read_stops_segment_training(shapes, tmp_path, capsys):
    # It was scored "val_mIoU 0.00" and a model-best.safetensors saved on it (segment eval stopped).
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    images = data / "images" / "validation"
    for image in images.iterdir():
        image.write_bytes(b"not an image")
    out = tmp_path / "run"
    args = ["segment", "train", "--data", str(data), *FAST, "--epochs", "1", "--batch-size", "4", "--output", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        f"swinkit segment train: error: no image of the validation set ({images}) could be read: all 4 failed"
    ), error
    assert not (out / "model-best.safetensors").exists()


def test_cli_train_eval_predict(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    train = [
        "segment",
        "train",
        "--data",
        str(shapes),
        *FAST,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--output",
        str(out),
        "--test-mode",
        "slide",
        "--slide-stride",
        "32",
    ]
    assert main(train) == 0
    assert "best val mIoU" in capsys.readouterr().out
    for name in ("checkpoint-last.pt", "model-final.safetensors", "model-best.safetensors", "config.yaml"):
        assert (out / name).is_file(), name
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss", "val_mIoU", "val_mAcc", "val_aAcc", "lr"} <= set(row) and row["val_bad_images"] == 0
    # The loss's terms as mmseg logs them: UPerNet's and the auxiliary head's (weighted 0.4).
    terms = {key: value for key, value in row.items() if key.startswith("train_loss_")}
    assert set(terms) == {"train_loss_decode", "train_loss_aux"}
    assert sum(terms.values()) == pytest.approx(row["train_loss"], rel=1e-5)
    # The file keeps the official layout for the backbone: a plain Swin model reads it.
    assert "backbone.norm3.weight" in load_file(out / "model-final.safetensors")

    model = str(out / "model-final.safetensors")
    assert (
        main(
            [
                "segment",
                "eval",
                "--checkpoint",
                model,
                "--data",
                str(shapes),
                "--workers",
                "0",
                "--json",
                "--output",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 4 and metrics["mIoU"] == pytest.approx(row["val_mIoU"])
    assert set(metrics["per_class"]) == {"background", "circle", "square", "triangle"}
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert metrics["test_ratios"] == [1.0] and not metrics["test_flip"]

    # Multi-scale + flip testing: the evaluation scores the class maps that segment_image gives
    # with the same views; one ratio of 1 without flip is the single-scale test.
    evaluate = ["segment", "eval", "--checkpoint", model, "--data", str(shapes), "--workers", "0", "--json"]
    assert main([*evaluate, "--test-ratios", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(metrics["mIoU"])
    assert main([*evaluate, "--aug-test"]) == 0
    augmented = json.loads(capsys.readouterr().out)
    assert augmented["test_ratios"] == list(AUG_TEST_RATIOS) and augmented["test_flip"]
    loaded, spec = load_dense(model)
    confusion = torch.zeros(4, 4, dtype=torch.int64)
    for image, labels in SegmentationFolder(*find_split(shapes, "validation"), 4):
        found = segment_image(loaded, spec, image, AUG_TEST_RATIOS, flip=True)
        confusion += confusion_matrix(found[None], torch.from_numpy(labels)[None], 4, 255)
    assert augmented["mIoU"] == pytest.approx(segmentation_scores(confusion, spec.classes)["mIoU"])
    assert main([*evaluate, "--test-ratios", "0.5", "0"]) == 2
    assert "test ratios must be one or more numbers above 0, got [0.5, 0.0]" in capsys.readouterr().err

    (tmp_path / "broken.png").write_bytes(b"")
    images = find_split(shapes, "validation")[0]
    assert (
        main(
            [
                "segment",
                "predict",
                str(images),
                str(tmp_path / "broken.png"),
                "--checkpoint",
                model,
                "--output",
                str(tmp_path / "predicted"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "predicted" / "results.json").read_text())
    assert len(results) == 5 and "cannot decode image" in results[-1]["error"]
    overlay = Image.open(results[0]["overlay"])
    labels = np.asarray(Image.open(results[0]["labels"]))
    assert overlay.size == (64, 64) and labels.shape == (64, 64) and labels.max() < 4
    assert sum(results[0]["class_fractions"].values()) == pytest.approx(1.0)
    first = sorted(images.iterdir())[0]
    predict = ["segment", "predict", str(first), "--checkpoint", model, "--output", str(tmp_path / "aug")]
    assert main([*predict, "--test-ratios", "0.75", "1.5", "--flip"]) == 0
    written = np.asarray(Image.open(tmp_path / "aug" / f"0000_{first.stem}_labels.png"))
    expected = segment_image(loaded, spec, Image.open(first).convert("RGB"), (0.75, 1.5), flip=True)
    assert np.array_equal(written, expected.numpy())

    # The classifier commands refuse the file by name instead of running its backbone headless.
    assert main(["predict", str(images), "--checkpoint", model]) == 2
    assert "is a swinkit segment model file, not a classifier" in capsys.readouterr().err

    capsys.readouterr()
    explain = ["segment", "explain", str(images), str(tmp_path / "broken.png"), "--checkpoint", model]
    assert main([*explain, "--class", "circle", "--out", str(tmp_path / "explained"), "--json"]) == 0  # or --output
    explained = json.loads(capsys.readouterr().out)
    assert len(explained) == 5 and "cannot decode image" in explained[-1]["error"]
    first = explained[0]
    assert first["class"] == "circle" and first["index"] == 1 and 0 <= first["pixels"] <= 1
    assert Image.open(first["output"]).size == (64, 64) and first["output"].endswith(".gradcam.png")
    one = tmp_path / "one.png"  # a file for one image, as swinkit explain takes (it made a folder one.png/)
    assert main(["segment", "explain", str(first["path"]), "--checkpoint", model, "--out", str(one)]) == 0
    assert one.is_file() and Image.open(one).size == (64, 64)
    assert main([*explain, "--out", str(one)]) == 2
    assert "names one image file, but 5 images were given; give a folder" in capsys.readouterr().err
    assert main([*explain[:3], "--checkpoint", model, "--class", "hexagon"]) == 2
    assert "class 'hexagon' is neither a class name of the checkpoint" in capsys.readouterr().err
    assert main(["detect", "explain", str(images), "--checkpoint", model]) == 2
    assert "is a segment model; swinkit detect explain explains detect models" in capsys.readouterr().err


def test_segment_export_runs_in_onnxruntime_and_torch_and_serves_eval_and_predict(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    train = ["segment", "train", "--data", str(shapes), *FAST, "--epochs", "1", "--batch-size", "4"]
    assert main([*train, "--output", str(out)]) == 0
    model = str(out / "model-final.safetensors")
    loaded, spec = load_dense(model)
    first = sorted(find_split(shapes, "validation")[0].iterdir())[0]
    evaluate = ["segment", "eval", "--data", str(shapes), "--workers", "0", "--json"]
    capsys.readouterr()
    assert main([*evaluate, "--checkpoint", model]) == 0
    metrics = json.loads(capsys.readouterr().out)

    # Export: one ONNX file for every batch and size (checked against eager by the command, and here
    # at sizes of other window counts), the model description in its metadata; a program too.
    onnx_file = tmp_path / "segmentor.onnx"
    capsys.readouterr()
    assert main(["segment", "export", str(onnx_file), "--checkpoint", model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_relative_error"] < 1e-5 and report["size_range"] == {"height": [1, 8192], "width": [1, 8192]}
    session = onnx_session(onnx_file)
    for shape in [(2, 3, 33, 20), (1, 3, 100, 71), (1, 3, 1, 1)]:
        x = torch.randn(shape)
        with torch.no_grad():
            logits = loaded(x)["out"]
        found = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert found.shape == logits.shape and relative_error(found, logits) < 1e-5, shape
    described = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(described["swinkit.dense"])["classes"] == ["background", "circle", "square", "triangle"]
    program = tmp_path / "segmentor.pt2"
    assert main(["segment", "export", str(program), "--checkpoint", model, "--no-check"]) == 0
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert relative_error(load_program(program).module()(x), loaded(x)["out"]) < 1e-5
    # The exported files take the model file's place in eval and predict (explain needs the weights).
    capsys.readouterr()
    assert main([*evaluate, "--checkpoint", str(onnx_file)]) == 0
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(metrics["mIoU"], abs=0.5)
    for exported in (onnx_file, program):
        folder = tmp_path / f"predicted-{exported.suffix[1:]}"
        assert main(["segment", "predict", str(first), "--checkpoint", str(exported), "--output", str(folder)]) == 0
        written = np.asarray(Image.open(folder / f"0000_{first.stem}_labels.png"))
        expected = segment_image(loaded, spec, Image.open(first).convert("RGB")).numpy()
        assert (written == expected).mean() > 0.99, exported  # near-tied pixels may go either way
    assert main(["segment", "explain", str(first), "--checkpoint", str(onnx_file)]) == 2
    assert "explanations need the model's weights and gradients" in capsys.readouterr().err


def _config(shapes, out, **options):
    values = {
        "data": str(shapes),
        "model": "swin_test",
        "crop_size": 48,
        "scale": (64, 64),
        "channels": 16,
        "aux_channels": 8,
        "workers": 0,
        "progress": False,
        "warmup_steps": 1,
        "base_lr": 1e-3,
        "drop_path_rate": 0.1,
        "batch_size": 2,
        "epochs": 1,
        "output": str(out),
        **options,
    }
    return resolve_dense_config("segment", values)


def test_recipes_pick_the_official_schedules_and_bad_names_are_refused(shapes, tmp_path):
    segment, detect = resolve_dense_config("segment"), resolve_dense_config("detect")
    assert (segment.schedule, segment.poly_power, segment.min_lr) == ("poly", 1.0, 0.0)
    assert (detect.schedule, detect.milestones, detect.gamma) == ("step", (27, 33), 0.1)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    schedule = build_schedule(detect, optimizer, steps_per_epoch=100)  # milestones in epochs -> steps
    assert schedule.lr_at(2699) == pytest.approx(1e-4) and schedule.lr_at(2700) == pytest.approx(1e-5)
    assert build_schedule(resolve_dense_config("segment", {"epochs": 2}), optimizer, 10).lr_at(20) == 0.0
    with pytest.raises(ValueError, match="'schedule' must be one of cosine, poly, step, got 'linear'"):
        fit_dense(_config(shapes, tmp_path / "bad", schedule="linear"))


@pytest.mark.parametrize(
    "task, option, value, message",
    [
        ("segment", "batch_size", 0, "'batch_size' must be at least 1, got 0"),
        ("segment", "crop_size", 0, "'crop_size' must be at least 1, got 0"),
        ("segment", "ratio_range", (2.0, 0.5), r"'ratio_range' must be given low to high, got \(2.0, 0.5\)"),
        ("segment", "cat_max_ratio", 0.0, "'cat_max_ratio' must be above 0 and at most 1, got 0.0"),
        ("segment", "gamma", -0.1, "'gamma' must be above 0, got -0.1"),
        ("detect", "milestones", (33, 27), r"'milestones' must be given low to high, got \(33, 27\)"),
        ("detect", "min_sizes", (480, 0), r"'min_sizes' must be at least 1 each, got \(480, 0\)"),
        ("detect", "score_threshold", 1.5, "'score_threshold' must be between 0 and 1, got 1.5"),
    ],
)
def test_dense_options_out_of_range_are_refused_by_name(task, option, value, message):
    with pytest.raises(ValueError, match=f"training option {message}"):
        resolve_dense_config(task, {option: value})


def test_resume_from_a_mid_epoch_checkpoint_is_exact(shapes, tmp_path):
    reference = fit_dense(_config(shapes, tmp_path / "reference", checkpoint_every=2))
    interrupted = tmp_path / "interrupted"
    fit_dense(_config(shapes, interrupted, checkpoint_every=2, max_steps=2))
    assert torch.load(interrupted / "checkpoint-last.pt", weights_only=True)["step_in_epoch"] == 2
    resumed = fit_dense(_config(shapes, interrupted, checkpoint_every=2))
    expected, got = load_file(reference.final_model), load_file(resumed.final_model)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=0, atol=1e-6), key
    assert resumed.history[-1]["val_mIoU"] == pytest.approx(reference.history[-1]["val_mIoU"])
    with pytest.raises(ValueError, match="different options.*crop_size"):
        fit_dense(_config(shapes, interrupted, crop_size=32))


def test_torchrun_two_processes_train_with_a_bad_image(shapes, tmp_path):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(shapes), str(data)], check=True)
    (data / "images" / "training" / "training_00000.png").write_bytes(b"broken")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [
        *launch,
        "-m",
        "swinkit",
        "segment",
        "train",
        "--data",
        str(data),
        *FAST,
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--output",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["bad_images"] == 1 and np.isfinite(row["train_loss"])
    assert (tmp_path / "run" / "model-final.safetensors").is_file()
    # Rank 0 reports for the run; the other process says nothing (it said "stopped early").
    assert result.stdout.count("best val mIoU") == 1 and "stopped early" not in result.stdout, result.stdout


def _stage_map(model, images, stage):
    """The logits and stage ``stage``'s output map (channels last) of one differentiable pass."""
    maps = []
    handle = model.backbone.swin.layers[stage].register_forward_hook(lambda m, i, output: maps.append(output[0]))
    with torch.enable_grad():
        logits = model(images.detach().requires_grad_(True))["out"]
    handle.remove()
    return {"logits": logits, "map": maps[0]}


def test_seg_grad_cam_is_the_region_score_gradient_on_a_backbone_stage():
    # Seg-Grad-CAM written out: the class's logits summed over the pixels predicted as it, its gradient
    # at the stage's output map averaged per channel, the weighted channels summed, ReLU.
    from swinkit.explain import explain_segmentation

    torch.manual_seed(0)
    model = create_segmentor("swin_test", num_classes=4, channels=16, aux_channels=8).double().eval()
    for parameter in model.decode_head.parameters():
        parameter.data.normal_(0, 0.5)  # classes of different sizes, not one everywhere
    images = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    for target, stage in [(None, 1), (2, 2), ([1, 3], 0)]:
        found = explain_segmentation(model, images, target, stage)
        stage_map = _stage_map(model, images, stage)
        labels = stage_map["logits"].argmax(dim=1)
        for b in range(2):
            counts = torch.bincount(labels[b].flatten(), minlength=4)
            chosen = target[b] if isinstance(target, list) else (int(counts.argmax()) if target is None else target)
            assert found.targets[b] == chosen
            region = labels[b] == chosen
            if not region.any():
                region = torch.ones_like(region)
            score = (stage_map["logits"][b, chosen] * region).sum()
            (gradient,) = torch.autograd.grad(score, stage_map["map"], retain_graph=True)
            weights = gradient[b].mean(dim=(0, 1))
            expected = torch.relu((stage_map["map"][b] * weights).sum(dim=-1))
            assert torch.allclose(found.raw[b], expected, rtol=1e-10, atol=1e-12)
            assert torch.allclose(found.probabilities[b].double(), counts.double() / labels[b].numel())
        assert found.maps.shape == (2, 64, 80) and found.stride == 4 * 2**stage
    assert model.training is False and not model.backbone.swin.layers[1]._forward_hooks
    with pytest.raises(TypeError, match="needs a segmentation model .*, got SwinTransformer"):
        explain_segmentation(model.backbone.swin, images)
    with pytest.raises(ValueError, match=r"target must be one class in 0..3 or one per image \(2\), got 7"):
        explain_segmentation(model, images, 7)


def test_a_static_size_segment_export_takes_its_one_size_and_predict_and_eval_resize_to_it(shapes, tmp_path, capsys):
    torch.manual_seed(0)
    config = create_backbone("swin_test").config
    spec = DenseSpec("segment", config, ["a", "b", "c", "d"], head={"channels": 8, "aux": False})
    spec.inference = {"ignore_index": 255, "reduce_zero_label": False, "mode": "whole", "crop_size": 48,
                      "stride": 32, "scale": [56, 40]}  # fmt: skip
    model = build_dense_model(spec).eval()
    save_dense(model, spec, tmp_path / "model.safetensors")
    onnx_file = tmp_path / "static.onnx"
    export = ["segment", "export", str(onnx_file), "--checkpoint", str(tmp_path / "model.safetensors")]
    assert main([*export, "--static-size", "--img-size", "40x56", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size_range"] == {"height": [40, 40], "width": [56, 56]} and report["max_relative_error"] < 1e-5
    dims = onnx.load(str(onnx_file)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 40, 56]  # height and width fixed in the graph
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        expected = model(x)["out"]
    found = torch.from_numpy(onnx_session(onnx_file).run(None, {"images": x.numpy()})[0])
    assert relative_error(found, expected) < 1e-5

    exported, _ = load_dense_file(onnx_file)
    with pytest.raises(ValueError, match=r"static.onnx takes heights 40..40 and widths 56..56, got 41x56"):
        exported(torch.randn(1, 3, 41, 56))
    # predict rescales an image to the test scale (56, 40): a 112 x 80 image becomes 56 x 40 and fits.
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 112, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "predicted"
    assert main(["segment", "predict", str(image), "--checkpoint", str(onnx_file), "--output", str(out)]) == 0
    written = np.asarray(Image.open(out / "0000_scene_labels.png"))
    reference = segment_image(model, spec, Image.open(image).convert("RGB")).numpy()
    assert written.shape == (80, 112) and (written == reference).mean() > 0.99
    # An image of another shape (the test scale would make it 40 x 44) is resized to 40 x 56, as a
    # fixed-shape deployment feeds the file, and the labels back to its size: it was refused.
    tall = tmp_path / "tall.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 100, 3), dtype=np.uint8)).save(tall)
    assert main(["segment", "predict", str(tall), "--checkpoint", str(onnx_file), "--output", str(out)]) == 0
    written = np.asarray(Image.open(out / "0000_tall_labels.png"))
    p = spec.backbone.preprocessing
    squeezed = TF.normalize(
        TF.to_tensor(Image.open(tall).convert("RGB").resize((56, 40), Image.BILINEAR)), p.mean, p.std
    )
    with torch.no_grad():
        logits = resize(model(squeezed[None])["out"], (90, 100))
    assert written.shape == (90, 100) and (written == logits.argmax(1)[0].numpy()).mean() > 0.99
    with pytest.raises(ValueError, match=r"static.onnx takes 40x56 images only, which each image is resized to"):
        segment_image(exported, spec, Image.open(tall).convert("RGB"), ratios=(0.5, 1.0))
    predict = ["segment", "predict", str(tall), "--checkpoint", str(onnx_file), "--output", str(out)]
    assert main([*predict, "--test-ratios", "1", "1.5"]) == 2  # up front, not once an image
    assert "cannot test at other scales (--aug-test, --test-ratios)" in capsys.readouterr().err
    evaluate = ["segment", "eval", "--checkpoint", str(onnx_file), "--data", str(shapes), "--workers", "0", "--json"]
    capsys.readouterr()
    assert main(evaluate) == 0  # 64 x 64 scenes: refused before
    assert json.loads(capsys.readouterr().out)["images"] == 4
    assert main([*evaluate, "--aug-test"]) == 2
    assert "takes 40x56 images only, which each image is resized to" in capsys.readouterr().err


def test_a_static_size_export_at_the_slide_crop_is_fed_the_crops_as_the_model_file(tmp_path, capsys, caplog):
    # What segment export --static-size traces by default for a slide-mode model: the crop. Its
    # test feeds that size, so the file is run as the model file is (not squashed to one crop).
    torch.manual_seed(0)
    config = create_backbone("swin_test").config
    spec = DenseSpec("segment", config, ["a", "b", "c"], head={"channels": 8, "aux": False})
    spec.inference = {"ignore_index": 255, "reduce_zero_label": False, "mode": "slide", "crop_size": 32,
                      "stride": 24, "scale": [96, 64]}  # fmt: skip
    model = build_dense_model(spec).eval()
    save_dense(model, spec, tmp_path / "model.safetensors")
    static = tmp_path / "static.onnx"
    export = ["segment", "export", str(static), "--checkpoint", str(tmp_path / "model.safetensors"), "--static-size"]
    assert main([*export, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size_range"] == {"height": [32, 32], "width": [32, 32]}
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "predicted"
    with caplog.at_level("WARNING"):
        assert main(["segment", "predict", str(image), "--checkpoint", str(static), "--output", str(out)]) == 0
    assert "resize each image" not in caplog.text
    written = np.asarray(Image.open(out / "0000_scene_labels.png"))
    reference = segment_image(model, spec, Image.open(image).convert("RGB")).numpy()
    assert (written == reference).mean() > 0.999
    ratios = ["--test-ratios", "1", "1.25", "--output", str(tmp_path / "ratios")]
    assert main(["segment", "predict", str(image), "--checkpoint", str(static), *ratios]) == 0  # crops again
