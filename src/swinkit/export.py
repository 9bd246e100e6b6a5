"""Export a Swin model to ONNX (run by onnxruntime) or to a ``torch.export`` program (``.pt2``).

Both are traced from the reference attention path: fast paths and their caches step aside while
tracing (see :func:`swinkit.model.tracing`), so the exported graph is the readable one.

Batch, height and width are dynamic. Height and width are dynamic within the *window regime* of
the example size: the official classification rule shrinks the window (and drops the shift) of a
stage whose map is no larger than the window, which changes the graph, so one file covers the
sizes whose stages shrink the same way as the example's. For Swin-T (window 7) exported at 224,
stage 4 (7 x 7) shrinks, and the file takes any side in 113..224; exported at 256 or more, no
stage shrinks, and it takes any side from 225 up. :func:`side_range` computes the range; the
exporter reports it, the program asserts it at run time and an ONNX file returns NaN outside
it. Models with ``always_shift`` (the detection rule) never shrink windows, so one file covers
every size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torch-export")
DEFAULT_OPSET = 18  # the opset torch's dynamo exporter targets; 17+ as asked for


def _example(model: nn.Module, img_size: tuple[int, int] | None, batch: int) -> torch.Tensor:
    config = model.config
    height, width = img_size or (config.img_size, config.img_size)
    parameter = next(model.parameters())
    return torch.randn(batch, config.in_chans, height, width, dtype=parameter.dtype, device=parameter.device)


MAX_SIDE = 8192  # the largest height / width an exported file accepts


def side_range(model: nn.Module, side: int) -> tuple[int, int]:
    """Sizes of an image side that use the same windows in every stage as ``side`` does.

    Stage ``i`` sees ``ceil(side / (patch * 2**i))`` rows; its window shrinks when that is no
    more than its window size ``w``, that is when ``side <= w * patch * 2**i``.
    """
    config = model.config
    low, high = 2, MAX_SIDE  # torch.export treats sizes 0 and 1 as special: 2 is its smallest dynamic size
    if config.always_shift:
        return low, high
    for stage, layer in enumerate(model.layers):
        limit = layer.blocks[0].window_size * config.patch_size * 2**stage
        if side <= limit:
            high = min(high, limit)
        else:
            low = max(low, limit + 1)
    return low, high


def dynamic_shapes(model: nn.Module, example: torch.Tensor, dynamic_size: bool) -> dict[str, dict[int, Any]]:
    # min=1 keeps a batch of one legal (torch.export otherwise specialises sizes 0 and 1).
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size and _is_swinkit(model):  # other libraries' models (benchmark peers): batch only
        for dim, name in ((2, "height"), (3, "width")):
            low, high = side_range(model, example.shape[dim])
            dims[dim] = torch.export.Dim(name, min=low, max=high)
    return {"x": dims}


def export_program(
    model: nn.Module,
    img_size: tuple[int, int] | None = None,
    dynamic_size: bool = True,
    example: torch.Tensor | None = None,
    nan_outside_range: bool = False,
) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of ``model`` in eval mode, dynamic in batch (and height / width).

    Guards that the shape engine cannot prove (they hold for every size in the range) become
    run-time assertions instead of export errors. ``nan_outside_range`` makes every output NaN for
    an image size outside the range, for runtimes that drop those assertions (ONNX).
    """
    model = model.eval()
    example = _example(model, img_size, 2) if example is None else example
    shapes = dynamic_shapes(model, example, dynamic_size)
    if nan_outside_range and len(shapes["x"]) == 3:  # height and width are dynamic
        ranges = size_ranges(model, tuple(example.shape[2:]))
        model = _NaNOutsideRange(model, [ranges["height"], ranges["width"]]).eval()
    with torch.no_grad():
        return torch.export.export(
            model, (example,), dynamic_shapes=shapes, prefer_deferred_runtime_asserts_over_guards=True
        )


