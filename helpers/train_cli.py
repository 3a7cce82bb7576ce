"""train.py's command line: its parser, checks, run names and finished-run comparison.

run_all.py sweeps train.py through this contract (the same parser, the same run names), so that
a sweep validates every run's options and knows each run's folder without importing train.py.

Usage:
    from helpers import train_cli
    args = train_cli.parse_args(["--dataset", "dtd", "--fold", "3"])   # --recipe preset resolved
    train_cli.validate_args(args)                                     # UserError on impossible values
    run_path = Path(args.run_dir) / train_cli.run_name(args)          # dtd_fold3_twistnet18_seed42
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import datasets
import models
from helpers import dali, loading, model_tools, recipes, utils
from helpers.utils import UserError

DESCRIPTION = ("Train one model on one fold of one dataset, resumably; writes a run directory "
               "(docs/TRAINING.md \"The run directory\").")

# Options that may change between an interrupted run and its resumption without changing the
# trajectory (where data lives, how fast it is loaded, how much is printed). A moved dataset is
# fine; other data is caught by the fingerprint of the splits.
RESUME_SAFE_KEYS = {"data_dir", "workers", "run_dir", "force", "cache", "cache_max_short", "no_progress", "prefetch",
                    "tensorboard"}
PRETRAINED_OFF = ("off", "false", "none")
# A --tag becomes part of the run's folder name and of cluster job names and scripts: plain characters only.
TAG_PATTERN = re.compile(r"[A-Za-z0-9._+-]*")

# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--dataset", default="synthtex", choices=datasets.DATASET_NAMES,
                   help="dataset protocol (docs/DATASETS.md \"The protocols\")")
    g.add_argument("--data_dir", default=None, help="dataset root as its authors ship it (unused for synthtex)")
    g.add_argument("--model", default="twistnet18", help=f"one of: {', '.join(models.model_names())}")
    g.add_argument("--model_kwargs", default="{}", type=json.loads,
                   help='JSON of TwistNet hyper-parameters, e.g. \'{"r": 4, "stages": [4]}\'')
    g.add_argument("--drop_path", type=float, default=0.0,
                   help="stochastic depth: the last block's drop rate, rising linearly from 0 (timm's DropPath)")
    g.add_argument("--blurpool", action="store_true",
                   help="anti-aliased downsampling (timm's BlurPool2d); same weight names and shapes")
    g.add_argument("--tag", default="", help="suffix for the run name, to tell variants of one model apart "
                                             "(letters, digits and . _ + - only)")
    g.add_argument("--fold", type=int, default=1,
                   help="split: DTD and FMD 1-10, KTH-TIPS2 1-4; CUB, Flowers and synthtex any k >= 1 (docs/DATASETS.md)")
    g.add_argument("--seed", type=int, default=42, help="seed of weights init, data order and augmentation (never of the split)")
    g.add_argument("--train_per_class", type=int, default=None,
                   help="train on N images per class of the training split (a fixed, nested subset; low-data curves)")
    g.add_argument("--train_fraction", type=float, default=None,
                   help="train on this fraction of each class of the training split (fixed and nested too)")
    g.add_argument("--run_dir", default="runs", help="folder that receives the run directory")
    g.add_argument("--force", action="store_true", help="retrain even if the run finished (or has last.pt)")
    g.add_argument("--pretrained", nargs="?", const=True, default=False, type=pretrained_value,
                   help="flag: ImageNet weights (TwistNet: auto-detect weights/, else ResNet-18 transfer); "
                        "or a checkpoint path; 'off': from scratch (over a --recipe that sets it)")
    g.add_argument("--refine", default=None,
                   help="fine-tune a prune.py output (network slimming's last step) instead of a new model; "
                        "give the run a --tag (e.g. pruned40) so that it gets its own name and table row")
    g.add_argument("--transfer_policy", default="all", choices=models.TRANSFER_POLICIES,
                   help="ResNet-18 transfer: every matching tensor, or the first two stages only")
    g.add_argument("--resnet18_weights", default=None, help="local timm/torchvision ResNet-18 state_dict")

    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch_size", type=int, default=32, help="images per step")
    g.add_argument("--lr", type=float, default=0.01, help="peak SGD learning rate")
    g.add_argument("--img_size", type=int, default=224, help="train crop; eval resizes to img_size*256/224")
    g.add_argument("--crop_scale", type=float, default=0.08,
                   help="smallest crop area of RandomResizedCrop, as a fraction of the image")
    g.add_argument("--sparsity_reg", type=float, default=0.0,
                   help="network slimming: L1 penalty on the BatchNorm scales (e.g. 1e-4), before prune.py")
    g.add_argument("--progressive", default="",
                   help="low resolution early: 'SIZE:FRACTION,...', e.g. '128:0.4,192:0.8' trains at 128 "
                        "for the first 40%% of the epochs, at 192 until 80%%, then at --img_size")
    recipes.add_recipe_arguments(g)
    recipes.add_preset_arguments(g)

    g = p.add_argument_group("system")
    utils.add_device_arguments(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (4, or fewer on a machine with fewer cores); with --loader "
                        "dali, DALI's CPU threads")
    g.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker")
    dali.add_loader_argument(g)
    g.add_argument("--decode_size", type=int, default=None,
                   help="shrink images on decode to this shorter side (fast path, e.g. 256); default: crop "
                        "from the native-resolution image, as the paper's code does")
    g.add_argument("--cache", action="store_true",
                   help="keep decoded images in memory, at native resolution up to --cache_max_short (or at "
                        "--decode_size)")
    g.add_argument("--cache_max_short", type=int, default=loading.CACHE_MAX_SHORT,
                   help="--cache: an image whose shorter side is longer is shrunk to it (bicubic) before it is "
                        "kept, so its crops come from the smaller copy; 0: no limit, every image native")
    g.add_argument("--eval_every", type=int, default=1, help="validate every N epochs (and at the last)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (exact resume on GPU needs this)")
    g.add_argument("--benchmark_loader", action="store_true",
                   help="time one epoch of the train loader alone (no model, nothing written) and exit")
    g.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    g.add_argument("--lr_find", action="store_true",
                   help="learning-rate range test on this run's data and recipe: writes lr_find.png and "
                        "lr_find.json (curve, suggested --lr) into the run directory and exits (no checkpoint)")
    g.add_argument("--lr_find_steps", type=int, default=100, help="optimizer steps of the range test")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to <run>/tensorboard")
    return p


def pretrained_value(text: str) -> str | bool:
    """--pretrained's value: a checkpoint path, or off (from scratch)."""
    return False if text.lower() in PRETRAINED_OFF else text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with its --recipe preset resolved (an explicit flag wins over the preset)."""
    return recipes.resolve_preset(build_parser, argv)


def run_name(args: argparse.Namespace) -> str:
    subset = (f"_n{args.train_per_class}" if args.train_per_class is not None else
              f"_frac{args.train_fraction:g}" if args.train_fraction is not None else "")
    return f"{args.dataset}_fold{args.fold}_{models.run_label(args.model, args.tag)}_seed{args.seed}{subset}"


def validate_args(args: argparse.Namespace) -> None:
    """Values that cannot make a run, refused before anything is loaded or written."""
    if not TAG_PATTERN.fullmatch(args.tag):
        raise UserError(f"--tag {args.tag!r}: a tag is part of the run's folder name (and of a SLURM job's name "
                        "and script), so it may hold letters, digits and . _ + - only.")
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: a run needs at least 1 epoch.")
    if args.batch_size < 2:
        why = "BatchNorm needs at least 2 images per batch for its batch statistics"
        if args.mixup > 0 or args.cutmix > 0:
            why += ", and Mixup/CutMix mix every image with another one of its batch"
        raise UserError(f"--batch_size {args.batch_size} cannot train: {why}. Use 2 or more (the paper uses 32).")
    if args.lr_find and args.lr_find_steps < 10:
        raise UserError(f"--lr_find_steps {args.lr_find_steps}: the range test needs at least 10 steps.")
    if args.cache_max_short < 0:
        raise UserError(f"--cache_max_short {args.cache_max_short}: a shorter side in px, or 0 for no limit.")
    for name in ("img_size", "eval_every", "prefetch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 (load in the main process) or more, got {args.workers}.")
    if not 0 < args.crop_scale <= 1:
        raise UserError(f"--crop_scale {args.crop_scale}: the smallest crop area is a fraction in (0, 1].")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: the learning rate must be positive.")
    if not 0 <= args.drop_path < 1:
        raise UserError(f"--drop_path {args.drop_path}: a drop rate in [0, 1).")
    if args.refine and (args.pretrained or not args.tag):
        raise UserError(f"--refine {args.refine} starts from the pruned weights: " + (
            "drop --pretrained." if args.pretrained else "give the run a --tag (e.g. --tag pruned40), so that it "
            "does not take the unpruned run's name."))
    if args.sparsity_reg < 0:
        raise UserError(f"--sparsity_reg {args.sparsity_reg}: a penalty weight, 0 (off) or more.")
    model_tools.model_kwargs_of(vars(args))   # --drop_path/--blurpool against --model_kwargs
    recipes.parse_progressive(args.progressive, args.img_size)
    if args.train_per_class is not None and args.train_fraction is not None:
        raise UserError("--train_per_class and --train_fraction both choose the training subset: give one.")
    if args.train_per_class is not None and args.train_per_class < 1:
        raise UserError(f"--train_per_class {args.train_per_class}: a class needs at least 1 training image.")
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        raise UserError(f"--train_fraction {args.train_fraction}: a fraction of each class, in (0, 1].")
    recipes.check_recipe_arguments(args)


def config_of(args: argparse.Namespace) -> dict:
    config = {k: v for k, v in vars(args).items()}
    config["pretrained"] = str(args.pretrained) if not isinstance(args.pretrained, bool) else args.pretrained
    return config


def recipe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """'--k: old -> new, ...' for the settings outside RESUME_SAFE_KEYS that differ ('' if none).

    A setting missing from an older run's config had its default then, so adding a flag to
    train.py does not turn every earlier run into another recipe.
    """
    filled = {**vars(build_parser().parse_args([])), **saved}
    return utils.config_differences(filled, current, sorted(k for k in current if k not in RESUME_SAFE_KEYS))


def read_results(run_path: Path) -> dict:
    try:
        return utils.read_json(run_path / "results.json")
    except UserError as error:
        raise UserError(f"{error}; pass --force to train the run again.") from None


def finished_difference(run_path: Path, config: dict, data: Any = None) -> str:
    """How a finished run differs from the command ('' if it does not): 'with another recipe (--k: a -> b)'
    or, given `data` (with .classes and .fingerprint), 'on other data: ...'."""
    results = read_results(run_path)
    diff = recipe_differences(results.get("config") or {}, config)
    if diff:
        return f"with another recipe ({diff})"
    saved = results.get("data_fingerprint")
    change = data is not None and saved and datasets.data_difference(results.get("classes") or [], saved,
                                                                     data.classes, data.fingerprint)
    return f"on other data: {change}" if change else ""


def check_finished(run_path: Path, config: dict, data: Any = None) -> None:
    """Refuse a finished run that another recipe or other data made: "already finished" would
    silently keep numbers that do not belong to this command."""
    difference = finished_difference(run_path, config, data)
    if difference:
        raise UserError(f"{run_path} already finished {difference}; its results do not belong to this "
                        f"command. Pass --force to train it again with this one (its results, best.pt and logs "
                        f"are replaced), or use another --tag or --run_dir for it.")
