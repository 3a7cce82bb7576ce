"""Run directories: one process at a time per directory, its checkpoints read safely, and
training processes that die with the sweep that started them.

Usage:
    with rundirs.RunLock(run_path):                    # RunLockedError (exit 75) if another holds it
        ...
    rundirs.lock_holder(run_path)                      # the live holder, or None
    ckpt = rundirs.read_checkpoint(path, rundirs.TRAIN_LAST, "what to do instead")
    subprocess.Popen(cmd, preexec_fn=rundirs.die_with_parent_preexec())   # run_all.py's children
    rundirs.stop_when_parent_dies(stop_flag)           # their portable half, in train.py

The lock is a file, <directory>/run.lock, made so that it can hold across machines that share the
directory: created atomically (a hard link, which network filesystems keep atomic), holding host,
pid and start time, with an mtime the holder refreshes as a heartbeat. Whether a lock is stale is
judged by the pid on the same host and by the heartbeat's age from another one.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

import models
from helpers import utils
from helpers.utils import UserError

EXIT_LOCKED = 75


class RunLockedError(UserError):
    """Another process holds the run's lock: not a mistake in the command, so its own exit status
    (75, EX_TEMPFAIL: try again later), which run_all.py reports as "running elsewhere"."""

    exit_code = EXIT_LOCKED


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------
LOCK_NAME = "run.lock"
JOB_RECORD = "job.json"   # launchers' record of a run's cluster job
# The files of a run folder written by processes that do not hold its lock (a contender for the
# lock; run_all on the login node): utils.remove_stale_temp_files must spare their temp files.
WRITTEN_UNLOCKED = (LOCK_NAME, JOB_RECORD)
LOCK_HEARTBEAT_S = 30.0
# A lock whose holder cannot be checked (another host) is stale once its heartbeat is this old;
# generous, because network filesystems may show a file's mtime a minute late.
LOCK_STALE_AFTER_S = 300.0


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the process holding it."""
    path: Path
    host: str
    pid: int
    started: str                  # local time the lock was taken
    token: str                    # unique per acquisition
    boot_id: str | None           # Linux boot id and pid namespace: where the pid means something
    proc_start: int | None        # the process's start time (clock ticks since boot), against pid reuse
    command: str
    heartbeat_age_s: float        # seconds since the holder last touched the file

    def describe(self) -> str:
        return (f"pid {self.pid} on host {self.host} since {self.started} "
                f"(heartbeat {self.heartbeat_age_s:.0f} s ago): {self.command}")


def _boot_id() -> str | None:
    """Which boot of which machine (and, on Linux, which pid namespace: containers that share a
    kernel and a host name still see each other's pids as foreign): where a pid means something."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    with contextlib.suppress(OSError):
        boot += " " + os.readlink("/proc/self/ns/pid")
    return boot


def process_here_alive(host: str, boot_id: str | None, pid: int, proc_start: int | None = None) -> bool | None:
    """Whether a process recorded with its host and boot id is alive: None when it ran on another
    host (or boot, or pid namespace), where its pid cannot be checked from here."""
    if host != socket.gethostname() or boot_id != _boot_id():
        return None
    return utils.process_alive(pid, proc_start)


def this_process() -> dict[str, Any]:
    """host, boot id, pid and start time of this process: what process_here_alive checks."""
    stat = utils.proc_stat(os.getpid())
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "proc_start": stat[1] if stat else None}


def read_lock(path: str | os.PathLike) -> LockHolder | None:
    """The holder recorded in a lock file (None if there is no such file).

    An unreadable lock file (a crash mid-write with the O_EXCL fallback, a stray file) is
    reported with host "unknown", so that only its age can make it stale.
    """
    path = Path(path)
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        fields = dict(host=str(info["host"]), pid=int(info["pid"]), started=str(info["started"]),
                      token=str(info["token"]), boot_id=info.get("boot_id"), proc_start=info.get("proc_start"),
                      command=str(info.get("command", "")))
    except (ValueError, KeyError, TypeError):
        fields = dict(host="unknown", pid=0, started="?", token="", boot_id=None, proc_start=None,
                      command=f"(unreadable lock file: {text[:60]!r})")
    return LockHolder(path, heartbeat_age_s=max(0.0, time.time() - mtime), **fields)


def stale_reason(holder: LockHolder, stale_after_s: float | None = None) -> str | None:
    """Why the lock's holder is gone (None: it may still run, so the lock stands).

    On this host (same name, boot and pid namespace) a lock is stale when its process is dead (or
    its pid now belongs to a younger process). A pid cannot be checked from another host, so
    there only the heartbeat's age counts.
    """
    stale_after_s = lock_stale_after_s() if stale_after_s is None else stale_after_s
    alive = process_here_alive(holder.host, holder.boot_id, holder.pid, holder.proc_start)
    if alive is not None:
        return None if alive else f"its process {holder.pid} on this host is gone"
    if holder.heartbeat_age_s > stale_after_s:
        return f"its heartbeat is {holder.heartbeat_age_s:.0f} s old (over {stale_after_s:.0f} s)"
    return None


def lock_stale_after_s() -> float:
    return float(os.environ.get("TWISTNET_LOCK_STALE_S", LOCK_STALE_AFTER_S))


def lock_holder(directory: str | os.PathLike, stale_after_s: float | None = None) -> LockHolder | None:
    """The live holder of `directory`'s lock, or None when it is free (no lock, or a stale one)."""
    holder = read_lock(Path(directory) / LOCK_NAME)
    if holder is None or stale_reason(holder, stale_after_s) is not None:
        return None
    return holder


