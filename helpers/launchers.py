"""Sweeps on a SLURM cluster through submitit: one job per run, requeued when pre-empted.

Usage (through run_all.py; see docs/SWEEPS.md "On a SLURM cluster"):
    python run_all.py ... --launcher slurm --slurm_partition gpu --slurm_time 240 --slurm_gpus 1
    python run_all.py ... --launcher slurm --slurm_array_parallelism 8   # one job array, 8 at a time
    python run_all.py ... --launcher slurm --dry_run     # print the sbatch script(s), submit nothing
    python run_all.py ... --launcher submitit_local --wait   # the same jobs as local processes
    python run_all.py ... --status                       # queued / running / done / failed runs

Each job runs exactly the train.py command line that run_all.py's local launcher would run, in the
same run directory, so finished runs are skipped, interrupted ones resume and failures are kept
the same way. A job that SLURM signals before its time limit or a pre-emption (SIGUSR2, which
submitit asks sbatch for; train.py itself ignores it) asks its train.py to save last.pt at a step
boundary, waits for it, and is requeued; the requeued job resumes exactly where it stopped.

Every submitted job is recorded in <run>/job.json (written atomically, claimed with a hard link
before the submission), so a second run_all.py on the same sweep never submits a run whose job is
queued or running: a queued job holds no run.lock yet. A job whose state cannot be read (no sacct
here, or sacct does not know it) is reported as "unknown" and holds its run only while the run
shows signs of life (job.json, run_all.log, train.log, log.jsonl or last.pt written within
--slurm_unknown_expiry minutes); after that the next sweep submits the run again.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import submitit
from submitit.core.utils import FailedJobError
from submitit.slurm import slurm as submitit_slurm

from helpers import rundirs, utils

LAUNCHERS = ("local", "slurm", "submitit_local")
JOB_RECORD = rundirs.JOB_RECORD
REPO = Path(__file__).resolve().parents[1]
# How often a run may hit its time limit and be requeued before submitit gives up on it.
MAX_REQUEUES = 50
SIGNAL_DELAY_S = 120          # SIGUSR2 this long before the time limit: enough to finish a step and save
CLAIM_STALE_S = 600.0         # a claim without a job id from another host is abandoned after this long
# A job whose state cannot be read holds its run this long after the run's last sign of life: long
# enough for a queue wait on a busy cluster, short enough that a lost job does not block for days.
UNKNOWN_EXPIRY_MIN = 360
UNKNOWN = "state unknown"
# The run's files that a job writes while it starts and trains: their mtimes are its signs of life.
SIGNS_OF_LIFE = (JOB_RECORD, "run_all.log", "train.log", "log.jsonl", "last.pt")
# SLURM job states (sacct) in which a job may still start or run.
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD",
                "PREEMPTED"}
# Control characters would end a line of the sbatch script and start a new, runnable one.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
EXIT_MARKER = re.compile(r"^===== exit code (-?\d+)", re.M)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got '{text}'")
    return key.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster (--launcher slurm or submitit_local)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: train.py processes here (--jobs/--gpus); slurm: one SLURM job per run "
                        "(submitit); submitit_local: the same jobs as local processes (tests, laptops)")
    g.add_argument("--status", action="store_true",
                   help="list the sweep's runs as queued / running / done / failed / interrupted; start nothing")
    g.add_argument("--wait", action="store_true", help="after submitting, wait for the jobs and print the summary")
    g.add_argument("--slurm_partition", default=None, help="sbatch --partition")
    g.add_argument("--slurm_time", type=int, default=24 * 60,
                   help="time limit per job in minutes; a run that needs longer is requeued and resumes")
    g.add_argument("--slurm_gpus", type=int, default=1, help="GPUs per job (use 0 for CPU jobs)")
    g.add_argument("--slurm_cpus", type=int, default=None, help="CPUs per job (sbatch --cpus-per-task)")
    g.add_argument("--slurm_mem", default=None, help="memory per job, e.g. 32G (sbatch --mem)")
    g.add_argument("--slurm_account", default=None, help="sbatch --account")
    g.add_argument("--slurm_qos", default=None, help="sbatch --qos")
    g.add_argument("--slurm_constraint", default=None, help="sbatch --constraint, e.g. a100")
    g.add_argument("--slurm_extra", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, repeatable, e.g. --slurm_extra mail-type=END")
    g.add_argument("--slurm_array_parallelism", type=int, default=None,
                   help="submit the runs as one job array with at most this many running at once")
    g.add_argument("--slurm_folder", default=None,
                   help="folder for submitit's job files and logs (default: <run_dir>/submitit)")
    g.add_argument("--slurm_unknown_expiry", type=float, default=UNKNOWN_EXPIRY_MIN, metavar="MINUTES",
                   help="a recorded job whose state sacct cannot tell holds its run (reported as unknown) until "
                        "the run has shown no progress for this long; then the run is submitted again")


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    cluster = args.launcher != "local"
    if not cluster and (args.wait or args.slurm_array_parallelism is not None):
        parser.error("--wait and --slurm_array_parallelism need --launcher slurm or submitit_local")
    if cluster and (args.gpus or args.jobs is not None):
        parser.error(f"--gpus and --jobs are for --launcher local; with --launcher {args.launcher} each run is "
                     f"one job (--slurm_gpus, --slurm_cpus)")
    parallelism = args.slurm_array_parallelism
    if args.slurm_time < 1 or args.slurm_gpus < 0 or (parallelism is not None and parallelism < 1):
        parser.error("--slurm_time and --slurm_array_parallelism must be at least 1, --slurm_gpus at least 0")
    if args.slurm_unknown_expiry < 0:
        parser.error(f"--slurm_unknown_expiry {args.slurm_unknown_expiry:g}: minutes, 0 or more")
    if cluster:
        check_script_text(args, parser)


def check_script_text(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse control characters in what goes into the sbatch script: a newline in a value would
    end its #SBATCH line (or comment) and make the rest a command of the job."""
    texts = {f"--{name}": getattr(args, name) for name in (
        "slurm_partition", "slurm_mem", "slurm_account", "slurm_qos", "slurm_constraint", "slurm_folder", "run_dir")}
    texts.update({f"--slurm_extra {key}": f"{key}={value}" for key, value in args.slurm_extra})
    bad = [flag for flag, text in texts.items() if text is not None and CONTROL_CHARACTERS.search(str(text))]
    if bad:
        parser.error(f"{', '.join(bad)} holds a control character (a newline?), which would break the sbatch "
                     "script: give a plain value")


