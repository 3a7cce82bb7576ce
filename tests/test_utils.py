"""The shared plumbing: user errors end in one `error:` line, progress bars stay quiet in logs, the
device flags mean the same in every script, and the scripts' import map has one home per concern.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compute_flops
import fixtures
import models
import pretrain_imagenet
import pretrain_spark
import train
from helpers import train_cli, utils

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_run_main_turns_user_errors_into_one_line_and_status_2(capsys: pytest.CaptureFixture) -> None:
    def bad_input(argv: list[str] | None) -> int:
        raise utils.UserError("the folder x does not exist")

    assert utils.run_main(bad_input, []) == 2
    assert capsys.readouterr().err == "error: the folder x does not exist\n"
    assert utils.run_main(lambda argv: models.get_spec("nosuch"), []) == 2   # models.py's own errors too
    assert capsys.readouterr().err.startswith("error: Unknown model 'nosuch'")

    def bug(argv: list[str] | None) -> int:
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        utils.run_main(bug, [])


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = fixtures.one_error_line(proc.stderr)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.mark.slow
def test_train_py_user_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    assert_one_error_line(run_script("train.py", "--dataset", "dtd", "--data_dir", str(missing),
                                     "--run_dir", str(tmp_path / "runs")),
                          str(missing), "images/<class>/*.jpg")
    assert not (tmp_path / "runs").exists()  # nothing is written before the data is found
    assert_one_error_line(run_script("train.py", "--model", "twistnet_18", "--run_dir", str(tmp_path)),
                          "Unknown model 'twistnet_18'", "Did you mean 'twistnet18'?")
    assert_one_error_line(run_script("train.py", "--dataset", "kth_tips2", "--data_dir", str(tmp_path),
                                     "--fold", "5", "--run_dir", str(tmp_path)), "folds 1-4", "fold 5")
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, foreign)
    assert_one_error_line(run_script("train.py", "--pretrained", str(foreign), "--epochs", "1", "--img_size", "32",
                                     "--workers", "0", "--run_dir", str(tmp_path / "r2")),
                          str(foreign), "incompatible")


@pytest.mark.slow
def test_other_scripts_report_user_errors_the_same_way(tmp_path: Path) -> None:
    assert_one_error_line(run_script("compute_flops.py", "--model", "nosuch"), "Unknown model 'nosuch'")
    assert_one_error_line(run_script("summarize_runs.py", "--run_dir", str(tmp_path / "none")), "is not a directory")
    assert_one_error_line(run_script("plot_results.py", "--plot", "curves", "--log_file", str(tmp_path / "x.jsonl")),
                          "Log file not found")
    assert_one_error_line(run_script("datasets.py", "--dataset", "fmd", "--data_dir", str(tmp_path / "none")),
                          "fmd data folder not found")


@pytest.mark.parametrize("script, argv, fragments", [
    ("train", ["--lr", "-1"], ["--lr -1.0", "positive"]),
    ("train", ["--momentum", "1.5"], ["--momentum 1.5", "in [0, 1]"]),
    ("train", ["--model", "resnet18", "--model_kwargs", '{"r": 4}'], ["resnet18", "TwistNet models"]),
    ("train", ["--batch_size", "1"], ["--batch_size 1 cannot train", "BatchNorm"]),
    ("pretrain_imagenet", ["--data", "synthetic", "--resume", "{tmp}/random.pt"], ["random.pt", "not a torch.save file"]),
    ("pretrain_imagenet", ["--data", "synthetic", "--base_lr", "0"], ["--base_lr 0.0", "positive"]),
    ("plot_results", ["--plot", "confusion", "--results", "{tmp}/bad.json"], ["bad.json", "not readable JSON"]),
])
def test_more_user_errors_are_one_line_in_process(script: str, argv: list[str], fragments: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Each of these stopped with a traceback (torch's SGD, timm, json, torch.load) before."""
    import plot_results
    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    (tmp_path / "bad.json").write_text("{not json")
    main = {"train": train.main, "pretrain_imagenet": pretrain_imagenet.main, "plot_results": plot_results.main}[script]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    extra = ["--run_dir", str(tmp_path / "runs")] if script == "train" else \
        ["--checkpoint_dir", str(tmp_path / "ckpt")] if script == "pretrain_imagenet" else []
    assert utils.run_main(main, argv + extra) == 2
    line = fixtures.one_error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------------
def test_progress_is_throttled_to_whole_lines_off_a_terminal() -> None:
    log = io.StringIO()
    bar = utils.progress(range(5000), file=log, desc="steps")
    for _ in bar:
        pass
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines   # the first frame, the final one: not a frame per step
    assert "5000/5000" in lines[-1]


def test_progress_disable_writes_nothing() -> None:
    log = io.StringIO()
    for _ in utils.progress(range(10), file=log, disable=True):
        pass
    assert log.getvalue() == ""


# --------------------------------------------------------------------------------------------
# One meaning per flag
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--device", "--amp", "--channels_last"])
def test_device_flags_are_the_same_in_every_script(flag: str) -> None:
    parsers = {"train.py": train_cli.build_parser(), "pretrain_imagenet.py": pretrain_imagenet.build_parser(),
               "pretrain_spark.py": pretrain_spark.build_parser(), "compute_flops.py": compute_flops.build_parser()}
    actions = {name: next(a for a in p._actions if flag in a.option_strings) for name, p in parsers.items()}
    described = {name: (a.choices, a.default, a.nargs, a.const, a.help) for name, a in actions.items()}
    assert len(set(described.values())) == 1, described