class _NaNOutsideRange(nn.Module):
    """Every output NaN when the height or width is outside its range; the outputs unchanged inside.

    onnxruntime cannot run the program's range assertions, and a graph traced for one window
    regime gives plausible but wrong numbers for a size of another; NaN makes that impossible to
    miss. The check is made on tensors built from the input's shape, so it stays in the graph.
    """

    def __init__(self, model: nn.Module, ranges: list[list[int]]) -> None:
        super().__init__()
        self.model, self.ranges = model, ranges

    def forward(self, x: torch.Tensor) -> Any:
        inside = torch.ones((), dtype=torch.bool, device=x.device)
        for side, (low, high) in zip(x.shape[2:], self.ranges, strict=True):
            size = torch.full((), side, dtype=torch.int64, device=x.device)
            inside = inside & (size >= low) & (size <= high)
        outputs = self.model(x)
        nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
        if isinstance(outputs, list | tuple):
            return type(outputs)(torch.where(inside, output, nan) for output in outputs)
        return torch.where(inside, outputs, nan)


def save_program(
    model: nn.Module, path: str | os.PathLike, img_size: tuple[int, int] | None = None, dynamic_size: bool = True
) -> Path:
    """Write a ``.pt2`` program; ``torch.export.load(path).module()`` runs it."""
    path = Path(path)
    program = export_program(model, img_size, dynamic_size)
    torch.export.save(program, _temporary(path))
    os.replace(_temporary(path), path)
    return path


def export_onnx_model(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor | None = None,
    opset: int = DEFAULT_OPSET,
    class_names: list[str] | None = None,
    dynamic_size: bool = True,
) -> Path:
    """Write ``model`` as ONNX with input ``images`` (N, C, H, W) and output ``logits`` or ``features{i}``.

    ``example`` picks the window regime (default: the model's own size); see :func:`side_range`.
    The file's metadata holds the swinkit config (with its preprocessing), the accepted size range
    and the class names, so a runtime user needs nothing else. Outside the range every output is
    NaN (onnxruntime cannot assert the range; see :class:`_NaNOutsideRange`).
    """
    path = Path(path)
    model = model.eval()
    example = example if example is not None else _example(model, None, 2)
    config = getattr(model, "config", None)
    features = _is_swinkit(model) and config.features_only
    outputs = [f"features{i}" for i in config.out_indices] if features else ["logits"]
    program = export_program(model, dynamic_size=dynamic_size, example=example, nan_outside_range=True)
    with warnings.catch_warnings(), torch.no_grad(), _quiet("onnxscript", "onnx_ir", "torch.onnx"):
        # The exporter warns and logs about its own internals (deprecated fields, optimizer passes).
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=outputs,
            optimize=True,
            verbose=False,
        )
    onnx_program.save(str(_temporary(path)))
    if _is_swinkit(model):
        metadata = _model_metadata(model, tuple(example.shape[2:]), class_names, static_size=not dynamic_size)
        _add_metadata(_temporary(path), metadata)
    os.replace(_temporary(path), path)
    return path


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _is_swinkit(model: nn.Module) -> bool:
    from .variants import SwinConfig

    return isinstance(getattr(model, "config", None), SwinConfig)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an exported file."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_error(session: Any, model: nn.Module, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's output and eager PyTorch on ``images``."""
    output = session.run(None, {session.get_inputs()[0].name: images.detach().cpu().numpy()})
    with torch.no_grad():
        expected = _listed(model.eval()(images))
    return max(float((torch.from_numpy(o) - e.cpu()).abs().max()) for o, e in zip(output, expected, strict=True))


