"""What ``swinkit info`` prints: parameters, FLOPs and per-stage shapes of a model."""

from __future__ import annotations

from typing import Any

from .factory import create_model
from .flops import count_parameters, flops


def describe_model(
    name: str | None, checkpoint: str | None = None, img_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Parameters, FLOPs (total and per stage) and stage shapes of a preset or a checkpoint's model."""
    model = create_model(name, checkpoint=checkpoint)
    config = model.config
    H, W = img_size or (config.img_size, config.img_size)
    report = flops(model, (config.in_chans, H, W))
    params = count_parameters(model)
    stages = [
        {"stage": i, "channels": c, "height": h, "width": w, "stride": config.patch_size * 2**i, "flops": f}
        for i, ((c, h, w), f) in enumerate(zip(report.stage_shapes, report.stages, strict=True))
    ]
    title = name or checkpoint
    text = [
        f"{title}: Swin {config.family.upper()}, embed_dim {config.embed_dim}, depths {config.depths}, "
        f"heads {config.num_heads}, window {config.window_size}, {config.num_classes} classes",
        f"parameters: {params / 1e6:.2f} M ({params:,})",
        f"FLOPs at {H}x{W}: {report.total / 1e9:.2f} G (multiply-adds, counted as in the paper)",
        "stage  stride  shape (C x H x W)    GFLOPs",
    ]
    for s in stages:
        shape = f"{s['channels']:>4} x {s['height']:>3} x {s['width']:<5}"
        text.append(f"{s['stage']:>5}  {s['stride']:>6}  {shape}  {s['flops'] / 1e9:8.3f}")
    return {
        "name": title,
        "family": config.family,
        "params": params,
        "input_size": [config.in_chans, H, W],
        "flops": report.total,
        "stages": stages,
        "text": "\n".join(text),
    }
