"""Pretraining without labels: SparK masked image modelling of TwistNet-18 on any folder of images.

TwistNet-18 (or resnet18, seresnet18, the TwistNet ablation variants) learns from unlabelled images,
on one process or many with torch.distributed.

Usage:
    # one process (one GPU, or the CPU); labels and class folders are ignored, sub-folders searched
    python pretrain_spark.py --data_dir /data/imagenet/train --batch_size 256

    # a texture collection, and a mix of folders
    python pretrain_spark.py --data_dir data/dtd/images --epochs 800 --batch_size 64
    python pretrain_spark.py --data_dir /data/imagenet/train data/dtd/images data/fmd/image

    # no download: the unlabelled training images of synthtex
    python pretrain_spark.py --data synthtex --img_size 96 --epochs 30 --batch_size 32 --device cpu

    # 8 GPUs (--batch_size is per GPU; the lr is scaled by the global batch)
    torchrun --standalone --nproc_per_node=8 pretrain_spark.py --data_dir /data/imagenet/train \\
        --batch_size 128 --checkpoint_dir checkpoints_spark

    # interrupted? the same command again continues (--resume auto is the default)

SparK (Tian et al., ICLR 2023) hides 60% of the 32 x 32 patches of each image, runs the encoder on
the visible patches only (spark.py makes every layer mask-aware), and trains a light decoder to
reconstruct the hidden patches; the encoder's weights are what pretraining is for. Outputs (rank 0
writes them):
    <checkpoint_dir>/latest.pt             every epoch, every --save_every_steps steps and on Ctrl-C; exact resume
    <checkpoint_dir>/<model>_spark.pt      the encoder's final weights (a registry state_dict, no classifier),
                                           BatchNorm running statistics re-estimated on --bn_images whole images
    <checkpoint_dir>/log.jsonl             a header record (command, git commit, ...), one record per epoch
                                           (with feat_rank_layer3/4 and feat_rank_layer3/4_init: the collapse
                                           check), a final record (the ranks again; probe_acc and
                                           probe_acc_init with --probe_dir)
    <checkpoint_dir>/train.log             the console output; stdout.txt and stderr.txt: copies of both streams
    <checkpoint_dir>/reconstructions/epoch_NNNN.png   every --vis_every epochs: input | masked | reconstruction
                                           | reconstruction with the visible patches pasted back
    <weights_dir>/<model>_spark.pt         only with --weights_dir: a copy of the encoder weights. Use SparK
                                           weights by naming them (train.py --pretrained PATH): a bare
                                           --pretrained never picks a SparK file.

Collapse check: after every epoch (rank 0), layer3's and layer4's globally pooled features on a fixed
set of --rank_images whole training images (centre crops, BatchNorm statistics re-estimated on them)
are summarised by their effective rank (spark.effective_rank: exp of the entropy of the normalised
singular values of the centred features), beside the same for the initial encoder; a warning is
printed when layer4's falls below half of the initial one's. Short SparK runs on small image sets
have collapsed the deep layers that way (rank 45 against 396) and made fine-tuning worse.
--probe_dir DIR (an imagefolder, train/ and val/) adds a linear probe at the end: logistic
regression on frozen pooled layer4 features, of the SparK encoder and of the initial one.

Recipe defaults (SparK's, docs/SPARK.md "Defaults"): LAMB (betas 0.9, 0.95), lr 2e-4
per 256 images scaled by the global batch, 20 warm-up epochs then cosine, weight decay 0.04 -> 0.2
(cosine) on conv and linear weights only, gradient norm clipped at 5, mask ratio 0.6,
RandomResizedCrop (scale 0.67-1) and flip, 800 epochs.
"""
from __future__ import annotations

import argparse
import copy
import io
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

import datasets
import models
import transforms
from helpers import dali, distributed, loading, model_tools, recipes, rundirs, spark, utils
from helpers.distributed import BatchPlan, DistContext
from helpers.utils import UserError

SparkEncoder = spark.SparkEncoder   # the mask-aware encoder: pretrain_spark.SparkEncoder(model) as in spark.py

RESUME_SAFE_KEYS = distributed.RESUME_SAFE_KEYS | {"vis_every", "vis_images", "no_progress", "rank_images",
                                                    "bn_images", "probe_dir"}
