"""VMware vSphere target: a powered-off replica VM whose snapshots are the recovery points.

* ``prepare`` creates the replica VM shell ``<replica_prefix><protection>`` from the
  source workload (CPUs, memory, firmware, thin disks of the same sizes, NICs on the
  mapped port groups), powered off, placed by config (datacenter, cluster or host,
  datastore, folder), with an annotation and a ``transcend-base`` snapshot of its
  empty disks: every cycle starts from a snapshot, so an aborted cycle is undone by
  reverting to it.
* ``begin`` reverts the replica to the newest point's snapshot (or the base), so the
  running disks hold exactly that point; ``endpoint`` serves a disk writable over NBD
  for blockstream; ``commit`` takes the point's snapshot ``transcend-point-<cycle>``.
* ``open`` serves a point's disk read-only; ``delete`` removes its snapshot (vSphere
  consolidates it into the next one, whose content does not change).
* ``boot`` makes a linked clone from the point's snapshot (its disks are child disks of
  the snapshot's, so the point is never written), puts its NICs on the isolated
  port group or the mapped ones, and powers it on; ``destroy`` removes it.

Writing the disks: ``writer: vddk`` (production) runs nbdkit's ``vddk`` plugin on
the replica's current disk; ``writer: file`` serves the current disk's data file with
``qemu-nbd -f raw`` from ``datastore_mounts`` (datastore name -> local path). The
``file`` writer stands in for VDDK in tests: it is only right where that data file
is a raw image (the simulator's model, not VMFS or NFS snapshot deltas).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from pyVmomi import vim, vmodl

from connectors.base import ConnectorError, NotFound, PermanentError
from connectors.vmware.config import VmwareConfig
from connectors.vmware.export import VddkSourceFactory, serve_file, serve_nbdkit, vddk_thumbprint
from connectors.vmware.files import config_map, data_file
from connectors.vmware.session import VsphereSession
from connectors.vmware.source import snapshot_named, vm_disks
from transcend.models import (
    BootSpec,
    Capabilities,
    DiskId,
    DiskInfo,
    Instance,
    NbdEndpoint,
    PlatformInfo,
    PointMeta,
    RecoveryPoint,
    StagingHandle,
    Workload,
)

log = logging.getLogger(__name__)

BASE_SNAPSHOT = "transcend-base"
POINT_PREFIX = "transcend-point-"
ANNOTATION = "transcend replica of protection {p}; managed by transcend: do not power on or edit"
INSTANCE_ANNOTATION = "transcend instance of point {pt} (protection {p}); destroyed by transcend"
_NIC_TYPES = {"vmxnet3": vim.vm.device.VirtualVmxnet3, "e1000": vim.vm.device.VirtualE1000,
              "e1000e": vim.vm.device.VirtualE1000e}


class VmwareTarget:
    """``Target`` on vCenter. Config (besides session.py's): ``datastore`` (required),
    ``datacenter``, ``cluster`` or ``host``, ``folder``, ``replica_prefix``
    (``transcend-replica-``), ``test_network`` (isolated port group for test
    failovers), ``writer`` (``vddk``/``file``), ``datastore_mounts``, ``vddk_libdir``."""

    #: the platform config it accepts, checked by `transcend platform add`
    config_model = VmwareConfig

    capabilities = Capabilities(guest_family="vmware", write_granularity=512)

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        self.secret = secret
        self.config = info.config
        self._session: VsphereSession | None = None
        self.datastore = str(self.config.get("datastore", ""))
        if not self.datastore:
            raise PermanentError(f"platform {info.name!r}: config datastore (where replicas "
                                 "live) is missing")
        self.prefix = str(self.config.get("replica_prefix", "transcend-replica-"))
        self.writer = str(self.config.get("writer", "vddk"))
        if self.writer not in ("vddk", "file"):
            raise PermanentError(f"platform {info.name!r}: writer must be vddk or file")

    def vm_namespace(self) -> str:
        """VM names live in the vCenter (or ESXi host) this platform logs in to."""
        return f"vsphere:{str(self.info.config.get('host', '')).strip()}:{self.info.config.get('port', 443)}"

    def s(self) -> VsphereSession:
        if self._session is None:
            self._session = VsphereSession(self.info, self.secret)
        return self._session

    def _config_map(self, key: str) -> dict[str, str]:
        return config_map(self.config, key, self.info.name)

    def close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # ------------------------------------------------------------------ placement
    def check(self) -> list[str]:
        """ConnectivityCheck: the login, and that the datacenter, the cluster/host and the
        datastore the replicas go to exist."""
        dc = self._datacenter()
        pool = self._pool(dc)
        lines = [self.s().describe(), f"datacenter {dc.name!r}, resource pool of {pool.owner.name!r}"]
        if self.datastore:
            names = [d.name for d in dc.datastore]
            if self.datastore not in names:
                raise PermanentError(f"no datastore {self.datastore!r} in datacenter {dc.name!r}; "
                                     f"there are: {', '.join(names)}")
            lines.append(f"datastore {self.datastore!r}")
        return lines


    def _datacenter(self) -> Any:
        want = self.config.get("datacenter")
        dcs = [e for e in self.s().content.rootFolder.childEntity if isinstance(e, vim.Datacenter)]
        for dc in dcs:
            if not want or dc.name == want:
                return dc
        raise PermanentError(f"no datacenter {want!r} on {self.info.name!r}; there are: "
                             f"{', '.join(d.name for d in dcs)}")

    def _pool(self, dc: Any) -> Any:
        want_cluster, want_host = self.config.get("cluster"), self.config.get("host_name")
        for cr in self._all(dc.hostFolder, vim.ComputeResource):
            if want_cluster and cr.name != want_cluster:
                continue
            if want_host and not any(h.name == want_host for h in cr.host):
                continue
            return cr.resourcePool
        raise PermanentError(f"no cluster/host matching cluster={want_cluster!r} "
                             f"host_name={want_host!r} in datacenter {dc.name!r}")

    def _all(self, root: Any, kind: type) -> list[Any]:
        view = self.s().content.viewManager.CreateContainerView(root, [kind], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def replica_name(self, protection: str) -> str:
        return f"{self.prefix}{protection}"

    def replica(self, protection: str) -> Any:
        name = self.replica_name(protection)
        for vm in self.s().all_vms():
            if vm.name == name:
                return vm
        raise NotFound(f"replica VM {name!r} of protection {protection!r} does not exist on "
                       f"{self.info.name!r}; the next cycle's prepare creates it")

    def _network(self, dc: Any, name: str) -> Any:
        for net in dc.network:
            if net.name == name:
                return net
        raise PermanentError(f"no network/port group {name!r} in datacenter {dc.name!r}; "
                             "fix the protection's network_map or the platform's test_network")

    # ------------------------------------------------------------------ prepare

    def prepare(self, protection: str, disks: list[DiskInfo], workloads: list[Workload]) -> None:
        """Create the replica VM shell (idempotent) and its base snapshot."""
        try:
            vm = self.replica(protection)
        except NotFound:
            vm = self._create_shell(protection, disks, workloads)
        have = replica_disk_map(vm.config, [d.id for d in disks])
        for d in disks:
            cur = have.get(d.id)
            if cur is None or int(cur.capacityInBytes) != d.size:
                raise PermanentError(
                    f"replica {vm.name!r} has disk {d.id} of "
                    f"{int(cur.capacityInBytes) if cur else 'no'} bytes, the source {d.size}: a "
                    "source disk that is added or resized needs a new replica on a VMware "
                    "target (unprotect, delete the replica VM, protect again)")
        if snapshot_named(vm, BASE_SNAPSHOT) is None:
            self.s().wait(vm.CreateSnapshot_Task(name=BASE_SNAPSHOT, description="empty disks",
                                                 memory=False, quiesce=False),
                          f"base snapshot of replica {vm.name!r}")

    def _create_shell(self, protection: str, disks: list[DiskInfo], workloads: list[Workload]) -> Any:
        s = self.s()
        dc = self._datacenter()
        wl = workloads[0] if len(workloads) == 1 else None
        if wl is None:
            raise PermanentError("a VMware target holds one VM per protection (groups: not yet)")
        folder = dc.vmFolder
        if self.config.get("folder"):
            found = s.content.searchIndex.FindByInventoryPath(f"{dc.name}/vm/{self.config['folder']}")
            if found is None:
                raise PermanentError(f"no VM folder {self.config['folder']!r} in {dc.name!r}")
            folder = found
        changes: list[Any] = [vim.vm.device.VirtualDeviceSpec(
            operation="add", device=vim.vm.device.ParaVirtualSCSIController(
                key=1000, busNumber=0, sharedBus="noSharing"))]
        for unit, d in enumerate(disks):
            changes.append(vim.vm.device.VirtualDeviceSpec(
                operation="add", fileOperation="create",
                device=vim.vm.device.VirtualDisk(
                    key=-(unit + 1), controllerKey=1000, unitNumber=unit if unit < 7 else unit + 1,
                    capacityInKB=(d.size + 1023) // 1024, capacityInBytes=d.size,
                    backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                        fileName=f"[{self.datastore}]", diskMode="persistent",
                        thinProvisioned=True))))
        network_map = self._config_map("network_map")
        for n, nic in enumerate(wl.nics):
            port_group = network_map.get(nic.network, nic.network)
            net = self._network(dc, port_group)
            cls = _NIC_TYPES.get(nic.model, vim.vm.device.VirtualVmxnet3)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=cls(
                key=-(100 + n), backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=port_group, network=net),
                connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=False),
                addressType="generated")))
        spec = vim.vm.ConfigSpec(
            name=self.replica_name(protection), numCPUs=wl.cpus, memoryMB=wl.memory_mib,
            guestId=wl.guest_os or ("windows9_64Guest" if wl.os_family == "windows"
                                    else "otherLinux64Guest"),
            firmware=wl.firmware, annotation=ANNOTATION.format(p=protection),
            files=vim.vm.FileInfo(vmPathName=f"[{self.datastore}]"), deviceChange=changes)
        if wl.secure_boot:
            spec.bootOptions = vim.vm.BootOptions(efiSecureBootEnabled=True)
        return s.wait(folder.CreateVM_Task(config=spec, pool=self._pool(dc)),
                      f"creating replica VM {spec.name!r} on datastore {self.datastore!r}")

    # ------------------------------------------------------------------ staging

    def begin(self, protection: str, cycle_id: str, disks: list[DiskInfo],
              last: RecoveryPoint | None) -> VmwareStaging:
        vm = self.replica(protection)
        if snapshot_named(vm, POINT_PREFIX + cycle_id) is not None:
            raise PermanentError(f"cycle {cycle_id} of {protection!r} is already committed: "
                                 "retry its commit instead of beginning it again")
        start = snapshot_named(vm, POINT_PREFIX + last.id) if last is not None else None
        if last is not None and start is None:
            raise NotFound(f"the snapshot of point {last.id} is missing on replica {vm.name!r}: "
                           "the replica was changed outside transcend; resync it")
        start = start or snapshot_named(vm, BASE_SNAPSHOT)
        if start is None:
            raise NotFound(f"replica {vm.name!r} has no {BASE_SNAPSHOT} snapshot; prepare it again")
        # The running disks become exactly the starting point (an aborted cycle's partial
        # writes are thrown away with the delta they went to).
        self.s().wait(start.RevertToSnapshot_Task(), f"reverting replica {vm.name!r}")
        handle = StagingHandle(platform=self.info.name, protection=protection, cycle_id=cycle_id,
                               disks=list(disks), data={"vm": vm._moId, "start": start._moId})
        return VmwareStaging(self, handle)

    def resume(self, handle: StagingHandle) -> VmwareStaging:
        return VmwareStaging(self, handle)

    def _disk_files(self, config: Any, ids: list[DiskId]) -> dict[DiskId, tuple[Any, str]]:
        """disk id -> (device, data file path on the worker) for the ``file`` writer."""
        mounts = self._config_map("datastore_mounts")
        return {did: (d, str(data_file(mounts, d.backing.fileName)))
                for did, d in replica_disk_map(config, ids).items()}

    def _export(self, vm_moref: str, config: Any, ids: list[DiskId], disk: DiskId, snapshot: str,
                writable: bool, what: str) -> tuple[NbdEndpoint, Any]:
        if self.writer == "file":
            dev, data_file = self._disk_files(config, ids)[disk]
            proc = serve_file(Path(data_file), writable=writable, what=what)
            return NbdEndpoint(uri=proc.uri, size=int(dev.capacityInBytes), writable=writable), proc
        dev = replica_disk_map(config, ids)[disk]
        s = self.s()
        if not self.config.get("vddk_libdir"):
            raise PermanentError("writer 'vddk' needs vddk_libdir (docs/platforms/vmware.md)")
        export = serve_nbdkit(VddkSourceFactory(
            password=self.secret.get("password", ""), libdir=str(self.config["vddk_libdir"]),
            server=s.host, user=s.user, thumbprint=vddk_thumbprint(s.tls.thumbprint),
            vm_moref=vm_moref, snapshot_moref=snapshot,
            file=dev.backing.fileName, port=s.port), what, readonly=not writable)
        return NbdEndpoint(uri=export.uri, size=int(dev.capacityInBytes), writable=writable), export

    # ------------------------------------------------------------------ points

    def open(self, point: RecoveryPoint, disk: DiskId) -> NbdEndpoint:
        vm = self.replica(point.protection)
        snap = snapshot_named(vm, POINT_PREFIX + point.id)
        if snap is None:
            raise NotFound(f"point {point.id}: snapshot missing on replica {vm.name!r}")
        ep, proc = self._export(vm._moId, snap.config, [d.disk for d in point.disks], disk,
                                snap._moId, False, f"point {point.id} {disk}")
        _OPEN[(point.id, disk)] = proc
        return ep

    def close(self, point: RecoveryPoint, disk: DiskId) -> None:
        proc = _OPEN.pop((point.id, disk), None)
        if proc is not None:
            proc.stop()

    def delete(self, point: RecoveryPoint, successor: RecoveryPoint | None) -> RecoveryPoint | None:
        """Remove the point's snapshot; vSphere merges it into its child, whose content
        (the successor point) does not change. Locations name snapshots, not files,
        so nothing moves."""
        vm = self.replica(point.protection)
        snap = snapshot_named(vm, POINT_PREFIX + point.id)
        if snap is not None:
            self.s().wait(snap.RemoveSnapshot_Task(removeChildren=False),
                          f"deleting point {point.id} (a snapshot of {vm.name!r})")
        return None

    # ------------------------------------------------------------------ boot

    def boot(self, point: RecoveryPoint, spec: BootSpec) -> Instance:
        s = self.s()
        vm = self.replica(point.protection)
        snap = snapshot_named(vm, POINT_PREFIX + point.id)
        if snap is None:
            raise NotFound(f"point {point.id}: snapshot missing on replica {vm.name!r}")
        existing = [v for v in s.all_vms() if v.name == spec.name]
        clone = existing[0] if existing else None
        if clone is not None and not _is_instance(clone):
            raise PermanentError(f"a VM named {spec.name!r} exists and is not a transcend instance")
        if clone is None:
            dc = self._datacenter()
            relocate = vim.vm.RelocateSpec(diskMoveType="createNewChildDiskBacking",
                                           pool=self._pool(dc))
            nic_changes = []
            port_group = spec.network or (self.config.get("test_network", "") if spec.isolated else "")
            for d in snap.config.hardware.device:
                if isinstance(d, vim.vm.device.VirtualEthernetCard) and port_group:
                    d.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                        deviceName=port_group, network=self._network(dc, port_group))
                    d.connectable = vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True)
                    nic_changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=d))
            clone_spec = vim.vm.CloneSpec(
                location=relocate, snapshot=snap, powerOn=False, template=False,
                config=vim.vm.ConfigSpec(
                    annotation=INSTANCE_ANNOTATION.format(pt=point.id, p=point.protection),
                    deviceChange=nic_changes, numCPUs=spec.cpus, memoryMB=spec.memory_mib))
            clone = s.wait(vm.CloneVM_Task(folder=vm.parent, name=spec.name, spec=clone_spec),
                           f"linked clone {spec.name!r} of point {point.id}")
            if not _is_instance(clone):  # the mark destroy() relies on, whatever the clone kept
                s.wait(clone.ReconfigVM_Task(spec=vim.vm.ConfigSpec(
                    annotation=INSTANCE_ANNOTATION.format(pt=point.id, p=point.protection))),
                    f"marking {spec.name!r} as a transcend instance")
        if str(clone.runtime.powerState) != "poweredOn":
            s.wait(clone.PowerOnVM_Task(), f"powering on {spec.name!r}")
        uuid = clone.config.instanceUuid if clone.config is not None else ""
        return Instance(platform=self.info.name, id=uuid or clone._moId,
                        name=clone.name, network=spec.network, state="running")

    def destroy(self, instance: Instance) -> None:
        s = self.s()
        try:
            vm = s.find_vm(instance.id or instance.name)
        except NotFound:
            return
        if not _is_instance(vm):
            raise PermanentError(f"VM {vm.name!r} is not a transcend instance; not destroying it")
        if str(vm.runtime.powerState) == "poweredOn":
            s.wait(vm.PowerOffVM_Task(), f"powering off {vm.name!r}")
        name = vm.name
        # ManagedObjectNotFound: the task's VM was gone before the task could be read.
        with contextlib.suppress(vmodl.fault.ManagedObjectNotFound):
            s.wait(vm.Destroy_Task(), f"destroying {name!r}")
        if any(v.name == name and _is_instance(v) for v in s.all_vms()):
            raise ConnectorError(f"{name!r} still exists after Destroy_Task; retried")


_OPEN: dict[tuple[str, str], Any] = {}


def replica_disk_map(config: Any, ids: list[DiskId]) -> dict[DiskId, Any]:
    """The replica's disks by the source's disk ids: prepare creates them in the
    source's order on one controller, so the n-th disk (by unit number) is ids[n]."""
    devices = sorted(vm_disks(config.hardware.device), key=lambda d: (d.controllerKey, d.unitNumber))
    if len(devices) != len(ids):
        raise PermanentError(f"the replica has {len(devices)} disk(s), the source {len(ids)} "
                             f"({', '.join(ids)}): a disk added or removed at the source needs "
                             "a new replica on a VMware target")
    return dict(zip(ids, devices, strict=True))


def _is_instance(vm: Any) -> bool:
    """A VM transcend booted (its annotation says so): the only kind it destroys."""
    annotation = (vm.config.annotation if vm.config is not None else "") or ""
    return INSTANCE_ANNOTATION.split("{")[0] in annotation


class VmwareStaging:
    def __init__(self, target: VmwareTarget, handle: StagingHandle) -> None:
        self.target = target
        self.handle = handle
        self._procs: list[Any] = []

    def _vm(self) -> Any:
        return vim.VirtualMachine(self.handle.data["vm"], self.target.s().si._stub)

    def endpoint(self, disk: DiskId) -> NbdEndpoint:
        vm = self._vm()
        if snapshot_named(vm, POINT_PREFIX + self.handle.cycle_id) is not None:
            raise PermanentError(f"cycle {self.handle.cycle_id} is already committed")
        ep, proc = self.target._export(vm._moId, vm.config, [d.id for d in self.handle.disks],
                                       disk, "", True, f"replica disk {disk} of {vm.name!r}")
        self._procs.append(proc)
        return ep

    def close(self) -> None:
        self.close_writers()
        self.target.close_session()

    def commit(self, meta: PointMeta) -> list[str]:
        """The point's snapshot of the powered-off replica (idempotent); locations are
        ``<snapshot moref>/<disk>``."""
        self.close_writers()
        vm = self._vm()
        name = POINT_PREFIX + self.handle.cycle_id
        snap = snapshot_named(vm, name)
        if snap is None:
            snap = self.target.s().wait(vm.CreateSnapshot_Task(
                name=name, description=f"transcend point {meta.cycle_id} ({meta.kind.value}, "
                f"{meta.consistency}) of {meta.instant.isoformat()}", memory=False,
                quiesce=False), f"committing point {meta.cycle_id} on {vm.name!r}")
        return [f"{snap._moId}/{d.id}" for d in self.handle.disks]

    def close_writers(self) -> None:
        for p in self._procs:
            p.stop()
        self._procs.clear()

    def abort(self) -> None:
        """Revert to the starting snapshot: the partial writes are discarded."""
        self.close_writers()
        vm = self._vm()
        if snapshot_named(vm, POINT_PREFIX + self.handle.cycle_id) is not None:
            raise PermanentError(f"cycle {self.handle.cycle_id} is committed; delete its point")
        start = vim.vm.Snapshot(self.handle.data["start"], self.target.s().si._stub)
        with contextlib.suppress(Exception):
            self.target.s().wait(start.RevertToSnapshot_Task(), f"aborting on {vm.name!r}")
