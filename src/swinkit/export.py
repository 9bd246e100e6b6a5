"""Export a Swin model to ONNX (run by onnxruntime) or to a ``torch.export`` program (``.pt2``).

Both are traced from the reference attention path: fast paths and their caches step aside while
tracing (see :func:`swinkit.model.tracing`), so the exported graph is the readable one.

Batch, height and width are dynamic, and one file serves every image side from 1 up to
:data:`MAX_SIDE` (:data:`SIDE_RANGE`). The official classification rule clamps the window of a
stage whose map fits in one window, which would tie a traced graph to the example's clamps; traced with
a symbolic size, the blocks write that rule without branching on the size (see
:func:`swinkit.model.window_and_shift`), so no size picks another graph. The trace uses a generic
example size of the library's choosing (no map side of one window or of one token, odd sides), so
that the shape engine's layout guesses hold for every size rather than for the example's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import pickle
import threading
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config

from .checkpoint.io import atomic_write, export_destination, file_kind, missing_file, staging
from .model import SwinTransformer, cells, derived_once_per_trace
from .quantize import refuse_int8

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torch-export")
DEFAULT_OPSET = 18  # the opset torch's dynamo exporter targets
# LayerNormalization, one operator per norm, exists from opset 17 on. torch's exporter writes 18 and
# up; for 17 its own conversion failed (and kept 18 without an error), so 17 is converted here after
# it, by onnx's version converter.
MIN_OPSET = 17
# The largest error of an exported file's outputs, relative to the largest eager output, that its
# check against eager accepts (float32 rounding through a whole model). Measured: trained Swin-T,
# Swin-B 384 and SwinV2-B 384 reach 4e-7 to 8e-7 in onnxruntime; the tiny test models up to 5.2e-6
# (one class: a logit or two set the scale); programs run torch's own kernels (4.4e-7, often 0).
CHECK_TOLERANCE = {"onnx": 2e-5, "torch-export": 1e-5}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; after it every sub-module in the mode it had before.

    Exporting traces the eval-mode function; a caller's model that was training (a run exporting
    mid-way) must go on training, with dropout and stochastic depth, and its frozen parts in eval.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def refuse_non_float32(model: nn.Module, what: str = "export") -> None:
    """Refuse a model whose floating-point weights are not all float32, before any tracing.

    An exported file takes and computes float32: onnxruntime's CPU kernels (its convolutions among
    them) are float32 ones, and swinkit's readers of the files (predict, eval, the dense commands) feed
    float32 images; a float64 or bfloat16 trace failed when checked, after the file was written.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
    if dtypes not in ([], ["float32"]):
        raise TypeError(
            f"{what} writes float32 files (onnxruntime's CPU kernels and swinkit's predict and eval take float32); "
            f"this model's weights are {', '.join(dtypes)}: export model.float()"
        )


def max_opset() -> int | None:
    """The newest ONNX opset torch's dynamo exporter writes here: onnxscript's version converter's
    last (25 with onnxscript 0.7), which converts the exporter's graph to the opset asked for; None
    where onnxscript does not say (the written file's opset is still checked, :func:`_at_opset`)."""
    try:
        from onnxscript.version_converter import _version_converter
    except ImportError:
        return None
    return getattr(_version_converter, "SUPPORTED_MAX_ONNX_OPSET", None)


def check_opset(opset: int) -> None:
    """Refuse an ONNX opset the exporter cannot write, before the trace (which takes minutes)."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"the ONNX opset is a whole number, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be at least {MIN_OPSET} (LayerNormalization's), got {opset}")
    highest = max_opset()
    if highest is not None and opset > highest:
        raise ValueError(
            f"torch's exporter cannot write ONNX opset {opset} here: it writes {MIN_OPSET} to {highest} "
            f"({highest} is the last its version converter, onnxscript's, knows)"
        )


def image_sides(img_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``img_size`` as ``(height, width)``: one whole number is a square; ``None`` stays."""
    if img_size is None:
        return None
    sides = (img_size, img_size) if isinstance(img_size, int) and not isinstance(img_size, bool) else img_size
    fits = isinstance(sides, (tuple, list)) and len(sides) == 2
    if not fits or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        raise ValueError(f"img_size must be a side or (height, width), whole numbers above 0; got {img_size!r}")
    return tuple(sides)


def _example(model: nn.Module, img_size: int | tuple[int, int] | None, batch: int) -> torch.Tensor:
    config = model.config
    height, width = image_sides(img_size) or (config.img_size, config.img_size)
    parameter = next(model.parameters())
    return torch.randn(batch, config.in_chans, height, width, dtype=parameter.dtype, device=parameter.device)


MAX_SIDE = 8192  # the largest height / width an exported file accepts


