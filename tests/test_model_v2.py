"""Swin V2: parity with timm and Hugging Face, cosine attention and its clamp, the continuous position
bias and window transfer, checkpoints, any input size, the huge and giant models."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

import swinkit
from helpers import (
    assert_checkpointing_keeps_gradients,
    assert_forward_backward,
    assert_same_weights,
    perturb,
    relative_error,
    timm_to_official,
)
from swinkit.checkpoint import CheckpointError, infer_config, read_any
from swinkit.factory import config_from_checkpoint
from swinkit.model import relative_position_index, shifted_window_attention
from swinkit.model_v2 import SwinTransformerV2, WindowAttentionV2, log_spaced_coords

CPU = torch.device("cpu")
LOG_100 = math.log(100.0)
TIMM_NAMES = {"swinv2_t": "swinv2_tiny_window8_256", "swinv2_b_384": "swinv2_base_window12to24_192to384"}


@torch.no_grad()
def spread_logit_scales(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every head of every block its own logit scale, spread over the unclamped range [log 1, log 100]."""
    scales = [p for name, p in model.named_parameters() if name.endswith("logit_scale")]
    sizes = [p.numel() for p in scales]
    values = torch.linspace(0.0, LOG_100, sum(sizes), dtype=torch.float64)
    values = values[torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed))]
    for param, chunk in zip(scales, values.split(sizes), strict=True):
        param.copy_(chunk.view_as(param))
    return model


def _official_file(reference: torch.nn.Module, path) -> None:
    """timm weights in the official layout, with the derived buffers an official file carries.

    timm builds ``relative_coords_table``, ``relative_position_index`` and ``attn_mask`` like the
    official code (under the same names, not saved); its zero ``k_bias`` has no official counterpart.
    """
    state = timm_to_official(reference.state_dict())
    state.update({k: v for k, v in reference.named_buffers() if not k.endswith("k_bias")})
    assert any(k.endswith("relative_coords_table") for k in state) and any(k.endswith("attn_mask") for k in state)
    torch.save({"model": state}, path)


# ---------------------------------------------------------------------------------------------
# Parity with the reference implementations
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["swinv2_t", "swinv2_b_384"])
def test_parity_with_timm_and_official_layout(variant, tmp_path):
    # swinv2_b_384 is the 192 -> 384 transfer: window 24, pretrained windows (12, 12, 12, 6).
    reference = spread_logit_scales(perturb(timm.create_model(TIMM_NAMES[variant]).double().eval(), scale=0.05))
    config = swinkit.get_config(variant)
    x = torch.randn(1, 3, config.img_size, config.img_size, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)

    save_file(reference.state_dict(), tmp_path / "timm.safetensors")
    model = swinkit.create_model(variant).double().eval()
    report = swinkit.load_checkpoint(model, tmp_path / "timm.safetensors")
    assert report.format == "timm" and report.family == "v2" and report.ok and not report.adapted
    with torch.no_grad():
        assert relative_error(model(x), expected) < 1e-10

    # An official file: its buffers are dropped, and they alone tell the window, pretrained windows and size.
    _official_file(reference, tmp_path / "official.pth")
    checkpoint = read_any(tmp_path / "official.pth")
    inferred = config_from_checkpoint(checkpoint)
    for field in ("img_size", "window_size", "pretrained_window_sizes", "num_classes"):
        assert getattr(inferred, field) == getattr(config, field), field
    from_official = swinkit.build_model(inferred).double().eval()  # float64 before loading: no float32 rounding
    report = swinkit.load_checkpoint(from_official, checkpoint)
    assert report.format == "official" and report.ok
    assert_same_weights(from_official, model)  # and so the function checked above


