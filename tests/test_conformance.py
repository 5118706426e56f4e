"""The connector conformance suite (connectors/conformance/, a library a plugin's
author runs too) against every built-in connector: each check once per platform in
tests/harness/conformance.py, through nothing but the contract.

For sources the central property is the one replication depends on: applying a
cycle's change set, read from its export, onto the previous instant gives exactly
the new instant. For targets: a point holds exactly what was written on top of the
previous one, an aborted cycle leaves no trace, and deleting a point leaves its
successor's bytes unchanged. Declared capabilities are implemented."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectors.base import Target
from connectors.conformance import SOURCE_CHECKS, TARGET_CHECKS, ConformanceError, SourceUnderTest
from connectors.conformance.common import check_capabilities
from tests.harness.conformance import SOURCES, TARGETS
from tests.harness.libvirtd import ensure_libvirtd
from transcend.models import Capabilities


@pytest.fixture(scope="module", params=sorted(SOURCES))
def sut(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[SourceUnderTest]:
    """One VM per platform for the module; each check is its own protection."""
    if request.param == "kvm":
        ensure_libvirtd()
    with SOURCES[request.param](tmp_path_factory.mktemp(request.param)) as s:
        yield s


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with TARGETS[request.param](tmp_path_factory.mktemp(f"t-{request.param}")) as t:
        yield t


@pytest.mark.parametrize("check", SOURCE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_source(check: Callable[[SourceUnderTest, Path], None], sut: SourceUnderTest,
                tmp_path: Path) -> None:
    check(sut, tmp_path)


@pytest.mark.parametrize("check", TARGET_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_target(check: Callable[[Target, Path], None], target: Target, tmp_path: Path) -> None:
    check(target, tmp_path)


def test_a_capability_declared_but_not_implemented_fails() -> None:
    """The capability check can fail: power declared, PowerControl missing."""

    class Liar:
        capabilities = Capabilities(power=True)

    with pytest.raises(ConformanceError, match="declares power but does not implement PowerControl"):
        check_capabilities(Liar())  # type: ignore[arg-type]
