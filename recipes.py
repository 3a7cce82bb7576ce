"""The training recipe, in one place for both trainers: the learning-rate schedule, progressive
resizing, and the optimizer, scheduler, AMP scaler, EMA, Mixup/CutMix and loss built from the
command line (`add_recipe_arguments` defines the flags, `build_recipe` reads them).

    group = parser.add_argument_group("recipe")
    recipes.add_recipe_arguments(group)                      # --min_lr, --warmup_epochs, --mixup, ...
    recipe = recipes.build_recipe(model, args, lr=0.01, steps_per_epoch=100, num_classes=47, device=device)
    loss = recipe.criterion(model(images), targets); loss.backward(); recipe.step(model, args.clip_grad)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

import models
import transforms
import utils
from utils import UserError

# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Multiplier of base_lr at `step`: linear warm-up, then cosine from base_lr to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
    return (min_lr + (base_lr - min_lr) * cosine) / base_lr


def parse_progressive(spec: str, img_size: int) -> list[tuple[float, int]]:
    """'128:0.4,192:0.8' -> [(0.4, 128), (0.8, 192)]: train at SIZE until FRACTION of the epochs."""
    if not spec:
        return []
    phases = []
    for part in spec.split(","):
        try:
            size, fraction = part.split(":")
            phases.append((float(fraction), int(size)))
        except ValueError:
            raise UserError(f"--progressive: cannot read '{part}'; expected SIZE:FRACTION, e.g. 128:0.4") from None
    ends = [f for f, _ in phases]
    if ends != sorted(ends) or not all(0 < f < 1 for f in ends):
        raise UserError(f"--progressive: fractions must rise within (0, 1), got {ends}")
    if any(size > img_size or size < 16 for _, size in phases):
        raise UserError(f"--progressive: sizes must lie in 16..--img_size ({img_size}), got {[s for _, s in phases]}")
    return phases


def train_size_for_epoch(epoch: int, epochs: int, phases: Sequence[tuple[float, int]], img_size: int) -> int:
    """Train crop of 0-based `epoch` under the progressive schedule."""
    for end_fraction, size in phases:
        if epoch < end_fraction * epochs:
            return size
    return img_size


# --------------------------------------------------------------------------------------------
# The recipe: optimiser, schedule, precision, EMA, batch mixing and loss, for both trainers
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Recipe:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    ema: Any
    mixup: Any
    criterion: nn.Module

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    def step(self, model: nn.Module, clip_grad: float) -> None:
        """Optimizer step (after backward): unscale and clip, step, update scaler, schedule and EMA."""
        if clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(model)


RECIPE_DEFAULTS: Mapping[str, Any] = {
    "min_lr": 1e-6, "warmup_epochs": 5.0, "momentum": 0.9, "weight_decay": 1e-4, "label_smoothing": 0.1,
    "hflip": 0.5, "randaug_n": 2, "randaug_m": 9, "mixup": 0.8, "cutmix": 1.0, "clip_grad": 0.0,
    "ema_decay": 0.999,
}


def add_recipe_arguments(group: argparse._ActionsContainer, **defaults: Any) -> None:
    """The recipe flags build_recipe reads, with one meaning in both trainers; `defaults` override
    RECIPE_DEFAULTS (pretraining uses lighter Mixup and a slower EMA)."""
    d = {**RECIPE_DEFAULTS, **defaults}
    group.add_argument("--min_lr", type=float, default=d["min_lr"], help="end of the cosine schedule (absolute)")
    group.add_argument("--warmup_epochs", type=float, default=d["warmup_epochs"],
                       help="linear warm-up, per step, over this many epochs (fractions allowed)")
    group.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum")
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum")
    group.add_argument("--weight_decay", type=float, default=d["weight_decay"],
                       help="on conv/linear weights only (none on norm weights, biases and gates)")
    group.add_argument("--label_smoothing", type=float, default=d["label_smoothing"],
                       help="label smoothing of the loss (inside the Mixup/CutMix targets when those are on)")
    group.add_argument("--hflip", type=float, default=d["hflip"], help="horizontal flip probability")
    group.add_argument("--randaug_n", type=int, default=d["randaug_n"], help="RandAugment operations per image (0 disables)")
    group.add_argument("--randaug_m", type=int, default=d["randaug_m"], help="RandAugment magnitude")
    group.add_argument("--mixup", type=float, default=d["mixup"], help="Mixup alpha (0 disables)")
    group.add_argument("--cutmix", type=float, default=d["cutmix"], help="CutMix alpha (0 disables)")
    group.add_argument("--clip_grad", type=float, default=d["clip_grad"], help="max gradient norm (0 disables)")
    group.add_argument("--ema", action="store_true", help="keep an EMA of the weights; validate, select and export it")
    group.add_argument("--ema_decay", type=float, default=d["ema_decay"], help="EMA decay per optimizer step")


def check_recipe_arguments(args: argparse.Namespace) -> None:
    """The recipe flags of add_recipe_arguments, refused with the allowed range when out of it
    (else torch or timm would stop with a traceback, or the run would silently train nothing)."""
    ranges = {"min_lr": (0, math.inf), "warmup_epochs": (0, math.inf), "momentum": (0, 1), "weight_decay": (0, math.inf),
              "label_smoothing": (0, 1), "hflip": (0, 1), "randaug_n": (0, math.inf), "randaug_m": (0, 30),
              "mixup": (0, math.inf), "cutmix": (0, math.inf), "clip_grad": (0, math.inf), "ema_decay": (0, 1)}
    for name, (low, high) in ranges.items():
        value = getattr(args, name)
        if not low <= value <= high or math.isnan(value):
            allowed = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise UserError(f"--{name} {value}: must be {allowed}.")


def build_recipe(model: nn.Module, args: argparse.Namespace, lr: float, steps_per_epoch: int,
                 num_classes: int, device: torch.device) -> Recipe:
    """SGD (Nesterov) with no decay on norms/biases/gates, warm-up + cosine per step, AMP scaler,
    optional EMA, Mixup/CutMix with label smoothing; `lr` is the absolute peak rate.

    Reads args.weight_decay, momentum, nesterov, epochs, warmup_epochs, min_lr, amp, ema,
    ema_decay, mixup, cutmix, label_smoothing.
    """
    optimizer = torch.optim.SGD(optimizer_param_groups(model, args), lr=lr,
                                momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    scheduler = build_scheduler(optimizer, args, lr, steps_per_epoch)
    amp_dtype = utils.resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = None
    if args.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.ema_decay)
    mixup = transforms.build_mixup(num_classes, args.mixup, args.cutmix, args.label_smoothing)
    # Mixup's soft targets already carry the smoothing.
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if mixup else args.label_smoothing)
    return Recipe(optimizer, scheduler, scaler, amp_dtype, ema, mixup, criterion)


def optimizer_param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    """The optimizer's parameter groups: weight decay on conv/linear weights only."""
    return models.decay_param_groups(model, args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, lr: float,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up over args.warmup_epochs, then cosine to args.min_lr."""
    total = args.epochs * steps_per_epoch
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, lr, args.min_lr))
