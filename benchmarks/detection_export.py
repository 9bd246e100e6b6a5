"""A full-size Swin detector exported to ONNX: export time, file size, agreement with eager, speed.

    python benchmarks/detection_export.py                       # Swin-T Mask R-CNN, random weights
    python benchmarks/detection_export.py --cascade
    python benchmarks/detection_export.py --checkpoint model.safetensors --images a.jpg b.jpg

With random weights every region's score is near 1 / classes, under the 0.05 threshold. So a
random model is exported twice: with threshold 0 for the comparison (100 detections an image),
and with ``--score-threshold`` (default 0.05, the configs') for the timing, as a trained model
runs. At threshold 0 every class's box of every region reaches the final NMS (1000 x 80 boxes):
torchvision's eager NMS loops over the classes above 4000 boxes, the exported graph (torchvision's
traced path) runs one NMS over all of them, which is what a trained model never asks for. The
eager model and the onnxruntime session run alternately on the same images, ``--rounds`` times
(medians quoted).

A random model at 0.05 detects nothing, so its mask heads never run. ``--detections`` raises one
class's logit in the box predictor (every stage's, for the cascade) by 10 in the timed model:
every region then scores that class near 1, and the final NMS and top 100 leave up to 100
detections an image, masks pasted, as a trained model on a busy image runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF

from swinkit.data import load_image
from swinkit.dense import DenseSpec, create_detector, load_dense
from swinkit.dense.detection_export import ExportedDetector, compare_with_eager, export_detection

FAVOURED_LOGIT = 10.0  # --detections: added to one class's logit, so random regions pass 0.05


def _model(
    args: argparse.Namespace, score_threshold: float, detections: bool = False
) -> tuple[torch.nn.Module, DenseSpec]:
    if args.checkpoint:
        return load_dense(args.checkpoint)
    options = {"cascade": args.cascade, "score_threshold": score_threshold, "min_size": 800, "max_size": 1333}
    torch.manual_seed(0)
    model = create_detector(args.model, 80, detector_options=options).eval()
    if detections:
        heads = model.roi_heads
        for stage in heads.stages if hasattr(heads, "stages") else [heads]:
            with torch.no_grad():
                stage.box_predictor.cls_score.bias[1] += FAVOURED_LOGIT
    classes = [f"class{i}" for i in range(80)]
    head = {**options, "masks": True}
    spec = DenseSpec(
        "detect", model.backbone.body.config, classes, head=head, inference={"category_ids": list(range(80))}
    )
    return model, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--cascade", action="store_true")
    parser.add_argument("--checkpoint", help="a detection model file instead of random weights (exported once)")
    parser.add_argument("--images", nargs="*", help="image files (default: noise at 480x640 and 640x427)")
    parser.add_argument("--score-threshold", type=float, default=0.05, help="of the random model timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--detections", action="store_true", help="time a random model that detects (see above)")
    args = parser.parse_args()
    if args.images:
        images = [TF.to_tensor(load_image(path)) for path in args.images]
    else:
        images = [torch.rand(3, *size, generator=torch.Generator().manual_seed(i))
                  for i, size in enumerate([(480, 640), (640, 427)])]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        model, spec = _model(args, 0.0)
        path = Path(folder) / "compared.onnx"
        start = time.perf_counter()
        export_detection(model, spec, path, check=False)
        row = {"model": spec.heads() + " " + (args.checkpoint or args.model)}
        row["export_s"] = round(time.perf_counter() - start, 1)
        row["file_MB"] = round(path.stat().st_size / 2**20, 1)
        row.update(compare_with_eager(model, ExportedDetector(path), images))
        if not args.checkpoint:
            model, spec = _model(args, args.score_threshold, args.detections)
            path = Path(folder) / "timed.onnx"
            export_detection(model, spec, path, check=False)
            row["timed_score_threshold"] = args.score_threshold
            row["timed_favoured_logit"] = FAVOURED_LOGIT if args.detections else 0
            if args.detections:  # the mask path at full size, on detections a trained model would keep
                row["timed_comparison"] = compare_with_eager(model, ExportedDetector(path), images)
        row.update(_timings(model, ExportedDetector(path), images, args.rounds))
    row.update(torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(row, indent=2))


@torch.no_grad()
def _timings(model: torch.nn.Module, exported: ExportedDetector, images: list, rounds: int) -> dict:
    times: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
    counts = {name: [len(run([image])[0]["boxes"]) for image in images] for name, run in (("eager", model),
              ("onnxruntime", exported))}  # fmt: skip
    for _ in range(rounds):
        for name, run in (("eager", model), ("onnxruntime", exported)):
            start = time.perf_counter()
            for image in images:
                run([image])
            times[name].append((time.perf_counter() - start) / len(images))
    row: dict = {f"timed_detections_{name}": count for name, count in counts.items()}
    for name, values in times.items():
        row[f"{name}_s_per_image"] = round(statistics.median(values), 3)
    row["onnxruntime_vs_eager"] = round(row["eager_s_per_image"] / row["onnxruntime_s_per_image"], 2)
    return row


if __name__ == "__main__":
    main()
