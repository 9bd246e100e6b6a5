"""Decoding image files into RGB PIL images, whatever their mode (grayscale, RGBA, 16-bit, palette)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer images: scale the used range to 0..255 rather than clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path`` as RGB; raise :class:`BadImageError` naming the file otherwise.

    An image over PIL's pixel limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``, a guard against
    decompression bombs: a small file that decodes to gigabytes) is a bad image like any other;
    the limit is kept.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise BadImageError(f"cannot decode image {path}: {_bomb_reason(error)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        if os.path.islink(path) and not os.path.exists(path):
            reason = f"a symbolic link to {os.readlink(path)} that leads to no file (missing, or a loop)"
            raise BadImageError(f"cannot decode image {path}: {reason}") from None
        # PIL reports truncated data as OSError and some corrupt headers as SyntaxError.
        raise BadImageError(f"cannot decode image {path}: {error}") from None


def _bomb_reason(error: Image.DecompressionBombError) -> str:
    # PIL's message: "Image size (N pixels) exceeds limit of M pixels, could be decompression bomb ...".
    match = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(error))
    if match is None:
        return f"over PIL's pixel limit, a guard against decompression bombs ({error})"
    numbers = match.groups()
    return (
        f"{numbers[0]} pixels is over PIL's limit of {numbers[1]} pixels, a guard against decompression bombs "
        "(images that decode to gigabytes); shrink the image if it is genuine"
    )


def list_folder(folder: Path, what: str) -> list[os.DirEntry]:
    """The entries of ``folder``; one that cannot be listed raises ``OSError`` (``PermissionError``
    for permissions) naming it as ``"cannot read {what} {folder}: ..."``."""
    try:
        with os.scandir(folder) as listing:
            return list(listing)
    except OSError as error:
        kind = PermissionError if isinstance(error, PermissionError) else OSError
        raise kind(f"cannot read {what} {folder}: {error.strerror or error}") from None


def find_image_files(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """The image files (by extension) in ``folder`` and its sub-folders, sorted, as ``rglob`` finds them
    (symlinked files are taken, symlinked sub-folders are not followed). A symbolic link that leads to
    no file is taken too, so that it is reported as a bad image when loaded rather than lost unsaid.

    A folder that cannot be listed raises ``OSError`` (``PermissionError`` for permissions) naming it
    as ``"cannot read {what} {path}: ..."``: ``rglob`` would skip it silently.
    """
    found: list[Path] = []
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        for entry in list_folder(current, what):
            path = current / entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = not is_dir and (entry.is_file() or (entry.is_symlink() and not path.exists()))
            except OSError:  # a vanished entry: not an image file
                continue
            if is_dir:
                pending.append(path)
            elif is_file and path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
    return sorted(found)
