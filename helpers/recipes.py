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
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

import datasets
import models
import transforms
from helpers import utils
from helpers.utils import UserError

# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float,
              warmup_start: float = 0.0) -> float:
    """Multiplier of base_lr at `step`: linear warm-up from warmup_start (0: from (step+1)/warmup_steps),
    then cosine from base_lr to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1 - warmup_start) * (step + 1) / warmup_steps
    progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
    return (min_lr + (base_lr - min_lr) * cosine) / base_lr


def epoch_lr_factor(epoch: int, epochs: int, warmup_epochs: int, base_lr: float, min_lr: float,
                    warmup_start: float) -> float:
    """Multiplier of base_lr during 0-based `epoch` when the schedule moves once per epoch, as the
    paper's code ran it (torch LinearLR(start_factor=warmup_start) for warmup_epochs, then
    CosineAnnealingLR(T_max=epochs - warmup_epochs, eta_min=min_lr), stepped after each epoch)."""
    if epoch < warmup_epochs:
        return warmup_start + (1 - warmup_start) * epoch / warmup_epochs
    progress_ = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
    return (min_lr + (base_lr - min_lr) * cosine) / base_lr


def step_lr_factor(epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """Multiplier during 0-based `epoch` of a step schedule: gamma per milestone passed (MultiStepLR)."""
    return gamma ** sum(epoch >= m for m in milestones)


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


SCHEDULES = ("cosine", "onecycle", "step")
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
                       help="on conv/linear weights only (none on norm weights, biases and gates), unless --decay_all")
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
    group.add_argument("--sched", default="cosine", choices=SCHEDULES,
                       help="cosine: warm-up then cosine to --min_lr; onecycle: torch's OneCycleLR peaking at "
                            "--onecycle_peak; step: warm-up then x --step_gamma at each of --step_epochs")
    group.add_argument("--sched_interval", default="step", choices=("step", "epoch"),
                       help="cosine: move the schedule every optimizer step, or once per epoch (the paper's code)")
    group.add_argument("--warmup_start", type=float, default=0.0,
                       help="warm-up starts at this fraction of --lr (the paper's code: 0.1); 0: from lr/steps")
    group.add_argument("--onecycle_peak", type=float, default=0.3, help="onecycle: fraction of the steps at the peak")
    group.add_argument("--step_epochs", default="30,60,90", help="step: epochs at which the lr drops")
    group.add_argument("--step_gamma", type=float, default=0.1, help="step: factor at each drop")
    group.add_argument("--decay_all", action=argparse.BooleanOptionalAction, default=False,
                       help="weight decay on every parameter, norms, biases and gates included (the paper's code)")
    group.add_argument("--lr_mult", default="",
                       help="learning-rate multipliers by parameter-name prefix, e.g. 'layer3,layer4,fc=5'; "
                            "several groups separated by ';'")


def check_recipe_arguments(args: argparse.Namespace) -> None:
    """The recipe flags of add_recipe_arguments, refused with the allowed range when out of it
    (else torch or timm would stop with a traceback, or the run would silently train nothing)."""
    ranges = {"warmup_start": (0, 1), "onecycle_peak": (0, 1), "step_gamma": (0, 1),
              "min_lr": (0, math.inf), "warmup_epochs": (0, math.inf), "momentum": (0, 1), "weight_decay": (0, math.inf),
              "label_smoothing": (0, 1), "hflip": (0, 1), "randaug_n": (0, math.inf), "randaug_m": (0, 30),
              "mixup": (0, math.inf), "cutmix": (0, math.inf), "clip_grad": (0, math.inf), "ema_decay": (0, 1)}
    for name, (low, high) in ranges.items():
        value = getattr(args, name, low)
        if not low <= value <= high or math.isnan(value):
            allowed = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise UserError(f"--{name} {value}: must be {allowed}.")
    parse_lr_mult(getattr(args, "lr_mult", ""))
    parse_step_epochs(getattr(args, "step_epochs", ""))


def build_recipe(model: nn.Module, args: argparse.Namespace, lr: float, steps_per_epoch: int,
                 num_classes: int, device: torch.device) -> Recipe:
    """SGD (Nesterov) with no decay on norms/biases/gates, warm-up + cosine per step, AMP scaler,
    optional EMA, Mixup/CutMix with label smoothing; `lr` is the absolute peak rate.

    Reads args.weight_decay, momentum, nesterov, epochs, warmup_epochs, min_lr, amp, ema,
    ema_decay, mixup, cutmix, label_smoothing.
    """
    optimizer = torch.optim.SGD(optimizer_param_groups(model, args, lr), lr=lr,
                                momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    scheduler = build_scheduler(optimizer, args, lr, steps_per_epoch)
    amp_dtype = recipe_amp_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = None
    if args.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.ema_decay)
    mixup = transforms.build_mixup(num_classes, args.mixup, args.cutmix, args.label_smoothing)
    # Mixup's soft targets already carry the smoothing.
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if mixup else args.label_smoothing)
    return Recipe(optimizer, scheduler, scaler, amp_dtype, ema, mixup, criterion)


def recipe_amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device`. Under an upstream preset, fp16 is the paper code's
    torch.cuda.amp (autocast + GradScaler), which leaves a CPU run in fp32: so does this."""
    if getattr(args, "recipe", "paper") in UPSTREAM_PRESETS and args.amp == "fp16" and device.type != "cuda":
        return None
    return utils.resolve_amp(args.amp, device)


