"""torch.distributed plumbing of the pretraining scripts (pretrain_imagenet.py, pretrain_spark.py).

Usage:
    ctx = distributed.init_distributed("auto", timeout_min=30)   # torchrun's env, or a world of 1
    plan = distributed.BatchPlan(per_rank=128, world_size=ctx.world_size, accum_steps=1)
    lr = plan.effective_lr(base_lr)                                # base_lr is per 256 images
    ...
    distributed.close_distributed(ctx)

A plain `python` launch is rank 0 of a world of 1, so the same code runs on a laptop. NCCL joins
GPUs, gloo CPUs.

Resuming a pretraining run (README "Resuming"): the run takes days and moves between machines, so
its recipe comes from the checkpoint, and the new command may change only where things are and
how fast they run (device, workers, the per-process batch with the same global batch).
A fine-tuning run (train.py) is stricter: it is one cell of a table, so its command must not
change at all between an interruption and its resumption.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

import utils
from utils import UserError

LR_REFERENCE_BATCH = 256


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
    """Join the torchrun job if there is one: NCCL between GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = utils.resolve_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None or world > 1 else device.index)
        torch.cuda.set_device(device)
    if world == 1:
        return DistContext(0, 0, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **extra)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), device, backend, cpu_group)


def close_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


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
