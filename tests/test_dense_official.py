"""Official dense files and Swin's mmdet configs: mmdet detectors in and out, mmdet's test-time
geometry (anchors, RoIAlign) and training rules (L1 box losses, RPN matching), mmseg UPerNet files
in, fine-tuning from either.

mmdet is not installed here, so its computations are written out in the tests from its module
definitions (Shared2FCBBoxHead, ConvFCBBoxHead, FCNMaskHead, RPNHead, FPN, AnchorGenerator,
SingleRoIExtractor) and applied to the tensors of the file itself.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou

from swinkit.checkpoint.io import CheckpointError
from swinkit.cli import main
from swinkit.dense import create_detector, load_dense
from swinkit.dense.mmdet import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    AlignedRoIPool,
    MmdetTransform,
    mmdet_classes,
    paste_masks,
)
from swinkit.dense.shapes import SHAPES, write_shapes_dataset
from swinkit.dense.weights import (
    DenseSpec,
    build_dense_model,
    load_dense_heads,
    mmseg_spec,
    save_dense,
    save_mmdet,
)

TINY = dict(min_size=64, max_size=96, fpn_channels=16, box_head_dim=32, mask_head_dim=8, roi_batch_size=64)
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _detector(masks: bool, cascade: bool, classes: int = 3):
    torch.manual_seed(0)
    model = create_detector("swin_test", classes, masks=masks, detector_options=dict(TINY, cascade=cascade)).eval()
    with torch.no_grad():  # BatchNorm statistics and biases away from their initial 0 / 1, so the test sees them
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                tensor.normal_(0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    return model


def _spec(model, masks: bool, cascade: bool, classes: list[str]) -> DenseSpec:
    head = dict(TINY, masks=masks, cascade=cascade, geometry="mmdet")
    category_ids = list(range(1, len(classes) + 1))
    return DenseSpec("detect", model.backbone.body.config, classes, head=head, inference={"category_ids": category_ids})


def _params(*names: str) -> set[str]:
    return {f"{name}.{part}" for name in names for part in ("weight", "bias")}


def _expected_keys(masks: bool, cascade: bool) -> set[str]:
    """The non-backbone keys of mmdet's FPN, RPNHead and (Cascade)RoIHead with Swin's heads."""
    keys = _params(*(f"neck.{kind}.{i}.conv" for kind in ("lateral_convs", "fpn_convs") for i in range(4)))
    keys |= _params("rpn_head.rpn_conv", "rpn_head.rpn_cls", "rpn_head.rpn_reg")
    stages = [f".{s}" for s in range(3)] if cascade else [""]
    for stage in stages:
        box, mask = f"roi_head.bbox_head{stage}.", f"roi_head.mask_head{stage}."
        keys |= _params(box + "fc_cls", box + "fc_reg")
        if cascade:  # ConvFCBBoxHead: 4 ConvModules (conv without bias, bn) and one fc
            keys |= {f"{box}shared_convs.{i}.conv.weight" for i in range(4)}
            keys |= {f"{box}shared_convs.{i}.bn.{part}" for i in range(4) for part in BN}
            keys |= _params(box + "shared_fcs.0")
        else:  # Shared2FCBBoxHead
            keys |= _params(box + "shared_fcs.0", box + "shared_fcs.1")
        if masks:  # FCNMaskHead
            keys |= _params(*(f"{mask}convs.{i}.conv" for i in range(4)), mask + "upsample", mask + "conv_logits")
    return keys


@pytest.mark.parametrize("masks, cascade", [(True, False), (False, False), (True, True)])
def test_written_mmdet_files_have_mmdets_names_shapes_and_class_order(tmp_path, masks, cascade):
    model = _detector(masks, cascade)
    save_mmdet(model, _spec(model, masks, cascade, ["a", "b", "c"]), tmp_path / "m.pth")
    saved = torch.load(tmp_path / "m.pth", weights_only=True)
    assert saved["meta"]["CLASSES"] == ("a", "b", "c")
    state = saved["state_dict"]
    heads = {key for key in state if not key.startswith("backbone.")}
    assert heads == _expected_keys(masks, cascade)
    assert {"backbone.norm0.weight", "backbone.layers.0.blocks.0.attn.relative_position_index"} <= set(state)
    box = "roi_head.bbox_head.2." if cascade else "roi_head.bbox_head."
    assert state[box + "fc_cls.weight"].shape == (4, 32)  # 3 classes and the background (last in mmdet)
    assert state[box + "fc_reg.weight"].shape == (12, 32)  # a box per class (cascade too), none for the background
    if masks:
        assert state[box.replace("bbox", "mask") + "conv_logits.weight"].shape == (3, 8, 1, 1)


def _conv_module(x, state, prefix, padding=1, relu=True):
    x = F.conv2d(x, state[prefix + "conv.weight"], state.get(prefix + "conv.bias"), padding=padding)
    if prefix + "bn.weight" in state:
        bn = [state[prefix + "bn." + part] for part in ("running_mean", "running_var", "weight", "bias")]
        x = F.batch_norm(x, *bn, training=False, eps=1e-5)
    return F.relu(x) if relu else x


def _mmdet_box_head(x, state, box, cascade):
    if cascade:
        for i in range(4):
            x = _conv_module(x, state, f"{box}shared_convs.{i}.")
    x = x.flatten(1)
    for i in range(1 if cascade else 2):
        x = F.relu(F.linear(x, state[f"{box}shared_fcs.{i}.weight"], state[f"{box}shared_fcs.{i}.bias"]))
    scores = F.linear(x, state[box + "fc_cls.weight"], state[box + "fc_cls.bias"])
    return scores, F.linear(x, state[box + "fc_reg.weight"], state[box + "fc_reg.bias"])


def _mmdet_mask_head(x, state, mask):
    for i in range(4):
        x = _conv_module(x, state, f"{mask}convs.{i}.")
    x = F.relu(F.conv_transpose2d(x, state[mask + "upsample.weight"], state[mask + "upsample.bias"], stride=2))
    return F.conv2d(x, state[mask + "conv_logits.weight"], state[mask + "conv_logits.bias"])


def _mmdet_fpn(maps, state):
    laterals = [
        F.conv2d(x, state[f"neck.lateral_convs.{i}.conv.weight"], state[f"neck.lateral_convs.{i}.conv.bias"])
        for i, x in enumerate(maps)
    ]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [_conv_module(x, state, f"neck.fpn_convs.{i}.", relu=False) for i, x in enumerate(laterals)]
    return [*outs, F.max_pool2d(outs[-1], 1, stride=2)]


@pytest.mark.parametrize("cascade", [False, True], ids=["mask_rcnn", "cascade_mask_rcnn"])
def test_a_read_mmdet_file_computes_what_mmdets_modules_compute_with_its_tensors(tmp_path, cascade):
    written = _detector(True, cascade)
    save_mmdet(written, _spec(written, True, cascade, ["a", "b", "c"]), tmp_path / "m.pth")
    state = {k: v.double() for k, v in torch.load(tmp_path / "m.pth", weights_only=True)["state_dict"].items()}
    model, spec = load_dense(tmp_path / "m.pth")
    model = model.double()
    assert spec.classes == ["a", "b", "c"] and spec.head["cascade"] == cascade and spec.head["geometry"] == "mmdet"
    torch.manual_seed(1)

    maps = [torch.randn(2, c, 16 // 2**i, 20 // 2**i, dtype=torch.float64) for i, c in enumerate((16, 32, 64, 128))]
    ours = model.backbone.fpn(OrderedDict((str(i), x) for i, x in enumerate(maps)))
    for got, expected in zip(ours.values(), _mmdet_fpn(maps, state), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)

    level = torch.randn(2, 16, 8, 10, dtype=torch.float64)
    objectness, deltas = model.rpn.head([level])
    hidden = F.relu(F.conv2d(level, state["rpn_head.rpn_conv.weight"], state["rpn_head.rpn_conv.bias"], padding=1))
    rpn = {part: F.conv2d(hidden, state[f"rpn_head.rpn_{part}.weight"], state[f"rpn_head.rpn_{part}.bias"])
           for part in ("cls", "reg")}  # fmt: skip
    torch.testing.assert_close(objectness[0], rpn["cls"], rtol=1e-10, atol=1e-12)  # sigmoid scores of 3 anchors
    torch.testing.assert_close(deltas[0], rpn["reg"], rtol=1e-10, atol=1e-12)

    regions = torch.randn(5, 16, 7, 7, dtype=torch.float64)
    heads = model.roi_heads.stages if cascade else [model.roi_heads]
    for stage, head in enumerate(heads):
        box = f"roi_head.bbox_head.{stage}." if cascade else "roi_head.bbox_head."
        logits, boxes = head.box_predictor(head.box_head(regions))
        scores, regression = _mmdet_box_head(regions, state, box, cascade)
        # mmdet's background is its last score, torchvision's its first; class probabilities agree.
        torch.testing.assert_close(logits.softmax(1)[:, 0], scores.softmax(1)[:, -1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(logits.softmax(1)[:, 1:], scores.softmax(1)[:, :-1], rtol=1e-10, atol=1e-12)
        # Class c's box is mmdet's rows 4(c-1)..4c-1 (torchvision's background box comes first).
        torch.testing.assert_close(boxes[:, 4:], regression, rtol=1e-10, atol=1e-12)

        mask_regions = torch.randn(3, 16, 14, 14, dtype=torch.float64)
        mask = f"roi_head.mask_head.{stage}." if cascade else "roi_head.mask_head."
        masks = head.mask_predictor(head.mask_head(mask_regions))
        torch.testing.assert_close(masks[:, 1:], _mmdet_mask_head(mask_regions, state, mask), rtol=1e-10, atol=1e-12)


def test_mmdet_anchors_are_not_rounded_and_torchvisions_are():
    sizes = {"mmdet": None, "torchvision": None}
    images = ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)])
    level = [torch.zeros(1, 16, 4, 6)]  # stride 16
    for geometry in sizes:
        spec = DenseSpec("detect", create_detector("swin_test", 3).backbone.body.config, ["a", "b", "c"],
                         head=dict(TINY, anchor_sizes=(32,) * 5, geometry=geometry))  # fmt: skip
        generator = build_dense_model(spec).rpn.anchor_generator
        generator.sizes, generator.aspect_ratios = ((32,),), ((0.5, 1.0, 2.0),)
        generator.cell_anchors = [generator.generate_anchors((32,), (0.5, 1.0, 2.0))]
        sizes[geometry] = generator(images, level)[0]
    # mmdet's AnchorGenerator, written out: base size 32 (scale 1), ratios h / w 0.5, 1, 2, centre 0,
    # shifted by the stride over the map, position-major and ratio-minor.
    expected = []
    for y in range(4):
        for x in range(6):
            for ratio in (0.5, 1.0, 2.0):
                w, h = 32 / math.sqrt(ratio), 32 * math.sqrt(ratio)
                expected.append([16 * x - w / 2, 16 * y - h / 2, 16 * x + w / 2, 16 * y + h / 2])
    expected = torch.tensor(expected)
    torch.testing.assert_close(sizes["mmdet"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sizes["torchvision"], expected.round(), rtol=0, atol=1e-5)  # 45.25 x 22.6 -> 46 x 22
    assert (sizes["mmdet"] - sizes["torchvision"]).abs().max() > 0.3


def test_aligned_roi_pool_samples_mmdets_level_and_bin_centres():
    strides = [4, 8, 16, 32]
    side = 1024
    # On a linear map bilinear sampling is exact and the samples of a bin average to its centre.
    features = {}
    for level, stride in enumerate(strides):
        n = side // stride
        y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
        features[str(level)] = (3 * x + 5 * y + 1000 * level).expand(2, 1, n, n).contiguous()  # two images
    pool = AlignedRoIPool(list(features), strides, 7)
    boxes = torch.tensor(
        [
            [100, 120, 140, 150],  # sqrt(area) 34.6 -> level 0
            [200, 210, 320, 330],  # 120 -> level 1 (log2(120 / 56) = 1.1)
            [300, 100, 560, 340],  # 249.8 -> level 2
            [40, 60, 520, 540],  # 480 -> level 3
            [50, 40, 950, 980],  # 919.8 -> level 4, clamped to 3
        ],
        dtype=torch.float64,
    )
    pooled = pool(features, [boxes[:2], boxes[2:]], [(side, side)] * 2)
    for box, got, level in zip(boxes, pooled, (0, 1, 2, 3, 3), strict=True):
        scale = 1 / strides[level]
        x1, y1, x2, y2 = (box * scale - 0.5).tolist()  # mmcv's aligned=True: half a pixel back
        centres_x = x1 + (torch.arange(7, dtype=torch.float64) + 0.5) * (x2 - x1) / 7
        centres_y = y1 + (torch.arange(7, dtype=torch.float64) + 0.5) * (y2 - y1) / 7
        expected = 3 * centres_x[None, :] + 5 * centres_y[:, None] + 1000 * level
        torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-9)
    # torchvision's pooling (aligned=False, other level rule) gives other numbers on the same boxes.
    theirs = MultiScaleRoIAlign(list(features), 7, 2)(features, [boxes[:2], boxes[2:]], [(side, side)] * 2)
    assert (theirs - pooled).abs().max() > 1


def _mmdet_paste(masks, boxes, height, width):
    """mmdet's ``_do_paste_mask`` as the GPU runs it (``skip_empty=False``: the whole image), written out."""
    x0, y0, x1, y1 = boxes.split(1, dim=1)
    ys = ((torch.arange(height, dtype=masks.dtype) + 0.5 - y0) / (y1 - y0) * 2 - 1)[:, :, None]
    xs = ((torch.arange(width, dtype=masks.dtype) + 0.5 - x0) / (x1 - x0) * 2 - 1)[:, None, :]
    grid = torch.stack([xs.expand(-1, height, -1), ys.expand(-1, -1, width)], dim=3)
    return F.grid_sample(masks, grid, align_corners=False)


