"""summarize_runs.py on synthetic run directories with known accuracies.

Every expected number is computed here from the results.json files themselves (numpy mean, sample
std, scipy's paired tests), then compared with what summarize_runs.py prints. One run is missing
(twistnet18, fmd, fold 3, seed 43) and one run directory is incomplete (no results.json).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import summarize_runs  # noqa: E402
from helpers import runrecords, utils  # noqa: E402

DATASETS = ("dtd", "fmd")
LABELS = ("resnet18", "seresnet18", "twistnet18", "twistnet18-r4")
FOLDS, SEEDS = (1, 2, 3), (42, 43)
MISSING = ("twistnet18", "fmd", 3, 43)
PARAMS = {"resnet18": 11_200_000, "seresnet18": 11_290_000, "twistnet18": 11_590_000}
FLOPS = {"resnet18": 1.82e9, "seresnet18": 1.82e9, "twistnet18": 1.85e9}
CELL = re.compile(r"(\d+\.\d\d) ± (\d+\.\d\d) \((\d+)\)(†?)")


def known_accuracy(label: str, dataset: str, fold: int, seed: int) -> float:
    """Distinct, irregular accuracies, so that ranks and paired tests are not degenerate."""
    rng = np.random.default_rng([LABELS.index(label), DATASETS.index(dataset), fold, seed])
    return round(60 + 2.0 * LABELS.index(label) + 4 * DATASETS.index(dataset) + rng.normal(0, 1.5), 3)


def write_run(root: Path, label: str, dataset: str, fold: int, seed: int) -> None:
    model, _, tag = label.partition("-")
    path = root / f"{dataset}_fold{fold}_{label}_seed{seed}"
    path.mkdir(parents=True)
    results = {"model": model, "tag": tag, "dataset": dataset, "fold": fold, "seed": seed,
               "test_acc": known_accuracy(label, dataset, fold, seed),
               "params": PARAMS[model] + 10_000 * DATASETS.index(dataset), "flops": FLOPS[model]}
    (path / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two --run_dir folders: the tagged variant lives in the second one."""
    main_dir, extra_dir = tmp_path_factory.mktemp("main"), tmp_path_factory.mktemp("extra")
    for label in LABELS:
        for dataset in DATASETS:
            for fold in FOLDS:
                for seed in SEEDS:
                    if (label, dataset, fold, seed) != MISSING:
                        write_run(extra_dir if "-" in label else main_dir, label, dataset, fold, seed)
    (main_dir / "dtd_fold4_resnet18_seed42").mkdir()  # started, never finished
    return [main_dir, extra_dir]


def read_accuracies(run_dirs: list[Path]) -> dict[tuple[str, str], dict[tuple[int, int], float]]:
    """(label, dataset) -> {(fold, seed): test_acc}, straight from the results.json files."""
    table: dict = {}
    for path in sorted(p for d in run_dirs for p in d.glob("*/results.json")):
        r = json.loads(path.read_text())
        label = f"{r['model']}-{r['tag']}" if r["tag"] else r["model"]
        table.setdefault((label, r["dataset"]), {})[r["fold"], r["seed"]] = r["test_acc"]
    return table


def summarize(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert summarize_runs.main(list(argv)) == 0
    return capsys.readouterr().out


def run_dir_args(run_dirs: list[Path]) -> list[str]:
    return ["--run_dir", *map(str, run_dirs)]


def text_rows(out: str) -> dict[str, list[tuple[str, str, str, str]]]:
    rows = {}
    for line in out.splitlines():
        name = line.split("  ")[0]
        if name in LABELS:
            rows[name] = CELL.findall(line)
    return rows


def test_text_cells_equal_numpy_on_the_results_files(run_dirs: list[Path], capsys) -> None:
    out = summarize(capsys, *run_dir_args(run_dirs))
    assert "mean ± std over all fold x seed runs" in out
    truth = read_accuracies(run_dirs)
    rows = text_rows(out)
    assert sorted(rows) == sorted(LABELS)
    for label in LABELS:
        assert len(rows[label]) == len(DATASETS)
        for dataset, (mean, std, n, mark) in zip(DATASETS, rows[label]):
            values = list(truth[label, dataset].values())
            assert mean == f"{np.mean(values):.2f}"
            assert std == f"{np.std(values, ddof=1):.2f}"
            assert int(n) == len(values)
            assert mark == ("†" if (label, dataset) == MISSING[:2] else "")
    assert "† twistnet18 on fmd: 5 of 6 runs, missing fold 3 seed 43" in out
    assert "1 incomplete run directory (no results.json) left out: dtd_fold4_resnet18_seed42" in out


def test_csv_numbers_and_missing_runs(run_dirs: list[Path], capsys) -> None:
    out = summarize(capsys, *run_dir_args(run_dirs), "--csv")
    truth = read_accuracies(run_dirs)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(LABELS) * len(DATASETS)
    for row in rows:
        values = list(truth[row["model"], row["dataset"]].values())
        assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-4)
        assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-4)
        assert int(row["n_runs"]) == len(values) and int(row["n_expected"]) == 6
        assert row["missing"] == ("3:43" if (row["model"], row["dataset"]) == MISSING[:2] else "")


