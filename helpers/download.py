"""Download a dataset's official release into the layout datasets.py reads.

Used through `python datasets.py --download NAME --data_dir D` (see datasets.py), or:

    from helpers.download import download_dataset
    download_dataset("dtd", "data/dtd", check_layout=lambda root: datasets.load_splits("dtd", root, 1))

Files are fetched into <data_dir>.download/ (a cut download resumes with an HTTP Range request),
checked against their published sizes and checksums, unpacked into a temporary folder beside
data_dir after each archive member has been checked (no absolute paths, '..' or links), and that
folder becomes data_dir only once check_layout accepts it. The base URL can be replaced
(--base_url, TWISTNET_DOWNLOAD_BASE_URL) for a mirror, or for the tests' loopback server.

Bounded: the whole download has a deadline (--download_timeout), a server may send no more than a
file's published size (or, where none is published, a bound on it) plus a margin, and an archive
may unpack to no more than MAX_UNPACK_RATIO times its own size (a zip bomb is refused before
anything is written). A data_dir that is a symbolic link is followed: the dataset goes into the
folder it points to, the archives beside that folder.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from helpers import utils

DOWNLOAD_BASE_URL_ENV = "TWISTNET_DOWNLOAD_BASE_URL"


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# The largest release (CUB, 1.15 GB) at 0.2 MB/s takes about 96 minutes.
DEADLINE_MIN = 120
# Releases of JPEG/PNG images unpack to about their archive's size; a zip bomb to thousands of times it.
MAX_UNPACK_RATIO = 10
MB = 1 << 20
# Writing failed because the disk (or quota, or the process's file-size limit) is full.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DownloadError(utils.UserError):
    """A download that failed, or a file that does not match its published size or checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset's release. None: no value known (then it is not checked).
    size_bound: an upper bound on the size where no size is published (a download cap, not a check)."""
    url: str
    size: int | None
    md5: str | None
    sha256: str | None
    size_bound: int | None = None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def max_bytes(self) -> int | None:
        """The most a server may send for this file: the published size with a 5% + 1 MB margin
        (more is a wrong file, caught by the size check anyway), else the bound."""
        return self.size + self.size // 20 + MB if self.size is not None else self.size_bound


# The publishers' pages list no checksums except CaltechDATA (CUB's md5). The md5s below are those
# torchvision (DTD, Flowers-102) and DeepMind's NEVIS'22 loaders (FMD, KTH-TIPS2-b) check; sizes and
# sha256 are TensorFlow Datasets' records (CUB's for its mirror of the same file, md5 equal).
# None of them can be checked from here; where a value is unknown it is None, never guessed.
# subdir: the folder inside the unpacked release that becomes --data_dir ("" = the release itself).
DOWNLOADS: dict[str, tuple[tuple[RemoteFile, ...], str]] = {
    "dtd": ((RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", 625239812,
                        "fff73e5086ae6bdbea199a49dfb8a4c1",
                        "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205"),), "dtd"),
    # No published sizes: bounds from the contents, with room to spare (FMD: 1000 JPEGs of 512 x 384
    # and their masks; KTH-TIPS2-b: 4752 PNGs of 200 x 200 RGB, at most 120 kB each uncompressed).
    "fmd": ((RemoteFile("https://people.csail.mit.edu/celiu/CVPR2010/FMD/FMD.zip", None,
                        "0721ba72cd981aa9599a81bbfaaebd75", None, 500 * MB),), ""),
    "kth_tips2": ((RemoteFile("https://www.csc.kth.se/cvap/databases/kth-tips/kth-tips2-b_col_200x200.tar", None,
                              "00470a104a57f5a5be22cc8a0f234c4e", None, 2000 * MB),), ""),
    "cub200": ((RemoteFile("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", 1150585339,
                           "97eceeb196236b17998738112f37df78",
                           "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081"),), ""),
    "flowers102": ((RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", 344862509,
                               "52808999861908f626f3c1f4e79d11fa",
                               "2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246"),
                    RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat", 502,
                               "e0620be6f572b9609742df49c70aed4d",
                               "4903e94206bac23bf772aadf06451916df56b58fc483a62db32a97b82656651d"),
                    RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat", 14989,
                               "a5357ecc9cb78c4bef273ce3793fc85c",
                               "46b8678f91fd95d3c8f4feab80d271a6c834a1dd896fe29fd3e6ad9ce5c8dccd")), ""),
}


def download_dataset(dataset: str, data_dir: str | Path, check_layout: Callable[[Path], object],
                     base_url: str | None = None, keep_archives: bool = False, attempts: int = 3,
                     log: Callable[[str], None] = print, deadline_s: float = DEADLINE_MIN * 60,
                     max_unpack_ratio: float = MAX_UNPACK_RATIO) -> Path:
    """Fetch a dataset's release into data_dir, in the layout load_splits reads; returns data_dir.

    check_layout(folder) raises a utils.UserError unless folder holds the complete dataset
    (datasets.py passes its load_splits of fold 1).

    Files go to <data_dir>.download/ (a cut download resumes from its .part file with an HTTP
    Range request, here and on a re-run), are checked against the sizes and checksums above, and
    are unpacked into a temporary folder beside data_dir that is renamed to data_dir only once
    the layout check passes: a failure leaves no half-unpacked data_dir. base_url (or the
    TWISTNET_DOWNLOAD_BASE_URL environment variable) replaces the servers, for mirrors and tests.
    The downloads must end within deadline_s (a re-run resumes them) and each archive may unpack to
    at most max_unpack_ratio times its size. A data_dir that is a link is followed.
    """
    if dataset not in DOWNLOADS:
        raise DownloadError(f"No download for {dataset!r}; downloadable: {', '.join(DOWNLOADS)}.")
    files, subdir = DOWNLOADS[dataset]
    given = Path(data_dir)
    root = followed_link(given, log)
    if root.exists() and not root.is_dir():
        raise DownloadError(f"--data_dir {root} is a file; give the folder the dataset should go to.")
    if root.is_dir() and any(root.iterdir()):
        try:
            check_layout(root)
        except utils.UserError as error:
            raise DownloadError(f"{root} exists and is not a complete {dataset} ({error}). Remove it or choose "
                                "another --data_dir.") from None
        log(f"{dataset} is already in {given}")
        return given
    base_url = base_url or os.environ.get(DOWNLOAD_BASE_URL_ENV) or None
    store = root.parent / f"{root.name}.download"
    store.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(time.monotonic() + deadline_s, deadline_s)
    local = []
    for remote in files:
        path = store / remote.name
        if not path.is_file():
            url = f"{base_url.rstrip('/')}/{remote.name}" if base_url else remote.url
            fetch(url, path, remote, attempts, log, deadline)
        verify_download(path, remote, log)
        local.append(path)
    unpack_into_place(local, subdir, root, check_layout, log, max_unpack_ratio)
    if not keep_archives:
        shutil.rmtree(store)
    return given


def followed_link(path: Path, log: Callable[[str], None]) -> Path:
    """path, or where it leads if it is a symbolic link: the dataset is unpacked (and renamed into
    place) there, on the link target's disk, and the link keeps working."""
    if not path.is_symlink():
        return path
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as error:   # a loop of links
        raise DownloadError(f"--data_dir {path} is a symbolic link that leads nowhere usable ({error}); "
                            "point it at a folder, or give the folder itself.") from None
    log(f"{path} is a link to {target}: the dataset goes there")
    return target


