"""What ``swinkit info`` prints: parameters, FLOPs and per-stage shapes of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .factory import create_model
from .flops import count_parameters, flops


def describe_model(
    name: str | None,
    checkpoint: str | None = None,
    img_size: tuple[int, int] | None = None,
    dense: str | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Parameters, FLOPs (total and per stage) and stage shapes of a preset or a checkpoint's model.

    A dense model file (swinkit's, or an official mmdet / mmseg one) is described whole (task,
    heads, classes, all parameters, the whole model's FLOPs as the dense papers count them), with
    its backbone's FLOPs and stages; so is a ``dense`` kind (``mask_rcnn``, ``cascade_mask_rcnn``,
    ``upernet``, ...: :data:`swinkit.dense.weights.DENSE_KINDS`) on preset ``name``'s backbone,
    for ``num_classes`` classes (default COCO's 80 or ADE20K's 150).
    """
    if dense is not None:
        import torch

        from .dense.weights import build_dense_model, preset_spec

        if name is None or checkpoint is not None:
            raise ValueError("--dense describes a preset's backbone: give a preset name and no --checkpoint")
        spec = preset_spec(name, dense, num_classes)
        with torch.device("meta"):  # shapes are all a description needs
            model = build_dense_model(spec)
        return _describe_dense(name, model, spec, img_size)
    if name is None and checkpoint is not None:
        found = _dense_model(checkpoint)
        if found is not None:
            return _describe_dense(checkpoint, *found, img_size)
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


def _describe_dense(title: str, model: nn.Module, spec: Any, img_size: tuple[int, int] | None) -> dict[str, Any]:
    from .dense.flops import dense_flops

    kind = spec.heads()
    swin = model.backbone.body.swin if spec.task == "detect" else model.backbone.swin
    shown = ", ".join(spec.classes[:5]) + (", ..." if len(spec.classes) > 5 else "")
    total = count_parameters(model)
    whole = dense_flops(spec, img_size)
    lead = [
        f"{title}: {spec.task} model, {kind}, {len(spec.classes)} classes ({shown})",
        f"parameters of the whole model: {total / 1e6:.2f} M ({total:,})",
        str(whole),
    ]
    info = _describe_swin(swin, title, whole.input_size, lead)
    return {
        **info,
        "task": spec.task,
        "heads": kind,
        "classes": spec.classes,
        "total_params": total,
        "model_flops": whole.total,
        "model_flops_parts": whole.parts,
    }
