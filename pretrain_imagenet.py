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
import contextlib
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import datasets
import distributed
import model_tools
import models
import rundirs
import transforms
import utils
from distributed import BatchPlan, DistContext
from utils import UserError

SCRIPT_DIR = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = 1
# May differ between an interrupted run and its resumption: where things are, how fast they go,
# how much is printed. Everything else is the recipe and must match the checkpoint.
RESUME_SAFE_KEYS = {
    "data_dir", "workers", "prefetch", "checkpoint_dir", "weights_dir", "device", "amp", "compile",
    "channels_last", "print_freq", "save_every_steps", "profile", "profile_warmup", "eval_every",
    "val_batch_size", "batch_size", "accum_steps", "dist_timeout_min", "resume", "stop_after_steps",
    "deterministic",
}
# Never inherited from the checkpoint: they describe this launch only.
PER_LAUNCH_KEYS = {"resume", "stop_after_steps", "checkpoint_dir"}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="folder", choices=("folder", "synthetic"),
                   help="folder: ImageNet layout under --data_dir; synthetic: random tensors made on "
                        "the device (no files, no decoding) to measure the model's ceiling")
    g.add_argument("--data_dir", default=None, help="root holding train/<wnid>/ and val/<wnid>/")
    g.add_argument("--synthetic_images", type=int, default=12_800, help="train images per epoch with --data synthetic")
    g.add_argument("--synthetic_val_images", type=int, default=1_000, help="val images with --data synthetic")
    g.add_argument("--num_classes", type=int, default=1000, help="classes with --data synthetic")
    g.add_argument("--decode_size", type=int, default=None,
                   help="shorter side images are resized to when decoded (JPEGs over twice that size are "
                        "decoded at reduced DCT scale, PIL draft); default: the eval resize size "
                        "(256 for --img_size 224); 0: full resolution (slower; crops from the originals)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="twistnet18", help=f"one of: {', '.join(models.model_names())}")
    g.add_argument("--model_kwargs", default="{}", type=json.loads,
                   help='JSON of TwistNet hyper-parameters, e.g. \'{"r": 4}\'')
    g.add_argument("--init", default="random", choices=("random", "resnet18"),
                   help="resnet18: copy every ResNet-18 ImageNet tensor whose name and shape match "
                        "before training (STCI stays at its gated init)")
    g.add_argument("--resnet18_weights", default=None,
                   help="local timm/torchvision ResNet-18 state_dict for --init resnet18 (else timm's hub)")
    g.add_argument("--transfer_policy", default="all", choices=models.TRANSFER_POLICIES,
                   help="which ResNet-18 tensors --init resnet18 copies")

    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=600, help="length of the cosine schedule")
    g.add_argument("--batch_size", type=int, default=256, help="images per process (per GPU) per micro-step")
    g.add_argument("--accum_steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--base_lr", type=float, default=0.1,
                   help=f"learning rate per {distributed.LR_REFERENCE_BATCH} images; the run uses "
                        f"base_lr x global_batch / {distributed.LR_REFERENCE_BATCH}")
    g.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)  # renamed: a clear error
    g.add_argument("--img_size", type=int, default=224, help="train crop at the end of training and eval crop")
    g.add_argument("--progressive", default="",
                   help="low resolution early: 'SIZE:FRACTION,...', e.g. '128:0.4,192:0.8' trains at 128 "
                        "for the first 40%% of the epochs, at 192 until 80%%, then at --img_size")
    utils.add_recipe_arguments(g, mixup=0.2, ema_decay=0.9998)
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation")

    g = p.add_argument_group("system")
    utils.add_device_arguments(g)   # with torchrun, --device cuda means cuda:LOCAL_RANK in each process
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes (GPU only)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader processes per training process")
    g.add_argument("--prefetch", type=int, default=4, help="batches prefetched per worker")
    g.add_argument("--val_batch_size", type=int, default=None, help="per process (default: --batch_size)")
    g.add_argument("--dist_timeout_min", type=float, default=30, help="collective timeout")

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--checkpoint_dir", default="checkpoints")
    g.add_argument("--resume", default=None,
                   help="a latest.pt to continue from, or 'auto': <checkpoint_dir>/latest.pt if present")
    g.add_argument("--weights_dir", default=str(SCRIPT_DIR / models.WEIGHTS_DIR_NAME),
                   help="where the final <model>_imagenet.pt is copied for downstream auto-detection")
    g.add_argument("--save_every_steps", type=int, default=1000, help="also save latest.pt every N steps (0: off)")
    g.add_argument("--eval_every", type=int, default=1, help="validate every N epochs (and after the last)")
    g.add_argument("--print_freq", type=int, default=100, help="progress line every N optimizer steps")
    g.add_argument("--profile", action="store_true",
                   help="time every step (synchronising the GPU) and report data-wait vs compute, in wall-clock "
                        "and in CPU time of the main process")
    g.add_argument("--profile_warmup", type=int, default=3, help="steps per epoch left out of the profile")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="behave as if interrupted after this many optimizer steps in total (0: never); "
                        "for testing resumption and for fixed-length jobs")
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


