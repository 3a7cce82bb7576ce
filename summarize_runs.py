"""Summarize finished runs: test accuracy per model and dataset, rankings and paired tests.

Usage:
    python summarize_runs.py --run_dir runs/main                        # plain-text table
    python summarize_runs.py --run_dir runs/main --latex > tables/main_results.tex
    python summarize_runs.py --run_dir runs/main runs/extra --markdown
    python summarize_runs.py --run_dir runs/main --csv --out results.csv
    python summarize_runs.py --run_dir runs/main --models resnet18,twistnet18 --summary
    python summarize_runs.py --run_dir runs/main --ref twistnet18       # paired tests vs a reference

Each --run_dir is a folder of run directories written by train.py (README "The run directory"). A run
counts when its results.json exists; run directories without one are counted as incomplete and
left out, and so is a run whose test accuracy is not a number (NaN), with a note. A model's name is
results["model"], plus "-<tag>" when the run had a tag. Run directories written by the paper's own code
(github.com/junbolian/TwistNet-2D: accuracies as fractions, params_M) are read too, converted to
percent, and shown as their own rows, "model [paper code]", so both can sit in one table.

The runs of one cell must share one recipe (every train.py setting but fold, seed and where data
and runs live): a cell that mixes recipes, e.g. a sweep re-run with other --epochs into the same
--run_dir, is refused with the differences listed. --split_recipes shows each recipe as its own
row instead ("model [recipe 2]"), with a note saying what differs.

Every cell is the mean ± sample std (ddof=1) of test accuracy over all fold x seed runs of that
model on that dataset, with the number of runs. The runs a cell should have are all the folds x
all the seeds seen for that dataset (any model); a cell with fewer is marked † and a note lists
what is missing. --latex prints a complete booktabs tabular (best mean per dataset in bold, params
and FLOPs columns) that a paper can \\input.

--ref M pairs every other model's runs with M's on the same (dataset, fold, seed) and reports, per
dataset and pooled over datasets, the number of pairs, the mean difference (M minus the model),
and the p-values of the Wilcoxon signed-rank test and the paired t-test.

The table goes to stdout or --out. The --summary and --ref reports follow it in text mode; with
--latex, --markdown or --csv they go to stdout when --out is given, else to stderr, so that stdout
stays a clean file.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

import datasets
import models
import utils
from utils import UserError

DAGGER = "†"
STD_NOTE = "mean ± std over all fold x seed runs (sample std, ddof=1)"
# train.py settings that are not part of a run's recipe: which cell and which run it is, where
# data and runs live, how fast data is loaded, what is printed.
NOT_RECIPE = frozenset({"model", "tag", "dataset", "fold", "seed", "data_dir", "run_dir", "workers", "prefetch",
                        "cache", "no_progress", "force", "device", "benchmark_loader",
                        "refine"})   # --refine: each fold's run refines its own pruned file


# --------------------------------------------------------------------------------------------
# Reading runs: the one reader of results.json for tables, figures and the ablation table
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunResult:
    model: str
    tag: str
    dataset: str
    fold: int
    seed: int
    test_acc: float
    params: int | None
    flops: float | None
    path: Path                           # the run directory
    img_size: int | None = None          # the run's input size: its FLOPs are counted at this size
    classes: tuple[str, ...] = ()
    recipe: tuple[tuple[str, str], ...] = ()   # (setting, JSON value) of the config, NOT_RECIPE left out
    recipe_name: str = ""                # "recipe 2" when --split_recipes separates a model's recipes
    source: str = ""                     # PAPER_CODE for a run directory written by the paper's code

    @property
    def label(self) -> str:
        """model[-tag]: a run made with train.py --tag is its own row (and with --split_recipes, each
        recipe; a run of the paper's code is 'model [paper code]')."""
        label = models.run_label(self.model, self.tag)
        label += f" [{self.source}]" if self.source else ""
        return f"{label} [{self.recipe_name}]" if self.recipe_name else label

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) or None

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.label, self.dataset, self.fold, self.seed