def job_folder(args: argparse.Namespace) -> Path:
    """submitit's folder for job files: one folder per SLURM job (%j); the local executor's
    controller would create a literal '%j' folder, and names its files by job id anyway."""
    folder = Path(args.slurm_folder or Path(args.run_dir) / "submitit").resolve()
    return folder / "%j" if args.launcher == "slurm" else folder


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The sbatch options of one job, in submitit's SlurmExecutor names."""
    params = dict(time=args.slurm_time, gpus_per_node=args.slurm_gpus or None, cpus_per_task=args.slurm_cpus,
                  mem=args.slurm_mem, partition=args.slurm_partition, account=args.slurm_account,
                  qos=args.slurm_qos, constraint=args.slurm_constraint, signal_delay_s=SIGNAL_DELAY_S,
                  stderr_to_stdout=True, additional_parameters=dict(args.slurm_extra) or None)
    if args.slurm_array_parallelism:
        params["array_parallelism"] = args.slurm_array_parallelism
    return {k: v for k, v in params.items() if v is not None}


def setup_lines(runs: Sequence[Any], launcher: str = "slurm") -> list[str]:
    """Shell lines before the job starts: which train.py command(s) it runs (comments in the
    sbatch script, for whoever reads it) and the repository on PYTHONPATH, where the job unpickles
    TrainJob from. The local executor joins the lines with &&, where a comment would end the line."""
    lines = [f"# run {comment_text(run.name)}: {comment_text(shlex.join(run.command))}" for run in runs] \
        if launcher == "slurm" else []
    return lines + [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]


