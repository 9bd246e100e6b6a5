"""Detectors exported to ONNX: onnxruntime against eager PyTorch at sizes and shapes the trace never saw."""

from __future__ import annotations

import copy
import logging
import re
import shutil

import onnx
import pytest
import torch
from PIL import Image

from swinkit.cli import main
from swinkit.dense import DenseSpec, create_detector, detection_export, save_dense
from swinkit.dense.detection_export import (
    BACKBONE_PREFIX,
    RESIZE_KEY,
    ExportedDetector,
    _export_transform,
    check_sizes_for,
    compare_with_eager,
    export_detection,
)
from swinkit.dense.export import load_dense_file
from swinkit.dense.mmdet import AlignedRoIPool
from swinkit.dense.predict import predict_dense
from swinkit.dense.weights import build_dense_model
from swinkit.export import onnx_session

# Random weights keep every region (score threshold 0): 100 detections an image to compare.
OPTIONS = dict(min_size=96, max_size=160, fpn_channels=32, box_head_dim=64, mask_head_dim=32, roi_batch_size=64,
               anchor_sizes=(8, 16, 32, 64, 128), score_threshold=0.0)  # fmt: skip


def _detector(masks=True, **options):
    torch.manual_seed(0)
    return create_detector("swin_test", 3, masks=masks, detector_options={**OPTIONS, **options}).eval()


def _spec(detector, **options):
    head = {**OPTIONS, "masks": True, **options}
    return DenseSpec("detect", detector.backbone.body.config, ["a", "b", "c"], head=head,
                     inference={"category_ids": [1, 2, 3]})  # fmt: skip


@pytest.mark.parametrize("size", [(200, 100), (61, 61), (70, 150), (333, 517), (40, 1000)])
@pytest.mark.parametrize("geometry", ["mmdet", "torchvision"])
def test_the_export_resize_is_torchvisions_eager_resize(size, geometry):
    # torchvision's own traced resize scales in float32: 200 x 100 at (96, 160) would become 159 x 79.
    transform = _detector(geometry=geometry).transform
    image = torch.rand(3, *size)
    expected, _ = transform.resize(image, None)
    found, _ = _export_transform(transform).resize(image, None)
    assert found.shape == expected.shape
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-6)


