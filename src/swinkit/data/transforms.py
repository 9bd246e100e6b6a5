"""Training augmentation (timm's building blocks) and evaluation preprocessing."""

from __future__ import annotations

from typing import Any

from PIL import Image
from torchvision import transforms as T

from ..variants import Preprocessing
from .images import BadImageError

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> T.InterpolationMode:
    """torchvision's interpolation mode for ``name`` (bicubic, bilinear, nearest); a ``ValueError`` otherwise."""
    if name not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {name!r}; accepted: {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


# The most pixels evaluation's short-side resize may make (about 100 MB in RGB) before the center
# crop: an image of 8000x1 pixels (a 105-byte PNG) resized to a short side of 256 took 2 GB, one of
# 100000x1 25 GB. At 256 only images longer than 512 times their width (or height) reach it.
MAX_RESIZED_PIXELS = 1 << 25


class ShortSideResize:
    """torchvision's ``Resize(size)`` (the short side to ``size``, the same pixels), refusing an image
    it would make larger than :data:`MAX_RESIZED_PIXELS` as a :class:`BadImageError` (a bad image,
    reported and skipped like an undecodable one) instead of asking for gigabytes."""

    def __init__(self, size: int, interpolation: T.InterpolationMode) -> None:
        self.resize = T.Resize(size, interpolation=interpolation)
        self.size = size

    def __call__(self, image: Any) -> Any:
        if isinstance(image, Image.Image):
            width, height = image.size
            new_long = int(self.size * max(width, height) / min(width, height))  # torchvision's rounding
            if self.size * new_long > MAX_RESIZED_PIXELS:
                resized = f"{new_long}x{self.size}" if width > height else f"{self.size}x{new_long}"
                raise BadImageError(
                    f"an image of {width}x{height} pixels is too elongated to evaluate: resizing its shorter side "
                    f"to {self.size} makes it {resized}, over the {MAX_RESIZED_PIXELS} pixels accepted"
                )
        return self.resize(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.resize.interpolation.value})"


def eval_crop(preprocessing: Preprocessing) -> T.Compose:
    """The picture the model sees, as a PIL image: resize the short side (:class:`ShortSideResize`; or
    squash when resize == crop), center crop."""
    mode = interpolation_mode(preprocessing.interpolation)
    if preprocessing.resize == preprocessing.crop:
        resize = T.Resize((preprocessing.crop, preprocessing.crop), interpolation=mode)
    else:
        resize = ShortSideResize(preprocessing.resize, mode)
    return T.Compose([resize, T.CenterCrop(preprocessing.crop)])


def eval_transform(preprocessing: Preprocessing) -> T.Compose:
    """The official evaluation pipeline: :func:`eval_crop`, then to a normalized tensor."""
    return T.Compose(
        [*eval_crop(preprocessing).transforms, T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    )


def train_transform(preprocessing: Preprocessing, recipe: Any) -> Any:
    """Random-resized crop, flips, RandAugment and random erasing, from timm, as the recipe says."""
    from timm.data import create_transform

    auto_augment = recipe.auto_augment if recipe.auto_augment not in ("", "none", None) else None
    try:
        return create_transform(
            input_size=preprocessing.crop,
            is_training=True,
            scale=tuple(recipe.crop_scale),
            ratio=tuple(recipe.crop_ratio),
            hflip=recipe.hflip,
            color_jitter=recipe.color_jitter if recipe.color_jitter > 0 else None,
            auto_augment=auto_augment,
            interpolation=preprocessing.interpolation,
            mean=preprocessing.mean,
            std=preprocessing.std,
            re_prob=recipe.reprob,
            re_mode="pixel",
            re_count=1,
        )
    except AssertionError:  # timm asserts on a policy name it does not know
        raise ValueError(
            f"training option 'auto_augment' must be 'none' or a policy timm reads (RandAugment "
            f"'rand-m9-mstd0.5-inc1' as the paper, 'augmix-...', or AutoAugment's 'v0', 'v0r', 'original', "
            f"'originalr', '3a'), got {recipe.auto_augment!r}"
        ) from None
