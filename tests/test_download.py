"""datasets.py --download against a loopback HTTP server serving fixture releases in the official
archive formats: end to end, a cut download that resumes, a checksum or size mismatch, unsafe
archive members, and the layout each release is unpacked into. Nothing here reaches the internet.

    .venv/bin/python -m pytest -q tests/test_download.py
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import datasets
from helpers import download
import fixtures
from helpers import utils

ROOT = Path(__file__).resolve().parents[1]


class ReleaseServer:
    """Serves {name: bytes} on 127.0.0.1 with HTTP Range support; records (name, Range header) of
    each GET; `cut_after[name] = n` makes the next GET of name send n body bytes and hang up;
    `trickle[name] = s` sends name one byte every s seconds (at most 200 bytes, then hangs up);
    names in `no_length` are sent without a Content-Length (the end is the connection's close)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests, self.cut_after = dict(files), [], {}
        self.trickle: dict[str, float] = {}
        self.no_length: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = int(self.headers["Range"][len("bytes="):].rstrip("-")) if self.headers.get("Range") else 0
                if start >= len(data) and start:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if name not in server.no_length:
                    self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.close_connection = True
                if name in server.trickle:
                    self.send_slowly(data[start:start + 200], server.trickle[name])
                    return
                cut = server.cut_after.pop(name, None)
                with contextlib.suppress(ConnectionError):   # a client that stopped reading
                    self.wfile.write(data[start:start + cut] if cut is not None else data[start:])

            def send_slowly(self, data: bytes, pause_s: float) -> None:
                for i in range(len(data)):
                    try:
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                    except ConnectionError:
                        return
                    time.sleep(pause_s)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def download_checked(dataset: str, data_dir: Path, **options) -> Path:
    """download_dataset with the layout check `datasets.py --download` passes."""
    return download.download_dataset(dataset, data_dir, lambda root: datasets.load_splits(dataset, root, 1),
                                     **options)


def tar_bytes(entries: dict[str, Path | bytes], mode: str = "w:gz") -> bytes:
    """A tar archive of {archive name: folder, file or bytes}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, source in entries.items():
            if isinstance(source, bytes):
                info = tarfile.TarInfo(name)
                info.size = len(source)
                archive.addfile(info, io.BytesIO(source))
            else:
                archive.add(source, arcname=name)
    return buffer.getvalue()


def zip_bytes(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Each dataset's release files in the official formats, by file name (as the official URLs end)."""
    src = tmp_path_factory.mktemp("releases")
    dtd = fixtures.make_dtd(src / "dtd", per_class=3)
    fmd = fixtures.make_fmd(src / "fmd" / "release", per_class=10)
    for image in (fmd / "image").rglob("*.jpg"):       # FMD.zip holds image/ and mask/ side by side
        fixtures.write_image(fmd / "mask" / image.relative_to(fmd / "image"), 0, 0, size=16)
    kth = fixtures.make_kth_tips2(src / "kth" / "KTH-TIPS2-b", per_sample=2)
    cub = fixtures.make_cub(src / "cub", train_per_class=3, test_per_class=2)
    flowers = fixtures.make_flowers(src / "flowers", per_class=6)
    return {
        "dtd": {"dtd-r1.0.1.tar.gz": tar_bytes({"dtd": dtd})},
        "fmd": {"FMD.zip": zip_bytes(fmd)},
        "kth_tips2": {"kth-tips2-b_col_200x200.tar": tar_bytes({"KTH-TIPS2-b": kth}, mode="w")},
        "cub200": {"CUB_200_2011.tgz": tar_bytes({"CUB_200_2011": cub, "attributes.txt": b"1 has_bill_shape::dagger\n"})},
        "flowers102": {"102flowers.tgz": tar_bytes({"jpg": flowers / "jpg"}),
                       "imagelabels.mat": (flowers / "imagelabels.mat").read_bytes(),
                       "setid.mat": (flowers / "setid.mat").read_bytes()},
    }


@pytest.fixture
def server(releases: dict) -> ReleaseServer:
    running = ReleaseServer({name: data for files in releases.values() for name, data in files.items()})
    yield running
    running.close()


def pin_release(monkeypatch: pytest.MonkeyPatch, dataset: str, files: dict[str, bytes], **override) -> None:
    """Point the download table at the fixture files: the official names, their sizes and digests."""
    official, subdir = download.DOWNLOADS[dataset]
    pinned = []
    for remote in official:
        data = files[remote.name]
        values = dict(size=len(data), md5=hashlib.md5(data).hexdigest(), sha256=hashlib.sha256(data).hexdigest())
        values.update(override)
        pinned.append(download.RemoteFile(remote.url, **values))
    monkeypatch.setitem(download.DOWNLOADS, dataset, (tuple(pinned), subdir))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".unpack-" in p.name)


