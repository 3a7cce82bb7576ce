"""Shared plumbing of the TwistNet-2D scripts: errors, devices and precision, files and logs,
randomness and exact resume, signals, the training recipe, and torch.distributed.

Usage:
    from helpers import utils
    device = utils.resolve_device("auto")                 # --device auto|cpu|cuda|cuda:N
    dtype = utils.resolve_amp("auto", device)             # --amp auto|bf16|fp16|off
    with utils.autocast(device, dtype): ...
    utils.atomic_save(state, path)                        # temp file + rename
    for batch in utils.progress(loader, desc="epoch 1"): ...

    def main(argv=None) -> int: ...                       # raises utils.UserError on bad input
    if __name__ == "__main__":
        sys.exit(utils.run_main(main))                    # "error: ..." and exit status 2

Entry scripts import from here, never from each other. Model things live in models.py
(architecture, registry, weights) and model_tools.py (hooks, gates, slimming, trained
checkpoints), data things in datasets.py (splits) and loading.py (decoding, samplers, loaders),
image things in transforms.py, the training recipe (schedule, optimizer, EMA, Mixup) in recipes.py.

The torch.distributed side of the two pretraining scripts is in distributed.py; run-directory
locks, safe checkpoint reading and the lifetime of run_all.py's children are in rundirs.py.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from helpers.errors import EXIT_USAGE, UserError



# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point: a user error becomes one `error:` line on stderr and exit status 2."""
    try:
        code = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_USAGE)
    return 0 if code is None else int(code)


