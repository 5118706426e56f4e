"""KVM/libvirt source: checkpoints + pull-mode backup (``virDomainBackupBegin``).

One cycle:

* ``freeze`` starts a pull-mode backup job of every disk of the domain and creates
  the next checkpoint in the same call, so the frozen instant and the new dirty
  bitmap start at exactly the same moment. QEMU serves the frozen instant over
  NBD on a unix socket (export ``<disk>``, bitmap context
  ``qemu:dirty-bitmap:backup-<disk>`` for incremental disks).
* ``changes`` reads ``base:allocation`` (and the dirty bitmap) of that export.
* ``release(committed=True)`` ends the job and deletes the previous checkpoint,
  keeping one bitmap per disk; ``release(committed=False)`` ends the job and
  deletes the *new* checkpoint, which makes libvirt merge its bitmap into the
  previous one, so no change is lost for the next cycle.

Lost tracking (the checkpoint is gone, belongs to another domain UUID, or its
bitmap is missing or inconsistent in the image) is detected here and the disk's
change kind becomes RESYNC: the whole disk is read and only blocks whose hash
differs from the replica's manifest are written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from hashlib import sha1
from pathlib import Path
from typing import Any

import libvirt

import blockstream
from connectors.base import (
    ChangeExtent,
    ChangeSet,
    ConnectorError,
    DiskAccess,
    NotFound,
    PermanentError,
)
from connectors.kvm.config import KvmConfig
from connectors.kvm.domain import domain_disks
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

CHECKPOINT_PREFIX = "transcend."
_NBD_STATE_ZERO = 2


def open_libvirt(uri: str) -> libvirt.virConnect:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise PermanentError(
            f"cannot connect to libvirt at {uri!r}: {e.get_error_message()}; "
            "check that libvirtd runs there and the URI is right"
        ) from e
    if conn is None:  # pragma: no cover - old bindings returned None
        raise PermanentError(f"cannot connect to libvirt at {uri!r}")
    return conn


def _disk_source(disk: ET.Element) -> str:
    src = disk.find("source")
    if src is None:
        return ""
    return src.get("file") or src.get("dev") or src.get("name") or ""


def workload_from_domain(platform: str, dom: libvirt.virDomain) -> Workload:
    """Describe a libvirt domain as a Workload (disks, CPUs, memory, firmware, NICs)."""
    root = ET.fromstring(dom.XMLDesc(0))
    disks: list[DiskInfo] = []
    for d in domain_disks(root):
        target = d.find("target")
        if target is None:
            continue
        dev = target.get("dev", "")
        try:
            capacity = dom.blockInfo(dev)[0]
        except libvirt.libvirtError:
            capacity = 0
        boot = d.find("boot")
        disks.append(
            DiskInfo(
                id=dev,
                size=capacity,
                name=dev,
                bus=target.get("bus", "virtio"),
                boot_order=int(boot.get("order", "0")) if boot is not None else None,
                source=_disk_source(d),
            )
        )
    nics = []
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        src = iface.find("source")
        model = iface.find("model")
        nics.append(
            NicInfo(
                mac=mac.get("address", "") if mac is not None else "",
                network=(src.get("network") or src.get("bridge") or "") if src is not None else "",
                model=model.get("type", "virtio") if model is not None else "virtio",
            )
        )
    os_el = root.find("os")
    firmware = "bios"
    secure_boot = False
    machine = ""
    if os_el is not None:
        type_el = os_el.find("type")
        machine = type_el.get("machine", "") if type_el is not None else ""
        loader = os_el.find("loader")
        if os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"):
            firmware = "efi"
            secure_boot = loader is not None and loader.get("secure") == "yes"
    state, _ = dom.state()
    return Workload(
        ref=WorkloadRef(platform=platform, id=dom.UUIDString()),
        name=dom.name(),
        cpus=int(root.findtext("vcpu") or "1"),
        memory_mib=max(1, int(root.findtext("memory") or "1024") // 1024),
        firmware=firmware,  # type: ignore[arg-type]
        secure_boot=secure_boot,
        machine=machine,
        disks=disks,
        nics=nics,
        power_state=_STATE_NAMES.get(state, "unknown"),
    )


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def _dac_owner(dom: libvirt.virDomain) -> tuple[int, int] | None:
    """uid:gid QEMU runs as (the DAC seclabel), so its NBD socket dir can be made writable."""
    root = ET.fromstring(dom.XMLDesc(0))
    for sl in root.findall("seclabel"):
        if sl.get("model") == "dac":
            label = sl.findtext("label") or ""
            m = re.fullmatch(r"\+?(\d+):\+?(\d+)", label.strip())
            if m:
                return int(m.group(1)), int(m.group(2))
    return None


class KvmSource:
    """``Source`` for a libvirt host. Config: ``uri`` (default qemu:///system) and
    ``work_dir`` (NBD sockets and backup scratch files; default
    ``$TRANSCEND_HOME/kvm-source``)."""

    #: the platform config it accepts, checked by `transcend platform add`
    config_model = KvmConfig

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        self.uri: str = info.config.get("uri", "qemu:///system")
        from transcend.config import settings

        self.work_dir = Path(info.config.get("work_dir") or settings().home / "kvm-source")

    #: Pull transfers and failback between sites serve frozen disks (transcend/pullexport.py);
    #: power through libvirt; a shut-off domain's images opened with our own qemu-nbd.
    capabilities = Capabilities(guest_family="kvm", power=True, direct_disks=True,
                                serve_remote=True)

    def vm_namespace(self) -> str:
        """Domain names live in the libvirt daemon this URI reaches."""
        return f"libvirt:{self.uri}"

    # ------------------------------------------------------------------ inventory

    def _conn(self) -> libvirt.virConnect:
        return open_libvirt(self.uri)

    def inventory(self) -> list[Workload]:
        conn = self._conn()
        try:
            out = []
            for d in conn.listAllDomains(0):
                try:
                    out.append(workload_from_domain(self.info.name, d))
                except libvirt.libvirtError as e:
                    # Undefined between the listing and its description: not a VM any more.
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return out
        finally:
            conn.close()

    def check(self) -> list[str]:
        """ConnectivityCheck: libvirt answers at the URI, and can take incremental backups."""
        conn = self._conn()
        try:
            lib = conn.getLibVersion()
            domains = len(conn.listAllDomains(0))
            return [f"libvirt {lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000} at {self.uri} "
                    f"({conn.getHostname()}), {domains} domain(s)"]
        finally:
            conn.close()

    def _lookup(self, conn: libvirt.virConnect, ref: str) -> libvirt.virDomain:
        for lookup in (conn.lookupByUUIDString, conn.lookupByName):
            try:
                return lookup(ref)
            except libvirt.libvirtError:
                continue
        known = ", ".join(sorted(d.name() for d in conn.listAllDomains(0))) or "none"
        raise NotFound(
            f"no VM {ref!r} on platform {self.info.name!r} ({self.uri}); known VMs: {known}"
        )

    def workload(self, ref_or_name: str) -> Workload:
        conn = self._conn()
        try:
            return workload_from_domain(self.info.name, self._lookup(conn, ref_or_name))
        finally:
            conn.close()

    # ------------------------------------------------------------------ freeze

    def freeze(
        self,
        protection: str,
        cycle_id: str,
        workloads: list[Workload],
        since: dict[DiskId, Checkpoint],
        opts: FreezeOptions,
    ) -> KvmFrozen | KvmGroupFrozen:
        if not workloads:
            raise PermanentError("nothing to freeze: no VM given")
        if len(workloads) > 1:
            return self._freeze_group(protection, cycle_id, workloads, since, opts)
        wl = workloads[0]
        conn = self._conn()
        try:
            dom = self._lookup(conn, wl.ref.id)
            new_cp = f"{CHECKPOINT_PREFIX}{protection}.{cycle_id}"
            started_paused = self._paused_marker(new_cp).exists()
            if not dom.isActive():
                if not opts.offline_ok:
                    raise PermanentError(
                        f"VM {wl.name!r} is not running; pull-mode backup needs a running "
                        "domain (start it, or use a migration, which copies a shut-off VM)"
                    )
                self._start_paused(dom, new_cp)
                started_paused = True
            try:
                return self._freeze_active(dom, protection, cycle_id, new_cp, since, opts,
                                           started_paused)
            except BaseException:
                if started_paused:
                    self._stop_paused(dom, new_cp)
                raise
        finally:
            conn.close()

    def _freeze_active(self, dom: libvirt.virDomain, protection: str, cycle_id: str,
                       new_cp: str, since: dict[DiskId, Checkpoint], opts: FreezeOptions,
                       started_paused: bool) -> KvmFrozen:
        wl_name = dom.name()
        current = workload_from_domain(self.info.name, dom)
        existing = self._existing_job(dom, new_cp)
        if existing is not None:
            return KvmFrozen(self, existing)
        if new_cp in _checkpoint_names(dom):
            # A previous attempt created our checkpoint but its job is gone (libvirtd
            # restarted): that instant is lost, so fold it back and freeze anew.
            _delete_checkpoint(dom, new_cp)
        kinds, reasons, prev = self._plan_kinds(dom, current, since, opts)
        run = self._cycle_dir(dom, protection)
        handle = FrozenHandle(
            platform=self.info.name,
            protection=protection,
            cycle_id=cycle_id,
            instant=datetime.now(UTC),
            disks=current.disks,
            kinds=kinds,
            reasons=reasons,
            data={
                "uri": self.uri,
                "domain_uuid": dom.UUIDString(),
                "domain": dom.name(),
                "socket": str(run / "nbd.sock"),
                "dir": str(run),
                "new_checkpoint": new_cp,
                "previous_checkpoint": prev,
                "started_paused": started_paused,
            },
        )
        try:
            self._begin_backup(dom, handle)
        except libvirt.libvirtError as e:
            if prev is None or not _is_checkpoint_problem(e):
                raise ConnectorError(
                    f"starting the backup of {wl_name!r} failed: {e.get_error_message()}"
                ) from e
            # The checkpoint exists in libvirt's metadata but its bitmap is missing
            # or inconsistent in the image: tracking is lost, resync every disk.
            log.warning("checkpoint %s unusable (%s): resync", prev, e.get_error_message())
            reason = f"checkpoint {prev} unusable: {e.get_error_message()}"
            handle.kinds = {d.id: ChangeKind.RESYNC for d in current.disks}
            handle.reasons = {d.id: reason for d in current.disks}
            handle.data["previous_checkpoint"] = None
            handle.data["stale_checkpoint"] = prev
            if new_cp in _checkpoint_names(dom):
                _delete_checkpoint(dom, new_cp)
            self._begin_backup(dom, handle)
        return KvmFrozen(self, handle)

    def _freeze_group(
        self,
        protection: str,
        cycle_id: str,
        workloads: list[Workload],
        since: dict[DiskId, Checkpoint],
        opts: FreezeOptions,
    ) -> KvmGroupFrozen:
        """One instant for several domains: every running member is suspended, each
        member's backup job (and next checkpoint) begins, then all resume. The guests
        are stopped for the time the jobs take to start (milliseconds to a second),
        never during the copy."""
        names = [wl.name for wl in workloads]
        if len(set(names)) != len(names):
            raise PermanentError(f"a consistency group needs distinct VM names: {names}")
        new_cp = f"{CHECKPOINT_PREFIX}{protection}.{cycle_id}"
        conn = self._conn()
        try:
            doms = [self._lookup(conn, wl.ref.id) for wl in workloads]
            existing = [self._existing_job(d, new_cp) for d in doms]
            if all(h is not None for h in existing):
                # A retry: every member's job of the first attempt still runs.
                return KvmGroupFrozen(self, [KvmFrozen(self, h) for h in existing if h], names)
            for h in existing:
                if h is not None:  # only some survived: that instant is lost, start over
                    KvmFrozen(self, h).release(committed=False)
            started: set[str] = set()
            for d in doms:
                if d.isActive():
                    continue
                if not opts.offline_ok:
                    raise PermanentError(
                        f"VM {d.name()!r} of the group is not running; pull-mode backup "
                        "needs a running domain")
                self._start_paused(d, new_cp)
                started.add(d.UUIDString())
            suspended: list[libvirt.virDomain] = []
            members: list[KvmFrozen] = []
            try:
                for d in doms:
                    if d.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                        d.suspend()
                        suspended.append(d)
                for name, d in zip(names, doms, strict=True):
                    prefix = f"{name}/"
                    own = {k[len(prefix):]: cp for k, cp in since.items() if k.startswith(prefix)}
                    members.append(self._freeze_active(d, protection, cycle_id, new_cp, own, opts,
                                                       d.UUIDString() in started))
            except BaseException:
                for m in members:
                    with contextlib.suppress(Exception):
                        m.release(committed=False)
                for d in doms:
                    if d.UUIDString() in started:
                        self._stop_paused(d, new_cp)
                raise
            finally:
                for d in suspended:
                    try:
                        d.resume()
                    except libvirt.libvirtError as e:
                        log.error("resuming %s after the group freeze failed: %s", d.name(), e)
            return KvmGroupFrozen(self, members, names)
        except libvirt.libvirtError as e:
            raise ConnectorError(f"freezing the group {names} failed: {e.get_error_message()}") from e
        finally:
            conn.close()

    # ------------------------------------------------------------------ shut-off VMs

    def _paused_marker(self, new_cp: str) -> Path:
        return self.work_dir / "paused" / new_cp

    def _start_paused(self, dom: libvirt.virDomain, new_cp: str) -> None:
        """Start a shut-off domain with its CPUs stopped: QEMU opens the disks and can
        serve a backup, the guest never runs an instruction. The marker (written first)
        lets a retry or release in another process know the domain is ours to stop."""
        marker = self._paused_marker(new_cp)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(dom.UUIDString())
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as e:
            if not dom.isActive():
                marker.unlink(missing_ok=True)
                raise ConnectorError(
                    f"starting shut-off VM {dom.name()!r} paused (to read its disks) failed: "
                    f"{e.get_error_message()}"
                ) from e

    def _stop_paused(self, dom: libvirt.virDomain, new_cp: str) -> None:
        """Stop a domain _start_paused started, unless someone resumed it meanwhile.
        SIGTERM only (graceful): QEMU then stores the dirty bitmaps in the images."""
        marker = self._paused_marker(new_cp)
        try:
            state, _ = dom.state()
            if dom.isActive() and state == libvirt.VIR_DOMAIN_PAUSED:
                try:
                    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
                except libvirt.libvirtError:
                    if dom.isActive():
                        dom.destroy()
        except libvirt.libvirtError as e:
            if dom.isActive():
                raise ConnectorError(
                    f"stopping VM {dom.name()!r}, started paused to read its disks, failed: "
                    f"{e.get_error_message()}"
                ) from e
        marker.unlink(missing_ok=True)

    def paused_by_us(self, ref: str) -> bool:
        """Whether the VM is paused because a freeze of ours started it so (a worker died
        before releasing it)."""
        conn = self._conn()
        try:
            dom = self._lookup(conn, ref)
            state, _ = dom.state()
            return state == libvirt.VIR_DOMAIN_PAUSED and bool(self._our_paused_markers(dom))
        finally:
            conn.close()

    def _our_paused_markers(self, dom: libvirt.virDomain) -> list[Path]:
        uuid = dom.UUIDString()
        found = []
        for marker in sorted((self.work_dir / "paused").glob("*")):
            with contextlib.suppress(OSError):
                if marker.read_text().strip() == uuid:
                    found.append(marker)
        return found

    def stop_leftover_paused(self, ref: str) -> None:
        """Stop the VM if a freeze of ours left it started paused (undo after a failure)."""
        conn = self._conn()
        try:
            dom = self._lookup(conn, ref)
            for marker in self._our_paused_markers(dom):
                self._stop_paused(dom, marker.name)
        finally:
            conn.close()

    # ------------------------------------------------------------------ power

    def power_state(self, ref: str) -> str:
        return self.workload(ref).power_state

    def settle(self, ref: str) -> None:
        self.stop_leftover_paused(ref)

    def open_disks(self, ref: str, *, readonly: bool) -> AbstractContextManager[list[DiskAccess]]:
        from connectors.kvm.writeback import open_disks

        return open_disks(self, ref, readonly=readonly)

    def power_off(self, ref: str, timeout_seconds: float, force: bool) -> bool:
        """Shut the VM down cleanly (ACPI power button) and wait until it is off; power it
        off when ``force`` and it did not stop in time. Returns whether it was running."""
        conn = self._conn()
        try:
            dom = self._lookup(conn, ref)
            if not dom.isActive():
                return False
            deadline = time.monotonic() + timeout_seconds
            asked = 0.0
            while dom.isActive():
                if time.monotonic() - asked > 15:  # repeat: an early press can be lost
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                    asked = time.monotonic()
                if time.monotonic() > deadline:
                    if not force:
                        raise ConnectorError(
                            f"VM {dom.name()!r} did not shut down within {timeout_seconds:.0f} s "
                            "of the ACPI power button; shut it down from inside the guest, or "
                            "run a failover with force_off"
                        )
                    log.warning("VM %s ignored the power button; powering it off", dom.name())
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
                    break
                time.sleep(0.5)
            return True
        finally:
            conn.close()

    def power_on(self, ref: str) -> None:
        conn = self._conn()
        try:
            dom = self._lookup(conn, ref)
            if dom.isActive():
                state, _ = dom.state()
                if state == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
                return
            try:
                dom.create()
            except libvirt.libvirtError as e:
                if not dom.isActive():
                    raise ConnectorError(
                        f"starting VM {dom.name()!r} failed: {e.get_error_message()}") from e
        finally:
            conn.close()

    # ------------------------------------------------------------------ forget

    def forget(self, protection: str, workloads: list[Workload]) -> list[str]:
        """Remove what ``protection`` made on these domains: a backup job (freeze) still
        held, its checkpoints with their persistent dirty bitmaps, a domain it left
        started paused, its work files. Checkpoints of other protections of the same
        domain are not touched: since libvirt 6.5 every checkpoint's bitmap is active
        and records from its creation on, and deleting one removes only its own bitmap
        (an older libvirt merges it into the parent checkpoint's, which can only add
        dirty blocks there: the other protection then copies a little more, never less).
        A checkpoint whose bitmap is already gone loses its metadata only."""
        removed: list[str] = []
        conn = self._conn()
        try:
            for wl in workloads:
                try:
                    dom = conn.lookupByUUIDString(wl.ref.id)
                except libvirt.libvirtError:
                    try:
                        dom = conn.lookupByName(wl.name)
                    except libvirt.libvirtError:
                        log.info("forget %s: VM %s is gone; nothing to remove", protection, wl.name)
                        continue
                removed += self._forget_domain(dom, protection)
        finally:
            conn.close()
        return removed

    def _forget_domain(self, dom: libvirt.virDomain, protection: str) -> list[str]:
        uuid = dom.UUIDString()
        removed: list[str] = []
        # A freeze still held (its cycle was cancelled or its worker died): end it the
        # way a failed cycle does (job aborted, its new checkpoint folded back).
        for marker in sorted((self.work_dir / "handles").glob(f"{CHECKPOINT_PREFIX}*.{uuid}.json")):
            try:
                handle = FrozenHandle.model_validate_json(marker.read_text())
            except (OSError, ValueError):
                continue
            if handle.protection == protection:
                KvmFrozen(self, handle).release(committed=False)
                removed.append(f"{dom.name()}: freeze of cycle {handle.cycle_id}")
        run = self.work_dir / sha1(f"{protection}/{uuid}".encode()).hexdigest()[:12]
        if _backup_running(dom, str(run / "nbd.sock")):
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()
            removed.append(f"{dom.name()}: backup job")
        for marker in self._our_paused_markers(dom):
            if owned_checkpoint(marker.name, protection):
                self._stop_paused(dom, marker.name)
        for name in sorted(_checkpoint_names(dom), reverse=True):
            if owned_checkpoint(name, protection):
                _delete_checkpoint(dom, name)
                removed.append(f"{dom.name()}: checkpoint {name}")
        shutil.rmtree(run, ignore_errors=True)
        return removed

    def reopen(self, handle: FrozenHandle) -> KvmFrozen | KvmGroupFrozen:
        if "group" in handle.data:
            return KvmGroupFrozen.from_handle(self, handle)
        return KvmFrozen(self, handle)

    def _cycle_dir(self, dom: libvirt.virDomain, protection: str) -> Path:
        # Short path: unix socket paths are limited to 108 bytes.
        tag = sha1(f"{protection}/{dom.UUIDString()}".encode()).hexdigest()[:12]
        run = self.work_dir / tag
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermanentError(
                f"cannot create the KVM source work directory {run}: {e.strerror}; "
                "set work_dir in the platform config to a writable directory"
            ) from e
        owner = _dac_owner(dom)
        if owner is not None and os.geteuid() == 0:
            os.chown(run, *owner)
        run.chmod(0o755)
        return run

    def _plan_kinds(
        self,
        dom: libvirt.virDomain,
        current: Workload,
        since: dict[DiskId, Checkpoint],
        opts: FreezeOptions,
    ) -> tuple[dict[DiskId, ChangeKind], dict[DiskId, str], str | None]:
        names = _checkpoint_names(dom)
        kinds: dict[DiskId, ChangeKind] = {}
        reasons: dict[DiskId, str] = {}
        tokens = {cp.token for cp in since.values()}
        prev = next(iter(tokens)) if len(tokens) == 1 else None
        for disk in current.disks:
            cp = since.get(disk.id)
            if cp is None:
                # Nothing replicated for this disk yet: FULL, unless other disks were
                # (a disk added to the VM), which still starts with a full copy.
                kinds[disk.id] = ChangeKind.FULL
                reasons[disk.id] = "first cycle"
            elif opts.force_resync:
                kinds[disk.id] = ChangeKind.RESYNC
                reasons[disk.id] = "resync requested"
            elif cp.identity and cp.identity != dom.UUIDString():
                kinds[disk.id] = ChangeKind.RESYNC
                reasons[disk.id] = (
                    f"checkpoint {cp.token} belongs to domain {cp.identity}, "
                    f"VM is now {dom.UUIDString()} (domain redefined)"
                )
            elif cp.token not in names:
                kinds[disk.id] = ChangeKind.RESYNC
                reasons[disk.id] = f"checkpoint {cp.token} no longer exists in libvirt"
            elif len(tokens) != 1:
                kinds[disk.id] = ChangeKind.RESYNC
                reasons[disk.id] = "disks disagree on the last checkpoint"
            else:
                kinds[disk.id] = ChangeKind.INCREMENTAL
        if all(k != ChangeKind.INCREMENTAL for k in kinds.values()):
            prev = None
        # Stale transcend checkpoints for this domain that are not ours hold bitmaps
        # nobody reads; the ones that are ours are handled by release().
        return kinds, reasons, prev

    def _begin_backup(self, dom: libvirt.virDomain, handle: FrozenHandle) -> None:
        run = Path(handle.data["dir"])
        sock = Path(handle.data["socket"])
        sock.unlink(missing_ok=True)
        prev = handle.data.get("previous_checkpoint")
        backup = ET.Element("domainbackup", mode="pull")
        if prev:
            ET.SubElement(backup, "incremental").text = prev
        ET.SubElement(backup, "server", transport="unix", socket=str(sock))
        disks_el = ET.SubElement(backup, "disks")
        cp = ET.Element("domaincheckpoint")
        ET.SubElement(cp, "name").text = handle.data["new_checkpoint"]
        cp_disks = ET.SubElement(cp, "disks")
        for disk in handle.disks:
            scratch = run / f"scratch-{disk.id}.qcow2"
            scratch.unlink(missing_ok=True)
            attrs = {"name": disk.id, "backup": "yes", "type": "file"}
            if handle.kinds[disk.id] != ChangeKind.INCREMENTAL or not prev:
                attrs["backupmode"] = "full"
            d = ET.SubElement(disks_el, "disk", attrs)
            ET.SubElement(d, "scratch", file=str(scratch))
            ET.SubElement(cp_disks, "disk", name=disk.id, checkpoint="bitmap")
        dom.backupBegin(ET.tostring(backup, "unicode"), ET.tostring(cp, "unicode"), 0)

    def _existing_job(self, dom: libvirt.virDomain, new_cp: str) -> FrozenHandle | None:
        """A retried freeze finds the job its first attempt started (same checkpoint)."""
        marker = self._marker(new_cp, dom.UUIDString())
        if not marker.exists():
            return None
        handle = FrozenHandle.model_validate_json(marker.read_text())
        if _backup_running(dom, handle.data["socket"]):
            return handle
        return None

    def _marker(self, new_cp: str, domain_uuid: str) -> Path:
        # per domain: the members of a group share the checkpoint name
        return Path(self.work_dir) / "handles" / f"{new_cp}.{domain_uuid}.json"

    def remember(self, handle: FrozenHandle) -> None:
        marker = self._marker(handle.data["new_checkpoint"], handle.data["domain_uuid"])
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(handle.model_dump_json())
        tmp.replace(marker)

    def _drop_marker(self, handle: FrozenHandle) -> None:
        marker = self._marker(handle.data["new_checkpoint"], handle.data["domain_uuid"])
        marker.unlink(missing_ok=True)


def owned_checkpoint(name: str, protection: str) -> bool:
    """Whether checkpoint ``name`` is one of ``protection``'s (``transcend.<protection>.
    <cycle id>``). Protection names may contain dots and cycle ids never do, so
    ``transcend.a.b.<cycle>`` belongs to protection ``a.b``, not to ``a``."""
    prefix = f"{CHECKPOINT_PREFIX}{protection}."
    rest = name[len(prefix):]
    return name.startswith(prefix) and bool(rest) and "." not in rest


def _checkpoint_names(dom: libvirt.virDomain) -> set[str]:
    try:
        return {c.getName() for c in dom.listAllCheckpoints(0)}
    except libvirt.libvirtError:
        return set()


def _delete_checkpoint(dom: libvirt.virDomain, name: str) -> None:
    try:
        cp = dom.checkpointLookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            raise
        return
    try:
        cp.delete(0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return
        if not _is_checkpoint_problem(e):
            raise
        # The checkpoint's bitmap is already gone from the image (the reason its
        # protection resynced): libvirt cannot merge or delete it, so drop only the
        # metadata. A bitmap of that name left on another disk of the VM costs a little
        # write tracking until the disk is next recreated; it is never read again.
        log.warning("checkpoint %s: %s; removing its metadata only", name, e.get_error_message())
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def _is_checkpoint_problem(e: libvirt.libvirtError) -> bool:
    code = e.get_error_code()
    if code in (
        libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
        getattr(libvirt, "VIR_ERR_CHECKPOINT_INCONSISTENT", -1),
    ):
        return True
    msg = (e.get_error_message() or "").lower()
    return "bitmap" in msg or "checkpoint" in msg


def _backup_running(dom: libvirt.virDomain, socket: str) -> bool:
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False
    server = ET.fromstring(xml).find("server")
    return server is not None and server.get("socket") == socket


class KvmFrozen:
    def __init__(self, source: KvmSource, handle: FrozenHandle) -> None:
        self.source = source
        self.handle = handle
        source.remember(handle)

    def _disk(self, disk: DiskId) -> DiskInfo:
        for d in self.handle.disks:
            if d.id == disk:
                return d
        raise PermanentError(f"disk {disk!r} is not part of this frozen instant")

    def export(self, disk: DiskId) -> NbdEndpoint:
        d = self._disk(disk)
        return NbdEndpoint(uri=f"nbd+unix:///{d.id}?socket={self.handle.data['socket']}", size=d.size)

    def changes(self, disk: DiskId) -> ChangeSet:
        d = self._disk(disk)
        ep = self.export(disk)
        kind = self.handle.kinds[disk]
        granularity = 65536
        try:
            alloc = blockstream.block_status(ep.uri, "base:allocation", disk_size=d.size)
            if kind == ChangeKind.INCREMENTAL:
                dirty = blockstream.block_status(
                    ep.uri, f"qemu:dirty-bitmap:backup-{d.id}", disk_size=d.size
                )
                planned = blockstream.plan_extents(
                    alloc, dirty, disk_size=d.size, granularity=granularity
                )
                extents = [ChangeExtent(e.offset, e.length, e.zero) for e in planned]
            elif kind == ChangeKind.FULL:
                planned = blockstream.plan_extents(alloc, None, disk_size=d.size, granularity=granularity)
                extents = [ChangeExtent(e.offset, e.length, e.zero) for e in planned]
            else:
                # RESYNC: the whole disk; zero regions are not read but still compared.
                extents = [ChangeExtent(o, n, bool(f & _NBD_STATE_ZERO)) for o, n, f in alloc]
        except blockstream.BlockstreamError as e:
            raise ConnectorError(f"reading the change map of disk {disk!r} failed: {e}") from e
        return ChangeSet(
            summary=ChangeSummary(
                disk=disk,
                kind=kind,
                reason=self.handle.reasons.get(disk, ""),
                extents=len(extents),
                data_bytes=sum(e.length for e in extents if not e.zero),
                zero_bytes=sum(e.length for e in extents if e.zero),
                disk_size=d.size,
                granularity=granularity,
            ),
            extents=extents,
        )

    def close(self) -> None:
        """Nothing to stop: libvirt's backup job serves the exports until release."""

    def new_checkpoints(self) -> list[Checkpoint]:
        return [
            Checkpoint(
                disk=d.id,
                token=self.handle.data["new_checkpoint"],
                identity=self.handle.data["domain_uuid"],
                instant=self.handle.instant,
            )
            for d in self.handle.disks
        ]

    def release(self, committed: bool) -> None:
        conn = open_libvirt(self.handle.data["uri"])
        try:
            try:
                dom = conn.lookupByUUIDString(self.handle.data["domain_uuid"])
            except libvirt.libvirtError:
                log.warning("domain %s gone; nothing to release", self.handle.data["domain"])
                self.source._drop_marker(self.handle)
                return
            if _backup_running(dom, self.handle.data["socket"]):
                try:
                    dom.abortJob()
                except libvirt.libvirtError as e:
                    if _backup_running(dom, self.handle.data["socket"]):
                        raise ConnectorError(
                            f"ending the backup job of {self.handle.data['domain']!r} failed: "
                            f"{e.get_error_message()}"
                        ) from e
            new_cp = self.handle.data["new_checkpoint"]
            if committed:
                # Keep only the newest bitmap: older transcend checkpoints of this
                # protection are no longer needed by anyone.
                for name in sorted(_checkpoint_names(dom)):
                    if owned_checkpoint(name, self.handle.protection) and name != new_cp:
                        _delete_checkpoint(dom, name)
            else:
                # Deleting the new checkpoint merges its bitmap into the previous one,
                # so the next cycle still sees every change since that checkpoint.
                _delete_checkpoint(dom, new_cp)
            if self.handle.data.get("started_paused") or self.source._paused_marker(new_cp).exists():
                self.source._stop_paused(dom, new_cp)
        finally:
            conn.close()
        shutil.rmtree(self.handle.data["dir"], ignore_errors=True)
        self.source._drop_marker(self.handle)

    def describe(self) -> dict[str, Any]:
        return {"kinds": dict(self.handle.kinds), "reasons": dict(self.handle.reasons)}


