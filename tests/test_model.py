"""Swin V1: parity with timm / torchvision / the official layout, masks, any input size, outputs."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import swinkit
from helpers import (
    assert_checkpointing_keeps_gradients,
    assert_forward_backward,
    assert_same_weights,
    perturb,
    relative_error,
    timm_to_official,
    torchvision_to_official,
)
from swinkit.model import (
    SwinTransformerBlock,
    WindowAttention,
    relative_position_index,
    shift_window_mask,
    shifted_window_attention,
    traced_window_attention,
    window_and_shift,
    window_partition,
    window_reverse,
)

TIMM_NAMES = {"swin_t": "swin_tiny_patch4_window7_224", "swin_b_384": "swin_base_patch4_window12_384"}


def _timm_model(variant: str) -> torch.nn.Module:
    model = timm.create_model(TIMM_NAMES[variant], pretrained=False).double().eval()
    perturb(model, scale=0.05)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["swin_t", "swin_b_384"])
def test_parity_with_timm_and_official_layout(variant, tmp_path):
    reference = _timm_model(variant)
    size = swinkit.get_config(variant).img_size
    x = torch.randn(2 if variant == "swin_t" else 1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)

    timm_file = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), timm_file)
    model = swinkit.create_model(variant).double().eval()  # float64 before loading: no float32 rounding
    report = swinkit.load_checkpoint(model, timm_file)
    assert report.format == "timm" and report.ok
    with torch.no_grad():
        assert relative_error(model(x), expected) < 1e-10

    # The same weights in the official layout, with the derived buffers official files carry
    # (garbage values: they must be dropped, never used).
    official = timm_to_official(reference.state_dict())
    for i, depth in enumerate(model.config.depths):
        for j in range(depth):
            official[f"layers.{i}.blocks.{j}.attn_mask"] = torch.randn(4, 49, 49)
            official[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.randint(0, 9, (49, 49))
    official_file = tmp_path / "official.pth"
    torch.save({"model": official}, official_file)
    from_official = swinkit.create_model(variant).double().eval()
    report = swinkit.load_checkpoint(from_official, official_file)
    assert report.format == "official" and report.ok
    # The same weights and buffers as the model checked above: the same function (a third forward
    # pass of a full-size model in float64 would add nothing but time).
    assert_same_weights(from_official, model)


def test_parity_with_timm_float32():
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    perturb(reference, scale=0.05)
    model = swinkit.create_model("swin_t", checkpoint=reference.state_dict()).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


@pytest.fixture(scope="module")
def torchvision_pair():
    reference = torchvision.models.swin_t(weights=None).double().eval()
    perturb(reference, scale=0.05)
    model = swinkit.create_model("swin_t").double().eval()
    assert swinkit.load_checkpoint(model, torchvision_to_official(reference.state_dict(), (2, 2, 6, 2))).ok
    return reference, model


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (256, 320), (448, 448)])
def test_parity_with_torchvision(torchvision_pair, size):
    # Sizes where no stage map is smaller than the window: torchvision pads the same way there.
    reference, model = torchvision_pair
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-10


def _brute_force_mask(Hp: int, Wp: int, window: int, shift: int) -> torch.Tensor:
    """Tokens may attend iff the cyclic shift did not wrap between them (in rows and in columns)."""
    origin = lambda r, c: ((r + shift) % Hp, (c + shift) % Wp)  # noqa: E731
    windows = []
    for wr in range(0, Hp, window):
        for wc in range(0, Wp, window):
            cells = [(wr + i, wc + j) for i in range(window) for j in range(window)]
            mask = torch.zeros(len(cells), len(cells))
            for a, (ra, ca) in enumerate(cells):
                for b, (rb, cb) in enumerate(cells):
                    (oa_r, oa_c), (ob_r, ob_c) = origin(ra, ca), origin(rb, cb)
                    if oa_r - ob_r != ra - rb or oa_c - ob_c != ca - cb:
                        mask[a, b] = -100.0
            windows.append(mask)
    return torch.stack(windows)


@pytest.mark.parametrize("Hp,Wp,window,shift", [(14, 14, 7, 3), (8, 12, 4, 2), (12, 6, 6, 3)])
def test_shift_mask_equals_brute_force(Hp, Wp, window, shift):
    mask = shift_window_mask(Hp, Wp, (window, window), (shift, shift), torch.float32, torch.device("cpu"))
    assert torch.equal(mask, _brute_force_mask(Hp, Wp, window, shift))


def test_masks_and_indices_are_cached_per_size_dtype_device():
    cpu = torch.device("cpu")
    a = shift_window_mask(14, 14, (7, 7), (3, 3), torch.float32, cpu)
    assert shift_window_mask(14, 14, (7, 7), (3, 3), torch.float32, cpu) is a
    half = shift_window_mask(14, 14, (7, 7), (3, 3), torch.bfloat16, cpu)
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), a)
    assert relative_position_index((7, 7), (7, 7), cpu) is relative_position_index((7, 7), (7, 7), cpu)


def test_relative_position_index_formula():
    index = relative_position_index((3, 4), (3, 4), torch.device("cpu")).view(12, 12)
    for i in range(12):
        for j in range(12):
            (hi, wi), (hj, wj) = divmod(i, 4), divmod(j, 4)
            assert index[i, j] == (hi - hj + 2) * 7 + (wi - wj + 3)


@pytest.mark.parametrize("always_shift", [False, True])
def test_traced_window_attention_matches_eager_for_every_window_rule(always_shift):
    # The export path (one gather each way, the classification rule as arithmetic: window
    # min(side, 7), shift * [side > 7]) must equal the eager path (pad, roll, partition, and the
    # rule as branches). Plain ints stand in for the traced sizes here; the export tests run the
    # traced graph itself. Sides: clamped (3, 7), padded (9), exact (14).
    torch.manual_seed(2)
    attn = perturb(WindowAttention(12, 3, 7, qkv_bias=True, attn_drop=0.0, proj_drop=0.0).double().eval())
    for H, W in [(3, 5), (7, 9), (9, 14), (14, 3), (16, 11)]:
        x = torch.randn(2, H, W, 12, dtype=torch.float64)
        for shift_size in (0, 3):
            expected = shifted_window_attention(x, attn, *window_and_shift(H, W, 7, shift_size, always_shift))
            window = (7, 7) if always_shift else (torch.sym_min(H, 7), torch.sym_min(W, 7))
            shift = tuple(shift_size if always_shift else shift_size * min(1, max(0, side - 7)) for side in (H, W))
            traced = traced_window_attention(x, attn, window, shift)
            assert relative_error(traced, expected) < 1e-12, (H, W, shift_size)


def test_unshifted_single_window_is_global_attention_with_bias():
    torch.manual_seed(1)
    dim, heads, size = 12, 3, 5
    attn = WindowAttention(dim, heads, size, qkv_bias=True, attn_drop=0.0, proj_drop=0.0).double().eval()
    perturb(attn)
    x = torch.randn(2, size, size, dim, dtype=torch.float64)
    out = shifted_window_attention(x, attn, (size, size), (0, 0))

    tokens = x.reshape(2, size * size, dim)
    q, k, v = attn.qkv(tokens).chunk(3, dim=-1)
    split = lambda t: t.view(2, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    bias = torch.empty(heads, size * size, size * size, dtype=torch.float64)
    for i in range(size * size):
        for j in range(size * size):
            dh, dw = i // size - j // size, i % size - j % size
            bias[:, i, j] = attn.relative_position_bias_table[(dh + size - 1) * (2 * size - 1) + dw + size - 1]
    weights = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5 + bias).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, size * size, dim)).view_as(x)
    assert relative_error(out, expected) < 1e-12


def test_window_partition_round_trip_and_order():
    x = torch.arange(2 * 4 * 6).float().view(2, 4, 6, 1)
    windows = window_partition(x, (2, 3))
    assert windows.shape == (8, 6, 1)
    assert windows[1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]  # second window of image 0, row-major inside
    assert torch.equal(window_reverse(windows, (2, 3), 2, 2, 2), x)


@pytest.mark.parametrize("shape", [(1, 3, 225, 300), (2, 3, 97, 61)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_odd_sizes_and_dtypes(shape, dtype):
    model = swinkit.create_model("swin_t").to(dtype).eval()
    with torch.no_grad():
        out = model(torch.randn(shape).to(dtype))
    assert out.shape == (shape[0], 1000) and out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 3, 17, 9), (3, 3, 64, 64), (5, 3, 130, 40), (2, 3, 3, 3)])
def test_any_size_small_model_forward_backward(shape):
    assert_forward_backward(swinkit.create_model("swin_test", num_classes=5), shape, 5)


def test_window_clamp_rule_and_detection_rule():
    # Swin-T at 224: stage 4 map is 7x7 == window, so its second block does not shift.
    model = swinkit.create_model("swin_t", num_classes=0).eval()
    block = model.layers[3].blocks[1]
    assert block.shift_size == 3
    x = torch.randn(1, 7, 7, 768)
    detection = SwinTransformerBlock(768, 24, 7, 3, 4.0, True, 0.0, 0.0, 0.0, always_shift=True).eval()
    detection.load_state_dict(block.state_dict())
    with torch.no_grad():
        # The classification rule equals an explicitly unshifted block; the detection rule differs.
        unshifted = SwinTransformerBlock(768, 24, 7, 0, 4.0, True, 0.0, 0.0, 0.0, always_shift=False).eval()
        unshifted.load_state_dict(block.state_dict())
        assert torch.equal(block(x), unshifted(x))
        assert not torch.allclose(block(x), detection(x))
        # On a 4x4 map the detection rule pads to the full window instead of shrinking it.
        assert detection(torch.randn(1, 4, 4, 768)).shape == (1, 4, 4, 768)


def test_detection_rule_equals_classification_rule_when_maps_exceed_window():
    model = swinkit.create_model("swin_test", num_classes=3, img_size=160).eval()
    always = swinkit.create_model("swin_test", num_classes=3, img_size=160, always_shift=True).eval()
    always.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 160, 160)  # maps 40, 20, 10, 5 > window 4
    with torch.no_grad():
        assert torch.equal(model(x), always(x))


def test_forward_features_shapes_and_features_only():
    model = swinkit.create_model("swin_t").eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(2, 96, 56, 56), (2, 192, 28, 28), (2, 384, 14, 14), (2, 768, 7, 7)]
    assert all(m.is_contiguous() for m in maps)

    backbone = swinkit.create_model("swin_t", features_only=True, out_indices=(1, 3)).eval()
    names = set(backbone.state_dict())
    assert not any(n.startswith(("head.", "norm.")) for n in names)
    assert {"norm1.weight", "norm3.weight"} <= names and "norm0.weight" not in names
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 100, 150))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 13, 19), (1, 768, 4, 5)]


def test_forward_features_match_classifier_path():
    model = swinkit.create_model("swin_test", num_classes=4).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        last = model.forward_features(x)[-1].permute(0, 2, 3, 1)
        assert torch.allclose(model.forward_head(last), model(x), rtol=0, atol=1e-12)


def test_absolute_position_embedding_any_size():
    model = swinkit.create_model("swin_test", ape=True, num_classes=2).eval()
    assert "absolute_pos_embed" in model.state_dict()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
        assert model(torch.randn(1, 3, 90, 50)).shape == (1, 2)


def test_state_dict_has_no_derived_buffers_and_round_trips(tmp_path):
    model = perturb(swinkit.create_model("swin_test", num_classes=7)).eval()
    names = list(model.state_dict())
    assert not any("relative_position_index" in n or "attn_mask" in n for n in names)
    assert len(list(model.buffers())) == 0
    path = tmp_path / "model.safetensors"
    swinkit.save(model, path)
    loaded = swinkit.create_model(checkpoint=path).eval()
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_grad_checkpointing_gives_same_gradients():
    model = perturb(swinkit.create_model("swin_test", num_classes=3)).double()
    assert_checkpointing_keeps_gradients(model, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_drop_path_rates_are_linear_over_blocks():
    model = swinkit.create_model("swin_t", drop_path_rate=0.2)
    rates = [block.drop_path.p for layer in model.layers for block in layer.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 12).tolist())


def test_inference_mode_then_training_reuses_cached_tables():
    model = swinkit.create_model("swin_test", num_classes=2)
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 64, 64))
    model.train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()  # cached index built under inference_mode


def test_attn_impls_agree():
    model = perturb(swinkit.create_model("swin_test", num_classes=3)).double().eval()
    x = torch.randn(2, 3, 72, 56, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        model.set_attn_impl("sdpa")
        assert relative_error(model(x), reference) < 1e-12
    with pytest.raises(ValueError, match="unknown attn_impl 'flash9'.*reference"):
        model.set_attn_impl("flash9")


def test_bad_inputs_have_clear_errors():
    model = swinkit.create_model("swin_test", num_classes=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(1, 4, 32, 32\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"got \(32, 32\)"):
        model(torch.randn(32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown model 'swin_q'.*swin_t"):
        swinkit.create_model("swin_q")
    with pytest.raises(TypeError, match="unknown model option.*'windowsize'"):
        swinkit.create_model("swin_t", windowsize=7)
    for option, rate in (("drop_path_rate", 1.0), ("drop_rate", -0.1), ("attn_drop_rate", 1.5)):
        with pytest.raises(ValueError, match=rf"{option} must be in \[0, 1\), got {rate}"):
            swinkit.create_model("swin_test", **{option: rate})
    with pytest.raises(TypeError, match=r"images of dtype torch.float16 for a model in torch.float32"):
        model(torch.randn(1, 3, 32, 32).half())  # was torch's "Input type (c10::Half) and bias type (float)"
    for option, value, message in [  # each was accepted (a backbone built, no head) or failed deep in torch
        ("features_only", "False", "field features_only must be bool, got 'False'"),
        ("window_size", 7.5, "field window_size must be int, got 7.5"),
        ("depths", (2, 0, 2, 2), r"depths must be at least 1 \(each\), got \(2, 0, 2, 2\)"),
        ("num_heads", (0, 2, 2, 4), r"num_heads must be at least 1 \(each\)"),
        ("num_classes", -1, r"num_classes must be 0 or more \(0: no head\), got -1"),
        ("mlp_ratio", 0, "mlp_ratio must be above 0, got 0"),
        ("pretrained_window_sizes", (-4, 0, 0, 0), "pretrained_window_sizes must be 0 or more"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            swinkit.create_model("swin_test", **{option: value})
    with pytest.raises(TypeError, match="build_model takes a SwinConfig, got 'swin_t'; create_model"):
        swinkit.build_model("swin_t")
    for size in [(32, 32), (3, -32, 32), (3, 0, 0), 224]:
        with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\) of one image"):
            swinkit.flops(model, size)
    with pytest.raises(ValueError, match=r"input_size \(1, 32, 32\) has 1 channels; the model takes 3"):
        swinkit.flops(model, (1, 32, 32))  # was a report of 3 channels' work
    with pytest.raises(TypeError, match="set_grad_checkpointing takes True or False, got 'no'"):
        model.set_grad_checkpointing("no")  # was stored: a truthy "no" turned it on
    with pytest.raises(ValueError, match="num_classes must be 0 or more"):
        model.reset_classifier(-1)  # was: the head silently removed
    assert isinstance(model.head, torch.nn.Linear) and model.config.num_classes == 2
    from swinkit.export import image_sides

    assert image_sides(32) == (32, 32) and image_sides([32, 48]) == (32, 48)  # `export(..., img_size=32)` failed
    for size in [(32,), -3, (32, 0), "32"]:
        with pytest.raises(ValueError, match="img_size must be a side or \\(height, width\\)"):
            image_sides(size)


def test_config_overrides():
    model = swinkit.create_model("swin_t", num_classes=10, img_size=256, window_size=8, in_chans=1, drop_path_rate=0.0)
    assert model.config.window_size == 8 and model.config.in_chans == 1
    assert model.patch_embed.proj.in_channels == 1
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 3)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 256, 256)).shape == (1, 10)


@pytest.mark.parametrize("name", ["swin_test", "swinv2_test"])
def test_a_new_number_of_stages_brings_its_per_stage_defaults(name):
    model = swinkit.create_model(name, depths=(1, 2, 1), num_heads=(1, 2, 2), num_classes=3)
    assert model.config.out_indices == (0, 1, 2) and model.config.pretrained_window_sizes == (0, 0, 0)
    assert len(model.layers) == 3 and model.head.in_features == 16 * 4
    backbone = swinkit.create_model(name, depths=(2, 2), num_heads=(1, 2), features_only=True).eval()
    with torch.no_grad():
        assert [tuple(f.shape) for f in backbone(torch.randn(1, 3, 32, 32))] == [(1, 16, 8, 8), (1, 32, 4, 4)]
    # Values the caller chose are theirs to fit to the stages: a clear error, not a silent guess.
    with pytest.raises(ValueError, match=r"out_indices \(0, 3\) must name stages in 0..2 \(depths \(1, 2, 1\)"):
        swinkit.create_model(name, depths=(1, 2, 1), num_heads=(1, 2, 2), out_indices=(0, 3))
    with pytest.raises(ValueError, match=r"pretrained_window_sizes \(4, 4, 4, 4\) needs one entry per stage"):
        swinkit.create_model("swinv2_test", pretrained_window_sizes=(4, 4, 4, 4), depths=(1, 1), num_heads=(1, 2))
    transferred = swinkit.create_model("swinv2_test", pretrained_window_sizes=(8, 8, 8, 4)).config
    with pytest.raises(ValueError, match=r"pretrained_window_sizes \(8, 8, 8, 4\) needs one entry per stage"):
        transferred.replace(depths=(1, 1), num_heads=(1, 2))


def test_official_initialisation():
    model = swinkit.create_model("swin_t")
    linear = model.layers[0].blocks[0].mlp.fc1
    assert torch.count_nonzero(linear.bias) == 0
    assert 0.015 < linear.weight.std().item() < 0.025
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert 0.01 < table.std().item() < 0.03 and table.abs().max() <= 2.0


def test_padding_is_right_bottom_and_never_crops():
    model = swinkit.create_model("swin_test", num_classes=0, features_only=True, stage_norms=False).eval()
    x = torch.randn(1, 3, 61, 62)
    padded = F.pad(x, (0, 2, 0, 3))
    with torch.no_grad():
        assert torch.equal(model.patch_embed(x), model.patch_embed(padded))
        assert model(x)[0].shape[-2:] == (16, 16)
