"""int8 dynamic quantization of the linear layers for CPU inference: speed, accuracy, batch dependence.

Optional and never swinkit's default. Contenders: swinkit and timm in float32, swinkit's
``quantize_dynamic`` (int8 weights per output channel, inputs per token, the fused path), and
``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` of timm's model (per-tensor
inputs; what a timm user would reach for).

- Accuracy: a trained checkpoint (default: the one ``make demo`` writes) on an image folder
  (default: the demo's held-out digits), float32 against swinkit's int8 and against torch.ao's
  per-tensor int8 on the same swinkit model (reference attention path, the one torch.ao's layers
  run on): top-1, agreement of the top-1 class with float32, and the relative error of the logits.
- Batch dependence: the largest relative change of an image's logits between running it alone and
  in its batch, for both int8 schemes (float32 for scale).
- Speed: Swin-T 224 with random weights, batch 16, interleaved in one process, medians.

    python benchmarks/int8_dynamic.py [--checkpoint runs/demo/model-best.safetensors]
        [--data runs/demo/val-images] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
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


def per_tensor_int8(model: nn.Module) -> nn.Module:
    """torch.ao's dynamic quantization of every nn.Linear (per-tensor inputs), on the path it runs on."""
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(model).eval()
    if hasattr(model, "set_attn_impl"):
        model.set_attn_impl("reference")  # swinkit's fused path reads float weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


@torch.inference_mode()
def accuracy(checkpoint: str, data: str) -> dict[str, dict[str, float]]:
    model = swinkit.create_model(checkpoint=read_any(checkpoint)).eval()
    dataset = image_folder(data, transform=eval_transform(model.config.preprocessing))
    loader = DataLoader(dataset, batch_size=64, collate_fn=collate_skipping_bad)
    schemes = {"float32": model, "swinkit int8": swinkit.quantize_dynamic(model)}
    schemes["torch.ao int8"] = per_tensor_int8(model)
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in schemes}
    labels = []
    for batch in loader:
        labels.append(batch["labels"])
        for name, scheme in schemes.items():
            logits[name].append(scheme(batch["images"]))
    truth = torch.cat(labels)
    joined = {name: torch.cat(values) for name, values in logits.items()}
    report = {}
    for name, values in joined.items():
        agreement = (values.argmax(1) == joined["float32"].argmax(1)).float().mean()
        report[name] = {
            "images": len(truth),
            "top1": 100.0 * float((values.argmax(1) == truth).float().mean()),
            "top1_agreement_with_float32": 100.0 * float(agreement),
            "logits_relative_error": relative_error(values, joined["float32"]),
        }
    return report


@torch.inference_mode()
def batch_dependence(model: nn.Module, images: torch.Tensor) -> float:
    """The largest relative change of one image's logits, alone against inside ``images``."""
    together = model(images)
    return max(relative_error(together[i], model(images[i : i + 1])[0]) for i in range(len(images)))


@torch.inference_mode()
def speed(rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    swinkit_model, timm_model = build("swinkit", "swin_t").eval(), build("timm", "swin_t").eval()
    contenders = {
        "swinkit fp32 (default)": swinkit_model,
        "timm fp32": timm_model,
        "swinkit int8 (quantize_dynamic)": swinkit.quantize_dynamic(swinkit_model),
        "timm int8 (torch.ao)": per_tensor_int8(timm_model),
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
    rates = {name: 16 / statistics.median(values) for name, values in times.items()}
    dependence = {name: batch_dependence(contenders[name], x[:8]) for name in list(contenders)[2:]}
    return rates, dependence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/model-best.safetensors")
    parser.add_argument("--data", default="runs/demo/val-images")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, values in accuracy(args.checkpoint, args.data).items():
        print(f"accuracy, {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    rates, dependence = speed(args.rounds)
    base = rates["timm fp32"]
    for name, rate in rates.items():
        print(f"{name:<32} {rate:6.2f} images/s  {rate / base:5.2f}x timm")
    for name, change in dependence.items():
        print(f"batch dependence, {name}: an image's logits alone against in a batch of 8, largest change {change:.2e}")


if __name__ == "__main__":
    main()
