"""ImageNet pretraining of TwistNet-18 (or any registry model) with torch.distributed.

Usage:
    # one process (one GPU, or the CPU): a plain launch needs no torchrun
    python pretrain_imagenet.py --data_dir /data/imagenet --batch_size 256 --checkpoint_dir checkpoints

    # one machine, 8 GPUs (--batch_size is per GPU; the lr is scaled by the global batch)
    torchrun --nproc_per_node=8 pretrain_imagenet.py --data_dir /data/imagenet --batch_size 128 \\
        --checkpoint_dir checkpoints

    # two machines x 8 GPUs: the same command on both, --node_rank 0 and 1
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint node0.example:29500 --rdzv_id twistnet pretrain_imagenet.py \\
        --data_dir /data/imagenet --batch_size 64 --checkpoint_dir /shared/checkpoints

    # resume: the recipe comes from the checkpoint, so only the data location is needed
    torchrun --nproc_per_node=8 pretrain_imagenet.py --data_dir /data/imagenet \\
        --resume checkpoints/latest.pt

    # throughput: the model's ceiling without data loading, and the data-wait share with real data
    python pretrain_imagenet.py --data synthetic --epochs 1 --synthetic_images 512 --profile
    python pretrain_imagenet.py --data_dir D --epochs 1 --profile --checkpoint_dir /tmp/p

ImageNet layout: <data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG (the validation
images sorted into class folders). Outputs (rank 0 writes them):
    <checkpoint_dir>/latest.pt           every epoch and every --save_every_steps steps; exact resume
    <checkpoint_dir>/best.pt             weights with the best validation top-1
    <checkpoint_dir>/<model>_imagenet.pt final weights (EMA weights with --ema), plain state_dict
    <checkpoint_dir>/log.jsonl           a header record, then one record per epoch
    <checkpoint_dir>/train.log           the console output
    <weights_dir>/<model>_imagenet.pt    copy of the final weights, where models.py auto-detects them
                                         (not with --data synthetic)

Recipe defaults (PRETRAIN_GUIDE.md): 600 epochs, SGD Nesterov momentum 0.9, lr 0.1 per 256 images
scaled linearly with the global batch (batch_size x world_size x accum_steps), weight decay 1e-4
except on norm weights, biases and gates, 5 warm-up epochs then cosine, label smoothing 0.1,
Mixup 0.2, CutMix 1.0, RandAugment (2, 9).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import datasets
import models
import transforms
from helpers import dali, distributed, loading, model_tools, recipes, rundirs, utils
from helpers.distributed import BatchPlan, DistContext
from helpers.utils import UserError

# Besides where things are and how fast they go (distributed.RESUME_SAFE_KEYS), these may differ
# on a resume; everything else is the recipe and must match the checkpoint.
RESUME_SAFE_KEYS = distributed.RESUME_SAFE_KEYS | {"compile", "eval_every", "val_batch_size"}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p, groups = distributed.pretrain_parser(
        __doc__, base_lr=0.1, weights_file="<model>_imagenet.pt", checkpoint_dir="checkpoints", resume=None,
        resume_help="a latest.pt to continue from, or 'auto': <checkpoint_dir>/latest.pt if present", print_freq=100)
    g = groups["data"]
    g.add_argument("--data", default="folder", choices=("folder", "synthetic"),
                   help="folder: ImageNet layout under --data_dir; synthetic: random tensors made on "
                        "the device (no files, no decoding) to measure the model's ceiling")
    g.add_argument("--data_dir", default=None, help="root holding train/<wnid>/ and val/<wnid>/")
    g.add_argument("--synthetic_images", type=int, default=12_800, help="train images per epoch with --data synthetic")
    g.add_argument("--synthetic_val_images", type=int, default=1_000, help="val images with --data synthetic")
    g.add_argument("--num_classes", type=int, default=1000, help="classes with --data synthetic")

    g = groups["model"]
    g.add_argument("--model", default="twistnet18", help=f"one of: {', '.join(models.model_names())}")
    g.add_argument("--drop_path", type=float, default=0.0,
                   help="stochastic depth: the last block's drop rate, rising linearly from 0 (timm's DropPath)")

    g = groups["recipe"]
    g.add_argument("--epochs", type=int, default=600, help="length of the cosine schedule")
    g.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)  # renamed: a clear error
    g.add_argument("--img_size", type=int, default=224, help="train crop at the end of training and eval crop")
    g.add_argument("--progressive", default="",
                   help="low resolution early: 'SIZE:FRACTION,...', e.g. '128:0.4,192:0.8' trains at 128 "
                        "for the first 40%% of the epochs, at 192 until 80%%, then at --img_size")
    recipes.add_recipe_arguments(g, mixup=0.2, ema_decay=0.9998)
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation")

    g = groups["system"]
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes (GPU only)")
    g.add_argument("--val_batch_size", type=int, default=None, help="per process (default: --batch_size)")
    groups["checkpoints and logs"].add_argument("--eval_every", type=int, default=1,
                                                help="validate every N epochs (and after the last)")
    return p


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
class SyntheticBatches:
    """One random batch made on the device and handed out `count` times: no files, no decoding."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, count: int) -> None:
        self.images, self.labels, self.count = images, labels, count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for _ in range(self.count):
            # A copy each time: Mixup/CutMix mix the batch in place.
            yield self.images.clone(), self.labels, 0

    def __len__(self) -> int:
        return self.count


