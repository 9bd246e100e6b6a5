"""The native window-attention kernel (swinkit/csrc) against float64 attention, in the model, and its fallbacks."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import swinkit
from helpers import perturb, relative_error
from swinkit import native
from swinkit.attention import reference_attention
from swinkit.model import shift_window_mask

pytestmark = pytest.mark.skipif(native.unsupported_reason() is not None, reason=str(native.unsupported_reason()))

D = native.HEAD_SIZE


def _float64_attention(qkv, heads, bias, scales, cosine):
    """The reference seam in float64 on the kernel's layout: ``(windows, N, 3C)`` in, ``(windows, N, C)`` out."""
    windows, tokens, width = qkv.shape
    q, k, v = qkv.double().view(windows, tokens, 3, heads, D).permute(2, 0, 3, 1, 4)
    if cosine:
        q, k = F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12)
    q = q * scales.double().view(1, heads, 1, 1)
    out = reference_attention(q, k, v, bias.double() if bias.shape[0] > 1 else bias[0].double(), 0.0, False)
    return out.transpose(1, 2).reshape(windows, tokens, width // 3)


def _inputs(windows, tokens, heads, groups, spread=1.0):
    qkv = torch.randn(windows, tokens, 3 * heads * D) * spread
    bias = torch.randn(groups, heads, tokens, tokens)
    if groups > 1:  # shifted windows: the shift mask's -100 between regions
        bias = bias + torch.where(torch.rand(groups, 1, tokens, tokens) < 0.3, -100.0, 0.0)
    return qkv, bias


# Both builds run on an AVX-512 CPU; an AVX2 one runs only its own.
RUNNABLE = ["avx512", "avx2"] if native.cpu_variant() == "avx512" else [native.cpu_variant()]


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("tokens", [1, 16, 21, 25, 49, 64, 144, 256])  # 1, 4x4, 7x3 (clamped), 5x5 ... 16x16
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_kernel_matches_float64_attention(variant, tokens, cosine, groups):
    heads = 3
    qkv, bias = _inputs(8, tokens, heads, groups)
    scales = torch.tensor([10.0, 3.5, 0.7]) if cosine else torch.full((heads,), D**-0.5)
    got = native.window_attention(qkv, heads, bias, scales, cosine, variant=variant)
    assert got.shape == (8, tokens, heads * D)
    assert relative_error(got, _float64_attention(qkv, heads, bias, scales, cosine)) < 1e-6


def test_kernel_keeps_large_logits_exact():
    # Logits spread over hundreds: the softmax must subtract each row's maximum (exp would
    # overflow) and the tiny exponentials below float's range must not disturb the rest.
    qkv, bias = _inputs(4, 49, 2, 4, spread=6.0)
    scales = torch.full((2,), D**-0.5)
    expected = _float64_attention(qkv, 2, bias, scales, False)
    assert relative_error(native.window_attention(qkv, 2, bias, scales, False), expected) < 1e-6


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("tokens", [21, 49])
def test_kernel_propagates_nan_and_infinity_as_pytorch_does(variant, tokens):
    # A NaN in a query row makes that row NaN, one in a key row the whole window-head, one in a value
    # row that channel; an infinite key component makes the rows whose logit is +inf NaN and leaves
    # those with -inf finite. The kernel's vector maximum used to drop NaN logits.
    heads = 3
    qkv, bias = _inputs(4, tokens, heads, 1)
    qkv[0, 0, 5] = float("nan")  # q, head 0
    qkv[1, 3, heads * D + D + 1] = float("inf")  # k, head 1
    qkv[2, 7, 2 * heads * D + 4] = float("nan")  # v, head 0
    qkv[3, 2, heads * D + 2 * D] = float("nan")  # k, head 2
    scales = torch.full((heads,), D**-0.5)
    out = native.window_attention(qkv, heads, bias, scales, False, variant)
    expected = _float64_attention(qkv, heads, bias, scales, False)
    assert torch.equal(out.isnan(), expected.isnan())
    assert 0 < int(out[1].isnan().sum()) < tokens * D  # +inf rows only
    assert relative_error(out.nan_to_num(), expected.nan_to_num()) < 1e-6


def test_kernel_leaves_the_threads_subnormal_mode_as_it_found_it():
    # The kernel flushes subnormal floats to zero while it runs (they cost microcode assists);
    # PyTorch's operations in the same thread must see them again after it returns.
    qkv, bias = _inputs(2, 49, 2, 4)
    qkv.requires_grad_()
    tiny = torch.full((64,), 1e-39)  # subnormal in float32
    assert (tiny * 1.0).ne(0).all()
    out = native.window_attention(qkv, 2, bias, torch.full((2,), D**-0.5), False)
    assert (tiny * 1.0).ne(0).all()
    out.backward(torch.randn_like(out))
    assert (tiny * 1.0).ne(0).all() and (tiny + tiny).ne(0).all()


def _float64_gradients(qkv, heads, bias, scales, cosine, grad):
    inputs = [t.double().requires_grad_() for t in (qkv, bias, scales)]
    out = _float64_attention(*inputs[:1], heads, inputs[1], inputs[2], cosine)
    return torch.autograd.grad(out, inputs, grad.double())


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("tokens", [1, 16, 21, 49, 64, 144])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("cosine", [False, True])
def test_backward_kernel_matches_float64_gradients(variant, tokens, groups, cosine):
    heads = 3
    qkv, bias = _inputs(8, tokens, heads, groups)
    scales = torch.tensor([10.0, 3.5, 0.7]) if cosine else torch.full((heads,), D**-0.5)
    inputs = [t.clone().requires_grad_() for t in (qkv, bias, scales)]
    out = native.window_attention(inputs[0], heads, inputs[1], inputs[2], cosine, variant=variant)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "WindowAttentionBackward"
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    expected = _float64_gradients(qkv, heads, bias, scales, cosine, grad)
    # q's and k's gradients are far smaller than v's: each of the three is checked on its own scale.
    got, expected = ([*g[0].chunk(3, dim=-1), *g[1:]] for g in (got, expected))
    for name, a, b in zip(("q", "k", "v", "bias", "scales"), got, expected, strict=True):
        if not cosine and name == "scales":
            continue  # V1's scale is not learned: the kernel leaves its gradient zero
        if not b.any():  # one token: the softmax is constant, the bias gradient exactly zero
            assert not a.any(), name
        else:
            assert relative_error(a, b) < 1e-5, name


def _random_shift_mask(tokens):
    """A mask of a shifted block's form for 4 windows per image: the first without any masked pair,
    the other three each with a pattern of its own."""
    mask = torch.where(torch.rand(4, tokens, tokens) < 0.3, -100.0, 0.0)
    mask[0] = 0.0
    return mask


def test_shift_mask_patterns_of_a_real_mask():
    # A 2 x 3 grid of 7 x 7 windows shifted by 3: inner windows unmasked, the last column, the last
    # row and the corner one pattern each.
    mask = shift_window_mask(14, 21, (7, 7), (3, 3), torch.float32, torch.device("cpu"))
    patterns = native.ShiftMask.of(mask)
    assert patterns.patterns.shape == (3, 49, 49) and patterns.patterns.dtype == torch.float32
    index = patterns.index.tolist()
    assert index[:2] == [-1, -1] and index[3] == index[4] and len({index[2], index[3], index[5]}) == 3
    assert torch.equal(patterns.full(), mask)
    random = _random_shift_mask(16)
    assert torch.equal(native.ShiftMask.of(random).full(), random)


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("tokens", [16, 21, 49, 64, 144])
@pytest.mark.parametrize("cosine", [False, True])
def test_kernel_with_mask_patterns_matches_float64(variant, tokens, cosine):
    """The position bias and the mask passed apart (the mask as patterns) give the attention and
    gradients of their sum, per window (2 images of 4 windows)."""
    heads = 3
    qkv, bias = _inputs(8, tokens, heads, 1)
    mask = _random_shift_mask(tokens)
    scales = torch.tensor([10.0, 3.5, 0.7]) if cosine else torch.full((heads,), D**-0.5)
    inputs = [t.clone().requires_grad_() for t in (qkv, bias, scales)]
    out = native.window_attention(*inputs[:1], heads, inputs[1], inputs[2], cosine, variant, native.ShiftMask.of(mask))
    combined = (bias + mask.unsqueeze(1)).repeat(2, 1, 1, 1)  # (8, heads, N, N): each window its own
    assert relative_error(out, _float64_attention(qkv, heads, combined, scales, cosine)) < 1e-6
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    expected = _float64_gradients(qkv, heads, combined, scales, cosine, grad)
    expected = (expected[0], expected[1].sum(0, keepdim=True), expected[2])  # one bias for every window
    got, expected = ([*g[0].chunk(3, dim=-1), *g[1:]] for g in (got, expected))
    for name, a, b in zip(("q", "k", "v", "bias", "scales"), got, expected, strict=True):
        if cosine or name != "scales":
            assert relative_error(a, b) < 1e-5, name


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("tokens", [16, 21, 49, 144])
@pytest.mark.parametrize("cosine", [False, True])
def test_bfloat16_kernel_is_the_float32_kernel_rounded(variant, tokens, cosine):
    # bfloat16 qkv (CPU autocast) is widened inside the kernel, which is exact, and its output
    # rounded to nearest even as PyTorch's conversion rounds: bit for bit the float32 kernel on the
    # widened qkv, then converted. A NaN in each of two windows stays NaN there.
    heads = 3
    qkv, bias = _inputs(8, tokens, heads, 1)
    qkv = qkv.to(torch.bfloat16)
    qkv[2, 0, 5], qkv[5, 1, 3 * D + 1] = float("nan"), float("nan")
    mask = native.ShiftMask.of(_random_shift_mask(tokens))
    scales = torch.tensor([10.0, 3.5, 0.7]) if cosine else torch.full((heads,), D**-0.5)
    got = native.window_attention(qkv, heads, bias, scales, cosine, variant, mask)
    widened = native.window_attention(qkv.float(), heads, bias, scales, cosine, variant, mask)
    assert got.dtype == torch.bfloat16 and widened.dtype == torch.float32
    rounded, numbers = widened.to(torch.bfloat16), ~widened.isnan()
    assert torch.equal(got[numbers].view(torch.int16), rounded[numbers].view(torch.int16))
    assert torch.equal(got.isnan(), ~numbers)  # NaN's bits are PyTorch's choice; NaN it stays
    assert got[2].isnan().any() and got[5].isnan().any() and not got[[0, 1, 3, 4, 6, 7]].isnan().any()
    # The backward entry the same way: dq, dk, dv rounded, the bias and scale gradients as in float32.
    qkv[2, 0, 5], qkv[5, 1, 3 * D + 1] = 0.5, 0.25
    grad = torch.randn(got.shape).to(torch.bfloat16)
    grads = native.window_attention_backward(qkv, grad, heads, bias, scales, cosine, variant, mask)
    expected = native.window_attention_backward(qkv.float(), grad.float(), heads, bias, scales, cosine, variant, mask)
    assert grads[0].dtype == torch.bfloat16
    assert torch.equal(grads[0].view(torch.int16), expected[0].to(torch.bfloat16).view(torch.int16))
    assert torch.equal(grads[1], expected[1]) and torch.equal(grads[2], expected[2])


@pytest.mark.parametrize("cosine", [False, True])
def test_bfloat16_second_order_gradients_go_through_float32(cosine):
    # A gradient penalty on bfloat16 qkv (create_graph=True): the differentiable backward widens
    # qkv and hands back bfloat16 gradients, close to the same penalty on float32 qkv.
    heads = 2
    qkv, bias = _inputs(4, 49, heads, 4)
    scales = torch.tensor([3.0, 0.5]) if cosine else torch.full((heads,), D**-0.5)
    grad_out = torch.randn(4, 49, heads * D)
    penalties = {}
    for dtype in (torch.float32, torch.bfloat16):
        leaf = qkv.to(dtype).requires_grad_()
        out = native.window_attention(leaf, heads, bias, scales, cosine)
        (grad,) = torch.autograd.grad(out, leaf, grad_out.to(dtype), create_graph=True)
        assert grad.dtype == dtype
        (penalties[dtype],) = torch.autograd.grad(grad.float().square().sum(), leaf)
    assert penalties[torch.bfloat16].dtype == torch.bfloat16
    assert relative_error(penalties[torch.bfloat16], penalties[torch.float32]) < 5e-2


def test_cosine_backward_through_a_clamped_norm():
    # A q / k row of norm below 1e-12: the normalisation divides by the clamp 1e-12 there (no
    # projection: the clamp's derivative is zero), so its gradient is about 1e12 times the others';
    # that row and the rest are each compared on their own scale.
    qkv, bias = _inputs(4, 49, 2, 4)
    qkv[1, 5] *= 1e-14
    scales = torch.tensor([6.0, 0.8])
    grad = torch.randn(4, 49, 2 * D)
    inputs = [t.clone().requires_grad_() for t in (qkv, bias, scales)]
    got = torch.autograd.grad(native.window_attention(inputs[0], 2, inputs[1], inputs[2], True), inputs, grad)
    expected = _float64_gradients(qkv, 2, bias, scales, True, grad)
    zero_row = torch.zeros(4, 49, 1, dtype=torch.bool)
    zero_row[1, 5] = True
    for rows in (zero_row, ~zero_row):
        assert relative_error(got[0] * rows, expected[0] * rows) < 1e-5
    assert got[0][1, 5].abs().max() > 1e6  # the clamped branch: scaled by 1 / 1e-12
    for a, b in zip(got[1:], expected[1:], strict=True):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_backward_kernel_gives_second_order_gradients(cosine, masked):
    # masked: one position bias and the mask as patterns, against their sum per window in float64.
    qkv, bias = _inputs(4, 49, 2, 1 if masked else 4)
    mask = _random_shift_mask(49) if masked else None
    scales = torch.tensor([6.0, 0.8]) if cosine else torch.full((2,), D**-0.5)
    weights = torch.randn(4, 49, 2 * D)
    results = []
    for dtype in (torch.float32, torch.float64):
        q, b, s = (t.to(dtype).requires_grad_() for t in (qkv, bias, scales))
        if dtype == torch.float32:
            out = native.window_attention(q, 2, b, s, cosine, mask=None if mask is None else native.ShiftMask.of(mask))
        else:
            out = _float64_attention(q, 2, b if mask is None else b + mask.double().unsqueeze(1), s, cosine)
        (grad_qkv,) = torch.autograd.grad((out * weights.to(dtype)).sum(), q, create_graph=True)
        results.append(torch.autograd.grad(grad_qkv.square().sum(), (b, s)))
    for got, expected in zip(*results, strict=True):
        assert relative_error(got, expected) < 1e-5


def _model(variant):
    # Head size 32 as in every published configuration (the tiny test presets have 16).
    model = swinkit.create_model(variant, num_classes=4, embed_dim=32, num_heads=(1, 2, 4, 8), window_size=7)
    return perturb(model, scale=0.05).eval()


@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_model_with_the_kernel_matches_the_reference(variant, monkeypatch):
    calls = []
    kernel_attention = native.window_attention
    monkeypatch.setattr(native, "window_attention", lambda *a, **k: calls.append(1) or kernel_attention(*a, **k))
    model = _model(variant)
    x = torch.randn(3, 3, 72, 56)  # padding to the window in stages 1-2, clamped windows after
    with torch.no_grad():
        model.set_attn_impl("reference")
        expected = model(x)
        model.set_attn_impl("fused")
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            outputs = [model(x)]  # image-parallel workers: one thread each
            model.image_parallel = False
            outputs.append(model(x))  # one batch, two intra-op threads: the kernel on one
            torch.set_num_threads(1)
            outputs.append(model(x))
            torch.set_num_threads(native.MAX_THREADS + 1)
            outputs.append(model(x))  # more threads: PyTorch's operations
        finally:
            torch.set_num_threads(threads)
    assert len(calls) == 2 * 8 + 8 + 8  # every block, in each of two workers, then in one batch twice
    for out in outputs:
        assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_training_with_the_kernel_matches_the_reference(variant, monkeypatch):
    """A split training batch (one thread per worker) runs the kernel's forward and backward;
    parameter (V2: logit scales too) and image gradients as the reference path's."""
    backward_calls, gelu_calls = [], []
    kernel_backward, gelu_backward = native.window_attention_backward, native.gelu_backward
    monkeypatch.setattr(
        native, "window_attention_backward", lambda *a, **k: backward_calls.append(1) or kernel_backward(*a, **k)
    )
    monkeypatch.setattr(native, "gelu_backward", lambda *a: gelu_calls.append(1) or gelu_backward(*a))
    model = _model(variant).train()
    reference = _model(variant).train()
    reference.load_state_dict(model.state_dict())
    reference.set_attn_impl("reference")
    x = torch.randn(2, 3, 72, 56)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for net in (model, reference):
            images = x.clone().requires_grad_()
            loss = (net(images) * torch.arange(4.0)).sum()
            names, params = zip(*net.named_parameters(), strict=True)
            results.append(torch.autograd.grad(loss, (images, *params)))
    finally:
        torch.set_num_threads(threads)
    assert len(backward_calls) == len(gelu_calls) == 2 * 8  # every block in two workers
    for name, got, expected in zip(("images", *names), *results, strict=True):
        assert relative_error(got, expected) < 1e-5, name


def _gelu_gradient(variant, grad, x):
    out = torch.full((x.numel() + 16,), 7.0)  # 16 past the end: must stay untouched
    native.kernel(variant).gelu_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel())
    assert (out[x.numel() :] == 7.0).all()
    return out[: x.numel()]


