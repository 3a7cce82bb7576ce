"""What the two pretraining scripts (pretrain_imagenet.py, pretrain_spark.py) share: torch.distributed,
the global batch, starting or resuming a run, the sharded data order, the training loop with its
agreed stops, the log records and the weight export.

Usage:
    ctx = distributed.init_distributed("auto", timeout_min=30)   # torchrun's env, or a world of 1
    plan = distributed.BatchPlan(per_rank=128, world_size=ctx.world_size, accum_steps=1)
    lr = plan.effective_lr(base_lr)                                # base_lr is per 256 images
    ...
    distributed.close_distributed(ctx)

    class MyTrainer(distributed.Pretrainer):                      # a script's trainer
        def loss(self, images, labels, micro): ...                 # under autocast
    distributed.train_epochs(trainer, data, phases, ckpt_dir, stop, epoch_end, epoch_line)

A plain `python` launch is rank 0 of a world of 1, so the same code runs on a laptop. NCCL joins
GPUs, gloo CPUs.

Resuming a pretraining run (docs/TRAINING.md "Resuming"): the run takes days and moves between machines, so
its recipe comes from the checkpoint, and the new command may change only where things are and
how fast they run (device, workers, the per-process batch with the same global batch). The
images must be the same ones (latest.pt records which: image_set), wherever they now are.
A fine-tuning run (train.py) is stricter: it is one cell of a table, so its command must not
change at all between an interruption and its resumption.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import datasets
import models
from helpers import dali, launchers, loading, model_tools, recipes, rundirs, utils
from helpers.errors import EXIT_USAGE
from helpers.utils import UserError

LR_REFERENCE_BATCH = 256
# May differ between an interrupted run and its resumption, in both scripts: where things are,
# how fast they go, how much is printed. Everything else is the recipe and must match the checkpoint.
RESUME_SAFE_KEYS = frozenset({
    "data_dir", "workers", "prefetch", "checkpoint_dir", "weights_dir", "device", "amp", "channels_last",
    "print_freq", "save_every_steps", "profile", "profile_warmup", "batch_size", "accum_steps",
    "dist_timeout_min", "resume", "stop_after_steps", "deterministic", "tensorboard", "loader",
})
# Where pretrain_imagenet.py copies its final weights: the folder models.py auto-detects them in.
DEFAULT_WEIGHTS_DIR = str(Path(__file__).resolve().parents[1] / models.WEIGHTS_DIR_NAME)
# Never inherited from the checkpoint: they describe this launch only.
PER_LAUNCH_KEYS = frozenset({"resume", "stop_after_steps", "checkpoint_dir"})


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. A plain `python` launch is rank 0 of a world of 1."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    cpu_group: Any = None     # gloo group for small host-side agreements when the backend is NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_flag: str, timeout_min: float) -> DistContext:
    """Join the torchrun job, or the srun job of several tasks (SLURM_* variables, launchers.slurm_world),
    if there is one: NCCL between GPUs, gloo on CPU."""
    slurm = None if "WORLD_SIZE" in os.environ else launchers.slurm_world(os.environ)
    world = slurm.world_size if slurm else int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = slurm.local_rank if slurm else int(os.environ.get("LOCAL_RANK", "0"))
    device = utils.resolve_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None or world > 1 else device.index)
        torch.cuda.set_device(device)
    if world == 1:
        return DistContext(0, 0, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"device_id": device} if backend == "nccl" else {}
    if slurm:
        extra.update(init_method=f"tcp://{slurm.master_addr}:{slurm.master_port}", rank=slurm.rank,
                     world_size=slurm.world_size)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **extra)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), device, backend, cpu_group)


def close_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def run_in_job(run: Callable[[argparse.Namespace, set[str], DistContext], int], args: argparse.Namespace,
               explicit: set[str]) -> int:
    """run(args, explicit, ctx) as one process of the torchrun job (or a world of 1), leaving the group after."""
    ctx = init_distributed(args.device, args.dist_timeout_min)
    try:
        return run(args, explicit, ctx)
    finally:
        close_distributed(ctx)


def all_agree_to_stop(requested: bool, ctx: DistContext) -> bool:
    """True on every rank as soon as one rank was asked to stop, so all stop at the same step."""
    if not ctx.distributed:
        return requested
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return bool(flag.item())


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    totals = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(totals)
    return totals.tolist()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's BatchNorm statistics, so that all ranks validate the same model."""
    if ctx.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split over processes and micro-steps."""
    per_rank: int
    world_size: int
    accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world_size * self.accum_steps

    def effective_lr(self, lr_per_256: float) -> float:
        return lr_per_256 * self.global_batch / LR_REFERENCE_BATCH

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_rank} per process x {self.world_size} "
                f"processes x {self.accum_steps} accumulation steps")


def plan_for_resume(saved_global: int, per_rank: int, world: int, accum: int | None) -> BatchPlan:
    """Keep the checkpoint's global batch in a new world size by changing accum_steps.

    A global batch that cannot be kept is refused: the lr, the schedule length and the data
    order all depend on it, so silently changing it would make a different run.
    """
    if accum is not None:
        plan = BatchPlan(per_rank, world, accum)
        if plan.global_batch != saved_global:
            raise UserError(f"--resume: {plan.describe()} differs from the checkpoint's global batch "
                            f"{saved_global}. Drop --accum_steps to have it chosen, or pick values whose "
                            f"product is {saved_global}.")
        return plan
    if saved_global % (per_rank * world) == 0:
        return BatchPlan(per_rank, world, saved_global // (per_rank * world))
    fits = [b for b in range(1, saved_global // world + 1) if saved_global % (b * world) == 0]
    raise UserError(
        f"--resume: the checkpoint was trained with global batch {saved_global}; with {world} processes "
        f"and --batch_size {per_rank} no whole number of accumulation steps keeps it. Per-process "
        f"batch sizes that do: {', '.join(map(str, fits[-6:]))} (pass one as --batch_size), or resume "
        f"with the original number of processes.")


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
def merge_resume_config(args: argparse.Namespace, explicit: set[str], saved: Mapping[str, Any],
                        safe_keys: Iterable[str], per_launch_keys: Iterable[str]) -> argparse.Namespace:
    """A pretraining checkpoint's recipe, with this launch's explicit location/speed options on top.

    An explicit option outside `safe_keys` that differs from the checkpoint is refused: it would
    silently make another run. `per_launch_keys` always come from this launch.
    """
    safe = set(safe_keys)
    diff = utils.config_differences(saved, vars(args), sorted(k for k in explicit if k not in safe and k in saved))
    if diff:
        raise UserError(f"--resume: the checkpoint was trained with other settings ({diff}). Resume with "
                        f"the original recipe, or start a new run in another --checkpoint_dir.")
    merged = {**vars(args), **saved}
    for key in explicit | set(per_launch_keys):
        merged[key] = getattr(args, key)
    return argparse.Namespace(**merged)


def truncate_log(path: str | os.PathLike, completed_epochs: int) -> None:
    """Drop epoch records written after the checkpoint (they will be written again)."""
    utils.write_jsonl(path, [r for r in utils.read_jsonl(path) if r.get("type") != "epoch" or r["epoch"] <= completed_epochs])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def pretrain_parser(doc: str, base_lr: float, weights_file: str, checkpoint_dir: str, resume: str | None,
                    resume_help: str, print_freq: int, weights_dir: str | None = DEFAULT_WEIGHTS_DIR,
                    weights_help: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """A pretraining script's parser and its groups ("data", "model", "recipe", "system",
    "checkpoints and logs"), holding the options both scripts share, with one meaning: the batch
    and learning rate, decoding, TwistNet hyper-parameters, devices and processes, checkpoints,
    logs and profiling. The script adds its own options to the groups. weights_dir / weights_help:
    the default and help of --weights_dir (None: no copy unless given)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in ("data", "model", "recipe", "system", "checkpoints and logs")}
    groups["data"].add_argument(
        "--decode_size", type=int, default=None,
        help="shorter side images are resized to when decoded (JPEGs over twice that size are decoded at "
             "reduced DCT scale, PIL draft); default: the eval resize size (256 for --img_size 224); 0: full "
             "resolution (slower; crops from the originals)")
    dali.add_loader_argument(groups["data"])
    g = groups["model"]
    g.add_argument("--model_kwargs", default="{}", type=json.loads,
                   help='JSON of TwistNet hyper-parameters, e.g. \'{"r": 4}\'')
    g.add_argument("--init", default="random", choices=("random", "resnet18"),
                   help="resnet18: copy every ResNet-18 ImageNet tensor whose name and shape match "
                        "before training (STCI stays at its gated init)")
    g.add_argument("--resnet18_weights", default=None,
                   help="local timm/torchvision ResNet-18 state_dict for --init resnet18 (else timm's hub)")
    g.add_argument("--transfer_policy", default="all", choices=models.TRANSFER_POLICIES,
                   help="which ResNet-18 tensors --init resnet18 copies")
    g = groups["recipe"]
    g.add_argument("--batch_size", type=int, default=256, help="images per process (per GPU) per micro-step")
    g.add_argument("--accum_steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--base_lr", type=float, default=base_lr,
                   help=f"learning rate per {LR_REFERENCE_BATCH} images; the run uses "
                        f"base_lr x global_batch / {LR_REFERENCE_BATCH}")
    g = groups["system"]
    utils.add_device_arguments(g)   # with torchrun, --device cuda means cuda:LOCAL_RANK in each process
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader processes per training process")
    g.add_argument("--prefetch", type=int, default=4, help="batches prefetched per worker")
    g.add_argument("--dist_timeout_min", type=float, default=30, help="collective timeout")
    g = groups["checkpoints and logs"]
    g.add_argument("--checkpoint_dir", default=checkpoint_dir)
    g.add_argument("--resume", default=resume, help=resume_help)
    g.add_argument("--weights_dir", default=weights_dir,
                   help=weights_help or f"where the final {weights_file} is copied for downstream auto-detection")
    g.add_argument("--save_every_steps", type=int, default=1000, help="also save latest.pt every N steps (0: off)")
    g.add_argument("--print_freq", type=int, default=print_freq, help="progress line every N optimizer steps (0: off)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to <checkpoint_dir>/tensorboard")
    g.add_argument("--profile", action="store_true",
                   help="time every step (synchronising the GPU) and report data-wait vs compute, in wall-clock "
                        "and in CPU time of the main process")
    g.add_argument("--profile_warmup", type=int, default=3, help="steps per epoch left out of the profile")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="behave as if interrupted after this many optimizer steps in total (0: never); "
                        "for testing resumption and for fixed-length jobs")
    return p, groups


