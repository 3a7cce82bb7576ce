"""Run a sweep of train.py runs, every (model, fold, seed), resumably and in parallel.

Usage:
    python run_all.py --data_dir data/dtd --dataset dtd --models resnet18,twistnet18 \\
        --folds 1-10 --seeds 42,43,44 --epochs 100 --run_dir runs/main
    python run_all.py ... --gpus 0,1,2,3 --runs_per_gpu 2   # 8 concurrent runs, 2 per GPU
    python run_all.py ... --jobs 2                          # 2 concurrent runs on CPU
    python run_all.py ... --dry_run                         # print the plan, start nothing
    python run_all.py ... --launcher slurm --slurm_partition gpu --slurm_time 240   # one SLURM job per run
    python run_all.py ... --status                          # queued / running / done / failed runs
    python run_all.py ... --pretrained --lr 0.005           # options run_all does not know go
                                                            # to every train.py unchanged
    python run_all.py --dataset fmd ... --folds 1-5 --split_protocol paper_code   # the paper code's splits

Every run is its own `train.py` process writing <run_dir>/<dataset>_fold<k>_<model>[-<tag>]_seed<s>[_n<N>|_frac<F>]/
(docs/TRAINING.md "The run directory"). Its stdout and stderr go to run_all.log in that directory. A run whose
results.json exists is skipped without starting a process (unless it was made with another recipe
or on other data: then the sweep refuses to start, listing the differences); one with only last.pt
is resumed by train.py; a run that fails is reported and the sweep goes on. Running the same
command again therefore finishes whatever is left. The plan goes fold by fold, seed by seed, all
models for each, so that a sweep stopped half-way already holds complete (fold, seed) pairs for
paired tests.

With --launcher slurm (or submitit_local) every run becomes a submitit job running the same
train.py command in the same run directory (launchers.py): requeued with last.pt when SLURM
pre-empts it, recorded in <run>/job.json so that no second sweep submits it while it is queued.

A run that another process is training (its run.lock is held: another run_all.py on the same
--run_dir, on this machine or another one sharing the folder) is reported as "running elsewhere"
and not started; several sweeps on one --run_dir thus share out the runs, each trained once.

Ctrl-C, SIGTERM or SIGHUP (a closed terminal) asks every running train.py to stop at its next
training step and save last.pt there, waits for them, prints the summary and exits 130; a second
signal stops the runs at once. train.py looks for the request between training steps only: a run
asked while it evaluates after an epoch stops at the first step of the next one, and a run asked
after its last training step (the last epoch's validation, the final test) has no step left, so
it finishes instead (results.json), which takes as long as those evaluations. The children die
with the sweep: if run_all.py itself is killed (SIGKILL, the OOM killer), each train.py gets
SIGTERM and stops the same way, so no orphan trains on. Exit status: 0 when every run is
finished, running elsewhere or submitted, 1 when any failed or was left alone because its
recorded cluster job's state cannot be read ("unknown": neither done nor submitted), 2 on a bad
command line, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import difflib
import io
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

import datasets
import models
from helpers import launchers, recipes, rundirs, train_cli, utils

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"

# train.py options that the sweep sets per run; passing them through would silently override it.
SWEEP_OWNED = {"model": "--models", "fold": "--folds", "seed": "--seeds", "dataset": "--dataset",
               "data_dir": "--data_dir", "epochs": "--epochs", "run_dir": "--run_dir"}
UNSET = object()

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_name_list(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("empty list")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other option is passed to every train.py unchanged (see python train.py --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # Without this, a pass-through --seed/--fold/--model would be taken for --seeds/--folds/--models.
        allow_abbrev=False)
    g = p.add_argument_group("sweep")
    g.add_argument("--dataset", required=True, help="dataset protocol (train.py --dataset)")
    g.add_argument("--data_dir", default=None, help="dataset root (not needed for synthtex)")
    g.add_argument("--models", required=True, type=parse_name_list, help="comma-separated model names")
    g.add_argument("--folds", default=[1], type=utils.parse_int_list, help="folds, e.g. 1-10 or 1-3,5")
    g.add_argument("--seeds", default=[42], type=utils.parse_int_list, help="seeds, e.g. 42,43,44 or 42-44")
    g.add_argument("--epochs", type=int, default=None, help="epochs per run (default: train.py's)")
    g.add_argument("--run_dir", default="runs", help="folder that receives one directory per run")
    g.add_argument("--recipe", default=None, choices=tuple(recipes.PRESETS),
                   help="train.py --recipe preset for every run (default: train.py's); explicit options still win")

    g = p.add_argument_group("execution")
    g.add_argument("--gpus", default=None, type=parse_name_list,
                   help="GPU ids, e.g. 0,1,2,3: one queue per GPU through CUDA_VISIBLE_DEVICES")
    g.add_argument("--runs_per_gpu", type=int, default=1, help="concurrent runs on each GPU of --gpus")
    g.add_argument("--jobs", type=int, default=None,
                   help="concurrent runs without --gpus (default 1); each child gets "
                        "OMP_NUM_THREADS = cpu_count // jobs unless OMP_NUM_THREADS is set")
    g.add_argument("--dry_run", action="store_true", help="print each run's status and command (with "
                   "--launcher slurm: the sbatch scripts); start nothing")
    launchers.add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser]:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if args.gpus and args.jobs is not None:
        parser.error("--jobs is for CPU sweeps; with --gpus the concurrency is len(--gpus) x --runs_per_gpu")
    if (args.jobs is not None and args.jobs < 1) or args.runs_per_gpu < 1:
        parser.error("--jobs and --runs_per_gpu must be at least 1")
    launchers.check_arguments(args, parser)
    args.jobs = args.jobs or 1
    return args, passthrough, parser


# --------------------------------------------------------------------------------------------
# Validation against train.py
# --------------------------------------------------------------------------------------------
def unknown_model_message(unknown: Sequence[str], known: Sequence[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown model {', '.join(parts)}. Known models: {', '.join(known)}"


def check_models(models: Sequence[str], known: Sequence[str], parser: argparse.ArgumentParser) -> None:
    unknown = [m for m in models if m not in known]
    if unknown:
        parser.error(unknown_model_message(unknown, known))


def unknown_option_message(unknown: Sequence[str], train_parser: argparse.ArgumentParser) -> str:
    known = [flag for action in train_parser._actions for flag in action.option_strings]
    hints = []
    for word in unknown:
        close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("-") else []
        hints.append(f"{word}" + (f" (did you mean {close[0]}?)" if close else ""))
    return f"neither run_all.py nor train.py knows: {', '.join(hints)}"


def parse_passthrough(passthrough: list[str],
                      parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The pass-through options as train.py reads them; refuses the ones the sweep sets itself.

    Parsing with train.py's own parser catches a typo before a hundred runs fail on it, and
    sentinel defaults reveal an owned option however it was spelt (--seed 1, --seed=1, --se 1).
    """
    train_parser = train_cli.build_parser()
    train_parser.prog = "run_all.py -> train.py"
    train_parser.usage = "run_all.py ... [train.py options, see python train.py --help]"
    train_parser.set_defaults(**{dest: UNSET for dest in SWEEP_OWNED})
    options, unknown = train_parser.parse_known_args(passthrough)
    if unknown:
        parser.error(unknown_option_message(unknown, train_parser))
    owned = [f"--{dest} (use run_all's {flag})" for dest, flag in SWEEP_OWNED.items()
             if getattr(options, dest) is not UNSET]
    if owned:
        parser.error(f"these train.py options are set by the sweep: {', '.join(owned)}")
    return options


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    path: Path
    command: tuple[str, ...]
    status: str  # "run", "resume", "skip", "elsewhere" (another process holds its lock or a job is queued)
    #              or "unknown" (a recorded cluster job whose state cannot be read)

    @property
    def log_path(self) -> Path:
        return self.path / "run_all.log"


