"""Training: overfitting, the CLI end to end, exact resume after SIGKILL, torchrun DDP, fine-tuning."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import swinkit
from helpers import write_digit_folder
from swinkit import parallel
from swinkit.cli import main
from swinkit.data import DigitsDataset
from swinkit.data.transforms import eval_transform
from swinkit.train import TrainConfig, parameter_groups, resolve_config
from swinkit.train.optim import WarmupCosine, WarmupPoly, WarmupStep, build_optimizer, can_fuse, layer_id

# A small, fast configuration shared by the end-to-end runs.
FAST = ["--model", "swin_test", "--img-size", "32", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("data") / "digits", classes=(0, 1, 2), per_class=10)


def test_tiny_model_overfits_a_batch():
    digits = DigitsDataset(transform=eval_transform(swinkit.get_config("swin_digits").preprocessing))
    images = torch.stack([digits[i][0] for i in range(8)])
    labels = torch.tensor([digits[i][1] for i in range(8)])
    model = swinkit.create_model("swin_test", img_size=32, num_classes=10)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05, None), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_weight_decay_groups_by_name():
    model = swinkit.create_model("swin_test", num_classes=3, ape=True)
    groups = parameter_groups(model, weight_decay=0.05, layer_decay=None)
    no_decay = {name for g in groups if g["weight_decay"] == 0 for name in g["names"]}
    decay = {name for g in groups if g["weight_decay"] > 0 for name in g["names"]}
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    assert "absolute_pos_embed" in no_decay
    assert {"patch_embed.norm.weight", "layers.1.blocks.0.norm1.weight", "norm.bias", "head.bias"} <= no_decay
    assert "layers.0.downsample.norm.weight" in no_decay and "layers.0.blocks.0.attn.qkv.bias" in no_decay
    assert {"layers.0.blocks.0.attn.qkv.weight", "layers.0.downsample.reduction.weight", "head.weight"} <= decay
    assert not any("norm" in n or n.endswith(".bias") or "position" in n for n in decay)
    assert len(no_decay) + len(decay) == len(list(model.parameters()))


def test_layer_decay_ids_and_scales():
    depths = (2, 2, 6, 2)
    assert layer_id("patch_embed.proj.weight", depths) == 0
    assert layer_id("layers.0.blocks.0.mlp.fc1.weight", depths) == 1
    assert layer_id("layers.2.blocks.5.norm1.weight", depths) == 10
    assert layer_id("layers.1.downsample.reduction.weight", depths) == 4
    assert layer_id("head.weight", depths) == layer_id("norm.weight", depths) == 13
    model = swinkit.create_model("swin_test", num_classes=3)
    groups = parameter_groups(model, 0.05, layer_decay=0.5)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["patch_embed.proj.weight"] == 0.5**9


def test_optimizer_is_fused_where_it_can_be_and_matches_the_default():
    """The fused AdamW is an implementation choice only: the same steps as torch's default loop."""
    torch.manual_seed(0)
    fused_model = swinkit.create_model("swin_test", img_size=32, num_classes=3)
    plain_model = swinkit.create_model("swin_test", img_size=32, num_classes=3)
    plain_model.load_state_dict(fused_model.state_dict())
    initial = {name: p.detach().clone() for name, p in fused_model.named_parameters()}
    fused = build_optimizer(fused_model, 0.05, 0.8, lr=1e-3)
    plain = build_optimizer(plain_model, 0.05, 0.8, lr=1e-3, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    # The same gradients for both (the key bias's true gradient is zero, and Adam turns rounding
    # noise there into full steps, so gradients from two diverging models would not compare).
    for _ in range(3):
        for a in fused_model.parameters():
            a.grad = torch.randn_like(a)
        for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters(), strict=True):
        assert not torch.equal(a, initial[name]), name  # every parameter was updated
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # Sharded parameters (FSDP's DTensors) or integer tensors keep the default implementation.
    assert not can_fuse([torch.zeros(2, dtype=torch.int64)])


