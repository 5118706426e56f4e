"""Activities of failover, migration and failback (workflows/dr.py).

State changes go through the catalog's compare-and-set (``Catalog.transition``), so
a request the protection's state does not allow is refused before anything changes,
and a retried activity finds its own earlier write. Failback is KVM to KVM in this
version: it reads the failed-over VM with the KVM source (pull-mode backup since the
checkpoint its production boot created) and writes the original VM's own disks
through qemu-nbd (connectors/kvm/writeback.py).

A consistency group fails over and back VM by VM (each VM is its own activity call,
``vm`` naming it); the record lists the VMs in boot order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from temporalio import activity
from temporalio.client import ScheduleActionExecutionStartWorkflow, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

import blockstream
from activities.context import ActivityContext, in_thread, permanent
from activities.failover import boot_tiers
from activities.points import guest_prep_for, reip_rules
from connectors.base import PermanentError
from connectors.kvm.qemu import export_sha256
from connectors.kvm.source import KvmFrozen, KvmSource
from connectors.kvm.writeback import DiskAccess, open_disks
from transcend.api import (
    FailbackFinishInput,
    FailbackInput,
    FailbackPass,
    FailbackSyncInput,
    FailbackVerify,
    FailedOverVm,
    FailoverAbort,
    FailoverInput,
    FailoverPlan,
    FailoverRecord,
    ProductionBoot,
    SourcePower,
    schedule_id,
)
from transcend.catalog import CatalogError
from transcend.models import (
    BootSpec,
    ChangeKind,
    Checkpoint,
    FreezeOptions,
    Instance,
    ProtectionState,
    Workload,
)

GRANULARITY = 65536
Mode = Literal["tracked", "hash-compare"]
HEARTBEAT_EVERY = 2.0

S = ProtectionState


def tracking_protection(protection: str) -> str:
    """The name the failed-over VM's checkpoints are kept under (``transcend.<this>.*``),
    apart from the protection's own checkpoints on the original VM."""
    return f"failback-{protection}"


def record_of(ctx: ActivityContext, protection: str) -> FailoverRecord:
    data = ctx.catalog.get_dr_record(protection)
    if data is None:
        state = ctx.catalog.get_protection(protection).state
        raise ApplicationError(
            f"protection {protection!r} is {state.value}, not failed over: there is nothing "
            "to fail back", type="WrongState", non_retryable=True)
    return FailoverRecord.model_validate_json(data)


def _kvm(ctx: ActivityContext, platform: str, role: str) -> KvmSource:
    source = ctx.source(platform)
    if not isinstance(source, KvmSource):
        raise PermanentError(
            f"the {role} platform {platform!r} is not KVM: powering VMs off and on and "
            "failing back need KVM in this version")
    return source