@dataclass(frozen=True)
class Deadline:
    """When the whole download must be over (time.monotonic), and the allowance it came from."""
    at: float
    allowed_s: float

    def left_s(self) -> float:
        return self.at - time.monotonic()

    def check(self, part: Path) -> None:
        if self.left_s() <= 0:
            have = part.stat().st_size if part.exists() else 0
            raise DownloadError(f"the download did not finish within {self.allowed_s / 60:g} min "
                                f"(--download_timeout; {have} bytes of {part.name[:-len('.part')]} so far). Run the "
                                f"same command again to resume from {part}, or allow more time.")


def fetch(url: str, path: Path, remote: RemoteFile, attempts: int, log: Callable[[str], None],
          deadline: Deadline | None = None) -> None:
    """Download url to path through path.part, resuming the part file (HTTP Range) after a cut;
    never past the deadline, nor more than remote.max_bytes."""
    deadline = deadline or Deadline(time.monotonic() + DEADLINE_MIN * 60, DEADLINE_MIN * 60)
    part = path.with_name(path.name + ".part")
    error: Exception | None = None
    for _ in range(attempts):
        deadline.check(part)
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            # The socket timeout bounds each read; the deadline is checked after each one.
            with urllib.request.urlopen(request, timeout=min(60.0, max(0.1, deadline.left_s()))) as response:
                if have and response.status != 206:
                    have = 0                                # the server ignored the range: start over
                length = response.headers.get("Content-Length")
                total = have + int(length) if length else remote.size
                check_not_too_big(url, part, total, remote.max_bytes)
                if have:
                    log(f"resuming {path.name} at {have} bytes")
                with open(part, "ab" if have else "wb") as out, \
                        utils.progress(total=total, initial=have, unit="B", unit_scale=True, desc=path.name) as bar:
                    while chunk := response.read1(MB):    # read1: whatever arrived, so a trickle meets the deadline
                        out.write(chunk)
                        bar.update(len(chunk))
                        check_not_too_big(url, part, out.tell(), remote.max_bytes)
                        deadline.check(part)
            if total is None or part.stat().st_size >= total:
                part.replace(path)
                return
            error = EOFError(f"connection closed at {part.stat().st_size} of {total} bytes")
        except urllib.error.HTTPError as http_error:
            if http_error.code == 416 and have:             # nothing left to send: the part is whole
                part.replace(path)
                return
            raise DownloadError(f"{url}: HTTP {http_error.code} {http_error.reason}.") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as cut:
            error = cut
        log(f"{path.name}: download interrupted ({error}); resuming")
    raise DownloadError(f"{url}: download incomplete after {attempts} attempts ({error}). Run the same command "
                        f"again to resume from {part}.")


