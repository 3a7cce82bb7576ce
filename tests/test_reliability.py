"""One trainer per run, children that die with their sweep, and files that survive a full disk.

Real processes and signals: two run_all.py sweeps on one --run_dir at the same time; a sweep
killed with SIGKILL, then one closed with SIGHUP, whose train.py children must stop (checked by
their pids) and resume when the sweep is started again; train.py on a tmpfs that fills up (in a
user namespace where the system allows one, else under a file-size limit). Everything runs on
synthtex at 32 px, one epoch per run.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import datasets
import fixtures
from helpers import rundirs, utils

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SWEEP = ["--dataset", "synthtex", "--models", "twistnet18,resnet18", "--folds", "1", "--seeds", "42",
         "--epochs", "1", "--img_size", "32", "--batch_size", "16", "--workers", "0",
         "--randaug_n", "0", "--mixup", "0", "--cutmix", "0"]
RUNS = ("synthtex_fold1_twistnet18_seed42", "synthtex_fold1_resnet18_seed42")


def sweep_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_all.py"), *SWEEP, "--run_dir", str(run_dir), *extra]


def alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def summary_counts(out: str) -> dict[str, int]:
    """The status table at the end of run_all's output."""
    table = out[out.index("Sweep summary"):].splitlines()[2:8]
    return {name: int(n) for name, n in (line.strip().rsplit(None, 1) for line in table)}


def starts_logged(run: Path) -> int:
    """How many times train.py began training this run (its header line in train.log)."""
    return sum(f" run {run} |" in line for line in (run / "train.log").read_text().splitlines())


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------
def write_lock(directory: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = directory / rundirs.LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "x" * 32, "started": "earlier",
                                "boot_id": rundirs._boot_id(), "proc_start": None, "command": "train.py ..."}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    with rundirs.RunLock(tmp_path) as lock:
        holder = rundirs.lock_holder(tmp_path)
        assert holder is not None and (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
        with pytest.raises(rundirs.RunLockedError) as error:
            rundirs.RunLock(tmp_path).acquire()
        assert error.value.exit_code == rundirs.EXIT_LOCKED == 75
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(error.value)
        lock.check()
    assert not (tmp_path / rundirs.LOCK_NAME).exists() and rundirs.lock_holder(tmp_path) is None


def test_stale_locks_are_taken_over_with_a_message(tmp_path: Path) -> None:
    said: list[str] = []
    write_lock(tmp_path, socket.gethostname(), dead_pid())                 # this host, process gone
    assert rundirs.lock_holder(tmp_path) is None
    with rundirs.RunLock(tmp_path, log=said.append):
        assert "took over the lock" in said[0] and "is gone" in said[0]
    # Another host: the pid means nothing here, only the heartbeat's age does.
    write_lock(tmp_path, "node-b", os.getpid(), age_s=10)
    with pytest.raises(rundirs.RunLockedError, match="pid .* on host node-b"):
        rundirs.RunLock(tmp_path, stale_after_s=60).acquire()
    write_lock(tmp_path, "node-b", os.getpid(), age_s=120)
    with rundirs.RunLock(tmp_path, log=said.append, stale_after_s=60):
        assert "heartbeat is 120 s old" in said[1]


def test_heartbeat_refreshes_the_lock_and_notices_a_takeover(tmp_path: Path) -> None:
    lock = rundirs.RunLock(tmp_path, heartbeat_s=0.05).acquire()
    path = tmp_path / rundirs.LOCK_NAME
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.5)
    assert rundirs.read_lock(path).heartbeat_age_s < 50
    write_lock(tmp_path, "node-b", 1)                                       # someone took it over
    time.sleep(0.5)
    with pytest.raises(rundirs.RunLockedError, match="lost the lock"):
        lock.check()
    lock.release()
    assert rundirs.read_lock(path).host == "node-b"                          # never deletes another's lock


