"""Bad input to the dense metrics and the segmentation / test-augmentation API: refused by name,
never scored or averaged into a wrong number."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import swinkit
from helpers import TINY_DETECTOR
from swinkit import create_model
from swinkit.dense import (
    CocoDetection,
    SegmentationConfig,
    SegmentationFolder,
    View,
    augmented_views,
    build_segmentor,
    coco_map,
    confusion_matrix,
    create_backbone,
    create_detector,
    create_segmentor,
    detect_augmented,
    infer,
    infer_augmented,
    segmentation_loss,
    segmentation_scores,
)
from swinkit.dense.shapes import write_shapes_dataset
from swinkit.predict import expand_inputs

NAN = float("nan")
GROUND_TRUTH = {
    "images": [{"id": 1, "width": 100, "height": 100}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "area": 400, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a"}],
}


def _result(**changes):
    return {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9, **changes}


def test_coco_map_refuses_results_pycocotools_would_score_wrongly():
    # pycocotools matches a NaN box to an object (its IoU fails `iou < threshold`): two of them scored AP 100.
    with pytest.raises(ValueError, match=r"results\[1\]: bbox \[nan, nan, nan, nan\] must be 4 finite numbers"):
        coco_map(GROUND_TRUTH, [_result(), _result(bbox=[NAN] * 4)])
    with pytest.raises(ValueError, match=r"results\[0\]: score nan is not a finite number"):
        coco_map(GROUND_TRUTH, [_result(score=NAN)])
    with pytest.raises(ValueError, match=r"results\[0\]: image_id 7 is not one of ground_truth's images"):
        coco_map(GROUND_TRUTH, [_result(image_id=7)])  # was pycocotools' bare AssertionError
    with pytest.raises(ValueError, match=r"results\[0\] has no 'score'"):
        coco_map(GROUND_TRUTH, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(ValueError, match=r"results\[0\]: bbox \[1, 1, 2\] must be 4"):
        coco_map(GROUND_TRUTH, [_result(bbox=[1, 1, 2])])
    with pytest.raises(ValueError, match="negative width or height"):
        coco_map(GROUND_TRUTH, [_result(bbox=[30, 30, -20, 20])])
    with pytest.raises(ValueError, match=r"results\[0\] has no 'segmentation'"):
        coco_map(GROUND_TRUTH, [_result()], "segm")
    with pytest.raises(TypeError, match="results must be a list of dicts"):
        coco_map(GROUND_TRUTH, _result())
    annotation = {k: v for k, v in GROUND_TRUTH["annotations"][0].items() if k != "area"}
    without_area = {**GROUND_TRUTH, "annotations": [annotation]}
    with pytest.raises(ValueError, match=r"ground_truth\['annotations'\]\[0\] has no 'area'"):
        coco_map(without_area, [_result()])
    with pytest.raises(TypeError, match="ground_truth must be COCO's JSON as a dict"):
        coco_map("instances_val.json", [_result()])
    # Valid results still score: one of the two objects found exactly.
    assert coco_map(GROUND_TRUTH, [_result()])["AP50"] == pytest.approx(50.495, abs=1e-3)


def test_confusion_matrix_refuses_labels_it_would_count_in_another_cell():
    target = torch.tensor([[0, 1, 2, 255]])
    # Prediction 3 of 3 classes landed in cell (1, 0): target * K + prediction overflowed into the next row.
    with pytest.raises(ValueError, match=r"prediction holds class 3, outside 0..2 \(num_classes=3\)"):
        confusion_matrix(torch.tensor([[3, 1, 2, 0]]), target, 3)
    with pytest.raises(ValueError, match="prediction holds class -1"):
        confusion_matrix(torch.tensor([[-1, 1, 2, 0]]), target, 3)
    with pytest.raises(ValueError, match="target holds class 5, outside 0..2 or ignore_index 255"):
        confusion_matrix(torch.tensor([[0, 0]]), torch.tensor([[5, 0]]), 3)
    with pytest.raises(TypeError, match="integer class labels, got torch.float32"):
        confusion_matrix(torch.rand(1, 4), target, 3)
    with pytest.raises(ValueError, match=r"prediction \(1, 3, 1, 4\) and target \(1, 4\) differ in shape"):
        confusion_matrix(torch.zeros(1, 3, 1, 4, dtype=torch.long), target, 3)
    assert confusion_matrix(torch.tensor([[0, 1, 1, 2]]), target, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_segmentation_scores_take_only_a_square_matrix_of_counts():
    with pytest.raises(ValueError, match=r"square \(K, K\) matrix of counts, got shape \(2, 3\)"):
        segmentation_scores(torch.ones(2, 3))
    with pytest.raises(ValueError, match="negative or non-finite"):
        segmentation_scores(-torch.eye(2))  # gave mIoU 102.5
    with pytest.raises(ValueError, match="3 class_names for a 2-class confusion matrix"):
        segmentation_scores(torch.eye(2), ["a", "b", "c"])
    assert segmentation_scores(np.array([[3, 1], [0, 4]]))["aAcc"] == pytest.approx(87.5)  # numpy is taken


def test_an_ignore_index_that_is_a_class_is_refused(tmp_path):
    # With ignore_index 1 of 3 classes, class 1 silently left the loss and the metrics.
    with pytest.raises(ValueError, match=r"ignore_index 1 is one of the 3 classes \(0..2\)"):
        SegmentationConfig(num_classes=3, ignore_index=1)
    root = write_shapes_dataset(tmp_path, {"training": 1}, size=32)
    images, masks = root / "images" / "training", root / "annotations" / "training"
    with pytest.raises(ValueError, match="ignore_index 0 is one of the 4 classes"):
        SegmentationFolder(images, masks, 4, ignore_index=0)
    with pytest.raises(ValueError, match="reduce_zero_label must be True or False, got 'no'"):
        SegmentationFolder(images, masks, 4, reduce_zero_label="no")
    assert len(SegmentationFolder(images, masks, 4, ignore_index=255)) == 1
    SegmentationConfig(num_classes=3, ignore_index=-1)  # outside the classes: fine
    # From Python too: the loss and the confusion matrix took it (class 1's row and column all 0).
    outputs, labels = {"out": torch.randn(1, 3, 8, 8)}, torch.randint(0, 3, (1, 8, 8))
    for refused in (
        lambda: segmentation_loss(outputs, labels, ignore_index=1),
        lambda: confusion_matrix(labels, labels, 3, ignore_index=1),
    ):
        with pytest.raises(ValueError, match=r"ignore_index 1 is one of the 3 classes \(0..2\)"):
            refused()
    assert segmentation_loss(outputs, labels, ignore_index=-1) > 0
    assert confusion_matrix(labels, labels, 3, ignore_index=3).trace() == 64
    # A 0-d integer tensor (as a batch or a metric may hold it) is taken as its value, checked alike.
    labels[0, 0, :2] = 255
    for index in (255, torch.tensor(255), np.int64(255)):
        assert confusion_matrix(labels, labels, 3, ignore_index=index).sum() == 62
        assert segmentation_loss(outputs, labels, ignore_index=index) == segmentation_loss(outputs, labels)
    with pytest.raises(ValueError, match=r"ignore_index 1 is one of the 3 classes"):
        confusion_matrix(labels, labels, 3, ignore_index=torch.tensor(1))
    for bad in (torch.tensor(255.0), torch.tensor([255]), 255.0):
        with pytest.raises(ValueError, match="ignore_index must be an int, got"):
            confusion_matrix(labels, labels, 3, ignore_index=bad)


@pytest.fixture(scope="module")
def segmentor():
    return create_segmentor("swin_test", 4, channels=16, aux_channels=8).eval()


def test_segmentation_inference_refuses_views_of_other_batches_and_other_models(segmentor):
    x = torch.rand(1, 3, 64, 64)
    # Batch 1 and batch 3 broadcast into a (3, K, H, W) "average".
    with pytest.raises(ValueError, match=r"they have batch sizes \[1, 3\]"):
        infer_augmented(segmentor, [x, torch.rand(3, 3, 32, 32)], (64, 64))
    with pytest.raises(TypeError, match="views must be a list of .* got Tensor"):
        infer_augmented(segmentor, x, (64, 64))
    with pytest.raises(ValueError, match=r"size must be \(height, width\).*got 70"):
        infer_augmented(segmentor, [x], 70)
    with pytest.raises(ValueError, match=r"images must be a \(B, C, H, W\) tensor, got shape \(3, 64, 64\)"):
        infer(segmentor, x[0], mode="slide", crop_size=32, stride=16)
    with pytest.raises(TypeError, match="infer needs a segmentation model .* got SwinTransformer"):
        infer(create_model("swin_test", num_classes=4), x)
    assert infer_augmented(segmentor, [x, torch.rand(1, 3, 32, 32)], (64, 64), flip=True).shape == (1, 4, 64, 64)


def test_segmentation_loss_refuses_masks_that_are_not_labels_of_its_classes(segmentor):
    outputs = segmentor.train()(torch.rand(2, 3, 32, 32))
    segmentor.eval()
    masks = torch.randint(0, 4, (2, 32, 32))
    with pytest.raises(ValueError, match="masks hold label 7, neither a class \\(0..3\\) nor ignore_index 255"):
        segmentation_loss(outputs, torch.full((2, 32, 32), 7))
    with pytest.raises(ValueError, match=r"integer label maps \(B, H, W\), got torch.float32"):
        segmentation_loss(outputs, masks.float())
    with pytest.raises(ValueError, match=r"integer label maps \(B, H, W\), got torch.int64 \(2, 1, 32, 32\)"):
        segmentation_loss(outputs, masks[:, None])
    with pytest.raises(ValueError, match="1 masks for a batch of 2 images"):
        segmentation_loss(outputs, masks[:1])
    with pytest.raises(TypeError, match="a dict with 'out' logits"):
        segmentation_loss(outputs["out"], masks)
    with pytest.raises(ValueError, match="aux_weight must be 0 or more, got -1.0"):
        segmentation_loss(outputs, masks, aux_weight=-1.0)  # was the same as 0
    # uint8 label maps are taken as labels (PNG label maps are uint8).
    assert segmentation_loss(outputs, masks.byte()).item() == pytest.approx(segmentation_loss(outputs, masks).item())


def test_segmentor_and_backbone_builders_name_what_they_take():
    backbone = create_backbone("swin_test")
    for name, kwargs in (("num_classes", {"num_classes": 0}), ("channels", {"num_classes": 3, "channels": 0})):
        with pytest.raises(ValueError, match=f"{name} must be an int of 1 or more"):
            build_segmentor(backbone, **kwargs)
    with pytest.raises(ValueError, match="num_classes must be an int of 1 or more, got True"):
        build_segmentor(backbone, True)
    with pytest.raises(TypeError, match="build_segmentor needs a SwinBackbone .* got SwinTransformer"):
        build_segmentor(create_model("swin_test", num_classes=3), 3)
    with pytest.raises(ValueError, match="leave features_only out"):
        create_backbone("swin_test", features_only=False)
    with pytest.raises(ValueError, match="frozen_stages must be an int between -1 and 4, got '1'"):
        create_backbone("swin_test", frozen_stages="1")


def test_test_views_of_a_detector_are_checked_before_they_run(tmp_path):
    detector = create_detector("swin_test", 3, detector_options=TINY_DETECTOR).eval()
    with pytest.raises(ValueError, match=r"test ratios must be one or more numbers above 0, got \[0.0\]"):
        augmented_views(detector, [0.0])  # was a 1 x 1 pixel view
    with pytest.raises(TypeError, match="test ratios must be a list of numbers, got 1.0"):
        augmented_views(detector, 1.0)
    with pytest.raises(TypeError, match="augmented_views needs a detector .* got Segmentor"):
        augmented_views(create_segmentor("swin_test", 3, channels=16, aux_channels=8), [1.0])
    with pytest.raises(ValueError, match="a view's flip is True or False, got 'no'"):
        View(64, 96, "no")  # "no" would mirror
    with pytest.raises(ValueError, match="whole pixels"):
        View(True, 96)
    with pytest.raises(TypeError, match="views are View objects"):
        detect_augmented(detector, torch.rand(3, 64, 64), [(64, 96)])
    with pytest.raises(ValueError, match="masks must be True or False"):
        CocoDetection(tmp_path / "never-read.json", masks="no")


def test_image_inputs_are_paths_not_other_objects():
    with pytest.raises(TypeError, match="a path or a list of paths, got Tensor"):
        expand_inputs(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="paths of image files or folders, got a int"):
        expand_inputs([3])
    samples = sorted((Path(swinkit.__file__).parent / "assets" / "samples").glob("*.png"))
    assert expand_inputs(path for path in samples) == samples  # a generator (Path.glob's) is a list of paths


def test_dense_options_built_in_python_check_their_schedule():
    with pytest.raises(ValueError, match="'schedule' must be one of cosine, poly, step, got 'linear'"):
        SegmentationConfig(schedule="linear")  # was found only when the run built its schedule


def test_a_file_written_from_a_preset_spec_predicts(tmp_path):
    # A preset's spec had no test settings: predict failed with KeyError: 'scale'.
    from PIL import Image

    from swinkit.dense import predict_dense, save_dense
    from swinkit.dense.weights import build_dense_model, preset_spec

    spec = preset_spec("swin_test", "upernet", 3)
    assert spec.inference["scale"] == [2048, 512] and not spec.inference["reduce_zero_label"]  # not ADE20K's 150
    spec.inference["scale"] = [64, 64]  # a small test scale keeps the test quick; the other keys stay
    save_dense(build_dense_model(spec).eval(), spec, tmp_path / "segmentor.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (result,) = predict_dense(tmp_path / "a.png", tmp_path / "segmentor.safetensors", tmp_path / "out")
    assert sum(result["class_fractions"].values()) == pytest.approx(1.0)
    assert preset_spec("swin_test", "mask_rcnn").inference["category_ids"][-1] == 90  # COCO's ids


def test_a_dense_file_with_bad_test_settings_or_non_finite_weights_is_refused_by_name(tmp_path):
    # A detector with fewer category ids than classes failed at its first detection of the last
    # class (IndexError); a bad segmentation mode or scale was an error for every image (exit 1),
    # and NaN weights predicted as if nothing were wrong.
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from swinkit.checkpoint import CheckpointError
    from swinkit.dense import load_dense, save_dense
    from swinkit.dense.weights import DenseSpec, build_dense_model, preset_spec

    spec = preset_spec("swin_test", "upernet", 3)
    save_dense(build_dense_model(spec).eval(), spec, tmp_path / "segmentor.safetensors")
    with safe_open(str(tmp_path / "segmentor.safetensors"), framework="pt") as file:
        weights, metadata = {key: file.get_tensor(key) for key in file.keys()}, file.metadata()  # noqa: SIM118
    stored = json.loads(metadata["swinkit_dense"])
    for name, inference, message in [
        ("mode", {"mode": "banana"}, "mode must be 'whole' or 'slide', got 'banana'"),
        ("scale", {"scale": "big"}, r"scale must be 2 positive numbers \(long side, short side\) or null, got 'big'"),
        ("crop", {"crop_size": 0}, "crop_size must be a whole number of pixels of 1 or more, got 0"),
    ]:
        edited = {**stored, "inference": {**stored["inference"], **inference}}
        save_file(weights, tmp_path / f"{name}.safetensors", {**metadata, "swinkit_dense": json.dumps(edited)})
        with pytest.raises(CheckpointError, match=rf"{name}\.safetensors: the dense model description .* {message}"):
            load_dense(tmp_path / f"{name}.safetensors")
    # A null scale (each image at its own size, as segment train's --help documents) is valid.
    own_size = {**stored, "inference": {**stored["inference"], "scale": None}}
    save_file(weights, tmp_path / "own.safetensors", {**metadata, "swinkit_dense": json.dumps(own_size)})
    assert load_dense(tmp_path / "own.safetensors")[1].inference["scale"] is None
    detector = preset_spec("swin_test", "mask_rcnn", 3)
    for ids in ([1, 2], [1, 1, 2], [1, 2, "3"]):
        with pytest.raises(ValueError, match=r"category_ids must be 3 distinct whole numbers, one per class"):
            DenseSpec(
                "detect", detector.backbone, detector.classes, head=detector.head, inference={"category_ids": ids}
            )
    broken = dict(weights)
    key = next(key for key in broken if key.startswith("decode_head") and key.endswith("weight"))
    broken[key] = torch.full_like(broken[key], float("nan"))
    save_file(broken, tmp_path / "nan.safetensors", metadata)
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors: non-finite values .* in {re.escape(key)}"):
        load_dense(tmp_path / "nan.safetensors")
