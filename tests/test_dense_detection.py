"""Detection / instance segmentation: COCO mAP by hand, annotation validation, a training step, the CLI."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.ops import box_iou, clip_boxes_to_image

from helpers import TINY_DETECTOR
from swinkit.cli import main
from swinkit.data import BadItem
from swinkit.dense import CocoDetection, DenseSpec, coco_map, create_detector, load_dense, predict_dense, save_dense
from swinkit.dense.cascade import CascadeRoIHeads, _box_losses, _sample
from swinkit.dense.detection_data import DetectionTrainTransform, compressed_counts, flip_target, resize_and_crop
from swinkit.dense.export import export_segmentation
from swinkit.dense.metrics import mask_to_rle
from swinkit.dense.mmdet import AlignedRoIPool
from swinkit.dense.shapes import write_shapes_dataset
from swinkit.train.optim import build_optimizer

TINY = TINY_DETECTOR
FAST = ["--model", "swin_test", "--min-sizes", "64", "--max-size", "96", "--fpn-channels", "16", "--box-head-dim",
        "32", "--mask-head-dim", "8", "--roi-batch-size", "64", "--anchor-sizes", "16", "32", "64", "128", "256",
        "--workers", "0", "--no-progress", "--warmup-steps", "1", "--base-lr", "1e-3"]  # fmt: skip


def _rectangle(x, y, w, h, size=64):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _truth(ident, image_id, category_id, x, y, w, h):
    mask = mask_to_rle(_rectangle(x, y, w, h))
    return {"id": ident, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h], "area": w * h,
            "iscrowd": 0, "segmentation": mask}  # fmt: skip


def _result(image_id, category_id, box, score, mask_box):
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score,
            "segmentation": mask_to_rle(_rectangle(*mask_box))}  # fmt: skip


def test_coco_map_matches_a_hand_computed_example():
    ground_truth = {
        "images": [{"id": 1, "width": 64, "height": 64}, {"id": 2, "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            _truth(1, 1, 1, 0, 0, 10, 10),
            _truth(2, 2, 1, 20, 20, 10, 10),
            _truth(3, 1, 2, 30, 30, 10, 10),
        ],
    }
    results = [
        # Class a: a hit (score 0.9), a false positive (0.8), a hit (0.7); masks equal to the boxes.
        _result(1, 1, [0, 0, 10, 10], 0.9, (0, 0, 10, 10)),
        _result(2, 1, [50, 50, 10, 10], 0.8, (50, 50, 10, 10)),
        _result(2, 1, [20, 20, 10, 10], 0.7, (20, 20, 10, 10)),
        # Class b: box IoU 0.64 (a hit at thresholds 0.50, 0.55, 0.60), mask IoU 0.72 (0.50 .. 0.70).
        _result(1, 2, [30, 30, 10, 6.4], 0.6, (30, 30, 9, 8)),
    ]
    # Class a: precision 1 up to recall 0.5, then 2/3 up to recall 1; COCO's 101-point interpolation.
    a = (51 * 1.0 + 50 * 2 / 3) / 101
    boxes = coco_map(ground_truth, results, "bbox")
    assert boxes["AP"] == pytest.approx((a + 3 / 10) / 2 * 100)
    assert boxes["AP50"] == pytest.approx((a + 1) / 2 * 100) and boxes["AP75"] == pytest.approx(a / 2 * 100)
    assert boxes["APs"] == pytest.approx(boxes["AP"]) and boxes["APm"] == boxes["APl"] == 0.0
    masks = coco_map(ground_truth, results, "segm")
    assert masks["AP"] == pytest.approx((a + 5 / 10) / 2 * 100)
    assert coco_map(ground_truth, [], "bbox")["AP"] == 0.0
    with pytest.raises(ValueError, match="'bbox' or 'segm'"):
        coco_map(ground_truth, results, "keypoints")


def _polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture
def messy_coco(tmp_path):
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(tmp_path / "good.png")
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(tmp_path / "resized.png")
    data = {
        "images": [
            {"id": 1, "file_name": "good.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "missing.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "resized.png", "width": 50, "height": 50},
            {"id": 4, "file_name": "no_size.png"},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "segmentation": _polygon(2, 3, 10, 8)},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [35, 25, 10, 10],
                "segmentation": _polygon(35, 25, 5, 5),
            },
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "segmentation": _polygon(0, 0, 2, 2)},
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "segmentation": _polygon(2, 3, 10, 8)},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5], "segmentation": _polygon(1, 1, 1, 5)},
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [20, 5, 6, 6], "segmentation": []},
            {"id": 7, "image_id": 99, "category_id": 1, "bbox": [2, 3, 10, 8]},
            {
                "id": 8,
                "image_id": 1,
                "category_id": 3,
                "bbox": [0, 0, 40, 30],
                "iscrowd": 1,
                "segmentation": mask_to_rle(np.ones((30, 40), np.uint8)),
            },
            {"id": 9, "image_id": 1, "category_id": 3, "bbox": "abc"},
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [float("nan"), 0, 4, 4]},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return tmp_path / "instances.json"


def test_coco_annotations_are_validated_repaired_and_reported(messy_coco, caplog):
    with caplog.at_level("WARNING"):
        dataset = CocoDetection(messy_coco)
    assert dataset.classes == ["dog", "cat"] and dataset.category_ids == [1, 3]
    assert dict(dataset.problems.counts) == {
        "invalid image entries": 1,
        "boxes clipped to the image": 1,
        "boxes outside the image": 1,
        "unknown category ids": 1,
        "empty or non-finite boxes": 2,
        "empty or missing masks": 1,
        "annotations of unknown images": 1,
        "malformed boxes": 1,
    }
    assert "unknown category ids (e.g. annotation 4: category_id 7)" in caplog.text
    image, target = dataset[0]
    assert image.size == (40, 30) and target["labels"].tolist() == [2, 1]
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [35, 25, 40, 30]]
    assert target["masks"].shape == (2, 30, 40) and target["masks"][1].sum() > 0
    assert isinstance(dataset[1], BadItem) and "missing image" in dataset[1].reason
    assert "missing.png (image id 2 of" in dataset[1].reason
    assert "is 40x30, the annotation file says 50x50" in dataset[2].reason
    truth = dataset.ground_truth()
    assert [a["iscrowd"] for a in truth["annotations"]] == [0, 0, 1]
    assert truth["annotations"][1]["bbox"] == [35, 25, 5, 5]
    # Without masks, an instance without one is still a box.
    assert CocoDetection(messy_coco, masks=False).target(0)["labels"].tolist() == [2, 1, 1]
    with pytest.raises(ValueError, match="missing image .*missing.png"):
        CocoDetection(messy_coco, strict=True)[1]


def test_training_leaves_out_images_without_annotations_or_under_32_pixels_as_mmdet_does(tmp_path, caplog):
    # mmdet's CocoDataset(filter_empty_gt=True): an image stays if an annotation of a listed category
    # names it, even a crowd region or an unusable box; images without one are left out.
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 2, "image_id": 3, "category_id": 1, "bbox": [0, 0, 20, 20], "iscrowd": 1},
        {"id": 3, "image_id": 4, "category_id": 1, "bbox": [5, 5, 0, 4]},  # an empty box
        {"id": 4, "image_id": 5, "category_id": 9, "bbox": [2, 2, 10, 10]},  # a category not listed
    ]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in range(1, 7)],
            "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(data))
    for i in range(1, 7):  # only looked for (a folder holding none of the files is refused), never read
        (tmp_path / f"{i}.png").touch()
    kept = CocoDetection(tmp_path / "instances.json", masks=False)
    assert [record.id for record in kept.records] == [1, 2, 3, 4, 5, 6]  # evaluation keeps every image
    with caplog.at_level("INFO"):
        filtered = CocoDetection(tmp_path / "instances.json", masks=False, filter_empty=True)
    assert [record.id for record in filtered.records] == [1, 3, 4]
    assert "3 of 6 images have no annotation and are left out of training" in caplog.text
    # mmdet's other filter of the same function: training images under 32 pixels a side.
    data["images"][2]["width"] = data["images"][3]["height"] = 31
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with caplog.at_level("INFO"):
        filtered = CocoDetection(tmp_path / "instances.json", masks=False, filter_empty=True, min_side=32)
    assert [record.id for record in filtered.records] == [1]
    assert "2 of 3 images have a side under 32 pixels and are left out of training" in caplog.text
    kept = CocoDetection(tmp_path / "instances.json", masks=False, min_side=32)
    assert [record.id for record in kept.records] == [1, 2, 5, 6]
    data["annotations"] = []
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match="instances.json: none left to train on: all 6 of its images have no annotation"
    ):
        CocoDetection(tmp_path / "instances.json", masks=False, filter_empty=True)
    with pytest.raises(ValueError, match="none left to train on: all 6 of its images have a side under 64 pixels"):
        CocoDetection(tmp_path / "instances.json", masks=False, min_side=64)


def test_broken_annotation_files_are_errors_naming_the_problem(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="a.json is not valid JSON"):
        CocoDetection(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"images": [], "annotations": {}, "categories": []}))
    with pytest.raises(ValueError, match="key 'annotations' must be a list, got dict"):
        CocoDetection(tmp_path / "b.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        CocoDetection(tmp_path / "missing.json")


def _grey_images(folder, names_and_levels, size=(40, 30)):
    for name, level in names_and_levels:
        Image.fromarray(np.full((size[1], size[0], 3), level, np.uint8)).save(folder / name)


def _one_image_coco(path, segmentations: dict, crowd: set) -> None:
    """A COCO file at ``path`` of one 40x30 image ``a.png`` with one box annotation per segmentation
    (its key the id; crowd regions the ids in ``crowd``), all of category 1."""
    annotations = [
        {"id": i, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "iscrowd": int(i in crowd), "segmentation": s}
        for i, s in segmentations.items()
    ]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], "annotations": annotations,
            "categories": [{"id": 1, "name": "box"}]}  # fmt: skip
    path.write_text(json.dumps(data))


def test_rle_masks_not_of_their_image_are_left_out_and_named(tmp_path, caplog):
    # pycocotools decodes an RLE of another size, or whose counts do not cover the image, into
    # memory it never wrote (values up to 240 as "mask" targets: a negative mask loss); a malformed
    # compressed one stopped training with "Invalid RLE mask representation", naming nothing.
    _grey_images(tmp_path, [("a.png", 90)])  # 40 wide, 30 tall: COCO's RLE size is [30, 40]
    rectangle = np.zeros((30, 40), np.uint8)
    rectangle[3:11, 2:12] = 1
    small = mask_to_rle(np.ones((10, 10), np.uint8))
    segmentations = {
        1: mask_to_rle(rectangle),  # compressed, right: kept
        2: {"counts": [40, 20, 1140], "size": [30, 40]},  # uncompressed, right: column 1, rows 10..29
        3: {"counts": [5, 5], "size": [10, 10]},  # the audit's: a 10x10 RLE on a 40x30 image
        4: {**mask_to_rle(rectangle), "size": [40, 30]},  # width and height swapped
        5: {"counts": [5, 5], "size": [30, 40]},  # counts cover 10 of 1200 pixels
        6: {"counts": "garbage!!", "size": [30, 40]},  # not a compressed RLE
        7: {**small, "size": [30, 40]},  # a compressed RLE of 100 pixels
        8: {"counts": [0, 1300, -100], "size": [30, 40]},  # a negative run
        9: {"counts": [5, 5], "size": [10, 10]},  # a crowd region: left out of evaluation too
        10: mask_to_rle(np.ones((30, 40), np.uint8)),  # a crowd region, right: kept
    }
    _one_image_coco(tmp_path / "rle.json", segmentations, crowd={9, 10})
    with caplog.at_level("WARNING"):
        dataset = CocoDetection(tmp_path / "rle.json")
    assert dict(dataset.problems.counts) == {"invalid RLE masks": 7}
    assert "annotation 3: RLE size [10, 10] is not its image's [30, 40]" in caplog.text
    assert "annotation 4: RLE size [40, 30] is not its image's [30, 40]" in caplog.text
    assert "annotation 5: RLE counts add up to 10 pixels, its image has 1200 (30x40)" in caplog.text
    assert "annotation 6: RLE counts 'garbage!!' are not COCO's compressed RLE" in caplog.text
    assert "annotation 7: RLE counts add up to 100 pixels, its image has 1200 (30x40)" in caplog.text
    _, target = dataset[0]  # the mask targets are the two right masks, 0 or 1 everywhere
    expected = np.zeros((30, 40), np.uint8)
    expected[10:, 1] = 1
    assert target["masks"].shape == (2, 30, 40)
    assert np.array_equal(target["masks"][0].numpy(), rectangle) and np.array_equal(target["masks"][1], expected)
    truth = dataset.ground_truth()  # what evaluation scores against: the same three
    assert [(a["iscrowd"], a["segmentation"]["size"]) for a in truth["annotations"]] == [(0, [30, 40])] * 2 + [
        (1, [30, 40])
    ]
    found = [{"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "score": score, "segmentation": mask_to_rle(m)}
             for m, score in ((rectangle, 0.9), (expected, 0.8))]  # fmt: skip
    assert coco_map(truth, found, "segm")["AP"] == pytest.approx(100.0)  # no object left unfound
    # A box detector does not read masks: every box is trained on.
    assert len(CocoDetection(tmp_path / "rle.json", masks=False).target(0)["labels"]) == 8


def test_polygons_with_non_finite_or_far_away_coordinates_are_left_out_and_named(tmp_path, caplog):
    # pycocotools rasterises a polygon in memory proportional to its coordinates' range: one NaN or
    # 1e7 coordinate asked for ~23 GB and the process was killed without a word. Checked before it.
    from swinkit.dense.detection_data import InvalidPolygonError, check_polygon

    _grey_images(tmp_path, [("a.png", 90)])  # 40 wide, 30 tall
    segmentations = {
        1: [[2, 3, 12, 3, 12, 11, 2, 11]],  # right: kept
        2: [[-10, -5, 70, -5, 70, 50]],  # partly outside, within an image size: kept, clipped by pycocotools
        3: [[1, 1, 5, 5, float("nan"), 3]],
        4: [[1, 1, 5, 5, 1e7, 3]],
        5: [[1, 1, 5, 5, 3, float("-inf")]],
        6: [[2, 3, 12, 3, 12, 11], [1, 1, 5, "x", 3, 3]],  # one bad polygon of two: the mask is not what was drawn
        7: [[1, 1, 5, 5, float("inf"), 3]],  # a crowd region: left out of evaluation too
    }
    _one_image_coco(tmp_path / "poly.json", segmentations, crowd={7})  # json writes and reads NaN and Infinity
    with caplog.at_level("WARNING"):
        dataset = CocoDetection(tmp_path / "poly.json")
    assert dict(dataset.problems.counts) == {"invalid polygons": 5}
    assert "poly.json" in caplog.text
    assert "annotation 3: polygon coordinate 4 is nan, not a finite number" in caplog.text
    assert "annotation 4: polygon coordinate 4 (x = 10000000.0) is far outside its 40x30 image" in caplog.text
    assert "annotation 6: polygon coordinate 3 is 'x', not a finite number" in caplog.text
    _, target = dataset[0]
    assert target["masks"].shape == (2, 30, 40) and target["masks"][1].sum() > 0
    assert [a["id"] for a in dataset.ground_truth()["annotations"]] == [1, 2]
    assert len(CocoDetection(tmp_path / "poly.json", masks=False).target(0)["labels"]) == 6  # boxes only: all
    with pytest.raises(InvalidPolygonError, match=r"coordinate 1 \(y = -31\) is far outside .*accepted: -30 to 60"):
        check_polygon([0, -31, 5, 5, 3, 3], 30, 40)
    check_polygon([-40, -30, 80, 60, 0, 0], 30, 40)  # the margin's edges


def test_list_or_object_ids_are_reported_as_bad_entries_naming_the_key(tmp_path, caplog):
    # They stopped the command with "error: unhashable type: 'list'", naming neither the file nor the key.
    _grey_images(tmp_path, [("a.png", 90), ("b.png", 90)])
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": [2], "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8]},
            {"id": 2, "image_id": [1], "category_id": 1, "bbox": [2, 3, 10, 8]},
            {"id": 3, "image_id": 1, "category_id": {"id": 1}, "bbox": [2, 3, 10, 8]},
        ],
        "categories": [{"id": 1, "name": "box"}],
    }
    (tmp_path / "ids.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        dataset = CocoDetection(tmp_path / "ids.json", masks=False)
    assert dict(dataset.problems.counts) == {
        "invalid image entries": 1,
        "annotations of unknown images": 1,
        "unknown category ids": 1,
    }
    assert "ids.json" in caplog.text and "invalid image entries (e.g. image id [2])" in caplog.text
    assert "annotation 2: image_id [1]" in caplog.text and "annotation 3: category_id {'id': 1}" in caplog.text
    assert [record.id for record in dataset.records] == [1] and dataset.target(0)["labels"].tolist() == [1]
    # "iscrowd": "0" (a string, so true) made a region never trained on; category_id true was read as 1.
    data["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "iscrowd": "0"},
        {"id": 3, "image_id": 1, "category_id": True, "bbox": [2, 3, 10, 8]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "iscrowd": 1},
    ]
    (tmp_path / "flags.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        dataset = CocoDetection(tmp_path / "flags.json", masks=False)
    counts = {"invalid image entries": 1, "invalid iscrowd values": 1, "unknown category ids": 1}  # image [2] too
    assert dict(dataset.problems.counts) == counts
    assert "annotation 2: iscrowd '0' (accepted: 0 or 1)" in caplog.text and "category_id True" in caplog.text
    assert len(dataset.records[0].annotations) == 1 and len(dataset.records[0].crowd) == 1
    # Two categories of one id: the objects went to one name and the other was never trained.
    data["categories"] = [{"id": 1, "name": "box"}, {"id": 1, "name": "circle"}, {"id": 2, "name": "dot"}]
    (tmp_path / "repeated.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"repeated\.json: categories repeat the ids \[1\]; each category needs"):
        CocoDetection(tmp_path / "repeated.json", masks=False)


def test_compressed_rle_counts_are_read_as_pycocotools_writes_them():
    generator = np.random.default_rng(0)
    for height, width, fill in [(1, 1, 1.0), (30, 40, 0.0), (30, 40, 1.0), (57, 13, 0.3), (64, 64, 0.02)]:
        mask = (generator.random((height, width)) < fill).astype(np.uint8)
        counts = compressed_counts(mask_to_rle(mask)["counts"])
        runs = np.concatenate([np.full(run, i % 2, np.uint8) for i, run in enumerate(counts)])
        assert np.array_equal(runs.reshape(width, height).T, mask)  # runs down the columns, from 0s
    big = np.zeros((1000, 1000), np.uint8)
    big[500:, 300:] = 1  # runs of 500 and more: values written in several characters
    assert compressed_counts(mask_to_rle(big)["counts"]) == [300 * 1000 + 500] + [500] * 1399
    for text in ["garbage!!", "é0", "P", "@"]:  # outside the 64 characters, not ASCII, a run cut off, negative
        assert compressed_counts(text) is None, text


class _Oracle(torch.nn.Module):
    """A detector that finds each image's object exactly: the box is looked up by the image's grey level."""

    def __init__(self, boxes):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.boxes = boxes

    def forward(self, images):
        found = [self.boxes[round(image[0, 0, 0].item() * 255)] for image in images]
        one = torch.ones(1, dtype=torch.int64)
        return [
            {"boxes": torch.tensor([box], dtype=torch.float32), "scores": one.float(), "labels": one} for box in found
        ]


def test_unreadable_images_are_left_out_of_the_scores(tmp_path, caplog):
    # A missing and an undecodable image: nothing is detected in them, so their objects counted as
    # missed and lowered the AP of a detector that finds every object of the images it sees.
    from torch.utils.data import DataLoader

    from swinkit.dense.commands import summarise_metrics
    from swinkit.dense.data import Transformed, collate_lists
    from swinkit.dense.detection import evaluate_detection
    from swinkit.dense.detection_data import detection_eval_transform

    _grey_images(tmp_path, [("a.png", 10), ("b.png", 20)])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    names = ["a.png", "b.png", "ghost.png", "broken.png"]
    images = [{"id": i, "file_name": name, "width": 40, "height": 30} for i, name in enumerate(names, start=1)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [i, 2, 20, 10]} for i in range(1, 5)]
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path / "gt.json", masks=False)
    loader = DataLoader(Transformed(dataset, detection_eval_transform), batch_size=2, collate_fn=collate_lists)
    with caplog.at_level("WARNING"):
        scores = evaluate_detection(_Oracle({10: [1, 2, 21, 12], 20: [2, 2, 22, 12]}), loader, dataset)
    assert scores["bbox_AP"] == pytest.approx(100.0) and scores["bad_images"] == 2
    assert "skipping missing image" in caplog.text and "ghost.png (image id 3 of" in caplog.text
    assert "skipping cannot decode image" in caplog.text and "broken.png" in caplog.text
    left_out = dataset.ground_truth(left_out=[dataset.records[2].path, dataset.records[3].path])
    assert [image["id"] for image in left_out["images"]] == [1, 2]
    assert [a["image_id"] for a in left_out["annotations"]] == [1, 2]
    summary = summarise_metrics({**scores, "images": 2})
    assert summary.endswith("(2 images, 2 unreadable, left out of the scores with their annotations)")


def test_a_wrong_image_folder_is_named_and_missing_images_are_called_missing(shapes, tmp_path, capsys, caplog):
    annotations = shapes / "instances_validation.json"
    wrong = shapes / "images" / "training"  # a folder, but not the one holding these images
    listed = r"none of the 4 images .*instances_validation.json lists \(e.g. validation_00000.png\) is in "
    with pytest.raises(FileNotFoundError, match=listed + r".*training: is --images \(or --val-images\) the folder"):
        CocoDetection(annotations, wrong)
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere does not exist \(.* lists 4 images"):
        CocoDetection(annotations, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"is in .*, the JSON file's folder: give the folder holding them"):
        CocoDetection(annotations)
    # The CLI says so, not that each image "cannot decode" and then that none could be read.
    model = create_detector("swin_test", 3, detector_options=TINY).eval()
    spec = DenseSpec("detect", model.backbone.body.config, ["circle", "square", "triangle"],
                     head={**TINY, "masks": True}, inference={"category_ids": [1, 2, 3]})  # fmt: skip
    save_dense(model, spec, tmp_path / "detector.safetensors")
    evaluate = ["detect", "eval", "--checkpoint", str(tmp_path / "detector.safetensors"), "--workers", "0"]
    assert main([*evaluate, "--data", str(annotations), "--images", str(wrong)]) == 2
    error = capsys.readouterr().err
    assert "none of the 4 images" in error and "is --images" in error and "cannot decode" not in error
    # One missing image: called missing, left out of the scores, and counted in the summary.
    data = json.loads(annotations.read_text())
    data["images"].append({"id": 77, "file_name": "ghost.png", "width": 64, "height": 64})
    data["annotations"].append({**data["annotations"][0], "id": 777, "image_id": 77})
    (tmp_path / "ghost.json").write_text(json.dumps(data))
    images = ["--images", str(shapes / "images" / "validation")]
    with caplog.at_level("WARNING"):
        assert main([*evaluate, "--data", str(tmp_path / "ghost.json"), *images]) == 0
    assert "skipping missing image" in caplog.text and "ghost.png (image id 77 of" in caplog.text
    assert "(4 images, 1 unreadable, left out of the scores with their annotations)" in capsys.readouterr().out


def test_an_image_too_elongated_for_the_test_scale_is_a_clear_error(tmp_path):
    # 2 x 900 at shorter side 64, longer at most 96: the height rounds to 0 pixels (either geometry).
    for geometry in ("torchvision", "mmdet"):
        model = create_detector("swin_test", 3, detector_options={**TINY, "geometry": geometry}).eval()
        with pytest.raises(
            ValueError, match=r"an image of 2x900 resizes to 0x96 at the detector's scale \(shorter side 64"
        ):
            model([torch.rand(3, 2, 900)])
    assert model([torch.rand(3, 5, 900)])[0]["boxes"].shape[1] == 4  # resized to 1 x 96: still runs
    # `swinkit detect predict` reports such an image and goes on with the others.
    head = {**TINY, "masks": True, "geometry": "mmdet"}
    spec = DenseSpec(
        "detect", model.backbone.body.config, ["a", "b", "c"], head=head, inference={"category_ids": [1, 2, 3]}
    )
    save_dense(model, spec, tmp_path / "detector.safetensors")
    for name, size in (("thin.png", (900, 2)), ("fine.png", (96, 64))):
        Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8)).save(tmp_path / name)
    paths = [tmp_path / "thin.png", tmp_path / "fine.png"]
    results = predict_dense(paths, tmp_path / "detector.safetensors", tmp_path / "out")
    assert "an image of 2x900 resizes to 0x96" in results[0]["error"] and "detections" in results[1]
    assert "(sizes are height x width, in pixels)" in results[0]["error"]  # 900 wide, 2 tall: which is which


def test_an_image_too_elongated_for_the_detector_is_left_out_of_eval_and_training(shapes, tmp_path, capsys, caplog):
    # It stopped detect eval and detect train, and train's error named every file of its batch.
    import shutil

    images = tmp_path / "images"
    shutil.copytree(shapes / "images" / "validation", images)
    Image.fromarray(np.full((2, 900, 3), 128, dtype=np.uint8)).save(images / "thin.png")
    data = json.loads((shapes / "instances_validation.json").read_text())
    data["images"].append({"id": 77, "file_name": "thin.png", "width": 900, "height": 2})
    data["annotations"].append({**data["annotations"][0], "id": 777, "image_id": 77, "bbox": [1, 0, 50, 2]})
    data["annotations"][-1].pop("segmentation", None)
    (tmp_path / "thin.json").write_text(json.dumps(data))
    thin = f"{images / 'thin.png'}: an image of 2x900 resizes to 0x96 at the detector's scale (shorter side 64"
    model = create_detector("swin_test", 3, detector_options=TINY).eval()
    spec = DenseSpec("detect", model.backbone.body.config, ["circle", "square", "triangle"],
                     head={**TINY, "masks": True}, inference={"category_ids": [1, 2, 3]})  # fmt: skip
    save_dense(model, spec, tmp_path / "detector.safetensors")
    evaluate = ["detect", "eval", "--checkpoint", str(tmp_path / "detector.safetensors"), "--workers", "0"]
    evaluate += ["--data", str(tmp_path / "thin.json"), "--images", str(images)]
    with caplog.at_level("WARNING"):
        assert main(evaluate) == 0
    assert "thin.json: 1 of 5 images left out, too elongated to detect in: " + thin in caplog.text
    assert "(4 images, 0 unreadable" in capsys.readouterr().out
    assert main([*evaluate, "--strict-data"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("swinkit detect eval: error: " + thin) and "validation_0000" not in error
    # Training: left out of both sets (the training file's --min-image-side filter let it through).
    train = ["detect", "train", "--data", str(tmp_path / "thin.json"), "--images", str(images), "--val-data",
             str(tmp_path / "thin.json"), "--val-images", str(images), *FAST, "--epochs", "1", "--batch-size", "2",
             "--min-image-side", "0", "--max-steps", "1", "--output", str(tmp_path / "run")]  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(train) == 0
    assert caplog.text.count("1 of 5 images left out, too elongated to detect in: " + thin) == 2


def test_a_score_threshold_below_the_detectors_own_floor_lowers_it(tmp_path):
    # The detector drops detections under its score_threshold before predict's own threshold: a
    # lower --score-threshold found nothing more.
    torch.manual_seed(0)
    head = {**TINY, "score_threshold": 0.3}
    model = create_detector("swin_test", 3, masks=False, detector_options=head).eval()
    head["masks"] = False
    spec = DenseSpec(
        "detect", model.backbone.body.config, ["a", "b", "c"], head=head, inference={"category_ids": [1, 2, 3]}
    )
    save_dense(model, spec, tmp_path / "detector.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (result,) = predict_dense(
        [tmp_path / "a.png"], tmp_path / "detector.safetensors", tmp_path / "out", score_threshold=0.1
    )
    scores = [detection["score"] for detection in result["detections"]]
    assert scores and min(scores) >= 0.1 and min(scores) < 0.3  # an untrained detector's scores are near 1/4


def test_flip_moves_boxes_and_masks_together():
    masks = torch.zeros(1, 4, 10, dtype=torch.uint8)
    masks[0, :, 1:3] = 1
    flipped = flip_target({"boxes": torch.tensor([[1.0, 0.0, 3.0, 4.0]]), "masks": masks}, width=10)
    assert flipped["boxes"].tolist() == [[7.0, 0.0, 9.0, 4.0]]
    assert flipped["masks"][0, 0].nonzero().flatten().tolist() == [7, 8]
    image = Image.fromarray(np.zeros((4, 10, 3), np.uint8))
    pixels, target = DetectionTrainTransform(hflip=1.0)((image, {"boxes": torch.tensor([[1.0, 0.0, 3.0, 4.0]])}))
    assert pixels.shape == (3, 4, 10) and target["boxes"].tolist() == [[7.0, 0.0, 9.0, 4.0]]


def test_swins_crop_policy_resizes_then_crops_boxes_and_masks_as_mmdet_does():
    # mmdet's Resize (shorter side 400 / 500 / 600, longer at most 1333, sizes rounded) then
    # RandomCrop("absolute_range", (384, 600), allow_negative_crop=True), written out from its
    # draws: height and width in 384..600 (the whole side if shorter), then the offsets.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    boxes = torch.tensor([[10.0, 20.0, 110.0, 120.0], [200.0, 50.0, 490.0, 290.0], [0.0, 0.0, 6.0, 6.0]])
    masks = torch.zeros(3, 300, 500, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist(), strict=True):
        mask[y1:y2, x1:x2] = 1
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": masks, "image_id": 7}
    kept_counts = set()
    for seed in range(20):
        draws = random.Random(seed)
        shorter = draws.choice((400, 500, 600))
        scale = min(shorter / 300, 1333 / 500)
        width, height = int(500 * scale + 0.5), int(300 * scale + 0.5)
        crop_height = draws.randint(min(height, 384), min(height, 600))
        crop_width = draws.randint(min(width, 384), min(width, 600))
        top, left = draws.randint(0, height - crop_height), draws.randint(0, width - crop_width)
        cropped, out = resize_and_crop(image, target, random.Random(seed))
        assert cropped.size == (crop_width, crop_height)
        moved = boxes * torch.tensor([width / 500, height / 300] * 2) - torch.tensor([left, top] * 2)
        moved[:, 0::2] = moved[:, 0::2].clamp(0, crop_width)
        moved[:, 1::2] = moved[:, 1::2].clamp(0, crop_height)
        kept = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
        assert torch.allclose(out["boxes"], moved[kept]) and torch.equal(out["labels"], torch.tensor([1, 2, 3])[kept])
        assert out["masks"].shape == (int(kept.sum()), crop_height, crop_width) and out["image_id"] == 7
        for mask, box in zip(out["masks"], out["boxes"], strict=True):  # each mask is its box, within a pixel
            rows, columns = torch.where(mask > 0)
            extent = torch.stack([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]).float()
            assert (extent - box).abs().max() <= 1.0
        kept_counts.add(int(kept.sum()))
    assert min(kept_counts) < 3 and max(kept_counts) > 1  # crops drop instances, and keep several
    small = Image.fromarray(np.zeros((64, 80, 3), np.uint8))
    plain = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    assert DetectionTrainTransform(hflip=0.0, crop_policy=0.0)((small, plain))[0].shape == (3, 64, 80)
    pixels, _ = DetectionTrainTransform(hflip=0.0, crop_policy=1.0)((small, plain))
    assert 384 <= pixels.shape[1] <= 600 and 384 <= pixels.shape[2] <= 600  # 64 x 80 upscaled, then cropped
    # An image without objects (COCO has them) takes the policy too: nothing to move.
    nothing = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
               "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)}  # fmt: skip
    pixels, empty = DetectionTrainTransform(hflip=1.0, crop_policy=1.0)((small, nothing))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, *pixels.shape[1:])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), {"training": 8, "validation": 4}, size=64)


@pytest.mark.parametrize(
    "masks, cascade",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn"],
)
def test_one_training_step_lowers_the_loss_on_a_fixed_batch(shapes, masks, cascade):
    dataset = CocoDetection(shapes / "instances_training.json", shapes / "images" / "training", masks=masks)
    batch = [DetectionTrainTransform(hflip=0.0)(dataset[i]) for i in range(4)]
    images, targets = [image for image, _ in batch], [target for _, target in batch]
    torch.manual_seed(0)  # a cascade's later stages start from regions its class scores pick: fix the start
    model = create_detector("swin_test", 3, masks=masks, detector_options=dict(TINY, cascade=cascade)).train()
    optimizer = build_optimizer(model, 0.05, None, lr=1e-4)  # the paper's detection rate
    stages = [f"_{i}" for i in range(3)] if cascade else [""]

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same proposal sampling before and after the step
        losses = model(images, targets)
        heads = {f"loss_{part}{stage}" for part in ("classifier", "box_reg", "mask") for stage in stages}
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"} | {k for k in heads if masks or "mask" not in k}
        return sum(losses.values())

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


@pytest.mark.parametrize("losses, cascade", [("mmdet", False), ("torchvision", False), ("mmdet", True)])
def test_a_batch_without_objects_trains_on_background_alone(losses, cascade):
    # Images without annotations are kept for training; a batch of only such images has no positive
    # region, and the L1 box loss of Swin's Mask R-CNN failed on its empty regression there.
    model = create_detector(
        "swin_test", 3, detector_options=dict(TINY, losses=losses, cascade=cascade, geometry="mmdet")
    ).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, *image.shape[1:], dtype=torch.uint8)} for image in images]  # fmt: skip
    found = model(images, empty)
    for name, value in found.items():
        assert value.isfinite(), name
        # Nothing to regress or segment: those losses are 0; the classifiers learn the background.
        assert (value == 0) == ("box_reg" in name or "mask" in name), name
    sum(found.values()).backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    heads = model.roi_heads.stages if cascade else [model.roi_heads]
    assert all(head.box_predictor.cls_score.weight.grad.abs().sum() > 0 for head in heads)


def test_cli_train_eval_predict_with_bad_annotations_and_images(shapes, tmp_path, capsys):
    train_json = json.loads((shapes / "instances_training.json").read_text())
    train_json["annotations"].append({"id": 999, "image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]})
    train_json["images"].append({"id": 100, "file_name": "gone.png", "width": 64, "height": 64})
    (tmp_path / "train.json").write_text(json.dumps(train_json))
    out = tmp_path / "run"
    args = [
        "detect",
        "train",
        "--data",
        str(tmp_path / "train.json"),
        "--images",
        str(shapes / "images" / "training"),
        "--val-data",
        str(shapes / "instances_validation.json"),
        "--val-images",
        str(shapes / "images" / "validation"),
        *FAST,
        "--epochs",
        "1",
        "--batch-size",
        "3",
        "--geometry",
        "torchvision",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    assert "best val bbox_AP" in capsys.readouterr().out
    row = json.loads((out / "metrics.jsonl").read_text())
    assert (
        {"val_bbox_AP", "val_bbox_AP50", "val_segm_AP"} <= set(row)
        and row["bad_images"] <= 1
        and row["val_bad_images"] == 0
    )

    model = str(out / "model-final.safetensors")
    assert (
        main(
            [
                "detect",
                "eval",
                "--checkpoint",
                model,
                "--data",
                str(shapes / "instances_validation.json"),
                "--images",
                str(shapes / "images" / "validation"),
                "--workers",
                "0",
                "--json",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)  # reloaded with the geometry it was trained with
    assert load_dense(model)[1].head["geometry"] == "torchvision"
    assert metrics["images"] == 4 and metrics["bbox_AP"] == pytest.approx(row["val_bbox_AP"])
    assert 0.0 <= metrics["segm_AP"] <= 100.0

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    image = shapes / "images" / "validation" / "validation_00000.png"
    assert (
        main(
            [
                "detect",
                "predict",
                str(image),
                str(tmp_path / "broken.jpg"),
                "--checkpoint",
                model,
                "--score-threshold",
                "0",
                "--output",
                str(tmp_path / "predicted"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "predicted" / "results.json").read_text())
    assert "cannot decode image" in results[1]["error"]
    assert Image.open(results[0]["overlay"]).size == (64, 64)
    for detection in results[0]["detections"]:
        assert detection["class"] in {"circle", "square", "triangle"} and len(detection["box"]) == 4
        assert detection["mask_rle"]["size"] == [64, 64]

    # Grad-CAM of each image's top detection: the box predict found with the highest score.
    capsys.readouterr()
    explain = ["detect", "explain", str(image), str(tmp_path / "broken.jpg"), "--checkpoint", model, "--json"]
    assert main([*explain, "--output", str(tmp_path / "explained")]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert "cannot decode image" in explained[1]["error"]
    if results[0]["detections"]:
        top = max(results[0]["detections"], key=lambda detection: detection["score"])
        assert explained[0]["class"] == top["class"] and explained[0]["score"] == pytest.approx(top["score"])
        assert explained[0]["box"] == pytest.approx(top["box"], abs=0.01)
        assert Image.open(explained[0]["output"]).size == (64, 64)
        last = results[0]["detections"][-1]  # --box: the detection predict wrote with that box
        box = ["--box", *map(str, last["box"])]
        assert main([*explain[:3], "--checkpoint", model, *box, "--json", "--output", str(tmp_path / "boxed")]) == 0
        assert json.loads(capsys.readouterr().out)[0]["box"] == pytest.approx(last["box"], abs=0.01)
    else:  # a model that detects nothing says so for the image
        assert "the detector finds nothing in this image" in explained[0]["error"]
    assert main([*explain[:3], "--checkpoint", model, "--stage", "9"]) == 2
    assert "stage must be in -4..3 for this model, got 9" in capsys.readouterr().err
    # `swinkit segment eval` of a detection file names the command that takes it.
    segment_eval = ["segment", "eval", "--checkpoint", model, "--data", str(tmp_path), "--aug-test"]
    assert main(segment_eval) == 2
    assert "is a detect model; 'swinkit segment eval' evaluates segment models" in capsys.readouterr().err

    # Multi-scale + flip testing (tests/test_detection_augment.py checks its numbers): the
    # ratios and the mirroring are recorded, every image is scored, and predict takes them too.
    evaluate = ["detect", "eval", "--checkpoint", model, "--data", str(shapes / "instances_validation.json")]
    evaluate += ["--images", str(shapes / "images" / "validation"), "--workers", "0"]
    assert main([*evaluate, "--aug-test", "--json"]) == 0
    augmented = json.loads(capsys.readouterr().out)
    assert augmented["test_ratios"] == [0.75, 1.0, 1.25] and augmented["test_flip"] and augmented["images"] == 4
    assert 0.0 <= augmented["bbox_AP"] <= 100.0 and 0.0 <= augmented["segm_AP"] <= 100.0
    assert main([*evaluate, "--test-ratios", "0.5", "1"]) == 0
    assert "scales x0.5,1  (4 images, 0 unreadable)" in capsys.readouterr().out
    assert main([*evaluate, "--test-ratios", "1", "--json"]) == 0  # one view: the detector's own path
    assert json.loads(capsys.readouterr().out)["bbox_AP"] == pytest.approx(metrics["bbox_AP"], abs=1e-9)
    predict = ["detect", "predict", str(image), "--checkpoint", model, "--score-threshold", "0", "--flip"]
    assert main([*predict, "--output", str(tmp_path / "flipped"), "--json"]) == 0
    flipped = json.loads(capsys.readouterr().out)[0]["detections"]
    assert flipped and all(detection["mask_rle"]["size"] == [64, 64] for detection in flipped)
    assert main([*predict, "--test-ratios", "0", "--output", str(tmp_path / "zero")]) == 2
    assert "test ratios must be one or more numbers above 0, got [0.0]" in capsys.readouterr().err


def test_cli_cascade_mask_rcnn_trains_saves_reloads_and_predicts(shapes, tmp_path, capsys):
    out = tmp_path / "cascade"
    args = ["detect", "train", "--recipe", "coco-cascade", "--data", str(shapes / "instances_training.json"),
            "--images", str(shapes / "images" / "training"), "--val-data", str(shapes / "instances_validation.json"),
            "--val-images", str(shapes / "images" / "validation"), *FAST, "--epochs", "1", "--batch-size", "4",
            "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    # Every term of the loss, as mmdet logs them: the RPN's two and three per stage; their means
    # add up to the epoch's loss (each step's loss is their sum).
    terms = {key: value for key, value in row.items() if key.startswith("train_loss_")}
    stages = {f"train_loss_{part}_{index}" for part in ("classifier", "box_reg", "mask") for index in range(3)}
    assert set(terms) == {"train_loss_objectness", "train_loss_rpn_box_reg", *stages}
    assert sum(terms.values()) == pytest.approx(row["train_loss"], rel=1e-5)
    assert row["train_loss_classifier_0"] > row["train_loss_classifier_2"] > 0  # stage weights 1, 0.5, 0.25
    model, spec = load_dense(out / "model-final.safetensors")
    assert spec.head["cascade"] and spec.head["masks"] and isinstance(model.roi_heads, CascadeRoIHeads)
    assert spec.head["geometry"] == "mmdet" and isinstance(model.roi_heads.stages[2].mask_roi_pool, AlignedRoIPool)
    assert "roi_heads.stages.2.mask_predictor.mask_fcn_logits.weight" in load_file(out / "model-final.safetensors")
    capsys.readouterr()
    trained = str(out / "model-final.safetensors")
    images = shapes / "images" / "validation"
    validation = ["--data", str(shapes / "instances_validation.json"), "--images", str(images)]
    assert main(["detect", "eval", "--checkpoint", trained, "--json", "--workers", "0", *validation]) == 0
    metrics = json.loads(capsys.readouterr().out)  # the reloaded file scores what training scored
    assert metrics["bbox_AP"] == pytest.approx(row["val_bbox_AP"])
    assert metrics["segm_AP"] == pytest.approx(row["val_segm_AP"])
    # The run's training checkpoint (a run under way) reads as its model file: the same scores.
    last = ["detect", "eval", "--checkpoint", str(out / "checkpoint-last.pt"), "--json", "--workers", "0"]
    assert main([*last, *validation]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    image = sorted(images.iterdir())[0]
    predict = ["detect", "predict", str(image), "--checkpoint", trained, "--output", str(tmp_path / "predicted"),
               "--score-threshold", "0"]  # fmt: skip
    assert main(predict) == 0
    detections = json.loads((tmp_path / "predicted" / "results.json").read_text())[0]["detections"]
    assert all(len(d["box"]) == 4 and d["mask_rle"]["size"] == [64, 64] for d in detections)  # none below 0.05
    with pytest.raises(ValueError, match="export_segmentation exports segmentation models; this is a detect model"):
        export_segmentation(model, spec, tmp_path / "detector.onnx")

    # Exported to ONNX: checked on a real image, then scored and run by the CLI in place of the model file.
    exported = str(tmp_path / "cascade.onnx")
    capsys.readouterr()
    export = ["detect", "export", exported, "--checkpoint", trained, "--check-image", str(image), "--json"]
    assert main(export) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"] == ["boxes", "labels", "scores", "masks"] and report["same_detections"]
    assert report["detections"][0] > 0 and report["max_box_error"] < 1e-3 and report["max_mask_error"] < 1e-3
    assert main(["detect", "eval", "--checkpoint", exported, "--json", "--workers", "0", *validation]) == 0
    onnx_metrics = json.loads(capsys.readouterr().out)
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
        assert onnx_metrics[key] == pytest.approx(metrics[key], abs=1e-6), key
    predict[predict.index(trained)] = exported
    predict[predict.index(str(tmp_path / "predicted"))] = str(tmp_path / "predicted-onnx")
    assert main(predict) == 0
    from_onnx = json.loads((tmp_path / "predicted-onnx" / "results.json").read_text())[0]["detections"]
    assert len(from_onnx) == len(detections) > 0
    unpaired = list(from_onnx)  # paired by class, box and score: near-equal scores may swap ranks
    for expected in detections:
        found = next(
            (d for d in unpaired
             if d["class"] == expected["class"] and d["box"] == pytest.approx(expected["box"], abs=1e-3)
             and d["score"] == pytest.approx(expected["score"], abs=1e-5)),
            None,
        )  # fmt: skip
        assert found is not None, f"no exported detection matches {expected}"  # not a bare StopIteration
        unpaired.remove(found)


def test_cascade_stages_match_at_rising_iou_and_the_training_regions_are_sampled_as_mmdet_does():
    model = create_detector("swin_test", 3, detector_options=dict(TINY, cascade=True))
    stages = model.roi_heads.stages
    assert len(stages) == 3 and model.roi_heads.stage_weights == (1.0, 0.5, 0.25)
    assert [s.proposal_matcher.high_threshold for s in stages] == [0.5, 0.6, 0.7]
    assert [s.proposal_matcher.low_threshold for s in stages] == [0.5, 0.6, 0.7]
    # mmdet's target stds (0.1, 0.2), (0.05, 0.1), (0.033, 0.067) as BoxCoder weights.
    expected = [(10, 10, 5, 5), (20, 20, 10, 10), (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067)]
    for stage, weights in zip(stages, expected, strict=True):
        assert stage.box_coder.weights == pytest.approx(weights)
    head = stages[0].box_head  # four 3x3 convolutions of 16 channels with BatchNorm, one layer of 32
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules()) == 4
    # Class scores (3 classes and the background) and a box per class (reg_class_agnostic=False).
    assert stages[0].box_predictor.cls_score.out_features == 4 and stages[0].box_predictor.bbox_pred.out_features == 16
    assert stages[1].mask_head is not stages[0].mask_head  # each stage its own mask head

    torch.manual_seed(0)
    truths = torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]])
    rois = [torch.cat([truths + torch.randn(2, 4) * scale for scale in (1, 2, 4, 8) for _ in range(40)])]
    for stage, iou in zip(stages, (0.5, 0.6, 0.7), strict=True):
        sampled, matched, labels, is_gt = _sample(stage, rois, [truths], [torch.tensor([1, 2])])
        overlap = box_iou(sampled[0], truths)[torch.arange(len(sampled[0])), matched[0]]
        positive = labels[0] > 0
        assert positive.any() and (overlap[positive] >= iou).all() and (overlap[~positive] < iou).all()
        assert torch.equal(labels[0][positive], torch.tensor([1, 2])[matched[0][positive]])
        assert positive.sum() <= 0.25 * 64 and len(sampled[0]) <= 64  # 64 regions, at most a quarter positive
        # The added truths are marked (the next stage starts from the refined regions without them).
        assert torch.equal(is_gt[0], (sampled[0][:, None] == truths).all(dim=-1).any(dim=-1))


def test_cascade_box_loss_is_giou_of_the_positives_over_the_sampled_regions():
    logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([1, 0, 2])
    truths = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 6.0, 6.0], [2.0, 0.0, 6.0, 4.0]])
    classification, box = _box_losses(logits, boxes, labels, truths)
    assert classification.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    # The third: intersection 2 x 4 = 8, union 24, enclosing box 6 x 4 = 24: GIoU 1/3 - 0 = 1/3.
    # The first matches exactly (loss 0); the background region has no box loss.
    assert box.item() == pytest.approx(10 * (1 - 1 / 3) / 3)


def _class_rows(deltas, classes):
    return deltas.reshape(len(deltas), -1, 4)[torch.arange(len(deltas)), classes]


def test_cascade_detections_average_the_stages_scores_on_the_last_stages_boxes():
    torch.manual_seed(0)
    options = dict(TINY, cascade=True, score_threshold=0.0)
    model = create_detector("swin_test", 3, detector_options=options).double().eval()
    pooled, predicted = [], []
    model.roi_heads.stages[0].box_roi_pool.register_forward_hook(lambda m, args, out: pooled.append(args[1]))
    for stage in model.roi_heads.stages:
        stage.box_predictor.register_forward_hook(lambda m, args, out: predicted.append(out))
    image = torch.rand(3, 50, 70, dtype=torch.float64)
    with torch.no_grad():
        found = model([image])[0]
    stages = model.roi_heads.stages
    size = model.transform([image])[0].image_sizes[0]
    for index in (0, 1):  # each stage moves its regions by the box of the class it scores highest, clipped
        logits, deltas = predicted[index]
        best = logits[:, 1:].argmax(dim=1) + 1  # the background left out
        refined = stages[index].box_coder.decode(_class_rows(deltas, best), pooled[index]).reshape(-1, 4)
        assert torch.allclose(pooled[index + 1][0], clip_boxes_to_image(refined, size))
    probabilities = torch.stack([logits for logits, _ in predicted]).mean(dim=0).softmax(dim=-1)
    boxes = stages[2].box_coder.decode(predicted[2][1], pooled[2])  # (regions, classes, 4): a box per class
    boxes = clip_boxes_to_image(boxes, size)
    scale = torch.tensor([70 / size[1], 50 / size[0]] * 2, dtype=torch.float64)  # back to the image's size
    for box, label, score in list(zip(found["boxes"], found["labels"], found["scores"], strict=True))[:10]:
        rows = torch.where(torch.isclose(probabilities[:, label], score, rtol=1e-12, atol=0))[0]
        # torchvision scales boxes back by float32 ratios, hence 1e-6.
        assert any(torch.allclose(boxes[row, label] * scale, box, rtol=1e-6) for row in rows), (label, score)
    assert found["masks"].shape[1:] == (1, 50, 70)


def test_cascade_training_moves_positives_by_their_truths_class_and_the_rest_by_their_best_class():
    # mmdet's refine_bboxes: the next stage's regions are this stage's sampled regions (the added
    # truths left out) moved by the box of the truth's class for a positive, of the class the stage
    # scores highest for a background region.
    torch.manual_seed(0)
    model = create_detector("swin_test", 3, masks=False, detector_options=dict(TINY, cascade=True))
    model = model.double().train()
    pooled, predicted = [], []
    stages = model.roi_heads.stages
    stages[0].box_roi_pool.register_forward_hook(lambda m, args, out: pooled.append(args[1][0]))
    for stage in stages:
        stage.box_predictor.register_forward_hook(lambda m, args, out: predicted.append(out))
    truths = torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]], dtype=torch.float64)
    classes = torch.tensor([1, 3])
    model([torch.rand(3, 64, 64, dtype=torch.float64)], [{"boxes": truths, "labels": classes}])
    decisive = False
    for index, threshold in ((0, 0.5), (1, 0.6)):
        logits, deltas = (t.detach() for t in predicted[index])
        overlap, match = box_iou(pooled[index], truths).max(dim=1)
        positive = overlap >= threshold
        best = logits[:, 1:].argmax(dim=1) + 1
        chosen = torch.where(positive, classes[match], best)
        decisive |= bool((chosen[positive] != best[positive]).any())  # positives whose best class is another
        moved = stages[index].box_coder.decode(_class_rows(deltas, chosen), [pooled[index]]).reshape(-1, 4)
        added = (pooled[index][:, None] == truths).all(dim=-1).any(dim=-1)
        expected = clip_boxes_to_image(moved, (64, 64))[~added]
        following = pooled[index + 1][~(pooled[index + 1][:, None] == truths).all(dim=-1).any(dim=-1)]
        assert len(following) and all(torch.isclose(expected, box, rtol=0, atol=1e-9).all(1).any() for box in following)
    assert decisive


def _detections_and_stage_map(model, image, stage):
    """One differentiable pass: the detections and the backbone stage's output map (channels last)."""
    maps = []
    layer = model.backbone.body.swin.layers[stage]
    handle = layer.register_forward_hook(lambda module, inputs, output: maps.append(output[0]))
    with torch.enable_grad():
        detections = model([image.clone().requires_grad_(True)])[0]
    handle.remove()
    return detections, maps[0]