def test_warmup_cosine_schedule():
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}])
    schedule = WarmupCosine(optimizer, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(schedule.current_lr)
        schedule.step()
    assert lrs[0] == 1e-6 and lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert schedule.current_lr == pytest.approx(1e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-5)


def _rates(schedule, steps):
    rates = []
    for _ in range(steps):
        rates.append(schedule.current_lr)
        schedule.step()
    return rates


def test_poly_and_step_schedules_follow_the_official_dense_recipes():
    # mmcv's forms: the regular rate counts from step 0, and during the warm-up it is multiplied
    # by a factor rising linearly from warmup_lr / lr to 1.
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}])
    poly = WarmupPoly(optimizer, lr=6e-5, warmup_lr=6e-11, min_lr=0.0, warmup_steps=15, total_steps=160, power=1.0)
    rates = _rates(poly, 161)
    assert rates[0] == pytest.approx(6e-5 * 1e-6)
    assert rates[5] == pytest.approx(6e-5 * (1 - 5 / 160) * (1e-6 + (1 - 1e-6) * 5 / 15))
    assert rates[15] == pytest.approx(6e-5 * (1 - 15 / 160)) and rates[80] == pytest.approx(3e-5)
    assert rates[160] == 0.0 and poly.current_lr == 0.0  # past the end it stays at min_lr
    assert optimizer.param_groups[0]["lr"] == 0.0
    squared = WarmupPoly(optimizer, lr=1.0, warmup_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10, power=2.0)
    assert squared.lr_at(5) == pytest.approx(0.1 + 0.9 * 0.25)

    step = WarmupStep(optimizer, lr=1e-4, warmup_lr=1e-7, warmup_steps=10, milestones=[27 * 5, 33 * 5], gamma=0.1)
    rates = _rates(step, 36 * 5)
    assert rates[0] == pytest.approx(1e-7) and rates[5] == pytest.approx(1e-4 * (0.001 + 0.999 * 0.5))
    assert rates[10] == rates[134] == pytest.approx(1e-4)
    assert rates[135] == rates[164] == pytest.approx(1e-5)
    assert rates[165] == rates[-1] == pytest.approx(1e-6)
    step.load_state_dict({"step_count": 140})  # resume: the rate is that of the step reached
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 1e-5)


