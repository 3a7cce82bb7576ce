"""Paper figures from TwistNet-2D run directories, training logs and checkpoints.

Usage:
    python plot_results.py --plot bar     --run_dir runs/main [runs/extra ...] --save_dir figures
    python plot_results.py --plot radar   --run_dir runs/main --models resnet18,seresnet18,twistnet18
    python plot_results.py --plot scatter --run_dir runs/main --x flops
    python compute_flops.py --speed --json --models resnet18,twistnet18 > speed.json
    python plot_results.py --plot efficiency --run_dir runs/main --speed_json speed.json
    python plot_results.py --plot ablation --run_dir runs/ablation
    python plot_results.py --plot prune   --run_dir runs/slim --x params
    python plot_results.py --plot curves  --log_file runs/main/dtd_fold1_twistnet18_seed42/log.jsonl
    python plot_results.py --plot gate    --log_file runs/main/dtd_fold1_twistnet18_seed42/log.jsonl
    python plot_results.py --plot confusion --results runs/main/dtd_fold1_twistnet18_seed42/results.json
    python plot_results.py --plot interaction \\
        --checkpoint runs/main/dtd_fold1_twistnet18_seed42/best.pt --image data/dtd/images/banded/banded_0001.jpg
    python plot_results.py --plot tsne --checkpoint runs/main/dtd_fold1_twistnet18_seed42/best.pt --split test

Kinds:
    bar          test accuracy per model per dataset, error bars = std over the fold x seed runs
    radar        one polygon per model over the datasets (needs >= 3 axes; see --group_by)
    scatter      accuracy vs parameters or FLOPs (--x), one panel per dataset
    efficiency   accuracy vs measured images/s (--speed_json from compute_flops.py --speed --json)
    ablation     ablation variants as horizontal bars, delta to the full model (--baseline) annotated
    prune        network slimming: accuracy vs parameters or FLOPs (--x) of each unpruned model, its
                 pruned versions before fine-tuning and after (train.py --refine runs), one panel per dataset
    curves       train/val loss and accuracy over epochs from a log.jsonl
    gate         sigmoid(gate) of every TwistBlock over epochs from a log.jsonl
    confusion    row-normalised confusion matrix from a results.json, class names on the axes
    interaction  per-head r x r STCI interaction matrices of --image under --checkpoint
    tsne         t-SNE (scikit-learn) of the penultimate features of a split (--split) under --checkpoint,
                 one colour per class; the data come from the checkpoint's config (or --data_dir)

Runs are the run directories inside each --run_dir that hold a results.json with a test accuracy
(read with summarize_runs.py's loader, so tables and figures count the same runs), grouped by
model[-tag] and dataset (a run made with train.py's --tag is its own entry, e.g. twistnet18-r4).
Std is the sample standard deviation (ddof=1) over runs, as in the tables; a single run has
no error bar.

Every figure is written as <save_dir>/<name>.png and .pdf (see --formats) at 300 dpi, with seaborn's
"whitegrid" style in paper context, 3.5 in wide (one column) or 7 in (two columns).
"""
from __future__ import annotations

import argparse
import json
import difflib
import math
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import datasets
import models
import transforms
from helpers import figures, loading, model_tools, rundirs, utils
from helpers.figures import COLUMN_WIDTH_IN, PAGE_WIDTH_IN, new_figure, paper_style, save_figure
from helpers.runrecords import RunResult, Stats, load_results
from helpers.utils import UserError

DEFAULT_BASELINE = models.full_model()
MAX_POINT_LABELS = 6
LOG_SCALE_RATIO = 30.0     # loss curves spanning more than this factor get a log axis


# --------------------------------------------------------------------------------------------
# Selecting runs (loaded by helpers.runrecords.load_results, as summarize_runs' tables are)
# --------------------------------------------------------------------------------------------
def group_key(run: RunResult, group_by: str) -> str:
    """The axis a run belongs to: its dataset, or its dataset and fold."""
    return run.dataset if group_by == "dataset" else f"{run.dataset}/{run.fold}"


def accuracy_stats(runs: Iterable[RunResult], group_by: str = "dataset") -> dict[tuple[str, str], Stats]:
    """(label, dataset group) -> Stats of test accuracy over that group's runs."""
    grouped: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        grouped[(run.label, group_key(run, group_by))].append(run.test_acc)
    return {key: Stats(tuple(values)) for key, values in grouped.items()}


def filter_runs(runs: Iterable[RunResult], labels: Sequence[str] | None = None,
                datasets: Sequence[str] | None = None) -> list[RunResult]:
    """Runs whose label (model[-tag]) and dataset are in the given lists (None keeps all)."""
    return [r for r in runs
            if (not labels or r.label in labels) and (not datasets or r.dataset in datasets)]


def ordered_labels(runs: Iterable[RunResult], preferred: Sequence[str] | None = None) -> list[str]:
    """Labels in the user's order if given, else baselines first and TwistNet variants last."""
    present = {r.label for r in runs}
    if preferred:
        return [label for label in preferred if label in present]
    return sorted(present, key=lambda label: (is_twistnet_label(label), label))


def is_twistnet_label(label: str) -> bool:
    """A model[-tag] label of a registry TwistNet (a name outside the registry: by its prefix)."""
    model, _ = models.split_label(label)
    return models.is_twistnet(model) if model in models.MODEL_SPECS else model.startswith("twistnet")


