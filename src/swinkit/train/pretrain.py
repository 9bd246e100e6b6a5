"""``swinkit pretrain``: SimMIM pretraining of a Swin encoder (:mod:`swinkit.pretrain`) on unlabelled
images, on the classification loop's machinery: the same data sources, checkpoints, exact resume,
DDP / FSDP through ``torchrun``, AMP and gradient accumulation.

The default recipe is the official 100-epoch SimMIM pretraining of Swin-B (192 x 192, window 6,
masks of 32 x 32 pixels at ratio 0.6, AdamW at 2e-4 per 512 images with 10 warm-up epochs and a
cosine to 1e-5, weight decay 0.05, gradient clipping 5, no stochastic depth, random resized crops
of scale 0.67-1 and flips). The 800-epoch recipes of the Swin Transformer repository are
``--recipe`` ``simmim-swin-b-800ep``, ``simmim-swin-l-800ep`` and ``simmim-swinv2-b-800ep`` (1e-4
per 512 images, the rate divided by 10 after epoch 700; SwinV2-B with stochastic depth 0.1 and a
target normalized over 47 x 47 pixels). The run writes the encoder as a swinkit file to fine-tune
from (``swinkit train --checkpoint .../encoder-final.safetensors``, with the matching
``simmim-finetune*`` recipe).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Subset

from ..checkpoint.io import make_folder, read_checkpoint, save_torch
from ..checkpoint.native import save as save_model
from ..data import (
    IMAGE_EXTENSIONS,
    AugmentedDataset,
    FileDataset,
    SeededTransform,
    collate_skipping_bad,
    csv_list,
    eval_crop,
    require_some_read,
    split_dataset,
)
from ..data.datasets import Sample
from ..data.images import find_image_files
from ..evaluate import amp_dtype
from ..pretrain import (
    SimMIM,
    check_norm_target_patch,
    load_pretraining_parts,
    local_statistics,
    mask_cells,
    official_state,
    pretraining_parts,
    random_mask,
)
from ..variants import Preprocessing
from . import distributed
from .config import (
    AT_LEAST_ONE,
    POSITIVE,
    BatchScaling,
    Limit,
    TrainConfig,
    add_arguments,
    check_limits,
    check_rates,
    explicit_options,
    one_of,
    recipe_note,
    resolve_options,
    schedule_notes,
)
from .data import SPLIT_SEED, RunData, load_datasets, train_loader, validation_source
from .loop import Trainer, build_model, held_out_bad, run_trainer, warmup_cosine, warn_bad_images
from .metrics import MetricsLog, plot_curves
from .optim import WarmupSchedule, WarmupStep, build_optimizer

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig(BatchScaling):
    """Everything a SimMIM pretraining run depends on; saved as ``config.yaml`` beside its checkpoints."""

    # Data: a folder of images (at any depth; labels unused), one with train/ and val/, a CSV
    # list, or None: the bundled digits.
    data: str | None = None
    val_data: str | None = None
    val_fraction: float = 0.05
    strict_data: bool = False
    workers: int = 2
    # Encoder: a preset (its head dropped), optionally initialised from any supported checkpoint.
    model: str = "swin_b"
    checkpoint: str | None = None
    img_size: int | None = 192
    window_size: int | None = 6
    drop_path_rate: float | None = 0.0
    grad_checkpointing: bool = False
    compile: bool = False
    attn_impl: str = "auto"
    # Masking, and the target: 0 the image as it is, an odd p each pixel normalized over p x p.
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target_patch: int = 0
    # Optimisation: AdamW, linear warm-up then cosine (or steps of lr_gamma at the lr_milestones
    # epochs: multistep), per iteration; lr scaled by batch / 512.
    lr_schedule: str = "cosine"
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    epochs: int = 100
    batch_size: int = 128
    accum_steps: int = 1
    base_lr: float = 2e-4
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0
    # Augmentation.
    crop_scale: tuple[float, float] = (0.67, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5
    # Machinery.
    amp: str = "none"
    seed: int = 0
    deterministic: bool = False
    fsdp: bool = False
    device: str = "auto"
    # Output.
    output: str = "runs/pretrain"
    resume: str = "auto"
    checkpoint_every: int = 0
    max_steps: int = 0
    progress: bool = True
    recipe: str = "simmim"

    # What the classification loop reads and pretraining does not offer.
    freeze_stages: ClassVar[int] = 0
    ema: ClassVar[bool] = False
    LIMITS: ClassVar[dict[str, Limit]]  # set below, from the fields
    HELP: ClassVar[dict[str, str]]  # set below, from the fields
    ORDERED: ClassVar[tuple[str, ...]] = ("crop_scale", "crop_ratio")

    def __post_init__(self) -> None:
        check_limits(self)
        check_norm_target_patch(self.norm_target_patch)
        check_schedule(self)
        check_rates(self)


LR_SCHEDULES = ("cosine", "multistep")


def check_schedule(config: PretrainConfig) -> None:
    """A known schedule; multistep's milestones after the warm-up (as the official scheduler asserts)."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}")
    if config.lr_schedule == "multistep":
        if not config.lr_milestones:
            raise ValueError("lr_schedule 'multistep' needs lr_milestones: the epochs at which to multiply by lr_gamma")
        if min(config.lr_milestones) < config.warmup_epochs:
            raise ValueError(
                f"lr_milestones {list(config.lr_milestones)} must all come after the "
                f"{config.warmup_epochs} warm-up epochs"
            )