def test_config_resolution_order(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 7\nbatch-size: 16\nbase_lr: 0.001\n")
    config = resolve_config({"batch_size": 8}, tmp_path / "run.yaml")
    assert (config.epochs, config.batch_size, config.base_lr, config.recipe) == (7, 8, 0.001, "digits")
    assert config.scaled(config.base_lr, world_size=2) == pytest.approx(0.001 * 16 / 512)
    imagenet = resolve_config({"data": "somewhere"})
    assert imagenet.recipe == "imagenet" and imagenet.mixup == 0.8 and imagenet.epochs == 300
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['epoch'\]"):
        resolve_config({"epoch": 3})
    with pytest.raises(ValueError, match="'epochs' must be"):
        resolve_config({"epochs": "many"})


def test_the_finetune_recipe_takes_each_models_official_drop_path(tmp_path):
    # The official 22K -> 1K configs: Swin-T 0.1, the others 0.2 (the recipe gave Swin-T 0.2).
    finetune = {"data": "somewhere", "recipe": "finetune"}
    assert resolve_config(finetune).drop_path_rate == 0.1  # swin_t, the default model
    assert resolve_config({**finetune, "model": "swin_s"}).drop_path_rate == 0.2
    assert resolve_config({**finetune, "drop_path_rate": 0.3}).drop_path_rate == 0.3  # given: it wins
    (tmp_path / "run.yaml").write_text("recipe: finetune\nmodel: swin_b\n")
    assert resolve_config({"data": "somewhere"}, tmp_path / "run.yaml").drop_path_rate == 0.2
    (tmp_path / "run.yaml").write_text("recipe: finetune\ndrop_path_rate: 0.15\n")
    assert resolve_config({"data": "somewhere"}, tmp_path / "run.yaml").drop_path_rate == 0.15
    assert resolve_config({"data": "somewhere"}).drop_path_rate is None  # other recipes: the preset's


def test_schedules_that_contradict_themselves_are_refused_or_said():
    from swinkit.dense.config import DetectionConfig, SegmentationConfig
    from swinkit.train.config import schedule_notes
    from swinkit.train.pretrain import PretrainConfig

    # A small base_lr given alone sat below the default min_lr: the cosine rose as training went on.
    for options in (TrainConfig, PretrainConfig, SegmentationConfig):
        with pytest.raises(
            ValueError, match=r"'min_lr' \(5e-06\) is above 'base_lr' \(1e-06\): the \w+ schedule would raise"
        ):
            options(base_lr=1e-6, min_lr=5e-6)
    TrainConfig(base_lr=1e-6, min_lr=1e-6)  # a constant rate after the warm-up
    PretrainConfig(base_lr=1e-6, min_lr=5e-6, lr_schedule="multistep", lr_milestones=(50,))  # min_lr unused
    DetectionConfig(base_lr=1e-6, min_lr=5e-6, schedule="step")
    # Milestones mean something to the step schedule only: the others may have none.
    assert DetectionConfig(schedule="cosine", milestones=()).milestones == ()
    assert SegmentationConfig(schedule="poly", milestones=[]).milestones == ()
    with pytest.raises(ValueError, match="schedule 'step' needs milestones"):
        DetectionConfig(schedule="step", milestones=())
    # Valid, but likely not meant: said when the run starts, as steps of an epoch are known.
    assert schedule_notes(TrainConfig(epochs=300, warmup_epochs=20), steps_per_epoch=100) == []
    assert schedule_notes(DetectionConfig(), steps_per_epoch=100) == []  # the 3x recipe
    (warmup,) = schedule_notes(TrainConfig(epochs=10, warmup_epochs=20), steps_per_epoch=100)
    assert warmup.startswith("the warm-up (warmup_epochs 20: 2000 steps) lasts the whole run (10 epoch(s) of 100")
    (warmup,) = schedule_notes(SegmentationConfig(epochs=2, warmup_steps=1500), steps_per_epoch=10)
    assert warmup.startswith("the warm-up (warmup_steps 1500: 1500 steps) lasts the whole run (2 epoch(s) of 10")
    (late,) = schedule_notes(DetectionConfig(schedule="step", epochs=12, warmup_steps=0), steps_per_epoch=100)
    assert late.startswith("milestone epoch(s) [27, 33] come at or after the end of the run (12 epochs)")
    assert schedule_notes(DetectionConfig(schedule="cosine", epochs=12, warmup_steps=0), steps_per_epoch=100) == []
    pretrain = PretrainConfig(epochs=100, warmup_epochs=10, lr_schedule="multistep", lr_milestones=(50, 100))
    (late,) = schedule_notes(pretrain, steps_per_epoch=10)
    assert late == "milestone epoch(s) [100.0] come at or after the end of the run (100 epochs): " + (
        "the rate is not multiplied by gamma there"
    )
    (down,) = schedule_notes(TrainConfig(base_lr=1e-4, warmup_lr=1e-3, min_lr=0), steps_per_epoch=10)
    assert down == "warmup_lr (0.001) is above base_lr (0.0001): the warm-up lowers the rate"


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("batch_size", 0, "'batch_size' must be at least 1, got 0"),  # was a ZeroDivisionError in the loop
        ("accum_steps", 0, "'accum_steps' must be at least 1, got 0"),  # the same
        ("epochs", 0, "'epochs' must be at least 1, got 0"),  # was a run that did nothing and exited 0
        ("workers", -1, "'workers' must be 0 or more, got -1"),
        ("base_lr", float("nan"), "'base_lr' must be 0 or more, got nan"),
        ("eps", 0.0, "'eps' must be above 0, got 0.0"),
        ("label_smoothing", 1.0, "'label_smoothing' must be at least 0 and below 1, got 1.0"),
        ("hflip", 3.0, "'hflip' must be between 0 and 1, got 3.0"),
        ("betas", (0.9, 1.5), r"'betas' must be at least 0 and below 1 each, got \(0.9, 1.5\)"),
        ("crop_scale", (0.9, 0.1), r"'crop_scale' must be given low to high, got \(0.9, 0.1\)"),
        ("max_steps", -3, "'max_steps' must be 0 or more, got -3"),
    ],
)
def test_options_out_of_range_are_refused_by_name(option, value, message, tmp_path):
    # From the command line, a YAML file or Python alike, before a run starts (all trained before
    # without a word, or failed deep in the loop).
    with pytest.raises(ValueError, match=f"training option {message}"):
        resolve_config({option: value})
    (tmp_path / "run.yaml").write_text(f"{option}: {list(value) if isinstance(value, tuple) else value}\n")
    with pytest.raises(ValueError, match=f"training option {message}"):
        resolve_config(config_file=tmp_path / "run.yaml")
    resolve_config({option: getattr(TrainConfig(), option)})  # the default passes


@pytest.mark.parametrize(
    "options, message",
    [
        # All trained (a truncated count, a batch of 1) or failed deep in the run, built in Python.
        (dict(epochs=1.5), "'epochs' must be int, got 1.5"),
        (dict(batch_size=True), "'batch_size' must be int, got True"),
        (dict(batch_size="8"), "'batch_size' must be int, got '8'"),  # was "'>=' not supported"
        (dict(epochs=None), "'epochs' cannot be None; give a int"),
        (dict(model=5), "'model' must be str, got 5"),
        (dict(betas=(0.9,)), r"'betas' must be a list of 2 numbers, got \(0.9,\)"),  # was an IndexError in Adam
        (dict(amp="bf17"), "'amp' must be one of none, bf16, fp16, got 'bf17'"),
        (dict(attn_impl="fastest"), "'attn_impl' must be one of auto, reference, sdpa, fused, triton, got 'fastest'"),
        (dict(auto_augment="foo"), "'auto_augment' must be 'none' or a policy timm reads .* got 'foo'"),
        (dict(recipe="nope"), "'recipe' must be one of imagenet, finetune, .*, got 'nope'"),
    ],
)
def test_options_built_in_python_are_checked_as_yaml_values_are(options, message):
    with pytest.raises(ValueError, match=f"training option {message}"):
        TrainConfig(**options)


