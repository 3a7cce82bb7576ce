"""Network slimming: structural channel pruning of a trained model by BatchNorm-scale importance.

Usage:
    python prune.py --checkpoint runs/x/best.pt --percent 0.4                  # writes runs/x/pruned.pt
    python prune.py --checkpoint runs/x/best.pt --percent 0.3 --scope layer --out pruned30.pt
    python prune.py --checkpoint runs/x/best.pt --percent 0.5 --weights model --img_size 224

The recipe (Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
ICCV 2017): train with an L1 penalty on the BatchNorm scales (train.py --sparsity_reg S), remove
the channels whose scales are smallest (this script), fine-tune the smaller model
(train.py --refine pruned.pt).

What goes together. torch-pruning's dependency graph (traced on a 64 px input) groups the channels
that must be removed together: a residual stream (the stem, every block's bn2 and downsample of a
stage, and in stages 3-4 the STCI output projection added to it), and each block's inner width h
(bn1 with conv2's and STCI's reduce inputs). A group's importance per channel is the mean |scale|
of the BatchNorms in it; groups without a BatchNorm (the classifier, SE's hidden layer) are kept.
`percent` is a share of the channels of these groups (a residual stream's channel counts once).
  --scope global  one threshold over all groups' channels (the paper's): the `percent` least
                  important channels of the network go, so layers lose different shares.
  --scope layer   every group loses `percent` of its own channels.
Every group keeps at least --min_keep (default 10%) of its channels, and at least one, whatever
the percent; channels --min_keep saves are not taken from other groups, so fewer than `percent` may
go (the summary says how many).

Guard rail. The global threshold is meant for a model trained with an L1 penalty on its BN scales
(train.py --sparsity_reg): then the channels it cuts are those whose scales were driven to ~0. On a
model that was never sparsified it cuts channels the model uses, and can remove most of a network
(measured: --percent 0.4 on an unsparsified ResNet-18 removed 99.7% of its weights). So before
pruning, prune.py reports the share of BN scales below 1e-2 and, with --scope global, refuses
(exit 2) when the threshold would cut more channels than have a scale below 1e-2; --force prunes
anyway (--min_keep still holds), --scope layer cuts every group by the same share.

A plain state_dict (no train.py config) is taken for twistnet18 unless --model names its model; one
that fits another registry model is an error that names it.

STCI's own width (r channels per head) is not pruned: each reduced channel feeds r + 1 of the
pairwise interaction features, all heads must keep one r for the batched computation, and the
GroupNorm over the interaction features sees every channel, so no BN scale measures what removing
one costs (and zeroing one does not make its removal exact). Its input (h) and output (the residual
stream) shrink with the backbone. To make STCI itself smaller, train with a smaller r.

Self-check: before surgery the BatchNorm scale and shift of every channel to be removed are zeroed;
the pruned model must give the same logits as that masked model (the run fails otherwise).

The output file is a train.py-style checkpoint: {"model": state_dict, "config": the source run's
config, "pruned_channels": the widths of the resized layers, "pruning": percent, scope, source,
params and FLOPs before/after}. It holds only tensors and plain values, so it loads with
torch.load(weights_only=True); model_tools.load_checkpoint_model(path) rebuilds the registry model,
resizes those layers and loads the weights strictly. Supported models: the TwistNet variants,
resnet18 and seresnet18 (with or without drop_path/blurpool).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

import models
from helpers import model_tools, utils

SCOPES = ("global", "layer")
TRACE_SIZE = 64
DEFAULT_MIN_KEEP = 0.1
SPARSE_SCALE = 1e-2     # a BN scale below this counts as switched off by sparsity training
MIN_IMG_SIZE = 32       # the FLOPs count needs at least one position after the /32 downsampling
# Every TwistNet variant of the registry and the timm ResNets.
PRUNABLE_MODELS = tuple(models.twistnet_variants() + ["resnet18", "seresnet18"])


# --------------------------------------------------------------------------------------------
# Planning and surgery
# --------------------------------------------------------------------------------------------
def plan_pruning(model: nn.Module, percent: float, scope: str = "global", min_keep: float = DEFAULT_MIN_KEEP) -> list:
    """torch-pruning groups (root output channels to remove) for BN-scale slimming of `model`;
    every group keeps at least `min_keep` of its channels (and at least one)."""
    return plan_from_scores(*score_channels(model), percent, scope, min_keep)


def check_options(percent: float, scope: str, min_keep: float) -> None:
    if not 0.0 < percent < 1.0:
        raise utils.UserError(f"--percent must be between 0 and 1 (exclusive), got {percent}")
    if scope not in SCOPES:
        raise utils.UserError(f"--scope must be one of {', '.join(SCOPES)}, got '{scope}'")
    if not 0.0 <= min_keep < 1.0:
        raise utils.UserError(f"--min_keep must be in [0, 1) (a share of each layer's channels), got {min_keep}")


def score_channels(model: nn.Module) -> tuple[Any, list]:
    """(torch-pruning dependency graph, [(root module, handler, per-channel BN-scale score)] of
    every prunable channel group)."""
    import torch_pruning as tp

    exempt_modules, exempt_params = model_tools.slimming_exempt(model)
    example = torch.zeros(1, 3, TRACE_SIZE, TRACE_SIZE, device=next(model.parameters()).device)
    with model_tools.evaluating(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example, ignored_params=exempt_params, verbose=False)
    importance = tp.importance.BNScaleImportance(normalizer=None)  # raw |scale|: comparable across groups
    scored = []
    for group in graph.get_all_groups(ignored_layers=exempt_modules, root_module_types=(nn.Conv2d, nn.Linear)):
        scores = importance(group)
        if scores is not None:  # groups without a BatchNorm have no slimming score: kept whole
            scored.append((group[0].dep.target.module, group[0].dep.handler, scores.cpu()))
    if not scored:
        raise utils.UserError(f"{type(model).__name__} has no BatchNorm-scored channel groups to prune")
    return graph, scored


def sparse_channels(scored: list) -> tuple[int, int]:
    """(prunable channels whose group score is below SPARSE_SCALE, all prunable channels)."""
    scores = torch.cat([s for *_, s in scored])
    return int((scores < SPARSE_SCALE).sum()), len(scores)


def report_sparsity(model: nn.Module, scored: list, percent: float) -> None:
    """One line: the share of BN scales below SPARSE_SCALE, and how many channels `percent` cuts."""
    sparse, total = sparse_channels(scored)
    print(f"BN scales below {SPARSE_SCALE:g}: {model_tools.bn_sparsity(model, SPARSE_SCALE):.1%} of the slimming "
          f"BatchNorms' scales; {sparse} of {total} prunable channels ({sparse / total:.1%}) by group score; "
          f"--percent {percent:g} cuts {int(total * percent)}")


def refuse_unsparsified(scored: list, percent: float) -> None:
    """A UserError when the global threshold at `percent` would cut more channels than have a
    scale below SPARSE_SCALE (the model was not, or not enough, sparsified)."""
    sparse, total = sparse_channels(scored)
    cut = int(total * percent)
    if cut > sparse:
        safe = f", or --percent {sparse / total:.3f} or less" if sparse else ""
        raise utils.UserError(
            f"--percent {percent:g} with --scope global would cut {cut} channels, but only {sparse} of {total} "
            f"({sparse / total:.1%}) have a BN scale below {SPARSE_SCALE:g}: the BN scales were not sparsified, so "
            f"the threshold would cut channels the model uses. Train longer with train.py --sparsity_reg, or use "
            f"--scope layer{safe}, or pass --force to prune anyway (--min_keep still holds).")


def plan_from_scores(graph: Any, scored: list, percent: float, scope: str = "global",
                     min_keep: float = DEFAULT_MIN_KEEP) -> list:
    """The pruning groups of score_channels' output: the `percent` lowest-scored channels (global),
    or `percent` of each group (layer), each group keeping max(1, ceil(min_keep x width))."""
    check_options(percent, scope, min_keep)
    if scope == "global":  # the `percent` lowest scores of the network
        everything = torch.cat([s for *_, s in scored])
        owner = torch.cat([torch.full((len(s),), i) for i, (*_, s) in enumerate(scored)])
        # Ties (e.g. all scales still 1 at init) are spread evenly: by position within the group.
        spread = torch.cat([torch.arange(len(s)) / len(s) for *_, s in scored]).argsort(stable=True)
        order = spread[everything[spread].argsort(stable=True)]
        lowest = owner[order[:int(len(everything) * percent)]]
        counts = torch.bincount(lowest, minlength=len(scored)).tolist()
    else:
        counts = [int(len(s) * percent) for *_, s in scored]
    plan = []
    for (module, handler, scores), count in zip(scored, counts):
        keep = max(1, math.ceil(min_keep * len(scores) - 1e-9))   # never a layer with zero channels
        drop = scores.argsort(stable=True)[:min(count, len(scores) - keep)]
        if len(drop):
            plan.append(graph.get_pruning_group(module, handler, sorted(drop.tolist())))
    return plan


@torch.no_grad()
def mask_planned_channels(plan: list) -> None:
    """Zero the BatchNorm scale and shift of every channel the plan removes (they then output 0)."""
    for group in plan:
        for dep, idxs in group:
            if isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) and dep.target.module.affine:
                dep.target.module.weight[idxs] = 0.0
                dep.target.module.bias[idxs] = 0.0


def apply_plan(plan: list) -> None:
    for group in plan:
        group.prune()


def prune_checked(model: nn.Module, plan: list, batch: int = 2) -> float:
    """Mask, prune, and return max |logit difference| between the masked and the pruned model."""
    x = torch.randn(batch, 3, TRACE_SIZE, TRACE_SIZE, generator=torch.Generator().manual_seed(0))
    mask_planned_channels(plan)
    with model_tools.evaluating(model), torch.no_grad():
        before = model(x)
        apply_plan(plan)
        after = model(x)
    difference = float((after - before).abs().max())
    if not torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()) + 1e-6):
        raise RuntimeError(f"pruned logits differ from the masked model's by {difference:.3g}: a pruning bug")
    return difference


# --------------------------------------------------------------------------------------------
# Reporting and the output file
# --------------------------------------------------------------------------------------------
def channel_table(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> str:
    """Per conv / linear layer: input -> output channels before and after, and the share of its weights kept."""
    lines = [f"{'layer':28s} {'before (in -> out)':>20s} {'after (in -> out)':>20s} {'weights kept':>13s}"]
    for name, old in before.items():
        if "out_channels" in old or "out_features" in old:
            (i0, o0), (i1, o1) = ([c.get("in_channels", c.get("in_features")), c.get("out_channels", c.get("out_features"))]
                                  for c in (old, after[name]))
            kept = 100.0 * i1 * o1 / (i0 * o0)
            lines.append(f"{name:28s} {f'{i0} -> {o0}':>20s} {f'{i1} -> {o1}':>20s} {kept:12.1f}%")
    return "\n".join(lines)


def pruned_checkpoint(model: nn.Module, fresh: dict[str, dict[str, int]], config: dict, info: dict) -> dict:
    """The file prune.py writes: weights, source config, the resized layers' widths, the pruning facts."""
    after = model_tools.channel_config(model)
    return {"model": model.state_dict(), "config": config, "pruning": info,
            "pruned_channels": {name: c for name, c in after.items() if c != fresh.get(name)}}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train.py best.pt / last.pt (or a pruned.pt)")
    p.add_argument("--percent", type=float, default=0.4, help="share of the prunable channels to remove, in (0, 1)")
    p.add_argument("--scope", default="global", choices=SCOPES,
                   help="global: one BN-scale threshold over the network; layer: percent of every layer")
    p.add_argument("--out", default=None, help="output file (default: pruned.pt beside the checkpoint)")
    p.add_argument("--weights", default="auto", choices=("auto", "model", "ema"),
                   help="checkpoint weights to prune; auto = EMA if present")
    p.add_argument("--img_size", type=int, default=224, help=f"image size for the FLOPs count (>= {MIN_IMG_SIZE})")
    p.add_argument("--min_keep", type=float, default=DEFAULT_MIN_KEEP,
                   help="every layer (channel group) keeps at least this share of its channels, in [0, 1)")
    p.add_argument("--force", action="store_true",
                   help="prune with --scope global even when the BN scales show too little sparsity for --percent")
    p.add_argument("--model", default=None, choices=PRUNABLE_MODELS,
                   help="the model of a plain state_dict (a file without train.py's config); default: the "
                        "checkpoint's config, else twistnet18")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_options(args.percent, args.scope, args.min_keep)
    if args.img_size < MIN_IMG_SIZE:
        raise utils.UserError(f"--img_size {args.img_size}: the FLOPs count needs at least {MIN_IMG_SIZE} px "
                              f"(the models downsample by 32); the default is 224")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("pruned.pt")
    if out.resolve() == Path(args.checkpoint).resolve():
        raise utils.UserError(f"--out {out} would overwrite the checkpoint being pruned; choose another path")
    if not out.parent.is_dir():
        raise utils.UserError(f"--out {out}: the folder {out.parent} does not exist")

    model, config = model_tools.load_checkpoint_model(args.checkpoint, args.weights, model=args.model,
                                                      model_flag="--model")
    name = config.setdefault("model", "twistnet18")
    config.setdefault("model_kwargs", {})
    if name not in PRUNABLE_MODELS:
        raise utils.UserError(f"prune.py supports {', '.join(PRUNABLE_MODELS)}; {args.checkpoint} holds {name}")
    num_classes = model_tools.classifier_size(model.state_dict())
    fresh = model_tools.channel_config(models.build_model(name, num_classes, verbose=False,
                                                          **model_tools.model_kwargs_of(config)))
    before = model_tools.channel_config(model)
    params0, flops0 = models.count_params(model), model_tools.count_flops(model, args.img_size).total

    graph, scored = score_channels(model)
    report_sparsity(model, scored, args.percent)
    if args.scope == "global" and not args.force:
        refuse_unsparsified(scored, args.percent)
    plan = plan_from_scores(graph, scored, args.percent, args.scope, args.min_keep)
    difference = prune_checked(model, plan)
    params1, flops1 = models.count_params(model), model_tools.count_flops(model, args.img_size).total

    print(channel_table(before, model_tools.channel_config(model)))
    removed, total = sum(len(g[0].idxs) for g in plan), sum(len(s) for *_, s in scored)
    print(f"\n{name}: {args.scope} BN-scale pruning of {args.percent:.0%} of the prunable channels "
          f"({removed} of {total} removed, {removed / total:.1%}, in {len(plan)} groups; every group keeps "
          f">= {args.min_keep:.0%} of its channels)")
    print(f"params {params0 / 1e6:.3f}M -> {params1 / 1e6:.3f}M ({params1 / params0:.1%})")
    print(f"FLOPs  {flops0 / 1e9:.3f}G -> {flops1 / 1e9:.3f}G ({flops1 / flops0:.1%}) at {args.img_size} px")
    print(f"check: pruned logits = masked model's logits (max |difference| {difference:.2e})")

    info = {"percent": args.percent, "scope": args.scope, "min_keep": args.min_keep, "forced": args.force,
            "removed_channels": removed, "prunable_channels": total,
            "source": str(args.checkpoint), "weights": args.weights,
            "num_classes": num_classes, "img_size": args.img_size, "params_before": params0,
            "params_after": params1, "flops_before": flops0, "flops_after": flops1}
    utils.atomic_save(pruned_checkpoint(model, fresh, config, info), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
