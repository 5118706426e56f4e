"""Shared pytest setup: the --long flag for soak runs.

Fixtures that start real components live in tests/harness/ and in the test
modules that need them; each starts what it needs, waits for readiness and
cleans up, including on failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import libguestfs
from tests.harness.guest import GuestImage, build_guest
from tests.harness.libvirtd import ensure_libvirtd
from tests.harness.stack import Stack, transcend_stack
from tests.harness.vcsim import VcSim, vcsim_session

libguestfs.apply()  # workers the tests start inherit it (guest preparation: re-IP, conversion)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", default=False,
        help="also run the long soak tests (many kill -9 runs, large disks)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long soak test: run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """libvirtd running and the test guest built (cached across runs)."""
    ensure_libvirtd()
    return build_guest()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A private dev server + worker process + catalog; the worker log is printed when
    the test fails."""
    with transcend_stack(tmp_path / "home") as s:
        try:
            yield s
        except BaseException:
            print(s.worker_log_tail())
            raise


@pytest.fixture(scope="module")
def vsphere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VcSim, Any]]:
    """The vCenter simulator and a pyVmomi session, one per test module."""
    with vcsim_session(tmp_path_factory.mktemp("vcsim")) as pair:
        yield pair


@pytest.fixture(scope="module")
def sim(vsphere: tuple[VcSim, Any]) -> VcSim:
    return vsphere[0]


@pytest.fixture(scope="module")
def si(vsphere: tuple[VcSim, Any]) -> Any:
    return vsphere[1]
