"""Bad input at the command line: one clear line naming the value, path or file, exit code 2, no
traceback (the cases a sweep of every subcommand found answered by a raw traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import swinkit
from helpers import write_digit_folder
from swinkit.cli import main
from swinkit.dense import DenseSpec, create_backbone, save_dense
from swinkit.dense.config import SegmentationConfig
from swinkit.dense.shapes import write_shapes_dataset
from swinkit.dense.weights import build_dense_model
from swinkit.devices import check_device
from swinkit.export import format_for

TRAIN = ["train", "--model", "swin_test", "--img-size", "32", "--workers", "0", "--no-progress", "--epochs", "1",
         "--batch-size", "2", "--max-steps", "1", "--resume", "never"]  # fmt: skip


def _refused(argv, capsys):
    """Run ``swinkit argv``; its exit code must be 2 (argparse's or the command's) and its error a
    line of its own, without a traceback. Returns what it wrote to stderr."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse refuses the value itself
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err and "error:" in err, err
    return err


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    swinkit.save(swinkit.create_model("swin_test", num_classes=3), folder / "model.safetensors")
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), per_class=2)


@pytest.mark.parametrize(
    "argv, command, unknown",
    [
        (["train", "--data", "x", "--bogus", "3"], "train", "--bogus 3"),
        (["eval", "--data", "x", "--checkpoint", "y", "--bogus"], "eval", "--bogus"),
        (["segment", "train", "--bogus", "1"], "segment train", "--bogus 1"),
        (["detect", "eval", "--checkpoint", "x", "--data", "y", "extra"], "detect eval", "extra"),
    ],
)
def test_an_unknown_flag_is_named_by_its_command_with_that_commands_usage(argv, command, unknown, capsys):
    # argparse named the top level instead ("swinkit: error: ...", with the list of commands).
    err = _refused(argv, capsys)
    assert err.startswith(f"usage: swinkit {command} ")
    assert err.rstrip().endswith(f"swinkit {command}: error: unrecognized arguments: {unknown}")
    assert _refused(["--bogus"], capsys).rstrip().endswith("swinkit: error: unrecognized arguments: --bogus")
    # Before the command's word, the flag is the level above's: there it was unknown.
    known = [word for word in argv if word not in unknown.split()]
    for before, level in ((["--bogus", *known], "swinkit"), ([known[0], "--bogus", *known[1:]], f"swinkit {known[0]}")):
        err = _refused(before, capsys)
        assert err.startswith(f"usage: {level} ") and err.rstrip().endswith(
            f"{level}: error: unrecognized arguments: --bogus"
        )
    # An unknown word that repeats the command's is placed where it stands, not at the command's word.
    err = _refused(["segment", "train", "--data", "x", "segment"], capsys)
    assert err.rstrip().endswith("swinkit segment train: error: unrecognized arguments: segment")