COLLAPSE_SHARE = 0.5    # warn when layer4's feature rank falls below this share of the initial encoder's
FIGURES_DIR = "reconstructions"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p, groups = distributed.pretrain_parser(
        __doc__, base_lr=2e-4, weights_file="<model>_spark.pt", checkpoint_dir="checkpoints_spark", resume="auto",
        resume_help="'auto': continue <checkpoint_dir>/latest.pt if it exists (a re-run of the same command "
                    "continues), else start; or the path of a latest.pt", print_freq=0, weights_dir=None,
        weights_help="also copy the final <model>_spark.pt into this folder (default: no copy; the checkpoint "
                     "directory holds it). Downstream, name the file: train.py --pretrained PATH")
    g = groups["data"]
    g.add_argument("--data", default="folder", choices=("folder", "synthtex"),
                   help="folder: every image under --data_dir; synthtex: the training images of a synthtex "
                        "fold (no download; labels dropped)")
    g.add_argument("--data_dir", nargs="+", default=None,
                   help="image folder(s), searched recursively; class folders and labels are ignored")
    g.add_argument("--fold", type=int, default=1, help="the synthtex fold whose training images are used")
    g.add_argument("--crop_scale", type=float, default=0.67, help="smallest area share of RandomResizedCrop")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")

    g = groups["model"]
    g.add_argument("--model", default="twistnet18", choices=models.spark_models(),
                   help="a registry CNN whose every layer has a mask-aware version (spark.py)")
    g.add_argument("--mask_ratio", type=float, default=spark.DEFAULT_MASK_RATIO,
                   help="share of the 32 x 32 patches of each image that are hidden")
    g.add_argument("--decoder_width", type=int, default=spark.DEFAULT_DECODER_WIDTH,
                   help="channels of the decoder's first block (halved in each of its 5 blocks); SparK used 768")

    g = groups["recipe"]
    g.add_argument("--epochs", type=int, default=800, help="length of the cosine schedules")
    g.add_argument("--min_lr", type=float, default=0.0, help="end of the cosine schedule (absolute)")
    g.add_argument("--warmup_epochs", type=float, default=20, help="linear warm-up, per step, over this many epochs")
    g.add_argument("--optimizer", default="lamb", choices=("lamb", "adamw"), help="timm's Lamb, or torch's AdamW")
    g.add_argument("--beta2", type=float, default=0.95, help="second-moment decay of LAMB/AdamW (beta1 is 0.9)")
    g.add_argument("--weight_decay", type=float, default=0.04,
                   help="at the start, on conv/linear weights only (none on norms, biases, gates, mask tokens)")
    g.add_argument("--weight_decay_end", type=float, default=0.2, help="at the end (cosine from --weight_decay)")
    g.add_argument("--clip_grad", type=float, default=5.0,
                   help="max global gradient norm (LAMB clips it itself, as in SparK; 0 disables)")
    g.add_argument("--img_size", type=int, default=224, help="training crop, a multiple of 32 (the mask patch)")
    g.add_argument("--progressive", default="",
                   help="low resolution early: 'SIZE:FRACTION,...' (sizes multiples of 32), e.g. '128:0.5'")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation, masks")

    g = groups["system"]
    g.add_argument("--sync_bn", action="store_true",
                   help="SyncBatchNorm in the decoder across processes (GPU only; the encoder's mask-aware "
                        "BatchNorm keeps per-process statistics)")

    g = groups["checkpoints and logs"]
    g.add_argument("--vis_every", type=int, default=10,
                   help="write a reconstruction figure every N epochs and after the last (0: never)")
    g.add_argument("--vis_images", type=int, default=8, help="images in the reconstruction figure (a fixed set)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    g.add_argument("--rank_images", type=int, default=spark.DEFAULT_RANK_IMAGES,
                   help="whole training images (a fixed seeded set) on which the collapse check measures the "
                        "effective rank of layer3/layer4 pooled features every epoch (0: off); the rank is at "
                        "most this count - 1")
    g.add_argument("--bn_images", type=int, default=spark.DEFAULT_BN_IMAGES,
                   help="whole training images the exported encoder's BatchNorm running statistics are "
                        "re-estimated on (pretraining's describe masked images); 0: export them unchanged")
    g.add_argument("--probe_dir", default=None,
                   help="an imagefolder (train/<class>/*, val/<class>/*): at the end, a linear probe (logistic "
                        "regression on frozen pooled layer4 features) of the SparK encoder and of the initial "
                        "one, logged as probe_acc and probe_acc_init")
    return p


