"""int8 dynamic quantization (opt-in): which layers, their arithmetic, batch independence, entry points."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

import swinkit
from helpers import perturb, relative_error, write_digit_folder
from swinkit import native
from swinkit.bench import build, check_contender, int8_model, run_bench
from swinkit.checkpoint.native import save
from swinkit.cli import main
from swinkit.evaluate import evaluate_checkpoint
from swinkit.export import export
from swinkit.predict import predict
from swinkit.quantize import LEVELS, Int8Linear, quantize_dynamic

VARIANTS = ["swin_test", "swinv2_test"]


def _model(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return perturb(swinkit.create_model(name, **{"num_classes": 5, **overrides}), scale=0.05).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_the_blocks_and_mergings_linears_become_int8_and_the_original_stays_float(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    quantized = quantize_dynamic(model)
    int8 = {n for n, m in quantized.named_modules() if isinstance(m, Int8Linear)}
    expected = set()
    for s, layer in enumerate(model.layers):
        expected |= {f"layers.{s}.blocks.{b}.{part}" for b in range(len(layer.blocks))
                     for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}  # fmt: skip
        expected |= {f"layers.{s}.downsample.reduction"} if layer.downsample is not None else set()
    assert int8 == expected
    floats = {n for n, m in quantized.named_modules() if type(m) is nn.Linear}
    assert "head" in floats and all(n == "head" or ".cpb_mlp." in n for n in floats)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_int8_linear_is_per_token_int8_times_per_channel_int8():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    x = torch.randn(3, 7, 40) * torch.logspace(-2, 2, 7)[:, None]  # tokens of very different ranges
    quantized = Int8Linear(linear)
    # The same arithmetic in float64, step by step: weights per output row, inputs per token.
    weight = linear.weight.detach().double()
    weight_scale = weight.abs().amax(1) / LEVELS
    weight_int = torch.round(weight / weight_scale[:, None])
    rows = x.double().reshape(-1, 40)
    row_scale = rows.abs().amax(1, keepdim=True) / LEVELS
    expected = (torch.round(rows / row_scale) @ weight_int.t()) * row_scale * weight_scale + linear.bias.double()
    with torch.no_grad():
        out = quantized(x)
    assert out.shape == (3, 7, 24) and out.dtype == torch.float32
    assert relative_error(out.reshape(-1, 24), expected) < 1e-6
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight_int8.abs().max() <= LEVELS
    # Per token, the error is a small fraction of each token's own output, whatever its range.
    with torch.no_grad():
        reference = linear(x)
    for token in range(7):
        assert relative_error(out[:, token], reference[:, token]) < 0.02
    with pytest.raises(ValueError, match="Int8Linear takes float32 CPU inputs, got torch.float64"):
        quantized(x.double())


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_native_passes_compute_what_the_pytorch_operations_do(with_bias, monkeypatch):
    if native.kernel() is None:
        pytest.skip(f"no native library here: {native.status()}")
    torch.manual_seed(0)
    linear = Int8Linear(nn.Linear(40, 24, bias=with_bias))
    wide = torch.randn(9, 56) * torch.logspace(-3, 3, 9)[:, None]
    wide[1] = 0.0  # an all-zero token
    wide[4, 5], wide[6, 0], wide[7, 3] = float("inf"), float("nan"), -float("inf")
    x = wide[:, :40]  # rows 56 floats apart
    residual = torch.randn(9, 24)
    quantized, scale = native.quantize_rows(x)
    expected_scale = x.abs().amax(1, keepdim=True).clamp_min(1e-30) / LEVELS
    finite = torch.tensor([True, True, True, True, False, True, False, False, True])
    assert torch.equal(scale[finite], expected_scale[finite]) and scale[~finite].isnan().all()
    assert torch.equal(quantized[finite], torch.round(x[finite] / expected_scale[finite]).to(torch.int8))
    assert torch.equal(quantized[1], torch.zeros(40, dtype=torch.int8))
    with torch.no_grad():
        fast = linear(x, residual=residual)
        monkeypatch.setattr(native, "ENABLED", False)
        assert native.quantize_rows(x) is None
        written = linear(x, residual=residual)
    # Bit for bit: one unit in the last place would move int8 rounding in the layers after.
    assert torch.equal(fast[finite], written[finite])
    assert fast[~finite].isnan().all() and written[~finite].isnan().all()  # as a float product would be


@pytest.mark.parametrize("name", VARIANTS)
def test_an_images_int8_logits_do_not_depend_on_its_batch_or_the_path(name):
    model = _model(name)
    quantized = quantize_dynamic(model)
    reference = copy.deepcopy(quantized)
    reference.set_attn_impl("reference")
    for size in ((64, 64), (33, 71)):  # (33, 71): padded windows in every stage
        x = torch.randn(5, 3, *size)
        with torch.no_grad():
            batch = quantized(x)  # split over the image-parallel workers, in chunks
            alone = torch.cat([quantized(image[None]) for image in x])
            written = reference(x)  # the blocks as written: whole batch, padded maps, other token order
            floats = model(x)
        assert relative_error(batch, alone) < 1e-5  # per-token: the batch and its split do not matter
        _assert_same_but_for_int8_rounding(batch, written)
        assert 1e-4 < relative_error(batch, floats) < 0.05  # quantized, and close


def _assert_same_but_for_int8_rounding(found: torch.Tensor, expected: torch.Tensor) -> None:
    """The same logits but where float rounding moved a value across an int8 rounding boundary.

    The two paths compute their float parts (attention, norms, GELU) in different orders; a value
    one unit in the last place apart on either side of an int8 rounding boundary rounds to
    neighbouring integers, and in these 32-channel test models that moves an image's logits by up
    to about 3%. How often depends on the CPU: where both float paths agree bit for bit (an
    AVX-512 machine, stop 40) every image matched to 1e-7; on an AVX2 one two images in five moved
    by 1-3%. A wrong int8 path (another scale, per-tensor rows, a lost bias) moves them far more."""
    errors = [relative_error(a[None], b[None]) for a, b in zip(found, expected, strict=True)]
    assert max(errors) < 0.05, errors


@pytest.mark.parametrize("name", VARIANTS)
def test_int8_models_compile_without_graph_breaks(name):
    """torch.compile of an int8 model: one graph (fullgraph) with a dynamic batch, int8 products as
    ``torch._int_mm`` and the attention as the native kernel's operator, and the eager int8 logits."""
    graphs = []

    def recording_backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        targets = [node.target for node in graph.graph.nodes]
        graphs.append((targets.count(torch._int_mm), targets.count(torch.ops.swinkit.window_attention)))
        return graph.forward

    torch._dynamo.reset()
    # Head size 32, as in every published configuration: the native kernel's.
    quantized = quantize_dynamic(_model(name, embed_dim=32, num_heads=(1, 2, 4, 8), window_size=7))
    compiled = torch.compile(quantized, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        for batch in (3, 5):  # 72 x 56: padding in stages 1-2
            x = torch.randn(batch, 3, 72, 56)
            _assert_same_but_for_int8_rounding(compiled(x), quantized(x))  # float passes of its own
    attention = 8 if native.built() else 0
    assert graphs == [(8 * 4 + 3, attention)] * 2  # 4 linears per block, 3 mergings; static, then dynamic batch
    torch._dynamo.reset()


def test_a_compiled_int8_linear_computes_what_the_native_passes_compute():
    """The int8 passes alone, where the float inputs are the same: compiled (PyTorch operations,
    rounded as the native passes round) and eager (native) agree bit for bit, with and without the
    residual, at any row count."""
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(96, 64))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (200, 392, 1000):
            x = torch.randn(rows, 96) * torch.rand(rows, 1) * 5  # rows of different ranges
            residual = torch.randn(rows, 64)
            assert torch.equal(compiled(x), layer(x)) and torch.equal(compiled(x, residual), layer(x, residual))
    torch._dynamo.reset()