@pytest.mark.parametrize("cascade", [False, True], ids=["faster_rcnn", "cascade_rcnn"])
def test_detection_grad_cam_is_the_top_detection_score_gradient_on_a_backbone_stage(cascade):
    # Grad-CAM written out for a detector: the highest-scoring detection's score (of a class, if
    # asked) through the box head, its gradient at the backbone stage's output map averaged per
    # channel, the weighted channels summed, ReLU; the map drawn back at the image's own size.
    from swinkit.explain import NothingDetected, explain_detection

    torch.manual_seed(0)
    # A random model's scores are low: keep them all, and enough detections for every class to appear.
    options = dict(TINY, score_threshold=0.0, cascade=cascade, detections_per_img=1000)
    model = create_detector("swin_test", 3, masks=False, detector_options=options).double().eval()
    image = torch.rand(3, 50, 70, dtype=torch.float64)
    for label, stage in [(None, None), (2, 0)]:
        found = explain_detection(model, image, label, stage)
        detections, stage_map = _detections_and_stage_map(model, image, found.stage)
        allowed = detections["labels"] == (detections["labels"] if label is None else label)
        best = torch.where(allowed, detections["scores"], -1.0).argmax()
        (gradient,) = torch.autograd.grad(detections["scores"][best], stage_map)
        expected = torch.relu((stage_map * gradient.mean(dim=(1, 2), keepdim=True)).sum(dim=-1))
        assert torch.allclose(found.raw, expected, rtol=1e-10, atol=1e-14) and found.raw.max() > 0
        assert found.targets == [int(detections["labels"][best])] and (label is None or found.targets == [label])
        assert torch.equal(found.boxes[0], detections["boxes"][best].detach())
        assert found.probabilities.item() == detections["scores"][best].item()
        assert found.maps.shape == (1, 50, 70) and found.maps.min() == 0 and found.maps.max() == 1
    assert found.stage == 0 and found.stride == 4
    assert explain_detection(model, image).stage == 2  # 50 x 70 resized to 64 x 90: stage 2 is 4 x 6
    # A chosen box explains the detection overlapping it most: each detection's own box picks it.
    detections, _ = _detections_and_stage_map(model, image, 2)
    for index in (0, len(detections["boxes"]) // 2, len(detections["boxes"]) - 1):
        box = detections["boxes"][index].detach()
        chosen = explain_detection(model, image, box=box.tolist())
        ties = box_iou(box[None], detections["boxes"].detach())[0] == 1.0  # duplicate boxes of other classes
        best = torch.where(ties, detections["scores"].detach(), -1.0).argmax()
        assert torch.equal(chosen.boxes[0], detections["boxes"][best].detach())
        assert chosen.targets == [int(detections["labels"][best])]
    with pytest.raises(NothingDetected, match="no detection overlaps the box"):
        explain_detection(model, image, box=[1000, 1000, 1010, 1010])  # detections are clipped to the image
    with pytest.raises(ValueError, match="box must be x1 y1 x2 y2"):
        explain_detection(model, image, box=[5, 5, 2, 8])
    assert not model.backbone.body.swin.layers[0]._forward_hooks and not model.transform._forward_hooks
    strict = create_detector("swin_test", 3, masks=False, detector_options=dict(TINY, score_threshold=1.0)).eval()
    with pytest.raises(NothingDetected, match="the detector finds nothing in this image"):
        explain_detection(strict, image.float())
    with pytest.raises(TypeError, match="needs a detector .*, got SwinTransformer"):
        explain_detection(model.backbone.body.swin, image)


# -- bad input, named -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mask_rcnn():
    torch.manual_seed(0)
    return create_detector("swin_test", 3, detector_options=TINY)


def _target(**changes):
    masks = torch.zeros(1, 80, 100, dtype=torch.uint8)
    masks[0, 10:40, 10:50] = 1
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}
    return {key: value for key, value in {**target, **changes}.items() if value is not None}