def comment_text(text: str) -> str:
    """text for a comment line of the script: control characters (a newline would start a new
    line, outside the comment) written as escapes."""
    return CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], text)


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def last_output_line(text: str) -> str:
    """The last non-empty line a child wrote (usually the error), leaving out the sweep's own
    '===== ' markers; carriage returns (progress bars) count as line ends."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("===== ")]
    return lines[-1] if lines else ""


class TrainFailed(RuntimeError):
    """train.py ended with an error: the job fails (sacct FAILED), with train.py's last line."""


class TrainJob(submitit.helpers.Checkpointable):
    """One train.py run as a submitit job: the same command line as run_all's local launcher,
    output appended to <run>/run_all.log.

    checkpoint() is what submitit calls on SIGUSR2 (time limit or pre-emption): it asks train.py
    to save last.pt and stop (SIGINT, honoured at a step boundary), waits for it, and returns a
    fresh copy of itself for submitit to requeue; train.py resumes from last.pt in the new job.
    """

    def __init__(self, command: Sequence[str], run_path: str, cwd: str) -> None:
        self.command, self.run_path, self.cwd = list(command), str(run_path), str(cwd)
        self._child: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.run_path) / "run_all.log"

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        Path(self.run_path).mkdir(parents=True, exist_ok=True)
        die_with_job = rundirs.die_with_parent_preexec(signal.SIGTERM)

        def preexec() -> None:
            # sbatch --signal reaches every process of the job: only this wrapper acts on it.
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)
            if die_with_job is not None:
                die_with_job()

        start = time.perf_counter()
        with open(self.log_path, "a", buffering=1) as log:
            log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.job_id} on {job.hostname}: start\n"
                      f"{shlex.join(self.command)}\n")
            offset = log.tell()
            self._child = subprocess.Popen(self.command, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, preexec_fn=preexec,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            # Polled, not waited on: submitit's signal handler (checkpoint) waits for the child itself.
            while self._child.poll() is None:
                time.sleep(0.5)
            returncode = self._child.returncode
            log.write(f"===== exit code {returncode} after {time.perf_counter() - start:.0f}s\n")
        if returncode in (0, rundirs.EXIT_LOCKED):
            return returncode
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            last = last_output_line(f.read().decode(errors="replace"))
        raise TrainFailed(f"train.py exited with {returncode}: {last} (log: {self.log_path})")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=SIGNAL_DELAY_S - 30)   # leaves time for the requeue
            except subprocess.TimeoutExpired:
                pass   # SLURM kills the job soon; train.py's SIGTERM handler still saves at the next step
            with open(self.log_path, "a") as log:
                log.write(f"===== exit code {child.returncode} (pre-empted or at the time limit: requeued)\n")
        return submitit.helpers.DelayedSubmission(TrainJob(self.command, self.run_path, self.cwd))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_child"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _child=None)


# --------------------------------------------------------------------------------------------
# Job records: <run>/job.json
# --------------------------------------------------------------------------------------------
def read_record(run_path: Path) -> dict | None:
    return read_record_file(run_path / JOB_RECORD)


def read_record_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"job_id": None, "token": "", "claimed_at": 0.0, "host": "unknown", "pid": 0}


def slurm_state(record: dict) -> str:
    """The SLURM state of a recorded job (sacct through submitit), UNKNOWN if it cannot be asked."""
    if shutil.which("sacct") is None:   # not on the cluster: the job may well be queued there
        return "UNKNOWN"
    try:
        return str(submitit.SlurmJob(folder=record["folder"], job_id=str(record["job_id"])).state).upper()
    except Exception:   # noqa: BLE001  no sacct here, or a cluster that does not answer: assume it may run
        return "UNKNOWN"


def last_sign_of_life(run_path: Path) -> float:
    """The newest mtime of the run's files that its job writes (0 when there is none)."""
    times = []
    for name in SIGNS_OF_LIFE:
        with contextlib.suppress(OSError):
            times.append((run_path / name).stat().st_mtime)
    return max(times, default=0.0)