def test_int8_models_are_refused_where_float_weights_are_needed(tmp_path):
    model = _model("swin_test")
    quantized = quantize_dynamic(model)
    with pytest.raises(ValueError, match="cannot save an int8-quantized model .* quantize after loading"):
        save(quantized, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="cannot export an int8-quantized model"):
        export(quantized, tmp_path / "q.onnx")
    assert not (tmp_path / "q.safetensors").exists() and not (tmp_path / "q.onnx").exists()
    with pytest.raises(ValueError, match="already int8-quantized"):
        quantize_dynamic(quantized)
    with pytest.raises(ValueError, match="starts from float32 weights; patch_embed.proj.weight is torch.float64"):
        quantize_dynamic(copy.deepcopy(model).double())
    with pytest.raises(ValueError, match="for CPU inference; patch_embed.proj.weight is on meta"):
        quantize_dynamic(copy.deepcopy(model).to("meta"))
    with pytest.raises(TypeError, match="quantize_dynamic needs a model .* got str"):  # was an AttributeError
        quantize_dynamic("swin_t")
    # Training one ran without a word, its int8 weights never changing; it stays in eval mode, a copy too.
    restored = pickle.loads(pickle.dumps(quantized))  # a copy sent to a worker process: the refusal pickles
    parts = (quantized.layers[0], quantized.layers[1].blocks[0].mlp, quantized.layers[0].blocks[1].attn.qkv)
    for trained in (quantized, nn.Sequential(quantized), copy.deepcopy(quantized), restored, *parts):
        with pytest.raises(ValueError, match="an int8-quantized model is for inference: .* train the float model"):
            trained.train()
    assert not any(module.training for module in quantized.modules())
    assert quantized.eval() is quantized and not quantized.training


