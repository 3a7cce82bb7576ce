"""pretrain_imagenet.py on CPU: two-process torchrun (gloo), exact resume, downstream pick-up, bad data.

The distributed runs go through `python -m torch.distributed.run`, the way a user launches
them, on a tiny ImageNet-layout folder of 32-px crops. The validation split has 9 images, which
two processes cannot split evenly: padding duplicates would show as 10. The interruption used
for the resume test is the script's own stop path (`--stop_after_steps`, one step into epoch 2);
a second test delivers a real SIGINT. Cheap checks (sampler, batch plan, refusals, data errors)
call the script's functions in-process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures import corrupt, make_imagenet_folder, one_error_line

import models
from helpers import distributed, figures, loading
import plot_results
import pretrain_imagenet as pretrain
from helpers import recipes, rundirs, utils

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('straight', 'interrupted')

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "pretrain_imagenet.py")
# One thread per process keeps the CPU kernels bitwise repeatable, so resumed runs can be compared
# with ==, and stops two processes from fighting over two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--device", "cpu", "--workers", "0", "--img_size", "32", "--batch_size", "4", "--print_freq", "0"]
TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 8, 3, 3     # 24 train images = 3 steps of 8; 9 val images
EPOCH_METRICS = ("lr", "train_loss", "train_images", "val_loss", "val_acc", "val_top5", "val_images", "gates")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", SCRIPT, *TINY, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_inline(*args: str) -> int:
    """The script's main() in this process: no interpreter start-up, one process (world of 1)."""
    return pretrain.main([*TINY, *args])


def records(ckpt_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (ckpt_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["type"] == kind]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # in-process runs on one thread too (conftest)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), classes=CLASSES,
                                train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, size=48)


@pytest.fixture(scope="module")
def straight(imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint dir, weights dir) of an uninterrupted two-process, two-epoch run."""
    base = tmp_path_factory.mktemp("straight")
    torchrun("--data_dir", str(imagenet), "--epochs", "2", "--checkpoint_dir", str(base / "ckpt"),
             "--weights_dir", str(base / "weights"), "--tensorboard")
    return base / "ckpt", base / "weights"


@pytest.fixture(scope="module")
def interrupted(imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Checkpoint dir of the same run stopped one step into epoch 2, and the run's output."""
    ckpt = tmp_path_factory.mktemp("interrupted") / "ckpt"
    proc = torchrun("--data_dir", str(imagenet), "--epochs", "2", "--checkpoint_dir", str(ckpt),
                    "--weights_dir", str(ckpt.parent / "weights"), "--stop_after_steps", "4", check=False)
    assert proc.returncode != 0, "a stopped run must not report success"
    return ckpt, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# Distributed run