def export(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str = "onnx",
    img_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    class_names: list[str] | None = None,
    static_size: bool = False,
) -> dict[str, Any]:
    """Export and, with ``check``, compare the file with eager (:func:`check_export`).

    Returns ``{"path", "format", "example_size", "size_range", "max_abs_error"}``: the file takes
    any batch and any height / width inside ``size_range`` (see :func:`side_range`). With
    ``static_size`` height and width are fixed to the example's: the graph pads and crops with
    plain ops instead of size-generic gathers, and runs faster.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if not Path(path).parent.is_dir():  # fail before a minute of tracing, not after
        raise FileNotFoundError(f"cannot write {path}: folder {Path(path).parent} does not exist")
    model = model.eval()
    example = _example(model, img_size, 2)
    size = tuple(example.shape[2:])
    if fmt == "onnx":
        path = export_onnx_model(model, path, example, opset, class_names, dynamic_size=not static_size)
    else:
        path = save_program(model, path, size, dynamic_size=not static_size)
    ranges = size_ranges(model, size, static_size)
    report: dict[str, Any] = {"path": str(path), "format": fmt, "example_size": list(size), "size_range": ranges}
    if check:
        report["max_abs_error"] = check_export(model, path, fmt, size, static_size)
    logger.info("wrote %s (%s; dynamic batch, height in %s, width in %s)", path, fmt, ranges["height"], ranges["width"])
    return report


def size_ranges(model: nn.Module, size: tuple[int, ...], static_size: bool = False) -> dict[str, list[int]]:
    """The height and width range an exported file accepts (``[side, side]`` when static)."""
    if static_size:
        return {"height": [size[0], size[0]], "width": [size[1], size[1]]}
    return {"height": list(side_range(model, size[0])), "width": list(side_range(model, size[1]))}


def check_sizes(model: nn.Module, size: tuple[int, ...], static_size: bool = False) -> list[tuple[int, int]]:
    """The example size and a second, different size in the exported range (odd, so padding differs)."""
    if static_size:
        return [tuple(size), tuple(size)]
    other = []
    for side in size:
        low, high = side_range(model, side)
        other.append(min(high, side + 37) if side + 37 <= high else max(low, side - 37))
    return [tuple(size), tuple(other)]


def check_export(
    model: nn.Module, path: str | os.PathLike, fmt: str, size: tuple[int, ...], static_size: bool = False
) -> float:
    """Largest absolute error of the exported file against eager: batch 1 and 3, two image sizes."""
    generator = torch.Generator().manual_seed(0)
    channels = model.config.in_chans
    sizes = check_sizes(model, size, static_size)
    batches = [torch.randn(n, channels, *hw, generator=generator) for n, hw in zip((1, 3), sizes, strict=True)]
    if fmt == "onnx":
        session = onnx_session(path)
        return max(onnx_error(session, model, images) for images in batches)
    program = torch.export.load(str(path)).module()
    errors = []
    with torch.no_grad():
        for images in batches:
            pairs = zip(_listed(program(images)), _listed(model(images)), strict=True)
            errors += [float((o - e).abs().max()) for o, e in pairs]
    return max(errors)


def _listed(output: Any) -> list[torch.Tensor]:
    return list(output) if isinstance(output, list | tuple) else [output]


def _model_metadata(
    model: nn.Module, size: tuple[int, ...], class_names: list[str] | None, static_size: bool = False
) -> dict[str, str]:
    """The ONNX file's metadata: config, accepted height / width range, class names."""
    import dataclasses

    config = model.config
    ranges = size_ranges(model, size, static_size)
    metadata = {"swinkit.config": json.dumps(dataclasses.asdict(config)), "swinkit.size_range": json.dumps(ranges)}
    if class_names:
        metadata["swinkit.class_names"] = json.dumps(list(class_names))
    return metadata


def compile_model(model: nn.Module, **options: Any) -> Callable[[torch.Tensor], Any]:
    """``torch.compile(model, **options)`` with a dynamic batch and a static height and width.

    A new image size compiles a new graph (once per size) instead of letting torch.compile mark
    height and width dynamic: Swin's padding arithmetic across four stages defeats the symbolic
    shape engine of torch 2.14 there. The batch dimension is dynamic after the second batch size.
    """
    compiled = torch.compile(model, **options)

    def run(images: torch.Tensor) -> Any:
        torch._dynamo.mark_static(images, 2)
        torch._dynamo.mark_static(images, 3)
        return compiled(images)

    return run
