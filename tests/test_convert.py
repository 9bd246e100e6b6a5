"""``convert``: any layout to any other and back, bit for bit; the CLI command; clear refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

import swinkit
from helpers import perturb
from swinkit.checkpoint import FORMATS, CheckpointError, convert, read_any
from swinkit.cli import main

# A config every layout can hold: no stage clamped (window 4 at 128 px), patch norm, no ape.
ARCH = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8), window_size=4, img_size=128, num_classes=5)
CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def _target(tmp_path, fmt: str, tag: str = ""):
    return (
        tmp_path / f"{fmt}{tag}"
        if fmt == "hf"
        else tmp_path / f"{fmt}{tag}.{'pth' if fmt == 'official' else 'safetensors'}"
    )


@pytest.fixture(scope="module")
def swinkit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("convert") / "source.safetensors"
    model = perturb(swinkit.create_model("swin_test", **ARCH))
    swinkit.save(model, path, class_names=CLASSES)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_there_and_back_is_bit_identical(fmt, swinkit_file, tmp_path):
    there = convert(swinkit_file, _target(tmp_path, fmt), to=fmt)
    assert there.target_format == fmt and read_any(there.target).format == fmt
    back = convert(there.target, tmp_path / "back.safetensors", to="swinkit")
    original, returned = read_any(swinkit_file), read_any(back.target)
    assert original.state_dict.keys() == returned.state_dict.keys()
    for key, value in original.state_dict.items():
        assert returned.state_dict[key].dtype == value.dtype and torch.equal(returned.state_dict[key], value), key
    if fmt in ("swinkit", "hf"):  # these layouts carry class names (HF as id2label)
        assert returned.class_names == CLASSES


def test_every_pair_of_layouts(swinkit_file, tmp_path):
    """A chain through every ordered pair ends with the weights it started with."""
    current, tag = swinkit_file, 0
    for source_fmt, target_fmt in itertools.permutations(FORMATS, 2):
        if read_any(current).format != source_fmt:
            tag += 1
            current = convert(current, _target(tmp_path, source_fmt, str(tag)), to=source_fmt).target
        tag += 1
        current = convert(current, _target(tmp_path, target_fmt, str(tag)), to=target_fmt).target
    final = read_any(current).state_dict
    for key, value in read_any(swinkit_file).state_dict.items():
        assert torch.equal(final[key], value), key


def test_half_precision_stays_half(tmp_path):
    model = swinkit.create_model("swin_test", **ARCH).half()
    swinkit.save(model, tmp_path / "half.safetensors")
    result = convert(tmp_path / "half.safetensors", tmp_path / "timm.safetensors", to="timm")
    assert all(v.dtype == torch.float16 for v in read_any(result.target).state_dict.values())


def test_cli_convert(swinkit_file, tmp_path, capsys):
    assert main(["convert", str(swinkit_file), str(tmp_path / "official.pth"), "--to", "official"]) == 0
    assert "official layout" in capsys.readouterr().out
    state = torch.load(tmp_path / "official.pth", weights_only=True)
    assert set(state) == {"model"} and "layers.0.blocks.1.attn_mask" in state["model"]
    with pytest.raises(SystemExit):  # argparse lists the accepted layouts
        main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "x.safetensors"), "--to", "tflite"])
    assert main(["convert", str(tmp_path / "nothere.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert "nothere.pth does not exist" in capsys.readouterr().err


def test_layouts_that_cannot_hold_the_model_say_why(tmp_path):
    clamped = swinkit.create_model("swin_test")  # stage 3's 2x2 map clamps the window 4 -> 2
    swinkit.save(clamped, tmp_path / "clamped.safetensors")
    with pytest.raises(ValueError, match=r"torchvision layout: .*stages \[3\] of this model are clamped"):
        convert(tmp_path / "clamped.safetensors", tmp_path / "tv.pth", to="torchvision")
    backbone = swinkit.create_model("swin_test", **{**ARCH, "num_classes": 1000}, features_only=True)
    swinkit.save(backbone, tmp_path / "backbone.safetensors")
    with pytest.raises(ValueError, match=r"timm layout: timm has no backbone state dict"):
        convert(tmp_path / "backbone.safetensors", tmp_path / "timm.pth", to="timm")
    with pytest.raises(ValueError, match="unknown target format 'onnx'"):
        convert(tmp_path / "backbone.safetensors", tmp_path / "x.onnx", to="onnx")


def test_backbone_round_trips_through_official_and_hf(tmp_path):
    backbone = perturb(swinkit.create_model("swin_test", **{**ARCH, "num_classes": 1000}, features_only=True))
    swinkit.save(backbone, tmp_path / "backbone.safetensors")
    for fmt in ("official", "hf"):
        there = convert(tmp_path / "backbone.safetensors", _target(tmp_path, fmt), to=fmt)
        back = read_any(convert(there.target, tmp_path / f"back_{fmt}.safetensors").target)
        assert all(torch.equal(back.state_dict[k], v) for k, v in backbone.state_dict().items())


def test_incomplete_file_is_refused_naming_the_key(swinkit_file, tmp_path):
    state = dict(read_any(swinkit_file).state_dict)
    del state["layers.2.blocks.1.mlp.fc2.bias"]
    state["layers.0.blocks.0.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"(?s)layers\.2\.blocks\.1\.mlp\.fc2\.bias.*layers\.0\.blocks\.0\.extra"):
        convert(tmp_path / "broken.pth", tmp_path / "out.safetensors")