# Classification's limits for the options both have (but its recipes), and the masking and schedule ones.
PretrainConfig.LIMITS = {
    **{
        name: limit
        for name, limit in TrainConfig.LIMITS.items()
        if name in PretrainConfig.__dataclass_fields__ and name != "recipe"
    },
    "mask_patch_size": AT_LEAST_ONE,
    "mask_ratio": Limit(lambda value: 0 < value < 1, "above 0 and below 1"),
    "lr_milestones": POSITIVE,
    "lr_gamma": POSITIVE,
}

# Classification's texts for the options both have in the same sense, and pretraining's own.
PretrainConfig.HELP = {
    **{name: text for name, text in TrainConfig.HELP.items() if name in {f.name for f in fields(PretrainConfig)}},
    "data": "images to pretrain on (labels unused): a folder, searched at any depth (train/ and val/ give the "
    "split if both are there), or a CSV of path,label; None: the bundled handwritten digits",
    "val_data": "validation images: a folder, searched at any depth, or a CSV of path,label (default: held out "
    "of --data)",
    "val_fraction": "share of --data held out to report the reconstruction loss each epoch, when it has no "
    "train/ and val/ and no --val-data is given",
    "batch_size": "images per step, per process",
    "model": "encoder preset (swinkit info --list); its head is dropped",
    "checkpoint": "initialise the encoder from this file (any supported format); a SimMIM file (official, Hugging "
    "Face or a run's simmim-final.pth) also gives the mask token and decoder",
    "img_size": "input size in pixels (None: the preset's), a multiple of --mask-patch-size and of the encoder's "
    "stride",
    "mask_patch_size": "side of the masked squares in pixels, a multiple of the encoder's patch size",
    "mask_ratio": "share of the squares masked in each image",
    "norm_target_patch": "0: reconstruct the pixels as they are; an odd P of 3 or more: each pixel normalized over "
    "the P x P pixels around it (SwinV2's 800-epoch recipe: 47)",
    "lr_schedule": "cosine (to --min-lr) or multistep (the rate times --lr-gamma at each of --lr-milestones), "
    "both after the linear warm-up",
    "lr_milestones": "epochs at which multistep multiplies the rate by --lr-gamma, all after the warm-up",
    "lr_gamma": "multistep's factor at each milestone",
    "min_lr": "learning rate the cosine ends at, per 512 images (cosine schedule only)",
    "weight_decay": "AdamW weight decay (none on norms, biases, position tables and the mask token)",
    "output": "folder for checkpoints, metrics, the encoder files and reconstructions.png",
    "recipe": "named set of option values, listed below (default: simmim with --data, digits without)",
}