def hf_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Swinv2ForImageClassification`` state dict to the official layout (written here)."""
    inner = {
        "layernorm_before.": "norm1.",
        "layernorm_after.": "norm2.",
        "attention.self.logit_scale": "attn.logit_scale",
        "attention.self.continuous_position_bias_mlp.": "attn.cpb_mlp.",
        "attention.self.query.bias": "attn.q_bias",
        "attention.self.value.bias": "attn.v_bias",
        "attention.output.dense.": "attn.proj.",
        "intermediate.dense.": "mlp.fc1.",
        "output.dense.": "mlp.fc2.",
    }
    top = {
        "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
        "embeddings.norm.": "patch_embed.norm.",
        "layernorm.": "norm.",
        "classifier.": "head.",
    }
    out, qkv = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("swinv2.")
        block = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", key)
        if block:
            prefix, rest = f"layers.{block.group(1)}.blocks.{block.group(2)}.", block.group(3)
            projection = re.match(r"attention\.self\.(query|key|value)\.weight", rest)
            if projection:
                qkv.setdefault(prefix, {})[projection.group(1)] = value
                continue
            old = next(old for old in inner if rest.startswith(old))
            out[prefix + inner[old] + rest[len(old) :]] = value
            continue
        merge = re.match(r"encoder\.layers\.(\d+)\.downsample\.(.*)", key)
        if merge:
            out[f"layers.{merge.group(1)}.downsample.{merge.group(2)}"] = value
            continue
        old = next(old for old in top if key.startswith(old))
        out[top[old] + key[len(old) :]] = value
    for prefix, parts in qkv.items():
        out[prefix + "attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


@pytest.mark.slow
def test_parity_with_hugging_face():
    config = swinkit.get_config("swinv2_t")
    hf_config = transformers.Swinv2Config(
        image_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        num_labels=config.num_classes,
    )
    reference = transformers.Swinv2ForImageClassification(hf_config).double().eval()
    spread_logit_scales(perturb(reference, scale=0.05))
    model = swinkit.create_model("swinv2_t").double().eval()
    report = swinkit.load_checkpoint(model, hf_to_official(reference.state_dict()))
    assert report.ok and report.family == "v2"
    x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        # transformers adds the shift mask twice (-200 instead of -100): a change of e^-100, below float64 rounding.
        assert relative_error(model(x), reference(pixel_values=x).logits) < 1e-10


# ---------------------------------------------------------------------------------------------
# Scaled cosine attention (Eq. 2) and the continuous position bias (Eq. 3, 4)
# ---------------------------------------------------------------------------------------------


def _attention(dim=12, heads=3, window=5, pretrained=0) -> WindowAttentionV2:
    attn = WindowAttentionV2(dim, heads, window, pretrained, qkv_bias=True, attn_drop=0.0, proj_drop=0.0)
    return perturb(attn.double().eval(), scale=0.3)


def test_cosine_attention_and_position_bias_by_hand():
    torch.manual_seed(1)
    dim, heads, size, pretrained = 12, 3, 5, 3
    attn = _attention(dim, heads, size, pretrained)
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([0.5, 2.0, 4.0]).view(3, 1, 1))
    x = torch.randn(2, size, size, dim, dtype=torch.float64)
    out = shifted_window_attention(x, attn, (size, size), (0, 0))

    tokens = x.reshape(2, size * size, dim)
    q, k, v = torch.nn.functional.linear(tokens, attn.qkv.weight).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias  # no k bias
    split = lambda t: t.view(2, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    cosine = torch.nn.functional.cosine_similarity(q.unsqueeze(3), k.unsqueeze(2), dim=-1)  # (B, nH, N, N)

    def log_spaced(offset: int) -> float:  # Eq. 4, offsets scaled so the pretrained window's edge is 8
        t = offset / (pretrained - 1) * 8
        return math.copysign(math.log2(1 + abs(t)) / 3, t)

    bias = torch.empty(heads, size * size, size * size, dtype=torch.float64)
    for i in range(size * size):
        for j in range(size * size):
            dh, dw = i // size - j // size, i % size - j % size
            coords = torch.tensor([log_spaced(dh), log_spaced(dw)], dtype=torch.float64)
            bias[:, i, j] = 16 * torch.sigmoid(attn.cpb_mlp(coords))
    weights = (cosine * attn.logit_scale.exp() + bias).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, size * size, dim)).view_as(x)
    # The coordinates are float32 in the model (as in the official buffer), float64 here.
    assert relative_error(out, expected) < 1e-6


def test_logit_scale_above_log_100_acts_as_log_100():
    attn = _attention()
    x = torch.randn(4, 25, 12, dtype=torch.float64)

    def run(value: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            attn.logit_scale.fill_(value)
        attn.zero_grad()
        out = attn(x, (5, 5), None)
        out.square().sum().backward()
        return out.detach(), attn.logit_scale.grad.clone()

    at_clamp, _ = run(LOG_100)
    above, grad_above = run(LOG_100 + 3.0)
    below, grad_below = run(LOG_100 - 0.5)
    assert torch.equal(above, at_clamp)
    assert relative_error(below, at_clamp) > 1e-3  # the scale does matter below the clamp
    assert torch.count_nonzero(grad_above) == 0 and torch.count_nonzero(grad_below) == 3  # clamped: no gradient


@pytest.mark.parametrize("window,pretrained", [(8, 0), (16, 12), (24, 12), (12, 6), (7, 0), (3, 2), (1, 0), (2, 1)])
def test_coordinates_equal_the_official_buffer(window, pretrained):
    # timm builds the official relative_coords_table (with the same guard against 0 / 0 for windows of 1).
    attention = timm.models.swin_transformer_v2.WindowAttention
    reference = attention(8, (window, window), 2, pretrained_window_size=(pretrained, pretrained))
    scale = pretrained if pretrained > 0 else window
    coords = log_spaced_coords((window, window), (scale, scale), torch.float32, CPU)
    assert torch.equal(coords, reference.relative_coords_table.view(-1, 2))
    assert torch.equal(
        relative_position_index((window, window), (window, window), CPU), reference.relative_position_index.view(-1)
    )


def test_window_transfer_is_continuous():
    """A window-8 block pretrained at window 4 gives the pretrained block's bias at every offset both know."""
    pretrained = _attention(window=4)
    transfer = WindowAttentionV2(12, 3, 8, 4, qkv_bias=True, attn_drop=0.0, proj_drop=0.0).double()
    transfer.load_state_dict(pretrained.state_dict())  # the same parameters: no table to resize
    own_window = WindowAttentionV2(12, 3, 8, 0, qkv_bias=True, attn_drop=0.0, proj_drop=0.0).double()
    own_window.load_state_dict(pretrained.state_dict())
    with torch.no_grad():
        small = pretrained.relative_position_bias((4, 4))
        big = transfer.relative_position_bias((8, 8)).view(3, 8, 8, 8, 8)[:, :4, :4, :4, :4].reshape(3, 16, 16)
        rescaled = own_window.relative_position_bias((8, 8)).view(3, 8, 8, 8, 8)[:, :4, :4, :4, :4].reshape(3, 16, 16)
    assert relative_error(big, small) < 1e-14  # the same MLP at the same coordinates (only the batch differs)
    assert relative_error(rescaled, small) > 1e-2  # without the pretrained window, offsets mean other coordinates