def amp_line(args: argparse.Namespace, amp_dtype: torch.dtype | None, device: torch.device) -> str:
    """The run header's precision: what runs, and why when it is not what --amp asks for."""
    label = utils.amp_label(amp_dtype)
    scaler = " with a GradScaler" if amp_dtype == torch.float16 else ""
    if args.amp == "fp16" and amp_dtype is None:
        return (f"amp fp16 (recipe {args.recipe}: the paper code's CUDA autocast) runs in fp32 on the {device.type}: "
                f"autocast and the GradScaler act on CUDA only")
    return f"amp {label}{scaler} (--amp {args.amp}, {device.type})"


def parse_lr_mult(spec: str) -> list[tuple[tuple[str, ...], float]]:
    """'layer3,layer4,fc=5;layer2=2' -> [(('layer3', 'layer4', 'fc'), 5.0), (('layer2',), 2.0)]."""
    rules = []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        prefixes, sep, value = part.rpartition("=")
        names = tuple(n.strip() for n in prefixes.split(",") if n.strip())
        try:
            mult = float(value)
        except ValueError:
            mult = -1.0
        if not sep or not names or not mult > 0:
            raise UserError(f"--lr_mult: cannot read '{part}'; expected PREFIX[,PREFIX...]=MULTIPLIER (> 0), "
                            f"e.g. 'layer3,layer4,fc=5'")
        rules.append((names, mult))
    return rules


