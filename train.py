"""Train one model on one fold of one dataset, resumably; writes a run directory (docs/TRAINING.md "The run directory").

Usage:
    python train.py --dataset synthtex --model twistnet18 --epochs 3 --img_size 64 --run_dir runs/demo
    python train.py --data_dir data/dtd --dataset dtd --model twistnet18 --fold 1 --seed 42 \\
        --epochs 100 --pretrained --run_dir runs/main
    python train.py ... --pretrained path/to/checkpoint.pt      # start from a TwistNet checkpoint
    python train.py ... --recipe upstream_scratch               # the paper code's published recipe (docs/TRAINING.md)
    python train.py ... --recipe upstream_ed4ee00 --resnet18_weights r18.pth   # seed-era code: ResNet-18 transfer, 5x lr
    python train.py ... --split_protocol paper_code             # the paper code's splits (seeded by --seed too)

Run directory: <run_dir>/<dataset>_fold<k>_<model>_seed<s>[_n<N>|_frac<F>]/ with log.jsonl (one line per epoch),
last.pt (exact resume), best.pt (best validation weights), results.json (written once at the end)
and train.log. results.json "init" records what the weights started from (file and sha256, or hub tag;
transfer policy; tensors mapped / skipped / left at init). Starting the same command again resumes from last.pt (on the same data: a changed
dataset is refused); a finished run (results.json present) exits at once unless --force, and a
changed recipe is refused rather than reported as finished. The test split is evaluated only at
the end, for the best-validation weights and for the last epoch's weights: it never selects anything.

One process at a time: the run directory is locked (run.lock) while a process trains it; a second
one exits with status 75 and says who holds it. Exit status: 0 done (or already finished), 2 bad
input, 75 the run is locked by another process, 130 interrupted (last.pt saved; SIGINT, SIGTERM,
SIGHUP, or the death of the run_all.py that started it). A stop is taken at the next training step;
one that comes after the last step (during the final validation or test) lets the run finish.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import datasets
import models
import transforms
from helpers import dali, loading, lrfind, model_tools, recipes, rundirs, train_cli, utils
from helpers.utils import UserError

RUN_FILES = ("results.json", "best.pt", "last.pt", "log.jsonl", "train.log")
RUN_FOLDERS = ("tensorboard",)   # --tensorboard's event files, which a fresh start must not append to


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    loaders: dict[str, DataLoader | dali.DaliLoader]   # batches of (uint8 images, labels, n_unreadable)
    classes: list[str]
    sampler: loading.EpochSeededSampler
    fingerprint: dict        # datasets.split_fingerprint: which images, not where they are
    notes: list[str]         # classes absent from val/test, files beside the images that are not used
    train_loader_at: Callable[[int], DataLoader | dali.DaliLoader]   # the train loader at another crop size (--progressive)
    loader: str = "pil"      # --loader resolved: "pil" or "dali"


def train_augment(args: argparse.Namespace, size: int) -> dali.TrainAugment:
    """The run's training augmentation at a crop size, for either loader (.torchvision() for PIL)."""
    return dali.TrainAugment(size, hflip=args.hflip, randaug_n=args.randaug_n, randaug_m=args.randaug_m,
                             scale=(args.crop_scale, 1.0))


