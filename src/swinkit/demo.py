"""``swinkit demo`` (what ``make demo`` runs): train on the bundled digits, evaluate, predict."""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import Any

from .data import DigitsDataset, split_dataset
from .evaluate import evaluate_checkpoint
from .predict import format_results, predict
from .train import fit, resolve_config
from .train.data import SPLIT_SEED

logger = logging.getLogger(__name__)


def write_image_folder(dataset: DigitsDataset, root: Path) -> Path:
    """Save a dataset as PNG files, one sub-folder per class (what ``swinkit eval`` reads)."""
    for index, sample in enumerate(dataset.samples):
        folder = root / dataset.classes[sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        dataset.load(index).convert("L").save(folder / f"{index:04d}.png")
    return root


def run_demo(output: str = "runs/demo", epochs: int | None = None) -> dict[str, Any]:
    """Train the digits preset, evaluate the result from PNG files on disk, predict the bundled samples."""
    overrides: dict[str, Any] = {"output": output, "resume": "never"}
    if epochs is not None:
        overrides["epochs"] = epochs
    config = resolve_config(overrides)
    print(f"training {config.model} on the bundled handwritten digits for {config.epochs} epochs ...")
    result = fit(config)
    print(f"trained in {result.seconds:.0f} s: best validation top-1 {result.best_top1:.2f}%")

    _, val = split_dataset(DigitsDataset(), config.val_fraction, SPLIT_SEED)
    folder = write_image_folder(val, Path(output) / "val-images")
    metrics = evaluate_checkpoint(folder, result.final_model, output=Path(output) / "eval", workers=0)
    print(f"swinkit eval on {metrics['images']} PNG files: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%")

    samples = files("swinkit") / "assets" / "samples"
    predictions = predict([str(samples)], result.final_model, topk=3)
    print("swinkit predict on the bundled sample images (file name = true digit):")
    print(format_results(predictions))
    print(f"checkpoint: {result.final_model}\ncurves: {result.output / 'curves.png'}")
    print(f"confusion matrix: {Path(output) / 'eval' / 'confusion.png'}; metrics: {result.output / 'metrics.jsonl'}")
    return {"train": result, "eval": metrics, "predict": predictions}
