"""--train_per_class / --train_fraction: a stratified, nested, seed-independent subset of the training split."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import fixtures  # noqa: E402
import train  # noqa: E402
from helpers import train_cli, utils  # noqa: E402


def keys(samples) -> set:
    return {key for key, _ in samples}


@pytest.mark.parametrize("dataset", ["synthtex", "fmd"])
def test_subsets_are_stratified_nested_and_disjoint_from_val_and_test(dataset: str, fmd_root: Path) -> None:
    data_dir = None if dataset == "synthtex" else fmd_root
    full = datasets.load_splits(dataset, data_dir, 2)
    per_class_full = Counter(label for _, label in full.train)
    subsets = {n: datasets.load_splits(dataset, data_dir, 2, train_per_class=n) for n in (1, 2, 3)}
    for n, splits in subsets.items():
        counts = Counter(label for _, label in splits.train)
        assert counts == {label: min(n, size) for label, size in per_class_full.items()}   # stratified
        assert keys(splits.train) <= keys(full.train)
        assert not keys(splits.train) & (keys(full.val) | keys(full.test))
        assert (splits.val, splits.test) == (full.val, full.test)
    assert keys(subsets[1].train) < keys(subsets[2].train) < keys(subsets[3].train)   # nested
    fractions = {f: datasets.load_splits(dataset, data_dir, 2, train_fraction=f).train for f in (0.25, 0.5, 1.0)}
    assert keys(fractions[0.25]) < keys(fractions[0.5]) < keys(fractions[1.0]) == keys(full.train)
    assert Counter(label for _, label in fractions[0.5]) == {
        label: max(1, round(0.5 * size)) for label, size in per_class_full.items()}


def test_subsets_depend_on_the_fold_not_on_the_listing_order() -> None:
    samples = [(f"img{i:02d}.jpg", i % 3) for i in range(30)]
    one = datasets.train_subset("dtd", 1, samples, per_class=4)
    assert one == datasets.train_subset("dtd", 1, list(reversed(samples)), per_class=4)
    assert one != datasets.train_subset("dtd", 2, samples, per_class=4)
    # Not the first images of each class: a fixed random ranking.
    assert keys(one) != {key for key, label in samples if int(key[3:5]) < 12}


def test_the_subset_is_independent_of_seed_and_marks_the_run(tmp_path: Path) -> None:
    parser = train_cli.build_parser()
    base = ["--dataset", "synthtex", "--img_size", "32", "--workers", "0", "--train_per_class", "3"]
    data = {seed: train.build_loaders(parser.parse_args(base + ["--seed", str(seed)]), utils.resolve_device("cpu"))
            for seed in (1, 2)}
    assert data[1].fingerprint == data[2].fingerprint
    assert len(data[1].loaders["train"].dataset) == 3 * len(data[1].classes)
    plain = ["--dataset", "synthtex"]
    names = {train_cli.run_name(parser.parse_args(plain + extra)) for extra in
             (["--train_per_class", "3"], ["--train_per_class", "8"], ["--train_fraction", "0.5"],
              ["--train_per_class", "8", "--seed", "1"])}
    assert names == {"synthtex_fold1_twistnet18_seed42_n3", "synthtex_fold1_twistnet18_seed42_n8",
                     "synthtex_fold1_twistnet18_seed42_frac0.5", "synthtex_fold1_twistnet18_seed1_n8"}
    assert train_cli.run_name(parser.parse_args(plain)) == "synthtex_fold1_twistnet18_seed42"


@pytest.mark.parametrize("extra, message", [
    (["--train_per_class", "0"], "at least 1 training image"),
    (["--train_fraction", "1.5"], "in (0, 1]"),
    (["--train_per_class", "4", "--train_fraction", "0.5"], "give one"),
])
def test_bad_subsets_are_one_error_line(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    argv = ["--dataset", "synthtex", "--run_dir", str(tmp_path), *extra]
    assert message in fixtures.refused(train.main, argv, tmp_path, capsys)


@pytest.mark.slow
def test_a_subset_run_records_it_and_a_sweep_keeps_it_apart(tmp_path: Path) -> None:
    """One epoch on 2 images per class: results.json says so, and run_all (which reads finished runs
    to check they belong to its command) names, finds and skips it, beside the full-data name.
    The run also records --drop_path and --blurpool (one tiny run serves both)."""
    sweep = [sys.executable, str(ROOT / "run_all.py"), "--dataset", "synthtex", "--models", "resnet18",
             "--folds", "1", "--seeds", "42", "--epochs", "1", "--run_dir", str(tmp_path), "--img_size", "32",
             "--batch_size", "4", "--workers", "0", "--randaug_n", "0", "--mixup", "0", "--cutmix", "0",
             "--train_per_class", "2", "--drop_path", "0.1", "--blurpool"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(sweep, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "synthtex_fold1_resnet18_seed42_n2" / "results.json").read_text())
    assert (results["train_per_class"], results["train_fraction"]) == (2, None)
    assert results["train_images"] == 2 * len(results["classes"])
    assert (results["drop_path"], results["blurpool"]) == (0.1, True)
    again = subprocess.run(sweep + ["--dry_run"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "synthtex_fold1_resnet18_seed42_n2" in again.stdout and "skip" in again.stdout
