"""``swinkit demo``: the main job on the bundled data (see ``make demo``)."""

from __future__ import annotations

import logging
from importlib.resources import files

import numpy as np
import torch
import torch.nn.functional as F

from .factory import create_model
from .info import describe_model

logger = logging.getLogger(__name__)


def run_demo() -> dict[str, object]:
    """Describe Swin-T, then run a small Swin on the bundled handwritten digits."""
    print(describe_model("swin_t")["text"])
    with np.load(files("swinkit") / "assets" / "digits.npz") as data:
        images = torch.from_numpy(data["images"][:16]).float().div(16.0)
        labels = data["labels"][:16]
    x = F.interpolate(images[:, None].expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", align_corners=False)
    model = create_model("swin_test", num_classes=10, img_size=32).eval()
    with torch.no_grad():
        logits = model(x)
    print(f"forward pass on {len(x)} bundled digit images (labels {labels.tolist()}): logits {tuple(logits.shape)}")
    return {"logits_shape": tuple(logits.shape)}
