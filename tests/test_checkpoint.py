"""Reading checkpoint files safely and reporting what does not fit."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import swinkit
from helpers import perturb, write_digit_folder
from swinkit.checkpoint import CheckpointError, detect_format, read_any, read_checkpoint
from swinkit.cli import main
from swinkit.predict import predict


@pytest.fixture(scope="module")
def tiny():
    return swinkit.create_model("swin_test", num_classes=3)


def test_random_bytes_file_is_not_a_checkpoint(tmp_path, tiny):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"\x00" + random.Random(0).randbytes(4095))  # seeded; byte 0 is no pickle / zip / JSON header
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
    # As many classes from features of another width: the report says which (not "3 classes, the model 3").
    wider = swinkit.create_model("swin_test", num_classes=3, embed_dim=32)
    with pytest.raises(CheckpointError) as error:
        swinkit.load_checkpoint(wider, source.state_dict())
    assert "head: the file has 3 classes of 128 features, the model's of 256" in str(error.value)
    assert "The model must have the file's architecture: name its preset" in str(error.value)


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


def test_malicious_pickle_is_refused_by_every_entry_point(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(str(marker))}, tmp_path / "evil.bin")
    for load in (
        lambda: swinkit.create_model(checkpoint=tmp_path / "evil.bin"),
        lambda: swinkit.load_checkpoint(swinkit.create_model("swin_test"), tmp_path / "evil.bin"),
        lambda: swinkit.checkpoint.convert(tmp_path / "evil.bin", tmp_path / "out.safetensors"),
    ):
        with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.bin.*weights_only=True.*safetensors"):
            load()
    assert not marker.exists()  # the payload's open() never ran


def test_errors_name_the_file(tmp_path):
    torch.save({"encoder.layer.0.attention.query.weight": torch.zeros(4, 4)}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"vit\.pth: the state dict is not a Swin Transformer checkpoint"):
        swinkit.create_model(checkpoint=tmp_path / "vit.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match=r"folder is a directory; .*Hugging Face model directory"):
        swinkit.create_model(checkpoint=tmp_path / "folder")


def test_load_checkpoint_takes_either_argument_order():
    source = swinkit.create_model("swin_test", num_classes=3)
    model = swinkit.create_model("swin_test", num_classes=3)
    assert swinkit.load_checkpoint(source.state_dict(), model).ok
    assert torch.equal(model.head.weight, source.head.weight)


def test_non_strict_load_returns_and_logs_the_report(caplog):
    state = dict(swinkit.create_model("swin_test", num_classes=3).state_dict())
    del state["layers.1.blocks.0.norm1.weight"]
    model = swinkit.create_model("swin_test", num_classes=3)
    with caplog.at_level("WARNING", logger="swinkit.checkpoint.load"):
        report = swinkit.load_checkpoint(model, state, strict=False)
    assert report.missing == ["layers.1.blocks.0.norm1.weight"]
    assert "layers.1.blocks.0.norm1.weight" in caplog.text


def test_official_detection_backbone_loads_into_features_only(tmp_path):
    """An mmdet-style file: ``backbone.`` keys with per-stage norm0..norm3, index buffers, neck and head."""
    source = swinkit.create_model("swin_test", features_only=True)
    perturb(source)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    for i, depth in enumerate(source.config.depths):
        for j in range(depth):
            state[f"backbone.layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(
                16, 16, dtype=torch.long
            )
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 16, 1, 1)
    state["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 8)
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, tmp_path / "mask_rcnn_swin.pth")

    model = swinkit.create_model("swin_test", features_only=True, checkpoint=tmp_path / "mask_rcnn_swin.pth")
    assert model.load_report.ok and model.load_report.format == "official"
    assert "neck" in str(model.load_report) and "roi_head" in str(model.load_report)
    inferred = swinkit.create_model(checkpoint=tmp_path / "mask_rcnn_swin.pth")
    assert inferred.config.features_only and inferred.config.out_indices == (0, 1, 2, 3)
    assert inferred.config.always_shift  # the official detection rule
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(model(x), source(x), strict=True):
            assert torch.equal(got, want)


def test_window_7_to_12_resizes_tables_bicubic_and_runs_at_384(tmp_path):
    source = swinkit.create_model("swin_test", img_size=224, window_size=7)
    torch.save({"model": source.state_dict()}, tmp_path / "window7.pth")
    model = swinkit.create_model("swin_test", img_size=384, window_size=12, checkpoint=tmp_path / "window7.pth")
    report = model.load_report
    assert report.ok and "13x13 to 23x23" in report.adapted[0] and "window 7 -> 12" in report.adapted[0]
    for i in range(4):
        old = source.layers[i].blocks[1].attn.relative_position_bias_table  # (169, nH)
        heads = old.shape[1]
        expected = F.interpolate(old.detach().T.reshape(1, heads, 13, 13), size=(23, 23), mode="bicubic")
        new = model.layers[i].blocks[1].attn.relative_position_bias_table
        assert torch.equal(new.detach(), expected.reshape(heads, 23 * 23).T)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def _official_geometric_positions(old_side: int, new_side: int) -> list[float]:
    """SimMIM fine-tuning's offsets, written out from utils_simmim.remap_pretrained_keys_swin: 0 and
    +-(1 + q + ... + q**k), q bisected in [1.01, 1.5] until the sum of half terms nears new_side // 2."""
    half = old_side // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        total = sum(q**k for k in range(half))
        left, right = (left, q) if total > new_side // 2 else (q, right)
    distances = [sum(q**k for k in range(count)) for count in range(1, half + 1)]
    return [-d for d in reversed(distances)] + [0.0] + distances