def test_the_exported_mask_rcnn_detects_as_eager_at_sizes_it_was_not_traced_at(tmp_path, monkeypatch, caplog):
    detector = _detector()
    images = [torch.rand(3, *size, generator=torch.Generator().manual_seed(i))
              for i, size in enumerate([(96, 128), (200, 100), (61, 61), (300, 500)])]  # fmt: skip
    path = tmp_path / "mask_rcnn.onnx"
    # At opset 17, the oldest it writes (the cascade's CLI test in test_dense_detection.py exports
    # at the default, 18): heads traced at 17, the backbone's graph converted down to it.
    report = export_detection(detector, _spec(detector), path, check_images=images, opset=17)
    assert [(entry.domain, entry.version) for entry in onnx.load(path).opset_import if entry.domain == ""] == [("", 17)]
    assert report["detections"] == [100] * 4 and report["same_detections"]
    assert report["max_box_error"] < 1e-3 and report["max_score_error"] < 1e-5 and report["max_mask_error"] < 1e-3
    graph = onnx.load(path).graph  # one image of any size in; the backbone inlined, no placeholder left
    assert [value.name for value in graph.input] == ["image"]
    assert [dim.dim_param for dim in graph.input[0].type.tensor_type.shape.dim][1:] == ["height", "width"]
    assert not any(node.domain == "swinkit_export" for node in graph.node)
    assert any(node.name.startswith(BACKBONE_PREFIX) for node in graph.node)

    exported, spec = load_dense_file(path)
    assert isinstance(exported, ExportedDetector) and spec.classes == ["a", "b", "c"]
    found = exported([images[1]])[0]
    assert found["masks"].shape == (100, 1, 200, 100) and found["labels"].dtype == torch.int64
    # The check catches a file that computes something else: another detector's weights differ. Such
    # a file is not written (the file above stands for the other detector's export: no trace).
    other = create_detector("swin_test", 3, detector_options=OPTIONS).eval()
    differing = compare_with_eager(other, exported, images[:1])
    assert not differing["same_detections"] and not differing["images"][0]["differ_among_ties"]
    assert not differing["images"][0]["agree_with_noise"]  # re-checked with noise even without ties: still differ
    # Differences that noise of 1e-3 takes away without eager's scores tied (a trained detector's detection
    # at its threshold, top-k cut or an NMS overlap, moved by float32 rounding) keep the file, said.
    boundary = {**differing["images"][0], "tied_scores": False, "agree_with_noise": True}
    with caplog.at_level(logging.WARNING):
        detection_export._judge(path, {**differing, "images": [boundary]})
    assert "a detection sits on a decision boundary there" in caplog.text

    def write_the_file_above(model, spec, temporary, size, opset):
        shutil.copy(path, temporary)
        return ["boxes", "labels", "scores", "masks"]

    monkeypatch.setattr(detection_export, "_write", write_the_file_above)
    message = r"other.onnx was not written: .*: at 141x73 (\d+) of eager's 100 detections and \1 of onnxruntime's 100"
    with pytest.raises(ValueError, match=message + " have no partner within the tolerances"):
        export_detection(other, _spec(other), tmp_path / "other.onnx")
    assert not (tmp_path / "other.onnx").exists()
    monkeypatch.undo()
    # A constant image: many regions score exactly alike, and torch and onnxruntime keep different ones
    # among them; the check said "the same detections". It says so plainly now, and keeps the file.
    blank = compare_with_eager(detector, exported, [torch.zeros(3, 120, 160)])
    (entry,) = blank["images"]
    assert not blank["same_detections"] and entry["differing"] and entry["tied_scores"] and entry["differ_among_ties"]
    with caplog.at_level(logging.WARNING):
        detection_export._judge(path, blank)  # kept: with the ties broken every detection agrees
    assert re.search(r"at 120x160 \d+ of eager's 100 detections .*differ among exactly tied scores", caplog.text)
    with pytest.raises(ValueError, match="eval mode only; it cannot train"):
        exported.train()
    for shape in ((1, 3, 64, 64), (3, 0, 5)):
        with pytest.raises(
            ValueError, match=r"takes RGB images \(3, H, W\), H and W 1 or more; got " + re.escape(str(shape))
        ):
            exported([torch.rand(shape)])
    # 2 x 900 at this 96 / 160 scale resizes to a height of 0: refused as eager refuses it, where it
    # failed inside onnxruntime's resize. A file from before the test scale was stored fails there, and
    # onnxruntime's failures name the file and the image; one without the RoI-pooling mark (exported
    # before its fix) says to export again.
    assert exported.merges_by_scatter
    with pytest.raises(ValueError, match=r"mask_rcnn.onnx: an image of 2x900 resizes to 0x160 at the detector's scale "
                                         r"\(shorter side 96, longer at most 160\): too elongated"):  # fmt: skip
        exported([torch.rand(3, 2, 900)])
    stored = onnx.load(path)
    kept = [entry for entry in stored.metadata_props if entry.key not in ("swinkit.roi_levels_merged", RESIZE_KEY)]
    del stored.metadata_props[:]
    stored.metadata_props.extend(kept)
    onnx.save(stored, tmp_path / "older.onnx")
    with pytest.raises(ValueError, match=r"older.onnx: onnxruntime failed on a 2x900 image: .*Resize.*exported "
                                         r"before swinkit's fix of 2026-12-07 .*: export it again"):  # fmt: skip
        ExportedDetector(tmp_path / "older.onnx")([torch.rand(3, 2, 900)])
    # Multi-scale or flip testing runs the detector's parts one by one: an exported file has none.
    with pytest.raises(ValueError, match="mask_rcnn.onnx: multi-scale and flip testing runs a detector's backbone"):
        Image.new("RGB", (40, 30), "gray").save(tmp_path / "one.png")
        predict_dense([tmp_path / "one.png"], path, tmp_path / "predicted", flip=True)