def ordered_groups(runs: Iterable[RunResult], group_by: str) -> list[str]:
    def key(group: str) -> tuple:
        dataset, _, fold = group.partition("/")
        return datasets.dataset_sort_key(dataset), int(fold) if fold else 0
    return sorted({group_key(r, group_by) for r in runs}, key=key)


def read_log(path: str | Path) -> list[dict]:
    """The per-epoch records of a log.jsonl, of train.py or of a pretraining script."""
    if not Path(path).is_file():
        raise UserError(f"Log file not found: {path}")
    return [r for r in utils.read_jsonl(path) if r.get("type", "epoch") == "epoch"]


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def display_name(label: str) -> str:
    """Figure-legend name of model[-tag] (the short registry name, e.g. 'w/o AIS (r = 4)')."""
    return models.display_name(label, short=True)


def dataset_display_name(group: str) -> str:
    dataset, _, fold = group.partition("/")
    name = datasets.dataset_display_name(dataset)
    return f"{name} f{fold}" if fold else name


def ablation_sort_key(label: str) -> tuple:
    """Full model, then the registry ablations (models.ablation_variants), then tagged sweeps by
    family (models.SWEEP_FAMILIES order) and value."""
    model, tag = models.split_label(label)
    if not tag:
        core = models.ablation_variants()
        return (0, core.index(model) if model in core else len(core), model, 0.0, tag)
    families = list(models.SWEEP_FAMILIES.values())
    family = models.sweep_family_of_prefix(tag)
    if family is None:
        return (1, len(families), model, 0.0, tag)
    return (1, families.index(family), model, family.sort_value(tag[len(family.prefix):]), tag)


