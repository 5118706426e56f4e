"""End to end: a running TCG guest on libvirt, protected by the real workflows on a real
Temporal dev server and worker process, replicated into qcow2 layer chains.

Every check compares bytes: each point is re-read and hashed against the manifest the
cycle made at the frozen instant (VerifyPoint), compared with ``qemu-img compare``
against the source while the guest is paused, and its guest records must be a
contiguous prefix of what the guest wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import pytest
from temporalio.client import WorkflowFailureError

from tests.harness.guest import BOOT_MARKER, GuestImage
from tests.harness.libvirtd import (
    DiskSpec,
    define_domain,
    domain_xml,
    remove_domain_if_exists,
    traversable,
    undefine_domain,
    wait_for_console,
)
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    failure_text,
    images_identical,
    point_path,
    protection_spec,
    start_protection,
    status,
    sync_now,
    verify_point,
    wait_first_point,
    wait_for,
)
from tests.harness.records import check_contiguous, read_records
from tests.harness.stack import Stack
from transcend.api import (
    BOOT_WORKFLOW,
    CONTROL_TASK_QUEUE,
    CYCLE_WORKFLOW,
    BootInput,
    BootResult,
    PolicyChange,
    ReplicationStatus,
    StreamResult,
    boot_id,
)
from transcend.cli import running_cycle_progress
from transcend.models import PlatformKind, PlatformSpec, ProtectionState, RetentionPolicy, RetentionRule

pytestmark = [pytest.mark.guest]

GRANULE = 65536
BOOT_TIMEOUT = 180




def _granules(first_record: int, last_record: int, record_size: int, records_offset: int) -> int:
    """Bitmap granules touched by guest records first..last (record N sits in slot N)."""
    if last_record < first_record:
        return 0
    start = records_offset + first_record * record_size
    end = records_offset + (last_record + 1) * record_size
    return (end - 1) // GRANULE - start // GRANULE + 1


def _records_offset() -> int:
    from tests.harness.guest import RECORDS_START

    return RECORDS_START


@pytest.mark.timeout(1500)
def test_full_then_incremental_cycles_verify_retention_boot(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    with traversable(tmp_path):  # the booted point's overlay is opened by the qemu user
        asyncio.run(_full_then_incremental(guest_image, stack, tmp_path))


async def _full_then_incremental(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    vm = f"transcend-e2e-{os.getpid()}"
    # A second disk, frozen at the same instant: 8 MiB of random data and a hole.
    data_disk = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data_disk), "64M"], check=True)
    random_file = tmp_path / "random.bin"
    random_file.write_bytes(os.urandom(8 << 20))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {random_file} 16M 8M", str(data_disk)],
                   check=True, capture_output=True)
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    incremental = 10
    vdb = DiskSpec(path=data_disk, target="vdb")

    with booted_guest(guest_image, tmp_path, vm, extra_disks=[vdb]) as (dom, disk):
        handle = await start_protection(client, protection_spec("e2e", vm, src, dst))
        st = await wait_first_point(handle)
        assert st.cycles_failed == 0, f"first cycle failed: {st.last_error}\n{stack.worker_log_tail()}"

        for _ in range(incremental):
            await asyncio.sleep(1.0)  # let the guest write between points
            st = await sync_now(handle)
            assert st.cycles_failed == 0, f"cycle failed: {st.last_error}"

        points = cat.points("e2e")
        assert len(points) == 1 + incremental
        assert points[0].kind.value == "full"
        assert all(p.kind.value == "incremental" for p in points[1:])
        assert all(sorted(d.disk for d in p.disks) == ["vda", "vdb"] for p in points)
        cycles = {c.point_id: c for c in cat.cycles("e2e") if c.point_id}

        # Every point: byte-identical to the frozen instant (re-read and hashed against
        # the manifest taken while streaming), and a contiguous prefix of the records.
        previous_last = 0
        for p in points:
            result = await verify_point(client, p.id)
            assert result.ok and not result.mismatched_blocks, result
            records = read_records(point_path(p, "vda"))
            last = check_contiguous(records)
            assert last >= previous_last, "points must not go back in time"
            if p.kind.value == "incremental":
                # Incremental cycles read only what the guest dirtied: the records it
                # appended since the previous point, at bitmap granularity, plus a
                # small allowance for the guest's own metadata writes.
                dirty = _granules(previous_last + 1, last, 512, _records_offset()) * GRANULE
                c = cycles[p.id]
                assert c.bytes_read <= dirty + 16 * GRANULE, (p.id, c.bytes_read, dirty)
            previous_last = last
        assert previous_last > 0, "the guest wrote no records"

        # Paused guest: the next point equals the source disk byte for byte.
        dom.suspend()
        try:
            st = await sync_now(handle)
            assert st.cycles_failed == 0, st.last_error
            paused_point = cat.get_point(st.last_point_id or "")
            for path, name in ((disk, "vda"), (data_disk, "vdb")):
                same, detail = images_identical(path, point_path(paused_point, name))
                assert same, f"{name}: {detail}"
        finally:
            dom.resume()

        # Retention: keep only the newest 3 points; the survivors still hash the same.
        # (Kept by age for 1 s only: every older point is at least one cycle older than
        # that, however slow the machine; 10 s kept a fourth point on a loaded one.)
        before = {p.id: {d.disk: d.manifest_sha256 for d in p.disks} for p in cat.points("e2e")}
        policy = cat.get_protection("e2e").spec.policy.model_copy(
            update={"retention": RetentionPolicy(rules=[RetentionRule(every=0, keep_for=1)],
                                                 min_points=3)})
        await handle.execute_update("set_policy", PolicyChange(policy=policy),
                                    result_type=ReplicationStatus)
        st = await sync_now(handle)
        assert st.cycles_failed == 0, st.last_error
        remaining = cat.points("e2e")
        assert len(remaining) == 3, [p.id for p in remaining]
        for p in remaining:
            result = await verify_point(client, p.id)
            assert result.ok, result
            if p.id in before:
                assert {d.disk: d.manifest_sha256 for d in p.disks} == before[p.id]
        last_point = remaining[-1]
        expected_records = check_contiguous(read_records(point_path(last_point, "vda")))

    # Boot the newest point on a throw-away overlay: the guest sees its records.
    boot = await client.execute_workflow(
        BOOT_WORKFLOW, BootInput(point_id=last_point.id, name=f"{vm}-boot"),
        id=boot_id(last_point.id, f"{vm}-boot"), task_queue=CONTROL_TASK_QUEUE,
        result_type=BootResult,
    )
    try:
        m = wait_for_console(boot.console_log, rf"^{BOOT_MARKER} seq=(\d+)", BOOT_TIMEOUT)
        assert int(m.group(1)) == expected_records
    finally:
        conn = libvirt.open("qemu:///system")
        try:
            d = conn.lookupByName(boot.name)
            if d.isActive():
                d.destroy()
            d.undefine()
        except libvirt.libvirtError:
            pass
        conn.close()
    # The point itself was never written by the boot.
    assert (await verify_point(client, last_point.id)).ok

    # Unprotect: the workflow ends, the catalog says removed, the points stay.
    await handle.execute_update("remove", result_type=ReplicationStatus)
    await asyncio.wait_for(handle.result(), 120)
    assert cat.get_protection("e2e").state == ProtectionState.REMOVED
    assert [p.id for p in cat.points("e2e")] == [p.id for p in remaining]
    # The name stays with the removed protection's points: protecting again under it
    # is refused at once, naming what to do, and changes nothing.
    again = await start_protection(client, protection_spec("e2e", vm, src, dst))
    with pytest.raises(WorkflowFailureError) as refused:
        await asyncio.wait_for(again.result(), 120)
    assert "choose another name" in failure_text(refused.value), failure_text(refused.value)
    assert cat.get_protection("e2e").state == ProtectionState.REMOVED
    assert [p.id for p in cat.points("e2e")] == [p.id for p in remaining]


# --------------------------------------------------------------------------- crashes


def _data_bytes(image: Path) -> int:
    """Bytes of the image that hold data (what a full copy must read)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return sum(e["length"] for e in json.loads(out) if e.get("data") and not e.get("zero"))