def build_loaders(args: argparse.Namespace, device: torch.device) -> Data:
    """The train/val/test loaders of the run; their batches hold uint8 images (utils.to_device
    normalises them on the device), from PIL in DataLoader workers or from DALI (--loader)."""
    kind = dali.resolve_loader(args.loader, device)
    train_tf = train_augment(args, args.img_size).torchvision()
    eval_tf = transforms.build_eval_transform(args.img_size, uint8=True)
    resize = transforms.eval_resize_size(args.img_size)
    sets, classes = datasets.build_datasets(
        args.dataset, args.data_dir, args.fold, train_tf, eval_tf,
        cache=args.cache, decode_size=args.decode_size, synthtex_size=resize,
        cache_max_short=args.cache_max_short or None, train_per_class=args.train_per_class,
        train_fraction=args.train_fraction, split_protocol=args.split_protocol, seed=args.seed,
        exif=args.exif == "on")
    common = loading.loader_options(args.workers, args.prefetch, device)
    sampler = loading.EpochSeededSampler(len(sets["train"]), args.seed)
    # Drop the ragged last batch (BatchNorm on one image breaks), unless the set is that small.
    drop_last = len(sets["train"]) > args.batch_size

    def train_loader_at(size: int) -> DataLoader | dali.DaliLoader:
        if kind == "dali":
            return dali.DaliLoader(sets["train"], args.batch_size, device, args.workers, size,
                                   augment=train_augment(args, size), sampler=sampler, drop_last=drop_last)
        # New workers: persistent ones would keep the old transform.
        sets["train"].transform = train_augment(args, size).torchvision()
        return DataLoader(loading.SeededSamples(sets["train"]), batch_size=args.batch_size,
                          sampler=sampler, drop_last=drop_last, **common)

    loaders = {"train": train_loader_at(args.img_size)}
    for split in ("val", "test"):
        if len(sets[split]):
            loaders[split] = (dali.DaliLoader(sets[split], args.batch_size, device, args.workers, args.img_size)
                              if kind == "dali" else
                              DataLoader(sets[split], batch_size=args.batch_size, shuffle=False, **common))
    if "val" not in loaders:
        raise UserError(f"{args.dataset} fold {args.fold} has no validation split; model selection needs one.")
    splits = datasets.Splits(classes, *(sets[split].samples for split in datasets.SPLIT_NAMES))
    notes = [f"note: {text}" for text in datasets.split_warnings(splits)]
    unused = datasets.unused_files(splits)
    if unused:
        notes.append(f"note: {len(unused)} file(s) beside the images are not used, e.g. {unused[0][0]}: "
                     f"{unused[0][1]} (python datasets.py lists them)")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        notes.append(f"note: --batch_size {args.batch_size} is odd: Mixup/CutMix pair images, so one image of "
                     f"every batch is left out of its step")
    fingerprint = datasets.split_fingerprint(classes, {split: sets[split].samples for split in datasets.SPLIT_NAMES})
    return Data(loaders, classes, sampler, fingerprint, notes, train_loader_at, kind)