@pytest.mark.parametrize(
    "target, message",
    [
        pytest.param(_target(labels=torch.tensor([0])), r'targets\[0\]\["labels"\] holds 0: labels count from 1 \(0 '
                     r"is the background\), 1\.\.3 for this detector", id="label 0"),
        pytest.param(_target(labels=torch.tensor([-1])), r'\["labels"\] holds -1: labels count from 1', id="label -1"),
        pytest.param(_target(labels=torch.tensor([4])), r'\["labels"\] holds 4: .* 1\.\.3 for this', id="label 4"),
        pytest.param(_target(labels=torch.tensor([1.0])), r'\["labels"\] must be an int64 tensor \(1,\), one per '
                     r"box; got a torch\.float32", id="float labels"),
        pytest.param(_target(labels=torch.tensor([1, 2])), r'\["labels"\] must be an int64 tensor \(1,\), .* shape '
                     r"\(2,\)", id="two labels"),
        pytest.param(_target(boxes=torch.tensor([[10.0, float("nan"), 50.0, 40.0]])), r'\["boxes"\] holds \[10\.0, '
                     r"nan, 50\.0", id="NaN box"),
        pytest.param(_target(boxes=torch.tensor([[10.0, 10.0, 5.0, 5.0]])), r"with x2 > x1 and y2 > y1 \(COCO's x, "
                     r"y, width", id="x y w h box"),
        pytest.param(_target(boxes=torch.tensor([[10, 10, 50, 40]])), r'\["boxes"\] must be a float tensor \(N, 4\)',
                     id="integer boxes"),
        pytest.param(_target(masks=torch.zeros(2, 80, 100)), r'\["masks"\] must be a tensor \(N, H, W\) = \(1, 80, '
                     r"100\)", id="two masks"),
        pytest.param(_target(masks=torch.zeros(1, 40, 50)), r"= \(1, 80, 100\): one per box, at its image's size; "
                     r"got .*40, 50", id="mask size"),
        pytest.param(_target(masks=torch.zeros(1, 1, 80, 100)), r'\["masks"\] must be a tensor .* \(1, 1, 80, 100\)',
                     id="4-d masks"),
        pytest.param(_target(masks=torch.full((1, 80, 100), 255.0)), r'\["masks"\] holds 255\.0; masks are 0 .* or '
                     r"1", id="masks of 255"),
        pytest.param(_target(masks=None), r"targets\[0\] has no masks; a target is a dict of boxes, labels and "
                     r"masks", id="no masks"),
    ],
)  # fmt: skip
def test_bad_training_targets_are_refused_naming_the_item(tiny_mask_rcnn, target, message):
    # torchvision trained label 0 as background, dropped -1, stretched masks of another size and
    # trained on masks of 0 / 255 or NaN boxes without a word; the rest failed deep inside.
    with pytest.raises(ValueError, match=message):
        tiny_mask_rcnn.train()([torch.rand(3, 80, 100)], [target])


