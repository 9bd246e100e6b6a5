"""Mask AP of one detection file with mmdet's mask pasting and with torchvision's, on the same detections.

    python benchmarks/mask_pasting.py runs/dense-shapes/maskrcnn/model-final.safetensors \\
        runs/dense-shapes/data/instances_validation.json runs/dense-shapes/data/images/validation

Only the pasting differs between the two evaluations (the boxes, scores and 28 x 28 mask
probabilities are the model's; no test-time augmentation); see ``swinkit.dense.mmdet.paste_masks``.
"""

from __future__ import annotations

import argparse
import json

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from swinkit.dense import load_dense
from swinkit.dense.mmdet import MmdetTransform, transform_like
from swinkit.dense.predict import _evaluate_detection


class _TorchvisionPasting(MmdetTransform):
    """mmdet's resizing, torchvision's pasting: only the pasting differs from MmdetTransform."""

    postprocess = GeneralizedRCNNTransform.postprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data", help="COCO-style instances JSON")
    parser.add_argument("images", help="the images' folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, spec = load_dense(args.checkpoint)
    model.eval()
    pastings = {
        "mmdet": transform_like(model.transform, MmdetTransform),
        "torchvision": transform_like(model.transform, _TorchvisionPasting),
    }
    rows = {}
    for name, transform in pastings.items():
        model.transform = transform
        scores = _evaluate_detection(model, spec, args.data, args.images, workers=0, strict=False, views=[])
        rows[name] = {key: round(scores[key], 2) for key in ("bbox_AP", "segm_AP", "segm_AP50", "segm_AP75")}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
