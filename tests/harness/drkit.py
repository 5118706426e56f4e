"""Platform kits for the DR matrix (tests/test_dr_matrix.py).

A kit is what a test needs to put one platform on either side of a protection
without knowing the others: register it in the catalog (one platform entry serves
as source and as target, because failback reads the failed-over VM with the target
platform's Source), make a VM with small disks, write to a VM's disks the way its
guest would (so the platform's change tracking sees it), write to a recovered
instance, and find out whether an instance still exists. Everything the test then
checks goes through the product (points read back through the Target's ``open``,
the original's disks through its Source's ``open_disks``), compared with a model of
the bytes the test wrote.

* KVM: a TCG domain with blank qcow2 disks on IDE and no OS (the firmware idles
  looking for a boot device, which is all replication needs); writes while it runs
  go through QEMU's block layer (the monitor's ``qemu-io``), writes while it is off
  through ``qemu-io`` on the image, so the persistent dirty bitmaps record both.
* VMware: a VM in the vCenter simulator; writes go into its current disk backing's
  data file (the simulator's CBT model sees every written block).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import libvirt
import libvirt_qemu

from tests.harness.libvirtd import DiskSpec, domain_xml, remove_domain_if_exists
from transcend.catalog import Catalog
from transcend.models import Instance, PlatformKind, PlatformSpec

MiB = 1 << 20


@dataclass
class Vm:
    """A VM a kit made, with the test's model of each disk's bytes."""

    name: str
    disks: list[bytearray]
    handle: Any = field(default=None, repr=False)

    def sha256(self) -> list[str]:
        return [hashlib.sha256(d).hexdigest() for d in self.disks]


def apply(model: bytearray, offset: int, data: bytes) -> None:
    model[offset:offset + len(data)] = data


class Kit(Protocol):
    kind: str

    def add_platform(self, cat: Catalog, name: str) -> None: ...

    def make_vm(self, name: str, sizes: list[int]) -> Vm: ...

    def write(self, vm: Vm, disk: int, offset: int, data: bytes) -> None:
        """As the guest would, running or off (the model is updated too)."""
        ...

    def write_instance(self, instance: Instance, disk: int, offset: int, data: bytes) -> None:
        """Into a recovered instance's disk; the kit may power it off first."""
        ...

    def read(self, vm: Vm) -> list[str]:
        """sha256 of each disk of the VM as it is now (to compare with the model)."""
        ...

    def instance_exists(self, name: str) -> bool: ...

    def remove_vm(self, name: str) -> None:
        """Remove a VM or instance the test made or left behind (cleanup)."""
        ...


# --------------------------------------------------------------------------- KVM


def _qemu_io_offline(image: str, offset: int, data: bytes) -> None:
    tmp = Path(image).parent / f".write-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    try:
        with open(image, "rb") as f:
            fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
        subprocess.run(["qemu-io", "-f", fmt, "-c",
                        f"write -q -s {tmp} {offset} {len(data)}", image],
                       check=True, capture_output=True, text=True)
    finally:
        tmp.unlink(missing_ok=True)


def _domain_images(dom: libvirt.virDomain) -> list[str]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(dom.XMLDesc(0))
    return [s.get("file", "") for s in root.findall("devices/disk[@device='disk']/source")]


class KvmKit:
    kind = "kvm"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conn = libvirt.open("qemu:///system")
        self.made: list[str] = []

    def add_platform(self, cat: Catalog, name: str) -> None:
        cat.add_platform(PlatformSpec(
            name=name, kind=PlatformKind.KVM, site="local",
            config={"uri": "qemu:///system", "root": str(self.root / name / "replicas"),
                    "work_dir": str(self.root / name / "work"), "domain_type": "qemu"}),
            replace=True)

    def make_vm(self, name: str, sizes: list[int], *, model: bool = True) -> Vm:
        """``model=False``: no in-memory copy of the disks (a benchmark's terabyte)."""
        d = self.root / "vms" / name
        d.mkdir(parents=True, exist_ok=True)
        specs = []
        for i, size in enumerate(sizes):
            image = d / f"disk{i}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                           check=True)
            specs.append(DiskSpec(path=image, target=f"hd{'abcd'[i]}", bus="ide"))
        remove_domain_if_exists(name, self.conn)
        dom = self.conn.defineXML(domain_xml(name, specs, d / "console.log", memory_mib=64))
        dom.create()
        self.made.append(name)
        return Vm(name=name, disks=[bytearray(s) for s in sizes] if model else [], handle=dom)

    def write(self, vm: Vm, disk: int, offset: int, data: bytes) -> None:
        dom = self.conn.lookupByName(vm.name)
        if vm.disks:
            apply(vm.disks[disk], offset, data)
        if not dom.isActive():
            _qemu_io_offline(_domain_images(dom)[disk], offset, data)
            return
        # Through the IDE disk's own block backend (-d: by qdev id), so QEMU's dirty
        # bitmaps see it like a guest write; a pattern write needs one byte value.
        tmp = self.root / f".w-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        try:
            out = libvirt_qemu.qemuMonitorCommand(
                dom, f'qemu-io -d ide0-{disk // 2}-{disk % 2} "write -s {tmp} {offset} {len(data)}"',
                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        finally:
            tmp.unlink(missing_ok=True)
        if out.strip():
            raise RuntimeError(f"qemu-io write failed: {out!r}")

    def read(self, vm: Vm) -> list[str]:
        """sha256 of each of the VM's disks as they are now (not the model)."""
        out = []
        for image in _domain_images(self.conn.lookupByName(vm.name)):
            raw = self.root / f".r-{uuid.uuid4().hex}"
            try:
                subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(raw)],
                               check=True, capture_output=True)
                out.append(hashlib.sha256(raw.read_bytes()).hexdigest())
            finally:
                raw.unlink(missing_ok=True)
        return out

    def write_instance(self, instance: Instance, disk: int, offset: int, data: bytes) -> None:
        dom = self.conn.lookupByUUIDString(instance.id)
        if dom.isActive():
            # Gracefully: QEMU stores the persistent bitmaps (the failback's tracking).
            dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        _qemu_io_offline(_domain_images(dom)[disk], offset, data)

    def instance_exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
            return True
        except libvirt.libvirtError:
            return False

    def remove_vm(self, name: str) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            dom = self.conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

    def close(self) -> None:
        for name in self.made:
            self.remove_vm(name)
        self.conn.close()


