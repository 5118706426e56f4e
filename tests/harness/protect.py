"""Drive a protection the way other systems do: the documented workflow names and
pydantic inputs through a Temporal client (docs/workflow-api.md), plus the checks the
end-to-end tests and the demo share (a point read back, its records)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import libvirt
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy

from connectors.kvm.domain import ISOLATED_NETWORK, isolated_network_xml
from tests.harness.guest import BOOT_MARKER, ERROR_MARKER, GuestImage, make_guest_disk
from tests.harness.libvirtd import DiskSpec, running_domain, wait_for_console
from transcend.api import (
    CONTROL_TASK_QUEUE,
    REPLICATION_WORKFLOW,
    VERIFY_WORKFLOW,
    ReplicationInput,
    ReplicationStatus,
    VerifyInput,
    VerifyResult,
    replication_id,
    verify_id,
)
from transcend.catalog import Catalog
from transcend.models import (
    PlatformKind,
    PlatformSpec,
    ProtectionPolicy,
    ProtectionSpec,
    RecoveryPoint,
    RetentionPolicy,
)


def add_kvm_platforms(cat: Catalog, replica_root: Path, *, source: str = "kvm-src",
                      target: str = "kvm-dst") -> tuple[str, str]:
    """A libvirt source (qemu:///system) and a local qcow2-chain target under replica_root."""
    cat.add_platform(PlatformSpec(name=source, kind=PlatformKind.KVM, site="local",
                                  config={"uri": "qemu:///system"}), replace=True)
    cat.add_platform(PlatformSpec(name=target, kind=PlatformKind.KVM, site="local",
                                  config={"root": str(replica_root), "domain_type": "qemu"}),
                     replace=True)
    return source, target


def protection_spec(name: str, vm: str, source: str, target: str, *, rpo: int = 7 * 86400,
                    retention: str = "all 1d", bandwidth: int | None = None,
                    test_failover_every: int | None = None) -> ProtectionSpec:
    # A week: the tests drive cycles with sync_now so that they are deterministic, and
    # the Schedule's own tick (at a stable offset within its interval) must not land
    # inside a test, as an hourly one did: a failover then recovered a newer point.
    return ProtectionSpec(
        name=name, source_platform=source, workloads=[vm], target_platform=target,
        policy=ProtectionPolicy(rpo_seconds=rpo, retention=RetentionPolicy.parse(retention),
                                bandwidth_bytes_per_s=bandwidth,
                                test_failover_every_seconds=test_failover_every),
    )


async def start_protection(client: Client, spec: ProtectionSpec) -> WorkflowHandle[object, object]:
    return await client.start_workflow(
        REPLICATION_WORKFLOW, ReplicationInput(protection=spec.name, spec=spec),
        id=replication_id(spec.name), task_queue=CONTROL_TASK_QUEUE,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )


async def status(handle: WorkflowHandle[object, object]) -> ReplicationStatus:
    return await handle.query("status", result_type=ReplicationStatus)


async def wait_for(fn: Callable[[], Awaitable[ReplicationStatus]],
                   pred: Callable[[ReplicationStatus], bool], timeout: float,
                   what: str) -> ReplicationStatus:
    deadline = time.monotonic() + timeout
    last: ReplicationStatus | None = None
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            last = await fn()
            if pred(last):
                return last
        except Exception as e:  # the query fails while a server restarts
            last_exc = e
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last status {last!r}; "
                         f"last error {last_exc!r}")


async def wait_first_point(handle: WorkflowHandle[object, object], timeout: float = 600) -> ReplicationStatus:
    async def running_status() -> ReplicationStatus:
        # A Replication workflow that ended (its registration failed) never gets a
        # point: say why at once instead of waiting out the timeout.
        desc = await handle.describe()
        if desc.status != WorkflowExecutionStatus.RUNNING:
            try:
                await handle.result()
            except Exception as e:
                raise _Ended(f"the Replication workflow ended ({desc.status}): {e!r}") from e
            raise _Ended(f"the Replication workflow ended ({desc.status})")
        return await status(handle)

    try:
        return await wait_for(running_status, lambda s: s.last_point_id is not None
                              or s.cycles_failed > 0, timeout, "the first point")
    except _Ended as e:
        raise AssertionError(str(e)) from e


class _Ended(BaseException):
    """Escapes wait_for's retry-on-error loop (it retries Exceptions)."""