def test_window_12_checkpoint_into_window_16_and_24_models(tmp_path):
    """Loading needs no table resizing: V2 weights have no window-shaped parameter."""
    pretraining = perturb(swinkit.create_model("swinv2_b_192", depths=(2, 2, 2, 2), num_classes=5))
    path = tmp_path / "w12.safetensors"
    swinkit.save(pretraining, path)
    for name, window in (("swinv2_b_256", 16), ("swinv2_b_384", 24)):
        model = swinkit.create_model(name, depths=(2, 2, 2, 2), checkpoint=path)
        assert model.load_report.ok and not model.load_report.adapted and not model.load_report.reinitialized
        assert model.config.window_size == window and model.config.pretrained_window_sizes == (12, 12, 12, 6)
        assert [layer.blocks[0].attn.scale_window[0] for layer in model.layers] == [12, 12, 12, 6]
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.randn(1, 3, 96, 128))).all()


# ---------------------------------------------------------------------------------------------
# The network: parameters, initialisation, any input size, features, checkpointing
# ---------------------------------------------------------------------------------------------


def test_parameter_names_are_the_official_ones():
    model = swinkit.create_model("swinv2_test", num_classes=3)
    names = set(model.state_dict())
    block = {n[len("layers.0.blocks.0.") :] for n in names if n.startswith("layers.0.blocks.0.")}
    assert block == {
        "norm1.weight",
        "norm1.bias",
        "attn.logit_scale",
        "attn.cpb_mlp.0.weight",
        "attn.cpb_mlp.0.bias",
        "attn.cpb_mlp.2.weight",
        "attn.qkv.weight",
        "attn.q_bias",
        "attn.v_bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    }
    assert model.layers[0].blocks[0].attn.logit_scale.shape == (1, 1, 1)
    assert model.layers[2].blocks[0].attn.cpb_mlp[2].weight.shape == (2, 512)
    merge = model.layers[0].downsample
    assert merge.reduction.weight.shape == (32, 64) and merge.norm.weight.shape == (32,)  # norm over 2C
    assert {"norm.weight", "head.weight", "patch_embed.proj.weight"} <= names
    assert len(list(model.buffers())) == 0  # coordinates, index and masks are derived, never saved


def test_v2_initialisation_makes_every_block_the_identity():
    model = swinkit.create_model("swinv2_test", extra_norm_period=2)
    block = model.layers[1].blocks[1]
    assert torch.count_nonzero(block.norm1.weight) == 0 and torch.count_nonzero(block.norm2.bias) == 0
    assert torch.equal(block.norm3.weight, torch.ones(32))  # the extra main-branch norm is a normal one
    assert torch.equal(block.attn.logit_scale, torch.full((2, 1, 1), math.log(10)))
    assert torch.count_nonzero(block.attn.q_bias) == 0 and torch.count_nonzero(block.attn.v_bias) == 0
    assert torch.equal(model.layers[0].downsample.norm.weight, torch.ones(32))
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        assert torch.equal(model.layers[1].blocks[0](x), x)


@pytest.mark.parametrize("shape", [(1, 3, 17, 9), (3, 3, 64, 64), (5, 3, 130, 40), (2, 3, 3, 3)])
def test_any_size_forward_backward(shape):
    assert_forward_backward(perturb(swinkit.create_model("swinv2_test", num_classes=5)), shape, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    model = perturb(swinkit.create_model("swinv2_test", num_classes=4)).eval()
    x = torch.randn(2, 3, 97, 61)
    with torch.no_grad():
        reference = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 4)
    assert relative_error(out, reference) < 0.05


def test_full_size_bfloat16_any_size():
    model = swinkit.create_model("swinv2_t").to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 225, 300, dtype=torch.bfloat16))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_forward_features_and_features_only():
    model = perturb(swinkit.create_model("swinv2_test", num_classes=4)).double().eval()
    x = torch.randn(2, 3, 72, 56, dtype=torch.float64)
    with torch.no_grad():
        maps = model.forward_features(x)
        assert [tuple(m.shape) for m in maps] == [(2, 16, 18, 14), (2, 32, 9, 7), (2, 64, 5, 4), (2, 128, 3, 2)]
        assert torch.allclose(model.forward_head(maps[-1].permute(0, 2, 3, 1)), model(x), rtol=0, atol=1e-12)

    backbone = swinkit.create_model("swinv2_test", features_only=True, out_indices=(1, 3)).eval()
    names = set(backbone.state_dict())
    assert not any(n.startswith(("head.", "norm.")) for n in names) and {"norm1.weight", "norm3.weight"} <= names
    with torch.no_grad():
        assert [tuple(o.shape) for o in backbone(torch.randn(1, 3, 100, 150))] == [(1, 32, 13, 19), (1, 128, 4, 5)]