def validate_args(args: argparse.Namespace, ctx: DistContext, plan: BatchPlan) -> list[tuple[float, int]]:
    """The progressive phases; a UserError for anything SparK cannot train with."""
    spark.check_spark_model(args.model)
    for name in ("epochs", "batch_size", "accum_steps", "vis_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    for name in ("rank_images", "bn_images"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (0: off), got {getattr(args, name)}")
    if args.rank_images == 1:
        raise UserError("--rank_images 1: a rank needs at least 2 images (0: off)")
    if args.probe_dir is not None:
        datasets.imagefolder_splits(Path(args.probe_dir), 1)   # train/ and val/ with the same classes, or a clear error
    if args.img_size % spark.DOWNSAMPLE_RATIO or args.img_size < 2 * spark.DOWNSAMPLE_RATIO:
        raise UserError(f"--img_size {args.img_size}: SparK masks {spark.DOWNSAMPLE_RATIO}-px patches, so the size "
                        f"must be a multiple of {spark.DOWNSAMPLE_RATIO} and at least {2 * spark.DOWNSAMPLE_RATIO}.")
    phases = recipes.parse_progressive(args.progressive, args.img_size)
    if any(size % spark.DOWNSAMPLE_RATIO or size < 2 * spark.DOWNSAMPLE_RATIO for _, size in phases):
        raise UserError(f"--progressive: every size must be a multiple of {spark.DOWNSAMPLE_RATIO}, at least "
                        f"{2 * spark.DOWNSAMPLE_RATIO}; got {[s for _, s in phases]}")
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must lie in (0, 1), got {args.mask_ratio}")
    if args.decoder_width % spark.DOWNSAMPLE_RATIO or args.decoder_width <= 0:
        raise UserError(f"--decoder_width must be a positive multiple of {spark.DOWNSAMPLE_RATIO} "
                        f"(the decoder halves it 5 times), got {args.decoder_width}")
    if args.min_lr >= plan.effective_lr(args.base_lr):
        raise UserError(f"--min_lr {args.min_lr:g} is not below the peak lr {plan.effective_lr(args.base_lr):g} "
                        f"(--base_lr x global batch / {distributed.LR_REFERENCE_BATCH}): lower it (the default is 0)")
    if args.data == "folder" and not args.data_dir:
        raise UserError("--data_dir is required (or --data synthtex): one or more folders of images, searched "
                        "recursively, e.g. /data/imagenet/train or data/dtd/images.")
    if args.sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise UserError("--sync_bn needs GPUs (torch's SyncBatchNorm has no CPU kernel). Drop it on CPU.")
    return phases


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def unlabelled_images(args: argparse.Namespace, size: int) -> Any:
    """The training images at crop size `size`, through SparK's light augmentation; items are
    (image, label) with labels never used."""
    train_tf = train_augment(args, size).torchvision()
    if args.data == "synthtex":
        sets, _ = datasets.build_datasets("synthtex", None, args.fold, train_tf, None,
                                          synthtex_size=transforms.eval_resize_size(args.img_size))
        return sets["train"]
    decode = transforms.eval_resize_size(args.img_size) if args.decode_size is None else args.decode_size
    return datasets.unlabelled_dataset(args.data_dir, train_tf, decode_size=decode or None)


def train_augment(args: argparse.Namespace, size: int) -> dali.TrainAugment:
    """SparK's light augmentation at a crop size, for either loader (.torchvision() for PIL): no RandAugment."""
    return dali.TrainAugment(size, hflip=args.hflip, randaug_n=0, scale=(args.crop_scale, 1.0))


