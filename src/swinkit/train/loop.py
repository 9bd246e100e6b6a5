"""The training loop: one :class:`Trainer` holds a run's state; :func:`fit` runs it end to end."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.io import make_folder, remove_stale_temporaries
from ..checkpoint.load import read_any
from ..checkpoint.native import save as save_model
from ..data import require_some_read, train_transform
from ..evaluate import EvalResult, amp_dtype, evaluate
from ..factory import create_model
from ..fast import forget_cached_weights
from ..predict import refuse_dense_file
from . import distributed
from .config import TrainConfig, save_yaml, schedule_notes
from .data import RunData, eval_loader, load_datasets, train_loader, validation_source
from .ema import ModelEma
from .metrics import MetricsLog, plot_curves
from .optim import WarmupCosine, build_optimizer
from .state import TRAIN_CHECKPOINT, check_written_by, load_training_state, save_training_state

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a finished run left its files, and its headline numbers."""

    output: Path
    final_model: Path
    best_model: Path | None
    best_top1: float
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    bad_images: int = 0
    seconds: float = 0.0
    is_main: bool = True  # False in the other processes of a torchrun launch (rank 0 reports)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The model to train: a preset, optionally initialised from any supported checkpoint."""
    overrides: dict[str, Any] = {"num_classes": num_classes}
    for name in ("img_size", "window_size", "drop_path_rate"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    table_resize = getattr(config, "table_resize", "bicubic")  # pretraining options have none
    checkpoint = None
    if config.checkpoint is not None:  # a detector's or segmentor's file: named, not a key mismatch
        checkpoint = read_any(config.checkpoint)
        refuse_dense_file(config.checkpoint, checkpoint)
    model = create_model(
        config.model, checkpoint=checkpoint, attn_impl=config.attn_impl, table_resize=table_resize, **overrides
    )
    freeze_stages(model, config.freeze_stages)
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def held_out_bad(bad_items: list[str], total: float) -> list[str] | int:
    """The unreadable held-out images for :func:`~swinkit.data.require_some_read`: this process's paths
    where they are all of them (one process), else their count over every process."""
    return bad_items if len(bad_items) == int(total) else int(total)


def warn_bad_images(row: dict[str, Any]) -> None:
    """Log an epoch's undecodable images (training's, and held-out ones where counted), if it had any."""
    if row["bad_images"]:
        logger.warning("epoch %d: %d images could not be decoded and were skipped", row["epoch"] + 1, row["bad_images"])
    if row.get("val_bad_images"):
        logger.warning(
            "epoch %d: %d held-out images could not be decoded and were left out of the scores",
            row["epoch"] + 1,
            row["val_bad_images"],
        )


def warmup_cosine(optimizer: torch.optim.Optimizer, config: Any, steps_per_epoch: int, world: int) -> WarmupCosine:
    """The per-iteration schedule of ``config`` (rates scaled by the total batch, epochs in steps)."""
    return WarmupCosine(
        optimizer,
        lr=config.scaled(config.base_lr, world),
        warmup_lr=config.scaled(config.warmup_lr, world),
        min_lr=config.scaled(config.min_lr, world),
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        total_steps=config.epochs * steps_per_epoch,
    )


def frozen_modules(model: nn.Module, stages: int) -> list[nn.Module]:
    """The patch embedding (and absolute position) plus the first ``stages`` stages."""
    if not 0 <= stages <= len(model.layers):
        raise ValueError(f"freeze_stages must be between 0 and {len(model.layers)}, got {stages}")
    return [model.patch_embed, *model.layers[:stages]] if stages else []


def freeze_stages(model: nn.Module, stages: int) -> None:
    """Stop the gradients of the patch embedding and the first ``stages`` stages (and an absolute
    position embedding)."""
    for module in frozen_modules(model, stages):
        for param in module.parameters():
            param.requires_grad_(False)
    if stages and getattr(model, "absolute_pos_embed", None) is not None:
        model.absolute_pos_embed.requires_grad_(False)


class TrainingLoop:
    """The epoch / step / checkpoint skeleton shared by classification and dense training runs.

    A subclass sets ``config`` (``epochs``, ``resume``, ``seed``, ``accum_steps``, ``clip_grad``,
    ``checkpoint_every``, ``max_steps``, ``progress``), ``dist``, ``output``, ``model``,
    ``forward_model`` (the wrapped one), ``loader`` / ``sampler`` / ``augmented`` (see
    :mod:`swinkit.train.data`), ``optimizer``, ``scheduler``, ``scaler``, ``metrics``,
    ``steps_per_epoch``, ``epoch_totals`` and the counters ``epoch``, ``step_in_epoch``,
    ``global_step``, ``skipped_steps``; and implements ``_forward_backward``, ``validate``,
    ``save``, ``_load_state``, ``_log_epoch`` and ``_finish``.
    """

    ema: ModelEma | None = None
    best_file = "model-best.safetensors"  # written at the epoch with the best validation score
    # The named terms of the micro-batch's loss (``loss_*``), where a task's loss sets them (a
    # detector's); emptied before each one. Each epoch's row gets their image-weighted means as
    # ``train_loss_*``.
    loss_parts: dict[str, float]

    def summed_totals(self) -> dict[str, float]:
        """This epoch's running totals summed over processes; a collective, so every rank calls
        ``save``. The checkpoint keeps the sums: rank 0 alone restores them (:meth:`restore_totals`)."""
        keys = sorted(self.epoch_totals)  # every rank has the same keys, maybe not in the same order
        return dict(zip(keys, self.dist.sum([self.epoch_totals[k] for k in keys]), strict=True))

    def restore_totals(self, saved: dict[str, float]) -> None:
        """Rank 0 carries the saved sums, the others start from zero: the epoch's sums stay exact
        whatever the number of processes."""
        self.epoch_totals = {k: float(v) if self.dist.is_main else 0.0 for k, v in saved.items()}

    def resume(self) -> bool:
        """Continue from ``config.resume`` (a path, or ``auto``: the output folder's checkpoint)."""
        if self.config.resume == "never":
            return False
        path = self.output / TRAIN_CHECKPOINT if self.config.resume == "auto" else Path(self.config.resume)
        if self.config.resume == "auto" and not path.exists():
            return False
        state = load_training_state(path)
        check_written_by(state, self.command, path)
        check_same_run(state["config"], dataclasses.asdict(self.config), path)
        self._check_same_setting(state, path)
        self._load_state(state)
        logger.info("resumed %s at epoch %d, step %d", path, self.epoch + 1, self.step_in_epoch)
        return True

    def run_setting(self) -> dict[str, int]:
        """What a checkpoint records of the run beyond its options: the processes (``batch_size``
        is per process, so they set the total batch, the rate scaling and the steps of an epoch) and
        the training items (they set the steps of an epoch and each epoch's order)."""
        return {"world_size": self.dist.world_size, "train_items": self.sampler.size}

    def _check_same_setting(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a resume under another number of processes; warn where the data or the length of
        the run changed (each changes the result from an uninterrupted run's, but may be meant)."""
        saved_world, saved_items = state.get("world_size"), state.get("train_items")  # None: an older file
        if saved_world is not None and saved_world != self.dist.world_size:
            raise ValueError(
                f"{path} belongs to a run of {saved_world} process(es), this is {self.dist.world_size}: the "
                f"batch size is per process, so the total batch, the learning rates and the steps of an epoch would "
                f"change; resume with {saved_world} (torchrun --nproc_per_node {saved_world}), or pass "
                "--resume never to start over"
            )
        if saved_items is not None and saved_items != self.sampler.size:
            logger.warning(
                "the training data changed since %s was written (%d items, now %d): resuming, but the epochs' "
                "order and length, and so the result, differ from an uninterrupted run's",
                path,
                saved_items,
                self.sampler.size,
            )
        saved_epochs, epochs = state["config"]["epochs"], self.config.epochs
        if state["epoch"] > epochs:
            raise ValueError(
                f"{path} has trained {state['epoch']} epochs, more than --epochs {epochs}; its model files are "
                "in the run folder (choose another --output to train a shorter run)"
            )
        if saved_epochs != epochs:
            logger.warning(
                "--epochs changed from %d to %d: the learning-rate schedule now spans %d epochs from the step "
                "reached, so the result differs from an uninterrupted run of either length",
                saved_epochs,
                epochs,
                epochs,
            )

    def _start_output(self, resumed: bool) -> None:
        """Rank 0: the run's options written; what an earlier run here left behind and this one
        would not replace removed (metrics of epochs not reached, a killed write's temporary, and on
        --resume never the old training checkpoint, which a later plain re-run would resume)."""
        save_yaml(self.config, self.output / "config.yaml")
        self.metrics.truncate_after(self.epoch)  # 0 on a fresh start: the file starts empty
        checkpoint = self.output / TRAIN_CHECKPOINT
        for folder in remove_stale_temporaries(checkpoint):
            logger.info("removed %s, left by a run killed while writing its checkpoint", folder)
        if not resumed and checkpoint.exists():
            for stale in (checkpoint, self.output / self.best_file):  # the best model: this run's own only
                stale.unlink(missing_ok=True)
                logger.info("starting over: removed the earlier run's %s", stale)

    def run(self) -> Any:
        start = time.perf_counter()
        resumed = self.resume()
        if self.dist.is_main:
            self._start_output(resumed)
        best_path = self.output / self.best_file
        while self.epoch < self.config.epochs:
            row = {"epoch": self.epoch, **self.train_epoch(), "lr": self.scheduler.current_lr}
            if self.config.max_steps and self.global_step >= self.config.max_steps:
                break
            forget_cached_weights()  # weights written without torch counting it (FSDP's gathers) are not served stale
            row.update(self.validate(), skipped_steps=self.skipped_steps)
            self._log_epoch(row, best_path)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save()
        return self._finish(best_path, time.perf_counter() - start)

    def train_epoch(self) -> dict[str, float]:
        """Train from ``step_in_epoch`` to the end of ``epoch``; returns the epoch's train metrics."""
        self._train_mode()
        self.sampler.set_epoch(self.epoch, self.step_in_epoch * self.config.accum_steps)
        self.augmented.set_epoch(self.epoch)
        totals = self.epoch_totals  # carried over when resuming mid-epoch
        start = time.perf_counter()
        progress = self._progress()
        for index, batch in enumerate(self.loader):
            if self.step_in_epoch >= self.steps_per_epoch:
                # The batches past the last whole accumulation: no step would follow them, and their
                # gradients would join the next epoch's first step (lost to a resume at the epoch's end).
                break
            self._seed_step(self.global_step * self.config.accum_steps + index % self.config.accum_steps)
            totals["bad"] += len(batch["bad"])
            self.loss_parts = {}
            loss, images = self._forward_backward(batch)
            totals["loss"] += loss * images
            totals["images"] += images
            for name, value in self.loss_parts.items():
                totals[name] = totals.get(name, 0.0) + value * images
            if (index + 1) % self.config.accum_steps == 0:
                self._optimizer_step()
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{self.scheduler.current_lr:.2e}")
                if self._should_stop_or_save():
                    # Saved with the epoch's totals so far: a re-run without --max-steps goes on from here.
                    self.epoch_totals = totals
                    self.save()
                    break
        progress.close()
        self.epoch_totals = totals
        sums = self.summed_totals()
        self.epoch_totals = {"loss": 0.0, "images": 0.0, "bad": 0.0}
        count, bad = sums["images"], int(sums["bad"])
        require_some_read(int(count), bad, f"the training set ({getattr(self.config, 'data', None)})")
        seconds = time.perf_counter() - start
        row = {"train_loss": sums["loss"] / max(count, 1), "images_per_second": count / seconds, "bad_images": bad}
        return row | {f"train_{name}": sums[name] / max(count, 1) for name in sums if name.startswith("loss_")}

    def _seed_step(self, micro_step: int) -> None:
        seed_step(self.config.seed, self.dist.rank, micro_step)

    def _train_mode(self) -> None:
        self.forward_model.train()

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.config.clip_grad if self.config.clip_grad > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip) if parameters else torch.tensor(0.0)
        if torch.isfinite(norm):
            self.scaler.step(self.optimizer)
        else:
            self.skipped_steps += 1
            logger.warning(
                "step %d skipped: non-finite gradients (%d skipped so far)", self.global_step, self.skipped_steps
            )
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step_in_epoch += 1
        self.global_step += 1

    def _should_stop_or_save(self) -> bool:
        every = self.config.checkpoint_every
        if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
            self.save()
        return bool(self.config.max_steps) and self.global_step >= self.config.max_steps

    def _progress(self) -> Any:
        from tqdm import tqdm

        enabled = self.config.progress and self.dist.is_main and sys.stderr.isatty()
        return tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            disable=not enabled,
            unit="step",
            leave=False,
        )


class Trainer(TrainingLoop):
    """A training run: model, optimizer, schedule, data and everything needed to resume it."""

    command = "train"  # the swinkit command whose checkpoints it resumes

    def __init__(self, config: TrainConfig, dist: distributed.Distributed) -> None:
        self.config, self.dist = config, dist
        self.output = make_folder(config.output)  # first: a file in the way is refused before any work
        self.data: RunData = load_datasets(config)
        self.model = build_model(config, len(self.data.classes)).to(dist.device)
        preprocessing = self.model.config.preprocessing
        transform = train_transform(preprocessing, config)
        self.loader, self.sampler, self.augmented = train_loader(self.data.train, transform, config, dist)
        self.val_loader = eval_loader(self.data.val, preprocessing, config.batch_size, config.workers, dist)
        self.steps_per_epoch = self.sampler.steps // config.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"accum_steps {config.accum_steps} exceeds the {self.sampler.steps} batches of an epoch")
        # Wrap first: FSDP replaces the parameters, and the optimizer must hold the sharded ones.
        self.forward_model = self._wrap(self.model)
        self.optimizer = build_optimizer(
            self.model, config.weight_decay, config.layer_decay, betas=config.betas, eps=config.eps
        )
        self.scheduler = warmup_cosine(self.optimizer, config, self.steps_per_epoch, dist.world_size)
        for note in schedule_notes(config, self.steps_per_epoch):
            logger.warning(note)
        self.amp_dtype = amp_dtype(config.amp)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=config.amp == "fp16")
        if config.ema and config.fsdp:
            raise ValueError("--ema with --fsdp is not supported: the EMA copy would not be sharded")
        self.ema = ModelEma(self.model, config.ema_decay) if config.ema else None
        self.mixup = _mixup(config, len(self.data.classes))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.skipped_steps, self.best_top1 = 0, -1.0
        self.epoch_totals = {"loss": 0.0, "images": 0.0, "bad": 0.0}
        self.metrics = MetricsLog(self.output) if dist.is_main else None

    # -- set-up -----------------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.config.fsdp:
            if not self.dist.enabled:
                raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                for block in layer.blocks:
                    fully_shard(block)
            wrapped: nn.Module = fully_shard(model)
        elif self.dist.enabled:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            if self.config.compile:
                # In place: a CPU batch still splits over the image-parallel workers, each share through
                # the compiled graph (torch.compile(model) would run it unsplit, slower than eager).
                model.compile()
            return model
        # Compiled around DDP / FSDP, which dynamo splits at the gradient buckets.
        return torch.compile(wrapped) if self.config.compile else wrapped

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return self.optimizer.state_dict()

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the full training state atomically (rank 0; FSDP gathers on every rank first)."""
        model_state, optimizer_state = self.model_state(), self.optimizer_state()
        totals = self.summed_totals()
        if not self.dist.is_main:
            return
        state = {
            "config": plain(dataclasses.asdict(self.config)),
            "model_config": plain(self.model.config.to_dict()),
            "classes": self.data.classes,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "best_top1": self.best_top1,
            "epoch_totals": totals,
            **self.run_setting(),
        }
        save_training_state(self.output / TRAIN_CHECKPOINT, state)

    def _load_state(self, state: dict[str, Any]) -> None:
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.skipped_steps = state["global_step"], state["skipped_steps"]
        self.best_top1 = state["best_top1"]
        self.restore_totals(state["epoch_totals"])
        from .state import set_rng_state

        set_rng_state(state["rng"])

    # -- training ---------------------------------------------------------------------------------

    def _train_mode(self) -> None:
        self.forward_model.train()
        for module in frozen_modules(self.model, self.config.freeze_stages):
            module.eval()  # frozen stages keep dropout / drop path off

    def _forward_backward(self, batch: dict[str, Any]) -> tuple[float, int]:
        if batch["images"] is None:
            if not self.dist.enabled:
                return 0.0, 0
            # Every process must join the gradient all-reduce: an all-bad batch contributes zero.
            images = torch.zeros(1, self.model.config.in_chans, 8, 8)
            batch = {"images": images, "labels": torch.zeros(1, dtype=torch.long)}
            weight = 0.0
        else:
            weight = 1.0
        images = batch["images"].to(self.dist.device, non_blocking=True)
        labels = batch["labels"].to(self.dist.device, non_blocking=True)
        targets: torch.Tensor = labels
        if self.mixup is not None and len(images) % 2 == 0:
            images, targets = self.mixup(images, labels)
        with torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.forward_model(images)
        smoothing = self.config.label_smoothing if targets.dim() == 1 else 0.0
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        self.scaler.scale(loss * weight / self.config.accum_steps).backward()
        return loss.item(), int(weight * len(images))

    # -- evaluation and the whole run ------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        num_classes = len(self.data.classes)
        result: EvalResult = evaluate(
            self.forward_model, self.val_loader, num_classes, self.dist.device, self.amp_dtype, self.dist
        )
        (val_bad,) = self.dist.sum([len(result.bad_items)])  # each process's part of the held-out images
        # Scores of 0 over no image would pass for a result, and pick a "best" model.
        require_some_read(result.count, held_out_bad(result.bad_items, val_bad), validation_source(self.config))
        row = {
            "val_loss": result.loss,
            "val_top1": result.top1,
            "val_top5": result.top5,
            "val_bad_images": int(val_bad),
        }
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, num_classes, self.dist.device, self.amp_dtype, self.dist)
            row.update(val_ema_loss=ema.loss, val_ema_top1=ema.top1, val_ema_top5=ema.top5)
        return row

    def _new_best(self, score: float) -> dict[str, torch.Tensor] | None:
        """The model's state if ``score`` (the same on every rank) beats the best so far, else None.

        Every rank calls it: under FSDP gathering the state is a collective, which rank 0 alone
        once entered at the first epoch's end, and the run died there.
        """
        if score <= self.best_top1:
            return None
        self.best_top1 = score
        return self.model_state()

    def _log_epoch(self, row: dict[str, Any], best_path: Path) -> None:
        best_state = self._new_best(row["val_top1"])
        if not self.dist.is_main:
            return
        self.metrics.append(row)
        message = "epoch %d/%d  train loss %.4f  val loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  lr %.2e  %.0f img/s"
        logger.info(
            message,
            row["epoch"] + 1,
            self.config.epochs,
            row["train_loss"],
            row["val_loss"],
            row["val_top1"],
            row["val_top5"],
            row["lr"],
            row["images_per_second"],
        )
        warn_bad_images(row)
        if best_state is not None:
            save_model(self.model, best_path, class_names=self.data.classes, state_dict=best_state)

    def _finish(self, best_path: Path, seconds: float) -> TrainResult:
        final_path = self.output / "model-final.safetensors"
        model_state = self.model_state()
        history: list[dict[str, Any]] = []
        if self.dist.is_main:
            save_model(self.model, final_path, class_names=self.data.classes, state_dict=model_state)
            if self.ema is not None:
                save_model(self.ema.module, self.output / "model-ema.safetensors", class_names=self.data.classes)
            history = self.metrics.history()
            if history:
                plot_curves(history, self.output / "curves.png")
            self.metrics.close()
        bad = history[-1]["bad_images"] if history else 0
        return TrainResult(
            self.output,
            final_path,
            best_path if best_path.exists() else None,
            self.best_top1,
            history,
            self.skipped_steps,
            bad,
            seconds,
            self.dist.is_main,
        )


def seed_step(seed: int, rank: int, micro_step: int) -> None:
    """Seed dropout / drop path / mixup from (seed, rank, step): a resumed run draws the same numbers."""
    value = (seed * 1_000_003 + rank * 7_919 + micro_step) % (2**31)
    torch.manual_seed(value)
    np.random.seed(value)


def _mixup(config: TrainConfig, num_classes: int) -> Any:
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        prob=config.mixup_prob,
        switch_prob=config.mixup_switch_prob,
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples to lists and nested dataclass dicts kept: a structure ``weights_only`` loading accepts."""
    return {k: (list(v) if isinstance(v, tuple) else plain(v) if isinstance(v, dict) else v) for k, v in values.items()}