def test_grad_checkpointing_gives_same_gradients():
    model = spread_logit_scales(perturb(swinkit.create_model("swinv2_test", num_classes=3, extra_norm_period=1)))
    assert_checkpointing_keeps_gradients(model.double(), torch.randn(2, 3, 64, 48, dtype=torch.float64))


def test_attn_impls_agree():
    model = spread_logit_scales(perturb(swinkit.create_model("swinv2_test", num_classes=3))).double().eval()
    x = torch.randn(2, 3, 72, 56, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        model.set_attn_impl("sdpa")
        assert relative_error(model(x), reference) < 1e-12


def test_without_qkv_bias():
    model = swinkit.create_model("swinv2_test", qkv_bias=False, num_classes=2).eval()
    assert not any(n.endswith(("q_bias", "v_bias")) for n in model.state_dict())
    assert infer_config(model.state_dict())["qkv_bias"] is False
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_no_weight_decay_covers_the_position_bias_mlp_and_logit_scale():
    model = swinkit.create_model("swinv2_test", ape=True)
    names = model.no_weight_decay()
    assert "layers.0.blocks.0.attn.logit_scale" in names and "layers.3.blocks.1.attn.cpb_mlp.0.weight" in names
    assert "absolute_pos_embed" in names and "layers.0.blocks.0.attn.qkv.weight" not in names


def test_inferred_geometry_of_files_without_buffers():
    assert infer_config(swinkit.create_model("swinv2_test").state_dict())["window_size"] == 8  # 256 px, window 8
    pretraining = infer_config(swinkit.create_model("swinv2_test", num_classes=21841).state_dict())
    assert (pretraining["img_size"], pretraining["window_size"]) == (192, 12)
    assert infer_config(swinkit.create_model("swinv2_test", extra_norm_period=2).state_dict())["extra_norm_period"] == 2


# ---------------------------------------------------------------------------------------------
# The huge and giant models (Sec. 3.6)
# ---------------------------------------------------------------------------------------------


def test_huge_and_giant_params_flops_and_forward_on_meta():
    """Built without memory on the meta device: sizes, FLOPs and a checkpointed training step's shapes."""
    for name, params, gflops in (("swinv2_h", 658e6, 85.75), ("swinv2_g", 3.0e9, 370.74)):
        with torch.device("meta"):
            model = swinkit.create_model(name)
        assert swinkit.count_parameters(model) == pytest.approx(params, rel=0.005)
        assert swinkit.flops(model, (3, 192, 192)).total / 1e9 == pytest.approx(gflops, abs=0.01)
        blocks = [(i, j, block) for i, layer in enumerate(model.layers) for j, block in enumerate(layer.blocks)]
        norms = [(i, j) for i, j, block in blocks if isinstance(block.norm3, torch.nn.LayerNorm)]
        assert norms == [(2, j) for j in range(5, model.config.depths[2], 6)]
        model.set_grad_checkpointing(True)
        out = model(torch.randn(2, 3, 192, 192, device="meta"))
        out.sum().backward()
        assert out.shape == (2, 1000) and model.layers[2].blocks[0].attn.cpb_mlp[0].weight.grad.shape == (512, 2)


@pytest.mark.slow
def test_huge_forward_with_grad_checkpointing():
    model = swinkit.create_model("swinv2_h", num_classes=10)
    model.set_grad_checkpointing(True)
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 10) and out.requires_grad and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_checkpoint_of_the_other_family_is_named(tmp_path):
    v1, v2 = swinkit.create_model("swin_test"), swinkit.create_model("swinv2_test")
    torch.save({"model": v1.state_dict()}, tmp_path / "v1.pth")
    torch.save({"model": v2.state_dict()}, tmp_path / "v2.pth")
    with pytest.raises(CheckpointError, match=r"v1\.pth is a Swin V1 checkpoint but the model is Swin V2"):
        swinkit.load_checkpoint(v2, tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match=r"v2\.pth is a Swin V2 checkpoint but the model is Swin V1"):
        swinkit.load_checkpoint(v1, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match="Swin V1 checkpoint"):
        swinkit.create_model("swinv2_test", checkpoint=tmp_path / "v1.pth")


