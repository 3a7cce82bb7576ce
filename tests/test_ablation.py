"""ablation.py: the plan (variants, tags, model_kwargs, run_all.py commands) and the table.

Nothing is trained: the table is checked against synthetic results.json files whose accuracies
are written here, including runs outside the plan (other fold, seed, dataset) that it must ignore.
"""
from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path

import pytest

import ablation  # the repository root is on sys.path through tests/conftest.py
import models
from helpers import runrecords, utils

ROOT = Path(__file__).resolve().parents[1]

CORE = ["twistnet18", "twistnet18_no_spiral", "twistnet18_no_ais", "twistnet18_first_order"]
EXPECTED_SWEEPS = [
    ("twistnet18-r4", "r4", {"r": 4}),
    ("twistnet18-r16", "r16", {"r": 16}),
    ("twistnet18-heads1", "heads1", {"heads": 1}),
    ("twistnet18-heads2", "heads2", {"heads": 2}),
    ("twistnet18-gate0", "gate0", {"gate_init": 0.0}),
    ("twistnet18-gate-4", "gate-4", {"gate_init": -4.0}),
    ("twistnet18-stages4", "stages4", {"stages": [4]}),
    ("twistnet18-stages234", "stages234", {"stages": [2, 3, 4]}),
]


def option(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_default_plan_has_registry_ablations_then_every_sweep() -> None:
    variants = ablation.plan_variants()
    assert [v.label for v in variants] == CORE + [label for label, _, _ in EXPECTED_SWEEPS]
    assert all(v.tag == "" and dict(v.model_kwargs) == {} for v in variants[:4])
    for v, (label, tag, kwargs) in zip(variants[4:], EXPECTED_SWEEPS):
        assert (v.model, v.tag, dict(v.model_kwargs)) == ("twistnet18", tag, kwargs)


def test_sweep_selection_and_custom_values() -> None:
    variants = ablation.plan_variants(["heads", "r"], {"r": [2]})
    assert [v.label for v in variants] == CORE + ["twistnet18-heads1", "twistnet18-heads2", "twistnet18-r2"]
    assert [v.label for v in ablation.plan_variants([])] == CORE
    with pytest.raises(utils.UserError, match="Unknown sweep 'width'"):
        ablation.plan_variants(["width"])
    typed = ablation.build_parser().parse_args(["--stages_values", "4;2,3,4", "--gate_init_values=0,-4"])
    assert ablation.sweep_values_from_args(typed) == {"stages": [(4,), (2, 3, 4)], "gate_init": [0.0, -4.0]}


def test_every_planned_variant_builds() -> None:
    for v in ablation.plan_variants():
        model = models.build_model(v.model, 3, verbose=False, **dict(v.model_kwargs))
        if "r" in v.model_kwargs:
            assert all(b.stci.r == v.model_kwargs["r"] for b in model.twist_blocks().values())
        if "stages" in v.model_kwargs:
            assert model.twisted_stages == tuple(v.model_kwargs["stages"])


def test_commands_run_all_with_model_kwargs_and_tags() -> None:
    settings = ablation.Settings("dtd", "1-3", "42,43", 7, "runs/abl", data_dir="data/dtd", jobs=2,
                                 python="python")
    variants = ablation.plan_variants()
    commands = ablation.plan_commands(settings, variants, ["--img_size", "32"])
    assert len(commands) == 1 + len(EXPECTED_SWEEPS)
    for cmd in commands:
        assert cmd[:2] == ["python", str(ROOT / "run_all.py")]
        assert (option(cmd, "--dataset"), option(cmd, "--data_dir"), option(cmd, "--folds"),
                option(cmd, "--seeds"), option(cmd, "--epochs"), option(cmd, "--run_dir"),
                option(cmd, "--jobs")) == ("dtd", "data/dtd", "1-3", "42,43", "7", "runs/abl", "2")
        assert cmd[-2:] == ["--img_size", "32"]
    assert option(commands[0], "--models") == ",".join(CORE)
    assert "--tag" not in commands[0] and "--model_kwargs" not in commands[0]
    for cmd, (_, tag, kwargs) in zip(commands[1:], EXPECTED_SWEEPS):
        assert option(cmd, "--models") == "twistnet18"
        assert option(cmd, "--tag") == tag
        assert json.loads(option(cmd, "--model_kwargs")) == kwargs


def test_dry_run_prints_commands_and_touches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "ablation"
    code = ablation.main(["--dataset", "synthtex", "--folds", "1-2", "--seeds", "42", "--epochs", "3",
                          "--run_dir", str(run_dir), "--sweeps", "r", "--dry_run", "--img_size", "32"])
    assert code == 0 and not run_dir.exists()
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    commands = [shlex.split(line) for line in lines]
    assert len(commands) == 3
    assert [option(c, "--tag") for c in commands[1:]] == ["r4", "r16"]
    assert json.loads(option(commands[2], "--model_kwargs")) == {"r": 16}
    assert all(c[-2:] == ["--img_size", "32"] for c in commands)


def test_options_the_plan_sets_cannot_be_passed_through() -> None:
    with pytest.raises(utils.UserError, match="--tag"):
        ablation.main(["--dry_run", "--tag", "x"])
    with pytest.raises(utils.UserError, match="--seed"):
        ablation.main(["--dry_run", "--seed", "1"])


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
ACCURACY = {  # label -> base accuracy; run (fold, seed) adds a known offset
    "twistnet18": 80.0,
    "twistnet18_no_spiral": 77.5,
    "twistnet18_no_ais": 78.25,
    "twistnet18_first_order": 75.0,
    "twistnet18-r4": 79.0,
    "twistnet18-stages4": 81.0,
}
FOLDS, SEEDS, CLASSES = (1, 2), (42, 43), 6


def run_accuracy(label: str, fold: int, seed: int) -> float:
    return ACCURACY[label] + 1.25 * fold - 0.5 * (seed - 42) + (0.3 if "r4" in label else 0.0) * fold


def write_run(run_dir: Path, label: str, dataset: str, fold: int, seed: int, acc: float) -> None:
    model, _, tag = label.partition("-")
    path = run_dir / f"{dataset}_fold{fold}_{label}_seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"model": model, "tag": tag, "dataset": dataset, "fold": fold, "seed": seed,
                                "test_acc": acc, "classes": [f"c{k}" for k in range(CLASSES)],
                                "params": 1, "flops": 1.0, "config": {}}))