def test_the_exported_roi_pooling_takes_any_count_of_regions_a_level(tmp_path):
    # Traced with one region on each level, mmdet's RoI extractor once kept a level's count at 1 in
    # the ONNX file (a Mask R-CNN's few detections can meet that; the file then failed on images with
    # none or two there). Pooled here alone: four levels of a 256-pixel image, a box of side s pools
    # from level floor(log2(s / 56)).
    pool = AlignedRoIPool(["0", "1", "2", "3"], [4, 8, 16, 32], 7)
    maps = [torch.rand(1, 8, 256 // stride, 256 // stride) for stride in (4, 8, 16, 32)]

    class Pooling(torch.nn.Module):
        def forward(self, boxes):
            return pool(dict(zip("0123", maps, strict=True)), [boxes], [(256, 256)])

    def boxes(sides):
        return torch.tensor([[9.0, 9.0, 9.0 + side, 9.0 + side] for side in sides]).reshape(-1, 4)

    path = tmp_path / "pooling.onnx"
    trace = boxes([20, 120, 230, 460])  # one region on each level
    assert pool.levels(trace).tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        torch.onnx.export(
            Pooling(), (trace,), path, dynamo=False, input_names=["boxes"], dynamic_axes={"boxes": {0: "n"}}
        )
    session = onnx_session(path)
    for sides in ([20, 30], [120], [], [20, 120, 130, 230, 240, 460, 470]):
        found = session.run(None, {"boxes": boxes(sides).numpy()})[0]
        torch.testing.assert_close(
            torch.from_numpy(found), Pooling()(boxes(sides)), rtol=1e-5, atol=1e-6, msg=str(sides)
        )


def test_a_faster_rcnn_exports_at_opset_20_the_torchscript_exporters_last(tmp_path):
    # Boxes only (no mask head in the graph), at the top of the range: the heads traced at 20 and the
    # backbone written at 20 by the dynamo exporter, no conversion; checked on noise at two sizes,
    # neither the traced one (it was checked at its trace size), a portrait and a landscape one.
    detector = _detector(masks=False).train()  # a run exporting mid-way goes on training
    path = tmp_path / "faster_rcnn.onnx"
    report = export_detection(detector, _spec(detector, masks=False), path, opset=20)
    assert detector.training and detector.roi_heads.training  # it was left in eval mode
    assert [(entry.domain, entry.version) for entry in onnx.load(path).opset_import if entry.domain == ""] == [("", 20)]
    assert report["outputs"] == ["boxes", "labels", "scores"] and report["detections"] == [100, 100]
    assert report["same_detections"] and report["max_box_error"] < 1e-3 and report["max_score_error"] < 1e-5
    assert report["example_size"] == [96, 128] and report["checked_sizes"] == [[141, 73], [103, 139]]
    assert check_sizes_for(detector, (40, 400)) == [(413, 31), (47, 64)]


def test_bad_exports_and_files_are_clear_errors(tmp_path, capsys):
    detector = _detector()
    spec = _spec(detector)
    for name in ("detector.pt2", "detector.bin"):
        with pytest.raises(
            ValueError, match=rf"{name}: a detector exports to ONNX only \(\.onnx; .*name it detector\.onnx"
        ):
            export_detection(detector, spec, tmp_path / name)
    for dtype in (torch.float64, torch.bfloat16):  # refused before the trace, where the check failed after it
        with pytest.raises(TypeError, match=rf"float32 files .*; this model's weights are {str(dtype)[6:]}"):
            export_detection(copy.deepcopy(detector).to(dtype), spec, tmp_path / "detector.onnx")
    with pytest.raises(FileNotFoundError, match="folder .*missing does not exist"):
        export_detection(detector, spec, tmp_path / "missing" / "detector.onnx")
    for opset in (16, 21):
        with pytest.raises(ValueError, match=f"exports at ONNX opsets 17..20 .*, got {opset}"):
            export_detection(detector, spec, tmp_path / "detector.onnx", opset=opset)
    with pytest.raises(ValueError, match="exports detection models; this is a segment model"):
        export_detection(detector, DenseSpec("segment", spec.backbone, spec.classes), tmp_path / "detector.onnx")
    # An ONNX file without swinkit's metadata, and a file that is not ONNX at all.
    plain = tmp_path / "plain.onnx"
    node = onnx.helper.make_node("Identity", ["image"], ["boxes"])
    value = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([node], "g", [value], [onnx.helper.make_tensor_value_info("boxes", 1, None)])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), plain)
    with pytest.raises(ValueError, match="plain.onnx was not written by swinkit detect export"):
        ExportedDetector(plain)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    for load in (load_dense_file, ExportedDetector):  # the class on its own too
        with pytest.raises(ValueError, match="garbage.onnx: onnxruntime cannot load it"):
            load(garbage)
        with pytest.raises(FileNotFoundError, match="nothing.onnx does not exist"):
            load(tmp_path / "nothing.onnx")
    # The CLI: a segmentation model to 'detect export' is refused with the command that takes it.
    segmentor_spec = DenseSpec("segment", spec.backbone, ["x", "y"], head={"channels": 16})
    save_dense(build_dense_model(segmentor_spec), segmentor_spec, tmp_path / "segmentor.safetensors")
    capsys.readouterr()
    args = ["detect", "export", str(tmp_path / "out.onnx"), "--checkpoint", str(tmp_path / "segmentor.safetensors")]
    assert main(args) == 2
    assert "is a segment model; 'swinkit detect export' exports detect models" in capsys.readouterr().err
