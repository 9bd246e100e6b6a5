"""The command line, run in-process through main(argv) and once as a real subprocess."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from swinkit.cli import main


def test_info_prints_params_flops_and_stages(capsys):
    assert main(["info", "swin_t"]) == 0
    out = capsys.readouterr().out
    assert "28.29 M" in out and "4.49 G" in out
    assert "768 x   7 x 7" in out


def test_info_json_and_size(capsys):
    assert main(["info", "swin_test", "--img-size", "96x64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_size"] == [3, 96, 64]
    assert [(s["height"], s["width"]) for s in info["stages"]] == [(24, 16), (12, 8), (6, 4), (3, 2)]


def test_bad_image_sizes_are_refused_by_name(capsys):
    for bad in ("12x", "x12", "1x2x3", "0", "big"):
        try:
            code = main(["info", "swin_test", "--img-size", bad])
        except SystemExit as exit:  # argparse rejects the value itself
            code = exit.code
        assert code == 2, bad
        assert repr(bad) in capsys.readouterr().err


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["info", "swin_xl"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'swin_xl'" in err and "swin_t" in err and "Traceback" not in err


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "swinkit", "info", "--list"], capture_output=True, text=True)
    assert result.returncode == 0 and "swin_b_384" in result.stdout.split()


def test_every_training_option_has_a_help_text(capsys):
    from swinkit.dense.config import TASKS, DenseConfig, DetectionConfig, SegmentationConfig
    from swinkit.train.config import RECIPES, TrainConfig
    from swinkit.train.pretrain import PRETRAIN_RECIPES, PretrainConfig

    for options in (TrainConfig, PretrainConfig, DenseConfig, SegmentationConfig, DetectionConfig):
        fields = {f.name for f in dataclasses.fields(options)}
        assert not fields - set(options.HELP), f"{options.__name__}: no help text for {fields - set(options.HELP)}"
        assert not set(options.HELP) - fields, (
            f"{options.__name__}: help texts of no field {set(options.HELP) - fields}"
        )
        assert all(text.strip() for text in options.HELP.values()), options.__name__
    commands = {
        "train": (TrainConfig, RECIPES),
        "pretrain": (PretrainConfig, PRETRAIN_RECIPES),
        "segment train": (SegmentationConfig, TASKS["segment"][1]),
        "detect train": (DetectionConfig, TASKS["detect"][1]),
    }
    for command, (options, recipes) in commands.items():
        try:
            code = main([*command.split(), "--help"])
        except SystemExit as exit:
            code = exit.code
        assert code == 0, command
        out = " ".join(capsys.readouterr().out.split())  # as wrapped to the terminal, unwrapped
        assert f"{options.HELP['clip_grad']} (default: {options.clip_grad})" in out, command
        assert "Defaults shown are" in out and all(name in out for name in recipes), command
        if command in ("train", "pretrain"):  # without --data the digits recipe applies: its values beside
            digits = recipes["digits"]
            assert f"{options.HELP['epochs']} (default: {options.epochs}; without --data: {digits['epochs']})" in out
            assert f"(default: {options.clip_grad}; without" not in out, "shown only where the recipes differ"
        if command == "segment train":  # its default recipe always applies: its values are the defaults shown
            assert f"{options.HELP['epochs']} (default: {recipes['ade20k']['epochs']})" in out
            assert f"(default: {options.epochs})" not in out
    for task, (options, _, default) in TASKS.items():
        assert f"(default: {default})" in options.HELP["recipe"], task


def test_every_public_function_and_class_has_a_docstring_and_type_hints():
    # The style guide's rule for the public API, over every module: a name without a leading
    # underscore, defined in the module (not imported into it).
    import importlib
    import inspect
    import pkgutil

    import swinkit

    undocumented, unhinted = [], []
    for info in pkgutil.walk_packages(swinkit.__path__, "swinkit."):
        if info.name.endswith(("._triton_kernels", ".__main__")):  # Triton's JIT sources; the entry point
            continue
        module = importlib.import_module(info.name)
        for name, item in vars(module).items():
            if name.startswith("_") or getattr(item, "__module__", None) != module.__name__:
                continue
            if not (inspect.isfunction(item) or inspect.isclass(item)):
                continue
            if not inspect.getdoc(item):
                undocumented.append(f"{module.__name__}.{name}")
            if inspect.isfunction(item):
                signature = inspect.signature(item)
                hints = [p.annotation for key, p in signature.parameters.items() if key not in ("self", "cls")]
                if inspect.Parameter.empty in [*hints, signature.return_annotation]:
                    unhinted.append(f"{module.__name__}.{name}")
    assert not undocumented, f"no docstring: {undocumented}"
    assert not unhinted, f"no type hints: {unhinted}"


def test_predict_and_explain_report_an_image_too_elongated_to_resize_and_go_on(tmp_path, capsys):
    # Resizing its shorter side to 36 would make a 40000x1 image 1440000x36 (100000x1 at 256: 25 GB).
    from PIL import Image

    import swinkit
    from helpers import write_digit_folder

    folder = write_digit_folder(tmp_path / "digits", classes=(0,), per_class=1, formats=("png",))
    long = folder / "digit0" / "long.png"
    Image.new("RGB", (40000, 1)).save(long)
    checkpoint = tmp_path / "model.safetensors"
    model = swinkit.create_model("swin_test", img_size=32, num_classes=2)
    assert model.config.preprocessing.resize == 36  # the short-side resize, then a crop of 32
    swinkit.save(model, checkpoint, class_names=["a", "b"])
    expected = f"image {long}: an image of 40000x1 pixels is too elongated to evaluate"
    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--json"]) == 0
    results = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert len(results) == 2 and results[str(long)]["error"].startswith(expected)
    out = tmp_path / "maps"
    assert main(["explain", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["error"].startswith(expected) for r in results if "error" in r] == [True]
    assert len(list(out.glob("*.png"))) == 1


def test_strict_data_with_workers_prints_the_bad_images_own_message_in_one_line(tmp_path, capsys):
    # torch re-raises a worker's error with its whole traceback as the message: 22 lines after "error:".
    import swinkit
    from helpers import write_digit_folder

    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=2, formats=("png",))
    broken = folder / "digit1" / "broken.png"
    broken.write_bytes(b"not a png")
    checkpoint = tmp_path / "model.safetensors"
    model = swinkit.create_model("swin_test", img_size=32, num_classes=2)
    swinkit.save(model, checkpoint, class_names=["digit0", "digit1"])
    lines = {}
    for workers in ("0", "1"):
        args = ["eval", "--data", str(folder), "--checkpoint", str(checkpoint), "--strict-data", "--workers", workers]
        assert main(args) == 2
        lines[workers] = capsys.readouterr().err.strip().splitlines()
    assert lines["1"] == lines["0"] and len(lines["1"]) == 1, lines
    assert lines["1"][0].startswith(f"swinkit eval: error: cannot decode image {broken}: ")
    assert "Traceback" not in lines["1"][0]