@dataclasses.dataclass
class RunCollection:
    runs: list[RunResult]
    incomplete: list[Path]               # run directories without results.json
    unusable: list[tuple[Path, str]]     # results.json that cannot be used, and why
    duplicates: list[tuple[Path, Path]]  # (ignored, kept): the same run found twice
    recipe_notes: list[str] = dataclasses.field(default_factory=list)   # what each "[recipe k]" row is


def parse_results(path: Path) -> RunResult:
    """One results.json (ours, or the paper code's); ValueError says why it cannot be used."""
    try:
        results = json.loads(path.read_text())
        fields = {k: results[k] for k in ("model", "dataset", "fold", "seed", "test_acc")}
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable ({error})") from None
    except KeyError as error:
        raise ValueError(f"no {error} field") from None
    if is_paper_code_results(results):
        return parse_paper_code_results(results, fields, path)
    if fields["test_acc"] is None:
        raise ValueError("no test accuracy (the dataset has no test split)")
    if not math.isfinite(float(fields["test_acc"])):
        raise ValueError(f"the test accuracy is {fields['test_acc']} (the run diverged or evaluated nothing)")
    config = results.get("config") or {}
    recipe = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in NOT_RECIPE))
    return RunResult(str(fields["model"]), str(results.get("tag") or ""), str(fields["dataset"]),
                     int(fields["fold"]), int(fields["seed"]), float(fields["test_acc"]), results.get("params"),
                     results.get("flops"), path.parent, results.get("img_size", config.get("img_size")),
                     tuple(str(c) for c in results.get("classes") or ()), recipe)


PAPER_CODE = "paper code"


def is_paper_code_results(results: dict) -> bool:
    """The paper code's train.py writes params_M and no config into results.json (ours: params, config)."""
    return "params_M" in results and "config" not in results


def parse_paper_code_results(results: dict, fields: dict, path: Path) -> RunResult:
    """A results.json of the paper code (github.com/junbolian/TwistNet-2D): accuracies as fractions,
    params_M in millions, its arguments in config.json beside it (our recipe comparison reads those)."""
    test_acc = fields["test_acc"]
    if test_acc is None or not math.isfinite(float(test_acc)) or not 0 <= float(test_acc) <= 1:
        raise ValueError(f"the paper code's test accuracy should be a fraction in [0, 1], got {test_acc}")
    try:
        config = json.loads((path.parent / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {k: results[k] for k in ("epochs", "lr", "batch_size", "crop_scale", "pretrained") if k in results}
    config = {k: v for k, v in config.items()
              if k not in NOT_RECIPE and k not in ("num_workers", "resume", "checkpoint")}
    recipe = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items()))
    params_m = results.get("params_M")
    return RunResult(str(fields["model"]), "", str(fields["dataset"]), int(fields["fold"]), int(fields["seed"]),
                     100 * float(test_acc), int(round(params_m * 1e6)) if params_m else None, None, path.parent,
                     config.get("img_size"), (), recipe, source=PAPER_CODE)


def run_directories(root: Path) -> list[Path]:
    if (root / "results.json").is_file():
        return [root]  # a single run directory given directly
    if not root.is_dir():
        raise UserError(f"--run_dir {root} is not a directory")
    return sorted(p for p in root.iterdir() if p.is_dir())


def load_runs(run_dirs: Iterable[str | Path]) -> RunCollection:
    found = RunCollection([], [], [], [])
    seen: dict[tuple, RunResult] = {}
    for root in map(Path, run_dirs):
        for run_path in run_directories(root):
            results_path = run_path / "results.json"
            if not results_path.is_file():
                found.incomplete.append(run_path)
                continue
            try:
                run = parse_results(results_path)
            except ValueError as error:
                found.unusable.append((results_path, str(error)))
                continue
            if run.key in seen:
                # The same run twice (overlapping --run_dir folders) would count twice in a mean.
                found.duplicates.append((run.path, seen[run.key].path))
                continue
            seen[run.key] = run
            found.runs.append(run)
    return found


