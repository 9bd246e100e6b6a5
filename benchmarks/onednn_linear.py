"""Ablation of the fused path's oneDNN linears: the same model with and without them, beside timm.

``swinkit.fast`` sends the linear layers of eager float32 CPU work through oneDNN (no grad: with
GELU / the residual add as post-ops; training: ``OneDNNLinear``, oneDNN forward, MKL weight
gradient, the input gradient where ``swinkit.fast.MKL_INPUT_GRADIENT`` says). This script turns
that off and on by the module switch ``swinkit.fast.ONEDNN_LINEAR``, interleaving per round:
swinkit with oneDNN, timm, swinkit without.
It also times the linear shapes of Swin-T's blocks alone, one thread (what an image-parallel worker
runs): ``F.linear`` (MKL) against oneDNN, and the training input gradients the same way, the
measurement behind ``swinkit.fast.MKL_INPUT_GRADIENT``.

    python benchmarks/onednn_linear.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from ablation import arguments, median_seconds, report, switched

from swinkit import fast, native
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


def input_gradient_shapes() -> None:
    """The input gradient ``grad @ W`` of Swin-T's linears at one worker's share of a training batch of
    8 (4 images), one thread: MKL against oneDNN (on the transposed weight, as ``OneDNNLinear``
    passes it); the totals weight each shape by its blocks per stage."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("input gradient, one thread, ms:  tokens    in   out    MKL  oneDNN  ratio")
    mkl_total = onednn_total = 0.0
    for tokens, C, depth in ((12544, 96, 2), (3136, 192, 2), (784, 384, 6), (196, 768, 2)):
        for inputs, outputs in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):  # qkv, proj, fc1, fc2
            grad, weight = torch.randn(tokens, outputs), torch.randn(outputs, inputs)
            mkl = median_seconds(functools.partial(torch.mm, grad, weight))
            onednn = median_seconds(functools.partial(fast._onednn_linear, grad, weight.t(), None))
            mkl_total, onednn_total = mkl_total + depth * mkl, onednn_total + depth * onednn
            print(f"{tokens:>39} {inputs:>5} {outputs:>5} {mkl * 1e3:6.2f} {onednn * 1e3:7.2f} {onednn / mkl:6.2f}")
    print(
        f"all blocks: MKL {mkl_total * 1e3:.1f} ms, oneDNN {onednn_total * 1e3:.1f} ms ({onednn_total / mkl_total:.2f})"
    )
    vendor = native.cpu_vendor() or "unknown"
    print(f"fast.MKL_INPUT_GRADIENT here: {fast.MKL_INPUT_GRADIENT} (CPU vendor {vendor})")
    torch.set_num_threads(threads)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    if not fast.ONEDNN_LINEAR:
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    torch.manual_seed(0)
    linear_shapes()
    input_gradient_shapes()

    swinkit, timm = build("swinkit", "swin_t").eval(), build("timm", "swin_t").eval()
    x = torch.randn(16, 3, 224, 224)
    inference = BenchResult("inference", 16)
    calls = [("swinkit", switched(fast, "ONEDNN_LINEAR", True, lambda: swinkit(x))), ("timm", lambda: timm(x))]
    calls.append(("swinkit:no-onednn", switched(fast, "ONEDNN_LINEAR", False, lambda: swinkit(x))))
    with torch.inference_mode():
        _interleave(inference, calls, args.rounds, 2, Target())
    inference.raise_failures()
    report(inference, "swinkit", "swinkit:no-onednn", "oneDNN speed-up")

    swinkit.train(), timm.train()
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    swinkit_step = functools.partial(_train_step, swinkit, training_optimizer("swinkit", swinkit), x, y)
    training = BenchResult("training", 8)
    calls = [("swinkit", switched(fast, "ONEDNN_LINEAR", True, swinkit_step))]
    calls.append(("timm", functools.partial(_train_step, timm, training_optimizer("timm", timm), x, y)))
    calls.append(("swinkit:no-onednn", switched(fast, "ONEDNN_LINEAR", False, swinkit_step)))
    _interleave(training, calls, args.rounds, 1, Target())
    training.raise_failures()
    report(training, "swinkit", "swinkit:no-onednn", "oneDNN speed-up")


if __name__ == "__main__":
    main()
