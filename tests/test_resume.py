"""What a resumed run may and may not differ in: the batches past the last whole accumulation, the
number of processes, the data, the length, and what an earlier run left in the folder."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_digit_folder
from swinkit.cli import main
from swinkit.train.state import TRAIN_CHECKPOINT


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # 21 training images: 5 batches of 4, so with --accum-steps 2 one batch is past the last step.
    return write_digit_folder(root / "train", per_class=7), write_digit_folder(root / "val", per_class=2)


def _train(folders, output, *extra: str) -> int:
    train, val = folders
    # A constant rate (base = min, no warm-up): an extended run's schedule is an uninterrupted one's.
    options = ["--base-lr", "1e-3", "--min-lr", "1e-3", "--warmup-lr", "1e-3", "--warmup-epochs", "0"]
    command = ["train", "--data", str(train), "--val-data", str(val), "--model", "swin_test", "--img-size", "32"]
    command += ["--workers", "0", "--no-progress", "--batch-size", "4", "--deterministic", *options]
    return main([*command, "--output", str(output), *extra])


def _rows(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(output, tag: str = "train_loss") -> list[tuple[int, float]]:
    """(epoch, value) of ``tag`` as TensorBoard shows them: every event file, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_batches_past_the_last_whole_accumulation_do_not_reach_the_next_epoch(folders, tmp_path, caplog):
    # They ran backward with no step after them; their gradients joined the next epoch's first step,
    # and a run resumed at the epoch's end, which never saved them, went another way (3.8e-2).
    assert _train(folders, tmp_path / "whole", "--epochs", "2", "--accum-steps", "2") == 0
    assert _train(folders, tmp_path / "resumed", "--epochs", "1", "--accum-steps", "2") == 0
    with caplog.at_level(logging.WARNING, logger="swinkit"):
        assert _train(folders, tmp_path / "resumed", "--epochs", "2", "--accum-steps", "2") == 0
    assert "--epochs changed from 1 to 2" in caplog.text
    expected = load_file(tmp_path / "whole" / "model-final.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model-final.safetensors")
    assert all(torch.equal(resumed[key], value) for key, value in expected.items())
    assert [row["epoch"] for row in _rows(tmp_path / "resumed")] == [0, 1]
    # The epoch's loss counts only the images that trained: 2 steps of 2 batches of 4.
    state = torch.load(tmp_path / "whole" / TRAIN_CHECKPOINT, weights_only=True)
    assert state["global_step"] == 4 and state["train_items"] == 21 and state["world_size"] == 1


def test_another_number_of_processes_is_refused_and_fewer_epochs_than_trained(folders, tmp_path):
    output = tmp_path / "run"
    assert _train(folders, output, "--epochs", "2") == 0
    checkpoint = output / TRAIN_CHECKPOINT
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "world_size": 2}, checkpoint)  # as two torchrun processes would have written it
    with pytest.raises(ValueError, match=r"belongs to a run of 2 process\(es\), this is 1.*--nproc_per_node 2"):
        _train(folders, output, "--epochs", "3", "-v")
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="has trained 2 epochs, more than --epochs 1"):
        _train(folders, output, "--epochs", "1", "-v")


def test_changed_data_is_said_on_resume(folders, tmp_path, caplog):
    train, val = tmp_path / "train", tmp_path / "val"
    shutil.copytree(folders[0], train)
    shutil.copytree(folders[1], val)
    output = tmp_path / "run"
    assert _train((train, val), output, "--epochs", "1") == 0
    write_digit_folder(train, classes=(0,), per_class=9)  # two more images of class 0
    with caplog.at_level(logging.WARNING, logger="swinkit"):
        assert _train((train, val), output, "--epochs", "2") == 0
    assert "the training data changed since" in caplog.text and "(21 items, now 23)" in caplog.text


