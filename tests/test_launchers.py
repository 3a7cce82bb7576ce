"""run_all.py --launcher slurm / submitit_local: jobs through submitit, requeue, --status, and the
run lock and job records across hosts. Real submitit LocalExecutor jobs on synthtex at 32 px."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import one_error_line  # noqa: E402
from helpers import launchers, rundirs  # noqa: E402
from test_run_all import ENV, run_path, sweep_args  # noqa: E402

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('cluster_sweep',)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds job processes through /proc")
LOCAL = ["--launcher", "submitit_local", "--slurm_gpus", "0", "--wait"]


def run_all(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def start_run_all(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def job_process_of(run: Path, deadline_s: float = 300) -> tuple[int, int]:
    """(train.py pid, pid of the submitit job running it) once train.py is training."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        holder = rundirs.read_lock(run / "run.lock")
        log = run / "train.log"
        if holder is not None and log.exists() and " run " in log.read_text():
            stat = Path(f"/proc/{holder.pid}/stat").read_text()
            return holder.pid, int(stat[stat.rindex(")") + 2:].split()[1])
        time.sleep(0.05)
    raise AssertionError(f"{run} never started training")


def epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


# --------------------------------------------------------------------------------------------
# A 2 models x 2 folds sweep by two concurrent run_all.py
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    run_dir = tmp_path_factory.mktemp("cluster")
    sweeps = [start_run_all(*sweep_args(run_dir), *LOCAL) for _ in range(2)]
    outputs = [sweep.communicate(timeout=900)[0] for sweep in sweeps]
    assert [s.returncode for s in sweeps] == [0, 0], outputs
    return run_dir, outputs


def test_two_concurrent_sweeps_submit_and_train_each_run_once(cluster_sweep) -> None:
    run_dir, outputs = cluster_sweep
    submitted = [int(re.search(r"submitted (\d+) job", out).group(1)) for out in outputs]
    assert sum(submitted) == 4, outputs
    for model in ("twistnet18", "resnet18"):
        for fold in (1, 2):
            run = run_path(run_dir, model, fold)
            assert (run / "results.json").exists()
            assert epochs(run) == [1]
            assert (run / "run_all.log").read_text().count(": start\n") == 1   # one job, one train.py
            assert json.loads((run / "job.json").read_text())["launcher"] == "submitit_local"


def test_summarize_reads_the_cluster_sweep(cluster_sweep) -> None:
    run_dir, _ = cluster_sweep
    proc = subprocess.run([sys.executable, str(ROOT / "summarize_runs.py"), "--run_dir", str(run_dir), "--csv"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("resnet18,", "twistnet18,"))]
    assert len(rows) == 2 and all(",2," in row for row in rows), proc.stdout   # 2 runs per cell


def test_status_and_a_second_sweep_submit_nothing(cluster_sweep) -> None:
    run_dir, _ = cluster_sweep
    status = run_all(*sweep_args(run_dir), "--status")
    assert status.returncode == 0 and "Status: 4 runs (4 done)" in status.stdout, status.stdout
    again = run_all(*sweep_args(run_dir), *LOCAL)
    assert again.returncode == 0 and "submitted 0 job(s)" in again.stdout, again.stdout


@pytest.mark.slow
def test_a_fresh_job_of_unknown_state_is_not_submitted_again(tmp_path: Path) -> None:
    """A job.json of a SLURM job that sacct cannot answer for (no SLURM here) holds its run, as
    "unknown", while the run shows signs of life; not after."""
    run = run_path(tmp_path, "resnet18")
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"job_id": "4242", "launcher": "slurm", "token": "t",
                                              "folder": str(tmp_path / "submitit" / "%j")}))
    status = run_all(*sweep_args(tmp_path, "resnet18", "1"), "--status")
    assert re.search(r"unknown\s+synthtex_fold1_resnet18_seed42\s+job 4242 \(slurm, state unknown \(sacct is not "
                     r"on PATH; it holds the run until 360 min pass without progress, 0 min so far\)", status.stdout), \
        status.stdout
    plan = run_all(*sweep_args(tmp_path, "resnet18", "1"), "--dry_run")
    assert plan.stdout.splitlines()[1].split() == ["unknown", "synthtex_fold1_resnet18_seed42"], plan.stdout
    assert launchers.claim(run) is None
    assert launchers.claim(run, unknown_expiry_min=0) is not None   # expired: the run is free again


