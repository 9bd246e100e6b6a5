"""SimMIM pretraining: the model against Hugging Face's Swin masked image modeling, the masks, the
loaders of pretraining checkpoints, and ``swinkit pretrain`` end to end (resume, fine-tune)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import types

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

import swinkit
from helpers import perturb, relative_error, write_digit_folder
from swinkit.cli import main
from swinkit.dense import create_backbone
from swinkit.parallel import image_splits
from swinkit.pretrain import (
    SimMIM,
    load_pretraining_parts,
    local_statistics,
    pretraining_parts,
    random_mask,
    reconstruction_loss,
)
from swinkit.train.config import TrainConfig, resolve_config
from swinkit.train.pretrain import (
    PretrainConfig,
    PretrainTrainer,
    pretrain,
    pretrain_schedule,
    resolve_pretrain_config,
    unlabelled_images,
)

SIZE = 128  # every stage map at least one window of 4: Hugging Face's Swin clamps no window
HF_ARCH = dict(image_size=SIZE, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4)


def _hf_simmim(family: str) -> torch.nn.Module:
    if family == "v2":
        model = transformers.Swinv2ForMaskedImageModeling(transformers.Swinv2Config(encoder_stride=32, **HF_ARCH))
    else:
        model = transformers.SwinForMaskedImageModeling(transformers.SwinConfig(encoder_stride=32, **HF_ARCH))
    return perturb(model.double().eval(), scale=0.05)


def _swinkit_simmim(reference: torch.nn.Module, family: str) -> SimMIM:
    """swinkit's SimMIM with ``reference``'s weights: the encoder through the checkpoint loader."""
    encoder = swinkit.create_model(f"swin{'v2' if family == 'v2' else ''}_test", num_classes=0, img_size=SIZE)
    encoder = encoder.double()  # float64 before loading: no rounding
    state = reference.state_dict()
    report = swinkit.load_checkpoint(encoder, state)
    assert report.ok and "took the encoder of a SimMIM pretraining checkpoint" in str(report)
    model = SimMIM(encoder).double().eval()
    parts = pretraining_parts(state)  # Hugging Face's (1, 1, C) swin.embeddings.mask_token and decoder.0
    assert parts.keys() == {"mask_token", "decoder.0.weight", "decoder.0.bias"}
    load_pretraining_parts(model, parts, "hf")
    return model


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_simmim_matches_hugging_face_masked_image_modeling(family):
    reference = _hf_simmim(family)
    model = _swinkit_simmim(reference, family)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    mask = torch.stack([random_mask((SIZE, SIZE), 32, 4, 0.6, generator) for _ in range(2)])
    x_ref = x.clone().requires_grad_(True)
    expected = reference(x_ref, bool_masked_pos=mask.flatten(1).bool())
    expected.loss.backward()
    x_ours = x.clone().requires_grad_(True)
    loss = model(x_ours, mask)
    loss.backward()
    with torch.no_grad():
        assert relative_error(model.reconstruct(x, mask), expected.reconstruction) < 1e-12
    assert abs(loss.item() - expected.loss.item()) < 1e-12
    assert relative_error(x_ours.grad, x_ref.grad) < 1e-10  # through the encoder's fast path and back


def test_random_masks_cover_the_ratio_in_whole_mask_patches():
    generator = torch.Generator().manual_seed(0)
    mask = random_mask((192, 160), 32, 4, 0.6, generator)
    assert mask.shape == (48, 40)
    cells = mask.view(6, 8, 5, 8).permute(0, 2, 1, 3).reshape(30, 64)
    assert torch.equal(cells.amin(dim=1), cells.amax(dim=1))  # constant inside each 32 x 32 square
    assert cells[:, 0].sum() == math.ceil(30 * 0.6) == 18
    again = random_mask((192, 160), 32, 4, 0.6, torch.Generator().manual_seed(0))
    other = random_mask((192, 160), 32, 4, 0.6, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    for args, message in (
        (((100, 96), 32, 4, 0.6), r"must be a multiple of the model's patch size \(4\) and divide the image sides"),
        (((96, 96), 30, 4, 0.6), r"mask patch size \(30\)"),
        (((96, 96), 32, 4, 1.0), "mask ratio must be above 0 and below 1, got 1.0"),
        # Were a ZeroDivisionError, torch's shape or repeat errors, and a (0, 0) mask without a word.
        (((96, 96), 0, 4, 0.6), "mask_patch_size must be an int of at least 1, got 0"),
        (((96, 96), 32, -4, 0.6), "patch_size must be an int of at least 1, got -4"),
        (((0, 0), 32, 4, 0.6), r"size must be two ints of at least 1, got \(0, 0\)"),
    ):
        with pytest.raises(ValueError, match=message):
            random_mask(*args)
    for args, message in (  # were an unpack error, zeros()'s and "'<' not supported"
        ((96, 32, 4, 0.6), r"size must be the image's \(H, W\), two ints, got 96"),
        (((96.0, 96.0), 32, 4, 0.6), r"two ints, got \(96.0, 96.0\)"),
        (((96, 96), 32.0, 4, 0.6), "mask_patch_size must be an int of at least 1, got 32.0"),
        (((96, 96), 32, True, 0.6), "patch_size must be an int of at least 1, got True"),
        (((96, 96), 32, 4, "0.6"), "mask ratio must be a number above 0 and below 1, got '0.6'"),
    ):
        with pytest.raises(TypeError, match=message):
            random_mask(*args)


def test_simmim_refuses_a_classifier_and_bad_inputs():
    with pytest.raises(ValueError, match="build it with num_classes=0"):
        SimMIM(swinkit.create_model("swin_test", num_classes=3))
    for encoder in ("swin_t", create_backbone("swin_test")):  # were AttributeErrors on 'config'
        with pytest.raises(TypeError, match=f"SimMIM needs a Swin encoder .* got {type(encoder).__name__}"):
            SimMIM(encoder)
    model = SimMIM(swinkit.create_model("swin_test", num_classes=0)).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"mask must be \(B, H/4, W/4\) = \(1, 16, 16\), got \(1, 8, 8\)"):
        model(x, torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="image sides must be multiples of it, got 48x64"):
        model(torch.randn(1, 3, 48, 64), torch.zeros(1, 12, 16))
    # Masks of other values gave a loss (or NaN) without a word; images of another dtype a raw conv error.
    mask = random_mask((64, 64), 16)[None]
    for bad, found in ((mask * 2 - 1, "values from -1 to 1"), (mask * 0.5, "values from 0 to 0.5")):
        with pytest.raises(ValueError, match=f"mask must hold 0 \\(visible\\) and 1 \\(masked\\) only, got {found}"):
            model(x, bad)
    with pytest.raises(ValueError, match="only, got NaN"):
        model.reconstruct(x, mask.masked_fill(mask == 1, float("nan")))
    with pytest.raises(ValueError, match="mask is on meta but the images are on cpu"):
        model.encode(x, mask.to("meta"))
    with pytest.raises(TypeError, match=r"mask must be a tensor \(B, H/4, W/4\) of 0 and 1, got list"):
        model(x, mask.tolist())
    with pytest.raises(TypeError, match="images of dtype torch.float64 for a model in torch.float32"):
        model(x.double(), mask)
    assert model(x, mask.bool()) == model(x, mask)  # 0 / 1 of any dtype
    with pytest.raises(TypeError, match="norm_target_patch must be an int, got 3.0"):
        SimMIM(swinkit.create_model("swin_test", num_classes=0), norm_target_patch=3.0)


def test_simmim_splits_a_cpu_batch_over_the_workers_as_the_serial_path_computes_it(two_threads):
    split = SimMIM(swinkit.create_model("swin_test", num_classes=0, drop_path_rate=0.0)).double().train()
    serial = SimMIM(swinkit.create_model("swin_test", num_classes=0, drop_path_rate=0.0)).double().train()
    serial.load_state_dict(split.state_dict())
    serial.image_parallel = False
    assert not serial.encoder.image_parallel and split.encoder.image_parallel
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)  # shares of 2 and 1 images
    mask = torch.stack([random_mask((64, 64), 16) for _ in range(3)]).double()
    assert image_splits(split, images) == 2 and image_splits(serial, images) == 1
    threads = []
    decode = split.decoder.forward  # an attribute, not a hook (hooks keep a batch serial)
    split.decoder.forward = lambda x: (threads.append(threading.current_thread().name), decode(x))[1]
    losses = [model(images, mask) for model in (split, serial)]
    assert len(threads) == 2 and all(name.startswith("swinkit-images") for name in threads)
    assert relative_error(losses[0], losses[1]) < 1e-12
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(split.named_parameters(), serial.parameters(), strict=True):
        assert a.grad is not None and relative_error(a.grad, b.grad) < 1e-10, name
    split.eval()
    serial.eval()
    with torch.no_grad():
        threads.clear()
        pixels = split.reconstruct(images, mask)
        assert len(threads) == 2 and relative_error(pixels, serial.reconstruct(images, mask)) < 1e-12


def test_official_and_hugging_face_simmim_files_fine_tune(tmp_path):
    # The official SimMIM file keeps the encoder under "encoder." in the official layout, beside
    # its mask token and decoder; Hugging Face's under "swin.". Both initialise a classifier.
    reference = _hf_simmim("v1")
    model = _swinkit_simmim(reference, "v1")
    official = {"model": {k: v for k, v in model.state_dict().items() if k != "mask_token"}}
    official["model"]["encoder.mask_token"] = model.mask_token.detach().view(1, 1, -1)
    torch.save(official, tmp_path / "simmim.pth")
    reference.save_pretrained(tmp_path / "hf")
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        expected = model.encoder.forward_head(model.encoder.stage_maps(x)[-1], pre_logits=True)
    for source in (tmp_path / "simmim.pth", tmp_path / "hf"):
        classifier = swinkit.create_model("swin_test", img_size=SIZE, num_classes=5).double()
        report = swinkit.load_checkpoint(classifier, source)
        assert report.ok and "mask token and decoder are not part of an encoder" in str(report)
        with torch.no_grad():
            features = classifier.forward_head(classifier.stage_maps(x)[-1], pre_logits=True)
        assert relative_error(features, expected) < 1e-12, source


def _run_options(data, output, **extra):
    return {
        "data": str(data),
        "model": "swin_test",
        "img_size": 32,
        "window_size": 4,
        "mask_patch_size": 8,
        "batch_size": 8,
        "epochs": 2,
        "warmup_epochs": 0.5,
        "base_lr": 0.2,  # per 512 images: 3e-3 at batch 8
        "workers": 0,
        "progress": False,
        "val_fraction": 0.2,
        "output": str(output),
        **extra,
    }


def test_pretraining_lowers_the_reconstruction_loss_and_resumes_exactly(tmp_path):
    data = write_digit_folder(tmp_path / "data", classes=(0, 1, 2), per_class=16)  # 48 images: 38 train, 5 steps
    (data / "digit0" / "broken.png").write_bytes(b"not an image")
    reference = pretrain(resolve_pretrain_config(_run_options(data, tmp_path / "reference")))
    rows = reference.history
    assert [row["epoch"] for row in rows] == [0, 1]
    # in the training part (unless in the remainder an epoch leaves out) or the held-out part
    assert rows[0]["bad_images"] + rows[0]["val_bad_images"] in (0, 1)
    for name in ("encoder-final.safetensors", "encoder-best.safetensors", "reconstructions.png", "curves.png"):
        assert (tmp_path / "reference" / name).is_file(), name

    # The same run stopped after 7 steps, its last checkpoint at step 6, resumed to the end.
    interrupted = tmp_path / "interrupted"
    stopped = pretrain(resolve_pretrain_config(_run_options(data, interrupted, max_steps=7, checkpoint_every=3)))
    assert stopped.history == [rows[0] | {"images_per_second": stopped.history[0]["images_per_second"]}]
    resumed = pretrain(resolve_pretrain_config(_run_options(data, interrupted, checkpoint_every=3)))
    expected, got = (load_file(run.encoder) for run in (reference, resumed))
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=0, atol=1e-6), key
    assert resumed.history[-1]["val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-6)

    # Training lowered the loss the held-out images are scored with.
    frozen = {"base_lr": 0.0, "warmup_lr": 0.0, "min_lr": 0.0}
    untrained = pretrain(resolve_pretrain_config(_run_options(data, tmp_path / "untrained", **frozen)))
    assert rows[-1]["val_loss"] < 0.85 * untrained.history[-1]["val_loss"]


def test_swinkit_pretrain_then_train_from_the_encoder(tmp_path, capsys):
    data = write_digit_folder(tmp_path / "data", classes=(0, 1), per_class=12)
    output = tmp_path / "pretrain"
    args = ["pretrain", "--data", str(data), "--model", "swin_test", "--img-size", "32", "--window-size", "4"]
    args += ["--mask-patch-size", "8", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress"]
    assert main([*args, "--output", str(output), "--val-fraction", "0.25"]) == 0
    assert f"fine-tune from {output / 'encoder-final.safetensors'}" in capsys.readouterr().out
    train = ["train", "--data", str(data), "--checkpoint", str(output / "encoder-final.safetensors")]
    train += ["--model", "swin_test", "--img-size", "32", "--window-size", "4", "--batch-size", "4", "--epochs", "1"]
    train += ["--max-steps", "1", "--workers", "0", "--no-progress", "--output", str(tmp_path / "train")]
    assert main(train) == 0

    refused = [
        (["--mask-ratio", "1"], "training option 'mask_ratio' must be above 0 and below 1, got 1.0"),
        (
            ["--img-size", "48"],
            "pretraining option 'img_size' (48) must be a multiple of the encoder's stride (32) and of "
            "'mask_patch_size' (8), itself a multiple of the patch size (4)",
        ),
        (
            ["--lr-schedule", "multistep"],
            "lr_schedule 'multistep' needs lr_milestones: the epochs at which to multiply by lr_gamma",
        ),
        (["--norm-target-patch", "4"], "norm_target_patch must be 0 (off) or an odd size of at least 3, got 4"),
    ]
    for extra, message in refused:
        assert main([*args, "--output", str(tmp_path / "refused"), *extra]) == 2
        assert capsys.readouterr().err.strip() == f"swinkit pretrain: error: {message}"
    with pytest.raises(SystemExit):  # classification's options are not pretraining's
        main([*args, "--mixup", "0.8"])
    assert "swinkit pretrain: error: unrecognized arguments: --mixup 0.8" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(mode, tmp_path):
    # The same global batches, masks and learning rate: DDP's average of two ranks' losses equals
    # one process's loss over both halves, since every image masks the same number of pixels.
    data = write_digit_folder(tmp_path / "data", classes=(0, 1), per_class=10)
    options = ["--data", str(data), "--model", "swin_test", "--img-size", "32", "--window-size", "4"]
    options += ["--mask-patch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress"]  # a whole epoch
    options += ["--deterministic", "--val-fraction", "0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its threads
    single = [sys.executable, "-m", "swinkit", "pretrain", *options, "--batch-size", "4"]
    subprocess.run([*single, "--output", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, "-m", "swinkit", "pretrain", *options, "--batch-size", "2", "--output", str(tmp_path / "two")]
    command += ["--fsdp"] if mode == "fsdp" else []
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(tmp_path / run / "encoder-final.safetensors") for run in ("one", "two"))
    assert (tmp_path / "two" / "encoder-best.safetensors").is_file()  # written at the epoch's end
    # Rank 0's validation images (2 of the 4 held out), 3 rows of 32 pixels with 2-pixel borders.
    with Image.open(tmp_path / "two" / "reconstructions.png") as picture:
        assert picture.size == (2 + 2 * 34, 2 + 3 * 34)
    initial = swinkit.create_model("swin_test", img_size=32, num_classes=0).state_dict()
    moved = 0
    for key, value in one.items():
        assert torch.allclose(two[key], value, rtol=1e-5, atol=1e-6), key
        moved += not torch.equal(value, initial[key])
    assert moved > len(one) // 2  # the runs really trained


def test_pretraining_takes_a_plain_folder_of_images_at_any_depth(tmp_path):
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=10)
    flat = tmp_path / "flat"
    (flat / "nested").mkdir(parents=True)
    for index, path in enumerate(sorted(folder.rglob("*.*"))):
        path.rename(flat / ("nested" if index % 2 else "") / f"{index}{path.suffix}")
    result = pretrain(resolve_pretrain_config(_run_options(flat, tmp_path / "run", epochs=1, val_fraction=0.2)))
    assert result.history[0]["val_loss"] > 0 and result.encoder.is_file()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no image files"):
        pretrain(resolve_pretrain_config(_run_options(tmp_path / "empty", tmp_path / "run2")))
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        pretrain(resolve_pretrain_config(_run_options(tmp_path / "absent", tmp_path / "run3")))


def test_held_out_images_may_be_a_plain_folder_too(tmp_path):
    # --val-data, and train/ + val/ sub-folders, hold images at any depth, in class folders or not
    # (they were read as class folders, and a plain one was refused).
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=3, formats=("png",))
    paths = sorted(folder.rglob("*.png"))
    for root in (tmp_path / "train", tmp_path / "val", tmp_path / "split" / "train", tmp_path / "split" / "val"):
        (root / "deeper").mkdir(parents=True)
    for index, path in enumerate(paths):
        for root in (tmp_path, tmp_path / "split"):
            part = root / ("train" if index < 4 else "val") / ("deeper" if index % 2 else "")
            (part / f"{index}.png").write_bytes(path.read_bytes())
    given = unlabelled_images(resolve_pretrain_config(_run_options(tmp_path / "train", tmp_path / "run",
                                                                   val_data=str(tmp_path / "val"))))  # fmt: skip
    split = unlabelled_images(resolve_pretrain_config(_run_options(tmp_path / "split", tmp_path / "run")))
    for data in (given, split):
        assert (len(data.train), len(data.val)) == (4, 2) and data.classes == []
    with pytest.raises(FileNotFoundError, match="absent does not exist or is not a folder"):
        unlabelled_images(resolve_pretrain_config(_run_options(tmp_path / "train", tmp_path / "run",
                                                               val_data=str(tmp_path / "absent"))))  # fmt: skip


def _neighbourhood_statistics(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized target's statistics written out: every pixel's p x p neighbourhood unfolded,
    the pixels outside the image left out, mean and unbiased variance over the rest."""
    H, W = images.shape[-2:]
    half = patch // 2
    padded = torch.nn.functional.pad(images, (half, half, half, half))
    inside = torch.nn.functional.pad(torch.ones(1, 1, H, W, dtype=images.dtype), (half, half, half, half))
    windows = padded.unfold(2, patch, 1).unfold(3, patch, 1)  # (B, C, H, W, p, p)
    present = inside.unfold(2, patch, 1).unfold(3, patch, 1)
    n = present.sum(dim=(-2, -1))
    mean = (windows * present).sum(dim=(-2, -1)) / n
    variance = (((windows - mean[..., None, None]) * present) ** 2).sum(dim=(-2, -1)) / (n - 1)
    return mean, (variance.clamp(min=0) + 1e-6).sqrt()


