"""Shared pytest setup: the repo root on sys.path, and tiny datasets in each official layout.

Tests marked `cuda` (tests/test_cuda.py) are skipped where torch sees no CUDA GPU; `pytest -m cuda`
runs only them (make gpu-check does).

Usage (in any test module under tests/):
    def test_something(dtd_root): ...            # read-only, built once per session
    def test_other(tmp_path):                     # a private copy to damage:
        from fixtures import make_dtd; root = make_dtd(tmp_path / "dtd")

The session-scoped datasets are shared by every test: treat them as read-only.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for _path in (str(ROOT), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import fixtures  # noqa: E402  (needs the path above)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts a process or trains more than a few steps; `make test-fast` leaves it out")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (make gpu-check runs them: pytest -m cuda); "
                                       "skipped where torch sees none")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none)")
    for item in items:
        # A module names its fixtures that train or start processes (SLOW_FIXTURES): every test
        # using one is slow too, or `make test-fast` would pay for the fixture anyway.
        if set(getattr(item.module, "SLOW_FIXTURES", ())) & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the test: CPU kernels stay bitwise repeatable (resumed runs compare
    with ==), and two threads on two shared cores do not spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dtd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_dtd(tmp_path_factory.mktemp("dtd"))


@pytest.fixture(scope="session")
def fmd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_fmd(tmp_path_factory.mktemp("fmd"))


@pytest.fixture(scope="session")
def kth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_kth_tips2(tmp_path_factory.mktemp("kth"))


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CUB_200_2011 folder itself (its parent is accepted too)."""
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"))


@pytest.fixture(scope="session")
def flowers_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_flowers(tmp_path_factory.mktemp("flowers"))


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_imagenet_folder(tmp_path_factory.mktemp("imagenet"))
