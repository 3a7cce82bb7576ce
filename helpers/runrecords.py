"""Reading run directories: the one reader of results.json for tables, figures and the ablation table.

A run counts when its results.json exists. Runs of train.py and of the paper's own code
(accuracies as fractions, params_M) are both read, the latter as rows "model [paper code]".

Usage:
    from helpers.runrecords import load_results, Stats
    runs = load_results(["runs/main"])                 # list[RunResult], NaN accuracies left out
    Stats(tuple(r.test_acc for r in runs)).mean        # mean and sample std (ddof 1)
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import models
from helpers.utils import UserError

# train.py settings that are not part of a run's recipe: which cell and which run it is, where
# data and runs live, how fast data is loaded, what is printed.
NOT_RECIPE = frozenset({"model", "tag", "dataset", "fold", "seed", "data_dir", "run_dir", "workers", "prefetch",
                        "cache", "cache_max_short", "no_progress", "force", "device", "benchmark_loader",
                        "refine"})   # --refine: each fold's run refines its own pruned file
# Settings added to train.py after runs were made: what those runs did, so that a cell mixing an older
# run with a new one that differs (e.g. --split_protocol paper_code) is refused, not waved through.
LEGACY_DEFAULTS = {"split_protocol": "default", "exif": "on"}


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
    init: str = ""                       # what started it (models.init_summary of results.json "init")

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
    """One results.json (ours, or the paper code's); ValueError says why it cannot be used: not a
    JSON object, a field missing or of the wrong type, an accuracy that is no percentage."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:   # ValueError: bad JSON, or bytes that are no text
        raise ValueError(f"unreadable ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"not a JSON object of run fields (a {type(results).__name__}: {_shown(results)})")
    try:
        fields = {k: results[k] for k in ("model", "dataset", "fold", "seed", "test_acc")}
    except KeyError as error:
        raise ValueError(f"no {error} field") from None
    for key in ("model", "dataset"):
        if not isinstance(fields[key], str) or not fields[key]:
            raise ValueError(f"{key} is {_shown(fields[key])}, not a name")
    for key in ("fold", "seed"):
        if not _is_integer(fields[key]):
            raise ValueError(f"{key} is {_shown(fields[key])}, not an integer")
    if not isinstance(results.get("config") or {}, dict):
        raise ValueError(f"config is {_shown(results['config'])}, not an object of settings")
    if is_paper_code_results(results):
        return parse_paper_code_results(results, fields, path)
    if fields["test_acc"] is None:
        raise ValueError("no test accuracy (the dataset has no test split)")
    test_acc = _accuracy(fields["test_acc"], 100.0, "a percentage in [0, 100]")
    config = results.get("config") or {}
    if config:
        config = {**LEGACY_DEFAULTS, **config}
    recipe = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in NOT_RECIPE))
    img_size = results.get("img_size", config.get("img_size"))
    classes = results.get("classes") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes is {_shown(classes)}, not a list of names")
    if not isinstance(results.get("init") or {}, dict):
        raise ValueError(f"init is {_shown(results['init'])}, not an object")
    return RunResult(fields["model"], str(results.get("tag") or ""), fields["dataset"], fields["fold"],
                     fields["seed"], test_acc, _count(results, "params"), _count(results, "flops"), path.parent,
                     img_size if _is_integer(img_size) else None, tuple(classes), recipe,
                     init=models.init_summary(results.get("init")) or "init not recorded (an older train.py)")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _accuracy(value: object, top: float, expected: str) -> float:
    """A test accuracy as a float in [0, top]; ValueError naming the value otherwise."""
    if not _is_real(value):
        raise ValueError(f"the test accuracy is {_shown(value)}, not a number")
    if not math.isfinite(value):
        raise ValueError(f"the test accuracy is {value} (the run diverged or evaluated nothing)")
    if not 0 <= value <= top:
        raise ValueError(f"the test accuracy is {value:g}, not {expected}")
    return float(value)


def _count(results: dict, key: str) -> float | None:
    """A parameter or FLOP count (a non-negative number) or None; ValueError for anything else."""
    value = results.get(key)
    if value is None:
        return None
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} is {_shown(value)}, not a count")
    return value


PAPER_CODE = "paper code"


def is_paper_code_results(results: dict) -> bool:
    """The paper code's train.py writes params_M and no config into results.json (ours: params, config)."""
    return "params_M" in results and "config" not in results


def parse_paper_code_results(results: dict, fields: dict, path: Path) -> RunResult:
    """A results.json of the paper code (github.com/junbolian/TwistNet-2D): accuracies as fractions,
    params_M in millions, its arguments in config.json beside it (our recipe comparison reads those)."""
    test_acc = _accuracy(fields["test_acc"], 1.0, "the paper code's fraction in [0, 1]")
    try:
        config = json.loads((path.parent / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        config = {k: results[k] for k in ("epochs", "lr", "batch_size", "crop_scale", "pretrained") if k in results}
    config = {k: v for k, v in config.items()
              if k not in NOT_RECIPE and k not in ("num_workers", "resume", "checkpoint")}
    config["split_protocol"] = "paper_code"   # its own splits, whatever the dataset
    recipe = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items()))
    params_m = _count(results, "params_M")
    img_size = config.get("img_size")
    return RunResult(fields["model"], "", fields["dataset"], fields["fold"], fields["seed"],
                     100 * test_acc, int(round(params_m * 1e6)) if params_m else None, None, path.parent,
                     img_size if _is_integer(img_size) else None, (), recipe, source=PAPER_CODE)


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
