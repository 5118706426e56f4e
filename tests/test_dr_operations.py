"""DR operations on real TCG guests and a real dev server: test failover.

A test failover boots a point as a throw-away VM in an isolated network, proves it
healthy on its serial console, records the RTO on the protection, lets replication go
on, and on cleanup leaves nothing behind (domain, overlays, network). The worker is
killed with -9 in the middle of it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import libvirt
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import WorkflowAlreadyStartedError

from tests.harness.guest import BOOT_MARKER, GuestImage
from tests.harness.libvirtd import traversable, wait_for_console
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    failure_text,
    network_users,
    point_path,
    protection_spec,
    source_network,
    start_protection,
    status,
    sync_now,
    verify_point,
    wait_first_point,
    wait_phase,
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
    with source_network(f"transcend-dr-src-{os.getpid() % 10000}") as src_net, \
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
        await wait_phase(handle, api.TestFailoverStatus, {"booting", "health-check"}, 120)
        stack.kill_workers()
        stack.start_worker()
        running = await wait_phase(handle, api.TestFailoverStatus, {"running", "failed"}, 600)
        assert running.phase == "running", running
        assert running.rto_seconds is not None and running.rto_seconds > 0
        assert running.instance is not None and _exists("domain", test_vm)
        # The recovered VM found exactly the records of the point it was booted from.
        m = wait_for_console(running.instance.console_log, rf"^{BOOT_MARKER} seq=(\d+)", 10)
        assert int(m.group(1)) == expected
        assert _exists("network", ISOLATED), "the test VM's NIC must be on the isolated network"
        assert test_vm in network_users(ISOLATED)

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
        assert not _exists("network", ISOLATED) or network_users(ISOLATED), "isolated network left"
        assert (await verify_point(client, point.id)).ok


def test_a_failed_over_disk_rounded_up_by_its_platform_fails_back_to_the_original_size() -> None:
    """EBS rounds a 32 MiB disk up to 1 GiB: failback writes the original's 32 MiB when
    nothing lies beyond them, and refuses (saying what to do) when something does."""
    from activities.failback import fit_to_original
    from connectors.base import PermanentError

    mib, gib = 1 << 20, 1 << 30
    alloc = [(0, 2 * mib, 0), (2 * mib, gib - 2 * mib, 3)]
    dirty = [(mib, 2 * mib, 1)]
    a, d, size = fit_to_original(alloc, dirty, gib, 32 * mib, "vda")
    assert size == 32 * mib and a == [(0, 2 * mib, 0), (2 * mib, 30 * mib, 3)] and d == dirty
    with pytest.raises(PermanentError, match="holds data beyond the original's 33554432 bytes"):
        fit_to_original([(0, mib, 0), (40 * mib, mib, 0)], None, gib, 32 * mib, "vda")
    with pytest.raises(PermanentError, match="is 33554432 bytes, the original 1073741824"):
        fit_to_original(alloc, None, 32 * mib, gib, "vda")