def test_out_file_and_model_filter_set_rows_in_order(run_dirs: list[Path], tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "tables" / "t.md"
    summarize(capsys, *run_dir_args(run_dirs), "--markdown", "--models", "twistnet18,resnet18",
              "--out", str(out_file))
    lines = [l for l in out_file.read_text().splitlines() if l.startswith("| ")]
    assert [l.split(" | ")[0][2:] for l in lines[1:]] == ["twistnet18", "resnet18"]
    # Bold marks the best shown mean of each dataset column.
    truth = read_accuracies(run_dirs)
    for column, dataset in enumerate(DATASETS, start=1):
        means = {label: np.mean(list(truth[label, dataset].values())) for label in ("twistnet18", "resnet18")}
        best = max(means, key=means.get)
        for line in lines[1:]:
            label, cell = line.split(" | ")[0][2:], line.split(" | ")[column]
            assert cell.startswith("**") == (label == best)


def split_latex_row(line: str) -> list[str]:
    assert line.endswith(r"\\"), line
    return [c.strip() for c in line[:-2].split("&")]


def test_latex_is_a_sound_booktabs_tabular(run_dirs: list[Path], capsys) -> None:
    tex = summarize(capsys, *run_dir_args(run_dirs), "--latex")
    unescaped = tex.replace(r"\{", "").replace(r"\}", "")
    assert unescaped.count("{") == unescaped.count("}")
    assert tex.count(r"\begin{tabular}") == 1 and tex.count(r"\end{tabular}") == 1
    body = [l for l in tex.splitlines() if not l.startswith("%")]
    assert body[0].startswith(r"\begin{tabular}") and body[-1] == r"\end{tabular}"
    top, mid, bottom = body.index(r"\toprule"), body.index(r"\midrule"), body.index(r"\bottomrule")
    assert top < mid < bottom

    header = split_latex_row(body[top + 1])
    assert header == ["Model", "DTD", "FMD", "Params (M)", "FLOPs (G)"]
    n_columns = re.match(r"\\begin\{tabular\}\{([lcr]+)\}", body[0]).group(1)
    assert len(n_columns) == len(header)
    rows = [split_latex_row(l) for l in body[mid + 1:bottom]]
    # Tags are read as the figures read them (one display grammar in models.py).
    assert [r[0] for r in rows] == ["ResNet-18", "SE-ResNet-18", "TwistNet-18", "TwistNet-18 (r = 4)"]
    assert all(len(r) == len(header) for r in rows)
    for column in (1, 2):
        means = [float(re.search(r"(\d+\.\d\d)", r[column]).group(1)) for r in rows]
        bold = [i for i, r in enumerate(rows) if r"\textbf{" in r[column]]
        assert len(bold) == 1 and means[bold[0]] == max(means)
    twistnet = rows[2]
    assert twistnet[2].endswith(r"$^\dagger$") and not twistnet[1].endswith(r"$^\dagger$")
    # params differ by dataset (classifier size): a range; FLOPs are equal: one number
    assert twistnet[3] == "11.59--11.60"
    assert rows[0][4] == "1.82"
    assert "mean $\\pm$ std over all fold $\\times$ seed runs" in tex


def test_ref_p_values_equal_scipy_on_matched_runs(run_dirs: list[Path], capsys) -> None:
    out = summarize(capsys, *run_dir_args(run_dirs), "--ref", "twistnet18")
    truth = read_accuracies(run_dirs)
    section = out[out.index("Paired tests against twistnet18"):]
    printed = {}
    for line in section.splitlines()[2:]:
        model, dataset, n, diff, p_w, p_t, *_ = line.split()
        printed[model, dataset] = (int(n), float(diff), float(p_w), float(p_t))
    assert "twistnet18" not in {m for m, _ in printed}
    for label in ("resnet18", "seresnet18", "twistnet18-r4"):
        pooled_ref, pooled_other = [], []
        for dataset in DATASETS:
            ref = truth["twistnet18", dataset]
            keys = sorted(k for k in ref if k in truth[label, dataset])
            a, b = [ref[k] for k in keys], [truth[label, dataset][k] for k in keys]
            pooled_ref += a
            pooled_other += b
            check_paired_row(printed[label, dataset], a, b)
        check_paired_row(printed[label, "all"], pooled_ref, pooled_other)
    assert printed["resnet18", "fmd"][0] == 5 and printed["resnet18", "all"][0] == 11


def check_paired_row(row: tuple[int, float, float, float], ref: list[float], other: list[float]) -> None:
    n, diff, p_wilcoxon, p_ttest = row
    assert n == len(ref)
    assert diff == pytest.approx(np.mean(np.subtract(ref, other)), abs=5e-4)
    assert p_wilcoxon == pytest.approx(stats.wilcoxon(ref, other).pvalue, rel=1e-3)
    assert p_ttest == pytest.approx(stats.ttest_rel(ref, other).pvalue, rel=1e-3)


def test_paired_test_degenerate_cases() -> None:
    p_w, p_t, note = summarize_runs.paired_test([70.0], [71.0])
    assert np.isnan(p_w) and np.isnan(p_t) and "n < 2" in note
    assert summarize_runs.paired_test([70.0, 71.0, 72.0], [70.0, 71.0, 72.0]) == (1.0, 1.0, "all differences are 0")


def test_summary_ranks_models_per_dataset(run_dirs: list[Path], capsys) -> None:
    out = summarize(capsys, *run_dir_args(run_dirs), "--summary")
    truth = read_accuracies(run_dirs)
    section = out[out.index("Ranking per dataset"):]
    for dataset in DATASETS:
        block = section[section.index(f"{dataset}:"):].splitlines()[1:len(LABELS) + 1]
        ranked = [line.split()[1] for line in block]
        expected = sorted(LABELS, key=lambda l: -np.mean(list(truth[l, dataset].values())))
        assert ranked == expected


def test_duplicate_runs_count_once(run_dirs: list[Path], capsys) -> None:
    out = summarize(capsys, "--run_dir", str(run_dirs[0]), str(run_dirs[0]), "--csv")
    rows = {(r["model"], r["dataset"]): r for r in csv.DictReader(io.StringIO(out))}
    assert rows["resnet18", "dtd"]["n_runs"] == "6"


def test_flops_header_names_a_non_default_input_size(tmp_path: Path) -> None:
    """FLOPs in results.json are counted at the run's --img_size; a 32-px sweep must not pass for 224 px."""
    def run(model: str, img_size: int | None) -> summarize_runs.RunResult:
        return summarize_runs.RunResult(model, "", "synthtex", 1, 42, 50.0, 11_000_000, 4e7,
                                        tmp_path, img_size)

    assert summarize_runs.build_table([run("a", 32), run("b", 32)]).flops_header() == "FLOPs (G, 32 px)"
    assert summarize_runs.build_table([run("a", 32), run("b", 64)]).flops_header() == "FLOPs (G, mixed px)"
    assert summarize_runs.build_table([run("a", 224), run("b", None)]).flops_header() == "FLOPs (G)"


# --------------------------------------------------------------------------------------------
# Reliability: no mean over mixed recipes, no NaN in a mean, no p = 0 from a constant difference
# --------------------------------------------------------------------------------------------
def write_configured_run(root: Path, model: str, fold: int, test_acc: float, **config) -> Path:
    path = root / f"dtd_fold{fold}_{model}_seed42"
    path.mkdir(parents=True)
    full = {"model": model, "dataset": "dtd", "fold": fold, "seed": 42, "epochs": 100, "lr": 0.01,
            "data_dir": f"/data/copy{fold}", "workers": fold, **config}
    (path / "results.json").write_text(json.dumps({"model": model, "tag": "", "dataset": "dtd", "fold": fold,
                                                   "seed": 42, "test_acc": test_acc, "config": full}))
    return path


def test_a_cell_of_mixed_recipes_is_refused_or_split(tmp_path: Path, capsys) -> None:
    """A sweep re-run with other --epochs into the same folder: the two recipes must not be averaged."""
    write_configured_run(tmp_path, "twistnet18", 1, 70.0)
    write_configured_run(tmp_path, "twistnet18", 2, 72.0)                 # other data_dir, workers: same recipe
    write_configured_run(tmp_path, "twistnet18", 3, 40.0, epochs=10)
    write_configured_run(tmp_path, "resnet18", 1, 65.0)
    assert utils.run_main(summarize_runs.main, ["--run_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 cell(s) mix runs of different recipes") and "epochs: 10 | 100" in err
    assert "--split_recipes" in err
    with pytest.raises(utils.UserError, match="different recipes"):
        runrecords.load_results([tmp_path])                          # figures refuse too

    out = summarize(capsys, "--run_dir", str(tmp_path), "--split_recipes")
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "40.00 (1)" in rows["twistnet18 [recipe 1]"] and "71.00 ± 1.41 (2)" in rows["twistnet18 [recipe 2]"]
    assert "65.00 (1)" in rows["resnet18"]
    assert "twistnet18 [recipe 1]: epochs=10" in out and "twistnet18 [recipe 2]: epochs=100" in out


def test_nan_accuracies_are_left_out_with_a_note(tmp_path: Path, capsys) -> None:
    write_configured_run(tmp_path, "twistnet18", 1, 70.0)
    write_configured_run(tmp_path, "twistnet18", 2, float("nan"))
    out = summarize(capsys, "--run_dir", str(tmp_path))
    assert "70.00 (1)" in out and "nan" not in out.split("\n\n")[0].lower()
    assert "left out" in out and "test accuracy is nan" in out


def test_a_constant_paired_difference_gives_no_t_test_p_value(capsys) -> None:
    p_w, p_t, note = summarize_runs.paired_test([70.0, 71.0, 72.0], [69.0, 70.0, 71.0])
    assert math.isnan(p_t) and "constant difference" in note and 0 < p_w <= 1
    assert summarize_runs.p_text(p_t) == "n/a"


def test_malformed_results_are_left_out_with_a_note_and_the_table_still_prints(tmp_path: Path, capsys) -> None:
    """A results.json that is a list, or whose accuracy is no percentage (1e308, -5, the string
    "88.1"), or whose fields have the wrong type: left out, each with a note naming the file and why;
    the good runs still make their cells."""
    write_configured_run(tmp_path, "twistnet18", 1, 70.0)
    write_configured_run(tmp_path, "twistnet18", 2, 72.0)
    bad = {"list": [1, 2, 3], "huge": 1e308, "negative": -5, "string": "88.1", "above": 100.5}
    reasons = {"list": "not a JSON object of run fields (a list: [1, 2, 3])",
               "huge": "the test accuracy is 1e+308, not a percentage in [0, 100]",
               "negative": "the test accuracy is -5, not a percentage in [0, 100]",
               "string": 'the test accuracy is "88.1", not a number',
               "above": "the test accuracy is 100.5, not a percentage in [0, 100]"}
    for name, value in bad.items():
        run = tmp_path / f"dtd_fold1_{name}_seed42"
        run.mkdir()
        content = value if name == "list" else {"model": "twistnet18", "tag": "", "dataset": "dtd", "fold": 3 + len(name),
                                                "seed": 42, "test_acc": value, "config": {"epochs": 100, "lr": 0.01}}
        (run / "results.json").write_text(json.dumps(content))
    wrong_types = {"fold": "one", "model": None, "config": [1], "params": "11M", "classes": "abc"}
    for key, value in wrong_types.items():
        run = tmp_path / f"dtd_fold9_{key}_seed42"
        run.mkdir()
        fields = {"model": "twistnet18", "dataset": "dtd", "fold": 9, "seed": 42, "test_acc": 50.0, key: value}
        (run / "results.json").write_text(json.dumps(fields))

    out = summarize(capsys, "--run_dir", str(tmp_path))
    table, notes = out.split("\n\n", 1)
    assert "71.00 ± 1.41 (2)" in table                                       # only the two good runs
    for name, why in reasons.items():
        assert f"left out {tmp_path / f'dtd_fold1_{name}_seed42' / 'results.json'}: {why}" in notes, (name, notes)
    for key in wrong_types:
        assert f"dtd_fold9_{key}_seed42/results.json: {key} is " in notes, (key, notes)
    found = runrecords.load_runs([tmp_path])
    assert len(found.runs) == 2 and len(found.unusable) == len(bad) + len(wrong_types)
