"""Tests for the FLOP counter (model_tools.count_flops), compute_flops.py's TwistNet breakdown and CLI (CPU only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import compute_flops  # noqa: E402
import models  # noqa: E402
from helpers import model_tools, utils  # noqa: E402

NUM_CLASSES = 47  # DTD
TWISTNET18_PARAMS = 11_588_963
TWISTNET18_STCI_PARAMS = 388_340
# 4 heads x 36 pairs x (2 blocks at 14x14 + 2 blocks at 7x7): the z_i * t_j products alone.
STCI_PRODUCTS = 4 * 36 * (2 * 14 * 14 + 2 * 7 * 7)


@pytest.fixture(scope="module")
def twistnet18():
    return models.build_model("twistnet18", NUM_CLASSES, pretrained=False, verbose=False)


@pytest.fixture(scope="module")
def resnet18():
    return models.build_model("resnet18", NUM_CLASSES, pretrained=False, verbose=False)


@pytest.fixture(scope="module")
def twist_report(twistnet18):
    return model_tools.count_flops(twistnet18)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "compute_flops.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_twistnet_and_resnet_flops(twist_report, resnet18):
    res = model_tools.count_flops(resnet18)
    assert 1.83e9 <= twist_report.total <= 1.87e9
    assert 1.80e9 <= res.total <= 1.83e9
    overhead = (twist_report.total - res.total) / res.total
    assert 0 < overhead < 0.03


def test_first_order_ablation_matches_resnet18(resnet18):
    # Same network in two implementations: any FLOP difference would be a counting artefact
    # (e.g. TwistNet's .mean pooling uncounted while timm's adaptive_avg_pool2d is counted).
    plain = models.build_model("twistnet18_first_order", NUM_CLASSES, verbose=False)
    assert model_tools.count_flops(plain).total == model_tools.count_flops(resnet18).total


def test_count_flops_restores_training_mode(twistnet18):
    twistnet18.train()
    model_tools.count_flops(twistnet18, img_size=64)
    assert twistnet18.training


def test_breakdown_sums_to_params_and_stci_share(twistnet18, twist_report):
    parts = compute_flops.twistnet_breakdown(twistnet18, twist_report)
    by_name = {p.name: p for p in parts}
    assert sum(p.params for p in parts) == models.count_params(twistnet18) == TWISTNET18_PARAMS
    assert by_name[compute_flops.PART_STCI].params == TWISTNET18_STCI_PARAMS
    assert sum(p.flops for p in parts) == twist_report.total
    # Every part that runs convolutions or STCI must hold FLOPs; top-level pooling is tiny.
    assert all(by_name[n].flops > 0 for n in (compute_flops.PART_STEM, compute_flops.PART_BACKBONE,
                                              compute_flops.PART_STCI, compute_flops.PART_FC))


def test_stci_elementwise_products_are_counted(twistnet18, twist_report):
    plain = model_tools.count_flops(twistnet18, extra_handles=False)
    assert twist_report.total - plain.total >= STCI_PRODUCTS
    assert "aten::mul" not in twist_report.uncounted
    assert "aten::mul" in plain.uncounted


def test_breakdown_text_states_stci_share(twistnet18, twist_report):
    parts = compute_flops.twistnet_breakdown(twistnet18, twist_report)
    text = compute_flops.format_breakdown("twistnet18", parts, twist_report, 4)
    assert "STCI modules: 388,340 params (3.35% of total)" in text


@pytest.mark.slow
def test_cli_unknown_model_exits_2_with_known_names():
    proc = run_cli("--model", "nosuch")
    assert proc.returncode == 2
    assert "Unknown model 'nosuch'" in proc.stderr and "twistnet18" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_model_suggests_close_match(capsys):
    assert utils.run_main(compute_flops.main, ["--models", "resnet18,twistnet_18"]) == 2
    assert "Did you mean 'twistnet18'?" in capsys.readouterr().err


def test_cli_json_single_model(capsys):
    assert compute_flops.main(["--json", "--model", "twistnet18"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["twistnet18"]
    row = rows[0]
    assert row["params"] == TWISTNET18_PARAMS
    assert 1.83e9 <= row["flops"] <= 1.87e9
    stci = next(p for p in row["breakdown"] if p["part"] == compute_flops.PART_STCI)
    assert stci["params"] == TWISTNET18_STCI_PARAMS


def test_cli_latex_is_booktabs(capsys):
    assert compute_flops.main(["--latex", "--models", "twistnet18,twistnet18_no_ais"]) == 0
    out = capsys.readouterr().out
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"twistnet18\_no\_ais & "):
        assert token in out


def test_table_survives_a_model_fvcore_cannot_trace(monkeypatch, capsys):
    def broken(model, img_size=224, extra_handles=True):
        raise RuntimeError("cannot trace this model")
    monkeypatch.setattr(compute_flops, "count_flops", broken)
    assert compute_flops.main(["--model", "twistnet18_no_spiral"]) == 1
    captured = capsys.readouterr()
    assert "failed" in captured.out and "RuntimeError: cannot trace this model" in captured.out
    assert "twistnet18_no_spiral" in captured.err


@pytest.mark.slow
def test_cli_tiny_speed_run_adds_resnet18():
    # One thread: on a 2-vCPU VM, two OpenMP threads on a batch this small mostly wait on each other.
    proc = run_cli("--speed", "--models", "twistnet18", "--device", "cpu", "--batch_size", "2",
                   "--img_size", "64", "--warmup", "1", "--repeats", "2", "--steps", "1",
                   "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines()
            if ln.startswith(("resnet18 ", "twistnet18 "))}
    assert set(rows) == {"resnet18", "twistnet18"}
    for name, cols in rows.items():
        # columns: name, train img/s, (min-max), ratio, infer img/s, (min-max), ratio
        train, train_ratio, infer, infer_ratio = map(float, (cols[1], cols[3], cols[4], cols[6]))
        assert train > 0 and infer > 0 and train_ratio > 0 and infer_ratio > 0
    assert float(rows["resnet18"][3]) == 1.0