# --------------------------------------------------------------------------------------------
# Colours and axes
# --------------------------------------------------------------------------------------------
def model_palette(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per label; the full TwistNet-18 always gets the accent colour."""
    others = [label for label in labels if label != DEFAULT_BASELINE]
    colours = sns.color_palette("colorblind", 10)
    accent, rest = colours[3], [c for i, c in enumerate(colours) if i != 3]
    if len(others) > len(rest):  # colour-blind palette exhausted: distinct hues beat repeats
        rest = [c for c in sns.color_palette("husl", len(others) + 1) if c != accent][:len(others)]
    palette = {label: rest[i % len(rest)] for i, label in enumerate(others)}
    if DEFAULT_BASELINE in labels:
        palette[DEFAULT_BASELINE] = accent
    return palette


def signed(delta: float, digits: int = 1) -> str:
    """A delta with an explicit sign and a typographic minus (U+2212), e.g. "+0.4"."""
    return f"{delta:+.{digits}f}".replace("-", "\u2212")


def accuracy_limits(lows: Iterable[float], highs: Iterable[float], margin: float = 3.0) -> tuple[float, float]:
    """Axis range around accuracies, snapped to multiples of 5 and kept inside 0..100."""
    low = max(0.0, 5 * math.floor((min(lows) - margin) / 5))
    high = min(100.0, 5 * math.ceil((max(highs) + margin / 2) / 5))
    return low, max(high, low + 5)


# --------------------------------------------------------------------------------------------
# Aggregate figures
# --------------------------------------------------------------------------------------------
def bar_figure(stats: Mapping[tuple[str, str], Stats], labels: Sequence[str], groups: Sequence[str]) -> Figure:
    """Grouped bars: x = datasets, one bar per model; a single dataset puts the models on x."""
    palette = model_palette(labels)
    entries = [(label, group) for group in groups for label in labels if (label, group) in stats]
    lows = [stats[e].mean - stats[e].error_bar for e in entries]
    highs = [stats[e].mean + stats[e].error_bar for e in entries]
    if len(groups) == 1:
        fig = new_figure(COLUMN_WIDTH_IN, 2.6)
        ax = fig.add_subplot()
        present = [label for label in labels if (label, groups[0]) in stats]
        x = np.arange(len(present))
        for i, label in enumerate(present):
            s = stats[(label, groups[0])]
            ax.bar(x[i], s.mean, 0.7, yerr=s.error_bar, color=palette[label], edgecolor="black",
                   linewidth=0.4, error_kw={"elinewidth": 0.8})
        ax.set_xticks(x, [display_name(label) for label in present], rotation=30, ha="right",
                      rotation_mode="anchor")
        ax.set_title(dataset_display_name(groups[0]))
    else:
        width = PAGE_WIDTH_IN if len(groups) * len(labels) > 8 else COLUMN_WIDTH_IN
        fig = new_figure(width, 2.6)
        ax = fig.add_subplot()
        x = np.arange(len(groups))
        bar_w = 0.8 / len(labels)
        for i, label in enumerate(labels):
            positions = [x[g] + (i - (len(labels) - 1) / 2) * bar_w
                         for g, group in enumerate(groups) if (label, group) in stats]
            present = [stats[(label, group)] for group in groups if (label, group) in stats]
            ax.bar(positions, [s.mean for s in present], bar_w, yerr=[s.error_bar for s in present],
                   color=palette[label], edgecolor="black", linewidth=0.4, label=display_name(label),
                   error_kw={"elinewidth": 0.7})
        ax.set_xticks(x, [dataset_display_name(g) for g in groups])
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(labels)),
                  handlelength=1.0, columnspacing=1.0)
    ax.set_ylim(*accuracy_limits(lows, highs))
    ax.set_ylabel("Test accuracy (%)")
    ax.grid(axis="x", visible=False)
    return fig


def radar_figure(stats: Mapping[tuple[str, str], Stats], labels: Sequence[str], groups: Sequence[str]) -> Figure:
    """One closed polygon of mean accuracies per model, one spoke per dataset."""
    if len(groups) < 3:
        raise UserError(f"A radar chart needs at least 3 axes, got {len(groups)} ({', '.join(groups)}). "
                         f"Add datasets, or use --group_by dataset_fold to make each fold an axis.")
    complete = [label for label in labels if all((label, g) in stats for g in groups)]
    incomplete = [label for label in labels if label not in complete]
    if incomplete:
        warnings.warn(f"Left out of the radar chart (no runs on some of {', '.join(groups)}): "
                      f"{', '.join(incomplete)}")
    if not complete:
        raise UserError("No model has runs on every dataset; a radar chart has nothing to draw.")
    palette = model_palette(complete)
    angles = np.linspace(0, 2 * np.pi, len(groups), endpoint=False)
    closed = np.append(angles, angles[0])
    fig = new_figure(COLUMN_WIDTH_IN, 3.6)
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    means = {label: [stats[(label, g)].mean for g in groups] for label in complete}
    for label in complete:
        values = np.append(means[label], means[label][0])
        ax.plot(closed, values, color=palette[label], label=display_name(label),
                linewidth=1.6 if label == DEFAULT_BASELINE else 1.0, marker="o", markersize=2.5)
        ax.fill(closed, values, color=palette[label], alpha=0.08)
    everything = [v for vs in means.values() for v in vs]
    low, high = accuracy_limits(everything, everything, margin=5.0)
    ax.set_ylim(low, high)
    ax.set_xticks(angles, [dataset_display_name(g) for g in groups])
    ax.set_rlabel_position(180 / len(groups))  # radial ticks between two spokes, not on one
    ax.tick_params(axis="y", labelsize=6)
    ax.tick_params(axis="x", pad=2)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, handlelength=1.2)
    return fig


def scatter_figure(runs: Sequence[RunResult], labels: Sequence[str], groups: Sequence[str],
                   cost: Callable[[RunResult], float | None], unit: str, group_by: str = "dataset") -> Figure:
    """Mean accuracy (± std) against a cost of each run (params, FLOPs, img/s), one point per model.

    Points are labelled in place for a few models; beyond MAX_POINT_LABELS the names would
    collide, so a shared legend names them instead.
    """
    palette = model_palette(labels)
    annotate = len(labels) <= MAX_POINT_LABELS
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = new_figure(COLUMN_WIDTH_IN if cols == 1 else PAGE_WIDTH_IN, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax, group in zip(axes, groups):
        drawn = 0
        for label in labels:
            chosen = [r for r in runs if r.label == label and group_key(r, group_by) == group]
            costs = [c for c in map(cost, chosen) if c]
            if not chosen or not costs:
                continue
            s = Stats(tuple(r.test_acc for r in chosen))
            x = float(np.median(costs))
            ax.errorbar(x, s.mean, yerr=s.error_bar, fmt="o", color=palette[label], markersize=4,
                        markeredgecolor="black", markeredgewidth=0.4, elinewidth=0.8,
                        label=display_name(label))
            if annotate:
                ax.annotate(display_name(label), (x, s.mean), xytext=(4, 3),
                            textcoords="offset points", fontsize=6)
            drawn += 1
        if drawn == 0:
            warnings.warn(f"No {unit} known for any run of {group}")
        ax.set_title(dataset_display_name(group))
        ax.set_xlabel(unit)
        ax.set_ylabel("Test accuracy (%)")
        ax.margins(x=0.25, y=0.2)
    if not annotate:
        entries: dict[str, Any] = {}
        for ax in axes[:len(groups)]:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(name, handle)
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncol=min(3, len(entries)), handletextpad=0.2)
        fig.set_figheight(fig.get_figheight() + 0.16 * math.ceil(len(entries) / 3))
    return fig


PRUNE_STAGES = {"unpruned": ("o", "-"), "pruned": ("X", ":"), "refined": ("s", "-")}   # marker, line


def prune_points(runs: Sequence[RunResult], cost: Callable[[RunResult], float | None], group_by: str
                 ) -> dict[tuple[str, str], list[tuple[str, float, Stats, str]]]:
    """(dataset group, model) -> [(stage, cost, accuracy stats, point label)] for --plot prune.

    A refined run (train.py --refine) gives two points at its own size: "pruned" (its test accuracy
    before fine-tuning, recorded by train.py) and "refined"; the other runs of the same registry
    model are "unpruned". Models without a refined run are left out."""
    grouped: dict[tuple[str, str, str, str], list[tuple[float, float]]] = defaultdict(list)
    refined_models = set()
    for run in runs:
        results = utils.read_json(run.path / "results.json")
        x = cost(run)
        if x is None:
            continue
        if results.get("refined_from"):
            refined_models.add(run.model)
            label = f"{100 * results['prune_percent']:.0f}%" if results.get("prune_percent") else run.label
            grouped[group_key(run, group_by), run.model, "refined", label].append((x, run.test_acc))
            if results.get("test_acc_pruned") is not None:
                grouped[group_key(run, group_by), run.model, "pruned", label].append((x, results["test_acc_pruned"]))
        else:
            grouped[group_key(run, group_by), run.model, "unpruned", run.label].append((x, run.test_acc))
    if not refined_models:
        raise UserError("--plot prune found no refined run (train.py --refine pruned.pt ... results); "
                        "see docs/SLIMMING.md")
    points: dict[tuple[str, str], list[tuple[str, float, Stats, str]]] = defaultdict(list)
    for (group, model, stage, label), values in sorted(grouped.items()):
        if model in refined_models:
            points[group, model].append((stage, float(np.median([x for x, _ in values])),
                                         Stats(tuple(a for _, a in values)), label))
    return points


def prune_figure(points: Mapping[tuple[str, str], list[tuple[str, float, Stats, str]]], groups: Sequence[str],
                 unit: str) -> Figure:
    """One panel per dataset group: per model, unpruned -> pruned (dotted) and -> refined (solid)."""
    groups = [g for g in groups if any(key[0] == g for key in points)]
    model_names = sorted({model for _, model in points})
    palette = model_palette(model_names)
    cols = min(3, len(groups))
    fig = new_figure(COLUMN_WIDTH_IN if cols == 1 else PAGE_WIDTH_IN, 2.6 * math.ceil(len(groups) / cols))
    axes = fig.subplots(math.ceil(len(groups) / cols), cols, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax, group in zip(axes, groups):
        for model in model_names:
            entries = points.get((group, model), [])
            unpruned = [e for e in entries if e[0] == "unpruned"]
            for stage, (marker, line) in PRUNE_STAGES.items():
                chosen = sorted((e for e in entries if e[0] == stage), key=lambda e: -e[1])   # from large to small
                if not chosen:
                    continue
                path = (unpruned[:1] if stage != "unpruned" else []) + chosen
                ax.plot([e[1] for e in path], [e[2].mean for e in path], line, color=palette[model], linewidth=0.8)
                ax.errorbar([e[1] for e in chosen], [e[2].mean for e in chosen], yerr=[e[2].error_bar for e in chosen],
                            fmt=marker, color=palette[model], markersize=4, markeredgecolor="black",
                            markeredgewidth=0.4, elinewidth=0.8, label=f"{display_name(model)} {stage}")
                for _, x, stats, label in chosen:
                    if stage != "unpruned":
                        ax.annotate(label, (x, stats.mean), xytext=(3, 3), textcoords="offset points", fontsize=6)
        ax.set_title(dataset_display_name(group))
        ax.set_xlabel(unit)
        ax.set_ylabel("Test accuracy (%)")
        ax.margins(x=0.15, y=0.2)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, handletextpad=0.2)
    fig.set_figheight(fig.get_figheight() + 0.18 * math.ceil(len(names) / 2))
    return fig


def complexity_axis(runs: Sequence[RunResult], metric: str) -> tuple[Callable[[RunResult], float | None], str]:
    """(cost of a run, axis label) for --x params or flops, in M and G."""
    if metric == "params":
        return (lambda r: r.params / 1e6 if r.params else None), "Parameters (M)"
    sizes = {r.img_size for r in runs if r.img_size}
    unit = "GFLOPs" + (f" at {next(iter(sizes))} px" if len(sizes) == 1 else "")
    return (lambda r: r.flops / 1e9 if r.flops else None), unit


def speed_axis(speed_file: str | Path, metric: str) -> tuple[Callable[[RunResult], float | None], str]:
    """(measured img/s of a run's model, axis label) from `compute_flops.py --speed --json` output."""
    path = Path(speed_file)
    if not path.is_file():
        raise UserError(f"--speed_json {path} not found: make it with "
                        f"python compute_flops.py --speed --json --models ... > {path}")
    try:
        rows = json.loads(path.read_text())
        rates = {row["name"]: float(row[f"{metric}_img_s"]) for row in rows}
        device = rows[0]["device"]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
        raise UserError(f"{path} is not the JSON of compute_flops.py --speed --json ({error})") from None
    # The device on a second line: a CPU model name is wider than a one-column figure.
    return (lambda r: rates.get(r.model)), f"{metric} images/s\n({device})"


def ablation_figure(stats: Mapping[tuple[str, str], Stats], labels: Sequence[str], groups: Sequence[str],
                    baseline: str = DEFAULT_BASELINE) -> Figure:
    """Horizontal bars per variant; each annotated with its mean accuracy minus the full model's."""
    labels = sorted(labels, key=ablation_sort_key)
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    height = (0.7 + 0.22 * len(labels)) * rows
    fig = new_figure(COLUMN_WIDTH_IN if cols == 1 else PAGE_WIDTH_IN, max(height, 1.8))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    palette = sns.color_palette("colorblind")
    for ax, group in zip(axes, groups):
        present = [label for label in labels if (label, group) in stats]
        base = stats.get((baseline, group))
        if base is None:
            warnings.warn(f"No runs of the full model '{baseline}' on {group}: deltas are not shown")
        y = np.arange(len(present))
        means = [stats[(label, group)].mean for label in present]
        stds = [stats[(label, group)].error_bar for label in present]
        colours = [palette[3] if label == baseline else palette[0] for label in present]
        ax.barh(y, means, 0.65, xerr=stds, color=colours, edgecolor="black", linewidth=0.4,
                error_kw={"elinewidth": 0.7})
        low, high = accuracy_limits([m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)])
        span = high - low
        for yi, label, mean, std in zip(y, present, means, stds):
            text = f"{mean:.1f}" if label == baseline or base is None else signed(mean - base.mean)
            ax.text(mean + std + 0.03 * span, yi, text, va="center", ha="left", fontsize=6.5,
                    fontweight="bold" if label == baseline else "normal")
        if base is not None:
            ax.axvline(base.mean, color=palette[3], linestyle="--", linewidth=0.8)
        ax.set_xlim(low, high + 0.15 * span)
        ax.set_yticks(y, [display_name(label) + (" (full)" if label == baseline else "") for label in present])
        ax.invert_yaxis()
        ax.set_xlabel("Test accuracy (%)")
        ax.set_title(dataset_display_name(group))
        ax.grid(axis="y", visible=False)
    return fig


# --------------------------------------------------------------------------------------------
# Per-run figures
# --------------------------------------------------------------------------------------------
def curves_figure(records: Sequence[dict], title: str = "") -> Figure:
    """Loss and accuracy over epochs, train solid and validation dashed; the loss alone for a log
    without accuracies (pretrain_spark.py's reconstruction loss)."""
    with_acc = any(r.get(k) is not None for r in records for k in ("train_acc", "val_acc"))
    fig = new_figure(PAGE_WIDTH_IN if with_acc else COLUMN_WIDTH_IN, 2.4)
    ax_loss, ax_acc = fig.subplots(1, 2) if with_acc else (fig.subplots(1, 1), None)
    palette = sns.color_palette("colorblind")
    losses = [r[k] for r in records for k in ("train_loss", "val_loss") if r.get(k)]
    if losses and min(losses) > 0 and max(losses) / min(losses) > LOG_SCALE_RATIO:
        ax_loss.set_yscale("log")  # one diverged early epoch would flatten the rest of the curve
    for ax, metric, ylabel in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy (%)"))[:1 + with_acc]:
        for split, colour, style in (("train", palette[0], "-"), ("val", palette[1], "--")):
            points = [(r["epoch"], r[f"{split}_{metric}"]) for r in records
                      if r.get(f"{split}_{metric}") is not None]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, style, color=colour, label=split,
                        marker="o" if len(points) < 15 else None, markersize=2.5)
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=8.5)
    return fig


