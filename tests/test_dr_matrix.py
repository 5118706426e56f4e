"""The any-to-any claim as a test: every ordered pair of the platforms that have a DR
kit (tests/harness/drkit.py) goes through replicate -> test failover -> failover ->
failback through the workflows, on small blank disks, with the worker killed -9 in
the middle of the failback.

What is checked, on bytes: each point equals the test's model of the source disk at
its instant (read back through the target's ``open``); the test failover's instance
is gone after it; the failover stands; the bytes written back are the union of
both sides' changes (64 KiB blocks), counted; the protection resumes and its next
point is incremental and equals the model of the failed-over side plus the new
write (so the original's disks held exactly the failed-over VM's bytes; the
failback's own verify compared both sides' hashes too).

A pair whose original cannot be written directly (no ``direct_disks``: VMware today)
runs up to the failover and then checks that the failback is refused by name with
nothing changed; a target without ``tracking_at_boot`` fails back with a first pass
that compares hashes.

No guest boots here (the disks hold no OS; health kind ``none``, no conversion):
real boots, migration of a running guest and the seconds of RTO are the subject of
tests/test_dr_failover.py and tests/test_group_dr.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError

from connectors.common.qemu import export_sha256
from connectors.registry import declared_capabilities, target_for
from tests.harness.dr import result_despite_kill
from tests.harness.drkit import MiB, Vm, apply, kit, vm_name
from tests.harness.libvirtd import traversable
from tests.harness.procs import command_lines, processes_mentioning
from tests.harness.protect import (
    protection_spec,
    start_protection,
    sync_now,
    verify_point,
    wait_first_point,
)
from tests.harness.stack import Stack
from transcend import api
from transcend.api import CONTROL_TASK_QUEUE, HealthCheck
from transcend.catalog import Catalog
from transcend.cli.common import _failure_text
from transcend.models import ChangeKind, ProtectionState, RecoveryPoint

pytestmark = [pytest.mark.guest]

KINDS = ["kvm", "vmware"]
PAIRS = list(itertools.product(KINDS, KINDS))
DISK = 32 * MiB
G = 64 * 1024


def _data(seed: int, n: int) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def _blocks(writes: list[tuple[int, int]]) -> int:
    """Bytes of the 64 KiB blocks a set of (offset, length) writes touches."""
    touched = {b for o, n in writes for b in range(o // G, (o + n - 1) // G + 1)}
    return len(touched) * G


def _point_sha(cat: Catalog, point: RecoveryPoint) -> list[str]:
    """sha256 of each disk of a point, read through the target connector's ``open``."""
    prot = cat.get_protection(point.protection)
    info = cat.get_platform(prot.spec.target_platform)
    target = target_for(info, cat.platform_secret(info.name))
    out = []
    for d in point.disks:
        ep = target.open(point, d.disk)
        try:
            out.append(export_sha256(ep.uri))
        finally:
            target.close(point, d.disk)
    return out


def _caps(kind: str) -> Any:
    return declared_capabilities(kind, "source")


def _target_caps(kind: str) -> Any:
    return declared_capabilities(kind, "target")


def _skip_without_power(kinds: list[str]) -> None:
    """Failover shuts the source down and failback stops the failed-over VM, through
    each side's Source: a connector that does not declare power cannot take part yet.
    Skipped, naming what is missing, rather than left out of the matrix."""
    missing = [f"the {k} connector declares no power control" for k in dict.fromkeys(kinds)
               if not _caps(k).power]
    if missing:
        pytest.skip("; ".join(missing) + " yet (issue #14)")


