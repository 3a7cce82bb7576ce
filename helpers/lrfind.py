"""The learning-rate range test (L. Smith, 2017) with torch-lr-finder, on a run's own data and recipe.

Usage (train.py --lr_find calls it):
    result = lrfind.range_test(model, recipe, train_loader, device, channels_last, steps=100)
    lrfind.write_report(result, run_path)       # lr_find.json (curve + suggestion) and lr_find.png

The learning rate rises exponentially from START_LR to END_LR over `steps` optimizer steps (every
parameter group at the same rate: the test measures one number, the peak --lr); the loss is
smoothed (torch-lr-finder's exponential average, 0.05) and the test stops once it exceeds 5x its
best. The suggestion is the library's: the rate where the smoothed loss falls fastest (steepest
negative slope, first 10% and last 5% of the steps left out). It is a starting point for --lr, not
a result: the peak rate of a schedule with warm-up is usually taken somewhat below the point where
the loss starts to climb.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch.utils.data import DataLoader
from torch_lr_finder import LRFinder, TrainDataLoaderIter

from helpers import utils

START_LR = 1e-6
END_LR = 10.0
SMOOTHING = 0.05
DIVERGE_FACTOR = 5.0


class RecipeBatches(TrainDataLoaderIter):
    """train.py's batches as a training step sees them: on the device, in its memory format, and
    mixed (Mixup/CutMix, with their label smoothing) when the recipe mixes."""

    def __init__(self, loader: DataLoader, device: torch.device, channels_last: bool, mixup: Any) -> None:
        super().__init__(loader)
        self.device, self.channels_last, self.mixup = device, channels_last, mixup

    def inputs_labels_from_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, _skipped = batch
        if self.mixup is not None and images.shape[0] % 2:
            images, labels = images[:-1], labels[:-1]   # timm's Mixup pairs images: needs an even batch
        images, labels = utils.to_device(images, labels, self.device, self.channels_last)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels


@contextlib.contextmanager
def library_output(progress: bool) -> Iterator[None]:
    """torch-lr-finder prints lines of its own (one with a literal, unformatted "{finder_name}", and
    its suggestion, which write_report and train.py give instead) and draws a tqdm bar whatever
    --no_progress says. Inside the block its lines are dropped and its bar is utils.progress,
    which honours the flag (and keeps a log file to whole lines)."""
    import torch_lr_finder.lr_finder as library

    bar = library.tqdm
    library.tqdm = lambda iterable, **kwargs: utils.progress(iterable, disable=not progress,
                                                             desc="lr range test", **kwargs)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        library.tqdm = bar


def range_test(model: nn.Module, recipe: Any, loader: DataLoader, device: torch.device, channels_last: bool,
               steps: int, progress: bool = True) -> dict:
    """Run the test with the recipe's optimizer, criterion, precision and mixing; returns
    {"lr": [...], "loss": [...], "suggested_lr": float | None, ...}. The model is trained by it.
    progress: a bar over the steps (utils.progress)."""
    optimizer = recipe.optimizer
    for group in optimizer.param_groups:
        group.pop("initial_lr", None)   # the run's schedule is not used: the test sets every rate itself
    amp = recipe.amp_dtype is not None
    finder = LRFinder(model, optimizer, recipe.criterion, device=device, memory_cache=True,
                      amp_backend="torch" if amp else None,
                      amp_config={"device_type": device.type, "dtype": recipe.amp_dtype} if amp else None,
                      grad_scaler=recipe.scaler if amp else None)
    with library_output(progress):
        finder.range_test(RecipeBatches(loader, device, channels_last, recipe.mixup), start_lr=START_LR,
                          end_lr=END_LR, num_iter=steps, step_mode="exp", smooth_f=SMOOTHING,
                          diverge_th=DIVERGE_FACTOR)
    lrs, losses = finder.history["lr"], finder.history["loss"]
    skip_start, skip_end = steps // 10, steps // 20
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    ax = figure.add_subplot()
    suggested = None
    with library_output(progress=False):
        if len(lrs) >= skip_start + skip_end + 2 and all(math.isfinite(x) for x in losses):
            _, suggested = finder.plot(skip_start=skip_start, skip_end=skip_end, ax=ax, suggest_lr=True)
        else:   # diverged before enough steps for a slope: the curve alone
            finder.plot(skip_start=0, skip_end=0, ax=ax, suggest_lr=False)
    ax.set_title(f"LR range test: suggested lr {suggested:.2e}" if suggested else "LR range test")
    return {"lr": [float(x) for x in lrs], "loss": [float(x) for x in losses],
            "suggested_lr": float(suggested) if suggested is not None else None,
            "method": "steepest descent of the smoothed loss (torch-lr-finder)", "start_lr": START_LR,
            "end_lr": END_LR, "steps": steps, "steps_run": len(lrs), "smoothing": SMOOTHING,
            "skip_start": skip_start, "skip_end": skip_end, "figure": figure}


def write_report(result: dict, run_path: Path) -> tuple[Path, Path]:
    """lr_find.json (the curve and the suggestion) and lr_find.png, atomically."""
    figure = result.pop("figure")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    png, js = run_path / "lr_find.png", run_path / "lr_find.json"
    utils.atomic_write_bytes(buffer.getvalue(), png)
    utils.atomic_write_text(json.dumps(result, indent=1), js)
    return js, png