@pytest.mark.parametrize("patch, size", [(5, (12, 10)), (47, (64, 64)), (47, (32, 32))])
def test_normalized_target_matches_its_neighbourhood_statistics(patch, size):
    # The SwinV2 recipe's target: each pixel less its neighbourhood's mean, over its standard deviation,
    # the neighbourhood cut at the image's border (47 around a pixel 8-23 of a 32-pixel side: all of it).
    images = torch.randn(2, 3, *size, dtype=torch.float64) * 2 + 0.5
    mean, std = local_statistics(images, patch)
    expected_mean, expected_std = _neighbourhood_statistics(images, patch)
    assert relative_error(mean, expected_mean) < 1e-12 and relative_error(std, expected_std) < 1e-12
    if size == (32, 32):  # there, the whole image's two numbers per channel
        centre = (..., slice(8, 24), slice(8, 24))
        whole_mean = images.mean(dim=(-2, -1), keepdim=True).expand_as(mean)[centre]
        whole_std = (images.var(dim=(-2, -1), keepdim=True) + 1e-6).sqrt().expand_as(std)[centre]
        assert torch.allclose(mean[centre], whole_mean, atol=1e-12)
        assert torch.allclose(std[centre], whole_std, atol=1e-12)
        assert not torch.allclose(mean[..., 0, 0], whole_mean[..., 0, 0])  # a corner sees a quarter of it

    # SimMIM's loss with the normalized target is L1 against those normalized pixels on masked ones.
    encoder = swinkit.create_model("swinv2_test", num_classes=0, img_size=64).double()
    model = SimMIM(encoder, norm_target_patch=patch).double().eval()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = torch.stack([random_mask((64, 64), 8, 4, 0.6) for _ in range(2)]).double()
    expected_mean, expected_std = _neighbourhood_statistics(images, patch)
    with torch.no_grad():
        predicted = model.reconstruct(images, mask)
        target = (images - expected_mean) / expected_std
        assert model(images, mask).item() == pytest.approx(reconstruction_loss(target, predicted, mask, 4).item())
        assert model(images, mask).item() != pytest.approx(reconstruction_loss(images, predicted, mask, 4).item())
    with pytest.raises(ValueError, match="norm_target_patch must be 0 \\(off\\) or an odd size of at least 3, got 4"):
        SimMIM(encoder, norm_target_patch=4)
    for bad in (4, 1, 0):  # were a map one pixel larger, a NaN deviation and a zero-sized kernel
        with pytest.raises(ValueError, match=f"local_statistics' patch must be an odd size of at least 3, got {bad}"):
            local_statistics(images, bad)