@pytest.mark.parametrize("variant", RUNNABLE)
def test_gelu_gradient_kernel_matches_float64(variant):
    # Every length up to a few vectors (the tail goes through the same vector code), then a long run
    # over the range where GELU's slope changes, out to where exp(-x^2 / 2) underflows.
    for count in [*range(0, 35), 4099]:
        x = torch.cat([torch.randn(count) * 3, torch.linspace(-14, 14, 2001 if count == 4099 else 0)])
        grad = torch.randn_like(x)
        truth = torch.ops.aten.gelu_backward(grad.double(), x.double())
        error = (_gelu_gradient(variant, grad, x).double() - truth).abs()
        assert (error <= 1e-6 * grad.double().abs()).all(), count  # PyTorch's float32 is at most 3e-7 off


@pytest.mark.parametrize("variant", RUNNABLE)
def test_gelu_gradient_kernel_gives_pytorchs_special_values(variant):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 80.0, -80.0])
    grad = torch.ones_like(x)
    expected = torch.ops.aten.gelu_backward(grad, x)  # NaN for NaN and for both infinities (inf * 0)
    torch.testing.assert_close(_gelu_gradient(variant, grad, x), expected, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_gelu_function_is_pytorchs_gelu_to_second_order():
    x = torch.randn(5, 77) * 2
    weights, directions = torch.randn(5, 77), torch.randn(5, 77)
    results = []
    for gelu in (native.GELU.apply, F.gelu):
        leaf = x.clone().requires_grad_()
        out = gelu(leaf)
        (grad,) = torch.autograd.grad((out * weights).sum(), leaf, create_graph=True)
        (second,) = torch.autograd.grad((grad * directions).sum(), leaf)
        (first,) = torch.autograd.grad((gelu(leaf) * weights).sum(), leaf)  # without create_graph: the kernel
        results.append((out.detach(), first, second))
    assert torch.equal(results[0][0], results[1][0])  # the forward is PyTorch's
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-6, atol=1e-6)


