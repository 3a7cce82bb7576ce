"""Download a dataset's official release into the layout datasets.py reads.

Used through `python datasets.py --download NAME --data_dir D` (see datasets.py), or:

    from helpers.download import download_dataset
    download_dataset("dtd", "data/dtd", check_layout=lambda root: datasets.load_splits("dtd", root, 1))

Files are fetched into <data_dir>.download/ (a cut download resumes with an HTTP Range request),
checked against their published sizes and checksums, unpacked into a temporary folder beside
data_dir after each archive member has been checked (no absolute paths, '..' or links), and that
folder becomes data_dir only once check_layout accepts it. The base URL can be replaced
(--base_url, TWISTNET_DOWNLOAD_BASE_URL) for a mirror, or for the tests' loopback server.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from helpers import utils

DOWNLOAD_BASE_URL_ENV = "TWISTNET_DOWNLOAD_BASE_URL"


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


class DownloadError(utils.UserError):
    """A download that failed, or a file that does not match its published size or checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset's release. None: no value known (then it is not checked)."""
    url: str
    size: int | None
    md5: str | None
    sha256: str | None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The publishers' pages list no checksums except CaltechDATA (CUB's md5). The md5s below are those
# torchvision (DTD, Flowers-102) and DeepMind's NEVIS'22 loaders (FMD, KTH-TIPS2-b) check; sizes and
# sha256 are TensorFlow Datasets' records (CUB's for its mirror of the same file, md5 equal).
# None of them can be checked from here; where a value is unknown it is None, never guessed.
# subdir: the folder inside the unpacked release that becomes --data_dir ("" = the release itself).
DOWNLOADS: dict[str, tuple[tuple[RemoteFile, ...], str]] = {
    "dtd": ((RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", 625239812,
                        "fff73e5086ae6bdbea199a49dfb8a4c1",
                        "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205"),), "dtd"),
    "fmd": ((RemoteFile("https://people.csail.mit.edu/celiu/CVPR2010/FMD/FMD.zip", None,
                        "0721ba72cd981aa9599a81bbfaaebd75", None),), ""),
    "kth_tips2": ((RemoteFile("https://www.csc.kth.se/cvap/databases/kth-tips/kth-tips2-b_col_200x200.tar", None,
                              "00470a104a57f5a5be22cc8a0f234c4e", None),), ""),
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
                     log: Callable[[str], None] = print) -> Path:
    """Fetch a dataset's release into data_dir, in the layout load_splits reads; returns data_dir.

    check_layout(folder) raises a utils.UserError unless folder holds the complete dataset
    (datasets.py passes its load_splits of fold 1).

    Files go to <data_dir>.download/ (a cut download resumes from its .part file with an HTTP
    Range request, here and on a re-run), are checked against the sizes and checksums above, and
    are unpacked into a temporary folder beside data_dir that is renamed to data_dir only once
    the layout check passes: a failure leaves no half-unpacked data_dir. base_url (or the
    TWISTNET_DOWNLOAD_BASE_URL environment variable) replaces the servers, for mirrors and tests.
    """
    if dataset not in DOWNLOADS:
        raise DownloadError(f"No download for {dataset!r}; downloadable: {', '.join(DOWNLOADS)}.")
    files, subdir = DOWNLOADS[dataset]
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise DownloadError(f"--data_dir {root} is a file; give the folder the dataset should go to.")
    if root.is_dir() and any(root.iterdir()):
        try:
            check_layout(root)
        except utils.UserError as error:
            raise DownloadError(f"{root} exists and is not a complete {dataset} ({error}). Remove it or choose "
                                "another --data_dir.") from None
        log(f"{dataset} is already in {root}")
        return root
    base_url = base_url or os.environ.get(DOWNLOAD_BASE_URL_ENV) or None
    store = root.parent / f"{root.name}.download"
    store.mkdir(parents=True, exist_ok=True)
    local = []
    for remote in files:
        path = store / remote.name
        if not path.is_file():
            url = f"{base_url.rstrip('/')}/{remote.name}" if base_url else remote.url
            fetch(url, path, remote.size, attempts, log)
        verify_download(path, remote, log)
        local.append(path)
    unpack_into_place(local, subdir, root, check_layout, log)
    if not keep_archives:
        shutil.rmtree(store)
    return root


def fetch(url: str, path: Path, size: int | None, attempts: int, log: Callable[[str], None]) -> None:
    """Download url to path through path.part, resuming the part file (HTTP Range) after a cut."""
    part = path.with_name(path.name + ".part")
    error: Exception | None = None
    for _ in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:
                    have = 0                                # the server ignored the range: start over
                length = response.headers.get("Content-Length")
                total = have + int(length) if length else size
                if have:
                    log(f"resuming {path.name} at {have} bytes")
                with open(part, "ab" if have else "wb") as out, \
                        utils.progress(total=total, initial=have, unit="B", unit_scale=True, desc=path.name) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
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
                      log: Callable[[str], None]) -> None:
    """Unpack the archives (and copy the other files) into a temporary folder, check the layout,
    then rename the release (or its subdir) to root."""
    root.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder becomes data_dir, so it gets the umask's mode, not 0700.
    temp = root.parent / f".{root.name}.unpack-{os.getpid()}-{os.urandom(4).hex()}"
    temp.mkdir()
    try:
        for path in files:
            if path.name.endswith(ARCHIVE_SUFFIXES):
                log(f"unpacking {path.name}")
                unpack_archive(path, temp)
            else:
                shutil.copy2(path, temp / path.name)
        release = temp / subdir
        check_layout(release)
        if root.is_dir():
            root.rmdir()                                    # empty (checked by the caller)
        release.replace(root)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def unpack_archive(path: Path, dest: Path) -> None:
    """Extract a tar/zip after checking that no member is absolute, climbs out with '..', or is a link."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                check_member(path, name)
            archive.extractall(dest)
        return
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            check_member(path, member.name, member.isfile() or member.isdir())
        # The data filter (Python >= 3.11.4) re-checks the same, where it exists.
        archive.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def check_member(archive: Path, name: str, regular: bool = True) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not regular or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DownloadError(f"{archive.name}: unsafe member {name!r} (absolute, '..', a link or a device); "
                            "refusing to unpack it.")
