"""Ablation of the fused path's oneDNN linears: the same model with and without them, beside timm.

``swinkit.fast`` sends the linear layers of eager float32 CPU work through oneDNN (no grad: with
GELU / the residual add as post-ops) or, in training, through ``OneDNNLinear`` (forward and input
gradient in MKL into reused buffers where ``swinkit.fast.MKL_TRAINING_LINEARS`` says, else in
oneDNN; MKL weight gradient). This script turns that off and on by the module switch
``swinkit.fast.ONEDNN_LINEAR``, interleaving per round: swinkit with oneDNN, timm, swinkit without;
in training also swinkit with fresh outputs instead of reused buffers (``REUSE_BUFFERS``).
It also times the linear shapes of Swin-T's blocks alone, one thread (what an image-parallel worker
runs): ``F.linear`` (MKL) against oneDNN, and the training forward and input gradients the same
way, the measurement behind ``swinkit.fast.MKL_TRAINING_LINEARS``.

    python benchmarks/onednn_linear.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from ablation import arguments, median_seconds, report, switched

from swinkit import fast
from swinkit.bench import BenchResult, Target, _interleave, _train_step, build, training_optimizer

# (tokens, in, out) of Swin-T's qkv / proj / fc1 / fc2 per stage, at one chunk of the no-grad path.
SHAPES = [(3136, 96, 288), (3136, 96, 96), (3136, 96, 384), (3136, 384, 96)]
SHAPES += [(3920, 192, 576), (3920, 192, 768), (3920, 768, 192), (3920, 384, 1536), (3920, 1536, 384)]
SHAPES += [(784, 768, 2304), (784, 768, 3072), (784, 3072, 768)]


def linear_shapes() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("one thread, GFLOP/s:  tokens  in  out  F.linear  oneDNN  ratio")
    for tokens, inputs, outputs in SHAPES:
        x, weight, bias = torch.randn(tokens, inputs), torch.randn(outputs, inputs), torch.randn(outputs)
        mkl = median_seconds(functools.partial(F.linear, x, weight, bias))
        onednn = median_seconds(functools.partial(fast._onednn_linear, x, weight, bias))
        flops = 2 * tokens * inputs * outputs / 1e9
        print(f"{tokens:>26} {inputs:>4} {outputs:>4} {flops / mkl:9.0f} {flops / onednn:7.0f} {mkl / onednn:6.2f}")
    torch.set_num_threads(threads)


def training_shapes() -> None:
    """The forward ``x W^T + b`` and the input gradient ``grad @ W`` of Swin-T's linears at one
    worker's share of a training batch of 8 (4 images), one thread: MKL (the forward into a kept
    output, as ``OneDNNLinear`` writes it) against oneDNN (a fresh output; the input gradient on the
    transposed weight, as ``OneDNNLinear`` passes it); the totals weight each shape by its blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("training, one thread, ms:        tokens    in   out  forward MKL oneDNN ratio  input grad MKL oneDNN ratio")
    totals = [0.0] * 4
    for tokens, C, depth in ((12544, 96, 2), (3136, 192, 2), (784, 384, 6), (196, 768, 2)):
        for inputs, outputs in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):  # qkv, proj, fc1, fc2
            x, grad = torch.randn(tokens, inputs), torch.randn(tokens, outputs)
            weight, bias, out = torch.randn(outputs, inputs), torch.randn(outputs), torch.empty(tokens, outputs)
            times = [
                median_seconds(functools.partial(torch.addmm, bias, x, weight.t(), out=out)),
                median_seconds(functools.partial(fast._onednn_linear, x, weight, bias)),
                median_seconds(functools.partial(torch.mm, grad, weight)),
                median_seconds(functools.partial(fast._onednn_linear, grad, weight.t(), None)),
            ]
            totals = [total + depth * t for total, t in zip(totals, times, strict=True)]
            ms = [t * 1e3 for t in times]
            print(
                f"{tokens:>38} {inputs:>5} {outputs:>5} {ms[0]:12.2f} {ms[1]:6.2f} {ms[1] / ms[0]:5.2f}"
                f" {ms[2]:15.2f} {ms[3]:6.2f} {ms[3] / ms[2]:5.2f}"
            )
    ms = [t * 1e3 for t in totals]
    print(f"all blocks: forward MKL {ms[0]:.1f} ms, oneDNN {ms[1]:.1f} ms ({ms[1] / ms[0]:.2f}); ", end="")
    print(f"input gradient MKL {ms[2]:.1f} ms, oneDNN {ms[3]:.1f} ms ({ms[3] / ms[2]:.2f})")
    vendor = fast._cpu_vendor() or "unknown"
    print(f"fast.MKL_TRAINING_LINEARS here: {fast.MKL_TRAINING_LINEARS} (CPU vendor {vendor})")
    torch.set_num_threads(threads)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    if not fast.ONEDNN_LINEAR:
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    torch.manual_seed(0)
    linear_shapes()
    training_shapes()

    swinkit, timm = build("swinkit", "swin_t").eval(), build("timm", "swin_t").eval()
    x = torch.randn(16, 3, 224, 224)
    inference = BenchResult("inference", 16)
    calls = [("swinkit", switched(fast, "ONEDNN_LINEAR", True, lambda: swinkit(x))), ("timm", lambda: timm(x))]
    calls.append(("swinkit:no-onednn", switched(fast, "ONEDNN_LINEAR", False, lambda: swinkit(x))))
    with torch.inference_mode():
        _interleave(inference, calls, args.rounds, 2, Target())
    report(inference, "swinkit", "swinkit:no-onednn", "oneDNN speed-up")

    swinkit.train(), timm.train()
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    swinkit_step = functools.partial(_train_step, swinkit, training_optimizer("swinkit", swinkit), x, y)
    training = BenchResult("training", 8)
    calls = [("swinkit", switched(fast, "ONEDNN_LINEAR", True, swinkit_step))]
    calls.append(("timm", functools.partial(_train_step, timm, training_optimizer("timm", timm), x, y)))
    calls.append(("swinkit:no-onednn", switched(fast, "ONEDNN_LINEAR", False, swinkit_step)))
    calls.append(("swinkit:fresh-buffers", switched(fast, "REUSE_BUFFERS", False, swinkit_step)))
    _interleave(training, calls, args.rounds, 1, Target())
    report(training, "swinkit", "swinkit:no-onednn", "oneDNN speed-up")
    report(training, "swinkit", "swinkit:fresh-buffers", "reused-buffer speed-up")


if __name__ == "__main__":
    main()
