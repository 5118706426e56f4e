"""Failover, migration and failback on real TCG guests and a real dev server.

The guest appends numbered records to its disk; a disk at any instant holds exactly
1..N, and a guest booted from it announces ``seq=N`` and continues with N+1. So:

* a migration loses nothing when the migrated guest announces exactly the last
  record the source wrote before its clean shutdown;
* a failback is exact when the original disk ends byte-identical to the failed-over
  one, while only the blocks either side changed were written;
* the restored protection is right when its next point holds the records the
  failed-over guest wrote.

The worker is killed with -9 in the middle of every operation.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError

from tests.harness.dr import domain_active, refused, remove_domain, result_despite_kill
from tests.harness.guest import BOOT_MARKER, GuestImage
from tests.harness.libvirtd import traversable, wait_for_console
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    images_identical,
    point_path,
    protection_spec,
    source_network,
    start_protection,
    status,
    sync_now,
    verify_point,
    wait_first_point,
    wait_for,
)
from tests.harness.records import check_contiguous, read_records
from tests.harness.stack import Stack
from transcend import api
from transcend.api import CONTROL_TASK_QUEUE, HealthCheck, ReplicationStatus
from transcend.models import ProtectionState

pytestmark = [pytest.mark.guest]

BOOT_TIMEOUT = 240
BOOTED = rf"^{BOOT_MARKER} seq=(\d+)"


def _written_top(image: Path) -> int:
    """Bytes the top layer of a qcow2 holds: data clusters and zero clusters alike.

    Both are writes the guest made (ext4's lazy inode-table init, for one, issues
    WRITE_ZEROES some time after mount, which qcow2 keeps as zero clusters), and the
    dirty bitmap tracks both, so both must travel back.
    """
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return sum(e["length"] for e in json.loads(out) if e.get("depth") == 0)


async def _failback_exact(client: Client, stack: Stack, protection: str, record: api.FailoverRecord,
                          original_disk: Path) -> api.FailbackStatus:
    """Fail back (kill -9 in the middle), keeping both VMs off so the test can compare."""
    fb = await client.start_workflow(
        api.FAILBACK_WORKFLOW,
        api.FailbackInput(protection=protection, start_original=False, keep_failed_over=True),
        id=api.failback_id(protection), task_queue=CONTROL_TASK_QUEUE,
        result_type=api.FailbackStatus)
    result = await result_despite_kill(stack, fb, api.FailbackStatus,
                                       {"syncing", "shutdown-failed-over", "final-sync"})
    assert result.phase == "done", result
    assert not domain_active(record.instance.name), "the failed-over VM must be shut off"
    overlay = Path(record.instance.overlays[0])
    same, detail = images_identical(original_disk, overlay)
    assert same, f"original and failed-over disks differ after failback: {detail}"
    return result


@pytest.mark.timeout(2400)
def test_migration_is_lossless_and_failback_writes_back_only_changes(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    vm = f"transcend-dr-mig-{os.getpid()}"
    try:
        with traversable(tmp_path):
            asyncio.run(_migration(guest_image, stack, tmp_path, vm))
    finally:
        remove_domain(f"{vm}-dr")


async def _migration(guest_image: GuestImage, stack: Stack, tmp_path: Path, vm: str) -> None:
    p = "mig"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    with source_network(f"transcend-mig-{os.getpid() % 10000}") as net, \
            booted_guest(guest_image, tmp_path, vm, network=net) as (dom, disk):
        replication = await start_protection(client, protection_spec(p, vm, src, dst))
        st = await wait_first_point(replication)
        assert st.cycles_failed == 0, st.last_error

        # Failback before any failover is refused and changes nothing.
        text = await refused(client, api.FAILBACK_WORKFLOW, api.FailbackInput(protection=p),
                              api.failback_id(p))
        assert "not failed over" in text or "only a failed-over protection" in text, text
        assert cat.get_protection(p).state == ProtectionState.PROTECTING
        assert dom.isActive()

        # Planned migration while the guest writes; the worker dies in the middle.
        name = f"{vm}-dr"
        mig = await client.start_workflow(
            api.MIGRATION_WORKFLOW,
            api.FailoverInput(protection=p, name=name,
                              health=HealthCheck(kind="console", pattern=BOOTED,
                                                 timeout_seconds=BOOT_TIMEOUT)),
            id=api.failover_id(p), task_queue=CONTROL_TASK_QUEUE, result_type=api.FailoverStatus)
        with pytest.raises(WorkflowAlreadyStartedError):  # never two at once
            await client.start_workflow(api.FAILOVER_WORKFLOW, api.FailoverInput(protection=p),
                                        id=api.failover_id(p), task_queue=CONTROL_TASK_QUEUE)
        done = await result_despite_kill(stack, mig, api.FailoverStatus,
                                         {"final-cycle", "booting", "health-check"})
        assert done.phase == "done" and done.instance is not None, done
        assert done.final_cycle.startswith("committed"), done.final_cycle
        assert done.rto_seconds is not None and done.rto_seconds > 0

        # The source shut down cleanly; the migrated guest continues exactly after its
        # last record: nothing lost, nothing invented.
        assert not dom.isActive()
        last_source = check_contiguous(read_records(disk))
        assert last_source > 0
        m = wait_for_console(done.instance.console_log, BOOTED, 10)
        assert int(m.group(1)) == last_source, (m.group(0), last_source)
        point = cat.get_point(done.point_id or "")
        assert check_contiguous(read_records(point_path(point))) == last_source

        # The protection knows, and refuses what makes no sense now.
        assert cat.get_protection(p).state == ProtectionState.FAILED_OVER
        rs = await wait_for(lambda: status(replication),
                            lambda s: s.state == ProtectionState.FAILED_OVER, 60, "failed_over")
        assert rs.health_reason.startswith("failed_over")
        memo = await (await replication.describe()).memo_value("summary")
        assert isinstance(memo, str) and ": failed_over, warning (failed_over:" in memo, memo
        text = await refused(client, api.FAILOVER_WORKFLOW, api.FailoverInput(protection=p),
                              api.failover_id(p))
        assert "already runs at the target" in text, text
        with pytest.raises(WorkflowUpdateFailedError):
            await replication.execute_update("sync_now", result_type=ReplicationStatus)
        assert cat.get_protection(p).state == ProtectionState.FAILED_OVER
        assert domain_active(name)

        # Production runs at the target for a while, then comes home.
        wait_for_console(done.instance.console_log, rf"{BOOT_MARKER}", 5)
        await asyncio.sleep(15)
        record = api.FailoverRecord.model_validate_json(cat.get_dr_record(p) or "")
        result = await _failback_exact(client, stack, p, record, disk)
        overlay = Path(record.instance.overlays[0])
        changed = _written_top(overlay)  # everything the failed-over guest wrote
        fo_bytes = sum(x.failed_over_bytes for x in result.passes)
        written = sum(x.bytes_written + x.bytes_zeroed for x in result.passes)
        # A migration leaves no changes on the source after its final point.
        assert result.passes[0].mode == "tracked" and result.passes[0].original_bytes == 0
        # Only the failed-over guest's changes travel (each pass its own, at 64 KiB
        # granularity): at least all of them, at most each of them once per pass.
        assert changed <= fo_bytes <= changed * len(result.passes), (changed, fo_bytes)
        assert written <= fo_bytes
        assert 0 < written < 4 * 2**20, written  # the disk is 256 MiB

        # The original becomes production again and continues the failed-over records.
        last_failed_over = check_contiguous(read_records(overlay))
        assert last_failed_over > last_source
        console = tmp_path / "console.log"
        offset = console.stat().st_size
        dom.create()
        m = wait_for_console(console, BOOTED, BOOT_TIMEOUT, start=offset)
        assert int(m.group(1)) == last_failed_over

        # Replication resumed: the next point is incremental and holds the failed-over
        # guest's records (the original's checkpoint saw every block written back).
        assert cat.get_protection(p).state == ProtectionState.PROTECTING
        rs = await wait_for(lambda: status(replication),
                            lambda s: s.state == ProtectionState.PROTECTING, 60, "protecting")
        await asyncio.sleep(3)
        await replication.execute_update("sync_now", result_type=ReplicationStatus)
        rs = await wait_for(lambda: status(replication),
                            lambda s: s.last_point_id not in (None, point.id), 600,
                            "a point after the failback")
        newest = cat.get_point(rs.last_point_id or "")
        assert newest.id != point.id and newest.kind.value == "incremental", newest.kind
        assert check_contiguous(read_records(point_path(newest))) >= last_failed_over
        assert (await verify_point(client, newest.id)).ok


@pytest.mark.timeout(2400)
def test_unplanned_failover_then_failback_merges_both_sides(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    vm = f"transcend-dr-fo-{os.getpid()}"
    try:
        with traversable(tmp_path):
            asyncio.run(_unplanned(guest_image, stack, tmp_path, vm))
    finally:
        remove_domain(f"{vm}-dr")


async def _unplanned(guest_image: GuestImage, stack: Stack, tmp_path: Path, vm: str) -> None:
    p = "fo"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    with source_network(f"transcend-fo-{os.getpid() % 10000}") as net, \
            booted_guest(guest_image, tmp_path, vm, network=net) as (dom, disk):
        replication = await start_protection(client, protection_spec(p, vm, src, dst))
        await wait_first_point(replication)
        await asyncio.sleep(3)
        st = await sync_now(replication)
        point = cat.get_point(st.last_point_id or "")
        at_point = check_contiguous(read_records(point_path(point)))

        # A failover to a point that is not the protection's is refused, nothing changes.
        text = await refused(client, api.FAILOVER_WORKFLOW,
                              api.FailoverInput(protection=p, point_id="nope"), api.failover_id(p))
        assert "nope" in text
        assert cat.get_protection(p).state == ProtectionState.PROTECTING and dom.isActive()

        # A runbook step that fails before the boot stops the failover, which is undone.
        text = await refused(
            client, api.FAILOVER_WORKFLOW,
            api.FailoverInput(protection=p, final_cycle=False, shutdown_source=False,
                              name=f"{vm}-dr", runbook=[api.RunbookStep(
                                  name="check dns", when="before-boot",
                                  command=["sh", "-c", "echo no dns >&2; exit 7"])]),
            api.failover_id(p))
        assert "check dns" in text and "no dns" in text and "exit 7" in text, text
        assert cat.get_protection(p).state == ProtectionState.PROTECTING and dom.isActive()
        assert not domain_active(f"{vm}-dr") and cat.get_dr_record(p) is None

        # Disaster: no final cycle. The source keeps writing past the point until the
        # failover powers it off (longer than the failed-over guest will write, so the
        # source's own later records are only undone if failback reads its tracking);
        # the worker dies while the replica boots.
        await asyncio.sleep(30)
        marker = tmp_path / "pre-boot.txt"
        runbook = [
            api.RunbookStep(name="pre", when="before-boot", command=[
                "sh", "-c", f'echo "$TRANSCEND_OPERATION $TRANSCEND_POINT" > {marker}']),
            api.RunbookStep(name="post", when="after-boot", continue_on_error=True, command=[
                "sh", "-c", 'echo "up: $TRANSCEND_VMS"; echo degraded >&2; exit 3']),
            api.RunbookStep(name="slow", when="after-boot", continue_on_error=True,
                            timeout_seconds=2, command=["sleep", "60"]),
        ]
        fo = await client.start_workflow(
            api.FAILOVER_WORKFLOW,
            api.FailoverInput(protection=p, final_cycle=False, name=f"{vm}-dr",
                              shutdown_timeout_seconds=60, runbook=runbook),
            id=api.failover_id(p), task_queue=CONTROL_TASK_QUEUE, result_type=api.FailoverStatus)
        done = await result_despite_kill(stack, fo, api.FailoverStatus,
                                         {"shutdown-source", "booting"})
        assert done.phase == "done" and done.instance is not None, done
        assert done.point_id == point.id
        assert not dom.isActive()
        # The runbook ran in order with its output kept; failed steps marked as allowed.
        assert marker.read_text().split() == ["failover", point.id]
        assert [(r.name, r.ok, r.exit_code, r.timed_out) for r in done.steps] == [
            ("pre", True, 0, False), ("post", False, 3, False), ("slow", False, None, True)]
        assert done.steps[1].stdout.strip() == f"up: {vm}-dr" and "degraded" in done.steps[1].stderr
        diverged = check_contiguous(read_records(disk))
        assert diverged > at_point, "the source wrote after the point (what failback must undo)"
        m = wait_for_console(done.instance.console_log, BOOTED, BOOT_TIMEOUT)
        assert int(m.group(1)) == at_point

        record = api.FailoverRecord.model_validate_json(cat.get_dr_record(p) or "")
        result = await _failback_exact(client, stack, p, record, disk)
        first = result.passes[0]
        # The source's own changes after the point came from its change tracking and were
        # written back too (else the disks would differ where the source wrote last).
        assert first.mode == "tracked" and first.original_bytes > 0, first
        written = sum(x.bytes_written + x.bytes_zeroed for x in result.passes)
        assert written <= sum(x.failed_over_bytes + x.original_bytes for x in result.passes)
        assert 0 < written < 4 * 2**20, written
        assert check_contiguous(read_records(disk)) > at_point
        assert cat.get_protection(p).state == ProtectionState.PROTECTING