def test_simmim_fine_tuning_resizes_tables_geometrically_by_the_official_rule(tmp_path):
    # The official SimMIM fine-tuning spreads the old offsets geometrically and interpolates each head
    # with scipy's cubic interp2d: FITPACK's interpolating spline on the grid, which RectBivariateSpline
    # with s=0 computes too (interp2d left SciPy in 1.14), evaluated at -6..6.
    from scipy.interpolate import RectBivariateSpline

    source = swinkit.create_model("swin_test", img_size=192, window_size=6)  # a SimMIM encoder's geometry
    torch.save({"model": source.state_dict()}, tmp_path / "window6.pth")
    model = swinkit.create_model(
        "swin_test", img_size=224, window_size=7, checkpoint=tmp_path / "window6.pth", table_resize="geometric"
    )
    assert "resized geometric from 11x11 to 13x13 (window 6 -> 7, the official SimMIM fine-tuning rule)" in str(
        model.load_report
    )
    positions = _official_geometric_positions(11, 13)
    targets = torch.arange(-6.0, 7.0).double().numpy()
    for stage in range(4):
        old = source.layers[stage].blocks[0].attn.relative_position_bias_table.detach().double()
        expected = []
        for head in range(old.shape[1]):
            grid = old[:, head].reshape(11, 11).numpy()  # rows: the first offset (interp2d's y)
            spline = RectBivariateSpline(positions, positions, grid, kx=3, ky=3, s=0)
            expected.append(torch.from_numpy(spline(targets, targets)).reshape(-1))
        expected = torch.stack(expected, dim=1)
        new = model.layers[stage].blocks[0].attn.relative_position_bias_table.detach()
        torch.testing.assert_close(new, expected.float(), rtol=1e-6, atol=1e-6)
        # In float64 the resize is the spline to rounding; bicubic gives another table.
        exact = swinkit.checkpoint.adapt.resize_relative_position_table_geometric(old, 169)
        assert (exact - expected).abs().max() < 1e-12 * expected.abs().max()
        bicubic = swinkit.checkpoint.adapt.resize_relative_position_table(old, 169)
        assert (bicubic - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="table_resize must be one of bicubic, geometric, got 'nearest'"):
        swinkit.load_checkpoint(model, source.state_dict(), table_resize="nearest")
    with pytest.raises(ValueError, match="a geometric resize needs a window of 3 or more"):
        swinkit.checkpoint.adapt.resize_relative_position_table_geometric(torch.zeros(9, 2), 25)