# --------------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------------
def progress(iterable: Iterable | None = None, *, disable: bool = False, file: Any = None,
             **kwargs: Any) -> Any:
    """A tqdm bar: live in a terminal; at most one line every 30 s in a log file or pipe.

    tqdm redraws on every update; written to a file (CI, nohup, SLURM logs) that is one frame
    per step. Off a terminal the bar is throttled and each frame ends its line. The interval can
    be changed with the TWISTNET_PROGRESS_INTERVAL environment variable (seconds).
    """
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    options: dict[str, Any] = {"dynamic_ncols": True}
    if not _is_terminal(stream):
        interval = float(os.environ.get("TWISTNET_PROGRESS_INTERVAL", "30"))
        options = {"mininterval": interval, "maxinterval": max(interval, 10.0), "ncols": 100,
                   "file": _LineStream(stream)}
    options.update(kwargs)
    options.setdefault("file", stream)
    return tqdm(iterable, disable=disable, **options)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _LineStream:
    """Turns tqdm's carriage-return redraws into whole lines, for logs."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").replace("\x1b[A", "")
        if text.strip():
            self.stream.write(text.rstrip("\n") + "\n")

    def flush(self) -> None:
        self.stream.flush()


# --------------------------------------------------------------------------------------------
# Devices and precision: one meaning of --device, --amp and --channels_last in every script
# --------------------------------------------------------------------------------------------
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
CHANNELS_LAST_CHOICES = ("auto", "on", "off")


def add_device_arguments(group: argparse._ActionsContainer) -> None:
    """--device, --amp and --channels_last, as every script accepts them."""
    group.add_argument("--device", default="auto",
                       help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    group.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                       help="autocast dtype; auto: bf16 on CUDA GPUs that support it, else fp16; off on CPU")
    group.add_argument("--channels_last", nargs="?", const="on", default="auto", choices=CHANNELS_LAST_CHOICES,
                       help="NHWC memory format; auto: on for CUDA; a bare --channels_last means on")


def resolve_device(name: str) -> torch.device:
    """The torch device of --device; asking for a GPU that is not there is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for, but torch sees no CUDA GPU. Use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device`, or None for full precision."""
    if mode not in AMP_CHOICES:
        raise UserError(f"--amp {mode!r}: choose from {', '.join(AMP_CHOICES)}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 'flags', Arm 'Features'); None if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.partition(":")[2].split()}


def cpu_has_native_bf16(flags: Iterable[str] | None = None) -> bool | None:
    """Whether the CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16, Arm BF16); None if unknown."""
    flags = cpu_flags() if flags is None else set(flags)
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def speed_notes(device: torch.device, amp_dtype: torch.dtype | None, compile_: bool,
                flags: Iterable[str] | None = None) -> list[str]:
    """Warnings for settings that run, but far slower than the user probably expects."""
    notes = []
    if device.type == "cpu" and amp_dtype == torch.bfloat16 and cpu_has_native_bf16(flags) is False:
        notes.append("warning: --amp bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 is "
                     "emulated there, and a TwistNet-18 training step ran 20x slower than in fp32. Use --amp "
                     "off (the default on the CPU).")
    if device.type == "cpu" and compile_:
        notes.append("note: --compile on the CPU: compiling the model takes minutes before the first step "
                     "(and again before the first evaluation); for short runs that costs more than it saves.")
    return notes


def resolve_channels_last(mode: str, device: torch.device) -> bool:
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def amp_label(dtype: torch.dtype | None) -> str:
    """How logs name an autocast dtype: 'bf16', 'fp16' or 'off'."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_kernels(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels (exact resume on GPU), or cuDNN autotuning and TF32 matmuls for speed."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


# The normalisation of every pipeline (transforms.py re-exports these).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_uint8(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 (x / 255 - mean) / std, where they are (the GPU).

    The operations of torchvision's ToDtype(float32, scale=True) + Normalize, in their order, so a
    uint8 batch normalised here equals the float pipeline's output up to float rounding.
    The mean and std are filled in on the device, one 0-dim tensor per channel: a tensor built from
    the Python values is a host-to-device copy that waits for the GPU, on every batch; a Python
    scalar divisor is turned into a multiplication by its reciprocal on CUDA (other rounding)."""
    images = images.to(torch.float32).mul_(1.0 / 255)
    for channel, (channel_mean, channel_std) in enumerate(zip(mean, std)):
        on_device = [torch.full((), value, dtype=torch.float32, device=images.device)
                     for value in (channel_mean, channel_std)]
        images[..., channel, :, :].sub_(on_device[0]).div_(on_device[1])
    return images


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on `device`; uint8 images (the loaders' batches) are normalised there, after the copy
    (and after the layout change, which then moves a quarter of the bytes; normalising keeps it)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:
        images = normalise_uint8(images)
    return images, labels.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def temp_beside(path: Path) -> Path:
    # Unique per writer: two processes saving the same file never share (or rename) a temp file.
    # The writer's pid in the name lets remove_stale_temp_files tell a killed writer's leftover.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")   # temp_beside's names


def remove_stale_temp_files(folder: str | os.PathLike, written_unlocked: Sequence[str] = ()) -> str | None:
    """Delete the temp files (temp_beside) in `folder` whose writer process is gone, and say so
    (None if there were none). A writer killed mid-write (kill -9, the OOM killer) leaves one for
    good, as large as the file it was writing (~90 MB for a last.pt); a live writer's is kept.

    Call it holding the folder's lock (rundirs.RunLock): every other writer of the folder is then
    gone, whatever its host, except the writers of the files named in `written_unlocked`
    (rundirs.WRITTEN_UNLOCKED: the lock file, written by a contender before it holds the lock; a
    sweep's job record, written from the login node): they may run on another host, where their pid
    means nothing here, so their temp files are never touched."""
    if os.name != "posix":   # os.kill(pid, 0) would end the process elsewhere
        return None
    removed: list[tuple[str, int]] = []
    for path in Path(folder).glob(".*.tmp"):
        match = TEMP_NAME.match(path.name)
        if match is None or match["target"] in written_unlocked or process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            removed.append((path.name, size))
    if not removed:
        return None
    total_mb = sum(size for _, size in removed) / 2**20
    return (f"note: removed {len(removed)} temp file(s) ({total_mb:.0f} MB) left in {folder} by a writer that was "
            f"killed mid-write: {', '.join(name for name, _ in removed[:3])}")


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the name in brackets may hold spaces
    return fields[0], int(fields[19])


def process_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether process `pid` of this host runs (given its start time: the same process, not a
    reused pid). A zombie counts as gone. POSIX only."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # exists, owned by someone else
    stat = proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    # A zombie is dead (its parent has not reaped it yet); another start time is a reused pid.
    return state != "Z" and (proc_start is None or start == proc_start)


def _replace_atomically(path: Path, write: Callable[[Path], None], size_bytes: int) -> None:
    """Write through a temp file and rename it over `path`; on any failure the temp file goes and
    `path` keeps its previous content. A failed write (full disk, quota, ulimit -f) is a UserError."""
    tmp = temp_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        written = _size_or_none(tmp)
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) or _is_torch_write_error(error):
            raise write_error(path, error, size_bytes, written) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _is_torch_write_error(error: RuntimeError) -> bool:
    # torch.save reports a failed write(2) as a RuntimeError of its zip writer, without the errno
    # ("[enforce fail at inline_container.cc] . unexpected pos 576 vs 534").
    text = str(error)
    return "unexpected pos" in text or "PytorchStreamWriter" in text or "inline_container" in text


def write_error(path: Path, error: Exception, size_bytes: int, written: int | None = None) -> UserError:
    """The error for a file that could not be written: 'file size limit (ulimit -f) reached' when
    the process's file-size limit stopped it, 'no space left on <dir> (needs ~N MB)' when the
    filesystem is (nearly) full, else the system's reason. Either way `path` is unchanged.
    `written`: how large the file had grown when the write failed, if known."""
    folder = path.parent
    needed_mb = max(1, math.ceil(size_bytes / 2**20))
    kept = f"{path.name} keeps its previous content" if path.exists() else f"{path.name} was not written"
    limit = file_size_limit()
    # With SIGXFSZ ignored, a write past the limit fails with EFBIG; torch.save's zip writer drops
    # the errno, but leaves a file cut off exactly at the limit.
    if getattr(error, "errno", None) == errno.EFBIG or (limit is not None and written is not None and written >= limit):
        limit_text = f", the limit is {limit / 2**20:.0f} MB" if limit is not None else ""
        return UserError(f"file size limit (ulimit -f) reached writing {path} (needs ~{needed_mb} MB{limit_text}); "
                         f"{kept}. Raise the limit (ulimit -f unlimited, or in the job script) and run the same "
                         f"command again.")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < size_bytes)
    if full:
        free_text = f", {free / 2**20:.0f} MB free" if free is not None else ""
        return UserError(f"no space left on {folder} (needs ~{needed_mb} MB for {path.name}{free_text}); "
                         f"{kept}. Free some space (or point --run_dir/--checkpoint_dir elsewhere) and run the "
                         f"same command again.")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return UserError(f"could not write {path} (~{needed_mb} MB): {reason}; {kept}.")


def file_size_limit() -> int | None:
    """This process's file-size limit in bytes (ulimit -f, RLIMIT_FSIZE); None if there is none."""
    try:
        import resource   # POSIX only
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def payload_bytes(obj: Any) -> int:
    """Roughly how many bytes torch.save writes for `obj`: its tensors' data, plus a little."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(payload_bytes(v) for v in obj.values()) + 64 * len(obj)
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj) + 8 * len(obj)
    return 64


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a file."""
    _replace_atomically(Path(path), lambda tmp: torch.save(obj, tmp), payload_bytes(obj))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(text), len(text.encode()))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing or malformed file is a UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error})") from None


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    _replace_atomically(Path(path), lambda tmp: tmp.write_bytes(data), len(data))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not JSON ({error})") from None
    return records


def append_jsonl(path: str | os.PathLike, record: Mapping) -> None:
    """Append one line; a failed write (full disk) is cut back off, so the file never ends in half
    a record that would make it unreadable on the next resume."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        start = f.tell()
        try:
            f.write(line)
            f.flush()
        except OSError as error:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise write_error(Path(path), error, len(line)) from None


class TensorBoard:
    """TensorBoard event files in a run directory (--tensorboard); without a folder every call does
    nothing, so callers need no `if`. `tensorboard --logdir runs/` then shows a whole sweep."""

    def __init__(self, log_dir: str | os.PathLike | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter   # imports tensorboard: only when asked
            try:
                self.writer = SummaryWriter(str(log_dir))
            except OSError as error:   # a file in the folder's place, no permission, a full disk
                raise UserError(f"--tensorboard cannot write its event files to {log_dir}: "
                                f"{error.strerror or error}. Remove or rename what is at that path, or make its "
                                "folder writable, or run without --tensorboard.") from None

    def log_record(self, record: Mapping, step: int, prefix: str = "") -> None:
        """Every finite number of a log record as a scalar; nested dicts (gates per block) as
        'key/name'. Flushed at once: a killed run keeps the curves of its finished epochs."""
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, Mapping):
                self.log_record(value, step, f"{prefix}{key}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}{key}", value, step)
        self.writer.flush()

    def confusion(self, tag: str, confusion: Sequence[Sequence[float]], step: int, cell_px: int = 8) -> None:
        """A confusion matrix as a grey image, rows normalised (white: all of a true class there)."""
        if self.writer is None:
            return
        matrix = torch.as_tensor(confusion, dtype=torch.float32)
        matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
        image = matrix.repeat_interleave(cell_px, 0).repeat_interleave(cell_px, 1)
        self.writer.add_image(tag, image.unsqueeze(0), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> None:
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    import timm
    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}


class Console:
    """Prints a line (on the main process only) and appends it to a log file.

    The file is written first, so a closed terminal (nohup, dropped ssh) never loses a record.
    """

    def __init__(self, log_file: str | os.PathLike | None, enabled: bool = True, timestamps: bool = False) -> None:
        self.log_file = Path(log_file) if log_file is not None else None
        self.enabled, self.timestamps = enabled, timestamps
        self.write_failed = False

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.timestamps:
            stamp = time.strftime("%H:%M:%S")
            message = "\n".join(f"{stamp} {line}" for line in message.split("\n"))
        if self.log_file is not None:
            try:
                with open(self.log_file, "a") as f:
                    f.write(message + "\n")
            except OSError as error:  # a full disk must not turn a log line into a crash
                if not self.write_failed:
                    print(f"warning: cannot append to {self.log_file}: {error}", file=sys.stderr, flush=True)
                self.write_failed = True
        with contextlib.suppress(OSError):   # a closed terminal (SIGHUP) must not either
            print(message, flush=True)


class _Tee:
    """A text stream that writes through to `stream` and, whole lines at a time, to a file; of a
    line redrawn with carriage returns (a live progress bar) the file keeps the last frame."""

    def __init__(self, stream: Any, path: Path) -> None:
        self.stream, self.file, self._line = stream, open(path, "a", encoding="utf-8"), ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        *lines, self._line = (self._line + text.replace("\x1b[A", "")).split("\n")
        for line in lines:
            self.file.write(line.rsplit("\r", 1)[-1] + "\n")
        if lines:
            self.file.flush()
        return written

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return _is_terminal(self.stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(folder: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Inside the block, copy this process's stdout and stderr to <folder>/stdout.txt and
    stderr.txt (appended: a resumed run continues them). A user error leaving the block is copied
    to stderr.txt too, as run_main prints it after the block."""
    if not enabled:
        yield
        return
    out, err = _Tee(sys.stdout, Path(folder) / "stdout.txt"), _Tee(sys.stderr, Path(folder) / "stderr.txt")
    sys.stdout, sys.stderr = out, err
    try:
        yield
    except UserError as error:
        err.file.write(f"error: {error}\n")
        raise
    finally:
        sys.stdout, sys.stderr = out.stream, err.stream
        for tee in (out, err):
            rest = tee._line.rsplit("\r", 1)[-1]
            tee.file.write(f"{rest}\n" if rest.strip() else "")
            tee.file.close()


def tex_escape(text: str) -> str:
    """Text for a LaTeX table cell; also the degree, ± and Δ signs the tables use."""
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "°": r"$^\circ$", "±": r"$\pm$", "Δ": r"$\Delta$"}
    return "".join(replacements.get(ch, ch) for ch in text)


def markdown_escape(text: str) -> str:
    """Text for a Markdown table cell (a pipe would end the cell)."""
    return text.replace("|", r"\|")


# --------------------------------------------------------------------------------------------
# Randomness and exact resume
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(seed: int, epoch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation of range(size), one augmentation seed per position) for an epoch.

    A function of (seed, epoch) alone, so an epoch's data is the same whatever ran before it:
    this is what lets a run resume exactly, also from the middle of an epoch.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(size, generator=g)
    seeds = torch.randint(0, 2**31 - 1, (size,), generator=g)
    return order, seeds


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopFlag:
    """SIGINT/SIGTERM/SIGHUP set a flag that the training loop checks between steps.

    Stopping only at a step boundary keeps the saved state consistent (never half an optimiser
    step). SIGHUP (a closed terminal, a dropped ssh session) is a stop like the others: save and
    exit, never die mid-epoch. A second signal exits at once, except within `grace_s` of the
    first: under torchrun a terminal Ctrl-C reaches each worker twice (from the terminal and
    forwarded by the agent).
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self, grace_s: float = 0.0) -> None:
        self.requested = False
        self.reason = ""
        self.grace_s = grace_s
        self._first_at = 0.0
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if time.monotonic() - self._first_at < self.grace_s:
                return
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask the loop to stop at the next step boundary (also from another thread)."""
        if not self.requested:
            self.requested, self.reason, self._first_at = True, reason, time.monotonic()

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_interrupts_in_worker(worker_id: int) -> None:
    # DataLoader workers share the terminal's process group; left alone, a Ctrl-C would kill
    # them mid-batch before the main process reaches a step boundary and saves.
    for sig in StopFlag.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# Command lines and configs
# --------------------------------------------------------------------------------------------
def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Destinations of the options actually written on the command line."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args, _ = parser.parse_known_args(argv)
    return set(vars(args))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]) -> str:
    """'--k: old -> new, ...' for the keys whose values differ ('' when none do)."""
    changed = [(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]
    return ", ".join(f"--{k}: {a!r} -> {b!r}" for k, a, b in changed)


def split_list(text: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c']; None for an empty or missing option."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def parse_int_list(text: str) -> list[int]:
    """'1-3,5' -> [1, 2, 3, 5]; order kept, duplicates dropped."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        try:
            start = int(low)
            stop = int(high) if sep else start
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not an integer or a range like 1-10") from None
        if stop < start:
            raise argparse.ArgumentTypeError(f"range {part!r} runs backwards")
        values += [v for v in range(start, stop + 1) if v not in values]
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
             channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> dict:
    """Sums over (images, labels, n_unreadable) batches: loss_sum, top5, seen, skipped and the
    confusion matrix (rows: true class). The model is left in eval mode."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5, seen, skipped = 0.0, 0, 0, 0
    for images, labels, n_bad in batches:
        skipped += int(n_bad)
        if images.shape[0] == 0:
            continue
        images, labels = to_device(images, labels, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        top5 += topk_correct(logits, labels, 5)
        seen += labels.shape[0]
        pairs = labels.cpu() * num_classes + logits.argmax(dim=1).cpu()
        confusion += torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)
    return dict(loss_sum=loss_sum, top5=top5, seen=seen, skipped=skipped, confusion=confusion)