def test_gelu_kernel_declines_what_it_does_not_cover(monkeypatch):
    x = torch.randn(4, 8)
    assert native.gelu_applies(x)
    assert not native.gelu_applies(x.double())
    assert not native.gelu_applies(x.t())  # not contiguous
    threads = torch.get_num_threads()
    torch.set_num_threads(native.MAX_THREADS + 1)
    try:
        assert not native.gelu_applies(x)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(native, "ENABLED", False)
    assert not native.gelu_applies(x)


@pytest.mark.parametrize("cosine", [False, True])
def test_windows_split_over_threads_compute_what_one_call_does(cosine):
    """Runs over the worker threads (what the operators under torch.compile use): 3 images of 4
    windows cut at image boundaries, so each run's windows read the mask patterns the whole batch's
    would; the outputs and the qkv gradient bit for bit, the summed bias and scale gradients to
    float rounding."""
    heads, tokens = 2, 49
    qkv, bias = _inputs(12, tokens, heads, 1)
    mask = native.ShiftMask.of(_random_shift_mask(tokens))
    scales = torch.tensor([10.0, 3.5]) if cosine else torch.full((heads,), D**-0.5)
    grad = torch.randn(12, tokens, heads * D)
    whole = native._forward(qkv, heads, bias, scales, cosine, None, mask)
    gradients = native.window_attention_backward(qkv, grad, heads, bias, scales, cosine, None, mask)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the worker pool has one thread per intra-op thread
        for parts in (2, 3, 5):  # 5: more parts than images, so some are empty and left out
            assert torch.equal(native._forward(qkv, heads, bias, scales, cosine, None, mask, parts), whole)
            got = native.window_attention_backward(qkv, grad, heads, bias, scales, cosine, None, mask, parts)
            assert torch.equal(got[0], gradients[0])
            torch.testing.assert_close(got[1], gradients[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[2], gradients[2], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


SHIFTED_14x14 = [14, 14, 7, 7, 3, 3]  # Hp, Wp, window, shift: 2 x 2 windows of 49 tokens per image


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("shift_geometry", [[], SHIFTED_14x14])
def test_compile_operator_is_the_kernel(cosine, shift_geometry):
    """``swinkit::window_attention``, the kernel as torch.compile sees it: torch.library's own checks
    (schema, fake tensors, autograd registration, AOT dispatch), and its output and gradients those
    of :func:`native.window_attention` with the mask the geometry describes."""
    from swinkit.fast import _shift_mask_patterns

    heads = 2
    qkv, position = _inputs(8, 49, heads, 1)
    scales = torch.tensor([10.0, 3.5]) if cosine else torch.full((heads,), D**-0.5)
    inputs = [t.clone().requires_grad_(cosine or t is not scales) for t in (qkv, position, scales)]
    operator = torch.ops.swinkit.window_attention.default
    torch.library.opcheck(operator, (*inputs, heads, cosine, shift_geometry))
    mask = _shift_mask_patterns(14, 14, (7, 7), (3, 3)) if shift_geometry else None
    expected_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    got = operator(*inputs, heads, cosine, shift_geometry)
    expected = native.window_attention(*expected_inputs[:1], heads, *expected_inputs[1:], cosine, mask=mask)
    assert torch.equal(got, expected)
    grad = torch.randn_like(got)
    wanted = [t for t in inputs if t.requires_grad]
    for a, b in zip(
        torch.autograd.grad(got, wanted, grad),
        torch.autograd.grad(expected, [t for t in expected_inputs if t.requires_grad], grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_declines_what_it_does_not_cover(monkeypatch):
    qkv, bias = _inputs(2, 49, 2, 1)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(native.MAX_THREADS + 1)
            assert not native.applies(qkv, 2, 49, bias)  # more intra-op threads: PyTorch's path
            torch.set_num_threads(native.MAX_THREADS)
            assert native.applies(qkv, 2, 49, bias)
            torch.set_num_threads(1)
            assert native.applies(qkv, 2, 49, bias)
            assert not native.applies(qkv.double(), 2, 49, bias)  # float32 only
            assert not native.applies(qkv, 4, 49, bias)  # head size 16
            big = torch.randn(1, 1089, 3 * 2 * D)
            assert not native.applies(big, 2, 1089, torch.randn(1, 2, 1089, 1089))  # 33x33 windows
            assert not native.applies(qkv[:, :, :-3], 2, 49, bias)  # not the qkv layout
            with torch.enable_grad():
                assert native.applies(qkv.requires_grad_(), 2, 49, bias)  # the kernel has a backward
            monkeypatch.setattr(native, "ENABLED", False)
            assert not native.applies(qkv, 2, 49, bias)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """An empty kernel cache and no kernel loaded; the session's state is restored afterwards."""
    monkeypatch.setattr(native, "CACHE_DIR", tmp_path)
    native.reset()
    yield tmp_path
    native.reset()


def test_failed_build_falls_back_to_pytorch(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native.kernel() is None
    assert "could not build window_attention.c" in native.status()
    model = _model("swin_test")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        fused = model(x)
        model.set_attn_impl("reference")
        assert relative_error(fused, model(x)) < 1e-5


def test_the_kernel_check_is_marked_constant_for_compile_as_torch_marks_it_and_import_stays_light():
    # torch.compile must not trace into the build check (a file cache, ctypes): torch's decorator
    # marks it so; swinkit sets the same mark without importing torch._dynamo (a second per import).
    # Nor does it import sympy (half a second) until a size is symbolic.
    def probe() -> bool:
        return True

    torch.compiler.assume_constant_result(probe)
    assert vars(probe) == vars(native.built) == {"_dynamo_marked_constant": True}
    code = "import sys, swinkit; print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False False"  # sympy: the shape engine's, needed only under tracing


def test_built_kernel_is_loaded_from_the_cache(fresh_kernel, monkeypatch):
    assert native.kernel() is not None
    built = list(fresh_kernel.glob("window_attention-*.so"))
    assert len(built) == 1
    native.reset()
    monkeypatch.setenv("CC", "false")  # no compiler now: only the cached build can serve
    assert native.kernel() is not None
    assert native.status().startswith("native window attention: on")


def test_threads_asking_at_once_build_once(fresh_kernel):
    results = []
    threads = [threading.Thread(target=lambda: results.append(native.kernel())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(result is results[0] for result in results) and results[0] is not None
    assert len(list(fresh_kernel.glob("window_attention-*"))) == 1


def test_damaged_cached_build_is_rebuilt(fresh_kernel):
    damaged = native.library_path(native.cpu_variant())
    damaged.write_bytes(b"not a shared library")  # what a disk error could leave
    assert native.kernel() is not None
    assert damaged.stat().st_size > 1000
    qkv, bias = _inputs(2, 49, 1, 1)
    scales = torch.full((1,), D**-0.5)
    expected = _float64_attention(qkv, 1, bias, scales, False)
    assert relative_error(native.window_attention(qkv, 1, bias, scales, False), expected) < 1e-6


def test_build_of_another_kernel_abi_is_refused(fresh_kernel, monkeypatch, tmp_path):
    # A source whose entry points take other arguments (another swinkit's) must not be called.
    other = tmp_path / "window_attention.c"
    source = native.SOURCE.read_text()
    other.write_text(source.replace(f"abi(void) {{ return {native.ABI}; }}", "abi(void) { return 1; }"))
    monkeypatch.setattr(native, "SOURCE", other)
    assert native.kernel() is None
    assert f"kernel ABI {native.ABI}" in native.status()


def test_prefetch_target_changes_the_build_not_the_numbers(fresh_kernel, monkeypatch):
    """Prefetching the next head's rows into L1 (Intel) or L2 (other CPUs) is a build of its own,
    with the same results bit for bit."""
    qkv, bias = _inputs(6, 49, 2, 4)
    scales, grad = torch.full((2,), D**-0.5), torch.randn(6, 49, 2 * D)
    results = []
    for to_l1 in (True, False):
        monkeypatch.setattr(native, "PREFETCH_TO_L1", to_l1)
        native.reset()
        out = native.window_attention(qkv, 2, bias, scales, False)
        results.append((out, *native.window_attention_backward(qkv, grad, 2, bias, scales, False)))
    assert len(list(fresh_kernel.glob("window_attention-*.so"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_unwritable_cache_falls_back_to_pytorch(fresh_kernel, monkeypatch):
    blocker = fresh_kernel / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(native, "CACHE_DIR", blocker / "cache")  # a directory inside a file: cannot exist
    assert native.kernel() is None
    assert "could not build" in native.status()
