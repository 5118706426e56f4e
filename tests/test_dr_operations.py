"""DR operations on real TCG guests and a real dev server: test failover.

A test failover boots a point as a throw-away VM in an isolated network, proves it
healthy on its serial console, records the RTO on the protection, lets replication go
on, and on cleanup leaves nothing behind (domain, overlays, network). The worker is
killed with -9 in the middle of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import WorkflowAlreadyStartedError

from connectors.kvm.domain import isolated_network_xml
from tests.harness.guest import BOOT_MARKER, GuestImage
from tests.harness.libvirtd import traversable, wait_for_console
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    failure_text,
    point_path,
    protection_spec,
    start_protection,
    status,
    sync_now,
    verify_point,
    wait_first_point,
)
from tests.harness.records import check_contiguous, read_records
from tests.harness.stack import Stack

# Names starting with Test/test_ are used through the module so pytest does not collect them.
from transcend import api
from transcend.api import CONTROL_TASK_QUEUE, TEST_FAILOVER_WORKFLOW, HealthCheck

pytestmark = [pytest.mark.guest]

BOOT_TIMEOUT = 180
ISOLATED = "transcend-isolated"




def _exists(kind: str, name: str) -> bool:
    """Whether libvirt has a domain (kind "domain") or network (kind "network") of that name."""
    conn = libvirt.open("qemu:///system")
    try:
        (conn.lookupByName if kind == "domain" else conn.networkLookupByName)(name)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def _source_network(name: str) -> Iterator[str]:
    """A transient isolated libvirt network for the source guest's NIC, so the recovered
    VM has a NIC to place on transcend's isolated network. The isolated network must not
    exist beforehand (left by an earlier run), or the test could not see it created."""
    conn = libvirt.open("qemu:///system")
    try:
        if not _network_users(ISOLATED):
            with contextlib.suppress(libvirt.libvirtError):
                old = conn.networkLookupByName(ISOLATED)
                if old.isActive():
                    old.destroy()
                old.undefine()
        net = conn.networkCreateXML(isolated_network_xml(name))
        try:
            yield name
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                net.destroy()
    finally:
        conn.close()


def _network_users(network: str) -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains(0)
                if f"network='{network}'" in d.XMLDesc(0)]
    finally:
        conn.close()


async def _wait_phase(handle: WorkflowHandle[object, object], phases: set[str],
                      timeout: float) -> api.TestFailoverStatus:
    deadline = time.monotonic() + timeout
    last: api.TestFailoverStatus | None = None
    while time.monotonic() < deadline:
        try:
            last = await handle.query("progress", result_type=api.TestFailoverStatus)
        except Exception:
            last = None
        if last is not None and last.phase in phases:
            return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"test failover not in {phases} after {timeout:.0f}s: {last}")


@pytest.mark.timeout(1200)
def test_test_failover_boots_measures_rto_survives_kill_and_cleans_up(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    with traversable(tmp_path):
        asyncio.run(_test_failover(guest_image, stack, tmp_path))


async def _test_failover(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    vm = f"transcend-dr-{os.getpid()}"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    with _source_network(f"transcend-dr-src-{os.getpid() % 10000}") as src_net, \
            booted_guest(guest_image, tmp_path, vm, network=src_net):
        replication = await start_protection(client, protection_spec("dr", vm, src, dst))
        st = await wait_first_point(replication)
        assert st.cycles_failed == 0, st.last_error
        await asyncio.sleep(2)
        st = await sync_now(replication)
        point = cat.get_point(st.last_point_id or "")
        expected = check_contiguous(read_records(point_path(point)))

        # Wrong input is refused before anything boots.
        with pytest.raises(WorkflowFailureError) as bad:
            await client.execute_workflow(
                TEST_FAILOVER_WORKFLOW, api.TestFailoverInput(protection="dr", point_id="no-such-point"),
                id="test-failover/bad", task_queue=CONTROL_TASK_QUEUE)
        assert "no-such-point" in failure_text(bad.value)

        test_vm = f"{vm}-test"
        handle = await client.start_workflow(
            TEST_FAILOVER_WORKFLOW,
            api.TestFailoverInput(protection="dr", point_id=point.id, name=test_vm, keep_seconds=3600,
                              health=HealthCheck(kind="console", pattern=rf"^{BOOT_MARKER} seq=\d+",
                                                 timeout_seconds=BOOT_TIMEOUT)),
            id=api.test_failover_id("dr"), task_queue=CONTROL_TASK_QUEUE,
        )
        # Only one test failover of a protection at a time.
        with pytest.raises(WorkflowAlreadyStartedError):
            await client.start_workflow(TEST_FAILOVER_WORKFLOW, api.TestFailoverInput(protection="dr"),
                                        id=api.test_failover_id("dr"), task_queue=CONTROL_TASK_QUEUE)

        # kill -9 the worker while the VM boots or is health-checked: the workflow goes on.
        await _wait_phase(handle, {"booting", "health-check"}, 120)
        stack.kill_workers()
        stack.start_worker()
        running = await _wait_phase(handle, {"running", "failed"}, 600)
        assert running.phase == "running", running
        assert running.rto_seconds is not None and running.rto_seconds > 0
        assert running.instance is not None and _exists("domain", test_vm)
        # The recovered VM found exactly the records of the point it was booted from.
        m = wait_for_console(running.instance.console_log, rf"^{BOOT_MARKER} seq=(\d+)", 10)
        assert int(m.group(1)) == expected
        assert _exists("network", ISOLATED), "the test VM's NIC must be on the isolated network"
        assert test_vm in _network_users(ISOLATED)

        # Replication keeps committing while the test VM runs; the RTO is on the protection.
        before = await status(replication)
        after = await sync_now(replication)
        assert after.cycles_ok == before.cycles_ok + 1, after.last_error
        assert after.last_test_failover is not None and after.last_test_failover.ok
        assert after.last_test_failover.rto_seconds == running.rto_seconds
        assert after.last_test_failover.point_id == point.id

        # Cleanup removes every artefact; the point used was never written.
        await handle.signal("cleanup")
        done = await asyncio.wait_for(handle.result(), 300)
        assert isinstance(done, dict) or done is not None
        assert not _exists("domain", test_vm)
        assert not any(p.exists() for p in (tmp_path / "replicas" / "dr" / ".boot").glob("*"))
        # The isolated network goes with its last user (another test VM on this host,
        # say the demo's, keeps it).
        assert not _exists("network", ISOLATED) or _network_users(ISOLATED), "isolated network left"
        assert (await verify_point(client, point.id)).ok