@pytest.mark.slow
def test_two_writers_of_one_file_never_share_a_temp_file(tmp_path: Path) -> None:
    """The old fixed temp name (.best.pt.tmp) let one writer rename the other's half-written file."""
    script = textwrap.dedent("""
        import sys, torch
        from helpers import utils
        for i in range(40):
            utils.atomic_save({"w": torch.full((50_000,), float(sys.argv[2]))}, sys.argv[1])
    """)
    target = tmp_path / "best.pt"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(target), str(value)], cwd=ROOT, env=ENV,
                              stderr=subprocess.PIPE, text=True) for value in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    weights = torch.load(target, weights_only=True)["w"]
    assert weights.min() == weights.max() and float(weights[0]) in (1.0, 2.0)   # one writer's bytes
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


# --------------------------------------------------------------------------------------------
# Two sweeps on one run directory
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_sweeps_on_one_run_dir_train_every_run_once(tmp_path: Path) -> None:
    sweeps = [subprocess.Popen(sweep_command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=ENV) for _ in range(2)]
    outputs = [sweep.communicate(timeout=900)[0] for sweep in sweeps]
    for sweep, out in zip(sweeps, outputs):
        assert sweep.returncode == 0, out
    counts = [summary_counts(out) for out in outputs]
    assert sum(c["done"] for c in counts) == len(RUNS), outputs             # each run done by one sweep
    for c in counts:                                                        # and left by the other
        assert c["done"] + c["running elsewhere"] + c["skipped"] == len(RUNS) and c["failed"] == 0, outputs
    for name in RUNS:
        run = tmp_path / name
        assert (run / "results.json").is_file()
        assert epochs_logged(run) == [1] and starts_logged(run) == 1, (run / "train.log").read_text()
        assert not (run / rundirs.LOCK_NAME).exists()
    assert not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------------------------