class DrActivities:
    def __init__(self, ctx: ActivityContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------------ failover

    @activity.defn(name="failover.check")
    async def check(self, inp: FailoverInput) -> FailoverPlan:
        """Validate everything, then take the protection to FAILING_OVER (the lock)."""

        def run() -> FailoverPlan:
            cat = self.ctx.catalog
            op = "migrate" if inp.planned else "fail over"
            with permanent():
                rec = cat.get_protection(inp.protection)
                if inp.point_id:
                    point = cat.get_point(inp.point_id)
                    if point.protection != inp.protection:
                        raise PermanentError(
                            f"point {inp.point_id} belongs to {point.protection!r}, not "
                            f"{inp.protection!r}")
                    if inp.planned:
                        raise PermanentError(
                            "a migration always recovers the point of its final cycle; "
                            "use a failover to recover an older point")
                source = cat.get_platform(rec.spec.source_platform)
                target = cat.get_platform(rec.spec.target_platform)
                tiers = boot_tiers(inp.protection, [w.name for w in rec.workloads], inp.boot_order)
                same_host = (source.kind == target.kind and source.config.get("uri", "qemu:///system")
                             == target.config.get("uri", "qemu:///system"))
                names = {wl.name: production_name(wl.name, inp.name, group=len(rec.workloads) > 1,
                                                  same_host=same_host)
                         for wl in rec.workloads}
                if len(set(names.values())) != len(names):
                    raise PermanentError(f"two VMs would get the same name at the target: {names}")
                before = cat.transition(
                    inp.protection, [S.PROTECTING, S.PAUSED], S.FAILING_OVER, op,
                    _hint(rec.state))
            if before == S.FAILING_OVER:  # our own retry, or a failover that was killed
                before = S.PROTECTING
            return FailoverPlan(protection=inp.protection, source=source, target=target,
                                workloads=rec.workloads, names=names, tiers=tiers,
                                previous_state=before)

        return await in_thread(run)

    @activity.defn(name="failover.abort")
    async def abort(self, a: FailoverAbort) -> None:
        def run() -> None:
            with permanent():
                rec = self.ctx.catalog.get_protection(a.protection)
                source = _kvm(self.ctx, rec.spec.source_platform, "source")
                for wl in rec.workloads:
                    source.stop_leftover_paused(wl.ref.id)
                for ref in a.restart_vms:
                    source.power_on(ref)
                if rec.state == S.FAILING_OVER:
                    self.ctx.catalog.set_protection_state(a.protection, a.previous_state)

        await in_thread(run)

    @activity.defn(name="schedule.wait_idle")
    async def wait_idle(self, protection: str) -> None:
        """Wait until no cycle started by the protection's schedule runs (it is paused
        first, so none starts meanwhile)."""
        client = self.ctx.client
        if client is None:
            raise ApplicationError("schedule activities need a Temporal client", non_retryable=True)
        try:
            desc = await client.get_schedule_handle(schedule_id(protection)).describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return
            raise
        for action in desc.info.running_actions:
            if not isinstance(action, ScheduleActionExecutionStartWorkflow):
                continue
            handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(
                action.workflow_id, run_id=action.first_execution_run_id)
            task = asyncio.ensure_future(handle.result())
            while not task.done():
                await asyncio.wait({task}, timeout=HEARTBEAT_EVERY)
                activity.heartbeat(action.workflow_id)
            task.exception()  # a failed cycle is fine: it is over

    @activity.defn(name="source.power_off")
    async def power_off(self, p: SourcePower) -> bool:
        def run() -> bool:
            with permanent():
                return _kvm(self.ctx, p.platform, "VM's").power_off(p.vm, p.timeout_seconds, p.force)

        return await in_thread(run)

    @activity.defn(name="source.power_on")
    async def power_on(self, p: SourcePower) -> None:
        def run() -> None:
            with permanent():
                _kvm(self.ctx, p.platform, "VM's").power_on(p.vm)

        await in_thread(run)

    @activity.defn(name="failover.boot")
    async def boot(self, inp: ProductionBoot) -> Instance:
        """Boot one VM of the point as production (tracking changes from its first
        instruction) and record it: the first VM's record moves the protection to
        FAILED_OVER in the same write (from then on the failover stands); a group's
        later VMs are added to that record."""

        def run() -> Instance:
            cat = self.ctx.catalog
            with permanent():
                rec = cat.get_protection(inp.protection)
                wl = _workload(rec.workloads, inp.vm)
                existing = cat.get_dr_record(inp.protection)
                record = FailoverRecord.model_validate_json(existing) if existing else None
                if record is not None:
                    done = next((v for v in record.vms if v.vm == wl.name), None)
                    if record.point_id == inp.point_id and done and done.instance.name == inp.name:
                        return done.instance  # a retry after the record was written
                    if record.point_id != inp.point_id:
                        raise PermanentError(
                            f"protection {inp.protection!r} is already failed over from point "
                            f"{record.point_id}; this failover (point {inp.point_id}) was "
                            "cancelled")
                elif rec.state != S.FAILING_OVER:
                    raise PermanentError(
                        f"protection {inp.protection!r} is {rec.state.value}; the failover "
                        "that booted this was cancelled")
                point = cat.get_point(inp.point_id)
                target = self.ctx.target(rec.spec.target_platform)
                instance = target.boot(point, BootSpec(
                    name=inp.name, network=inp.network, isolated=False,
                    workload=wl, production=True,
                    tracking_name=f"transcend.{tracking_protection(inp.protection)}.failover",
                    network_map=rec.spec.policy.network_map,
                    guest_prep=guest_prep_for(self.ctx, rec.spec.source_platform,
                                              rec.spec.target_platform, inp.convert,
                                              reip_rules(inp.reip, rec.spec.policy, test=False)),
                ))
                vm = FailedOverVm(vm=wl.name, source_vm=wl.ref.id, instance=instance,
                                  source_was_running=inp.source_was_running)
                if record is None:
                    record = FailoverRecord(
                        protection=inp.protection, point_id=point.id, planned=inp.planned,
                        failed_over_at=datetime.now(UTC), final_cycle=inp.final_cycle, vms=[vm])
                    cat.put_dr_record(inp.protection, record.model_dump_json(),
                                      state=S.FAILED_OVER)
                else:
                    record.vms.append(vm)
                    cat.put_dr_record(inp.protection, record.model_dump_json())
                return instance

        return await in_thread(run)

    @activity.defn(name="failover.record")
    async def record(self, protection: str) -> FailoverRecord | None:
        """The failover record, if any VM was booted as production (the failover stands)."""

        def run() -> FailoverRecord | None:
            data = self.ctx.catalog.get_dr_record(protection)
            return FailoverRecord.model_validate_json(data) if data else None

        return await in_thread(run)

    # ------------------------------------------------------------------ failback

    @activity.defn(name="failback.check")
    async def failback_check(self, inp: FailbackInput) -> FailoverRecord:
        def run() -> FailoverRecord:
            cat = self.ctx.catalog
            with permanent():
                rec = cat.get_protection(inp.protection)
                if rec.state not in (S.FAILED_OVER, S.FAILING_BACK):
                    raise ApplicationError(
                        f"cannot fail back protection {inp.protection!r}: it is "
                        f"{rec.state.value}; only a failed-over protection can fail back "
                        "(`transcend failover` or `transcend migrate` first)",
                        type="WrongState", non_retryable=True)
                record = record_of(self.ctx, inp.protection)
                _kvm(self.ctx, rec.spec.source_platform, "source")
                _kvm(self.ctx, rec.spec.target_platform, "target")
                cat.transition(inp.protection, [S.FAILED_OVER], S.FAILING_BACK, "fail back")
            return record

        return await in_thread(run)

    @activity.defn(name="failback.abort")
    async def failback_abort(self, protection: str) -> None:
        def run() -> None:
            with permanent():
                prot = self.ctx.catalog.get_protection(protection)
                source = _kvm(self.ctx, prot.spec.source_platform, "source")
                for wl in prot.workloads:
                    source.stop_leftover_paused(wl.ref.id)
                if prot.state == S.FAILING_BACK:
                    self.ctx.catalog.set_protection_state(protection, S.FAILED_OVER)

        await in_thread(run)

    @activity.defn(name="failback.sync")
    async def failback_sync(self, inp: FailbackSyncInput) -> FailbackPass:
        """One pass: the failed-over VM's changes since the last pass (the first pass
        also the original VM's own changes after the failover point) written into the
        original VM's disks; the original must be shut off."""
        live: list[blockstream.Stream] = []
        info = activity.info()
        pass_id = f"{(info.workflow_run_id or 'local').replace('-', '')[-8:]}-{info.activity_id}"
        try:
            return await copy_with_progress(lambda: self._sync(inp, pass_id, live), live)
        except blockstream.BlockstreamError as e:
            raise ApplicationError(f"failback copy failed: {e}", type="StreamError") from e

    def _sync(self, inp: FailbackSyncInput, pass_id: str,
              live: list[blockstream.Stream]) -> FailbackPass:
        cat = self.ctx.catalog
        t0 = time.monotonic()
        with permanent():
            record = record_of(self.ctx, inp.protection)
            fovm = _failed_over_vm(record, inp.vm)
            prot = cat.get_protection(inp.protection)
            original = _kvm(self.ctx, prot.spec.source_platform, "source")
            failed_over = _kvm(self.ctx, prot.spec.target_platform, "target")
            fo_wl = failed_over.workload(fovm.instance.id)
            orig_wl = original_for_pass(original, fovm, len(fo_wl.disks))
            orig_dirty, mode = self._original_changes(
                record, fovm, group=len(prot.workloads) > 1, orig_wl=orig_wl, original=original,
                pass_id=pass_id)
            since_token = fovm.failback_checkpoint or fovm.instance.tracking
            since = {d.id: Checkpoint(disk=d.id, token=since_token, identity=fo_wl.ref.id)
                     for d in fo_wl.disks}
            frozen = failed_over.freeze(tracking_protection(inp.protection), pass_id, [fo_wl],
                                        since, FreezeOptions(offline_ok=True))
            assert isinstance(frozen, KvmFrozen)  # one VM
        result = FailbackPass(protection=inp.protection, vm=fovm.vm, final=inp.final, mode=mode)
        try:
            with open_disks(original, orig_wl.ref.id, readonly=False) as dsts:
                for fo_disk, orig_disk, dst in zip(fo_wl.disks, orig_wl.disks, dsts, strict=True):
                    src = frozen.export(fo_disk.id)
                    alloc, dirty = failed_over_extents(frozen, fo_disk.id, src.uri, src.size)
                    sync_disk(src.uri, src.size, alloc, dirty, orig_disk.id, dst, orig_dirty,
                              result, live)
            # The record first: a crash before the release leaves both checkpoints, and
            # the retry reads from the new one (its bitmap already exists).
            fovm.failback_checkpoint = frozen.handle.data["new_checkpoint"]
            fovm.original_synced = True
            cat.put_dr_record(inp.protection, record.model_dump_json())
        except BaseException:
            frozen.release(committed=False)
            raise
        frozen.release(committed=True)
        result.checkpoint = fovm.failback_checkpoint
        result.seconds = time.monotonic() - t0
        return result

    def _original_changes(self, record: FailoverRecord, fovm: FailedOverVm, *, group: bool,
                          orig_wl: Workload, original: KvmSource, pass_id: str
                          ) -> tuple[dict[str, list[tuple[int, int, int]]] | None, Mode]:
        """What the original VM wrote after the point it was failed over from, from its
        own change tracking; None (compare hashes instead) when that is unknown."""
        if fovm.original_synced:
            return {}, "tracked"
        cat = self.ctx.catalog
        latest = cat.latest_point(record.protection)
        cps = cat.checkpoints(record.protection)
        if group:  # a group's checkpoints are kept as <VM>/<disk>: this VM's, by its disks
            prefix = f"{fovm.vm}/"
            cps = {k.removeprefix(prefix): cp.model_copy(update={"disk": k.removeprefix(prefix)})
                   for k, cp in cps.items() if k.startswith(prefix)}
        if latest is None or latest.id != record.point_id or not cps:
            # An older point was recovered: the original's checkpoint is newer than it.
            return None, "hash-compare"
        frozen = original.freeze(record.protection, f"fbread-{pass_id}", [orig_wl], cps,
                                 FreezeOptions(offline_ok=True))
        try:
            if any(k != ChangeKind.INCREMENTAL for k in frozen.handle.kinds.values()):
                return None, "hash-compare"
            return {d.id: [(e.offset, e.length, 1) for e in frozen.changes(d.id).extents]
                    for d in frozen.handle.disks}, "tracked"
        finally:
            # Not committed: the new checkpoint folds back into the protection's own, which
            # keeps recording (the failback's writes too) for the protection's return.
            frozen.release(committed=False)

    @activity.defn(name="failback.verify")
    async def failback_verify(self, protection: str) -> FailbackVerify:
        """sha256 of every disk of both VMs (both shut off): proof before the original
        becomes production again."""

        def run() -> FailbackVerify:
            with permanent():
                record = record_of(self.ctx, protection)
                prot = self.ctx.catalog.get_protection(protection)
                original = _kvm(self.ctx, prot.spec.source_platform, "source")
                failed_over = _kvm(self.ctx, prot.spec.target_platform, "target")
                diffs, disks = [], 0
                for v in record.vms:
                    with open_disks(original, v.source_vm, readonly=True) as a, \
                            open_disks(failed_over, v.instance.id, readonly=True) as b:
                        for x, y in zip(a, b, strict=True):
                            disks += 1
                            hx, hy = export_sha256(x.uri), export_sha256(y.uri)
                            if hx != hy:
                                diffs.append(f"{v.vm} {x.disk}: original {hx[:16]} != "
                                             f"failed-over {hy[:16]}")
            return FailbackVerify(protection=protection, identical=not diffs,
                                  detail="; ".join(diffs) or f"{disks} disk(s) identical")

        return await in_thread(run)

    @activity.defn(name="failback.finish")
    async def failback_finish(self, inp: FailbackFinishInput) -> None:
        """Remove (or keep, shut off) the failed-over VM, start the original, and hand
        the protection back to replication (state PROTECTING)."""

        def run() -> None:
            cat = self.ctx.catalog
            with permanent():
                prot = cat.get_protection(inp.protection)
                try:
                    record = record_of(self.ctx, inp.protection)
                except ApplicationError:
                    if prot.state == S.PROTECTING:
                        return  # a retry after the record was cleared
                    raise
                if not inp.keep_failed_over:
                    target = self.ctx.target(prot.spec.target_platform)
                    for v in reversed(record.vms):
                        target.destroy(v.instance)
                if inp.start_original:
                    # In the failover's boot order; a group VM that never booted at the
                    # target (a failover that stopped part-way) gets its original back too.
                    source = _kvm(self.ctx, prot.spec.source_platform, "source")
                    booted = [v.source_vm for v in record.vms]
                    for ref in booted + [w.ref.id for w in prot.workloads if w.ref.id not in booted]:
                        source.power_on(ref)
                try:
                    cat.clear_dr_record(inp.protection, state=S.PROTECTING)
                except CatalogError as e:
                    raise PermanentError(str(e)) from e

        await in_thread(run)


T = TypeVar("T")
Extents = list[tuple[int, int, int]]


async def copy_with_progress(fn: Callable[[], T], live: list[blockstream.Stream]) -> T:
    """Run ``fn`` (which appends the streams it runs to ``live``) in a thread,
    heartbeating the newest stream's progress; a cancelled activity cancels them."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    started = time.monotonic()
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=HEARTBEAT_EVERY)
            if live:
                p = live[-1].progress()
                activity.heartbeat({"bytes_read": p.bytes_read, "bytes_written": p.bytes_written,
                                    "bytes_total": p.bytes_total, "rate": p.rate,
                                    "seconds": time.monotonic() - started})
            else:
                activity.heartbeat()
        return task.result()
    except asyncio.CancelledError:
        for s in live:
            s.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise


def original_for_pass(original: KvmSource, fovm: FailedOverVm, disks: int) -> Workload:
    """The original VM, checked to be shut off (or paused by an attempt of ours that
    died reading its tracking) and to have as many disks as the failed-over one."""
    orig_wl = original.workload(fovm.source_vm)
    if orig_wl.power_state == "paused" and original.paused_by_us(orig_wl.ref.id):
        pass  # an attempt that died while reading its tracking; taken over below
    elif orig_wl.power_state != "shutoff":
        raise PermanentError(
            f"the original VM {orig_wl.name!r} is {orig_wl.power_state}; it must stay "
            "shut off while the failback writes its disks")
    if disks != len(orig_wl.disks):
        raise PermanentError(
            f"the failed-over VM has {disks} disks, the original {len(orig_wl.disks)}; "
            "failback needs the same disks")
    if fovm.original_synced and orig_wl.power_state == "paused":
        original.stop_leftover_paused(orig_wl.ref.id)
    return orig_wl


def failed_over_extents(frozen: KvmFrozen, disk: str, uri: str, size: int
                        ) -> tuple[Extents, Extents | None]:
    """The failed-over disk's allocation, and (when its tracking covers the pass) what it
    wrote since the last pass, as (offset, length, flags) from its frozen export."""
    alloc = blockstream.block_status(uri, "base:allocation", disk_size=size)
    if frozen.handle.kinds[disk] != ChangeKind.INCREMENTAL:
        return alloc, None
    return alloc, blockstream.block_status(uri, f"qemu:dirty-bitmap:backup-{disk}",
                                           disk_size=size)


def sync_disk(src_uri: str, size: int, alloc: Extents, dirty: Extents | None, orig_disk: str,
              dst: DiskAccess, orig_dirty: dict[str, Extents] | None, result: FailbackPass,
              live: list[blockstream.Stream]) -> None:
    """Write one failed-over disk (``src_uri``) into the original's (``dst``): the union
    of both sides' tracked changes, or every block whose hash differs where either
    side's tracking is unknown."""
    if dst.size != size:
        raise PermanentError(
            f"disk {orig_disk} of the original VM is {dst.size} bytes, the failed-over "
            f"one {size}; resize the original to match, then fail back again")
    if orig_dirty is not None and dirty is not None:
        fo_bytes = sum(n for _, n, f in dirty if f & 1)
        orig = orig_dirty.get(orig_disk, [])
        extents = blockstream.plan_extents(alloc, [*dirty, *orig], disk_size=size,
                                           granularity=GRANULARITY)
        result.failed_over_bytes += fo_bytes
        result.original_bytes += sum(n for _, n, _ in orig)
        stream = blockstream.Stream(src_uri, dst.uri, extents, disk_size=size, hash="none")
    else:
        # Tracking unknown on one side: read both, write only blocks that differ.
        result.mode = "hash-compare"
        manifest = blockstream.zero_manifest(size, GRANULARITY)
        hashing = blockstream.Stream(dst.uri, None, [blockstream.Extent(0, size)],
                                     disk_size=size, manifest=manifest, block_size=GRANULARITY)
        live.append(hashing)
        hashing.run()
        extents = [blockstream.Extent(o, n, bool(f & 2)) for o, n, f in alloc]
        stream = blockstream.Stream(src_uri, dst.uri, extents, disk_size=size,
                                    manifest=manifest, block_size=GRANULARITY, compare=True)
    live.append(stream)
    p = stream.run()
    result.bytes_written += p.bytes_written
    result.bytes_zeroed += p.bytes_zero
    result.bytes_read += p.bytes_read
    result.bytes_skipped += p.bytes_skipped
    result.disk_size += size


def production_name(vm: str, prefix: str, *, group: bool, same_host: bool) -> str:
    """A VM's name at the target: the request's name (a prefix for a group's VMs), else
    the source VM's name, with ``-dr`` when the source VM keeps its name on that host."""
    if prefix:
        return f"{prefix}-{vm}" if group else prefix
    return f"{vm}-dr" if same_host else vm


def _workload(workloads: list[Workload], vm: str) -> Workload:
    if not vm:
        return workloads[0]
    for w in workloads:
        if w.name == vm:
            return w
    raise PermanentError(f"no VM {vm!r} in this protection; its VMs: "
                         f"{', '.join(w.name for w in workloads)}")


def _failed_over_vm(record: FailoverRecord, vm: str) -> FailedOverVm:
    try:
        return record.vm(vm)
    except KeyError as e:
        raise PermanentError(str(e)) from e


def _hint(state: ProtectionState) -> str:
    return {
        S.FAILED_OVER: "it already runs at the target; fail back first (`transcend failback`)",
        S.FAILING_BACK: "a failback is running; wait for it",
        S.REMOVED: "it was removed",
        S.PREPARING: "wait for its first recovery point",
    }.get(state, "failover needs a protecting or paused protection")
