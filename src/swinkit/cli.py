"""The ``swinkit`` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .devices import check_device, device_argument

# Subcommands register here: name -> (help, add_arguments, run). ``run(args)`` returns an exit code.
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with positive numbers, got {text!r}")
    return sizes[0], sizes[1]


def _add_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name (see --list) or omit with --checkpoint")
    parser.add_argument(
        "--checkpoint",
        help="describe the model stored in this file (a dense model file whole); with a preset name too, that "
        "preset loaded from the file, which must fit it",
    )
    parser.add_argument(
        "--img-size",
        type=_parse_size,
        help="input size N or HxW (default: the model's; a dense model: the papers' 800x1280 or 512x2048)",
    )
    parser.add_argument("--list", action="store_true", help="list the preset names")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--dense",
        metavar="KIND",
        help="describe a detector or segmentor on the preset's backbone, with its whole-model FLOPs as the "
        "dense papers count them: mask_rcnn, faster_rcnn, cascade_mask_rcnn, cascade_rcnn or upernet",
    )
    parser.add_argument("--classes", type=int, help="with --dense: number of classes (default COCO's 80, ADE20K's 150)")


def _run_info(args: argparse.Namespace) -> int:
    from .info import describe_model
    from .variants import variant_names

    if args.classes is not None and args.dense is None:
        raise ValueError("--classes goes with --dense")
    if args.list or (args.model is None and args.checkpoint is None):
        print("\n".join(variant_names()))
        return 0
    info = describe_model(args.model, args.checkpoint, args.img_size, args.dense, args.classes)
    print(json.dumps(info, indent=2) if args.json else info["text"])
    return 0


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="folder for the run (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the digits recipe's, 20)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, args.epochs)
    return 0


def _add_train(parser: argparse.ArgumentParser) -> None:
    from .train.config import add_train_arguments

    add_train_arguments(parser)


def _run_train(args: argparse.Namespace) -> int:
    from .train import fit
    from .train.config import config_from_args

    result = fit(config_from_args(args))
    if result.history:
        print(f"best val top-1 {result.best_top1:.2f}% in {result.seconds:.0f} s; outputs in {result.output}/")
    elif result.is_main:  # --max-steps ended the run inside its first epoch: no validation row
        print(f"stopped at --max-steps before an epoch ended (not validated); outputs in {result.output}/")
    return 0


def _add_pretrain(parser: argparse.ArgumentParser) -> None:
    from .train.pretrain import add_pretrain_arguments

    add_pretrain_arguments(parser)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import pretrain, pretrain_config_from_args

    result = pretrain(pretrain_config_from_args(args))
    if result.history:
        print(
            f"best val reconstruction loss {result.best_loss:.4f} in {result.seconds:.0f} s; "
            f"fine-tune from {result.encoder}"
        )
    return 0


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="image folder (one sub-folder per class; one with train/ and val/: its val/) or CSV of path,label",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="model file (any supported format, or an .onnx or .pt2 file from swinkit export)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes, 0 for none (default 2)")
    parser.add_argument("--output", help="write metrics.json and confusion.png here")
    parser.add_argument("--strict-data", action="store_true", help="stop at the first undecodable image")
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="also measure images/s on one batch (the official method; under --amp too)",
    )
    _add_device(parser)
    _add_amp(parser)
    _add_int8(parser)
    parser.add_argument("--json", action="store_true", help="print all metrics as JSON")


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.data,
        args.checkpoint,
        args.batch_size,
        args.workers,
        args.output,
        args.strict_data,
        args.throughput,
        args.device,
        args.amp,
        args.int8,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(
            f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
            f"({metrics['images']} images, {metrics['bad_images']} unreadable)"
        )
        if "throughput_images_per_second" in metrics:
            print(f"throughput {metrics['throughput_images_per_second']:.1f} images/s")
    return 0


def _add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="model file (any supported format, or an .onnx or .pt2 file from swinkit export)",
    )
    parser.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    _add_device(parser)
    _add_amp(parser)
    _add_int8(parser)
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def _add_device(parser: argparse.ArgumentParser, takes_onnx: bool = True) -> None:
    where = "cpu (default), cuda, cuda:INDEX or mps"
    note = "; an .onnx file runs on the CPU" if takes_onnx else ""
    parser.add_argument("--device", default="cpu", type=device_argument, help=where + note)


def _add_amp(parser: argparse.ArgumentParser) -> None:
    # The names of swinkit.evaluate.AMP_DTYPES, spelled out: this module does not import torch.
    parser.add_argument(
        "--amp",
        default="none",
        choices=["none", "bf16", "fp16"],
        help="autocast the model to bfloat16 / float16 (GPUs; CPUs with AVX-512 BF16 or AMX for bf16)",
    )


def _add_int8(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--int8",
        action="store_true",
        help="int8 dynamic quantization of the linear layers (CPU, opt-in: measure its accuracy with eval --int8)",
    )


def _run_predict(args: argparse.Namespace) -> int:
    from .predict import format_results, predict

    results = predict(args.inputs, args.checkpoint, args.topk, args.batch_size, args.device, args.amp, args.int8)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 1 if results and all("error" in r for r in results) else 0


def _add_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help="classifier checkpoint (any supported format)")
    overlays = "folder for the overlays, or a .png / .jpg / .jpeg file for one image"
    parser.add_argument("--out", "--output", dest="out", required=True, help=overlays)
    parser.add_argument(
        "--method",
        default="gradcam",
        choices=["gradcam", "rollout"],
        help="gradcam (default): the class's evidence on a stage's map (by default the deepest at least 4 tokens "
        "wide: the last, stride 32, for Swin-T at 224); rollout: attention rolled back through the shifted "
        "windows (by default to stage 0, stride 4)",
    )
    parser.add_argument(
        "--class",
        dest="target",
        help="class name or index to explain (default: the top class; rollout's map is the same for every class)",
    )
    parser.add_argument("--stage", type=int, help="stage whose map is shown, 0..3 or negative from the end")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the colours over the image, 0..1 (default 0.5)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images explained together (default 8)")
    _add_device(parser, takes_onnx=False)
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def _run_explain(args: argparse.Namespace) -> int:
    from .explain import explain_files, format_results

    results = explain_files(
        args.inputs, args.checkpoint, args.out, args.method, args.target, args.stage, args.alpha, args.device,
        args.batch_size,
    )  # fmt: skip
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 1 if results and all("error" in r for r in results) else 0


def _add_convert(parser: argparse.ArgumentParser) -> None:
    from .checkpoint import FORMATS

    parser.add_argument("src", help="checkpoint file or Hugging Face directory, any supported layout")
    parser.add_argument(
        "dst",
        help="output file (--to swinkit: always safetensors; official, timm, torchvision: safetensors for "
        ".safetensors, else a torch .pth file); a directory for --to hf",
    )
    parser.add_argument("--to", choices=FORMATS, default="swinkit", help="target layout (default: swinkit)")


def _run_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert

    print(convert(args.src, args.dst, to=args.to))
    return 0


def _add_export(parser: argparse.ArgumentParser) -> None:
    from .export import DEFAULT_OPSET, FORMATS

    parser.add_argument("output", help="file to write (.onnx for onnx, .pt2 for torch-export)")
    parser.add_argument("--checkpoint", help="model file (any supported format)")
    parser.add_argument("--model", help="preset name, for a randomly initialised model (no --checkpoint)")
    parser.add_argument(
        "--format", choices=FORMATS, help="onnx or torch-export (default: torch-export for a .pt2 file, else onnx)"
    )
    parser.add_argument(
        "--img-size",
        type=_parse_size,
        help="N or HxW: the first size checked against eager, and the size --static-size fixes (default: model's)",
    )
    parser.add_argument(
        "--static-size",
        action="store_true",
        help="fix height and width to --img-size (for runtimes that want fixed shapes); the batch stays dynamic",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, 17 up to the newest torch's exporter writes (default {DEFAULT_OPSET})",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with eager PyTorch")
    parser.add_argument(
        "--external-data",
        action="store_true",
        default=None,
        help="onnx: write the weights to OUTPUT.data beside the file (automatic above 1.5 GiB of weights)",
    )


def _run_export(args: argparse.Namespace) -> int:
    from .checkpoint.load import read_any
    from .checkpoint.native import class_names_from_metadata
    from .export import export, format_for
    from .factory import create_model
    from .predict import refuse_dense_file

    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give exactly one of --checkpoint FILE or --model NAME")
    class_names = None
    if args.checkpoint:
        loaded = read_any(args.checkpoint)
        refuse_dense_file(args.checkpoint, loaded)
        model = create_model(checkpoint=loaded)
        # What the reader parsed: a swinkit file's names, or a Hugging Face config's id2label.
        class_names = loaded.class_names or class_names_from_metadata(loaded.metadata)
    else:
        model = create_model(args.model)
    fmt = args.format or format_for(args.output)
    report = export(
        model,
        args.output,
        fmt,
        args.img_size,
        args.opset,
        not args.no_check,
        class_names,
        static_size=args.static_size,
        external_data=args.external_data,
    )
    print(json.dumps(report, indent=2))
    return 0


def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="swin_t", help="preset name (default swin_t)")
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch (default 16)")
    parser.add_argument("--train-batch-size", type=int, default=8, help="training-step batch (default 8)")
    parser.add_argument(
        "--compare",
        default="",
        help="peers, comma-separated: timm,torchvision,hf (for swin_t, swin_s, swin_b, swinv2_t; ratios are "
        "to the first)",
    )
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants of every contender")
    parser.add_argument("--onnxruntime", action="store_true", help="add onnxruntime variants (inference)")
    parser.add_argument(
        "--int8", action="store_true", help="add int8 dynamic-quantized variants (inference, CPU, float32)"
    )
    parser.add_argument(
        "--impls",
        default="",
        help="also time swinkit with these attn_impl values, comma-separated: auto, reference, sdpa, fused, triton, "
        "or serial (the default path without image-parallel threads)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported (default 7)")
    parser.add_argument(
        "--modes", default="inference,training", help="inference, training or inference,training (default)"
    )
    parser.add_argument(
        "--memory", action="store_true", help="peak memory of a training step (fresh processes; training mode only)"
    )
    parser.add_argument(
        "--drop-path-rate",
        type=float,
        help="stochastic depth rate every contender trains with (default: the preset's, 0.2 for swin_t)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", type=device_argument, help="cpu (default) or cuda[:index]")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="float32 (default), or bfloat16 / float16 (bf16 / fp16): every contender under autocast",
    )
    parser.add_argument(
        "--fresh-processes",
        action="store_true",
        help="time each contender in a new process of its own per round (alternating) instead of all in one",
    )
    parser.add_argument("--json", help="also write the report to this JSON file")


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import format_rows, run_bench
    from .checkpoint.io import atomic_write, writable_file

    if args.json:  # before minutes of benchmarking, not after
        writable_file(args.json)
    report = run_bench(
        args.model,
        args.batch_size,
        args.train_batch_size,
        [c for c in args.compare.split(",") if c],
        args.rounds,
        tuple(m for m in args.modes.split(",") if m),
        args.memory,
        args.threads,
        impls=[i for i in args.impls.split(",") if i],
        compiled=args.compile,
        onnxruntime=args.onnxruntime,
        device=args.device,
        dtype=args.dtype,
        fresh_processes=args.fresh_processes,
        drop_path_rate=args.drop_path_rate,
        int8=args.int8,
    )
    print(format_rows(report))
    if args.json:
        atomic_write(args.json, lambda temporary: Path(temporary).write_text(json.dumps(report, indent=2)))
    if report["failures"]:
        names = ", ".join(f"{f['contender']} ({f['mode']})" for f in report["failures"])
        print(f"swinkit bench: {names} failed; the others' results are above", file=sys.stderr)
        return 1
    return 0


def _add_dense(task: str, parser: argparse.ArgumentParser) -> None:
    from .dense.commands import add_arguments

    add_arguments(parser, task)


def _run_dense(task: str, args: argparse.Namespace) -> int:
    from .dense.commands import run

    text, code = run(args, task)
    if text:
        print(text)
    return code


COMMANDS: dict[str, Command] = {
    "info": ("parameters, FLOPs and per-stage shapes of a model", _add_info, _run_info),
    "demo": ("the main job on the bundled handwritten digits", _add_demo, _run_demo),
    "train": ("train or fine-tune (torchrun -m swinkit train ... for several processes)", _add_train, _run_train),
    "pretrain": (
        "SimMIM masked-image pretraining of a Swin encoder on unlabelled images (torchrun for several processes)",
        _add_pretrain,
        _run_pretrain,
    ),
    "eval": ("top-1 / top-5 / per-class accuracy of a checkpoint on labelled images", _add_eval, _run_eval),
    "predict": ("classify image files with a checkpoint", _add_predict, _run_predict),
    "explain": (
        "Grad-CAM or attention-rollout pictures of what a classifier looked at",
        _add_explain,
        _run_explain,
    ),
    "convert": ("convert a checkpoint between official, timm, torchvision, hf and swinkit", _add_convert, _run_convert),
    "export": ("export to ONNX or a torch.export program, checked against eager", _add_export, _run_export),
    "bench": ("images/s, latency and memory side by side with timm, torchvision, hf", _add_bench, _run_bench),
    # Nested: ``swinkit segment {train,eval,predict}``, ``swinkit detect {train,eval,predict}``.
    "segment": (
        "semantic segmentation: Swin + UPerNet on image / PNG label-map folders",
        functools.partial(_add_dense, "segment"),
        functools.partial(_run_dense, "segment"),
    ),
    "detect": (
        "detection / instance segmentation: Swin + FPN + Mask / Faster R-CNN or Cascade on COCO JSON",
        functools.partial(_add_dense, "detect"),
        functools.partial(_run_dense, "detect"),
    ),
}


VERBOSE_HELP = "log debug messages, and show the traceback of an error"


def build_parser() -> argparse.ArgumentParser:
    """The ``swinkit`` argument parser: every command of :data:`COMMANDS`, ``-v`` before or after it."""
    parser = argparse.ArgumentParser(prog="swinkit", description="Swin Transformer V1/V2 toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    _add_verbose_everywhere(subparsers)
    return parser


def _add_verbose_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """``-v`` after the command too (``swinkit predict ... -v``, ``swinkit segment eval ... -v``)."""
    for command in subparsers.choices.values():
        nested = [action for action in command._actions if isinstance(action, argparse._SubParsersAction)]
        for actions in nested:
            _add_verbose_everywhere(actions)
        if not nested:  # SUPPRESS: an absent flag keeps the value given before the command
            command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str], unknown: str
) -> argparse.ArgumentParser:
    """The parser that ``unknown`` stood under: the command (and its action: ``segment eval``) that
    ``args`` were parsed for, or the level above where it came before that word (``swinkit --bogus
    train`` is the top level's)."""
    words, word_at = [], -1  # where the command's and the action's words stand in argv
    for name in (args.command, getattr(args, "action", None)):
        if name is None or name not in argv[word_at + 1 :]:
            break
        word_at = argv.index(name, word_at + 1)
        words.append((name, word_at))
    # The unknown's place: its first occurrence that is not one of those words (it may repeat one).
    taken = {at for _, at in words}
    unknown_at = next((i for i, word in enumerate(argv) if word == unknown and i not in taken), len(argv))
    for name, at in words:
        choices = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if not choices or unknown_at < at:
            break
        parser = choices[0].choices[name]
    return parser


TRAINING_COMMANDS = ("train", "pretrain", "segment train", "detect train")
RESUME_HINT = (
    "; run the same command again to resume from the last checkpoint it saved (at each epoch's end, "
    "and every --checkpoint-every steps)"
)


# How torch re-raises an error of a DataLoader worker: the same type, its message the worker's traceback.
WORKER_ERROR = re.compile(r"Caught (\w+) in [^\n]*\.\nOriginal Traceback \(most recent call last\):\n")


def error_message(error: BaseException) -> str:
    """The message of ``error``; of one a DataLoader worker raised, the worker's own (say, a bad image's,
    naming the file), as with ``--workers 0``, not the traceback torch puts in its place."""
    text = str(error)
    caught = WORKER_ERROR.match(text)
    if caught is None:
        return text
    last = text.rsplit("Traceback (most recent call last):\n", 1)[-1]  # the last of chained ones
    lines = last.splitlines()
    start = next((i for i, line in enumerate(lines) if line and not line.startswith(" ")), len(lines))
    message = "\n".join(lines[start:])  # "module.Type: message", after the indented frames
    return re.sub(rf"^(?:[\w.]+\.)?{caught.group(1)}: ", "", message, count=1) or caught.group(1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``swinkit`` and ``python -m swinkit``; returns the exit code."""
    try:
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the command, with its usage (argparse's top level names neither)
            _command_parser(parser, args, argv, unknown[0]).error(f"unrecognized arguments: {' '.join(unknown)}")
    except KeyboardInterrupt:  # Ctrl-C while starting: a line too (nothing ran yet)
        print("swinkit: interrupted", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))  # segment eval, ...
    try:
        if getattr(args, "device", None) not in (None, "auto"):  # before any work: is the device here?
            check_device(args.device)
        code = COMMANDS[args.command][2](args)
    except (ValueError, TypeError, OSError) as error:  # OSError: a file or folder the system refused
        if args.verbose:
            raise
        # User errors get one clear line, not a traceback (--verbose shows it).
        print(f"swinkit {command}: error: {error_message(error)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever the work was
        if args.verbose:
            raise
        print(f"swinkit {command}: interrupted{RESUME_HINT if command in TRAINING_COMMANDS else ''}", file=sys.stderr)
        code = 130  # the shell's code for a SIGINT'ed process
    distributed = sys.modules.get(f"{__package__}.train.distributed")  # imported by every command that trains
    if distributed is not None:  # a torchrun worker leaves without Python's finalisation
        code = distributed.leave_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