# The image sides a file exported with a dynamic height and width accepts. Maps of a single token
# per side are included: the trace is size-oblivious (see export_program), so no layout is chosen on
# the assumption that a side is not 1.
SIDE_RANGE = (1, MAX_SIDE)


def trace_sides(model: nn.Module) -> tuple[int, int]:
    """Height and width of the example a dynamic-size export traces with: generic sizes.

    The shape engine answers some questions about sizes (is this side 1? does it divide?) from
    the example and keeps the answer as an assumption. At these sides the answers are the general
    ones: every stage has at least three windows per side, no side divides by its window (unless
    that is 1) or by the merging's 2 (so every padding step is traced), and height differs from width.
    """
    config = model.config
    windows = [layer.blocks[0].window_size for layer in model.layers]
    stride = config.patch_size * 2 ** (len(windows) - 1)

    def generic(side: int) -> bool:
        maps = [cells(side, config.patch_size * 2**stage) for stage in range(len(windows))]
        # The patch embedding or a merging would have nothing to pad (a patch of 1 never pads).
        if (config.patch_size > 1 and side % config.patch_size == 0) or any(size % 2 == 0 for size in maps[:-1]):
            return False
        # A window of 1 (a model built for images whose last map is one token) divides every side.
        return all(size > 2 * w and (size % w or w == 1) for size, w in zip(maps, windows, strict=True))

    def first_generic(start: int) -> int:
        side = next((side for side in range(start, MAX_SIDE) if generic(side)), None)
        if side is None:  # not reached by any configuration swinkit builds; a bound instead of a hang
            raise ValueError(f"found no generic trace size below {MAX_SIDE} for {config}")
        return side

    height = first_generic(stride * (2 * max(windows) + 1) + 1)
    return height, first_generic(height + 1)


def dynamic_shapes(model: nn.Module, dynamic_size: bool) -> dict[str, dict[int, Any]]:
    """``torch.export``'s dynamic dimensions of the input: the batch, and height and width when ``dynamic_size``."""
    # min=1 keeps a batch of one legal (torch.export otherwise specialises sizes 0 and 1).
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size and _is_swinkit(model):  # other libraries' models (benchmark peers): batch only
        low, high = SIDE_RANGE
        dims[2] = torch.export.Dim("height", min=low, max=high)
        dims[3] = torch.export.Dim("width", min=low, max=high)
    return {"x": dims}


def export_program(
    model: nn.Module,
    img_size: tuple[int, int] | None = None,
    dynamic_size: bool = True,
    example: torch.Tensor | None = None,
    nan_outside_range: bool = False,
) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of ``model`` in eval mode, dynamic in batch (and height / width).

    With a dynamic height and width (swinkit models), the trace uses :func:`trace_sides` instead
    of ``img_size`` or ``example``'s size, and the program's scalar assertions are dropped (see
    :func:`_drop_layout_assertions`); the input range (:data:`SIDE_RANGE`) is still checked.
    ``nan_outside_range`` makes every output NaN for an image size outside the range, for runtimes
    that do not check it (ONNX). ``model`` is left in the mode it was in.
    """
    example = _example(model, img_size, 2) if example is None else example
    if example.shape[0] < 2:  # torch.export would tie a dynamic batch traced at 1 to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    shapes = dynamic_shapes(model, dynamic_size)
    dynamic_sides = len(shapes["x"]) == 3
    if dynamic_sides:
        example = _example(model, trace_sides(model), example.shape[0])
    traced = _NaNOutsideRange(model, [list(SIDE_RANGE)] * 2) if nan_outside_range and dynamic_sides else model
    # Size-oblivious: the shape engine otherwise decides layouts assuming no map side is 1 and
    # guards on it (Swin-T: every side at least 33, and exporting fails for a range from 1);
    # with it one graph serves every side from 1 (tested against eager down to 1 x 1).
    oblivious = fx_config.patch(backed_size_oblivious=dynamic_sides)
    with eval_mode(traced), torch.no_grad(), oblivious, derived_once_per_trace():
        program = torch.export.export(
            traced, (example,), dynamic_shapes=shapes, prefer_deferred_runtime_asserts_over_guards=True
        )
    if dynamic_sides:
        _drop_layout_assertions(program)
    return program


def _drop_layout_assertions(program: torch.export.ExportedProgram) -> None:
    """Remove the program's run-time assertions on sizes, keeping the check of the input range.

    The shape engine asks whether a size can be 1 (does a reshape need a copy?) and records "not
    1" as an assertion. Swin's window counts are 1 for small maps, so these assertions would reject
    sizes the graph computes correctly: the ops themselves (reshape, gathers) are size-generic,
    which the tests check against eager at sizes in every window regime. ONNX drops them anyway.
    """
    graph = program.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_scalar.default:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    program.graph_module.recompile()


class _NaNOutsideRange(nn.Module):
    """Every output NaN when the height or width is outside its range; the outputs unchanged inside.

    onnxruntime does not check the program's input range. Below it the graph runs on maps of one
    token per side, a case it was not traced or tested for, and its numbers, if any, would look
    plausible; NaN makes that impossible to miss. The check is made on tensors built from the
    input's shape, so it stays in the graph.
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


