"""The connector contracts every platform implements (DESIGN.md, "The one flow").

A cycle is freeze -> changes -> stream -> stage -> commit -> release, each step an
activity. Activities may run in different processes (a worker can die at any
moment), so the live objects here are always rebuilt from serializable handles:
``Source.reopen(FrozenHandle)`` and ``Target.resume(StagingHandle)``. Every
method must be idempotent for the same handle: calling it again after a crash
returns the same result or finishes what the first call started.

Errors: raise ``ConnectorError`` subclasses. ``PermanentError`` tells the activity
layer not to retry (bad credentials, VM gone, bad input); anything else is retried
by Temporal with back-off.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from transcend.models import (
    BootSpec,
    Capabilities,
    ChangeSummary,
    Checkpoint,
    DiskId,
    DiskInfo,
    FreezeOptions,
    FrozenHandle,
    Instance,
    NbdEndpoint,
    PlatformInfo,
    PointMeta,
    RecoveryPoint,
    StagingHandle,
    Workload,
)


class ConnectorError(Exception):
    """A platform operation failed; the message says what and what to do."""


class PermanentError(ConnectorError):
    """Retrying cannot help (bad credentials, unknown VM, invalid configuration)."""


class NotFound(PermanentError):
    """The named object does not exist on the platform."""


class Busy(ConnectorError):
    """The object is in use (an open export, a running instance); try again later."""


@dataclass(frozen=True)
class ChangeExtent:
    """One extent to copy. ``zero`` extents are known to read as zeros at the source."""

    offset: int
    length: int
    zero: bool = False


@dataclass
class ChangeSet:
    summary: ChangeSummary
    extents: list[ChangeExtent]


@runtime_checkable
class Frozen(Protocol):
    handle: FrozenHandle

    def changes(self, disk: DiskId) -> ChangeSet:
        """Extents changed since the checkpoint (all allocated extents when FULL, the
        whole disk with zero extents marked when RESYNC)."""
        ...

    def export(self, disk: DiskId) -> NbdEndpoint:
        """Where blockstream reads the frozen instant of ``disk``."""
        ...

    def release(self, committed: bool) -> None:
        """End the freeze. committed=True: the checkpoints in ``new_checkpoints`` are now
        current (the catalog already recorded them with the point); committed=False:
        the next cycle must still see every change since the previous checkpoint."""
        ...

    def new_checkpoints(self) -> list[Checkpoint]:
        """Tokens that become current when this instant's point commits."""
        ...

    def close(self) -> None:
        """Stop what this object started in this process (NBD servers behind ``export``,
        API sessions); the frozen instant itself stays until ``release``. Idempotent."""
        ...


@runtime_checkable
class Source(Protocol):
    info: PlatformInfo
    #: What this connector can do beyond the core contract (``capabilities_of``).
    capabilities: Capabilities

    def inventory(self) -> list[Workload]: ...

    def workload(self, ref_or_name: str) -> Workload:
        """Look up one VM by id or name; NotFound names what was asked for."""
        ...

    def freeze(
        self,
        protection: str,
        cycle_id: str,
        workloads: list[Workload],
        since: dict[DiskId, Checkpoint],
        opts: FreezeOptions,
    ) -> Frozen:
        """One consistent instant of all disks of ``workloads`` (a group: all at once).
        Disk ids in ``since`` and in the handle are ``<workload-name>/<disk-id>`` when more
        than one workload is frozen, plain disk ids otherwise."""
        ...

    def reopen(self, handle: FrozenHandle) -> Frozen: ...

    def forget(self, protection: str, workloads: list[Workload]) -> list[str]:
        """Remove every tracking artefact ``protection`` created on the source for
        ``workloads`` (checkpoints, dirty bitmaps, snapshots, a freeze still held, work
        files), and only those: another protection of the same VMs keeps its own and
        its next cycle stays incremental. Called when the protection is removed, after
        its last cycle ended. Returns what was removed (for the log). Idempotent; a VM
        that no longer exists is skipped."""
        ...


@runtime_checkable
class Staging(Protocol):
    handle: StagingHandle

    def endpoint(self, disk: DiskId) -> NbdEndpoint:
        """Where blockstream writes ``disk`` of the new point (a layer over the last one)."""
        ...

    def commit(self, meta: PointMeta) -> list[str]:
        """Make the staged layer durable and immutable; returns per-disk locations in
        ``handle.disks`` order. Recording the point in the catalog is the caller's job."""
        ...

    def abort(self) -> None:
        """Throw the staged layer away; existing points are untouched."""
        ...

    def close(self) -> None:
        """Stop what ``endpoint`` started in this process (NBD servers, API sessions);
        the staged layer stays for ``commit`` or ``abort``. Idempotent."""
        ...


@runtime_checkable
class Target(Protocol):
    info: PlatformInfo
    capabilities: Capabilities

    def prepare(self, protection: str, disks: list[DiskInfo], workloads: list[Workload]) -> None:
        """Create the replica's home, or grow its disks when the source grew. ``workloads``
        describe the source VMs (a platform whose replica is a VM shapes it after them)."""
        ...

    def begin(self, protection: str, cycle_id: str, disks: list[DiskInfo],
              last: RecoveryPoint | None) -> Staging: ...

    def resume(self, handle: StagingHandle) -> Staging: ...

    def open(self, point: RecoveryPoint, disk: DiskId) -> NbdEndpoint:
        """A read-only export of one disk of a point (verify, failback, copy-out)."""
        ...

    def close(self, point: RecoveryPoint, disk: DiskId) -> None: ...

    def delete(self, point: RecoveryPoint, successor: RecoveryPoint | None) -> RecoveryPoint | None:
        """Remove ``point`` (retention). When the platform stores points as deltas, the
        successor absorbs what it needs; its content must not change. Returns the
        successor with its new locations, if they moved."""
        ...

    def boot(self, point: RecoveryPoint, spec: BootSpec) -> Instance:
        """Start a VM on a throw-away overlay of ``point``; the point is never written."""
        ...

    def destroy(self, instance: Instance) -> None:
        """Stop and remove a booted instance and its overlays (idempotent)."""
        ...