def load_data(args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, phases: list[tuple[float, int]],
              start_epoch: int) -> tuple[distributed.EpochBatches, Any]:
    """The epochs' batches, and the dataset found (for the figures: the folders are listed once)."""
    size = recipes.train_size_for_epoch(start_epoch, args.epochs, phases, args.img_size)
    first = unlabelled_images(args, size)
    where = "synthtex" if args.data == "synthtex" else " ".join(args.data_dir)
    augment = (lambda s: train_augment(args, s)) if dali.resolve_loader(args.loader, ctx.device) == "dali" else None
    data = distributed.EpochBatches(lambda s: unlabelled_images(args, s), len(first), plan, ctx, args.seed,
                                    args.workers, args.prefetch, where, first_set=(size, first), dali_augment=augment)
    return data, first


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------
def build_recipe(net: spark.SparkModel, args: argparse.Namespace, lr: float, steps_per_epoch: int,
                 device: torch.device) -> recipes.Recipe:
    """LAMB or AdamW on net.param_groups(), warm-up + cosine per step, the AMP scaler. Weight decay
    is set before every step (SparkTrainer.optimizer_step) from `decay_scale` of each group."""
    groups = net.param_groups()
    for group in groups:
        group["decay_scale"] = group.pop("weight_decay")
    betas = (0.9, args.beta2)
    if args.optimizer == "lamb":
        from timm.optim import Lamb
        optimizer: torch.optim.Optimizer = Lamb(groups, lr=lr, betas=betas, weight_decay=0.0,
                                                max_grad_norm=args.clip_grad or None)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=0.0)
    amp_dtype = utils.resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return recipes.Recipe(optimizer, recipes.build_scheduler(optimizer, args, lr, steps_per_epoch), scaler, amp_dtype,
                        ema=None, mixup=None, criterion=None)


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """SparK's weight decay schedule: cosine from `start` at step 0 to `end` at the last step."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def step_masks(seed: int, epoch: int, step: int, count: int, grid: tuple[int, int], mask_ratio: float) -> torch.Tensor:
    """The masks [count, 1, h, w] of one optimizer step's global batch, in the order of its images
    in the epoch: a function of (seed, epoch, step) only, so a resumed run draws the same masks,
    on any number of processes."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % 2**63)
    return spark.random_active_mask(count, *grid, mask_ratio, generator=g)


class SparkTrainer(distributed.Pretrainer):
    """SparK pretraining of one process: the shared trainer with masks, LAMB/AdamW and the weight
    decay schedule. `self.model` is the SparkModel; `self.backbone` the registry model inside it."""
    kind = "spark"

    def __init__(self, args: argparse.Namespace, ctx: DistContext, plan: BatchPlan, net: spark.SparkModel,
                 steps_per_epoch: int, console: Callable[[str], None]) -> None:
        if args.sync_bn and ctx.distributed:
            # The encoder's BatchNorms are mask-aware (and so is Densify's): converting them would
            # make them plain BatchNorms that count the masked zeros.
            net.decoder = nn.SyncBatchNorm.convert_sync_batchnorm(net.decoder)
        super().__init__(args, ctx, plan, net, steps_per_epoch, console)
        self.backbone = net.encoder.model
        self.recipe = build_recipe(net, args, self.lr, steps_per_epoch, ctx.device)
        self.amp_dtype = self.recipe.amp_dtype
        self.total_steps = args.epochs * steps_per_epoch
        self._masks: tuple[tuple, torch.Tensor] | None = None

    def weight_decay(self, step: int) -> float:
        return weight_decay_at(step, self.total_steps, self.args.weight_decay, self.args.weight_decay_end)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
        return self.forward_model(images, self.masks_for(images, micro))

    def masks_for(self, images: torch.Tensor, micro: int) -> torch.Tensor:
        """This micro-batch's slice of the step's masks (loading.ShardedEpochSampler's layout: micro-step
        m of rank r holds positions m * B * W + r * B ... + B of the step's global batch)."""
        grid = (images.shape[-2] // spark.DOWNSAMPLE_RATIO, images.shape[-1] // spark.DOWNSAMPLE_RATIO)
        key = (self.epoch, self.step_in_epoch, grid)
        if self._masks is None or self._masks[0] != key:
            masks = step_masks(self.args.seed, self.epoch, self.step_in_epoch, self.plan.global_batch, grid,
                               self.args.mask_ratio)
            self._masks = (key, masks)
        per_rank = self.plan.per_rank
        start = (micro * self.ctx.world_size + self.ctx.rank) * per_rank
        mine = self._masks[1][start:start + per_rank]
        # Unreadable images leave a shorter batch (and a wholly unreadable one a dummy of 2).
        return mine[torch.arange(images.shape[0]) % per_rank].to(images.device, non_blocking=True)

    def optimizer_step(self) -> None:
        decay = self.weight_decay(self.global_step)
        for group in self.recipe.optimizer.param_groups:
            group["weight_decay"] = decay * group["decay_scale"]
        # LAMB clips the global gradient norm inside its step (as SparK's LAMB does).
        self.recipe.step(self.model, self.args.clip_grad if self.args.optimizer == "adamw" else 0.0)

    def encoder_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.encoder_state_dict().items()}


