"""Where a run's numbers go: a JSONL line per epoch, TensorBoard scalars and a PNG of the curves."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLog:
    """Append-only epoch metrics (rank 0 only); safe to reopen when a run resumes."""

    def __init__(self, output: str | os.PathLike, tensorboard: bool = True) -> None:
        self.output = Path(output)
        self.path = self.output / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
                logger.warning("tensorboard is not installed: no TensorBoard logs")

    def history(self) -> list[dict[str, Any]]:
        """The rows written so far; a line a killed run left half-written is skipped, and said."""
        if not self.path.exists():
            return []
        rows = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: line %d is not a JSON row (a killed run's?): left out", self.path, number)
        return rows

    def truncate_after(self, epoch: int) -> None:
        """Drop lines of epochs >= ``epoch`` (written by a run that died before its checkpoint); all
        of them for epoch 0 (a run starting over), without reading them."""
        kept = [row for row in self.history() if row["epoch"] < epoch] if epoch else []
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss and accuracy per epoch, train and validation, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in history]
    accuracies = [
        (key, label)
        for key, label in (
            ("val_top1", "validation top-1"),
            ("val_ema_top1", "EMA top-1"),
            ("train_top1", "train top-1"),
        )
        if any(key in row for row in history)
    ]
    # A run without accuracies (pretraining) gets the loss panel alone.
    figure, axes = plt.subplots(1, 2 if accuracies else 1, figsize=(10 if accuracies else 5, 4), squeeze=False)
    loss_axis = axes[0, 0]
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if any(key in row for row in history):
            loss_axis.plot(epochs, [row.get(key) for row in history], marker=".", label=label)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    if accuracies:
        for key, label in accuracies:
            axes[0, 1].plot(epochs, [row.get(key) for row in history], marker=".", label=label)
        axes[0, 1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axis in axes[0]:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
