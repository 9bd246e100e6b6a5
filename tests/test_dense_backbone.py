"""The dense backbone: map shapes for any input size, frozen stages, official dense checkpoints, heads."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import perturb
from swinkit.dense import FPNNeck, create_backbone, create_detector, create_segmentor, segmentation_loss
from swinkit.dense.weights import load_dense_weights, to_file_keys
from swinkit.model import relative_position_index
from swinkit.train.optim import build_optimizer


@pytest.mark.parametrize("always_shift", [True, False])
@pytest.mark.parametrize("size", [(37, 53), (64, 64), (29, 97)])
def test_backbone_maps_for_odd_sizes(size, always_shift):
    backbone = create_backbone("swin_test", always_shift=always_shift).eval()
    maps = backbone(torch.randn(2, 3, *size))
    assert backbone.out_channels == [16, 32, 64, 128] and backbone.strides == [4, 8, 16, 32]
    for x, channels, stride in zip(maps, backbone.out_channels, backbone.strides, strict=True):
        assert x.shape == (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert torch.isfinite(x).all()


def test_out_indices_and_heads_keep_the_input_size():
    backbone = create_backbone("swin_test", out_indices=(1, 3))
    assert [tuple(x.shape[1:]) for x in backbone(torch.randn(1, 3, 45, 45))] == [(32, 6, 6), (128, 2, 2)]
    segmentor = create_segmentor("swin_test", num_classes=5, channels=16, aux_channels=8).eval()
    outputs = segmentor(torch.randn(2, 3, 45, 71))
    assert outputs["out"].shape == (2, 5, 45, 71) and outputs["aux"].shape == (2, 5, 3, 5)
    neck = FPNNeck([16, 32, 64, 128], 24)
    fused = neck(create_backbone("swin_test")(torch.randn(1, 3, 45, 71)))
    assert [tuple(x.shape) for x in fused] == [(1, 24, 12, 18), (1, 24, 6, 9), (1, 24, 3, 5), (1, 24, 2, 3)]


def test_detector_on_odd_sizes_returns_boxes_inside_each_image():
    options = dict(min_size=48, max_size=80, fpn_channels=16, box_head_dim=32, mask_head_dim=8)
    detector = create_detector("swin_test", num_classes=2, detector_options=options).eval()
    with torch.no_grad():
        outputs = detector([torch.rand(3, 41, 67), torch.rand(3, 50, 33)])
    for output, (height, width) in zip(outputs, [(41, 67), (50, 33)], strict=True):
        assert output["masks"].shape[1:] == (1, height, width)
        boxes = output["boxes"]
        assert (boxes[:, 2] <= width + 1e-4).all() and (boxes[:, 3] <= height + 1e-4).all()


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode(frozen_stages):
    model = create_segmentor(
        "swin_test", num_classes=3, channels=16, aux_channels=8, frozen_stages=frozen_stages, drop_path_rate=0.2
    )
    swin = model.backbone.swin
    frozen = [swin.patch_embed] + [m for i in range(frozen_stages) for m in (swin.layers[i], getattr(swin, f"norm{i}"))]
    trained = [swin.layers[frozen_stages], getattr(swin, f"norm{frozen_stages}"), model.decode_head]
    # Frozen at construction, so before any DDP wrapping, and left out of the optimizer.
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    optimised = {id(p) for group in build_optimizer(model, 0.05, None).param_groups for p in group["params"]}
    assert not optimised & {id(p) for m in frozen for p in m.parameters()}

    model.train()
    assert not any(sub.training for m in frozen for sub in m.modules())
    assert all(sub.training for m in trained for sub in m.modules())
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    segmentation_loss(model(images), masks).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for m in trained for p in m.parameters())
    model.eval()
    model.train(True)
    assert not swin.patch_embed.training and swin.layers[frozen_stages].training


def test_frozen_stages_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="frozen_stages must be an int between -1 and 4, got 5"):
        create_backbone("swin_test", frozen_stages=5)


def _official_detection_file(source, path):
    """An mmdet-style Swin detector file: ``backbone.`` keys with their index buffers, neck and heads beside."""
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    for stage, layer in enumerate(source.layers):
        for block_index, block in enumerate(layer.blocks):
            window = (block.window_size, block.window_size)
            index = relative_position_index(window, window, torch.device("cpu"))
            state[f"backbone.layers.{stage}.blocks.{block_index}.attn.relative_position_index"] = index.view(
                window[0] ** 2, -1
            )
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 16, 1, 1)
    state["rpn_head.rpn_conv.weight"] = torch.randn(256, 256, 3, 3)
    state["roi_head.bbox_head.fc_cls.weight"] = torch.randn(81, 1024)
    torch.save({"meta": {"epoch": 36}, "state_dict": state}, path)


def test_official_detection_backbone_checkpoint_loads(tmp_path):
    source = perturb(create_backbone("swin_test").swin)
    assert {f"norm{i}.weight" for i in range(4)} <= set(source.state_dict())
    _official_detection_file(source, tmp_path / "mask_rcnn_swin.pth")

    backbone = create_backbone("swin_test", checkpoint=tmp_path / "mask_rcnn_swin.pth").eval()
    report = backbone.swin.load_report
    assert report.ok and "neck" in " ".join(report.notes) and "roi_head" in " ".join(report.notes)
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.swin.state_dict()[key], value), key
    images = torch.randn(1, 3, 40, 56)
    for ours, theirs in zip(backbone(images), source.eval()(images), strict=True):
        assert torch.equal(ours, theirs)

    detector = create_detector("swin_test", 2, tmp_path / "mask_rcnn_swin.pth", frozen_stages=1)
    assert torch.equal(detector.backbone.body.swin.norm3.weight, source.norm3.weight)


def test_whole_segmentor_in_the_mmseg_layout_loads_by_name(tmp_path):
    source = perturb(create_segmentor("swin_test", num_classes=4, channels=16, aux_channels=8)).eval()
    state = to_file_keys(source.state_dict(), "segment")
    mmseg_keys = [
        "backbone.norm0.weight",
        "decode_head.psp_modules.0.1.conv.weight",
        "decode_head.bottleneck.bn.weight",
        "decode_head.lateral_convs.2.conv.weight",
        "decode_head.fpn_bottleneck.conv.weight",
        "decode_head.conv_seg.bias",
        "auxiliary_head.convs.0.bn.running_var",
        "auxiliary_head.conv_seg.weight",
    ]
    assert set(mmseg_keys) <= set(state)
    state["backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "upernet_swin.pth")

    model = create_segmentor("swin_test", num_classes=4, channels=16, aux_channels=8).eval()
    load_dense_weights(model, tmp_path / "upernet_swin.pth", "segment")
    images = torch.randn(1, 3, 48, 40)
    assert torch.equal(model(images)["out"], source(images)["out"])
    wrong = create_segmentor("swin_test", num_classes=5, channels=16, aux_channels=8)
    with pytest.raises(ValueError, match=r"shape mismatches.*decode_head.conv_seg.weight"):
        load_dense_weights(wrong, tmp_path / "upernet_swin.pth", "segment")