def test_bad_detector_images_and_target_lists_are_refused_naming_them(tiny_mask_rcnn):
    from swinkit.dense import augmented_views, detect_augmented

    model, image = tiny_mask_rcnn.train(), torch.rand(3, 80, 100)
    with pytest.raises(TypeError, match=r"targets must be a list of one dict per image \(boxes, labels and masks"):
        model([image], _target())
    with pytest.raises(ValueError, match="2 images but 1 targets: give one target dict per image"):
        model([image, image], [_target()])
    with pytest.raises(ValueError, match="a detector in training mode needs targets"):
        model([image])
    model.eval()
    refused = [
        ([], ValueError, r"takes a list of RGB images \(3, H, W\) in \[0, 1\]; got an empty one"),
        (["a.png"], TypeError, r"images\[0\] is a str; the detector takes RGB image tensors"),
        (image, TypeError, r"one tensor per image; got a Tensor of shape \(3, 80, 100\)"),
        ([image[:1]], ValueError, r"takes RGB images \(3, H, W\), H and W 1 or more; got \(1, 80, 100\) for images"),
        ([(image * 255).byte()], TypeError, r"images\[0\] is torch\.uint8; the detector takes float RGB images"),
        ([image, image * 255], ValueError, r"images\[1\] holds values from \S+ to 255; .* in \[0, 1\] .*divide"),
        ([(image - 0.45) / 0.225], ValueError, r"images\[0\] holds values from -2 to 2\.4.* do not normalise them"),
        ([image * float("nan")], ValueError, r"images\[0\] holds NaN or infinite values"),
    ]
    for images, kind, message in refused:
        with pytest.raises(kind, match=message):
            model(images)
    with pytest.raises(ValueError, match=r"images\[0\] holds values from \S+ to 255"):  # the views' transform too
        detect_augmented(model, image * 255, augmented_views(model))
    model([image * 1.2 - 0.1])  # within the tolerance of resizing and colour jitter overshoot