def job_state(record: dict, run_path: Path, unknown_expiry_min: float = UNKNOWN_EXPIRY_MIN) -> str | None:
    """What a recorded job is doing: None when it has ended (or never got submitted), else a
    short description ("queued", "running", "being submitted", "state unknown (why)").

    A job whose state cannot be read counts as alive only until the run has shown no sign of
    life for unknown_expiry_min: a lost job must not hold its run for ever."""
    if record.get("job_id") is None:   # claimed by a sweep that is submitting it
        alive = rundirs.process_here_alive(record.get("host", ""), record.get("boot_id"), int(record.get("pid", 0)),
                                           record.get("proc_start"))
        if alive or (alive is None and time.time() - float(record.get("claimed_at", 0)) < CLAIM_STALE_S):
            return "being submitted"
        return None
    if record.get("launcher") == "submitit_local":   # the job id is the pid of its controller
        alive = rundirs.process_here_alive(record["host"], record.get("boot_id"), int(record["job_id"]))
        if alive is not None:
            return "running" if alive else None
        why = "a local job on another host"
    else:
        state = slurm_state(record)
        if state.split()[0] != "UNKNOWN":
            if state.split()[0] not in SLURM_ACTIVE:
                return None
            return {"PENDING": "queued", "RUNNING": "running"}.get(state, state.lower())
        why = sacct_silence()
    quiet_min = (time.time() - last_sign_of_life(run_path)) / 60
    if quiet_min >= unknown_expiry_min:
        return None
    return f"{UNKNOWN} ({why}; it holds the run until {unknown_expiry_min:g} min pass without progress, "\
           f"{quiet_min:.0f} min so far)"


def is_unknown(state: str) -> bool:
    return state.startswith(UNKNOWN)


def sacct_silence() -> str:
    """Why a SLURM job's state is unknown."""
    return "sacct is not on PATH" if shutil.which("sacct") is None else "sacct does not report it"


def expired_job_note(run_path: Path, unknown_expiry_min: float = UNKNOWN_EXPIRY_MIN) -> str | None:
    """What to tell before a run is submitted again because its recorded SLURM job's state
    cannot be read and the run has shown no progress for unknown_expiry_min (None otherwise)."""
    record = read_record(run_path)
    if not record or record.get("job_id") is None or record.get("launcher") != "slurm":
        return None
    if slurm_state(record).split()[0] != "UNKNOWN":
        return None
    quiet_min = (time.time() - last_sign_of_life(run_path)) / 60
    return (f"{run_path.name}: job {record['job_id']}'s state is unknown ({sacct_silence()}) and the run has shown "
            f"no progress for {quiet_min:.0f} min (--slurm_unknown_expiry {unknown_expiry_min:g}): submitting it again")


def active_job(run_path: Path, unknown_expiry_min: float = UNKNOWN_EXPIRY_MIN) -> tuple[str, str] | None:
    """(state, description) of the run's queued, running or unknown job, or None if it has none."""
    record = read_record(run_path)
    state = None if record is None else job_state(record, run_path, unknown_expiry_min)
    if state is None:
        return None
    job = f"job {record['job_id']}" if record.get("job_id") else f"a job of pid {record.get('pid')}"
    return state, f"{job} ({record.get('launcher', 'submitit')}, {state}; record {run_path / JOB_RECORD})"


def claim(run_path: Path, unknown_expiry_min: float = UNKNOWN_EXPIRY_MIN) -> str | None:
    """Claim the run for a submission (a token), or None if a queued or running job has it.

    The claim is a job.json created with a hard link, atomic on network filesystems too; an old
    record whose job has ended is moved aside first (a rename: of several sweeps, one wins).
    """
    run_path.mkdir(parents=True, exist_ok=True)
    path, token = run_path / JOB_RECORD, uuid.uuid4().hex
    for _ in range(10):
        tmp = utils.temp_beside(path)
        try:
            tmp.write_text(json.dumps({"job_id": None, "token": token, "claimed_at": time.time(),
                                       **rundirs.this_process()}))
            os.link(tmp, path)
            return token
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        record = read_record(run_path)
        if record is None:
            continue
        if job_state(record, run_path, unknown_expiry_min) is not None:
            return None
        aside = path.with_name(f".{JOB_RECORD}.{token}.old")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        moved = read_record_file(aside)
        if moved is not None and moved.get("token") != record.get("token"):
            with contextlib.suppress(FileExistsError):   # another sweep's fresh claim: give it back
                os.link(aside, path)
        aside.unlink(missing_ok=True)
    return None


