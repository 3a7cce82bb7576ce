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
Every group keeps at least one channel, whatever the percent.

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
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

import models
from helpers import model_tools, utils

SCOPES = ("global", "layer")
TRACE_SIZE = 64
# TwistNet variants (every registry model that is not a timm baseline) and the timm ResNets.
PRUNABLE_MODELS = tuple([n for n, s in models.MODEL_SPECS.items() if s.timm_name is None] + ["resnet18", "seresnet18"])


# --------------------------------------------------------------------------------------------
# Planning and surgery
# --------------------------------------------------------------------------------------------
def plan_pruning(model: nn.Module, percent: float, scope: str = "global") -> list:
    """torch-pruning groups (root output channels to remove) for BN-scale slimming of `model`."""
    import torch_pruning as tp

    if not 0.0 < percent < 1.0:
        raise utils.UserError(f"--percent must be between 0 and 1 (exclusive), got {percent}")
    if scope not in SCOPES:
        raise utils.UserError(f"--scope must be one of {', '.join(SCOPES)}, got '{scope}'")
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
        drop = scores.argsort(stable=True)[:min(count, len(scores) - 1)]  # never a layer with zero channels
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
    p.add_argument("--img_size", type=int, default=224, help="image size for the FLOPs count")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.percent < 1.0:
        raise utils.UserError(f"--percent must be between 0 and 1 (exclusive), got {args.percent}")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("pruned.pt")
    if out.resolve() == Path(args.checkpoint).resolve():
        raise utils.UserError(f"--out {out} would overwrite the checkpoint being pruned; choose another path")
    if not out.parent.is_dir():
        raise utils.UserError(f"--out {out}: the folder {out.parent} does not exist")

    model, config = model_tools.load_checkpoint_model(args.checkpoint, args.weights)
    name = config.setdefault("model", "twistnet18")
    config.setdefault("model_kwargs", {})
    if name not in PRUNABLE_MODELS:
        raise utils.UserError(f"prune.py supports {', '.join(PRUNABLE_MODELS)}; {args.checkpoint} holds {name}")
    num_classes = model_tools.classifier_size(model.state_dict())
    fresh = model_tools.channel_config(models.build_model(name, num_classes, verbose=False,
                                                          **model_tools.model_kwargs_of(config)))
    before = model_tools.channel_config(model)
    params0, flops0 = models.count_params(model), model_tools.count_flops(model, args.img_size).total

    plan = plan_pruning(model, args.percent, args.scope)
    difference = prune_checked(model, plan)
    params1, flops1 = models.count_params(model), model_tools.count_flops(model, args.img_size).total

    print(channel_table(before, model_tools.channel_config(model)))
    print(f"\n{name}: {args.scope} BN-scale pruning of {args.percent:.0%} of the prunable channels "
          f"({sum(len(g[0].idxs) for g in plan)} removed in {len(plan)} groups)")
    print(f"params {params0 / 1e6:.3f}M -> {params1 / 1e6:.3f}M ({params1 / params0:.1%})")
    print(f"FLOPs  {flops0 / 1e9:.3f}G -> {flops1 / 1e9:.3f}G ({flops1 / flops0:.1%}) at {args.img_size} px")
    print(f"check: pruned logits = masked model's logits (max |difference| {difference:.2e})")

    info = {"percent": args.percent, "scope": args.scope, "source": str(args.checkpoint), "weights": args.weights,
            "num_classes": num_classes, "img_size": args.img_size, "params_before": params0,
            "params_after": params1, "flops_before": flops0, "flops_after": flops1}
    utils.atomic_save(pruned_checkpoint(model, fresh, config, info), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
