"""Sources and targets under test for the shared connector conformance suite
(tests/test_conformance.py; the checks are the library connectors/conformance/).

Each platform provides the same small thing: a Source connector, one VM with one
disk, and a way to write to that disk *as the guest would* while the VM runs:

* KVM: a TCG domain with an empty qcow2 disk (no OS: the firmware loops looking for
  a boot device, which is all the suite needs) and writes through QEMU's block layer
  with the monitor's ``qemu-io`` command, so QEMU's dirty tracking sees them like
  guest writes;
* VMware: a VM in the vCenter simulator, written in the data file of its current
  disk backing (after a snapshot, the delta: the frozen base does not change);
* AWS: an EC2 instance on the local EC2 + EBS direct model (tests/harness/aws/) with
  one 1 GiB volume (EBS's smallest), written in the file behind the volume.

Targets need no VM: the KVM target keeps qcow2 chains in a directory; the VMware
target keeps a replica VM in the simulator, its disks written by qemu-nbd over their
data files (writer "file", standing in for VDDK).

The suite then checks the contracts using nothing but the contracts themselves
(exports, change sets, checkpoints, staging, points), like rclone's fstest does for
its backends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from connectors.base import Source, Target
from connectors.conformance import SourceUnderTest
from connectors.registry import source_for, target_for
from tests.harness.libvirtd import DiskSpec, running_domain, traversable
from transcend.models import DiskId, PlatformInfo, PlatformKind, Workload

MiB = 1 << 20
DISK_SIZE = 32 * MiB


@dataclass
class KvmUnderTest:
    kind: str
    source: Source
    workload: Workload
    disk: DiskId
    dom: libvirt.virDomain = field(repr=False)

    def write(self, offset: int, length: int, pattern: int) -> None:
        # Through the disk device's own block backend (-d: by qdev id; an IDE disk,
        # because virtio-blk's backend hangs off an unnamed child device): QEMU's dirty
        # bitmaps see these writes like a guest's.
        out = libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d ide0-0-0 "write -P {pattern:#x} {offset} {length}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        # qemu-io reports success on QEMU's stderr (the domain log); the monitor answers
        # only errors.
        if out.strip():
            raise RuntimeError(f"qemu-io write failed: {out!r}")


@dataclass
class VmwareUnderTest:
    kind: str
    source: Source
    workload: Workload
    disk: DiskId
    sim: Any = field(repr=False)
    vm: Any = field(repr=False)

    def write(self, offset: int, length: int, pattern: int) -> None:
        from tests.harness.vcsim import current_file, write

        write(current_file(self.sim, self.vm), offset, bytes([pattern]) * length)


@contextlib.contextmanager
def kvm_under_test(tmp: Path) -> Iterator[KvmUnderTest]:
    tmp.mkdir(parents=True, exist_ok=True)
    image = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE)],
                   check=True)
    name = f"transcend-conf-{os.getpid()}"
    info = PlatformInfo(name="kvm-src", kind=PlatformKind.KVM, site="local",
                        config={"uri": "qemu:///system", "work_dir": str(tmp / "work")})
    disk = DiskSpec(path=image, target="hda", bus="ide")
    with traversable(tmp), running_domain(name, disk, tmp / "console.log", memory_mib=64) as dom:
        source = source_for(info, {})
        yield KvmUnderTest(kind="kvm", source=source, workload=source.workload(name),
                           disk="hda", dom=dom)


@contextlib.contextmanager
def vmware_under_test(tmp: Path) -> Iterator[VmwareUnderTest]:
    from pyVim.connect import Disconnect

    from tests.harness.vcsim import create_vm, vcsim

    with vcsim(tmp / "vcsim") as sim:
        si = sim.connect()
        try:
            vm = create_vm(si, sim, size=DISK_SIZE, name=f"conf-{os.getpid()}")
            info = PlatformInfo(name="vcenter", kind=PlatformKind.VMWARE, site="local",
                                config={"host": sim.host, "port": sim.port,
                                        "thumbprint": sim.thumbprint})
            source = source_for(info, {"user": sim.user, "password": sim.password})
            try:
                yield VmwareUnderTest(kind="vmware", source=source,
                                      workload=source.workload(vm.name), disk="scsi0-0",
                                      sim=sim, vm=vm)
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
        finally:
            Disconnect(si)


@dataclass
class AwsUnderTest:
    kind: str
    source: Source
    workload: Workload
    disk: DiskId
    disk_size: int
    sim: Any = field(repr=False)
    volume: str = ""

    def write(self, offset: int, length: int, pattern: int) -> None:
        self.sim.write(self.volume, offset, bytes([pattern]) * length)


def aws_platform(sim: Any, name: str, tmp: Path) -> tuple[PlatformInfo, dict[str, str]]:
    """An AWS platform on the local EC2 + EBS direct model (tests/harness/aws/)."""
    info = PlatformInfo(name=name, kind=PlatformKind.AWS, site="local", config={
        "region": sim.region, "endpoint_url": sim.endpoint, "work_dir": str(tmp / "aws-work"),
        "max_attempts": 20})
    return info, {"access_key_id": sim.access_key, "secret_access_key": sim.secret_key}


@contextlib.contextmanager
def aws_under_test(tmp: Path) -> Iterator[AwsUnderTest]:
    """An EC2 instance with one 1 GiB volume (EBS's smallest) on the local model, written
    in the volume's file as the guest would."""
    from tests.harness.aws import aws_sim

    with aws_sim(tmp / "aws") as sim:
        instance = sim.make_instance(f"conf-{os.getpid()}", volume_gib=[1])
        source = source_for(*aws_platform(sim, "aws-src", tmp))
        wl = source.workload(instance)
        yield AwsUnderTest(kind="aws", source=source, workload=wl, disk=wl.disks[0].id,
                           disk_size=wl.disks[0].size, sim=sim, volume=wl.disks[0].source)


SOURCES: dict[str, Callable[[Path], contextlib.AbstractContextManager[SourceUnderTest]]] = {
    "kvm": kvm_under_test, "vmware": vmware_under_test, "aws": aws_under_test}


@contextlib.contextmanager
def kvm_target(tmp: Path) -> Iterator[Target]:
    tmp.mkdir(parents=True, exist_ok=True)
    info = PlatformInfo(name="kvm-dst", kind=PlatformKind.KVM, site="local",
                        config={"root": str(tmp / "replicas"), "domain_type": "qemu"})
    yield target_for(info, {})


@contextlib.contextmanager
def vmware_target(tmp: Path) -> Iterator[Target]:
    from tests.harness.vcsim import vcsim

    with vcsim(tmp / "vcsim") as sim:
        info = PlatformInfo(name="vcenter", kind=PlatformKind.VMWARE, site="local", config={
            "host": sim.host, "port": sim.port, "thumbprint": sim.thumbprint,
            "datastore": sim.datastore, "writer": "file",
            "datastore_mounts": {sim.datastore: str(sim.dir)}})
        target = target_for(info, {"user": sim.user, "password": sim.password})
        try:
            yield target
        finally:
            close = getattr(target, "close_session", None)
            if close is not None:
                close()


@contextlib.contextmanager
def synthetic_target(tmp: Path) -> Iterator[Target]:
    """The scale benchmark's plugin connector (tests/harness/synthetic.py): whole-image
    points behind one nbdkit. Its source generates data by generation number, so it
    cannot take arbitrary guest writes and is not among the sources."""
    from tests.harness import synthetic

    with synthetic.synthetic_servers(tmp) as srv:
        info = PlatformInfo(name="syn-dst", kind=PlatformKind.SYNTHETIC, site="local",
                            config=srv.target_config())
        yield synthetic.SyntheticTarget(info, {})


@contextlib.contextmanager
def aws_target(tmp: Path) -> Iterator[Target]:
    """Points as EBS snapshot chains on the local EBS direct model."""
    from tests.harness.aws import aws_sim

    with aws_sim(tmp / "aws") as sim:
        yield target_for(*aws_platform(sim, "aws-dst", tmp))


TARGETS: dict[str, Callable[[Path], contextlib.AbstractContextManager[Target]]] = {
    "kvm": kvm_target, "vmware": vmware_target, "synthetic": synthetic_target,
    "aws": aws_target}