class KvmGroupFrozen:
    """The frozen instant of a consistency group: one KvmFrozen per member domain, seen
    as one handle whose disk ids are ``<VM name>/<disk>``."""

    def __init__(self, source: KvmSource, members: list[KvmFrozen], names: list[str]) -> None:
        self.source = source
        self.members = dict(zip(names, members, strict=True))
        disks: list[DiskInfo] = []
        kinds: dict[DiskId, ChangeKind] = {}
        reasons: dict[DiskId, str] = {}
        for name, m in self.members.items():
            for d in m.handle.disks:
                gid = f"{name}/{d.id}"
                disks.append(d.model_copy(update={"id": gid, "name": gid}))
                kinds[gid] = m.handle.kinds[d.id]
                if d.id in m.handle.reasons:
                    reasons[gid] = m.handle.reasons[d.id]
        first = members[0].handle
        self.handle = FrozenHandle(
            platform=first.platform, protection=first.protection, cycle_id=first.cycle_id,
            instant=max(m.handle.instant for m in members), disks=disks, kinds=kinds,
            reasons=reasons,
            data={"group": [{"name": n, "handle": m.handle.model_dump(mode="json")}
                            for n, m in self.members.items()]},
        )

    @classmethod
    def from_handle(cls, source: KvmSource, handle: FrozenHandle) -> KvmGroupFrozen:
        group = cls(source, [KvmFrozen(source, FrozenHandle.model_validate(g["handle"]))
                             for g in handle.data["group"]],
                    [g["name"] for g in handle.data["group"]])
        group.handle = handle  # keeps what the caller changed (a disk turned RESYNC)
        return group

    def _member(self, disk: DiskId) -> tuple[KvmFrozen, str]:
        name, _, inner = disk.partition("/")
        member = self.members.get(name)
        if member is None or not inner:
            raise PermanentError(f"disk {disk!r} is not part of this group's frozen instant")
        # the group handle's kind is the one that counts (the cycle may have changed it)
        member.handle.kinds[inner] = self.handle.kinds[disk]
        if disk in self.handle.reasons:
            member.handle.reasons[inner] = self.handle.reasons[disk]
        return member, inner

    def changes(self, disk: DiskId) -> ChangeSet:
        member, inner = self._member(disk)
        cs = member.changes(inner)
        cs.summary = cs.summary.model_copy(update={"disk": disk})
        return cs

    def export(self, disk: DiskId) -> NbdEndpoint:
        member, inner = self._member(disk)
        return member.export(inner)

    def close(self) -> None:
        """Nothing to stop (see KvmFrozen.close)."""

    def new_checkpoints(self) -> list[Checkpoint]:
        return [cp.model_copy(update={"disk": f"{name}/{cp.disk}"})
                for name, m in self.members.items() for cp in m.new_checkpoints()]

    def release(self, committed: bool) -> None:
        errors = []
        for name, m in self.members.items():
            try:
                m.release(committed)
            except ConnectorError as e:
                errors.append(f"{name}: {e}")
        if errors:
            raise ConnectorError("releasing the group freeze failed: " + "; ".join(errors))