PROGRAM_METADATA = "swinkit.json"  # the file in a .pt2 archive with the ONNX file's metadata


def save_program(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: tuple[int, int] | None = None,
    dynamic_size: bool = True,
    class_names: list[str] | None = None,
) -> Path:
    """Write a ``.pt2`` program; ``load_program(path).module()`` (or ``torch.export.load``, slower) runs it.

    A swinkit model's archive also holds :data:`PROGRAM_METADATA`: the metadata an ONNX file gets
    (config with its preprocessing, size range, class names), so that prediction and evaluation
    take the program in place of a checkpoint (:class:`ProgramClassifier`).
    """
    refuse_non_float32(model)
    path = Path(path)
    program = export_program(model, img_size, dynamic_size)
    extra = {}
    if _is_swinkit(model):
        size = image_sides(img_size) or (model.config.img_size,) * 2
        extra[PROGRAM_METADATA] = json.dumps(_model_metadata(model, size, class_names, static_size=not dynamic_size))
    atomic_write(path, lambda temporary: torch.export.save(program, temporary, extra_files=extra))
    return path


def load_program(path: str | os.PathLike, extra_files: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """``torch.export.load(path, extra_files=extra_files)``, with each distinct symbolic size parsed once.

    torch's reader parses the size expression of every tensor in the graph with sympy, again for
    each tensor that repeats it: a size-generic Swin-T program holds 3733 of them, 279 distinct,
    and takes 25-30 s to read on two cores. Here the reader keeps what it parsed for the length of
    the load (the same objects, the same shape environment), which reads that file in about 6 s.
    A torch whose reader lacks the method patched for this loads the plain way. A file that is
    not a program archive is refused by name (torch would log a traceback and try older formats),
    as is one holding pickled Python objects (:func:`_tensors_only`): reading those could run code.
    """
    if not os.path.exists(path):
        raise missing_file(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch.export program (a .pt2 zip archive)")
    try:
        with _parse_each_size_once(), _tensors_only():
            return torch.export.load(str(path), extra_files=extra_files)
    except PickledObjectRefused as error:
        raise ValueError(
            f"{path}: refused: it holds pickled Python objects ({error}), which could run code when read; "
            "swinkit reads programs whose weights and constants are plain tensors, as its own exports are"
        ) from None


class PickledObjectRefused(pickle.UnpicklingError):
    """What torch's program reader met where it would have unpickled more than tensors."""


@contextlib.contextmanager
def _tensors_only() -> Iterator[None]:
    """While open, torch's program reader unpickles tensors only.

    ``torch.export.load`` reads a weight or constant marked ``use_pickle`` (and an older archive's
    weights, after a safe try) with ``torch.load(weights_only=False)``, and an opaque constant
    with ``pickle.loads``: a crafted file would run code (the project reads no file that way).
    Here every ``torch.load`` is a ``weights_only=True`` one and the reader's ``pickle.loads``
    refuses; swinkit's exports hold neither kind of entry.
    """
    try:  # the archive reader of torch 2.8 and later; older ones unpickle through torch.load only
        from torch.export.pt2_archive import _package
    except ImportError:
        _package = None
    load, module_pickle = torch.load, getattr(_package, "pickle", None)

    def tensors_only_load(*args: Any, **kwargs: Any) -> Any:
        try:
            return load(*args, **{**kwargs, "weights_only": True})
        except pickle.UnpicklingError as error:
            if "global" not in str(error).lower():  # damaged, not refused: torch's reader names it
                raise
            raise PickledObjectRefused("a weight or constant that only a full unpickling reads") from error

    def refused(kind: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PickledObjectRefused(kind)

        return refuse

    script_objects = getattr(torch._C, "_pickle_load_obj", None)
    with _parse_lock:
        torch.load = tensors_only_load
        if script_objects is not None:
            torch._C._pickle_load_obj = refused("a TorchScript object")
        if module_pickle is not None:
            _package.pickle = types.SimpleNamespace(loads=refused("an opaque object, read with pickle.loads"))
        try:
            yield
        finally:
            torch.load = load
            if script_objects is not None:
                torch._C._pickle_load_obj = script_objects
            if module_pickle is not None:
                _package.pickle = module_pickle


_parse_lock = threading.RLock()  # both patches of torch's reader below hold it


@contextlib.contextmanager
def _parse_each_size_once() -> Iterator[None]:
    """While open, torch's program reader answers a size expression it has parsed from a memo.

    Parsing is exact to repeat from a memo: the reader's side effects on its shape environment
    (hint, range, symbol name) are keyed by the expression and were made by the first parse.
    """
    from torch._export.serde import serialize

    reader = getattr(serialize, "GraphModuleDeserializer", None)
    parse = getattr(reader, "_parse_sym_expr", None)
    if parse is None:
        yield
        return

    def parse_once(self: Any, expression: Any, hint: Any = None) -> Any:
        parsed = self.__dict__.setdefault("_swinkit_parsed", {})
        key = (expression, type(hint), hint)
        if key not in parsed:
            parsed[key] = parse(self, expression, hint)
        return parsed[key]

    with _parse_lock:
        reader._parse_sym_expr = parse_once
        try:
            yield
        finally:
            reader._parse_sym_expr = parse


def export_onnx_model(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor | None = None,
    opset: int = DEFAULT_OPSET,
    class_names: list[str] | None = None,
    dynamic_size: bool = True,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` as ONNX with input ``images`` (N, C, H, W) and output ``logits`` or ``features{i}``.

    ``example`` gives the batch (and, with ``dynamic_size=False``, the height and width) to trace
    with; a dynamic file takes every size in :data:`SIDE_RANGE`. The file's metadata holds the
    swinkit config (with its preprocessing), the accepted size range and the class names, so a
    runtime user needs nothing else. Outside the range every output is NaN (onnxruntime cannot
    assert the range; see :class:`_NaNOutsideRange`). With ``external_data`` (automatic for weights
    above 1.5 GiB, as protobuf files end at 2 GiB) the weights go to ``<file>.data`` beside it.
    """
    check_opset(opset)
    refuse_non_float32(model)
    path = Path(path)
    example = example if example is not None else _example(model, None, 2)
    config = getattr(model, "config", None)
    features = _is_swinkit(model) and config.features_only
    outputs = [f"features{i}" for i in config.out_indices] if features else ["logits"]
    program = export_program(model, dynamic_size=dynamic_size, example=example, nan_outside_range=True)
    with warnings.catch_warnings(), torch.no_grad(), _quiet("onnxscript", "onnx_ir", "torch.onnx"):
        # The exporter warns and logs about its own internals (deprecated fields, optimizer passes,
        # with a traceback a conversion to an opset it cannot write, which _at_opset reports).
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=max(opset, DEFAULT_OPSET),
            input_names=["images"],
            output_names=outputs,
            optimize=True,
            verbose=False,
        )
    onnx_program.model = _at_opset(onnx_program.model, opset)
    if _is_swinkit(model):
        metadata = _model_metadata(model, tuple(example.shape[2:]), class_names, static_size=not dynamic_size)
        onnx_program.model.metadata_props.update(metadata)
    _save_onnx(onnx_program, path, external_data)
    return path


def _at_opset(model: Any, opset: int) -> Any:
    """The exported ``model`` (an ``onnx_ir`` model) at ``opset``: converted down to it by onnx's
    version converter, or refused where the exporter could not write it (above the opsets it knows,
    it kept 18 and wrote newer operators into it: a file onnxruntime refuses to load)."""
    import onnx
    import onnx_ir

    written = model.opset_imports.get("", opset)
    if written == opset:
        return model
    if written < opset:
        raise ValueError(f"torch's exporter cannot write ONNX opset {opset} here (it wrote {written}); ask for less")
    try:
        converted = onnx.version_converter.convert_version(onnx_ir.to_proto(model), opset)
        _drop_newer_reduce_attributes(converted.graph)
        onnx.checker.check_model(converted)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as error:  # over protobuf's 2 GiB among them
        raise ValueError(f"cannot convert the exported model from ONNX opset {written} to {opset}: {error}") from None
    return onnx_ir.from_proto(converted)


def _drop_newer_reduce_attributes(graph: Any) -> None:
    """onnx's converter (1.23) moves a reduction's axes from input to attribute going below 18, but
    keeps ``noop_with_empty_axes``, an attribute of 18 on: onnxruntime then refuses the file. At 0
    it means what opset 17 does anyway (empty axes reduce everything), so it is dropped."""
    for node in graph.node:
        if node.op_type.startswith("Reduce"):
            kept = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(kept)


def _save_onnx(onnx_program: Any, path: Path, external_data: bool | None) -> None:
    """Write the file, and its weights file if external, each replacing its destination at once (:func:`staged`)."""
    with staged(path) as temporary:
        onnx_program.save(str(temporary), external_data=external_data)


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`~swinkit.checkpoint.io.staging` for an export: the file, and an ONNX file's weights
    file, replace their destinations at once when the block ends, and nothing changes when it
    raises. An ONNX file with its weights inside that replaces one with external weights removes
    that weights file: only the replaced file named it.
    """
    path = Path(path)
    old_weights = path.with_name(f"{path.name}.data")
    onnx = path.suffix.lower() == ".onnx"
    with staging(path) as temporary:
        yield temporary
        replaces_external = onnx and path.exists() and old_weights.exists()
        inline = not temporary.with_name(f"{temporary.name}.data").exists()
    if inline and replaces_external:
        old_weights.unlink()
        logger.info("removed %s, the weights of the %s replaced (the new one holds its weights)", old_weights, path)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _is_swinkit(model: nn.Module) -> bool:
    from .variants import SwinConfig

    return isinstance(getattr(model, "config", None), SwinConfig)


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an exported file; a missing file or one onnxruntime cannot
    load (not a model, truncated, a bad graph) is refused in one line naming it."""
    import onnxruntime

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an ONNX file")
    if not path.is_file():
        raise missing_file(path)
    kind = file_kind(path)
    if kind != "unknown":  # a checkpoint renamed, or written under the wrong name
        suffix = ".safetensors" if kind == "safetensors" else ".pth"
        raise ValueError(f"{path} is a {kind} checkpoint, not an ONNX file: give it a {suffix} name to read it as one")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own error types, not exported by its package
        raise ValueError(f"{path}: onnxruntime cannot load it: {error}") from None


class OnnxClassifier(nn.Module):
    """A classifier written by ``swinkit export``, run by onnxruntime on the CPU, used like the model.

    ``config`` (with its preprocessing) and ``class_names`` come from the file's metadata, so
    ``swinkit predict`` and ``swinkit eval`` take the ``.onnx`` file in place of a checkpoint:
    a check of the deployed file itself. Calling it returns float32 logits on the input's device.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(path, threads)
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.config = _config_from_metadata(path, metadata)
        outputs = [output.name for output in self.session.get_outputs()]
        self.class_names, self.size_range = _classifier_metadata(path, metadata, self.config, outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_image_size(self.path, self.size_range, images)  # outside it the graph returns NaN
        feed = {self.session.get_inputs()[0].name: images.detach().cpu().float().numpy()}
        (logits,) = self.session.run(None, feed)
        return torch.from_numpy(logits).to(images.device)


class ProgramClassifier(nn.Module):
    """A classifier written by ``swinkit export --format torch-export``: its ``.pt2`` program, in float32.

    Like :class:`OnnxClassifier`, with the config, size range and class names from the archive's
    :data:`PROGRAM_METADATA`. The program is traced on the CPU; on ``device`` "cuda" its weights,
    buffers, constants and the device arguments of its operations are moved there first
    (:func:`program_on`).
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{path}: a .pt2 program runs on cpu or cuda[:index], not {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{path}: device {device!r} asked for, but no CUDA device is available here")
        program, metadata = read_program(path)
        self.path = Path(path)
        self.config = _config_from_metadata(path, metadata)
        features = self.config.features_only
        outputs = [f"features{i}" for i in self.config.out_indices] if features else ["logits"]
        self.class_names, self.size_range = _classifier_metadata(path, metadata, self.config, outputs)
        self.program = program.module() if self.device.type == "cpu" else program_on(program, self.device)
        self.training = False

    def train(self, mode: bool = True) -> ProgramClassifier:
        # The traced program is the eval-mode function, and its module refuses train() and eval().
        if mode:
            raise ValueError("an exported program computes the model in eval mode only; it cannot train")
        self.training = False
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_image_size(self.path, self.size_range, images)  # before torch's "Guard failed" on it
        return self.program(images.detach().to(self.device, torch.float32)).to(images.device)


def check_image_size(path: str | os.PathLike, size_range: dict[str, list[int]], images: torch.Tensor) -> None:
    """Refuse images of a height or width outside an exported file's ``size_range`` (none: any), naming both."""
    if not size_range:
        return
    (low, high), (least, most) = size_range["height"], size_range["width"]
    height, width = images.shape[-2:]
    if not (low <= height <= high and least <= width <= most):
        raise ValueError(
            f"{path} takes heights {low}..{high} and widths {least}..{most}, got {height}x{width} "
            "(a file exported with --static-size takes its one size)"
        )


def read_program(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """A ``.pt2`` program and the metadata swinkit wrote into it (:data:`PROGRAM_METADATA`; empty
    for another program); torch's own load errors become a ``ValueError`` naming the file."""
    extra = {PROGRAM_METADATA: ""}
    try:
        program = load_program(path, extra_files=extra)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as error:  # torch's own errors (truncated archive, unknown operators)
        raise ValueError(f"{path}: torch.export cannot load it: {error}") from None
    try:
        return program, json.loads(extra[PROGRAM_METADATA] or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its {PROGRAM_METADATA} is not JSON") from None


def program_on(program: torch.export.ExportedProgram, device: str | torch.device) -> torch.fx.GraphModule:
    """``program``'s module with its weights, buffers and tensor constants on ``device`` and its
    operations' ``device`` arguments (the traced index tables are built on the tracing device)
    pointing there.

    torch's ``move_to_device_pass`` does this on the program, and moves every node's symbolic
    example value too, which for a size-generic program takes longer than loading it (10 s for
    ``swin_test``); running the module needs none of those."""
    device = torch.device(device)
    module = program.module().to(device)
    for submodule in module.modules():  # constants are plain tensor attributes, which .to() leaves
        for name, value in list(vars(submodule).items()):
            if isinstance(value, torch.Tensor):
                setattr(submodule, name, value.to(device))
    for node in module.graph.nodes:
        if "device" in node.kwargs:
            node.kwargs = {**node.kwargs, "device": device}
        if node.op == "call_function" and node.target is torch.ops.aten.to.device:
            node.args = (node.args[0], device, *node.args[2:])
    module.recompile()
    return module


def _config_from_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> Any:
    from .variants import SwinConfig

    if "swinkit.config" not in metadata:
        raise ValueError(
            f"{path}: no swinkit.config in its metadata; only files written by `swinkit export` carry the "
            "preprocessing and classes that prediction and evaluation need"
        )
    return SwinConfig.from_dict(json.loads(metadata["swinkit.config"]))


def _classifier_metadata(
    path: str | os.PathLike, metadata: dict[str, str], config: Any, outputs: list[str]
) -> tuple[list[str] | None, dict[str, list[int]]]:
    """An exported classifier's class names and size range, from its metadata; refused by name when
    the file is a backbone or its preprocessing falls outside its sizes."""
    if outputs != ["logits"]:
        raise ValueError(f"{path}: a backbone (outputs {outputs}), not a classifier with logits")
    names = json.loads(metadata.get("swinkit.class_names", "null"))
    size_range = json.loads(metadata.get("swinkit.size_range", "{}"))
    crop = config.preprocessing.crop
    for side, (low, high) in size_range.items():
        if not low <= crop <= high:
            raise ValueError(
                f"{path}: its preprocessing crops to {crop}, outside the file's {side} range {low}..{high} "
                "(predict and eval crop squares: export at a square --img-size N, or run the file on images "
                "prepared yourself)"
            )
    return names, size_range


def onnx_error(session: Any, model: nn.Module, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's output and eager PyTorch on ``images``
    (NaN where either is not finite); ``model`` runs in eval mode and is left in its own."""
    output = session.run(None, {session.get_inputs()[0].name: images.detach().cpu().numpy()})
    with torch.no_grad(), eval_mode(model):
        expected = _listed(model(images))
    return _largest([output_errors(torch.from_numpy(o), e.cpu())[0] for o, e in zip(output, expected, strict=True)])


def output_errors(found: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference of two outputs, and that relative to the largest eager value.

    NaN where either holds a NaN or an infinity, or their shapes differ: a check must not read that
    as agreement (Python's ``max`` drops a NaN that comes second).
    """
    if found.shape != expected.shape:
        return math.nan, math.nan
    found, expected = found.double(), expected.double()
    if not (found.isfinite().all() and expected.isfinite().all()):
        return math.nan, math.nan
    if not expected.numel():
        return 0.0, 0.0
    absolute = float((found - expected).abs().max())
    if absolute == 0:  # all zeros agree too
        return 0.0, 0.0
    return absolute, absolute / float(expected.abs().max())  # infinite where eager's are all 0


def _largest(errors: list[float]) -> float:
    """The largest of ``errors``, NaN if any is NaN."""
    return math.nan if any(math.isnan(error) for error in errors) else max(errors, default=0.0)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str = "onnx",
    img_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    class_names: list[str] | None = None,
    static_size: bool = False,
    external_data: bool | None = None,
) -> dict[str, Any]:
    """Export and, with ``check``, compare the file with eager (:func:`check_export`) before it takes its name.

    Returns ``{"path", "format", "example_size", "size_range", "preprocessing", "max_abs_error",
    "max_relative_error", "checked"}``: the file takes any batch and any height / width inside
    ``size_range`` (see :data:`SIDE_RANGE`), whatever the example size; ``img_size`` sets the first
    size checked against eager; ``preprocessing`` is the resize and crop its predict / eval use
    (:func:`file_preprocessing`). With ``static_size`` height and width are fixed to the example's:
    the graph pads and crops with plain ops instead of size-generic gathers (in onnxruntime no
    faster than a dynamic file). ``external_data`` (ONNX only): the weights in a file of their own
    (see :func:`export_onnx_model`). A file whose check fails (:data:`CHECK_TOLERANCE`, or outputs
    that are not finite) is not written: a ``ValueError`` names the sizes and errors. ``model``
    stays in the mode it was in.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")
    refuse_int8(model, "export")
    refuse_non_float32(model)
    if fmt == "onnx":
        check_opset(opset)
    if external_data and fmt != "onnx":
        raise ValueError(f"external weights are an ONNX option; format {fmt!r} keeps them in its archive")
    path = export_destination(path)
    check_suffix(path, fmt)
    _check_class_names(model, class_names)
    example = _example(model, img_size, 2)
    size = tuple(example.shape[2:])
    low, high = SIDE_RANGE
    if not static_size and not all(low <= side <= high for side in size):
        raise ValueError(
            f"image size {size[0]}x{size[1]} is outside the sides a file with a dynamic height and width accepts "
            f"({low}..{high}); use --static-size"
        )
    ranges = size_ranges(size, static_size)
    preprocessing = file_preprocessing(model.config, size, static_size)
    report: dict[str, Any] = {"path": str(path), "format": fmt, "example_size": list(size), "size_range": ranges}
    report["preprocessing"] = {"resize": preprocessing.resize, "crop": preprocessing.crop}
    with staged(path) as temporary:
        if fmt == "onnx":
            export_onnx_model(model, temporary, example, opset, class_names, not static_size, external_data)
        else:
            save_program(model, temporary, size, not static_size, class_names)
        if check:
            report.update(judge_check(path, check_export(model, temporary, fmt, size, static_size), fmt))
    if static_size and size[0] != size[1]:
        logger.warning(
            "%s takes %dx%d images only: swinkit predict and eval crop squares and refuse it; "
            "feed it images prepared to that size yourself",
            path,
            *size,
        )
    logger.info("wrote %s (%s; dynamic batch, height in %s, width in %s)", path, fmt, ranges["height"], ranges["width"])
    return report


def _check_class_names(model: nn.Module, class_names: list[str] | None) -> None:
    classes = model.config.num_classes
    if class_names is not None and not model.config.features_only and len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names given for a model with {classes} classes")


EXPORT_SUFFIXES = {".onnx": "onnx", ".pt2": "torch-export"}


def format_for(path: str | os.PathLike) -> str:
    """The export format a file's name asks for: torch-export for ``.pt2`` (any case), else onnx."""
    return "torch-export" if Path(path).suffix.lower() == ".pt2" else "onnx"


def check_suffix(path: Path, fmt: str) -> None:
    """Refuse a name that does not say ``fmt``: the commands that read an export (predict, eval,
    the dense commands) pick its reader by the name, ``.onnx`` or ``.pt2`` (any case)."""
    named = EXPORT_SUFFIXES.get(path.suffix.lower())
    if named is None:
        wanted = {form: suffix for suffix, form in EXPORT_SUFFIXES.items()}[fmt]
        got = repr(path.suffix) if path.suffix else "no suffix"
        raise ValueError(
            f"{path}: an exported file is named .onnx (onnx) or .pt2 (torch-export), as the commands that read "
            f"it go by its name; got {got}: name it {path.stem}{wanted}"
        )
    if named != fmt:
        raise ValueError(f"{path}: a {path.suffix} file holds the {named} format, but format {fmt!r} was asked for")


def size_ranges(size: tuple[int, ...], static_size: bool = False) -> dict[str, list[int]]:
    """The height and width range an exported file accepts (``[side, side]`` when static)."""
    if static_size:
        return {"height": [size[0], size[0]], "width": [size[1], size[1]]}
    return {"height": list(SIDE_RANGE), "width": list(SIDE_RANGE)}


def check_sizes(size: tuple[int, ...], static_size: bool = False) -> list[tuple[int, int]]:
    """The example size and a second one: height 39 larger and width 37 smaller (odd, other windows).

    For Swin-T at 224 that is 263 x 187: stage 4's map is 9 rows (no clamp) by 6 columns (clamped),
    so one check crosses from one window rule to the other.
    """
    if static_size:
        return [tuple(size), tuple(size)]
    low, high = SIDE_RANGE
    height = size[0] + 39 if size[0] + 39 <= high else size[0] - 39
    width = size[1] - 37 if size[1] - 37 >= low else size[1] + 37
    return [tuple(size), (height, width)]


def check_export(
    model: nn.Module, path: str | os.PathLike, fmt: str, size: tuple[int, ...], static_size: bool = False
) -> list[dict[str, Any]]:
    """The exported file against eager at batch 1 and 3 and two image sizes (:func:`check_sizes`).

    One entry per batch: ``{"size": [H, W], "batch", "abs_error", "relative_error"}``, the largest
    over the outputs (:func:`output_errors`: NaN where an output is not finite). ``model`` (with
    ``config.in_chans``) runs in eval mode and is left in its own.
    """
    generator = torch.Generator().manual_seed(0)
    channels = model.config.in_chans
    sizes = check_sizes(size, static_size)
    batches = [torch.randn(n, channels, *hw, generator=generator) for n, hw in zip((1, 3), sizes, strict=True)]
    run = _file_runner(path, fmt)
    results = []
    with torch.no_grad(), eval_mode(model):
        for images in batches:
            errors = [output_errors(o, e) for o, e in zip(run(images), _listed(model(images)), strict=True)]
            results.append(
                {
                    "size": list(images.shape[2:]),
                    "batch": images.shape[0],
                    "abs_error": _largest([absolute for absolute, _ in errors]),
                    "relative_error": _largest([relative for _, relative in errors]),
                }
            )
    return results


def _file_runner(path: str | os.PathLike, fmt: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function from images to an exported file's outputs (onnxruntime, or the program's module)."""
    if fmt == "onnx":
        session = onnx_session(path)
        name = session.get_inputs()[0].name
        return lambda images: [torch.from_numpy(o) for o in session.run(None, {name: images.numpy()})]
    module = load_program(path).module()
    return lambda images: _listed(module(images))


def judge_check(path: str | os.PathLike, results: list[dict[str, Any]], fmt: str) -> dict[str, Any]:
    """The report of a check (:func:`check_export`): ``max_abs_error``, ``max_relative_error`` and
    ``checked``; a ``ValueError`` naming each size and its error where one is above the format's
    :data:`CHECK_TOLERANCE` or not finite (the caller then writes nothing to ``path``)."""
    tolerance = CHECK_TOLERANCE[fmt]
    failed = [r for r in results if not r["relative_error"] <= tolerance]  # NaN fails too
    if failed:
        described = "; ".join(
            f"{h}x{w} (batch {r['batch']}): "
            + (
                "NaN or infinity in the outputs (or their shapes differ from eager's)"
                if math.isnan(r["relative_error"])
                else f"relative error {r['relative_error']:.1e}"
            )
            for r in failed
            for h, w in [r["size"]]
        )
        raise ValueError(
            f"{path} was not written: the exported file does not compute what the model does: {described} "
            f"(the check against eager accepts a relative error, to the largest eager output, up to {tolerance:.0e} "
            f"in {fmt})"
        )
    return {
        "max_abs_error": _largest([r["abs_error"] for r in results]),
        "max_relative_error": _largest([r["relative_error"] for r in results]),
        "checked": results,
    }


def _listed(output: Any) -> list[torch.Tensor]:
    return list(output) if isinstance(output, list | tuple) else [output]


def _model_metadata(
    model: nn.Module, size: tuple[int, ...], class_names: list[str] | None, static_size: bool = False
) -> dict[str, str]:
    """The ONNX file's metadata: config (with :func:`file_preprocessing`), accepted height / width
    range, class names."""
    config = dataclasses.replace(model.config, preprocessing=file_preprocessing(model.config, size, static_size))
    ranges = size_ranges(size, static_size)
    metadata = {"swinkit.config": json.dumps(dataclasses.asdict(config)), "swinkit.size_range": json.dumps(ranges)}
    if class_names:
        metadata["swinkit.class_names"] = json.dumps(list(class_names))
    return metadata


def file_preprocessing(config: Any, size: tuple[int, ...], static_size: bool = False) -> Any:
    """The preprocessing an exported file stores for ``swinkit predict`` and ``eval``.

    The model's own, except in a file fixed to another square size: there the same rule moved to
    that size (crop = the side, the resize scaled by the same ratio, e.g. 256 / 224 becomes 438 /
    384, the official rule at 384), so the file's own commands feed it the one size it takes. A
    file fixed to a non-square size keeps the model's (the commands crop squares and refuse it).
    """
    preprocessing = config.preprocessing
    if not static_size or size[0] != size[1] or size[0] == preprocessing.crop:
        return preprocessing
    side = size[0]
    return dataclasses.replace(preprocessing, crop=side, resize=side * preprocessing.resize // preprocessing.crop)


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``model`` compiled: a dynamic batch, one graph per image height and width.

    A swinkit model is compiled in place (:meth:`swinkit.model.SwinTransformer.compile`, which keeps
    a CPU batch split over the image-parallel workers) and returned; any other model is returned
    as ``torch.compile(model, **options)``. A swinkit model keeps height and width static under
    ``torch.compile`` (:func:`swinkit.model.static_size_under_compile`) either way.
    """
    if isinstance(model, SwinTransformer):
        model.compile(**options)
        return model
    return torch.compile(model, **options)