def gate_figure(records: Sequence[dict], gate_init: float | None = None, title: str = "") -> Figure:
    """sigmoid(gate) per TwistBlock over epochs; a dotted line marks the initial value."""
    blocks = list(dict.fromkeys(b for r in records for b in (r.get("gates") or {})))
    if not blocks:
        raise UserError("The log has no TwistBlock gates (not a TwistNet run with STCI?)")
    fig = new_figure(COLUMN_WIDTH_IN, 2.8)
    ax = fig.add_subplot()
    colours = sns.color_palette("viridis", len(blocks))
    for colour, block in zip(colours, blocks):
        points = [(r["epoch"], r["gates"][block]) for r in records if block in (r.get("gates") or {})]
        epochs, values = zip(*points)
        ax.plot(epochs, values, color=colour, label=block, marker="o" if len(points) < 15 else None,
                markersize=2.5)
    if gate_init is not None:
        ax.axhline(1 / (1 + math.exp(-gate_init)), color="grey", linestyle=":", linewidth=0.9,
                   label=f"init ({gate_init:g})")
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(r"$\sigma(\mathrm{gate})$")
    # Below the axes: gates start together and fan out, so no corner inside stays free.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, handlelength=1.2, columnspacing=1.0)
    if title:
        ax.set_title(title)
    return fig


