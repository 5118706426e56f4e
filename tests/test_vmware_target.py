"""KVM -> VMware through the real workflows: a running KVM domain (written through
QEMU's block layer, tests/harness/conformance.py) replicated to a replica VM in the
vCenter simulator. The replica VM gets the source's shape, each point is a snapshot
whose disk holds exactly the source's bytes at the freeze, retention removes old
snapshots without changing newer points, and a point boots as a linked clone.

The replica's disks are written by qemu-nbd over their data files in the simulator's
datastore (writer "file"), standing in for nbdkit-vddk, whose command line is
unit-tested in tests/test_vmware_source.py."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect
from pyVmomi import vim

from connectors.registry import target_for
from connectors.vmware.target import VmwareTarget
from tests.harness.conformance import DISK_SIZE, kvm_under_test
from tests.harness.libvirtd import ensure_libvirtd
from tests.harness.protect import (
    protection_spec,
    start_protection,
    sync_now,
    wait_first_point,
    wait_phase,
)
from tests.harness.stack import Stack
from tests.harness.vcsim import VcSim, leftover_servers, snapshot_names, vcsim
from transcend import api
from transcend.models import BootSpec, PlatformKind, PlatformSpec, RecoveryPoint

G = 64 * 1024
MiB = 1 << 20


def _point_bytes(target: VmwareTarget, point: RecoveryPoint, out: Path) -> bytes:
    """A point's disk as the target serves it (``open``), read whole."""
    ep = target.open(point, point.disks[0].disk)
    try:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", ep.uri, str(out)],
                       check=True, capture_output=True)
        return out.read_bytes()
    finally:
        target.close(point, point.disks[0].disk)


def test_kvm_to_vmware_points_are_snapshots(stack: Stack, tmp_path: Path) -> None:
    ensure_libvirtd()
    with vcsim(tmp_path / "vcsim") as sim, kvm_under_test(tmp_path / "kvm") as kvm:
        asyncio.run(_replicate(stack, sim, kvm, tmp_path))


async def _replicate(stack: Stack, sim: VcSim, kvm: Any, tmp_path: Path) -> None:
    cat = stack.catalog()
    src = kvm.source.info
    cat.add_platform(PlatformSpec(name=src.name, kind=src.kind, site=src.site, config=src.config),
                     replace=True)
    vc_config = {"host": sim.host, "port": sim.port, "thumbprint": sim.thumbprint,
                 "datastore": sim.datastore, "writer": "file",
                 "datastore_mounts": {sim.datastore: str(sim.dir)}}
    cat.add_platform(PlatformSpec(name="vcenter", kind=PlatformKind.VMWARE, site="local",
                                  config=vc_config,
                                  secret={"user": sim.user, "password": sim.password}),
                     replace=True)
    expected = bytearray(DISK_SIZE)

    def write(offset: int, length: int, pattern: int) -> None:
        kvm.write(offset, length, pattern)
        expected[offset:offset + length] = bytes([pattern]) * length

    write(0, 3 * G, 0x11)
    write(9 * MiB + 100, 5000, 0x22)
    client = await stack.client()
    spec = protection_spec("db", kvm.workload.name, src.name, "vcenter", retention="all 1s")
    handle = await start_protection(client, spec)
    st = await wait_first_point(handle, 300)
    assert st.cycles_failed == 0, st.last_error
    first = cat.get_point(st.last_point_id or "")
    first_bytes = bytes(expected)

    si = sim.connect()
    target = target_for(cat.get_platform("vcenter"), {"user": sim.user, "password": sim.password})
    assert isinstance(target, VmwareTarget)
    try:
        replica = next(v for v in _all_vms(si) if v.name == "transcend-replica-db")
        # The source's shape, powered off, marked, one snapshot per point on a base.
        assert replica.config.hardware.numCPU == kvm.workload.cpus
        assert replica.config.hardware.memoryMB == kvm.workload.memory_mib
        disks = [d for d in replica.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        assert [int(d.capacityInBytes or 0) for d in disks] == [DISK_SIZE]
        assert str(replica.runtime.powerState) == "poweredOff"
        assert "transcend replica of protection db" in replica.config.annotation
        assert snapshot_names(replica) == ["transcend-base", f"transcend-point-{first.id}"]
        assert _point_bytes(target, first, tmp_path / "p1.raw") == first_bytes

        # An incremental point; retention ("all 1s") removes the first snapshot and the
        # second point keeps its bytes.
        write(3 * G - 512, 1024, 0x33)
        write(20 * MiB, G, 0x44)
        await asyncio.sleep(1.5)
        st = await sync_now(handle)
        assert st.cycles_failed == 0, st.last_error
        second = cat.get_point(st.last_point_id or "")
        assert second.bytes_written <= 3 * G, second.bytes_written
        replica = next(v for v in _all_vms(si) if v.name == "transcend-replica-db")
        for _ in range(50):
            if snapshot_names(replica) == ["transcend-base", f"transcend-point-{second.id}"]:
                break
            await asyncio.sleep(0.2)
        assert snapshot_names(replica) == ["transcend-base", f"transcend-point-{second.id}"]
        assert [p.id for p in cat.points("db")] == [second.id]
        assert _point_bytes(target, second, tmp_path / "p2.raw") == bytes(expected)

        # Boot: a linked clone of the point, powered on; destroy removes it and only it.
        inst = target.boot(second, BootSpec(name="db-test"))
        clone = next(v for v in _all_vms(si) if v.name == "db-test")
        assert str(clone.runtime.powerState) == "poweredOn"
        files = sim.disk_files(clone._moId)
        assert [p.read_bytes() for p in files.values()] == [bytes(expected)]
        target.destroy(inst)
        assert "db-test" not in [v.name for v in _all_vms(si)]
        assert snapshot_names(replica) == ["transcend-base", f"transcend-point-{second.id}"]

        # A test failover through the workflow: the clone runs, the RTO is measured, the
        # cleanup signal removes the clone and leaves the point alone.
        tf = await client.start_workflow(
            api.TEST_FAILOVER_WORKFLOW, api.TestFailoverInput(protection="db", keep_seconds=3600),
            id=api.test_failover_id("db"), task_queue=api.CONTROL_TASK_QUEUE,
            result_type=api.TestFailoverStatus)
        await wait_phase(tf, api.TestFailoverStatus, {"running"}, 120)
        clone = next(v for v in _all_vms(si) if v.name == "db-test")
        assert str(clone.runtime.powerState) == "poweredOn"
        await tf.signal("cleanup")
        done = await tf.result()
        assert done.phase == "done" and done.rto_seconds is not None and done.rto_seconds > 0
        assert "db-test" not in [v.name for v in _all_vms(si)]
        assert snapshot_names(replica) == ["transcend-base", f"transcend-point-{second.id}"]
        assert _point_bytes(target, second, tmp_path / "p2b.raw") == bytes(expected)
        assert leftover_servers() == []  # every NBD server stopped with its activity
    finally:
        target.close_session()
        Disconnect(si)


def _all_vms(si: Any) -> list[Any]:
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()
