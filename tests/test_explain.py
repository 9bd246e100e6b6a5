"""Visual explanations: Grad-CAM against one computed on timm's Swin, the recorded attention against
each block's own output, rollout against the dense matrix product, and ``swinkit explain``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import swinkit
from helpers import perturb, relative_error, write_digit_folder
from swinkit.cli import main
from swinkit.dense import create_detector, create_segmentor
from swinkit.explain import (
    COLOR_STOPS,
    colorize,
    explain,
    explain_detection,
    explain_segmentation,
    overlay,
    record_attention,
)
from swinkit.model import shifted_window_attention, window_and_shift
from swinkit.model_v2 import SwinTransformerBlockV2

TINY = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "img_size": 64, "window_size": 4}


def _tiny_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's Swin and swinkit's ``swin_test`` with the same weights, float64."""
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, **TINY)
    reference = perturb(reference.double().eval(), scale=0.05)
    model = swinkit.create_model("swin_test", num_classes=5).double()  # float64 before loading: no rounding
    assert swinkit.load_checkpoint(model, reference.state_dict()).ok
    return reference, model


def _grad_cam(model: torch.nn.Module, x: torch.Tensor, stage: int, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM written out on timm's model: its stage ``stage`` returns the map after the blocks."""
    kept = []
    handle = model.layers[stage].register_forward_hook(lambda module, inputs, output: kept.append(output))
    logits = model(x)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), kept[0])
    return torch.relu((gradient.mean(dim=(1, 2), keepdim=True) * kept[0]).sum(dim=-1))


