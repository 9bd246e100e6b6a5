"""Named Swin configurations as frozen dataclasses.

A :class:`SwinConfig` describes one architecture completely (it is what swinkit's own checkpoint
files store), so ``create_model(name, **overrides)`` is ``dataclasses.replace(PRESETS[name], ...)``.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any

# ImageNet statistics, the ones every published Swin checkpoint was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_types(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Refuse a stored value of the wrong kind by name (``window_size: "seven"``), before it fails
    far away in arithmetic; numbers that are whole stand for floats, bools for nothing else."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        kind = hints[name]
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            fits = isinstance(value, (list, tuple)) and all(_is_kind(item, v) for v in value)
            shown = f"a list of {item.__name__}"
        else:
            fits, shown = _is_kind(kind, value), getattr(kind, "__name__", str(kind))
        if not fits:
            raise ValueError(f"field {prefix}{name} must be {shown}, got {value!r}")


def is_whole(value: Any) -> bool:
    """An integer of any type (numpy's too), never a bool: ``True`` is no count or size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number of any type (a whole one too, numpy's too), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_kind(kind: Any, value: Any) -> bool:
    # Python's own numbers only: a stored config is written back as JSON, which numpy's are not.
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the model: resize the short side, center crop, normalise."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_types(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "preprocessing.")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"preprocessing mean {self.mean} and std {self.std} need one value per channel each")
        if not all(value > 0 for value in self.std):
            raise ValueError(f"preprocessing std {self.std} must be above 0 (it divides)")
        if self.resize < 1 or self.crop < 1:
            raise ValueError(f"preprocessing resize {self.resize} and crop {self.crop} must be at least 1 pixel")

    @classmethod
    def for_size(cls, img_size: int, crop_pct: float = 0.875) -> Preprocessing:
        """The official evaluation rule: bicubic resize to ``img_size / crop_pct``, then center crop."""
        return cls(resize=int(img_size / crop_pct), crop=img_size)


