"""Train one model on one fold of one dataset, resumably; writes a run directory (DESIGN.md §2).

Usage:
    python train.py --dataset synthtex --model twistnet18 --epochs 3 --img_size 64 --run_dir runs/demo
    python train.py --data_dir data/dtd --dataset dtd --model twistnet18 --fold 1 --seed 42 \\
        --epochs 100 --pretrained --run_dir runs/main
    python train.py ... --pretrained path/to/checkpoint.pt      # start from a TwistNet checkpoint

Run directory: <run_dir>/<dataset>_fold<k>_<model>_seed<s>/ with log.jsonl (one line per epoch),
last.pt (exact resume), best.pt (best validation weights), results.json (written once at the end)
and train.log. Starting the same command again resumes from last.pt; a finished run (results.json
present) exits at once unless --force. The test split is evaluated only at the end, for the
best-validation weights and for the last epoch's weights: it never selects anything.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import datasets
import models
import transforms

# Options that may change between an interrupted run and its resumption without changing the
# trajectory (where data lives, how fast it is loaded, how much is printed).
RESUME_SAFE_KEYS = {"data_dir", "workers", "run_dir", "force", "cache", "no_progress", "prefetch"}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--dataset", default="synthtex", choices=datasets.DATASET_NAMES, help="dataset protocol (DESIGN.md §3)")
    g.add_argument("--data_dir", default=None, help="dataset root as its authors ship it (unused for synthtex)")
    g.add_argument("--model", default="twistnet18", help=f"one of: {', '.join(models.model_names())}")
    g.add_argument("--model_kwargs", default="{}", type=json.loads,
                   help='JSON of TwistNet hyper-parameters, e.g. \'{"r": 4, "stages": [4]}\'')
    g.add_argument("--tag", default="", help="suffix for the run name, to tell variants of one model apart")
    g.add_argument("--fold", type=int, default=1, help="split: DTD and FMD 1-10, KTH-TIPS2 1-4; CUB, Flowers and synthtex any k >= 1 (README)")
    g.add_argument("--seed", type=int, default=42, help="seed of weights init, data order and augmentation (never of the split)")
    g.add_argument("--run_dir", default="runs", help="folder that receives the run directory")
    g.add_argument("--force", action="store_true", help="retrain even if the run finished (or has last.pt)")
    g.add_argument("--pretrained", nargs="?", const=True, default=False,
                   help="flag: ImageNet weights (TwistNet: auto-detect weights/, else ResNet-18 transfer); "
                        "or a checkpoint path")
    g.add_argument("--transfer_policy", default="all", choices=models.TRANSFER_POLICIES,
                   help="ResNet-18 transfer: every matching tensor, or the first two stages only")
    g.add_argument("--resnet18_weights", default=None, help="local timm/torchvision ResNet-18 state_dict")

    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch_size", type=int, default=32, help="images per step")
    g.add_argument("--lr", type=float, default=0.01, help="peak SGD learning rate")
    g.add_argument("--min_lr", type=float, default=1e-6, help="cosine schedule floor")
    g.add_argument("--warmup_epochs", type=float, default=5, help="linear warm-up length (fractions allowed)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay of conv/linear weights (none on norms, biases, gates)")
    g.add_argument("--label_smoothing", type=float, default=0.1, help="label smoothing of the loss")
    g.add_argument("--img_size", type=int, default=224, help="train crop; eval resizes to img_size*256/224")
    g.add_argument("--crop_scale", type=float, default=0.08,
                   help="smallest crop area of RandomResizedCrop, as a fraction of the image")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--randaug_n", type=int, default=2, help="RandAugment ops per image (0 disables)")
    g.add_argument("--randaug_m", type=int, default=9, help="RandAugment magnitude")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0 disables)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 disables)")
    g.add_argument("--clip_grad", type=float, default=0.0, help="max grad norm (0 disables)")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights and select/evaluate it")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay per step")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="auto: bf16 on CUDA where supported, else fp16; off on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels_last", action="store_true", help="NHWC memory format (faster on GPU with AMP)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (4, or fewer on a machine with fewer cores)")
    g.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker")
    g.add_argument("--cache", action="store_true", help="keep decoded, pre-resized images in memory")
    g.add_argument("--eval_every", type=int, default=1, help="validate every N epochs (and at the last)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (exact resume on GPU needs this)")
    g.add_argument("--benchmark_loader", action="store_true",
                   help="time one epoch of the train loader alone (no model, nothing written) and exit")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bars (logs only)")
    return p


def run_name(args: argparse.Namespace) -> str:
    model = f"{args.model}-{args.tag}" if args.tag else args.model
    return f"{args.dataset}_fold{args.fold}_{model}_seed{args.seed}"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    import timm
    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}


def setup_logger(run_path: Path) -> logging.Logger:
    """Console + train.log; one logger per run directory."""
    logger = logging.getLogger(f"train.{run_path}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_path / "train.log")):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochSeededSampler(Sampler):
    """Shuffles per epoch from (seed, epoch) and hands each sample its own augmentation seed.

    Yields (index, sample_seed). Because every sample's random augmentation is seeded from
    (seed, epoch, position), an epoch's data is the same whatever happened before it and however
    many workers load it: this is what makes resuming exact, also from the middle of an epoch
    (`skip` drops the samples an interrupted run already trained on).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.skip = size, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.size,), generator=g).tolist()
        return iter(list(zip(order, seeds))[self.skip:])

    def __len__(self) -> int:
        return self.size - self.skip