def test_masks_are_pasted_as_mmdet_pastes_them():
    torch.manual_seed(0)
    masks = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [10.3, 5.7, 80.2, 60.1],  # cells of 2.5 x 2 pixels: samples reach past the rounded box
            [0.0, 0.0, 20.5, 3.2],  # flat, at the corner
            [-5.0, 30.0, 140.0, 99.0],  # past the image on three sides
            [50.5, 50.5, 51.0, 52.0],  # under a pixel wide
            [118.9, 88.2, 119.6, 89.9],  # in the last pixels
        ],
        dtype=torch.float64,
    )
    expected = _mmdet_paste(masks, boxes, 90, 120)
    torch.testing.assert_close(paste_masks(masks, boxes, (90, 120)), expected, rtol=0, atol=1e-12)
    # torchvision's pasting (a widened mask resized to the rounded box) gives other masks.
    assert (paste_masks_in_image(masks, boxes, (90, 120)) - expected).abs().max() > 0.5


def test_a_detector_with_mmdets_geometry_pastes_its_masks_as_mmdet():
    detector = create_detector("swin_test", 3, detector_options={"min_size": 64, "max_size": 96}).eval()
    detector.roi_heads.score_thresh = 0.0  # random weights: keep whatever it finds
    raw = []
    detector.roi_heads.register_forward_hook(lambda module, inputs, output: raw.append(output[0][0]["masks"].clone()))
    with torch.no_grad():
        found = detector([torch.rand(3, 50, 70)])[0]
    assert len(found["boxes"]) > 0 and found["masks"].shape[-2:] == (50, 70)
    expected = _mmdet_paste(raw[0].double(), found["boxes"].double(), 50, 70)
    torch.testing.assert_close(found["masks"].double(), expected, rtol=0, atol=1e-5)  # float32 coordinates
    assert (paste_masks_in_image(raw[0], found["boxes"], (50, 70)) - found["masks"]).abs().max() > 0.1
    # A torchvision-geometry detector (files from before the choice) keeps torchvision's transform.
    assert not isinstance(
        create_detector("swin_test", 3, detector_options={"geometry": "torchvision"}).transform, MmdetTransform
    )