@dataclass(frozen=True)
class SwinConfig:
    """Every architectural choice of a Swin V1 or V2 model.

    ``img_size`` is the construction size: it fixes the clamped window of stages whose map is not
    larger than the window (the official classification rule) and the absolute position embedding
    grid. The model itself runs on any input size.
    """

    family: str = "v1"  # "v1" or "v2"
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False  # absolute position embedding
    patch_norm: bool = True
    # Detection-style window rule: never clamp the window to the map, always shift, pad instead.
    always_shift: bool = False
    # Backbone mode: no final norm and head; the stage maps in ``out_indices`` are the output.
    features_only: bool = False
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    # A LayerNorm on each output stage (``norm0`` .. ``norm3``, as the official detection backbone).
    stage_norms: bool = False
    # V2 only: window size each stage was pretrained with (0 = the current window).
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    # V2 huge/giant: a LayerNorm on the main branch after every this many blocks (0 = none).
    extra_norm_period: int = 0
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        # Types first (``features_only="False"`` would build a backbone; ``window_size=7.5`` fail deep in torch).
        _check_types(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if self.family not in ("v1", "v2"):
            raise ValueError(f"family must be 'v1' or 'v2', got {self.family!r}")
        sizes = {
            "embed_dim": (self.embed_dim,),
            "in_chans": (self.in_chans,),
            "depths": self.depths,
            "num_heads": self.num_heads,
        }
        for name, values in sizes.items():
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be at least 1 (each), got {getattr(self, name)}")
        for name, fits, rule in [
            ("mlp_ratio", self.mlp_ratio > 0, "above 0"),
            ("num_classes", self.num_classes >= 0, "0 or more (0: no head)"),
            ("extra_norm_period", self.extra_norm_period >= 0, "0 or more (0: none)"),
        ]:
            if not fits:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        if min(self.pretrained_window_sizes, default=0) < 0:
            raise ValueError(
                f"pretrained_window_sizes must be 0 or more (0: the stage's window), got {self.pretrained_window_sizes}"
            )
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have the same length")
        for stage, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**stage
            if dim % heads:
                raise ValueError(f"stage {stage}: dim {dim} is not divisible by num_heads {heads}")
        if self.window_size < 1 or self.patch_size < 1 or self.img_size < 1:
            raise ValueError(
                f"window_size, patch_size and img_size must be positive, got {self.window_size}, "
                f"{self.patch_size}, {self.img_size}"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:  # a rate of 1 would scale the kept values by 1 / 0
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        bad = [i for i in self.out_indices if not 0 <= i < len(self.depths)]
        if bad or not self.out_indices:
            raise ValueError(
                f"out_indices {self.out_indices} must name stages in 0..{len(self.depths) - 1} "
                f"(depths {self.depths} has {len(self.depths)} stages)"
            )
        if len(self.pretrained_window_sizes) != len(self.depths):
            raise ValueError(
                f"pretrained_window_sizes {self.pretrained_window_sizes} needs one entry per stage "
                f"(depths {self.depths} has {len(self.depths)} stages; 0 = the stage's current window)"
            )

    @property
    def num_features(self) -> int:
        """Channels of the last stage."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SwinConfig:
        """Build from :meth:`to_dict` output (lists become tuples); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SwinConfig fields {unknown}; accepted: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("preprocessing"), dict):
            preprocessing = values["preprocessing"]
            unknown = sorted(set(preprocessing) - {f.name for f in dataclasses.fields(Preprocessing)})
            if unknown:
                raise ValueError(f"unknown preprocessing fields {unknown}")
            values["preprocessing"] = Preprocessing(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in preprocessing.items()}
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # types checked there

    def replace(self, **overrides: Any) -> SwinConfig:
        """A copy with ``overrides``; an unknown name fails listing the accepted ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown model option(s) {unknown}; accepted: {sorted(known)}")
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        if "img_size" in overrides and "preprocessing" not in overrides:
            overrides["preprocessing"] = Preprocessing.for_size(overrides["img_size"])
        if overrides.get("features_only") and "stage_norms" not in overrides:
            overrides["stage_norms"] = True
        overrides.update(self._per_stage_defaults(overrides))
        return dataclasses.replace(self, **overrides)

    def _per_stage_defaults(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Per-stage fields that follow a new number of stages while they hold their defaults.

        ``depths=(2, 2, 6)`` alone should give a three-stage model: every stage out, no pretrained
        windows. A per-stage value that is not the default (some pretrained window sizes, a
        choice of stages) is left for :meth:`__post_init__` to check, as only the caller knows it.
        """
        stages = len(overrides.get("depths", self.depths))
        if stages == len(self.depths):
            return {}
        follow = {}
        if "out_indices" not in overrides and self.out_indices == tuple(range(len(self.depths))):
            follow["out_indices"] = tuple(range(stages))
        if "pretrained_window_sizes" not in overrides and not any(self.pretrained_window_sizes):
            follow["pretrained_window_sizes"] = (0,) * stages
        return follow


def _v1(embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], **kw: Any) -> SwinConfig:
    img_size = kw.get("img_size", 224)
    return SwinConfig(
        family="v1",
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        preprocessing=Preprocessing.for_size(img_size),
        **kw,
    )


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


def _v2(
    embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], crop: bool = True, **kw: Any
) -> SwinConfig:
    """A Swin V2 preset; ``crop=False`` evaluates at full size (the official ``TEST.CROP: False``)."""
    img_size = kw["img_size"]
    preprocessing = Preprocessing.for_size(img_size) if crop else Preprocessing(resize=img_size, crop=img_size)
    return SwinConfig(
        family="v2", embed_dim=embed_dim, depths=depths, num_heads=num_heads, preprocessing=preprocessing, **kw
    )


# V2 paper Sec. 3.6. The paper gives no head counts for H and G: 32 channels per head, as in every other Swin.
_H = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88))
_G = dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128))
# Fine-tuned from the ImageNet-22K models (192 px, window 12, stage 4's map and window 6): each stage's
# pretraining window, which scales the continuous position bias coordinates.
_FROM_192 = dict(pretrained_window_sizes=(12, 12, 12, 6), drop_path_rate=0.2)

