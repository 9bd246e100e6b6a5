"""Ablation of the native window-attention kernel: the same models with and without it, beside timm.

``swinkit.native`` runs the no-grad fused path's attention (q k^T, scale, bias, softmax, times v,
heads interleaved back) as one compiled AVX-512 pass per window and head, in the one-thread
image-parallel workers. This script first times that kernel alone against the PyTorch per-head
path it replaces (``swinkit.fast.heads_attention``), one thread, on one chunk of each Swin-T stage
(and SwinV2-T's 8x8 cosine windows), then turns it off and on by ``swinkit.native.ENABLED``,
interleaving per round: swinkit with the kernel, timm, swinkit without, for Swin-T and SwinV2-T.
Then the same for training (the kernel's backward): forward + backward of one worker's share
(4 images) per Swin-T stage, kernel against PyTorch's batched attention (the path training takes
without it), and the whole training step (batch 8, AdamW) on and off beside timm, for Swin-T and
SwinV2-T. ``ENABLED`` switches the whole native library, so since 2026-12-06 the training step's
"off" also runs PyTorch's GELU gradient instead of ``csrc/gelu.c``'s.

    python benchmarks/native_attention.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import functools

import torch
from ablation import arguments, median_seconds, report, switched

from swinkit import fast, native
from swinkit.attention import reference_attention
from swinkit.bench import BenchResult, Target, _interleave, _train_step, build, training_optimizer
from swinkit.model import shift_window_mask

# (name, windows in one chunk of the no-grad path, window tokens, heads, shift groups, cosine)
STAGES = [
    ("Swin-T stage 1", 64, 49, 3, 64, False),
    ("Swin-T stage 2", 80, 49, 6, 16, False),
    ("Swin-T stage 3", 80, 49, 12, 4, False),
    ("Swin-T stage 4", 83, 49, 24, 1, False),
    ("SwinV2-T stage 1", 64, 64, 3, 64, True),
    ("SwinV2-T stage 3", 64, 64, 12, 4, True),
]


def _bias(groups: int, heads: int, tokens: int) -> torch.Tensor:
    """A random relative position bias, plus the shift mask of a map ``groups`` windows in size
    (its -100 entries are what make subnormal probabilities: the kernel must be timed with them)."""
    bias = torch.randn(1, heads, tokens, tokens)
    if groups == 1:
        return bias
    window = round(tokens**0.5)
    side = round(groups**0.5) * window
    mask = shift_window_mask(side, side, (window, window), (window // 2, window // 2), torch.float32, bias.device)
    return bias + mask.unsqueeze(1)


def kernel_alone() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("one thread, ms per chunk:  PyTorch per head  native  speed-up")
    for name, windows, tokens, heads, groups, cosine in STAGES:
        qkv = torch.randn(windows, tokens, 3 * heads * native.HEAD_SIZE)
        bias = _bias(groups, heads, tokens)
        scales = torch.full((heads,), native.HEAD_SIZE**-0.5)
        torch_path = functools.partial(fast.heads_attention, qkv, heads, groups, bias, scales.tolist(), cosine)
        kernel = functools.partial(native.window_attention, qkv, heads, bias, scales, cosine)
        before, after = median_seconds(torch_path), median_seconds(kernel)
        print(f"{name:<24} {1e3 * before:17.2f} {1e3 * after:7.2f} {before / after:9.2f}")
    torch.set_num_threads(threads)


# (name, windows in one worker's share of a training batch of 8, heads, shift groups)
TRAINING_STAGES = [
    ("Swin-T stage 1", 256, 3, 64),
    ("Swin-T stage 2", 64, 6, 16),
    ("Swin-T stage 3", 16, 12, 4),
    ("Swin-T stage 4", 4, 24, 1),
]


def _batched_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """What the fused path's training runs without the kernel (``fast._attend_batched``)."""
    windows, tokens, width = qkv.shape
    q, k, v = qkv.view(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = reference_attention(q * scale, k, v, bias, 0.0, True)  # bias: (groups, heads, N, N), as the seam takes
    return out.transpose(1, 2).reshape(windows, tokens, width // 3)


def _kernel_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return native.window_attention(qkv, heads, bias, scales, False)


def _forward_backward(attention, qkv, bias, grad, heads, scale) -> None:
    torch.autograd.grad(attention(qkv, heads, bias, scale), (qkv, bias), grad)


def kernel_training() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("one thread, forward + backward, ms per share:  PyTorch batched  native  speed-up")
    scale = native.HEAD_SIZE**-0.5
    for name, windows, heads, groups in TRAINING_STAGES:
        qkv = torch.randn(windows, 49, 3 * heads * native.HEAD_SIZE, requires_grad=True)
        bias = _bias(groups, heads, 49).requires_grad_()
        grad = torch.randn(windows, 49, heads * native.HEAD_SIZE)
        scales = torch.full((heads,), scale)
        torch_path = functools.partial(_forward_backward, _batched_attention, qkv, bias, grad, heads, scale)
        kernel = functools.partial(_forward_backward, _kernel_attention, qkv, bias, grad, heads, scales)
        before, after = median_seconds(torch_path), median_seconds(kernel)
        print(f"{name:<24} {1e3 * before:29.2f} {1e3 * after:7.2f} {before / after:9.2f}")
    torch.set_num_threads(threads)


def training(model_name: str, size: int, rounds: int) -> None:
    networks = {name: build(name, model_name).train() for name in ("swinkit", "timm")}
    optimizers = {name: training_optimizer(name, model) for name, model in networks.items()}
    y = torch.randint(0, 1000, (8,))
    x = torch.randn(8, 3, size, size)

    def step(name):
        return lambda: _train_step(networks[name], optimizers[name], x, y)

    calls = [("swinkit", switched(native, "ENABLED", True, step("swinkit"))), ("timm", step("timm"))]
    calls.append(("swinkit:no-native", switched(native, "ENABLED", False, step("swinkit"))))
    result = BenchResult("training", 8)
    _interleave(result, calls, rounds, 3, Target())
    result.raise_failures()
    print(f"{model_name} training step")
    report(result, "swinkit", "swinkit:no-native", "native kernel speed-up")


def models(model_name: str, size: int, rounds: int) -> None:
    swinkit, timm = build("swinkit", model_name).eval(), build("timm", model_name).eval()
    x = torch.randn(16, 3, size, size)
    result = BenchResult("inference", 16)
    calls = [("swinkit", switched(native, "ENABLED", True, lambda: swinkit(x))), ("timm", lambda: timm(x))]
    calls.append(("swinkit:no-native", switched(native, "ENABLED", False, lambda: swinkit(x))))
    with torch.inference_mode():
        _interleave(result, calls, rounds, 2, Target())
    result.raise_failures()
    print(model_name)
    report(result, "swinkit", "swinkit:no-native", "native kernel speed-up")


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    print(native.status())
    if native.kernel() is None:
        raise SystemExit("nothing to compare: the native kernel does not run here")
    torch.manual_seed(0)
    with torch.inference_mode():
        kernel_alone()
    models("swin_t", 224, args.rounds)
    models("swinv2_t", 256, args.rounds)
    kernel_training()
    training("swin_t", 224, args.rounds)
    training("swinv2_t", 256, args.rounds)


if __name__ == "__main__":
    main()