class StopFlag:
    """SIGINT/SIGTERM set a flag that the training loop checks between steps.

    Stopping only at a step boundary keeps the saved state consistent (never half an optimiser
    step). A second signal exits at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SeededSamples(Dataset):
    """Wraps a dataset so that item (index, seed) is drawn with all RNGs seeded by `seed`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_everything(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------
# Schedule, precision, metrics
# --------------------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Multiplier of base_lr at `step`: linear warm-up, then cosine from base_lr to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return (min_lr + (base_lr - min_lr) * cosine) / base_lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA GPU. Use --device cpu.")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def amp_label(dtype: torch.dtype | None) -> str:
    """How logs name an autocast dtype: 'bf16', 'fp16' or 'off'."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def build_loaders(args: argparse.Namespace, device: torch.device
                  ) -> tuple[dict[str, DataLoader], list[str], EpochSeededSampler]:
    train_tf = transforms.build_train_transform(
        args.img_size, hflip=args.hflip, randaug_n=args.randaug_n, randaug_m=args.randaug_m,
        scale=(args.crop_scale, 1.0))
    eval_tf = transforms.build_eval_transform(args.img_size)
    resize = transforms.eval_resize_size(args.img_size)
    sets, classes = datasets.build_datasets(
        args.dataset, args.data_dir, args.fold, train_tf, eval_tf,
        cache=args.cache, cache_size=resize, synthtex_size=resize)
    common = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                  collate_fn=datasets.collate_skip_unreadable,
                  persistent_workers=args.workers > 0,
                  prefetch_factor=args.prefetch if args.workers > 0 else None)
    sampler = EpochSeededSampler(len(sets["train"]), args.seed)
    # Drop the ragged last batch (BatchNorm on one image breaks), unless the set is that small.
    drop_last = len(sets["train"]) > args.batch_size
    loaders = {"train": DataLoader(SeededSamples(sets["train"]), batch_size=args.batch_size,
                                   sampler=sampler, drop_last=drop_last, **common)}
    for split in ("val", "test"):
        if len(sets[split]):
            loaders[split] = DataLoader(sets[split], batch_size=args.batch_size, shuffle=False, **common)
    if "val" not in loaders:
        raise SystemExit(f"{args.dataset} fold {args.fold} has no validation split; model selection needs one.")
    return loaders, classes, sampler


# --------------------------------------------------------------------------------------------
# Train / evaluate
# --------------------------------------------------------------------------------------------
class Trainer:
    """Holds the state of one run: model, optimiser, schedule, EMA, and where it is in training."""

    def __init__(self, args: argparse.Namespace, num_classes: int, steps_per_epoch: int,
                 device: torch.device, log: logging.Logger) -> None:
        self.args, self.device, self.log = args, device, log
        self.model = models.build_model(args.model, num_classes, pretrained=args.pretrained,
                                        transfer_policy=args.transfer_policy,
                                        resnet18_weights=args.resnet18_weights,
                                        verbose=True, **args.model_kwargs)
        self.model.to(device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(models.decay_param_groups(self.model, args.weight_decay),
                                         lr=args.lr, momentum=args.momentum,
                                         nesterov=args.nesterov and args.momentum > 0)
        total = args.epochs * steps_per_epoch
        warmup = int(round(args.warmup_epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, args.lr, args.min_lr))
        self.amp_dtype = resolve_amp(args.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if args.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=args.ema_decay)
        self.forward_model = torch.compile(self.model) if args.compile else self.model
        self.mixup = transforms.build_mixup(num_classes, args.mixup, args.cutmix, args.label_smoothing)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if self.mixup else args.label_smoothing)
        self.epoch = 0                 # epochs completed
        self.partial = self.fresh_partial()   # progress inside the current epoch
        self.best_val = -1.0
        self.best_epoch = 0
        self.train_time_s = 0.0

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.forward_model

    def checkpoint(self, config: dict) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch, "partial": dict(self.partial),
                "best_val_acc": self.best_val, "best_epoch": self.best_epoch,
                "train_time_s": self.train_time_s, "rng": rng_state(), "config": config}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.best_val = ckpt["epoch"], ckpt["best_val_acc"]
        self.partial = dict(ckpt["partial"])
        self.best_epoch, self.train_time_s = ckpt["best_epoch"], ckpt["train_time_s"]
        set_rng_state(ckpt["rng"])

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def train_epoch(self, loader: DataLoader, progress: bool, stop: StopFlag) -> dict | None:
        """Train until the epoch ends (returns its stats) or a stop is requested (returns None).

        Running totals live in self.partial so that a stop mid-epoch can be checkpointed and the
        epoch finished later with the same numbers.
        """
        self.model.train()
        totals = self.partial
        bar = tqdm(total=len(loader) + totals["steps"], initial=totals["steps"],
                   desc=f"epoch {self.epoch + 1}/{self.args.epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        start = time.perf_counter() - totals["time"]
        fetch_start = time.perf_counter()
        batches = iter(loader)
        while not stop.requested:
            try:
                images, labels, skipped = next(batches)
            except StopIteration:
                break
            except RuntimeError:
                if stop.requested:  # the interrupt also reached the loader's workers
                    break
                raise
            totals["data_wait"] += time.perf_counter() - fetch_start
            totals["skipped"] += skipped
            totals["steps"] += 1
            if self.mixup is not None and images.shape[0] % 2:
                images, labels = images[:-1], labels[:-1]   # timm's Mixup pairs images: needs an even batch
            if images.shape[0] >= 2:
                images, labels = self._to_device(images, labels)
                loss, correct = self._train_step(images, labels)
                totals["loss"] += loss * images.shape[0]
                totals["correct"] += correct
                totals["seen"] += images.shape[0]
            totals["time"] = time.perf_counter() - start
            seen = max(1, totals["seen"])
            bar.set_postfix(loss=f"{totals['loss'] / seen:.3f}", acc=f"{100 * totals['correct'] / seen:.1f}",
                            img_s=f"{totals['seen'] / max(totals['time'], 1e-9):.0f}")
            bar.update(1)
            fetch_start = time.perf_counter()
        bar.close()
        if stop.requested:
            return None
        self.partial = self.fresh_partial()
        seen, elapsed = max(1, totals["seen"]), max(totals["time"], 1e-9)
        return dict(train_loss=totals["loss"] / seen, train_acc=100 * totals["correct"] / seen,
                    epoch_time_s=elapsed, images_per_s=totals["seen"] / elapsed,
                    data_wait_share=totals["data_wait"] / elapsed, skipped_images=totals["skipped"])

    @staticmethod
    def fresh_partial() -> dict:
        return dict(steps=0, lr=None, loss=0.0, correct=0, seen=0, skipped=0, data_wait=0.0, time=0.0)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with autocast(self.device, self.amp_dtype):
            logits = self.forward_model(images)
            loss = self.criterion(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch + 1}: lower --lr or try --amp off")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.args.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        # With mixup the "label" of a mixed image is its dominant component.
        dominant = targets.argmax(dim=1) if targets.ndim == 2 else targets
        return float(loss.detach()), int((logits.argmax(dim=1) == dominant).sum())

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, model: nn.Module, num_classes: int,
                 progress: bool, desc: str) -> dict:
        model.eval()
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        loss_sum, top5, seen, skipped = 0.0, 0, 0, 0
        for images, labels, n_bad in tqdm(loader, desc=desc, disable=not progress, leave=False,
                                          dynamic_ncols=True):
            skipped += n_bad
            if images.shape[0] == 0:
                continue
            images, labels = self._to_device(images, labels)
            with autocast(self.device, self.amp_dtype):
                logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            top5 += topk_correct(logits, labels, 5)
            seen += labels.shape[0]
            pairs = labels.cpu() * num_classes + logits.argmax(dim=1).cpu()
            confusion += torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)
        seen = max(1, seen)
        per_class_total = confusion.sum(dim=1).clamp_min(1)
        return dict(loss=loss_sum / seen, acc=100 * float(confusion.diag().sum()) / seen,
                    top5=100 * top5 / seen, skipped=skipped,
                    per_class_acc=(100 * confusion.diag() / per_class_total).tolist(),
                    confusion=confusion.tolist())


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def config_of(args: argparse.Namespace) -> dict:
    config = {k: v for k, v in vars(args).items()}
    config["pretrained"] = str(args.pretrained) if not isinstance(args.pretrained, bool) else args.pretrained
    return config


def check_resume_config(saved: dict, current: dict, path: Path) -> None:
    changed = {k: (saved.get(k), v) for k, v in current.items()
               if k not in RESUME_SAFE_KEYS and saved.get(k) != v}
    if changed:
        diff = ", ".join(f"--{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"{path} was started with other settings ({diff}). Resume with the same "
                         f"command, or pass --force to start this run again from scratch.")


def prepare_run_dir(args: argparse.Namespace) -> Path:
    run_path = Path(args.run_dir) / run_name(args)
    if args.force and run_path.exists():
        for name in ("results.json", "last.pt", "best.pt", "log.jsonl", "train.log"):
            (run_path / name).unlink(missing_ok=True)
    run_path.mkdir(parents=True, exist_ok=True)
    return run_path


def flops_of(model: nn.Module, img_size: int) -> float | None:
    try:
        from compute_flops import count_flops
        return float(count_flops(model, img_size).total)
    except Exception:  # FLOPs are informative only; a tracer failure must not lose a finished run
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models.get_spec(args.model)  # fail on a typo before touching the disk
    if args.benchmark_loader:
        return benchmark_loader(args)
    run_path = Path(args.run_dir) / run_name(args)
    if (run_path / "results.json").exists() and not args.force:
        print(f"Run already finished: {run_path / 'results.json'} exists. Pass --force to retrain.")
        return 0
    run_path = prepare_run_dir(args)
    log = setup_logger(run_path)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(args.seed)
    device = resolve_device(args.device)
    config = config_of(args)

    loaders, classes, sampler = build_loaders(args, device)
    trainer = Trainer(args, len(classes), len(loaders["train"]), device, log)
    log.info(f"run {run_path} | {args.model} on {args.dataset} fold {args.fold} seed {args.seed} | "
             f"{len(classes)} classes | train/val/test {len(loaders['train'].dataset)}/"
             f"{len(loaders['val'].dataset)}/{len(loaders['test'].dataset) if 'test' in loaders else 0} | "
             f"{models.count_params(trainer.model) / 1e6:.2f}M params | device {device} | "
             f"amp {amp_label(trainer.amp_dtype)}")
    if args.warmup_epochs >= args.epochs:
        log.info(f"note: --warmup_epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning rate "
                 f"stays in its linear warm-up and never reaches --lr {args.lr:g}")

    last_path = run_path / "last.pt"
    if last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        check_resume_config(ckpt["config"], config, last_path)
        trainer.restore(ckpt)
        history = [r for r in read_jsonl(run_path / "log.jsonl") if r["epoch"] <= trainer.epoch]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in history), run_path / "log.jsonl")
        log.info(f"Resuming from {last_path}: epoch {trainer.epoch + 1}, step {trainer.partial['steps']} "
                 f"(best val so far {trainer.best_val:.2f}%)")

    with StopFlag() as stop:
        finished = train_loop(trainer, loaders, sampler, classes, config, run_path, stop, log)
    if not finished:
        atomic_save(trainer.checkpoint(config), last_path)
        log.info(f"Interrupted at epoch {trainer.epoch + 1}, step {trainer.partial['steps']}: saved "
                 f"{last_path}. Run the same command to resume exactly where it stopped.")
        return 130
    finish(trainer, loaders, classes, config, run_path, log)
    return 0


def benchmark_loader(args: argparse.Namespace) -> int:
    """Images/s of the training input pipeline alone (decode, augment, collate), for bottleneck checks.

    The first pass fills the caches (synthtex renders, --cache); the second one is what an epoch
    after the first costs, which is what the model competes with. Compare with
    `compute_flops.py --speed` (the model alone) at the same batch size and image size.
    """
    device = resolve_device(args.device)
    loaders, _, sampler = build_loaders(args, device)
    rates = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for x, _, _ in tqdm(loaders["train"], desc=f"loader pass {epoch + 1}", disable=args.no_progress,
                            leave=False):
            images += len(x.to(device, non_blocking=True))
        rates.append(images / (time.perf_counter() - start))
    print(f"train loader, {args.dataset} at {args.img_size} px, batch {args.batch_size}, "
          f"{args.workers} workers: {rates[0]:.1f} img/s first pass, {rates[1]:.1f} img/s after")
    return 0


def train_loop(trainer: Trainer, loaders: dict, sampler: EpochSeededSampler, classes: list[str],
               config: dict, run_path: Path, stop: StopFlag, log: logging.Logger) -> bool:
    """Train the remaining epochs; False if a stop was requested before the end."""
    args = trainer.args
    progress = not args.no_progress
    while trainer.epoch < args.epochs:
        sampler.set_epoch(trainer.epoch, skip=trainer.partial["steps"] * args.batch_size)
        if trainer.partial["steps"] == 0:
            trainer.partial["lr"] = trainer.optimizer.param_groups[0]["lr"]
        lr = trainer.partial["lr"]
        stats = trainer.train_epoch(loaders["train"], progress, stop)
        if stats is None:
            return False
        trainer.epoch += 1
        trainer.train_time_s += stats["epoch_time_s"]
        record = {"epoch": trainer.epoch, "lr": lr, "train_loss": stats["train_loss"],
                  "train_acc": stats["train_acc"]}
        if trainer.epoch % args.eval_every == 0 or trainer.epoch == args.epochs:
            val = trainer.evaluate(loaders["val"], trainer.eval_model(), len(classes), progress, "val")
            record.update(val_loss=val["loss"], val_acc=val["acc"])
            if val["acc"] > trainer.best_val:
                trainer.best_val, trainer.best_epoch = val["acc"], trainer.epoch
                atomic_save(best_checkpoint(trainer, config), run_path / "best.pt")
        record.update(gates=models.gate_values(trainer.model), epoch_time_s=stats["epoch_time_s"],
                      images_per_s=stats["images_per_s"], data_wait_share=stats["data_wait_share"],
                      skipped_images=stats["skipped_images"])
        with open(run_path / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        atomic_save(trainer.checkpoint(config), run_path / "last.pt")
        log.info(epoch_line(record, args.epochs, trainer.best_val))
    return True


def best_checkpoint(trainer: Trainer, config: dict) -> dict:
    return {"model": trainer.model.state_dict(),
            "ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
            "epoch": trainer.epoch, "val_acc": trainer.best_val, "config": config}


def epoch_line(r: dict, epochs: int, best: float) -> str:
    val = f" | val loss {r['val_loss']:.3f} acc {r['val_acc']:.2f}% (best {best:.2f}%)" if "val_acc" in r else ""
    gates = " | gates " + " ".join(f"{v:.3f}" for v in r["gates"].values()) if r["gates"] else ""
    skipped = f" | {r['skipped_images']} unreadable images skipped" if r["skipped_images"] else ""
    return (f"epoch {r['epoch']:3d}/{epochs} | lr {r['lr']:.2e} | train loss {r['train_loss']:.3f} "
            f"acc {r['train_acc']:.2f}%{val} | {r['images_per_s']:.1f} img/s, "
            f"{r['epoch_time_s']:.1f}s ({100 * r['data_wait_share']:.0f}% data wait){gates}{skipped}")


def finish(trainer: Trainer, loaders: dict, classes: list[str], config: dict,
           run_path: Path, log: logging.Logger) -> None:
    """Test the best-validation and the last weights; write results.json once."""
    args = trainer.args
    progress = not args.no_progress
    test_last = test_best = None
    if "test" in loaders:
        test_last = trainer.evaluate(loaders["test"], trainer.eval_model(), len(classes), progress, "test (last)")
        best = torch.load(run_path / "best.pt", map_location="cpu", weights_only=True)
        weights = best["ema"] if best.get("ema") is not None else best["model"]
        model = trainer.ema.module if trainer.ema is not None else trainer.model
        model.load_state_dict(weights)
        test_best = trainer.evaluate(loaders["test"], model, len(classes), progress, "test (best)")
    results = {
        "model": args.model, "tag": args.tag, "dataset": args.dataset, "fold": args.fold,
        "seed": args.seed, "epochs": args.epochs, "best_epoch": trainer.best_epoch,
        "best_val_acc": trainer.best_val,
        "test_acc": test_best["acc"] if test_best else None,
        "test_acc_last": test_last["acc"] if test_last else None,
        "test_top5": test_best["top5"] if test_best else None,
        "per_class_acc": test_best["per_class_acc"] if test_best else None,
        "confusion": test_best["confusion"] if test_best else None,
        "classes": classes,
        "params": models.count_params(trainer.model),
        "flops": flops_of(trainer.model.cpu(), args.img_size),
        "img_size": args.img_size,
        "train_time_s": trainer.train_time_s,
        "config": config, "git_commit": git_commit(), "versions": library_versions(),
    }
    atomic_write_text(json.dumps(results, indent=1), run_path / "results.json")
    if test_best:
        log.info(f"done: best val {trainer.best_val:.2f}% at epoch {trainer.best_epoch} | test "
                 f"{test_best['acc']:.2f}% (top-5 {test_best['top5']:.2f}%), last-epoch weights "
                 f"{test_last['acc']:.2f}% | {run_path / 'results.json'}")
    else:
        log.info(f"done: best val {trainer.best_val:.2f}% at epoch {trainer.best_epoch} (no test split)")


if __name__ == "__main__":
    sys.exit(main())
