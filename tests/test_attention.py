"""Every attention implementation against the reference: outputs and gradients, V1 and V2."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swinkit
from helpers import (
    assert_bfloat16_as_close_as_the_reference,
    assert_tables_cached_under_inference_mode_serve_training,
    outputs_and_gradients,
    perturb,
    relative_error,
)
from swinkit import fast, native
from swinkit.attention import ATTENTION_IMPLS
from swinkit.fast import window_order

HAS_TRITON = importlib.util.find_spec("triton") is not None  # ships with torch on Linux x86-64 only
# These models are on the CPU, where attn_impl="triton" runs only in Triton's interpreter, which
# conftest.py turns on where there is no GPU; with one, tests/test_gpu.py covers it on CUDA tensors.
INTERPRETED = HAS_TRITON and not torch.cuda.is_available()
FAST_IMPLS = [impl for impl in ATTENTION_IMPLS if impl != "reference" and (impl != "triton" or INTERPRETED)]
# 64x64: every map a multiple of the window (shifted and unshifted blocks, stage 4 clamped);
# 33x71: padding to the window in every stage, odd maps before merging.
SHAPES = [(2, 3, 64, 64), (3, 3, 33, 71)]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_and_gradients_match_reference_in_training(impl, variant, shape, dtype):
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).to(dtype).train()
    x = torch.randn(shape, dtype=dtype)
    expected, expected_input_grad, expected_grads = outputs_and_gradients(model, "reference", x)
    out, input_grad, grads = outputs_and_gradients(model, impl, x)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(out, expected) < tolerance
    assert relative_error(input_grad, expected_input_grad) < tolerance
    for name, grad in grads.items():
        reference = expected_grads[name]
        assert torch.allclose(grad, reference, rtol=tolerance, atol=tolerance * max(1.0, reference.abs().max())), name


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_detection_window_rule_matches_reference(impl, variant):
    # Dense backbones keep the window and the shift on maps smaller than the window (the official
    # detection rule): at 33 x 71 stage 3's 3 x 5 map and stage 4's 2 x 3 map are padded to whole
    # 4 x 4 windows and shifted by 2, which the classification rule never does.
    model = perturb(swinkit.create_model(variant, num_classes=4, always_shift=True), scale=0.05).double().train()
    x = torch.randn(SHAPES[1], dtype=torch.float64)
    expected, expected_input_grad, expected_grads = outputs_and_gradients(model, "reference", x)
    out, input_grad, grads = outputs_and_gradients(model, impl, x)
    assert relative_error(out, expected) < 1e-12 and relative_error(input_grad, expected_input_grad) < 1e-12
    assert all(relative_error(grads[name], expected_grads[name]) < 1e-10 for name in grads)


def _stochastic_depth_model(variant: str, rate: float) -> nn.Module:
    """A float64 training model with stochastic depth, serial: its draws come from the global generator."""
    model = perturb(swinkit.create_model(variant, num_classes=4, drop_path_rate=rate), scale=0.05).double().train()
    model.image_parallel = False
    return model


def _run_seeded(model, impl, x, seed):
    torch.manual_seed(seed)
    return outputs_and_gradients(model, impl, x)


@pytest.mark.parametrize("impl", [impl for impl in FAST_IMPLS if impl in ("fused", "triton")])
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_stochastic_depth_matches_reference(impl, variant):
    # The fused path draws each residual's mask before its branch and skips the dropped images; the
    # triton path's V1 norm kernels add the dropped-or-scaled branch inside the second norm. The same
    # draws in the same order as the reference blocks give the same images dropped.
    model = _stochastic_depth_model(variant, 0.5)
    x = torch.randn(4, 3, 33, 38, dtype=torch.float64)  # padded both ways; small, as triton's interpreter is slow
    expected, expected_input_grad, expected_grads = _run_seeded(model, "reference", x, 3)
    out, input_grad, grads = _run_seeded(model, impl, x, 3)
    # Other draws drop other images (so agreeing at seed 3 is not agreeing on nothing dropped); shown
    # with the reference path, as a run of triton's interpreter is a third of the test's time.
    assert relative_error(_run_seeded(model, "reference", x, 4)[0], expected) > 1e-3
    assert relative_error(out, expected) < 1e-12 and relative_error(input_grad, expected_input_grad) < 1e-12
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], rtol=1e-12, atol=1e-12), name


def test_stochastic_depth_computes_a_branch_for_the_images_it_keeps_only():
    block = swinkit.create_model("swin_test").layers[0].blocks[1].train()
    block.drop_path.p = 0.5
    tokens, C = 5, 4
    x = torch.randn(2 * tokens, C, dtype=torch.float64, requires_grad=True)
    images_seen = []

    def branch(t):
        images_seen.append(t.shape[0] // tokens)
        return t.tanh() * torch.arange(1.0, C + 1, dtype=t.dtype)

    kept_counts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        scales = swinkit.parallel.drop_path_scales(x.detach().view(2, tokens, C), 0.5)  # the draws the block makes
        expected = x + (branch(x).view(2, tokens, C) * scales).view_as(x)
        images_seen.clear()
        torch.manual_seed(seed)
        out = fast._residual(block, x, branch, tokens)
        kept = int(scales.count_nonzero())
        kept_counts.add(kept)
        # Dropped images never reach the branch, except one when all are: see the next test.
        assert images_seen == [max(kept, 1)]
        assert relative_error(out, expected) < 1e-15
        weights = torch.randn_like(out)
        (gradient,) = torch.autograd.grad(out, x, weights)
        (expected_gradient,) = torch.autograd.grad(expected, x, weights)
        assert relative_error(gradient, expected_gradient) < 1e-15
    assert kept_counts == {0, 1, 2}  # both dropped, one, none
    block.attn.proj_drop.p = 0.1  # dropout would draw between: the branch runs on every image first
    images_seen.clear()
    fast._residual(block, x, branch, tokens)
    assert images_seen == [2]


@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_branches_that_drop_every_image_still_give_their_parameters_zero_gradients(variant):
    # As in the reference, where the branch is multiplied by zero: a gradient of None would make
    # AdamW skip the parameter (no weight decay or momentum step) and DDP wait for it.
    model = _stochastic_depth_model(variant, 0.95)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected, _, expected_grads = _run_seeded(model, "reference", x, 0)
    out, _, grads = _run_seeded(model, "fused", x, 0)  # every .grad is cloned: None would raise
    assert relative_error(out, expected) < 1e-12
    zero = [name for name, grad in grads.items() if not grad.any()]
    assert any(".mlp." in name for name in zero)  # at 0.95 some branches drop both images
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], rtol=1e-12, atol=1e-12), name


def test_gradient_checkpointing_recomputes_the_same_kept_images():
    # torch.utils.checkpoint restores the random state for the recomputation: the same images are kept.
    model = _stochastic_depth_model("swin_test", 0.5)  # serial, as checkpointing keeps a batch
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    plain = _run_seeded(model, "fused", x, 1)
    model.set_grad_checkpointing(True)
    checkpointed = _run_seeded(model, "fused", x, 1)
    assert relative_error(checkpointed[0], plain[0]) < 1e-12
    for name, grad in checkpointed[2].items():
        assert torch.allclose(grad, plain[2][name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_eval_outputs_match_reference(impl, variant):
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).eval()
    # 5 images: the fused no-grad path runs in chunks of images (too slow for interpreted Triton).
    for shape in SHAPES if impl == "triton" else [*SHAPES, (5, 3, 160, 96)]:
        x = torch.randn(shape)
        with torch.no_grad():
            model.set_attn_impl("reference")
            expected = model(x)
            model.set_attn_impl(impl)
            assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fused_chunks_and_whole_batch_agree_under_inference_mode():
    model = perturb(swinkit.create_model("swin_test", num_classes=4), scale=0.05).double().eval()
    model.set_attn_impl("fused")
    x = torch.randn(40, 3, 64, 64, dtype=torch.float64)  # several chunks of 4096 tokens in stage 1
    with torch.inference_mode():
        chunked = model(x)
    with torch.enable_grad():
        whole = model(x)  # grad mode: one chunk
    assert relative_error(chunked, whole.detach()) < 1e-13


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_tables_cached_under_inference_mode_serve_a_later_training_step(impl):
    # `swinkit bench` (and a user's eval-then-train loop) runs inference first.
    model = perturb(swinkit.create_model("swin_test", num_classes=4), scale=0.05)
    assert_tables_cached_under_inference_mode_serve_training(model, impl, torch.randn(2, 3, 36, 44))


def test_model_built_under_inference_mode_runs_the_fused_path():
    # Inference tensors have no version counter, which the fused path's bias cache keys on.
    with torch.inference_mode():
        model = perturb(swinkit.create_model("swin_test", num_classes=4)).eval()
        x = torch.randn(2, 3, 64, 64)
        model.set_attn_impl("fused")
        fused = model(x)
        model.set_attn_impl("reference")
        assert relative_error(fused, model(x)) < 1e-5


def test_fused_bias_cache_follows_weight_changes():
    model = perturb(swinkit.create_model("swin_test", num_classes=4)).eval()
    model.set_attn_impl("fused")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        table = model.layers[0].blocks[1].attn.relative_position_bias_table
        table.add_(torch.randn_like(table))  # not a constant: softmax ignores a uniform shift
        after = model(x)
        model.set_attn_impl("reference")
        assert torch.allclose(after, model(x), atol=1e-5) and not torch.allclose(after, before, atol=1e-4)


def test_fused_caches_follow_parameters_replaced_by_assignment():
    # load_state_dict(assign=True) puts new tensors in place of the parameters, each with a version
    # counter of its own (0 for freshly made ones, for two loads in a row).
    model, fresh = (swinkit.create_model("swin_test", num_classes=4).eval() for _ in range(2))
    x = torch.randn(2, 3, 64, 64)
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        state = {name: 0.1 * torch.randn(v.shape, generator=generator) for name, v in model.state_dict().items()}
        assert all(value.is_floating_point() for value in model.state_dict().values())  # no index buffers saved
        model.load_state_dict(state, assign=True)
        assert model.layers[0].blocks[0].attn.qkv.weight._version == 0  # the case at hand
        fresh.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(model(x), fresh(x), rtol=1e-5, atol=1e-5)
        fresh = swinkit.create_model("swin_test", num_classes=4).eval()  # nothing cached for the next


PRECISIONS = ["float32"] + (["bfloat16"] if fast.ONEDNN_BFLOAT16 else [])  # bfloat16: its packed weights


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("optimizer", ["build_optimizer", "sgd"])
def test_a_forward_after_fused_optimizer_steps_uses_the_new_weights(precision, optimizer):
    # What validation between training epochs does. A fused optimizer writes the parameters without
    # counting it in their version counters, which the packed linear weights and the position-bias
    # cache are keyed by; a no-grad forward then ran on the weights of before the steps.
    from swinkit.train.optim import build_optimizer

    model = perturb(swinkit.create_model("swin_test", num_classes=4), scale=0.05)
    if optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, fused=True)
    else:
        optimizer = build_optimizer(model, 0.05, None, lr=0.05)
    assert all(group["fused"] for group in optimizer.param_groups)  # what this test is about
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")

    def evaluate(model: nn.Module) -> torch.Tensor:
        with torch.no_grad(), autocast:
            return model.eval()(x).float()

    evaluate(model)  # fills the caches
    for _ in range(2):
        F.cross_entropy(model.train()(x), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    fresh = swinkit.create_model("swin_test", num_classes=4)
    fresh.load_state_dict(model.state_dict())  # the same weights, nothing cached
    tolerance = 1e-5 if precision == "float32" else 0.0  # bfloat16: both round the same way
    torch.testing.assert_close(evaluate(model), evaluate(fresh), rtol=tolerance, atol=tolerance)


def test_caches_of_weights_written_without_their_version_counter_are_renewed_on_demand():
    # FSDP gathers the trained shards into the same unsharded storage each forward without moving
    # the version counters: validation under --fsdp ran on packed weights and position biases of an
    # earlier epoch (val_loss differed run to run). Written through .data here, which is uncounted too.
    # An optimizer step over sharded parameters, and the training loop before each validation, renew them.
    model = perturb(swinkit.create_model("swin_test", num_classes=4), scale=0.05).eval()
    fresh = swinkit.create_model("swin_test", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)  # fills the caches
        versions = [p._version for p in model.parameters()]
        for p in model.parameters():
            p.data.mul_(1.5)
        assert [p._version for p in model.parameters()] == versions  # the case at hand
        fresh.load_state_dict(model.state_dict())
        expected = fresh(x)
        assert not torch.allclose(model(x), expected, atol=1e-3)  # stale within a cache generation
    # A step over other, plain parameters (a head trained beside a frozen Swin) keeps them: rebuilding
    # at every step made such a Swin's no-grad forward twice as slow.
    generation = fast._generation
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).step()
    assert fast._generation == generation
    fast.forget_cached_weights()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_eval_is_deterministic_with_attention_dropout(impl):
    model = swinkit.create_model("swin_test", num_classes=4, attn_drop_rate=0.5, drop_rate=0.3, drop_path_rate=0.3)
    model.set_attn_impl(impl)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout is really on in training


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_training_with_dropout_and_drop_path_runs_and_learns(impl):
    model = swinkit.create_model("swin_test", num_classes=4, attn_drop_rate=0.1, drop_rate=0.1, drop_path_rate=0.2)
    model.set_attn_impl(impl)
    x, y = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2


def test_window_order_is_a_permutation_of_the_shifted_windows():
    H, W, window, shift = 6, 9, (3, 3), (1, 1)
    index, inverse, padded = window_order(H, W, window, shift, torch.device("cpu"))
    assert padded is None and sorted(index.tolist()) == list(range(H * W))
    x = torch.arange(H * W).view(1, H, W, 1).float()
    shifted = torch.roll(x, (-1, -1), (1, 2))
    expected = swinkit.model.window_partition(shifted, window).flatten()
    assert torch.equal(x.flatten()[index], expected)
    assert torch.equal(x.flatten()[index][inverse], x.flatten())


@pytest.mark.parametrize("size", [(6, 9), (7, 5)])  # (7, 5): padded windows
def test_window_gathers_have_exact_first_and_second_gradients(size):
    index, inverse, pad = window_order(*size, (3, 3), (1, 1), torch.device("cpu"))
    assert (pad is not None) == (size == (7, 5))
    x = torch.randn(2, size[0] * size[1], 3, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(2, index.numel(), 3, dtype=torch.float64, requires_grad=True)

    def to_windows(x):
        return fast.ToWindows.apply(x, index, inverse, pad).square()  # squared: a second derivative to check

    def to_map(tokens):
        return fast.ToMap.apply(tokens, index, inverse, pad, None).square()

    def to_map_shaped(tokens):  # the block's own call: the (B, H, W, C) map, a tensor of its own
        return fast.ToMap.apply(tokens, index, inverse, pad, (2, *size, 3)).square()

    assert torch.equal(to_windows(x), x[:, index].square()) and torch.equal(to_map(tokens), tokens[:, inverse].square())
    shaped = fast.ToMap.apply(tokens, index, inverse, pad, (2, *size, 3))
    assert shaped._base is None and torch.equal(shaped, tokens[:, inverse].view(2, *size, 3))
    for function, value in ((to_windows, x), (to_map, tokens), (to_map_shaped, tokens)):
        assert torch.autograd.gradcheck(function, (value,)) and torch.autograd.gradgradcheck(function, (value,))


def test_window_order_marks_padding():
    index, inverse, padded = window_order(5, 5, (3, 3), (0, 0), torch.device("cpu"))
    assert index.numel() == 36 and int(padded.sum()) == 11
    assert sorted(index[~padded].tolist()) == list(range(25)) and inverse.numel() == 25


@pytest.mark.skipif(not fast.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linears_match_float64(gelu, with_bias):
    x = torch.randn(5, 49, 96, dtype=torch.float64)
    weight, bias = torch.randn(288, 96, dtype=torch.float64) / 10, torch.randn(288, dtype=torch.float64)
    bias = bias if with_bias else None
    expected = F.linear(x, weight, bias)
    expected = F.gelu(expected) if gelu else expected  # exact (erf) GELU, as the model's MLP
    with torch.no_grad():
        assert fast._onednn(x.float())
        out = fast._linear(x.float(), weight.float(), bias if bias is None else bias.float(), gelu=gelu)
    assert out.dtype == torch.float32 and relative_error(out.double(), expected) < 1e-6


@pytest.mark.skipif(not fast.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_onednn_residual_linear_matches_float64():
    linear = nn.Linear(384, 96).double()
    x, residual = torch.randn(300, 384, dtype=torch.float64), torch.randn(300, 96, dtype=torch.float64)
    expected = residual + linear(x)
    with torch.no_grad():
        out = fast._linear_into(residual.float(), x.float(), linear.float())
    assert relative_error(out.double(), expected) < 1e-6


@pytest.mark.skipif(not fast.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mkl_input_gradient", [False, True])  # both CPU vendors' choice
def test_onednn_linear_gradients_match_float64(with_bias, mkl_input_gradient, monkeypatch):
    monkeypatch.setattr(fast, "MKL_INPUT_GRADIENT", mkl_input_gradient)
    x = torch.randn(6, 49, 96, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(288, 96, dtype=torch.float64) / 10).requires_grad_(True)
    bias = torch.randn(288, dtype=torch.float64, requires_grad=True) if with_bias else None
    upstream = torch.randn(6, 49, 288, dtype=torch.float64)
    leaves = [x, weight] + ([bias] if with_bias else [])
    expected = torch.autograd.grad((F.linear(x, weight, bias) * upstream).sum(), leaves)
    floats = [leaf.detach().float().requires_grad_(True) for leaf in leaves]
    assert fast._onednn(floats[0])
    out = fast.OneDNNLinear.apply(floats[0], floats[1], floats[2] if with_bias else None)
    assert relative_error(out.double(), F.linear(x, weight, bias)) < 1e-6
    grads = torch.autograd.grad((out * upstream.float()).sum(), floats)
    for grad, reference in zip(grads, expected, strict=True):
        assert grad.shape == reference.shape and relative_error(grad.double(), reference) < 1e-6


def test_onednn_linear_skips_gradients_nobody_asked_for():
    x = torch.randn(4, 8, requires_grad=True)
    weight, bias = torch.randn(3, 8), torch.randn(3)  # constants
    fast.OneDNNLinear.apply(x, weight, bias).sum().backward()
    assert torch.allclose(x.grad, weight.sum(0).expand(4, 8), atol=1e-6)


def test_onednn_takes_eager_float32_cpu_work_only():
    x = torch.randn(4, 8)
    assert fast._onednn(x) == fast.ONEDNN_LINEAR
    assert not fast._onednn(x.double())
    assert not fast._onednn(x.to(torch.bfloat16))
    weight = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast._onednn(x)  # F.linear under autocast picks bfloat16 as the user asked
        assert fast._linear(x, weight, None).dtype == torch.bfloat16
    torch.backends.mkldnn.enabled = False  # the user turned oneDNN off
    try:
        assert not fast._onednn(x)
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.skipif(not fast.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_packed_onednn_weights_follow_weight_changes():
    model = perturb(swinkit.create_model("swin_test", num_classes=4)).eval()
    model.set_attn_impl("fused")
    fc1 = model.layers[0].blocks[0].mlp.fc1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        packed = fast._packed_weights[fc1.weight][torch.float32][1]
        assert packed.is_mkldnn  # the no-grad path packed it
        fc1.weight.mul_(-1.5)  # in place, as load_state_dict copies
        changed = model(x)
        assert fast._packed_weights[fc1.weight][torch.float32][1] is not packed
        model.set_attn_impl("reference")
        assert relative_error(changed, model(x)) < 1e-5
    copy.deepcopy(model)  # the packed weights live outside the model: EMA copies still work


@pytest.mark.skipif(not fast.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_onednn_linear_has_second_order_gradients():
    x = torch.randn(5, 12, dtype=torch.float64)
    weight = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)

    def penalty(linear, x, weight):  # a gradient penalty: the input gradient's norm, differentiated again
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.tanh(linear(x, weight, None)).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), weight)[0]

    expected = penalty(F.linear, x, weight)
    got = penalty(fast.OneDNNLinear.apply, x.float(), weight.detach().float().requires_grad_(True))
    assert relative_error(got.double(), expected) < 1e-5


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_fused_blocks_under_autocast_keep_the_reference_dtypes(variant, grad):
    # On CUDA autocast runs LayerNorm in float32, so the residual stream a block gets is float32
    # and its projections bfloat16: the reference block returns float32 (stream + branch). Fed a
    # float32 map under CPU autocast, a block sees the same mix here. The fused path once let its
    # residual matrix product take autocast's bfloat16, which then failed to scatter back.
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).eval()
    block = model.layers[0].blocks[1]  # shifted
    x = torch.randn(2, 16, 16, 16)
    outputs = {}
    for impl in ("reference", "fused"):
        block.attn.attn_impl = impl
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[impl] = block(x)
    assert outputs["fused"].dtype == outputs["reference"].dtype == torch.float32
    assert relative_error(outputs["fused"].float(), outputs["reference"].float()) < 2e-2


@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_fused_stochastic_depth_under_autocast_adds_bfloat16_branches_to_a_float32_stream(variant):
    # A float32 residual stream under CPU autocast (an absolute position embedding, SimMIM's mask
    # token) with some images dropped: the kept images' bfloat16 branches were scattered into the
    # float32 stream by index_add, which refused the mix. The reference promotes to float32.
    model = perturb(swinkit.create_model(variant, num_classes=4, drop_path_rate=0.9), scale=0.05).train()
    block = model.layers[1].blocks[1]  # shifted, drop rate 0.39: this seed keeps some of 8 images, not all
    x = torch.randn(8, 8, 8, 32)
    outputs = {}
    for impl in ("reference", "fused"):
        block.attn.attn_impl = impl
        torch.manual_seed(3)  # the fused path draws the reference's numbers, in its order
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[impl] = block(x)
    assert outputs["fused"].dtype == outputs["reference"].dtype == torch.float32
    assert relative_error(outputs["fused"], outputs["reference"]) < 2e-2


@pytest.mark.skipif(not fast.ONEDNN_BFLOAT16, reason="no oneDNN bfloat16 linear on this CPU")
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_bfloat16_inference_packs_bfloat16_weights_and_runs_the_native_kernel(variant, monkeypatch):
    # No-grad work under CPU bfloat16 autocast: oneDNN's bfloat16 linears from weights packed once,
    # and the float32 native kernel on the widened qkv. As close to float32 as the reference path
    # under the same autocast.
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).eval()
    x = torch.randn(3, 3, 64, 64)
    calls = []
    kernel = native.window_attention
    monkeypatch.setattr(
        native, "window_attention", lambda qkv, *rest, **named: calls.append(qkv.dtype) or kernel(qkv, *rest, **named)
    )
    with torch.no_grad():
        model.set_attn_impl("reference")
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced_reference = model(x).float()
            model.set_attn_impl("fused")
            out = model(x).float()
            assert fast._onednn_bfloat16(x) and not fast._onednn(x)
        assert not fast._onednn_bfloat16(x)  # outside autocast: float32 as before
    fc1 = model.layers[0].blocks[0].mlp.fc1
    assert fast._packed_weights[fc1.weight][torch.bfloat16][1].dtype == torch.bfloat16
    if native.kernel() is not None:
        assert calls and set(calls) == {torch.bfloat16}
    assert relative_error(out, expected) < 2 * relative_error(reduced_reference, expected) + 5e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast._onednn_bfloat16(x)  # with autograd on: autocast's own F.linear
        assert not fast._onednn_bfloat16(x.double())


@pytest.mark.skipif(native.kernel() is None, reason="no native kernel on this machine")
def test_bfloat16_training_attends_through_the_native_kernel(monkeypatch):
    # Under CPU bfloat16 autocast with autograd, qkv is widened differentiably into the float32
    # kernel: its gradients reach the bfloat16 qkv linear as close as the reference path's own.
    model = perturb(swinkit.create_model("swin_test", num_classes=4), scale=0.05).train()
    calls = []
    kernel = native.window_attention

    def recording(qkv, *rest, **named):
        calls.append((qkv.dtype, qkv.requires_grad))
        return kernel(qkv, *rest, **named)

    monkeypatch.setattr(native, "window_attention", recording)
    assert_bfloat16_as_close_as_the_reference(model, "fused", torch.randn(SHAPES[1]))
    assert (torch.bfloat16, True) in calls


# Not triton: under Triton's interpreter its kernels come out wrong in bfloat16 (float16 is right,
# and so is bfloat16 compiled on a GPU, where tests/test_gpu.py checks it).
@pytest.mark.parametrize("impl", [impl for impl in FAST_IMPLS if impl != "triton"])
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_bfloat16_autocast_is_as_close_to_float32_as_the_reference_path(impl, variant):
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).train()
    assert_bfloat16_as_close_as_the_reference(model, impl, torch.randn(SHAPES[1]))


def test_auto_is_the_measured_fastest_exact_path_per_device():
    from swinkit.attention import cuda_auto_impl, resolve_impl

    assert resolve_impl("auto", torch.device("cpu")) == "fused"
    assert resolve_impl("sdpa", torch.device("cpu")) == "sdpa"  # an explicit choice stays
    assert cuda_auto_impl((9, 0), has_triton=True, half=True) == "triton"  # H100 / H200: measured in bf16
    assert cuda_auto_impl((8, 0), has_triton=True, half=True) == "triton"  # A100: the kernels compile for it
    assert cuda_auto_impl((9, 0), has_triton=True, half=False) == "reference"  # float32: not timed, spills
    assert cuda_auto_impl((7, 5), has_triton=True, half=True) == "reference"  # no bf16 tensor cores
    assert cuda_auto_impl((9, 0), has_triton=False, half=True) == "reference"


def test_per_head_attention_leaves_out_probabilities_below_the_normal_range():
    """The shift mask's -100 leaves probabilities near 4e-44; the per-head path sets them to zero,
    as a thread that flushes subnormals computes them (products with them are slow otherwise)."""
    N, heads, d = 4, 1, 2
    q = k = torch.zeros(1, N, d)  # every logit 0: masked pairs get exp(-100) / 2
    v = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1e30, 1.0], [1e30, 1.0]]).unsqueeze(0)  # tokens 2, 3 masked
    qkv = torch.cat([q, k, v], -1)
    mask = torch.zeros(1, heads, N, N)
    mask[..., :2, 2:] = mask[..., 2:, :2] = -100.0
    out = fast.heads_attention(qkv, heads, 1, mask, [1.0], cosine=False).view(N, d)
    # Not flushed, the masked tokens would add 2 * exp(-100) / 2 * 1e30 = 3.7e-14 to query 0.
    unflushed = torch.softmax(mask[0, 0].double(), -1) @ v[0].double()
    assert unflushed[0, 0] > 1e-14
    expected = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1e30, 1.0], [1e30, 1.0]])
    assert torch.equal(out, expected)