# --------------------------------------------------------------------------- capabilities
#
# DR operations (activities/dr.py) need more than replication: power of the VMs on
# both sides, health of a booted instance, a shut-off VM's own disks for failback.
# A connector declares what it offers in ``capabilities`` and implements the matching
# protocol below on its Source or Target; the activities ask ``capabilities_of`` and
# ``require`` and never look at a platform's kind.

PowerState = str  # "running", "shutoff", "paused", "unknown"


@runtime_checkable
class PowerControl(Protocol):
    """On a Source with ``capabilities.power``: its VMs, and the instances its platform's
    Target booted (a failed-over VM is stopped and started through it)."""

    def power_state(self, vm: str) -> PowerState: ...

    def power_off(self, vm: str, timeout_seconds: float, force: bool) -> bool:
        """Shut ``vm`` down gracefully (ACPI / guest tools), repeating the request, for up
        to ``timeout_seconds``; then power it off when ``force``, else raise
        ConnectorError saying it did not stop. Returns whether it was running (an
        abort starts it again). Idempotent: off stays off and returns False."""
        ...

    def power_on(self, vm: str) -> None:
        """Start ``vm``; a running VM is fine."""
        ...

    def settle(self, vm: str) -> None:
        """Undo what a crashed attempt of ours left on ``vm`` (a VM paused to read its
        tracking, a half-taken snapshot), leaving the VM as the operator had it."""
        ...


@dataclass(frozen=True)
class DiskAccess:
    """One disk of a shut-off VM opened directly (``DirectDisks``)."""

    disk: DiskId
    size: int
    uri: str  # NBD URI (nbd+unix:// or nbd://), writable unless opened read-only


@runtime_checkable
class DirectDisks(Protocol):
    """On a Source with ``capabilities.direct_disks``: the VM's own disks while it is
    shut off, for failback to write into and for its verify to read. Writes must be
    seen by the platform's change tracking (KVM: qemu-nbd updates the persistent
    bitmaps; VMware: writes through VDDK are seen by CBT), so the protection resumes
    incrementally after the failback."""

    def open_disks(self, vm: str, *, readonly: bool
                   ) -> AbstractContextManager[list[DiskAccess]]:
        """Exports of every disk of the shut-off ``vm``, in the workload's disk order,
        stopped (and flushed) on exit. A running VM is refused (PermanentError)."""
        ...


@runtime_checkable
class ConnectivityCheck(Protocol):
    """Optional on a Source or Target: ``transcend platform check`` (and ``platform add
    --check``) asks it whether the platform's config and credentials work, before a
    protection depends on them. Without it the CLI falls back to the inventory
    (sources) or to constructing the connector (targets)."""

    def check(self) -> list[str]:
        """What was reached, one line per thing checked ("libvirt 9.0.0 at qemu:///system,
        3 domains"); raises ConnectorError saying what failed and what to do."""
        ...


@runtime_checkable
class HealthProbe(Protocol):
    """On a Target with ``capabilities.health``: what the platform says about a booted
    instance. Each method answers from the platform, not from a file of the worker."""

    def console_text(self, instance: Instance) -> str:
        """The instance's console output so far ("" when none yet)."""
        ...

    def agent_ready(self, instance: Instance) -> bool:
        """True once the guest agent / tools report the guest up."""
        ...

    def address(self, instance: Instance) -> str:
        """An IP address the target site's worker can probe ("" when unknown yet)."""
        ...


def capabilities_of(connector: object) -> Capabilities:
    """The connector's declared capabilities (none for one that declares nothing)."""
    caps = getattr(connector, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else Capabilities()


def vm_namespace(connector: object, info: PlatformInfo) -> str:
    """Where the connector's VM names live (``connector.vm_namespace()``: a libvirt URI, a
    vCenter, a cloud account and region). Two platforms with the same namespace at the
    same site are one host registered twice, so a recovered VM needs a name of its own
    there. A connector that does not say is its own namespace."""
    ns = getattr(connector, "vm_namespace", None)
    return str(ns()) if callable(ns) else f"platform:{info.name}"


def require_power(connector: object, role: str) -> PowerControl:
    """``connector`` as a PowerControl, or a PermanentError naming the platform."""
    if capabilities_of(connector).power and isinstance(connector, PowerControl):
        return connector
    raise PermanentError(f"the {role} platform {_name(connector)!r} cannot power its VMs "
                         "off and on through transcend (its connector does not offer power "
                         "control)")


def require_direct_disks(connector: object, role: str) -> DirectDisks:
    if capabilities_of(connector).direct_disks and isinstance(connector, DirectDisks):
        return connector
    raise PermanentError(f"the {role} platform {_name(connector)!r} cannot open a VM's own "
                         "disks (its connector does not offer direct disk access): failback "
                         "into it is not possible")


def health_probe(connector: object) -> HealthProbe | None:
    caps = capabilities_of(connector)
    return connector if caps.health and isinstance(connector, HealthProbe) else None


def _name(connector: object) -> str:
    info = getattr(connector, "info", None)
    return str(getattr(info, "name", type(connector).__name__))
