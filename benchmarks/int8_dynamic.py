"""int8 dynamic quantization of the linear layers for CPU inference: speed and accuracy change.

Optional and never swinkit's default. ``torch.ao.quantization.quantize_dynamic`` swaps every
``nn.Linear`` for an int8-weight version that quantizes activations on the fly. The quantized
model runs the reference attention path (the fused path reads float weights directly).

Accuracy: a trained checkpoint (default: the one ``make demo`` writes) on an image folder (default:
the demo's held-out digits). Speed: Swin-T 224 with random weights, batch 16, interleaved with
fp32 swinkit and timm in one process, medians.

    python benchmarks/int8_dynamic.py [--checkpoint runs/demo/model-best.safetensors]
        [--data runs/demo/val-images] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

import swinkit
from swinkit.bench import build
from swinkit.checkpoint.load import read_any
from swinkit.data import collate_skipping_bad, eval_transform, image_folder


def quantized(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    model.set_attn_impl("reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)


@torch.inference_mode()
def top1(model: nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    for batch in loader:
        correct += int((model(batch["images"]).argmax(1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return 100.0 * correct / total


def accuracy(checkpoint: str, data: str) -> dict[str, float]:
    model = swinkit.create_model(checkpoint=read_any(checkpoint)).eval()
    dataset = image_folder(data, transform=eval_transform(model.config.preprocessing))
    loader = DataLoader(dataset, batch_size=64, collate_fn=collate_skipping_bad)
    fp32 = top1(model, loader)
    int8 = top1(quantized(model), loader)
    return {"images": len(dataset), "fp32_top1": fp32, "int8_top1": int8}


@torch.inference_mode()
def speed(rounds: int) -> dict[str, float]:
    contenders = {
        "swinkit fp32 (default)": build("swinkit", "swin_t").eval(),
        "timm fp32": build("timm", "swin_t").eval(),
        "swinkit int8 dynamic": quantized(build("swinkit", "swin_t")),
    }
    x = torch.randn(16, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for model in contenders.values():
        model(x)
    for _ in range(rounds):
        for name, model in contenders.items():
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
    return {name: 16 / statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/model-best.safetensors")
    parser.add_argument("--data", default="runs/demo/val-images")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("accuracy:", accuracy(args.checkpoint, args.data))
    rates = speed(args.rounds)
    base = rates["timm fp32"]
    for name, rate in rates.items():
        print(f"{name:<26} {rate:6.2f} images/s  {rate / base:5.2f}x timm")


if __name__ == "__main__":
    main()