class TrainData:
    """Training micro-batches for an epoch, at the epoch's resolution, from a folder or synthetic."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, plan: BatchPlan,
                 num_images: int, num_classes: int, first_set: tuple[int, Any] | None = None) -> None:
        """first_set: (size, dataset) already built at startup, reused instead of scanning again."""
        self.args, self.ctx, self.plan = args, ctx, plan
        self._first_set = first_set
        self.num_images, self.num_classes = num_images, num_classes
        self.steps_per_epoch = num_images // plan.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"The training set has {num_images} images, fewer than one global batch "
                             f"({plan.describe()}). Lower --batch_size or --accum_steps.")
        self.micro_batches = self.steps_per_epoch * plan.accum_steps
        self._loader: DataLoader | None = None
        self._loader_size: int | None = None
        self._sampler: datasets.ShardedEpochSampler | None = None

    def batches(self, epoch: int, skip_steps: int, size: int) -> Iterable:
        skip_micro = skip_steps * self.plan.accum_steps
        if self.args.data == "synthetic":
            return self._synthetic(size, self.micro_batches - skip_micro)
        if self._loader_size != size:
            self._loader = None   # shuts the previous resolution's workers down
            self._loader, self._sampler = self._folder_loader(size)
            self._loader_size = size
        self._sampler.set_epoch(epoch, skip_micro)
        return self._loader

    def _synthetic(self, size: int, count: int) -> SyntheticBatches:
        g = torch.Generator(device=self.ctx.device).manual_seed(self.args.seed + 7919 * self.ctx.rank)
        shape = (self.plan.per_rank, 3, size, size)
        images = torch.randn(shape, generator=g, device=self.ctx.device)
        labels = torch.randint(0, self.num_classes, (self.plan.per_rank,), generator=g, device=self.ctx.device)
        return SyntheticBatches(images, labels, count)

    def _folder_loader(self, size: int) -> tuple[DataLoader, datasets.ShardedEpochSampler]:
        if self._first_set is not None and self._first_set[0] == size:
            train_set = self._first_set[1]
        else:
            train_set, _, _ = load_folder_splits(self.args, size)
        self._first_set = None
        if len(train_set) != self.num_images:
            raise UserError(f"{self.args.data_dir}/train changed during the run: {len(train_set)} images, "
                             f"{self.num_images} before.")
        sampler = datasets.ShardedEpochSampler(len(train_set), self.args.seed, self.ctx.rank, self.ctx.world_size,
                                               self.plan.per_rank, self.micro_batches)
        loader = DataLoader(datasets.SeededSamples(train_set), batch_size=self.plan.per_rank, sampler=sampler,
                            drop_last=True, generator=torch.Generator().manual_seed(self.args.seed),
                            **datasets.loader_options(self.args.workers, self.args.prefetch, self.ctx.device))
        return loader, sampler


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


def load_folder_splits(args: argparse.Namespace, train_size: int) -> tuple[Any, Any, list[str]]:
    """(train set at train_size, val set at --img_size, classes) through datasets.py."""
    train_tf = transforms.build_train_transform(train_size, hflip=args.hflip, randaug_n=args.randaug_n,
                                                randaug_m=args.randaug_m)
    eval_tf = transforms.build_eval_transform(args.img_size)
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
            shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
            self.loader = DataLoader(shard, batch_size=self.batch_size, shuffle=False,
                                     **datasets.loader_options(args.workers, args.prefetch, ctx.device))

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
def build_pretrain_model(args: argparse.Namespace, num_classes: int, ctx: DistContext,
                         console: Callable[[str], None], warm_start: bool) -> nn.Module:
    """The registry model, optionally warm-started from ResNet-18 (rank 0 loads; DDP broadcasts)."""
    model = models.build_model(args.model, num_classes, pretrained=False, verbose=False, **args.model_kwargs)
    if warm_start and args.init == "resnet18" and ctx.is_main:
        source = models.load_resnet18_state_dict(args.resnet18_weights, log=console)
        report = models.transfer_weights(model, source, policy=args.transfer_policy)
        console(report.summary(f"ResNet-18 -> {args.model} (policy '{args.transfer_policy}')"))
    return model


class StepTimes(NamedTuple):
    """Seconds of one optimizer step: waiting for data and the rest, wall clock and process CPU."""
    wait: float
    compute: float
    wait_cpu: float
    compute_cpu: float


@dataclass
class EpochTotals:
    """Running sums of this rank inside the current epoch; checkpointed for a mid-epoch resume."""
    loss_sum: float = 0.0
    seen: int = 0
    skipped: int = 0
    data_wait_s: float = 0.0
    train_time_s: float = 0.0
    start_lr: float | None = None   # lr of the epoch's first step, logged as the epoch's lr

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Pretrainer:
    """Model, optimiser, schedule, scaler, EMA and position in training of one process."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, model: nn.Module,
                 num_classes: int, steps_per_epoch: int, console: Callable[[str], None]) -> None:
        self.args, self.ctx, self.plan, self.console = args, ctx, plan, console
        self.num_classes, self.steps_per_epoch = num_classes, steps_per_epoch
        self.channels_last = utils.resolve_channels_last(args.channels_last, ctx.device)
        model.to(ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.sync_bn and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp = None
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        train_module = self.ddp if self.ddp is not None else model
        self.forward_model = torch.compile(train_module) if args.compile else train_module

        self.lr = plan.effective_lr(args.base_lr)
        self.recipe = utils.build_recipe(model, args, self.lr, steps_per_epoch, num_classes, ctx.device)
        self.amp_dtype, self.ema = self.recipe.amp_dtype, self.recipe.ema

        self.epoch = 0              # epochs completed
        self.step_in_epoch = 0      # optimizer steps done inside the current epoch
        self.global_step = 0
        self.best_acc, self.best_epoch = -1.0, 0
        self.totals = EpochTotals()
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.step_profile: list[StepTimes] = []

    # ---------------------------------------------------------------------------------- state
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain weights for downstream use (EMA weights with --ema), no wrapper prefixes."""
        return {k: v.detach().cpu().clone() for k, v in models.unwrap_model(self.eval_model()).state_dict().items()}

    def checkpoint(self, config: dict) -> dict:
        """Everything to continue exactly. Collective: every rank must call it."""
        self.totals.loss_sum = float(self.loss_sum)
        rank_states = distributed.gather_objects({"rng": utils.rng_state(), "totals": self.totals.as_dict()}, self.ctx)
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), **self.recipe.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best_top1": self.best_acc, "best_epoch": self.best_epoch,
                "world_size": self.ctx.world_size, "global_batch": self.plan.global_batch,
                "steps_per_epoch": self.steps_per_epoch, "rank_states": rank_states, "config": config}

    def restore(self, ckpt: dict) -> None:
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(f"--resume: the checkpoint has {ckpt['steps_per_epoch']} steps per epoch, this "
                             f"run {self.steps_per_epoch}: the training set or the global batch changed.")
        self.model.load_state_dict(ckpt["model"])
        self.recipe.load_state_dict(ckpt)
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.best_acc, self.best_epoch = ckpt["best_top1"], ckpt["best_epoch"]
        states = ckpt["rank_states"]
        if len(states) == self.ctx.world_size:
            utils.set_rng_state(states[self.ctx.rank]["rng"])
            self.totals = EpochTotals(**states[self.ctx.rank]["totals"])
        else:
            # New world size: data order and schedule continue exactly; the per-rank random
            # streams (Mixup/CutMix draws) cannot, so they restart from a fresh seed.
            utils.seed_everything(self.args.seed * 1000 + self.global_step * 7 + self.ctx.rank + 1)
            self.totals = EpochTotals(start_lr=states[0]["totals"]["start_lr"])
            if self.ctx.is_main:   # rank 0 carries the epoch's running sums on
                for key in ("loss_sum", "seen", "skipped", "data_wait_s", "train_time_s"):
                    setattr(self.totals, key, sum(s["totals"][key] for s in states))
        self.loss_sum.fill_(self.totals.loss_sum)

    # ---------------------------------------------------------------------------------- train
    def _prepare(self, images: torch.Tensor, labels: torch.Tensor, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Batch on the device; a wholly unreadable batch becomes a zero-weight dummy.

        Every rank must run forward and backward for DDP's gradient all-reduce, so a rank whose
        whole batch was unreadable still steps, on blank images that contribute nothing.
        """
        n = images.shape[0]
        if n == 0:
            images = torch.zeros((2, 3, size, size))
            labels = torch.zeros(2, dtype=torch.long)
        return (*utils.to_device(images, labels, self.ctx.device, self.channels_last), n)

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor, n: int, sync: bool) -> None:
        recipe, targets = self.recipe, labels
        if recipe.mixup is not None:
            images, targets = recipe.mixup(images, labels)
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with utils.autocast(self.ctx.device, self.amp_dtype):
                loss = recipe.criterion(self.forward_model(images), targets)
            weight = (1.0 if n else 0.0) / self.plan.accum_steps
            recipe.scaler.scale(loss * weight).backward()
        self.loss_sum += loss.detach().double() * n

    def current_lr(self) -> float:
        return self.recipe.optimizer.param_groups[0]["lr"]

    def _check_finite(self) -> None:
        if not math.isfinite(float(self.loss_sum)):
            raise UserError(f"the training loss is not finite at epoch {self.epoch + 1}, step "
                            f"{self.step_in_epoch}: lower --base_lr, or use --amp bf16 / --amp off")

    def train_epoch(self, batches: Iterable, size: int, stop: utils.StopFlag,
                    save_latest: Callable[[], None]) -> bool:
        """Train to the end of the epoch (True) or until a stop is agreed (False)."""
        self.model.train()
        t = self.totals
        if t.start_lr is None:
            t.start_lr = self.current_lr()
        started = time.perf_counter() - t.train_time_s
        self.step_profile = []
        stream = iter(batches)
        accum = self.plan.accum_steps
        while self.step_in_epoch < self.steps_per_epoch:
            limit = self.args.stop_after_steps
            if distributed.all_agree_to_stop(stop.requested or (limit > 0 and self.global_step >= limit), self.ctx):
                t.train_time_s = time.perf_counter() - started
                return False
            step_wait = step_wait_cpu = 0.0
            step_start, step_start_cpu = time.perf_counter(), time.process_time()
            for micro in range(accum):
                fetch, fetch_cpu = time.perf_counter(), time.process_time()
                images, labels, skipped = next(stream)
                step_wait += time.perf_counter() - fetch
                step_wait_cpu += time.process_time() - fetch_cpu
                t.skipped += int(skipped)
                images, labels, n = self._prepare(images, labels, size)
                self._micro_step(images, labels, n, sync=micro == accum - 1)
                t.seen += n
            self.recipe.step(self.model, self.args.clip_grad)
            if self.args.profile:
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize(self.ctx.device)
                self.step_profile.append(StepTimes(
                    step_wait, time.perf_counter() - step_start - step_wait,
                    step_wait_cpu, time.process_time() - step_start_cpu - step_wait_cpu))
            t.data_wait_s += step_wait
            self.step_in_epoch += 1
            self.global_step += 1
            t.train_time_s = time.perf_counter() - started
            if self.args.print_freq and self.step_in_epoch % self.args.print_freq == 0:
                self._check_finite()
                self.console(self._progress_line())
            if self.args.save_every_steps and self.global_step % self.args.save_every_steps == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                save_latest()
        self._check_finite()
        return True

    def _progress_line(self) -> str:
        t = self.totals
        loss = float(self.loss_sum) / max(1, t.seen)
        rate = t.seen * self.ctx.world_size / max(t.train_time_s, 1e-9)
        wait = 100 * t.data_wait_s / max(t.train_time_s, 1e-9)
        return (f"  epoch {self.epoch + 1}/{self.args.epochs} step {self.step_in_epoch}/{self.steps_per_epoch} "
                f"| loss {loss:.4f} | lr {self.current_lr():.4g} | {rate:.1f} img/s | data wait {wait:.0f}%")

    def finish_epoch_totals(self) -> dict:
        """All-reduced statistics of the epoch just trained; resets the running sums."""
        t = self.totals
        loss_sum, seen, skipped = distributed.all_reduce_sum([float(self.loss_sum), t.seen, t.skipped], self.ctx)
        stats = dict(lr=t.start_lr, train_loss=loss_sum / max(1.0, seen), train_images=int(seen),
                     skipped_images=int(skipped),
                     train_time_s=t.train_time_s, images_per_s=seen / max(t.train_time_s, 1e-9),
                     data_wait_share=t.data_wait_s / max(t.train_time_s, 1e-9))
        self.totals = EpochTotals()
        self.loss_sum.zero_()
        self.step_in_epoch = 0
        return stats

    def profile_summary(self) -> dict | None:
        steps = self.step_profile[self.args.profile_warmup:]
        if not steps:
            return None
        wait = sum(s.wait for s in steps)
        total = wait + sum(s.compute for s in steps)
        per_step = {f"{name}_ms": 1000 * statistics.mean(getattr(s, name) for s in steps)
                    for name in StepTimes._fields}
        return dict(steps=len(steps), data_wait_ms=per_step["wait_ms"], compute_ms=per_step["compute_ms"],
                    data_wait_cpu_ms=per_step["wait_cpu_ms"], compute_cpu_ms=per_step["compute_cpu_ms"],
                    data_wait_share=wait / max(total, 1e-9),
                    images_per_s=len(steps) * self.plan.global_batch / max(total, 1e-9))

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
def resolve_resume_path(args: argparse.Namespace, explicit: set[str]) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run (never silently overwriting one)."""
    if args.resume and args.resume != "auto" and "checkpoint_dir" not in explicit:
        args.checkpoint_dir = str(Path(args.resume).parent)
    latest = Path(args.checkpoint_dir) / "latest.pt"
    if args.resume == "auto":
        return latest if latest.is_file() else None
    if args.resume:
        path = Path(args.resume)
        if not path.is_file():
            raise UserError(f"--resume {path}: no such file. On several machines the checkpoint directory "
                            f"must be on a filesystem every node sees.")
        return path
    if latest.is_file():
        raise UserError(f"{latest} exists: pass --resume {latest} (or --resume auto) to continue that run, "
                        f"or choose another --checkpoint_dir.")
    return None


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
    utils.check_recipe_arguments(args)
    if args.batch_size < 2 and not (args.sync_bn and ctx.world_size > 1):
        raise UserError(f"--batch_size {args.batch_size} per process cannot train: BatchNorm needs at least 2 "
                        f"images per batch for its batch statistics (Mixup/CutMix also pair images). Use 2 or more.")


def header_record(args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, trainer: Pretrainer,
                  train_data: TrainData, val_data: ValData, kind: str) -> dict:
    params = models.count_params(trainer.model)
    stci = model_tools.stci_param_count(trainer.model)
    return {
        "type": kind, "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "argv": sys.argv[1:],
        "launcher": {k: os.environ[k] for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR")
                     if k in os.environ},
        "git_commit": utils.git_commit(), "versions": utils.library_versions(),
        "world_size": ctx.world_size, "device": str(ctx.device), "backend": ctx.backend,
        "amp": utils.amp_label(trainer.amp_dtype),
        "per_process_batch": plan.per_rank, "accum_steps": plan.accum_steps, "global_batch": plan.global_batch,
        "base_lr": args.base_lr, "lr": trainer.lr, "steps_per_epoch": trainer.steps_per_epoch,
        "train_images": train_data.num_images, "val_images": val_data.total, "num_classes": train_data.num_classes,
        "model": args.model, "params": params, "stci_params": stci, "stci_share": stci / params,
        "config": vars(args),
    }


def epoch_line(r: dict, epochs: int) -> str:
    eta = datetime.timedelta(seconds=int(r["eta_s"]))
    val = (f" | val top-1 {r['val_acc']:.2f}% top-5 {r['val_top5']:.2f}% ({r['val_images']} images)"
           if "val_acc" in r else "")
    unreadable = r["skipped_images"] + r.get("val_skipped", 0)
    skipped = f" | skipped {r['skipped_images']}+{r.get('val_skipped', 0)} unreadable" if unreadable else ""
    return (f"epoch {r['epoch']}/{epochs} | {r['img_size']}px | lr {r['lr']:.4g} | train loss {r['train_loss']:.4f}"
            f"{val} | {r['images_per_s']:.1f} img/s, data wait {100 * r['data_wait_share']:.0f}% | "
            f"{r['epoch_time_s']:.1f}s, ETA {eta}{skipped}")


def profile_line(p: dict, epoch: int, warmup: int) -> str:
    return (f"[profile] epoch {epoch}: {p['steps']} steps (first {warmup} left out) | data wait "
            f"{p['data_wait_ms']:.1f} ms/step, compute {p['compute_ms']:.1f} ms/step | data-wait share "
            f"{100 * p['data_wait_share']:.1f}% | {p['images_per_s']:.1f} img/s (all processes) | CPU time of "
            f"the main process: data {p['data_wait_cpu_ms']:.1f} ms/step, compute {p['compute_cpu_ms']:.1f} ms/step")


def export_final_weights(trainer: Pretrainer, args: argparse.Namespace, ckpt_dir: Path,
                         console: Callable[[str], None]) -> None:
    state = trainer.export_state_dict()
    name = f"{args.model}_imagenet.pt"
    final = ckpt_dir / name
    utils.atomic_save(state, final)
    if args.data == "synthetic":
        # Weights fitted to random tensors must never be auto-detected as ImageNet weights.
        console(f"Final weights: {final} (--data synthetic: not copied to {args.weights_dir})")
        return
    weights_dir = Path(args.weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    utils.atomic_save(state, weights_dir / name)
    console(f"Final weights{' (EMA)' if trainer.ema is not None else ''}: {final}\n"
            f"Copied to {weights_dir / name}: `train.py --pretrained` finds weights/{name} in the current "
            f"directory or beside models.py.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    explicit = utils.explicit_flags(build_parser(), argv)
    if "lr" in explicit:
        raise UserError(f"--lr was renamed --base_lr in pretraining: the learning rate per "
                        f"{distributed.LR_REFERENCE_BATCH} images, scaled by the global batch (use --base_lr "
                        f"{args.lr:g} for what --lr {args.lr:g} meant; on a resume, leave it out).")
    ctx = distributed.init_distributed(args.device, args.dist_timeout_min)
    try:
        return run(args, explicit, ctx)
    finally:
        distributed.close_distributed(ctx)


def read_resume_checkpoint(path: Path) -> dict:
    return rundirs.read_checkpoint(
        path, rundirs.PRETRAIN_LATEST,
        "--resume takes the latest.pt that pretrain_imagenet.py wrote into its --checkpoint_dir. To start "
        "pretraining from weights instead, use --init resnet18 (--resnet18_weights FILE); to fine-tune "
        "weights, use train.py --pretrained FILE.")


@contextlib.contextmanager
def checkpoint_dir_lock(ckpt_dir: Path, ctx: DistContext) -> Iterator[rundirs.RunLock | None]:
    """Rank 0 holds the checkpoint directory's run.lock for the whole run, so that two jobs never
    write one directory; every rank learns whether it got it and all stop together if not."""
    lock, error = None, None
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = rundirs.RunLock(ckpt_dir).acquire()
        except rundirs.RunLockedError as locked:
            error = locked
    if distributed.all_agree_to_stop(error is not None, ctx):
        if error is not None:
            raise error
        raise SystemExit(rundirs.EXIT_LOCKED)   # rank 0 says why, once
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def run(args: argparse.Namespace, explicit: set[str], ctx: DistContext) -> int:
    resume_path = resolve_resume_path(args, explicit)
    ckpt = None
    if resume_path is not None:
        ckpt = read_resume_checkpoint(resume_path)
        args = distributed.merge_resume_config(args, explicit, saved_config(ckpt), RESUME_SAFE_KEYS, PER_LAUNCH_KEYS)
        plan = distributed.plan_for_resume(ckpt["global_batch"], args.batch_size, ctx.world_size,
                                     args.accum_steps if "accum_steps" in explicit else None)
        args.accum_steps = plan.accum_steps
    else:
        plan = BatchPlan(args.batch_size, ctx.world_size, args.accum_steps)
    validate_args(args, ctx)
    phases = utils.parse_progressive(args.progressive, args.img_size)
    with checkpoint_dir_lock(Path(args.checkpoint_dir), ctx) as lock:
        return train_run(args, ctx, plan, phases, ckpt, resume_path, lock)


def train_run(args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, phases: list[tuple[float, int]],
              ckpt: dict | None, resume_path: Path | None, lock: rundirs.RunLock | None) -> int:
    """Pretrain (or resume); rank 0 holds the checkpoint directory's lock."""
    utils.configure_kernels(args.deterministic, ctx.device)
    ckpt_dir = Path(args.checkpoint_dir)
    console = utils.Console(ckpt_dir / "train.log", enabled=ctx.is_main)

    # Identical initial weights on every rank; afterwards each rank draws its own Mixup stream.
    utils.seed_everything(args.seed)
    train_data, val_data = load_data(args, ctx, plan, phases, start_epoch=ckpt["epoch"] if ckpt else 0)
    model = build_pretrain_model(args, train_data.num_classes, ctx, console, warm_start=ckpt is None)
    trainer = Pretrainer(args, ctx, plan, model, train_data.num_classes, train_data.steps_per_epoch, console)
    utils.seed_everything(args.seed * 1000 + ctx.rank + 1)
    if ckpt is not None:
        resume_trainer(trainer, ckpt, resume_path, train_data, val_data, ckpt_dir / "log.jsonl")
        del ckpt
    elif ctx.is_main:
        header = header_record(args, ctx, plan, trainer, train_data, val_data, kind="header")
        utils.write_jsonl(ckpt_dir / "log.jsonl", [header])
    console(start_line(trainer, train_data, val_data))
    for note in utils.speed_notes(ctx.device, trainer.amp_dtype, args.compile):
        console(note)

    # A terminal Ctrl-C reaches each torchrun worker twice: a second signal within 2 s is that echo.
    with utils.StopFlag(grace_s=2.0) as stop:
        if not train_epochs(trainer, train_data, val_data, phases, ckpt_dir, stop, lock):
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
    size = utils.train_size_for_epoch(start_epoch, args.epochs, phases, args.img_size)
    train_set, val_set, classes = load_folder_splits(args, size)
    return (TrainData(args, ctx, plan, len(train_set), len(classes), first_set=(size, train_set)),
            ValData(args, ctx, val_set, len(classes)))