def train_command(args: argparse.Namespace, model: str, fold: int, seed: int,
                  passthrough: Sequence[str], options: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(TRAIN_SCRIPT), "--dataset", args.dataset]
    if args.data_dir is not None:
        command += ["--data_dir", args.data_dir]
    command += ["--model", model, "--fold", str(fold), "--seed", str(seed)]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    if args.recipe is not None:
        command += ["--recipe", args.recipe]
    command += ["--run_dir", args.run_dir]
    if not options.no_progress:
        command.append("--no_progress")  # the output goes to a log file, where bars are noise
    return command + list(passthrough)


def run_status(path: Path, force: bool, unknown_expiry_min: float = launchers.UNKNOWN_EXPIRY_MIN) -> str:
    if rundirs.lock_holder(path) is not None:
        return "elsewhere"   # trained by another process
    job = launchers.active_job(path, unknown_expiry_min)
    if job is not None:      # queued or running as a cluster job, or a job nobody can tell about
        return "unknown" if launchers.is_unknown(job[0]) else "elsewhere"
    if force:
        return "run"  # train.py --force restarts finished and interrupted runs alike
    if (path / "results.json").exists():
        return "skip"
    if (path / "last.pt").exists():
        return "resume"
    return "run"


def plan_runs(args: argparse.Namespace, passthrough: Sequence[str], options: argparse.Namespace) -> list[Run]:
    runs, conflicts, fingerprints = [], [], {}
    for fold in args.folds:
        for seed in args.seeds:
            for model in args.models:
                command = train_command(args, model, fold, seed, passthrough, options)
                run_args = train_cli.parse_args(command[2:])
                train_cli.validate_args(run_args)   # e.g. --batch_size 1: refused once, not by every run
                name = train_cli.run_name(run_args)
                path = Path(args.run_dir) / name
                run = Run(name, path, tuple(command), run_status(path, options.force, args.slurm_unknown_expiry))
                if run.status == "skip":
                    # The paper code's splits move with the seed: one fingerprint per (fold, seed) then.
                    key = (fold, seed if run_args.split_protocol == "paper_code" else None)
                    if key not in fingerprints:
                        fingerprints[key] = data_of_fold(args, fold, run_args)
                    conflict = finished_run_conflict(run, run_args, fingerprints[key])
                    if conflict:
                        conflicts.append(conflict)
                runs.append(run)
    if conflicts:
        shown = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise utils.UserError(
            f"{len(conflicts)} finished run(s) in {args.run_dir} do not belong to this command, so skipping them "
            f"would keep numbers of something else: {shown}. Pass "
            f"--force to train them again with this command, or use another --tag or --run_dir for it.")
    return runs


