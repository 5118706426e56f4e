"""Migration and failback of a consistency group on real TCG guests and a real dev server.

Two guests append numbered records to their disks. A group migration must:

* refuse a boot order that does not name each VM exactly once, changing nothing;
* shut the sources down in the reverse of the boot order (libvirt's own stop events);
* copy both shut-off VMs in one final group point;
* boot them in the boot order, the second tier only after the first passed its
  health check, each announcing exactly the last record its source wrote (lossless);

and the group failback must bring both home, each original disk ending byte-identical
to its failed-over VM's, with the worker killed -9 in the middle of both operations.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import libvirt
import pytest

from tests.harness.dr import domain_active, refused, remove_domain, result_despite_kill
from tests.harness.guest import BOOT_MARKER, GuestImage
from tests.harness.libvirtd import traversable, wait_for_console
from tests.harness.lifecycle import Lifecycle
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    images_identical,
    point_path,
    protection_spec,
    start_protection,
    wait_first_point,
)
from tests.harness.records import check_contiguous, read_records
from tests.harness.stack import Stack
from transcend import api
from transcend.api import CONTROL_TASK_QUEUE, BootTier, HealthCheck
from transcend.models import ProtectionState

pytestmark = [pytest.mark.guest]

BOOTED = rf"^{BOOT_MARKER} seq=(\d+)"


@pytest.mark.timeout(2400)
def test_group_migrates_in_boot_order_losslessly_and_fails_back(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    a, b = f"transcend-gdr-a-{os.getpid()}", f"transcend-gdr-b-{os.getpid()}"
    try:
        with traversable(tmp_path):
            asyncio.run(_group_dr(guest_image, stack, tmp_path, a, b))
    finally:
        for vm in (a, b):
            remove_domain(f"{vm}-dr")


async def _group_dr(guest_image: GuestImage, stack: Stack, tmp_path: Path, a: str, b: str) -> None:
    p = "gdr"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    events = Lifecycle({a, b})
    try:
        with booted_guest(guest_image, tmp_path / "a", a) as (dom_a, disk_a), \
                booted_guest(guest_image, tmp_path / "b", b) as (dom_b, disk_b):
            spec = protection_spec(p, a, src, dst).model_copy(update={"workloads": [a, b]})
            replication = await start_protection(client, spec)
            st = await wait_first_point(replication)
            assert st.cycles_failed == 0, st.last_error

            # A boot order that misses a VM and names an unknown one: refused, unchanged.
            text = await refused(client, api.MIGRATION_WORKFLOW, api.FailoverInput(
                protection=p, boot_order=[BootTier(vms=[a]), BootTier(vms=["nope"])]),
                api.failover_id(p))
            assert "exactly once" in text and "nope" in text and b in text, text
            assert cat.get_protection(p).state == ProtectionState.PROTECTING
            assert dom_a.isActive() and dom_b.isActive()

            # Migration: b first, then a; the worker dies in the middle.
            health = HealthCheck(kind="console", pattern=BOOTED, timeout_seconds=240)
            t0 = time.monotonic()
            mig = await client.start_workflow(
                api.MIGRATION_WORKFLOW,
                api.FailoverInput(protection=p, health=health,
                                  boot_order=[BootTier(vms=[b]), BootTier(vms=[a])]),
                id=api.failover_id(p), task_queue=CONTROL_TASK_QUEUE,
                result_type=api.FailoverStatus)
            done = await result_despite_kill(stack, mig, api.FailoverStatus,
                                             {"final-cycle", "booting", "health-check"})
            assert done.phase == "done", done
            assert done.final_cycle.startswith("committed"), done.final_cycle

            # Sources stopped in the reverse of the boot order (a's tier is the last).
            stop_a = events.first(a, libvirt.VIR_DOMAIN_EVENT_STOPPED, after=t0)
            stop_b = events.first(b, libvirt.VIR_DOMAIN_EVENT_STOPPED, after=t0)
            assert stop_a is not None and stop_b is not None, events.events
            assert stop_a < stop_b, (stop_a, stop_b)
            assert not dom_a.isActive() and not dom_b.isActive()

            # Booted in the boot order: a only after b passed its health check.
            assert [v.vm for v in done.vms] == [b, a], done.vms
            assert done.vms[1].booted_at >= done.vms[0].healthy_at, done.vms
            assert done.rto_seconds is not None and done.rto_seconds > 0

            # One point holds both shut-off VMs; each migrated guest continues exactly
            # after the last record its source wrote.
            point = cat.get_point(done.point_id or "")
            assert sorted(d.disk for d in point.disks) == [f"{a}/vda", f"{b}/vda"]
            for vm, disk in ((a, disk_a), (b, disk_b)):
                last = check_contiguous(read_records(disk))
                assert last > 0
                assert check_contiguous(read_records(point_path(point, f"{vm}/vda"))) == last
                instance = next(v.instance for v in done.vms if v.vm == vm)
                m = wait_for_console(instance.console_log, BOOTED, 10)
                assert int(m.group(1)) == last, (vm, m.group(0), last)

            record = api.FailoverRecord.model_validate_json(cat.get_dr_record(p) or "")
            assert [v.vm for v in record.vms] == [b, a]
            assert {v.instance.name for v in record.vms} == {f"{a}-dr", f"{b}-dr"}
            assert cat.get_protection(p).state == ProtectionState.FAILED_OVER
            text = await refused(client, api.FAILOVER_WORKFLOW, api.FailoverInput(protection=p),
                                 api.failover_id(p))
            assert "already runs at the target" in text, text

            # Production runs at the target a while, then the group comes home.
            await asyncio.sleep(10)
            fb = await client.start_workflow(
                api.FAILBACK_WORKFLOW,
                api.FailbackInput(protection=p, start_original=False, keep_failed_over=True),
                id=api.failback_id(p), task_queue=CONTROL_TASK_QUEUE,
                result_type=api.FailbackStatus)
            result = await result_despite_kill(stack, fb, api.FailbackStatus,
                                               {"syncing", "shutdown-failed-over", "final-sync"})
            assert result.phase == "done", result
            assert {x.vm for x in result.passes} == {a, b}, result.passes
            assert all(x.mode == "tracked" for x in result.passes), result.passes
            for v in record.vms:
                assert not domain_active(v.instance.name), f"{v.instance.name} must be shut off"
                original = disk_a if v.vm == a else disk_b
                overlay = Path(v.instance.overlays[0])
                same, detail = images_identical(original, overlay)
                assert same, f"{v.vm}: original and failed-over disks differ: {detail}"
                # the failed-over guest went on writing: the original holds its records
                assert check_contiguous(read_records(original)) > check_contiguous(
                    read_records(point_path(point, f"{v.vm}/vda")))
            assert cat.get_protection(p).state == ProtectionState.PROTECTING
            assert cat.get_dr_record(p) is None
    finally:
        events.close()