@pytest.fixture()
def finished_runs(tmp_path: Path) -> Path:
    for label in ACCURACY:
        for fold in FOLDS:
            for seed in SEEDS:
                write_run(tmp_path, label, "synthtex", fold, seed, run_accuracy(label, fold, seed))
    # outside the plan: must not count
    write_run(tmp_path, "twistnet18", "synthtex", 3, 42, 10.0)
    write_run(tmp_path, "twistnet18", "synthtex", 1, 44, 10.0)
    write_run(tmp_path, "twistnet18", "dtd", 1, 42, 10.0)
    write_run(tmp_path, "twistnet18-heads1", "synthtex", 1, 42, 10.0)   # heads not in --sweeps
    return tmp_path


def expected_stats(label: str) -> tuple[float, float]:
    values = [run_accuracy(label, f, s) for f in FOLDS for s in SEEDS]
    return statistics.mean(values), statistics.stdev(values)


def markdown_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_table_means_stds_and_deltas(finished_runs: Path, capsys: pytest.CaptureFixture) -> None:
    code = ablation.main(["--dataset", "synthtex", "--folds", "1-2", "--seeds", "42,43", "--run_dir",
                          str(finished_runs), "--sweeps", "r,stages", "--table_only"])
    assert code == 0
    md = (finished_runs / "ablation_table.md").read_text()
    assert md in capsys.readouterr().out
    rows = markdown_rows(md)
    full_mean, _ = expected_stats("twistnet18")
    names = {"twistnet18": "TwistNet-18 (full)", "twistnet18_no_spiral": "w/o spiral twist",
             "twistnet18_no_ais": "w/o AIS", "twistnet18_first_order": "first-order only",
             "twistnet18-r4": "TwistNet-18 (r = 4)", "twistnet18-stages4": "TwistNet-18 (STCI in stage 4)"}
    for label, name in names.items():
        params, acc, delta, runs = rows[name]
        mean, std = expected_stats(label)
        assert acc == f"{mean:.2f} ± {std:.2f}"
        assert runs == "4"
        assert delta == ("ref." if label == "twistnet18" else f"{mean - full_mean:+.2f}")
    # r = 16 and STCI in stages 2-4 are planned but have no runs
    for name in ("TwistNet-18 (r = 16)", "TwistNet-18 (STCI in stages 2,3,4)"):
        assert rows[name][1:] == ["n/a", "n/a", "0"]
    assert "TwistNet-18 (1 head)" not in rows

    variants = {v.label: v for v in ablation.plan_variants(["r", "stages"])}
    for label, name in names.items():
        v = variants[label]
        built = models.build_model(v.model, CLASSES, verbose=False, **dict(v.model_kwargs))
        assert rows[name][0] == f"{sum(p.numel() for p in built.parameters()) / 1e6:.2f}"

    tex = (finished_runs / "ablation_table.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
        assert rule in tex
    mean, std = expected_stats("twistnet18_no_spiral")
    assert f"w/o spiral twist & {rows['w/o spiral twist'][0]} & {mean:.2f} $\\pm$ {std:.2f} & $-$" in tex


def test_rows_hold_exact_numbers(finished_runs: Path) -> None:
    runs = runrecords.load_results([finished_runs])
    variants = ablation.plan_variants(["r"])
    rows = {r.variant.label: r for r in ablation.ablation_rows(variants, runs, "synthtex", FOLDS, SEEDS)}
    full_mean, _ = expected_stats("twistnet18")
    for label in ("twistnet18", "twistnet18_no_ais", "twistnet18-r4"):
        mean, std = expected_stats(label)
        assert rows[label].stats.mean == pytest.approx(mean)
        assert rows[label].stats.std == pytest.approx(std)
        assert rows[label].stats.n == 4
    assert rows["twistnet18"].delta is None
    assert rows["twistnet18-r4"].delta == pytest.approx(expected_stats("twistnet18-r4")[0] - full_mean)
    assert rows["twistnet18-r16"].stats is None and rows["twistnet18-r16"].delta is None
    assert rows["twistnet18_first_order"].params < rows["twistnet18-r4"].params < rows["twistnet18"].params
