"""AdamW parameter groups (weight decay, layer-wise lr decay) and the per-iteration lr schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# Position tables / embeddings, V2's continuous-bias MLP and logit scale, and SimMIM's mask token
# train without weight decay, as in the official code (besides every norm and bias).
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "absolute_pos_embed", "cpb_mlp", "logit_scale", "mask_token")


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW decays ``param``: matrices and kernels yes; norms, biases and position tables no
    (the official rule)."""
    return param.ndim > 1 and not name.endswith(".bias") and not any(k in name for k in NO_DECAY_KEYWORDS)


def layer_id(name: str, depths: tuple[int, ...]) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the stem, block k -> k + 1, head last."""
    if name.startswith(("patch_embed.", "absolute_pos_embed")):
        return 0
    block = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name)
    if block:
        stage, index = int(block.group(1)), int(block.group(2))
        return sum(depths[:stage]) + index + 1
    merge = re.match(r"layers\.(\d+)\.downsample\.", name)
    if merge:  # merging at the end of stage i goes with that stage's last block
        return sum(depths[: int(merge.group(1)) + 1])
    return sum(depths) + 1


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """AdamW groups: decay / no-decay, split further by layer when ``layer_decay`` is set.

    Each group carries ``lr_scale`` (``layer_decay ** (num_layers - layer_id)``), applied by the schedule.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    # Depths only matter for layer decay, so any model (a dense one too) can be grouped without it.
    depths = tuple(model.config.depths) if layer_decay is not None else ()
    top = sum(depths) + 1
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = uses_weight_decay(name, param)
        layer = layer_id(name, depths) if layer_decay is not None else top
        key = (decay, layer)
        if key not in groups:
            scale = layer_decay ** (top - layer) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


class WarmupSchedule:
    """A per-iteration learning rate, written into every group (times its ``lr_scale``) at each step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    @property
    def current_lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


class WarmupCosine(WarmupSchedule):
    """Linear from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``.

    The official classification schedule (and swinkit's default for the dense tasks).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        warmup_lr: float,
        min_lr: float,
        warmup_steps: int,
        total_steps: int,
    ) -> None:
        self.lr, self.warmup_lr, self.min_lr = lr, warmup_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


class _WarmupFactor(WarmupSchedule):
    """The dense recipes' warm-up (mmcv's ``linear``): the regular rate times a factor that rises
    linearly from ``warmup_lr / lr`` to 1 over ``warmup_steps``; the regular rate counts from step 0."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, warmup_lr: float, warmup_steps: int) -> None:
        self.lr, self.warmup_steps = lr, warmup_steps
        self.warmup_ratio = warmup_lr / lr if lr else 1.0
        super().__init__(optimizer)

    def regular_lr(self, step: int) -> float:
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        lr = self.regular_lr(step)
        if step < self.warmup_steps:
            return lr * (self.warmup_ratio + (1.0 - self.warmup_ratio) * step / self.warmup_steps)
        return lr


class WarmupPoly(_WarmupFactor):
    """``min_lr + (lr - min_lr) * (1 - step / total_steps) ** power`` after the warm-up (UPerNet on ADE20K: power 1)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        warmup_lr: float,
        min_lr: float,
        warmup_steps: int,
        total_steps: int,
        power: float = 1.0,
    ) -> None:
        self.min_lr, self.total_steps, self.power = min_lr, max(total_steps, 1), power
        super().__init__(optimizer, lr, warmup_lr, warmup_steps)

    def regular_lr(self, step: int) -> float:
        remaining = max(0.0, 1.0 - step / self.total_steps)
        return self.min_lr + (self.lr - self.min_lr) * remaining**self.power


class WarmupStep(_WarmupFactor):
    """``lr`` times ``gamma`` for every milestone step reached (Mask R-CNN 3x: epochs 27 and 33, gamma 0.1)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        warmup_lr: float,
        warmup_steps: int,
        milestones: Iterable[int],
        gamma: float = 0.1,
    ) -> None:
        self.milestones, self.gamma = sorted(milestones), gamma
        super().__init__(optimizer, lr, warmup_lr, warmup_steps)

    def regular_lr(self, step: int) -> float:
        return self.lr * self.gamma ** sum(step >= milestone for milestone in self.milestones)


def build_optimizer(
    model: nn.Module, weight_decay: float, layer_decay: float | None, **adamw: Any
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; the fused (single-kernel) implementation where it applies.

    torch's default AdamW on CPU updates one tensor at a time with about ten elementwise ops each;
    the fused kernel does the same arithmetic in one pass (a Swin-T step: about 30 ms instead of
    100-150 ms on two CPU cores). Sharded (FSDP) or non-float parameters keep the default.
    """
    groups = parameter_groups(model, weight_decay, layer_decay)
    if not groups:
        raise ValueError("no trainable parameters: every stage is frozen")
    if "fused" not in adamw and "foreach" not in adamw:
        adamw["fused"] = can_fuse(p for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, **adamw)


def can_fuse(parameters: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these: plain (not sharded) floating tensors on CPU or CUDA."""
    return all(
        type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in parameters
    )