def write_record(run_path: Path, token: str, launcher: str, job: submitit.Job, folder: Path) -> None:
    utils.atomic_write_text(json.dumps({
        "job_id": str(job.job_id), "launcher": launcher, "folder": str(folder), "token": token,
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), **rundirs.this_process()}, indent=1), run_path / JOB_RECORD)


# --------------------------------------------------------------------------------------------
# Status of a run from its directory
# --------------------------------------------------------------------------------------------
def last_exit_code(run_path: Path) -> int | None:
    try:
        codes = EXIT_MARKER.findall((run_path / "run_all.log").read_text(errors="replace"))
    except OSError:
        return None
    return int(codes[-1]) if codes else None


def run_state(run_path: Path, unknown_expiry_min: float = UNKNOWN_EXPIRY_MIN) -> tuple[str, str]:
    """(state, detail) of a run: done, running, queued, unknown (its job's state cannot be read),
    failed, interrupted or not started."""
    if (run_path / "results.json").exists():
        return "done", ""
    holder = rundirs.lock_holder(run_path)
    if holder is not None:
        return "running", holder.describe()
    job = active_job(run_path, unknown_expiry_min)
    if job is not None:
        return ("running" if job[0] == "running" else "unknown" if is_unknown(job[0]) else "queued"), job[1]
    code = last_exit_code(run_path)
    if code not in (None, 0, rundirs.EXIT_LOCKED, 130, -signal.SIGTERM, -signal.SIGINT):
        return "failed", f"exit {code}; log {run_path / 'run_all.log'}"
    if (run_path / "last.pt").exists():
        return "interrupted", "last.pt saved: run the sweep again to resume"
    return ("not started", "") if code is None else ("failed", f"exit {code} before the first last.pt")


def status_table(runs: Sequence[Any], unknown_expiry_min: float = UNKNOWN_EXPIRY_MIN) -> tuple[str, dict[str, int]]:
    states = [(run, *run_state(run.path, unknown_expiry_min)) for run in runs]
    counts: dict[str, int] = {}
    lines = []
    for run, state, detail in states:
        counts[state] = counts.get(state, 0) + 1
        lines.append(f"{state:12s} {run.name}" + (f"  {detail}" if detail else ""))
    head = ", ".join(f"{n} {state}" for state, n in counts.items())
    return "\n".join([f"Status: {len(runs)} runs ({head})", *lines]), counts


# --------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------
def make_executor(args: argparse.Namespace) -> submitit.Executor:
    folder = job_folder(args)
    if args.launcher == "slurm":
        executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(**slurm_parameters(args))
    else:
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(timeout_min=args.slurm_time, gpus_per_node=args.slurm_gpus,
                                   signal_delay_s=SIGNAL_DELAY_S, stderr_to_stdout=True)
    return executor


def sbatch_scripts(args: argparse.Namespace, runs: Sequence[Any]) -> list[str]:
    """The sbatch script(s) that --launcher slurm would submit for `runs` (rendered by submitit)."""
    folder = job_folder(args)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    params = slurm_parameters(args)
    if args.slurm_array_parallelism:
        return [submitit_slurm._make_sbatch_string(command=command, folder=folder, job_name="twistnet-sweep",
                                                   setup=setup_lines(runs), map_count=len(runs), **params)]
    return [submitit_slurm._make_sbatch_string(command=command, folder=folder, job_name=run.name,
                                               setup=setup_lines([run]), **params) for run in runs]