def test_the_exported_detector_refuses_what_the_eager_one_refuses(tiny_mask_rcnn):
    # It turned a uint8 image into float 0..255 and ran it; here a stand-in session records what it is given.
    from types import SimpleNamespace

    from swinkit.dense.detection_export import POOLING_KEY, ExportedDetector

    spec = DenseSpec("detect", tiny_mask_rcnn.backbone.body.config, ["a", "b", "c"], head={**TINY, "masks": False})
    fed = []

    class Session:
        def get_modelmeta(self):
            return SimpleNamespace(custom_metadata_map={"swinkit.dense": spec.to_json(), POOLING_KEY: "scatter"})

        def get_outputs(self):
            return [SimpleNamespace(name=name) for name in ("boxes", "labels", "scores")]

        def run(self, names, feeds):
            fed.append(feeds["image"])
            return [np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)]

    exported = ExportedDetector("detector.onnx", Session())
    image = torch.rand(3, 60, 80)
    with pytest.raises(TypeError, match=r"images\[0\] is torch\.uint8; detector\.onnx takes float RGB images"):
        exported([(image * 255).byte()])
    with pytest.raises(ValueError, match=r"images\[0\] holds values from \S+ to 255; detector\.onnx takes RGB"):
        exported([image * 255])
    assert not fed
    assert exported([image.double()])[0]["boxes"].shape == (0, 4) and fed[0].dtype == np.float32