# --------------------------------------------------------------------------------------------
# Reconstruction figures
# --------------------------------------------------------------------------------------------
def whole_images(train_set: Any, count: int, seed: int, img_size: int) -> torch.Tensor:
    """`count` training images (fewer if the set is smaller), a seeded choice, through the eval
    transform (resize, centre crop): whole images, no mask, no augmentation."""
    shown = copy.copy(train_set)     # the same files, through the eval transform
    shown.transform = transforms.build_eval_transform(img_size)
    order = torch.randperm(len(shown), generator=torch.Generator().manual_seed(seed)).tolist()
    images = []
    for index in order:
        item = shown[index]
        if item is not None:         # an unreadable image: take the next one
            images.append(item[0])
        if len(images) == count:
            break
    if not images:
        raise UserError("None of the training images can be read (see the warnings above).")
    return torch.stack(images)


class ReconstructionFigures:
    """A fixed set of images (seeded choice, centre crops) with fixed masks, reconstructed in eval
    mode (BatchNorm running statistics, none updated) every --vis_every epochs and after the last."""

    def __init__(self, args: argparse.Namespace, net: spark.SparkModel, train_set: Any, device: torch.device,
                 folder: Path) -> None:
        self.args, self.net, self.device, self.folder = args, net, device, folder
        self.images = whole_images(train_set, args.vis_images, args.seed, args.img_size)
        grid = args.img_size // spark.DOWNSAMPLE_RATIO
        self.active = spark.random_active_mask(len(self.images), grid, grid, args.mask_ratio,
                                               torch.Generator().manual_seed(args.seed + 1))

    def due(self, epoch: int) -> bool:
        every = self.args.vis_every
        return every > 0 and (epoch % every == 0 or epoch == self.args.epochs)

    def write(self, epoch: int) -> Path:
        with model_tools.evaluating(self.net), torch.no_grad():
            shown = self.net.reconstruct(self.images.to(self.device), self.active.to(self.device))
        buffer = io.BytesIO()
        spark.reconstruction_grid(shown).save(buffer, format="PNG")
        path = self.folder / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        utils.atomic_write_bytes(buffer.getvalue(), path)
        return path


# --------------------------------------------------------------------------------------------
# Whole-image checks: collapse (feature rank) and linear probe
# --------------------------------------------------------------------------------------------
class WholeImageChecks:
    """The collapse check and the linear probe (rank 0), each of the trained encoder beside the
    initial one: `initial` is the registry model as pretraining started from it."""

    def __init__(self, args: argparse.Namespace, train_set: Any, initial: nn.Module,
                 console: Callable[[str], None]) -> None:
        self.args, self.initial, self.console = args, initial, console
        # The probe re-estimates BatchNorm statistics on these images too, also with --rank_images 0.
        count = args.rank_images or args.bn_images or spark.DEFAULT_RANK_IMAGES
        self.images = whole_images(train_set, count, args.seed, args.img_size)
        self.initial_ranks = spark.feature_ranks(initial, self.images) if args.rank_images else {}

    def ranks(self, backbone: nn.Module) -> dict[str, float]:
        """feat_rank_<stage> of `backbone` and feat_rank_<stage>_init; a warning line on collapse."""
        ranks = spark.feature_ranks(backbone, self.images)
        record = {f"feat_rank_{stage}": round(value, 2) for stage, value in ranks.items()}
        record.update({f"feat_rank_{stage}_init": round(value, 2) for stage, value in self.initial_ranks.items()})
        now, start = ranks["layer4"], self.initial_ranks["layer4"]
        if now < COLLAPSE_SHARE * start:
            self.console(f"warning: layer4 feature rank {now:.1f} < {COLLAPSE_SHARE:g} x the initial encoder's "
                         f"{start:.1f} on {len(self.images)} whole images: the deep layers are collapsing, and "
                         f"fine-tuning from these weights may be worse than from the initial ones (PRETRAIN_GUIDE, "
                         f"SparK: collapse check).")
        return record

    def probe(self, backbone: nn.Module) -> dict[str, float]:
        """probe_acc and probe_acc_init: linear probes on --probe_dir's train/ -> val/ (pooled layer4
        features, BatchNorm statistics re-estimated on the fixed whole images)."""
        encoders = {"probe_acc": spark.whole_image_copy(backbone, self.images),
                    "probe_acc_init": spark.whole_image_copy(self.initial, self.images)}
        features = probe_features(encoders, self.args.probe_dir, self.args.img_size)
        return {key: round(spark.linear_probe_accuracy(features["train"][key], features["val"][key]), 2)
                for key in encoders}


