"""run_all.py end to end on CPU with synthtex at 32 px, one epoch per run.

Real sweeps run run_all.py as a subprocess, the way a user does: a 2-model x 2-fold x 1-seed
sweep (shared by several tests), and a second sweep that is stopped with a real SIGINT, then run
again next to a run whose last.pt is corrupt (a failing run that must not stop the others).
Plan-only behaviour (skip, dry run, bad arguments) runs in-process, where it is cheap.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_all  # noqa: E402
from helpers import utils  # noqa: E402

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('sweep', 'interrupted', 'resumed_with_a_failure')

# Small and fast: 32 px crops, no workers, no heavy augmentation.
TRAIN_ARGS = ["--img_size", "32", "--batch_size", "16", "--workers", "0",
              "--randaug_n", "0", "--mixup", "0", "--cutmix", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODELS, FOLDS = ("twistnet18", "resnet18"), (1, 2)


def sweep_args(run_dir: Path, models: str = "twistnet18,resnet18", folds: str = "1-2", *extra: str) -> list[str]:
    return ["--dataset", "synthtex", "--models", models, "--folds", folds, "--seeds", "42",
            "--epochs", "1", "--run_dir", str(run_dir), *extra, *TRAIN_ARGS]


def run_sweep(run_dir: Path, *args: str, models: str = "twistnet18,resnet18", folds: str = "1-2"
              ) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "run_all.py"), *sweep_args(run_dir, models, folds, *args)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)


def run_path(run_dir: Path, model: str, fold: int = 1) -> Path:
    return run_dir / f"synthtex_fold{fold}_{model}_seed42"


def summary_counts(out: str) -> dict[str, int]:
    """The status table at the end of run_all's output (rows with a count only)."""
    table = out[out.index("Sweep summary"):].splitlines()[2:8]
    return {name: int(n) for name, n in (line.strip().rsplit(None, 1) for line in table) if int(n)}