def check_not_too_big(url: str, part: Path, size: int | None, max_bytes: int | None) -> None:
    """Stop a download that is (or announces itself as) larger than its file can be."""
    if size is None or max_bytes is None or size <= max_bytes:
        return
    part.unlink(missing_ok=True)
    raise DownloadError(f"{url} is more than {max_bytes} bytes ({size} sent or announced), larger than the release "
                        "file can be: not the dataset. Stopped and deleted; check --base_url.")


def file_digests(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


def verify_download(path: Path, remote: RemoteFile, log: Callable[[str], None]) -> None:
    """Check size, md5 and sha256 where known; a mismatch deletes the file and raises DownloadError."""
    got = {"size": path.stat().st_size}
    got["md5"], got["sha256"] = file_digests(path)
    wrong = [f"{key}: expected {getattr(remote, key)}, got {value}" for key, value in got.items()
             if getattr(remote, key) is not None and getattr(remote, key) != value]
    if wrong:
        path.unlink()
        raise DownloadError(f"{path.name} does not match its release ({'; '.join(wrong)}). The file was deleted; "
                            "run the same command to download it again, or check --base_url.")
    unknown = [key for key in ("size", "md5", "sha256") if getattr(remote, key) is None]
    note = f" (no published {', '.join(unknown)}: got {', '.join(str(got[k]) for k in unknown)})" if unknown else ""
    log(f"{path.name}: verified{note}")


def unpack_into_place(files: Sequence[Path], subdir: str, root: Path, check_layout: Callable[[Path], object],
                      log: Callable[[str], None], max_unpack_ratio: float = MAX_UNPACK_RATIO) -> None:
    """Unpack the archives (and copy the other files) into a temporary folder, check the layout,
    then rename the release (or its subdir) to root. Every archive's members are checked (safe
    names, total size within max_unpack_ratio x the archive) before anything is written."""
    contents = {path: archive_members(path) for path in files if path.name.endswith(ARCHIVE_SUFFIXES)}
    for path, members in contents.items():
        check_members(path, members, max_unpack_ratio)
    needed = sum(sum(m.size for m in contents[path]) if path in contents else path.stat().st_size for path in files)
    root.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(root.parent, needed)
    # mkdir, not mkdtemp: the folder becomes data_dir, so it gets the umask's mode, not 0700.
    temp = root.parent / f".{root.name}.unpack-{os.getpid()}-{os.urandom(4).hex()}"
    temp.mkdir()
    try:
        try:
            for path in files:
                if path in contents:
                    log(f"unpacking {path.name}")
                    extract(path, temp)
                else:
                    shutil.copy2(path, temp / path.name)
        except OSError as error:
            if error.errno not in NO_SPACE_ERRNOS:
                raise
            raise DownloadError(no_space_message(root.parent, needed, error)) from None
        release = temp / subdir
        check_layout(release)
        if root.is_dir():
            root.rmdir()                                    # empty (checked by the caller)
        release.replace(root)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def no_space_message(folder: Path, needed: int, error: OSError) -> str:
    limit = "the file-size limit (ulimit -f) of this process was reached" if error.errno == errno.EFBIG else \
        "the disk (or quota) is full"
    return (f"cannot unpack the release into {folder}: {limit} ({error.strerror}). It needs about "
            f"{needed / MB:.0f} MB there ({free_mb(folder):.0f} MB free now). Free space or choose a --data_dir "
            "on a bigger disk, then run the same command again (the downloaded files are kept).")


def free_mb(folder: Path) -> float:
    try:
        return shutil.disk_usage(folder).free / MB
    except OSError:
        return float("nan")


def check_free_space(folder: Path, needed: int) -> None:
    if free_mb(folder) * MB < needed:
        raise DownloadError(f"cannot unpack the release into {folder}: it needs about {needed / MB:.0f} MB there "
                            f"and {free_mb(folder):.0f} MB are free. Free space or choose a --data_dir on a bigger "
                            "disk, then run the same command again (the downloaded files are kept).")


@dataclass(frozen=True)
class Member:
    """One entry of an archive: its name, whether it is a folder, a regular file or folder (not a
    link or device), and its unpacked size in bytes (as declared: extraction writes no more)."""
    name: str
    is_dir: bool
    regular: bool
    size: int


def archive_members(path: Path) -> list[Member]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [Member(info.filename, info.is_dir(), True, info.file_size) for info in archive.infolist()]
    with tarfile.open(path) as archive:
        return [Member(m.name, m.isdir(), m.isfile() or m.isdir(), m.size if m.isfile() else 0)
                for m in archive.getmembers()]


def extract(path: Path, dest: Path) -> None:
    """Extract a tar/zip whose members check_members accepted."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            archive.extractall(dest)
        return
    with tarfile.open(path) as archive:
        # The data filter (Python >= 3.11.4) re-checks names and links, where it exists.
        archive.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def check_members(archive: Path, members: Sequence[Member], max_unpack_ratio: float = MAX_UNPACK_RATIO) -> None:
    """Refuse an archive with an unsafe member (absolute, '..', a link or device, or a path through
    a member that is a file) or one that unpacks to more than max_unpack_ratio times its size."""
    files, folders = set(), set()
    for member in members:
        check_member(archive, member.name, member.regular)
        parts = member_parts(member.name)
        (folders if member.is_dir else files).add(parts)
        folders.update(parts[:i] for i in range(1, len(parts)))
    clash = sorted(files & folders)
    if clash:
        name = "/".join(clash[0])
        raise DownloadError(f"{archive.name}: unsafe member {name!r} (both a file and a folder in the archive: "
                            "one would overwrite or break the other); refusing to unpack it.")
    unpacked, packed = sum(m.size for m in members), archive.stat().st_size
    if unpacked > max_unpack_ratio * max(packed, 1):
        raise DownloadError(f"{archive.name} would unpack to {unpacked / MB:.1f} MB, more than {max_unpack_ratio:g} "
                            f"times its own {packed / MB:.1f} MB: not an image release (a zip bomb?). Refusing to "
                            "unpack it; check --base_url.")


def member_parts(name: str) -> tuple[str, ...]:
    return PurePosixPath(name.replace("\\", "/")).parts


def check_member(archive: Path, name: str, regular: bool = True) -> None:
    parts = member_parts(name)
    if not regular or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DownloadError(f"{archive.name}: unsafe member {name!r} (absolute, '..', a link or a device); "
                            "refusing to unpack it.")
