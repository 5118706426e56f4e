"""Consistency groups on real TCG guests: two VMs frozen at one instant, committed as
one point, and test-failed-over in a given boot order.

"One instant" is checked with libvirt's own lifecycle events: both domains must have
been suspended at the same time (the window in which every member's backup job
began); each disk of the point must hold an intact prefix of its guest's records,
and each recovered VM must announce exactly the records its disk had in the point.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import libvirt
import pytest

from tests.harness.guest import BOOT_MARKER, GuestImage
from tests.harness.libvirtd import traversable, wait_for_console
from tests.harness.lifecycle import Lifecycle, together
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    point_path,
    protection_spec,
    start_protection,
    sync_now,
    verify_point,
    wait_first_point,
    wait_phase,
)
from tests.harness.records import check_contiguous, read_records
from tests.harness.stack import Stack
from transcend import api
from transcend.api import CONTROL_TASK_QUEUE, BootTier, HealthCheck

pytestmark = [pytest.mark.guest]

BOOTED = rf"^{BOOT_MARKER} seq=(\d+)"


@pytest.mark.timeout(1500)
def test_group_is_frozen_at_one_instant_and_boots_in_order(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    with traversable(tmp_path):
        asyncio.run(_group(guest_image, stack, tmp_path))


async def _group(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    a, b = f"transcend-dr-ga-{os.getpid()}", f"transcend-dr-gb-{os.getpid()}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    events = Lifecycle({a, b})
    try:
        with booted_guest(guest_image, tmp_path / "a", a), \
                booted_guest(guest_image, tmp_path / "b", b):
            spec = protection_spec("grp", a, src, dst).model_copy(update={"workloads": [a, b]})
            replication = await start_protection(client, spec)
            st = await wait_first_point(replication)
            assert st.cycles_failed == 0, st.last_error
            await asyncio.sleep(3)
            st = await sync_now(replication)
            assert st.cycles_failed == 0, st.last_error

            # One point holds both VMs' disks, taken while both were suspended together.
            point = cat.get_point(st.last_point_id or "")
            assert point.kind.value == "incremental"
            assert sorted(d.disk for d in point.disks) == [f"{a}/vda", f"{b}/vda"]
            wa, wb = events.paused_windows(a), events.paused_windows(b)
            assert len(wa) >= 2 and len(wb) >= 2, (wa, wb)  # one pause per cycle
            assert together(wa[-1:], wb[-1:]), ("not paused together", wa, wb)
            seq = {vm: check_contiguous(read_records(point_path(point, f"{vm}/vda"))) for vm in (a, b)}
            assert all(n > 0 for n in seq.values()), seq
            assert (await verify_point(client, point.id)).ok

            # Test failover in the order b, then a: a boots only after b is healthy.
            health = HealthCheck(kind="console", pattern=BOOTED, timeout_seconds=240)
            handle = await client.start_workflow(
                api.TEST_FAILOVER_WORKFLOW,
                api.TestFailoverInput(protection="grp", point_id=point.id, keep_seconds=3600,
                                      name="grp-t", health=health,
                                      boot_order=[BootTier(vms=[b]), BootTier(vms=[a])]),
                id=api.test_failover_id("grp"), task_queue=CONTROL_TASK_QUEUE,
                result_type=api.TestFailoverStatus)
            running = await wait_phase(handle, api.TestFailoverStatus, {"running", "failed"}, 900)
            assert running.phase == "running", running
            assert [v.vm for v in running.vms] == [b, a]
            first, second = running.vms
            assert second.booted_at >= first.healthy_at
            for v in running.vms:
                m = wait_for_console(v.instance.console_log, BOOTED, 10)
                assert int(m.group(1)) == seq[v.vm], (v.vm, m.group(0), seq)
            await handle.signal("cleanup")
            await asyncio.wait_for(handle.result(), 300)
            conn = libvirt.open("qemu:///system")
            try:
                names = {d.name() for d in conn.listAllDomains(0)}
            finally:
                conn.close()
            assert not names & {"grp-t-" + a, "grp-t-" + b}, names
    finally:
        events.close()
