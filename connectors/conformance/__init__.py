"""The connector conformance suite, as a library: every Source and Target connector,
built in or a plugin's, must pass it (like rclone's ``fstest`` for its backends).

It checks the contracts of ``connectors/base.py`` through nothing but the contracts:
for sources, that a cycle's change set applied to the previous instant gives exactly
the new instant (a connector that misses a changed block fails, whatever its
mechanism), that a resync covers the whole disk, that a retried freeze returns the
same instant, and lookups; for targets, that a point holds exactly what was written
over its parent, that an aborted cycle leaves no trace and that deleting a point
keeps its successor's bytes; for both, that declared capabilities are implemented.

A plugin's author runs it from their own tests with their connector::

    import pytest
    from connectors.conformance import SOURCE_CHECKS, TARGET_CHECKS, check_capabilities

    @pytest.mark.parametrize("check", SOURCE_CHECKS, ids=lambda c: c.__name__)
    def test_my_source(check, my_vm_under_test, tmp_path):
        check(my_vm_under_test, tmp_path)   # a SourceUnderTest, see below

    @pytest.mark.parametrize("check", TARGET_CHECKS, ids=lambda c: c.__name__)
    def test_my_target(check, my_target, tmp_path):
        check(my_target, tmp_path)

A ``SourceUnderTest`` is the connector, one VM with one 32 MiB disk, and a way to
write to that disk as its guest would (so the platform's change tracking sees it).
The checks need ``qemu-img`` and ``qemu-io`` (they read exports and write stagings
over NBD). A failed check raises :class:`ConformanceError` saying what the contract
expected. docs/writing-a-connector.md walks through a new connector.
"""

from __future__ import annotations

from connectors.conformance.common import ConformanceError, SourceUnderTest, check_capabilities
from connectors.conformance.source_checks import SOURCE_CHECKS
from connectors.conformance.target_checks import TARGET_CHECKS

__all__ = ["SOURCE_CHECKS", "TARGET_CHECKS", "ConformanceError", "SourceUnderTest",
           "check_capabilities"]