def _can_fail_back(src_kind: str) -> bool:
    """Failback writes into the original VM's own disks (its Source's DirectDisks); the
    failed-over side is read through its Source's freeze, which every Source has."""
    return bool(_caps(src_kind).direct_disks)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize(("src_kind", "dst_kind"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_replicate_test_failover_failover_failback(src_kind: str, dst_kind: str, stack: Stack,
                                                    tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    _skip_without_power([src_kind, dst_kind])
    vsphere = request.getfixturevalue("vsphere") if "vmware" in (src_kind, dst_kind) else None
    with traversable(tmp_path):  # the qemu user reaches the replicas and boot overlays
        asyncio.run(_pair(src_kind, dst_kind, stack, tmp_path, vsphere))


async def _pair(src_kind: str, dst_kind: str, stack: Stack, tmp_path: Path,
                vsphere: Any) -> None:
    """The pair's run, then the protection removed (its running cycle ended, its
    tracking forgotten) and nothing of it left running: no NBD server, no helper."""
    handles: list[Any] = []
    try:
        await _pair_run(src_kind, dst_kind, stack, tmp_path, vsphere, handles)
    finally:
        for h in handles:
            with contextlib.suppress(Exception):
                await h.execute_update("remove")
                await asyncio.wait_for(h.result(), 300)
    # (the stack's own dev server and worker live under home/ and stop with the stack)
    left = processes_mentioning(str(tmp_path), exclude=(str(tmp_path / "home"),))
    assert left == [], {pid: command_lines().get(pid) for pid in left}


async def _pair_run(src_kind: str, dst_kind: str, stack: Stack, tmp_path: Path,
                    vsphere: Any, handles: list[Any]) -> None:
    cat = stack.catalog()
    client = await stack.client()
    p = f"mx-{src_kind}-{dst_kind}"
    with kit(src_kind, tmp_path / "src", vsphere) as sk, \
            kit(dst_kind, tmp_path / "dst", vsphere) as dk:
        sk.add_platform(cat, "src")
        dk.add_platform(cat, "dst")
        vm: Vm = sk.make_vm(vm_name(src_kind, "src"), [DISK])
        prod_name = f"{vm.name}-prod"
        test_name = f"{vm.name}-test"
        try:
            # ---- replicate: a full first point, then an incremental one
            sk.write(vm, 0, 0, _data(1, MiB))
            sk.write(vm, 0, 8 * MiB + 100, _data(2, 5000))
            at_first = vm.sha256()
            handle = await start_protection(client, protection_spec(p, vm.name, "src", "dst"))
            handles.append(handle)
            st = await wait_first_point(handle, 600)
            first = cat.get_point(st.last_point_id or "")
            assert first.kind == ChangeKind.FULL
            assert _point_sha(cat, first) == at_first
            sk.write(vm, 0, 4 * MiB, _data(3, G))
            at_second = vm.sha256()
            st = await sync_now(handle)
            second = cat.get_point(st.last_point_id or "")
            assert second.kind == ChangeKind.INCREMENTAL, second
            assert second.bytes_written == G, second.bytes_written
            assert _point_sha(cat, second) == at_second
            assert _point_sha(cat, first) == at_first  # the first point did not change
            assert (await verify_point(client, second.id)).ok

            # ---- test failover: booted beside replication, then removed
            tf = await client.execute_workflow(
                api.TEST_FAILOVER_WORKFLOW,
                api.TestFailoverInput(protection=p, health=HealthCheck(kind="none"),
                                      convert="never", keep_seconds=0, name=test_name),
                id=f"test-failover/{p}", task_queue=CONTROL_TASK_QUEUE,
                result_type=api.TestFailoverStatus)
            assert tf.point_id == second.id and tf.error == "", tf
            assert not dk.instance_exists(test_name)
            assert cat.get_protection(p).state == ProtectionState.PROTECTING
            assert _point_sha(cat, second) == at_second  # never written

            # ---- failover with a final cycle: the source's newest writes come along
            sk.write(vm, 0, 12 * MiB, _data(4, G))
            at_failover = vm.sha256()
            fo = await client.execute_workflow(
                api.FAILOVER_WORKFLOW,
                api.FailoverInput(protection=p, name=prod_name, convert="never",
                                  shutdown_timeout_seconds=10, force_off=True,
                                  health=HealthCheck(kind="none")),
                id=api.failover_id(p), task_queue=CONTROL_TASK_QUEUE,
                result_type=api.FailoverStatus)
            assert fo.phase == "done" and fo.instance is not None, fo
            final = cat.get_point(fo.point_id or "")
            assert final.id != second.id and _point_sha(cat, final) == at_failover
            assert cat.get_protection(p).state == ProtectionState.FAILED_OVER
            assert dk.instance_exists(prod_name)

            # ---- both sides write: production at the target, the original diverges
            failed_over = Vm(name=prod_name, disks=[bytearray(d) for d in vm.disks])
            fo_writes = [(16 * MiB, G), (20 * MiB + 7, 100)]
            for seed, (off, n) in enumerate(fo_writes, start=10):
                data = _data(seed, n)
                dk.write_instance(fo.instance, 0, off, data)
                apply(failed_over.disks[0], off, data)
            orig_writes = [(24 * MiB, G)]
            for off, n in orig_writes:
                sk.write(vm, 0, off, _data(20, n))

            if not _can_fail_back(src_kind):
                # ---- the pair cannot fail back yet: refused by name, nothing changed
                with pytest.raises(WorkflowFailureError) as refused:
                    await client.execute_workflow(
                        api.FAILBACK_WORKFLOW, api.FailbackInput(protection=p),
                        id=api.failback_id(p), task_queue=CONTROL_TASK_QUEUE,
                        result_type=api.FailbackStatus)
                assert "direct disk access" in _failure_text(refused.value), refused.value
                assert cat.get_protection(p).state == ProtectionState.FAILED_OVER
                assert dk.instance_exists(prod_name)
                assert vm.sha256() == sk.read(vm)  # the original's disks untouched
                return

            # ---- failback, the worker killed -9 in the middle
            fb = await client.start_workflow(
                api.FAILBACK_WORKFLOW,
                api.FailbackInput(protection=p, start_original=True, keep_failed_over=False),
                id=api.failback_id(p), task_queue=CONTROL_TASK_QUEUE,
                result_type=api.FailbackStatus)
            result = await result_despite_kill(stack, fb, api.FailbackStatus,
                                               {"syncing", "shutdown-failed-over", "final-sync"})
            # Done includes the failback's own verify: both sides' disks hashed equal.
            assert result.phase == "done", result
            if _target_caps(dst_kind).tracking_at_boot:
                # the production boot tracked its writes: every pass copies what changed
                tracked = [x for x in result.passes if x.mode == "tracked"]
                assert len(tracked) == len(result.passes), result.passes
                assert sum(x.failed_over_bytes for x in result.passes) >= _blocks(fo_writes)
                assert result.passes[0].original_bytes == _blocks(orig_writes), result.passes[0]
            else:
                # no tracking from the boot: the first pass compares both sides' hashes,
                # the next ones track from the checkpoint the first one left
                assert result.passes[0].mode == "hash-compare", result.passes
                assert all(x.mode == "tracked" for x in result.passes[1:]), result.passes
            written = sum(x.bytes_written + x.bytes_zeroed for x in result.passes)
            # Only the union travelled (a pass repeated after the kill may resend it).
            assert _blocks(fo_writes + orig_writes) <= written <= 2 * _blocks(fo_writes + orig_writes)
            assert not dk.instance_exists(prod_name)
            assert cat.get_protection(p).state == ProtectionState.PROTECTING

            # ---- replication resumes incrementally from the failed-back disks, and its
            # next point (the original at that instant) holds exactly what the failed-over
            # side held: the original's own writes after the point are gone.
            vm.disks = failed_over.disks
            sk.write(vm, 0, 28 * MiB, _data(30, G))
            st = await sync_now(handle)
            after = cat.get_point(st.last_point_id or "")
            assert after.kind == ChangeKind.INCREMENTAL, after
            assert _point_sha(cat, after) == vm.sha256()
        finally:
            for name in (prod_name, test_name):
                dk.remove_vm(name)
