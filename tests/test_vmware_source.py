"""The VMware source connector against the vCenter simulator (tests/harness/vcsim.py):
CBT enabling, snapshots as the frozen instant, changed areas by changeId, the
datastore-endpoint export read back byte for byte, lost tracking -> resync, and the
errors an operator gets for bad input. Every comparison is of bytes or real states."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect
from pyVmomi import vim

from connectors.base import ConnectorError, NotFound, PermanentError
from connectors.registry import source_for
from connectors.vmware.export import CurlSource, VddkSource, nbdkit_command, vddk_thumbprint
from connectors.vmware.session import TlsChoice
from connectors.vmware.source import VmwareSource
from connectors.vmware.vmdk import parse_descriptor
from tests.harness.vcsim import VcSim, create_vm, current_file, snapshot, snapshot_names, write
from transcend.models import ChangeKind, Checkpoint, FreezeOptions, PlatformInfo, PlatformKind

MiB = 1 << 20
G = 64 * 1024
DISK = 32 * MiB


@pytest.fixture(autouse=True)
def _reset(sim: VcSim) -> Iterator[None]:
    yield
    sim.clear_faults()
    sim.set_page_limit(64)


def platform(sim: VcSim, **config: Any) -> PlatformInfo:
    cfg = {"host": sim.host, "port": sim.port, "thumbprint": sim.thumbprint, **config}
    return PlatformInfo(name="vc", kind=PlatformKind.VMWARE, site="local", config=cfg)


def source(sim: VcSim, password: str | None = None, **config: Any) -> VmwareSource:
    src = source_for(platform(sim, **config),
                     {"user": sim.user, "password": sim.password if password is None else password})
    assert isinstance(src, VmwareSource)
    return src


def read_export(uri: str, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


def data(seed: int, n: int) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def blocks(regions: list[tuple[int, int]]) -> set[int]:
    return {b for off, n in regions for b in range(off // G, (off + n - 1) // G + 1)}


def extent_blocks(cs: Any, zero: bool = False) -> set[int]:
    return blocks([(e.offset, e.length) for e in cs.extents if e.zero == zero])


def test_inventory_describes_the_vm(sim: VcSim, si: Any) -> None:
    vm = create_vm(si, sim, size=DISK, name=f"inv-{os.getpid()}")
    src = source(sim)
    try:
        wl = src.workload(vm.name)
        assert wl.ref.id == vm.config.instanceUuid and wl.name == vm.name
        assert (wl.cpus, wl.memory_mib, wl.firmware, wl.guest_os) == (1, 64, "bios", "otherGuest64")
        key = next(d.key for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
        assert [(d.id, d.size, d.bus, d.controller, d.device_key) for d in wl.disks] == [
            ("scsi0-0", DISK, "scsi", "lsilogic:0", key)]
        assert wl.disks[0].source.endswith(".vmdk") and wl.disks[0].boot_order == 1
        assert src.workload(wl.ref.id).name == vm.name  # by instance UUID too
        assert vm.name in [w.name for w in src.inventory()]
        with pytest.raises(NotFound, match="no VM 'nope'"):
            src.workload("nope")
    finally:
        src.close()


def test_bad_credentials_and_certificate_choices(sim: VcSim) -> None:
    with pytest.raises(PermanentError, match="refused the login"):
        source(sim, password="wrong").inventory()
    with pytest.raises(PermanentError, match="does not match the configured thumbprint"):
        source(sim, thumbprint="00" * 20).inventory()
    with pytest.raises(PermanentError, match="exactly one of"):
        TlsChoice.from_config({"host": "h"}, "vc")
    with pytest.raises(PermanentError, match="exactly one of"):
        TlsChoice.from_config({"thumbprint": "ab" * 20, "insecure": True}, "vc")
    # A session logged in by another tool: used, and not logged out by us.
    other = sim.connect()
    cookie = str(other._stub.cookie)
    session_id = cookie.split("=", 1)[1].split(";", 1)[0].strip('"')
    borrowed = source_for(platform(sim), {"session": session_id})
    assert isinstance(borrowed, VmwareSource) and borrowed.inventory() is not None
    assert borrowed.s().user == sim.user
    borrowed.close()
    assert other.content.sessionManager.currentSession is not None  # still logged in
    Disconnect(other)
    with pytest.raises(PermanentError, match="not logged in"):
        source_for(platform(sim), {"session": session_id}).inventory()
    assert TlsChoice.from_config({"insecure": "true"}, "vc").insecure  # --config insecure=true
    assert not TlsChoice.from_config({"ca_file": "/ca.pem", "insecure": "false"}, "vc").insecure
    # insecure really skips verification: the self-signed simulator is reachable.
    src = source(sim, thumbprint="", insecure="true")
    assert src.inventory() is not None
    src.close()


def test_full_incremental_and_resync_cycles(sim: VcSim, si: Any, tmp_path: Path) -> None:
    vm = create_vm(si, sim, size=DISK, name=f"cbt-{os.getpid()}")
    assert not vm.config.changeTrackingEnabled
    disk = current_file(sim, vm)
    write(disk, 0, data(1, 3 * G))
    write(disk, 10 * MiB + 100, data(2, 5000))  # unaligned: rounds out to its 64 KiB blocks
    src = source(sim)

    # Cycle 1: CBT turned on (and activated), a snapshot, every allocated block.
    wl = src.workload(vm.name)
    frozen = src.freeze("web", "c1", [wl], {}, FreezeOptions())
    assert vm.config.changeTrackingEnabled
    assert snapshot_names(vm) == ["transcend-web-c1"]
    assert frozen.handle.kinds == {"scsi0-0": ChangeKind.FULL}
    assert frozen.handle.consistency == "crash"  # no VMware Tools in the simulator
    cs = frozen.changes("scsi0-0")
    assert extent_blocks(cs) == blocks([(0, 3 * G), (10 * MiB + 100, 5000)])
    expected = disk.read_bytes()
    ep = frozen.export("scsi0-0")
    assert ep.size == DISK and not ep.writable
    # The guest goes on writing to the snapshot's delta: the frozen instant does not move.
    write(current_file(sim, vm), 0, b"\xff" * G)
    assert read_export(ep.uri, tmp_path / "c1.raw") == expected
    frozen.close()
    cps = {c.disk: c for c in frozen.new_checkpoints()}
    assert cps["scsi0-0"].token and cps["scsi0-0"].identity.startswith(vm.config.instanceUuid)
    frozen.release(committed=True)
    assert snapshot_names(vm) == []

    # Cycle 2: only the blocks written since, across several pages of answers.
    sim.set_page_limit(1)
    disk = current_file(sim, vm)
    write(disk, 5 * MiB, data(3, G))
    write(disk, 20 * MiB + G // 2, data(4, G))
    frozen = src.reopen(src.freeze("web", "c2", [wl], cps, FreezeOptions()).handle)
    assert frozen.handle.kinds == {"scsi0-0": ChangeKind.INCREMENTAL}
    cs = frozen.changes("scsi0-0")
    assert extent_blocks(cs) == blocks([(0, G), (5 * MiB, G), (20 * MiB + G // 2, G)])
    assert cs.summary.data_bytes == 4 * G
    expected = disk.read_bytes()
    assert read_export(frozen.export("scsi0-0").uri, tmp_path / "c2.raw") == expected
    frozen.release(committed=True)
    cps2 = {c.disk: c for c in frozen.new_checkpoints()}

    # A changeId of this epoch that vSphere does not know: resync, not a guess.
    bogus = cps2["scsi0-0"].model_copy(update={"token": cps2["scsi0-0"].token.rsplit("/", 1)[0] + "/999"})
    frozen = src.freeze("web", "c3", [wl], {"scsi0-0": bogus}, FreezeOptions())
    assert frozen.handle.kinds == {"scsi0-0": ChangeKind.RESYNC}
    assert "rejected the saved changeId" in frozen.handle.reasons["scsi0-0"]
    cs = frozen.changes("scsi0-0")
    assert sum(e.length for e in cs.extents) == DISK  # the whole disk, compared block by block
    assert extent_blocks(cs) >= blocks([(0, 3 * G)])
    frozen.release(committed=False)

    # CBT reset: a new epoch, the saved changeId is from the old one.
    sim.cbt_reset(vm._moId)
    frozen = src.freeze("web", "c4", [wl], cps2, FreezeOptions())
    assert frozen.handle.kinds == {"scsi0-0": ChangeKind.RESYNC}
    assert "CBT was reset" in frozen.handle.reasons["scsi0-0"]
    frozen.release(committed=False)

    # A resized disk: the checkpoint's identity no longer matches.
    grown = cps2["scsi0-0"].model_copy(update={"identity": cps2["scsi0-0"].identity.replace(
        f"|{DISK}|", f"|{DISK // 2}|")})
    frozen = src.freeze("web", "c5", [wl], {"scsi0-0": grown}, FreezeOptions())
    assert "resized" in frozen.handle.reasons["scsi0-0"]
    frozen.release(committed=False)
    assert snapshot_names(vm) == []
    src.close()


def test_refusals_leave_no_snapshot(sim: VcSim, si: Any) -> None:
    vm = create_vm(si, sim, size=DISK, name=f"ref-{os.getpid()}")
    src = source(sim)
    wl = src.workload(vm.name)
    # A failed snapshot task: a clear error and nothing left behind.
    sim.inject_fault("CreateSnapshot_Task", "SnapshotFault", vm=vm._moId, count=5)
    with pytest.raises(ConnectorError, match=f"VM '{vm.name}'.* failed: SnapshotFault"):
        src.freeze("web", "f1", [wl], {}, FreezeOptions())
    sim.clear_faults()
    assert [n for n in snapshot_names(vm) if n.startswith("transcend-web")] == []
    # Datastore full while snapshotting.
    sim.inject_fault("CreateSnapshot_Task", "NoDiskSpace", vm=vm._moId,
                     fields={"datastore": sim.datastore})
    with pytest.raises(PermanentError, match="datastore is full"):
        src.freeze("web", "f2", [wl], {}, FreezeOptions())
    assert [n for n in snapshot_names(vm) if n.startswith("transcend-web")] == []
    # An operator's own snapshot: the base disk is no longer the frozen instant.
    snapshot(vm, "before-upgrade")
    with pytest.raises(PermanentError, match=r"other snapshots .*before-upgrade.*VDDK"):
        src.freeze("web", "f3", [wl], {}, FreezeOptions())
    assert snapshot_names(vm) == ["before-upgrade"]
    # A group: vSphere has no multi-VM instant.
    with pytest.raises(PermanentError, match="one VM per protection"):
        src.freeze("web", "f4", [wl, wl], {}, FreezeOptions())
    src.close()


def test_stale_snapshot_of_a_dead_cycle_is_removed(sim: VcSim, si: Any) -> None:
    vm = create_vm(si, sim, size=DISK, name=f"stale-{os.getpid()}")
    src = source(sim)
    wl = src.workload(vm.name)
    first = src.freeze("web", "old", [wl], {}, FreezeOptions())  # the worker "dies" here
    again = src.freeze("web", "old", [wl], {}, FreezeOptions())  # a retry reuses it
    assert again.handle.data["snapshot"] == first.handle.data["snapshot"]
    frozen = src.freeze("web", "new", [wl], {}, FreezeOptions())
    assert snapshot_names(vm) == ["transcend-web-new"]
    frozen.release(committed=False)
    frozen.release(committed=False)  # idempotent
    assert snapshot_names(vm) == []
    src.close()


def test_nbdkit_command_lines(tmp_path: Path) -> None:
    curl = nbdkit_command(CurlSource(url="https://vc:443/folder/a-flat.vmdk?dcPath=DC&dsName=ds",
                                     cookie_file=tmp_path / "cookie", verify=False), tmp_path / "s")
    assert curl[:7] == ["nbdkit", "--readonly", "--exit-with-parent", "--foreground", "--unix",
                        str(tmp_path / "s"), "--filter=retry"]
    assert "curl" in curl and f"cookie=+{tmp_path / 'cookie'}" in curl and "sslverify=false" in curl
    assert not any("vmware_soap_session" in a for a in curl)  # secrets only in files
    ca = nbdkit_command(CurlSource(url="https://x/", cookie_file=tmp_path / "c", ca_file="/ca.pem"),
                        tmp_path / "s")
    assert "cainfo=/ca.pem" in ca and "sslverify=false" not in ca
    vddk = nbdkit_command(VddkSource(
        libdir="/opt/vmware-vix-disklib-distrib", server="vc.example", user="backup@vsphere.local",
        password_file=tmp_path / "pw", thumbprint=vddk_thumbprint("ab" * 20), vm_moref="vm-42",
        snapshot_moref="snapshot-7", file="[ds1] web/web.vmdk", port=8443), tmp_path / "s")
    assert vddk[7:] == [
        "vddk", "libdir=/opt/vmware-vix-disklib-distrib", "server=vc.example",
        "user=backup@vsphere.local", f"password=+{tmp_path / 'pw'}",
        "thumbprint=" + ":".join(["AB"] * 20), "vm=moref=vm-42", "snapshot=snapshot-7",
        "file=[ds1] web/web.vmdk", "transports=nbdssl:nbd", "port=8443"]
    with pytest.raises(PermanentError, match="SHA-1"):
        vddk_thumbprint("ab" * 32)


def test_descriptor_parsing() -> None:
    flat = parse_descriptor('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                            'createType="vmfs"\n\n# Extent description\nRW 65536 VMFS "web-flat.vmdk"\n',
                            "web.vmdk")
    assert flat.flat and flat.size == 32 * MiB and flat.extents[0].file == "web-flat.vmdk"
    delta = parse_descriptor('createType="seSparse"\nparentFileNameHint="web.vmdk"\n'
                             'RW 65536 SESPARSE "web-000001-sesparse.vmdk"\n', "web-000001.vmdk")
    assert not delta.flat and delta.parent_hint == "web.vmdk"
    with pytest.raises(ConnectorError, match="not a VMDK text descriptor"):
        parse_descriptor("\x00\x01KDMV binary", "x.vmdk")
    assert Checkpoint(disk="scsi0-0", token="52 aa/3").token.endswith("/3")