# --------------------------------------------------------------------------------------------
# Train / evaluate
# --------------------------------------------------------------------------------------------
class Trainer:
    """Holds the state of one run: model, recipe (optimiser, schedule, EMA, ...), and where it is."""

    def __init__(self, args: argparse.Namespace, num_classes: int, steps_per_epoch: int,
                 device: torch.device, console: utils.Console) -> None:
        self.args, self.device = args, device
        self.pruning: dict | None = None      # --refine: what prune.py did (the channels and its facts)
        self.pruned_test_acc: float | None = None   # --refine: test accuracy before fine-tuning
        if args.refine:
            self.model, self.pruning = model_tools.load_pruned(args.refine, vars(args), num_classes)
            self.init = models.init_record("pruned", models.TransferReport(list(self.model.state_dict()), [], [], []),
                                           path=args.refine)
        else:
            self.model, self.init = models.build_model_with_init(
                args.model, num_classes, pretrained=args.pretrained, transfer_policy=args.transfer_policy,
                resnet18_weights=args.resnet18_weights, log=console, **model_tools.model_kwargs_of(vars(args)))
        self.model.to(device)
        self.channels_last = utils.resolve_channels_last(args.channels_last, device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.recipe = recipes.build_recipe(self.model, args, args.lr, steps_per_epoch, num_classes, device)
        self.forward_model = torch.compile(self.model) if args.compile else self.model
        self.epoch = 0                 # epochs completed
        self.partial = self.fresh_partial()   # progress inside the current epoch
        self.best_val = -1.0
        self.best_epoch = 0
        self.train_time_s = 0.0
        self.data_identity: dict | None = None   # the classes and split fingerprint, checked on resume

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.recipe.amp_dtype

    def eval_model(self) -> nn.Module:
        return self.recipe.ema.module if self.recipe.ema is not None else self.forward_model

    def checkpoint(self, config: dict) -> dict:
        return {"model": self.model.state_dict(), **self.recipe.state_dict(),
                "epoch": self.epoch, "partial": dict(self.partial),
                "best_val_acc": self.best_val, "best_epoch": self.best_epoch,
                "train_time_s": self.train_time_s, "rng": utils.rng_state(), "config": config,
                "data": self.data_identity, "pruned_test_acc": self.pruned_test_acc, "init": self.init,
                **self.pruned_channels()}

    def pruned_channels(self) -> dict:
        """For checkpoints of a --refine run: the widths that rebuild its pruned model (model_tools)."""
        return {"pruned_channels": self.pruning["pruned_channels"]} if self.pruning else {}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.recipe.load_state_dict(ckpt)
        self.epoch, self.best_val = ckpt["epoch"], ckpt["best_val_acc"]
        self.partial = dict(ckpt["partial"])
        self.best_epoch, self.train_time_s = ckpt["best_epoch"], ckpt["train_time_s"]
        self.pruned_test_acc = ckpt.get("pruned_test_acc")
        self.init = ckpt.get("init") or self.init   # what started the run, not what a rebuild would load now
        utils.set_rng_state(ckpt["rng"])

    def train_epoch(self, loader: DataLoader, progress: bool, stop: utils.StopFlag) -> dict | None:
        """Train until the epoch ends (returns its stats) or a stop is requested (returns None).

        Running totals live in self.partial so that a stop mid-epoch can be checkpointed and the
        epoch finished later with the same numbers.
        """
        self.model.train()
        totals = self.partial
        bar = utils.progress(total=len(loader) + totals["steps"], initial=totals["steps"],
                             desc=f"epoch {self.epoch + 1}/{self.args.epochs}", disable=not progress, leave=False)
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
            if self.recipe.mixup is not None and images.shape[0] % 2:
                images, labels = images[:-1], labels[:-1]   # timm's Mixup pairs images: needs an even batch
            if images.shape[0] >= 2:
                images, labels = utils.to_device(images, labels, self.device, self.channels_last)
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
        if totals["seen"] == 0:
            raise UserError(
                f"epoch {self.epoch + 1} trained on no image: all {totals['steps']} batches were skipped "
                f"({totals['skipped']} unreadable images; a step needs 2 readable images or more). Check the data "
                f"with python datasets.py --dataset {self.args.dataset} --data_dir ... --fold {self.args.fold}.")
        self.partial = self.fresh_partial()
        seen, elapsed = max(1, totals["seen"]), max(totals["time"], 1e-9)
        return dict(train_loss=totals["loss"] / seen, train_acc=100 * totals["correct"] / seen,
                    epoch_time_s=elapsed, images_per_s=totals["seen"] / elapsed,
                    data_wait_share=totals["data_wait"] / elapsed, skipped_images=totals["skipped"])

    @staticmethod
    def fresh_partial() -> dict:
        return dict(steps=0, lr=None, loss=0.0, correct=0, seen=0, skipped=0, data_wait=0.0, time=0.0)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        recipe, targets = self.recipe, labels
        if recipe.mixup is not None:
            images, targets = recipe.mixup(images, labels)
        with utils.autocast(self.device, recipe.amp_dtype):
            logits = self.forward_model(images)
            loss = recipe.criterion(logits, targets)
            objective = loss + self.args.sparsity_reg * model_tools.bn_l1_penalty(self.model) \
                if self.args.sparsity_reg else loss
        if not torch.isfinite(objective):
            raise UserError(f"the training loss is {loss.item()} at epoch {self.epoch + 1}: lower --lr, or try "
                            f"--amp off. Run the same command to resume from the last saved epoch.")
        recipe.scaler.scale(objective).backward()
        recipe.step(self.model, self.args.clip_grad)
        # With mixup the "label" of a mixed image is its dominant component.
        dominant = targets.argmax(dim=1) if targets.ndim == 2 else targets
        return float(loss.detach()), int((logits.argmax(dim=1) == dominant).sum())

    def evaluate(self, loader: DataLoader, model: nn.Module, num_classes: int,
                 progress: bool, desc: str) -> dict:
        sums = utils.evaluate(model, utils.progress(loader, desc=desc, disable=not progress, leave=False),
                              num_classes, self.device, self.channels_last,
                              self.amp_dtype if self.args.eval_amp else None)
        confusion, seen = sums["confusion"], sums["seen"]
        if seen == 0:
            raise UserError(f"the {desc} split has no readable image ({sums['skipped']} unreadable): an accuracy "
                            f"over nothing is not a result. Check the data with python datasets.py.")
        per_class_total = confusion.sum(dim=1).tolist()
        # None for a class without images in the split: its accuracy is undefined, not 0.
        per_class_acc = [100 * int(right) / total if total else None
                         for right, total in zip(confusion.diag().tolist(), per_class_total)]
        return dict(loss=sums["loss_sum"] / seen, acc=100 * float(confusion.diag().sum()) / seen,
                    top5=100 * sums["top5"] / seen, skipped=sums["skipped"],
                    per_class_acc=per_class_acc, confusion=confusion.tolist())


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def check_resume(ckpt: dict, config: dict, data: Data, path: Path) -> None:
    """Refuse to continue a run with another recipe or on other data."""
    diff = train_cli.recipe_differences(ckpt["config"], config)
    if diff:
        raise UserError(f"{path} was started with other settings ({diff}). Resume with the same "
                        f"command, or pass --force to start this run again from scratch.")
    saved = ckpt.get("data")
    change = saved and datasets.data_difference(saved["classes"], saved["fingerprint"], data.classes, data.fingerprint)
    if change:
        raise UserError(f"{path} was trained on other data than this command reads ({change}): resuming would "
                        f"test one dataset with weights trained on another. Point --data_dir at the data the run "
                        f"started with, or pass --force to start it again from scratch.")


def clear_run(run_path: Path) -> None:
    """--force: remove what an earlier attempt wrote, and say so (best.pt too)."""
    present = [name for name in RUN_FILES + RUN_FOLDERS if (run_path / name).exists()]
    if not present:
        return
    what = ""
    if "results.json" in present:
        test_acc = train_cli.read_results(run_path).get("test_acc") if (run_path / "results.json").stat().st_size else None
        what = f" (a finished run{f' with test accuracy {test_acc:.2f}%' if isinstance(test_acc, float) else ''})"
    print(f"--force: removing {', '.join(present)} from {run_path}{what}; the run starts again from scratch.",
          flush=True)
    for name in present:
        if name in RUN_FOLDERS:
            shutil.rmtree(run_path / name, ignore_errors=True)
        else:
            (run_path / name).unlink(missing_ok=True)


def refine_results(trainer: Trainer) -> dict:
    """results.json fields of a --refine run: what was pruned, by how much, from what size, and the
    pruned model's test accuracy before fine-tuning."""
    pruning = trainer.pruning
    if not pruning:
        return {}
    return {"refined_from": trainer.args.refine, "test_acc_pruned": trainer.pruned_test_acc,
            "pruned_from": pruning.get("source"), "prune_percent": pruning.get("percent"),
            "prune_scope": pruning.get("scope"), "params_unpruned": pruning.get("params_before")}


def flops_of(model: nn.Module, img_size: int) -> float | None:
    try:
        return float(model_tools.count_flops(model, img_size).total)
    except Exception:  # FLOPs are informative only; a tracer failure must not lose a finished run
        return None


def check_input_size(args: argparse.Namespace, num_classes: int) -> None:
    """One forward of a blank image at --img_size (or the smallest --progressive size) through a
    random-init copy of the model, on the CPU, before anything is written: a model built for one
    input size (swin_tiny: 224 px) fails here with the reason, not at its first step. Also checks
    that --sparsity_reg has BatchNorm scales to act on and that the --refine file fits."""
    name = args.model
    img_size = min([args.img_size] + [size for _, size in recipes.parse_progressive(args.progressive, args.img_size)])
    model = models.build_model(name, num_classes, pretrained=False, verbose=False,
                               **model_tools.model_kwargs_of(vars(args)))
    if args.sparsity_reg:
        model_tools.bn_l1_penalty(model)   # a model without BatchNorm scales has nothing to sparsify
    if args.refine:
        model_tools.load_pruned(args.refine, vars(args), num_classes)   # the file fits this command
    with torch.no_grad(), model_tools.evaluating(model):
        try:
            model(torch.zeros(1, 3, img_size, img_size))
        except (AssertionError, RuntimeError, ValueError) as error:
            native = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
            hint = f"use --img_size {native[-1]}, the size it is built for" if native else "use a larger --img_size"
            hint = hint if img_size == args.img_size else "use larger --progressive sizes (or none)"
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise UserError(f"{name} cannot take {img_size} px images ({reason}): {hint}.") from None


def main(argv: list[str] | None = None) -> int:
    args = train_cli.parse_args(argv)
    train_cli.validate_args(args)
    models.get_spec(args.model)  # fail on a typo before touching the disk
    if args.benchmark_loader:
        return benchmark_loader(args)
    run_path = Path(args.run_dir) / train_cli.run_name(args)
    if args.lr_find:
        return lr_find(args, run_path)
    config = train_cli.config_of(args)
    if (run_path / "results.json").exists() and not args.force:
        train_cli.check_finished(run_path, config)   # a changed recipe is refused even where the data is gone
    device = utils.resolve_device(args.device)
    data = build_loaders(args, device)  # bad data fails before anything is written
    check_input_size(args, len(data.classes))
    run_path.mkdir(parents=True, exist_ok=True)
    with rundirs.RunLock(run_path) as lock:
        return train_run(args, run_path, config, device, data, lock)


def train_run(args: argparse.Namespace, run_path: Path, config: dict, device: torch.device, data: Data,
              lock: rundirs.RunLock) -> int:
    """Train (or resume) the run; the caller holds the run directory's lock."""
    if (run_path / "results.json").exists() and not args.force:
        train_cli.check_finished(run_path, config, data)   # again: it may have finished while we waited for data
        print(f"Run already finished: {run_path / 'results.json'} exists. Pass --force to retrain.")
        return 0
    if args.force:
        clear_run(run_path)
    last_path, log_path = run_path / "last.pt", run_path / "log.jsonl"
    ckpt = None
    if last_path.exists():   # read and checked before anything is written
        ckpt = rundirs.read_checkpoint(last_path, rundirs.TRAIN_LAST, f"Move it away (or pass --force) to start "
                                     f"this run from scratch; {run_path} holds nothing else to resume from.")
        check_resume(ckpt, config, data, last_path)
    console = utils.Console(run_path / "train.log", timestamps=True)
    stale = utils.remove_stale_temp_files(run_path, rundirs.WRITTEN_UNLOCKED)   # we hold the lock
    if stale:
        console(stale)
    utils.configure_kernels(args.deterministic, device)
    utils.seed_everything(args.seed)
    loaders, classes = data.loaders, data.classes
    trainer = Trainer(args, len(classes), len(loaders["train"]), device, console)
    trainer.data_identity = {"classes": classes, "fingerprint": data.fingerprint}
    trainer.board = utils.TensorBoard(run_path / "tensorboard" if args.tensorboard else None)
    console(f"run {run_path} | {args.model} on {args.dataset} fold {args.fold} seed {args.seed} | "
            f"{len(classes)} classes | train/val/test {len(loaders['train'].dataset)}/"
            f"{len(loaders['val'].dataset)}/{len(loaders['test'].dataset) if 'test' in loaders else 0} | "
            f"{models.count_params(trainer.model) / 1e6:.2f}M params | device {device} | "
            f"amp {utils.amp_label(trainer.amp_dtype)} | loader {data.loader}")
    console(recipes.recipe_line(args))
    for line in header_lines(args, trainer, device):
        console(line)
    for note in data.notes + utils.speed_notes(device, trainer.amp_dtype, args.compile):
        console(note)
    if args.sched != "onecycle" and args.warmup_epochs >= args.epochs:   # onecycle has no separate warm-up
        console(f"note: --warmup_epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning rate "
                f"stays in its linear warm-up and never reaches --lr {args.lr:g}")

    if trainer.pruning is not None and ckpt is None and "test" in loaders:
        # The pruned model as prune.py left it: the "pruned" point beside "refined" (plot_results --plot prune).
        trainer.pruned_test_acc = trainer.evaluate(loaders["test"], trainer.model, len(classes),
                                                   not args.no_progress, "test (pruned, before refining)")["acc"]
        console(f"pruned model before refining: test {trainer.pruned_test_acc:.2f}%")
    if ckpt is not None:
        trainer.restore(ckpt)
        del ckpt
        history = [r for r in utils.read_jsonl(log_path) if r["epoch"] <= trainer.epoch]
        utils.write_jsonl(log_path, history)
        console(f"Resuming from {last_path}: epoch {trainer.epoch + 1}, step {trainer.partial['steps']} "
                f"(best val so far {trainer.best_val:.2f}%)")
    elif log_path.exists() and log_path.stat().st_size:
        # Records of a start that was killed before its first last.pt: this start replaces them.
        console(f"note: {log_path} holds records of an earlier start that saved no last.pt; starting afresh")
        utils.write_jsonl(log_path, [])

    # A dying run_all.py sends its SIGTERM once per thread of it that exits (the kernel re-parents
    # the child thread by thread), all within milliseconds: those repeats are one request to stop.
    # The handlers stay on until the end: a signal after the stop (the repeats above, a Ctrl-C
    # during the final test) must not kill the process while it saves.
    with utils.StopFlag(grace_s=1.0) as stop:
        rundirs.stop_when_parent_dies(stop)
        if not train_loop(trainer, data, config, run_path, stop, console, lock):
            lock.check()
            utils.atomic_save(trainer.checkpoint(config), last_path)
            console(f"Interrupted at epoch {trainer.epoch + 1}, step {trainer.partial['steps']} ({stop.reason}): "
                    f"saved {last_path}. Run the same command to resume exactly where it stopped.")
            return 130
        finish(trainer, data, config, run_path, console, lock)
    return 0


def header_lines(args: argparse.Namespace, trainer: Trainer, device: torch.device) -> list[str]:
    """What the run starts from and how its data is read: precision, init, splits, decoding."""
    lines = [recipes.amp_line(args, trainer.amp_dtype, device), models.init_summary(trainer.init)]
    if args.split_protocol == "paper_code" and args.dataset in datasets.PAPER_CODE_READERS:
        lines.append(f"splits: the paper code's for fold {args.fold} and seed {args.seed} (--split_protocol "
                     f"paper_code; they change with the seed, and FMD's test sets overlap between folds)")
    decode = "EXIF orientation applied" if args.exif == "on" else "EXIF orientation not applied (--exif off)"
    if args.decode_size:
        decode += f"; decoded with the shorter side resized to {args.decode_size} px (--decode_size)"
    if args.cache and not args.decode_size and args.dataset != "synthtex":
        decode += ("; cached at native resolution" + (f" up to a {args.cache_max_short} px shorter side (larger "
                   f"images shrunk before cropping; --cache_max_short 0: no limit)" if args.cache_max_short else ""))
    lines.append(f"decode: {decode}")
    return lines


def lr_find(args: argparse.Namespace, run_path: Path) -> int:
    """--lr_find: the range test (lrfind.py) with this command's model, data and recipe."""
    device = utils.resolve_device(args.device)
    data = build_loaders(args, device)
    check_input_size(args, len(data.classes))
    run_path.mkdir(parents=True, exist_ok=True)
    with rundirs.RunLock(run_path):
        utils.seed_everything(args.seed)
        trainer = Trainer(args, len(data.classes), len(data.loaders["train"]), device, utils.Console(None))
        result = lrfind.range_test(trainer.forward_model, trainer.recipe, data.loaders["train"], device,
                                   trainer.channels_last, args.lr_find_steps, progress=not args.no_progress)
        written = lrfind.write_report(result, run_path)
    suggested = result["suggested_lr"]
    stopped = ", stopped early: the loss diverged" if result["steps_run"] < result["steps"] else ""
    print(f"lr range test ({result['steps_run']} steps{stopped}): suggested --lr {suggested:.2e}" if suggested else
          "lr range test: the loss diverged before a slope could be measured; see the curve", end="")
    print(f" | {written[0]}, {written[1]}")
    return 0


def benchmark_loader(args: argparse.Namespace) -> int:
    """Images/s of the training input pipeline alone (decode, augment, collate, copy to the device and
    normalise there), for bottleneck checks.

    The first pass fills the caches (synthtex renders, --cache); the second one is what an epoch
    after the first costs, which is what the model competes with. Compare with
    `compute_flops.py --speed` (the model alone) at the same batch size and image size.
    """
    device = utils.resolve_device(args.device)
    data = build_loaders(args, device)
    rates = []
    for epoch in range(2):
        data.sampler.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for x, y, _ in utils.progress(data.loaders["train"], desc=f"loader pass {epoch + 1}",
                                      disable=args.no_progress, leave=False):
            # On the device as the trainer gets it: uint8 batches are normalised there (counted too).
            images += len(utils.to_device(x, y, device, channels_last=False)[0])
        rates.append(images / (time.perf_counter() - start))
    # The main process loads when there are no workers: it counts as one.
    per_worker = rates[1] / max(1, args.workers)
    print(f"train loader ({data.loader}), {args.dataset} at {args.img_size} px, batch {args.batch_size}, "
          f"{args.workers} workers: {rates[0]:.1f} img/s first pass, {rates[1]:.1f} img/s after "
          f"({per_worker:.1f} img/s per worker)")
    return 0


def train_loop(trainer: Trainer, data: Data, config: dict, run_path: Path, stop: utils.StopFlag,
               console: utils.Console, lock: rundirs.RunLock) -> bool:
    """Train the remaining epochs; False if a stop was requested before the end."""
    args = trainer.args
    progress = not args.no_progress
    loaders, sampler, classes = data.loaders, data.sampler, data.classes
    phases, size = recipes.parse_progressive(args.progressive, args.img_size), args.img_size
    while trainer.epoch < args.epochs:
        epoch_size = recipes.train_size_for_epoch(trainer.epoch, args.epochs, phases, args.img_size)
        if epoch_size != size:
            size = epoch_size
            loaders["train"] = data.train_loader_at(size)
        sampler.set_epoch(trainer.epoch, skip=trainer.partial["steps"] * args.batch_size)
        if trainer.partial["steps"] == 0:
            trainer.partial["lr"] = trainer.recipe.optimizer.param_groups[0]["lr"]
        lr = trainer.partial["lr"]
        stats = trainer.train_epoch(loaders["train"], progress, stop)
        if stats is None:
            return False
        trainer.epoch += 1
        trainer.train_time_s += stats["epoch_time_s"]
        record = {"type": "epoch", "epoch": trainer.epoch, "lr": lr, "train_loss": stats["train_loss"],
                  "train_acc": stats["train_acc"]}
        if trainer.epoch % args.eval_every == 0 or trainer.epoch == args.epochs:
            val = trainer.evaluate(loaders["val"], trainer.eval_model(), len(classes), progress, "val")
            record.update(val_loss=val["loss"], val_acc=val["acc"], val_top5=val["top5"])
            if val["acc"] > trainer.best_val:
                trainer.best_val, trainer.best_epoch = val["acc"], trainer.epoch
                lock.check()
                utils.atomic_save(best_checkpoint(trainer, config), run_path / "best.pt")
        record.update(img_size=size, best_val_acc=trainer.best_val, gates=model_tools.gate_values(trainer.model),
                      epoch_time_s=stats["epoch_time_s"], images_per_s=stats["images_per_s"],
                      data_wait_share=stats["data_wait_share"], skipped_images=stats["skipped_images"])
        if args.sparsity_reg:
            record["bn_sparsity"] = model_tools.bn_sparsity(trainer.model)
        lock.check()
        # The record goes first: a crash between the two leaves the log ahead of last.pt, and
        # resuming (or a fresh start, before the first last.pt) cuts it back.
        utils.append_jsonl(run_path / "log.jsonl", record)
        trainer.board.log_record(record, trainer.epoch)
        utils.atomic_save(trainer.checkpoint(config), run_path / "last.pt")
        console(epoch_line(record, args.epochs, trainer.best_val))
    return True


def best_checkpoint(trainer: Trainer, config: dict) -> dict:
    ema = trainer.recipe.ema
    return {"model": trainer.model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "epoch": trainer.epoch, "val_acc": trainer.best_val, "config": config, **trainer.pruned_channels()}


def epoch_line(r: dict, epochs: int, best: float) -> str:
    val = f" | val loss {r['val_loss']:.3f} acc {r['val_acc']:.2f}% (best {best:.2f}%)" if "val_acc" in r else ""
    gates = " | gates " + " ".join(f"{v:.3f}" for v in r["gates"].values()) if r["gates"] else ""
    skipped = f" | {r['skipped_images']} unreadable images skipped" if r["skipped_images"] else ""
    skipped += f" | BN scales < 1e-2: {100 * r['bn_sparsity']:.1f}%" if "bn_sparsity" in r else ""
    return (f"epoch {r['epoch']:3d}/{epochs} | lr {r['lr']:.2e} | train loss {r['train_loss']:.3f} "
            f"acc {r['train_acc']:.2f}%{val} | {r['images_per_s']:.1f} img/s, "
            f"{r['epoch_time_s']:.1f}s ({100 * r['data_wait_share']:.0f}% data wait){gates}{skipped}")


def finish(trainer: Trainer, data: Data, config: dict, run_path: Path, console: utils.Console,
           lock: rundirs.RunLock) -> None:
    """Test the best-validation and the last weights; write results.json once."""
    args = trainer.args
    progress = not args.no_progress
    loaders, classes = data.loaders, data.classes
    test_last = test_best = None
    if "test" in loaders:
        test_last = trainer.evaluate(loaders["test"], trainer.eval_model(), len(classes), progress, "test (last)")
        best = rundirs.read_checkpoint(run_path / "best.pt", rundirs.TRAIN_BEST,
                                     "Pass --force to train the run again.")
        weights = best["ema"] if best.get("ema") is not None else best["model"]
        model = trainer.recipe.ema.module if trainer.recipe.ema is not None else trainer.model
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
        "data_fingerprint": data.fingerprint,
        "train_per_class": args.train_per_class, "train_fraction": args.train_fraction,
        "train_images": len(loaders["train"].dataset),
        "drop_path": args.drop_path, "blurpool": args.blurpool,
        **refine_results(trainer),
        "params": models.count_params(trainer.model),
        "flops": flops_of(trainer.model.cpu(), args.img_size),
        "img_size": args.img_size, "loader": data.loader,
        "train_time_s": trainer.train_time_s,
        "recipe": recipes.recipe_summary(args), "amp_used": utils.amp_label(trainer.amp_dtype),
        "init": trainer.init, "config": config, "git_commit": utils.git_commit(), "versions": utils.library_versions(),
    }
    if test_best:
        trainer.board.log_record({"test_acc": test_best["acc"], "test_top5": test_best["top5"]}, trainer.epoch)
        trainer.board.confusion("test_confusion", test_best["confusion"], trainer.epoch)
    trainer.board.close()
    lock.check()
    utils.atomic_write_text(json.dumps(results, indent=1), run_path / "results.json")
    if test_best:
        console(f"done: best val {trainer.best_val:.2f}% at epoch {trainer.best_epoch} | test "
                f"{test_best['acc']:.2f}% (top-5 {test_best['top5']:.2f}%), last-epoch weights "
                f"{test_last['acc']:.2f}% | {run_path / 'results.json'}")
    else:
        console(f"done: best val {trainer.best_val:.2f}% at epoch {trainer.best_epoch} (no test split)")


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