def test_the_loader_flag_is_the_same_in_the_three_training_scripts() -> None:
    parsers = [train_cli.build_parser(), pretrain_imagenet.build_parser(), pretrain_spark.build_parser()]
    actions = [next(a for a in p._actions if "--loader" in a.option_strings) for p in parsers]
    assert len({(a.choices, a.default, a.help) for a in actions}) == 1
    assert actions[0].default == "auto" and tuple(actions[0].choices) == ("auto", "pil", "dali")


def test_device_flag_values() -> None:
    cpu = torch.device("cpu")
    assert utils.resolve_device("cpu") == cpu
    assert utils.resolve_amp("auto", cpu) is None and utils.resolve_amp("off", cpu) is None
    assert utils.resolve_amp("bf16", cpu) == torch.bfloat16 and utils.resolve_amp("fp16", cpu) == torch.float16
    assert not utils.resolve_channels_last("auto", cpu) and utils.resolve_channels_last("on", cpu)
    parsed = train_cli.build_parser().parse_args(["--channels_last"])
    assert parsed.channels_last == "on"   # the bare switch of earlier versions still means on
    if not torch.cuda.is_available():
        with pytest.raises(utils.UserError, match="no CUDA GPU"):
            utils.resolve_device("cuda")
    with pytest.raises(utils.UserError, match="not a device"):
        utils.resolve_device("gpu0")


def test_atomic_files_leave_no_temp_file_behind(tmp_path: Path) -> None:
    utils.atomic_write_text("a", tmp_path / "x.txt")
    utils.atomic_save({"w": torch.ones(2)}, tmp_path / "x.pt")
    with pytest.raises(Exception, match="pickle"):
        utils.atomic_save({"f": lambda: 0}, tmp_path / "y.pt")    # cannot be pickled: fails mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt", "x.txt"]
    utils.append_jsonl(tmp_path / "log.jsonl", {"epoch": 1})
    assert utils.read_jsonl(tmp_path / "log.jsonl") == [{"epoch": 1}]
    (tmp_path / "bad.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(utils.UserError, match="bad.jsonl, line 2"):
        utils.read_jsonl(tmp_path / "bad.jsonl")


SIZE_LIMITED_WRITES = """
import json, os, sys, torch
from helpers import utils
folder = sys.argv[1]
utils.atomic_save({"w": torch.ones(1_000_000)}, os.path.join(folder, "last.pt"))          # 4 MB: fits
attempts = {"torch.save": lambda: utils.atomic_save({"w": torch.zeros(2_500_000)}, os.path.join(folder, "last.pt")),
            "write_bytes": lambda: utils.atomic_write_bytes(bytes(9 * 2**20), os.path.join(folder, "blob.bin"))}
said = {}
for name, attempt in attempts.items():
    try:
        attempt()
    except utils.UserError as error:
        said[name] = str(error)
said["files"] = sorted(os.listdir(folder))
said["kept"] = int(torch.load(os.path.join(folder, "last.pt"), weights_only=True)["w"].sum())
print(json.dumps(said))
"""


@pytest.mark.slow
def test_a_file_size_limit_is_named_as_such(tmp_path: Path) -> None:
    """ulimit -f (RLIMIT_FSIZE) with SIGXFSZ ignored, as batch systems set it: torch.save's zip writer
    reported 'unexpected pos ...'; the limit is named, with the size needed, and nothing is lost."""
    import resource
    import signal

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-c", SIZE_LIMITED_WRITES, str(tmp_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = json.loads(proc.stdout.splitlines()[-1])
    assert said["torch.save"].startswith(f"file size limit (ulimit -f) reached writing {tmp_path / 'last.pt'} "
                                         f"(needs ~10 MB, the limit is 8 MB); last.pt keeps its previous content")
    assert said["write_bytes"].startswith(f"file size limit (ulimit -f) reached writing {tmp_path / 'blob.bin'} "
                                          f"(needs ~9 MB, the limit is 8 MB); blob.bin was not written")
    assert "ulimit -f unlimited" in said["torch.save"] and "unexpected pos" not in said["torch.save"]
    assert said["files"] == ["last.pt"] and said["kept"] == 1_000_000


def test_stale_temp_files_of_files_written_without_the_lock_are_spared(tmp_path: Path) -> None:
    """A dead writer's temp file is removed, except for the files written without the run lock (the
    lock itself, a sweep's job.json from the login node): their pid may be of another host."""
    from helpers import rundirs
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(gone.stdout)   # that process has ended: on this host its pid is dead
    assert not utils.process_alive(pid)
    temps = {target: tmp_path / f".{target}.{pid}.0123abcd.tmp" for target in ("last.pt", *rundirs.WRITTEN_UNLOCKED)}
    for temp in temps.values():
        temp.write_bytes(b"x")
        assert utils.TEMP_NAME.match(temp.name)
    note = utils.remove_stale_temp_files(tmp_path, rundirs.WRITTEN_UNLOCKED)
    assert note is not None and "removed 1 temp file(s)" in note
    assert {target for target, temp in temps.items() if temp.exists()} == {"run.lock", "job.json"}
