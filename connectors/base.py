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

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from transcend.models import (
    BootSpec,
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
