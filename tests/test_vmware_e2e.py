"""VMware -> KVM through the real workflows: the Temporal dev server, a worker process,
the vCenter simulator (tests/harness/vcsim.py) as the source and the local qcow2-chain
KVM target. Each point must be byte-identical to the VM's disk at its snapshot, an
incremental cycle must copy exactly the changed areas, and a CBT reset must resync
writing only the blocks that differ."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

from pyVim.connect import Disconnect

from tests.harness.protect import (
    add_kvm_platforms,
    images_identical,
    point_path,
    protection_spec,
    start_protection,
    sync_now,
    wait_first_point,
)
from tests.harness.stack import Stack
from tests.harness.vcsim import VcSim, create_vm, current_file, leftover_servers, snapshot_names, vcsim, write
from transcend.models import ChangeKind, PlatformKind, PlatformSpec

MiB = 1 << 20
G = 64 * 1024
DISK = 64 * MiB


def _data(seed: int, n: int) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def test_vmware_to_kvm_full_incremental_and_resync(stack: Stack, tmp_path: Path) -> None:
    with vcsim(tmp_path / "vcsim") as sim:
        asyncio.run(_replicate(stack, sim, tmp_path))


async def _replicate(stack: Stack, sim: VcSim, tmp_path: Path) -> None:
    cat = stack.catalog()
    cat.add_platform(PlatformSpec(
        name="vcenter", kind=PlatformKind.VMWARE, site="local",
        config={"host": sim.host, "port": sim.port, "thumbprint": sim.thumbprint},
        secret={"user": sim.user, "password": sim.password}), replace=True)
    _, target = add_kvm_platforms(cat, tmp_path / "replicas")
    si = sim.connect()
    try:
        vm = create_vm(si, sim, size=DISK, name=f"web-{os.getpid()}")
        disk = current_file(sim, vm)
        write(disk, 0, _data(1, 2 * MiB))
        write(disk, 40 * MiB + 4096, _data(2, 100_000))
        expected = tmp_path / "expected.raw"
        shutil.copyfile(disk, expected)

        client = await stack.client()
        handle = await start_protection(client, protection_spec("web", vm.name, "vcenter", target))
        st = await wait_first_point(handle, 300)
        assert st.cycles_failed == 0, st.last_error
        first = cat.get_point(st.last_point_id or "")
        assert first.kind == ChangeKind.FULL
        same, text = images_identical(point_path(first), expected)
        assert same, text
        assert vm.config.changeTrackingEnabled  # turned on by the first cycle
        assert snapshot_names(vm) == []  # released

        # Incremental: exactly the changed 64 KiB blocks travel.
        disk = current_file(sim, vm)
        write(disk, 8 * MiB, _data(3, G))
        write(disk, 30 * MiB + G - 10, _data(4, 20))  # straddles two blocks
        shutil.copyfile(disk, expected)
        st = await sync_now(handle)
        second = cat.get_point(st.last_point_id or "")
        assert second.kind == ChangeKind.INCREMENTAL, second
        assert second.bytes_written == 3 * G, second.bytes_written
        same, text = images_identical(point_path(second), expected)
        assert same, text
        same, _ = images_identical(point_path(first), expected)
        assert not same  # the first point is untouched

        # The datastore fills up while snapshotting: the cycle fails with the reason, no
        # point is recorded, no snapshot is left, and the next cycle still has every change.
        write(current_file(sim, vm), 12 * MiB, _data(6, G))
        sim.inject_fault("CreateSnapshot_Task", "NoDiskSpace", vm=vm._moId,
                         fields={"datastore": sim.datastore})
        st = await sync_now(handle)
        assert st.cycles_failed == 1 and st.last_point_id == second.id, st
        assert "datastore is full" in st.last_error, st.last_error
        assert snapshot_names(vm) == []
        disk = current_file(sim, vm)
        shutil.copyfile(disk, expected)
        st = await sync_now(handle)
        assert st.cycles_failed == 1 and st.last_point_id != second.id, st
        retried = cat.get_point(st.last_point_id or "")
        assert retried.kind == ChangeKind.INCREMENTAL and retried.bytes_written == G
        same, text = images_identical(point_path(retried), expected)
        assert same, text

        # CBT reset: the saved changeId is rejected; the whole disk is compared and only
        # the one block that differs is written.
        sim.cbt_reset(vm._moId)
        disk = current_file(sim, vm)
        write(disk, 50 * MiB, _data(5, G))
        shutil.copyfile(disk, expected)
        st = await sync_now(handle)
        assert st.cycles_failed == 1 and not st.last_error, st.last_error
        third = cat.get_point(st.last_point_id or "")
        assert third.kind == ChangeKind.RESYNC, third
        assert third.bytes_written == G, third.bytes_written
        same, text = images_identical(point_path(third), expected)
        assert same, text
        assert snapshot_names(vm) == []
        cycles = [c for c in cat.cycles("web") if c.status == "committed"]
        assert leftover_servers() == []  # every NBD server stopped with its activity
        assert len(cycles) == 4
    finally:
        Disconnect(si)
