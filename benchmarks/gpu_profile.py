"""Where a GPU's time goes: kernel time against wall time, and the costliest kernels, per contender.

    python benchmarks/gpu_profile.py [model] [batch] [contender ...]

For each contender (names as in ``swinkit bench``: swinkit, swinkit:<attn_impl>, timm, ...) one
bf16-autocast inference forward and one training step (forward, backward and an AdamW step, the
same fused AdamW for every contender on a GPU) are profiled after a warm-up: wall milliseconds,
milliseconds the GPU spent in kernels, the kernel count, and the kernels that take the most time.
Kernel time well under wall time means the host (Python and launches) is the limit, not the GPU.
Runs on the CPU too (host-side figures only), to check it.
"""

from __future__ import annotations

import functools
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from swinkit.bench import build

ROWS = 12


def kernel_time_us(event) -> float:
    """Self time on the device of one averaged profiler event (the attribute's name changed in torch 2.x)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profiled(call, device: torch.device, repeats: int = 3) -> None:
    for _ in range(2):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / repeats * 1000
    events = [e for e in prof.key_averages() if kernel_time_us(e) > 0 and e.cpu_time_total == 0]
    busy = sum(kernel_time_us(e) for e in events) / repeats / 1000
    launches = sum(e.count for e in events) / repeats
    print(f"  wall {wall:.2f} ms (profiled), kernels {busy:.2f} ms, {launches:.0f} kernel launches")
    for event in sorted(events, key=kernel_time_us, reverse=True)[:ROWS]:
        share = kernel_time_us(event) / repeats / 1000
        print(f"    {share:7.3f} ms {event.count // repeats:5d}x  {event.key[:110]}")


def infer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        model.eval()(x)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model.train()(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    model_name = sys.argv[1] if len(sys.argv) > 1 else "swin_t"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    names = sys.argv[3:] or ["swinkit", "timm"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 224 if model_name.endswith(("_t", "_s", "_b")) else 64
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    for name in names:
        model = build(name, model_name).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        calls = (
            ("inference", functools.partial(infer, model, x, y)),
            ("training step (forward, backward, AdamW)", functools.partial(train_step, model, optimizer, x, y)),
        )
        for mode, call in calls:
            print(f"{name} {model_name} batch {batch} {mode}:", flush=True)
            profiled(call, device)
        del model, optimizer


if __name__ == "__main__":
    main()