def load_results(run_dirs: Iterable[str | Path]) -> list[RunResult]:
    """The finished runs below `run_dirs`, warning about what was left out (figures, ablation);
    a UserError if a cell mixes recipes (see recipe_conflicts)."""
    found = load_runs(run_dirs)
    for path, why in found.unusable:
        warnings.warn(f"{path}: {why}; skipped")
    for ignored, kept in found.duplicates:
        warnings.warn(f"{ignored} repeats {kept}; counted once")
    refuse_mixed_recipes(found.runs)
    return found.runs


# --------------------------------------------------------------------------------------------
# Recipes: a mean over runs of different recipes is no result
# --------------------------------------------------------------------------------------------
def recipe_differences(runs: Sequence[RunResult]) -> list[str]:
    """'setting: value1 | value2' for the settings that differ among `runs`; a setting some
    runs lack (written by an older train.py) cannot be compared and is left out."""
    shared = set.intersection(*(set(dict(r.recipe)) for r in runs)) if runs else set()
    lines = []
    for key in sorted(shared):
        values = sorted({dict(r.recipe)[key] for r in runs})
        if len(values) > 1:
            lines.append(f"{key}: {' | '.join(values)}")
    return lines


def recipe_conflicts(runs: Sequence[RunResult]) -> dict[tuple[str, str], list[str]]:
    """(label, dataset) -> the settings that differ, for every cell whose runs mix recipes."""
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        cells.setdefault((run.label, run.dataset), []).append(run)
    return {key: diff for key, group in cells.items() if (diff := recipe_differences(group))}


def refuse_mixed_recipes(runs: Sequence[RunResult]) -> None:
    conflicts = recipe_conflicts(runs)
    if conflicts:
        shown = "; ".join(f"{label} on {dataset} ({', '.join(diff)})" for (label, dataset), diff
                          in sorted(conflicts.items())[:4])
        raise UserError(f"{len(conflicts)} cell(s) mix runs of different recipes, so their mean would be "
                        f"no result: {shown}. Give --run_dir folders that hold one recipe each, or (summarize_runs.py) "
                        f"--split_recipes to show every recipe as its own row.")


def split_recipes(runs: Sequence[RunResult]) -> tuple[list[RunResult], list[str]]:
    """Runs relabelled 'model [recipe k]' where a model's cells mix recipes, and notes saying
    what each recipe is (the settings in which they differ)."""
    mixed = {label for label, _ in recipe_conflicts(runs)}
    out, notes = [], []
    for label in sorted(mixed):
        group = [r for r in runs if r.label == label]
        recipes = sorted({r.recipe for r in group})
        differing = [line.split(":")[0] for line in recipe_differences(group)]
        for number, recipe in enumerate(recipes, start=1):
            values = dict(recipe)
            notes.append(f"{label} [recipe {number}]: " + ", ".join(f"{k}={values.get(k, '?')}" for k in differing))
        out += [dataclasses.replace(r, recipe_name=f"recipe {recipes.index(r.recipe) + 1}") for r in group]
    out += [r for r in runs if r.label not in mixed]
    return out, notes


@dataclasses.dataclass(frozen=True)
class Stats:
    """Mean and sample std (ddof 1; None for a single value, where it is undefined) of some runs."""
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n >= 2 else None

    @property
    def error_bar(self) -> float:
        """The std for error bars: none drawn for a single run."""
        return self.std or 0.0


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell(Stats):
    missing: tuple[tuple[int, int], ...] = ()  # (fold, seed) pairs expected but absent