def confusion_figure(confusion: Sequence[Sequence[float]], classes: Sequence[str], title: str = "") -> Figure:
    """Row-normalised confusion matrix (% of each true class); labels thinned beyond ~50 classes."""
    matrix = np.asarray(confusion, dtype=float)
    n = matrix.shape[0]
    if matrix.shape != (n, n) or len(classes) != n:
        raise UserError(f"Confusion matrix {matrix.shape} does not match {len(classes)} class names")
    percent = 100 * matrix / np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
    small = n <= 12
    size = COLUMN_WIDTH_IN if n <= 20 else PAGE_WIDTH_IN
    longest = max(len(str(c)) for c in classes)
    # Long names leave the square matrix narrower than the column: a shorter figure wastes less.
    fig = new_figure(size, size * (0.92 if small and longest <= 12 else 0.85))
    ax = fig.add_subplot()
    step = max(1, math.ceil(n / 50))
    # Long names eat the matrix's width in one column: smaller ticks keep the cells readable.
    tick_font = (7 if longest <= 12 else 6) if n <= 20 else max(4.0, 7 - n / 20)
    sns.heatmap(percent, ax=ax, cmap="Blues", vmin=0, vmax=100, square=True,
                annot=small, fmt=".0f", annot_kws={"fontsize": 5.5 if longest > 12 else 6},
                linewidths=0.3 if small else 0,
                cbar_kws={"label": "% of true class", "shrink": 0.7, "fraction": 0.05, "pad": 0.02})
    ticks = np.arange(0, n, step)
    names = [str(classes[i]) for i in ticks]
    ax.set_xticks(ticks + 0.5, names, rotation=45 if small else 90,
                  ha="right" if small else "center", rotation_mode="anchor" if small else "default",
                  fontsize=tick_font)
    ax.set_yticks(ticks + 0.5, names, rotation=0, fontsize=tick_font)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    if title:
        fig.suptitle(title, fontsize=8.5)  # above the colour bar too, which is taller than the cells
    return fig