def test_predict_eval_and_the_cli_take_int8(tmp_path, capsys):
    folder = write_digit_folder(tmp_path / "digits", classes=(0, 1), per_class=3)
    checkpoint = tmp_path / "model.safetensors"
    save(_model("swin_test", img_size=32, num_classes=2), checkpoint, class_names=["digit0", "digit1"])

    def probabilities(results):
        return torch.tensor(
            [[p["probability"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in results]
        )

    plain, int8 = (probabilities(predict([folder], checkpoint, topk=2, int8=flag)) for flag in (False, True))
    assert plain.shape == int8.shape == (6, 2)
    assert not torch.equal(plain, int8) and torch.allclose(plain, int8, atol=2e-2)
    metrics = {flag: evaluate_checkpoint(folder, checkpoint, workers=0, int8=flag) for flag in (False, True)}
    assert metrics[True]["images"] == metrics[False]["images"] == 6
    assert metrics[True]["loss"] == pytest.approx(metrics[False]["loss"], abs=2e-2)

    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--int8", "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    assert torch.allclose(probabilities(from_cli), int8, atol=1e-6)
    assert main(["eval", "--data", str(folder), "--checkpoint", str(checkpoint), "--int8", "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out

    for bad in ({"device": "meta"}, {"amp": "bf16"}):
        with pytest.raises(ValueError, match="int8 quantizes a checkpoint's linear layers for the CPU"):
            predict([folder], checkpoint, int8=True, **bad)
    with pytest.raises(ValueError, match="it takes no .onnx or .pt2 file"):
        predict([folder], tmp_path / "model.onnx", int8=True)


@pytest.mark.parametrize("peer", ["timm", "torchvision", "hf"])
@pytest.mark.parametrize("model_name", ["swin_t", "swinv2_t"])
def test_the_peers_int8_variants_quantize_the_linears_their_forward_calls(peer, model_name):
    # torchvision's Swin (qkv, proj) and timm's SwinV2 (qkv) hand linear weights to F.linear as
    # tensors; torch.ao's quantized layer has none, and `bench --int8` once failed on them after
    # timing every other contender. Those layers stay float32; every MLP layer is quantized.
    from torch.ao.nn.quantized.dynamic import Linear as AoLinear

    model = build(peer, model_name, num_classes=10).eval()
    size = 256 if model_name == "swinv2_t" else 224
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(image[:1])
    quantized = int8_model(peer, copy.deepcopy(model), image)
    with torch.no_grad():
        got = quantized(image[:1])
    assert relative_error(got, expected) < 0.1
    int8_layers = sum(isinstance(m, AoLinear) for m in quantized.modules())
    assert int8_layers >= 2 * 12  # at least both MLP layers of each of the 12 blocks


def test_bench_times_int8_variants_for_inference_only():
    report = run_bench("swin_test", batch=2, train_batch=2, rounds=1, int8=True)
    assert [(r["mode"], r["contender"]) for r in report["rows"]] == [
        ("inference", "swinkit"),
        ("inference", "swinkit+int8"),
        ("training", "swinkit"),
    ]
    plain, int8 = report["rows"][:2]
    assert int8["images_per_second"] > 0 and "gemm_fraction" in plain and "gemm_fraction" not in int8
    check_contender("timm+int8", "swin_t")
    with pytest.raises(ValueError, match=r"unknown variant 'int4' in 'swinkit\+int4'; accepted: .*\+int8"):
        check_contender("swinkit+int4", "swin_t")
    with pytest.raises(ValueError, match="--int8: int8 contenders run on the CPU from float32"):
        run_bench("swin_test", batch=1, rounds=1, dtype="bfloat16", int8=True)