def test_devices_are_checked_by_name():
    assert check_device("cpu") == torch.device("cpu")
    for name, message in [
        ("foo", "'foo' is not a device: use cpu, cuda or cuda:INDEX"),
        ("", "'' is not a device"),
        ("cuda:-1", "'cuda:-1' is not a device"),
        ("meta", "'meta' is not one swinkit runs on"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_device(name)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"this machine has {count} CUDA device"):
            check_device(f"cuda:{count}")
    else:
        with pytest.raises(ValueError, match="'cuda' was asked for but CUDA is not available here"):
            check_device("cuda")


def test_every_device_option_refuses_a_bad_device_before_any_work(classifier, digits, tmp_path, capsys):
    image = str(next(digits.glob("*/*.png")))
    for argv in [
        ["predict", image, "--checkpoint", str(classifier)],
        ["eval", "--data", str(digits), "--checkpoint", str(classifier)],
        ["explain", image, "--checkpoint", str(classifier), "--out", str(tmp_path / "x")],
        ["bench", "swin_test"],
        ["segment", "eval", "--data", str(tmp_path), "--checkpoint", str(classifier)],
        ["detect", "predict", image, "--checkpoint", str(classifier)],
    ]:
        assert "argument --device: device 'mystery' is not a device" in _refused([*argv, "--device", "mystery"], capsys)
    # Training's device is an option of its config (auto by default): the same check.
    err = _refused([*TRAIN, "--data", str(digits), "--output", str(tmp_path / "run"), "--device", "mystery"], capsys)
    assert "device 'mystery' is not a device" in err
    if not torch.cuda.is_available():  # a GPU this machine lacks: refused when the command runs, by name
        err = _refused(["predict", image, "--checkpoint", str(classifier), "--device", "cuda"], capsys)
        assert "device 'cuda' was asked for but CUDA is not available here" in err


def test_a_file_where_a_folder_must_be_or_a_folder_where_a_file_must_be(classifier, digits, tmp_path, capsys):
    image = str(next(digits.glob("*/*.png")))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("in the way")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    blocked = f"cannot make the folder {a_file}/sub: {a_file} is a file, not a folder"
    for argv, message in [
        (["eval", "--data", str(digits), "--checkpoint", str(classifier), "--output", str(a_file)],
         f"cannot make the folder {a_file}: it is a file"),
        (["eval", "--data", str(digits), "--checkpoint", str(classifier), "--output", str(a_file / "sub")], blocked),
        (["explain", image, "--checkpoint", str(classifier), "--out", str(a_file / "sub")], blocked),
        (["explain", image, "--checkpoint", str(classifier), "--out", str(a_file / "one.png")],
         f"cannot make the folder {a_file}: it is a file"),
        (["convert", str(classifier), str(a_folder)], f"{a_folder} is a folder: give the name of the file to write"),
        (["convert", str(classifier), str(a_file / "model.pth")], f"cannot make the folder {a_file}: it is a file"),
        (["export", str(a_folder), "--checkpoint", str(classifier), "--no-check"],
         f"{a_folder} is a folder: give the name of the file to write"),
        ([*TRAIN, "--data", str(digits), "--output", str(a_file)], f"cannot make the folder {a_file}: it is a file"),
    ]:  # fmt: skip
        assert message in _refused(argv, capsys), argv
    assert a_file.read_text() == "in the way" and list(a_folder.iterdir()) == []  # nothing written over
    # A run refused for its checkpoint leaves no empty output folder behind (checked, not made, first).
    missing, new = str(tmp_path / "missing.safetensors"), tmp_path / "new" / "out"
    for argv in [
        ["eval", "--data", str(digits), "--checkpoint", missing, "--output", str(new)],
        ["segment", "eval", "--data", str(digits), "--checkpoint", missing, "--output", str(new)],
        ["explain", image, "--checkpoint", missing, "--out", str(new)],
    ]:
        assert "missing.safetensors" in _refused(argv, capsys), argv
        assert not new.parent.exists(), argv
    # A folder the system will not make is still refused before the work (tried, then removed).
    if Path("/proc").is_dir():
        argv = ["eval", "--data", str(digits), "--checkpoint", str(classifier), "--output", "/proc/swinkit/out"]
        assert "cannot make the folder /proc/swinkit/out" in _refused(argv, capsys)


def test_training_options_of_the_wrong_shape_are_refused_by_name(digits, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("crop_scale: [1.0]\n")
    argv = [*TRAIN, "--data", str(digits), "--output", str(tmp_path / "run"), "--config", str(config)]
    assert "training option 'crop_scale' must be a list of 2 numbers, got [1.0]" in _refused(argv, capsys)
    config.write_text("betas: 0.9\n")
    assert "training option 'betas' must be" in _refused(argv, capsys)
    argv = [*TRAIN, "--data", str(digits), "--output", str(tmp_path / "run"), "--auto-augment", "mystery"]
    err = _refused(argv, capsys)
    assert "training option 'auto_augment' must be 'none' or a policy timm reads" in err and "'mystery'" in err


def test_a_pretrained_encoder_is_not_taken_for_a_classifier(digits, tmp_path, capsys):
    encoder = tmp_path / "encoder.safetensors"
    swinkit.save(swinkit.create_model("swin_test", num_classes=0), encoder)
    image = str(next(digits.glob("*/*.png")))
    for argv in [
        ["predict", image, "--checkpoint", str(encoder)],
        ["eval", "--data", str(digits), "--checkpoint", str(encoder)],
        ["explain", image, "--checkpoint", str(encoder), "--out", str(tmp_path / "x")],
    ]:
        err = _refused(argv, capsys)
        assert f"{encoder} holds no classifier head (num_classes 0" in err and "swinkit train --checkpoint" in err
    # A backbone (features_only) file: its model returns feature maps (predict and eval failed with
    # an AttributeError on the list of them).
    backbone = tmp_path / "backbone.safetensors"
    swinkit.save(swinkit.create_model("swin_test", num_classes=3, features_only=True), backbone)
    for argv in [
        ["predict", image, "--checkpoint", str(backbone)],
        ["eval", "--data", str(digits), "--checkpoint", str(backbone)],
    ]:
        assert f"{backbone} holds no classifier head (features_only" in _refused(argv, capsys), argv


def test_nothing_to_read_is_an_error_not_an_empty_success(classifier, digits, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no images here")
    for argv in [
        ["predict", str(empty), "--checkpoint", str(classifier)],
        ["explain", str(empty), "--checkpoint", str(classifier), "--out", str(tmp_path / "x")],
        ["detect", "predict", str(empty), "--checkpoint", str(classifier)],
    ]:
        assert f"{empty} holds no image files (.png, .jpg" in _refused(argv, capsys), argv
    # Image files that none can be decoded: scores over 0 images would pass for a result.
    broken = tmp_path / "broken"
    for name in ("digit0", "digit1", "digit2"):
        (broken / name).mkdir(parents=True)
        (broken / name / "a.png").write_bytes(b"not a png")
        (broken / name / "b.png").write_bytes(b"")
    err = _refused(["eval", "--data", str(broken), "--checkpoint", str(classifier), "--workers", "0"], capsys)
    assert f"no image of {broken} could be read: all 6 failed" in err
    err = _refused([*TRAIN, "--data", str(broken), "--output", str(tmp_path / "run")], capsys)
    assert f"no image of the training set ({broken}) could be read" in err


def test_training_options_are_not_silently_changed(digits, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    argv = [*TRAIN, "--data", str(digits), "--output", str(tmp_path / "run"), "--config", str(config)]
    for text, message in [
        ("accum_steps: 2.5", "training option 'accum_steps' must be int, got 2.5"),
        ("accum_steps: true", "training option 'accum_steps' must be int, got True"),
        ("hflip: yes", "training option 'hflip' must be float, got True"),
        ("betas: [0.9, 0.999, 3]", "training option 'betas' must be a list of 2 numbers, got [0.9, 0.999, 3]"),
    ]:
        config.write_text(text + "\n")
        assert message in _refused(argv, capsys), text
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x87\xff")
    assert f"{config} is not a text file" in _refused(argv, capsys)
    assert f"config file {tmp_path} is a folder" in _refused([*argv[:-1], str(tmp_path)], capsys)
    with pytest.raises(ValueError, match="test_mode must be one of whole, slide, got 'mystery'"):
        SegmentationConfig(test_mode="mystery")  # before the first epoch, not at its validation


def test_dense_commands_refuse_the_other_tasks_file_and_missing_splits(tmp_path, capsys):
    data = write_shapes_dataset(tmp_path / "shapes", {"training": 2, "validation": 1}, size=48)
    spec = DenseSpec(
        "segment", create_backbone("swin_test").config, ["a", "b", "c"], head={"channels": 8, "aux": False}
    )
    spec.inference = {"ignore_index": 255, "reduce_zero_label": False, "mode": "whole", "crop_size": 48,
                      "stride": 32, "scale": [56, 40]}  # fmt: skip
    model = build_dense_model(spec).eval()
    save_dense(model, spec, tmp_path / "segmentor.safetensors")
    # A run's training checkpoint holds the same model (its own keys) and description.
    run = tmp_path / "checkpoint-last.pt"
    torch.save({"spec": spec.to_json(), "model": model.state_dict(), "optimizer": {}, "epoch": 1}, run)
    image = str(next((data / "images" / "validation").iterdir()))
    segmentor = str(tmp_path / "segmentor.safetensors")
    err = _refused(["detect", "predict", image, "--checkpoint", segmentor], capsys)
    assert f"{segmentor} is a segment model; 'swinkit detect predict' runs detect models" in err
    err = _refused(["detect", "predict", image, "--checkpoint", segmentor, "--score-threshold", "2"], capsys)
    assert "score threshold must be between 0 and 1" in err
    # A split that is not there: every split's images together would pass for it.
    err = _refused(["segment", "eval", "--data", str(data), "--checkpoint", segmentor, "--split", "test"], capsys)
    assert f"{data} has no split 'test' (images/test/ with annotations/test/); its splits: training, validation" in err
    err = _refused(["segment", "eval", "--data", str(tmp_path / "nowhere"), "--checkpoint", segmentor], capsys)
    assert f"swinkit segment eval: error: segmentation folder {tmp_path / 'nowhere'} does not exist" in err
    evaluate = ["segment", "eval", "--data", str(data), "--workers", "0", "--json", "--checkpoint"]
    assert main([*evaluate, segmentor]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert main([*evaluate, str(run)]) == 0 and json.loads(capsys.readouterr().out) == scores
    err = _refused(["predict", image, "--checkpoint", str(run)], capsys)
    assert f"{run} is a swinkit segment model file, not a classifier" in err
    # A segmentation export is refused, as a classifier's, when its name says another format.
    err = _refused(["segment", "export", str(tmp_path / "s.onnx"), "--checkpoint", segmentor, "--format",
                    "torch-export"], capsys)  # fmt: skip
    assert "s.onnx: a .onnx file holds the onnx format, but format 'torch-export' was asked for" in err
    assert not (tmp_path / "s.onnx").exists()
    assert [format_for(name) for name in ("a.PT2", "a.pt2", "a.onnx", "a")] == ["torch-export"] * 2 + ["onnx"] * 2
    # Detection training leaves out images under --min-image-side (mmdet's 32): here all of them.
    train = ["detect", "train", "--data", str(data / "instances_training.json"), "--model", "swin_test",
             "--images", str(data / "images" / "training"), "--val-data", str(data / "instances_validation.json"),
             "--val-images", str(data / "images" / "validation")]  # fmt: skip
    err = _refused([*train, "--min-image-side", "49", "--output", str(tmp_path / "run")], capsys)
    assert "instances_training.json: none left to train on: all 2 of its images have a side under 49" in err


def test_an_export_whose_name_says_another_format_is_refused(classifier, tmp_path, capsys):
    err = _refused(["export", str(tmp_path / "model.pt2"), "--checkpoint", str(classifier), "--format", "onnx"], capsys)
    assert "model.pt2: a .pt2 file holds the torch-export format, but format 'onnx' was asked for" in err
    err = _refused(
        ["export", str(tmp_path / "m.onnx"), "--checkpoint", str(classifier), "--format", "torch-export"], capsys
    )
    assert "m.onnx: a .onnx file holds the onnx format, but format 'torch-export' was asked for" in err


def test_verbose_before_or_after_the_command_shows_the_traceback(digits, tmp_path, capsys):
    missing = str(tmp_path / "missing.safetensors")
    image = str(next(digits.rglob("*.png")))
    segment = ["segment", "eval", "--data", str(tmp_path), "--checkpoint", missing]
    for argv in (["-v", "predict", image, "--checkpoint", missing], ["predict", image, "--checkpoint", missing, "-v"],
                 [*segment, "--verbose"]):  # fmt: skip
        with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
            main(argv)
    assert "missing.safetensors does not exist" in _refused(["predict", image, "--checkpoint", missing], capsys)
    assert "missing.safetensors does not exist" in _refused(segment, capsys)


def test_a_checkpoint_named_onnx_a_folder_or_a_dead_link_is_called_what_it_is(classifier, digits, tmp_path, capsys):
    image = str(next(digits.glob("*/*.png")))
    renamed = tmp_path / "model.onnx"
    renamed.write_bytes(classifier.read_bytes())  # was onnxruntime's "INVALID_PROTOBUF : Protobuf parsing failed"
    err = _refused(["predict", image, "--checkpoint", str(renamed)], capsys)
    assert f"{renamed} is a safetensors checkpoint, not an ONNX file: give it a .safetensors name" in err
    (tmp_path / "folder.onnx").mkdir()  # was "folder.onnx: no such file"
    err = _refused(["eval", "--data", str(digits), "--checkpoint", str(tmp_path / "folder.onnx")], capsys)
    assert f"{tmp_path / 'folder.onnx'} is a folder, not an ONNX file" in err
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")  # was "loop.png does not exist"
    err = _refused(["predict", str(tmp_path / "loop.png"), "--checkpoint", str(classifier)], capsys)
    assert "loop.png is a symbolic link to" in err and "leads to no file (missing, or a loop)" in err
    # A checkpoint that is a dead link is called one too ("checkpoint file ... does not exist" before).
    for name in ("dead.safetensors", "dead.onnx", "dead.pt2"):
        (tmp_path / name).symlink_to(tmp_path / "gone" / name)
        err = _refused(["predict", image, "--checkpoint", str(tmp_path / name)], capsys)
        assert f"{tmp_path / name} is a symbolic link to {tmp_path / 'gone' / name} that leads to no file" in err
