"""--split_protocol paper_code: the splits the paper's public code makes, checked against file lists
recorded from that code's own functions (tests/paper_code_splits.json, see its "_about") on the
same fixture trees built here."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import datasets
import fixtures

RECORDED = json.loads((Path(__file__).parent / "paper_code_splits.json").read_text())


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trees the recorded lists were made on: FMD 10 x 100, KTH-TIPS2-b 3 materials x 4 samples
    x 12, CUB 4 classes x (10 train + 3 test); tiny images (load_splits opens none)."""
    root = tmp_path_factory.mktemp("paper_trees")
    return {"fmd": fixtures.make_fmd(root / "fmd", classes=10, per_class=100, size=8),
            "kth_tips2": fixtures.make_kth_tips2(root / "kth", materials=3, per_sample=12, size=8),
            "cub200": fixtures.make_cub(root / "cub", classes=4, train_per_class=10, test_per_class=3, size=8).parent}


def relative(samples, base: Path) -> list[str]:
    return sorted(os.path.relpath(path, base).replace(os.sep, "/") for path, _ in samples)


def fmd_numbers(samples) -> dict[str, list[int]]:
    per_class: dict[str, list[int]] = {}
    for path, _ in samples:
        per_class.setdefault(Path(path).parent.name, []).append(int(re.search(r"_(\d{3})_new", path).group(1)))
    return {name: sorted(numbers) for name, numbers in sorted(per_class.items())}


@pytest.mark.parametrize("key", [k for k in RECORDED if k.startswith("fmd/")])
def test_fmd_paper_code_splits_equal_the_recorded_ones(trees, key):
    _, fold, seed = key.split("/")
    splits = datasets.load_splits("fmd", trees["fmd"], int(fold[4:]), split_protocol="paper_code", seed=int(seed[4:]))
    assert fmd_numbers(splits.val) == RECORDED[key]["val"]
    assert fmd_numbers(splits.test) == RECORDED[key]["test"]
    # 60/20/20 of every class's 100 images
    for samples, per_class in ((splits.train, 60), (splits.val, 20), (splits.test, 20)):
        counts = {label: sum(1 for _, lab in samples if lab == label) for label in range(10)}
        assert set(counts.values()) == {per_class}


@pytest.mark.parametrize("key", [k for k in RECORDED if k.startswith(("kth_tips2/", "cub200/"))])
def test_kth_and_cub_paper_code_splits_equal_the_recorded_ones(trees, key):
    dataset, fold, seed = key.split("/")
    splits = datasets.load_splits(dataset, trees[dataset], int(fold[4:]), split_protocol="paper_code",
                                  seed=int(seed[4:]))
    base = trees["kth_tips2"] if dataset == "kth_tips2" else trees["cub200"] / "CUB_200_2011" / "images"
    assert relative(splits.val, base) == sorted(RECORDED[key]["val"])
    if dataset == "kth_tips2":   # recorded as the held-out sample folders
        assert sorted({p.rsplit("/", 1)[0] for p in relative(splits.test, base)}) == RECORDED[key]["test"]
    else:
        assert relative(splits.test, base) == sorted(RECORDED[key]["test"])


def test_kth_paper_code_fold_1_tests_on_sample_d_ours_on_a(trees):
    ours = datasets.load_splits("kth_tips2", trees["kth_tips2"], 1)
    paper = datasets.load_splits("kth_tips2", trees["kth_tips2"], 1, split_protocol="paper_code", seed=42)
    assert {Path(p).parent.name for p, _ in ours.test} == {"sample_a"}
    assert {Path(p).parent.name for p, _ in paper.test} == {"sample_d"}


