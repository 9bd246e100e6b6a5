"""Whole-model FLOPs of the dense models: the published figures, and the count against module hooks.

The hook counter here applies OpenMMLab's rules (the counter behind the published figures) to
swinkit's real modules: convolutions and linear layers, LayerNorm twice per element, ReLU modules,
adaptive pooling, and the attention's two products seen at each attention module's input.
"""

import dataclasses
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from swinkit.dense.flops import MASK_PROPOSALS, PROPOSALS, backbone_flops, dense_flops
from swinkit.dense.heads import AdaptiveAvgPool
from swinkit.dense.weights import build_dense_model, preset_spec
from swinkit.model import WindowAttention
from swinkit.model_v2 import WindowAttentionV2

# The Swin papers' tables and the official repositories' READMEs: (FLOPs in G, parameters in M).
PUBLISHED = [
    ("swin_t", "mask_rcnn", 267, 48),
    ("swin_s", "mask_rcnn", 359, 69),
    ("swin_t", "cascade_mask_rcnn", 745, 86),
    ("swin_s", "cascade_mask_rcnn", 838, 107),
    ("swin_b", "cascade_mask_rcnn", 982, 145),
    ("swin_t", "upernet", 945, 60),
    ("swin_s", "upernet", 1038, 81),
    ("swin_b", "upernet", 1188, 121),
]


@pytest.mark.parametrize(("name", "kind", "gflops", "millions"), PUBLISHED)
def test_published_dense_flops_and_parameters(name, kind, gflops, millions):
    spec = preset_spec(name, kind)
    assert round(dense_flops(spec).total / 1e9) == gflops  # at 1280 x 800 or 512 x 2048
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_dense_model(spec)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


class HookCounter:
    """OpenMMLab's per-module rules, summed over the modules of ``root`` while it runs."""

    def __init__(self, root: nn.Module, skip=lambda name, module: False) -> None:
        self.total = 0
        self.handles = [
            module.register_forward_hook(self._count) for name, module in root.named_modules() if not skip(name, module)
        ]

    def _count(self, module, inputs, output):
        x = inputs[0]
        if type(module) is nn.Conv2d:
            per_output = module.in_channels * module.kernel_size[0] * module.kernel_size[1] + (module.bias is not None)
            self.total += output.numel() * per_output
        elif type(module) is nn.ConvTranspose2d:
            k = module.kernel_size[0] * module.kernel_size[1]
            self.total += x[:, 0].numel() * k * module.in_channels * module.out_channels + output.numel()
        elif type(module) is nn.Linear:
            self.total += x.numel() * module.out_features
        elif type(module) is nn.LayerNorm:
            self.total += 2 * x.numel()
        elif type(module) is nn.ReLU:
            self.total += output.numel()
        elif type(module) is AdaptiveAvgPool:
            self.total += x.numel()
        elif type(module) in (WindowAttention, WindowAttentionV2):  # q k^T and attn v: (B * nW, N, C) windows
            self.total += 2 * x.shape[1] * x.numel()
            if type(module) is WindowAttentionV2:  # its qkv runs as F.linear (with the q, v biases), unhooked
                self.total += x.numel() * module.qkv.out_features

    def close(self) -> int:
        for handle in self.handles:
            handle.remove()
        return self.total


def _backbone(spec) -> nn.Module:
    model = build_dense_model(spec).eval()
    for module in model.modules():
        if isinstance(module, (WindowAttention, WindowAttentionV2)):
            module.attn_impl = "reference"  # through the modules, so that their hooks see the work
    return model


@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
@pytest.mark.parametrize("size", [(75, 101), (64, 64), (130, 47)])
def test_backbone_count_equals_the_hooks_at_padded_sizes(size, variant):
    # V2: the hooks also see each block's position-bias MLP (linear layers and a ReLU module).
    spec = preset_spec(variant, "upernet", 3)
    spec = dataclasses.replace(spec, backbone=spec.backbone.replace(window_size=5))  # windows pad at every stage
    swin = _backbone(spec).backbone.swin
    counter = HookCounter(swin)
    with torch.no_grad():
        swin(torch.randn(1, 3, *size))
    assert counter.close() == backbone_flops(spec.backbone, *size)[0]