# The Swin Transformer repository's 800-epoch pretraining (configs/simmim/*_800ep.yaml): 1e-4 per 512
# images, warm-up from 5e-7 over 10 epochs, the rate divided by 10 after epoch 700.
_SIMMIM_800EP: dict[str, Any] = dict(
    epochs=800,
    base_lr=1e-4,
    warmup_lr=5e-7,
    warmup_epochs=10,
    lr_schedule="multistep",
    lr_milestones=(700.0,),
    lr_gamma=0.1,
)

PRETRAIN_RECIPES: dict[str, dict[str, Any]] = {
    # The official simmim_pretrain__swin_base__img192_window6__100ep is the dataclass defaults.
    "simmim": {},
    "simmim-swin-b-800ep": dict(_SIMMIM_800EP, model="swin_b", window_size=6, drop_path_rate=0.0),
    "simmim-swin-l-800ep": dict(_SIMMIM_800EP, model="swin_l", window_size=12, drop_path_rate=0.0),
    "simmim-swinv2-b-800ep": dict(
        _SIMMIM_800EP, model="swinv2_b", window_size=12, drop_path_rate=0.1, norm_target_patch=47
    ),
    # The bundled digits at 32 x 32: masks of 8 x 8 pixels (16 per image), a small encoder.
    "digits": dict(
        model="swin_digits",
        img_size=32,
        window_size=4,
        mask_patch_size=8,
        epochs=10,
        batch_size=64,
        base_lr=4e-3,
        warmup_lr=4e-6,
        min_lr=4e-5,
        warmup_epochs=1,
        val_fraction=0.2,
        hflip=0.0,
        crop_scale=(0.7, 1.0),
        crop_ratio=(0.85, 1.15),
        output="runs/pretrain-digits",
    ),
}


PretrainConfig.LIMITS["recipe"] = one_of(PRETRAIN_RECIPES)


def resolve_pretrain_config(
    explicit: dict[str, Any] | None = None, config_file: str | os.PathLike | None = None
) -> PretrainConfig:
    """Defaults, then the recipe (``simmim`` with data, ``digits`` without), a YAML file, explicit values."""
    return resolve_options(
        PretrainConfig,
        PRETRAIN_RECIPES,
        explicit,
        config_file,
        lambda values: "simmim" if values.get("data") is not None else "digits",
    )


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """``swinkit pretrain``'s flags, and the note on its defaults and recipes."""
    add_arguments(parser, PretrainConfig, without_data=PRETRAIN_RECIPES["digits"])
    parser.epilog = recipe_note(
        PRETRAIN_RECIPES,
        "simmim",
        "the official 100-epoch SimMIM pretraining of Swin-B at 192",
        without_data="digits (the bundled handwritten digits)",
    )