def test_gradcam_matches_grad_cam_computed_on_timm():
    reference, model = _tiny_pair()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    top = reference(x).argmax(dim=-1)
    for stage, target in ((3, None), (1, None), (-3, 2)):
        found = explain(model, x, "gradcam", target=target, stage=stage)
        wanted = top if target is None else torch.full((3,), target)
        assert found.targets == wanted.tolist()
        expected = _grad_cam(reference, x, stage % 4, wanted)
        assert found.raw.shape == expected.shape == (3, 64 // 2 ** (stage % 4 + 2), 64 // 2 ** (stage % 4 + 2))
        assert expected.amax() > 0 and relative_error(found.raw, expected) < 1e-12
        assert found.stride == 4 * 2 ** (stage % 4) and found.maps.shape == (3, 64, 64)
        assert found.maps.amin() == 0 and found.maps.amax() == 1


def _block_inputs(model: torch.nn.Module) -> tuple[list[torch.Tensor], list]:
    inputs = []
    blocks = [block for layer in model.layers for block in layer.blocks]
    handles = [block.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for block in blocks]
    return inputs, handles


@pytest.mark.parametrize("name", ["swin_test", "swinv2_test"])
def test_recorded_attention_reproduces_each_blocks_attention(name):
    # 70 x 53: every stage pads, and stages 1-2 shift. Each recorded (dense) attention matrix,
    # applied to the map's values in map order (plus the weight the softmax gave to padded keys,
    # whose value is the v bias alone), must give the block's attention output.
    model = perturb(swinkit.create_model(name, num_classes=3).double(), scale=0.05)
    x = torch.randn(2, 3, 70, 53, dtype=torch.float64)
    inputs, handles = _block_inputs(model)
    _, records = record_attention(model, x)
    for handle in handles:
        handle.remove()
    blocks = [block for layer in model.layers for block in layer.blocks]
    assert len(records) == len(blocks) == len(inputs) == 8
    shifts = set()
    for block, record, tokens in zip(blocks, records, inputs, strict=True):
        B, H, W, C = tokens.shape
        assert record.size == (H, W)
        source = tokens if isinstance(block, SwinTransformerBlockV2) else block.norm1(tokens)
        window, shift = window_and_shift(H, W, block.window_size, block.shift_size, block.always_shift)
        shifts.add(shift)
        with torch.no_grad():
            expected = shifted_window_attention(source, block.attn, window, shift)
            heads = block.attn.num_heads
            values = block.attn.project_qkv(source)[..., 2 * C :].reshape(B, H * W, heads, -1).transpose(1, 2)
            padding_value = block.attn.project_qkv(source.new_zeros(C))[2 * C :].view(heads, 1, -1)
            weights = record.dense()  # (B, nH, HW, HW)
            assert weights.shape == (B, heads, H * W, H * W)
            on_padding = 1 - weights.sum(dim=-1, keepdim=True)
            mixed = weights @ values + on_padding * padding_value
            got = block.attn.proj(mixed.transpose(1, 2).reshape(B, H, W, C))
        assert relative_error(got, expected) < 1e-12
    assert {(2, 2), (2, 0)} <= shifts  # shifted both ways (stages 0, 1) and down only (stage 2, 5 x 4)


def _merge_matrix(size: tuple[int, int]) -> torch.Tensor:
    """``(h' w', h w)``: each merged token's relevance shared equally by the real tokens it gathers."""
    H, W = size
    rows, cols = (H + 1) // 2, (W + 1) // 2
    matrix = torch.zeros(rows * cols, H * W, dtype=torch.float64)
    for y in range(H):
        for x in range(W):
            matrix[(y // 2) * cols + x // 2, y * W + x] = 1.0
    return matrix / matrix.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("name, stage", [("swin_test", 0), ("swinv2_test", 1)])
def test_rollout_is_the_product_of_the_dense_attention_matrices(name, stage):
    model = perturb(swinkit.create_model(name, num_classes=3).double(), scale=0.05)
    x = torch.randn(2, 3, 70, 53, dtype=torch.float64)
    _, records = record_attention(model, x, stage)
    size = records[-1].size
    relevance = torch.full((2, size[0] * size[1]), 1.0 / (size[0] * size[1]), dtype=torch.float64)
    for record in reversed(records):
        if record.size != size:
            relevance = relevance @ _merge_matrix(record.size)
            size = record.size
        attention = record.dense().mean(dim=1)
        attention = attention / attention.sum(dim=-1, keepdim=True)  # over the map's own tokens
        eye = torch.eye(attention.shape[-1], dtype=torch.float64)
        relevance = (relevance[:, None, :] @ (0.5 * attention + 0.5 * eye))[:, 0]
    found = explain(model, x, "rollout", stage=stage)
    assert found.raw.shape == (2, *size) and found.stride == 4 * 2**stage
    assert relative_error(found.raw.flatten(1), relevance) < 1e-12
    assert torch.allclose(found.raw.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


def test_maps_cover_the_image_from_the_top_left():
    # One hot cell at stride 4: the map peaks on that cell's 4 x 4 pixels, and the padded right /
    # bottom cells are cropped, not squeezed in.
    model = swinkit.create_model("swin_test", num_classes=3)
    from swinkit.explain import _to_image

    raw = torch.zeros(1, 18, 14)
    raw[0, 17, 3] = 1.0
    maps = _to_image(raw, 4, (70, 53))
    assert maps.shape == (1, 70, 53)
    row, col = divmod(int(maps[0].argmax()), 53)
    assert 68 <= row < 70 and 12 <= col < 16
    found = explain(model, torch.randn(1, 3, 70, 53), "rollout")
    assert found.raw.shape == (1, 18, 14)  # ceil(70 / 4) x ceil(53 / 4)


COLORS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def _squares(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise with one 16 x 16 square whose colour is the class, anywhere in the 64 x 64 image."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 64, 64, generator=generator) * 0.3
    labels = torch.randint(0, 3, (count,), generator=generator)
    corners = torch.randint(0, 64 - 16, (count, 2), generator=generator)
    for image, label, (row, col) in zip(x, labels, corners.tolist(), strict=True):
        image[:, row : row + 16, col : col + 16] = COLORS[label][:, None, None] * 1.5
    return x, labels, corners


def _square_share(maps: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Mean of each map on its square over its mean on the whole image."""
    return torch.stack(
        [
            m[row : row + 16, col : col + 16].mean() / m.mean().clamp_min(1e-9)
            for m, (row, col) in zip(maps, corners.tolist(), strict=True)
        ]
    )


def test_rollout_follows_what_training_taught_the_model_to_attend_to():
    model = swinkit.create_model("swin_test", num_classes=3)
    x, labels, corners = _squares(40, seed=2)
    untrained = _square_share(explain(model, x, "rollout").maps, corners)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(150):
        images, targets, _ = _squares(32, seed=100 + step)
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    found = explain(model, x, "rollout")
    assert (torch.tensor(found.targets) == labels).float().mean() >= 0.8  # it learned the task
    trained = _square_share(found.maps, corners)
    # Random weights spread attention evenly; trained ones gather it on the square.
    assert untrained.median() < 1.3 and (untrained > 1.5).float().mean() <= 0.2
    assert trained.median() > 2.0 and (trained > 1.5).float().mean() >= 0.5
    assert model.training  # left in the mode it had


def test_gradcam_by_default_uses_the_deepest_stage_at_least_four_tokens_wide():
    model = swinkit.create_model("swin_test", num_classes=3)
    # Stage maps: 8, 4, 2, 1 tokens wide at 32; 16, 8, 4, 2 at 64; 32, ... 4 at 128 (and 70 x 53
    # pads to 18 x 14, ..., 5 x 4).
    for size, stage in (((32, 32), 1), ((64, 64), 2), ((70, 53), 2), ((128, 160), 3), ((12, 12), 0)):
        found = explain(model, torch.randn(1, 3, *size))
        assert (found.stage, found.stride) == (stage, 4 * 2**stage), size
    assert explain(model, torch.randn(1, 3, 64, 64), "rollout").stage == 0


def test_explain_leaves_the_model_as_it_was_and_refuses_bad_requests():
    model = swinkit.create_model("swin_test", num_classes=3)
    model.train()
    model.set_attn_impl("sdpa")
    x = torch.randn(2, 3, 64, 64)
    for method in ("gradcam", "rollout"):
        explain(model, x, method)
    assert model.training and {m.attn_impl for m in model.modules() if hasattr(m, "attn_impl")} == {"sdpa"}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    bad = [
        (lambda: explain(model, x, "saliency"), "unknown explanation method 'saliency'; accepted: gradcam, rollout"),
        (lambda: explain(model, x, stage=4), "stage must be in -4..3 for this model, got 4"),
        (lambda: explain(model, x, target=3), r"target must be one class in 0..2 or one per image \(2\), got 3"),
        (lambda: explain(model, x, target=[0]), r"target must be one class in 0..2 or one per image \(2\), got \[0\]"),
        (lambda: explain(model, x[0]), r"expected images of shape \(B, 3, H, W\), got \(3, 64, 64\)"),
        (lambda: explain(model, x, target=1.5), r"target must be one class .* got 1.5"),  # was "not iterable"
        (lambda: record_attention(model, x, 4), "first_stage must be in 0..3 for this model, got 4"),
        (
            lambda: explain(swinkit.create_model("swin_test", features_only=True), x),
            "explanations need a classifier",
        ),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    # One class as a 0-d tensor (an argmax) or a numpy integer, as an int; was "iteration over a 0-d tensor"
    top = explain(model, x, target=1).targets
    assert explain(model, x, target=torch.tensor(1)).targets == explain(model, x, target=np.int64(1)).targets == top
    with pytest.raises(TypeError, match="floating-point"):  # was "only Tensors of floating point dtype can require"
        explain(model, torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def _refusing_to_run(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, failing the test if it is run (a bad request must be refused before)."""

    def ran(module, inputs):
        raise AssertionError("the model ran")

    model.register_forward_pre_hook(ran)
    return model


def test_explanations_refuse_the_wrong_model_and_bad_labels_and_images_before_running():
    segmentor = create_segmentor("swin_test", num_classes=3, channels=8, aux_channels=8).eval()
    x = torch.randn(2, 3, 64, 64)
    # A dense model, or a name, in place of a classifier: were AttributeErrors on 'config' and 'layers'.
    for call, name in [(explain, "explain"), (record_attention, "record_attention")]:
        for model in (segmentor, "swin_t"):
            with pytest.raises(TypeError, match=f"{name} needs a .*got {type(model).__name__}; explain_segmentation"):
                call(model, x)
    _refusing_to_run(segmentor)
    for target in (3, 1.5):  # were refused only after the model had run
        with pytest.raises(ValueError, match=rf"target must be one class in 0..2 or one per image \(2\), got {target}"):
            explain_segmentation(segmentor, x, target)
    with pytest.raises(TypeError, match="floating-point"):  # was "only Tensors of floating point dtype can require"
        explain_segmentation(segmentor, torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    options = dict(min_size=64, max_size=96, fpn_channels=16, box_head_dim=32, mask_head_dim=8)
    detector = _refusing_to_run(create_detector("swin_test", 3, masks=False, detector_options=options).eval())
    image = torch.rand(3, 50, 70)
    for label in (99, 0, 1.5, True):  # were "the detector finds nothing of class 99" (0, 1.5 alike)
        with pytest.raises(ValueError, match=rf"label must be a class of the detector, an int in 1..3 .*got {label}"):
            explain_detection(detector, image, label)
    with pytest.raises(TypeError, match="floating-point"):
        explain_detection(detector, (image * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"image must be one \(3, H, W\) tensor in \[0, 1\], got list"):
        explain_detection(detector, [image])  # was an AttributeError on 'dim'


def test_overlay_blends_the_colour_ramp_over_the_image():
    assert torch.equal(colorize(torch.tensor([0.0, 1.0])), COLOR_STOPS[[0, -1]])
    middle = colorize(torch.tensor([0.1]))[0]  # halfway between the first two stops
    assert torch.allclose(middle, (COLOR_STOPS[0] + COLOR_STOPS[1]) / 2)
    image = Image.new("RGB", (5, 4), (200, 100, 50))
    heat = torch.linspace(0, 1, 20).view(4, 5)
    assert np.array_equal(np.asarray(overlay(image, heat, alpha=0.0)), np.asarray(image))
    colours = (colorize(heat) * 255).round().to(torch.uint8)
    assert np.array_equal(np.asarray(overlay(image, heat, alpha=1.0)), colours.numpy())
    with pytest.raises(ValueError, match=r"heat map \(5, 4\) does not match the image \(4, 5\)"):
        overlay(image, heat.T)
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay(image, heat, alpha=1.5)
    with pytest.raises(ValueError, match=r"the heat map holds NaN \(20 of 20 values\)"):  # was an IndexError
        overlay(image, torch.full((4, 5), float("nan")))


def test_swinkit_explain_writes_an_overlay_per_image(tmp_path, capsys):
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=2)
    (folder / "digit0" / "broken.png").write_bytes(b"not a png")
    model = perturb(swinkit.create_model("swin_test", img_size=32, num_classes=2), scale=0.05)
    checkpoint = tmp_path / "model.safetensors"
    swinkit.save(model, checkpoint, class_names=["zero", "one"])
    out = tmp_path / "maps"
    args = ["explain", str(folder), "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main([*args, "--json", "--class", "one"]) == 0
    results = json.loads(capsys.readouterr().out)
    good = [r for r in results if "error" in r or r["class"] == "one"]
    assert len(results) == len(good) == 5
    errors = [r for r in results if "error" in r]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.png")
    outputs = [r["output"] for r in results if "output" in r]
    assert len(set(outputs)) == 4 and all(o.endswith(".gradcam.png") for o in outputs)
    for result in results:
        if "output" in result:
            picture = Image.open(result["output"])
            assert picture.size == (32, 32) and result["index"] == 1 and 0 <= result["probability"] <= 1
    # The default batch of 8 took the 5 files at once; one at a time (and 2 at a time, the broken
    # file inside a batch) gives the same results in the same order and the same pictures.
    for batch_size in (1, 2):
        apart = tmp_path / f"maps-{batch_size}"
        assert main([*args[:-1], str(apart), "--json", "--class", "one", "--batch-size", str(batch_size)]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert [r["path"] for r in alone] == [r["path"] for r in results]
        for together, single in zip(results, alone, strict=True):
            assert ("error" in together) == ("error" in single)
            if "output" in together:
                assert single["probability"] == pytest.approx(together["probability"], rel=1e-5)
                pixels = [np.asarray(Image.open(r["output"]), dtype=np.int16) for r in (together, single)]
                assert np.abs(pixels[0] - pixels[1]).max() <= 1

    single = tmp_path / "one.png"
    image = next((folder / "digit1").glob("*.png"))
    assert (
        main(["explain", str(image), "--checkpoint", str(checkpoint), "--output", str(single), "--method", "rollout"])
        == 0
    )
    assert f"-> {single}" in capsys.readouterr().out and Image.open(single).size == (32, 32)

    refused = [
        (["--class", "two"], "class 'two' is neither a class name of the checkpoint (zero, one) nor an index 0..1"),
        (["--out", str(single)], f"--out {single} names one image file, but 5 images were given; give a folder"),
        (["--alpha", "2"], "alpha must be in [0, 1], got 2.0"),
        (["--stage", "9"], "stage must be in -4..3 for this model, got 9"),
        (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    ]
    for extra, message in refused:
        assert main([*args, *extra]) == 2
        assert capsys.readouterr().err.strip() == f"swinkit explain: error: {message}"
    assert main(["explain", str(image), "--checkpoint", str(tmp_path / "m.onnx"), "--out", str(out)]) == 2
    assert "give a checkpoint, not an exported .onnx or .pt2 file" in capsys.readouterr().err

    # A refused checkpoint leaves nothing behind: neither the folder nor a single file's folder is
    # made before the model is read; a file in the folder's way is still refused before it.
    for destination in (tmp_path / "new" / "maps", tmp_path / "new2" / "one.png"):
        bad = ["explain", str(image), "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(destination)]
        assert main(bad) == 2
        assert "missing.safetensors" in capsys.readouterr().err
        assert not destination.parent.exists()
    (tmp_path / "taken").write_text("a file")
    assert main([*args[:-1], str(tmp_path / "taken" / "maps")]) == 2
    assert f"{tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err
