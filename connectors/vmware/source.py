"""VMware vSphere source: VM snapshots + Changed Block Tracking (CBT).

One cycle:

* ``freeze`` turns CBT on when it is off (ReconfigVM, then a snapshot create and
  remove: CBT starts only at a stun/unstun), removes snapshots a crashed earlier
  cycle of this protection left, and takes the cycle's snapshot
  ``transcend-<protection>-<cycle>`` (quiesced when VMware Tools run, crash-consistent
  otherwise or when quiescing fails; the point records which). The snapshot's disk
  backings carry the new changeIds.
* ``changes`` asks ``QueryChangedDiskAreas`` for the snapshot and each disk with the
  changeId saved at the last commit (``*`` on the first cycle: the allocated areas),
  looping over the pages by start offset.
* ``export`` serves the frozen disk to blockstream by nbdkit (export.py): the
  ``vddk`` plugin when ``vddk_libdir`` is configured, otherwise range reads of the
  base ``-flat.vmdk`` through the datastore file endpoint, which is only right
  when the snapshot's disk is a base disk (no older snapshot); checked at freeze.
* ``release`` removes the snapshot (its changes are consolidated into the base);
  on commit the catalog keeps the snapshot's changeIds as the disks' checkpoints.

Lost tracking never leads to a partial copy: a changeId vSphere rejects, a changeId
of another CBT epoch (CBT was reset or turned off and on), a disk that was resized
or moved (the checkpoint's identity: VM instance UUID, device key, capacity and base
file) make that disk RESYNC: everything is read and only blocks whose hash differs
from the replica's manifest are written.

Config: see session.py; plus ``vddk_libdir`` (and optional ``vddk_config``,
``vddk_transports``). Groups are refused: vSphere cannot snapshot several VMs at
one instant.
"""

from __future__ import annotations

import contextlib
import logging
import re
from contextlib import AbstractContextManager
from datetime import UTC
from typing import Any

from pyVmomi import vim, vmodl

from connectors.base import (
    ChangeExtent,
    ChangeSet,
    ConnectorError,
    DiskAccess,
    NotFound,
    PermanentError,
)
from connectors.vmware import direct, power
from connectors.vmware.config import VmwareConfig
from connectors.vmware.export import (
    CurlSourceFactory,
    SocketServer,
    VddkSourceFactory,
    serve_nbdkit,
    vddk_thumbprint,
)
from connectors.vmware.session import (
    VsphereSession,
    check_thumbprint,
    server_certificate,
    split_datastore_path,
)
from connectors.vmware.vmdk import parse_descriptor
from transcend.models import (
    Capabilities,
    ChangeKind,
    ChangeSummary,
    Checkpoint,
    DiskId,
    DiskInfo,
    FreezeOptions,
    FrozenHandle,
    NbdEndpoint,
    NicInfo,
    PlatformInfo,
    Workload,
    WorkloadRef,
)

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "transcend-"
CBT_ACTIVATION = "transcend-cbt-activation"
GRANULARITY = 65536
_ZERO = 2  # NBD_STATE_ZERO, as blockstream.plan_extents reads allocation flags
_DIRTY = 1

_BUS = [
    (vim.vm.device.VirtualSCSIController, "scsi"),
    (vim.vm.device.VirtualNVMEController, "nvme"),
    (vim.vm.device.VirtualSATAController, "sata"),
    (vim.vm.device.VirtualIDEController, "ide"),
]
_SCSI_MODELS = [
    (vim.vm.device.ParaVirtualSCSIController, "pvscsi"),
    (vim.vm.device.VirtualLsiLogicSASController, "lsilogic-sas"),
    (vim.vm.device.VirtualLsiLogicController, "lsilogic"),
    (vim.vm.device.VirtualBusLogicController, "buslogic"),
]
_POWER = {"poweredOn": "running", "poweredOff": "shutoff", "suspended": "suspended"}


# --------------------------------------------------------------------------- inventory