def test_multistep_schedule_is_the_official_one():
    # The Swin Transformer repository's MultiStepLRScheduler, per iteration: linear from warmup_lr over
    # the warm-up, then the rate times gamma for every milestone (epoch * steps per epoch) reached.
    config = PretrainConfig(
        lr_schedule="multistep", lr_milestones=(3, 5), lr_gamma=0.5, warmup_epochs=2, base_lr=0.4, warmup_lr=0.1
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    steps, world = 4, 2  # batch 128 x 2 processes: rates halved (per 512 images)
    schedule = pretrain_schedule(optimizer, config, steps, world)
    lr, warmup_lr = 0.4 * 256 / 512, 0.1 * 256 / 512
    for t in range(30):
        if t < 8:
            expected = warmup_lr + t * (lr - warmup_lr) / 8
        else:
            expected = lr * 0.5 ** sum(t >= milestone for milestone in (12, 20))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), t
        schedule.step()
    cosine = pretrain_schedule(optimizer, PretrainConfig(epochs=10, warmup_epochs=0), steps, world)
    assert type(cosine).__name__ == "WarmupCosine"


def test_official_simmim_recipes():
    # Values of microsoft/Swin-Transformer's configs/simmim/*.yaml and SimMIM's 100-epoch one.
    pretraining = {
        "simmim": dict(model="swin_b", window_size=6, epochs=100, base_lr=2e-4, lr_schedule="cosine"),
        "simmim-swin-b-800ep": dict(model="swin_b", window_size=6, drop_path_rate=0.0, norm_target_patch=0),
        "simmim-swin-l-800ep": dict(model="swin_l", window_size=12, drop_path_rate=0.0, norm_target_patch=0),
        "simmim-swinv2-b-800ep": dict(model="swinv2_b", window_size=12, drop_path_rate=0.1, norm_target_patch=47),
    }
    long = dict(epochs=800, warmup_epochs=10, base_lr=1e-4, warmup_lr=5e-7, weight_decay=0.05, img_size=192)
    long |= dict(lr_schedule="multistep", lr_milestones=(700.0,), lr_gamma=0.1, mask_patch_size=32, mask_ratio=0.6)
    for recipe, values in pretraining.items():
        config = resolve_pretrain_config({"recipe": recipe, "data": "images"})
        expected = values if recipe == "simmim" else {**long, **values}
        assert {name: getattr(config, name) for name in expected} == expected, recipe
    finetuning = {
        "simmim-finetune": dict(model="swin_b", window_size=7, drop_path_rate=0.1, layer_decay=0.9),
        "simmim-finetune-swin-b-800ep": dict(model="swin_b", window_size=7, drop_path_rate=0.1, layer_decay=0.8),
        "simmim-finetune-swin-l-800ep": dict(model="swin_l", window_size=14, drop_path_rate=0.2, layer_decay=0.7),
        "simmim-finetune-swinv2-b-800ep": dict(model="swinv2_b", window_size=14, drop_path_rate=0.1, layer_decay=0.75),
    }
    common = dict(img_size=224, epochs=100, warmup_epochs=20, base_lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7)
    for recipe, values in finetuning.items():
        config = resolve_config({"recipe": recipe})
        expected = {**common, "weight_decay": 0.05, "table_resize": "geometric", **values}
        assert {name: getattr(config, name) for name in expected} == expected, recipe

    refused = [
        ({"lr_schedule": "step"}, "lr_schedule must be one of cosine, multistep, got 'step'"),
        ({"lr_schedule": "multistep"}, "lr_schedule 'multistep' needs lr_milestones"),
        ({"recipe": "simmim-swin-b-800ep", "lr_milestones": (5,)}, "lr_milestones [5.0] must all come after the 10"),
        ({"lr_milestones": (-1,)}, "training option 'lr_milestones' must be above 0 each, got (-1.0,)"),
        ({"norm_target_patch": 2}, "norm_target_patch must be 0 (off) or an odd size of at least 3, got 2"),
    ]
    for values, message in refused:
        with pytest.raises(ValueError) as error:
            resolve_pretrain_config({"data": "images", **values})
        assert message in str(error.value)