def test_python_options_take_what_yaml_takes_and_dense_options_are_checked_alike():
    # A whole number for a float, a list for a tuple and a path for a string stand, stored converted.
    config = TrainConfig(warmup_epochs=2, crop_scale=[0.5, 1], data=Path("images"), img_size=None)
    assert (config.warmup_epochs, config.crop_scale, config.data, config.img_size) == (2.0, (0.5, 1.0), "images", None)
    assert isinstance(config.warmup_epochs, float)
    # The dense configs share the check (scale=512 failed in the data code, () in torchvision).
    from swinkit.dense.config import DetectionConfig, SegmentationConfig, resolve_dense_config

    for build, message in [
        (lambda: SegmentationConfig(scale=512), "'scale' must be a list of 2 numbers, got 512"),
        (lambda: SegmentationConfig(scale=(64, 32, 5)), r"'scale' must be a list of 2 numbers, got \(64, 32, 5\)"),
        (lambda: SegmentationConfig(epochs=1.5), "'epochs' must be int, got 1.5"),
        (lambda: SegmentationConfig(amp="fp8"), "'amp' must be one of none, bf16, fp16, got 'fp8'"),
        (lambda: DetectionConfig(min_sizes=()), r"'min_sizes' must be a list of one or more numbers, got \(\)"),
        (lambda: resolve_dense_config("detect", {"min_sizes": []}), r"'min_sizes' must be .* one or more .* got \[\]"),
    ]:
        with pytest.raises(ValueError, match=f"training option {message}"):
            build()
    assert SegmentationConfig(scale=None).scale is None  # an optional tuple


def test_fit_takes_a_train_config_only():
    from swinkit.dense.config import SegmentationConfig

    # Were AttributeErrors on 'val_fraction' and 'deterministic'.
    for config in (SegmentationConfig(), {"data": None}):
        with pytest.raises(TypeError, match=f"expected a TrainConfig, got {type(config).__name__} .*fit_dense"):
            swinkit.train.fit(config)