def _mmcv_rescaled(height, width, short, long):
    """mmcv's ``imrescale`` size for ``img_scale=(long, short)``, written out (``rescale_size``)."""
    scale = min(long / max(height, width), short / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def test_a_detector_with_mmdets_geometry_resizes_as_mmcv_rounds():
    options = {"min_size": 800, "max_size": 1333}
    mmdet = create_detector("swin_test", 3, detector_options=options).transform.eval()
    torchvision = create_detector("swin_test", 3, detector_options={**options, "geometry": "torchvision"}).transform
    sizes = [(480, 640), (427, 640), (359, 640), (640, 480), (301, 1000), (612, 612)]
    floored = 0
    for height, width in sizes:
        image = torch.rand(3, height, width)
        resized, _ = mmdet.resize(image, None)
        assert resized.shape[-2:] == _mmcv_rescaled(height, width, 800, 1333)
        floored += torchvision.eval().resize(image, None)[0].shape[-2:] != resized.shape[-2:]
    assert floored == 3  # COCO's 480 x 640: 800 x 1067 in mmdet, 800 x 1066 in torchvision
    # Training (a shorter side drawn from the tuple): boxes and masks follow the rounded size.
    mmdet.train()
    mmdet.min_size = (480,)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0]])
    masks = torch.zeros(1, 427, 640, dtype=torch.uint8)
    masks[0, 20:400, 10:300] = 1
    resized, target = mmdet.resize(torch.rand(3, 427, 640), {"boxes": boxes.clone(), "masks": masks})
    height, width = _mmcv_rescaled(427, 640, 480, 1333)
    assert resized.shape[-2:] == (height, width) == target["masks"].shape[-2:]
    ratio = torch.tensor([width / 640, height / 427] * 2)
    torch.testing.assert_close(target["boxes"], boxes * ratio)


