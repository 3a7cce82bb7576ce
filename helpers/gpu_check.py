"""`make gpu-check`: one command that checks and measures the repo on a CUDA GPU, in <= 8 minutes,
and writes gpu_report.md and gpu_report.json.

Usage:
    make gpu-check                              # = python -m helpers.gpu_check
    python -m helpers.gpu_check --out reports/  # the reports elsewhere (default: the repo root)
    python -m helpers.gpu_check --budget_s 300  # a shorter budget: what does not fit is reported as skipped

Checks (pytest -m cuda, tests/test_cuda.py): bf16/fp16 train steps of TwistNet-18, ResNet-18 and the
SparK encoder finite and close to fp32; channels_last and torch.compile give the eager logits; one
epoch of train.py on a generated JPEG folder with each loader; torchrun (NCCL) over every visible GPU
for a few steps of pretrain_imagenet.py; exact resume on CUDA.
Throughput: compute_flops.py --speed (batch 256, bf16, channels_last, compile off and on), TwistNet-18
vs ResNet-18; train.py --benchmark_loader with PIL on every core vs DALI; one training epoch of
TwistNet-18 with each loader (images/s end to end).

Without a CUDA GPU it is one `error:` line and exit status 2. Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import torch

from helpers import utils
from helpers.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480
MIN_STEP_S = 10    # a step with less time left than this is reported as skipped
LOADER_IMAGES, LOADER_SIZE = 768, (500, 375)   # a DTD-like JPEG (DTD: 300-640 px)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError(f"make gpu-check needs a CUDA GPU and torch {torch.__version__} sees none "
                        f"(CUDA build {torch.version.cuda or 'none'}); run it on a machine with one.")


class Budget:
    """The seconds left of the run's budget; each step gets at most its own cap of them."""

    def __init__(self, total_s: float) -> None:
        self.deadline = time.monotonic() + total_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run(cmd: Sequence[str], timeout_s: float) -> tuple[dict, str]:
    """(exit status, seconds and output tail of a command; its whole stdout). A timeout is a result,
    not a crash; a step the budget has no time left for is "skipped" without running."""
    result: dict[str, Any] = {"command": " ".join(cmd)}
    if timeout_s < MIN_STEP_S:
        return {**result, "exit": "skipped", "seconds": 0.0, "tail": "skipped: the time budget is spent"}, ""
    start = time.monotonic()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=ROOT, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        code, stdout, out = proc.returncode, proc.stdout, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as error:
        stdout = ""
        out = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                      for part in (error.stdout, error.stderr))
        code = "timeout"
    return {**result, "exit": code, "seconds": round(time.monotonic() - start, 1), "tail": out[-1500:]}, stdout


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------
def pytest_cuda(work: Path, budget: Budget) -> dict:
    junit = work / "junit.xml"
    result, _ = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p",
                     "no:cacheprovider", f"--junitxml={junit}"], min(300, budget.left()))
    result["tests"] = read_junit(junit) if junit.exists() else []
    return result


