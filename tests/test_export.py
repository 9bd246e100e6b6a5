"""Export and compile: ONNX in a real onnxruntime session, torch.export programs, torch.compile.

Every exported or compiled model is compared with eager PyTorch at two input sizes and two batch
sizes; dynamic files are checked at sizes in every window regime (clamped stage windows or not).
"""

from __future__ import annotations

import collections
import copy
import io
import json
import math
import pickle
import shutil
import threading
import zipfile
from pathlib import Path

import onnx
import onnx_ir
import onnxruntime
import pytest
import torch
from functorch.compile import make_boxed_func
from PIL import Image
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._sympy.functions import FloorDiv

import swinkit
from helpers import relative_error, write_digit_folder
from swinkit import export as export_module
from swinkit import fast, native, parallel
from swinkit.checkpoint import convert
from swinkit.cli import main
from swinkit.data import eval_transform, load_image
from swinkit.dense import DenseSpec, create_backbone
from swinkit.dense import export as dense_export
from swinkit.dense.export import export_segmentation, load_dense_file
from swinkit.dense.weights import build_dense_model
from swinkit.evaluate import evaluate_checkpoint
from swinkit.export import (
    FORMATS,
    MAX_SIDE,
    PROGRAM_METADATA,
    ProgramClassifier,
    compile_model,
    export,
    export_onnx_model,
    export_program,
    load_program,
    onnx_error,
    onnx_session,
    program_on,
    read_program,
    save_program,
    trace_sides,
)
from swinkit.parallel import image_splits
from swinkit.predict import load_classifier, predict
from swinkit.variants import Preprocessing


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, so no parameter (zero biases, unit norms) hides a mistake."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_trace_sides_are_generic_for_every_stage():
    # Swin-T (window 7): 481 -> stage maps 121, 61, 31, 16; 482 -> the same maps from a different
    # padding. Every map is more than two windows and none divides by 7; all but the last are odd.
    model = swinkit.create_model("swin_t")
    assert trace_sides(model) == (481, 482)


def test_a_patch_of_one_exports_with_a_dynamic_size(tmp_path):
    # With patch 1 the patch embedding never pads: the trace-size search once looked forever for
    # a side it would pad.
    model = _perturbed(swinkit.create_model("swin_test", patch_size=1, img_size=16, depths=(1, 1), num_heads=(1, 2)))
    height, width = trace_sides(model)
    assert height != width and all(side % 2 and side > 2 * 4 * 2 for side in (height, width))
    session = onnx_session(export_onnx_model(model, tmp_path / "model.onnx"))
    for shape in [(1, 3, 16, 16), (2, 3, 9, 23), (1, 3, 1, 2)]:
        assert onnx_error(session, model, torch.randn(shape)) < 1e-5, shape


# swin_test (patch 4, window 4; built at 96 its stage 4 has window 3): stage 3 clamps its window for
# sides up to 64 and stage 4 for sides up to 96. These sizes cover both clamps, one, and none,
# mixed between height and width, odd and even, and maps of a single token (sides up to 32: stage
# 4; 1 x 1: every stage).
REGIME_SIZES = [(1, 3, 33, 33), (3, 3, 50, 81), (2, 3, 96, 70), (1, 3, 97, 130), (2, 3, 131, 40)]
REGIME_SIZES += [(2, 3, 1, 1), (1, 3, 20, 32), (2, 3, 5, 57)]


def test_onnx_matches_eager_in_every_window_regime(tmp_path):
    model = _perturbed(swinkit.create_model("swin_test", img_size=96, num_classes=7))
    path = export_onnx_model(model, tmp_path / "model.onnx", torch.randn(2, 3, 96, 96))
    session = onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["images"]
    for shape in REGIME_SIZES:
        assert onnx_error(session, model, torch.randn(shape)) < 1e-5, shape
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["swinkit.size_range"]) == {"height": [1, MAX_SIDE], "width": [1, MAX_SIDE]}
    # Outside the range onnxruntime cannot run assertions: every output is NaN.
    for shape in [(2, 3, MAX_SIDE + 1, 1), (1, 3, 3, MAX_SIDE + 5)]:
        (logits,) = session.run(None, {"images": torch.randn(shape).numpy()})
        assert logits.shape == (shape[0], 7) and torch.from_numpy(logits).isnan().all(), shape


def _assert_opset_17(path) -> None:
    # torch's exporter writes 18 and up: asked for 17, it failed to convert and kept 18 without an
    # error. onnx's converter now writes 17 after it (and drops an attribute of 18 it leaves on
    # ReduceMean); the metadata is kept. (The tests that call this run the file in onnxruntime.)
    stored = onnx.load(str(path))
    assert [(o.domain, o.version) for o in stored.opset_import] == [("", 17)]
    assert "swinkit.size_range" in {p.key for p in stored.metadata_props}


# One export serves two checks in each of the next two tests, as one takes a minute or two here.
def test_onnx_of_the_detection_window_rule_takes_every_size_at_opset_17(tmp_path):
    model = _perturbed(swinkit.create_model("swin_test", num_classes=3, always_shift=True))
    path = export_onnx_model(model, tmp_path / "model.onnx", opset=17)
    _assert_opset_17(path)
    session = onnx_session(path)
    for shape in REGIME_SIZES[::2]:
        assert onnx_error(session, model, torch.randn(shape)) < 1e-5, shape


def test_onnx_exports_a_v2_backbone_with_four_outputs_at_opsets_18_and_17(tmp_path):
    model = _perturbed(swinkit.create_model("swinv2_test", features_only=True))
    size = model.config.img_size
    path = export_onnx_model(model, tmp_path / "backbone.onnx", torch.randn(2, 3, size, size))
    # The file at 17 as export_onnx_model(..., opset=17) converts it (the test above goes through
    # that argument): V2's cosine attention adds reductions (its norms) for the conversion to rewrite.
    onnx_ir.save(export_module._at_opset(onnx_ir.load(str(path)), 17), tmp_path / "backbone17.onnx")
    _assert_opset_17(tmp_path / "backbone17.onnx")
    for file in (path, tmp_path / "backbone17.onnx"):
        session = onnx_session(file)
        assert [o.name for o in session.get_outputs()] == ["features0", "features1", "features2", "features3"]
        for shape in [(1, 3, size, size), (3, 3, 45, 110), (2, 3, 9, 30)]:  # the last: every stage clamps
            assert onnx_error(session, model, torch.randn(shape)) < 1e-5, (file.name, shape)