# --------------------------------------------------------------------------- VMware


class VmwareKit:
    kind = "vmware"

    def __init__(self, sim: Any, si: Any) -> None:
        self.sim = sim
        self._si = si
        self.made: list[str] = []

    @property
    def si(self) -> Any:
        """The session, logged in again when the simulator dropped its idle connection
        (a DR flow leaves it unused for a minute)."""
        try:
            self._si.CurrentTime()
        except Exception:
            self._si = self.sim.connect()
        return self._si

    def add_platform(self, cat: Catalog, name: str) -> None:
        sim = self.sim
        cat.add_platform(PlatformSpec(
            name=name, kind=PlatformKind.VMWARE, site="local",
            config={"host": sim.host, "port": sim.port, "thumbprint": sim.thumbprint,
                    "datastore": sim.datastore, "writer": "file",
                    "datastore_mounts": {sim.datastore: str(sim.dir)},
                    "replica_prefix": f"transcend-replica-{name}-"},
            secret={"user": sim.user, "password": sim.password}), replace=True)

    def make_vm(self, name: str, sizes: list[int]) -> Vm:
        from tests.harness.vcsim import create_vm

        if len(sizes) != 1:
            raise ValueError("the simulator kit makes one-disk VMs")
        vm = create_vm(self.si, self.sim, size=sizes[0], name=name)
        self.made.append(name)
        return Vm(name=name, disks=[bytearray(s) for s in sizes], handle=vm)

    def _vm(self, name: str) -> Any:
        from pyVmomi import vim

        view = self.si.content.viewManager.CreateContainerView(
            self.si.content.rootFolder, [vim.VirtualMachine], True)
        try:
            for vm in view.view:
                if vm.name == name:
                    return vm
        finally:
            view.Destroy()
        return None

    def _file(self, vm: Any, disk: int) -> Path:
        files = list(self.sim.disk_files(vm._moId).values())
        return Path(files[disk])

    def write(self, vm: Vm, disk: int, offset: int, data: bytes) -> None:
        from tests.harness.vcsim import write

        apply(vm.disks[disk], offset, data)
        write(self._file(self._vm(vm.name), disk), offset, data)

    def read(self, vm: Vm) -> list[str]:
        """sha256 of each of the VM's disks as they are now: its current data files."""
        files = self.sim.disk_files(self._vm(vm.name)._moId).values()
        return [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]

    def write_instance(self, instance: Instance, disk: int, offset: int, data: bytes) -> None:
        from tests.harness.vcsim import write

        write(self._file(self._vm(instance.name), disk), offset, data)

    def instance_exists(self, name: str) -> bool:
        return self._vm(name) is not None

    def remove_vm(self, name: str) -> None:
        from pyVim.task import WaitForTask

        vm = self._vm(name)
        if vm is None:
            return
        with contextlib.suppress(Exception):
            if vm.runtime.powerState == "poweredOn":
                WaitForTask(vm.PowerOffVM_Task())
        with contextlib.suppress(Exception):
            WaitForTask(vm.Destroy_Task())

    def close(self) -> None:
        for name in self.made:
            self.remove_vm(name)


@contextlib.contextmanager
def kit(kind: str, tmp: Path, vsphere: tuple[Any, Any] | None) -> Iterator[Any]:
    if kind == "kvm":
        k = KvmKit(tmp / "kvm")
        try:
            yield k
        finally:
            k.close()
    elif kind == "vmware":
        assert vsphere is not None
        v = VmwareKit(*vsphere)
        try:
            yield v
        finally:
            v.close()
    else:
        raise ValueError(f"no DR kit for {kind!r}")


def vm_name(kind: str, role: str) -> str:
    return f"mx-{kind}-{role}-{os.getpid() % 100000}"
