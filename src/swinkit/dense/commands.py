"""Arguments and summaries of ``swinkit segment|detect {train,eval,predict,explain,export,convert}``.

:func:`run` calls one library function per action and returns the text the CLI prints.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..devices import device_argument


def add_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """The ``train``, ``eval``, ``predict`` and ``explain`` sub-commands of ``task`` (``segment`` or ``detect``)."""
    from .config import add_train_arguments

    official = {"segment": "mmseg UPerNet", "detect": "mmdet"}[task]
    trained = f"model file written by training, or an official {official} file"
    exported = {"segment": "an .onnx or .pt2", "detect": "an .onnx"}[task]
    device = "cpu (default), cuda, cuda:INDEX or mps"
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train (torchrun -m swinkit ... for several processes)")
    add_train_arguments(train, task)

    scores = {"segment": "mIoU / accuracy", "detect": "COCO box (and mask) mAP"}[task]
    evaluate = actions.add_parser(
        "eval", help=f"{scores} of a trained model file", description=f"{scores} of a trained model file"
    )
    evaluate.add_argument(
        "--checkpoint", required=True, help=f"{trained}, or {exported} file from swinkit {task} export"
    )
    if task == "segment":
        evaluate.add_argument("--data", required=True, help="folder with images/ and annotations/ (or masks/)")
        evaluate.add_argument(
            "--split",
            default="validation",
            help="sub-folder of images/ and annotations/ (default: validation; without split folders: the files "
            "directly)",
        )
    else:
        evaluate.add_argument("--data", required=True, help="COCO JSON annotation file")
        evaluate.add_argument("--images", help="image folder (default: the JSON file's folder)")
    evaluate.add_argument("--output", help="write metrics.json here")
    evaluate.add_argument("--workers", type=int, default=2, help="data-loading processes, 0 for none (default 2)")
    evaluate.add_argument("--strict-data", action="store_true", help="stop at the first bad image")
    evaluate.add_argument("--device", default="cpu", type=device_argument, help=f"{device}; an exported file: cpu")
    evaluate.add_argument("--json", action="store_true", help="print all metrics as JSON")

    what = "overlay PNGs and results.json for image files or folders"
    predict = actions.add_parser("predict", help=what, description=what)
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument(
        "--checkpoint", required=True, help=f"{trained}, or {exported} file from swinkit {task} export"
    )
    predict.add_argument(
        "--output",
        default=f"runs/{task}-predict",
        help=f"folder for overlays and results.json (default: runs/{task}-predict)",
    )
    if task == "detect":
        predict.add_argument(
            "--score-threshold",
            type=float,
            default=0.5,
            help="detections below this score (0..1) are dropped (default 0.5); below the detector's own floor "
            "(its score_threshold, 0.05) a model file's floor is lowered to it, an exported file's is fixed",
        )
    predict.add_argument("--device", default="cpu", type=device_argument, help=f"{device}; an exported file: cpu")
    predict.add_argument("--json", action="store_true", help="print the results as JSON")
    for parser_ in (evaluate, predict):
        _add_test_augmentation(parser_, task)
    _add_export(actions, task)
    _add_convert(actions, task)

    what, default_class = {
        "segment": ("Seg-Grad-CAM overlay PNGs: where the model saw a class", "the largest predicted"),
        "detect": ("Grad-CAM overlay PNGs of each image's top detection", "the top detection's"),
    }[task]
    explain = actions.add_parser("explain", help=what, description=what)
    explain.add_argument("inputs", nargs="+", help="image files or folders")
    explain.add_argument("--checkpoint", required=True, help=trained)
    explain.add_argument(
        "--output",
        "--out",
        default=f"runs/{task}-explain",
        help=f"folder for the overlay PNGs, or a .png / .jpg / .jpeg file for one image (default: runs/{task}-explain)",
    )
    explain.add_argument("--class", dest="target", help=f"class name or index (default: {default_class})")
    explain.add_argument("--stage", type=int, help="backbone stage (default: the deepest with 4+ tokens a side)")
    explain.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the colours over the image, 0..1 (default 0.5)"
    )
    if task == "detect":
        explain.add_argument(
            "--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
            help="explain the detection overlapping this box most (image pixels, as predict writes them)",
        )  # fmt: skip
    explain.add_argument("--device", default="cpu", type=device_argument, help=device)
    explain.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_test_augmentation(parser: argparse.ArgumentParser, task: str) -> None:
    shown = " ".join(f"{r:g}" for r in _aug_test_ratios(task))
    merged = {"segment": "averaged", "detect": "merged as mmdet's aug_test merges them"}[task]
    origin = {"segment": "mmseg's --aug-test", "detect": "merged as mmdet's aug_test"}[task]
    parser.add_argument(
        "--aug-test",
        action="store_true",
        help=f"multi-scale + flip testing ({origin}): ratios {shown} of the test scale, each mirrored too",
    )
    parser.add_argument(
        "--test-ratios", type=float, nargs="+", metavar="R", help=f"test at these ratios of the test scale, {merged}"
    )
    parser.add_argument("--flip", action="store_true", help=f"each view with its mirror image too, {merged}")


def _aug_test_ratios(task: str) -> tuple[float, ...]:
    from .detection_augment import AUG_TEST_RATIOS as DETECTION_RATIOS
    from .segmentation import AUG_TEST_RATIOS as SEGMENTATION_RATIOS

    return SEGMENTATION_RATIOS if task == "segment" else DETECTION_RATIOS


def _add_export(actions: Any, task: str) -> None:
    from ..cli import _parse_size
    from ..export import DEFAULT_OPSET

    if task == "segment":
        what = "ONNX file or torch.export program of a segmentation model file"
        export = actions.add_parser("export", help=what, description=what)
        export.add_argument("output", help="file to write (.onnx for onnx, .pt2 for torch-export)")
        export.add_argument(
            "--format", choices=["onnx", "torch-export"], help="default: torch-export for a .pt2 file, else onnx"
        )
        size_help = "N or HxW: the first size checked against eager (default: crop size)"
        export.add_argument("--static-size", action="store_true", help="fix height and width to --img-size")
    else:
        what = "ONNX file of a detection model file: image in, detections out"
        export = actions.add_parser("export", help=what, description=what)
        export.add_argument("output", help="file to write (.onnx)")
        size_help = (
            "N or HxW: the image size traced with (default: the test scale, 4:3); the check runs at two other sizes"
        )
        export.add_argument(
            "--check-image",
            action="append",
            help="check on this image instead of noise at two sizes other than the traced one (repeatable)",
        )
    official = {"segment": "mmseg UPerNet", "detect": "mmdet"}[task]
    export.add_argument(
        "--checkpoint", required=True, help=f"model file written by training, or an official {official} file"
    )
    export.add_argument("--img-size", type=_parse_size, help=size_help)
    opsets = "17 up to the newest torch's exporter writes" if task == "segment" else "17 to 20"
    export.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {opsets} (default {DEFAULT_OPSET})"
    )
    export.add_argument("--no-check", action="store_true", help="skip the comparison with eager PyTorch")
    export.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_convert(actions: Any, task: str) -> None:
    layout, what = {"detect": ("mmdet", "Mask R-CNN / Cascade"), "segment": ("mmseg", "UPerNet")}[task]
    summary = f"an official {layout} file (.pth) to a swinkit model file (.safetensors), or back"
    convert = actions.add_parser("convert", help=summary, description=summary)
    convert.add_argument("source", help=f"a swinkit {task} model file or an official {layout} {what} file")
    convert.add_argument("output", help=f"file to write (.safetensors: swinkit's; .pth: {layout}'s layout)")
    convert.add_argument(
        "--to", choices=["swinkit", layout], help=f"default: swinkit for .safetensors, {layout} for .pth or .pt"
    )


def _convert(args: argparse.Namespace, task: str) -> str:
    from pathlib import Path

    from .weights import load_dense, save_dense, save_mmdet, save_mmseg

    layout = {"detect": "mmdet", "segment": "mmseg"}[task]
    suffix = Path(args.output).suffix
    if suffix.lower() in (".onnx", ".pt2"):
        raise ValueError(f"{args.output}: convert writes model files; 'swinkit {task} export' writes {suffix} files")
    to = args.to or {".safetensors": "swinkit", ".pth": layout, ".pt": layout}.get(suffix)
    if to is None:
        raise ValueError(
            f"{args.output}: name the format with --to swinkit|{layout} (or end it in .safetensors / .pth)"
        )
    model, spec = load_dense(args.source)
    if spec.task != task:
        raise ValueError(f"{args.source} is a {spec.task} model; 'swinkit {task} convert' converts {task} models")
    save = {"swinkit": save_dense, "mmdet": save_mmdet, "mmseg": save_mmseg}[to]
    save(model, spec, args.output)
    text = f"wrote {args.output} ({to}; {spec.heads()}, {len(spec.classes)} classes)"
    if to == "mmdet" and spec.head.get("geometry", "torchvision") != "mmdet":
        text += "; note: trained with torchvision's anchors and RoIAlign, which mmdet's differ from slightly"
    return text


def _export(args: argparse.Namespace, task: str) -> str:
    from ..export import format_for
    from .export import export_segmentation
    from .weights import load_dense

    model, spec = load_dense(args.checkpoint)
    if spec.task != task:
        raise ValueError(f"{args.checkpoint} is a {spec.task} model; 'swinkit {task} export' exports {task} models")
    check = not args.no_check
    if task == "detect":
        return _export_detection(args, model, spec, check)
    fmt = args.format or format_for(args.output)
    report = export_segmentation(model, spec, args.output, fmt, args.img_size, args.opset, check, args.static_size)
    if args.json:
        return json.dumps(report, indent=2)
    checked = f", largest error {report['max_relative_error']:.1e} of the largest logit" if check else ""
    ranges = report["size_range"]
    return f"wrote {report['path']} ({fmt}; any batch, height {ranges['height']}, width {ranges['width']}{checked})"


def _export_detection(args: argparse.Namespace, model: Any, spec: Any, check: bool) -> str:
    import torchvision.transforms.functional as TF

    from ..data import load_image
    from .detection_export import export_detection

    images = [TF.to_tensor(load_image(path)) for path in args.check_image or []]
    report = export_detection(model, spec, args.output, args.img_size, args.opset, check, images or None)
    if args.json:
        return json.dumps(report, indent=2)
    text = f"wrote {report['path']} (onnx; one RGB image of any size in, {', '.join(report['outputs'])} out"
    if not check:
        return text + ")"
    # An image whose detections differ otherwise than among tied scores stopped the export (ValueError).
    same = [entry for entry in report["images"] if not entry["differing"]]
    parts = []
    if same:
        sizes = ", ".join(f"{h}x{w}" for h, w in (entry["size"] for entry in same))
        largest = {
            key: max(entry.get(key, 0.0) for entry in same) for key in ("box_error", "score_error", "mask_error")
        }
        errors = f"boxes within {largest['box_error']:.1e} px, scores {largest['score_error']:.1e}"
        if "mask_error" in same[0]:
            errors += f", masks {largest['mask_error']:.1e}"
        parts.append(f"at {sizes} the same {sum(entry['detections'] for entry in same)} detections as eager, {errors}")
    tied = [entry for entry in report["images"] if entry["differing"]]
    if tied:
        sizes = ", ".join(f"{h}x{w}" for h, w in (entry["size"] for entry in tied))
        parts.append(f"at {sizes} detections differ among exactly tied scores (see the warning)")
    return text + "; " + "; ".join(parts) + ")"


def _test_augmentation(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """``ratios`` and ``flip`` from ``--aug-test`` / ``--test-ratios`` / ``--flip`` (given ratios win)."""
    ratios = args.test_ratios or (list(_aug_test_ratios(task)) if args.aug_test else None)
    return {"ratios": ratios, "flip": args.flip or args.aug_test}


def run(args: argparse.Namespace, task: str) -> tuple[str, int]:
    """Carry out ``args.action``; returns the text to print and the exit code."""
    if args.action == "train":
        from .config import config_from_args
        from .train import fit_dense

        result = fit_dense(config_from_args(args, task))
        if not result.is_main:  # rank 0 reports for the run
            return "", 0
        if not result.history:
            return f"stopped early; outputs in {result.output}/", 0
        return f"best val {result.metric} {result.best:.2f} in {result.seconds:.0f} s; outputs in {result.output}/", 0
    if args.action == "eval":
        from .predict import evaluate_dense

        options = {"split": args.split} if task == "segment" else {"images": args.images}
        metrics = evaluate_dense(
            args.checkpoint, args.data, output=args.output, device=args.device, workers=args.workers,
            strict_data=args.strict_data, task=task, **options, **_test_augmentation(args, task),
        )  # fmt: skip
        return (json.dumps(metrics, indent=2) if args.json else summarise_metrics(metrics)), 0
    if args.action == "export":
        return _export(args, task), 0
    if args.action == "convert":
        return _convert(args, task), 0
    if args.action == "explain":
        from ..predict import format_lines
        from .predict import explain_detections, explain_segments

        options = {"box": args.box} if task == "detect" else {}
        explainer = explain_segments if task == "segment" else explain_detections
        results = explainer(
            args.inputs, args.checkpoint, args.output, args.target, args.stage, args.alpha, args.device, **options
        )
        text = json.dumps(results, indent=2) if args.json else format_lines(results, _explained)
        return text, 1 if results and all("error" in r for r in results) else 0
    from .predict import predict_dense

    threshold = args.score_threshold if task == "detect" else 0.5
    results = predict_dense(
        args.inputs, args.checkpoint, args.output, args.device, threshold, task=task, **_test_augmentation(args, task)
    )
    text = json.dumps(results, indent=2) if args.json else summarise_predictions(results)
    return text, 1 if results and all("error" in r for r in results) else 0


def _explained(result: dict[str, Any]) -> str:
    if "box" in result:
        return f"{result['class']} {result['score']:.2f} at {result['box']} -> {result['output']}"
    return f"{result['class']} ({result['pixels']:.0%} of the image) -> {result['output']}"


def summarise_metrics(metrics: dict[str, Any]) -> str:
    """One line of a dense evaluation's scores (mIoU / accuracy, or box and mask AP), its test-time
    scales, image counts."""
    if "mIoU" in metrics:
        line = f"mIoU {metrics['mIoU']:.2f}%  mAcc {metrics['mAcc']:.2f}%  aAcc {metrics['aAcc']:.2f}%"
        bad, left_out = len(metrics["bad_images"]), ""
    else:
        line = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith(("bbox_AP", "segm_AP")))
        bad = metrics["bad_images"]
        left_out = ", left out of the scores with their annotations" if bad else ""
    if metrics.get("test_ratios", [1.0]) != [1.0] or metrics.get("test_flip"):
        ratios = ",".join(f"{r:g}" for r in metrics["test_ratios"])
        line += f"  scales x{ratios}{' + flip' if metrics['test_flip'] else ''}"
    return f"{line}  ({metrics['images']} images, {bad} unreadable{left_out})"


def summarise_predictions(results: list[dict[str, Any]]) -> str:
    """A line per predicted image: its top detections or classes and the overlay written, or its error."""
    lines = []
    for result in results:
        if "error" in result:
            lines.append(f"{result['path']}: ERROR {result['error']}")
        elif "detections" in result:
            found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in result["detections"][:5]) or "nothing"
            lines.append(f"{result['path']}: {found} -> {result['overlay']}")
        else:
            top = sorted(result["class_fractions"].items(), key=lambda item: -item[1])[:3]
            lines.append(f"{result['path']}: " + ", ".join(f"{k} {v:.0%}" for k, v in top) + f" -> {result['overlay']}")
    return "\n".join(lines)