@pytest.mark.parametrize(
    "options, kind, message",
    [
        ({"detections_per_img": -1}, ValueError, r"'detections_per_img' must be at least 1, got -1"),
        ({"score_threshold": float("nan")}, ValueError, r"'score_threshold' must be between 0 and 1, got nan"),
        ({"score_threshold": 2}, ValueError, r"'score_threshold' must be between 0 and 1, got 2"),
        ({"roi_batch_size": 0}, ValueError, r"'roi_batch_size' must be at least 1, got 0"),
        ({"fpn_channels": 0}, ValueError, r"'fpn_channels' must be at least 1, got 0"),
        ({"mask_head_dim": 0}, ValueError, r"'mask_head_dim' must be at least 1, got 0"),
        ({"min_size": 0}, ValueError, r"'min_size' must be at least 1, got 0"),
        ({"min_size": ()}, TypeError, r"'min_size' must be a whole number or a non-empty list of them, got \(\)"),
        ({"min_size": (64.5,)}, TypeError, r"'min_size' must be a whole number .*, got \(64\.5,\)"),
        ({"max_size": 32}, ValueError, r"'max_size' \(32, the most pixels of the longer side\) is below .* 64"),
        ({"agnostic_boxes": True}, ValueError, r"agnostic_boxes .* is an option of the cascade's heads only"),
        ({"cascade": "yes"}, TypeError, r"detector option 'cascade' must be True or False, got 'yes'"),
        ({"num_classes": 0}, ValueError, r"num_classes must be 1 or more \(the background is not counted\), got 0"),
        ({"num_classes": 2.5}, TypeError, r"num_classes must be a whole number \(the object classes\), got 2\.5"),
        ({"num_classes": True}, TypeError, r"num_classes must be a whole number .*, got True"),
    ],
    ids=["detections -1", "score NaN", "score 2", "regions 0", "channels 0", "mask dim 0", "min 0", "min ()",
         "min 64.5", "max below min", "agnostic alone", "cascade 'yes'", "classes 0", "classes 2.5", "classes True"],
)  # fmt: skip
def test_detector_options_are_checked_with_the_clis_limits(tiny_mask_rcnn, options, kind, message):
    from swinkit.dense.detection import build_detector

    options = {**TINY, "num_classes": 3, **options}
    with pytest.raises(kind, match=message):
        build_detector(tiny_mask_rcnn.backbone.body, **options)


