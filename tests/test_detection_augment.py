"""Multi-scale and flip testing of detectors: mmdet 2's aug_test merging, checked piece by piece."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import clip_boxes_to_image

from helpers import TINY_DETECTOR
from swinkit.dense import create_detector
from swinkit.dense.detection_augment import (
    View,
    _from_view,
    _merged_proposals,
    _Seen,
    _to_view,
    augmented_views,
    detect_augmented,
)
from swinkit.dense.mmdet import rescaled_size

# Random weights with a score threshold of 0: every image has its 100 detections to compare.
TINY = dict(TINY_DETECTOR, score_threshold=0.0)


def _detector(masks=True, **options):
    torch.manual_seed(0)
    return create_detector("swin_test", 3, masks=masks, detector_options={**TINY, **options}).double().eval()


def _mirrored(boxes, width):
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


@pytest.mark.parametrize(
    "options", [dict(), dict(cascade=True, geometry="torchvision")], ids=["mask_rcnn", "cascade_torchvision"]
)
def test_one_view_is_the_detectors_own_path(options):
    # The views' code runs the transform, backbone, RPN and heads itself: at the test scale, not
    # mirrored, it must find what the detector's forward finds.
    model = _detector(**options)
    image = torch.rand(3, 50, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model([image])[0]
    found = detect_augmented(model, image, augmented_views(model))
    assert len(found["boxes"]) == 100 and torch.equal(found["labels"], expected["labels"])
    # torchvision scales the boxes back by float32 ratios, the views by the sides' float64 ratio.
    torch.testing.assert_close(found["boxes"], expected["boxes"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(found["scores"], expected["scores"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(found["masks"], expected["masks"], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "options, ratios", [(dict(), [0.75, 1.25]), (dict(cascade=True), [1.0])], ids=["mask_rcnn", "cascade"]
)
def test_a_mirrored_image_gives_the_mirrored_detections(options, ratios):
    # With flip, an image and its mirror are tested with the same views, so every box must come
    # back mirrored, with the same class and score, and every mask mirrored (mmdet's pasting; the
    # torchvision pasting rounds boxes to whole pixels, which mirroring does not commute with).
    model = _detector(**options)
    views = augmented_views(model, ratios, flip=True)
    assert len(views) == 2 * len(ratios)
    image = torch.rand(3, 50, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    found = detect_augmented(model, image, views)
    mirror = detect_augmented(model, image.flip(-1), views)
    assert len(found["boxes"]) == 100 and torch.equal(found["labels"], mirror["labels"])
    torch.testing.assert_close(found["scores"], mirror["scores"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(found["boxes"], _mirrored(mirror["boxes"], 70), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(found["masks"], mirror["masks"].flip(-1), rtol=1e-12, atol=1e-10)
    assert found["masks"].shape == (100, 1, 50, 70)


def test_views_average_each_class_box_and_probability_over_the_same_regions():
    # Two views, 96 x 64 (the test scale) and 120 x 80 mirrored: the box head's regions in each
    # view, mapped back, are one set; each detection is the views' mean class probability and
    # mean box of its class for one region, the boxes decoded and clipped in each view's pixels.
    model = _detector(masks=False)
    regions, outputs = [], []
    model.roi_heads.box_roi_pool.register_forward_hook(lambda m, args, out: regions.append(args[1][0]))
    model.roi_heads.box_predictor.register_forward_hook(lambda m, args, out: outputs.append(out))
    height, width = 50, 70
    image = torch.rand(3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    views = [View(64, 96), View(80, 120, flip=True)]
    found = detect_augmented(model, image, views)
    boxes, probabilities, back = [], [], []
    for view, seen, (logits, deltas) in zip(views, regions, outputs, strict=True):
        size = rescaled_size(height, width, view.short, view.long)
        scale = torch.tensor([size[1] / width, size[0] / height] * 2, dtype=torch.float64)
        decoded = clip_boxes_to_image(model.roi_heads.box_coder.decode(deltas, [seen]), size)
        if view.flip:
            decoded = _mirrored(decoded.reshape(-1, 4), size[1]).reshape(decoded.shape)
            seen = _mirrored(seen, size[1])
        boxes.append(decoded / scale)
        back.append(seen / scale)
        probabilities.append(logits.softmax(dim=-1))
    torch.testing.assert_close(back[0], back[1], rtol=1e-12, atol=1e-10)  # the same regions
    assert len(back[0]) > 100  # the union of both views' proposals, after one NMS
    mean_boxes, mean_probabilities = sum(boxes) / 2, sum(probabilities) / 2
    for box, label, score in zip(found["boxes"], found["labels"], found["scores"], strict=True):
        rows = torch.where(torch.isclose(mean_probabilities[:, label], score, rtol=1e-12, atol=0))[0]
        assert any(torch.allclose(mean_boxes[row, label], box, rtol=1e-12, atol=1e-10) for row in rows)


def _seen(boxes, scores):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return _Seen(View(1, 1), {}, (1, 1), boxes, torch.tensor(scores))


def test_merged_proposals_are_one_nms_over_every_views_best_first():
    # mmdet's merge_aug_proposals: all views' proposals (already in the image's pixels), one NMS,
    # sorted by objectness, at most the RPN's test count.
    first = _seen([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.5])
    second = _seen([[1, 0, 10, 10], [50, 50, 60, 60], [0, 0, 40, 40]], [0.8, 0.7, 0.6])  # IoU 0.9 with the best
    merged = _merged_proposals([first, second], iou=0.7, count=3)
    assert merged.tolist() == [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 40, 40]]
    assert _merged_proposals([first, second], iou=0.95, count=10).shape == (5, 4)  # 0.9 < 0.95: both kept
    overlapping = _seen([[0, 0, 10, 10], [0, 0, 10, 9]], [0.9, 0.8])
    assert torch.equal(_merged_proposals([overlapping], 0.7, 1), overlapping.proposals)  # one view: as it is


def test_boxes_map_into_a_view_and_back_as_mmdet_maps_them():
    # An image 200 wide, 100 high, seen at 100 x 50 mirrored: scale by 0.5, then x -> 100 - x.
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    view = View(50, 100, flip=True)
    inside = _to_view(boxes, view, (50, 100), (100, 200))
    assert inside.tolist() == [[85.0, 10.0, 95.0, 20.0]]
    assert _from_view(inside, view, (50, 100), (100, 200)).tolist() == boxes.tolist()
    per_class = boxes.expand(3, 2, 4)  # (regions, classes, 4) maps the same way
    assert torch.equal(_to_view(per_class, View(50, 100), (50, 100), (100, 200))[2, 1], boxes[0] / 2)


def test_views_and_bad_requests():
    model = _detector(masks=False)
    assert augmented_views(model) == [View(64, 96)]
    assert augmented_views(model, [0.5, 1.5], flip=True) == [
        View(32, 48), View(32, 48, True), View(96, 144), View(96, 144, True)
    ]  # fmt: skip
    assert augmented_views(model, [0.001]) == [View(1, 1)]  # at least a pixel
    for short, long in ((0, 10), (10, 2.5)):
        with pytest.raises(ValueError, match="a view's sides are whole pixels, 1 or more"):
            View(short, long)
    image = torch.rand(3, 40, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs at least one view"):
        detect_augmented(model, image, [])
    with pytest.raises(ValueError, match=r"takes one RGB image \(3, H, W\) in \[0, 1\], got shape \(1, 3, 40, 40\)"):
        detect_augmented(model, image[None], [View(64, 96)])
    with pytest.raises(ValueError, match=r"in eval mode; call model.eval\(\) first"):
        detect_augmented(model.train(), image, [View(64, 96)])
    with pytest.raises(ValueError, match="a Linear does not have; give the model file written by training"):
        detect_augmented(torch.nn.Linear(2, 2), image, [View(64, 96)])