# --------------------------------------------------------------------------------------------
def test_two_process_run_writes_every_file(straight: tuple[Path, Path]) -> None:
    ckpt, weights = straight
    for name in ("latest.pt", "best.pt", "twistnet18_imagenet.pt", "log.jsonl", "train.log"):
        assert (ckpt / name).is_file(), name
    assert (weights / "twistnet18_imagenet.pt").is_file()

    header, = records(ckpt, "header")
    assert header["world_size"] == 2 and header["global_batch"] == 8 and header["backend"] == "gloo"
    assert header["base_lr"] == 0.1 and header["lr"] == pytest.approx(0.1 * 8 / 256)
    assert header["train_images"] == CLASSES * TRAIN_PER_CLASS and header["num_classes"] == CLASSES
    for key in ("command", "git_commit", "versions", "config", "stci_share"):
        assert key in header, key
    epochs = records(ckpt, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        # 9 validation images over 2 processes: each counted exactly once, no padding duplicate
        assert r["val_images"] == CLASSES * VAL_PER_CLASS == 9
        assert 0 <= r["val_acc"] <= r["val_top5"] <= 100
        assert r["train_images"] == 24 and r["images_per_s"] > 0 and r["eta_s"] >= 0
        for key in ("train_loss", "lr", "epoch_time_s", "data_wait_share"):
            assert key in r, key

    final = load(ckpt / "twistnet18_imagenet.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in final)
    copy = load(weights / "twistnet18_imagenet.pt")
    assert all(torch.equal(final[k], copy[k]) for k in final)
    latest = load(ckpt / "latest.pt")
    assert latest["epoch"] == 2 and latest["world_size"] == 2 and len(latest["rank_states"]) == 2
    assert all(torch.equal(final[k], latest["model"][k]) for k in final)   # no EMA: last weights
    best = load(ckpt / "best.pt")
    assert best["val_acc"] == max(r["val_acc"] for r in epochs)
    model = models.build_model("twistnet18", CLASSES, verbose=False)
    model.load_state_dict(final)   # strict: every tensor, plain names


def test_tensorboard_events_of_rank_0_hold_the_epoch_records(straight: tuple[Path, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ckpt, _ = straight
    assert len(list((ckpt / "tensorboard").glob("events.out.tfevents.*"))) == 1   # rank 0 only
    events = EventAccumulator(str(ckpt / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    epochs = records(ckpt, "epoch")
    for key in ("lr", "train_loss", "val_acc", "images_per_s", "data_wait_share", "gates/layer3.0"):
        group, _, name = key.partition("/")
        points = events.Scalars(key)
        assert [p.step for p in points] == [1, 2], key
        assert [p.value for p in points] == pytest.approx([r[group][name] if name else r[key] for r in epochs],
                                                         rel=1e-6), key


def test_curves_plot_reads_a_pretraining_log(straight: tuple[Path, Path], tmp_path: Path) -> None:
    """One log vocabulary: the accuracy panel of --plot curves shows the pretraining val accuracy."""
    ckpt, _ = straight
    log = ckpt / "log.jsonl"
    records_ = plot_results.read_log(log)   # the header, resume and final records are left out
    assert [r["epoch"] for r in records_] == [1, 2]
    with figures.paper_style():
        fig = plot_results.curves_figure(records_)
    loss_axis, acc_axis = fig.axes[:2]
    val = [line for line in acc_axis.get_lines() if line.get_label() == "val"]
    assert len(val) == 1 and list(val[0].get_ydata()) == [r["val_acc"] for r in records_]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["train", "val"]
    written = plot_results.make_plots(["--plot", "curves", "--log_file", str(log), "--save_dir", str(tmp_path)])
    assert sorted(p.suffix for p in written) == [".pdf", ".png"]


def test_resume_after_interruption_matches_uninterrupted_run(
        straight: tuple[Path, Path], interrupted: tuple[Path, str], tmp_path: Path, imagenet: Path) -> None:
    stopped, output = interrupted
    assert "Interrupted at epoch 2, step 1/3" in output
    saved = load(stopped / "latest.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    assert [r["epoch"] for r in records(stopped, "epoch")] == [1]

    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped, ckpt)
    proc = torchrun("--data_dir", str(imagenet), "--resume", str(ckpt / "latest.pt"),
                    "--weights_dir", str(tmp_path / "weights"))
    assert "Resumed from" in proc.stdout and "epoch 2, step 1/3" in proc.stdout

    a, b = records(straight[0], "epoch"), records(ckpt, "epoch")
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in EPOCH_METRICS:
            assert ra[key] == rb[key], (ra["epoch"], key, ra[key], rb[key])
    wa, wb = load(straight[0] / "twistnet18_imagenet.pt"), load(ckpt / "twistnet18_imagenet.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_on_one_process_keeps_the_global_batch(interrupted: tuple[Path, str], tmp_path: Path,
                                                      imagenet: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(interrupted[0], ckpt)
    assert run_inline("--data_dir", str(imagenet), "--resume", str(ckpt / "latest.pt"),
                      "--weights_dir", str(tmp_path / "weights")) == 0
    out = capsys.readouterr().out
    assert "world size 2 -> 1" in out
    assert "global batch 8 = 4 per process x 1 processes x 2 accumulation steps" in out
    resumed = records(ckpt, "resume")[-1]
    assert resumed["global_batch"] == 8 and resumed["accum_steps"] == 2 and resumed["world_size"] == 1
    assert [r["epoch"] for r in records(ckpt, "epoch")] == [1, 2]
    assert records(ckpt, "epoch")[-1]["val_images"] == 9


@pytest.mark.slow
def test_ema_and_accumulation_resume_exactly(tmp_path: Path) -> None:
    """One process, synthetic data: EMA, 2 accumulation steps, stopped mid-epoch and resumed."""
    args = ["--data", "synthetic", "--synthetic_images", "48", "--synthetic_val_images", "5", "--num_classes", "4",
            "--epochs", "2", "--accum_steps", "2", "--ema", "--ema_decay", "0.9"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_inline(*args, "--checkpoint_dir", str(straight), "--weights_dir", str(straight / "w")) == 0
    assert run_inline(*args, "--checkpoint_dir", str(stopped), "--weights_dir", str(stopped / "w"),
                      "--stop_after_steps", "8") == 130
    assert load(stopped / "latest.pt")["step_in_epoch"] == 2   # 6 steps per epoch
    assert run_inline("--resume", str(stopped / "latest.pt"), "--weights_dir", str(stopped / "w")) == 0
    a, b = records(straight, "epoch"), records(stopped, "epoch")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    wa, wb = load(straight / "twistnet18_imagenet.pt"), load(stopped / "twistnet18_imagenet.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ema = load(straight / "latest.pt")["ema"]
    assert all(torch.equal(wa[k], ema[f"module.{k}"]) for k in wa)   # the export is the EMA


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    args = ["--data", "synthetic", "--synthetic_images", "96", "--synthetic_val_images", "7",
            "--num_classes", "5", "--epochs", "1", "--checkpoint_dir", str(ckpt),
            "--weights_dir", str(tmp_path / "weights")]
    cmd = [sys.executable, SCRIPT, *TINY, *args, "--print_freq", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if "step 2/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=240)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "Interrupted at epoch 1, step" in out
    saved = load(ckpt / "latest.pt")
    assert saved["epoch"] == 0 and 2 <= saved["step_in_epoch"] < 24

    assert run_inline(*args, "--resume", "auto") == 0
    assert f"step {saved['step_in_epoch']}/24" in capsys.readouterr().out
    epoch, = records(ckpt, "epoch")
    assert epoch["train_images"] == 96 and epoch["val_images"] == 7
    assert (ckpt / "twistnet18_imagenet.pt").is_file()
    assert not (tmp_path / "weights").exists()   # weights of random tensors are never auto-detected


def test_train_py_pretrained_finds_and_loads_the_weights(straight: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    shutil.copy(straight[0] / "twistnet18_imagenet.pt", tmp_path / "weights" / "twistnet18_imagenet.pt")
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "synthtex", "--model", "twistnet18",
           "--pretrained", "--epochs", "1", "--img_size", "32", "--workers", "0", "--no_progress",
           "--batch_size", "16", "--run_dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[Auto-detected] Found TwistNet weights" in proc.stdout
    assert str(tmp_path / "weights" / "twistnet18_imagenet.pt") in proc.stdout
    assert "[TwistNet Pretrained] Loaded" in proc.stdout


# --------------------------------------------------------------------------------------------
# Refusals and bad data (in-process: no launch cost)
# --------------------------------------------------------------------------------------------
def test_resume_refuses_a_changed_recipe(straight: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight[0], ckpt)
    with pytest.raises(utils.UserError, match="--base_lr: 0.1 -> 0.5"):
        run_inline("--resume", str(ckpt / "latest.pt"), "--base_lr", "0.5")
    # --lr was the per-256 rate before it was renamed --base_lr: an old command says so.
    with pytest.raises(utils.UserError, match="--lr was renamed --base_lr"):
        run_inline("--resume", str(ckpt / "latest.pt"), "--lr", "0.5")
    with pytest.raises(utils.UserError, match="exists: pass --resume"):
        run_inline("--data_dir", str(tmp_path), "--checkpoint_dir", str(ckpt))


def test_resume_refuses_what_is_not_a_pretraining_checkpoint(straight: tuple[Path, Path], tmp_path: Path) -> None:
    """Random bytes, exported weights, a best.pt: named, explained, and never torch's unsafe advice."""
    ckpt = copy_folder(straight[0], tmp_path / "ckpt")
    foreign = {"random.pt": None, "twistnet18_imagenet.pt": "model weights only", "best.pt": "pretrain_imagenet.py best.pt"}
    (ckpt / "random.pt").write_bytes(os.urandom(4000))
    for name, what in foreign.items():
        with pytest.raises(utils.UserError) as error:
            run_inline("--resume", str(ckpt / name))
        text = str(error.value)
        assert str(ckpt / name) in text and "--resume takes the latest.pt" in text, text
        assert (what or "not a torch.save file") in text and "will likely succeed" not in text


def test_resume_refuses_other_images_and_follows_a_moved_folder(imagenet: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Same counts, one validation image relabelled (moved to another class): refused, naming what
    differs; the moved folder resumes."""
    data = copy_folder(imagenet, tmp_path / "A")
    ckpt = tmp_path / "ckpt"
    command = ["--epochs", "2", "--checkpoint_dir", str(ckpt), "--weights_dir", str(tmp_path / "weights"),
               "--resume", "auto", "--stop_after_steps", "1"]
    assert run_inline(*command, "--data_dir", str(data)) == 130
    assert load(ckpt / "latest.pt")["images"]["fingerprint"]["sizes"] == {"train": 24, "val": 9, "test": 0}

    relabelled = copy_folder(data, tmp_path / "B")
    first, second = sorted(p for p in (relabelled / "val").iterdir())[:2]
    image = sorted(first.iterdir())[0]
    image.rename(second / image.name)
    capsys.readouterr()
    assert utils.run_main(pretrain.main, [*TINY, *command, "--data_dir", str(relabelled)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"was pretrained on other images than --data_dir {relabelled} holds" in line
    assert "other sample ids or labels" in line and "point --data_dir at the images the run started with" in line.lower()

    moved = tmp_path / "A_moved"
    data.rename(moved)
    assert run_inline(*command, "--data_dir", str(moved)) == 130
    assert "Resumed from" in capsys.readouterr().out


def test_a_checkpoint_dir_in_use_is_refused(tmp_path: Path) -> None:
    """Two pretraining jobs on one --checkpoint_dir would overwrite each other's latest.pt."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with rundirs.RunLock(ckpt):
        with pytest.raises(rundirs.RunLockedError, match=f"pid {os.getpid()} on host"):
            run_inline("--data", "synthetic", "--epochs", "1", "--synthetic_images", "16",
                       "--checkpoint_dir", str(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == []   # nothing written, and the lock went with its holder


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, expected", [
    ("no_val", r"val is missing: expected .*/val/<wnid>/\*\.JPEG"),
    ("flat_val", r"val has no class folders.*sorted into class folders"),
    ("no_train", r"train is missing"),
])
def test_bad_layout_is_a_clear_error(imagenet: Path, tmp_path: Path, damage: str, expected: str) -> None:
    root = copy_folder(imagenet, tmp_path / "data")
    if damage == "no_val":
        shutil.rmtree(root / "val")
    elif damage == "no_train":
        shutil.rmtree(root / "train")
    else:
        for jpeg in list((root / "val").rglob("*.JPEG")):
            jpeg.rename(root / "val" / jpeg.name)
        for folder in [p for p in (root / "val").iterdir() if p.is_dir()]:
            folder.rmdir()
    with pytest.raises(utils.UserError, match=expected):
        run_inline("--data_dir", str(root), "--checkpoint_dir", str(tmp_path / "ckpt"))


def test_empty_class_is_a_clear_error(imagenet: Path, tmp_path: Path) -> None:
    root = copy_folder(imagenet, tmp_path / "data")
    (root / "train" / "n99999999").mkdir()
    with pytest.raises(utils.UserError) as err:
        run_inline("--data_dir", str(root), "--checkpoint_dir", str(tmp_path / "ckpt"))
    assert "n99999999" in str(err.value)


def test_corrupt_jpegs_are_skipped_and_counted(imagenet: Path, tmp_path: Path) -> None:
    root = copy_folder(imagenet, tmp_path / "data")
    for split in ("train", "val"):
        corrupt(sorted((root / split).rglob("*.JPEG"))[0])
    ckpt = tmp_path / "ckpt"
    with pytest.warns(loading.UnreadableImageWarning) as caught:
        assert run_inline("--data_dir", str(root), "--epochs", "1", "--batch_size", "8", "--checkpoint_dir",
                          str(ckpt), "--weights_dir", str(tmp_path / "weights")) == 0
    named = " ".join(str(w.message) for w in caught)
    assert "n01440764_0.JPEG" in named and "ILSVRC2012_val_00000001.JPEG" in named
    epoch, = records(ckpt, "epoch")
    assert epoch["val_images"] == 8 and epoch["val_skipped"] == 1
    assert epoch["skipped_images"] == 1 and epoch["train_images"] == 23


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
def positions_per_step(world: int, accum: int, batch: int, size: int = 50) -> list[list[int]]:
    """The images of each optimizer step, over all ranks, for one epoch."""
    steps = size // (batch * world * accum)
    shards = []
    for rank in range(world):
        sampler = loading.ShardedEpochSampler(size, seed=3, rank=rank, world_size=world, batch_size=batch,
                                               micro_batches=steps * accum)
        sampler.set_epoch(5)
        shards.append([i for i, _ in sampler])
    per_step = batch * accum
    return [sorted(i for s in shards for i in s[k * per_step:(k + 1) * per_step]) for k in range(steps)]


def test_sampler_gives_each_step_the_same_images_whatever_the_world_size() -> None:
    two_procs = positions_per_step(world=2, accum=1, batch=4)
    one_proc = positions_per_step(world=1, accum=2, batch=4)
    assert two_procs == one_proc and len(two_procs) == 6
    flat = [i for step in two_procs for i in step]
    assert len(flat) == len(set(flat)) == 48    # no image twice; the tail of 2 is dropped
    sampler = loading.ShardedEpochSampler(50, 3, 1, 2, 4, 6)
    sampler.set_epoch(5, skip_micro=2)
    assert len(list(sampler)) == len(sampler) == 16


def test_batch_plan_for_a_new_world_size() -> None:
    assert distributed.plan_for_resume(1024, 128, 4, None).accum_steps == 2
    assert distributed.plan_for_resume(1024, 128, 8, None).accum_steps == 1
    with pytest.raises(utils.UserError, match="no whole number of accumulation steps"):
        distributed.plan_for_resume(1024, 96, 8, None)
    with pytest.raises(utils.UserError, match="differs from the checkpoint's global batch"):
        distributed.plan_for_resume(1024, 128, 8, 2)


def test_progressive_schedule_and_weight_decay_groups() -> None:
    phases = recipes.parse_progressive("128:0.4,192:0.8", 224)
    sizes = [recipes.train_size_for_epoch(e, 10, phases, 224) for e in range(10)]
    assert sizes == [128] * 4 + [192] * 4 + [224] * 2
    with pytest.raises(utils.UserError):
        recipes.parse_progressive("192:0.8,128:0.4", 224)
    model = models.build_model("twistnet18", 10, verbose=False)
    decay, no_decay = recipes.decay_param_groups(model, 1e-4)
    gates = {id(b.gate) for b in model.twist_blocks().values()}
    assert gates <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4
