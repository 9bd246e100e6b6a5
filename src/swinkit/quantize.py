"""int8 dynamic quantization of the linear layers, for CPU inference. Opt-in, never the default.

:func:`quantize_dynamic` replaces the blocks' and the patch mergings' linear layers with
:class:`Int8Linear`: int8 weights with one scale per output channel, and inputs quantized to int8
on every call with one scale per token (row), from that token's own largest magnitude. The
products run in int8 with int32 sums (``torch._int_mm``: VNNI / AMX where the CPU has them); the
passes around them are native where swinkit's CPU library is built (:func:`swinkit.native.quantize_rows`,
:func:`~swinkit.native.dequantize_rows`), else (or under ``torch.compile``, which traces a
quantized model whole) the same arithmetic in PyTorch operations, rounded alike. So
every token's result depends on that token alone: not on the other images of the batch, on how
swinkit chunks or splits it, or on padding, unlike per-tensor dynamic quantization
(``torch.ao.quantization.quantize_dynamic``), where an image's logits move with its batch. Those
layers hold about nine tenths of Swin's arithmetic; the patch embedding, the norms, the attention
products and softmax, Swin V2's bias MLP (computed once per window size) and the classifier stay
float32, and the fused path (window-order gathers, the native attention kernel, images split
over the worker threads) runs as before. The result is a different function from the float
model's: measure what it does to your accuracy (``swinkit eval --int8``) before you rely on it.
Speed and accuracy change: benchmarks/RESULTS.md, section "Per-token int8 on the fused path".
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn

from . import native

FLOAT_LINEARS = ("cpb_mlp", "head")  # module names (parts) whose linear layers stay float32
LEVELS = 127  # symmetric int8: -127..127 (no -128, so that negation stays exact)


class Int8Linear(nn.Module):
    """``x W^T + b`` with ``W`` in int8 (per output channel) and ``x`` quantized per row on each call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / LEVELS
        # Stored transposed, (in, out): the layout torch._int_mm takes without a copy.
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x W^T + b``, plus ``residual`` (shaped as the output) if given."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"Int8Linear takes float32 CPU inputs, got {x.dtype} on {x.device}")
        rows = x.reshape(-1, self.in_features)
        added = None if residual is None else residual.reshape(-1, self.out_features)
        # The native passes (one over the input, one over the output) where the library is built.
        native_rows = None if torch.compiler.is_compiling() or rows.stride(1) != 1 else native.quantize_rows(rows)
        if native_rows is not None:
            quantized, scale = native_rows
            acc = torch._int_mm(quantized, self.weight_int8)
            added = None if added is None else added.contiguous()
            out = native.dequantize_rows(acc, scale, self.weight_scale, self.bias, added)
        else:
            # abs().amax(): 20x faster than vector_norm(inf) over rows on a CPU (measured at Swin's shapes).
            scale = rows.abs().amax(1, keepdim=True).clamp_min_(1e-30).div_(LEVELS)
            quantized = rows.div(scale).round_().to(torch.int8)
            # Rounded as the native pass rounds (no fused multiply-add, which addcmul may use): one
            # unit in the last place here moves int8 rounding in the layers after it.
            out = torch._int_mm(quantized, self.weight_int8).float().mul_(scale).mul_(self.weight_scale)
            out = out if self.bias is None else out.add_(self.bias)
            out = out if added is None else out.add_(added)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def is_int8(linear: nn.Module) -> bool:
    """Whether ``linear`` was quantized by :func:`quantize_dynamic`."""
    return isinstance(linear, Int8Linear)


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (CPU, float32, in eval mode) whose blocks' and mergings' linears are :class:`Int8Linear`.

    For inference only: those layers have no gradients (the copy and its parts refuse ``train()``), and the copy
    is neither saved as a checkpoint nor exported (save or export the float model; quantize after loading).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"quantize_dynamic needs a model (torch nn.Module, e.g. swinkit.create_model), got {type(model).__name__}"
        )
    _check_quantizable(model)
    quantized = copy.deepcopy(model).eval()
    names = [
        name
        for name, module in quantized.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name.split(".") for part in FLOAT_LINEARS)
    ]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers to quantize")
    for name in names:
        parent, _, child = name.rpartition(".")
        module = quantized.get_submodule(parent)
        setattr(module, child, Int8Linear(getattr(module, child)))
    quantized.int8_dynamic = True
    # On the model and every part holding an int8 layer (model.layers[0].train() too), refused before
    # any module is switched; eval() calls it too. A partial, not a bound method: the copy still
    # pickles (a bound method of a function the class does not have does not).
    holders = {prefix for name in names for prefix in _prefixes(name)}
    for name in holders | set(names):
        module = quantized.get_submodule(name)
        module.train = functools.partial(_train_for_inference, module)
    return quantized.eval()  # the new layers too


def _prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``["", "a", "a.b"]``: the names of the modules above ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(len(parts))]


def _train_for_inference(model: nn.Module, mode: bool = True) -> nn.Module:
    """A quantized copy's ``train``: eval mode only (its int8 weights are buffers, which no optimizer
    updates; training it would leave them as they are without a word)."""
    if mode:
        raise ValueError(
            "an int8-quantized model is for inference: its int8 weights cannot learn; train the float model "
            "and quantize it after (swinkit.quantize_dynamic)"
        )
    return type(model).train(model, False)


def _check_quantizable(model: nn.Module) -> None:
    if getattr(model, "int8_dynamic", False):
        raise ValueError("the model is already int8-quantized")
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.device.type != "cpu":
            raise ValueError(f"int8 dynamic quantization is for CPU inference; {name} is on {tensor.device}")
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ValueError(f"int8 dynamic quantization starts from float32 weights; {name} is {tensor.dtype}")


def refuse_int8(model: nn.Module, action: str) -> None:
    """A clear error where ``action`` (save, export, ...) needs float weights and ``model`` is int8."""
    if getattr(model, "int8_dynamic", False):
        raise ValueError(
            f"cannot {action} an int8-quantized model (its linear weights are packed int8): {action} the float "
            "model, and quantize after loading it (swinkit.quantize_dynamic)"
        )