# Drop-path rates are those of the official training configs for each variant.
PRESETS: dict[str, SwinConfig] = {
    "swin_t": _v1(**_T, drop_path_rate=0.2),
    "swin_s": _v1(**_S, drop_path_rate=0.3),
    "swin_b": _v1(**_B, drop_path_rate=0.5),
    "swin_l": _v1(**_L, drop_path_rate=0.2),
    # The 384 models are fine-tuned at 384 with window 12; evaluated without crop (TEST.CROP False).
    "swin_b_384": dataclasses.replace(
        _v1(**_B, img_size=384, window_size=12, drop_path_rate=0.2),
        preprocessing=Preprocessing(resize=384, crop=384),
    ),
    "swin_l_384": dataclasses.replace(
        _v1(**_L, img_size=384, window_size=12, drop_path_rate=0.2),
        preprocessing=Preprocessing(resize=384, crop=384),
    ),
    # Small configurations for tests and quick experiments (every stage has a shifted block).
    "swin_test": _v1(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), img_size=64, window_size=4, drop_path_rate=0.0
    ),
    # For the bundled 8x8 digits shown at 32x32: patch 4 gives one token per original pixel, window 4.
    "swin_digits": dataclasses.replace(
        _v1(
            embed_dim=48,
            depths=(2, 2, 2, 2),
            num_heads=(2, 4, 8, 16),
            img_size=32,
            patch_size=4,
            window_size=4,
            num_classes=10,
            drop_path_rate=0.1,
        ),
        preprocessing=Preprocessing(resize=32, crop=32, interpolation="bilinear", mean=(0.305,) * 3, std=(0.376,) * 3),
    ),
    # Swin V2 (official configs/swinv2): ImageNet-1K at 256 with window 8 or 16.
    "swinv2_t": _v2(**_T, img_size=256, window_size=8, drop_path_rate=0.2),
    "swinv2_s": _v2(**_S, img_size=256, window_size=8, drop_path_rate=0.3),
    "swinv2_b": _v2(**_B, img_size=256, window_size=8, drop_path_rate=0.5),
    "swinv2_t_w16": _v2(**_T, img_size=256, window_size=16, drop_path_rate=0.2),
    "swinv2_s_w16": _v2(**_S, img_size=256, window_size=16, drop_path_rate=0.3),
    "swinv2_b_w16": _v2(**_B, img_size=256, window_size=16, drop_path_rate=0.5),
    # ImageNet-22K pretraining size, and the 1K fine-tunings from it (window 12 -> 16 at 256, -> 24 at 384).
    "swinv2_b_192": _v2(**_B, img_size=192, window_size=12, num_classes=21841, drop_path_rate=0.2),
    "swinv2_l_192": _v2(**_L, img_size=192, window_size=12, num_classes=21841, drop_path_rate=0.2),
    "swinv2_b_256": _v2(**_B, img_size=256, window_size=16, **_FROM_192),
    "swinv2_l_256": _v2(**_L, img_size=256, window_size=16, **_FROM_192),
    "swinv2_b_384": _v2(**_B, img_size=384, window_size=24, crop=False, **_FROM_192),
    "swinv2_l_384": _v2(**_L, img_size=384, window_size=24, crop=False, **_FROM_192),
    # The paper's huge (658M) and giant (3.0B) models, with the extra main-branch norm every 6 blocks, at the
    # 192 px / window 12 pretraining geometry. No official weights or config: drop path 0.2 is our choice.
    "swinv2_h": _v2(**_H, img_size=192, window_size=12, extra_norm_period=6, drop_path_rate=0.2),
    "swinv2_g": _v2(**_G, img_size=192, window_size=12, extra_norm_period=6, drop_path_rate=0.2),
    "swinv2_test": _v2(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), img_size=64, window_size=4, drop_path_rate=0.0
    ),
}


def variant_names() -> list[str]:
    """The preset names, sorted."""
    return sorted(PRESETS)


def get_config(name: str, **overrides: Any) -> SwinConfig:
    """The preset ``name`` with ``overrides`` applied; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(variant_names())}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