@torch.no_grad()
def probe_features(encoders: dict[str, nn.Module], probe_dir: str, img_size: int,
                   batch_size: int = spark.CHECK_BATCH) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{split: {key: (pooled layer4 features, labels)}} of an imagefolder's train and val images
    (eval transform), each image decoded once for all encoders."""
    eval_tf = transforms.build_eval_transform(img_size)
    sets, _ = datasets.build_datasets("imagefolder", probe_dir, 1, eval_tf, eval_tf,
                                      decode_size=transforms.eval_resize_size(img_size))
    found: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for split in ("train", "val"):
        loader = torch.utils.data.DataLoader(sets[split], batch_size=batch_size,
                                             collate_fn=loading.collate_skip_unreadable)
        feats: dict[str, list[torch.Tensor]] = {key: [] for key in encoders}
        labels = []
        for images, targets, _ in loader:
            if not len(targets):
                continue
            labels.append(targets)
            for key, encoder in encoders.items():
                feats[key].append(spark.pooled_stage_features(encoder, images, ("layer4",), batch_size)["layer4"])
        if not labels:
            raise UserError(f"--probe_dir {probe_dir}: none of the {split}/ images can be read")
        found[split] = {key: (torch.cat(parts), torch.cat(labels)) for key, parts in feats.items()}
    return found


def initial_encoder(args: argparse.Namespace, ctx: DistContext, model: nn.Module, resumed: bool) -> nn.Module:
    """The registry model pretraining started from: a copy of `model` on a fresh run, or built again
    (same seed, same --init) on a resumed one."""
    if not resumed:
        return copy.deepcopy(model)
    utils.seed_everything(args.seed)
    return distributed.build_model(args, 1000, ctx, lambda *_: None, warm_start=True).to(ctx.device)


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------
def param_counts(net: spark.SparkModel) -> dict[str, int]:
    """Parameters of the encoder (the exported weights), its STCI branches, and decoder + densify."""
    return dict(encoder_params=sum(v.numel() for k, v in net.encoder.model.named_parameters()
                                   if k.split(".", 1)[0] in spark.FEATURE_PATH),
                stci_params=model_tools.stci_param_count(net.encoder.model),
                decoder_params=models.count_params(net.decoder) + models.count_params(net.densify))


def header_record(trainer: SparkTrainer, data: distributed.EpochBatches, kind: str) -> dict:
    args = trainer.args
    return distributed.header_record(kind, trainer, train_images=data.num_images, model=args.model,
                                     **param_counts(trainer.model), mask_ratio=args.mask_ratio,
                                     optimizer=args.optimizer)


def start_line(trainer: SparkTrainer, data: distributed.EpochBatches) -> str:
    args, counts = trainer.args, param_counts(trainer.model)
    grid = args.img_size // spark.DOWNSAMPLE_RATIO
    return (f"SparK {args.model}: encoder {counts['encoder_params'] / 1e6:.2f}M params (STCI "
            f"{100 * counts['stci_params'] / counts['encoder_params']:.2f}%), decoder {counts['decoder_params'] / 1e6:.2f}M"
            f" | {data.num_images} unlabelled images | mask {args.mask_ratio:g} of {grid}x{grid} patches | "
            f"{trainer.plan.describe()} | {args.optimizer} lr {trainer.lr:.4g} ({args.base_lr:g} per "
            f"{distributed.LR_REFERENCE_BATCH}) | {trainer.steps_per_epoch} steps/epoch | {trainer.ctx.device} amp "
            f"{utils.amp_label(trainer.amp_dtype)} | {trainer.ctx.world_size} process(es)")


def epoch_end(trainer: SparkTrainer, figures: ReconstructionFigures | None, checks: WholeImageChecks | None) -> dict:
    """The weight decay of the epoch's first step (as its lr), the feature ranks (rank 0) and, when
    due, the reconstruction figure (rank 0)."""
    extra: dict[str, Any] = {"weight_decay": trainer.weight_decay((trainer.epoch - 1) * trainer.steps_per_epoch)}
    if checks is not None:
        extra.update(checks.ranks(trainer.backbone))
    if figures is not None and figures.due(trainer.epoch):
        extra["figure"] = str(figures.write(trainer.epoch))
    return extra


def epoch_line(r: dict, epochs: int) -> str:
    figure = f" | {r['figure']}" if "figure" in r else ""
    return (f"epoch {r['epoch']}/{epochs} | {r['img_size']}px | lr {r['lr']:.4g} wd {r['weight_decay']:.3f} | "
            f"reconstruction loss {r['train_loss']:.4f}{rank_text(r)} | {distributed.throughput_text(r)}{figure}")


def rank_text(r: dict) -> str:
    if "feat_rank_layer4" not in r:
        return ""
    return (f" | feature rank layer3 {r['feat_rank_layer3']:.1f} (init {r['feat_rank_layer3_init']:.1f}), "
            f"layer4 {r['feat_rank_layer4']:.1f} (init {r['feat_rank_layer4_init']:.1f})")


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return distributed.run_in_job(run, args, utils.explicit_flags(build_parser(), argv))


def run(args: argparse.Namespace, explicit: set[str], ctx: DistContext) -> int:
    start = distributed.start_or_resume(args, explicit, ctx, SparkTrainer.kind, RESUME_SAFE_KEYS,
                                        distributed.PER_LAUNCH_KEYS)
    args, ckpt = start.args, start.ckpt
    phases = validate_args(args, ctx, start.plan)
    utils.configure_kernels(args.deterministic, ctx.device)
    ckpt_dir = Path(args.checkpoint_dir)
    with distributed.checkpoint_dir_lock(ckpt_dir, ctx) as lock:
        console = utils.Console(ckpt_dir / "train.log", enabled=ctx.is_main)
        with utils.tee_output(ckpt_dir, enabled=ctx.is_main):
            console(f"command: {shlex.join([sys.executable, *sys.argv])} | git {utils.git_commit() or 'unknown'}")
            if ckpt is not None and ckpt["epoch"] >= args.epochs:
                return finished_run(args, ckpt, ckpt_dir, ctx, console)
            return train(args, ctx, start, phases, ckpt_dir, console, lock)


def train(args: argparse.Namespace, ctx: DistContext, start: distributed.RunStart, phases: list[tuple[float, int]],
          ckpt_dir: Path, console: utils.Console, lock: rundirs.RunLock | None) -> int:
    # Identical initial weights on every rank; the masks come from their own seeded generators.
    utils.seed_everything(args.seed)
    data, images = load_data(args, ctx, start.plan, phases, start.ckpt["epoch"] if start.ckpt else 0)
    model = distributed.build_model(args, 1000, ctx, console, warm_start=start.ckpt is None)
    # The starting encoder, for the checks that compare against it (rank 0; none without them).
    wanted = ctx.is_main and bool(args.rank_images or args.probe_dir)
    initial = initial_encoder(args, ctx, model, resumed=start.ckpt is not None) if wanted else None
    net = spark.SparkModel(model, args.mask_ratio, args.decoder_width)
    trainer = SparkTrainer(args, ctx, start.plan, net, data.steps_per_epoch, console)
    if ctx.is_main:   # which images (one stat each): rank 0 records them, and on a resume compares
        roots = args.data_dir if args.data == "folder" else None   # each --data_dir folder may move on its own
        trainer.images = distributed.image_set([], {"train": images.samples}, roots)
    utils.seed_everything(args.seed * 1000 + ctx.rank + 1)
    if start.ckpt is not None:
        distributed.resume_trainer(trainer, start.ckpt, start.path, ckpt_dir / "log.jsonl",
                                   lambda: header_record(trainer, data, "resume"))
        console(f"Resumed from {start.path}: epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}/"
                f"{trainer.steps_per_epoch}")
        start.ckpt = None
    elif ctx.is_main:
        utils.write_jsonl(ckpt_dir / "log.jsonl", [header_record(trainer, data, "header")])
    console(start_line(trainer, data))
    figures = (ReconstructionFigures(args, net, images, ctx.device, ckpt_dir / FIGURES_DIR)
               if ctx.is_main and args.vis_every > 0 else None)
    checks = WholeImageChecks(args, images, initial, console) if initial is not None else None

    # A terminal Ctrl-C reaches each torchrun worker twice: a second signal within 2 s is that echo.
    with utils.StopFlag(grace_s=2.0) as stop:
        if not distributed.train_epochs(trainer, data, phases, ckpt_dir, stop,
                                        lambda: epoch_end(trainer, figures, checks if args.rank_images else None),
                                        lambda record: epoch_line(record, args.epochs), lock,
                                        progress_bar=not args.no_progress):
            console(f"Interrupted at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}/"
                    f"{trainer.steps_per_epoch}: saved {ckpt_dir / 'latest.pt'}. Run the same command again "
                    f"to continue.")
            return 130
    if ctx.is_main:
        final = export(trainer.encoder_weights(), args, images, ckpt_dir, console, ctx.device)
        last = utils.read_jsonl(ckpt_dir / "log.jsonl")[-1]
        record = {"type": "final", "train_loss": last.get("train_loss"), "weights": str(final),
                  "bn_images": min(args.bn_images, len(images))}
        if checks is not None:
            record.update(final_checks(checks, trainer.backbone, last, args, console))
        utils.append_jsonl(ckpt_dir / "log.jsonl", record)
    console("done")
    if ctx.distributed:
        dist.barrier(group=ctx.cpu_group)
    return 0


def final_checks(checks: WholeImageChecks, backbone: nn.Module, last_epoch: dict, args: argparse.Namespace,
                 console: Callable[[str], None]) -> dict[str, float]:
    """The final record's feature ranks (the last epoch record's: the weights have not changed since
    it was measured) and, with --probe_dir, the linear probes (also printed)."""
    record: dict[str, float] = {}
    if args.rank_images:
        ranks = {key: value for key, value in last_epoch.items() if key.startswith("feat_rank_")}
        record.update(ranks or checks.ranks(backbone))
    if args.probe_dir:
        record.update(checks.probe(backbone))
        console(f"linear probe on {args.probe_dir} (val accuracy, logistic regression on frozen pooled layer4 "
                f"features): SparK encoder {record['probe_acc']:.2f}%, initial encoder {record['probe_acc_init']:.2f}%")
    return record


def whole_image_statistics(state: dict[str, torch.Tensor], args: argparse.Namespace, train_set: Any,
                           device: torch.device) -> dict[str, torch.Tensor]:
    """The encoder weights with every BatchNorm's running statistics re-estimated on --bn_images
    whole training images (pretraining's describe the visible islands of masked images)."""
    if not args.bn_images:
        return state
    model = models.build_model(args.model, 1000, verbose=False, **model_tools.model_kwargs_of(vars(args)))
    model.load_state_dict(state, strict=False)      # no classifier in an encoder state: unused here
    model.to(device)
    spark.reestimate_batch_norm(model, whole_images(train_set, args.bn_images, args.seed, args.img_size))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in state}