def test_bad_configs_and_images():
    with pytest.raises(ValueError, match="SwinTransformerV2 builds Swin V2 configs; got family 'v1'"):
        SwinTransformerV2(swinkit.get_config("swin_test"))
    with pytest.raises(ValueError, match="SwinTransformer builds Swin V1 configs; got family 'v2'"):
        swinkit.model.SwinTransformer(swinkit.get_config("swinv2_test"))
    with pytest.raises(ValueError, match="pretrained_window_sizes"):
        swinkit.get_config("swinv2_test", pretrained_window_sizes=(12, 6))
    model = swinkit.create_model("swinv2_test")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


def test_window_change_on_load_takes_the_files_windows_as_pretrained(tmp_path):
    from swinkit.checkpoint.convert import export_state_dict

    source = swinkit.create_model("swinv2_test")
    torch.save({"model": export_state_dict(source.state_dict(), source.config, "official")}, tmp_path / "v2.pth")
    bigger = source.config.window_size * 2
    model = swinkit.create_model("swinv2_test", window_size=bigger, checkpoint=tmp_path / "v2.pth")
    expected = tuple(swinkit.model.stage_window(source.config, i) for i in range(len(source.config.depths)))
    assert model.config.pretrained_window_sizes == expected and model.load_report.ok
    assert [f"pretrained_window_sizes {expected}" in item for item in model.load_report.adapted] == [True]
    # The same without a preset name: the file's architecture, its window overridden (was (0, 0, 0, 0), unsaid)
    unnamed = swinkit.create_model(window_size=bigger, checkpoint=tmp_path / "v2.pth")
    assert unnamed.config.pretrained_window_sizes == expected
    assert [f"pretrained_window_sizes {expected}" in item for item in unnamed.load_report.adapted] == [True]
    explicit = swinkit.create_model(
        "swinv2_test", window_size=bigger, pretrained_window_sizes=(0, 0, 0, 0), checkpoint=tmp_path / "v2.pth"
    )
    assert explicit.config.pretrained_window_sizes == (0, 0, 0, 0)
