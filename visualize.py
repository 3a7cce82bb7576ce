"""What a trained TwistNet sees in one image: Grad-CAM, gates, STCI interactions and AIS weights.

Usage:
    python visualize.py --checkpoint runs/main/dtd_fold1_twistnet18_seed42/best.pt \\
        --image data/dtd/images/banded/banded_0001.jpg --out_dir figures/vis
    python visualize.py --checkpoint best.pt --image img.jpg --blocks all --target_class 3 --img_size 224

Writes <out_dir>/<name>.png and .pdf (default name: <image stem>_<run name>), a 7 in wide figure:
    top row     the input as the model sees it (eval transform), Grad-CAM of --layer (layer4) for
                the predicted class (or --target_class), sigmoid(gate) per TwistBlock, top-5
                probabilities;
    block rows  per twisted block shown (--blocks last: the last one; all: every one) its four
                per-head r x r interaction matrices (0°, 45°, 90°, 135°) and its AIS weights by
                direction: the mean AIS weight of the head's r first-order (z) channels and of its
                r(r+1)/2 pair-product channels.
and <out_dir>/<name>.json with every number: prediction and top-5 probabilities (with class names
from the run's results.json when it is beside the checkpoint), gates, the interaction matrices and
AIS weights of every block, AIS by direction, and the Grad-CAM map at the layer's resolution.

The image size defaults to the checkpoint's training --img_size. The numbers come from
model_tools.gate_values and model_tools.stci_internals, so they are the model's own introspection.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import figures  # first: it selects matplotlib's Agg backend
import seaborn as sns
from matplotlib.figure import Figure, SubFigure

import models
import transforms
from helpers import model_tools, utils


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------
def grad_cam(model: nn.Module, x: torch.Tensor, layer: str = "layer4",
             target: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Grad-CAM of image x[0] at `layer`.

    Returns (cam at the layer's resolution [h, w], logits [1, classes], target class). The
    channel weights are the spatial mean of d score / d activation; the map is the ReLU of the
    weighted channel sum, scaled to a maximum of 1 (all zeros if nothing is positive).
    """
    watched = model_tools.submodules(model, [layer])
    with model_tools.evaluating(model), model_tools.capture(watched, detach=False) as captured, torch.enable_grad():
        logits = model(x[:1])
        target = int(logits[0].argmax()) if target is None else int(target)
        if not 0 <= target < logits.shape[1]:
            raise utils.UserError(f"--target_class {target} is outside 0..{logits.shape[1] - 1}")
        # autograd.grad, not backward(): the parameters' .grad stay untouched
        (grad,) = torch.autograd.grad(logits[0, target], captured[layer])
    act = captured[layer].detach()[0]
    weights = grad[0].mean(dim=(1, 2))
    cam = F.relu((weights[:, None, None] * act).sum(dim=0))
    peak = cam.max()
    return (cam / peak if peak > 0 else cam), logits.detach(), target