class RunLock:
    """An exclusive lock on a directory: `with RunLock(run_path): ...` (RunLockedError if held).

    The lock is a file, `<directory>/run.lock`, created atomically (a hard link of a complete
    temp file, which also holds on network filesystems; O_CREAT|O_EXCL where links fail) and
    holding host, pid, start time and command. A thread refreshes its mtime every
    `heartbeat_s` as a heartbeat. A stale lock (see stale_reason) is taken over, with a message.
    The file goes when the lock is released; a killed holder leaves it, to be judged stale.
    """

    def __init__(self, directory: str | os.PathLike, log: Callable[[str], None] = print,
                 heartbeat_s: float = LOCK_HEARTBEAT_S, stale_after_s: float | None = None) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.log, self.heartbeat_s = log, heartbeat_s
        self.stale_after_s = lock_stale_after_s() if stale_after_s is None else stale_after_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        stat = utils.proc_stat(os.getpid())
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "boot_id": _boot_id(),
                           "proc_start": stat[1] if stat else None,
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]})

    def _try_create(self) -> bool:
        tmp = utils.temp_beside(self.path)
        try:
            tmp.write_text(self._record())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:   # a filesystem without hard links
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(tmp.read_text())
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, holder: LockHolder, reason: str) -> None:
        aside = self.path.with_name(f".{LOCK_NAME}.{self.token}.stale")
        try:
            os.rename(self.path, aside)   # atomic: of several processes taking over, one moves it
        except FileNotFoundError:
            return
        moved = read_lock(aside)
        if moved is not None and moved.token != holder.token:
            # Someone replaced the stale lock between our look and the rename: give it back.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            self.log(f"note: took over the lock {self.path} of {holder.describe()}: {reason}")
        aside.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        for _ in range(10):
            if self._try_create():
                self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = read_lock(self.path)
            if holder is None:
                continue   # released meanwhile
            reason = stale_reason(holder, self.stale_after_s)
            if reason is None:
                raise RunLockedError(
                    f"{self.path.parent} is in use by another process: {holder.describe()}. Two processes "
                    f"writing one run would overwrite each other's files. Wait for it to finish or stop it; "
                    f"a lock whose process is gone is taken over by the next start (on another host once "
                    f"its heartbeat is {self.stale_after_s:.0f} s old), or delete {self.path}.")
            self._take_over(holder, reason)
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_lock(self.path)
            if holder is None or holder.token != self.token:
                self.lost = True
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def check(self) -> None:
        """Raise if the lock was taken over (this process was judged dead: never write on)."""
        if self.lost:
            raise RunLockedError(f"lost the lock {self.path}: another process took it over, so this one "
                                 f"stops without writing. Check that only one process trains {self.path.parent}.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = read_lock(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
# What each kind of file the scripts write holds, most specific first: how a checkpoint that is
# not the expected kind is named in the error.
CHECKPOINT_KINDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("a train.py last.pt (the resume state of a fine-tuning run)",
     frozenset({"model", "optimizer", "scheduler", "partial", "rng", "config"})),
    ("a pretraining latest.pt (the resume state of pretrain_imagenet.py or pretrain_spark.py)",
     frozenset({"model", "optimizer", "scheduler", "global_batch", "rank_states", "config"})),
    ("a pretrain_imagenet.py best.pt (best-validation weights, not a resume state)",
     frozenset({"model", "val_acc", "val_top5", "config"})),
    ("a train.py best.pt (best-validation weights, not a resume state)",
     frozenset({"model", "val_acc", "config"})),
)
TRAIN_LAST, PRETRAIN_LATEST, PRETRAIN_BEST, TRAIN_BEST = (kind for kind, _ in CHECKPOINT_KINDS)


