"""The TwistNet-18 ablation study in one command: train every variant, then write the table.

Usage:
    python ablation.py --dataset synthtex --folds 1-3 --seeds 42 --epochs 30 --run_dir runs/ablation
    python ablation.py --data_dir data/dtd --dataset dtd --folds 1-3 --seeds 42,43,44 --epochs 100 \\
        --run_dir runs/ablation --sweeps r,heads --jobs 2 --pretrained
    python ablation.py ... --dry_run        # print the run_all.py commands; run and write nothing
    python ablation.py ... --table_only     # (re)write the table from the finished runs only

Variants (all read from the registry in models.py):
    registry ablations  the full model twistnet18, then every TwistNet of group "ablation"
                        (twistnet18_no_spiral, twistnet18_no_ais, twistnet18_first_order):
                        one run_all.py command for all of them (models.ablation_variants());
    STCI sweeps         TwistNet-18 with one hyper-parameter changed, through train.py's
                        --model_kwargs '<json>' --tag <name>, one run_all.py command each
                        (models.SWEEP_FAMILIES):
                        r       {4, 16}         tags r4, r16          (--r_values)
                        heads   {1, 2}          tags heads1, heads2   (--heads_values)
                        gate_init {0.0, -4.0}   tags gate0, gate-4    (--gate_init_values)
                        stages  [4], [2,3,4]    tags stages4, stages234 (--stages_values "4;2,3,4")
                        (--sweeps picks the families; --sweeps none runs the registry ablations only).

Every option this script does not know (e.g. --img_size 64 --batch_size 16 --pretrained) is passed
through run_all.py to train.py. Runs that already finished are skipped by train.py itself, so the
command can be repeated after an interruption.

Writes <run_dir>/ablation_table.md and <run_dir>/ablation_table.tex (booktabs) and prints the
markdown: per variant its parameter count (built with models.build_model for the dataset's class
count), test accuracy mean ± sample std over the fold x seed runs of this plan, and the difference
of the means to the full model. The figure: python plot_results.py --plot ablation --run_dir <run_dir>.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import datasets
import models
from helpers import recipes, utils
from helpers.runrecords import RunResult, Stats, load_results
from helpers.utils import UserError

ROOT = Path(__file__).resolve().parent
FULL_MODEL = models.full_model()
SWEEP_DEFAULTS: Mapping[str, tuple] = MappingProxyType({name: f.defaults for name, f in models.SWEEP_FAMILIES.items()})
# Options ablation.py sets per variant: passing them through would contradict the plan.
RESERVED_PASSTHROUGH = ("--model", "--models", "--model_kwargs", "--tag", "--fold", "--seed")


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: a registry model, optionally with changed STCI hyper-parameters."""
    model: str
    tag: str = ""
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def label(self) -> str:
        return models.run_label(self.model, self.tag)


@dataclass(frozen=True)
class Row:
    variant: Variant
    params: int | None
    stats: Stats | None
    delta: float | None


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------
def sweep_variant(family: str, value: Any) -> Variant:
    """The TwistNet-18 variant with one STCI hyper-parameter set to `value`."""
    if family not in models.SWEEP_FAMILIES:
        raise UserError(f"Unknown sweep '{family}'; choose from {', '.join(SWEEP_DEFAULTS)}")
    sweep = models.SWEEP_FAMILIES[family]
    return Variant(FULL_MODEL, sweep.tag(value), {family: sweep.to_kwarg(value)}, sweep.describe(value))


def plan_variants(sweeps: Sequence[str] = tuple(SWEEP_DEFAULTS),
                  values: Mapping[str, Sequence[Any]] | None = None) -> list[Variant]:
    """The registry ablations, then every value of every requested sweep, in that order."""
    values = {**SWEEP_DEFAULTS, **(values or {})}
    variants = [Variant(model, description=models.get_spec(model).description)
                for model in models.ablation_variants()]
    for family in sweeps:
        if family not in SWEEP_DEFAULTS:
            raise UserError(f"Unknown sweep '{family}'; choose from {', '.join(SWEEP_DEFAULTS)}")
        variants += [sweep_variant(family, v) for v in values[family]]
    return variants


@dataclass(frozen=True)
class Settings:
    """What every run of the plan shares."""
    dataset: str
    folds: str
    seeds: str
    epochs: int | None
    run_dir: str
    data_dir: str | None = None
    jobs: int | None = None
    python: str = sys.executable
    recipe: str | None = None      # train.py --recipe; None: train.py's default


