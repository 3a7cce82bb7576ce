"""train.py end to end on CPU with synthtex: run directory contract, exact resume, re-runs.

Runs train.py as a subprocess, the way a user does, with small images (32 px) so each run takes
seconds. Resume equality is tested with a real SIGINT delivered while the run is training.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fixtures
import train
from helpers import utils

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('finished_run',)

ROOT = Path(__file__).resolve().parents[1]
# Small, fast, deterministic: 32 px crops, no workers, one thread so CPU kernels are repeatable.
BASE = ["--dataset", "synthtex", "--model", "twistnet18", "--img_size", "32", "--batch_size", "16",
        "--workers", "0", "--lr", "0.05", "--warmup_epochs", "1", "--no_progress", "--deterministic"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
METRICS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "gates")


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *BASE, "--run_dir", str(run_dir), *extra]


def run_train(run_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(run_dir, *extra), capture_output=True, text=True, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_path(run_dir: Path, epochs_seed: str = "seed42") -> Path:
    return run_dir / f"synthtex_fold1_twistnet18_{epochs_seed}"


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs")
    run_train(run_dir, "--epochs", "2", "--tensorboard")
    return run_path(run_dir)


def test_run_directory_has_every_file_and_field(finished_run: Path) -> None:
    for name in ("log.jsonl", "last.pt", "best.pt", "results.json", "train.log"):
        assert (finished_run / name).is_file(), name

    log = read_log(finished_run)
    assert [r["epoch"] for r in log] == [1, 2]
    for record in log:
        for key in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "gates",
                    "epoch_time_s", "images_per_s"):
            assert key in record, key
        assert 0 <= record["val_acc"] <= 100 and 0 <= record["train_acc"] <= 100
        assert sorted(record["gates"]) == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
        assert all(0 < g < 1 for g in record["gates"].values())
        assert record["images_per_s"] > 0

    results = json.loads((finished_run / "results.json").read_text())
    for key in ("model", "dataset", "fold", "seed", "epochs", "best_epoch", "best_val_acc", "test_acc",
                "test_acc_last", "test_top5", "per_class_acc", "confusion", "params", "flops",
                "train_time_s", "config", "git_commit", "versions"):
        assert key in results, key
    assert (results["model"], results["dataset"], results["fold"], results["seed"]) == ("twistnet18", "synthtex", 1, 42)
    assert results["best_val_acc"] == max(r["val_acc"] for r in log)
    assert results["best_epoch"] == max(log, key=lambda r: r["val_acc"])["epoch"]
    n_classes = len(results["per_class_acc"])
    confusion = torch.tensor(results["confusion"])
    assert confusion.shape == (n_classes, n_classes)
    # test_acc is the diagonal share of the confusion matrix of the best-validation weights
    assert results["test_acc"] == pytest.approx(100 * confusion.diag().sum().item() / confusion.sum().item())
    assert results["test_top5"] >= results["test_acc"]
    assert results["params"] == 11_200_623 - 24_111 + 512 * n_classes + n_classes + 388_340
    assert results["flops"] and results["flops"] > 0
    assert results["versions"]["torch"] == torch.__version__
    assert results["config"]["epochs"] == 2 and results["config"]["img_size"] == 32

    last = torch.load(finished_run / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "rng", "config", "best_val_acc"):
        assert key in last, key
    assert last["epoch"] == 2
    best = torch.load(finished_run / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == results["best_epoch"]

    text = (finished_run / "train.log").read_text()
    assert "epoch   1/2" in text and "epoch   2/2" in text and "done:" in text


def test_finished_run_exits_at_once(finished_run: Path) -> None:
    before = (finished_run / "results.json").stat().st_mtime_ns
    start = time.perf_counter()
    proc = run_train(finished_run.parent, "--epochs", "2")
    assert "already finished" in proc.stdout
    assert (finished_run / "results.json").stat().st_mtime_ns == before
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    run_train(tmp_path, "--epochs", "1")
    path = run_path(tmp_path)
    (path / "results.json").unlink()  # pretend it was interrupted after epoch 1
    proc = run_train(tmp_path, "--epochs", "1", "--lr", "0.1", check=False)
    assert proc.returncode != 0
    assert "--lr: 0.05 -> 0.1" in proc.stderr + proc.stdout


def interrupt_during_training(run_dir: Path, *extra: str) -> dict:
    """Start a run, SIGINT it once epoch 1 is logged, return the saved last.pt."""
    proc = subprocess.Popen(train_cmd(run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    log_file = run_path(run_dir) / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log_file.exists() and log_file.read_text().strip():
            break
        time.sleep(0.05)
    time.sleep(0.5)  # land inside epoch 2's training steps
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "Interrupted at epoch" in out
    return torch.load(run_path(run_dir) / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_numbers(tmp_path: Path) -> None:
    extra = ("--epochs", "3", "--batch_size", "8")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_train(straight, *extra)

    saved = interrupt_during_training(interrupted, *extra)
    assert not (run_path(interrupted) / "results.json").exists()
    assert saved["epoch"] >= 1
    resumed = run_train(interrupted, *extra)
    assert "Resuming from" in resumed.stdout

    log_a, log_b = read_log(run_path(straight)), read_log(run_path(interrupted))
    assert [r["epoch"] for r in log_b] == [1, 2, 3]
    for a, b in zip(log_a, log_b):
        for key in METRICS:
            assert a[key] == b[key], (a["epoch"], key, a[key], b[key])
    res_a = json.loads((run_path(straight) / "results.json").read_text())
    res_b = json.loads((run_path(interrupted) / "results.json").read_text())
    for key in ("best_epoch", "best_val_acc", "test_acc", "test_acc_last", "test_top5", "confusion"):
        assert res_a[key] == res_b[key], key


@pytest.mark.slow
def test_synthtex_is_learnable_in_cpu_minutes(tmp_path: Path) -> None:
    """TwistNet-18 from scratch at 32 px, 8 epochs (about 90 s on 2 cores): far above chance.

    Measured with this command: 74.2% test accuracy (chance is 12.5% for 8 classes). The bound of
    40% leaves room for other CPUs' kernels and is still more than 3x chance; with 128 test images
    the binomial standard error near 70% is about 4 points.
    """
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "synthtex", "--model", "twistnet18",
           "--img_size", "32", "--epochs", "8", "--batch_size", "32", "--lr", "0.05", "--warmup_epochs", "1",
           "--crop_scale", "0.6", "--mixup", "0", "--cutmix", "0", "--randaug_n", "0",
           "--workers", "0", "--no_progress", "--run_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run_path(tmp_path) / "results.json").read_text())
    chance = 100 / len(results["classes"])  # results.json holds percentages
    assert chance == 12.5
    assert results["test_acc"] > 40.0, results["test_acc"]
    assert results["best_val_acc"] > 40.0, results["best_val_acc"]


# --------------------------------------------------------------------------------------------
# Reliability: what a run refuses, and what it never reports as a result
# --------------------------------------------------------------------------------------------
def run_inline(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """train.py's main in this process, the way run_main ends it: (exit status, stdout, stderr)."""
    code = utils.run_main(train.main, [*BASE, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_batch_sizes_and_epochs_that_cannot_train_are_refused(tmp_path: Path, capsys) -> None:
    line = fixtures.refused(train.main, [*BASE, "--run_dir", str(tmp_path), "--batch_size", "1", "--epochs", "1"],
                            tmp_path, capsys)
    assert "--batch_size 1 cannot train" in line and "BatchNorm" in line and "Mixup" in line
    assert "--epochs 0" in fixtures.refused(train.main, [*BASE, "--run_dir", str(tmp_path), "--epochs", "0"],
                                            tmp_path, capsys)


def test_an_epoch_that_trained_no_image_is_an_error_not_a_result(tmp_path: Path, capsys) -> None:
    """Every training image unreadable: the old loop skipped every batch and wrote random-init numbers."""
    data = fixtures.make_imagefolder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    for image in (data / "train").rglob("*.png"):
        fixtures.corrupt(image)
    code, out, err = run_inline(capsys, "--dataset", "imagefolder", "--data_dir", str(data), "--epochs", "1",
                                "--batch_size", "2", "--run_dir", str(tmp_path / "runs"))
    assert code == 2 and "epoch 1 trained on no image" in fixtures.one_error_line(err), out + err
    run = tmp_path / "runs" / "imagefolder_fold1_twistnet18_seed42"
    assert not (run / "results.json").exists() and not (run / "last.pt").exists()


def test_a_finished_run_refuses_a_changed_recipe(finished_run: Path, capsys) -> None:
    before = (finished_run / "results.json").stat().st_mtime_ns
    code, out, err = run_inline(capsys, "--run_dir", str(finished_run.parent), "--epochs", "3", "--lr", "0.1")
    line = fixtures.one_error_line(err)
    assert code == 2 and "already finished with another recipe" in line
    assert "--epochs: 2 -> 3" in line and "--lr: 0.05 -> 0.1" in line and "--force" in line and "--tag" in line
    assert "already finished:" not in out.lower()
    assert (finished_run / "results.json").stat().st_mtime_ns == before


def test_force_says_that_it_removes_a_finished_run(finished_run: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / finished_run.name
    shutil.copytree(finished_run, copy)
    code, out, _ = run_inline(capsys, "--run_dir", str(tmp_path), "--epochs", "1", "--force")
    assert code == 0
    said = next(line for line in out.splitlines() if line.startswith("--force:"))
    for name in ("results.json", "best.pt", "last.pt", "log.jsonl", "train.log"):
        assert name in said
    assert "finished run with test accuracy" in said
    assert [r["epoch"] for r in read_log(copy)] == [1]


def test_a_start_killed_before_its_first_last_pt_does_not_log_epochs_twice(finished_run: Path,
                                                                           tmp_path: Path, capsys) -> None:
    """A kill between the epoch's log record and its last.pt leaves a log without a checkpoint."""
    copy = tmp_path / finished_run.name
    shutil.copytree(finished_run, copy)
    for name in ("results.json", "last.pt", "best.pt"):
        (copy / name).unlink()
    assert [r["epoch"] for r in read_log(copy)] == [1, 2]
    code, out, _ = run_inline(capsys, "--run_dir", str(tmp_path), "--epochs", "1")
    assert code == 0 and "saved no last.pt; starting afresh" in out
    assert [r["epoch"] for r in read_log(copy)] == [1]


@pytest.mark.parametrize("content, what", [
    (b"\x8f\x02random bytes" * 50, "not a torch.save file"),
    ("state_dict", "model weights only"),
    ("malicious", "Python objects that safe loading refuses"),
])
def test_a_corrupt_or_foreign_last_pt_is_named_and_explained(tmp_path: Path, capsys, content, what: str) -> None:
    run = tmp_path / "synthtex_fold1_twistnet18_seed42"
    run.mkdir()
    if content == "state_dict":
        torch.save({"conv1.weight": torch.zeros(2, 2)}, run / "last.pt")
    elif content == "malicious":
        torch.save({"model": Payload(tmp_path / "payload_ran")}, run / "last.pt")
    else:
        (run / "last.pt").write_bytes(content)
    code, _, err = run_inline(capsys, "--run_dir", str(tmp_path), "--epochs", "1")
    line = fixtures.one_error_line(err)
    assert code == 2 and str(run / "last.pt") in line and what in line, line
    assert "--force" in line and "will likely succeed" not in line and "Re-running" not in line
    assert not (tmp_path / "payload_ran").exists()
    assert [p.name for p in run.iterdir()] == ["last.pt"]     # nothing written, the lock gone


class Payload:
    """A pickle that would run code (create a file) when loaded unsafely."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_resume_and_finished_runs_refuse_other_data(tmp_path: Path, capsys) -> None:
    """Same classes, other images: the data_dir is free to move, not to change."""
    data_a = fixtures.make_imagefolder(tmp_path / "a", classes=3, train_per_class=4)
    data_b = fixtures.make_imagefolder(tmp_path / "b", classes=3, train_per_class=5)
    moved = tmp_path / "a_moved"
    shutil.copytree(data_a, moved)
    args = ("--dataset", "imagefolder", "--epochs", "1", "--batch_size", "4", "--run_dir", str(tmp_path / "runs"))
    assert run_inline(capsys, *args, "--data_dir", str(data_a))[0] == 0
    run = tmp_path / "runs" / "imagefolder_fold1_twistnet18_seed42"
    results = json.loads((run / "results.json").read_text())
    assert results["data_fingerprint"]["sizes"] == {"train": 12, "val": 6, "test": 6}

    code, _, err = run_inline(capsys, *args, "--data_dir", str(data_b))
    line = fixtures.one_error_line(err)
    assert code == 2 and "already finished on other data" in line and "train 12 -> 15" in line
    code, out, _ = run_inline(capsys, *args, "--data_dir", str(moved))
    assert code == 0 and "already finished" in out             # a moved copy is the same data

    (run / "results.json").unlink()                             # as if interrupted after the epoch
    code, _, err = run_inline(capsys, *args, "--data_dir", str(data_b))
    line = fixtures.one_error_line(err)
    assert code == 2 and "last.pt was trained on other data" in line and "train 12 -> 15" in line
    assert not (run / "results.json").exists()


def test_a_fixed_size_model_at_the_wrong_size_fails_before_anything_is_written(tmp_path: Path, capsys) -> None:
    line = fixtures.refused(train.main, [*BASE, "--model", "swin_tiny", "--epochs", "1", "--run_dir", str(tmp_path)],
                            tmp_path, capsys)
    assert "swin_tiny cannot take 32 px images" in line and "--img_size 224" in line


def test_per_class_accuracy_of_a_class_without_test_images_is_null(tmp_path: Path, capsys) -> None:
    data = fixtures.make_imagefolder(tmp_path / "data", classes=3, train_per_class=4)
    shutil.rmtree(data / "test" / "class_0")
    code, out, err = run_inline(capsys, "--dataset", "imagefolder", "--data_dir", str(data), "--epochs", "1",
                                "--batch_size", "4", "--run_dir", str(tmp_path / "runs"))
    assert code == 0, out + err
    assert "have no test image" in out
    results = json.loads((tmp_path / "runs" / "imagefolder_fold1_twistnet18_seed42" / "results.json").read_text())
    per_class = results["per_class_acc"]
    assert per_class[0] is None and all(isinstance(v, float) for v in per_class[1:])


def test_a_diverging_loss_is_one_error_line(tmp_path: Path, capsys) -> None:
    code, _, err = run_inline(capsys, "--run_dir", str(tmp_path), "--epochs", "1", "--lr", "1e30",
                              "--warmup_epochs", "0")
    line = fixtures.one_error_line(err)
    assert code == 2 and "the training loss is" in line and "lower --lr" in line


def test_tensorboard_events_hold_the_logged_scalars_and_the_confusion_image(finished_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from PIL import Image
    events = EventAccumulator(str(finished_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    log = read_log(finished_run)
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "data_wait_share",
                "gates/layer3.0", "gates/layer4.1"):
        points = events.Scalars(key)
        assert [p.step for p in points] == [1, 2], key
        group, _, name = key.partition("/")
        logged = [r[group][name] if name else r[key] for r in log]
        assert [p.value for p in points] == pytest.approx(logged, rel=1e-6), key   # float32 in the event file
    results = json.loads((finished_run / "results.json").read_text())
    assert events.Scalars("test_acc")[0].value == pytest.approx(results["test_acc"], rel=1e-6)
    image = events.Images("test_confusion")[0]
    classes = len(results["classes"])
    assert Image.open(io.BytesIO(image.encoded_image_string)).size == (8 * classes, 8 * classes)