def resume_trainer(trainer: Pretrainer, ckpt: dict, path: Path, train_data: TrainData, val_data: ValData,
                   log_path: Path) -> None:
    ctx, console = trainer.ctx, trainer.console
    if ckpt["world_size"] != ctx.world_size:
        console(f"[resume] world size {ckpt['world_size']} -> {ctx.world_size}: keeping the global batch "
                f"({trainer.plan.describe()}); data order and lr schedule continue exactly, per-process random "
                f"streams and BatchNorm statistics differ, so the run is equivalent but not bitwise identical.")
    trainer.restore(ckpt)
    if ctx.is_main:
        distributed.truncate_log(log_path, trainer.epoch)
        utils.append_jsonl(log_path, header_record(trainer.args, ctx, trainer.plan, trainer, train_data, val_data,
                                                   kind="resume"))
    console(f"Resumed from {path}: epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}/"
            f"{trainer.steps_per_epoch} (best val top-1 so far {trainer.best_acc:.2f}%)")


def start_line(trainer: Pretrainer, train_data: TrainData, val_data: ValData) -> str:
    args, params = trainer.args, models.count_params(trainer.model)
    return (f"{args.model}: {params / 1e6:.2f}M params (STCI {100 * model_tools.stci_param_count(trainer.model) / params:.2f}%)"
            f" | {train_data.num_classes} classes | {train_data.num_images} train / {val_data.total} val images | "
            f"{trainer.plan.describe()} | lr {trainer.lr:.4g} ({args.base_lr} per {distributed.LR_REFERENCE_BATCH}) | "
            f"{trainer.steps_per_epoch} steps/epoch | {trainer.ctx.device} amp {utils.amp_label(trainer.amp_dtype)} | "
            f"{trainer.ctx.world_size} process(es)")