def test_dtd_end_to_end(server: ReleaseServer, releases: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    pin_release(monkeypatch, "dtd", releases["dtd"])
    target = tmp_path / "data" / "dtd"
    assert datasets.main(["--download", "dtd", "--data_dir", str(target), "--base_url", server.url]) == 0
    out = capsys.readouterr().out
    assert "dtd-r1.0.1.tar.gz: verified" in out and "3 classes" in out
    assert sorted(p.name for p in target.iterdir()) == ["images", "labels"]
    splits = datasets.load_splits("dtd", target, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 3, 3)
    assert server.requests == [("dtd-r1.0.1.tar.gz", None)]
    assert not (tmp_path / "data" / "dtd.download").exists() and not leftovers(tmp_path / "data")
    # A second run finds the dataset in place and fetches nothing.
    assert datasets.main(["--download", "dtd", "--data_dir", str(target), "--base_url", server.url]) == 0
    assert "already in" in capsys.readouterr().out and len(server.requests) == 1


def test_cut_download_resumes_with_a_range_request(server: ReleaseServer, releases: dict, tmp_path: Path,
                                                  monkeypatch, capsys) -> None:
    pin_release(monkeypatch, "dtd", releases["dtd"])
    server.cut_after["dtd-r1.0.1.tar.gz"] = 1000
    target = tmp_path / "dtd"
    download_checked("dtd", target, base_url=server.url)
    assert server.requests == [("dtd-r1.0.1.tar.gz", None), ("dtd-r1.0.1.tar.gz", "bytes=1000-")]
    assert "resuming dtd-r1.0.1.tar.gz at 1000 bytes" in capsys.readouterr().out
    datasets.load_splits("dtd", target, 1)


def test_part_file_of_an_earlier_run_resumes(server: ReleaseServer, releases: dict, tmp_path: Path,
                                             monkeypatch) -> None:
    data = releases["dtd"]["dtd-r1.0.1.tar.gz"]
    pin_release(monkeypatch, "dtd", releases["dtd"])
    monkeypatch.setenv(download.DOWNLOAD_BASE_URL_ENV, server.url)   # the environment variable works too
    (tmp_path / "dtd.download").mkdir()
    (tmp_path / "dtd.download" / "dtd-r1.0.1.tar.gz.part").write_bytes(data[:5000])
    download_checked("dtd", tmp_path / "dtd", keep_archives=True)
    assert server.requests == [("dtd-r1.0.1.tar.gz", "bytes=5000-")]
    assert (tmp_path / "dtd.download" / "dtd-r1.0.1.tar.gz").read_bytes() == data
    datasets.load_splits("dtd", tmp_path / "dtd", 1)


@pytest.mark.parametrize("field", ["md5", "size"])
def test_mismatch_is_a_clear_error_and_leaves_nothing(server: ReleaseServer, releases: dict, tmp_path: Path,
                                                     monkeypatch, capsys, field: str) -> None:
    data = releases["dtd"]["dtd-r1.0.1.tar.gz"]
    wrong = {"md5": "0" * 32, "size": len(data) + 1}[field]
    pin_release(monkeypatch, "dtd", releases["dtd"], **{field: wrong})
    target = tmp_path / "dtd"
    assert utils.run_main(datasets.main, ["--download", "dtd", "--data_dir", str(target), "--base_url", server.url]) == 2
    err = capsys.readouterr().err.strip().splitlines()          # the progress bar, then the error
    got = hashlib.md5(data).hexdigest() if field == "md5" else len(data)
    assert err[-1].startswith("error: dtd-r1.0.1.tar.gz does not match its release")
    assert f"{field}: expected {wrong}, got {got}" in err[-1] and sum("error" in line for line in err) == 1
    assert not target.exists() and not leftovers(tmp_path)
    assert not (tmp_path / "dtd.download" / "dtd-r1.0.1.tar.gz").exists()   # deleted: the next run refetches


@pytest.mark.slow
def test_cli_exit_status_against_the_official_table(server: ReleaseServer, tmp_path: Path) -> None:
    """The real table (no pinning): a fixture is not the official DTD, so its size is wrong."""
    env = {**os.environ, download.DOWNLOAD_BASE_URL_ENV: server.url}
    proc = subprocess.run([sys.executable, str(ROOT / "datasets.py"), "--download", "dtd", "--data_dir",
                           str(tmp_path / "dtd")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: dtd-r1.0.1.tar.gz does not match its release (size: expected 625239812, got ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "dtd").exists()


def test_missing_file_on_the_server(server: ReleaseServer, tmp_path: Path) -> None:
    del server.files["FMD.zip"]
    with pytest.raises(download.DownloadError, match=r"FMD.zip: HTTP 404"):
        download_checked("fmd", tmp_path / "fmd", base_url=server.url)


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt"])
def test_unsafe_archive_member_is_refused(server: ReleaseServer, releases: dict, tmp_path: Path, monkeypatch,
                                          member: str) -> None:
    bad = tar_bytes({member: b"owned", "dtd/labels/train1.txt": b"x/y.jpg\n"})
    server.files["dtd-r1.0.1.tar.gz"] = bad
    pin_release(monkeypatch, "dtd", {"dtd-r1.0.1.tar.gz": bad})
    with pytest.raises(download.DownloadError, match="unsafe member"):
        download_checked("dtd", tmp_path / "data" / "dtd", base_url=server.url)
    assert not (tmp_path / "data" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "data" / "dtd").exists() and not leftovers(tmp_path / "data")


def test_wrong_layout_is_not_renamed_into_place(server: ReleaseServer, releases: dict, tmp_path: Path,
                                                monkeypatch) -> None:
    """An archive that verifies but lacks labels/: the layout check fails before the rename."""
    bad = tar_bytes({"dtd/images/banded/banded_0001.jpg": b"jpeg"})
    server.files["dtd-r1.0.1.tar.gz"] = bad
    pin_release(monkeypatch, "dtd", {"dtd-r1.0.1.tar.gz": bad})
    with pytest.raises(datasets.DataNotFoundError, match="labels"):
        download_checked("dtd", tmp_path / "dtd", base_url=server.url)
    assert not (tmp_path / "dtd").exists() and not leftovers(tmp_path)


def test_existing_folder_with_other_content_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "notes.txt").write_text("mine")
    with pytest.raises(download.DownloadError, match="exists and is not a complete dtd"):
        download_checked("dtd", tmp_path / "dtd", base_url="http://127.0.0.1:9")
    assert (tmp_path / "dtd" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("dataset, expected", [
    ("fmd", ["image", "mask"]),
    ("kth_tips2", ["KTH-TIPS2-b"]),
    ("cub200", ["CUB_200_2011", "attributes.txt"]),
    ("flowers102", ["imagelabels.mat", "jpg", "setid.mat"]),
])
def test_other_releases_unpack_into_the_layout_the_loader_reads(server: ReleaseServer, releases: dict,
                                                                tmp_path: Path, monkeypatch, dataset: str,
                                                                expected: list[str]) -> None:
    pin_release(monkeypatch, dataset, releases[dataset])
    target = download_checked(dataset, tmp_path / dataset, base_url=server.url)
    assert sorted(p.name for p in target.iterdir()) == expected
    splits = datasets.load_splits(dataset, target, 1)
    assert splits.train and splits.test
    assert sorted(name for name, _ in server.requests) == sorted(releases[dataset])


def test_official_table() -> None:
    names = {dataset: [f.name for f in files] for dataset, (files, _) in download.DOWNLOADS.items()}
    assert names == {"dtd": ["dtd-r1.0.1.tar.gz"], "fmd": ["FMD.zip"], "kth_tips2": ["kth-tips2-b_col_200x200.tar"],
                     "cub200": ["CUB_200_2011.tgz"], "flowers102": ["102flowers.tgz", "imagelabels.mat", "setid.mat"]}
    for files, _ in download.DOWNLOADS.values():
        for remote in files:
            assert remote.url.startswith("https://")
            assert remote.md5 is not None and len(remote.md5) == 32 and int(remote.md5, 16) >= 0
            assert remote.sha256 is None or len(remote.sha256) == 64


# --------------------------------------------------------------------------------------------
# Bounded downloads, links, full disks and clashing members
# --------------------------------------------------------------------------------------------
def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def serve_fmd(server: ReleaseServer, monkeypatch: pytest.MonkeyPatch, data: bytes, **override) -> None:
    server.files["FMD.zip"] = data
    pin_release(monkeypatch, "fmd", {"FMD.zip": data}, **override)


@pytest.mark.parametrize("dangling", [False, True])
def test_a_linked_data_dir_gets_the_dataset_in_its_target_and_a_rerun_fetches_nothing(
        server: ReleaseServer, releases: dict, tmp_path: Path, monkeypatch, capsys, dangling: bool) -> None:
    pin_release(monkeypatch, "fmd", releases["fmd"])
    target, link = tmp_path / "disk" / "fmd", tmp_path / "data" / "fmd"
    (target if not dangling else target.parent).mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(target)
    command = ["--download", "fmd", "--data_dir", str(link), "--base_url", server.url]
    assert utils.run_main(datasets.main, command) == 0, capsys.readouterr().err
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["image", "mask"]
    assert f"is a link to {target}" in capsys.readouterr().out
    assert not leftovers(tmp_path / "data") and not leftovers(tmp_path / "disk")
    assert utils.run_main(datasets.main, command) == 0
    assert "already in" in capsys.readouterr().out and len(server.requests) == 1   # nothing fetched again


def test_a_full_disk_while_unpacking_is_one_line_naming_the_folder_and_the_space(
        server: ReleaseServer, tmp_path: Path, monkeypatch, capsys) -> None:
    """Under a file-size limit (RLIMIT_FSIZE, as `ulimit -f`): the archive (~1 MB) fits, its 2 MB
    member does not. Python ignores SIGXFSZ, so the write fails with EFBIG."""
    member = os.urandom(1 << 20).hex().encode()          # 2 MB of hex digits: deflates to about half
    serve_fmd(server, monkeypatch, zip_of({"image/big.bin": member}))
    target = tmp_path / "data" / "fmd"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 19, hard))   # 1.5 MB
    try:
        code = utils.run_main(datasets.main, ["--download", "fmd", "--data_dir", str(target), "--base_url", server.url])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1
    assert last.startswith(f"error: cannot unpack the release into {tmp_path / 'data'}: the file-size limit"), last
    assert "needs about 2 MB there" in last
    assert not target.exists() and not leftovers(tmp_path / "data")
    assert (tmp_path / "data" / "fmd.download" / "FMD.zip").exists()   # kept: a re-run unpacks without a download


def test_too_little_free_space_is_refused_before_unpacking(tmp_path: Path, monkeypatch) -> None:
    archive = tmp_path / "FMD.zip"
    archive.write_bytes(zip_of({"image/a.bin": os.urandom(4096)}))
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(download.DownloadError, match=r"needs about 0 MB there and 0 MB are free"):
        download.unpack_into_place([archive], "", tmp_path / "fmd", lambda root: None, print)
    assert not leftovers(tmp_path) and not (tmp_path / "fmd").exists()


def test_a_trickling_server_meets_the_deadline(server: ReleaseServer, releases: dict, tmp_path: Path,
                                               monkeypatch) -> None:
    """One byte every 0.2 s never trips a socket timeout; the overall deadline (1 s here) stops it."""
    pin_release(monkeypatch, "fmd", releases["fmd"])
    server.trickle["FMD.zip"] = 0.2
    start = time.monotonic()
    with pytest.raises(download.DownloadError, match=r"did not finish within 0.0166667 min .*Run the same command"):
        download_checked("fmd", tmp_path / "fmd", base_url=server.url, deadline_s=1.0)
    assert time.monotonic() - start < 5
    part = tmp_path / "fmd.download" / "FMD.zip.part"
    assert 0 < part.stat().st_size < 20   # kept for a resume
    assert not (tmp_path / "fmd").exists()


@pytest.mark.parametrize("announced", [True, False])
def test_a_download_larger_than_its_file_can_be_is_stopped(server: ReleaseServer, tmp_path: Path, monkeypatch,
                                                           announced: bool) -> None:
    """FMD has no published size, so its bound caps it (here 64 kB for a 300 kB answer); with a
    Content-Length the answer is refused before its body, without one it is cut at the bound."""
    serve_fmd(server, monkeypatch, os.urandom(300_000), size=None, size_bound=64_000)
    if not announced:
        server.no_length.add("FMD.zip")
    with pytest.raises(download.DownloadError, match=r"is more than 64000 bytes .*not the dataset"):
        download_checked("fmd", tmp_path / "fmd", base_url=server.url)
    assert not any((tmp_path / "fmd.download").iterdir())   # the part file is deleted
    assert download.RemoteFile("u", 100 * download.MB, None, None).max_bytes == 106 * download.MB


def test_a_zip_bomb_is_refused_before_anything_is_written(server: ReleaseServer, tmp_path: Path,
                                                          monkeypatch) -> None:
    bomb = zip_of({"image/zeros.bin": bytes(50 * download.MB)})   # about 50 kB
    serve_fmd(server, monkeypatch, bomb)
    with pytest.raises(download.DownloadError, match=r"would unpack to 50.0 MB, more than 10 times"):
        download_checked("fmd", tmp_path / "data" / "fmd", base_url=server.url)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["fmd.download"]


@pytest.mark.parametrize("entries", [{"escape": b"file", "escape/x": b"inside"},
                                     {"escape/x": b"inside", "escape": b"file"},
                                     {"escape/": b"", "escape": b"file"}])
def test_a_member_that_is_both_file_and_folder_is_unsafe(server: ReleaseServer, tmp_path: Path, monkeypatch,
                                                          capsys, entries: dict) -> None:
    serve_fmd(server, monkeypatch, zip_of(entries))
    target = tmp_path / "data" / "fmd"
    code = utils.run_main(datasets.main, ["--download", "fmd", "--data_dir", str(target), "--base_url", server.url])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: FMD.zip: unsafe member 'escape' (both a file and a folder")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["fmd.download"]   # nothing unpacked


def test_download_timeout_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        datasets.main(["--download", "fmd", "--data_dir", "x", "--download_timeout", "0"])
    assert exit_info.value.code == 2 and "--download_timeout 0: minutes, more than 0" in capsys.readouterr().err