def test_pretraining_options_built_in_python_are_checked_and_pretrain_takes_only_them():
    # Pretraining's own recipes (classification's were taken), its options' types, and no other config.
    with pytest.raises(ValueError, match="training option 'recipe' must be one of simmim, .*digits, got 'imagenet'"):
        PretrainConfig(recipe="imagenet")
    with pytest.raises(ValueError, match="training option 'mask_patch_size' must be int, got 32.5"):
        PretrainConfig(mask_patch_size=32.5)
    assert PretrainConfig(lr_milestones=[700]).lr_milestones == (700.0,) and PretrainConfig().lr_milestones == ()
    with pytest.raises(TypeError, match="expected a PretrainConfig, got TrainConfig"):
        pretrain(TrainConfig())


def test_normalized_target_pretraining_on_a_step_schedule(tmp_path):
    # The SwinV2 recipe's two parts in a short run: the normalized target and the step schedule.
    data = write_digit_folder(tmp_path / "data", classes=(0, 1), per_class=10)  # 16 train images: 2 steps
    options = _run_options(data, tmp_path / "run", epochs=3, warmup_epochs=0, base_lr=0.4, norm_target_patch=5)
    result = pretrain(resolve_pretrain_config(options | {"lr_schedule": "multistep", "lr_milestones": (1, 2)}))
    # Each epoch's row gives the rate after its 2 steps: 0.4 * 8 / 512 times 0.1 per milestone (steps 2, 4) reached.
    expected = [0.4 * 8 / 512 * 0.1 ** sum(2 * (epoch + 1) >= step for step in (2, 4)) for epoch in range(3)]
    assert [row["lr"] for row in result.history] == pytest.approx(expected, rel=1e-12)
    assert all(math.isfinite(row["val_loss"]) for row in result.history)
    assert (tmp_path / "run" / "reconstructions.png").is_file()