def read_junit(path: Path) -> list[dict]:
    """[{name, outcome, properties}] of a pytest junit XML file."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"name": case.get("name"), "outcome": outcome, "properties": properties})
    return tests


def model_speed(compile_: bool, budget: Budget) -> dict:
    cmd = [sys.executable, "compute_flops.py", "--speed", "--models", "resnet18,twistnet18", "--device", "cuda",
           "--amp", "bf16", "--channels_last", "on", "--batch_size", "256", "--json"]
    result, stdout = run(cmd + (["--compile"] if compile_ else []), min(150, budget.left()))
    try:
        result["rows"] = json.loads(stdout[stdout.index("["):]) if result["exit"] == 0 else []
    except ValueError:
        result["rows"] = []
    return result


def make_jpeg_folder(root: Path) -> Path:
    """imagefolder layout of LOADER_IMAGES textured JPEGs in 4 classes (+ small val/test splits)."""
    from PIL import Image

    import numpy as np
    rng = np.random.default_rng(0)
    width, height = LOADER_SIZE
    for split, count in (("train", LOADER_IMAGES), ("val", 32), ("test", 32)):
        for index in range(count):
            folder = root / split / f"class_{index % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            Image.fromarray(noise).resize(LOADER_SIZE, Image.Resampling.BICUBIC).save(folder / f"{index:04d}.jpg",
                                                                                      quality=90)
    return root


def loader_workers(loader: str) -> int:
    # PIL: a worker process per core; DALI: its CPU threads only feed the GPU's decoder and augmentation.
    cores = os.cpu_count() or 1
    return cores if loader == "pil" else min(8, cores)


def loader_speed(loader: str, data: Path, budget: Budget) -> dict:
    result, stdout = run([sys.executable, "train.py", "--benchmark_loader", "--dataset", "imagefolder", "--data_dir", str(data),
                  "--loader", loader, "--device", "cuda", "--batch_size", "128", "--workers",
                  str(loader_workers(loader)), "--no_progress"], min(120, budget.left()))
    match = re.search(r"([\d.]+) img/s after", stdout)
    result["images_per_s"] = float(match.group(1)) if match else None
    result["workers"] = loader_workers(loader)
    return result


def train_speed(loader: str, data: Path, work: Path, budget: Budget) -> dict:
    run_dir = work / f"runs_{loader}"
    result, _ = run([sys.executable, "train.py", "--dataset", "imagefolder", "--data_dir", str(data), "--loader", loader,
                  "--device", "cuda", "--model", "twistnet18", "--epochs", "1", "--batch_size", "128",
                  "--workers", str(loader_workers(loader)), "--run_dir", str(run_dir), "--no_progress"],
                 min(150, budget.left()))
    logs = list(run_dir.glob("*/log.jsonl"))
    records = utils.read_jsonl(logs[0]) if logs else []
    result["images_per_s"] = records[0]["images_per_s"] if records else None
    result["data_wait_share"] = records[0].get("data_wait_share") if records else None
    return result


def run_all_steps(budget: Budget, work: Path) -> dict:
    from helpers import dali

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                              "cpu_cores": os.cpu_count(), "torch": torch.__version__,
                              "dali": dali.is_installed(), "git_commit": utils.git_commit()}
    report["pytest"] = pytest_cuda(work, budget)
    report["model_speed"] = {"compile_off": model_speed(False, budget), "compile_on": model_speed(True, budget)}
    data = make_jpeg_folder(work / "jpegs")
    loaders = ["pil"] + (["dali"] if report["dali"] else [])
    report["loader_speed"] = {loader: loader_speed(loader, data, budget) for loader in loaders}
    report["train_speed"] = {loader: train_speed(loader, data, work, budget) for loader in loaders}
    return report


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def steps_of(report: dict) -> list[dict]:
    return [report["pytest"], *report["model_speed"].values(), *report["loader_speed"].values(),
            *report["train_speed"].values()]


def passed(report: dict) -> bool:
    """Every step ran and succeeded (a step the budget skipped is not a pass: it was not checked)."""
    return all(step["exit"] == 0 for step in steps_of(report))


def format_number(value: Any, digits: int = 1) -> str:
    return "not measured" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    lines = [f"# make gpu-check: {report['device']} x {report['gpus']}, {report['cpu_cores']} CPU cores",
             "", f"torch {report['torch']}, DALI {'installed' if report['dali'] else 'not installed'}, "
             f"commit {report['git_commit']}", "", "## Checks (pytest -m cuda)", "",
             f"exit {report['pytest']['exit']} in {report['pytest']['seconds']} s", "",
             "| test | outcome | measured |", "|---|---|---|"]
    for test in report["pytest"]["tests"]:
        measured = ", ".join(f"{k} {v}" for k, v in test["properties"].items())
        lines.append(f"| {utils.markdown_escape(test['name'])} | {test['outcome']} | {measured} |")
    lines += ["", "## Model throughput (compute_flops.py --speed, batch 256, bf16, channels_last)", "",
              "| compile | model | train img/s | infer img/s | train ratio | infer ratio |", "|---|---|---|---|---|---|"]
    for key, step in report["model_speed"].items():
        for row in step["rows"] or [{"name": f"(exit {step['exit']})"}]:
            lines.append(f"| {key.split('_')[1]} | {row['name']} | {format_number(row.get('train_img_s'))} | "
                         f"{format_number(row.get('infer_img_s'))} | {format_number(row.get('train_ratio'), 3)} | "
                         f"{format_number(row.get('infer_ratio'), 3)} |")
    lines += ["", f"## Loaders ({LOADER_IMAGES} JPEGs of {LOADER_SIZE[0]}x{LOADER_SIZE[1]}, 224 px crops, batch 128)",
              "", "| loader | workers/threads | loader alone img/s | TwistNet-18 training img/s | data wait |",
              "|---|---|---|---|---|"]
    for loader, step in report["loader_speed"].items():
        train = report["train_speed"][loader]
        wait = train.get("data_wait_share")
        lines.append(f"| {loader} | {step.get('workers')} | {format_number(step['images_per_s'])} | "
                     f"{format_number(train['images_per_s'])} | "
                     f"{'not measured' if wait is None else f'{100 * wait:.0f}%'} |")
    for step in (step for step in steps_of(report) if step["exit"] != 0):
        lines += ["", f"### did not pass: {step['command']} (exit {step['exit']})", "", "```", step["tail"], "```"]
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "gpu_report.md", out / "gpu_report.json"
    utils.atomic_write_text(render_markdown(report), md)
    utils.atomic_write_text(json.dumps(report, indent=1), js)
    return md, js


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(ROOT), help="folder that receives gpu_report.md and gpu_report.json")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S, help="seconds the whole check may take")
    args = parser.parse_args(argv)
    require_cuda()
    budget = Budget(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        report = run_all_steps(budget, Path(work))
    report["passed"] = passed(report)
    md, js = write_reports(report, Path(args.out))
    print(f"gpu-check {'passed' if report['passed'] else 'FAILED'}: {md}, {js}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