def _controller_names(ctrl: Any) -> tuple[str, str]:
    """(bus, controller) for a disk's controller: ("scsi", "pvscsi:0")."""
    bus = next((name for cls, name in _BUS if isinstance(ctrl, cls)), "other")
    model = next((name for cls, name in _SCSI_MODELS if isinstance(ctrl, cls)), bus)
    return bus, f"{model}:{getattr(ctrl, 'busNumber', 0)}"


def disk_id(disk: Any, devices: dict[int, Any]) -> DiskId:
    """Stable, readable id: controller kind, bus and unit (``scsi0-1``)."""
    ctrl = devices.get(disk.controllerKey)
    bus, _ = _controller_names(ctrl)
    return f"{bus}{getattr(ctrl, 'busNumber', 0)}-{disk.unitNumber or 0}"


def vm_disks(devices: list[Any]) -> list[Any]:
    return [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]


def workload_from_vm(platform: str, vm: Any) -> Workload:
    """A VM as a Workload: disks, CPUs, memory, firmware, NICs, guest OS, power, Tools."""
    cfg = vm.config
    if cfg is None:
        raise ConnectorError(f"VM {vm.name!r} has no configuration (inaccessible or orphaned); "
                             "check it in the vSphere client")
    devices = {d.key: d for d in cfg.hardware.device}
    disks = []
    boot_disk = None
    boot = getattr(cfg, "bootOptions", None)
    for item in (getattr(boot, "bootOrder", None) or []):
        if isinstance(item, vim.vm.BootOptions.BootableDiskDevice):
            boot_disk = item.deviceKey
            break
    for order, d in enumerate(vm_disks(cfg.hardware.device)):
        bus, controller = _controller_names(devices.get(d.controllerKey))
        disks.append(DiskInfo(
            id=disk_id(d, devices), size=int(d.capacityInBytes or d.capacityInKB * 1024),
            name=d.deviceInfo.label if d.deviceInfo else f"disk {d.key}", bus=bus,
            controller=controller, device_key=d.key,
            boot_order=1 if d.key == boot_disk or (boot_disk is None and order == 0) else None,
            source=getattr(d.backing, "fileName", "") or ""))
    nics = []
    for d in cfg.hardware.device:
        if not isinstance(d, vim.vm.device.VirtualEthernetCard):
            continue
        network = ""
        if isinstance(d.backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
            network = d.backing.deviceName or ""
        elif d.deviceInfo is not None:
            network = d.deviceInfo.summary or ""
        nics.append(NicInfo(mac=d.macAddress or "", network=network,
                            model=type(d).__name__.removeprefix("vim.vm.device.Virtual").lower()))
    guest_id = (cfg.guestId or "").lower()
    family = "windows" if guest_id.startswith("win") else "linux" if any(
        x in guest_id for x in ("linux", "rhel", "centos", "debian", "ubuntu", "sles", "suse",
                                "oracle", "rocky", "alma", "photon", "coreos", "fedora")) else "other"
    tools = str(getattr(vm.guest, "toolsRunningStatus", "") or "") if vm.guest else ""
    return Workload(
        ref=WorkloadRef(platform=platform, id=cfg.instanceUuid or vm._moId),
        name=vm.name,
        cpus=max(1, cfg.hardware.numCPU or 1),
        memory_mib=max(1, cfg.hardware.memoryMB or 1),
        firmware="efi" if cfg.firmware == "efi" else "bios",
        secure_boot=bool(getattr(boot, "efiSecureBootEnabled", False)),
        disks=disks,
        nics=nics,
        os_family=family,
        guest_os=cfg.guestId or "",
        power_state=_POWER.get(str(vm.runtime.powerState), "unknown"),
        tools={"guestToolsRunning": "running", "guestToolsNotRunning": "not-running",
               "guestToolsExecutingScripts": "starting"}.get(tools, tools or "unknown"),
    )


def owned_snapshot(name: str, protection: str) -> bool:
    """Whether snapshot ``name`` is a cycle snapshot of ``protection``
    (``transcend-<protection>-<cycle id>``, cycle ids ``<UTC stamp>-<run>``). Protection
    names may contain dashes: ``transcend-a-b-<cycle id>`` belongs to ``a-b``, not ``a``."""
    prefix = f"{SNAPSHOT_PREFIX}{protection}-"
    rest = name[len(prefix):]
    return name.startswith(prefix) and re.fullmatch(r"(\d{8}T\d{6}Z-)?[0-9A-Za-z_.]+", rest) is not None


def _walk_snapshots(trees: list[Any] | None) -> list[Any]:
    out: list[Any] = []
    for t in trees or []:
        out.append(t)
        out += _walk_snapshots(t.childSnapshotList)
    return out


def snapshot_tree(vm: Any, name: str) -> Any | None:
    """The VM's snapshot tree node named ``name`` (its ``.snapshot`` is the moref)."""
    snaps = getattr(vm, "snapshot", None)
    for t in _walk_snapshots(snaps.rootSnapshotList if snaps else None):
        if t.name == name:
            return t
    return None


def snapshot_named(vm: Any, name: str) -> Any | None:
    t = snapshot_tree(vm, name)
    return t.snapshot if t is not None else None


def _epoch(change_id: str) -> str:
    """The CBT epoch of a changeId (the part before '/'): another epoch = tracking reset."""
    return change_id.rpartition("/")[0]


def _base_file(backing: Any) -> str:
    while getattr(backing, "parent", None) is not None:
        backing = backing.parent
    return str(getattr(backing, "fileName", "") or "")


def disk_identity(instance_uuid: str, key: int, capacity: int, base_file: str) -> str:
    return f"{instance_uuid}|{key}|{capacity}|{base_file}"


def identity_change(old: str, new: str) -> str:
    """Why a checkpoint's identity no longer matches, in words."""
    o, n = old.split("|"), new.split("|")
    if len(o) != 4 or len(n) != 4:
        return "the checkpoint was not taken by this connector"
    if o[0] != n[0] or o[1] != n[1]:
        return "the disk belongs to another VM or device now"
    if o[2] != n[2]:
        return f"the disk was resized ({o[2]} -> {n[2]} bytes)"
    if o[3] != n[3]:
        return f"the disk moved ({o[3]} -> {n[3]})"
    return ""


# --------------------------------------------------------------------------- source


class VmwareSource:
    """``Source`` for vCenter or a standalone ESXi host."""

    #: the platform config it accepts, checked by `transcend platform add`
    config_model = VmwareConfig

    #: power: failover and migration shut a VMware source down, failback starts it
    #: (connectors/vmware/power.py); direct disks: failback writes into a shut-off
    #: VMware VM's disks through VDDK (connectors/vmware/direct.py).
    capabilities = Capabilities(guest_family="vmware", power=True, direct_disks=True)

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        self.secret = secret
        self._session: VsphereSession | None = None

    def vm_namespace(self) -> str:
        """VM names live in the vCenter (or ESXi host) this platform logs in to."""
        return f"vsphere:{str(self.info.config.get('host', '')).strip()}:{self.info.config.get('port', 443)}"

    def check(self) -> list[str]:
        """ConnectivityCheck: the login works (certificate trusted, credentials right)."""
        return [self.s().describe()]

    def s(self) -> VsphereSession:
        if self._session is None:
            self._session = VsphereSession(self.info, self.secret)
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def inventory(self) -> list[Workload]:
        out = []
        for vm in self.s().all_vms():
            with contextlib.suppress(ConnectorError, vmodl.fault.ManagedObjectNotFound):
                if vm.config is not None and not vm.config.template:
                    out.append(workload_from_vm(self.info.name, vm))
        return out

    def workload(self, ref_or_name: str) -> Workload:
        return workload_from_vm(self.info.name, self.s().find_vm(ref_or_name))

    # ------------------------------------------------------------------ power

    def power_state(self, vm: str) -> str:
        return power.power_state(self.s(), vm)

    def power_off(self, vm: str, timeout_seconds: float, force: bool) -> bool:
        return power.power_off(self.s(), vm, timeout_seconds, force)

    def power_on(self, vm: str) -> None:
        power.power_on(self.s(), vm)

    def open_disks(self, vm: str, *, readonly: bool) -> AbstractContextManager[list[DiskAccess]]:
        cfg = self.s().find_vm(vm).config
        if cfg is None:
            raise ConnectorError(f"VM {vm!r} has no configuration (inaccessible or orphaned)")
        devices = {d.key: d for d in cfg.hardware.device}
        disks = vm_disks(cfg.hardware.device)
        return direct.open_disks(self.s(), self.info, self.secret, vm, readonly=readonly,
                                 disk_ids=[disk_id(d, devices) for d in disks], devices=disks)

    def settle(self, vm: str) -> None:
        """Nothing to undo: transcend never pauses a vSphere VM, and the snapshot of a
        freeze that crashed is removed by the protection's next freeze (or forget)."""

    # ------------------------------------------------------------------ freeze

    def freeze(self, protection: str, cycle_id: str, workloads: list[Workload],
               since: dict[DiskId, Checkpoint], opts: FreezeOptions) -> VmwareFrozen:
        if len(workloads) != 1:
            raise PermanentError(
                "vSphere cannot snapshot several VMs at one instant, so a VMware source "
                "protects one VM per protection (a group needs one protection per VM)"
                if workloads else "nothing to freeze: no VM given")
        s = self.s()
        vm = s.find_vm(workloads[0].ref.id)
        name = f"{SNAPSHOT_PREFIX}{protection}-{cycle_id}"
        snap = snapshot_named(vm, name)
        consistency = "crash"
        if snap is None:
            self._ensure_cbt(vm)
            self._remove_stale(vm, protection, keep=name)
            snap, consistency = self._snapshot(vm, name, cycle_id, opts)
        else:  # a retried freeze: the snapshot's description says how it was taken
            tree = snapshot_tree(vm, name)
            description = str(getattr(tree, "description", "") or "")
            consistency = "application" if description.endswith(", quiesced") else "crash"
        try:
            handle = self._plan(vm, snap, protection, cycle_id, since, opts, consistency)
        except BaseException:
            with contextlib.suppress(Exception):
                s.wait(snap.RemoveSnapshot_Task(removeChildren=False), "removing the snapshot")
            raise
        frozen = VmwareFrozen(self, handle)
        frozen.validate_changes()
        return frozen

    def reopen(self, handle: FrozenHandle) -> VmwareFrozen:
        return VmwareFrozen(self, handle)

    def forget(self, protection: str, workloads: list[Workload]) -> list[str]:
        """Remove the snapshots ``protection`` left on its VM (a cycle's freeze that was
        never released). Its checkpoints are CBT changeIds, which live in the catalog,
        not on the VM, so nothing else is ours there. CBT itself stays enabled: it is a
        per-VM setting that another protection (or backup product) of the same VM may
        rely on, and turning it off resets every changeId (each reader's next copy
        would be a full one); its cost is the per-disk change log vSphere keeps."""
        removed: list[str] = []
        for wl in workloads:
            try:
                vm = self.s().find_vm(wl.ref.id)
            except NotFound:
                log.info("forget %s: VM %s is gone; nothing to remove", protection, wl.name)
                continue
            snaps = getattr(vm, "snapshot", None)
            for t in _walk_snapshots(snaps.rootSnapshotList if snaps else None):
                if owned_snapshot(t.name, protection):
                    self.s().wait(t.snapshot.RemoveSnapshot_Task(removeChildren=False),
                                  f"removing snapshot {t.name!r} of VM {vm.name!r}")
                    removed.append(f"{vm.name}: snapshot {t.name}")
        return removed

    def _ensure_cbt(self, vm: Any) -> None:
        """CBT on, and active: vSphere starts tracking at the next stun/unstun, which a
        snapshot create + remove is (the VMware-documented way without a power cycle)."""
        s = self.s()
        if not vm.config.changeTrackingEnabled:
            log.info("enabling Changed Block Tracking on %s", vm.name)
            spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
            s.wait(vm.ReconfigVM_Task(spec=spec), f"enabling CBT on VM {vm.name!r}")
        disks = vm_disks(vm.config.hardware.device)
        if all(getattr(d.backing, "changeId", None) for d in disks):
            return
        snap = snapshot_named(vm, CBT_ACTIVATION)
        if snap is None:
            snap = s.wait(vm.CreateSnapshot_Task(
                name=CBT_ACTIVATION, description="transcend: activates Changed Block Tracking",
                memory=False, quiesce=False), f"activating CBT on VM {vm.name!r}")
        s.wait(snap.RemoveSnapshot_Task(removeChildren=False), f"activating CBT on VM {vm.name!r}")

    def _remove_stale(self, vm: Any, protection: str, keep: str) -> None:
        """Snapshots an earlier cycle of this protection left (a worker died before its
        release): they slow the VM down and grow; nothing needs them any more."""
        snaps = getattr(vm, "snapshot", None)
        for t in _walk_snapshots(snaps.rootSnapshotList if snaps else None):
            if owned_snapshot(t.name, protection) and t.name != keep:
                log.warning("removing snapshot %r of VM %s left by an earlier cycle", t.name, vm.name)
                self.s().wait(t.snapshot.RemoveSnapshot_Task(removeChildren=False),
                              f"removing the stale snapshot {t.name!r} of VM {vm.name!r}")

    def _snapshot(self, vm: Any, name: str, cycle_id: str, opts: FreezeOptions) -> tuple[Any, str]:
        s = self.s()
        tools_ok = (str(getattr(vm.guest, "toolsRunningStatus", "")) == "guestToolsRunning"
                    and str(vm.runtime.powerState) == "poweredOn")
        if tools_ok:
            try:
                snap = s.wait(vm.CreateSnapshot_Task(
                    name=name, description=f"transcend cycle {cycle_id}, quiesced",
                    memory=False, quiesce=True), f"quiesced snapshot of VM {vm.name!r}")
                return snap, "application"
            except ConnectorError as e:
                # Tools run but the guest could not quiesce (VSS writer failed, fsfreeze
                # timed out): a crash-consistent point is better than none.
                log.warning("quiesced snapshot of %s failed (%s); taking a crash-consistent one",
                            vm.name, e)
                leftover = snapshot_named(vm, name)
                if leftover is not None:
                    s.wait(leftover.RemoveSnapshot_Task(removeChildren=False), "cleanup")
        elif opts.quiesce:
            log.warning("VM %s: VMware Tools not running; the point is crash-consistent", vm.name)
        snap = s.wait(vm.CreateSnapshot_Task(
            name=name, description=f"transcend cycle {cycle_id}, crash-consistent",
            memory=False, quiesce=False), f"snapshot of VM {vm.name!r}")
        return snap, "crash"

    def _plan(self, vm: Any, snap: Any, protection: str, cycle_id: str,
              since: dict[DiskId, Checkpoint], opts: FreezeOptions, consistency: str) -> FrozenHandle:
        s = self.s()
        instance_uuid = vm.config.instanceUuid or vm._moId
        dc = s.datacenter_of(vm).name
        snap_devices = snap.config.hardware.device
        devices = {d.key: d for d in snap_devices}
        # The instant is the snapshot's creation time, so a retried freeze of the same
        # cycle (which reuses the snapshot) reports the same instant.
        tree = snapshot_tree(vm, f"{SNAPSHOT_PREFIX}{protection}-{cycle_id}")
        created = getattr(tree, "createTime", None)
        if created is None:
            raise ConnectorError(f"the snapshot of VM {vm.name!r} for cycle {cycle_id} has no "
                                 "creation time; retried")
        instant = created if created.tzinfo else created.replace(tzinfo=UTC)
        disks: list[DiskInfo] = []
        kinds: dict[DiskId, ChangeKind] = {}
        reasons: dict[DiskId, str] = {}
        per_disk: dict[str, dict[str, Any]] = {}
        vddk = bool(self.info.config.get("vddk_libdir"))
        older = [t.name for t in _walk_snapshots(vm.snapshot.rootSnapshotList if vm.snapshot else None)
                 if t.snapshot != snap]
        for d in vm_disks(snap_devices):
            did = disk_id(d, devices)
            capacity = int(d.capacityInBytes or d.capacityInKB * 1024)
            b = d.backing
            if not isinstance(b, vim.vm.device.VirtualDisk.FlatVer2BackingInfo | \
                              vim.vm.device.VirtualDisk.SeSparseBackingInfo | \
                              vim.vm.device.VirtualDisk.SparseVer2BackingInfo):
                raise PermanentError(
                    f"disk {did} of VM {vm.name!r} has a {type(b).__name__} backing (RDM or "
                    "other), which transcend cannot snapshot and read; exclude or convert it")
            change_id = str(getattr(b, "changeId", "") or "")
            identity = disk_identity(instance_uuid, d.key, capacity, _base_file(b))
            info: dict[str, Any] = {"key": d.key, "file": b.fileName, "change_id": change_id,
                                    "identity": identity, "datacenter": dc, "since": ""}
            if not vddk:
                if getattr(b, "parent", None) is not None:
                    raise PermanentError(
                        f"VM {vm.name!r} has other snapshots ({', '.join(older) or 'unnamed'}): "
                        f"its disk {did} at this instant is a chain of delta files, which the "
                        "datastore file endpoint cannot read as one image. Delete or "
                        "consolidate those snapshots, or configure VDDK (vddk_libdir, "
                        "docs/platforms/vmware.md)")
                info["flat"] = self._flat_path(b.fileName, dc, capacity)
            cp = since.get(did)
            kind, reason = ChangeKind.INCREMENTAL, ""
            if opts.force_resync:
                kind, reason = ChangeKind.RESYNC, "resync requested"
            elif cp is None or not cp.token:
                kind = ChangeKind.FULL
            elif why := identity_change(cp.identity, identity):
                kind, reason = ChangeKind.RESYNC, why
            elif not change_id:
                kind, reason = ChangeKind.RESYNC, "CBT gives no changeId for the disk"
            elif _epoch(cp.token) != _epoch(change_id):
                kind, reason = ChangeKind.RESYNC, (
                    f"CBT was reset (changeId epoch {_epoch(cp.token)!r} -> {_epoch(change_id)!r})")
            else:
                info["since"] = cp.token
            disks.append(DiskInfo(id=did, size=capacity, name=d.deviceInfo.label if d.deviceInfo
                                  else did, device_key=d.key, source=b.fileName))
            kinds[did], per_disk[did] = kind, info
            if reason:
                reasons[did] = reason
        return FrozenHandle(
            platform=self.info.name, protection=protection, cycle_id=cycle_id, instant=instant,
            disks=disks, kinds=kinds, reasons=reasons,
            consistency="application" if consistency == "application" else "crash",
            data={"vm": vm._moId, "vm_name": vm.name, "instance_uuid": instance_uuid,
                  "snapshot": snap._moId, "snapshot_name": f"{SNAPSHOT_PREFIX}{protection}-{cycle_id}",
                  "disks": per_disk})

    def _flat_path(self, descriptor_path: str, dc: str, capacity: int) -> str:
        """The datastore path of the raw bytes of a base disk, from its descriptor."""
        text = self.s().read_file(descriptor_path, dc).decode("utf-8", errors="replace")
        desc = parse_descriptor(text, descriptor_path)
        if not desc.flat:
            raise PermanentError(
                f"{descriptor_path} is a {desc.create_type} disk, not a flat one: the datastore "
                "file endpoint cannot read it as a raw image; configure VDDK (vddk_libdir)")
        if desc.size != capacity:
            raise ConnectorError(f"{descriptor_path} describes {desc.size} bytes but the disk has "
                                 f"{capacity}; the VM's configuration is changing, retried")
        ds, path = split_datastore_path(descriptor_path)
        folder = path.rpartition("/")[0]
        return f"[{ds}] {folder + '/' if folder else ''}{desc.extents[0].file}"


# --------------------------------------------------------------------------- frozen


class VmwareFrozen:
    def __init__(self, source: VmwareSource, handle: FrozenHandle) -> None:
        self.source = source
        self.handle = handle
        self._exports: list[SocketServer] = []

    def _disk(self, disk: DiskId) -> tuple[DiskInfo, dict[str, Any]]:
        for d in self.handle.disks:
            if d.id == disk:
                return d, self.handle.data["disks"][disk]
        raise PermanentError(f"disk {disk!r} is not part of this frozen instant")

    def _vm(self) -> Any:
        return vim.VirtualMachine(self.handle.data["vm"], self.source.s().si._stub)

    def _snap(self) -> Any:
        return vim.vm.Snapshot(self.handle.data["snapshot"], self.source.s().si._stub)

    # ------------------------------------------------------------------ changes

    def query_areas(self, disk: DiskId, change_id: str) -> list[tuple[int, int]]:
        """All changed areas since ``change_id`` (``*``: allocated areas), every page."""
        d, info = self._disk(disk)
        vm, snap = self._vm(), self._snap()
        areas: list[tuple[int, int]] = []
        offset = 0
        while offset < d.size:
            result = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=info["key"],
                                              startOffset=offset, changeId=change_id)
            areas += [(int(a.start), int(a.length)) for a in (result.changedArea or [])]
            end = int(result.startOffset) + int(result.length)
            if end <= offset:  # no progress: a broken server must not loop forever
                raise ConnectorError(f"QueryChangedDiskAreas of disk {disk} made no progress at "
                                     f"offset {offset}")
            offset = end
        return areas

    def validate_changes(self) -> None:
        """At freeze: a changeId vSphere rejects turns the disk to RESYNC now, so every
        later ``changes()`` of this instant answers the same."""
        for d in self.handle.disks:
            if self.handle.kinds[d.id] != ChangeKind.INCREMENTAL:
                continue
            since = self.handle.data["disks"][d.id]["since"]
            try:
                self.query_areas(d.id, since)
            except vmodl.MethodFault as e:
                self.handle.kinds[d.id] = ChangeKind.RESYNC
                self.handle.reasons[d.id] = (
                    f"vSphere rejected the saved changeId {since!r} "
                    f"({type(e).__name__}: {getattr(e, 'msg', '') or e})")
                log.warning("disk %s of %s: %s; resyncing", d.id, self.handle.data["vm_name"],
                            self.handle.reasons[d.id])

    def _allocated(self, disk: DiskId) -> list[tuple[int, int]] | None:
        try:
            return self.query_areas(disk, "*")
        except vmodl.MethodFault as e:
            log.warning("allocated areas of disk %s unknown (%s): reading all of it", disk, e)
            return None

    def changes(self, disk: DiskId) -> ChangeSet:
        import blockstream

        d, info = self._disk(disk)
        kind = self.handle.kinds[disk]
        try:
            if kind == ChangeKind.INCREMENTAL:
                dirty = [(o, n, _DIRTY) for o, n in self.query_areas(disk, info["since"])]
                planned = blockstream.plan_extents([(0, d.size, 0)], dirty, disk_size=d.size,
                                                   granularity=GRANULARITY)
                extents = [ChangeExtent(e.offset, e.length, e.zero) for e in planned]
            else:
                allocation = _allocation(self._allocated(disk), d.size)
                if kind == ChangeKind.FULL:
                    planned = blockstream.plan_extents(allocation, None, disk_size=d.size,
                                                       granularity=GRANULARITY)
                    extents = [ChangeExtent(e.offset, e.length, e.zero) for e in planned]
                else:  # RESYNC: the whole disk; unallocated areas compared as zeros
                    extents = [ChangeExtent(o, n, bool(f & _ZERO)) for o, n, f in allocation]
        except vmodl.MethodFault as e:
            # The same query answered at freeze: fail (retried) rather than guess.
            raise ConnectorError(f"QueryChangedDiskAreas for disk {disk} of VM "
                                 f"{self.handle.data['vm_name']!r} failed: {e}") from e
        return ChangeSet(
            summary=ChangeSummary(
                disk=disk, kind=kind, reason=self.handle.reasons.get(disk, ""),
                extents=len(extents), data_bytes=sum(e.length for e in extents if not e.zero),
                zero_bytes=sum(e.length for e in extents if e.zero), disk_size=d.size,
                granularity=GRANULARITY),
            extents=extents)

    # ------------------------------------------------------------------ export

    def export(self, disk: DiskId) -> NbdEndpoint:
        d, info = self._disk(disk)
        s = self.source.s()
        cfg = self.source.info.config
        what = f"disk {disk} of VM {self.handle.data['vm_name']!r}"
        if cfg.get("vddk_libdir"):
            factory: CurlSourceFactory | VddkSourceFactory = VddkSourceFactory(
                password=self.source.secret.get("password", ""), libdir=str(cfg["vddk_libdir"]),
                server=s.host, user=s.user, thumbprint=vddk_thumbprint(s.tls.thumbprint),
                vm_moref=self.handle.data["vm"], snapshot_moref=self.handle.data["snapshot"],
                file=info["file"], port=s.port,
                transports=str(cfg.get("vddk_transports", "nbdssl:nbd")),
                config_file=str(cfg.get("vddk_config", "")))
        else:
            if s.tls.thumbprint:
                # curl cannot pin a SHA-1 thumbprint: check the certificate the server
                # presents now, right before nbdkit connects (docs: known limits).
                check_thumbprint(server_certificate(s.host, s.port), s.tls.thumbprint,
                                 f"{s.host}:{s.port}")
            factory = CurlSourceFactory(url=s.file_url(info["flat"], info["datacenter"]),
                                        cookie=s.session_cookie(), ca_file=s.tls.ca_file,
                                        verify=bool(s.tls.ca_file))
        export = serve_nbdkit(factory, what)
        self._exports.append(export)
        return NbdEndpoint(uri=export.uri, size=d.size)

    def close(self) -> None:
        for e in self._exports:
            e.stop()
        self._exports.clear()
        self.source.close()

    # ------------------------------------------------------------------ commit

    def new_checkpoints(self) -> list[Checkpoint]:
        out = []
        for d in self.handle.disks:
            info = self.handle.data["disks"][d.id]
            if info["change_id"]:
                out.append(Checkpoint(disk=d.id, token=info["change_id"], identity=info["identity"],
                                      instant=self.handle.instant))
        return out

    def release(self, committed: bool) -> None:
        """Remove the cycle's snapshot (idempotent). Not committed: the saved changeIds
        stay, so the next cycle still asks for every change since them."""
        try:
            s = self.source.s()
            vm = s.find_vm(self.handle.data["instance_uuid"])
            snap = snapshot_named(vm, self.handle.data["snapshot_name"])
            if snap is not None:
                s.wait(snap.RemoveSnapshot_Task(removeChildren=False),
                       f"removing snapshot {self.handle.data['snapshot_name']!r} of VM "
                       f"{vm.name!r}")
        finally:
            self.close()


def _allocation(areas: list[tuple[int, int]] | None, size: int) -> list[tuple[int, int, int]]:
    """Allocated areas as block-status entries covering the disk: gaps read as zeros."""
    if areas is None:
        return [(0, size, 0)]
    out: list[tuple[int, int, int]] = []
    pos = 0
    for start, length in sorted(areas):
        start, end = max(start, pos), min(start + length, size)
        if end <= start:
            continue
        if start > pos:
            out.append((pos, start - pos, _ZERO | 1))
        out.append((start, end - start, 0))
        pos = end
    if pos < size:
        out.append((pos, size - pos, _ZERO | 1))
    return out