def test_models_of_the_wrong_kind_are_refused_by_what_is_expected(tiny_mask_rcnn, tmp_path):
    from swinkit.dense.detection import build_detector, evaluate_detection
    from swinkit.dense.detection_export import export_detection
    from swinkit.dense.weights import load_dense_weights

    swin = tiny_mask_rcnn.backbone.body.swin
    with pytest.raises(TypeError, match="build_detector needs a SwinBackbone .* got a SwinTransformer"):
        build_detector(swin, 3, **TINY)
    spec = DenseSpec("detect", swin.config, ["a", "b", "c"], head={**TINY, "masks": True})
    with pytest.raises(TypeError, match="export_detection exports a detector .* got a SwinTransformer"):
        export_detection(swin, spec, tmp_path / "detector.onnx")
    with pytest.raises(TypeError, match="evaluate_detection scores against a swinkit.dense.CocoDetection .* str"):
        evaluate_detection(tiny_mask_rcnn, [], "instances.json")
    with pytest.raises(TypeError, match="load_dense_weights' model must be a segmentor or detector .* got a str"):
        load_dense_weights("model", tmp_path / "model.safetensors", "detect")
    with pytest.raises(ValueError, match="unknown dense task 'detection'; accepted: segment, detect"):
        load_dense_weights(tiny_mask_rcnn, tmp_path / "model.safetensors", "detection")