# Orphans: children die with their sweep
# --------------------------------------------------------------------------------------------
def start_sweep_and_wait_for_training(run_dir: Path, starts: int) -> tuple[subprocess.Popen, list[int]]:
    """A --jobs 2 sweep, once both of its train.py children are training: (sweep, their pids)."""
    sweep = subprocess.Popen(sweep_command(run_dir, "--jobs", "2"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline:
        assert sweep.poll() is None, sweep.stdout.read()
        holders = [rundirs.lock_holder(run_dir / name) for name in RUNS]
        if all(holders) and all((run_dir / name / "train.log").exists()
                                and starts_logged(run_dir / name) == starts for name in RUNS):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the sweep's runs never started training")
    time.sleep(1.0)   # into the training steps
    pids = [holder.pid for holder in holders]
    for pid in pids:
        assert "train.py" in Path(f"/proc/{pid}/cmdline").read_text()
    return sweep, pids


def wait_until_gone(pids: list[int], seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "train.py outlived its sweep"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pids are checked through /proc")
def test_killed_or_hung_up_sweeps_leave_no_train_py_and_resume(tmp_path: Path) -> None:
    # SIGKILL (also what the OOM killer sends): run_all cannot react, its children must still stop.
    sweep, pids = start_sweep_and_wait_for_training(tmp_path, starts=1)
    sweep.kill()
    sweep.wait()
    wait_until_gone(pids)
    for name in RUNS:
        log = (tmp_path / name / "train.log").read_text()
        # Saved last.pt on the way out: told by the kernel (SIGTERM), or by its own watch of the parent.
        assert "Interrupted at epoch 1" in log and ("(SIGTERM)" in log or "is gone)" in log), log
        assert (tmp_path / name / "last.pt").is_file() and not (tmp_path / name / rundirs.LOCK_NAME).exists()

    # SIGHUP (closed terminal, dropped ssh): like Ctrl-C, the runs save and the sweep exits 130.
    sweep, pids = start_sweep_and_wait_for_training(tmp_path, starts=2)
    sweep.send_signal(signal.SIGHUP)
    out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out
    wait_until_gone(pids)

    final = subprocess.run(sweep_command(tmp_path, "--jobs", "2"), capture_output=True, text=True, env=ENV,
                           timeout=900)
    assert final.returncode == 0, final.stdout + final.stderr
    for name in RUNS:
        run = tmp_path / name
        assert epochs_logged(run) == [1] and starts_logged(run) == 3
        assert (run / "run_all.log").read_text().count("Resuming from") == 2
        assert (run / "results.json").is_file()


@pytest.mark.slow
def test_sighup_stops_train_py_like_sigterm() -> None:
    script = textwrap.dedent("""
        import os, signal
        from helpers import utils
        with utils.StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
        print(stop.requested, stop.reason)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "SIGHUP"], proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------
def user_namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


FULL_DISK = textwrap.dedent("""
    import os, sys, torch
    from helpers import utils
    folder = sys.argv[1]
    utils.atomic_save({"w": torch.ones(1_000_000)}, os.path.join(folder, "last.pt"))      # 4 MB: fits
    try:
        utils.atomic_save({"w": torch.zeros(2_500_000)}, os.path.join(folder, "last.pt"))  # 10 MB: does not
    except utils.UserError as error:
        print("error:", error)
    print("files:", sorted(os.listdir(folder)))
    print("kept:", int(torch.load(os.path.join(folder, "last.pt"), weights_only=True)["w"].sum()))
""")


@pytest.mark.slow
def test_a_failed_checkpoint_write_names_the_folder_and_leaves_no_temp_file(tmp_path: Path) -> None:
    if user_namespaces_work():   # a real full disk: an 8 MB tmpfs
        command = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs "$1" && exec "$2" -c "$3" "$1"',
                   "sh", str(tmp_path), sys.executable, FULL_DISK]
        preexec = None
    else:                        # the same failed write(2), from a file-size limit
        command = [sys.executable, "-c", FULL_DISK, str(tmp_path)]

        def preexec() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, resource.RLIM_INFINITY))
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300,
                          preexec_fn=preexec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert lines["files"] == "['last.pt']"            # no hidden temp file left to fill the disk
    assert lines["kept"] == "1000000"                 # the earlier checkpoint is intact
    assert "last.pt" in lines["error"] and "keeps its previous content" in lines["error"]
    if preexec is None:
        assert lines["error"].startswith(f"no space left on {tmp_path} (needs ~10 MB for last.pt")


@pytest.mark.slow
@pytest.mark.skipif(not user_namespaces_work(), reason="needs unprivileged user namespaces for a small tmpfs")
def test_train_py_on_a_full_disk_says_so_and_a_retry_after_freeing_space_trains(tmp_path: Path) -> None:
    """best.pt (46 MB) fits on a 110 MB disk, last.pt (93 MB) does not; then the disk grows."""
    train = [sys.executable, str(ROOT / "train.py"), "--dataset", "synthtex", "--epochs", "1", "--img_size", "32",
             "--batch_size", "16", "--workers", "0", "--no_progress", "--run_dir"]
    script = textwrap.dedent("""
        disk=$1; out=$2; shift 2
        mount -t tmpfs -o size=110m tmpfs "$disk" || exit 99
        "$@" "$disk/runs" 2> "$out/first.err"; echo $? > "$out/first.rc"
        ls -a "$disk/runs/synthtex_fold1_twistnet18_seed42" > "$out/first.ls"
        mount -o remount,size=300m "$disk" || exit 98
        "$@" "$disk/runs" > "$out/second.out" 2>&1; echo $? > "$out/second.rc"
        cp "$disk/runs/synthtex_fold1_twistnet18_seed42/log.jsonl" "$out/log.jsonl"
    """)
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), str(out), *train],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first_err = (out / "first.err").read_text().strip().splitlines()
    assert (out / "first.rc").read_text().strip() == "2"
    assert len(first_err) == 1 and first_err[0].startswith(f"error: no space left on {disk}/runs/"), first_err
    assert "MB for last.pt" in first_err[0] and "last.pt was not written" in first_err[0]
    assert not [n for n in (out / "first.ls").read_text().split() if n.endswith(".tmp")]
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.out").read_text()
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


# --------------------------------------------------------------------------------------------
# The data fingerprint: which images, down to their file sizes
# --------------------------------------------------------------------------------------------
def fold_fingerprint(root: Path) -> tuple[list[str], dict]:
    splits = datasets.load_splits("imagefolder", root, 1)
    return splits.classes, datasets.split_fingerprint(splits.classes, {s: splits.split(s) for s in datasets.SPLIT_NAMES})


def test_images_re_exported_in_place_are_other_data_and_old_records_stay_comparable(
        tmp_path: Path, one_torch_thread: None, capsys: pytest.CaptureFixture) -> None:
    """Same names and labels, other bytes (a dataset re-exported in place): train.py refuses to count
    the finished run as this command's; a moved copy is the same data; a fingerprint recorded
    before file sizes were (no file_sizes_sha256) still matches, so old runs are not all 'other data'."""
    import train

    data = fixtures.make_imagefolder(tmp_path / "data", classes=3, train_per_class=4)
    classes, before = fold_fingerprint(data)
    args = ["--dataset", "imagefolder", "--data_dir", str(data), "--epochs", "1", "--batch_size", "4", "--img_size", "32",
            "--workers", "0", "--no_progress", "--run_dir", str(tmp_path / "runs")]
    assert utils.run_main(train.main, args) == 0
    capsys.readouterr()

    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert datasets.data_difference(classes, before, *fold_fingerprint(moved)) == ""
    image = data / "val" / "class_1" / "val_0.png"
    fixtures.write_image(image, label=1, index=7, size=44)           # re-exported: same name, other size
    change = datasets.data_difference(classes, before, *fold_fingerprint(data))
    assert change.startswith("the image files changed (same names and labels, other file sizes")
    assert utils.run_main(train.main, args) == 2
    line = fixtures.one_error_line(capsys.readouterr().err)
    assert "already finished on other data: the image files changed" in line and "--force" in line

    old_style = {k: v for k, v in before.items() if k != "file_sizes_sha256"}
    assert datasets.data_difference(classes, old_style, *fold_fingerprint(data)) == ""
    fixtures.write_image(data / "val" / "class_1" / "val_9.png", label=1, index=9)   # a new image still counts
    assert "the split sizes differ (val 6 -> 7)" in datasets.data_difference(classes, old_style, *fold_fingerprint(data))


# --------------------------------------------------------------------------------------------
# Temp files of writers killed mid-write
# --------------------------------------------------------------------------------------------
STUCK_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from helpers import utils
    def write(tmp):                                    # half a checkpoint on disk, then stuck
        tmp.write_bytes(bytes(3 * 2**20))
        print(tmp.name, flush=True)
        time.sleep(600)
    utils._replace_atomically(Path(sys.argv[1]), write, 6 * 2**20)
""")


def start_stuck_writer(target: Path) -> subprocess.Popen:
    """A real writer of `target` that stops in the middle of its temp file (and prints the file's name)."""
    return subprocess.Popen([sys.executable, "-c", STUCK_WRITER, str(target)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_temp_files_of_killed_writers_are_removed_at_start_and_live_ones_kept(tmp_path: Path,
                                                                             one_torch_thread: None) -> None:
    """kill -9 during a checkpoint write left .last.pt.<pid>.<hex>.tmp for good; train.py and the
    pretraining scripts remove those of dead writers when they start, never a live writer's."""
    import pretrain_imagenet
    import train

    run = tmp_path / "runs" / "synthtex_fold1_twistnet18_seed42_n2"
    ckpt = tmp_path / "ckpt"
    for folder in (run, ckpt):
        folder.mkdir(parents=True)
    writers = {(folder, name): start_stuck_writer(folder / name) for folder in (run, ckpt) for name in ("last.pt", "best.pt")}
    leftovers = {key: writer.stdout.readline().strip() for key, writer in writers.items()}   # all mid-write now
    live = [writer for (_, name), writer in writers.items() if name == "best.pt"]
    for (_, name), writer in writers.items():
        if name == "last.pt":
            writer.kill()                                              # SIGKILL mid-write
            writer.wait(timeout=60)
    for (folder, name), temp in leftovers.items():
        assert temp.startswith(f".{name}.") and (folder / temp).is_file()
    try:
        assert utils.run_main(train.main, [
            "--dataset", "synthtex", "--train_per_class", "2", "--epochs", "1", "--img_size", "32", "--batch_size", "16",
            "--workers", "0", "--no_progress", "--randaug_n", "0", "--mixup", "0", "--cutmix", "0",
            "--run_dir", str(tmp_path / "runs")]) == 0
        assert utils.run_main(pretrain_imagenet.main, [
            "--data", "synthetic", "--synthetic_images", "16", "--synthetic_val_images", "4", "--num_classes", "3",
            "--epochs", "1", "--img_size", "32", "--batch_size", "8", "--workers", "0", "--device", "cpu",
            "--print_freq", "0", "--checkpoint_dir", str(ckpt), "--weights_dir", str(tmp_path / "weights")]) == 0
        for (folder, name), temp in leftovers.items():
            assert (folder / temp).exists() == (name == "best.pt"), (folder, temp)   # only the live writer's
        assert f"removed 1 temp file(s) (3 MB) left in {run} by a writer that was killed" in (run / "train.log").read_text()
    finally:
        for writer in live:
            writer.kill()
            writer.wait(timeout=60)


# --------------------------------------------------------------------------------------------
# Settings that run, but far slower than expected
# --------------------------------------------------------------------------------------------
def test_bf16_on_a_cpu_without_native_bf16_and_compile_on_cpu_are_flagged() -> None:
    cpu = torch.device("cpu")
    assert utils.cpu_has_native_bf16({"avx2", "fma"}) is False
    assert utils.cpu_has_native_bf16({"avx512f", "avx512_bf16"}) and utils.cpu_has_native_bf16({"amx_bf16"})
    slow = utils.speed_notes(cpu, torch.bfloat16, False, flags={"avx2"})
    assert len(slow) == 1 and "--amp bf16 on a CPU without native bf16" in slow[0] and "--amp off" in slow[0]
    assert utils.speed_notes(cpu, torch.bfloat16, False, flags={"amx_bf16"}) == []
    assert utils.speed_notes(torch.device("cuda"), torch.bfloat16, True, flags={"avx2"}) == []
    compiled = utils.speed_notes(cpu, None, True, flags={"avx2"})
    assert len(compiled) == 1 and "--compile on the CPU" in compiled[0] and "short runs" in compiled[0]


# --------------------------------------------------------------------------------------------
# --tensorboard into a folder that cannot be one; --tag values that cannot name a run
# --------------------------------------------------------------------------------------------
def test_an_unusable_tensorboard_folder_is_a_user_error(tmp_path: Path) -> None:
    """train.py, pretrain_imagenet.py and pretrain_spark.py all write through utils.TensorBoard."""
    taken = tmp_path / "taken"
    taken.write_text("mine")
    with pytest.raises(utils.UserError, match=rf"--tensorboard cannot write its event files to {taken}: File exists\. "
                                              r"Remove or rename what is at that path"):
        utils.TensorBoard(taken)
    with pytest.raises(utils.UserError, match=r"Not a directory"):
        utils.TensorBoard(taken / "tensorboard")
    assert taken.read_text() == "mine"


@pytest.mark.slow
def test_train_py_with_a_file_where_tensorboard_goes_says_so_in_one_line(tmp_path: Path) -> None:
    from fixtures import one_error_line
    run = tmp_path / "synthtex_fold1_resnet18_seed42"
    run.mkdir()
    (run / "tensorboard").write_text("mine")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dataset", "synthtex", "--model", "resnet18",
                           "--epochs", "1", "--img_size", "32", "--batch_size", "16", "--workers", "0",
                           "--run_dir", str(tmp_path), "--tensorboard", "--no_progress"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr).startswith(f"error: --tensorboard cannot write its event files to "
                                                  f"{run / 'tensorboard'}: File exists")
    assert (run / "tensorboard").read_text() == "mine"


@pytest.mark.parametrize("tag, ok", [("pruned40", True), ("gate-0.5", True), ("a_b+c", True), ("", True),
                                     ("x\ntouch owned", False), ("a b", False), ("a/b", False), ("$(id)", False)])
def test_tags_are_plain_names(tag: str, ok: bool) -> None:
    from helpers import train_cli
    args = train_cli.parse_args(["--dataset", "synthtex", "--tag", tag])
    if ok:
        train_cli.validate_args(args)
    else:
        with pytest.raises(utils.UserError, match=r"letters, digits and \. _ \+ - only"):
            train_cli.validate_args(args)