def test_the_whole_simmim_model_is_written_officially_and_pretraining_goes_on_from_it(tmp_path, caplog):
    data = write_digit_folder(tmp_path / "data", classes=(0, 1), per_class=10)
    first = pretrain(resolve_pretrain_config(_run_options(data, tmp_path / "first", epochs=1)))
    written = torch.load(first.output / "simmim-final.pth", weights_only=True)["model"]
    trained = torch.load(first.output / "checkpoint-last.pt", weights_only=True)["model"]  # SimMIM's own names
    # The official layout: the encoder under encoder. with the official model's buffers, a (1, 1, C) token.
    assert written["encoder.mask_token"].shape == (1, 1, 16)
    assert torch.equal(written["encoder.mask_token"].view(-1), trained["mask_token"])
    assert "encoder.layers.0.blocks.0.attn.relative_position_index" in written
    assert all(torch.equal(written[key], value) for key, value in trained.items() if key != "mask_token")

    # Going on from it (here at rate 0): the encoder, the mask token and the decoder all carry over.
    frozen = {"base_lr": 0.0, "warmup_lr": 0.0, "min_lr": 0.0, "checkpoint": str(first.output / "simmim-final.pth")}
    with caplog.at_level("INFO", logger="swinkit"):
        second = pretrain(resolve_pretrain_config(_run_options(data, tmp_path / "second", epochs=1, **frozen)))
    assert "its mask token and decoder are loaded into the SimMIM model" in caplog.text
    again = torch.load(second.output / "simmim-final.pth", weights_only=True)["model"]
    assert again.keys() == written.keys() and all(torch.equal(again[key], written[key]) for key in written)
    assert second.history[0]["val_loss"] == pytest.approx(first.history[0]["val_loss"], rel=1e-6)

    # A decoder of another shape (another encoder width) is refused by name.
    model = SimMIM(swinkit.create_model("swin_test", num_classes=0, img_size=32, window_size=4, embed_dim=24))
    with pytest.raises(ValueError, match=r"decoder.0.weight has shape \(3072, 128, 1, 1\) there but \(3072, 192,"):
        load_pretraining_parts(model, pretraining_parts(written), "simmim-final.pth")