def test_null_is_none_only_where_an_option_takes_none(tmp_path):
    (tmp_path / "run.yaml").write_text("val_fraction: null\n")  # was "'<' not supported ... NoneType"
    with pytest.raises(ValueError, match="training option 'val_fraction' cannot be null .* give a float"):
        resolve_config(config_file=tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("resume: ~\n")  # was a TypeError deep in the loop
    with pytest.raises(ValueError, match="training option 'resume' cannot be null"):
        resolve_config(config_file=tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("checkpoint: null\nval_data:\n")
    config = resolve_config(config_file=tmp_path / "run.yaml")
    assert config.checkpoint is None and config.val_data is None


def test_cli_refuses_an_option_out_of_range(capsys):
    assert main(["train", "--batch-size", "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "swinkit train: error: training option 'batch_size' must be at least 1, got 0"


def test_cli_train_eval_predict_end_to_end(digit_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(digit_folder), *FAST, "--epochs", "1", "--batch-size", "4", "--output", str(out)]
    assert main(args) == 0
    assert "best val top-1" in capsys.readouterr().out
    for name in (
        "checkpoint-last.pt",
        "model-final.safetensors",
        "model-best.safetensors",
        "curves.png",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"train_loss", "val_top1", "val_top5", "lr"} <= set(rows[0])
    assert any((out / "tensorboard").iterdir())

    assert (
        main(
            [
                "eval",
                "--data",
                str(digit_folder),
                "--checkpoint",
                str(out / "model-final.safetensors"),
                "--output",
                str(tmp_path / "eval"),
                "--workers",
                "0",
                "--json",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 30 and set(metrics["per_class_accuracy"]) == {"digit0", "digit1", "digit2"}
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["top1"] == metrics["top1"]

    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    image = next((digit_folder / "digit1").glob("*.png"))
    assert (
        main(
            [
                "predict",
                str(image),
                str(tmp_path / "broken.png"),
                "--checkpoint",
                str(out / "model-final.safetensors"),
                "--topk",
                "2",
                "--json",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert len(results[0]["predictions"]) == 2 and results[0]["predictions"][0]["class"].startswith("digit")
    assert "cannot decode image" in results[1]["error"]


def test_bad_images_in_training_data_are_skipped_and_counted(digit_folder, tmp_path, caplog):
    data = tmp_path / "dirty"
    data.mkdir()
    for folder in digit_folder.iterdir():
        (data / folder.name).mkdir()
        for file in folder.iterdir():
            (data / folder.name / file.name).write_bytes(file.read_bytes())
    (data / "digit0" / "empty.png").write_bytes(b"")
    (data / "digit1" / "garbage.jpg").write_bytes(os.urandom(300))
    good = next((data / "digit2").glob("*.png")).read_bytes()
    (data / "digit2" / "cut.png").write_bytes(good[:40])
    out = tmp_path / "run"
    config = resolve_config(
        {
            "data": str(data),
            "model": "swin_test",
            "img_size": 32,
            "workers": 0,
            "epochs": 1,
            "batch_size": 2,
            "progress": False,
            "output": str(out),
            "val_fraction": 0.01,
        }
    )
    result = swinkit.train.fit(config)
    # The three bad files are all in the training split (val keeps one image per class).
    assert result.bad_images == 3
    assert result.history[0]["bad_images"] == 3 and result.history[0]["val_bad_images"] == 0
    held_out = tmp_path / "held-out"  # held-out images that fail are counted too (they were not)
    shutil.copytree(digit_folder, held_out)
    (held_out / "digit0" / "bad.png").write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        run = resolve_config(
            {**config.__dict__, "data": str(digit_folder), "val_data": str(held_out), "output": str(out) + "2"}
        )
        assert swinkit.train.fit(run).history[0]["val_bad_images"] == 1
    assert "1 held-out images could not be decoded and were left out of the scores" in caplog.text
    # The ImageNet recipe's 20 warm-up epochs in a 1-epoch run: said, as the run starts.
    assert "the warm-up (warmup_epochs 20: " in caplog.text and "the rate never reaches base_lr" in caplog.text
    strict = resolve_config(
        {
            **{k: getattr(config, k) for k in ("data", "model", "img_size", "workers", "epochs")},
            "batch_size": 2,
            "strict_data": True,
            "output": str(tmp_path / "strict"),
        }
    )
    with pytest.raises(ValueError, match="cannot decode image"):
        swinkit.train.fit(strict)


def _train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "swinkit",
        "train",
        "--data",
        str(data),
        *FAST,
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--deterministic",
        "--output",
        str(out),
        "--mixup",
        "0.8",
        "--drop-path-rate",
        "0.1",
        *extra,
    ]


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path):
    data = write_digit_folder(tmp_path / "data", classes=(0, 1, 2), per_class=20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    reference = tmp_path / "reference"
    subprocess.run(_train_command(data, reference, "--checkpoint-every", "4"), check=True, env=env, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        _train_command(data, interrupted, "--checkpoint-every", "4"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = interrupted / "checkpoint-last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 24  # killed in the middle of the first epoch
    assert not (interrupted / "model-final.safetensors").exists()

    subprocess.run(
        _train_command(data, interrupted, "--checkpoint-every", "4"), check=True, env=env, capture_output=True
    )
    expected = load_file(reference / "model-final.safetensors")
    resumed = load_file(interrupted / "model-final.safetensors")
    for key, value in expected.items():
        assert torch.allclose(resumed[key], value, rtol=0, atol=1e-6), key
    rows = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    reference_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[-1]["val_top1"] == reference_rows[-1]["val_top1"]
    assert rows[0]["train_loss"] == pytest.approx(reference_rows[0]["train_loss"], rel=1e-6)


def test_ctrl_c_prints_a_line_saying_how_to_resume_not_a_traceback(tmp_path):
    data = write_digit_folder(tmp_path / "data", classes=(0, 1, 2), per_class=20)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = _train_command(data, out, "--checkpoint-every", "1", "--workers", "1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint-last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "swinkit train: interrupted; run the same command again to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_resume_refuses_a_different_run(digit_folder, tmp_path):
    out = tmp_path / "run"
    base = {
        "data": str(digit_folder),
        "model": "swin_test",
        "img_size": 32,
        "workers": 0,
        "progress": False,
        "batch_size": 4,
        "output": str(out),
        "max_steps": 1,
    }
    swinkit.train.fit(resolve_config({**base, "checkpoint_every": 1, "epochs": 1}))
    with pytest.raises(ValueError, match="different options.*batch_size"):
        swinkit.train.fit(resolve_config({**base, "batch_size": 2, "epochs": 1}))


def test_resume_takes_a_path_spelled_otherwise_and_a_moved_run_folder(digit_folder, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    base = dict(model="swin_test", img_size=32, workers=0, progress=False, batch_size=4, max_steps=1, epochs=1)
    swinkit.train.fit(resolve_config({**base, "data": str(digit_folder), "output": str(out), "checkpoint_every": 1}))
    shutil.copytree(out, tmp_path / "moved")
    monkeypatch.chdir(digit_folder.parent)
    with caplog.at_level("INFO"):
        relative = {**base, "data": digit_folder.name, "output": str(out), "checkpoint_every": 1}
        swinkit.train.fit(resolve_config(relative))  # the same folder, given relative: the same run
        swinkit.train.fit(resolve_config({**relative, "output": str(tmp_path / "moved")}))  # the folder moved
    assert caplog.text.count("resumed") == 2, caplog.text


TORCHRUN_COMMON = [
    "--epochs",
    "1",
    "--max-steps",
    "3",
    "--deterministic",
    "--mixup",
    "0",
    "--cutmix",
    "0",
    "--drop-path-rate",
    "0",
]


@pytest.fixture(scope="module")
def one_process_run(digit_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    command = [sys.executable, "-m", "swinkit", "train", "--data", str(digit_folder), *FAST, *TORCHRUN_COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    subprocess.run([*command, "--batch-size", "4", "--output", str(out)], check=True, env=env, capture_output=True)
    return load_file(out / "model-final.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(mode, digit_folder, one_process_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, "-m", "swinkit", "train", "--data", str(digit_folder), *FAST, *TORCHRUN_COMMON]
    extra = ["--fsdp"] if mode == "fsdp" else []
    result = subprocess.run(
        [*command, "--batch-size", "2", "--output", str(tmp_path), *extra], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = load_file(tmp_path / "model-final.safetensors")
    initial = swinkit.create_model("swin_test", img_size=32, num_classes=3).state_dict()
    moved = 0
    for key, value in one_process_run.items():
        assert torch.allclose(two[key], value, rtol=1e-5, atol=1e-6), key
        moved += not torch.equal(value, initial[key])
    assert moved > len(one_process_run) // 2  # the runs really trained


def test_torchrun_fsdp_runs_whole_epochs_and_keeps_the_best_model(digit_folder, tmp_path):
    # The other torchrun runs stop after 3 steps, before any epoch ends. At an epoch's end every
    # rank must take part in gathering the sharded state for model-best: rank 0 alone once did,
    # and the run died there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, "-m", "swinkit", "train", "--data", str(digit_folder), *FAST, "--fsdp"]
    command += ["--epochs", "2", "--batch-size", "4", "--output", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    best, final = (load_file(tmp_path / f"model-{name}.safetensors") for name in ("best", "final"))
    assert best.keys() == final.keys()
    if rows[1]["val_top1"] > rows[0]["val_top1"]:  # the best is the last epoch's model
        assert all(torch.equal(best[key], final[key]) for key in final)


def test_torchrun_ddp_trains_through_stochastic_depth_that_drops_whole_branches(digit_folder, tmp_path):
    # At rate 0.9 a rank's branch often drops both of its images; the fused path then still gives
    # that branch's parameters (zero) gradients, as DDP without find_unused_parameters requires.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert TORCHRUN_COMMON[-2:] == ["--drop-path-rate", "0"]
    command = [*launch, "-m", "swinkit", "train", "--data", str(digit_folder), *FAST, *TORCHRUN_COMMON[:-2]]
    command += ["--drop-path-rate", "0.9", "--batch-size", "2", "--output", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model-final.safetensors").exists()


RESUMED_TOTALS = """
import json
import sys
from swinkit.train import distributed
from swinkit.train.loop import TrainingLoop

dist = distributed.setup("cpu")
loop = TrainingLoop()
loop.dist = dist
# Before the checkpoint rank r has seen r + 1 images (loss 2 each) and r bad ones.
loop.epoch_totals = {"loss": 2.0 * (dist.rank + 1), "images": dist.rank + 1.0, "bad": float(dist.rank)}
saved = loop.summed_totals()  # what rank 0 writes into the checkpoint
loop.restore_totals(saved)  # every rank of the resumed run reads it
loop.epoch_totals["images"] += 1.0  # one more image per rank after the resume
after = dist.sum([loop.epoch_totals[key] for key in ("loss", "images", "bad")])
with open(f"{sys.argv[1]}/rank{dist.rank}.json", "w") as report:
    json.dump({"saved": saved, "after": after}, report)
distributed.teardown()
"""


def _torchrun_script(source: str, tmp_path) -> str:
    """Run ``source`` as a script in 2 processes under torchrun, with ``tmp_path`` as its argument;
    returns their standard output."""
    script = tmp_path / "script.py"
    script.write_text(source)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    result = subprocess.run([*launch, str(script), str(tmp_path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_epoch_totals_stay_exact_across_a_multi_process_resume(tmp_path):
    _torchrun_script(RESUMED_TOTALS, tmp_path)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["saved"] == {"loss": 6.0, "images": 3.0, "bad": 1.0}  # both ranks' totals
        assert report["after"] == [6.0, 5.0, 1.0]  # counted once, plus the two new images


FINISHING_RANKS = """
import sys
import time
from pathlib import Path
from swinkit.train import distributed

out = Path(sys.argv[1])
with distributed.process_group("cpu") as group:
    if group.rank == 0:
        time.sleep(2)  # rank 0 finishes late, as when it writes the final checkpoint
        (out / "written").write_text("done")
# Past the context: every rank has finished its run, so rank 0's file is there for rank 1 too.
(out / f"rank{group.rank}-saw").write_text(str((out / "written").exists()))
"""


def test_no_rank_tears_down_before_every_rank_has_finished(tmp_path):
    _torchrun_script(FINISHING_RANKS, tmp_path)
    assert [(tmp_path / f"rank{rank}-saw").read_text() for rank in (0, 1)] == ["True", "True"]


LEAVING = """
import atexit
import sys
from pathlib import Path
from swinkit.train import distributed

out = Path(sys.argv[1])
assert distributed.leave_worker(0) == 0  # no process group yet: an ordinary return
with distributed.process_group("cpu") as group:
    atexit.register(lambda: (out / f"atexit{group.rank}").write_text("ran"))
sys.stdout.write(f"unflushed{group.rank};")  # no newline: still buffered when the worker leaves
distributed.leave_worker(0)
(out / f"after{group.rank}").write_text("reached")
"""


def test_a_worker_leaves_after_its_group_with_atexit_run_and_output_flushed(tmp_path):
    # The CLI ends every worker that ran a process group this way (see swinkit.train.distributed).
    output = _torchrun_script(LEAVING, tmp_path)
    assert "unflushed0;" in output and "unflushed1;" in output
    assert [(tmp_path / f"atexit{rank}").read_text() for rank in (0, 1)] == ["ran", "ran"]
    assert not any((tmp_path / f"after{rank}").exists() for rank in (0, 1))


def test_finetune_from_official_file_with_new_classes_and_window(digit_folder, tmp_path, caplog):
    source = swinkit.create_model("swin_test", num_classes=7, img_size=32)
    torch.save({"model": source.state_dict()}, tmp_path / "official.pth")
    out = tmp_path / "finetune"
    config = resolve_config(
        {
            "data": str(digit_folder),
            "model": "swin_test",
            "img_size": 32,
            "checkpoint": str(tmp_path / "official.pth"),
            "workers": 0,
            "progress": False,
            "batch_size": 4,
            "epochs": 1,
            "output": str(out),
            "layer_decay": 0.8,
            "freeze_stages": 1,
            "recipe": "finetune",
        }
    )
    with caplog.at_level("INFO"):
        result = swinkit.train.fit(config)
    assert "head: the file has 7 classes, the model 3" in caplog.text
    tuned = load_file(result.final_model)
    assert tuned["head.weight"].shape == (3, 128)
    # Frozen: patch embedding and stage 1 are exactly the file's weights; later stages trained.
    assert torch.equal(tuned["layers.0.blocks.0.attn.qkv.weight"], source.layers[0].blocks[0].attn.qkv.weight)
    assert not torch.equal(tuned["layers.2.blocks.0.attn.qkv.weight"], source.layers[2].blocks[0].attn.qkv.weight)


def _trainer(digit_folder, tmp_path, **options):
    from swinkit.train.distributed import Distributed
    from swinkit.train.loop import Trainer

    values = {
        "data": str(digit_folder),
        "model": "swin_test",
        "img_size": 32,
        "workers": 0,
        "progress": False,
        "batch_size": 4,
        "epochs": 1,
        "output": str(tmp_path),
        "mixup": 0.0,
        "cutmix": 0.0,
        **options,
    }
    return Trainer(resolve_config(values), Distributed())


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_non_finite_step_is_skipped_and_counted(digit_folder, tmp_path, amp):
    trainer = _trainer(digit_folder, tmp_path, amp=amp)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = {"images": torch.full((2, 3, 32, 32), float("nan")), "labels": torch.tensor([0, 1]), "bad": []}
    trainer._forward_backward(batch)
    trainer._optimizer_step()
    assert trainer.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    good = next(iter(trainer.loader))
    trainer._forward_backward(good)
    trainer._optimizer_step()
    assert trainer.skipped_steps == 1
    assert not torch.equal(trainer.model.state_dict()["head.weight"], before["head.weight"])


def test_bf16_autocast_ema_and_accumulation_run(digit_folder, tmp_path):
    trainer = _trainer(digit_folder, tmp_path, amp="bf16", ema=True, ema_decay=0.5, accum_steps=2, batch_size=2)
    result = trainer.run()
    assert result.history[0]["train_loss"] > 0 and "val_ema_top1" in result.history[0]
    assert (tmp_path / "model-ema.safetensors").is_file()
    ema = load_file(tmp_path / "model-ema.safetensors")
    final = load_file(tmp_path / "model-final.safetensors")
    assert not torch.equal(ema["head.weight"], final["head.weight"])
    assert trainer.steps_per_epoch == trainer.sampler.steps // 2


def test_compile_compiles_the_model_in_place_keeping_the_split(digit_folder, tmp_path):
    # One process: the model itself is compiled (model.compile()), so a CPU batch still splits over
    # the image-parallel workers, each share through the graph; checkpoints keep the plain keys.
    trainer = _trainer(digit_folder, tmp_path, compile=True)
    assert trainer.forward_model is trainer.model
    assert isinstance(parallel.forward_function(trainer.model, split=True), functools.partial)
    assert not any(key.startswith("_orig_mod.") for key in trainer.model_state())


def test_a_held_out_class_folder_may_be_empty_a_training_one_may_not(tmp_path, caplog):
    from swinkit.train.data import load_datasets

    root = tmp_path / "data"
    write_digit_folder(root / "train", classes=(0, 1, 2), per_class=2)
    write_digit_folder(root / "val", classes=(0, 1), per_class=1)
    (root / "val" / "digit2").mkdir()  # a small held-out set without one class: scored as null, warned
    with caplog.at_level("WARNING"):
        data = load_datasets(resolve_config({"data": str(root)}))
    assert data.classes == ["digit0", "digit1", "digit2"] and len(data.val) == 2
    assert "no image files" in caplog.text and "digit2" in caplog.text
    (root / "train" / "digit3").mkdir()
    (root / "val" / "digit3").mkdir()
    with pytest.raises(ValueError, match=r"no image files .* in 1 of 4 class folders: .*train/digit3"):
        load_datasets(resolve_config({"data": str(root)}))


def test_max_steps_inside_the_first_epoch_says_where_the_outputs_are(digit_folder, tmp_path, capsys):
    out = tmp_path / "run"
    command = ["train", "--data", str(digit_folder), *FAST, "--batch-size", "4", "--max-steps", "1"]
    assert main([*command, "--output", str(out)]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"stopped at --max-steps before an epoch ended (not validated); outputs in {out}/"
    )
    assert (out / "model-final.safetensors").is_file()  # was: nothing printed at all


def test_a_validation_set_of_which_no_image_can_be_read_stops_training_before_a_best_model(tmp_path, capsys):
    # It was scored "val top-1 0.00%, val loss 0.0000" and a model-best.safetensors saved on it.
    data = tmp_path / "data"
    write_digit_folder(data / "train", classes=(0, 1), per_class=4, formats=("png",))
    for name in ("digit0", "digit1"):
        (data / "val" / name).mkdir(parents=True)
        (data / "val" / name / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    args = ["train", "--data", str(data), *FAST, "--epochs", "1", "--batch-size", "4", "--output", str(out)]
    assert main([*args, "--warmup-epochs", "0", "--resume", "never"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"swinkit train: error: no image of the validation set ({data / 'val'}) could be read: all 2 failed "
        f"(the first: {data / 'val' / 'digit0' / 'bad.png'})"
    )
    assert not (out / "model-best.safetensors").exists()


@pytest.mark.parametrize("present", [("train",), ("val",)])
def test_half_of_the_train_val_layout_is_refused_not_taken_as_one_class(tmp_path, capsys, present):
    # data/train/<class>/ without data/val/ trained a one-class model named "train", "100%" held-out accuracy.
    data = tmp_path / "data"
    for split in present:
        write_digit_folder(data / split, classes=(0, 1), per_class=2, formats=("png",))
    (missing,) = {"train", "val"} - set(present)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), *FAST, "--epochs", "1", "--batch-size", "4", "--output", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        f"swinkit train: error: {data} has {present[0]}/ but no {missing}/: split folders, not classes. "
        f"Give {data} both train/ and val/ (each holding class folders), or class folders alone"
    ), error
    assert not out.exists() or not any(out.glob("*.safetensors"))
    # A class named "train" among others is a class (a vehicles data set), and is trained on.
    write_digit_folder(data / "bus", classes=(0, 1), per_class=2, formats=("png",))
    dataset = swinkit.train.data.load_datasets(resolve_config({"data": str(data), "val_fraction": 0.5}))
    assert dataset.classes == sorted([present[0], "bus"])


def test_a_one_class_data_set_is_refused_by_name(tmp_path, capsys):
    # It trained silently to a loss of 0 and "100%" accuracy: cross-entropy over one class is always 0.
    data = write_digit_folder(tmp_path / "data", classes=(3,), per_class=4, formats=("png",))
    out = tmp_path / "run"
    args = ["train", "--data", str(data), *FAST, "--epochs", "1", "--batch-size", "2", "--output", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"swinkit train: error: {data} has one class ('digit3'): a classifier needs at least two; add the other "
        "classes' folders (or CSV rows)"
    )
    rows = tmp_path / "one.csv"
    rows.write_text("".join(f"{path},cat\n" for path in sorted(data.rglob("*.png"))))
    assert main([*args[:2], str(rows), *args[3:]]) == 2
    assert "one.csv has one class ('cat')" in capsys.readouterr().err