def checkpoint_kind(obj: Any) -> str:
    """What a loaded checkpoint is, in words (one of CHECKPOINT_KINDS, or a description)."""
    if isinstance(obj, Mapping):
        for kind, keys in CHECKPOINT_KINDS:
            if keys <= obj.keys():
                return kind
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"model weights only (a state_dict of {len(obj)} tensors, no training state)"
        return f"a dict with the keys {', '.join(sorted(map(str, obj))[:8])}"
    return f"a {type(obj).__name__}, not a dict"


def read_checkpoint(path: str | os.PathLike, expected: str | tuple[str, ...], way_out: str) -> dict:
    """A checkpoint of the `expected` kind (a CHECKPOINT_KINDS name, or a tuple of those), loaded safely.

    A missing, unreadable or foreign file is a UserError that names the file, says what it is
    (or is not) and ends with `way_out`, the safe thing to do.
    """
    path = Path(path)
    try:
        obj = models.load_checkpoint_file(path)
    except models.ModelError as error:
        raise UserError(f"{error} {way_out}") from None
    kind = checkpoint_kind(obj)
    kinds = (expected,) if isinstance(expected, str) else expected
    if kind not in kinds:
        raise UserError(f"{path} is {kind}; expected {' or '.join(kinds)}. {way_out}")
    return obj


# --------------------------------------------------------------------------------------------
# Children that die with their sweep
# --------------------------------------------------------------------------------------------
# Set by run_all.py in its children's environment: the pid of the sweep, so that a child whose
# sweep died (SIGKILL, OOM killer) stops too instead of training on as an orphan.
SWEEP_PID_ENV = "TWISTNET_SWEEP_PID"


def die_with_parent_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A subprocess.Popen preexec_fn after which the child gets `sig` when its parent dies (Linux
    prctl PR_SET_PDEATHSIG); None where that does not exist (see stop_when_parent_dies).

    The kernel sends the signal when the *thread* that started the child ends, so the caller
    must start children from threads that outlive them (run_all's slot threads wait on theirs);
    when the whole process dies it may send it once per thread (see StopFlag's grace_s).
    prctl is looked up here, in the parent: between fork and exec the child should do no more
    than one foreign call (other threads may hold locks that the fork copied).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, pr_set_pdeathsig = os.getpid(), 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
        if os.getppid() != parent:   # the parent died before prctl: nobody would tell us
            os.kill(os.getpid(), sig)
    return preexec


def stop_when_parent_dies(stop: utils.StopFlag, interval_s: float = 2.0) -> threading.Thread | None:
    """If run_all.py started this process (SWEEP_PID_ENV), request a stop once it is gone.

    The portable half of die_with_parent_preexec: a process whose parent dies is re-parented
    (to init or a subreaper), so a changed getppid() means the sweep is gone.
    """
    sweep = os.environ.get(SWEEP_PID_ENV)
    if not sweep or not sweep.isdigit():
        return None
    sweep_pid = int(sweep)

    def watch() -> None:
        while not stop.requested:
            if os.getppid() != sweep_pid:
                stop.request(f"its sweep (run_all.py, pid {sweep_pid}) is gone")
                return
            time.sleep(interval_s)
    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