def test_fmd_paper_code_folds_are_no_cross_validation_and_move_with_the_seed(trees):
    def test_set(fold: int, seed: int, protocol: str = "paper_code") -> set[str]:
        return {p for p, _ in datasets.load_splits("fmd", trees["fmd"], fold, split_protocol=protocol, seed=seed).test}
    # The paper code calls its folds 5-fold cross-validation, but draws a new shuffle for every
    # (fold, seed): fold 1 and fold 2 share 39 test images, and folds 1-5 test 673 distinct images, not
    # all 1000 once. The counts depend only on the class sizes, so real FMD's 10 x 100 gives the same.
    assert len(test_set(1, 42) & test_set(2, 42)) == 39
    assert len(set().union(*(test_set(fold, 42) for fold in range(1, 6)))) == 673
    assert len(test_set(1, 42) & test_set(1, 43)) == 40    # another training seed, another test set
    # Ours: 10 seeded 50/50 draws (the usual FMD protocol, folds are independent draws), each the same
    # for every training seed, so the seeds of a fold are paired on one test set.
    assert test_set(1, 42, "default") == test_set(1, 43, "default")
    assert len(test_set(1, 42, "default")) == 500


def test_paper_code_fmd_has_five_folds(trees):
    with pytest.raises(datasets.DataLayoutError, match="folds 1-5 under --split_protocol paper_code"):
        datasets.load_splits("fmd", trees["fmd"], 6, split_protocol="paper_code", seed=42)
    datasets.load_splits("fmd", trees["fmd"], 6)   # ours has 10


def test_dtd_and_flowers_fold_1_are_the_same_under_both_protocols(dtd_root, flowers_root):
    for dataset, root in (("dtd", dtd_root), ("flowers102", flowers_root)):
        ours = datasets.load_splits(dataset, root, 1)
        paper = datasets.load_splits(dataset, root, 1, split_protocol="paper_code", seed=7)
        assert (ours.train, ours.val, ours.test) == (paper.train, paper.val, paper.test)
    # Flowers: the paper code reads the official split for every fold; ours reshuffles folds > 1.
    official = datasets.load_splits("flowers102", flowers_root, 1)
    assert datasets.load_splits("flowers102", flowers_root, 3, split_protocol="paper_code", seed=42).test == official.test
    assert datasets.load_splits("flowers102", flowers_root, 3).test != official.test


def test_checker_cli_takes_the_protocol(trees, capsys):
    assert datasets.main(["--dataset", "fmd", "--data_dir", str(trees["fmd"]), "--fold", "2",
                          "--split_protocol", "paper_code", "--seed", "43", "--no_open_check", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train\s+600\s+60/60", out) and re.search(r"test\s+200\s+20/20", out)
    assert "paper_code" in out and "seed 43" in out


@pytest.mark.slow
def test_an_fmd_run_on_the_paper_code_splits_trains_on_60_per_class(trees, tmp_path):
    """train.py --split_protocol paper_code on FMD's official layout (10 classes x 100 tiny images)."""
    import train
    assert train.main(["--dataset", "fmd", "--data_dir", str(trees["fmd"]), "--model", "resnet18",
                       "--split_protocol", "paper_code", "--fold", "2", "--img_size", "16", "--batch_size", "100",
                       "--epochs", "1", "--workers", "0", "--randaug_n", "0", "--no_progress", "--cache",
                       "--cache_max_short", "16", "--run_dir", str(tmp_path)]) == 0
    path = tmp_path / "fmd_fold2_resnet18_seed42"
    results = json.loads((path / "results.json").read_text())
    assert results["train_images"] == 600
    assert results["data_fingerprint"]["sizes"] == {"train": 600, "val": 200, "test": 200}
    assert results["recipe"]["split_protocol"] == "paper_code"
    expected = datasets.load_splits("fmd", trees["fmd"], 2, split_protocol="paper_code", seed=42)
    assert results["data_fingerprint"] == datasets.split_fingerprint(
        expected.classes, {s: expected.split(s) for s in datasets.SPLIT_NAMES})
    log = (path / "train.log").read_text()
    assert "splits: the paper code's for fold 2 and seed 42" in log
    assert "cached at native resolution up to a 16 px shorter side" in log


def test_run_all_passes_the_protocol_to_every_run(trees, tmp_path, capsys):
    import run_all
    assert run_all.main(["--dataset", "fmd", "--data_dir", str(trees["fmd"]), "--models", "resnet18", "--folds", "1-2",
                         "--seeds", "42,43", "--run_dir", str(tmp_path), "--dry_run", "--split_protocol",
                         "paper_code"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "train.py" in line]
    assert len(commands) == 4 and all("--split_protocol paper_code" in line for line in commands)