def test_an_encoder_the_official_code_would_build_otherwise_is_not_written_officially(tmp_path, caplog):
    # Windows kept on maps smaller than them (a detection backbone's rule): the official classification
    # encoder would build other bias tables, so the run ends with its swinkit files and says why.
    model = SimMIM(swinkit.create_model("swin_test", num_classes=0, img_size=64, window_size=7, always_shift=True))
    trainer = types.SimpleNamespace(model=model, output=tmp_path)
    with caplog.at_level("WARNING", logger="swinkit"):
        PretrainTrainer._save_official(trainer, model.state_dict())
    assert not (tmp_path / "simmim-final.pth").exists()
    assert "simmim-final.pth is not written: this model cannot be written in the official layout" in caplog.text


def test_a_validation_set_of_which_no_image_can_be_read_stops_pretraining_before_a_best_encoder(tmp_path, capsys):
    # Its val loss was 0.0000 over no image, the best possible: encoder-best.safetensors was picked on it.
    train = write_digit_folder(tmp_path / "train", classes=(0, 1), per_class=4, formats=("png",))
    val = tmp_path / "val"
    val.mkdir()
    (val / "a.png").write_bytes(b"not an image")
    (val / "b.jpg").write_bytes(b"")
    output = tmp_path / "pretrain"
    args = ["pretrain", "--data", str(train), "--val-data", str(val), "--model", "swin_test", "--img-size", "32"]
    args += ["--window-size", "4", "--mask-patch-size", "8", "--batch-size", "4", "--epochs", "1", "--workers", "0"]
    assert main([*args, "--no-progress", "--warmup-epochs", "0", "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        f"swinkit pretrain: error: no image of the validation set ({val}) could be read: all 2 failed (the first: "
    ), error
    assert not (output / "encoder-best.safetensors").exists()
