"""make gpu-check (helpers/gpu_check.py) where it can be checked without a GPU: the one-line refusal on
a machine without CUDA, and the report it writes from its measurements."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import one_error_line
from helpers import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: gpu-check would run")
def test_without_cuda_it_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "helpers.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "needs a CUDA GPU" in one_error_line(proc.stderr)
    assert not list(tmp_path.iterdir())           # no report of nothing


def step(**fields: object) -> dict:
    return {"command": "cmd", "exit": 0, "seconds": 1.0, "tail": "", **fields}


def test_the_report_says_what_was_measured_and_what_was_not(tmp_path: Path) -> None:
    rows = [{"name": "resnet18", "train_img_s": 3000.0, "infer_img_s": 9000.0, "train_ratio": 1.0, "infer_ratio": 1.0},
            {"name": "twistnet18", "train_img_s": 2850.0, "infer_img_s": 8500.0, "train_ratio": 0.95,
             "infer_ratio": 0.944}]
    report = {"device": "GPU X", "gpus": 1, "cpu_cores": 16, "torch": "2.x", "dali": True, "git_commit": "abc",
              "pytest": step(tests=[{"name": "test_a[bf16]", "outcome": "passed",
                                     "properties": {"loss_relative_diff": "0.004"}}]),
              "model_speed": {"compile_off": step(rows=rows),
                              "compile_on": step(exit="skipped", tail="skipped: the time budget is spent", rows=[])},
              "loader_speed": {"pil": step(images_per_s=1200.0, workers=16),
                               "dali": step(images_per_s=None, workers=8, exit=1, tail="boom")},
              "train_speed": {"pil": step(images_per_s=900.0, data_wait_share=0.4),
                              "dali": step(images_per_s=None, data_wait_share=None)}}
    assert not gpu_check.passed(report)
    md, js = gpu_check.write_reports(report, tmp_path)
    text = md.read_text()
    assert "| test_a[bf16] | passed | loss_relative_diff 0.004 |" in text
    assert "| off | twistnet18 | 2850.0 | 8500.0 | 0.950 | 0.944 |" in text
    assert "| on | (exit skipped) |" in text
    assert "| pil | 16 | 1200.0 | 900.0 | 40% |" in text and "| dali | 8 | not measured | not measured | not measured |" in text
    assert "### did not pass: cmd (exit 1)" in text and "boom" in text
    assert "### did not pass: cmd (exit skipped)" in text
    assert js.exists()