def test_a_fresh_start_leaves_nothing_of_the_earlier_run_to_be_read_as_its_own(folders, tmp_path):
    output = tmp_path / "run"
    assert _train(folders, output, "--epochs", "1") == 0
    assert len(_rows(output)) == 1
    # Killed while writing its checkpoint: a full-size temporary beside it, kept for good before.
    leftover = output / f".{TRAIN_CHECKPOINT}.k1ll3d.tmp"
    leftover.mkdir()
    (leftover / TRAIN_CHECKPOINT).write_bytes(b"half a checkpoint")
    with (output / "metrics.jsonl").open("a") as file:
        file.write('{"epoch": 1, "train_lo')  # a row a killed run cut short: starting over crashed on it
    assert (output / "model-best.safetensors").exists()
    not_ours = output / f".{TRAIN_CHECKPOINT}.user.tmp"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("kept")
    # Starting over, stopped before its first epoch ends: the earlier run's row was kept, and its
    # checkpoint stayed for a later plain re-run to resume as this run's.
    assert _train(folders, output, "--epochs", "1", "--resume", "never", "--max-steps", "2") == 0
    assert _rows(output) == []
    state = torch.load(output / TRAIN_CHECKPOINT, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, 2)  # saved at the stop: --max-steps now saves
    assert state["epoch_totals"]["images"] == 8  # with the epoch's totals so far (the first fix saved zeros)
    assert not (output / "model-best.safetensors").exists()  # the earlier run's best is not this run's
    assert not leftover.exists() and (not_ours / "notes.txt").exists()
    # The same command without --max-steps goes on from step 2 to the epoch's end.
    assert _train(folders, output, "--epochs", "1") == 0
    assert [row["epoch"] for row in _rows(output)] == [0]
    assert torch.load(output / TRAIN_CHECKPOINT, weights_only=True)["global_step"] == 5
    # TensorBoard shows this run's epoch alone: the earlier run's event file showed beside it.
    (row,) = _rows(output)
    assert _tensorboard(output) == [(0, pytest.approx(row["train_loss"]))]
    # Killed after logging epoch 1 but before saving it: its scalars are hidden on resume, as its row is.
    assert _train(folders, output, "--epochs", "2") == 0
    rows = _rows(output)
    with (output / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({**rows[1], "epoch": 2}) + "\n")
    from swinkit.train.metrics import MetricsLog

    unsaved = MetricsLog(output)
    unsaved.append({"epoch": 2, "train_loss": 123.0})  # as a killed run's writer left it
    unsaved.close()
    assert _train(folders, output, "--epochs", "3") == 0
    assert [(step, round(value, 6)) for step, value in _tensorboard(output)] == [
        (row["epoch"], round(row["train_loss"], 6)) for row in _rows(output)
    ]


def test_a_corrupt_training_checkpoint_is_named_without_torchs_advice_to_unpickle_it(folders, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / TRAIN_CHECKPOINT).write_bytes(bytes(range(256)) * 4)
    assert _train(folders, output, "--epochs", "1") == 2
    error = capsys.readouterr().err
    assert f"cannot read training checkpoint {output / TRAIN_CHECKPOINT}" in error
    assert "truncated or corrupt" in error and "--resume never" in error
    assert "weights_only" not in error  # torch advised unpickling it, which would run its code


class _RunsCode:
    def __reduce__(self):
        return (print, ("ran",))


def test_resume_names_a_folder_an_unsafe_pickle_and_another_commands_checkpoint(folders, tmp_path, capsys):
    # A folder was "does not exist"; a pickle refused for safety "truncated or corrupt"; a pretraining
    # run's checkpoint "a run with different options (auto_augment ..., base_lr ...)".
    train, _ = folders
    run = tmp_path / "run"
    assert _train(folders, run, "--epochs", "1", "--max-steps", "1") == 0
    capsys.readouterr()
    assert _train(folders, tmp_path / "other", "--epochs", "1", "--resume", str(run)) == 2
    assert f"--resume {run} is a folder: give its {TRAIN_CHECKPOINT}, or --resume auto" in capsys.readouterr().err
    torch.save({"format": "swinkit-train-v1", "code": _RunsCode()}, tmp_path / "unsafe.pt")
    assert _train(folders, tmp_path / "other", "--epochs", "1", "--resume", str(tmp_path / "unsafe.pt")) == 2
    error = capsys.readouterr()
    assert "refusing to read training checkpoint" in error.err and "needs to import and run code" in error.err
    assert "ran" not in error.out
    pretraining = tmp_path / "pretrain"
    options = ["--model", "swin_test", "--img-size", "32", "--window-size", "4", "--mask-patch-size", "8"]
    options += ["--batch-size", "4", "--epochs", "1", "--max-steps", "1", "--workers", "0", "--no-progress"]
    assert main(["pretrain", "--data", str(train), *options, "--output", str(pretraining)]) == 0
    checkpoint = pretraining / TRAIN_CHECKPOINT
    assert _train(folders, tmp_path / "other", "--epochs", "1", "--resume", str(checkpoint)) == 2
    expected = f"{checkpoint} is a swinkit pretrain checkpoint: resume it with swinkit pretrain --resume"
    assert expected in capsys.readouterr().err
    resumed = ["pretrain", "--data", str(train), *options, "--output", str(tmp_path / "p2"), "--resume"]
    assert main([*resumed, str(run / TRAIN_CHECKPOINT)]) == 2
    assert "is a swinkit train checkpoint: resume it with swinkit train --resume" in capsys.readouterr().err