def parse_step_epochs(spec: str) -> list[int]:
    try:
        milestones = [int(v) for v in (spec or "").split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--step_epochs {spec!r}: expected epochs separated by commas, e.g. 30,60,90") from None
    if milestones != sorted(milestones) or any(m < 1 for m in milestones):
        raise UserError(f"--step_epochs {spec!r}: the epochs must rise and be at least 1")
    return milestones


def lr_multiplier(name: str, rules: Sequence[tuple[tuple[str, ...], float]]) -> float:
    """The multiplier of the first rule with a prefix that is the parameter's module path (or a parent)."""
    for prefixes, mult in rules:
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return mult
    return 1.0


def is_decayed(param: torch.Tensor) -> bool:
    """Conv and linear weights get weight decay; norm weights, biases and gates (ndim <= 1) do not."""
    return param.ndim > 1


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: the trained parameters that get weight decay, and those that do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if is_decayed(param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_param_groups(model: nn.Module, args: argparse.Namespace, lr: float) -> list[dict]:
    """The optimizer's parameter groups: weight decay on conv/linear weights only (every parameter
    with --decay_all), learning rate lr x its --lr_mult multiplier (default 1)."""
    rules = parse_lr_mult(getattr(args, "lr_mult", ""))
    decay_all = getattr(args, "decay_all", False)
    if not rules and not decay_all:
        return [{**group, "lr": lr} for group in decay_param_groups(model, args.weight_decay)]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unused = [p for prefixes, _ in rules for p in prefixes
              if not any(n == p or n.startswith(p + ".") for n, _ in named)]
    if unused:
        tops = sorted({n.split(".")[0] for n, _ in named})
        raise UserError(f"--lr_mult: no parameter of {type(model).__name__} lies under {', '.join(unused)}; "
                        f"its top-level modules are {', '.join(tops)}")
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in named:
        decays = decay_all or is_decayed(param)
        buckets.setdefault((lr_multiplier(name, rules), decays), []).append(param)
    return [{"params": params, "weight_decay": args.weight_decay if decays else 0.0, "lr": lr * mult, "lr_mult": mult}
            for (mult, decays), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, lr: float,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule of --sched (see add_recipe_arguments), each parameter group relative to its
    own peak rate. Options a trainer does not define take their defaults (pretrain_spark.py)."""
    sched = getattr(args, "sched", "cosine")
    start = getattr(args, "warmup_start", 0.0)
    total = args.epochs * steps_per_epoch
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    peaks = [group["lr"] for group in optimizer.param_groups]
    if sched == "onecycle":
        # OneCycleLR starts at max_lr / div_factor and ends at that / final_div_factor: end at --min_lr.
        div = 25.0
        final_div = lr / div / args.min_lr if args.min_lr > 0 else 1e4
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=max(1, total), pct_start=args.onecycle_peak,
            anneal_strategy="cos", cycle_momentum=False, div_factor=div, final_div_factor=final_div)
    if sched == "step":
        milestones = parse_step_epochs(args.step_epochs)
        def factor(step: int, base: float) -> float:
            if step < warmup:
                return lr_factor(step, total, warmup, base, args.min_lr, start)
            return step_lr_factor(step // steps_per_epoch, milestones, args.step_gamma)
    elif getattr(args, "sched_interval", "step") == "epoch":
        warmup_epochs = int(round(args.warmup_epochs))
        def factor(step: int, base: float) -> float:
            return epoch_lr_factor(step // steps_per_epoch, args.epochs, warmup_epochs, base, args.min_lr, start)
    else:
        def factor(step: int, base: float) -> float:
            return lr_factor(step, total, warmup, base, args.min_lr, start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [functools.partial(_at, factor, base) for base in peaks])


def _at(factor: Any, base: float, step: int) -> float:
    return factor(step, base)


# --------------------------------------------------------------------------------------------
# Presets (train.py --recipe): defaults for a whole recipe; a flag given on the command line wins
# --------------------------------------------------------------------------------------------
# Both upstream presets follow the public paper code (github.com/junbolian/TwistNet-2D): train.py
# builds SGD(momentum 0.9, nesterov) with weight_decay on model.parameters() (every tensor), label
# smoothing 0.1, Mixup 0.8 / CutMix 1.0 switching per batch, RandAugment n=2 m=9, flip 0.5,
# clip_grad_norm 1.0, LinearLR(start_factor=0.1) over the warm-up epochs then CosineAnnealingLR,
# both stepped once per epoch, and evaluates in fp32 (eval resize int(224 / 0.875) = 256, bicubic,
# as ours). models.py runs kaiming_normal_(fan_out) over every conv after building STCI, hence
# stci_init 'upstream' in both.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    # Today's defaults: the seed README's recipe (ImageNet-initialised when --pretrained).
    "paper": {},
    # Seed-era code, commit ed4ee00: its argparse defaults (lr 0.01, batch 32, 100 epochs, 5 warm-up
    # epochs, min lr 1e-6, grad_clip 1.0), transforms.py's RandomResizedCrop scale (0.08, 1).
    # --pretrained defaulted to true and run_all.py passed it on every run: a twistnet* loaded
    # weights/twistnet18_imagenet.pt when present, else only stem + layer1 + layer2 of ResNet-18, and
    # train.py gave layer3, layer4 and fc 5x the lr in both cases (use_layer_wise_lr tested only its
    # --twistnet_pretrained path option, which is our --pretrained PATH); baselines got timm weights.
    # Both presets: fp16 autocast with a GradScaler (--amp, CUDA only), the paper code's splits, and
    # PIL's decode without EXIF orientation.
    "upstream_ed4ee00": {
        "epochs": 100, "batch_size": 32, "lr": 0.01, "warmup_epochs": 5.0, "warmup_start": 0.1,
        "sched": "cosine", "sched_interval": "epoch", "min_lr": 1e-6, "clip_grad": 1.0, "decay_all": True,
        "weight_decay": 1e-4, "momentum": 0.9, "nesterov": True, "label_smoothing": 0.1, "mixup": 0.8,
        "cutmix": 1.0, "randaug_n": 2, "randaug_m": 9, "hflip": 0.5, "crop_scale": 0.08,
        "pretrained": True, "transfer_policy": "stem+layer1+layer2", "lr_mult": "layer3,layer4,fc=5",
        "stci_init": "upstream", "eval_amp": False, "ema": False, "amp": "fp16", "split_protocol": "paper_code",
        "exif": "off",
    },
    # The published tables, latest commit (b223241): train.py's defaults changed to lr 0.05, batch 64,
    # 200 epochs, 10 warm-up epochs, min lr 1e-5, from scratch (pretrained False); transforms.py's crop
    # scale (0.2, 1) for every dataset. Optimizer, schedule shape, clipping and decay as ed4ee00.
    "upstream_scratch": {
        "epochs": 200, "batch_size": 64, "lr": 0.05, "warmup_epochs": 10.0, "warmup_start": 0.1,
        "sched": "cosine", "sched_interval": "epoch", "min_lr": 1e-5, "clip_grad": 1.0, "decay_all": True,
        "weight_decay": 1e-4, "momentum": 0.9, "nesterov": True, "label_smoothing": 0.1, "mixup": 0.8,
        "cutmix": 1.0, "randaug_n": 2, "randaug_m": 9, "hflip": 0.5, "crop_scale": 0.2,
        "pretrained": False, "lr_mult": "", "stci_init": "upstream", "eval_amp": False, "ema": False,
        "amp": "fp16", "split_protocol": "paper_code", "exif": "off",
    },
}
UPSTREAM_PRESETS = ("upstream_ed4ee00", "upstream_scratch")
# What the run header and results.json["recipe"] show: every setting a preset may set.
RECIPE_KEYS = ("epochs", "batch_size", "lr", "lr_mult", "sched", "sched_interval", "warmup_epochs", "warmup_start",
               "min_lr", "momentum", "nesterov", "weight_decay", "decay_all", "clip_grad", "label_smoothing", "mixup",
               "cutmix", "randaug_n", "randaug_m", "hflip", "crop_scale", "pretrained", "transfer_policy",
               "stci_init", "eval_amp", "ema", "amp", "split_protocol", "exif")
STCI_INIT_CHOICES = ("default", *models.STCI_INITS)


def add_preset_arguments(group: argparse._ActionsContainer) -> None:
    """train.py's --recipe, and the two settings only presets and that trainer use."""
    group.add_argument("--recipe", default="paper", choices=tuple(PRESETS),
                       help="preset of recipe defaults (docs/TRAINING.md \"Recipes\"); any flag given explicitly wins")
    group.add_argument("--stci_init", default="default", choices=STCI_INIT_CHOICES,
                       help="STCI initialisation: the model's default (paper), or upstream (the paper code's "
                            "kaiming fan-out)")
    group.add_argument("--eval_amp", action="store_true",
                       help="evaluate under autocast (--amp); default fp32, so near-ties do not flip with the GPU")
    group.add_argument("--split_protocol", default="default", choices=datasets.SPLIT_PROTOCOLS,
                       help="default: our splits, a function of (dataset, fold); paper_code: the paper code's "
                            "(FMD 5 folds of 60/20/20, KTH-TIPS2-b, CUB val), seeded by --seed too "
                            "(docs/DATASETS.md \"The paper code's splits\")")
    group.add_argument("--exif", default="on", choices=("on", "off"),
                       help="apply EXIF orientation on decode (off: as stored, as the paper code decodes)")


def resolve_preset(build_parser: Callable[[], argparse.ArgumentParser],
                   argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv with the parser `build_parser` makes, then fill in --recipe's preset for every
    setting not given on the command line."""
    args = build_parser().parse_args(argv)
    explicit = utils.explicit_flags(build_parser(), argv)
    for key, value in PRESETS[args.recipe].items():
        if key not in explicit:
            setattr(args, key, value)
    if "stci_init" in args.model_kwargs:   # the model's own kwarg is explicit too
        if "stci_init" in explicit and args.stci_init != args.model_kwargs["stci_init"]:
            raise UserError(f"--stci_init {args.stci_init} contradicts --model_kwargs stci_init "
                            f"{args.model_kwargs['stci_init']!r}: give one of them.")
        args.stci_init = args.model_kwargs["stci_init"]
    if args.recipe == "upstream_ed4ee00" and "lr_mult" not in explicit and not ed4ee00_layer_wise_lr(args):
        args.lr_mult = ""
    return args


def ed4ee00_layer_wise_lr(args: argparse.Namespace) -> bool:
    """Whether ed4ee00's train.py gave layer3/layer4/fc 5x the lr: for a twistnet* with --pretrained
    (auto-detected TwistNet file or ResNet-18 transfer alike), not with a named checkpoint
    (its --twistnet_pretrained PATH) nor from scratch."""
    return args.pretrained is True and models.is_twistnet(args.model)


def recipe_summary(args: argparse.Namespace) -> dict:
    """The preset's name and the resolved value of every setting a preset can set."""
    values = {key: getattr(args, key) for key in RECIPE_KEYS}
    values["pretrained"] = values["pretrained"] if isinstance(values["pretrained"], bool) else str(values["pretrained"])
    return {"preset": args.recipe, **values}


def recipe_line(args: argparse.Namespace) -> str:
    summary = recipe_summary(args)
    return f"recipe {summary.pop('preset')}: " + ", ".join(f"{k}={v}" for k, v in summary.items())
