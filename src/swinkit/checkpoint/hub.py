"""Downloading the published Swin weights into a local cache.

The official Microsoft release (https://github.com/microsoft/Swin-Transformer, MODELHUB.md; the
detection and segmentation models of Swin-Transformer-Object-Detection / -Semantic-Segmentation)
and torchvision's own trainings. The official release publishes no checksums; torchvision puts the
first 8 hex digits of each file's SHA-256 in its name, which is checked. Nothing here runs unless
called: tests never download.

    path = swinkit.checkpoint.download("swin_tiny_patch4_window7_224")
    model = swinkit.create_model(checkpoint=path)
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_write

logger = logging.getLogger(__name__)

_OFFICIAL = "https://github.com/SwinTransformer/storage/releases/download/"
_TORCHVISION = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class PublishedWeights:
    """One published file: where it is, what it holds, and the checksum its publisher gives (if any)."""

    url: str
    num_classes: int
    sha256_prefix: str | None = None  # the leading hex digits of the file's SHA-256

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _official(release: str, stem: str, num_classes: int = 1000) -> PublishedWeights:
    return PublishedWeights(f"{_OFFICIAL}{release}/{stem}.pth", num_classes)


# Name -> file. Names are the official file stems; torchvision's trainings are "torchvision_<model>".
PUBLISHED: dict[str, PublishedWeights] = {
    # Swin V1, ImageNet-1K
    "swin_tiny_patch4_window7_224": _official("v1.0.0", "swin_tiny_patch4_window7_224"),
    "swin_small_patch4_window7_224": _official("v1.0.0", "swin_small_patch4_window7_224"),
    "swin_base_patch4_window7_224": _official("v1.0.0", "swin_base_patch4_window7_224"),
    "swin_base_patch4_window12_384": _official("v1.0.0", "swin_base_patch4_window12_384"),
    # Swin V1, ImageNet-22K pre-training (21841 classes) and its ImageNet-1K fine-tuning
    "swin_tiny_patch4_window7_224_22k": _official("v1.0.8", "swin_tiny_patch4_window7_224_22k", 21841),
    "swin_tiny_patch4_window7_224_22kto1k_finetune": _official(
        "v1.0.8", "swin_tiny_patch4_window7_224_22kto1k_finetune"
    ),
    "swin_small_patch4_window7_224_22k": _official("v1.0.8", "swin_small_patch4_window7_224_22k", 21841),
    "swin_small_patch4_window7_224_22kto1k_finetune": _official(
        "v1.0.8", "swin_small_patch4_window7_224_22kto1k_finetune"
    ),
    "swin_base_patch4_window7_224_22k": _official("v1.0.0", "swin_base_patch4_window7_224_22k", 21841),
    "swin_base_patch4_window7_224_22kto1k": _official("v1.0.0", "swin_base_patch4_window7_224_22kto1k"),
    "swin_base_patch4_window12_384_22k": _official("v1.0.0", "swin_base_patch4_window12_384_22k", 21841),
    "swin_base_patch4_window12_384_22kto1k": _official("v1.0.0", "swin_base_patch4_window12_384_22kto1k"),
    "swin_large_patch4_window7_224_22k": _official("v1.0.0", "swin_large_patch4_window7_224_22k", 21841),
    "swin_large_patch4_window7_224_22kto1k": _official("v1.0.0", "swin_large_patch4_window7_224_22kto1k"),
    "swin_large_patch4_window12_384_22k": _official("v1.0.0", "swin_large_patch4_window12_384_22k", 21841),
    "swin_large_patch4_window12_384_22kto1k": _official("v1.0.0", "swin_large_patch4_window12_384_22kto1k"),
    # Swin V2, ImageNet-1K
    "swinv2_tiny_patch4_window8_256": _official("v2.0.0", "swinv2_tiny_patch4_window8_256"),
    "swinv2_small_patch4_window8_256": _official("v2.0.0", "swinv2_small_patch4_window8_256"),
    "swinv2_base_patch4_window8_256": _official("v2.0.0", "swinv2_base_patch4_window8_256"),
    "swinv2_tiny_patch4_window16_256": _official("v2.0.0", "swinv2_tiny_patch4_window16_256"),
    "swinv2_small_patch4_window16_256": _official("v2.0.0", "swinv2_small_patch4_window16_256"),
    "swinv2_base_patch4_window16_256": _official("v2.0.0", "swinv2_base_patch4_window16_256"),
    # Swin V2, ImageNet-22K pre-training at 192 and its ImageNet-1K fine-tunings
    "swinv2_base_patch4_window12_192_22k": _official("v2.0.0", "swinv2_base_patch4_window12_192_22k", 21841),
    "swinv2_base_patch4_window12to16_192to256_22kto1k_ft": _official(
        "v2.0.0", "swinv2_base_patch4_window12to16_192to256_22kto1k_ft"
    ),
    "swinv2_base_patch4_window12to24_192to384_22kto1k_ft": _official(
        "v2.0.0", "swinv2_base_patch4_window12to24_192to384_22kto1k_ft"
    ),
    "swinv2_large_patch4_window12_192_22k": _official("v2.0.0", "swinv2_large_patch4_window12_192_22k", 21841),
    "swinv2_large_patch4_window12to16_192to256_22kto1k_ft": _official(
        "v2.0.0", "swinv2_large_patch4_window12to16_192to256_22kto1k_ft"
    ),
    "swinv2_large_patch4_window12to24_192to384_22kto1k_ft": _official(
        "v2.0.0", "swinv2_large_patch4_window12to24_192to384_22kto1k_ft"
    ),
    # Swin's dense models, read whole by swinkit.dense.load_dense and the segment / detect commands:
    # Swin-Transformer-Object-Detection (mmdet, COCO's 80 classes; no suffix = 3x schedule) and
    # Swin-Transformer-Semantic-Segmentation (mmseg UPerNet, ADE20K's 150 classes)
    **{
        stem: _official(release, stem, 80)
        for release, stem in [
            ("v1.0.3", "mask_rcnn_swin_tiny_patch4_window7_1x"),
            ("v1.0.2", "mask_rcnn_swin_tiny_patch4_window7"),
            ("v1.0.2", "mask_rcnn_swin_small_patch4_window7"),
            ("v1.0.3", "cascade_mask_rcnn_swin_tiny_patch4_window7_1x"),
            ("v1.0.2", "cascade_mask_rcnn_swin_tiny_patch4_window7"),
            ("v1.0.2", "cascade_mask_rcnn_swin_small_patch4_window7"),
            ("v1.0.2", "cascade_mask_rcnn_swin_base_patch4_window7"),
        ]
    },
    **{
        f"upernet_swin_{size}_patch4_window7_512x512": _official(
            "v1.0.1", f"upernet_swin_{size}_patch4_window7_512x512", 150
        )
        for size in ("tiny", "small", "base")
    },
    # torchvision's own trainings (torchvision layout; the name carries the SHA-256 prefix)
    "torchvision_swin_t": PublishedWeights(_TORCHVISION + "swin_t-704ceda3.pth", 1000, "704ceda3"),
    "torchvision_swin_s": PublishedWeights(_TORCHVISION + "swin_s-5e29d889.pth", 1000, "5e29d889"),
    "torchvision_swin_b": PublishedWeights(_TORCHVISION + "swin_b-68c6b09e.pth", 1000, "68c6b09e"),
    "torchvision_swin_v2_t": PublishedWeights(_TORCHVISION + "swin_v2_t-b137f0e2.pth", 1000, "b137f0e2"),
    "torchvision_swin_v2_s": PublishedWeights(_TORCHVISION + "swin_v2_s-637d8ceb.pth", 1000, "637d8ceb"),
    "torchvision_swin_v2_b": PublishedWeights(_TORCHVISION + "swin_v2_b-781e5279.pth", 1000, "781e5279"),
}


def cache_dir() -> Path:
    """``$SWINKIT_CACHE``, else ``$XDG_CACHE_HOME/swinkit``, else ``~/.cache/swinkit``."""
    if os.environ.get("SWINKIT_CACHE"):
        return Path(os.environ["SWINKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swinkit"


def download(name: str, directory: str | os.PathLike | None = None, timeout: float = 60.0) -> Path:
    """The local path of published weights ``name`` (see :data:`PUBLISHED`), downloading them once.

    A file already in the cache is used without any network access. Raises ``ConnectionError``
    when the file is not cached and cannot be fetched (offline), saying where to put it by hand.
    """
    if name not in PUBLISHED:
        raise ValueError(f"unknown published weights {name!r}; known: {', '.join(sorted(PUBLISHED))}")
    weights = PUBLISHED[name]
    path = Path(directory) if directory is not None else cache_dir()
    path = path / weights.file_name
    if path.is_file():
        return path
    logger.info("downloading %s to %s", weights.url, path)
    try:
        with urllib.request.urlopen(weights.url, timeout=timeout) as response:
            atomic_write(path, lambda tmp: _fetch(response, Path(tmp), weights))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"could not download {name} from {weights.url} ({reason}). Without network access, fetch the file "
            f"elsewhere and put it at {path} (or set SWINKIT_CACHE), or pass its path to create_model(checkpoint=...)"
        ) from None
    return path


def _fetch(response, target: Path, weights: PublishedWeights) -> None:
    digest = hashlib.sha256()
    with target.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if weights.sha256_prefix and not digest.hexdigest().startswith(weights.sha256_prefix):
        raise ValueError(
            f"{weights.url}: downloaded file's SHA-256 {digest.hexdigest()} does not start with the published "
            f"{weights.sha256_prefix}; the download is corrupt or the file was replaced (not kept)"
        )


def published_names() -> list[str]:
    """The names :func:`download` knows, sorted."""
    return sorted(PUBLISHED)