def export(state: dict[str, torch.Tensor], args: argparse.Namespace, train_set: Any, ckpt_dir: Path,
           console: Callable[[str], None], device: torch.device) -> Path:
    state = whole_image_statistics(state, args, train_set, device)
    what = (f"Encoder weights (BatchNorm statistics of {min(args.bn_images, len(train_set))} whole images)"
            if args.bn_images else "Encoder weights (BatchNorm statistics of masked images: --bn_images 0)")
    # synthtex images are real images (procedural textures), so its weights are copied like any other.
    return distributed.export_weights(state, f"{args.model}_spark.pt", ckpt_dir, args.weights_dir, console, what,
                                      auto_detected=False)


def finished_run(args: argparse.Namespace, ckpt: dict, ckpt_dir: Path, ctx: DistContext,
                 console: Callable[[str], None]) -> int:
    """A re-run of a finished run: nothing to train; the encoder weights are written again (to a
    --weights_dir that may be new)."""
    console(f"{ckpt_dir / 'latest.pt'} is a finished run ({ckpt['epoch']} of {args.epochs} epochs): nothing to "
            f"train. Use another --checkpoint_dir for a new run.")
    if ctx.is_main:
        export(spark.encoder_weights(ckpt["model"]), args, unlabelled_images(args, args.img_size), ckpt_dir, console,
               ctx.device)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