@dataclasses.dataclass
class Table:
    labels: list[str]
    datasets: list[str]
    cells: dict[tuple[str, str], Cell]   # absent: the model was never run on that dataset
    params: dict[str, list[int]]
    flops: dict[str, list[float]]
    img_sizes: frozenset[int] = frozenset()

    def flops_header(self) -> str:
        """FLOPs column title; names the input size when the runs were not made at 224 px."""
        if not self.img_sizes or self.img_sizes == {224}:
            return "FLOPs (G)"
        if len(self.img_sizes) == 1:
            return f"FLOPs (G, {next(iter(self.img_sizes))} px)"
        return "FLOPs (G, mixed px)"

    def best_labels(self, dataset: str, digits: int = 2) -> set[str]:
        """Rows whose mean, as printed, is the column's highest (ties all count)."""
        shown = {label: round(self.cells[label, dataset].mean, digits)
                 for label in self.labels if (label, dataset) in self.cells}
        top = max(shown.values(), default=None)
        return {label for label, value in shown.items() if value == top}

    def flagged(self) -> list[tuple[str, str, Cell]]:
        return [(label, dataset, self.cells[label, dataset]) for label in self.labels
                for dataset in self.datasets if (label, dataset) in self.cells and self.cells[label, dataset].missing]


def expected_runs(runs: Iterable[RunResult]) -> dict[str, set[tuple[int, int]]]:
    """Per dataset, every fold seen x every seed seen: the grid a complete sweep fills."""
    folds: dict[str, set[int]] = {}
    seeds: dict[str, set[int]] = {}
    for run in runs:
        folds.setdefault(run.dataset, set()).add(run.fold)
        seeds.setdefault(run.dataset, set()).add(run.seed)
    return {d: set(itertools.product(folds[d], seeds[d])) for d in folds}


def build_table(runs: Sequence[RunResult], labels: Sequence[str] | None = None) -> Table:
    """The model x dataset table; `labels` chooses the rows and their order (default: all, sorted)."""
    # Expected runs come from every model, also those filtered out: they define the sweep.
    expected = expected_runs(runs)
    labels = list(labels) if labels else sorted({r.label for r in runs})
    chosen = [r for r in runs if r.label in labels]
    names = sorted({r.dataset for r in chosen}, key=datasets.dataset_sort_key)
    groups: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for run in chosen:
        groups.setdefault((run.label, run.dataset), {})[run.fold, run.seed] = run.test_acc
    cells = {key: Cell(tuple(values[k] for k in sorted(values)),
                       tuple(sorted(expected[key[1]] - set(values))))
             for key, values in groups.items()}
    params = {label: [r.params for r in chosen if r.label == label and r.params is not None] for label in labels}
    flops = {label: [r.flops for r in chosen if r.label == label and r.flops is not None] for label in labels}
    img_sizes = frozenset(r.img_size for r in chosen if r.img_size is not None)
    return Table(labels, names, cells, params, flops, img_sizes)


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------
def complexity_text(values: Sequence[float], scale: float, dash: str = "–", none: str = "—") -> str:
    """Params or FLOPs of a model in M or G; a range when datasets differ (classifier size)."""
    shown = sorted({round(v / scale, 2) for v in values})
    if not shown:
        return none
    return f"{shown[0]:.2f}" if len(shown) == 1 else f"{shown[0]:.2f}{dash}{shown[-1]:.2f}"


def missing_text(missing: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"fold {f} seed {s}" for f, s in missing)


def cell_text(cell: Cell | None, best: bool = False, bold: tuple[str, str] = ("", ""),
              pm: str = "±", dagger: str = DAGGER, with_n: bool = True) -> str:
    if cell is None:
        return "—"
    mean = f"{bold[0]}{cell.mean:.2f}{bold[1]}" if best else f"{cell.mean:.2f}"
    text = mean if cell.std is None else f"{mean} {pm} {cell.std:.2f}"
    if with_n:
        text += f" ({cell.n})"
    return text + (dagger if cell.missing else "")


def row_display_name(label: str) -> str:
    """The paper name of a row, with its ' [recipe k]' (see --split_recipes) kept."""
    base, bracket, rest = label.partition(" [")
    return models.display_name(base) + (f" [{rest}" if bracket else "")