def interaction_figure(internals: Mapping[str, Mapping[str, Any]], title: str = "") -> Figure:
    """Per TwistBlock a row of per-head r x r interaction heatmaps, titled with the directions."""
    if not internals:
        raise UserError("The model has no TwistBlocks with STCI: nothing to show.")
    matrices = {block: np.asarray(entry["interaction"], dtype=float) for block, entry in internals.items()}
    heads = max(m.shape[0] for m in matrices.values())
    everything = np.concatenate([m.ravel() for m in matrices.values()])
    vmin, vmax = float(everything.min()), float(everything.max())
    norm, cmap = figures.interaction_colour_scale(vmin, vmax)
    fig = new_figure(PAGE_WIDTH_IN, 0.45 + 1.6 * len(matrices))
    axes = fig.subplots(len(matrices), heads, squeeze=False)
    image = None
    for row, (block, matrix) in zip(axes, matrices.items()):
        for d, ax in enumerate(row):
            if d >= matrix.shape[0]:
                ax.set_visible(False)
                continue
            image = figures.draw_interaction(ax, matrix[d], norm, cmap)
            ax.set_title(f"{models.HEAD_ANGLES[d]}°")
        row[0].set_ylabel(f"{block}\nz channel i")
        for ax in row[1:]:
            ax.set_yticklabels([])
    for ax in axes[-1]:
        ax.set_xlabel("twisted channel j")
    fig.colorbar(image, ax=axes, shrink=0.6, fraction=0.03, aspect=30,
                 label=r"mean $\hat z_i\,\hat t_j$")
    if title:
        fig.suptitle(title, fontsize=8.5)
    return fig


# --------------------------------------------------------------------------------------------
# Run files
# --------------------------------------------------------------------------------------------
def run_name_of(path: str | Path) -> str:
    """The run directory name of a file inside it (log.jsonl, results.json, best.pt)."""
    return Path(path).resolve().parent.name


def gate_init_of(log_file: str | Path) -> float | None:
    """gate_init of the run a log belongs to, from its results.json or best.pt config if present."""
    run_path = Path(log_file).resolve().parent
    if (run_path / "results.json").is_file():
        source, holder = run_path / "results.json", utils.read_json(run_path / "results.json")
    elif (run_path / "best.pt").is_file():
        source, holder = run_path / "best.pt", rundirs.read_checkpoint(
            run_path / "best.pt", (rundirs.TRAIN_BEST, rundirs.PRETRAIN_BEST),
            "The gate figure reads only its config: move the file away to draw the figure without the initial gate.")
    else:
        return None
    if not isinstance(holder, Mapping):
        raise UserError(f"{source} holds a {type(holder).__name__}, not the object train.py writes (with the run's "
                        f"'config'): restore it, or move it away to draw the gate figure without the initial gate")
    config = holder.get("config") or {}
    if not isinstance(config, Mapping):
        raise UserError(f"{source}: its 'config' is a {type(config).__name__}, not an object: restore the file "
                        f"train.py wrote, or move it away to draw the gate figure without the initial gate")
    return models.gate_init_of_config(config)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and the usage examples of the docstring kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=_HelpFormatter)
    # Not argparse choices: an unknown kind is then one error line (plot_of_kind), not a usage block.
    p.add_argument("--plot", required=True, help=f"the kind of figure, one of: {', '.join(PLOT_KINDS)}")
    p.add_argument("--run_dir", nargs="+", default=None,
                   help="folders of run directories (bar, radar, scatter, efficiency, ablation)")
    p.add_argument("--log_file", nargs="+", default=None, help="log.jsonl file(s) (curves, gate)")
    p.add_argument("--results", nargs="+", default=None, help="results.json file(s) (confusion)")
    p.add_argument("--checkpoint", default=None, help="best.pt (interaction, tsne)")
    p.add_argument("--image", default=None, help="input image (interaction)")
    p.add_argument("--img_size", type=int, default=None, help="eval size (default: the checkpoint's)")
    p.add_argument("--weights", default="auto", choices=("auto", "model", "ema"),
                   help="checkpoint weights; auto = EMA if present")
    p.add_argument("--save_dir", default="figures")
    p.add_argument("--name", default=None, help="file stem (default: the plot kind, plus the run name for per-run plots)")
    p.add_argument("--formats", default="png,pdf", help="comma-separated output formats")
    p.add_argument("--models", default=None, help="comma-separated model[-tag] labels to keep, in plot order")
    p.add_argument("--datasets", default=None, help="comma-separated datasets to keep")
    p.add_argument("--group_by", default="dataset", choices=("dataset", "dataset_fold"),
                   help="bar/radar/scatter/ablation axes: datasets, or each dataset fold separately")
    p.add_argument("--x", default="params", choices=("params", "flops"), help="scatter and prune x axis")
    p.add_argument("--speed_json", default=None, help="compute_flops.py --speed --json output (efficiency)")
    p.add_argument("--speed_metric", default="infer", choices=("infer", "train"), help="efficiency x axis")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="images of the t-SNE (tsne)")
    p.add_argument("--data_dir", default=None, help="dataset root for tsne (default: the checkpoint's)")
    p.add_argument("--max_images", type=int, default=2000, help="t-SNE of at most this many images (tsne)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (capped below the image count)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE initialisation and the image subset (tsne)")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="full model of the ablation plot")
    return p