def train_epochs(trainer: Pretrainer, train_data: TrainData, val_data: ValData,
                 phases: list[tuple[float, int]], ckpt_dir: Path, stop: utils.StopFlag,
                 lock: rundirs.RunLock | None) -> bool:
    """Train the remaining epochs, validating, logging and checkpointing; False if stopped early."""
    args, ctx, console = trainer.args, trainer.ctx, trainer.console

    def save_latest() -> None:
        state = trainer.checkpoint(vars(args))
        if lock is not None:
            lock.check()
        if ctx.is_main:
            utils.atomic_save(state, ckpt_dir / "latest.pt")

    epoch_times: list[float] = []
    while trainer.epoch < args.epochs:
        size = utils.train_size_for_epoch(trainer.epoch, args.epochs, phases, args.img_size)
        start = time.perf_counter()
        batches = train_data.batches(trainer.epoch, trainer.step_in_epoch, size)
        if not trainer.train_epoch(batches, size, stop, save_latest):
            save_latest()
            return False
        profile = trainer.profile_summary() if args.profile else None
        record = {"type": "epoch", "epoch": trainer.epoch + 1, "img_size": size, **trainer.finish_epoch_totals()}
        trainer.epoch += 1
        if trainer.epoch % args.eval_every == 0 or trainer.epoch == args.epochs:
            record.update(validate_and_keep_best(trainer, val_data, ckpt_dir))
        epoch_times.append(time.perf_counter() - start)
        record.update(epoch_time_s=epoch_times[-1], eta_s=statistics.mean(epoch_times) * (args.epochs - trainer.epoch),
                      best_val_acc=trainer.best_acc, gates=model_tools.gate_values(trainer.model))
        if profile:
            record["profile"] = profile
            console(profile_line(profile, trainer.epoch, args.profile_warmup))
        # The record goes first: a crash between the two leaves the log ahead of latest.pt,
        # and resuming truncates it; the other order could lose the epoch's record.
        if ctx.is_main:
            utils.append_jsonl(ckpt_dir / "log.jsonl", record)
        save_latest()
        console(epoch_line(record, args.epochs))
    return True


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