def test_absolute_position_embedding_is_resized_with_the_resolution():
    source = swinkit.create_model("swin_test", ape=True)  # 16 x 16 grid at 64
    model = swinkit.create_model("swin_test", ape=True, img_size=96, checkpoint=None)
    report = swinkit.load_checkpoint(model, source.state_dict())
    assert report.ok and "16x16 to a 24x24 grid" in report.adapted[-1]  # (stage 3's clamped table grows too)
    grid = source.absolute_pos_embed.detach().reshape(1, 16, 16, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 24), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 576, 16)
    assert torch.equal(model.absolute_pos_embed.detach(), expected)


def test_imagenet22k_head_selects_the_official_1k_rows(tmp_path):
    source = swinkit.create_model("swin_test", num_classes=21841)
    perturb(source)
    torch.save({"model": source.state_dict()}, tmp_path / "swin_22k.pth")
    model = swinkit.create_model("swin_test", num_classes=1000, checkpoint=tmp_path / "swin_22k.pth")
    assert model.load_report.ok and "ImageNet-22K" in model.load_report.adapted[0]
    lines = (Path(swinkit.__file__).parent / "assets" / "map22kto1k.txt").read_text().split()
    rows = [int(line) for line in lines]
    assert len(rows) == 1000 and rows[:3] == [359, 368, 460]
    for k in (0, 1, 500, 999):
        assert torch.equal(model.head.weight[k], source.head.weight[rows[k]])
        assert torch.equal(model.head.bias[k], source.head.bias[rows[k]])
    other = swinkit.create_model("swin_test", num_classes=10, checkpoint=tmp_path / "swin_22k.pth")
    assert "21841 classes" in other.load_report.reinitialized[0]  # any other size: re-initialised


def test_official_file_buffers_give_the_construction_size(tmp_path):
    source = swinkit.create_model("swin_test", img_size=96, window_size=3)
    swinkit.checkpoint.write_checkpoint(source.state_dict(), source.config, tmp_path / "o.pth", "official")
    assert "layers.0.blocks.1.attn_mask" in torch.load(tmp_path / "o.pth", weights_only=True)["model"]
    assert swinkit.create_model(checkpoint=tmp_path / "o.pth").config.img_size == 96


def test_swinkit_file_carries_config_class_names_and_preprocessing(tmp_path):
    model = swinkit.create_model("swin_test", num_classes=3, img_size=96)
    swinkit.save(model, tmp_path / "m.safetensors", class_names=["cat", "dog", "eel"])
    checkpoint = swinkit.checkpoint.read_any(tmp_path / "m.safetensors")
    assert checkpoint.format == "swinkit" and checkpoint.class_names == ["cat", "dog", "eel"]
    loaded = swinkit.create_model(checkpoint=tmp_path / "m.safetensors")
    assert loaded.config == model.config and loaded.config.preprocessing.crop == 96


def test_download_uses_the_cache_and_explains_offline(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from swinkit.checkpoint import hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match=r"could not download swin_tiny_patch4_window7_224 .*put it at"):
        hub.download("swin_tiny_patch4_window7_224", tmp_path)
    cached = tmp_path / "swin_tiny_patch4_window7_224.pth"
    cached.write_bytes(b"weights")
    assert hub.download("swin_tiny_patch4_window7_224", tmp_path) == cached
    with pytest.raises(ValueError, match="unknown published weights 'swin_huge'"):
        hub.download("swin_huge", tmp_path)
    assert hub.PUBLISHED["swin_base_patch4_window7_224_22k"].num_classes == 21841


def test_a_safetensors_file_whose_header_length_starts_with_a_pickle_byte_is_read_as_safetensors(tmp_path):
    # The first byte of a safetensors file is the low byte of its header's length: 0x80, a pickle's
    # first byte, for one file in 256. Such a file once went to torch.load and lost its metadata.
    path = tmp_path / "model.safetensors"
    for padding in range(256):
        save_file({"w": torch.arange(3.0)}, str(path), metadata={"note": "x" * padding, "swinkit_config": "{}"})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    state_dict, metadata = read_checkpoint(path)
    assert metadata["note"] == "x" * padding and torch.equal(state_dict["w"], torch.arange(3.0))