def plan_commands(settings: Settings, variants: Sequence[Variant],
                  passthrough: Sequence[str] = ()) -> list[list[str]]:
    """run_all.py command lines: one for all untagged variants, one per tagged (swept) variant."""
    common = ["--dataset", settings.dataset,
              *(["--data_dir", settings.data_dir] if settings.data_dir else []),
              "--folds", settings.folds, "--seeds", settings.seeds,
              *(["--epochs", str(settings.epochs)] if settings.epochs is not None else []),
              *(["--recipe", settings.recipe] if settings.recipe else []),
              "--run_dir", settings.run_dir,
              *(["--jobs", str(settings.jobs)] if settings.jobs else [])]
    head = [settings.python, str(ROOT / "run_all.py")]
    plain = [v.model for v in variants if not v.tag and not v.model_kwargs]
    commands = [[*head, "--models", ",".join(plain), *common, *passthrough]] if plain else []
    for v in variants:
        if v.tag or v.model_kwargs:
            commands.append([*head, "--models", v.model, *common,
                             "--model_kwargs", json.dumps(dict(v.model_kwargs), sort_keys=True),
                             "--tag", v.tag, *passthrough])
    return commands


def parse_values(text: str | None, cast: Callable[[str], Any], separator: str = ",") -> list[Any] | None:
    return [cast(v.strip()) for v in text.split(separator) if v.strip()] if text else None


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
def count_variant_params(variant: Variant, num_classes: int) -> int:
    """Parameters of the variant as built by models.build_model for `num_classes` classes."""
    model = models.build_model(variant.model, num_classes, pretrained=False, verbose=False,
                               **dict(variant.model_kwargs))
    return models.count_params(model)


def runs_of(variant: Variant, runs: Sequence[RunResult], dataset: str,
            folds: Sequence[int], seeds: Sequence[int]) -> list[RunResult]:
    return [r for r in runs if r.model == variant.model and r.tag == variant.tag
            and r.dataset == dataset and r.fold in folds and r.seed in seeds]


def ablation_rows(variants: Sequence[Variant], runs: Sequence[RunResult], dataset: str,
                  folds: Sequence[int], seeds: Sequence[int], num_classes: int | None = None) -> list[Row]:
    """Params, accuracy stats over this plan's runs, and delta of the mean to the full model."""
    if num_classes is None:
        counts = [r.num_classes for r in runs if r.dataset == dataset and r.num_classes]
        num_classes = counts[0] if counts else None
    stats = {}
    for v in variants:
        chosen = runs_of(v, runs, dataset, folds, seeds)
        stats[v.label] = Stats(tuple(r.test_acc for r in chosen)) if chosen else None
    full = stats.get(FULL_MODEL)
    rows = []
    for v in variants:
        s = stats[v.label]
        delta = s.mean - full.mean if s is not None and full is not None and v.label != FULL_MODEL else None
        params = count_variant_params(v, num_classes) if num_classes else None
        rows.append(Row(v, params, s, delta))
    return rows


def variant_name(variant: Variant) -> str:
    name = models.display_name(variant.label, short=True)
    return f"{name} (full)" if variant.label == FULL_MODEL else name


def format_cells(row: Row, minus: str = "-", pm: str = "±") -> list[str]:
    params = f"{row.params / 1e6:.2f}" if row.params is not None else "n/a"
    acc = "n/a" if row.stats is None else f"{row.stats.mean:.2f}" + (
        f" {pm} {row.stats.std:.2f}" if row.stats.std is not None else "")
    if row.variant.label == FULL_MODEL:
        delta = "ref." if row.stats else "n/a"
    else:
        delta = f"{row.delta:+.2f}".replace("-", minus) if row.delta is not None else "n/a"
    runs = str(row.stats.n) if row.stats else "0"
    return [params, acc, delta, runs]


HEADERS = ("Variant", "Params (M)", "Accuracy (%)", "Δ vs full", "Runs")


def markdown_table(rows: Sequence[Row], title: str = "") -> str:
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|")
    for row in rows:
        lines.append("| " + " | ".join([utils.markdown_escape(variant_name(row.variant)), *format_cells(row)]) + " |")
    return "\n".join(lines) + "\n"