def _no_tracing(*args, **kwargs):
    raise AssertionError("traced: the refusal should have come before the trace")


def test_onnx_opsets_it_cannot_write_are_refused_by_name_before_tracing(tmp_path, monkeypatch):
    model = swinkit.create_model("swin_test")
    monkeypatch.setattr(export_module, "export_program", _no_tracing)
    with pytest.raises(ValueError, match="ONNX opset must be at least 17 .LayerNormalization's., got 16"):
        export_onnx_model(model, tmp_path / "model.onnx", opset=16)
    # Above the opsets torch's exporter writes it kept 18 and wrote newer operators into it; it was
    # refused only after the trace (a minute for a small model). The limit is onnxscript's converter's.
    highest = export_module.max_opset()
    assert highest >= 25  # the newest the exporter wrote here (onnxscript 0.7); 26 kept 18
    for write in (export_onnx_model, export):
        with pytest.raises(ValueError, match=rf"cannot write ONNX opset {highest + 1} here: it writes 17 to {highest}"):
            write(model, tmp_path / "model.onnx", opset=highest + 1)
    assert not (tmp_path / "model.onnx").exists()


@pytest.fixture(scope="session")
def size_generic_program(tmp_path_factory):
    """A size-generic ``.pt2`` of a small classifier, written by ``export`` (which checks it), with
    the model and the report; exporting takes about 20 s, so the tests below share one (each
    pytest-xdist worker that runs one of them makes its own, once). Its third stage has three
    blocks, so two of them are unshifted (see the table-sharing test)."""
    model = _perturbed(swinkit.create_model("swin_test", depths=(2, 2, 3, 2), num_classes=5))
    path = tmp_path_factory.mktemp("program") / "model.pt2"
    # The check reads the file back with load_program at two sizes.
    return model, path, export(model, path, fmt="torch-export")


def test_torch_export_program_round_trip(tmp_path, capsys, size_generic_program):
    model, path, report = size_generic_program
    assert report["max_abs_error"] < 1e-5 and report["max_relative_error"] < 1e-5
    assert [child.name for child in path.parent.iterdir()] == ["model.pt2"]  # the temporary file renamed
    # The archive's top folder is named for the file (torch names it after the file it writes).
    assert {name.split("/")[0] for name in zipfile.ZipFile(path).namelist()} == {"model"}
    assert report["size_range"] == {"height": [1, MAX_SIDE], "width": [1, MAX_SIDE]}
    extra = {PROGRAM_METADATA: ""}
    loaded = load_program(path, extra_files=extra)
    # Every stage's side is one floor division of the image's (ceil(H / 32), not four nested ceil(x / 2)).
    assert _nested_floor_divisions(loaded) == set()
    program = loaded.module()
    metadata = json.loads(extra[PROGRAM_METADATA])  # what an ONNX file's metadata holds
    assert json.loads(metadata["swinkit.config"])["num_classes"] == 5
    assert json.loads(metadata["swinkit.size_range"]) == report["size_range"]
    with torch.no_grad():
        for shape in REGIME_SIZES:
            x = torch.randn(shape)
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(AssertionError, match=str(MAX_SIDE)):  # the program checks its input range
            program(torch.randn(1, 3, MAX_SIDE + 1, 1))
    # Moved to another device whole: the meta device stands in for a GPU (any tensor or device
    # argument left on the CPU would not mix with meta tensors); on CUDA: tests/test_gpu.py.
    moved = program_on(loaded, "meta")
    for shape in REGIME_SIZES[:2]:
        out = moved(torch.randn(shape, device="meta"))
        assert out.device.type == "meta" and out.shape == (shape[0], 5)
    report = export(model, tmp_path / "fixed.pt2", fmt="torch-export", static_size=True)
    assert report["max_abs_error"] < 1e-5 and report["size_range"]["height"] == [64, 64]
    # As predict and eval run a program: the range named, where torch said "Guard failed: x.size()[2] <= 8192"
    # (or == 64 for this one).
    with pytest.raises(ValueError, match="fixed.pt2 takes heights 64..64 and widths 64..64, got 65x64"):
        ProgramClassifier(tmp_path / "fixed.pt2")(torch.randn(1, 3, 65, 64))
    assert "archive" not in capsys.readouterr().err  # torch's warning about a file not named *.pt2


def _nested_floor_divisions(program: torch.export.ExportedProgram) -> set:
    """Floor divisions by a number, in the program's tensor sizes, of a sum holding another one."""
    sizes = {
        size.node.expr
        for node in program.graph.nodes
        if isinstance(node.meta.get("val"), torch.Tensor)
        for size in node.meta["val"].shape
        if isinstance(size, torch.SymInt)
    }
    assert sizes, "a size-generic program has symbolic sizes"
    return {
        division
        for size in sizes
        for division in size.atoms(FloorDiv)
        if division.args[1].is_Integer and any(inner.args[1].is_Integer for inner in division.args[0].atoms(FloorDiv))
    }


