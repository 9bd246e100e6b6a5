"""Where a run's numbers go: a JSONL line per epoch, TensorBoard scalars and a PNG of the curves."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLog:
    """Append-only epoch metrics (rank 0 only); safe to reopen when a run resumes."""

    def __init__(self, output: str | os.PathLike, tensorboard: bool = True) -> None:
        self.output = Path(output)
        self.path = self.output / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.writer: Any = None  # opened by the first truncate_after or append

    def _open_writer(self, purge_step: int | None) -> None:
        if self.writer is not None or not self.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
            logger.warning("tensorboard is not installed: no TensorBoard logs")
            self.tensorboard = False
            return
        # purge_step: TensorBoard hides what earlier event files here logged from that epoch on (a
        # run killed after logging an epoch it had not saved, or a run started over).
        folder = self.output / "tensorboard"
        _wait_to_sort_last(folder)
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

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
        of them for epoch 0 (a run starting over), without reading them. TensorBoard's scalars of
        those epochs are hidden too."""
        kept = [row for row in self.history() if row["epoch"] < epoch] if epoch else []
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._open_writer(purge_step=epoch)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._open_writer(purge_step=None)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _wait_to_sort_last(folder: Path) -> None:
    """Wait (a second at most) until an event file written now sorts after every one in ``folder``.

    TensorBoard reads a folder's event files in name order, and a name starts with the second it
    was made in, then host, process and a per-process count (``...1796677013.host.123.10`` sorts
    before ``...1796677013.host.123.9``): a file of the same second as an earlier one may be read
    first, its purge then missing what the earlier one holds.
    """
    seconds = [
        int(name.split(".")[3])
        for name in (os.listdir(folder) if folder.is_dir() else [])
        if name.startswith("events.out.tfevents.") and name.split(".")[3].isdigit()
    ]
    wait = max(seconds, default=0) + 1 - time.time()
    if 0 < wait <= 1:  # a file dated later than that (another machine's clock) cannot be helped
        time.sleep(wait)


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