def require(value: Any, flag: str, kind: str) -> Any:
    if not value:
        raise UserError(f"--plot {kind} needs {flag}")
    return value


Figures = list[tuple[str, Figure]]   # (file stem, figure) pairs


@dataclass(frozen=True)
class Selection:
    """The finished runs an aggregate figure draws, and how they are grouped."""
    runs: list[RunResult]
    labels: list[str]
    groups: list[str]
    stats: dict[tuple[str, str], Stats]


def select_runs(args: argparse.Namespace) -> Selection:
    runs = load_results(require(args.run_dir, "--run_dir", args.plot))
    runs = filter_runs(runs, utils.split_list(args.models), utils.split_list(args.datasets))
    if not runs:
        raise UserError(f"No finished runs (results.json with a test accuracy) under {', '.join(args.run_dir)}"
                         + (" matching --models/--datasets" if args.models or args.datasets else ""))
    return Selection(runs, ordered_labels(runs, utils.split_list(args.models)),
                     ordered_groups(runs, args.group_by), accuracy_stats(runs, args.group_by))


def aggregate(draw: Callable[[argparse.Namespace, Selection], Figures]) -> Callable[[argparse.Namespace], Figures]:
    """A plot kind that draws the runs under --run_dir."""
    return lambda args: draw(args, select_runs(args))


def bar_plot(args: argparse.Namespace, s: Selection) -> Figures:
    return [(args.name or "bar", bar_figure(s.stats, s.labels, s.groups))]


def radar_plot(args: argparse.Namespace, s: Selection) -> Figures:
    return [(args.name or "radar", radar_figure(s.stats, s.labels, s.groups))]


def scatter_plot(args: argparse.Namespace, s: Selection) -> Figures:
    cost, unit = complexity_axis(s.runs, args.x)
    return [(args.name or f"scatter_{args.x}", scatter_figure(s.runs, s.labels, s.groups, cost, unit, args.group_by))]


def efficiency_plot(args: argparse.Namespace, s: Selection) -> Figures:
    cost, unit = speed_axis(require(args.speed_json, "--speed_json", "efficiency"), args.speed_metric)
    return [(args.name or "efficiency", scatter_figure(s.runs, s.labels, s.groups, cost, unit, args.group_by))]


def ablation_plot(args: argparse.Namespace, s: Selection) -> Figures:
    return [(args.name or "ablation", ablation_figure(s.stats, s.labels, s.groups, args.baseline))]


def prune_plot(args: argparse.Namespace, s: Selection) -> Figures:
    cost, unit = complexity_axis(s.runs, args.x)
    return [(args.name or f"prune_{args.x}", prune_figure(prune_points(s.runs, cost, args.group_by), s.groups, unit))]


def per_file_stem(args: argparse.Namespace, path: str | Path, count: int) -> str:
    if args.name and count == 1:
        return args.name
    prefix = args.name or args.plot
    return f"{prefix}_{run_name_of(path)}"


def curves_plots(args: argparse.Namespace) -> Figures:
    files = require(args.log_file, "--log_file", args.plot)
    return [(per_file_stem(args, path, len(files)), curves_figure(read_log(path), run_name_of(path)))
            for path in files]


def gate_plots(args: argparse.Namespace) -> Figures:
    files = require(args.log_file, "--log_file", args.plot)
    return [(per_file_stem(args, path, len(files)), gate_figure(read_log(path), gate_init_of(path), run_name_of(path)))
            for path in files]


def confusion_plots(args: argparse.Namespace) -> Figures:
    files = require(args.results, "--results", args.plot)
    figures = []
    for path in files:
        data = utils.read_json(path)
        if data.get("confusion") is None:
            raise UserError(f"{path} has no confusion matrix (the run had no test split)")
        classes = data.get("classes") or [str(k) for k in range(len(data["confusion"]))]
        title = (f"{display_name(models.run_label(data['model'], data.get('tag', '')))} on "
                 f"{dataset_display_name(data['dataset'])} f{data['fold']}: {data['test_acc']:.1f}%")
        figures.append((per_file_stem(args, path, len(files)), confusion_figure(data["confusion"], classes, title)))
    return figures


