"""Reading checkpoint files safely and reporting what does not fit."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import swinkit
from swinkit.checkpoint import CheckpointError, detect_format, read_checkpoint


@pytest.fixture(scope="module")
def tiny():
    return swinkit.create_model("swin_test", num_classes=3)


def test_random_bytes_file_is_not_a_checkpoint(tmp_path, tiny):
    path = tmp_path / "weights.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"weights\.pth is not a checkpoint"):
        swinkit.load_checkpoint(tiny, path)


def test_truncated_files(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pth")
    save_file(dict(tiny.state_dict()), str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.safetensors")


def test_empty_missing_and_directory(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty"):
        read_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth does not exist"):
        read_checkpoint(tmp_path / "nothere.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth.*safetensors"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_other_variant_is_named_in_the_error(tmp_path):
    other = swinkit.create_model("swin_test", num_classes=3, depths=(2, 2, 4, 2))
    torch.save({"model": other.state_dict()}, tmp_path / "deeper.pth")
    model = swinkit.create_model("swin_test", num_classes=3)
    with pytest.raises(CheckpointError, match=r"depths=\(2, 2, 4, 2\).*depths=\(2, 2, 2, 2\)") as error:
        swinkit.load_checkpoint(model, tmp_path / "deeper.pth")
    assert "layers.2.blocks.2.norm1.weight" in str(error.value)  # unexpected keys are named


def test_not_swin_state_dict(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a Swin Transformer checkpoint.*conv.weight"):
        swinkit.create_model("swin_test", checkpoint=tmp_path / "resnet.pth")


def test_shape_mismatch_is_reported_and_non_strict_loads_the_rest(tmp_path):
    source = swinkit.create_model("swin_test", num_classes=3)
    state = dict(source.state_dict())
    state["layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(5, 16)
    model = swinkit.create_model("swin_test", num_classes=3)
    with pytest.raises(CheckpointError, match=r"shape mismatch layers.0.blocks.0.mlp.fc1.weight: model \(64, 16\)"):
        swinkit.load_checkpoint(model, state)
    report = swinkit.load_checkpoint(model, state, strict=False)
    assert report.mismatched == [("layers.0.blocks.0.mlp.fc1.weight", (64, 16), (5, 16))]
    assert torch.equal(model.layers[0].blocks[0].mlp.fc2.weight, source.layers[0].blocks[0].mlp.fc2.weight)


def test_head_mismatch_reinitialises_head_and_says_so():
    source = swinkit.create_model("swin_test", num_classes=3)
    model = swinkit.create_model("swin_test", num_classes=5, checkpoint=None)
    head_before = model.head.weight.clone()
    report = swinkit.load_checkpoint(model, source.state_dict())
    assert report.ok and "3 classes" in report.reinitialized[0]
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.norm.weight, source.norm.weight)


def test_name_without_num_classes_takes_the_files_head(tmp_path):
    source = swinkit.create_model("swin_test", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "three.pth")
    assert swinkit.create_model("swin_test", checkpoint=tmp_path / "three.pth").config.num_classes == 3
    explicit = swinkit.create_model("swin_test", checkpoint=tmp_path / "three.pth", num_classes=8)
    assert explicit.config.num_classes == 8 and explicit.load_report.reinitialized


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    source = swinkit.create_model("swin_test", num_classes=3)
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ddp.pth")
    model = swinkit.create_model("swin_test", num_classes=3, checkpoint=tmp_path / "ddp.pth")
    assert model.load_report.ok


def test_create_model_from_foreign_file_infers_architecture(tmp_path):
    source = swinkit.create_model("swin_test", num_classes=3)
    save_file(dict(source.state_dict()), str(tmp_path / "plain.safetensors"))
    model = swinkit.create_model(checkpoint=tmp_path / "plain.safetensors")
    c = model.config
    assert (c.embed_dim, c.depths, c.num_heads, c.window_size, c.num_classes) == (16, (2, 2, 2, 2), (1, 2, 2, 4), 4, 3)


def test_detect_format():
    import timm
    import torchvision

    state = swinkit.create_model("swin_test", num_classes=3).state_dict()
    assert detect_format(state) == "official"
    assert detect_format({f"backbone.{k}": v for k, v in state.items()}) == "official"
    assert detect_format(timm.create_model("swin_tiny_patch4_window7_224").state_dict()) == "timm"
    assert detect_format(torchvision.models.swin_t().state_dict()) == "torchvision"


def test_backbone_from_classifier_file_reports_fresh_output_norms():
    source = swinkit.create_model("swin_test", num_classes=3)
    backbone = swinkit.create_model("swin_test", features_only=True)
    report = swinkit.load_checkpoint(backbone, source.state_dict())
    assert report.ok and "norm0" in report.reinitialized[0]
    assert torch.equal(backbone.layers[3].blocks[1].mlp.fc1.weight, source.layers[3].blocks[1].mlp.fc1.weight)