class TrainData(distributed.EpochBatches):
    """Training micro-batches for an epoch, at the epoch's resolution, from a folder or synthetic."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, plan: BatchPlan,
                 num_images: int, num_classes: int, first_set: tuple[int, Any] | None = None) -> None:
        """first_set: (size, dataset) already built at startup, reused instead of scanning again."""
        super().__init__(lambda size: load_folder_splits(args, size)[0], num_images, plan, ctx, args.seed,
                         args.workers, args.prefetch, f"{args.data_dir}/train", first_set,
                         dali_augment=dali_augment(args, ctx))
        self.args, self.num_classes = args, num_classes
        self.images: dict | None = None   # distributed.image_set of a folder, on rank 0

    def batches(self, epoch: int, skip_steps: int, size: int) -> Iterable:
        if self.args.data == "synthetic":
            return self._synthetic(size, self.micro_batches - skip_steps * self.plan.accum_steps)
        return super().batches(epoch, skip_steps, size)

    def _synthetic(self, size: int, count: int) -> SyntheticBatches:
        g = torch.Generator(device=self.ctx.device).manual_seed(self.args.seed + 7919 * self.ctx.rank)
        shape = (self.plan.per_rank, 3, size, size)
        images = torch.randn(shape, generator=g, device=self.ctx.device)
        labels = torch.randint(0, self.num_classes, (self.plan.per_rank,), generator=g, device=self.ctx.device)
        return SyntheticBatches(images, labels, count)


def check_imagenet_layout(data_dir: str | None) -> Path:
    """Fail early, naming the path, on the usual ImageNet preparation mistakes."""
    if not data_dir:
        raise UserError("--data_dir is required (or --data synthetic). Expected <data_dir>/train/<wnid>/*.JPEG "
                         "and <data_dir>/val/<wnid>/*.JPEG.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"--data_dir {root} does not exist or is not a directory.")
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"{folder} is missing: expected {root}/{split}/<wnid>/*.JPEG "
                             f"(ImageNet layout, one folder per class).")
        with os.scandir(folder) as entries:
            has_class_dirs = any(e.is_dir() for e in entries)
        if not has_class_dirs:
            hint = (" The validation images must be sorted into class folders (e.g. with the "
                    "well-known valprep.sh script)." if split == "val" else "")
            raise UserError(f"{folder} has no class folders: expected {folder}/<wnid>/*.JPEG.{hint}")
    return root


def train_augment(args: argparse.Namespace, size: int) -> dali.TrainAugment:
    """The training augmentation at a crop size, for either loader (.torchvision() for PIL)."""
    return dali.TrainAugment(size, hflip=args.hflip, randaug_n=args.randaug_n, randaug_m=args.randaug_m)


def dali_augment(args: argparse.Namespace, ctx: DistContext) -> Callable[[int], dali.TrainAugment] | None:
    """train_augment for DALI (--loader dali), or None for the PIL loaders."""
    if dali.resolve_loader(args.loader, ctx.device) != "dali":
        return None
    return lambda size: train_augment(args, size)


def load_folder_splits(args: argparse.Namespace, train_size: int) -> tuple[Any, Any, list[str]]:
    """(train set at train_size, val set at --img_size, classes) through datasets.py; uint8 items."""
    train_tf = train_augment(args, train_size).torchvision()
    eval_tf = transforms.build_eval_transform(args.img_size, uint8=True)
    decode = transforms.eval_resize_size(args.img_size) if args.decode_size is None else args.decode_size
    try:
        sets, classes = datasets.build_datasets("imagefolder", args.data_dir, 1, train_tf, eval_tf,
                                                cache=False, cache_size=decode or None)
    except (datasets.DataNotFoundError, datasets.DataLayoutError) as exc:
        raise UserError(f"Cannot use --data_dir {args.data_dir}: {exc}") from None
    return sets["train"], sets["val"], classes


class ValData:
    """This rank's share of the validation set: indices rank::world, so each image counts once."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, dataset: Any | None,
                 num_classes: int) -> None:
        self.args, self.ctx, self.num_classes = args, ctx, num_classes
        self.batch_size = args.val_batch_size or args.batch_size
        if args.data == "synthetic":
            self.total = args.synthetic_val_images
            self.loader = None
        else:
            self.total = len(dataset)
            mine = range(ctx.rank, len(dataset), ctx.world_size)
            if dali.resolve_loader(args.loader, ctx.device) == "dali":
                self.loader = dali.DaliLoader(dataset, self.batch_size, ctx.device, args.workers, args.img_size,
                                              indices=mine)
            else:
                self.loader = DataLoader(Subset(dataset, mine), batch_size=self.batch_size, shuffle=False,
                                         **loading.loader_options(args.workers, args.prefetch, ctx.device))

    def batches(self) -> Iterable:
        return self.loader if self.loader is not None else self._synthetic()

    def _synthetic(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        mine = len(range(self.ctx.rank, self.total, self.ctx.world_size))
        g = torch.Generator(device=self.ctx.device).manual_seed(self.args.seed + 104_729 + self.ctx.rank)
        size = self.args.img_size
        for start in range(0, mine, self.batch_size):
            n = min(self.batch_size, mine - start)
            yield (torch.randn((n, 3, size, size), generator=g, device=self.ctx.device),
                   torch.randint(0, self.num_classes, (n,), generator=g, device=self.ctx.device), 0)


# --------------------------------------------------------------------------------------------
# Model and optimisation
# --------------------------------------------------------------------------------------------
class Pretrainer(distributed.Pretrainer):
    """Supervised pretraining of one process: the shared trainer with SGD, Mixup/CutMix, EMA, validation."""
    kind = "imagenet"

    def __init__(self, args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, model: nn.Module,
                 num_classes: int, steps_per_epoch: int, console: Callable[[str], None]) -> None:
        if args.sync_bn and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        super().__init__(args, ctx, plan, model, steps_per_epoch, console)
        self.num_classes = num_classes
        if args.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.recipe = recipes.build_recipe(self.model, args, self.lr, steps_per_epoch, num_classes, ctx.device)
        self.amp_dtype, self.ema = self.recipe.amp_dtype, self.recipe.ema
        self.best_acc, self.best_epoch = -1.0, 0

    def loss(self, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
        targets = labels
        if self.recipe.mixup is not None:
            images, targets = self.recipe.mixup(images, labels)
        return self.recipe.criterion(self.forward_model(images), targets)

    # ---------------------------------------------------------------------------------- state
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain weights for downstream use (EMA weights with --ema), no wrapper prefixes."""
        return {k: v.detach().cpu().clone() for k, v in models.unwrap_model(self.eval_model()).state_dict().items()}

    def extra_state(self) -> dict:
        return {"best_top1": self.best_acc, "best_epoch": self.best_epoch}

    def restore_extra(self, ckpt: dict) -> None:
        self.best_acc, self.best_epoch = ckpt["best_top1"], ckpt["best_epoch"]

    # ---------------------------------------------------------------------------------- eval
    def evaluate(self, val: ValData) -> dict:
        """Top-1/top-5 over every validation image once, summed across ranks."""
        model = self.eval_model()
        distributed.broadcast_buffers(model, self.ctx)
        sums = utils.evaluate(model, val.batches(), self.num_classes, self.ctx.device, self.channels_last,
                              self.amp_dtype)
        top1 = int(sums["confusion"].diag().sum())
        loss_sum, top1, top5, seen, skipped = distributed.all_reduce_sum(
            [sums["loss_sum"], top1, sums["top5"], sums["seen"], sums["skipped"]], self.ctx)
        self.model.train()
        seen_ = max(1.0, seen)
        return dict(val_loss=loss_sum / seen_, val_acc=100 * top1 / seen_, val_top5=100 * top5 / seen_,
                    val_images=int(seen), val_skipped=int(skipped))


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
def saved_config(ckpt: dict) -> dict:
    """The checkpoint's recipe; checkpoints from before the --lr -> --base_lr rename are read too."""
    config = dict(ckpt["config"])
    if "base_lr" not in config and "lr" in config:
        config["base_lr"] = config.pop("lr")
    config["lr"] = None
    return config


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def validate_args(args: argparse.Namespace, ctx: DistContext) -> None:
    models.get_spec(args.model)
    if args.sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise UserError("--sync_bn needs GPUs (torch's SyncBatchNorm has no CPU kernel). Drop it on CPU.")
    for name in ("epochs", "batch_size", "img_size", "accum_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if not args.base_lr > 0:
        raise UserError(f"--base_lr {args.base_lr}: the learning rate must be positive.")
    if not 0 <= args.drop_path < 1:
        raise UserError(f"--drop_path {args.drop_path}: a drop rate in [0, 1).")
    model_tools.model_kwargs_of(vars(args))   # --drop_path against --model_kwargs
    recipes.check_recipe_arguments(args)
    if args.batch_size < 2 and not (args.sync_bn and ctx.world_size > 1):
        raise UserError(f"--batch_size {args.batch_size} per process cannot train: BatchNorm needs at least 2 "
                        f"images per batch for its batch statistics (Mixup/CutMix also pair images). Use 2 or more.")


def header_record(trainer: Pretrainer, train_data: TrainData, val_data: ValData, kind: str) -> dict:
    params = models.count_params(trainer.model)
    stci = model_tools.stci_param_count(trainer.model)
    return distributed.header_record(
        kind, trainer, train_images=train_data.num_images, val_images=val_data.total,
        num_classes=train_data.num_classes, model=trainer.args.model, params=params, stci_params=stci,
        stci_share=stci / params)


def epoch_line(r: dict, epochs: int) -> str:
    val = (f" | val top-1 {r['val_acc']:.2f}% top-5 {r['val_top5']:.2f}% ({r['val_images']} images)"
           if "val_acc" in r else "")
    return (f"epoch {r['epoch']}/{epochs} | {r['img_size']}px | lr {r['lr']:.4g} | train loss {r['train_loss']:.4f}"
            f"{val} | {distributed.throughput_text(r)}")


def export_final_weights(trainer: Pretrainer, args: argparse.Namespace, ckpt_dir: Path,
                         console: Callable[[str], None]) -> None:
    # Weights fitted to random tensors must never be auto-detected as ImageNet weights.
    synthetic = args.data == "synthetic"
    distributed.export_weights(
        trainer.export_state_dict(), f"{args.model}_imagenet.pt", ckpt_dir, None if synthetic else args.weights_dir,
        console, f"Final weights{' (EMA)' if trainer.ema is not None else ''}"
                 f"{f' (--data synthetic: not copied to {args.weights_dir})' if synthetic else ''}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    explicit = utils.explicit_flags(build_parser(), argv)
    if "lr" in explicit:
        raise UserError(f"--lr was renamed --base_lr in pretraining: the learning rate per "
                        f"{distributed.LR_REFERENCE_BATCH} images, scaled by the global batch (use --base_lr "
                        f"{args.lr:g} for what --lr {args.lr:g} meant; on a resume, leave it out).")
    return distributed.run_in_job(run, args, explicit)


def run(args: argparse.Namespace, explicit: set[str], ctx: DistContext) -> int:
    start = distributed.start_or_resume(args, explicit, ctx, Pretrainer.kind, RESUME_SAFE_KEYS,
                                        distributed.PER_LAUNCH_KEYS, saved_config)
    validate_args(start.args, ctx)
    phases = recipes.parse_progressive(start.args.progressive, start.args.img_size)
    with distributed.checkpoint_dir_lock(Path(start.args.checkpoint_dir), ctx) as lock:
        return train_run(start, ctx, phases, lock)


def train_run(start: distributed.RunStart, ctx: DistContext, phases: list[tuple[float, int]],
              lock: rundirs.RunLock | None) -> int:
    """Pretrain (or resume); rank 0 holds the checkpoint directory's lock."""
    args, ckpt, plan = start.args, start.ckpt, start.plan
    utils.configure_kernels(args.deterministic, ctx.device)
    ckpt_dir = Path(args.checkpoint_dir)
    console = utils.Console(ckpt_dir / "train.log", enabled=ctx.is_main)

    # Identical initial weights on every rank; afterwards each rank draws its own Mixup stream.
    utils.seed_everything(args.seed)
    train_data, val_data = load_data(args, ctx, plan, phases, start_epoch=ckpt["epoch"] if ckpt else 0)
    model = distributed.build_model(args, train_data.num_classes, ctx, console, warm_start=ckpt is None)
    trainer = Pretrainer(args, ctx, plan, model, train_data.num_classes, train_data.steps_per_epoch, console)
    trainer.images = train_data.images
    utils.seed_everything(args.seed * 1000 + ctx.rank + 1)
    if ckpt is not None:
        distributed.resume_trainer(trainer, ckpt, start.path, ckpt_dir / "log.jsonl",
                                   lambda: header_record(trainer, train_data, val_data, kind="resume"))
        console(f"Resumed from {start.path}: epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}/"
                f"{trainer.steps_per_epoch} (best val top-1 so far {trainer.best_acc:.2f}%)")
        del ckpt, start
    elif ctx.is_main:
        utils.write_jsonl(ckpt_dir / "log.jsonl", [header_record(trainer, train_data, val_data, kind="header")])
    console(start_line(trainer, train_data, val_data))
    for note in utils.speed_notes(ctx.device, trainer.amp_dtype, args.compile):
        console(note)

    # A terminal Ctrl-C reaches each torchrun worker twice: a second signal within 2 s is that echo.
    with utils.StopFlag(grace_s=2.0) as stop:
        if not distributed.train_epochs(trainer, train_data, phases, ckpt_dir, stop,
                                        lambda: validate_if_due(trainer, val_data, ckpt_dir),
                                        lambda record: epoch_line(record, args.epochs), lock):
            console(f"Interrupted at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}/"
                    f"{trainer.steps_per_epoch}: saved {ckpt_dir / 'latest.pt'}. Continue with "
                    f"--resume {ckpt_dir / 'latest.pt'}.")
            return 130
    if ctx.is_main:
        export_final_weights(trainer, args, ckpt_dir, console)
        utils.append_jsonl(ckpt_dir / "log.jsonl", {"type": "final", "best_val_acc": trainer.best_acc,
                                                    "best_epoch": trainer.best_epoch,
                                                    "weights": str(ckpt_dir / f"{args.model}_imagenet.pt")})
    console(f"done: best val top-1 {trainer.best_acc:.2f}% at epoch {trainer.best_epoch}")
    if ctx.distributed:
        dist.barrier(group=ctx.cpu_group)
    return 0


def load_data(args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, phases: list[tuple[float, int]],
              start_epoch: int) -> tuple[TrainData, ValData]:
    if args.data == "synthetic":
        return (TrainData(args, ctx, plan, args.synthetic_images, args.num_classes),
                ValData(args, ctx, None, args.num_classes))
    check_imagenet_layout(args.data_dir)
    size = recipes.train_size_for_epoch(start_epoch, args.epochs, phases, args.img_size)
    train_set, val_set, classes = load_folder_splits(args, size)
    train_data = TrainData(args, ctx, plan, len(train_set), len(classes), first_set=(size, train_set))
    if ctx.is_main:   # one stat per image: rank 0 alone records (and on a resume compares) them
        train_data.images = distributed.image_set(classes, {"train": train_set.samples, "val": val_set.samples})
    return train_data, ValData(args, ctx, val_set, len(classes))


def start_line(trainer: Pretrainer, train_data: TrainData, val_data: ValData) -> str:
    args, params = trainer.args, models.count_params(trainer.model)
    return (f"{args.model}: {params / 1e6:.2f}M params (STCI {100 * model_tools.stci_param_count(trainer.model) / params:.2f}%)"
            f" | {train_data.num_classes} classes | {train_data.num_images} train / {val_data.total} val images | "
            f"{trainer.plan.describe()} | lr {trainer.lr:.4g} ({args.base_lr} per {distributed.LR_REFERENCE_BATCH}) | "
            f"{trainer.steps_per_epoch} steps/epoch | {trainer.ctx.device} amp {utils.amp_label(trainer.amp_dtype)} | "
            f"{trainer.ctx.world_size} process(es)")


def validate_if_due(trainer: Pretrainer, val_data: ValData, ckpt_dir: Path) -> dict:
    """Validation metrics of the epoch just trained, every --eval_every epochs and after the last."""
    args = trainer.args
    due = trainer.epoch % args.eval_every == 0 or trainer.epoch == args.epochs
    return {**(validate_and_keep_best(trainer, val_data, ckpt_dir) if due else {}), "best_val_acc": trainer.best_acc}


def validate_and_keep_best(trainer: Pretrainer, val_data: ValData, ckpt_dir: Path) -> dict:
    start = time.perf_counter()
    metrics = trainer.evaluate(val_data)
    metrics["val_time_s"] = time.perf_counter() - start
    if metrics["val_acc"] > trainer.best_acc:
        trainer.best_acc, trainer.best_epoch = metrics["val_acc"], trainer.epoch
        if trainer.ctx.is_main:
            utils.atomic_save({"model": trainer.export_state_dict(), "epoch": trainer.epoch,
                               "val_acc": metrics["val_acc"], "val_top5": metrics["val_top5"],
                               "ema": trainer.ema is not None, "config": vars(trainer.args)}, ckpt_dir / "best.pt")
    return metrics


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
