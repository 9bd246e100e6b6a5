"""Shared test helpers: perturbed random weights and the relative error measure."""

from __future__ import annotations

import importlib.util
import re
import struct
import zlib

import torch
from PIL import Image
from torch import Tensor, nn

from swinkit.data import DigitsDataset

# The detectors' test settings small enough for a CPU test (swin_test backbone, 64 / 96 test scale).
TINY_DETECTOR = dict(
    min_size=64,
    max_size=96,
    fpn_channels=16,
    box_head_dim=32,
    mask_head_dim=8,
    roi_batch_size=64,
    anchor_sizes=(16, 32, 64, 128, 256),
)


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.02, seed: int = 0) -> nn.Module:
    """Add noise to every parameter and buffer-free weight so nothing sits at its (often zero) init."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
        param.add_(noise * scale)
    return model


def assert_checkpointing_keeps_gradients(model: nn.Module, x: Tensor) -> None:
    """Gradient checkpointing on and off give the same gradients (``model`` and ``x`` in float64)."""
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain[name], rtol=1e-10, atol=1e-12), name


def assert_forward_backward(model: nn.Module, shape: tuple[int, ...], num_classes: int) -> None:
    """Images of ``shape`` give ``(B, num_classes)`` logits and finite gradients for inputs and parameters."""
    x = torch.randn(shape, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.shape == (shape[0], num_classes)
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def assert_same_weights(model: nn.Module, expected: nn.Module) -> None:
    """Every parameter and buffer of ``model`` is ``expected``'s, bit for bit, under the same names:
    two models of one class and config then compute the same function, without running either."""
    for kind in ("named_parameters", "named_buffers"):
        got, want = dict(getattr(model, kind)()), dict(getattr(expected, kind)())
        assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:5]
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def relative_error(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def outputs_and_gradients(model: nn.Module, impl: str, x: Tensor, dtype: torch.dtype | None = None):
    """Output, input gradient and parameter gradients of ``model`` with ``attn_impl=impl``, under
    autocast to ``dtype`` on ``x``'s device if given."""
    model.set_attn_impl(impl)
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 -> float32; float64 stays
    out.square().sum().backward()
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_tables_cached_under_inference_mode_serve_training(model: nn.Module, impl: str, x: Tensor) -> None:
    """An inference-mode forward first (as ``swinkit bench`` runs), then a training step of ``impl``
    on the same shapes matches the reference: the index tables cached by the first, built afresh
    here, must be tensors an autograd function may save, which inference tensors are not."""
    from swinkit.fast import _cached_window_order

    _cached_window_order.cache_clear()
    if importlib.util.find_spec("triton") is not None:
        from swinkit.triton_attention import kernel_index

        kernel_index.cache_clear()
    model.set_attn_impl(impl)
    with torch.inference_mode():
        model.eval()(x)
    out, input_grad, grads = outputs_and_gradients(model.train(), impl, x)
    expected, expected_input_grad, expected_grads = outputs_and_gradients(model, "reference", x)
    assert relative_error(out, expected) < 1e-5 and relative_error(input_grad, expected_input_grad) < 1e-5
    assert all(relative_error(grads[name], expected_grads[name]) < 1e-4 for name in grads)


def assert_bfloat16_as_close_as_the_reference(model: nn.Module, impl: str, x: Tensor) -> None:
    """``impl`` under bfloat16 autocast is close to the float32 reference, and each parameter
    gradient about as close as the reference path's own under bfloat16.

    A fixed bound per gradient cannot be the test: V2's logit scales and position-bias MLP weights
    get small sums of many cancelling terms, which the reference itself misses by 10-20% in
    bfloat16 (measured under CPU autocast; ``fused`` missed one by 11% on CUDA). Each may be off by
    twice the reference's own error plus 2%, and by 10% in any case.
    """
    expected, expected_input_grad, expected_grads = outputs_and_gradients(model, "reference", x)
    _, _, baseline_grads = outputs_and_gradients(model, "reference", x, torch.bfloat16)
    out, input_grad, grads = outputs_and_gradients(model, impl, x, torch.bfloat16)
    assert relative_error(out, expected) < 3e-2
    assert relative_error(input_grad, expected_input_grad) < 5e-2
    for name, grad in grads.items():
        allowed = max(1e-1, 2 * relative_error(baseline_grads[name], expected_grads[name]) + 2e-2)
        assert relative_error(grad, expected_grads[name]) < allowed, name


def timm_to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm Swin state dict to the official Microsoft layout (written here, independently)."""
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        out[key] = value
    return out


def torchvision_to_official(state_dict: dict[str, Tensor], depths: tuple[int, ...]) -> dict[str, Tensor]:
    """Rename a torchvision V1 Swin state dict to the official layout (independent of swinkit's converter)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue
        parts = key.split(".")
        if parts[0] == "features":
            index = int(parts[1])
            if index == 0:
                key = {"0": "patch_embed.proj", "2": "patch_embed.norm"}[parts[2]] + "." + parts[3]
            elif index % 2 == 1:
                stage = (index - 1) // 2
                rest = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                key = f"layers.{stage}.blocks.{parts[2]}.{rest}"
            else:
                key = f"layers.{index // 2 - 1}.downsample." + ".".join(parts[2:])
        out[key] = value
    assert len([k for k in out if k.endswith("qkv.weight")]) == sum(depths)
    return out


def write_digit_folder(root, classes=(0, 1, 2), per_class=6, formats=("png", "jpg")):
    """Real handwritten digits from the bundled set, as PNG and JPEG files in class folders."""
    digits = DigitsDataset()
    counts = dict.fromkeys(classes, 0)
    for index, sample in enumerate(digits.samples):
        if sample.label in counts and counts[sample.label] < per_class:
            folder = root / f"digit{sample.label}"
            folder.mkdir(parents=True, exist_ok=True)
            extension = formats[counts[sample.label] % len(formats)]
            digits.load(index).resize((32, 32), Image.BILINEAR).save(folder / f"{index}.{extension}")
            counts[sample.label] += 1
    return root


def bomb_png(path, side=20000):
    """A 1-bit PNG whose header claims side x side pixels: a few bytes on disk (a decompression bomb's shape)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path
