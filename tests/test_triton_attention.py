"""The Triton window-attention kernel of ``attn_impl="triton"``, against its PyTorch form.

Whole models against the reference path are in test_attention.py (every attn_impl). Without a
GPU the kernel runs in Triton's interpreter (conftest.py sets ``TRITON_INTERPRET``); with one,
these tests run the compiled kernel on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swinkit
from helpers import perturb, relative_error
from swinkit import triton_attention
from swinkit.triton_attention import (
    Settings,
    kernel_index,
    launch,
    launch_backward,
    map_window_attention,
    norm_rows,
    residual_plus_norm,
)

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _problem(H, W, window, shift, heads, d, dtype, generator):
    """Random map-order qkv, padded-token qkv, bias (+ a mask-like pattern) and head scales."""
    index, inverse, padded_count = kernel_index(H, W, window, shift, DEVICE)
    N = window[0] * window[1]
    windows = index.numel() // N
    C = heads * d

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    bias = rand(windows if shift[0] else 1, heads, N, N)
    bias[..., :3] = -100.0  # like the shift mask: some keys all but switched off
    scales = (0.5 + torch.rand(heads, generator=generator, dtype=torch.float64)).to(DEVICE)
    return rand(2, H * W, 3 * C), rand(3 * C), bias, scales, index, inverse, padded_count


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kernel_over_several_tiles_matches_its_pytorch_form(cosine, dtype, tolerance):
    # Window 12: 144 tokens, three 64-token row tiles and three key tiles (the running-max softmax),
    # on a 20 x 17 map: padded to 24 x 24, shifted by 6.
    generator = torch.Generator().manual_seed(1)
    qkv, qkv_bias, bias, scales, index, inverse, _ = _problem(20, 17, (12, 12), (6, 6), 2, 16, dtype, generator)
    args = (qkv, qkv_bias, bias, scales, index)
    out, _ = launch(*args, Settings(heads=2, cosine=cosine, eps=1e-12))
    expected = map_window_attention(*args, inverse, heads=2, cosine=cosine, eps=1e-12)
    assert out.shape == (2, 20 * 17, 32)
    assert relative_error(out, expected) < tolerance


def test_kernel_in_half_precision_is_close_to_float32():
    generator = torch.Generator().manual_seed(2)
    qkv, qkv_bias, bias, scales, index, inverse, _ = _problem(8, 8, (4, 4), (2, 2), 2, 16, torch.float32, generator)
    expected = map_window_attention(qkv, qkv_bias, bias, scales, index, inverse, heads=2, cosine=False, eps=1e-12)
    half = [t.half() for t in (qkv, qkv_bias, bias)]
    out, _ = launch(*half, scales, index, Settings(heads=2, cosine=False, eps=1e-12))
    assert out.dtype == torch.float16
    assert relative_error(out.float(), expected) < 5e-3


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_backward_kernels_match_autograd_of_the_pytorch_form(cosine, dtype, tolerance):
    # The same multi-tile, padded, shifted geometry: gradients of qkv, of the qkv bias (through the
    # padded tokens), of the per-window bias (summed over images) and of the head scales.
    generator = torch.Generator().manual_seed(3)
    qkv, qkv_bias, bias, scales, index, inverse, padded_count = _problem(
        20, 17, (12, 12), (6, 6), 2, 16, dtype, generator
    )
    assert padded_count == 24 * 24 - 20 * 17  # per image: 576 window tokens, 340 of them real
    settings = Settings(heads=2, cosine=cosine, eps=1e-12)
    out, lse = launch(qkv, qkv_bias, bias, scales, index, settings, save_lse=True)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)
    grads = launch_backward(qkv, qkv_bias, bias, scales, index, out, lse, grad, settings, padded_count)

    inputs = [t.detach().clone().requires_grad_(True) for t in (qkv, qkv_bias, bias, scales)]
    expected = map_window_attention(*inputs, index, inverse, *settings)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    for name, value, reference in zip(("qkv", "qkv_bias", "bias", "scales"), grads, expected_grads, strict=True):
        assert value.shape == reference.shape and value.dtype == reference.dtype, name
        assert relative_error(value, reference) < tolerance, name


@pytest.mark.parametrize("cosine", [False, True])
def test_backward_kernels_in_half_precision_are_close_to_float32(cosine):
    generator = torch.Generator().manual_seed(4)
    # An 11 x 9 map in 4 x 4 windows shifted by 2: padding in both directions; bias stays float32
    # (under autocast the block's bias is the residual stream's dtype).
    problem = _problem(11, 9, (4, 4), (2, 2), 2, 16, torch.float32, generator)
    qkv, qkv_bias, bias, scales, index, _, padded_count = problem
    settings = Settings(heads=2, cosine=cosine, eps=1e-12)
    grad = torch.randn(2, 11 * 9, 32, generator=generator).to(DEVICE)

    def gradients(dtype):
        half_qkv, half_bias = qkv.to(dtype), qkv_bias.to(dtype)
        out, lse = launch(half_qkv, half_bias, bias, scales, index, settings, save_lse=True)
        return launch_backward(
            half_qkv, half_bias, bias, scales, index, out, lse, grad.to(dtype), settings, padded_count
        )

    for name, half, full in zip(
        ("qkv", "qkv_bias", "bias", "scales"), gradients(torch.float16), gradients(torch.float32), strict=True
    ):
        assert relative_error(half.float(), full) < 2e-2, name


@pytest.mark.parametrize("C", [96, 20])  # Swin-T's channels (128-lane tiles); not a power of two or a tile's multiple
@pytest.mark.parametrize("branch_dtype", [None, torch.float32, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_norm_kernel_is_the_residual_add_then_layer_norm_rounded_once(C, branch_dtype, out_dtype):
    generator = torch.Generator().manual_seed(C)
    norm = torch.nn.LayerNorm(C).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(generator=generator), norm.bias.normal_(generator=generator)
        # 135 rows: at 96 channels 17 programs of 8, the last part-filled
        x = (torch.randn(3, 45, C, generator=generator) * 3 + 2).to(DEVICE)
        branch = None if branch_dtype is None else torch.randn(3, 45, C, generator=generator).to(DEVICE, branch_dtype)
        total, out = norm_rows(norm, x, out_dtype, branch)
        expected_total = x if branch is None else x + branch  # float32 + float16: a float32 sum
        assert total.dtype == expected_total.dtype and torch.equal(total, expected_total)
        # In float64 from the same rows: the kernel's float32 sums are off by float32 rounding, and
        # its result, rounded once to out_dtype, by at most one unit in that last place.
        exact = norm.double()(expected_total.double())
        assert out.dtype == out_dtype
        ulp = torch.finfo(out_dtype).eps
        assert torch.allclose(out.double(), exact, rtol=ulp if out_dtype == torch.float16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("C", [96, 20])
@pytest.mark.parametrize("with_branch", [False, True])
def test_norm_kernels_gradients_match_autograd_of_layer_norm(C, with_branch):
    # float64 throughout (the kernels compute in it then): the gradients of x, the branch, the
    # weight and the bias, through the norm and through the sum's own later use (total_weight).
    generator = torch.Generator().manual_seed(C + 2)
    norm = torch.nn.LayerNorm(C).to(DEVICE, torch.float64)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE)

    with torch.no_grad():
        norm.weight.copy_(rand(C)), norm.bias.copy_(rand(C))
    x, branch = (rand(3, 45, C) * 2 + 1).requires_grad_(), rand(3, 45, C).requires_grad_()
    out_weight, total_weight = rand(3, 45, C), rand(3, 45, C)
    inputs = (x, branch, norm.weight, norm.bias) if with_branch else (x, norm.weight, norm.bias)

    def loss(total, out):
        return (out * out_weight).sum() + ((total * total_weight).sum() if with_branch else 0)

    total, out = norm_rows(norm, x, torch.float64, branch if with_branch else None)
    got = torch.autograd.grad(loss(total, out), inputs)
    total = x + branch if with_branch else x
    expected = torch.autograd.grad(loss(total, norm(total)), inputs)
    for g, e in zip(got, expected, strict=True):
        assert relative_error(g, e) < 1e-12


def test_norm_kernels_refuse_second_derivatives():
    norm = torch.nn.LayerNorm(20).to(DEVICE)
    x = torch.randn(2, 5, 20).to(DEVICE).requires_grad_()
    _, out = norm_rows(norm, x, torch.float32)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@pytest.mark.parametrize("C", [96, 20])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16])
def test_residual_plus_norm_kernel_is_the_norm_then_the_add_in_float32(C, out_dtype):
    generator = torch.Generator().manual_seed(C + 1)
    norm = torch.nn.LayerNorm(C).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(generator=generator), norm.bias.normal_(generator=generator)
        x = (torch.randn(3, 45, C, generator=generator) * 3).to(DEVICE)
        branch = (torch.randn(3, 45, C, generator=generator) * 2 + 1).to(DEVICE, torch.float16)  # autocast's output
        total, out = residual_plus_norm(norm, x, branch, out_dtype)
        exact = x.double() + norm.double()(branch.double())
        assert total.dtype == torch.float32
        assert torch.allclose(total.double(), exact, rtol=1e-6, atol=1e-5)
        if out_dtype is None:
            assert out is None
        elif out_dtype == torch.float32:
            assert out is total
        else:  # the sum rounded once, as autocast's cast of it for the next linear layer
            assert out.dtype == out_dtype and torch.equal(out, total.to(out_dtype))


@pytest.mark.parametrize(("variant", "kernel"), [("swin_test", "norm_rows"), ("swinv2_test", "residual_plus_norm")])
def test_inference_under_float16_autocast_takes_the_norm_kernels(variant, kernel, monkeypatch):
    # Without autograd a block's two norms run in the kernels above, the residual add with each,
    # and the linear layers' inputs come out in autocast's dtype: as close to the reference under
    # the same autocast as the reference itself is to float32. Block by block on a float32 map, the
    # residual stream CUDA's autocast keeps (its LayerNorm is a float32 operation; CPU autocast
    # leaves it in float16). bfloat16 is left to tests/test_gpu.py: the interpreter's comes out wrong.
    calls = []
    kernel_norm = getattr(triton_attention, kernel)
    monkeypatch.setattr(triton_attention, kernel, lambda *a, **k: calls.append(1) or kernel_norm(*a, **k))
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).to(DEVICE).eval()
    blocks = list(model.layers[0].blocks)  # an unshifted and a shifted block
    x = torch.randn(2, 9, 13, blocks[0].norm1.normalized_shape[0]).to(DEVICE)  # padded to the window
    with torch.no_grad():
        for block in blocks:
            block.attn.attn_impl = "reference"
            full = block(x)
            with torch.autocast(DEVICE.type, dtype=torch.float16):
                expected = block(x)
                block.attn.attn_impl = "triton"
                got = block(x)
            assert got.dtype == expected.dtype == torch.float32
            assert relative_error(got, expected) < 2 * relative_error(expected, full) + 1e-6
            x = expected
    assert len(calls) == 2 * 2  # both norms of both blocks


def test_padded_tokens_are_dropped_and_every_map_token_is_written():
    index, inverse, padded_count = kernel_index(5, 7, (4, 4), (0, 0), torch.device("cpu"))
    assert index.dtype == torch.int32 and padded_count == 4 * 16 - 35
    assert sorted(index[index >= 0].tolist()) == list(range(35))
    assert sorted((-1 - index[index < 0]).tolist()) == list(range(padded_count))  # one slot each
    assert torch.equal(index[inverse].long(), torch.arange(35))


def _compiled_python(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Python in a fresh process without Triton's interpreter (which this process runs on CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel is compiled, not refused")
def test_cpu_tensors_without_the_interpreter_are_refused_by_name():
    code = (
        "import torch, swinkit\n"
        "m = swinkit.create_model('swin_test', num_classes=2, attn_impl='triton')\n"
        "m(torch.randn(1, 3, 32, 32))\n"
    )
    result = _compiled_python("-c", code)
    assert result.returncode != 0
    assert "attn_impl='triton' runs on CUDA GPUs, not on cpu tensors" in result.stderr


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_ampere_and_hopper_gpus_without_one(tmp_path, arch):
    # Triton lowers each kernel to PTX and runs its bundled ptxas for sm_80 (A100) and sm_90 (H100 /
    # H200), where attn_impl="auto" picks them: a real compile, which catches what the interpreter
    # lets through (types, shapes of tl.dot, layouts).
    from triton_compile import variants

    script = str(Path(__file__).with_name("triton_compile.py"))
    result = _compiled_python(script, str(arch), TRITON_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = [(kernel, dtype, flags.get("COSINE"), warps) for kernel, dtype, flags, warps in variants()]
    assert [(r["kernel"], r["dtype"], r["cosine"], r["warps"]) for r in rows] == expected
    assert all(r["arch"] == arch and r["cubin_bytes"] > 0 for r in rows)
    attention = [r for r in rows if r["kernel"].startswith("window_attention")]
    assert all(r["mma"] for r in attention if r["dtype"] in ("bfloat16", "float16"))  # on the tensor cores


def test_compiled_kernels_are_tuned_over_warps_and_interpreted_ones_are_not():
    code = (
        "from swinkit.triton_attention import _kernel\n"
        "kernel = _kernel('window_attention_backward_keys')\n"
        "print(type(kernel).__name__, sorted(c.num_warps for c in getattr(kernel, 'configs', [])), kernel.keys)\n"
    )
    result = _compiled_python("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["Autotuner", "[4,", "8]", "['N',", "'d',", "'C']"]
    if not torch.cuda.is_available():  # this process runs the interpreter (conftest)
        from swinkit.triton_attention import _kernel

        assert type(_kernel("window_attention_forward")).__name__ == "InterpretedFunction"
