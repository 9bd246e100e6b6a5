"""Training augmentation (timm's building blocks) and evaluation preprocessing."""

from __future__ import annotations

from typing import Any

from torchvision import transforms as T

from ..variants import Preprocessing

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


def eval_crop(preprocessing: Preprocessing) -> T.Compose:
    """The picture the model sees, as a PIL image: resize the short side (or squash when resize ==
    crop), center crop."""
    mode = interpolation_mode(preprocessing.interpolation)
    if preprocessing.resize == preprocessing.crop:
        resize = T.Resize((preprocessing.crop, preprocessing.crop), interpolation=mode)
    else:
        resize = T.Resize(preprocessing.resize, interpolation=mode)
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
