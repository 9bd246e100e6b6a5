"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

import swinkit
from helpers import bomb_png, perturb, write_digit_folder
from swinkit.checkpoint.native import save
from swinkit.cli import main
from swinkit.evaluate import EvalResult, evaluate, evaluate_checkpoint, throughput
from swinkit.model import SwinTransformer
from swinkit.predict import predict


class FixedLogits(nn.Module):
    """Returns preset logits for the images, whose first pixel holds the row index."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images[:, 0, 0, 0].long()]


def test_metrics_match_hand_computation():
    logits = torch.tensor(
        [
            [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # true 0: top-1 right
            [1.0, 5.0, 0.0, 0.0, 0.0, 0.0],  # true 0: wrong, in top-2
            [0.0, 0.0, 0.0, 0.0, 0.0, 9.0],  # true 2: wrong; 2 ties at the bottom
            [0.0, 0.0, 3.0, 1.0, 0.0, 0.0],  # true 2: right
        ]
    )
    labels = torch.tensor([0, 0, 2, 2])
    images = torch.zeros(4, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(4).float()
    batches = [{"images": images[:3], "labels": labels[:3], "bad": ["x.png"]},
               {"images": images[3:], "labels": labels[3:], "bad": []}]  # fmt: skip
    result = evaluate(FixedLogits(logits), batches, num_classes=6, device=torch.device("cpu"))
    assert result.top1 == 50.0
    top5 = [True, True, labels[2].item() in logits[2].topk(5).indices.tolist(), True]
    assert result.top5 == 100.0 * sum(top5) / 4
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert abs(result.loss - expected_loss) < 1e-6
    assert result.confusion[0].tolist() == [1, 1, 0, 0, 0, 0]
    assert result.confusion[2].tolist() == [0, 0, 1, 0, 0, 1]
    assert result.per_class_accuracy[0] == 50.0 and result.per_class_accuracy[2] == 50.0
    assert result.bad_items == ["x.png"] and result.count == 4


def test_throughput_counts_images():
    rate = throughput(nn.Identity(), torch.zeros(4, 3, 8, 8), warmup=1, iterations=3)
    assert rate > 0


def test_eval_throughput_runs_as_the_scores_do_without_gradients(tmp_path):
    # The official throughput() is under torch.no_grad; under --amp it times the autocast model scored.
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=2)
    checkpoint = tmp_path / "model.safetensors"
    save(swinkit.create_model("swin_test", img_size=32, num_classes=2), checkpoint, class_names=["digit0", "digit1"])
    calls = []

    def record(module, inputs):
        if isinstance(module, SwinTransformer):
            calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        metrics = evaluate_checkpoint(folder, checkpoint, workers=0, amp="bf16", measure_throughput=True)
    finally:
        handle.remove()
    assert metrics["throughput_images_per_second"] > 0
    assert len(calls) == 1 + 5 + 10  # the scored batch, the warm-up and the timed calls
    assert set(calls) == {(False, True)}


@pytest.mark.parametrize("option, values", [("--topk", "0 and 32"), ("--batch-size", "5 and 0")])
def test_predict_refuses_counts_below_one_by_name(option, values, tmp_path, capsys):
    # A batch of 0 was "range() arg 3 must not be zero", after the checkpoint was read.
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "absent.safetensors"), option, "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"swinkit predict: error: topk and batch size must be at least 1, got {values}"


def test_predict_and_eval_under_bf16_autocast_stay_close_to_float32(tmp_path):
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=3)
    model = perturb(swinkit.create_model("swin_test", img_size=32, num_classes=2), scale=0.05)
    checkpoint = tmp_path / "model.safetensors"
    save(model, checkpoint, class_names=["digit0", "digit1"])

    def probabilities(amp):
        results = predict([folder], checkpoint, topk=2, amp=amp)
        return torch.tensor(
            [[p["probability"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in results]
        )

    plain, reduced = probabilities("none"), probabilities("bf16")
    assert plain.shape == (6, 2)
    assert not torch.equal(plain, reduced)  # the model did run in bfloat16
    assert torch.allclose(plain, reduced, atol=2e-2)

    metrics = {amp: evaluate_checkpoint(folder, checkpoint, workers=0, amp=amp) for amp in ("none", "bf16")}
    assert metrics["bf16"]["images"] == metrics["none"]["images"] == 6
    assert metrics["bf16"]["loss"] == pytest.approx(metrics["none"]["loss"], abs=2e-2)
    for call in (
        lambda: predict([folder], checkpoint, amp="fp8"),
        lambda: evaluate_checkpoint(folder, checkpoint, amp="int8"),
    ):
        with pytest.raises(ValueError, match="amp must be one of none, bf16, fp16, got '(fp8|int8)'"):
            call()


def test_eval_of_a_folder_in_trainings_layout_scores_its_val_part(tmp_path, caplog):
    # `swinkit train --data DIR` reads DIR/train and DIR/val; `swinkit eval --data DIR` the same DIR.
    write_digit_folder(tmp_path / "run" / "train", classes=(0, 1), per_class=2)
    write_digit_folder(tmp_path / "run" / "val", classes=(0, 1), per_class=3)
    model = perturb(swinkit.create_model("swin_test", img_size=32, num_classes=2), scale=0.05)
    checkpoint = tmp_path / "model.safetensors"
    save(model, checkpoint, class_names=["digit0", "digit1"])
    with caplog.at_level("INFO"):
        whole = evaluate_checkpoint(tmp_path / "run", checkpoint, workers=0)
    assert "evaluating " + str(tmp_path / "run" / "val") in caplog.text
    assert whole == evaluate_checkpoint(tmp_path / "run" / "val", checkpoint, workers=0)
    assert whole["images"] == 6


def test_folder_classes_matched_by_position_to_an_unnamed_model_are_warned_about(tmp_path, caplog):
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=1)
    save(swinkit.create_model("swin_test", img_size=32, num_classes=5), tmp_path / "unnamed.safetensors")
    with caplog.at_level("WARNING"):
        evaluate_checkpoint(folder, tmp_path / "unnamed.safetensors", workers=0)
    assert "stores no class names, so its classes ['digit0', 'digit1'] are matched" in caplog.text


def test_per_class_accuracy_of_a_class_without_images_is_null_not_zero(tmp_path, capsys):
    # A class absent from the evaluated data has no accuracy; 0.0 read as "the model gets it all wrong".
    confusion = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    result = EvalResult(0.5, 75.0, 100.0, 4, confusion)
    assert result.per_class_accuracy == [100.0, None, 50.0]
    assert result.summary(["a", "b", "c"])["per_class_accuracy"] == {"a": 100.0, "b": None, "c": 50.0}
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 2), per_class=2)
    checkpoint = tmp_path / "model.safetensors"
    names = ["digit0", "digit1", "digit2"]
    save(swinkit.create_model("swin_test", img_size=32, num_classes=3), checkpoint, class_names=names)
    argv = ["eval", "--data", str(folder), "--checkpoint", str(checkpoint), "--workers", "0", "--json"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for metrics in (printed, written):
        accuracy = metrics["per_class_accuracy"]
        assert list(accuracy) == names and accuracy["digit1"] is None
        assert all(isinstance(accuracy[name], float) for name in ("digit0", "digit2"))


def test_predict_skips_a_decompression_bomb_like_any_bad_image(tmp_path, capsys):
    # Image.new("1", (20000, 20000)).save("bomb.png"): a raw DecompressionBombError traceback ended predict.
    folder = write_digit_folder(tmp_path / "digits", classes=(0,), per_class=1, formats=("png",))
    bomb = bomb_png(folder / "digit0" / "bomb.png")
    checkpoint = tmp_path / "model.safetensors"
    save(swinkit.create_model("swin_test", img_size=32, num_classes=2), checkpoint, class_names=["a", "b"])
    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--json"]) == 0
    results = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert len(results) == 2 and "predictions" in results[str(next(folder.rglob("[0-9]*.png")))]
    assert "400000000 pixels is over PIL's limit" in results[str(bomb)]["error"]
    # One path given alone is one input (it was split into one-letter paths: "/" then scanned the disk)
    alone = predict(str(bomb), checkpoint)
    assert [r["path"] for r in alone] == [str(bomb)] and predict(bomb, checkpoint)[0]["path"] == str(bomb)