def upsample_cam(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a [h, w] map to the image size, kept in [0, 1]."""
    big = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return big.clamp(0, 1).numpy()


def ais_by_direction(ais: torch.Tensor, r: int) -> list[dict[str, float]]:
    """Per head: mean AIS weight of its r z channels and of its pair-product channels."""
    return [{"angle": models.HEAD_ANGLES[d], "z": float(row[:r].mean()), "products": float(row[r:].mean())}
            for d, row in enumerate(ais)]


def top_k(probs: torch.Tensor, classes: Sequence[str], k: int = 5) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(k, probs.numel()))
    return [{"index": int(i), "name": classes[int(i)], "prob": float(v)} for v, i in zip(values, indices)]


def build_report(model: nn.Module, x: torch.Tensor, classes: Sequence[str], layer: str = "layer4",
                 target: int | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """All numbers of the visualisation (JSON-ready) and the Grad-CAM map."""
    cam, logits, target = grad_cam(model, x, layer, target)
    probs = logits[0].softmax(dim=0)
    internals = model_tools.stci_internals(model, x[:1])
    blocks: dict[str, Any] = {}
    for name, entry in internals.items():
        r = entry["interaction"].shape[-1]
        block = {"gate": float(entry["gate"]), "interaction": entry["interaction"].tolist()}
        if "ais" in entry:
            block["ais"] = entry["ais"].tolist()
            block["ais_by_direction"] = ais_by_direction(entry["ais"], r)
        blocks[name] = block
    top = top_k(probs, classes)
    report = {
        "prediction": top[0],
        "top5": top,
        "gates": model_tools.gate_values(model),
        "blocks": blocks,
        "head_angles": list(models.HEAD_ANGLES),
        "gradcam": {"layer": layer, "target_class": target, "target_name": classes[target],
                    "map": cam.tolist()},
        "classes": list(classes),
    }
    return report, cam


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------
def draw_overview(sub: SubFigure, image: np.ndarray, cam: np.ndarray, report: dict,
                  gate_init: float | None) -> None:
    """Input, Grad-CAM overlay, gate bars and top-5 probabilities side by side."""
    ax_img, ax_cam, ax_gate, ax_top = sub.subplots(1, 4, width_ratios=[1, 1, 1.1, 1.3])
    ax_img.imshow(image)
    ax_img.set_title(f"input\n{image.shape[1]} x {image.shape[0]} px", fontsize=7)
    ax_cam.imshow(image)
    ax_cam.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    target = report["gradcam"]
    # Two short lines: one long line would run into the neighbouring panel's title.
    ax_cam.set_title(f"Grad-CAM ({target['layer']})\n{shorten(target['target_name'], 16)}", fontsize=7)
    for ax in (ax_img, ax_cam):
        ax.set_axis_off()

    gates = report["gates"]
    if gates:
        palette = sns.color_palette("colorblind")
        ax_gate.bar(range(len(gates)), list(gates.values()), color=palette[3], edgecolor="black", linewidth=0.4)
        ax_gate.set_xticks(range(len(gates)), list(gates), rotation=45, ha="right", rotation_mode="anchor")
        if gate_init is not None:
            ax_gate.axhline(1 / (1 + math.exp(-gate_init)), color="grey", linestyle=":", linewidth=0.9)
        ax_gate.set_ylabel(r"$\sigma(\mathrm{gate})$")
        ax_gate.grid(axis="x", visible=False)
    else:
        ax_gate.text(0.5, 0.5, "no TwistBlocks", ha="center", va="center", transform=ax_gate.transAxes)
        ax_gate.set_axis_off()
    ax_gate.set_title("gates")

    top = report["top5"]
    y = np.arange(len(top))
    ax_top.barh(y, [t["prob"] for t in top], color=sns.color_palette("colorblind")[0],
                edgecolor="black", linewidth=0.4)
    ax_top.set_yticks(y, [shorten(t["name"]) for t in top])
    ax_top.invert_yaxis()
    ax_top.set_xlim(0, 1)
    ax_top.set_xlabel("probability")
    ax_top.set_title("top-5")
    ax_top.grid(axis="y", visible=False)


def draw_block_row(sub: SubFigure, name: str, block: dict) -> None:
    """Four interaction heatmaps (shared colour scale) and the AIS-by-direction bars of one block."""
    matrices = np.asarray(block["interaction"], dtype=float)
    heads = matrices.shape[0]
    axes = sub.subplots(1, heads + 1, width_ratios=[1] * heads + [1.3])
    norm, cmap = figures.interaction_colour_scale(float(matrices.min()), float(matrices.max()))
    image = None
    for d in range(heads):
        image = figures.draw_interaction(axes[d], matrices[d], norm, cmap)
        axes[d].set_title(f"{models.HEAD_ANGLES[d]}°")
        axes[d].set_xlabel("j")
        if d:
            axes[d].set_yticklabels([])
    axes[0].set_ylabel(f"{name}\ni")
    sub.colorbar(image, ax=list(axes[:heads]), shrink=0.85, pad=0.01, fraction=0.03)

    ax_ais = axes[heads]
    if "ais_by_direction" in block:
        rows = block["ais_by_direction"]
        x = np.arange(len(rows))
        palette = sns.color_palette("colorblind")
        ax_ais.bar(x - 0.2, [row["z"] for row in rows], 0.4, label="z", color=palette[0])
        ax_ais.bar(x + 0.2, [row["products"] for row in rows], 0.4, label="products", color=palette[2])
        ax_ais.set_xticks(x, [f"{row['angle']}°" for row in rows])
        ax_ais.set_ylim(0, 1.3)  # headroom for the legend above sigmoid weights (<= 1)
        ax_ais.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax_ais.set_ylabel("mean AIS weight")
        ax_ais.legend(loc="upper center", ncol=2, handlelength=0.8, columnspacing=0.6, fontsize=6)
        ax_ais.grid(axis="x", visible=False)
    else:
        ax_ais.text(0.5, 0.5, "no AIS", ha="center", va="center", transform=ax_ais.transAxes)
        ax_ais.set_axis_off()
    ax_ais.set_title("AIS by direction")


def visualization_figure(image: np.ndarray, cam: np.ndarray, report: dict, blocks: Sequence[str],
                         gate_init: float | None = None, title: str = "") -> Figure:
    """The full 7 in figure: overview row plus one row per shown block."""
    heights = [1.0] + [0.85] * len(blocks)
    fig = figures.new_figure(figures.PAGE_WIDTH_IN, 2.0 + 1.7 * len(blocks))
    subs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    draw_overview(subs[0], image, cam, report, gate_init)
    for sub, name in zip(subs[1:], blocks):
        draw_block_row(sub, name, report["blocks"][name])
    if title:
        fig.suptitle(title, fontsize=8.5)
    return fig


def shorten(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def blocks_to_show(report: dict, which: str) -> list[str]:
    names = list(report["blocks"])
    return names if which == "all" else names[-1:]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train.py best.pt (or a state_dict of --model)")
    p.add_argument("--image", required=True, help="image file to explain (any format PIL opens)")
    p.add_argument("--out_dir", default="figures/vis", help="folder for the figure and its JSON")
    p.add_argument("--img_size", type=int, default=None, help="eval size (default: the checkpoint's img_size, else 224)")
    p.add_argument("--blocks", default="last", choices=("last", "all"), help="twisted blocks to draw")
    p.add_argument("--layer", default="layer4", help="Grad-CAM layer")
    p.add_argument("--target_class", type=int, default=None, help="Grad-CAM class (default: predicted)")
    p.add_argument("--weights", default="auto", choices=("auto", "model", "ema"),
                   help="checkpoint weights; auto = EMA if present")
    p.add_argument("--name", default=None, help="output file stem")
    p.add_argument("--formats", default="png,pdf", help="comma-separated figure formats")
    return p


def class_names_for(checkpoint: str | Path, num_classes: int) -> list[str]:
    """Class names from the results.json beside a checkpoint, else 'class k'."""
    results = Path(checkpoint).resolve().parent / "results.json"
    if results.is_file():
        classes = json.loads(results.read_text()).get("classes")
        if classes and len(classes) == num_classes:
            return [str(c) for c in classes]
    return [f"class {k}" for k in range(num_classes)]


def explain(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, write the figure and its JSON; the report."""
    args = build_parser().parse_args(argv)
    model, config = model_tools.load_checkpoint_model(args.checkpoint, args.weights)
    img_size = args.img_size or int(config.get("img_size") or 224)
    x, image = transforms.load_image_tensor(args.image, img_size)
    classes = class_names_for(args.checkpoint, model_tools.classifier_size(model.state_dict()))
    report, cam = build_report(model, x, classes, args.layer, args.target_class)
    report = {"checkpoint": str(args.checkpoint), "image": str(args.image), "img_size": img_size,
              "model": config.get("model"), "model_kwargs": config.get("model_kwargs") or {}, **report}

    stem = args.name or f"{Path(args.image).stem}_{Path(args.checkpoint).resolve().parent.name}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    utils.atomic_write_text(json.dumps(report, indent=1), json_path)
    gate_init = models.gate_init_of_config(config) if report["gates"] else None
    label = models.display_name(models.run_label(config.get("model", "?"), config.get("tag", "")), short=True)
    title = f"{label} | {Path(args.image).name} | predicted {report['prediction']['name']} ({report['prediction']['prob']:.2f})"
    with figures.paper_style():
        fig = visualization_figure(image, upsample_cam(cam, image.shape[:2]), report,
                                   blocks_to_show(report, args.blocks), gate_init, title)
        written = figures.save_figure(fig, out_dir, stem, utils.split_list(args.formats) or ["png"])
    for path in [*written, json_path]:
        print(f"wrote {path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    explain(argv)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