def fake_slurm(tmp_path: Path, sbatch: str, sacct: str = 'echo "JobID|State|NodeList"') -> dict[str, str]:
    """An environment whose PATH has shell scripts for sbatch and sacct (and no real SLURM)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", sbatch), ("sacct", sacct), ("srun", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin"}


def run_all_with(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("sacct", ['echo "JobID|State|NodeList"', 'printf "JobID|State|NodeList\\n4242|UNKNOWN|\\n"', ""])
def test_a_job_whose_state_cannot_be_read_is_reported_expires_and_is_submitted_again(tmp_path: Path,
                                                                                    sacct: str) -> None:
    """sacct knows nothing of the job, says UNKNOWN, or prints nothing: the sweep says so and does
    not claim success; once the run has shown no progress for --slurm_unknown_expiry, it is submitted."""
    submissions = tmp_path / "sbatch.calls"
    env = fake_slurm(tmp_path, f'echo "$@" >> {submissions}; echo "Submitted batch job 5000"', sacct)
    run_dir = tmp_path / "runs"
    run = run_path(run_dir, "resnet18")
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"job_id": "4242", "launcher": "slurm", "token": "t",
                                              "folder": str(run_dir / "submitit" / "%j")}))
    args = [*sweep_args(run_dir, "resnet18", "1"), "--launcher", "slurm", "--slurm_gpus", "0"]
    status = run_all_with(env, *args, "--status")
    assert re.search(r"unknown\s+synthtex_fold1_resnet18_seed42\s+job 4242 \(slurm, state unknown \(sacct does not "
                     r"report it", status.stdout), status.stdout
    if sacct != "":
        return   # the sweep itself once: what follows is the same for every way of not answering
    sweep = run_all_with(env, *args)
    assert sweep.returncode == 1, sweep.stdout + sweep.stderr
    assert "1 with a job of unknown state; submitted 0 job(s)" in sweep.stdout
    assert "Job state unknown" in sweep.stdout and "synthtex_fold1_resnet18_seed42  job 4242" in sweep.stdout
    assert not submissions.exists()
    hour_ago = time.time() - 3600   # an hour without a sign of life from the run
    os.utime(run / "job.json", (hour_ago, hour_ago))
    again = run_all_with(env, *args, "--slurm_unknown_expiry", "30")
    assert again.returncode == 0 and "submitted 1 job(s) (slurm): 5000" in again.stdout, again.stdout + again.stderr
    assert ("synthtex_fold1_resnet18_seed42: job 4242's state is unknown (sacct does not report it) and the run has "
            "shown no progress for 60 min (--slurm_unknown_expiry 30): submitting it again") in again.stdout
    assert json.loads((run / "job.json").read_text())["job_id"] == "5000"
    assert len(submissions.read_text().splitlines()) == 1
    folders = [p.name for p in (run_dir / "submitit").iterdir() if p.is_dir() and not p.is_symlink()]
    assert folders == ["5000"]   # the job's folder, no literal '%j'


@pytest.mark.slow
def test_an_sbatch_rejection_is_one_error_line_quoting_sbatch(tmp_path: Path) -> None:
    env = fake_slurm(tmp_path, 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1')
    proc = run_all_with(env, *sweep_args(tmp_path / "runs", "resnet18", "1"), "--launcher", "slurm",
                        "--slurm_partition", "nope")
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith('error: sbatch refused the job of synthtex_fold1_resnet18_seed42: "sbatch: error: invalid '
                           'partition specified: nope"; nothing was submitted. Check --slurm_partition'), line
    assert not (run_path(tmp_path / "runs", "resnet18") / "job.json").exists()   # the claim is given back


@pytest.mark.slow
def test_local_jobs_leave_no_literal_job_id_folder(tmp_path: Path) -> None:
    """submitit's local controller would create '<folder>/%j' (empty) beside the jobs' own folders."""
    import run_all as run_all_module
    args, _, _ = run_all_module.parse_args([*sweep_args(tmp_path, "resnet18", "1"), *LOCAL])
    runs = [types.SimpleNamespace(name="r", path=tmp_path / "r", command=(sys.executable, "-c", "print('ok')"))]
    submitted = launchers.submit(args, runs)
    launchers.wait_for([job for _, job in submitted], interval_s=0.1)
    assert "exit code 0" in (tmp_path / "r" / "run_all.log").read_text()
    assert not (tmp_path / "submitit" / "%j").exists(), sorted(os.listdir(tmp_path / "submitit"))


@pytest.mark.slow
def test_zero_array_parallelism_is_refused(tmp_path: Path) -> None:
    proc = run_all(*sweep_args(tmp_path), *LOCAL, "--slurm_array_parallelism", "0", "--dry_run")
    assert proc.returncode == 2 and "--slurm_array_parallelism must be at least 1" in proc.stderr, proc.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--tag", "x\ntouch owned", "--tag 'x\\ntouch owned': a tag is part of the run's folder name"),
    ("--slurm_partition", "gpu\ntouch owned", "--slurm_partition holds a control character"),
    ("--slurm_extra", "comment=a\ntouch owned", "--slurm_extra comment holds a control character"),
])
@pytest.mark.slow
def test_a_newline_cannot_reach_the_sbatch_script(tmp_path: Path, option: str, value: str, message: str) -> None:
    proc = run_all(*sweep_args(tmp_path, "resnet18", "1"), "--launcher", "slurm", option, value, "--dry_run")
    assert proc.returncode == 2 and message in proc.stderr and "#!/bin/bash" not in proc.stdout, proc.stderr
    assert not any(tmp_path.iterdir())


def test_comment_lines_of_the_script_escape_control_characters() -> None:
    run = types.SimpleNamespace(name="n", command=("python", "train.py", "--model_kwargs", '{"r": 4}\ntouch owned'))
    lines = launchers.setup_lines([run])
    assert all(line.startswith(("# run n: ", "export PYTHONPATH=")) for line in lines), lines
    assert "\\ntouch owned" in lines[0] and len("\n".join(lines).splitlines()) == 2


# --------------------------------------------------------------------------------------------
# Pre-emption: SIGUSR2 -> last.pt -> requeued job -> exact resume
# --------------------------------------------------------------------------------------------
def test_a_signalled_job_saves_is_requeued_and_resumes_exactly(cluster_sweep, tmp_path: Path) -> None:
    sweep = start_run_all(*sweep_args(tmp_path, "resnet18", "1"), *LOCAL)
    run = run_path(tmp_path, "resnet18")
    _, job_pid = job_process_of(run)
    time.sleep(1.0)   # some steps into the epoch
    os.kill(job_pid, signal.SIGUSR2)   # what SLURM sends (sbatch --signal) before a time limit or pre-emption
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out
    train_log = (run / "train.log").read_text()
    stopped = re.search(r"Interrupted at epoch 1, step (\d+) \(SIGINT\)", train_log)
    assert stopped and int(stopped.group(1)) > 0, train_log
    assert f"Resuming from {run / 'last.pt'}: epoch 1, step {stopped.group(1)}" in train_log
    assert "requeued" in (run / "run_all.log").read_text()
    assert json.loads((run / "job.json").read_text())["job_id"] == str(sweep_job_id(out))   # the same job, requeued
    # Exactly the numbers of the same run trained without a stop (in the cluster sweep).
    reference = run_path(cluster_sweep[0], "resnet18")
    mine, theirs = (json.loads((r / "log.jsonl").read_text()) for r in (run, reference))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert mine[key] == theirs[key], key
    assert json.loads((run / "results.json").read_text())["test_acc"] == \
        json.loads((reference / "results.json").read_text())["test_acc"]


def sweep_job_id(out: str) -> int:
    return int(re.search(r"\(submitit_local\): (\d+)", out).group(1))


@pytest.mark.slow
def test_a_killed_job_is_resumed_by_the_next_sweep(tmp_path: Path) -> None:
    args = sweep_args(tmp_path, "resnet18", "1")
    args[args.index("--epochs") + 1] = "2"
    sweep = start_run_all(*args, *LOCAL)
    run = run_path(tmp_path, "resnet18")
    _, job_pid = job_process_of(run)
    deadline = time.time() + 300
    while not (run / "log.jsonl").exists() or not (run / "log.jsonl").read_text().strip():
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(job_pid, signal.SIGKILL)   # the job dies; its train.py stops with it (and saves last.pt)
    out, _ = sweep.communicate(timeout=300)
    assert "results.json" not in os.listdir(run), out
    status = run_all(*args, "--status")
    assert re.search(r"interrupted\s+synthtex_fold1_resnet18_seed42", status.stdout), status.stdout
    again = run_all(*args, *LOCAL)
    assert again.returncode == 0 and "0 to run, 1 to resume" in again.stdout, again.stdout
    assert "Resuming from" in (run / "train.log").read_text()
    assert epochs(run) == [1, 2]


# --------------------------------------------------------------------------------------------
# --launcher slurm --dry_run: the sbatch scripts
# --------------------------------------------------------------------------------------------
SLURM = ["--launcher", "slurm", "--slurm_partition", "gpu", "--slurm_time", "90", "--slurm_gpus", "2",
         "--slurm_cpus", "8", "--slurm_mem", "32G", "--slurm_account", "lab", "--slurm_qos", "high",
         "--slurm_constraint", "a100", "--slurm_extra", "mail-type=END"]


@pytest.mark.slow
def test_slurm_dry_run_prints_sbatch_scripts_with_resources_and_commands(tmp_path: Path) -> None:
    local = run_all(*sweep_args(tmp_path), "--dry_run")
    commands = [line.strip() for line in local.stdout.splitlines() if "train.py" in line]
    assert len(commands) == 4
    proc = run_all(*sweep_args(tmp_path), *SLURM, "--dry_run")
    assert proc.returncode == 0, proc.stderr
    scripts = proc.stdout.split("#!/bin/bash")[1:]
    assert len(scripts) == 4
    for script, command in zip(scripts, commands):
        for option in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32G",
                       "--account=lab", "--qos=high", "--constraint=a100", "--mail-type=END", "--signal=USR2@120"):
            assert f"#SBATCH {option}\n" in script
        assert f": {command}\n" in script   # the exact command of the local launcher
        assert "srun" in script and "submitit.core._submit" in script
    assert not any(tmp_path.iterdir())   # nothing written
    array = run_all(*sweep_args(tmp_path), *SLURM, "--slurm_array_parallelism", "2", "--dry_run")
    assert array.stdout.count("#!/bin/bash") == 1 and "#SBATCH --array=0-3%2\n" in array.stdout
    assert all(command in array.stdout for command in commands)


@pytest.mark.slow
def test_slurm_without_sbatch_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "run_all.py"), *sweep_args(tmp_path), *SLURM],
                          capture_output=True, text=True, env={**ENV, "PATH": os.path.dirname(sys.executable)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --launcher slurm needs sbatch")
    assert not (run_path(tmp_path, "resnet18") / "job.json").exists()   # no claim left behind


# --------------------------------------------------------------------------------------------
# Across hosts: run locks and job claims of other nodes sharing the run dir
# --------------------------------------------------------------------------------------------
def test_a_live_holder_on_another_node_keeps_its_lock_by_heartbeat(tmp_path: Path) -> None:
    lock = rundirs.RunLock(tmp_path, heartbeat_s=0.1, stale_after_s=0.5).acquire()
    try:
        record = json.loads(lock.path.read_text())
        record["host"] = "node-b"   # as seen from another node: its pid cannot be checked from here
        lock.path.write_text(json.dumps(record))
        time.sleep(1.0)             # twice the stale age: only the heartbeat keeps it
        holder = rundirs.lock_holder(tmp_path, stale_after_s=0.5)
        assert holder is not None and holder.host == "node-b"
        with pytest.raises(rundirs.RunLockedError):
            rundirs.RunLock(tmp_path, stale_after_s=0.5).acquire()
        lock._stop.set()            # the node dies: no more heartbeats
        lock._thread.join()
        time.sleep(0.7)
        assert rundirs.lock_holder(tmp_path, stale_after_s=0.5) is None
        taken = rundirs.RunLock(tmp_path, stale_after_s=0.5, log=lambda m: None).acquire()
        assert json.loads(taken.path.read_text())["host"] == socket.gethostname()
        taken.release()
    finally:
        lock.release()


def test_job_claims_of_another_node(tmp_path: Path) -> None:
    claim = {"job_id": None, "token": "x", "host": "node-b", "boot_id": None, "pid": 1}
    (tmp_path / "job.json").write_text(json.dumps({**claim, "claimed_at": time.time()}))
    assert launchers.claim(tmp_path) is None                                    # being submitted there
    (tmp_path / "job.json").write_text(json.dumps({**claim, "claimed_at": time.time() - 3600}))
    token = launchers.claim(tmp_path)                                           # abandoned long ago
    assert token and json.loads((tmp_path / "job.json").read_text())["token"] == token
    assert launchers.claim(tmp_path) is None                                    # ours now, being submitted


# --------------------------------------------------------------------------------------------
# Pretraining under srun: the world layout from SLURM variables
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodelist, first", [("gpu[07-09,12],cpu1", "gpu07"), ("node5", "node5"),
                                             ("a-b[3]", "a-b3"), ("n1,n2", "n1")])
def test_first_host_of_a_node_list(nodelist: str, first: str) -> None:
    assert launchers.first_host(nodelist) == first


def test_slurm_world_layout() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "g[2-5]"}
    assert launchers.slurm_world(env) == launchers.SlurmWorld(5, 1, 8, "g2", 20000 + 123456 % 20000)
    assert launchers.slurm_world({**env, "SLURM_NTASKS": "1"}) is None   # one task: a plain launch


@pytest.mark.slow
def test_two_gloo_processes_join_from_slurm_variables() -> None:
    code = ("from helpers import distributed; ctx = distributed.init_distributed('cpu', 1); "
            "total = distributed.all_reduce_sum([ctx.rank + 1.0], ctx)[0]; "
            "print(ctx.rank, ctx.local_rank, ctx.world_size, ctx.backend, total); distributed.close_distributed(ctx)")
    base = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    with socket.socket() as s:   # a free port, as srun users get from the job id
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                                              "SLURM_NTASKS": "2", "MASTER_PORT": str(port),
                                              "SLURM_STEP_NODELIST": "localhost"}) for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.split()[-5:] for out in outputs] == [["0", "0", "2", "gloo", "3.0"], ["1", "1", "2", "gloo", "3.0"]]


def test_the_pretraining_guide_sbatch_script() -> None:
    guide = (ROOT / "PRETRAIN_GUIDE.md").read_text()
    section = guide[guide.index("### On a SLURM cluster"):]
    script = section[section.index("```bash\n") + len("```bash\n"):section.index("\n```\n")]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "--resume auto", "srun ", "torchrun ",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    command = script[script.index("pretrain_imagenet.py"):script.index(" &\n")].replace("\\\n", " ").split()
    import pretrain_imagenet
    options = pretrain_imagenet.build_parser().parse_args(command[1:])   # every option exists
    assert options.resume == "auto" and options.tensorboard
