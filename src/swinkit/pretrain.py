"""SimMIM: masked image modeling with a Swin encoder (Xie et al., "SimMIM: A Simple Framework for
Masked Image Modeling", CVPR 2022), as in the official code.

- **Masking** (Sec. 3.1): the image is cut into ``mask_patch_size`` squares (32 pixels) and a
  ratio of them (0.6) is masked at random; a masked patch token (4 pixels) takes a learned mask
  token in place of its patch embedding, before the absolute position and the stages.
- **Prediction head** (Sec. 3.3): one linear layer (a 1x1 convolution) from the final normed map
  to ``stride**2 * in_chans`` values per token, rearranged to pixels (pixel shuffle): raw pixels
  at the encoder's stride, 32.
- **Loss** (Sec. 3.4): L1 between the prediction and the (normalized) image on masked pixels only,
  summed and divided by the masked pixel count and the channel count. The SwinV2 recipe predicts a
  normalized target instead (``norm_target_patch``, 47 there): each pixel less the mean of the
  ``p`` x ``p`` pixels around it (those inside the image), over their standard deviation.

:class:`SimMIM` wraps any swinkit encoder, V1 or V2; ``swinkit pretrain``
(:mod:`swinkit.train.pretrain`) trains it and writes the encoder for fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import official
from .model import SwinTransformer, check_images
from .parallel import image_splits, run_split
from .variants import SwinConfig, is_real, is_whole


class SimMIM(nn.Module):
    """A Swin encoder (no head) with SimMIM's mask token and one-layer pixel decoder.

    Keys: ``encoder.*`` (the encoder's own), ``mask_token`` ``(C,)``, ``decoder.0.{weight,bias}``.
    ``forward(images, mask)`` returns the loss; :meth:`reconstruct` the predicted pixels.
    ``norm_target_patch`` (odd, or 0 for the image as it is): the side of the neighbourhood that
    normalizes the target (:func:`local_statistics`).
    """

    def __init__(self, encoder: SwinTransformer, norm_target_patch: int = 0) -> None:
        super().__init__()
        if not isinstance(encoder, SwinTransformer):
            raise TypeError(
                "SimMIM needs a Swin encoder (swinkit SwinTransformer: swinkit.create_model(name, num_classes=0)), "
                f"got {type(encoder).__name__}"
            )
        config = encoder.config
        if config.features_only or config.num_classes != 0:
            raise ValueError(
                "SimMIM's encoder has no classifier and returns the final map: build it with num_classes=0 "
                f"and features_only=False (got num_classes={config.num_classes}, features_only={config.features_only})"
            )
        check_norm_target_patch(norm_target_patch)
        self.norm_target_patch = norm_target_patch
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(config.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.stride = config.patch_size * 2 ** (len(config.depths) - 1)  # 32
        self.decoder = nn.Sequential(
            nn.Conv2d(config.num_features, self.stride**2 * config.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    @property
    def config(self) -> SwinConfig:
        """The encoder's."""
        return self.encoder.config

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's stages (sharding and gradient checkpointing look for them here)."""
        return self.encoder.layers

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + name for name in self.encoder.no_weight_decay()} | {"mask_token"}

    @property
    def image_parallel(self) -> bool:
        """The encoder's switch (:mod:`swinkit.parallel`): a CPU batch of the fused path is split over
        worker threads for :meth:`reconstruct` (and so the loss) as for a classifier."""
        return self.encoder.image_parallel

    @image_parallel.setter
    def image_parallel(self, value: bool) -> None:
        self.encoder.image_parallel = value

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def encode(self, images: Tensor, mask: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` and ``mask`` ``(B, H/4, W/4)`` (1: masked) -> the final normed map
        ``(B, num_features, H/32, W/32)``."""
        self._check_inputs(images, mask)
        return self._encode(images, mask)

    def _check_inputs(self, images: Tensor, mask: Tensor) -> None:
        check_mask(images, mask, self.config.in_chans, self.config.patch_size, self.stride, self.mask_token.dtype)

    def _encode(self, images: Tensor, mask: Tensor) -> Tensor:
        encoder = self.encoder
        tokens = encoder.patch_embed(images)  # (B, H/4, W/4, C), normed
        weight = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - weight) + self.mask_token * weight
        x = encoder.add_position(tokens)
        for layer in encoder.layers:
            out, x = layer(x)
        return encoder.norm(out).permute(0, 3, 1, 2)

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """The predicted pixels ``(B, C, H, W)`` of every patch (only masked ones are trained).

        On the CPU's fused path the batch is split over the image-parallel workers, images and
        masks alike, each share encoded and decoded in its own thread (:mod:`swinkit.parallel`).
        """
        self._check_inputs(images, mask)
        parts = image_splits(self, images)
        if parts > 1:
            return run_split(self._reconstruct, images, parts, self, extras=(mask,))
        return self._reconstruct(images, mask)

    def _reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        return self.decoder(self._encode(images, mask))

    def target(self, images: Tensor) -> Tensor:
        """What the decoder learns to predict: the images, or their locally normalized pixels."""
        if not self.norm_target_patch:
            return images
        mean, std = local_statistics(images, self.norm_target_patch)
        return (images.to(mean.dtype) - mean) / std

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        predicted = self.reconstruct(images, mask)
        return reconstruction_loss(self.target(images), predicted, mask, self.config.patch_size)


def pretraining_parts(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A SimMIM file's mask token (as ``(C,)``) and decoder under :class:`SimMIM`'s names; empty for
    a file without both. The official code keeps the token as ``encoder.mask_token`` ``(1, 1, C)``,
    Hugging Face as ``swin.embeddings.mask_token`` (``swinv2.``); both name the decoder ``decoder.0``."""
    parts = {key: value for key, value in state_dict.items() if key in ("decoder.0.weight", "decoder.0.bias")}
    for key, value in state_dict.items():
        if key in ("mask_token", "encoder.mask_token") or key.endswith("embeddings.mask_token"):
            parts["mask_token"] = value.reshape(-1)
    return parts if {"mask_token", "decoder.0.weight", "decoder.0.bias"} <= parts.keys() else {}


def load_pretraining_parts(model: SimMIM, parts: dict[str, Tensor], source: str) -> None:
    """Copy :func:`pretraining_parts` into ``model``, refusing by name a part of another shape."""
    decoder = {f"decoder.0.{name}": parameter for name, parameter in model.decoder[0].named_parameters()}
    own = {"mask_token": model.mask_token, **decoder}
    for key, value in parts.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"{source}: SimMIM's {key} has shape {tuple(value.shape)} there but {tuple(own[key].shape)} in this "
                "model (another width, stride or channel count); pretrain that encoder afresh or load only its "
                "encoder (swinkit train --checkpoint)"
            )
    with torch.no_grad():
        for key, value in parts.items():
            own[key].copy_(value)


def official_state(state: dict[str, Tensor], config: SwinConfig) -> dict[str, dict[str, Tensor]]:
    """A :class:`SimMIM` state dict in the official code's layout, ``{"model": ...}``: the encoder under
    ``encoder.`` with the buffers the official encoder registers, ``encoder.mask_token`` ``(1, 1, C)``
    and ``decoder.0.*``."""
    encoder = {key[len("encoder.") :]: value for key, value in state.items() if key.startswith("encoder.")}
    out = {f"encoder.{key}": value for key, value in official.from_swinkit(encoder, config).items()}
    out["encoder.mask_token"] = state["mask_token"].reshape(1, 1, -1)
    out |= {key: value for key, value in state.items() if key.startswith("decoder.")}
    return {"model": out}


def check_norm_target_patch(patch: int, name: str = "norm_target_patch", off: bool = True) -> None:
    """Refuse, by name, a normalized-target patch that is neither 0 (off, where ``off``) nor an odd
    size of at least 3 (an even one is off centre; 1 has no deviation)."""
    if not is_whole(patch):
        raise TypeError(f"{name} must be an int, got {patch!r}")
    if (patch != 0 or not off) and (patch < 3 or patch % 2 == 0):
        raise ValueError(f"{name} must be {'0 (off) or ' if off else ''}an odd size of at least 3, got {patch}")


def local_statistics(images: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """Per pixel and channel, the mean and standard deviation of the ``patch`` x ``patch`` pixels
    centred on it that lie inside the image (``n`` of them): the variance is unbiased (over ``n - 1``),
    clamped at 0, and ``1e-6`` is added before the square root, as the official SwinV2 SimMIM recipe
    does. Float32 at least."""
    check_norm_target_patch(patch, "local_statistics' patch", off=False)
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    pool = {"kernel_size": patch, "stride": 1, "padding": patch // 2}
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_square = F.avg_pool2d(x * x, count_include_pad=False, **pool)
    # Pixels of each neighbourhood inside the image: fewer along the borders.
    inside = F.avg_pool2d(torch.ones_like(x[:1, :1]), count_include_pad=True, **pool) * patch**2
    variance = ((mean_square - mean * mean) * inside / (inside - 1)).clamp(min=0)
    return mean, (variance + 1e-6).sqrt()


def reconstruction_loss(images: Tensor, predicted: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """Mean absolute error on masked pixels, per channel (Eq. 1 of the paper); float32 at least."""
    dtype = torch.promote_types(images.dtype, torch.float32)
    pixels = mask_cells(mask, patch_size).unsqueeze(1).to(dtype)
    error = F.l1_loss(predicted.to(dtype), images.to(dtype), reduction="none")
    # The official code adds 1e-5 to an integer count, which makes a float32 sum (where the 1e-5 is
    # lost above about 100 pixels); the same here, so float64 checks agree to rounding.
    count = pixels.sum().to(torch.float32) + 1e-5
    return (error * pixels).sum() / count / images.shape[1]


def check_mask(
    images: Tensor, mask: Tensor, in_chans: int, patch_size: int, stride: int, dtype: torch.dtype | None = None
) -> None:
    """Images (of the model's ``dtype``) whose sides are multiples of the encoder's stride, and a mask
    of one value per patch on their device, 0 (visible) or 1 (masked)."""
    check_images(images, in_chans, dtype)
    H, W = images.shape[-2:]
    if H % stride or W % stride:
        raise ValueError(f"SimMIM reconstructs at stride {stride}: image sides must be multiples of it, got {H}x{W}")
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask must be a tensor (B, H/{patch_size}, W/{patch_size}) of 0 and 1, got {type(mask).__name__}"
        )
    expected = (images.shape[0], H // patch_size, W // patch_size)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must be (B, H/{patch_size}, W/{patch_size}) = {expected}, got {tuple(mask.shape)}")
    if mask.device != images.device:
        raise ValueError(f"mask is on {mask.device} but the images are on {images.device}: put both on one device")
    # Not while compiling: reading the values back would break the graph (the run's own masks are
    # random_mask's, 0 and 1).
    if not torch.compiler.is_compiling() and ((mask != 0) & (mask != 1)).any():
        values = mask.double()
        found = "NaN" if values.isnan().any() else f"values from {values.min().item():g} to {values.max().item():g}"
        raise ValueError(f"mask must hold 0 (visible) and 1 (masked) only, got {found}")


def random_mask(
    size: Sequence[int],
    mask_patch_size: int = 32,
    patch_size: int = 4,
    ratio: float = 0.6,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SimMIM's random mask for an ``H`` x ``W`` image: ``ceil(ratio * count)`` of the ``count``
    ``mask_patch_size`` squares masked, as a ``(H / patch_size, W / patch_size)`` float tensor of 0 / 1."""
    if not (isinstance(size, Sequence) and len(size) == 2 and all(map(is_whole, size))):
        raise TypeError(f"size must be the image's (H, W), two ints, got {size!r}")
    if min(size) < 1:
        raise ValueError(f"size must be two ints of at least 1, got {tuple(size)}")
    for name, value in (("mask_patch_size", mask_patch_size), ("patch_size", patch_size)):
        if not is_whole(value):
            raise TypeError(f"{name} must be an int of at least 1, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be an int of at least 1, got {value}")
    if not is_real(ratio):
        raise TypeError(f"mask ratio must be a number above 0 and below 1, got {ratio!r}")
    H, W = size
    if mask_patch_size % patch_size or H % mask_patch_size or W % mask_patch_size:
        raise ValueError(
            f"the mask patch size ({mask_patch_size}) must be a multiple of the model's patch size ({patch_size}) "
            f"and divide the image sides ({H}x{W})"
        )
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be above 0 and below 1, got {ratio}")
    rows, cols = H // mask_patch_size, W // mask_patch_size
    count = math.ceil(rows * cols * ratio)
    mask = torch.zeros(rows * cols)
    mask[torch.randperm(rows * cols, generator=generator)[:count]] = 1.0
    return mask_cells(mask.view(rows, cols), mask_patch_size // patch_size)


def mask_cells(mask: Tensor, scale: int) -> Tensor:
    """A mask ``(..., h, w)`` spread over the ``scale`` x ``scale`` cells each value covers:
    ``(..., h * scale, w * scale)``."""
    return mask.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