def data_of_fold(args: argparse.Namespace, fold: int, run_args: argparse.Namespace) -> Any:
    """A fold's classes and split fingerprint (train.py's Data-like), or None if the data cannot be
    read here (then unfinished runs fail in train.py with the reason; finished ones are kept).
    The training subset (--train_per_class/--train_fraction) is the sweep's, the same for every run."""
    try:
        splits = datasets.load_splits(args.dataset, args.data_dir, fold, run_args.train_per_class,
                                      run_args.train_fraction, run_args.split_protocol, run_args.seed)
    except utils.UserError:
        return None
    fingerprint = datasets.split_fingerprint(splits.classes, {s: splits.split(s) for s in datasets.SPLIT_NAMES})
    return types.SimpleNamespace(classes=splits.classes, fingerprint=fingerprint)


def finished_run_conflict(run: Run, run_args: argparse.Namespace, data: Any) -> str | None:
    """Why a finished run does not belong to this sweep's command (None if it does)."""
    try:
        difference = train_cli.finished_difference(run.path, train_cli.config_of(run_args), data)
    except utils.UserError as error:   # an unreadable results.json
        difference = str(error)
    return f"{run.name} finished {difference}" if difference else None


def print_plan(runs: Sequence[Run]) -> None:
    label = {"run": "would-run", "resume": "resume", "skip": "skip", "elsewhere": "elsewhere", "unknown": "unknown"}
    print(f"Plan: {len(runs)} runs ({plan_counts(runs)})")
    for run in runs:
        print(f"{label[run.status]:9s}  {run.name}")
        print(f"{'':9s}  {shlex.join(run.command)}")
    print("--dry_run: nothing was started or written.")