def interaction_from_checkpoint(args: argparse.Namespace) -> tuple[str, Figure]:
    checkpoint = require(args.checkpoint, "--checkpoint", "interaction")
    image = require(args.image, "--image", "interaction")
    model, config = model_tools.load_checkpoint_model(checkpoint, args.weights)
    img_size = args.img_size or int(config.get("img_size") or 224)
    x, _ = transforms.load_image_tensor(image, img_size)
    internals = model_tools.stci_internals(model, x)
    title = f"{display_name(models.run_label(config.get('model', 'twistnet18'), config.get('tag', '')))}: {Path(image).name}"
    stem = args.name or f"interaction_{run_name_of(checkpoint)}"
    return stem, interaction_figure(internals, title)


def tsne_from_checkpoint(args: argparse.Namespace) -> tuple[str, Figure]:
    """Penultimate features of a split under --checkpoint, embedded in 2-D by scikit-learn's TSNE."""
    checkpoint = require(args.checkpoint, "--checkpoint", "tsne")
    model, config = model_tools.load_checkpoint_model(checkpoint, args.weights)
    dataset = config.get("dataset")
    if not dataset:
        raise UserError(f"{checkpoint} has no training config (dataset, fold): t-SNE needs a train.py checkpoint")
    img_size = args.img_size or int(config.get("img_size") or 224)
    eval_tf = transforms.build_eval_transform(img_size)
    sets, classes = datasets.build_datasets(dataset, args.data_dir or config.get("data_dir"), int(config.get("fold", 1)),
                                            eval_tf, eval_tf, synthtex_size=transforms.eval_resize_size(img_size))
    features, labels = penultimate_features(model, sets[args.split], args.max_images, args.seed)
    embedding = tsne_embedding(features, args.perplexity, args.seed)
    label = models.run_label(config.get("model", "twistnet18"), config.get("tag", ""))
    title = f"{display_name(label)}: {dataset_display_name(dataset)} f{config.get('fold', 1)} {args.split} ({len(labels)} images)"
    stem = args.name or f"tsne_{run_name_of(checkpoint)}"
    return stem, tsne_figure(embedding, labels, classes, title)


def penultimate_features(model: Any, dataset: Any, max_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]) of at most max_images images of `dataset` (a seeded subset)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    if len(dataset) == 0:
        raise UserError("the chosen split has no images")
    order = np.random.default_rng(seed).permutation(len(dataset))[:max_images]
    loader = DataLoader(Subset(dataset, sorted(order.tolist())), batch_size=64,
                        collate_fn=loading.collate_skip_unreadable)
    features, labels = [], []
    with model_tools.evaluating(model), torch.no_grad():
        for images, targets, _ in loader:
            if len(images):
                features.append(model_tools.penultimate(model, images).numpy())
                labels.append(targets.numpy())
    return np.concatenate(features), np.concatenate(labels)


def tsne_embedding(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    # TSNE requires perplexity < n_samples; small test splits need a smaller one.
    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def tsne_figure(embedding: np.ndarray, labels: np.ndarray, classes: Sequence[str], title: str = "") -> Figure:
    """One point per image, one colour per class; a legend names up to 20 classes."""
    present = sorted(set(labels.tolist()))
    fig = new_figure(COLUMN_WIDTH_IN if len(present) <= 10 else PAGE_WIDTH_IN, 3.2)
    ax = fig.add_subplot()
    colours = sns.color_palette("colorblind" if len(present) <= 10 else "husl", len(present))
    for colour, label in zip(colours, present):
        points = embedding[labels == label]
        ax.scatter(points[:, 0], points[:, 1], s=6, color=colour, label=str(classes[label]), linewidths=0)
    if len(present) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, handletextpad=0.1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    if title:
        fig.suptitle(title)   # centred on the figure: an axes title beside the legend runs off the page
    return fig


# --plot kind -> what draws it; the order is the order of --help and of the error that lists them.
PLOTS: Mapping[str, Callable[[argparse.Namespace], Figures]] = {
    "bar": aggregate(bar_plot),
    "radar": aggregate(radar_plot),
    "scatter": aggregate(scatter_plot),
    "efficiency": aggregate(efficiency_plot),
    "ablation": aggregate(ablation_plot),
    "prune": aggregate(prune_plot),
    "curves": curves_plots,
    "gate": gate_plots,
    "confusion": confusion_plots,
    "interaction": lambda args: [interaction_from_checkpoint(args)],
    "tsne": lambda args: [tsne_from_checkpoint(args)],
}
PLOT_KINDS = tuple(PLOTS)


def plot_of_kind(kind: str) -> Callable[[argparse.Namespace], Figures]:
    """What draws --plot `kind`; an unknown kind is a UserError that lists the kinds."""
    if kind in PLOTS:
        return PLOTS[kind]
    close = difflib.get_close_matches(kind, PLOTS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown --plot kind '{kind}'.{hint} Choose from: {', '.join(PLOTS)}")


def make_figures(args: argparse.Namespace) -> Figures:
    """(file stem, figure) pairs for the requested plot kind."""
    return plot_of_kind(args.plot)(args)


def make_plots(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse the command line, draw and write the figures; the paths written."""
    args = build_parser().parse_args(argv)
    formats = utils.split_list(args.formats) or ["png"]
    written: list[Path] = []
    with paper_style():
        for stem, fig in make_figures(args):
            written += save_figure(fig, args.save_dir, stem, formats)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    make_plots(argv)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