async def sync_now(handle: WorkflowHandle[object, object], timeout: float = 600) -> ReplicationStatus:
    """Ask for a cycle and wait until it has finished (committed or failed)."""
    before = await status(handle)
    done = before.cycles_ok + before.cycles_failed
    await handle.execute_update("sync_now", result_type=ReplicationStatus)
    return await wait_for(lambda: status(handle), lambda s: s.cycles_ok + s.cycles_failed > done,
                          timeout, "the requested cycle")


async def verify_point(client: Client, point_id: str) -> VerifyResult:
    return await client.execute_workflow(
        VERIFY_WORKFLOW, VerifyInput(point_id=point_id), id=verify_id(point_id),
        task_queue=CONTROL_TASK_QUEUE, result_type=VerifyResult,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )


def point_path(point: RecoveryPoint, disk: str | None = None) -> Path:
    """The top qcow2 layer of a KVM-target point (its backing chain is the point)."""
    d = point.disks[0] if disk is None else next(x for x in point.disks if x.disk == disk)
    return Path(d.location)


def images_identical(a: Path | str, b: Path | str) -> tuple[bool, str]:
    """qemu-img compare (content, not allocation), -U because the source is in use."""
    proc = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


GUEST_BOOT_TIMEOUT = 180


@contextlib.contextmanager
def booted_guest(image: GuestImage, workdir: Path, name: str, *, extra_disks: Sequence[DiskSpec] = (),
                 network: str | None = None, root_files: dict[str, str] | None = None
                 ) -> Iterator[tuple[libvirt.virDomain, Path]]:
    """A fresh test guest (records at 20/s) running under libvirt, booted (its boot
    marker seen on the console); yields the domain and its system disk. Removed on exit.
    ``network``: a libvirt network for one virtio NIC (none by default); ``root_files``:
    files added to its root file system (make_guest_disk)."""
    disk = make_guest_disk(workdir / "src.qcow2", rate=20, progress_every=1000, image=image,
                           root_files=root_files)
    console = workdir / "console.log"
    disks: Path | list[DiskSpec] = [DiskSpec(path=disk, target="vda"), *extra_disks] if extra_disks else disk
    with running_domain(name, disks, console, network=network) as dom:
        wait_for_console(console, rf"^{BOOT_MARKER} seq=0", GUEST_BOOT_TIMEOUT,
                         fail_pattern=rf"^{ERROR_MARKER}.*", domain=dom)
        yield dom, disk


def failure_text(e: BaseException) -> str:
    """The whole cause chain of a Temporal failure (the message is at its end)."""
    parts = []
    cur: BaseException | None = e
    while cur is not None:
        parts.append(str(cur))
        cur = cur.__cause__ or getattr(cur, "cause", None)
    return " | ".join(parts)


S = TypeVar("S")


async def wait_phase(handle: WorkflowHandle[Any, Any], status_type: type[S], phases: set[str],
                     timeout: float) -> S:
    """Poll an operation's ``progress`` query until its ``phase`` is one of ``phases``."""
    deadline = time.monotonic() + timeout
    last: S | None = None
    while time.monotonic() < deadline:
        try:
            last = await handle.query("progress", result_type=status_type)
        except Exception:
            last = None  # not started yet, or a worker restarting
        if last is not None and getattr(last, "phase", None) in phases:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{handle.id} not in {phases} after {timeout:.0f}s: {last}")


def network_users(network: str) -> list[str]:
    """Names of the libvirt domains with a NIC on ``network``."""
    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains(0)
                if f"network='{network}'" in d.XMLDesc(0)]
    finally:
        conn.close()


@contextlib.contextmanager
def source_network(name: str) -> Iterator[str]:
    """A transient isolated libvirt network for the source guest's NIC, so the recovered
    VM has a NIC to place on transcend's isolated network. The isolated network must not
    exist beforehand (left by an earlier run), or the test could not see it created."""
    conn = libvirt.open("qemu:///system")
    try:
        if not network_users(ISOLATED_NETWORK):
            with contextlib.suppress(libvirt.libvirtError):
                old = conn.networkLookupByName(ISOLATED_NETWORK)
                if old.isActive():
                    old.destroy()
                old.undefine()
        net = conn.networkCreateXML(isolated_network_xml(name))
        try:
            yield name
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                net.destroy()
    finally:
        conn.close()