def test_dense_specs_check_their_fields(tiny_mask_rcnn):
    config = tiny_mask_rcnn.backbone.body.config
    refused = [
        (("segmentation", config, ["a"]), {}, ValueError, "unknown dense task 'segmentation'; accepted: segment, "),
        (("detect", config.to_dict(), ["a"]), {}, TypeError, "backbone must be a SwinConfig, got a dict"),
        (("detect", dataclasses.replace(config, features_only=False), ["a"]), {}, ValueError, "features_only=False"),
        (("detect", config, []), {}, ValueError, r"classes must be a non-empty list of class names \(str\), got \[\]"),
        (("detect", config, "abc"), {}, ValueError, "classes must be a non-empty list .* got 'abc'"),
        (("detect", config, ["a"]), {"frozen_stages": 5}, ValueError, r"frozen_stages must be .* in -1\.\.4, got 5"),
        (("detect", config, ["a"]), {"head": None}, TypeError, "head must be a dict, got a NoneType"),
    ]
    for args, keywords, kind, message in refused:
        with pytest.raises(kind, match=message):
            DenseSpec(*args, **keywords)


def test_a_spec_that_does_not_describe_the_model_is_not_written(tiny_mask_rcnn, tmp_path):
    # Such files were written; the safetensors one then failed to load, the ONNX one carried wrong names.
    from swinkit.dense import save_mmdet, save_mmseg
    from swinkit.dense.detection_export import export_detection
    from swinkit.dense.weights import build_dense_model

    config = tiny_mask_rcnn.backbone.body.config
    head = {**TINY, "masks": True, "geometry": "mmdet", "agnostic_boxes": False}
    five = DenseSpec("detect", config, list("abcde"), head=head)
    shapes = r"the model has 3 classes; shapes differ \(model vs spec\) \['roi_heads\.box_predictor\.cls_score\.weight "
    for save, path in ((save_dense, "d.safetensors"), (export_detection, "d.onnx")):
        with pytest.raises(ValueError, match=r"the spec \(detect: Mask R-CNN, 5 classes\) does not .*" + shapes):
            save(tiny_mask_rcnn, five, tmp_path / path)
    with pytest.raises(ValueError, match=r"only this model has \['roi_heads\.mask_head\.0\.0\.weight'"):
        save_dense(tiny_mask_rcnn, DenseSpec("detect", config, list("abc"), head={**head, "masks": False}),
                   tmp_path / "d.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match=r"\(detect: Cascade Mask R-CNN, 3 classes\) .*: only the spec's model has "
                                         r"\['roi_heads\.stages\.0\."):  # fmt: skip
        export_detection(tiny_mask_rcnn, DenseSpec("detect", config, list("abc"), head={**head, "cascade": True}),
                         tmp_path / "d.onnx")  # fmt: skip
    # An mmdet / mmseg file takes its classes and backbone from the spec (its heads from its weights).
    with pytest.raises(ValueError, match=r"does not describe this detect model .*: the model has 3 classes$"):
        save_mmdet(tiny_mask_rcnn, five, tmp_path / "d.pth")
    segment = DenseSpec("segment", config, list("ab"), head={"channels": 8, "aux": False})
    segmentor = build_dense_model(segment)
    with pytest.raises(ValueError, match=r"\(segment: UPerNet, 4 classes\) .*: the model has 2 classes$"):
        save_mmseg(segmentor, dataclasses.replace(segment, classes=list("abcd")), tmp_path / "s.pth")
    assert not list(tmp_path.iterdir())


def test_a_file_whose_model_description_cannot_be_built_is_named(tiny_mask_rcnn, tmp_path):
    from safetensors.torch import save_file

    from swinkit.checkpoint.io import CheckpointError

    spec = DenseSpec("detect", tiny_mask_rcnn.backbone.body.config, ["a", "b", "c"], head={**TINY, "masks": True})
    save_dense(tiny_mask_rcnn, spec, tmp_path / "good.safetensors")
    weights = load_file(tmp_path / "good.safetensors")
    for name, change, message in [
        ("head.safetensors", lambda d: d["head"].update(foo=1), "its model description cannot be built: .*'foo'"),
        ("backbone.safetensors", lambda d: d["backbone"].update(features_only=False), "invalid: .*features_only=False"),
    ]:
        described = json.loads(spec.to_json())
        change(described)
        save_file(weights, tmp_path / name, {"format": "pt", "swinkit_dense": json.dumps(described)})
        with pytest.raises(CheckpointError, match=f"{name}: .*{message}"):
            load_dense(tmp_path / name)


def test_targets_are_checked_against_the_heads_the_detector_has_now():
    # torchvision's fine-tuning recipe replaces the predictors: labels of the new classes were refused
    # against the class count at build time, and masks still asked for without a mask head.
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    detector = create_detector("swin_test", 3, detector_options=TINY).train()
    detector.roi_heads.box_predictor = FastRCNNPredictor(TINY["box_head_dim"], 7)
    detector.roi_heads.mask_predictor = MaskRCNNPredictor(TINY["mask_head_dim"], TINY["mask_head_dim"], 7)
    image, masks = torch.rand(3, 64, 80), torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 10:40, 10:50] = 1
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([6]), "masks": masks}
    assert "loss_mask" in detector([image], [target])
    with pytest.raises(ValueError, match=r'targets\[0\]\["labels"\] holds 7: .* 1..6 for this detector'):
        detector([image], [{**target, "labels": torch.tensor([7])}])
    detector.roi_heads.mask_roi_pool = detector.roi_heads.mask_head = detector.roi_heads.mask_predictor = None
    assert "loss_mask" not in detector([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