def snapshot(run_dir: Path) -> dict[str, int]:
    """mtime and size of every file: proof that nothing was written."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("sweep")
    return run_dir, run_sweep(run_dir, "--jobs", "2")


def test_sweep_runs_every_model_fold_and_seed(sweep) -> None:
    run_dir, proc = sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary_counts(proc.stdout) == {"done": 4}
    for model in MODELS:
        for fold in FOLDS:
            path = run_path(run_dir, model, fold)
            results = json.loads((path / "results.json").read_text())
            assert (results["model"], results["fold"], results["seed"]) == (model, fold, 42)
            assert results["config"]["img_size"] == 32 and results["config"]["mixup"] == 0  # passed through
            log = (path / "run_all.log").read_text()
            assert "done: best val" in log and log.rstrip().splitlines()[-1].startswith("===== exit code 0")
    assert "sweep: 100%" in proc.stderr and "4/4" in proc.stderr  # progress over runs


def test_finished_runs_are_skipped_without_a_process(sweep, monkeypatch, capsys) -> None:
    run_dir, _ = sweep
    before = snapshot(run_dir)

    real_popen = subprocess.Popen

    def no_training(command, *args, **kwargs):
        if str(run_all.TRAIN_SCRIPT) in map(str, command):
            raise AssertionError("run_all started train.py for a finished run")
        return real_popen(command, *args, **kwargs)  # imports may spawn helpers (ldconfig)
    monkeypatch.setattr(run_all.subprocess, "Popen", no_training)
    assert run_all.main(sweep_args(run_dir)) == 0
    out = capsys.readouterr().out
    assert summary_counts(out) == {"skipped": 4}
    assert snapshot(run_dir) == before


def test_a_sweep_with_another_recipe_refuses_its_finished_runs(sweep, capsys) -> None:
    """Re-running a sweep with a new recipe must not keep the old numbers as "skipped"."""
    run_dir, _ = sweep
    before = snapshot(run_dir)
    assert utils.run_main(run_all.main, sweep_args(run_dir, "twistnet18,resnet18", "1-2", "--lr", "0.2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 finished run(s)") and err.count("finished with another recipe (--lr: 0.01 -> 0.2)") == 4
    assert "--force" in err and "--tag" in err
    assert snapshot(run_dir) == before


def test_dry_run_prints_the_exact_plan_and_writes_nothing(sweep, tmp_path: Path, capsys) -> None:
    fresh = tmp_path / "fresh"
    assert run_all.main(sweep_args(fresh, "twistnet18,resnet18", "1-2", "--dry_run")) == 0
    out = capsys.readouterr().out
    assert not fresh.exists()
    names = [line.split()[1] for line in out.splitlines() if line.startswith("would-run")]
    # fold by fold, all models within a fold
    assert names == [run_path(fresh, m, f).name for f in FOLDS for m in MODELS]

    run_dir, _ = sweep
    before = snapshot(run_dir)
    assert run_all.main(sweep_args(run_dir, "twistnet18,resnet18", "1-2", "--dry_run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("skip ") for line in lines) == 4 and snapshot(run_dir) == before
    # The command shown is the one the sweep ran (run_all.log keeps it on its second line).
    shown = lines[lines.index(next(l for l in lines if "synthtex_fold2_resnet18_seed42" in l)) + 1].strip()
    ran = (run_path(run_dir, "resnet18", 2) / "run_all.log").read_text().splitlines()[1]
    assert shown == ran
    assert shlex.split(shown)[:2] == [sys.executable, str(ROOT / "train.py")]


def test_unknown_model_is_refused_before_anything_starts(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(sweep_args(tmp_path / "runs", "resnet18,resnet81"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet81' (did you mean 'resnet18'?)" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seed", "1"], "--seed (use run_all's --seeds)"),
    (["--fold=3"], "--fold (use run_all's --folds)"),
    (["--lrr", "0.1"], "--lrr (did you mean --lr?)"),
])
def test_bad_pass_through_options_are_refused(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(sweep_args(tmp_path, "resnet18", "1", *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_int_lists_and_gpu_slots(monkeypatch) -> None:
    assert utils.parse_int_list("1-3,5") == [1, 2, 3, 5]
    assert utils.parse_int_list("42,43,42") == [42, 43]
    for bad in ("3-1", "a", ""):
        with pytest.raises(Exception):
            utils.parse_int_list(bad)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run_all, "available_cpus", lambda: 16)
    slots = run_all.slot_environments(["0", "1"], runs_per_gpu=2, jobs=1)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
    assert {s["OMP_NUM_THREADS"] for s in slots} == {"4"}
    assert run_all.slot_environments(None, 1, jobs=3) == [{"OMP_NUM_THREADS": "5"}] * 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert run_all.slot_environments(None, 1, jobs=2) == [{}, {}]


# --------------------------------------------------------------------------------------------
# Ctrl-C, resume, and a failing run
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """A one-run sweep that gets SIGINT while its run is training."""
    run_dir = tmp_path_factory.mktemp("interrupted")
    command = [sys.executable, str(ROOT / "run_all.py"), *sweep_args(run_dir, "resnet18", "1")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    train_log = run_path(run_dir, "resnet18") / "train.log"
    deadline = time.time() + 300
    # train.py logs "run <path> | ..." once its data and model are built, just before training.
    while time.time() < deadline and proc.poll() is None:
        if train_log.exists() and " run " in train_log.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    return run_dir, proc.returncode, out


def test_ctrl_c_lets_runs_save_and_exits_130(interrupted) -> None:
    run_dir, returncode, out = interrupted
    assert returncode == 130, out
    assert summary_counts(out)["interrupted"] == 1
    path = run_path(run_dir, "resnet18")
    assert (path / "last.pt").is_file() and not (path / "results.json").exists()
    log = (path / "run_all.log").read_text()
    assert "Interrupted at epoch" in log and "===== exit code 130" in log


def test_dry_run_shows_the_interrupted_run_as_resume(interrupted, capsys) -> None:
    run_dir, _, _ = interrupted
    assert run_all.main(sweep_args(run_dir, "resnet18", "1", "--dry_run")) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["resume", "synthtex_fold1_resnet18_seed42"]


@pytest.fixture(scope="module")
def resumed_with_a_failure(interrupted) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the sweep again, with a twistnet18 run first whose last.pt is corrupt."""
    run_dir, _, _ = interrupted
    broken = run_path(run_dir, "twistnet18")
    broken.mkdir()
    (broken / "last.pt").write_bytes(b"not a checkpoint")
    return run_dir, run_sweep(run_dir, "--jobs", "1", models="twistnet18,resnet18", folds="1")


def test_interrupted_run_resumes(resumed_with_a_failure) -> None:
    run_dir, proc = resumed_with_a_failure
    path = run_path(run_dir, "resnet18")
    assert (path / "results.json").is_file(), proc.stdout + proc.stderr
    assert "Resuming from" in (path / "run_all.log").read_text()
    assert [json.loads(line)["epoch"] for line in (path / "log.jsonl").read_text().splitlines()] == [1]


def test_failed_run_is_reported_and_the_others_finish(resumed_with_a_failure) -> None:
    run_dir, proc = resumed_with_a_failure
    assert proc.returncode == 1
    assert summary_counts(proc.stdout) == {"done": 1, "failed": 1}
    log_path = run_path(run_dir, "twistnet18") / "run_all.log"
    failed_section = proc.stdout[proc.stdout.index("Failed runs"):]
    assert f"synthtex_fold1_twistnet18_seed42  exit 2  {log_path}" in failed_section
    # The child's own last line (its error), not run_all's "===== exit code" marker written after it.
    error_line = failed_section.splitlines()[2].strip()
    assert error_line.startswith("error: Could not read checkpoint") and "last.pt" in error_line, failed_section
    assert "not a torch.save file" in error_line and "--force" in error_line
    assert "Traceback" not in log_path.read_text()
    # The failure came first in the plan, and the sweep went on to finish the next run.
    assert proc.stdout.index("failed      synthtex_fold1_twistnet18") < proc.stdout.index("done        synthtex_fold1_resnet18")