def test_written_files_get_the_permissions_any_new_file_gets(tmp_path):
    # safetensors' writer makes its file private (0600), and a file staged by mkstemp was too;
    # a model file is meant to be shared as any other file the user writes.
    from swinkit.checkpoint.io import save_torch

    swinkit.save(swinkit.create_model("swin_test"), tmp_path / "model.safetensors")
    save_torch({"step": 1}, tmp_path / "state.pt")
    (tmp_path / "plain.txt").write_text("")
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    if not plain & 0o044:
        pytest.skip("this process's umask makes every new file private: nothing to tell apart")
    for name in ("model.safetensors", "state.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors", "plain.txt", "state.pt"]


def test_staging_moves_the_file_and_what_was_written_beside_it_or_nothing(tmp_path):
    # One mechanism writes checkpoints and exports: an ONNX file names its weights file
    # (<name>.data) beside it, which must arrive with it; a block that raises changes nothing.
    from swinkit.checkpoint.io import staging

    target = tmp_path / "out" / "model.onnx"
    with staging(target) as temporary:
        assert temporary.name == "model.onnx" and temporary.parent.parent == target.parent
        temporary.write_text("new model")
        temporary.with_name("model.onnx.data").write_text("new weights")
    assert target.read_text() == "new model" and (target.parent / "model.onnx.data").read_text() == "new weights"
    with pytest.raises(RuntimeError, match="check failed"), staging(target) as temporary:
        temporary.write_text("bad model")
        temporary.with_name("model.onnx.data").write_text("bad weights")
        raise RuntimeError("check failed")
    assert target.read_text() == "new model" and (target.parent / "model.onnx.data").read_text() == "new weights"
    assert sorted(path.name for path in target.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    with staging(target.parent / "bundle") as temporary:  # a writer that makes a folder: kept enterable
        temporary.mkdir()
        (temporary / "part").write_text("inside")
    assert (target.parent / "bundle" / "part").read_text() == "inside"
    assert (target.parent / "bundle").stat().st_mode & 0o100  # not given a file's mode (0644)


def test_staged_files_reach_the_disk_before_their_names_do(tmp_path, monkeypatch):
    # A rename is atomic, but without fsync a power cut may leave the new name on an empty file.
    # What reached the disk cannot be observed here; the order of the real calls can.
    from swinkit.checkpoint import io

    calls = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return fsync(descriptor)

    def recorded_replace(source, target):
        calls.append(("replace", str(target)))
        return replace(source, target)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a file descriptor's file")
    monkeypatch.setattr(io.os, "fsync", recorded_fsync)
    monkeypatch.setattr(io.os, "replace", recorded_replace)
    target = tmp_path / "model.onnx"
    with io.staging(target) as temporary:
        temporary.write_text("model")
        temporary.with_name("model.onnx.data").write_text("weights")
    weights, model = (temporary.with_name(name) for name in ("model.onnx.data", "model.onnx"))
    assert calls == [
        ("fsync", str(weights)),
        ("replace", str(tmp_path / "model.onnx.data")),
        ("fsync", str(model)),
        ("replace", str(target)),
        ("fsync", str(tmp_path)),
    ]


def _edited_copy(source: Path, target: Path, tensors=None, **metadata) -> Path:
    """``source`` (a swinkit file) written again with some tensors and metadata entries replaced."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        stored = dict(f.metadata())
    save_file({**state, **(tensors or {})}, target, metadata={**stored, **metadata})
    return target


def test_a_file_that_contradicts_itself_is_refused_by_name(tmp_path, tiny):
    import json

    swinkit.save(tiny, tmp_path / "m.safetensors", class_names=["cat", "dog", "eel"])
    config = json.loads(swinkit.checkpoint.read_any(tmp_path / "m.safetensors").metadata["swinkit_config"])
    seven = _edited_copy(
        tmp_path / "m.safetensors",
        tmp_path / "seven.safetensors",
        swinkit_config=json.dumps({**config, "num_classes": 7}),
    )
    # was: a model of 7 classes whose head was re-initialised at random, and predictions from it
    with pytest.raises(CheckpointError, match=r"seven\.safetensors: its config says 7 classes but its head has 3"):
        swinkit.create_model(checkpoint=seven)
    two = _edited_copy(tmp_path / "m.safetensors", tmp_path / "two.safetensors", class_names='["a", "b"]')
    with pytest.raises(CheckpointError, match=r"two\.safetensors: 2 class names for 3 classes"):  # was an IndexError
        swinkit.create_model(checkpoint=two)
    for key, value, message in [
        ("window_size", "seven", "field window_size must be int, got 'seven'"),  # was "'<' not supported ..."
        ("depths", [2, "x", 2, 2], r"field depths must be a list of int"),
        ("preprocessing", {**config["preprocessing"], "std": [0, 0, 0]}, r"preprocessing std .* must be above 0"),
    ]:
        bad = _edited_copy(
            tmp_path / "m.safetensors",
            tmp_path / f"{key}.safetensors",
            swinkit_config=json.dumps({**config, key: value}),
        )
        with pytest.raises(CheckpointError, match=rf"{key}\.safetensors: the swinkit config .* invalid: {message}"):
            swinkit.create_model(checkpoint=bad)


def test_weights_with_nan_or_infinity_are_refused_naming_the_tensor(tmp_path, tiny):
    swinkit.save(tiny, tmp_path / "m.safetensors")
    broken = tiny.state_dict()["layers.1.blocks.0.mlp.fc2.weight"].clone()
    broken[0, 0] = float("nan")
    nan = _edited_copy(
        tmp_path / "m.safetensors", tmp_path / "nan.safetensors", {"layers.1.blocks.0.mlp.fc2.weight": broken}
    )
    with pytest.raises(
        CheckpointError, match=r"nan\.safetensors: non-finite values .* in layers\.1\.blocks\.0\.mlp\.fc2"
    ):
        swinkit.create_model(checkpoint=nan)  # was a model that predicts NaN, exit code 0 from predict
    state = {**tiny.state_dict(), "head.bias": torch.full((3,), float("inf"))}
    with pytest.raises(CheckpointError, match="non-finite values .* in head.bias"):
        swinkit.load_checkpoint(swinkit.create_model("swin_test", num_classes=3), state)


def test_tensors_no_swin_has_are_refused_by_name_before_they_are_read(tmp_path, tiny):
    # Each one failed deep in the reading (IndexError, ZeroDivisionError, a reshape's RuntimeError,
    # a bicubic resize's NotImplementedError) or was cast to float without a word.
    state = tiny.state_dict()
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    for name, changed, message in [
        ("head", {"head.weight": torch.zeros(3)}, r"head\.weight has shape \(3,\), not 2-d"),
        ("patch", {"patch_embed.proj.weight": torch.tensor(1.0)}, r"patch_embed\.proj\.weight has shape \(\), not 4-d"),
        ("table", {table: torch.zeros(50, state[table].shape[1])}, rf"{table} has 50 rows, not \(2 window - 1\)\^2"),
        ("empty", {key: value[:0] for key, value in state.items()}, r"\S+ is empty \(0, 3, 4, 4\); .* in all"),
        ("int", {"head.bias": state["head.bias"].int()}, r"head\.bias is torch\.int32, not floating point"),
        ("bool", {"head.bias": state["head.bias"] > 0}, r"head\.bias is torch\.bool, not floating point"),
    ]:  # fmt: skip
        path = tmp_path / f"{name}.pth"
        torch.save({**state, **changed}, path)
        with pytest.raises(CheckpointError, match=rf"{name}\.pth: not the weights of a Swin model: {message}"):
            swinkit.create_model(checkpoint=path)
    for half in (torch.float16, torch.bfloat16, torch.float64):  # other floating types are read as they were
        torch.save({key: value.to(half) for key, value in state.items()}, tmp_path / "half.pth")
        swinkit.create_model(checkpoint=tmp_path / "half.pth")
    with pytest.raises(TypeError, match="load_checkpoint needs a swinkit model .* got Linear"):  # was AttributeError
        swinkit.load_checkpoint(torch.nn.Linear(2, 2), state)


def test_a_hugging_face_folder_that_contradicts_itself_is_refused_naming_its_file(tmp_path):
    import json

    from swinkit.checkpoint import hf

    folder = tmp_path / "hf"
    folder.mkdir()
    model = swinkit.create_model("swin_test", num_classes=3, img_size=128)  # transformers' windows at every stage
    save_file(hf.from_swinkit(model.state_dict(), model.config), folder / "model.safetensors")
    # Without a config.json (or an image_size in it) the size is assumed: said, as for torchvision files.
    note = "no config.json with an image_size beside the weights: taken as 224 px"
    assert any(n.startswith(note) for n in swinkit.create_model(checkpoint=folder).load_report.notes)
    config = folder / "config.json"
    config.write_text(json.dumps({"image_size": 128}))
    loaded = swinkit.create_model(checkpoint=folder)
    assert loaded.config.img_size == 128 and not any(n.startswith(note) for n in loaded.load_report.notes)
    for text, message in [
        ("[1, 2]", "its config.json must be a JSON object (a transformers config), got list"),  # was AttributeError
        ("{", "its config.json is not JSON"),  # was json's bare message
        (json.dumps({"id2label": {"0": "a"}}), "its config.json's id2label has 1 class names but the head has 3"),
        (json.dumps({"id2label": {"x": "a"}}), "its config.json's id2label must map class indices to names"),
        (json.dumps({"window_size": -3}), "the architecture its config.json describes is invalid: window_size"),
    ]:
        config.write_text(text)
        with pytest.raises(CheckpointError, match=rf"{folder}: {re.escape(message)}"):
            swinkit.create_model(checkpoint=folder)
    config.write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    assert read_any(folder).class_names == ["a", "b", "c"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": 5}))  # was AttributeError
    with pytest.raises(CheckpointError, match="not a valid shard index: its weight_map must map tensor names to"):
        swinkit.create_model(checkpoint=sharded)


def test_a_file_whose_weights_do_not_fit_its_own_architecture_says_so(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state["layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(49, 16)  # was: "the file is X, the model is X"
    save_file(state, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"though its weights name that architecture") as error:
        swinkit.load_checkpoint(swinkit.create_model("swin_test", num_classes=3), tmp_path / "cut.safetensors")
    assert "qkv.weight: model (48, 16), file (49, 16)" in str(error.value)
    assert "name its preset" not in str(error.value)


def test_a_plain_pickle_is_refused_without_running_it(tmp_path):
    import pickle
    import warnings

    marker = tmp_path / "pwned"
    with open(tmp_path / "plain.pth", "wb") as f:  # pickle.dump's own file, not torch.save's
        pickle.dump({"model": _Payload(str(marker))}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol" warning must not reach the user
        with pytest.raises(CheckpointError, match=r"refusing to load .*plain\.pth: it is a plain pickle"):
            read_checkpoint(tmp_path / "plain.pth")  # was "corrupt or not a checkpoint", after torch's warning
    assert not marker.exists()


def test_save_refuses_class_names_that_are_not_a_list_of_strings(tmp_path, tiny):
    for names in ("abc", [1, 2, 3]):  # was saved: "abc" as ['a', 'b', 'c'], numbers as a file that did not load
        with pytest.raises(TypeError, match="class_names must be a list of strings"):
            swinkit.save(tiny, tmp_path / "m.safetensors", class_names=names)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_file_that_cannot_be_written_is_named_not_its_temporary(tiny):
    with pytest.raises(OSError, match=r"cannot write /proc/m\.safetensors: ") as error:
        swinkit.save(tiny, "/proc/m.safetensors")  # /proc takes no new files, even from root
    assert ".tmp" not in str(error.value)


def test_convert_refuses_to_write_over_its_own_input(tmp_path, tiny):
    swinkit.save(tiny, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"m\.safetensors is the file being converted"):
        swinkit.checkpoint.convert(tmp_path / "m.safetensors", tmp_path / "." / "m.safetensors", to="timm")
    assert swinkit.checkpoint.read_any(tmp_path / "m.safetensors").format == "swinkit"  # untouched
    # A checkpoint under an export's name was written, then refused by predict as a bad export.
    for suffix in (".onnx", ".pt2"):
        with pytest.raises(ValueError, match=rf"m{suffix}: convert writes checkpoints .* 'swinkit export' writes"):
            swinkit.checkpoint.convert(tmp_path / "m.safetensors", tmp_path / f"m{suffix}")
        assert not (tmp_path / f"m{suffix}").exists()


def test_a_training_runs_last_checkpoint_is_read_with_its_config_and_class_names(tmp_path):
    # Read as a bare state dict, checkpoint-last.pt was predicted with ImageNet's mean and std at
    # 224 and class indices, while model-final.safetensors (the same weights) had the run's own.
    digits = write_digit_folder(tmp_path / "digits", classes=(3, 7), per_class=3)
    run = tmp_path / "run"
    argv = ["train", "--model", "swin_test", "--img-size", "32", "--data", str(digits), "--output", str(run),
            "--workers", "0", "--no-progress", "--epochs", "1", "--batch-size", "2", "--max-steps", "2"]  # fmt: skip
    assert main(argv) == 0
    image = next(digits.glob("*/*.png"))
    final, last = (
        predict([image], run / name, topk=2)[0] for name in ("model-final.safetensors", "checkpoint-last.pt")
    )
    assert [p["class"] for p in last["predictions"]] == [p["class"] for p in final["predictions"]]
    assert {p["class"] for p in last["predictions"]} == {"digit3", "digit7"}
    for got, expected in zip(last["predictions"], final["predictions"], strict=True):
        assert got["probability"] == pytest.approx(expected["probability"], rel=1e-6)
    model = swinkit.create_model(checkpoint=run / "checkpoint-last.pt")
    assert (
        model.config.preprocessing
        == swinkit.create_model(checkpoint=run / "model-final.safetensors").config.preprocessing
    )


def test_an_exported_or_cut_file_is_named_for_what_it_is(tmp_path, tiny, capsys):
    # A .pt2 program was "truncated or corrupt?" with torch's "internal miniz error"; an .onnx file
    # "neither a PyTorch file nor safetensors"; a safetensors file cut inside its header too.
    import json

    import onnx
    from onnx import TensorProto, helper

    from swinkit.export import PROGRAM_METADATA

    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    metadata = {PROGRAM_METADATA: json.dumps({"swinkit.config": json.dumps(tiny.config.to_dict())})}
    torch.export.save(program, tmp_path / "model.pt2", extra_files=metadata)
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value], [value])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    swinkit.save(tiny, tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:200])
    for name, message in [
        ("model.pt2", re.escape("is a torch.export program (.pt2), not a checkpoint: predict and eval run an")),
        ("model.onnx", "is an ONNX file, not a checkpoint: predict and eval run an exported file"),
        ("cut.safetensors", r"is a truncated safetensors file: its header says \d+ bytes of description, but the file"),
    ]:
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)} {message}"):
            swinkit.create_model(checkpoint=tmp_path / name)
    # A classifier's export given to a dense command (it said "not written by swinkit segment export").
    from PIL import Image

    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["segment", "predict", str(image), "--checkpoint", str(tmp_path / "model.pt2")]) == 2
    assert (
        "model.pt2 is a classifier's export (swinkit export): swinkit predict and eval run it"
        in capsys.readouterr().err
    )


def test_an_official_file_of_three_stages_is_read_as_one_not_refused_for_out_indices(tmp_path, tiny):
    # Its config kept the four default out_indices: "out_indices (0, 1, 2, 3) must name stages in
    # 0..2", an option the user never gave. Now three stages come out, and its last merging is named.
    from swinkit.checkpoint import official

    state = official.from_swinkit(tiny.state_dict(), tiny.config)
    torch.save({k: v for k, v in state.items() if not k.startswith("layers.3.")}, tmp_path / "three.pth")
    with pytest.raises(CheckpointError, match=r"three\.pth does not fit the model, .* depths=\(2, 2, 2\)") as error:
        swinkit.create_model(checkpoint=tmp_path / "three.pth")
    assert "unexpected in the file: layers.2.downsample" in str(error.value)
    backbone = {
        k: v for k, v in state.items() if not k.startswith(("layers.3.", "layers.2.downsample", "norm.", "head."))
    }
    torch.save(backbone, tmp_path / "backbone.pth")
    model = swinkit.create_model(checkpoint=tmp_path / "backbone.pth", features_only=True)
    assert model.config.out_indices == (0, 1, 2) and len(model(torch.randn(1, 3, 64, 64))) == 3