async def _stream_heartbeat(stack: Stack, protection: str) -> dict[str, Any] | None:
    """The running stream.disk activity's latest heartbeat, if any."""
    client = await stack.client()
    for item in await running_cycle_progress(client, protection):
        if "durable_offset" in item:
            return item
    return None


async def _wait_heartbeat(stack: Stack, protection: str, pred: Callable[[dict[str, Any]], bool],
                          timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            hb = await _stream_heartbeat(stack, protection)
        except Exception:  # server restarting
            hb = None
        if hb is not None and pred(hb):
            return hb
        await asyncio.sleep(0.3)
    raise AssertionError(f"no stream heartbeat with {what} within {timeout:.0f}s\n{stack.worker_log_tail()}")


async def _stream_results(stack: Stack, protection: str) -> list[StreamResult]:
    """Results of every completed stream.disk activity of the protection's cycles, read
    from Temporal's history (decoded with the payload codec)."""
    client = await stack.client()
    out: list[StreamResult] = []
    async for wf in client.list_workflows(f'WorkflowType="{CYCLE_WORKFLOW}" AND '
                                          f'TranscendProtection="{protection}"'):
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        scheduled: dict[int, str] = {}
        for ev in history.events:
            if ev.HasField("activity_task_scheduled_event_attributes"):
                scheduled[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
            if ev.HasField("activity_task_completed_event_attributes"):
                a = ev.activity_task_completed_event_attributes
                if scheduled.get(a.scheduled_event_id) == "stream.disk":
                    (raw,) = await client.data_converter.decode(a.result.payloads, [StreamResult])
                    out.append(raw)
    return out


@pytest.mark.timeout(1200)
def test_kill_worker_and_restart_server_mid_cycle(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    asyncio.run(_kill_and_restart(guest_image, stack, tmp_path, kills=3))


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_kill_worker_soak(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    asyncio.run(_kill_and_restart(guest_image, stack, tmp_path, kills=20))


async def _kill_and_restart(guest_image: GuestImage, stack: Stack, tmp_path: Path, kills: int) -> None:
    rng = random.Random(os.environ.get("TRANSCEND_TEST_SEED", str(time.time_ns())))
    vm = f"transcend-kill-{os.getpid()}"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    with booted_guest(guest_image, tmp_path, vm) as (_, disk):
        # 1 MiB/s: the first (full) copy takes tens of seconds, time to crash it.
        handle = await start_protection(
            client, protection_spec("kill", vm, src, dst, bandwidth=1 << 20))

        # kill -9 the worker once part of the full copy is durable ...
        first = await _wait_heartbeat(stack, "kill", lambda h: h["durable_offset"] > 0, 300,
                                      "a durable offset")
        await asyncio.sleep(rng.uniform(0, 1.5))
        stack.kill_workers()
        stack.start_worker()
        # ... the retried attempt resumes past the first one's durable offset ...
        await _wait_heartbeat(stack, "kill", lambda h: h["durable_offset"] > first["durable_offset"],
                              300, "progress after the worker restart")
        # ... and the dev server restarts under the running cycle.
        stack.restart_server()
        client = await stack.client()
        handle = client.get_workflow_handle(handle.id)
        st = await wait_first_point(handle, 600)
        assert st.cycles_failed == 0, f"{st.last_error}\n{stack.worker_log_tail()}"
        (full,) = cat.points("kill")
        assert (await verify_point(client, full.id)).ok

        streams = await _stream_results(stack, "kill")
        assert len(streams) == 1
        s0 = streams[0]
        assert s0.resumed_from > 0, s0
        # The last attempt copied only what was not yet durable, not the whole disk again.
        assert s0.attempt_bytes_read is not None and s0.attempt_bytes_written is not None, s0
        assert s0.attempt_bytes_read < _data_bytes(disk), (s0, _data_bytes(disk))
        # ... and the result counts every attempt: at least what the killed one had read
        # by the heartbeat we waited for, plus the last one's.
        assert s0.bytes_read >= s0.attempt_bytes_read + first["bytes_read"], (s0, first)
        assert s0.bytes_written >= s0.attempt_bytes_written + first["bytes_written"], (s0, first)

        # Further kills at random moments of incremental cycles: every committed point
        # still verifies and the records stay a contiguous prefix.
        await handle.execute_update("set_policy", PolicyChange(
            policy=cat.get_protection("kill").spec.policy.model_copy(update={"bandwidth_bytes_per_s": None})),
            result_type=ReplicationStatus)
        for _ in range(kills):
            before = await status(handle)
            await handle.execute_update("sync_now", result_type=ReplicationStatus)
            await asyncio.sleep(rng.uniform(0, 2.0))
            stack.kill_workers()
            stack.start_worker()
            await wait_for(lambda: status(handle),
                           lambda s, b=before: s.cycles_ok + s.cycles_failed > b.cycles_ok + b.cycles_failed,
                           600, "the cycle interrupted by kill -9")
        previous = 0
        for p in cat.points("kill"):
            assert (await verify_point(client, p.id)).ok, p.id
            last = check_contiguous(read_records(point_path(p)))
            assert last >= previous
            previous = last
        assert previous > 0


# --------------------------------------------------------------------------- lost tracking


def _remove_bitmaps(vm: str) -> list[str]:
    """Delete the dirty bitmaps of the domain's disk behind libvirt's back (QMP), as a
    crash or a careless qemu-img would: libvirt still lists the checkpoint."""
    def qmp(cmd: dict[str, Any]) -> Any:
        out = subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", vm, json.dumps(cmd)],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["return"]

    removed = []
    for node in qmp({"execute": "query-named-block-nodes", "arguments": {"flat": True}}):
        for bm in node.get("dirty-bitmaps", []):
            if bm["name"].startswith("transcend."):
                qmp({"execute": "block-dirty-bitmap-remove",
                     "arguments": {"node": node["node-name"], "name": bm["name"]}})
                removed.append(bm["name"])
    return removed


@pytest.mark.timeout(1200)
def test_lost_bitmap_resyncs_by_hash(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    asyncio.run(_lost_bitmap(guest_image, stack, tmp_path))


async def _lost_bitmap(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    vm = f"transcend-resync-{os.getpid()}"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    with booted_guest(guest_image, tmp_path, vm) as (dom, disk):
        handle = await start_protection(client, protection_spec("resync", vm, src, dst))
        st = await wait_first_point(handle)
        assert st.cycles_failed == 0, st.last_error
        st = await sync_now(handle)
        assert st.cycles_failed == 0, st.last_error

        seq_before = cat.get_point(st.last_point_id or "").seq
        removed = _remove_bitmaps(vm)
        assert removed, "the protected disk had no transcend bitmap to remove"
        await asyncio.sleep(1.0)
        dom.suspend()  # a fixed source, so that the resync must reproduce it exactly
        suspended_at = datetime.now(UTC)
        try:
            # Until a point frozen after the suspend exists (a cycle already queued
            # before it may commit first).
            for _ in range(3):
                st = await sync_now(handle)
                assert st.cycles_failed == 0, f"{st.last_error}\n{stack.worker_log_tail()}"
                newest = cat.get_point(st.last_point_id or "")
                if newest.instant > suspended_at:
                    break
            same, detail = images_identical(disk, point_path(newest))
            assert same, detail
        finally:
            dom.resume()
        # The first cycle after the bitmaps vanished noticed it and resynced.
        point = next(p for p in cat.points("resync") if p.seq > seq_before)
        assert point.kind.value == "resync", point
        assert (await verify_point(client, point.id)).ok
        cycle = next(c for c in cat.cycles("resync") if c.point_id == point.id)
        full = next(c for c in cat.cycles("resync") if c.kind == "full")
        # The whole disk was read and hashed, but only blocks that differ were written:
        # what the guest appended since the last point, a few granules.
        assert cycle.bytes_read >= full.bytes_read // 2, (cycle.bytes_read, full.bytes_read)
        assert cycle.bytes_written <= 32 * GRANULE, cycle.bytes_written
        # Tracking is back: the next cycle is incremental again.
        st = await sync_now(handle)
        assert st.cycles_failed == 0, st.last_error
        assert cat.get_point(st.last_point_id or "").kind.value == "incremental"


# --------------------------------------------------------------------------- bad input


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "transcend.cli", *args], env={**os.environ, **stack.env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(600)
def test_bad_input_gives_clear_errors_and_changes_nothing(stack: Stack, tmp_path: Path) -> None:
    asyncio.run(_bad_input(stack, tmp_path))


async def _bad_input(stack: Stack, tmp_path: Path) -> None:
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")

    # Rejected before anything is started or stored.
    r = _cli(stack, "protect", "p0", "--source", src, "--vm", "x", "--target", dst, "--rpo", "0")
    assert r.returncode == 2 and "rpo_seconds" in r.stderr, r.stderr
    r = _cli(stack, "protect", "p0", "--source", src, "--vm", "x", "--target", dst,
             "--retention", "all 0s")
    assert r.returncode == 2 and "keep_for" in r.stderr, r.stderr
    r = _cli(stack, "protect", "p0", "--source", src, "--vm", "x", "--target", dst,
             "--retention", "sometimes")
    assert r.returncode == 2 and "retention" in r.stderr.lower(), r.stderr
    r = _cli(stack, "protect", "p0", "--source", src, "--vm", "x", "--target", dst, "--connections", "0")
    assert r.returncode == 2 and "connections" in r.stderr, r.stderr
    assert cat.list_protections() == []

    client = await stack.client()

    async def refused(name: str, spec_src: str, vm: str, spec_dst: str, *needles: str) -> None:
        handle = await start_protection(client, protection_spec(name, vm, spec_src, spec_dst))
        with pytest.raises(WorkflowFailureError) as info:
            await asyncio.wait_for(handle.result(), 300)
        text = failure_text(info.value)
        for needle in needles:
            assert needle in text, text
        assert all(p.name != name for p in cat.list_protections()), "a refused protection was stored"
        # What Temporal stored is ciphertext (the payload codec): the workflow input
        # names the VM, and that name is not readable in the history.
        history = await handle.fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        assert started.input.payloads
        for payload in started.input.payloads:
            assert payload.metadata["encoding"] == b"binary/encrypted"
            assert vm.encode() not in payload.data

    await refused("p1", src, "no-such-vm", dst, "no-such-vm")
    cat.add_platform(PlatformSpec(name="dead-libvirt", kind=PlatformKind.KVM,
                                  config={"uri": "qemu+tcp://127.0.0.1:1/system"}))
    await refused("p2", "dead-libvirt", "vm", dst, "qemu+tcp://127.0.0.1:1/system")
    cat.add_platform(PlatformSpec(name="ro-target", kind=PlatformKind.KVM,
                                  config={"root": "/proc/transcend-replicas"}))
    # A VM that exists (defined, not running), so that the target is what is refused.
    vm_disk = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vm_disk), "64M"], check=True)
    name = f"transcend-bad-{os.getpid()}"
    remove_domain_if_exists(name)
    dom = define_domain(domain_xml(name, vm_disk, tmp_path / "console.log"))
    try:
        await refused("p3", src, name, "ro-target", "/proc/transcend-replicas")
    finally:
        undefine_domain(dom)

