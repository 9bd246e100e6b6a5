"""What ``swinkit info`` prints: parameters, FLOPs and per-stage shapes of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .factory import create_model
from .flops import count_parameters, flops

# The sizes the papers quote dense FLOPs at: detection at 1280 x 800, segmentation at 512 x 2048.
DENSE_SIZES = {"detect": (800, 1280), "segment": (512, 2048)}


def describe_model(
    name: str | None, checkpoint: str | None = None, img_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Parameters, FLOPs (total and per stage) and stage shapes of a preset or a checkpoint's model.

    A dense model file (swinkit's, or an official mmdet / mmseg one) is described whole (task,
    heads, classes, all parameters), with its backbone's FLOPs and stages.
    """
    if name is None and checkpoint is not None:
        dense = _dense_model(checkpoint)
        if dense is not None:
            return _describe_dense(checkpoint, *dense, img_size)
    model = create_model(name, checkpoint=checkpoint)
    return _describe_swin(model, name or checkpoint, img_size)


def _describe_swin(
    model: nn.Module, title: str, img_size: tuple[int, int] | None, lead: list[str] | None = None
) -> dict[str, Any]:
    config = model.config
    H, W = img_size or (config.img_size, config.img_size)
    report = flops(model, (config.in_chans, H, W))
    params = count_parameters(model)
    stages = [
        {"stage": i, "channels": c, "height": h, "width": w, "stride": config.patch_size * 2**i, "flops": f}
        for i, ((c, h, w), f) in enumerate(zip(report.stage_shapes, report.stages, strict=True))
    ]
    output = "features only" if config.features_only else f"{config.num_classes} classes"
    text = [
        *(lead or []),
        f"{title if lead is None else 'backbone'}: Swin {config.family.upper()}, embed_dim {config.embed_dim}, "
        f"depths {config.depths}, heads {config.num_heads}, window {config.window_size}, {output}",
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


def _dense_model(checkpoint: str) -> tuple[nn.Module, Any] | None:
    """The whole model and spec of a dense model file, or None for any other checkpoint."""
    from .dense.weights import read_dense_file, rebuild_dense

    found = None if Path(checkpoint).is_dir() else read_dense_file(checkpoint)
    return None if found is None else (rebuild_dense(*found, checkpoint), found[0])


def _describe_dense(checkpoint: str, model: nn.Module, spec: Any, img_size: tuple[int, int] | None) -> dict[str, Any]:
    kind = spec.heads()
    swin = model.backbone.body.swin if spec.task == "detect" else model.backbone.swin
    shown = ", ".join(spec.classes[:5]) + (", ..." if len(spec.classes) > 5 else "")
    total = count_parameters(model)
    lead = [
        f"{checkpoint}: {spec.task} model, {kind}, {len(spec.classes)} classes ({shown})",
        f"parameters of the whole model: {total / 1e6:.2f} M ({total:,})",
    ]
    info = _describe_swin(swin, checkpoint, img_size or DENSE_SIZES[spec.task], lead)
    return {**info, "task": spec.task, "heads": kind, "classes": spec.classes, "total_params": total}
