"""Fast paths against the reference on random architectures and inputs (seeded, so each case reruns).

The other attention tests use the two tiny presets; these draw everything a config can change
(stage count and depths, head size, window 1 to 12, patch size, MLP ratio, biases, absolute
position embedding, the detection window rule, backbone outputs and stage norms, V2's pretrained
windows and extra norms) and any input size, batch, memory layout and mode, as a user's config
might. float64 cases must match the reference to 1e-10; float32 ones are judged by their distance
to a float64 run of the same model, against the reference path's own distance.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import swinkit

SEEDS = range(24)
IMPLS = ("fused", "sdpa")


def random_case(seed: int) -> tuple[str, dict, torch.Tensor, bool, bool]:
    """A preset, its overrides, an input, training mode, and whether gradients are taken."""
    rng = random.Random(seed)
    stages, heads = rng.randint(1, 4), rng.choice([1, 2, 3])
    overrides = {
        "embed_dim": heads * rng.choice([4, 5, 8, 12, 32]),
        "depths": tuple(rng.randint(1, 3) for _ in range(stages)),
        "num_heads": tuple(heads * 2**stage for stage in range(stages)),
        "window_size": rng.choice([1, 2, 3, 4, 5, 7, 8, 12]),
        "patch_size": rng.choice([1, 2, 4]),
        "img_size": rng.choice([16, 32, 48, 64]),
        "mlp_ratio": rng.choice([1.0, 2.0, 3.5, 4.0]),
        "qkv_bias": rng.random() < 0.8,
        "ape": rng.random() < 0.2,
        "patch_norm": rng.random() < 0.8,
        "always_shift": rng.random() < 0.3,
        "num_classes": 7,
        "drop_path_rate": 0.0,
    }
    if rng.random() < 0.3:
        overrides["features_only"] = True
        overrides["out_indices"] = tuple(sorted(rng.sample(range(stages), rng.randint(1, stages))))
    name = rng.choice(["swin_test", "swinv2_test"])
    if name == "swinv2_test":
        if rng.random() < 0.4:
            overrides["pretrained_window_sizes"] = tuple(rng.choice([0, 3, 4, 6, 8]) for _ in range(stages))
        if rng.random() < 0.2:
            overrides["extra_norm_period"] = rng.choice([1, 2])
    dtype = rng.choice([torch.float32, torch.float64])
    batch, height, width = rng.randint(1, 6), rng.randint(1, 120), rng.randint(1, 120)
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    layout = rng.choice(["plain", "channels_last", "transposed"])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    training = rng.random() < 0.5
    return name, overrides, x, training, training or rng.random() < 0.3


def run(model: torch.nn.Module, x: torch.Tensor, grad: bool) -> list[torch.Tensor]:
    """The outputs, then (with ``grad``) the input's and every parameter's gradient."""
    if not grad:
        with torch.no_grad():
            out = model(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    x = x.clone().requires_grad_(True)
    out = model(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b``; an all-zero ``b`` (a zero gradient) counts absolutely."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("seed", SEEDS)
def test_fast_paths_match_the_reference_on_a_random_architecture(seed):
    name, overrides, x, training, grad = random_case(seed)
    torch.manual_seed(seed)
    model = swinkit.create_model(name, attn_impl="reference", **overrides).to(x.dtype).train(training)
    with torch.no_grad():
        for parameter in model.parameters():  # away from the zero / one initialisations
            parameter.add_(torch.randn_like(parameter) * 0.05)
    reference = run(model, x, grad)
    if x.dtype == torch.float32:
        truth = run(copy.deepcopy(model).double(), x.double(), grad)
        reference_errors = [distance(r, t) for r, t in zip(reference, truth, strict=True)]
    for impl in IMPLS:
        fast = copy.deepcopy(model)
        fast.set_attn_impl(impl)
        results = run(fast, x, grad)
        assert [r.shape for r in results] == [r.shape for r in reference], (impl, overrides)
        for index, result in enumerate(results):
            if x.dtype == torch.float64:
                assert distance(result, reference[index]) < 1e-10, (impl, index, overrides)
            else:  # float rounding in another order: no further from float64 than the reference, within 10x
                error = distance(result, truth[index])
                assert error < max(10 * reference_errors[index], 1e-5), (impl, index, error, overrides)