def test_detector_parts_equal_the_hooks():
    spec = preset_spec("swin_test", "cascade_mask_rcnn", 3)
    model, size = _backbone(spec), (75, 101)
    report = dense_flops(spec, size)
    with torch.no_grad():
        features = OrderedDict((str(i), x) for i, x in enumerate(model.backbone.body(torch.randn(1, 3, *size))))
        counter = HookCounter(model.backbone.fpn)
        maps = model.backbone.fpn(features)
        assert counter.close() == report.parts["neck (FPN)"]
        # torchvision's RPN conv carries a ReLU module; mmdet applies F.relu, which the counter misses.
        counter = HookCounter(model.rpn.head, skip=lambda name, module: isinstance(module, nn.ReLU))
        model.rpn.head(list(maps.values()))
        assert counter.close() == report.parts["RPN"]
        boxes = masks = 0
        for stage in model.roi_heads.stages:
            counter = HookCounter(stage)
            stage.box_predictor(stage.box_head(torch.randn(PROPOSALS, 256, 7, 7)))
            # torchvision's box regression has rows for the background too: 4 outputs mmdet lacks.
            boxes += counter.close() - PROPOSALS * 4 * stage.box_predictor.bbox_pred.in_features
            counter = HookCounter(stage)
            stage.mask_predictor(stage.mask_head(torch.randn(MASK_PROPOSALS, 256, 14, 14)))
            # Likewise a background mask channel (28 x 28 outputs of a 1 x 1 conv with a bias).
            logits = stage.mask_predictor.mask_fcn_logits
            masks += counter.close() - MASK_PROPOSALS * 28 * 28 * (logits.in_channels + 1)
    assert boxes == report.parts["box heads"] and masks == report.parts["mask heads"]


def test_two_layer_box_head_of_mask_rcnn_equals_the_hooks():
    spec = preset_spec("swin_test", "faster_rcnn", 3)
    model = _backbone(spec)
    heads = model.roi_heads
    counter = HookCounter(heads)
    with torch.no_grad():
        heads.box_predictor(heads.box_head(torch.randn(PROPOSALS, 256, 7, 7)))
    box_dim = heads.box_head.fc7.out_features
    # torchvision's two-layer head applies F.relu where mmdet has ReLU modules (counted there).
    expected = counter.close() + 2 * PROPOSALS * box_dim - PROPOSALS * 4 * box_dim
    assert expected == dense_flops(spec).parts["box heads"] and "mask heads" not in dense_flops(spec).parts


def test_upernet_decode_head_equals_the_hooks():
    spec = preset_spec("swin_test", "upernet", 5)
    model, size = _backbone(spec), (130, 47)
    with torch.no_grad():
        maps = model.backbone(torch.randn(1, 3, *size))
        counter = HookCounter(model.decode_head)  # the auxiliary head is training-only, as in mmseg
        model.decode_head(maps)
    assert counter.close() == dense_flops(spec, size).parts["decode head"]


def test_info_describes_a_preset_detector_and_refuses_bad_requests(capsys):
    from swinkit.cli import main

    assert main(["info", "swin_t", "--dense", "cascade_mask_rcnn", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["model_flops"] / 1e9) == 745 and info["heads"] == "Cascade Mask R-CNN"
    assert info["classes"][0] == "person" and sum(info["model_flops_parts"].values()) == info["model_flops"]
    assert main(["info", "swin_t", "--dense", "upernet", "--classes", "0"]) == 2
    assert "number of classes must be positive, got 0" in capsys.readouterr().err
    assert main(["info", "swin_t", "--classes", "3"]) == 2
    assert "--classes goes with --dense" in capsys.readouterr().err
    assert main(["info", "swin_t", "--dense", "retinanet"]) == 2
    assert "unknown dense model kind 'retinanet'; accepted: mask_rcnn, faster_rcnn" in capsys.readouterr().err