def pretrain_config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The pretraining config from the command line: recipe, then ``--config`` file, then flags given."""
    return resolve_pretrain_config(explicit_options(args, PretrainConfig), getattr(args, "config", None))


class MaskedImage:
    """An image transform followed by SimMIM's random mask: ``(image tensor, mask)``.

    Under :class:`~swinkit.data.SeededTransform` the mask, like the crop, depends only on the seed,
    epoch and item: a resumed run masks the same patches.
    """

    def __init__(self, transform: Any, size: int, mask_patch_size: int, patch_size: int, ratio: float) -> None:
        self.transform, self.size = transform, size
        self.mask_patch_size, self.patch_size, self.ratio = mask_patch_size, patch_size, ratio

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        mask = random_mask((self.size, self.size), self.mask_patch_size, self.patch_size, self.ratio)
        return self.transform(image), mask


def simmim_transforms(config: PretrainConfig, preprocessing: Preprocessing, patch_size: int) -> tuple[Any, Any]:
    """Training (random resized crop, flip) and validation (resize, center crop) transforms, each masked."""
    size = preprocessing.crop
    normalize = [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    crop = T.RandomResizedCrop(size, scale=config.crop_scale, ratio=config.crop_ratio)
    train = T.Compose([crop, T.RandomHorizontalFlip(config.hflip), *normalize])
    val = T.Compose([*eval_crop(preprocessing).transforms, *normalize])
    masked = (config.mask_patch_size, patch_size, config.mask_ratio)
    return MaskedImage(train, size, *masked), MaskedImage(val, size, *masked)


def unlabelled_images(config: PretrainConfig) -> RunData:
    """The images to pretrain on, labels dropped: a folder's every image (in sub-folders or not;
    ``train/`` and ``val/`` sub-folders, if both are there, give the split), a CSV list, or the
    bundled digits; ``val_data`` (a folder or CSV list the same way) is the held-out part."""
    if config.data is None:
        data = load_datasets(config)
    else:
        root = Path(config.data)
        if config.val_data is not None:
            train, val = _unlabelled(root, config.strict_data), _unlabelled(Path(config.val_data), config.strict_data)
        elif root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir():
            train, val = _unlabelled(root / "train", config.strict_data), _unlabelled(root / "val", config.strict_data)
        else:
            train, val = split_dataset(_unlabelled(root, config.strict_data), config.val_fraction, SPLIT_SEED)
        data = RunData(train, val, [], str(root))
    data.classes = []  # labels are not used
    return data


def _unlabelled(path: Path, strict: bool) -> FileDataset:
    """A CSV list's images, or every image file under a folder at any depth (class folders or not)."""
    if path.suffix.lower() == ".csv":
        return csv_list(path, strict=strict)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist or is not a folder")
    paths = find_image_files(path, "dataset folder")
    if not paths:
        raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) at any depth")
    return FileDataset([Sample(str(p), 0) for p in paths], ["images"], strict=strict)


def encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a :class:`~swinkit.pretrain.SimMIM` state dict, under its own names."""
    return {key[len("encoder.") :]: value for key, value in state.items() if key.startswith("encoder.")}


def continue_simmim(model: SimMIM, checkpoint: str) -> None:
    """A SimMIM file's mask token and decoder too (the official code's, Hugging Face's or a run's
    ``simmim-final.pth``): pretraining goes on from where it was; other files give the encoder only."""
    parts = pretraining_parts(read_checkpoint(checkpoint)[0])
    if parts:
        load_pretraining_parts(model, parts, checkpoint)
        logger.info(
            "continuing SimMIM from %s: its mask token and decoder are loaded into the SimMIM model", checkpoint
        )


def check_sizes(img_size: int, stride: int, mask_patch_size: int, patch_size: int) -> None:
    """Refuse, by name, an image SimMIM cannot reconstruct or mask in whole patches."""
    if img_size % stride or img_size % mask_patch_size or mask_patch_size % patch_size:
        raise ValueError(
            f"pretraining option 'img_size' ({img_size}) must be a multiple of the encoder's stride ({stride}) and "
            f"of 'mask_patch_size' ({mask_patch_size}), itself a multiple of the patch size ({patch_size})"
        )


def pretrain_schedule(
    optimizer: torch.optim.Optimizer, config: PretrainConfig, steps_per_epoch: int, world: int
) -> WarmupSchedule:
    """The per-iteration rate of ``config.lr_schedule``, rates scaled by the total batch."""
    if config.lr_schedule == "cosine":
        return warmup_cosine(optimizer, config, steps_per_epoch, world)
    # The official MultiStepLRScheduler: the same linear warm-up, then lr * gamma per milestone passed
    # (a milestone is never inside the warm-up, so the warm-up factor of WarmupStep is the same line).
    return WarmupStep(
        optimizer,
        lr=config.scaled(config.base_lr, world),
        warmup_lr=config.scaled(config.warmup_lr, world),
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        milestones=[round(epoch * steps_per_epoch) for epoch in config.lr_milestones],
        gamma=config.lr_gamma,
    )


@dataclass
class PretrainResult:
    output: Path
    encoder: Path  # encoder-final.safetensors: fine-tune from it
    best_encoder: Path | None  # the encoder of the epoch with the lowest validation loss
    best_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    bad_images: int = 0
    seconds: float = 0.0


class PretrainTrainer(Trainer):
    """A SimMIM run: the classification :class:`~swinkit.train.Trainer` with a masked-image model,
    its loss and a reconstruction-loss validation (the loop's best score is minus that loss)."""

    command = "pretrain"

    best_file = "encoder-best.safetensors"

    def __init__(self, config: PretrainConfig, dist: distributed.Distributed) -> None:
        self.config, self.dist = config, dist
        self.output = make_folder(config.output)  # first: a file in the way is refused before any work
        encoder = build_model(config, num_classes=0)
        self.model = SimMIM(encoder, config.norm_target_patch)
        if config.checkpoint is not None:
            continue_simmim(self.model, config.checkpoint)
        self.model.to(dist.device)
        preprocessing = encoder.config.preprocessing
        check_sizes(preprocessing.crop, self.model.stride, config.mask_patch_size, encoder.config.patch_size)
        self.data = unlabelled_images(config)
        train_transform, val_transform = simmim_transforms(config, preprocessing, encoder.config.patch_size)
        self.loader, self.sampler, self.augmented = train_loader(self.data.train, train_transform, config, dist)
        self.val_loader = self._val_loader(val_transform)
        self.steps_per_epoch = self.sampler.steps // config.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"accum_steps {config.accum_steps} exceeds the {self.sampler.steps} batches of an epoch")
        self.forward_model = self._wrap(self.model)
        if config.fsdp:  # reconstruct() gathers the sharded weights as forward() does
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(self.model, "reconstruct")
        self.optimizer = build_optimizer(self.model, config.weight_decay, None, betas=config.betas, eps=config.eps)
        self.scheduler = pretrain_schedule(self.optimizer, config, self.steps_per_epoch, dist.world_size)
        for note in schedule_notes(config, self.steps_per_epoch):
            logger.warning(note)
        self.amp_dtype = amp_dtype(config.amp)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=config.amp == "fp16")
        self.ema = None
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.skipped_steps, self.best_top1 = 0, -float("inf")
        self.epoch_totals = {"loss": 0.0, "images": 0.0, "bad": 0.0}
        self.metrics = MetricsLog(self.output) if dist.is_main else None

    def _val_loader(self, transform: Any) -> DataLoader:
        """Every ``world``-th validation image, masked the same way in every epoch and every run."""
        dataset = AugmentedDataset(self.data.val, SeededTransform(transform, self.config.seed))
        shard = list(range(self.dist.rank, len(dataset), self.dist.world_size))
        return DataLoader(
            Subset(dataset, shard),
            batch_size=self.config.batch_size,
            num_workers=self.config.workers,
            collate_fn=collate_skipping_bad,
            generator=torch.Generator().manual_seed(0),
        )

    def _train_mode(self) -> None:
        self.forward_model.train()

    def _loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        images, masks = (part.to(self.dist.device, non_blocking=True) for part in batch["images"])
        with torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return model(images, masks), len(images)

    def _forward_backward(self, batch: dict[str, Any]) -> tuple[float, int]:
        weight = 1.0
        if batch["images"] is None:
            if not self.dist.enabled:
                return 0.0, 0
            # Every process must join the gradient all-reduce: an all-bad batch contributes zero.
            batch, weight = {"images": self._blank_images()}, 0.0
        loss, count = self._loss(self.forward_model, batch)
        self.scaler.scale(loss * weight / self.config.accum_steps).backward()
        return loss.item(), int(weight * count)

    def _blank_images(self) -> list[torch.Tensor]:
        """One black image and an empty mask: what a process without images runs to join a collective."""
        size = self.model.config.preprocessing.crop
        patches = size // self.model.config.patch_size
        return [torch.zeros(1, self.model.config.in_chans, size, size), torch.zeros(1, patches, patches)]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.forward_model.eval()
        total, count, bad = 0.0, 0, []
        for batch in self.val_loader:
            bad += batch["bad"]
            if batch["images"] is not None:
                loss, images = self._loss(self.forward_model, batch)
                total, count = total + loss.item() * images, count + images
        total, count, bad_count = self.dist.sum([total, count, len(bad)])
        # A loss of 0 over no image would be the best possible, and pick the "best" encoder.
        require_some_read(int(count), held_out_bad(bad, bad_count), validation_source(self.config))
        return {"val_loss": total / max(count, 1), "val_bad_images": int(bad_count)}

    def _log_epoch(self, row: dict[str, Any], best_path: Path) -> None:
        best_state = self._new_best(-row["val_loss"])
        if not self.dist.is_main:
            return
        self.metrics.append(row)
        logger.info(
            "epoch %d/%d  train loss %.4f  val loss %.4f  lr %.2e  %.0f img/s",
            row["epoch"] + 1,
            self.config.epochs,
            row["train_loss"],
            row["val_loss"],
            row["lr"],
            row["images_per_second"],
        )
        warn_bad_images(row)
        if best_state is not None:
            save_model(self.model.encoder, best_path, state_dict=encoder_part(best_state))

    def _finish(self, best_path: Path, seconds: float) -> PretrainResult:
        final_path = self.output / "encoder-final.safetensors"
        state = self.model_state()
        history: list[dict[str, Any]] = []
        if self.dist.is_main:
            save_model(self.model.encoder, final_path, state_dict=encoder_part(state))
            self._save_official(state)
        self._save_reconstructions(self.output / "reconstructions.png")
        if self.dist.is_main:
            history = self.metrics.history()
            if history:
                plot_curves(history, self.output / "curves.png")
            self.metrics.close()
        return PretrainResult(
            self.output,
            final_path,
            best_path if best_path.exists() else None,
            -self.best_top1,
            history,
            self.skipped_steps,
            history[-1]["bad_images"] if history else 0,
            seconds,
        )

    def _save_official(self, state: dict[str, torch.Tensor]) -> None:
        """The whole SimMIM model in the official layout, which the official code and ``--checkpoint``
        go on from; an encoder the official code would build otherwise is said, not written (the
        encoder files are already saved)."""
        try:
            official = official_state(state, self.model.config)
        except ValueError as error:
            logger.warning("simmim-final.pth is not written: %s", error)
            return
        save_torch(official, self.output / "simmim-final.pth")

    @torch.no_grad()
    def _save_reconstructions(self, path: Path, count: int = 8) -> None:
        """Rows of validation images: the original, what the encoder saw (masked patches grey), and
        the visible patches with the predicted ones filled in. Rank 0's images; under FSDP every rank
        takes part in gathering the weights (a rank without a batch reconstructs a blank image)."""
        from torchvision.utils import save_image

        if not (self.dist.is_main or self.config.fsdp):
            return
        batch = next((b for b in self.val_loader if b["images"] is not None), None)
        if batch is None and not self.config.fsdp:
            return
        parts = self._blank_images() if batch is None else batch["images"]
        images, masks = (part[:count].to(self.dist.device) for part in parts)
        self.model.eval()
        predicted = self.model.reconstruct(images, masks).float()
        if batch is None or not self.dist.is_main:
            return
        pixels = mask_cells(masks, self.model.config.patch_size).unsqueeze(1)
        preprocessing = self.model.config.preprocessing
        mean = torch.tensor(preprocessing.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(preprocessing.std, device=images.device).view(1, -1, 1, 1)
        if self.model.norm_target_patch:  # the prediction is of normalized pixels: undo with the image's own
            local_mean, local_std = local_statistics(images, self.model.norm_target_patch)
            predicted = predicted * local_std + local_mean
        original, filled = images * std + mean, predicted * std + mean
        masked = original * (1 - pixels) + 0.5 * pixels
        save_image(
            torch.cat([original, masked, original + pixels * (filled - original)]).clamp(0, 1), path, nrow=len(images)
        )


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain as ``config`` says (one process, or each process of a ``torchrun`` launch)."""
    if not isinstance(config, PretrainConfig):
        raise TypeError(
            f"expected a PretrainConfig, got {type(config).__name__} (swinkit.train.fit takes a TrainConfig, "
            "swinkit.dense.fit_dense a SegmentationConfig or DetectionConfig)"
        )
    return run_trainer(PretrainTrainer, config)