# Options that may differ between a run and its resumption without changing its result (the
# output folder among them: a run folder moved or copied resumes).
_RESUMABLE = {"resume", "epochs", "workers", "progress", "checkpoint_every", "max_steps", "device", "output"}


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint written with other options (those that may change on resume
    excepted), naming them. A path given relative once and absolute once is the same option."""
    current = plain(current)
    changed = sorted(k for k in current if k not in _RESUMABLE and not _same_option(saved.get(k), current[k]))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed[:6])
        raise ValueError(
            f"{path} belongs to a run with different options ({details}); resume with the same options, "
            "choose another --output, or pass --resume never to start over"
        )


def _same_option(saved: Any, current: Any) -> bool:
    """Equal values, or two spellings of one path (``data`` and ``/home/me/data``)."""
    if saved == current:
        return True
    if isinstance(saved, str) and isinstance(current, str) and saved and current:
        return os.path.realpath(saved) == os.path.realpath(current)
    return False


def fit(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says (one process, or each process of a ``torchrun`` launch)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"expected a TrainConfig, got {type(config).__name__} (swinkit.dense.fit_dense takes a "
            "SegmentationConfig or DetectionConfig, swinkit.train.pretrain.pretrain a PretrainConfig)"
        )
    return run_trainer(Trainer, config)


def run_trainer(trainer: type[TrainingLoop], config: Any) -> Any:
    """Build ``trainer`` for ``config`` in this process (of a ``torchrun`` launch, or alone) and run it."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    with distributed.process_group(config.device) as dist:
        # The same seed on every rank: FSDP shards a model each rank built, so they must agree.
        torch.manual_seed(config.seed)
        return trainer(config, dist).run()