def test_the_torchvision_geometry_resizes_exactly_as_torchvisions_own_transform():
    # swinkit writes the resize out (to refuse too elongated images by name): the same images, boxes
    # and masks as torchvision's GeneralizedRCNNTransform, in test and in training (the same draws).
    ours = create_detector("swin_test", 3, detector_options={**TINY, "geometry": "torchvision"}).transform
    theirs = GeneralizedRCNNTransform((48, 56, 64), 96, ours.image_mean, ours.image_std)
    ours.min_size = theirs.min_size
    generator = torch.Generator().manual_seed(0)
    sizes = [(64, 96), (63, 97), (1, 1), (3, 300), (4, 300), (97, 61), (480, 640), (41, 1000)]
    sizes += [tuple(torch.randint(1, 400, (2,), generator=generator).tolist()) for _ in range(20)]
    refused = 0
    for training in (False, True):
        ours.train(training), theirs.train(training)
        for height, width in sizes:
            image = torch.rand(3, height, width, generator=generator)
            masks = (torch.rand(2, height, width, generator=generator) > 0.5).byte()
            boxes = torch.tensor([[0.0, 0.0, width / 2, height / 3], [1.0, 0.5, width, height]])
            target = {"boxes": boxes, "masks": masks}
            torch.manual_seed(height * 1000 + width)
            try:
                expected = theirs.resize(image, {name: value.clone() for name, value in target.items()})
            except RuntimeError:  # a side resized to 0 pixels: refused by name instead
                with pytest.raises(ValueError, match=f"an image of {height}x{width} resizes to "):
                    ours.resize(image, target)
                refused += 1
                continue
            torch.manual_seed(height * 1000 + width)
            found = ours.resize(image, {name: value.clone() for name, value in target.items()})
            assert torch.equal(found[0], expected[0]), (training, height, width)
            for name in target:
                assert torch.equal(found[1][name], expected[1][name]), (training, height, width, name)
    assert refused >= 2  # 3 x 300 at least, in test and in training