def submit(args: argparse.Namespace, runs: Sequence[Any]) -> list[tuple[Any, submitit.Job]]:
    """Submit one job per run (a job array with --slurm_array_parallelism); runs whose job is
    queued or running (another sweep's) are left out. Records each job id in the run dir."""
    missing = [tool for tool in ("sbatch", "srun") if not shutil.which(tool)] if args.launcher == "slurm" else []
    if missing:
        raise utils.UserError(f"--launcher slurm needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                              "not on PATH: run on a SLURM login node, or use --launcher submitit_local (or --dry_run "
                              "to see the scripts).")
    executor = make_executor(args)
    claimed = [(run, token) for run in runs if (token := claim(run.path, args.slurm_unknown_expiry)) is not None]
    if not claimed:
        return []
    cwd = os.getcwd()
    jobs: list[submitit.Job] = []
    # submitit prints sbatch's complaint on stderr itself before raising it: that goes into our one
    # error line instead; anything else it says is passed on.
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            if args.slurm_array_parallelism:
                executor.update_parameters(setup=setup_lines([run for run, _ in claimed], args.launcher))
                with executor.batch():
                    jobs = [executor.submit(TrainJob(run.command, str(run.path), cwd)) for run, _ in claimed]
            else:
                for run, _ in claimed:
                    names = {"job_name": run.name} if args.launcher == "slurm" else {}
                    executor.update_parameters(setup=setup_lines([run], args.launcher), **names)
                    jobs.append(executor.submit(TrainJob(run.command, str(run.path), cwd)))
    except BaseException as error:
        for run, _ in claimed[len(jobs):]:
            (run.path / JOB_RECORD).unlink(missing_ok=True)   # our claims: nothing was submitted for them
        record_jobs(args, claimed, jobs)                       # those that were submitted keep their record
        if isinstance(error, FailedJobError):
            what = f"the job array of {len(claimed)} runs" if args.slurm_array_parallelism else \
                f"the job of {claimed[len(jobs)][0].name}"
            raise utils.UserError(rejection_message(args, error, what, len(jobs))) from None
        sys.stderr.write(said.getvalue())
        raise
    sys.stderr.write(said.getvalue())
    record_jobs(args, claimed, jobs)
    return [(run, job) for (run, _), job in zip(claimed, jobs)]


def record_jobs(args: argparse.Namespace, claimed: Sequence[tuple[Any, str]], jobs: Sequence[submitit.Job]) -> None:
    for (run, token), job in zip(claimed, jobs):
        write_record(run.path, token, args.launcher, job, job_folder(args))


def rejection_message(args: argparse.Namespace, error: Exception, what: str, submitted: int) -> str:
    """One line for a submission that sbatch (or the local executor) refused, quoting its reason."""
    reason = last_output_line(str(error)) or "no message"
    tool = "sbatch" if args.launcher == "slurm" else "submitit"
    done = f"; the {submitted} job(s) submitted before it are recorded" if submitted else "; nothing was submitted"
    return (f"{tool} refused {what}: \"{reason}\"{done}. Check --slurm_partition, --slurm_account, "
            f"--slurm_qos, --slurm_time and the other --slurm_* options against the cluster (sinfo, sacctmgr), "
            f"or see the script with --dry_run.")


def wait_for(jobs: Sequence[submitit.Job], interval_s: float = 1.0) -> None:
    while not all(job.done() for job in jobs):
        time.sleep(interval_s)


@dataclasses.dataclass(frozen=True)
class Finished:
    """A run's state after its job ended, in run_all's report terms."""
    state: str
    returncode: int | None
    last_line: str


def finished_state(run: Any, unknown_expiry_min: float = UNKNOWN_EXPIRY_MIN) -> Finished:
    state, detail = run_state(run.path, unknown_expiry_min)
    code = last_exit_code(run.path)
    mapping = {"done": "done", "failed": "failed", "interrupted": "interrupted", "running": "elsewhere",
               "queued": "elsewhere", "unknown": "unknown", "not started": "not started"}
    return Finished(mapping[state], code, detail)


# --------------------------------------------------------------------------------------------
# The world layout of a multi-process job started by srun (no torchrun)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SlurmWorld:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise utils.UserError(f"cannot read the SLURM node list '{nodelist}'; set MASTER_ADDR to the first node")
    prefix, ranges = head.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def slurm_world(env: Mapping[str, str]) -> SlurmWorld | None:
    """The process's place in an srun job of several tasks (one process per GPU, no torchrun),
    or None outside one. MASTER_ADDR / MASTER_PORT, if set, win over the node list and the port
    derived from the job id (the same on every task, different between jobs on one node)."""
    if "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return SlurmWorld(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]),
                      env.get("MASTER_ADDR") or first_host(nodelist), int(port))