def test_load_program_reads_the_same_program_as_torch(tmp_path, size_generic_program):
    # load_program parses each distinct size expression once; torch's own reader parses every
    # occurrence (about 25 s for this file). Same graph, same symbolic sizes, same ranges.
    from torch._export.serde.serialize import GraphModuleDeserializer

    parse = GraphModuleDeserializer._parse_sym_expr
    path = size_generic_program[1]
    ours, torchs = load_program(path), torch.export.load(str(path))
    assert GraphModuleDeserializer._parse_sym_expr is parse  # torch's reader restored
    assert str(ours.graph) == str(torchs.graph)
    assert ours.range_constraints == torchs.range_constraints
    sizes = [str(node.meta.get("val")) for node in ours.graph.nodes]
    assert sizes == [str(node.meta.get("val")) for node in torchs.graph.nodes]
    assert any("s0" in size for size in sizes)  # symbolic sizes were read, not constants
    (tmp_path / "noise.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="noise.pt2: not a torch.export program"):
        load_program(tmp_path / "noise.pt2")
    with pytest.raises(FileNotFoundError, match="absent.pt2 does not exist"):
        load_program(tmp_path / "absent.pt2")
    (tmp_path / "folder.pt2").mkdir()  # was "does not exist"
    with pytest.raises(IsADirectoryError, match="folder.pt2 is a folder, not a .pt2 program"):
        load_dense_file(tmp_path / "folder.pt2")
    assert GraphModuleDeserializer._parse_sym_expr is parse


def test_program_on_moves_tensor_constants_too():
    class AddsAConstant(torch.nn.Module):
        def forward(self, x):
            return x + torch.tensor([1.0, 2.0])  # a constant of the program, not a buffer

    program = torch.export.export(AddsAConstant(), (torch.randn(3, 2),))
    assert program.constants  # what this test is about
    out = program_on(program, "meta")(torch.randn(3, 2, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 2)


class _WritesAFile:
    """Unpickled, it creates the file ``marker``: what a crafted file's pickle could do (anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _with_a_pickled_weight(program_file: Path, crafted: Path, payload: object) -> None:
    """``program_file`` with its first weight marked ``use_pickle`` and replaced by ``payload``'s
    pickle, as torch's reader takes it (it reads such a weight with ``weights_only=False``)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with zipfile.ZipFile(program_file) as source, zipfile.ZipFile(crafted, "w") as target:
        configs = [name for name in source.namelist() if name.endswith("_weights_config.json")]
        config = json.loads(source.read(configs[0]))
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == configs[0]:
                data = json.dumps(config).encode()
            elif item.filename.endswith(f"data/weights/{entry['path_name']}"):
                data = buffer.getvalue()
            target.writestr(item, data)


def test_a_program_holding_pickled_objects_is_refused_before_they_run(tmp_path, capsys):
    # torch.export.load reads a weight marked use_pickle with torch.load(weights_only=False): a
    # crafted .pt2 given to predict ran its code (then failed to load). Now nothing is unpickled.
    program_file, crafted, marker = tmp_path / "plain.pt2", tmp_path / "crafted.pt2", tmp_path / "ran"
    program = torch.export.export(torch.nn.Sequential(torch.nn.Linear(2, 2)), (torch.randn(1, 2),))
    torch.export.save(program, program_file)
    _with_a_pickled_weight(program_file, crafted, _WritesAFile(marker))
    with pytest.raises(ValueError, match="crafted.pt2: refused: it holds pickled Python objects"):
        read_program(crafted)
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    for command in (["predict", str(image)], ["segment", "predict", str(image)]):
        assert main([*command, "--checkpoint", str(crafted)]) == 2
        assert "refused: it holds pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()
    # A pickled plain tensor is read (weights_only reads tensors), torch's own check then naming
    # it; and the reader is whole again afterwards: the plain file loads, torch.load is torch's.
    _with_a_pickled_weight(program_file, crafted, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="crafted.pt2: torch.export cannot load it: .*not an instance of"):
        read_program(crafted)
    assert read_program(program_file)[0].module()(torch.ones(1, 2)).shape == (1, 2)
    assert torch.load.__module__ == "torch.serialization"
    # The reader's other two ways to unpickle (opaque and TorchScript constants) refuse while it reads.
    from torch.export.pt2_archive import _package

    with export_module._tensors_only():
        for unpickle in (_package.pickle.loads, torch._C._pickle_load_obj):
            with pytest.raises(export_module.PickledObjectRefused):
                unpickle(pickle.dumps(_WritesAFile(marker)))
    assert not marker.exists() and _package.pickle is pickle


def test_programs_run_on_the_cpu_or_an_available_gpu(tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"never read: the device is checked first")
    with pytest.raises(ValueError, match="model.pt2: a .pt2 program runs on cpu or cuda.*'meta'"):
        ProgramClassifier(tmp_path / "model.pt2", "meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.pt2: device 'cuda' asked for, but no CUDA device"):
            ProgramClassifier(tmp_path / "model.pt2", "cuda")


def test_blocks_of_a_stage_share_their_traced_index_tables(size_generic_program):
    # Stage 3's third block is unshifted like its first: in the traced graph it gathers into window
    # order and back with the first block's two tables instead of building its own. Every other
    # (stage, shift) has one block, so exactly two tables have two readers. (The round-trip test
    # above checks this program's outputs against eager.)
    model, path, _ = size_generic_program
    assert model.config.depths == (2, 2, 3, 2)
    program = load_program(path)
    gathers = [node for node in program.graph.nodes if node.target is torch.ops.aten.index_select.default]
    readers = collections.Counter(node.args[2] for node in gathers)
    assert sorted(count for count in readers.values() if count > 1) == [2, 2]


def test_small_images_export_with_a_dynamic_size(tmp_path):
    # swin_digits takes 32 x 32 images: its last stage is a single token. One dynamic file serves
    # them and every larger size; only an example above the range needs --static-size. Its last
    # stage's window is 1, which divides every side: choosing the trace's example size looped
    # forever on that once. (Both formats trace the same program; the ONNX tests above run maps of
    # a single token in onnxruntime.)
    model = _perturbed(swinkit.create_model("swin_digits"))
    report = export(model, tmp_path / "digits.pt2", fmt="torch-export")
    assert report["max_abs_error"] < 1e-5 and report["size_range"]["height"] == [1, MAX_SIDE]
    program = load_program(tmp_path / "digits.pt2").module()
    with torch.no_grad():
        for shape in [(3, 3, 32, 32), (1, 3, 7, 90), (2, 3, 1, 1)]:
            x = torch.randn(shape)
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5, msg=str(shape))
    with pytest.raises(ValueError, match=rf"{MAX_SIDE + 1}x32 .*1\.\.{MAX_SIDE}.*--static-size"):
        export(model, tmp_path / "big.onnx", img_size=(MAX_SIDE + 1, 32))
    report = export(model, tmp_path / "digits-static.onnx", static_size=True)
    assert report["max_abs_error"] < 1e-5


def test_an_example_of_one_image_still_exports_a_dynamic_batch(tmp_path):
    # torch.export ties a dynamic size traced at 1 to 1; `swinkit bench --batch-size 1 --onnxruntime`
    # hands its one-image example to the exporter.
    model = _perturbed(swinkit.create_model("swin_digits"))
    export_onnx_model(model, tmp_path / "one.onnx", torch.randn(1, 3, 32, 32), dynamic_size=False)
    session = onnx_session(tmp_path / "one.onnx")
    for batch in (1, 3):
        assert onnx_error(session, model, torch.randn(batch, 3, 32, 32)) < 1e-5, batch


def test_export_cli_writes_onnx_with_class_names(tmp_path, capsys):
    model = swinkit.create_model("swin_test", num_classes=3)
    checkpoint = tmp_path / "model.safetensors"
    swinkit.save(model, checkpoint, class_names=["cat", "dog", "owl"])
    out = tmp_path / "m.onnx"
    arguments = ["export", str(out), "--checkpoint", str(checkpoint), "--img-size", "48x64", "--static-size"]
    assert main([*arguments, "--external-data"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The weights in a file of their own (what models above 1.5 GiB get), named for the model file;
    # nothing else is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "model.safetensors"]
    weight_bytes = sum(parameter.numel() * 4 for parameter in model.parameters())
    assert (tmp_path / "m.onnx.data").stat().st_size >= weight_bytes > 4 * out.stat().st_size
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
    # Written again with its weights inside: the weights file the old one named goes with it.
    assert main([*arguments, "--no-check"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx", "model.safetensors"]
    assert onnx_error(onnx_session(out), model, torch.randn(2, 3, 48, 64)) < 1e-5
    assert main(["export", str(tmp_path / "x.onnx")]) == 2  # neither --checkpoint nor --model
    assert main(["export", str(tmp_path / "missing" / "x.onnx"), "--model", "swin_test"]) == 2
    assert "folder" in capsys.readouterr().err
    program = str(tmp_path / "x.pt2")
    assert main(["export", program, "--model", "swin_test", "--format", "torch-export", "--external-data"]) == 2
    assert "external weights are an ONNX option" in capsys.readouterr().err


def test_names_and_precisions_no_reader_takes_are_refused_before_tracing(tmp_path, monkeypatch):
    # The readers (predict, eval, the dense commands) pick a file's reader by its name, and feed float32.
    model = swinkit.create_model("swin_test")
    segmentor_spec = DenseSpec("segment", create_backbone("swin_test").config, ["a", "b"], head={"channels": 8})
    segmentor = build_dense_model(segmentor_spec)
    monkeypatch.setattr(export_module, "export_program", _no_tracing)
    monkeypatch.setattr(dense_export, "export_program", _no_tracing)
    for name, fmt, wanted in [("model.bin", "onnx", "model.onnx"), ("program", "torch-export", "program.pt2")]:
        with pytest.raises(ValueError, match=rf"{name}: an exported file is named \.onnx .* or \.pt2 .*; got "
                                             rf"('\.bin'|no suffix): name it {wanted}"):  # fmt: skip
            export(model, tmp_path / name, fmt)
        with pytest.raises(ValueError, match=rf"{name}: an exported file is named \.onnx"):
            export_segmentation(segmentor, segmentor_spec, tmp_path / name, fmt, (40, 56))
    # A float64 or bfloat16 model failed only when checked, after its file was written.
    for dtype in (torch.float64, torch.bfloat16):
        message = rf"export writes float32 files .*; this model's weights are {str(dtype)[6:]}: export model\.float\(\)"
        with pytest.raises(TypeError, match=message):
            export(copy.deepcopy(model).to(dtype), tmp_path / "model.pt2", "torch-export", static_size=True)
        with pytest.raises(TypeError, match=message):
            export_segmentation(copy.deepcopy(segmentor).to(dtype), segmentor_spec, tmp_path / "segmentor.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_the_model_in_the_mode_it_was_in(tmp_path):
    # A training run exporting mid-way goes on with dropout and stochastic depth; a part kept in eval
    # mode (a frozen stage) stays so.
    model = _perturbed(swinkit.create_model("swin_test", drop_path_rate=0.2)).train()
    model.patch_embed.eval()
    report = export(model, tmp_path / "model.pt2", "torch-export", static_size=True)
    assert model.training and model.layers[0].blocks[0].training and not model.patch_embed.training
    assert report["max_relative_error"] < 1e-5  # checked in eval mode (stochastic depth would differ)


def test_a_file_that_fails_its_check_is_not_written(tmp_path, monkeypatch, capsys, size_generic_program):
    model, program, _ = size_generic_program
    # Written as another model's export (no trace): its check against this model fails, by size and error.
    monkeypatch.setattr(export_module, "save_program", lambda _, temporary, *args: shutil.copy(program, temporary))
    other = swinkit.create_model("swin_test", depths=(2, 2, 3, 2), num_classes=5)
    destination = tmp_path / "other.pt2"
    destination.write_bytes(b"an older file, kept as it was")
    with pytest.raises(ValueError, match=r"other.pt2 was not written: .*: 64x64 \(batch 1\): relative error "
                                         r"[0-9.e+-]+; 103x27 \(batch 3\): relative error .*up to 1e-05 in "
                                         r"torch-export"):  # fmt: skip
        export(other, destination, "torch-export")
    assert destination.read_bytes() == b"an older file, kept as it was"
    assert [path.name for path in tmp_path.iterdir()] == ["other.pt2"]  # no temporary folder left

    # NaN at one size (the file stands for itself here): Python's max dropped it, and the check read 0.
    def nan_at_batch_3(images):
        return [model(images) * (math.nan if len(images) == 3 else 1.0)]

    monkeypatch.setattr(export_module, "_file_runner", lambda path, fmt: nan_at_batch_3)
    with pytest.raises(ValueError, match=r"nan.pt2 was not written: .*: 103x27 \(batch 3\): NaN or infinity"):
        export(model, tmp_path / "nan.pt2", "torch-export")
    assert not (tmp_path / "nan.pt2").exists()
    # The command exits with an error, naming the file and the sizes (another preset: other shapes too).
    assert main(["export", str(tmp_path / "cli.pt2"), "--model", "swin_test"]) == 2
    assert "cli.pt2 was not written: the exported file does not compute" in capsys.readouterr().err
    assert not (tmp_path / "cli.pt2").exists()


def test_export_and_predict_take_the_label_names_of_a_hugging_face_folder(tmp_path, monkeypatch):
    # transformers' config.json names the classes (id2label): `swinkit export` and `predict` dropped them.
    model = swinkit.create_model("swin_test", num_classes=3, img_size=128)  # no clamped window: transformers'
    swinkit.save(model, tmp_path / "model.safetensors", class_names=["cat", "dog", "emu"])
    folder = convert(tmp_path / "model.safetensors", tmp_path / "hf", to="hf").target
    assert load_classifier(folder)[1] == ["cat", "dog", "emu"]
    exported = {}
    monkeypatch.setattr(export_module, "export", lambda *args, **options: exported.update(args=args) or {})
    assert main(["export", str(tmp_path / "model.onnx"), "--checkpoint", str(folder)]) == 0
    assert exported["args"][6] == ["cat", "dog", "emu"]  # export(model, output, fmt, size, opset, check, names)


def test_a_segmentation_export_is_checked_and_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    torch.manual_seed(0)
    spec = DenseSpec("segment", create_backbone("swin_test").config, ["a", "b", "c"], head={"channels": 8})
    segmentor = build_dense_model(spec).train()
    run = export_module._file_runner
    # NaN logits: the check took max(0.0, error), which drops a NaN, and reported an error of 0.
    monkeypatch.setattr(export_module, "_file_runner", lambda *file: lambda x: [o * math.nan for o in run(*file)(x)])
    path, size = tmp_path / "segmentor.pt2", (40, 56)
    with pytest.raises(ValueError, match=r"segmentor.pt2 was not written: .*40x56 \(batch 1\): NaN or infinity"):
        export_segmentation(segmentor, spec, path, "torch-export", size, static_size=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    report = export_segmentation(segmentor, spec, path, "torch-export", size, static_size=True)
    assert segmentor.training and segmentor.backbone.training  # it used to be left in eval mode
    assert report["max_relative_error"] < 1e-5 and [c["size"] for c in report["checked"]] == [[40, 56]] * 2


def _fixed_image_dims(graph: torch.fx.GraphModule) -> tuple:
    """Whether each of the traced images' batch, height and width is a fixed number in a dynamo graph."""
    (images,) = [node.meta["example_value"] for node in graph.graph.find_nodes(op="placeholder") if node.name == "l_x_"]
    return tuple(is_concrete_int(images.shape[dim]) for dim in (0, 2, 3))


def _recording_backend(describe) -> tuple[list, object]:
    """A torch.compile backend that runs each dynamo graph as traced, keeping ``describe(graph)`` of
    each in the returned list."""
    graphs = []

    def backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(describe(graph))
        return graph.forward

    return graphs, backend


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_keeps_height_and_width_static_and_the_batch_dynamic(training):
    # torch 2.14 does not finish compiling Swin's padding arithmetic with a symbolic height and
    # width (a plain torch.compile fell into it at the second image size and took minutes): the
    # model guards on them instead, one graph per size, while the batch goes dynamic as usual.
    graphs, recording_backend = _recording_backend(_fixed_image_dims)

    torch._dynamo.reset()  # dynamo remembers which dimensions it saw change, per code object
    model = _perturbed(swinkit.create_model("swin_test", num_classes=5, drop_path_rate=0.0)).train(training)
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    sizes = [(2, 64, 64), (3, 64, 64), (2, 40, 56), (4, 40, 56), (2, 72, 88)]
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, requires_grad=training)
        got, want = compiled(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if training:
            (gradient,) = torch.autograd.grad(got.square().sum(), x)
            (expected,) = torch.autograd.grad(want.square().sum(), x)
            torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-6)
    # 64x64 static, 64x64 with a dynamic batch, then one per new size: batch dynamic, sizes fixed.
    assert graphs == [(True, True, True)] + [(False, True, True)] * 3


@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_compiled_heads_attention_traces_whole(variant):
    # The test presets' heads (8 wide) are not the native kernel's: attention runs one head at a time
    # in PyTorch operations. V2's learned scales went to it as numbers read out of a tensor, which
    # dynamo cannot trace (a graph break per block in eval; fullgraph makes it an error).
    model = _perturbed(swinkit.create_model(variant, num_classes=5))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    model.train()
    gradients = [torch.autograd.grad(run(x).square().sum(), x)[0] for run in (compiled, model)]
    torch.testing.assert_close(*gradients, rtol=1e-5, atol=1e-6)


def _head_size_32(variant: str, **overrides) -> torch.nn.Module:
    """A test preset with head size 32, as in every published configuration: the native kernel's."""
    overrides = {"num_classes": 5, "embed_dim": 32, "num_heads": (1, 2, 4, 8), "window_size": 7, **overrides}
    return _perturbed(swinkit.create_model(variant, **overrides))


def _with_reference(variant: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A head-size-32 model and the same weights on the reference path."""
    model, reference = _head_size_32(variant), _head_size_32(variant)
    reference.load_state_dict(model.state_dict())
    reference.set_attn_impl("reference")
    return model, reference


def _operator_calls(graph: torch.fx.GraphModule) -> tuple[int, int]:
    """How many ``swinkit::window_attention`` and ``swinkit::linear`` calls a dynamo graph makes."""
    targets = [node.target for node in graph.graph.nodes]
    return targets.count(torch.ops.swinkit.window_attention), targets.count(torch.ops.swinkit.linear)


@pytest.mark.skipif(not native.built(), reason=native.status())
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_compiled_graph_keeps_the_native_kernel(variant):
    """Under torch.compile the fused path's attention is one ``swinkit::window_attention`` per block
    (the eager path's kernel) and its four linear layers ``swinkit::linear`` (oneDNN's), with a
    dynamic batch; AOTAutograd takes their gradient formulas. Outputs and every gradient as the
    reference path's."""
    graphs, recording_backend = _recording_backend(_operator_calls)

    torch._dynamo.reset()
    model, reference = _with_reference(variant)
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        for batch in (2, 3):  # 72 x 56: padding in stages 1-2, clamped windows after
            x = torch.randn(batch, 3, 72, 56)
            assert relative_error(compiled(x), reference(x)) < 1e-5
    linears = 32 if fast.ONEDNN_LINEAR else 0
    assert graphs == [(8, linears)] * 2  # every block of both graphs (a static, then a dynamic batch)

    torch._dynamo.reset()
    model.train(), reference.train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 72, 56)
    results = []
    for net in (compiled, reference):  # the same parameters in the same order
        images = x.clone().requires_grad_()
        loss = (net(images) * torch.arange(5.0)).sum()
        results.append(torch.autograd.grad(loss, (images, *net.parameters())))
    names = [name for name, _ in model.named_parameters()]
    for name, got, expected in zip(("images", *names), *results, strict=True):
        assert relative_error(got, expected) < 1e-5, name


def test_compiled_graph_without_the_kernel_or_onednn(monkeypatch):
    """With the native kernel off (as where it cannot be built) and oneDNN off, a compiled model
    traces the fused path in PyTorch operations alone, and still computes the reference's outputs."""
    graphs, recording_backend = _recording_backend(_operator_calls)

    torch._dynamo.reset()
    monkeypatch.setattr(native, "ENABLED", False)
    model, reference = _with_reference("swin_test")
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        got = torch.compile(model, backend=recording_backend, fullgraph=True)(x)
        assert relative_error(got, reference(x)) < 1e-5
    assert graphs == [(0, 0)]
    torch._dynamo.reset()


@pytest.mark.skipif(not native.built(), reason=native.status())
def test_compiled_graph_under_bfloat16_autocast():
    """CPU bfloat16 autocast (`--amp bf16`) compiles without graph breaks: the kernel operator takes
    the bfloat16 qkv (it attends in float32), the linear layers are autocast's, and the outputs are as
    close to float32's as eager swinkit's under the same autocast."""
    graphs, recording_backend = _recording_backend(_operator_calls)

    torch._dynamo.reset()
    model = _head_size_32("swinv2_test")
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = model(x)
            got = torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert graphs == [(8, 0)]
    assert relative_error(got.float(), want) < max(2 * relative_error(eager.float(), want), 1e-2)
    torch._dynamo.reset()


@pytest.mark.parametrize("batch", [1, 2])  # one image runs in the caller's thread; two split over the workers
def test_jit_trace_is_refused_with_the_ways_that_work(tmp_path, batch):
    # The tracer once stored the native kernel's and the workers' results as constants: a traced
    # model gave other images wrong outputs (batch 2), or the trace failed deep inside (batch 1).
    model = _head_size_32("swin_test")
    x = torch.randn(batch, 3, 64, 64)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace cannot trace swinkit models.*swinkit\.export"):
        torch.jit.trace(model, x)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace cannot trace swinkit models"):
        torch.onnx.export(model, (x,), tmp_path / "legacy.onnx", dynamo=False)
    assert model(x).shape == (batch, 5)  # nothing left behind: eager runs as before


def _thread_and_batch(graph: torch.fx.GraphModule) -> tuple[str, int]:
    """The thread that traced a dynamo graph and the batch size of the images it was traced with."""
    (images,) = [node.meta["example_value"] for node in graph.graph.find_nodes(op="placeholder") if node.name == "l_x_"]
    batch = images.shape[0]
    return threading.current_thread().name, batch if is_concrete_int(batch) else batch.node.hint  # a symbol's value


@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_model_compile_keeps_the_batch_split_over_the_workers(variant, two_threads, monkeypatch):
    # torch.compile(model) traces forward whole: a CPU batch then runs unsplit (0.85-0.87x eager). In
    # place, model.compile() compiles each share's forward, which the workers run a few images at
    # a time without autograd: here two, as for Swin-T's four at 224.
    monkeypatch.setattr(parallel, "COMPILED_CHUNK_TOKENS", 2 * 16 * 16)
    graphs, recording_backend = _recording_backend(_thread_and_batch)
    model = _head_size_32(variant)
    eager = copy.deepcopy(model)
    model.compile(backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        for shape in [(8, 3, 64, 64), (7, 3, 40, 56), (1, 3, 40, 56)]:
            x = torch.randn(shape)
            torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)
    shares = [batch for thread, batch in graphs if thread.startswith("swinkit-images")]
    whole = [batch for thread, batch in graphs if not thread.startswith("swinkit-images")]
    # 8 images of 64x64 (2 per part): shares of 4, each in parts of 2 and 2. 7 of 40x56 (3 per
    # part): shares of 4 (parts of 2 and 2) and 3 (one part). Never a whole share of 4 at once.
    # (The batch may be a symbol from the start: dynamo remembers sizes per function name and line.)
    assert 2 in shares and set(shares) <= {2, 3}
    assert whole == [1]  # one image does not split: compiled in the caller's thread
    # The model stays itself: its state dict's keys, and a copy of it (EMA, int8) is a plain model.
    assert list(model.state_dict()) == list(eager.state_dict())
    copied = copy.deepcopy(model)
    count = len(graphs)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), eager(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == count
    assert compile_model(model) is model  # compile_model compiles a swinkit model in place
    assert compile_model(torch.nn.Linear(2, 2)).__class__ is torch.compile(torch.nn.Linear(2, 2)).__class__


# (threads, batch, graphs per mode): shares of 2 and 2; of 2, 2, 1 and 1 (one graph per share size).
@pytest.mark.parametrize("threads, batch, sizes", [(2, 4, 1), (4, 6, 2)])
def test_model_compile_compiles_a_new_shape_once_for_all_the_workers(threads, batch, sizes, two_threads):
    # Workers meeting a new shape together each traced and compiled it, and each compiled its
    # backward (Swin-T cold, inference: 47.8-50.2 s against 42.4-43.6 once; two of dynamo's 8
    # graphs): one share of each size of a new kind now runs alone first, forward and backward,
    # and the others find its graphs.
    torch.set_num_threads(threads)  # the fixture restores the caller's count
    compiles = []

    def recording(which: str):
        def compiler(graph: torch.fx.GraphModule, inputs: list) -> object:
            compiles.append((which, threading.current_thread().name))
            return make_boxed_func(graph.forward)

        return compiler

    model = _head_size_32("swin_test", drop_path_rate=0.2)
    # Without fullgraph, as users compile: a graph break would show as more graphs. Maps of 16 pad to
    # 21 (windows of 7): their gradient once took the padded tokens by a mask, a data-dependent shape.
    # Static shapes: dynamo remembers the batch sizes earlier tests' share forwards saw (by function
    # name and line), which could make a batch a symbol and add a graph for it.
    recording_backend = aot_autograd(fw_compiler=recording("forward"), bw_compiler=recording("backward"))
    model.compile(backend=recording_backend, dynamic=False)
    eager = copy.deepcopy(model)
    x = torch.randn(batch, 3, 64, 64)
    for training in (False, True):
        model.train(training)
        eager.train(training)
        # Several batches: workers of the same share size then look the graphs up together, where
        # dynamo's reordering of its list had one step past the graph it needed and compile it again.
        for _ in range(5):
            torch.manual_seed(3)
            with torch.set_grad_enabled(training):
                assert image_splits(model, x) == threads
                outputs = model(x)
            if training:
                outputs.sum().backward()
        torch.manual_seed(3)
        with torch.set_grad_enabled(training):
            torch.testing.assert_close(outputs, eager(x), rtol=1e-5, atol=1e-5)
    # Per share size one forward graph each for inference and training, one backward (compiled with
    # its forward where the batch is a symbol, else when first run), all in a worker.
    assert collections.Counter(which for which, _ in compiles) == {"forward": 2 * sizes, "backward": sizes}
    assert all(thread.startswith("swinkit-images") for _, thread in compiles)


@pytest.mark.parametrize("in_place", [True, False])
def test_compiled_training_draws_the_eager_stochastic_depth_masks(in_place, two_threads):
    # Dynamo cannot trace a generator, and inductor's random numbers come from the process's
    # generator, which two shares would draw from in either order: the masks are drawn by an
    # operator when the graph runs. model.compile() draws each share's from its own generator, as
    # eager does; torch.compile(model) draws from the default one in the serial path's order.
    model = _head_size_32("swin_test", drop_path_rate=0.5).train()
    eager = copy.deepcopy(model)
    if in_place:
        model.compile(backend="aot_eager", fullgraph=True)
        compiled = model
    else:
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        eager.image_parallel = False  # a compiled graph takes the batch whole
    x, labels = torch.randn(4, 3, 40, 56), torch.tensor([0, 4, 2, 1])
    assert image_splits(eager, x) == (2 if in_place else 1)
    losses, gradients = [], []
    for run in (compiled, eager, compiled):  # the compiled run twice: the same draws from the same seed
        torch.manual_seed(7)
        loss = torch.nn.functional.cross_entropy(run(x), labels)
        losses.append(loss.detach())
        gradients.append(torch.autograd.grad(loss, list(run.parameters())))
    for loss, grads in zip(losses[1:], gradients[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], rtol=1e-6, atol=1e-6)
        for got, want in zip(gradients[0], grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)  # another seed, other masks: the draws are random, not fixed in the graph
    assert not torch.allclose(torch.nn.functional.cross_entropy(compiled(x), labels).detach(), losses[0])


@pytest.mark.skipif(not fast.ONEDNN_LINEAR, reason="this PyTorch has no oneDNN linear")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual"])
def test_compile_linear_operator(packed, epilogue):
    """``swinkit::linear``: torch.library's checks, and its output and gradients as PyTorch's linear
    with GELU or the residual added (oneDNN's GEMM: float32 rounding apart)."""
    x, weight, bias = (torch.randn(shape, requires_grad=True) for shape in ((50, 96), (288, 96), (288,)))
    residual = torch.randn(50, 288, requires_grad=True) if epilogue == "residual" else None
    gelu = epilogue == "gelu"
    arguments = (x, weight, bias, gelu, residual, packed)
    torch.library.opcheck(torch.ops.swinkit.linear.default, arguments)
    got = torch.ops.swinkit.linear(*arguments)
    expected = torch.nn.functional.linear(x, weight, bias)
    expected = torch.nn.functional.gelu(expected) if gelu else expected
    expected = expected + residual if residual is not None else expected
    assert relative_error(got, expected) < 1e-6
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad), strict=True):
        assert relative_error(a, b) < 1e-6


# Inductor writes and compiles C++ kernels for every block and image size: on a cold cache (2
# cores) the two tests below took 100 s and 75 s with swin_test's eight blocks, 83 s and 52 s with
# these five (a shifted and an unshifted block in the first stage, one block in each other). The
# tests above trace the whole of swin_test, without inductor. With head size 32 the native kernel
# runs inside inductor's code.
INDUCTOR_DEPTHS = (2, 1, 1, 1)


def test_compiled_model_matches_eager_without_graph_breaks():
    model = _head_size_32("swin_test", depths=INDUCTOR_DEPTHS)
    # dynamic=True would make height and width symbolic too: the model keeps them static.
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        for shape in [(2, 3, 64, 64), (3, 3, 64, 64), (2, 3, 40, 56)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager(two_threads):
    # What `swinkit train --compile` runs: each share's forward and backward through inductor, in
    # the worker threads, with stochastic depth drawn as eager draws it; every gradient.
    model = _head_size_32("swin_test", depths=INDUCTOR_DEPTHS, drop_path_rate=0.3).train()
    eager = copy.deepcopy(model)
    compiled = compile_model(model, fullgraph=True)
    x, labels = torch.randn(4, 3, 40, 56), torch.tensor([0, 4, 2, 1])
    assert image_splits(model, x) == 2
    losses, gradients = [], []
    for run in (compiled, eager):
        torch.manual_seed(3)
        loss = torch.nn.functional.cross_entropy(run(x), labels)
        loss.backward()
        losses.append(loss.detach())
        gradients.append({name: p.grad.clone() for name, p in run.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for name, expected in gradients[1].items():
        torch.testing.assert_close(gradients[0][name], expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_and_eval_take_the_exported_file(tmp_path, fmt):
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=2)
    model = _perturbed(swinkit.create_model("swin_test", num_classes=3))
    names = ["digit0", "digit1", "digit2"]
    checkpoint = tmp_path / "model.safetensors"
    exported_file = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    swinkit.save(model, checkpoint, class_names=names)
    export(model, exported_file, fmt, class_names=names, check=False, static_size=True)  # the quicker trace

    expected, exported = predict([folder], checkpoint, topk=3), predict([folder], exported_file, topk=3)
    assert len(exported) == 6
    for want, got in zip(expected, exported, strict=True):
        assert [p["class"] for p in got["predictions"]] == [p["class"] for p in want["predictions"]]
        for p, q in zip(got["predictions"], want["predictions"], strict=True):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)
    metrics = evaluate_checkpoint(folder, exported_file, workers=0)
    reference = evaluate_checkpoint(folder, checkpoint, workers=0)
    assert metrics["images"] == 6 and metrics["top1"] == reference["top1"]
    assert metrics["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert main(["predict", str(folder), "--checkpoint", str(exported_file)]) == 0
    if fmt == "torch-export":
        with pytest.raises(ValueError, match="eval mode only"):
            ProgramClassifier(exported_file).train()


def _write_unusable_onnx_files(folder) -> tuple[str, dict[str, str], str]:
    """backbone.onnx, bare.onnx (no metadata), broken.onnx; the broken one's message, an option the
    format refuses and the refusal."""
    backbone = _perturbed(swinkit.create_model("swin_test", features_only=True))
    export_onnx_model(backbone, folder / "backbone.onnx", dynamic_size=False)  # the quicker trace
    proto = onnx.load(str(folder / "backbone.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(folder / "bare.onnx"))
    (folder / "broken.onnx").write_bytes(b"not a model")
    return (
        "onnxruntime cannot load it",
        {"device": "cuda"},
        "an ONNX file runs in onnxruntime on the CPU.*'cuda'.*'none'",
    )


def _write_unusable_programs(folder) -> tuple[str, dict[str, str], str]:
    """backbone.pt2, bare.pt2 (plain torch.export.save), broken.pt2; as above."""
    backbone = _perturbed(swinkit.create_model("swin_test", features_only=True))
    save_program(backbone, folder / "backbone.pt2", dynamic_size=False)  # the quicker trace
    classifier = _perturbed(swinkit.create_model("swin_test", num_classes=3))
    torch.export.save(export_program(classifier, dynamic_size=False), folder / "bare.pt2")
    (folder / "broken.pt2").write_bytes(b"not a program")
    return (
        "not a torch.export program",
        {"amp": "bf16"},
        "a .pt2 program runs in its exported precision.*'bf16'.*accepted: none",
    )


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_exported_files_that_cannot_classify_are_refused_by_name(tmp_path, capsys, suffix):
    image = tmp_path / "images"
    image.mkdir()
    Image.new("RGB", (40, 30), "gray").save(image / "one.png")  # the files, not the images, are refused
    write = _write_unusable_onnx_files if suffix == ".onnx" else _write_unusable_programs
    broken, option, refusal = write(tmp_path)
    cases = {
        "backbone": "a backbone .outputs \\['features0'",
        "bare": "no swinkit.config in its metadata",
        "broken": broken,
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=f"{name}{suffix}: {message}"):
            predict([image], tmp_path / f"{name}{suffix}")
    with pytest.raises(ValueError, match=f"backbone{suffix}: {refusal}"):
        predict([image], tmp_path / f"backbone{suffix}", **option)
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / f"broken{suffix}")]) == 2
    assert f"broken{suffix}: {broken}" in capsys.readouterr().err


def test_a_file_fixed_to_another_square_size_is_fed_that_size_by_predict_and_eval(tmp_path, caplog):
    # swin_test crops 64 from 73; a file fixed to 48 takes 48 only, so its own commands crop 48
    # from 73 * 48 // 64 = 54 (the same ratio, as the official rule moves 224 from 256 to 384 from 438).
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=2)
    model = _perturbed(swinkit.create_model("swin_test", num_classes=3))
    checkpoint, fixed = tmp_path / "model.safetensors", tmp_path / "fixed48.pt2"
    swinkit.save(model, checkpoint, class_names=["digit0", "digit1", "digit2"])
    assert (
        main(["export", str(fixed), "--checkpoint", str(checkpoint), "--img-size", "48", "--static-size", "--no-check"])
        == 0
    )
    program = ProgramClassifier(fixed)
    assert (program.config.preprocessing.resize, program.config.preprocessing.crop) == (54, 48)
    assert program.size_range == {"height": [48, 48], "width": [48, 48]}

    results = predict([folder], fixed, topk=3)
    transform = eval_transform(Preprocessing(resize=54, crop=48))
    with torch.no_grad():
        images = torch.stack([transform(load_image(Path(result["path"]))) for result in results])
        expected = model(images).softmax(-1)
    assert len(results) == 6
    for result, probabilities in zip(results, expected, strict=True):
        got = sorted(result["predictions"], key=lambda p: p["index"])
        assert [p["probability"] for p in got] == pytest.approx(probabilities.tolist(), abs=1e-5)
    assert evaluate_checkpoint(folder, fixed, workers=0)["images"] == 6

    # A non-square fixed size cannot come out of a square crop: said when written and when read.
    oblong = tmp_path / "oblong.pt2"
    report = export(model, oblong, "torch-export", img_size=(48, 64), check=False, static_size=True)
    assert report["preprocessing"] == {"resize": 73, "crop": 64}
    assert "takes 48x64 images only" in caplog.text
    with pytest.raises(ValueError, match=r"oblong\.pt2: .*crops to 64, outside .*height range 48\.\.48.*square"):
        predict([folder], oblong)
