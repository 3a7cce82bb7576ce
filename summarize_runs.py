"""Summarize finished runs: test accuracy per model and dataset, rankings and paired tests.

Usage:
    python summarize_runs.py --run_dir runs/main                        # plain-text table
    python summarize_runs.py --run_dir runs/main --latex > tables/main_results.tex
    python summarize_runs.py --run_dir runs/main runs/extra --markdown
    python summarize_runs.py --run_dir runs/main --csv --out results.csv
    python summarize_runs.py --run_dir runs/main --models resnet18,twistnet18 --summary
    python summarize_runs.py --run_dir runs/main --ref twistnet18       # paired tests vs a reference
    python summarize_runs.py --run_dir runs/main --runs                 # every run: protocol, weights

Each --run_dir is a folder of run directories written by train.py (docs/TRAINING.md "The run directory"). A run
counts when its results.json exists; run directories without one are counted as incomplete and
left out, and so, with a note naming the file and why, is a malformed results.json (not a JSON
object, a field of the wrong type) or one whose test accuracy is no percentage in [0, 100] (NaN, a
string, 1e308, -5): the table of the other runs still prints. A model's name is
results["model"], plus "-<tag>" when the run had a tag. Run directories written by the paper's own code
(github.com/junbolian/TwistNet-2D: accuracies as fractions, params_M) are read too, converted to
percent, and shown as their own rows, "model [paper code]", so both can sit in one table.

The runs of one cell must share one recipe (every train.py setting but fold, seed and where data
and runs live): a cell that mixes recipes, e.g. a sweep re-run with other --epochs into the same
--run_dir, is refused with the differences listed; so is a cell mixing --split_protocol default and
paper_code runs (a run made before that option existed counts as default). --split_recipes shows
each recipe as its own row instead ("model [recipe 2]"), with a note saying what differs. --runs
lists every run with its split protocol and what started it (results.json "init": file and
sha256 or hub tag, transfer policy, tensors mapped / skipped / left at init).

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
from helpers import utils
from helpers.runrecords import (LEGACY_DEFAULTS, RunCollection, RunResult, Stats, load_runs, refuse_mixed_recipes,
                                split_recipes)

DAGGER = "†"
STD_NOTE = "mean ± std over all fold x seed runs (sample std, ddof=1)"


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


def format_run_listing(runs: Sequence[RunResult]) -> str:
    """One line per run: where it is, its test accuracy, its split protocol and its init."""
    lines = ["Runs (test accuracy | split protocol | init):"]
    for run in sorted(runs, key=lambda r: (datasets.dataset_sort_key(r.dataset), r.label, r.fold, r.seed)):
        protocol = json.loads(dict(run.recipe).get("split_protocol",
                                                    json.dumps(LEGACY_DEFAULTS["split_protocol"])))
        init = run.init or "init not recorded"
        lines.append(f"  {run.path.name}: {run.test_acc:.2f}% | {protocol} | {init}")
    return "\n".join(lines)


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
    p.add_argument("--runs", action="store_true",
                   help="also list every run: test accuracy, split protocol and what started it (results.json init)")
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
    if args.runs:
        reports.append(format_run_listing(found.runs))
    if args.ref:
        rows = table.labels if args.ref in table.labels else [args.ref, *table.labels]
        reports.append(format_paired_tests(paired_tests(found.runs, args.ref, rows), args.ref))
    if reports:
        stream = sys.stdout if fmt == "text" or args.out else sys.stderr
        print("\n" + "\n\n".join(reports), file=stream)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