# --------------------------------------------------------------------------------------------
# Starting or resuming a run
# --------------------------------------------------------------------------------------------
def resolve_resume_path(args: argparse.Namespace, explicit: set[str]) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run (never silently overwriting one).

    --resume PATH continues PATH (and the checkpoint directory is PATH's folder unless given);
    --resume auto continues <checkpoint_dir>/latest.pt if it exists; without --resume an existing
    latest.pt is an error.
    """
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


@dataclasses.dataclass
class RunStart:
    """Where a launch starts: the arguments in force (the checkpoint's recipe on a resume), the
    checkpoint and its path (None for a fresh run), and the batch plan."""
    args: argparse.Namespace
    ckpt: dict | None
    path: Path | None
    plan: BatchPlan


def start_or_resume(args: argparse.Namespace, explicit: set[str], ctx: DistContext, kind: str,
                    safe_keys: Iterable[str], per_launch_keys: Iterable[str],
                    read_config: Callable[[dict], dict] = lambda ckpt: dict(ckpt["config"])) -> RunStart:
    """Load the checkpoint to resume, if any, and merge its recipe with this launch's options.

    `kind` names the script's checkpoints ("imagenet", "spark"): a checkpoint of the other script
    is refused (checkpoints from before kinds were recorded count as "imagenet").
    """
    path = resolve_resume_path(args, explicit)
    if path is None:
        return RunStart(args, None, None, BatchPlan(args.batch_size, ctx.world_size, args.accum_steps))
    ckpt = rundirs.read_checkpoint(
        path, rundirs.PRETRAIN_LATEST,
        f"--resume takes the latest.pt that pretrain_{kind}.py wrote into its --checkpoint_dir. To start "
        f"pretraining from weights instead, use --init resnet18 (--resnet18_weights FILE); to fine-tune "
        f"weights, use train.py --pretrained FILE.")
    found = ckpt.get("kind", "imagenet") if isinstance(ckpt, dict) else None
    if found != kind:
        raise UserError(f"{path} is not a pretrain_{kind}.py checkpoint ({f'a {found} one' if found else 'no kind'}): "
                        f"resume it with pretrain_{found}.py, or use another --checkpoint_dir.")
    args = merge_resume_config(args, explicit, read_config(ckpt), safe_keys, per_launch_keys)
    plan = plan_for_resume(ckpt["global_batch"], args.batch_size, ctx.world_size,
                           args.accum_steps if "accum_steps" in explicit else None)
    args.accum_steps = plan.accum_steps
    return RunStart(args, ckpt, path, plan)


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
        stale = utils.remove_stale_temp_files(ckpt_dir, rundirs.WRITTEN_UNLOCKED) if lock is not None else None
        if stale:
            print(stale, flush=True)
    if all_agree_to_stop(error is not None, ctx):
        if error is not None:
            raise error
        raise SystemExit(rundirs.EXIT_LOCKED)   # rank 0 says why, once
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def build_model(args: argparse.Namespace, num_classes: int, ctx: DistContext, console: Callable[[str], None],
                warm_start: bool) -> nn.Module:
    """The registry model (--model, --model_kwargs), warm-started from ResNet-18 with --init resnet18
    on a fresh run (rank 0 loads; DDP broadcasts its weights to the other ranks)."""
    model = models.build_model(args.model, num_classes, pretrained=False, verbose=False,
                               **model_tools.model_kwargs_of(vars(args)))
    if warm_start and args.init == "resnet18" and ctx.is_main:
        source = models.load_resnet18_state_dict(args.resnet18_weights, log=console)
        report = models.transfer_weights(model, source, policy=args.transfer_policy)
        console(report.summary(f"ResNet-18 -> {args.model} (policy '{args.transfer_policy}')"))
    return model


# --------------------------------------------------------------------------------------------
# Training data: the epoch order, sharded over the processes
# --------------------------------------------------------------------------------------------
class EpochBatches:
    """The training micro-batches of an epoch, from a dataset built for each resolution.

    The order is a function of (seed, epoch) and each image's augmentation is seeded by its
    position in it (loading.ShardedEpochSampler, SeededSamples), so an epoch can be resumed from
    any step, and an optimizer step sees the same images whatever the number of processes.
    Items are (images, labels, unreadable_count) from loading.collate_skip_unreadable, or the same
    from a dali.DaliLoader (the same order and sharding; see helpers/dali.py for its augmentation).
    """

    def __init__(self, build: Callable[[int], Dataset], num_images: int, plan: BatchPlan, ctx: DistContext,
                 seed: int, workers: int, prefetch: int, where: str,
                 first_set: tuple[int, Dataset] | None = None,
                 dali_augment: Callable[[int], dali.TrainAugment] | None = None) -> None:
        """build(size) -> the dataset at that resolution; where: what to name if it changes size;
        first_set: (size, dataset) already built at startup, reused instead of building it again;
        dali_augment(size): the augmentation at that size when the batches come from DALI (--loader dali)."""
        self.build, self.plan, self.ctx, self.seed = build, plan, ctx, seed
        self.dali_augment = dali_augment
        self.workers, self.prefetch, self.where = workers, prefetch, where
        self.num_images = num_images
        self.steps_per_epoch = num_images // plan.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"The training set has {num_images} images, fewer than one global batch "
                            f"({plan.describe()}). Lower --batch_size or --accum_steps.")
        self.micro_batches = self.steps_per_epoch * plan.accum_steps
        self._first_set = first_set
        self._loader: Iterable | None = None
        self._loader_size: int | None = None
        self._sampler: loading.ShardedEpochSampler | None = None

    def batches(self, epoch: int, skip_steps: int, size: int) -> Iterable:
        if self._loader_size != size:
            self._loader = None   # shuts the previous resolution's workers down
            self._loader, self._sampler = self._make_loader(size)
            self._loader_size = size
        self._sampler.set_epoch(epoch, skip_steps * self.plan.accum_steps)
        return self._loader

    def _make_loader(self, size: int) -> tuple[Iterable, loading.ShardedEpochSampler]:
        if self._first_set is not None and self._first_set[0] == size:
            dataset = self._first_set[1]
        else:
            dataset = self.build(size)
        self._first_set = None
        if len(dataset) != self.num_images:
            raise UserError(f"{self.where} changed during the run: {len(dataset)} images, {self.num_images} before.")
        sampler = loading.ShardedEpochSampler(len(dataset), self.seed, self.ctx.rank, self.ctx.world_size,
                                               self.plan.per_rank, self.micro_batches)
        if self.dali_augment is not None:
            return dali.DaliLoader(dataset, self.plan.per_rank, self.ctx.device, self.workers, size,
                                   augment=self.dali_augment(size), sampler=sampler, drop_last=True), sampler
        loader = DataLoader(loading.SeededSamples(dataset), batch_size=self.plan.per_rank, sampler=sampler,
                            drop_last=True, generator=torch.Generator().manual_seed(self.seed),
                            **loading.loader_options(self.workers, self.prefetch, self.ctx.device))
        return loader, sampler


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class StepTimes(NamedTuple):
    """Seconds of one optimizer step: waiting for data and the rest, wall clock and process CPU."""
    wait: float
    compute: float
    wait_cpu: float
    compute_cpu: float


@dataclasses.dataclass
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


CHECKPOINT_FORMAT = 1
# The loss is read back from the device (a sync) for the progress bar only this often.
BAR_LOSS_EVERY = 25


class Pretrainer:
    """What the pretraining trainers share: the model on its device (under DDP when distributed),
    the recipe (optimizer, per-step schedule, AMP scaler: `self.recipe`, set by the subclass), the
    position in training, the epoch's running sums, and the step loop, which stops every process
    at the same step.

    A subclass defines loss(images, labels, micro) (called under autocast; micro is the index of
    the micro-step within the optimizer step) and may override optimizer_step, extra_state and
    restore_extra. `backbone` is the registry model (for the gates in the log).
    """
    kind = ""   # the script's checkpoints: "imagenet" or "spark"

    def __init__(self, args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, model: nn.Module,
                 steps_per_epoch: int, console: Callable[[str], None]) -> None:
        self.args, self.ctx, self.plan, self.console = args, ctx, plan, console
        self.steps_per_epoch = steps_per_epoch
        self.channels_last = utils.resolve_channels_last(args.channels_last, ctx.device)
        model.to(ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.backbone: nn.Module = model
        self.ddp = None
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.forward_model = self.ddp if self.ddp is not None else model
        self.lr = plan.effective_lr(args.base_lr)
        self.recipe: recipes.Recipe
        self.amp_dtype: torch.dtype | None = None

        self.epoch = 0              # epochs completed
        self.step_in_epoch = 0      # optimizer steps done inside the current epoch
        self.global_step = 0
        self.totals = EpochTotals()
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.step_profile: list[StepTimes] = []
        # Which images the run reads (image_set(); rank 0 only, None for synthetic data): saved in
        # latest.pt, so that a resume on another image set is refused.
        self.images: dict | None = None

    # ---------------------------------------------------------------------------------- hooks
    def loss(self, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        self.recipe.step(self.model, self.args.clip_grad)

    def extra_state(self) -> dict:
        return {}

    def restore_extra(self, ckpt: dict) -> None:
        pass

    # ---------------------------------------------------------------------------------- state
    def checkpoint(self, config: dict) -> dict:
        """Everything to continue exactly. Collective: every rank must call it."""
        self.totals.loss_sum = float(self.loss_sum)
        rank_states = gather_objects({"rng": utils.rng_state(), "totals": self.totals.as_dict()}, self.ctx)
        return {"format": CHECKPOINT_FORMAT, "kind": self.kind, "model": self.model.state_dict(),
                **self.recipe.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "world_size": self.ctx.world_size,
                "global_batch": self.plan.global_batch, "steps_per_epoch": self.steps_per_epoch,
                "rank_states": rank_states, "config": config, "images": self.images, **self.extra_state()}

    def restore(self, ckpt: dict) -> None:
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(f"--resume: the checkpoint has {ckpt['steps_per_epoch']} steps per epoch, this "
                            f"run {self.steps_per_epoch}: the training set or the global batch changed.")
        self.model.load_state_dict(ckpt["model"])
        self.recipe.load_state_dict(ckpt)
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.restore_extra(ckpt)
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

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor, n: int, micro: int, sync: bool) -> None:
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with utils.autocast(self.ctx.device, self.amp_dtype):
                loss = self.loss(images, labels, micro)
            weight = (1.0 if n else 0.0) / self.plan.accum_steps
            self.recipe.scaler.scale(loss * weight).backward()
        self.loss_sum += loss.detach().double() * n

    def current_lr(self) -> float:
        return self.recipe.optimizer.param_groups[0]["lr"]

    def _check_finite(self) -> None:
        if not math.isfinite(float(self.loss_sum)):
            raise UserError(f"the training loss is not finite at epoch {self.epoch + 1}, step "
                            f"{self.step_in_epoch}: lower --base_lr, or use --amp bf16 / --amp off")

    def train_epoch(self, batches: Iterable, size: int, stop: utils.StopFlag,
                    save_latest: Callable[[], None], bar: Any = None) -> bool:
        """Train to the end of the epoch (True) or until a stop is agreed (False); `bar` (tqdm)
        advances by one step at a time."""
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
            if all_agree_to_stop(stop.requested or (limit > 0 and self.global_step >= limit), self.ctx):
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
                self._micro_step(images, labels, n, micro, sync=micro == accum - 1)
                t.seen += n
            self.optimizer_step()
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
            if bar is not None:
                bar.update(1)
                if self.step_in_epoch % BAR_LOSS_EVERY == 0:
                    bar.set_postfix_str(f"loss {float(self.loss_sum) / max(1, t.seen):.4f}", refresh=False)
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
        loss_sum, seen, skipped = all_reduce_sum([float(self.loss_sum), t.seen, t.skipped], self.ctx)
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


# --------------------------------------------------------------------------------------------
# The epochs, the log and the weights
# --------------------------------------------------------------------------------------------
class TrainBatches(Protocol):
    def batches(self, epoch: int, skip_steps: int, size: int) -> Iterable: ...


def train_epochs(trainer: Pretrainer, data: TrainBatches, phases: Sequence[tuple[float, int]], ckpt_dir: Path,
                 stop: utils.StopFlag, epoch_end: Callable[[], dict], epoch_line: Callable[[dict], str],
                 lock: rundirs.RunLock | None, progress_bar: bool = False) -> bool:
    """Train the remaining epochs; False if stopped early (latest.pt saved).

    After each epoch, epoch_end() adds to the record (validation, figures; trainer.epoch already
    counts the epoch), the record is appended to log.jsonl, latest.pt is saved and epoch_line(record)
    printed. Before each save rank 0 checks that it still holds `lock` (None on other ranks).
    With progress_bar, rank 0 shows a tqdm bar per epoch (images, img/s, ETA of the epoch).
    """
    args, ctx, console = trainer.args, trainer.ctx, trainer.console

    def save_latest() -> None:
        state = trainer.checkpoint(vars(args))
        if lock is not None:
            lock.check()
        if ctx.is_main:
            utils.atomic_save(state, ckpt_dir / "latest.pt")

    epoch_times: list[float] = []
    board = utils.TensorBoard(ckpt_dir / "tensorboard" if getattr(args, "tensorboard", False) and ctx.is_main else None)
    while trainer.epoch < args.epochs:
        size = recipes.train_size_for_epoch(trainer.epoch, args.epochs, phases, args.img_size)
        start = time.perf_counter()
        batches = data.batches(trainer.epoch, trainer.step_in_epoch, size)
        bar = utils.progress(total=trainer.steps_per_epoch, initial=trainer.step_in_epoch, leave=False,
                             desc=f"epoch {trainer.epoch + 1}/{args.epochs}", unit="img",
                             unit_scale=trainer.plan.global_batch, disable=not (progress_bar and ctx.is_main))
        with bar:
            finished = trainer.train_epoch(batches, size, stop, save_latest, bar)
        if not finished:
            save_latest()
            return False
        profile = trainer.profile_summary() if args.profile else None
        record = {"type": "epoch", "epoch": trainer.epoch + 1, "img_size": size, **trainer.finish_epoch_totals()}
        trainer.epoch += 1
        record.update(epoch_end())
        epoch_times.append(time.perf_counter() - start)
        record.update(epoch_time_s=epoch_times[-1], eta_s=statistics.mean(epoch_times) * (args.epochs - trainer.epoch),
                      gates=model_tools.gate_values(trainer.backbone))
        if profile:
            record["profile"] = profile
            console(profile_line(profile, trainer.epoch, args.profile_warmup))
        # The record goes first: a crash between the two leaves the log ahead of latest.pt,
        # and resuming truncates it; the other order could lose the epoch's record.
        if ctx.is_main:
            utils.append_jsonl(ckpt_dir / "log.jsonl", record)
            board.log_record(record, trainer.epoch)
        save_latest()
        console(epoch_line(record))
    return True


def profile_line(p: dict, epoch: int, warmup: int) -> str:
    return (f"[profile] epoch {epoch}: {p['steps']} steps (first {warmup} left out) | data wait "
            f"{p['data_wait_ms']:.1f} ms/step, compute {p['compute_ms']:.1f} ms/step | data-wait share "
            f"{100 * p['data_wait_share']:.1f}% | {p['images_per_s']:.1f} img/s (all processes) | CPU time of "
            f"the main process: data {p['data_wait_cpu_ms']:.1f} ms/step, compute {p['compute_cpu_ms']:.1f} ms/step")


def throughput_text(r: dict) -> str:
    """The end of an epoch line: speed, data-wait share, time, ETA and unreadable files."""
    eta = datetime.timedelta(seconds=int(r["eta_s"]))
    unreadable = r["skipped_images"] + r.get("val_skipped", 0)
    skipped = f" | skipped {r['skipped_images']}+{r.get('val_skipped', 0)} unreadable" if unreadable else ""
    return (f"{r['images_per_s']:.1f} img/s, data wait {100 * r['data_wait_share']:.0f}% | "
            f"{r['epoch_time_s']:.1f}s, ETA {eta}{skipped}")


def header_record(kind: str, trainer: Pretrainer, **fields: Any) -> dict:
    """The log's first record (kind "header") or a resume's ("resume"): command line, git commit,
    library versions, processes, batch plan, learning rate; `fields` add the script's own."""
    args, ctx, plan = trainer.args, trainer.ctx, trainer.plan
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
        **fields, "config": vars(args),
    }


def image_set(classes: Sequence[str], samples_by_split: Mapping[str, Sequence[tuple[Any, int]]],
              roots: Sequence[str] | None = None) -> dict:
    """Which images a pretraining run reads: the class names and datasets.split_fingerprint (names
    relative to their common folder or to each of `roots`, labels, counts, file sizes), so a moved
    folder is the same set."""
    return {"classes": list(classes), "fingerprint": datasets.split_fingerprint(classes, samples_by_split, roots)}


def image_set_change(ckpt: Mapping[str, Any], images: Mapping[str, Any] | None) -> str | None:
    """How the checkpoint's images differ from `images`, in words; '' when they agree, None when
    either side has no record (synthetic data, or a checkpoint written before images were recorded)."""
    saved = ckpt.get("images")
    if saved is None or images is None:
        return None
    return datasets.data_difference(saved["classes"], saved["fingerprint"], images["classes"], images["fingerprint"])


def check_same_images(trainer: Pretrainer, ckpt: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume on another image set (rank 0 compares; every rank stops together)."""
    ctx, args = trainer.ctx, trainer.args
    change = image_set_change(ckpt, trainer.images) if ctx.is_main else None
    if all_agree_to_stop(bool(change), ctx):
        if not change:
            raise SystemExit(EXIT_USAGE)   # rank 0 says why, once
        where = " ".join(args.data_dir) if isinstance(args.data_dir, (list, tuple)) else args.data_dir
        raise UserError(f"{path} was pretrained on other images than --data_dir {where} holds ({change}): "
                        f"resuming would continue one run on two image sets. Point --data_dir at the images the "
                        f"run started with (a moved folder is fine), or start a fresh --checkpoint_dir.")
    if ctx.is_main and trainer.images is not None and ckpt.get("images") is None:
        trainer.console(f"note: {path} was written before pretraining recorded its images, so it cannot be "
                        f"checked that --data_dir holds the images the run started with; from now on they are "
                        f"recorded.")


def resume_trainer(trainer: Pretrainer, ckpt: dict, path: Path, log_path: Path, record: Callable[[], dict]) -> None:
    """Refuse another image set, restore the trainer, drop log records past the checkpoint and log
    the resume (record())."""
    ctx, console = trainer.ctx, trainer.console
    check_same_images(trainer, ckpt, path)
    if ckpt["world_size"] != ctx.world_size:
        console(f"[resume] world size {ckpt['world_size']} -> {ctx.world_size}: keeping the global batch "
                f"({trainer.plan.describe()}); data order and lr schedule continue exactly, per-process random "
                f"streams and BatchNorm statistics differ, so the run is equivalent but not bitwise identical.")
    trainer.restore(ckpt)
    if ctx.is_main:
        truncate_log(log_path, trainer.epoch)
        utils.append_jsonl(log_path, record())


def export_weights(state: Mapping[str, torch.Tensor], filename: str, ckpt_dir: Path, weights_dir: str | None,
                   console: Callable[[str], None], what: str = "Final weights", auto_detected: bool = True) -> Path:
    """Write <ckpt_dir>/<filename> and, unless weights_dir is None, a copy in weights_dir.
    auto_detected: whether models.py's auto-detection (a bare train.py --pretrained) looks for
    such a file there (ImageNet weights: yes; SparK weights: never, they are used only when named)."""
    final = ckpt_dir / filename
    utils.atomic_save(dict(state), final)
    if weights_dir is None:
        console(f"{what}: {final}")
        return final
    folder = Path(weights_dir)
    folder.mkdir(parents=True, exist_ok=True)
    utils.atomic_save(dict(state), folder / filename)
    if auto_detected:
        use = (f"`train.py --pretrained` finds weights/{filename} in the current directory or beside models.py "
               f"(docs/MODEL.md#weights: the search order).")
    else:
        use = f"use it by naming it: `train.py --pretrained {folder / filename}` (a bare --pretrained never picks it)."
    console(f"{what}: {final}\nCopied to {folder / filename}: {use}")
    return final
