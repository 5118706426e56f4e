"""Shared pytest setup: the --long flag for soak runs.

Fixtures that start real components live in tests/harness/ and in the test
modules that need them; each starts what it needs, waits for readiness and
cleans up, including on failure.
"""

from __future__ import annotations

import pytest


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