def latex_table(rows: Sequence[Row], caption: str = "", label: str = "tab:ablation") -> str:
    """A booktabs table float; a rule separates the registry ablations from the sweeps."""
    lines = [r"\begin{table}[t]", r"  \centering"]
    if caption:
        lines.append(f"  \\caption{{{utils.tex_escape(caption)}}}")
    lines += [f"  \\label{{{label}}}", r"  \begin{tabular}{lrrrr}", r"    \toprule",
              r"    Variant & Params (M) & Accuracy (\%) & $\Delta$ vs full & Runs \\", r"    \midrule"]
    for i, row in enumerate(rows):
        if i and row.variant.tag and not rows[i - 1].variant.tag:
            lines.append(r"    \midrule")
        cells = format_cells(row, minus="$-$", pm="$\\pm$")
        cells[2] = cells[2].replace("+", "$+$")
        lines.append("    " + " & ".join([utils.tex_escape(variant_name(row.variant)), *cells]) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def table_title(dataset: str, folds: str, seeds: str) -> str:
    return (f"Ablation of TwistNet-18 on {datasets.dataset_display_name(dataset)} (folds {folds}, seeds {seeds}): "
            f"test accuracy mean ± std over runs, Δ = difference to the full model's mean")


def write_tables(rows: Sequence[Row], run_dir: str | Path, title: str) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    md, tex = run_dir / "ablation_table.md", run_dir / "ablation_table.tex"
    md.write_text(markdown_table(rows, title))
    tex.write_text(latex_table(rows, title))
    return md, tex


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # --seed must not silently mean --seeds
    p.add_argument("--dataset", default="synthtex", help="dataset protocol (train.py --dataset)")
    p.add_argument("--data_dir", default=None, help="dataset root (not needed for synthtex)")
    p.add_argument("--folds", default="1-3", help="run_all.py syntax: 1-3 or 1,2,5")
    p.add_argument("--seeds", default="42", help="e.g. 42,43,44")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the recipe's, 100 for paper)")
    p.add_argument("--recipe", default=None, choices=tuple(recipes.PRESETS),
                   help="train.py --recipe preset of every run (docs/TRAINING.md \"Recipes\")")
    p.add_argument("--run_dir", default="runs/ablation", help="folder of the ablation runs")
    p.add_argument("--sweeps", default=",".join(SWEEP_DEFAULTS),
                   help=f"STCI sweep families ({', '.join(SWEEP_DEFAULTS)}), or 'none'")
    for name, sweep in models.SWEEP_FAMILIES.items():
        p.add_argument(f"--{name}_values", default=None, help=sweep.cli_help)
    p.add_argument("--jobs", type=int, default=None, help="passed to run_all.py")
    p.add_argument("--dry_run", action="store_true", help="print the run_all.py commands and exit")
    p.add_argument("--table_only", action="store_true", help="skip training; tabulate finished runs")
    p.add_argument("--python", default=sys.executable, help="interpreter for run_all.py")
    return p


def sweep_families(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [s.strip() for s in text.split(",") if s.strip()]


def sweep_values_from_args(args: argparse.Namespace) -> dict[str, list]:
    given = {name: parse_values(getattr(args, f"{name}_values"), sweep.parse_value, sweep.cli_separator)
             for name, sweep in models.SWEEP_FAMILIES.items()}
    return {k: v for k, v in given.items() if v}


def check_passthrough(passthrough: Sequence[str]) -> None:
    clash = [a for a in passthrough if a.split("=")[0] in RESERVED_PASSTHROUGH]
    if clash:
        raise UserError(f"ablation.py sets {', '.join(RESERVED_PASSTHROUGH)} itself for each variant; "
                         f"remove {', '.join(clash)}")


def run_commands(commands: Sequence[Sequence[str]]) -> list[int]:
    """Run each command in turn (a failure does not stop the others); the failed indices."""
    if not (ROOT / "run_all.py").is_file():
        raise UserError(f"{ROOT / 'run_all.py'} not found: ablation.py trains through run_all.py")
    failed = []
    for i, cmd in enumerate(commands):
        print(f"\n[ablation {i + 1}/{len(commands)}] $ {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(i)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    check_passthrough(passthrough)
    try:
        folds, seeds = utils.parse_int_list(args.folds), utils.parse_int_list(args.seeds)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--folds/--seeds: {exc}")
    variants = plan_variants(sweep_families(args.sweeps), sweep_values_from_args(args))
    settings = Settings(args.dataset, args.folds, args.seeds, args.epochs, args.run_dir,
                        args.data_dir, args.jobs, args.python, args.recipe)
    commands = plan_commands(settings, variants, passthrough)
    if args.dry_run:
        print(f"# {len(variants)} variants: {', '.join(v.label for v in variants)}")
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    failed = [] if args.table_only else run_commands(commands)

    runs = load_results([args.run_dir]) if Path(args.run_dir).is_dir() else []
    rows = ablation_rows(variants, runs, args.dataset, folds, seeds)
    title = table_title(args.dataset, args.folds, args.seeds)
    md, tex = write_tables(rows, args.run_dir, title)
    print("\n" + markdown_table(rows, title))
    print(f"wrote {md} and {tex}")
    missing = [r.variant.label for r in rows if r.stats is None]
    if missing:
        print(f"no finished runs yet for: {', '.join(missing)}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} run_all.py command(s) failed: "
              + "; ".join(shlex.join(commands[i]) for i in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