def plan_counts(runs: Sequence[Run]) -> str:
    counts = collections.Counter(r.status for r in runs)
    text = f"{counts['run']} to run, {counts['resume']} to resume, {counts['skip']} finished (skipped)"
    text += f", {counts['elsewhere']} running elsewhere" if counts["elsewhere"] else ""
    return text + (f", {counts['unknown']} with a job of unknown state" if counts["unknown"] else "")


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    run: Run
    state: str  # one of STATES
    returncode: int | None = None
    seconds: float = 0.0
    last_line: str = ""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def slot_environments(gpus: Sequence[str] | None, runs_per_gpu: int, jobs: int) -> list[dict[str, str]]:
    """One environment per concurrent run slot."""
    if gpus:
        # Interleaved so that the first runs spread over all GPUs.
        slots = [{"CUDA_VISIBLE_DEVICES": gpu} for _ in range(runs_per_gpu) for gpu in gpus]
    else:
        slots = [{} for _ in range(jobs)]
    if "OMP_NUM_THREADS" not in os.environ:
        # N runs that each start one thread per core would fight over the cores.
        threads = str(max(1, available_cpus() // len(slots)))
        for slot in slots:
            slot["OMP_NUM_THREADS"] = threads
    return slots


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def last_output_line(log_path: Path, offset: int) -> str:
    """The last non-empty line the child wrote (usually the error), for the summary."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return launchers.last_output_line(text)


def say(text: str) -> None:
    """Print that survives a closed terminal (after SIGHUP writes fail with EIO): the sweep must go
    on stopping its runs cleanly whether or not anyone reads it."""
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


@dataclasses.dataclass
class Started:
    """A running child, the log it writes to, and where its own output starts in that log."""
    child: subprocess.Popen
    log: io.TextIOBase
    offset: int
    start: float


class Sweep:
    """Runs the planned train.py processes on a fixed set of slots and collects their outcomes.

    Worker threads (one per slot) take runs from a shared queue, so a slot that finishes early
    takes the next run. Children start in their own session: a Ctrl-C in the terminal reaches
    only run_all, which forwards exactly one SIGINT to each child. Two SIGINTs would make
    train.py quit without saving. Each child is tied to the thread that started it and waits for
    it (rundirs.die_with_parent_preexec), so if run_all dies, its children get SIGTERM and stop.
    """

    def __init__(self, runs: Sequence[Run], slots: Sequence[dict[str, str]], force: bool = False,
                 unknown_expiry_min: float = launchers.UNKNOWN_EXPIRY_MIN) -> None:
        self.pending = collections.deque(runs)
        self.total = len(runs)
        self.slots = list(slots)[:max(1, len(runs))]
        self.lock = threading.Lock()
        self.live: dict[int, subprocess.Popen] = {}
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self.signals_received = 0
        self.signals_forwarded = 0
        self.force = force
        self.unknown_expiry_min = unknown_expiry_min
        self.preexec = rundirs.die_with_parent_preexec(signal.SIGTERM)

    @property
    def stopping(self) -> bool:
        return self.signals_received > 0

    def execute(self) -> list[Outcome]:
        workers = [threading.Thread(target=self._work, args=(env,), daemon=True) for env in self.slots]
        results: list[Outcome] = []
        with self._catch_signals(), utils.progress(total=self.total, unit="run", desc="sweep") as bar:
            for worker in workers:
                worker.start()
            while any(w.is_alive() for w in workers) or not self.outcomes.empty():
                self._forward_signals()
                try:
                    outcome = self.outcomes.get(timeout=0.1)
                except queue.Empty:
                    continue
                results.append(outcome)
                with contextlib.suppress(OSError, ValueError):
                    bar.update(1)
                    tqdm.write(outcome_line(outcome, len(results), self.total))
        results += [Outcome(run, "not started") for run in self.pending]
        return results

    @contextlib.contextmanager
    def _catch_signals(self) -> Iterator[None]:
        def on_signal(signum: int, frame: object) -> None:
            self.signals_received += 1  # acted on by the main loop: a handler must not take locks
        previous = {sig: signal.signal(sig, on_signal) for sig in utils.STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _forward_signals(self) -> None:
        if self.signals_forwarded >= self.signals_received:
            return
        self.signals_forwarded = self.signals_received
        with self.lock:
            children = list(self.live.values())
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGINT)
        with contextlib.suppress(OSError, ValueError):
            if self.signals_forwarded == 1:
                tqdm.write(f"Interrupted: asked {len(children)} running run(s) to save last.pt and stop; "
                           f"{len(self.pending)} queued run(s) will not start. Ctrl-C again stops them at once.")
            else:
                tqdm.write(f"Stopping {len(children)} run(s) at once.")

    def _work(self, env: dict[str, str]) -> None:
        while True:
            with self.lock:
                if self.stopping or not self.pending:
                    return
                run = self.pending.popleft()
                started = self._start(run, env)
            self.outcomes.put(started if isinstance(started, Outcome) else self._wait(run, started))

    def _wait(self, run: Run, started: Started) -> Outcome:
        returncode = started.child.wait()
        seconds = time.perf_counter() - started.start
        with self.lock:
            self.live.pop(started.child.pid, None)
        started.log.flush()
        last_line = last_output_line(run.log_path, started.offset)   # before run_all's own marker
        with started.log as log:
            log.write(f"===== exit code {returncode} after {format_duration(seconds)}\n")
        if returncode == 0:
            return Outcome(run, "done", returncode, seconds)
        if returncode == rundirs.EXIT_LOCKED:   # another process took the run between our look and its start
            return Outcome(run, "elsewhere", returncode, seconds, last_line)
        # 130 is train.py's "saved last.pt and stopped", also when someone else sent the signal.
        state = "interrupted" if self.stopping or returncode == EXIT_INTERRUPTED else "failed"
        return Outcome(run, state, returncode, seconds, last_line)

    def _start(self, run: Run, env: dict[str, str]) -> Started | Outcome:
        """Start one child (called under the lock, so a stop cannot miss it)."""
        # Look again: the plan may be hours old, and another sweep on this --run_dir may have
        # taken the run (or finished it) since.
        status = run_status(run.path, self.force, self.unknown_expiry_min)
        if status in NOT_STARTED_HERE:
            return Outcome(run, NOT_STARTED_HERE[status])
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            log = open(run.log_path, "a", buffering=1)
        except OSError as error:
            return Outcome(run, "failed", None, 0.0, f"cannot write {run.log_path}: {error}")
        settings = " ".join(f"{k}={v}" for k, v in env.items())
        log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} run_all: "
                  f"{'resume' if run.status == 'resume' else 'start'} | {settings}\n"
                  f"{shlex.join(run.command)}\n")
        offset = log.tell()
        try:
            child = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=self.preexec,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1",
                                          rundirs.SWEEP_PID_ENV: str(os.getpid()), **env})
        except OSError as error:
            log.write(f"===== could not start: {error}\n")
            log.close()
            return Outcome(run, "failed", None, 0.0, f"could not start: {error}")
        self.live[child.pid] = child
        return Started(child, log, offset, time.perf_counter())


def outcome_line(outcome: Outcome, count: int, total: int) -> str:
    head = f"[{count}/{total}] {outcome.state:11s} {outcome.run.name} ({format_duration(outcome.seconds)})"
    if outcome.state == "failed":
        return f"{head} exit {outcome.returncode}, log: {outcome.run.log_path}"
    return head


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
STATES = ("done", "skipped", "failed", "interrupted", "not started", "elsewhere", "unknown")
STATE_LABELS = {"elsewhere": "running elsewhere", "unknown": "job state unknown"}
NOT_STARTED_HERE = {"skip": "skipped", "elsewhere": "elsewhere", "unknown": "unknown"}


def format_report(outcomes: Sequence[Outcome], seconds: float,
                  unknown_expiry_min: float = launchers.UNKNOWN_EXPIRY_MIN) -> str:
    counts = collections.Counter(o.state for o in outcomes)
    lines = ["", f"Sweep summary: {len(outcomes)} runs in {format_duration(seconds)}",
             f"  {'status':18s} {'runs':>5s}"]
    lines += [f"  {STATE_LABELS.get(state, state):18s} {counts[state]:5d}" for state in STATES]
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:
        lines.append("Failed runs (exit code, log):")
        for o in failed:
            lines.append(f"  {o.run.name}  exit {o.returncode}  {o.run.log_path}")
            if o.last_line:
                lines.append(f"      {o.last_line}")
    unfinished = [o for o in outcomes if o.state in ("interrupted", "not started")]
    if unfinished:
        lines.append("Unfinished runs (run the same command again to resume them):")
        lines += [f"  {o.run.name}  {o.state}" for o in unfinished]
    elsewhere = [o for o in outcomes if o.state == "elsewhere"]
    if elsewhere:
        lines.append("Running elsewhere (another process holds their run.lock; not started here):")
        for o in elsewhere:
            holder, job = rundirs.lock_holder(o.run.path), launchers.active_job(o.run.path, unknown_expiry_min)
            where = holder.describe() if holder else job[1] if job else "(finished or stopped since)"
            lines.append(f"  {o.run.name}  {where}")
    lines += unknown_lines([o.run for o in outcomes if o.state == "unknown"], unknown_expiry_min)
    return "\n".join(lines)


def unknown_lines(runs: Sequence[Run], unknown_expiry_min: float) -> list[str]:
    """The runs left alone because their recorded job's state cannot be read, and what to do."""
    if not runs:
        return []
    lines = ["Job state unknown (not started or submitted: sacct cannot tell whether their recorded job is queued; "
             "check with sacct -j ID, or pass --slurm_unknown_expiry 0 to submit them again now):"]
    for run in runs:
        job = launchers.active_job(run.path, unknown_expiry_min)
        lines.append(f"  {run.name}  {job[1] if job else '(its record expired since)'}")
    return lines


def exit_code(outcomes: Sequence[Outcome], interrupted: bool) -> int:
    if interrupted:
        return EXIT_INTERRUPTED
    # "unknown" is not a success: such a run was neither trained nor submitted.
    return EXIT_OK if all(o.state in ("done", "skipped", "elsewhere") for o in outcomes) else EXIT_FAILED


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args, passthrough, parser = parse_args(argv)
    if args.dataset not in datasets.DATASETS:
        parser.error(f"unknown dataset '{args.dataset}'. Known: {', '.join(datasets.DATASETS)}")
    check_models(args.models, models.model_names(), parser)
    options = parse_passthrough(passthrough, parser)
    runs = plan_runs(args, passthrough, options)
    if args.status:
        print(launchers.status_table(runs, args.slurm_unknown_expiry)[0])
        return EXIT_OK
    if args.launcher != "local":
        return launch_jobs(args, runs)
    if args.dry_run:
        print_plan(runs)
        return EXIT_OK

    slots = slot_environments(args.gpus, args.runs_per_gpu, args.jobs)
    to_do = [r for r in runs if r.status not in NOT_STARTED_HERE]
    where = f"GPUs {','.join(args.gpus)} x {args.runs_per_gpu}" if args.gpus else f"{args.jobs} job(s) on CPU"
    print(f"{len(runs)} runs in {args.run_dir}: {plan_counts(runs)}; {len(slots)} at a time ({where})",
          flush=True)
    start = time.perf_counter()
    sweep = Sweep(to_do, slots, options.force, args.slurm_unknown_expiry)
    outcomes = [Outcome(r, NOT_STARTED_HERE[r.status]) for r in runs if r.status in NOT_STARTED_HERE]
    outcomes += sweep.execute() if to_do else []
    say(format_report(outcomes, time.perf_counter() - start, args.slurm_unknown_expiry))
    return exit_code(outcomes, sweep.stopping)


def launch_jobs(args: argparse.Namespace, runs: Sequence[Run]) -> int:
    """--launcher slurm / submitit_local: one job per unfinished run (launchers.py)."""
    to_do = [r for r in runs if r.status not in NOT_STARTED_HERE]
    if args.dry_run:
        print(f"Plan: {len(runs)} runs ({plan_counts(runs)}); sbatch script(s) for the {len(to_do)} to submit:")
        for script in launchers.sbatch_scripts(args, to_do) if to_do else []:
            print(script)
        print("--dry_run: nothing was submitted or written.")
        return EXIT_OK
    start = time.perf_counter()
    for run in to_do:
        note = launchers.expired_job_note(run.path, args.slurm_unknown_expiry)
        if note:
            print(note, flush=True)
    submitted = launchers.submit(args, to_do) if to_do else []
    print(f"{len(runs)} runs in {args.run_dir}: {plan_counts(runs)}; submitted {len(submitted)} job(s) "
          f"({args.launcher}): " + ", ".join(str(job.job_id) for _, job in submitted), flush=True)
    if not args.wait:
        unknown = [r for r in runs if r.status == "unknown"]
        for line in unknown_lines(unknown, args.slurm_unknown_expiry):
            print(line)
        print("Follow them with the same command and --status.")
        return EXIT_FAILED if unknown else EXIT_OK
    launchers.wait_for([job for _, job in submitted])
    ids = {run.name for run, _ in submitted}
    outcomes = [Outcome(r, NOT_STARTED_HERE.get(r.status, "elsewhere")) for r in runs if r.name not in ids]
    for run, _ in submitted:
        finished = launchers.finished_state(run, args.slurm_unknown_expiry)
        outcomes.append(Outcome(run, finished.state, finished.returncode, 0.0, finished.last_line))
    say(format_report(outcomes, time.perf_counter() - start, args.slurm_unknown_expiry))
    return exit_code(outcomes, False)


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
