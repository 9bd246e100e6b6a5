"""Dense prediction benchmark: train each head with a tiny Swin on rendered shapes, on CPU, a few minutes each.

    python benchmarks/dense_shapes.py [--out runs/dense-shapes] [--quick]

Writes a dataset of textured scenes with circles, squares and triangles (exact masks and boxes,
``swinkit.dense.shapes``), then trains, through the same ``fit_dense`` the CLI uses: UPerNet
(+ auxiliary FCN) for semantic segmentation, Mask R-CNN (boxes and masks) and Faster R-CNN (boxes),
and with ``--tasks cascade`` Cascade Mask R-CNN. It prints held-out mIoU / pixel accuracy
(single-scale, and multi-scale + flip as ``--aug-test``) beside the majority-class baseline, and
COCO box / mask mAP (single-scale, mirrored, and ``--aug-test``), with the wall time of each
run. Numbers go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from swinkit.dense import AUG_TEST_RATIOS, fit_dense, resolve_dense_config
from swinkit.dense.detection_augment import AUG_TEST_RATIOS as DETECTION_RATIOS
from swinkit.dense.predict import evaluate_dense
from swinkit.dense.shapes import write_shapes_dataset

BACKBONE = {"model": "swin_test", "drop_path_rate": 0.1, "workers": 0, "progress": False, "seed": 0}
# The short runs here use warm-up + cosine for both tasks (the recipes' poly / step schedules are
# tuned for 160k iterations and 36 epochs), as when the results in RESULTS.md were measured.
OPTIMISER = {
    "base_lr": 1e-3,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "warmup_steps": 50,
    "weight_decay": 0.05,
    "schedule": "cosine",
}


def majority_baseline(root: Path, split: str, classes: int) -> dict[str, float]:
    """Predict the most common training class (background) everywhere: its mIoU and pixel accuracy."""
    counts = np.zeros(classes)
    for mask in sorted((root / "annotations" / split).glob("*.png")):
        counts += np.bincount(np.asarray(Image.open(mask)).ravel(), minlength=classes)[:classes]
    majority = counts.argmax()
    # Only the majority class has a non-zero IoU: |gt majority| / all pixels.
    return {"mIoU": counts[majority] / counts.sum() / classes * 100, "aAcc": counts[majority] / counts.sum() * 100}


def train_segmentation(data: Path, out: Path, epochs: int) -> dict[str, float]:
    config = resolve_dense_config(
        "segment",
        {
            **BACKBONE,
            **OPTIMISER,
            "data": str(data),
            "output": str(out),
            "epochs": epochs,
            "batch_size": 8,
            "crop_size": 96,
            "scale": (96, 96),
            "ratio_range": (0.75, 1.5),
            "channels": 64,
            "aux_channels": 32,
        },
    )
    start = time.perf_counter()
    result = fit_dense(config)
    minutes = (time.perf_counter() - start) / 60
    scores = evaluate_dense(result.final_model, data, workers=0)
    per_class = {name: values["IoU"] for name, values in scores["per_class"].items()}
    start = time.perf_counter()
    augmented = evaluate_dense(result.final_model, data, workers=0, ratios=AUG_TEST_RATIOS, flip=True)
    aug_minutes = (time.perf_counter() - start) / 60
    return {"mIoU": scores["mIoU"], "mAcc": scores["mAcc"], "aAcc": scores["aAcc"], "IoU": per_class,
            "best_mIoU": result.best, "minutes": minutes,
            "aug_test": {"mIoU": augmented["mIoU"], "mAcc": augmented["mAcc"], "aAcc": augmented["aAcc"],
                         "IoU": {name: values["IoU"] for name, values in augmented["per_class"].items()},
                         "minutes": aug_minutes}}  # fmt: skip


def train_detection(
    data: Path, out: Path, epochs: int, masks: bool, cascade: bool = False, geometry: str = "mmdet", seed: int = 0
) -> dict[str, float]:
    config = resolve_dense_config(
        "detect",
        {
            **BACKBONE,
            **OPTIMISER,
            "seed": seed,
            "geometry": geometry,
            "data": str(data / "instances_training.json"),
            "images": str(data / "images" / "training"),
            "val_data": str(data / "instances_validation.json"),
            "val_images": str(data / "images" / "validation"),
            "output": str(out),
            "epochs": epochs,
            "batch_size": 8,
            "masks": masks,
            "cascade": cascade,
            "min_sizes": (80, 88, 96, 104, 112),
            "max_size": 160,
            "anchor_sizes": (16, 32, 64, 128, 256),
            "fpn_channels": 64,
            "box_head_dim": 256,
            "mask_head_dim": 64,
            "roi_batch_size": 128,
        },
    )
    start = time.perf_counter()
    result = fit_dense(config)
    last = result.history[-1]
    scores = {k[len("val_") :]: v for k, v in last.items() if k.startswith(("val_bbox", "val_segm"))}
    minutes = (time.perf_counter() - start) / 60
    return {**scores, "minutes": minutes, **_tested_with_views(result.final_model, data)}


def _tested_with_views(model_file: Path, data: Path) -> dict[str, dict[str, float]]:
    """The final detector's AP tested with mirroring, and with ``--aug-test``'s scales and mirroring."""
    found = {}
    for name, ratios in (("flip", None), ("aug_test", DETECTION_RATIOS)):
        start = time.perf_counter()
        options = dict(images=data / "images" / "validation", workers=0, ratios=ratios, flip=True)
        scores = evaluate_dense(model_file, data / "instances_validation.json", **options)
        wanted = {k: v for k, v in scores.items() if k.split("_")[-1] in ("AP", "AP50", "AP75")}
        found[name] = {**wanted, "minutes": (time.perf_counter() - start) / 60}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/dense-shapes", help="folder for the data and the runs")
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--seg-epochs", type=int, default=20)
    parser.add_argument("--det-epochs", type=int, default=3)
    parser.add_argument("--tasks", default="segment,maskrcnn,fasterrcnn", help="which heads to train, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more contend on a shared machine)")
    parser.add_argument("--geometry", default="mmdet", help="the detectors' anchors and RoIAlign: mmdet or torchvision")
    parser.add_argument("--seed", type=int, default=0, help="the detectors' training seed")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run of the whole script")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.quick:
        args.train_images, args.val_images, args.seg_epochs, args.det_epochs = 32, 8, 1, 1
    out = Path(args.out)
    data = write_shapes_dataset(out / "data", {"training": args.train_images, "validation": args.val_images}, size=96)
    detectors = {"maskrcnn": (True, False), "fasterrcnn": (False, False), "cascade": (True, True)}
    runs = {
        task: lambda masks=masks, cascade=cascade, task=task: train_detection(
            data, out / task, args.det_epochs, masks, cascade, args.geometry, args.seed
        )
        for task, (masks, cascade) in detectors.items()
    }
    runs["segment"] = lambda: train_segmentation(data, out / "segment", args.seg_epochs)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "data": f"{args.train_images} train / {args.val_images} held-out 96x96 images, 3 shape classes + background",
        "detectors": {"geometry": args.geometry, "seed": args.seed},
        "baseline": majority_baseline(data, "validation", 4),
        **{task: runs[task]() for task in args.tasks.split(",")},
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
