"""Export and compile: ONNX in a real onnxruntime session, torch.export programs, torch.compile.

Every exported or compiled model is compared with eager PyTorch at two input sizes and two batch
sizes; the dynamic height / width range is checked against the window rule worked out by hand.
"""

from __future__ import annotations

import json

import onnx
import onnxruntime
import pytest
import torch

import swinkit
from swinkit.cli import main
from swinkit.export import compile_model, export, export_onnx_model, onnx_error, onnx_session, side_range


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, so no parameter (zero biases, unit norms) hides a mistake."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_side_range_follows_the_window_rule():
    # Swin-T, patch 4, window 7: stage i shrinks its window when ceil(side / (4 * 2**i)) <= 7,
    # i.e. side <= 28, 56, 112, 224. At 224 only stage 4 shrinks: 113..224; at 256 none: 225 up.
    model = swinkit.create_model("swin_t")
    assert side_range(model, 224) == (113, 224)
    assert side_range(model, 256)[0] == 225
    assert side_range(model, 100) == (57, 112)
    detection = swinkit.create_model("swin_t", always_shift=True)
    assert side_range(detection, 100)[0] == 2


def test_onnx_matches_eager_at_two_sizes_and_batches(tmp_path):
    # swin_test at 96: stage windows 4, 4, 4, 3 (stage 4 clamped at construction); no stage shrinks
    # for sides in 97 up, so 96 shrinks stage 4 only: range 65..96.
    model = _perturbed(swinkit.create_model("swin_test", img_size=96, num_classes=7))
    path = export_onnx_model(model, tmp_path / "model.onnx", torch.randn(2, 3, 96, 96))
    session = onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["images"]
    for shape in [(1, 3, 96, 96), (3, 3, 67, 81), (2, 3, 96, 70)]:
        assert onnx_error(session, model, torch.randn(shape)) < 1e-5
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["swinkit.size_range"]) == {"height": [65, 96], "width": [65, 96]}
    # Outside the range (another window regime) onnxruntime cannot run the program's assertions.
    # Below it every output is NaN; above it the traced gathers go out of bounds and the run fails.
    for shape in [(2, 3, 96, 64), (1, 3, 40, 40)]:
        (logits,) = session.run(None, {"images": torch.randn(shape).numpy()})
        assert logits.shape == (shape[0], 7) and torch.from_numpy(logits).isnan().all(), shape
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
        session.run(None, {"images": torch.randn(1, 3, 96, 97).numpy()})


def test_onnx_exports_a_v2_backbone_with_four_outputs(tmp_path):
    model = _perturbed(swinkit.create_model("swinv2_test", features_only=True))
    size = model.config.img_size
    path = export_onnx_model(model, tmp_path / "backbone.onnx", torch.randn(2, 3, size, size))
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ["features0", "features1", "features2", "features3"]
    low, high = side_range(model, size)
    for shape in [(1, 3, size, size), (3, 3, high - 3, low + 1)]:
        assert onnx_error(session, model, torch.randn(shape)) < 1e-5


def test_torch_export_program_round_trip(tmp_path):
    model = _perturbed(swinkit.create_model("swin_test", num_classes=5))
    report = export(model, tmp_path / "model.pt2", fmt="torch-export")
    assert report["max_abs_error"] < 1e-5
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = torch.randn(4, 3, 50, 37)  # inside the range of the 64 x 64 example (33..64)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_cli_writes_onnx_with_class_names(tmp_path, capsys):
    model = swinkit.create_model("swin_test", num_classes=3)
    checkpoint = tmp_path / "model.safetensors"
    swinkit.save(model, checkpoint, class_names=["cat", "dog", "owl"])
    out = tmp_path / "m.onnx"
    assert main(["export", str(out), "--checkpoint", str(checkpoint), "--img-size", "48x64", "--static-size"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_error"] < 1e-5
    assert report["size_range"] == {"height": [48, 48], "width": [64, 64]}
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["swinkit.class_names"]) == ["cat", "dog", "owl"]
    assert json.loads(metadata["swinkit.size_range"]) == report["size_range"]
    # A static file takes any batch at its size, and onnxruntime refuses any other size.
    session = onnx_session(out)
    assert onnx_error(session, model.eval(), torch.randn(5, 3, 48, 64)) < 1e-5
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument, match="dimensions"):
        session.run(None, {"images": torch.randn(1, 3, 64, 64).numpy()})
    assert main(["export", str(tmp_path / "x.onnx")]) == 2  # neither --checkpoint nor --model
    assert main(["export", str(tmp_path / "missing" / "x.onnx"), "--model", "swin_test"]) == 2
    assert "folder" in capsys.readouterr().err


def test_compiled_model_matches_eager_without_graph_breaks():
    model = _perturbed(swinkit.create_model("swin_test", num_classes=5))
    compiled = compile_model(model, fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        for shape in [(2, 3, 64, 64), (3, 3, 64, 64), (2, 3, 40, 56)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