def test_files_written_before_the_geometry_choice_keep_torchvisions_geometry():
    config = create_detector("swin_test", 3).backbone.body.config

    def built(**head):
        return build_dense_model(DenseSpec("detect", config, ["a", "b", "c"], head=dict(TINY, **head)))

    old = built()
    assert isinstance(old.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert old.rpn.anchor_generator.cell_anchors[0].frac().abs().sum() == 0  # whole pixels
    new = built(geometry="mmdet")
    assert isinstance(new.roi_heads.box_roi_pool, AlignedRoIPool)
    assert isinstance(new.roi_heads.mask_roi_pool, AlignedRoIPool)
    assert new.roi_heads.mask_roi_pool.output_size == (14, 14)
    # A cascade written before it followed Swin's configs has one box for every class; a new one a box per class.
    assert built(cascade=True).roi_heads.stages[0].box_predictor.bbox_pred.out_features == 4
    assert built(cascade=True, agnostic_boxes=False).roi_heads.stages[0].box_predictor.bbox_pred.out_features == 16


def test_an_80_class_mmdet_file_without_names_is_cocos_and_named_files_keep_their_names():
    state = {"roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 4)}
    assert mmdet_classes(state, None) == (COCO_CLASSES, COCO_CATEGORY_IDS)
    assert COCO_CATEGORY_IDS[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and COCO_CATEGORY_IDS[-1] == 90
    assert COCO_CLASSES[11] == "stop sign" and COCO_CLASSES[-1] == "toothbrush"
    names = [f"thing{i}" for i in range(80)]
    assert mmdet_classes(state, names) == (names, list(range(1, 81)))
    cascade = {"roi_head.bbox_head.0.fc_cls.weight": torch.zeros(4, 4)}
    assert mmdet_classes(cascade, ["x", "y", "z"]) == (["x", "y", "z"], [1, 2, 3])
    assert mmdet_classes(cascade, ["only one"]) == (["class0", "class1", "class2"], [1, 2, 3])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), {"validation": 3}, size=64)


def test_cli_evaluates_predicts_and_converts_an_mmdet_file(shapes, tmp_path, capsys):
    model = _detector(True, True)
    official = tmp_path / "cascade_mask_rcnn_swin.pth"
    save_mmdet(model, _spec(model, True, True, list(SHAPES)), official)
    data = ["--data", str(shapes / "instances_validation.json"), "--images", str(shapes / "images" / "validation")]
    converted = tmp_path / "converted.safetensors"
    assert main(["detect", "convert", str(official), str(converted)]) == 0
    assert "wrote" in capsys.readouterr().out and load_dense(converted)[1].head["geometry"] == "mmdet"

    metrics = []
    for checkpoint in (official, converted):
        assert main(["detect", "eval", "--checkpoint", str(checkpoint), *data, "--workers", "0", "--json"]) == 0
        metrics.append(json.loads(capsys.readouterr().out))
    assert metrics[0] == metrics[1] and metrics[0]["images"] == 3

    images = sorted((shapes / "images" / "validation").iterdir())[:2]
    results = []
    for checkpoint in (official, converted):
        out = tmp_path / f"predict-{checkpoint.suffix[1:]}"
        args = ["detect", "predict", *map(str, images), "--checkpoint", str(checkpoint), "--output", str(out)]
        assert main([*args, "--score-threshold", "0", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0][0]["detections"] == results[1][0]["detections"] and results[0][0]["detections"]

    # swinkit info describes the whole detector, with its FLOPs at the papers' 1280 x 800.
    assert main(["info", "--checkpoint", str(official), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    whole = load_dense(official)[0]
    assert info["task"] == "detect" and info["heads"] == "Cascade Mask R-CNN" and info["classes"] == list(SHAPES)
    assert info["total_params"] == sum(p.numel() for p in whole.parameters())
    assert info["params"] == sum(p.numel() for p in whole.backbone.body.swin.parameters())
    assert info["input_size"] == [3, 800, 1280] and "features only" in info["text"]
    assert list(info["model_flops_parts"]) == ["backbone", "neck (FPN)", "RPN", "box heads", "mask heads"]
    assert "FLOPs of the whole model at 800x1280" in info["text"]  # tests/test_dense_flops.py checks the count

    # The classifier commands refuse it by name instead of running its backbone headless.
    assert main(["predict", str(images[0]), "--checkpoint", str(official)]) == 2
    assert "is an official mmdet detector file, not a classifier" in capsys.readouterr().err

    back = tmp_path / "back.pth"
    assert main(["detect", "convert", str(converted), str(back)]) == 0
    first, second = (torch.load(path, weights_only=True) for path in (official, back))
    assert first["meta"] == second["meta"] and first["state_dict"].keys() == second["state_dict"].keys()
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])


def test_detectors_that_swinkit_cannot_build_are_refused_by_name(tmp_path, capsys):
    model = _detector(True, False)
    save_mmdet(model, _spec(model, True, False, ["a", "b", "c"]), tmp_path / "m.pth")
    state = torch.load(tmp_path / "m.pth", weights_only=True)["state_dict"]

    def refused(changed: dict, name: str) -> str:
        torch.save({"state_dict": changed}, tmp_path / name)
        with pytest.raises(CheckpointError) as error:
            load_dense(tmp_path / name)
        return str(error.value)

    htc = dict(state, **{"roi_head.semantic_head.conv_logits.weight": torch.zeros(3, 8, 1, 1)})
    assert "roi_head.semantic_head.conv_logits.weight" in refused(htc, "htc.pth")
    nine = dict(state, **{"rpn_head.rpn_cls.weight": torch.zeros(9, 16, 1, 1)})
    assert "9 anchors" in refused(nine, "nine.pth")
    resnet = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    resnet["backbone.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    assert "backbone is not a Swin Transformer" in refused(resnet, "resnet.pth")
    headless = {k: v for k, v in state.items() if not k.startswith("roi_head.bbox_head")}
    assert "roi_head.bbox_head.fc_cls.weight" in refused(headless, "headless.pth")

    # Through the CLI: one line naming the file, exit 2; a segmentation model is not converted.
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "htc.pth"), "--data", "x.json"]) == 2
    assert "htc.pth" in capsys.readouterr().err
    segmentor = tmp_path / "segment.safetensors"
    spec = DenseSpec("segment", model.backbone.body.config, ["a", "b"], head={"channels": 8, "aux": False})
    save_dense(build_dense_model(spec), spec, segmentor)
    assert main(["detect", "convert", str(segmentor), str(tmp_path / "s.pth")]) == 2
    assert "is a segment model" in capsys.readouterr().err
    assert main(["detect", "convert", str(tmp_path / "m.pth"), str(tmp_path / "out.bin")]) == 2
    assert "--to swinkit|mmdet" in capsys.readouterr().err
    # A model file under an export's name (--to given) was written, then refused as a bad export.
    assert main(["detect", "convert", str(tmp_path / "m.pth"), str(tmp_path / "m.onnx"), "--to", "swinkit"]) == 2
    assert "convert writes model files; 'swinkit detect export' writes .onnx files" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_an_mmseg_upernet_file_is_read_whole_with_its_class_names(tmp_path, capsys):
    torch.manual_seed(0)
    config = create_detector("swin_test", 3).backbone.body.config
    spec = DenseSpec("segment", config, ["0", "1", "2", "3"], head={"channels": 8, "aux_channels": 4})
    model = build_dense_model(spec).eval()
    save_dense(model, spec, tmp_path / "ours.safetensors")
    # mmseg's file: the same names (swinkit's segmentation files use them), its wrapper and meta.
    weights = load_file(tmp_path / "ours.safetensors")
    assert {"decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight"} <= set(weights)
    torch.save({"meta": {"CLASSES": ("sky", "tree", "road", "car")}, "state_dict": weights}, tmp_path / "upernet.pth")

    loaded, read = load_dense(tmp_path / "upernet.pth")
    assert read.task == "segment" and read.classes == ["sky", "tree", "road", "car"]
    assert read.head == {"channels": 8, "aux": True, "aux_channels": 4}
    assert read.inference["scale"] == [2048, 512] and read.inference["mode"] == "whole"
    assert read.inference["reduce_zero_label"] is False  # only a 150-class (ADE20K) file
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["out"], model(images)["out"], rtol=0, atol=0)

    ade = {**weights, "decode_head.conv_seg.weight": torch.zeros(150, 8, 1, 1)}
    assert mmseg_spec(ade, {}, "ade.pth").inference["reduce_zero_label"] is True
    assert mmseg_spec(ade, {}, "ade.pth").classes[:3] == ["0", "1", "2"]

    out = tmp_path / "predicted"
    image = tmp_path / "scene.png"
    Image.new("RGB", (48, 40), (90, 140, 200)).save(image)
    assert main(["segment", "predict", str(image), "--checkpoint", str(tmp_path / "upernet.pth"),
                 "--output", str(out), "--json"]) == 0  # fmt: skip
    fractions = json.loads(capsys.readouterr().out)[0]["class_fractions"]
    assert set(fractions) <= set(read.classes) and sum(fractions.values()) == pytest.approx(1.0)
    # segment convert: to a swinkit file and back to mmseg's layout (with the official backbone buffers).
    ours = tmp_path / "converted.safetensors"
    assert main(["segment", "convert", str(tmp_path / "upernet.pth"), str(ours)]) == 0
    assert "UPerNet + FCN auxiliary head, 4 classes" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(load_dense(ours)[0](images)["out"], model(images)["out"], rtol=0, atol=0)
    assert main(["segment", "convert", str(ours), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back["meta"]["CLASSES"] == ("sky", "tree", "road", "car")
    assert all(torch.equal(back["state_dict"][key], value) for key, value in weights.items())
    assert all(key.endswith("relative_position_index") for key in set(back["state_dict"]) - set(weights))
    assert main(["detect", "convert", str(ours), str(tmp_path / "no.pth")]) == 2
    assert "'swinkit detect convert' converts detect models" in capsys.readouterr().err

    assert main(["export", str(tmp_path / "x.onnx"), "--checkpoint", str(tmp_path / "upernet.pth")]) == 2
    assert "is an official mmseg segmentation file, not a classifier" in capsys.readouterr().err


def _mmdet_encode(truths, boxes, stds):
    """mmdet's DeltaXYWHBBoxCoder.encode (means 0): centre offsets over the box's size, log size ratios."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gw, gh = truths[:, 2] - truths[:, 0], truths[:, 3] - truths[:, 1]
    dx = ((truths[:, 0] + truths[:, 2]) - (boxes[:, 0] + boxes[:, 2])) / 2 / width
    dy = ((truths[:, 1] + truths[:, 3]) - (boxes[:, 1] + boxes[:, 3])) / 2 / height
    deltas = torch.stack([dx, dy, torch.log(gw / width), torch.log(gh / height)], dim=1)
    return deltas / torch.tensor(stds, dtype=deltas.dtype)


def test_mask_rcnn_trains_with_the_l1_box_losses_and_proposal_count_of_swins_config():
    torch.manual_seed(0)
    model = create_detector("swin_test", 3, detector_options=dict(TINY, score_threshold=0.0)).double().train()
    assert model.rpn._post_nms_top_n["training"] == 1000  # Swin's Mask R-CNN config; torchvision keeps 2000
    sampled, predicted = [], []
    model.roi_heads.box_roi_pool.register_forward_hook(lambda m, args, out: sampled.append(args[1][0]))
    model.roi_heads.box_predictor.register_forward_hook(lambda m, args, out: predicted.append(out))
    truths = torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]], dtype=torch.float64)
    classes = torch.tensor([1, 3])
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 4:30, 4:30] = masks[1, 20:50, 30:60] = 1
    losses = model([torch.rand(3, 64, 64, dtype=torch.float64)], [{"boxes": truths, "labels": classes, "masks": masks}])
    # The box head's losses written out: each sampled region labelled by the truth it overlaps at
    # IoU >= 0.5 (else background); cross-entropy over all; L1 of the positives' deltas for their
    # class against mmdet's encoding of their truth (stds 0.1, 0.1, 0.2, 0.2), over the sampled count.
    logits, deltas = (t.detach() for t in predicted[0])
    overlap, match = box_iou(sampled[0], truths).max(dim=1)
    labels = torch.where(overlap >= 0.5, classes[match], 0)
    positive = labels > 0
    wanted = _mmdet_encode(truths[match[positive]], sampled[0][positive], (0.1, 0.1, 0.2, 0.2))
    chosen = deltas.view(len(deltas), -1, 4)[positive, labels[positive]]
    expected = (chosen - wanted).abs().sum() / len(labels)
    assert positive.any() and losses["loss_box_reg"].item() == pytest.approx(expected.item(), rel=1e-9)
    assert losses["loss_classifier"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-9)
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_mask"} <= set(losses)

    # The RPN's: L1 of the positive anchors' deltas over the sampled anchors (all of them here: fewer
    # than the 256 a batch samples), binary cross-entropy over the sampled.
    rpn = model.rpn
    objectness = torch.randn(40, dtype=torch.float64)
    anchor_deltas, targets = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
    anchor_labels = torch.tensor([1.0] * 6 + [0.0] * 24 + [-1.0] * 10, dtype=torch.float64)
    objectness_loss, box_loss = rpn.compute_loss(objectness, anchor_deltas, [anchor_labels], [targets])
    assert box_loss.item() == pytest.approx(((anchor_deltas - targets)[:6].abs().sum() / 30).item(), rel=1e-12)
    bce = F.binary_cross_entropy_with_logits(objectness[:30], anchor_labels[:30])
    assert objectness_loss.item() == pytest.approx(bce.item(), rel=1e-12)
    theirs = create_detector("swin_test", 3, detector_options=dict(TINY, losses="torchvision")).rpn
    assert theirs._post_nms_top_n["training"] == 2000
    smooth = theirs.compute_loss(objectness, anchor_deltas, [anchor_labels], [targets])[1]
    assert smooth.item() != pytest.approx(box_loss.item())  # torchvision's smooth L1 (beta 1/9) differs
    cascade = create_detector("swin_test", 3, detector_options=dict(TINY, cascade=True))
    assert cascade.rpn._post_nms_top_n["training"] == 2000  # Swin's cascade config keeps 2000


def test_the_rpn_matches_an_objects_best_anchors_only_when_they_reach_iou_0_3_as_mmdet():
    # Two truths, five anchors. Truth 0's best anchor (1) overlaps it at 0.25, truth 1's (3) at 0.5:
    # both below the positive threshold 0.7. mmdet's assigner (min_pos_iou=0.3) makes anchor 3
    # positive for truth 1 and leaves anchor 1 negative; torchvision makes both positive.
    overlaps = torch.tensor([[0.1, 0.25, 0.0, 0.0, 0.05], [0.0, 0.0, 0.2, 0.5, 0.8]])
    ours = create_detector("swin_test", 3, detector_options=dict(TINY)).rpn.proposal_matcher
    theirs = create_detector("swin_test", 3, detector_options=dict(TINY, losses="torchvision")).rpn.proposal_matcher
    cascade = create_detector("swin_test", 3, detector_options=dict(TINY, cascade=True)).rpn.proposal_matcher
    below, between = Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS
    # anchor 0: 0.1 < 0.3, negative; 2: 0.2, negative; 3: 0.5, between (ignored) unless a low-quality match; 4: 0.8
    assert ours(overlaps).tolist() == [below, below, below, between, 1]
    assert cascade(overlaps).tolist() == [below, below, below, between, 1]
    # torchvision: anchor 1 is truth 0's best, 3 is not truth 1's best (4 is, at 0.8): only anchor 1 changes.
    assert theirs(overlaps).tolist() == [below, 0, below, between, 1]
    overlaps[1, 4] = 0.45  # now anchor 3 (0.5) is truth 1's best: a low-quality match above 0.3, for both
    assert ours(overlaps).tolist() == [below, below, below, 1, between]
    assert theirs(overlaps).tolist() == [below, 0, below, 1, between]


def _mmdet_assign(overlaps, positive, negative, min_iou):
    """mmdet's ``MaxIoUAssigner.assign_wrt_overlaps`` (``gt_max_assign_all=True``) written out as its
    loop, in torchvision's codes: below ``negative``, between, else the truth's index."""
    best_overlap, best_truth = overlaps.max(dim=0)
    assigned = torch.full((overlaps.shape[1],), Matcher.BETWEEN_THRESHOLDS)
    assigned[best_overlap < negative] = Matcher.BELOW_LOW_THRESHOLD
    assigned[best_overlap >= positive] = best_truth[best_overlap >= positive]
    for truth in range(overlaps.shape[0]):
        highest = overlaps[truth].max()
        if highest >= min_iou:
            assigned[overlaps[truth] == highest] = truth
    return assigned


def test_an_anchor_best_for_an_object_goes_to_it_as_in_mmdets_assigner():
    matcher = create_detector("swin_test", 3, detector_options=dict(TINY)).rpn.proposal_matcher
    theirs = create_detector("swin_test", 3, detector_options=dict(TINY, losses="torchvision")).rpn.proposal_matcher
    # Anchor 1 overlaps truth 1 at 0.9 (positive for it) and is truth 0's best (0.4): mmdet gives it to
    # truth 0, torchvision to truth 1. Anchor 3 is the best of truths 2 and 3 (0.6 each): mmdet gives it
    # to the later truth, 3, torchvision to the first of its highest overlaps, 2.
    overlaps = torch.tensor(
        [
            [0.0, 0.4, 0.1, 0.0, 0.2],
            [0.1, 0.9, 0.0, 0.3, 0.95],
            [0.0, 0.0, 0.2, 0.6, 0.5],
            [0.0, 0.0, 0.0, 0.6, 0.1],
        ]
    )
    below = Matcher.BELOW_LOW_THRESHOLD
    assert matcher(overlaps).tolist() == [below, 0, below, 3, 1] == _mmdet_assign(overlaps, 0.7, 0.3, 0.3).tolist()
    assert theirs(overlaps).tolist() == [below, 1, below, 2, 1]
    generator = torch.Generator().manual_seed(0)
    differ = 0
    for _ in range(200):  # random overlaps on a coarse grid, where ties are common
        overlaps = torch.randint(0, 11, (4, 30), generator=generator) / 10
        expected = _mmdet_assign(overlaps, 0.7, 0.3, 0.3)
        assert matcher(overlaps.clone()).tolist() == expected.tolist()
        differ += theirs(overlaps.clone()).tolist() != expected.tolist()
    assert differ > 50  # torchvision's rule differs on many of them


def test_a_dense_file_of_the_same_task_initialises_the_heads_for_fine_tuning(shapes, tmp_path, caplog):
    written = _detector(True, False, classes=5)  # a 5-class detector stands for a COCO one
    save_mmdet(written, _spec(written, True, False, [f"thing{i}" for i in range(5)]), tmp_path / "coco.pth")
    torch.manual_seed(3)
    model = create_detector("swin_test", 3, detector_options=dict(TINY))
    report = load_dense_heads(model, tmp_path / "coco.pth", "detect")
    # mmdet's load_from: every head tensor that fits, the class-dependent layers left to train afresh.
    layers = ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits")
    class_dependent = {f"roi_heads.{name}.{part}" for part in ("weight", "bias") for name in layers}
    heads = {k for k in written.state_dict() if not k.startswith("backbone.body.")}
    assert set(report["skipped"]) == class_dependent and set(report["taken"]) == heads - class_dependent
    own, theirs = model.state_dict(), written.state_dict()
    assert all(torch.equal(own[key], theirs[key]) for key in report["taken"])
    scores = "roi_heads.box_predictor.cls_score.weight"
    assert own[scores].shape == (4, 32) and not torch.equal(own[scores], theirs[scores][:4])  # left as initialised
    segmentor = build_dense_model(DenseSpec("segment", model.backbone.body.config, ["a"], head={"channels": 8}))
    assert load_dense_heads(segmentor, tmp_path / "coco.pth", "segment") == {"taken": [], "skipped": []}

    # detect train --checkpoint: the backbone and the heads that fit, said in the log.
    data = ["--data", str(shapes / "instances_validation.json"), "--images", str(shapes / "images" / "validation")]
    validation = ["--val-data", data[1], "--val-images", data[3]]
    fast = ["--model", "swin_test", "--min-sizes", "64", "--max-size", "96", "--fpn-channels", "16", "--box-head-dim",
            "32", "--mask-head-dim", "8", "--roi-batch-size", "64", "--workers", "0", "--no-progress"]  # fmt: skip
    caplog.set_level("INFO")
    args = ["detect", "train", *data, *validation, *fast, "--checkpoint", str(tmp_path / "coco.pth")]
    assert main([*args, "--epochs", "1", "--batch-size", "3", "--output", str(tmp_path / "tuned")]) == 0
    assert f"heads from {tmp_path / 'coco.pth'}: {len(report['taken'])} tensors taken" in caplog.text