def align(rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Columns padded to a common width: names (the `left` columns) flush left, numbers flush right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def note_lines(table: Table, found: RunCollection) -> list[str]:
    lines = [f"{DAGGER} {label} on {dataset}: {cell.n} of {cell.n + len(cell.missing)} runs, "
             f"missing {missing_text(cell.missing)}" for label, dataset, cell in table.flagged()]
    if found.incomplete:
        count = len(found.incomplete)
        lines.append(f"{count} incomplete run director{'y' if count == 1 else 'ies'} (no results.json) "
                     f"left out: " + ", ".join(p.name for p in found.incomplete))
    lines += [f"left out {path}: {why}" for path, why in found.unusable]
    lines += [f"duplicate run {ignored} ignored (kept {kept})" for ignored, kept in found.duplicates]
    lines += found.recipe_notes
    return lines


# --------------------------------------------------------------------------------------------
# Output formats
# --------------------------------------------------------------------------------------------
def format_text(table: Table, found: RunCollection) -> str:
    header = ["Model", *table.datasets, "Params (M)", table.flops_header()]
    rows = [[label, *(cell_text(table.cells.get((label, d))) for d in table.datasets),
             complexity_text(table.params[label], 1e6), complexity_text(table.flops[label], 1e9)]
            for label in table.labels]
    lines = [f"Test accuracy (%): {STD_NOTE}; (n) = runs in the cell", *align([header, *rows])]
    notes = note_lines(table, found)
    return "\n".join(lines + ([""] + notes if notes else []))


def format_markdown(table: Table, found: RunCollection) -> str:
    header = ["Model", *table.datasets, "Params (M)", table.flops_header()]
    best = {d: table.best_labels(d) for d in table.datasets}
    rows = [[utils.markdown_escape(label), *(cell_text(table.cells.get((label, d)), label in best[d], ("**", "**"))
                      for d in table.datasets),
             complexity_text(table.params[label], 1e6), complexity_text(table.flops[label], 1e9)]
            for label in table.labels]
    lines = [f"Test accuracy (%): {STD_NOTE}; (n) = runs in the cell; best per dataset in bold.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * len(table.datasets)
                                                              + ["---:", "---:"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = note_lines(table, found)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def format_latex(table: Table, found: RunCollection) -> str:
    n_cols = 1 + len(table.datasets) + 2
    best = {d: table.best_labels(d) for d in table.datasets}
    counts = sorted({cell.n + len(cell.missing) for cell in table.cells.values()})
    runs_note = f"{counts[0]} runs per cell" if len(counts) == 1 else "runs per cell vary by dataset"
    lines = [f"% summarize_runs.py: test accuracy (%), {STD_NOTE}.",
             *(f"% {line}" for line in note_lines(table, found)),
             r"\begin{tabular}{l" + "c" * len(table.datasets) + "rr}", r"\toprule",
             " & ".join(["Model", *(utils.tex_escape(datasets.dataset_display_name(d)) for d in table.datasets),
                         "Params (M)", table.flops_header()]) + r" \\", r"\midrule"]
    for label in table.labels:
        cells = [cell_text(table.cells.get((label, d)), label in best[d], (r"\textbf{", "}"),
                           pm=r"$\pm$", dagger=r"$^\dagger$", with_n=False).replace("—", "--")
                 for d in table.datasets]
        lines.append(" & ".join([utils.tex_escape(row_display_name(label)), *cells,
                                 complexity_text(table.params[label], 1e6, "--", "--"),
                                 complexity_text(table.flops[label], 1e9, "--", "--")]) + r" \\")
    lines.append(r"\bottomrule")
    lines.append(rf"\multicolumn{{{n_cols}}}{{@{{}}l}}{{\footnotesize Test accuracy (\%), mean $\pm$ std "
                 rf"over all fold $\times$ seed runs ({runs_note}); best in bold.}} \\")
    flagged = table.flagged()
    if flagged:
        short = "; ".join(f"{utils.tex_escape(row_display_name(label))} on {utils.tex_escape(datasets.dataset_display_name(d))} "
                          f"{cell.n}/{cell.n + len(cell.missing)}" for label, d, cell in flagged)
        lines.append(rf"\multicolumn{{{n_cols}}}{{@{{}}l}}{{\footnotesize $^\dagger$ incomplete: {short}.}} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines)


def format_csv(table: Table, found: RunCollection) -> str:
    """One row per (model, dataset): the tidy form that spreadsheets and pandas read directly."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "dataset", "n_runs", "n_expected", "mean", "std", "missing", "params", "flops"])
    for label in table.labels:
        for dataset in table.datasets:
            cell = table.cells.get((label, dataset))
            if cell is None:
                continue
            sizes = [r for r in found.runs if r.label == label and r.dataset == dataset]
            params = next((r.params for r in sizes if r.params is not None), "")
            flops = next((r.flops for r in sizes if r.flops is not None), "")
            writer.writerow([label, dataset, cell.n, cell.n + len(cell.missing), f"{cell.mean:.4f}",
                             "" if cell.std is None else f"{cell.std:.4f}",
                             ";".join(f"{f}:{s}" for f, s in cell.missing), params, flops])
    return out.getvalue().rstrip("\n")


FORMATTERS = {"text": format_text, "markdown": format_markdown, "latex": format_latex, "csv": format_csv}


# --------------------------------------------------------------------------------------------
# Reports: ranking and paired tests
# --------------------------------------------------------------------------------------------
def format_ranking(table: Table) -> str:
    lines = [f"Ranking per dataset (test accuracy, {STD_NOTE}):"]
    for dataset in table.datasets:
        ranked = sorted(((table.cells[label, dataset], label) for label in table.labels
                         if (label, dataset) in table.cells), key=lambda item: -item[0].mean)
        lines.append(f"{dataset}:")
        top = ranked[0][0].mean
        rows = [[f"{rank}. {label}", cell_text(cell), "" if rank == 1 else f"{cell.mean - top:+.2f}"]
                for rank, (cell, label) in enumerate(ranked, start=1)]
        lines += ["  " + line for line in align(rows)]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    model: str
    dataset: str  # "all" when pooled over datasets
    n: int
    mean_diff: float
    wilcoxon_p: float
    ttest_p: float
    note: str


def paired_test(ref_values: Sequence[float], other_values: Sequence[float]) -> tuple[float, float, str]:
    """(Wilcoxon p, paired t-test p, note) for matched values; NaN where a test is undefined."""
    diffs = np.asarray(ref_values, dtype=float) - np.asarray(other_values, dtype=float)
    if len(diffs) < 2:
        return math.nan, math.nan, "n < 2: no test"
    if not diffs.any():
        return 1.0, 1.0, "all differences are 0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties and tiny samples; the note says so
        wilcoxon_p = float(stats.wilcoxon(ref_values, other_values).pvalue)
        if np.ptp(diffs) == 0:
            # No spread: t = mean / (0 / sqrt(n)) is infinite and scipy would print p = 0, a
            # certainty that n runs with one constant gap do not give.
            return wilcoxon_p, math.nan, "constant difference: t undefined"
        ttest_p = float(stats.ttest_rel(ref_values, other_values).pvalue)
    return wilcoxon_p, ttest_p, ""


def paired_tests(runs: Sequence[RunResult], ref: str, labels: Sequence[str]) -> list[PairedTest]:
    by_key = {(r.label, r.dataset, r.fold, r.seed): r.test_acc for r in runs}
    ref_keys = sorted(k[1:] for k in by_key if k[0] == ref)
    tests = []
    for label in (l for l in labels if l != ref):
        pairs = [(d, by_key[(ref, d, f, s)], by_key[(label, d, f, s)])
                 for d, f, s in ref_keys if (label, d, f, s) in by_key]
        names = sorted({d for d, _, _ in pairs}, key=datasets.dataset_sort_key)
        groups = [(d, [p for p in pairs if p[0] == d]) for d in names]
        if len(names) > 1:
            groups.append(("all", pairs))
        for dataset, group in groups:
            ref_values, other_values = [p[1] for p in group], [p[2] for p in group]
            wilcoxon_p, ttest_p, note = paired_test(ref_values, other_values)
            mean_diff = statistics.fmean(np.subtract(ref_values, other_values)) if group else math.nan
            tests.append(PairedTest(label, dataset, len(group), mean_diff, wilcoxon_p, ttest_p, note))
        if not pairs:
            tests.append(PairedTest(label, "-", 0, math.nan, math.nan, math.nan, f"no run matches {ref}'s"))
    return tests


def p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.4g}"


def format_paired_tests(tests: Sequence[PairedTest], ref: str) -> str:
    header = ["model", "dataset", "n pairs", f"mean diff ({ref} - model)", "Wilcoxon p", "paired t p", "note"]
    rows = [[t.model, t.dataset, str(t.n), "n/a" if math.isnan(t.mean_diff) else f"{t.mean_diff:+.3f}",
             p_text(t.wilcoxon_p), p_text(t.ttest_p), t.note] for t in tests]
    title = (f"Paired tests against {ref} on runs matched by (dataset, fold, seed); "
             f"Wilcoxon signed-rank and paired t-test, two-sided:")
    if not rows:
        return f"{title}\n  (no other model to compare)"
    return "\n".join([title, *align([header, *rows], left=(0, 1, 6))])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run_dir", required=True, nargs="+", action="extend",
                   help="one or more folders of run directories")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--latex", action="store_true", help="booktabs tabular for \\input")
    fmt.add_argument("--markdown", action="store_true", help="Markdown table")
    fmt.add_argument("--csv", action="store_true", help="CSV, one row per model and dataset")
    p.add_argument("--out", default=None, help="write the table to this file instead of stdout")
    p.add_argument("--models", default=None,
                   help="comma-separated model names (model or model-tag), in the row order wanted")
    p.add_argument("--summary", action="store_true", help="also rank the models on every dataset")
    p.add_argument("--ref", default=None, help="reference model for paired tests, e.g. twistnet18")
    p.add_argument("--split_recipes", action="store_true",
                   help="show each recipe of a model as its own row ('model [recipe k]') instead of refusing "
                        "cells that mix recipes")
    return p


def output_format(args: argparse.Namespace) -> str:
    return "latex" if args.latex else "markdown" if args.markdown else "csv" if args.csv else "text"


def chosen_labels(args: argparse.Namespace, runs: Sequence[RunResult]) -> list[str] | None:
    if not args.models:
        return None
    labels = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    known = sorted({r.label for r in runs})
    for label in labels:
        if label not in known:
            print(f"warning: no finished run of '{label}' (found: {', '.join(known)})", file=sys.stderr)
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    found = load_runs(args.run_dir)
    if not found.runs:
        print(f"No finished runs (results.json) under {', '.join(args.run_dir)}; "
              f"{len(found.incomplete)} incomplete run directories.", file=sys.stderr)
        return 1
    if args.split_recipes:
        found.runs, recipe_notes = split_recipes(found.runs)
        found.recipe_notes = recipe_notes
    else:
        refuse_mixed_recipes(found.runs)
    labels = chosen_labels(args, found.runs)
    if args.ref and args.ref not in {r.label for r in found.runs}:
        parser.error(f"--ref {args.ref}: no finished run of that model")
    table = build_table(found.runs, labels)
    fmt = output_format(args)
    text = FORMATTERS[fmt](table, found)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)

    reports = []
    if args.summary:
        reports.append(format_ranking(table))
    if args.ref:
        rows = table.labels if args.ref in table.labels else [args.ref, *table.labels]
        reports.append(format_paired_tests(paired_tests(found.runs, args.ref, rows), args.ref))
    if reports:
        stream = sys.stdout if fmt == "text" or args.out else sys.stderr
        print("\n" + "\n\n".join(reports), file=stream)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
