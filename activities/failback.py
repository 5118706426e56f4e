"""Activities of failback on one site (workflows/dr.py ``Failback``); between sites the
same pass is split over three activities in activities/failback_sites.py.

Failback is replication in reverse, through the connector contract only:

* the failed-over instance is read as a source by its platform's Source: ``freeze``
  since the tracking its production boot started (``Instance.tracking_checkpoints``,
  or the one ``tracking`` token), ``changes`` and ``export``; each pass keeps the
  instant's ``new_checkpoints()`` for the next pass;
* the original VM's own disks are written through its platform's ``DirectDisks``
  (KVM: qemu-nbd on the images; VMware: VDDK or the datastore file), while it is off;
* what is copied is the union of both sides' changes when both track them (the
  original's own changes after the failover point from its protection's checkpoints,
  read with a freeze that is not committed), and otherwise only the blocks whose
  hashes differ, read from both sides.

Every step names the capability it needs (``require_power``, ``require_direct_disks``)
so a connector that lacks one is refused before anything changes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Literal, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

import blockstream
from activities.context import ActivityContext, in_thread, permanent
from activities.dr import power_of, record_of, tracking_protection
from connectors.base import (
    DirectDisks,
    DiskAccess,
    Frozen,
    PermanentError,
    PowerControl,
    Source,
    capabilities_of,
    require_direct_disks,
    require_power,
)
from connectors.common.qemu import export_sha256
from transcend.api import (
    FailbackFinishInput,
    FailbackInput,
    FailbackPass,
    FailbackSyncInput,
    FailbackVerify,
    FailedOverVm,
    FailoverRecord,
)
from transcend.catalog import CatalogError
from transcend.models import (
    ChangeKind,
    Checkpoint,
    FreezeOptions,
    ProtectionState,
    Workload,
)

#: The block a hash-compared failback compares (the granularity of its reads); a
#: target that writes coarser blocks (its capabilities) raises it.
GRANULARITY = 65536
HEARTBEAT_EVERY = 2.0
Mode = Literal["tracked", "hash-compare"]
Extents = list[tuple[int, int, int]]
T = TypeVar("T")

S = ProtectionState


def failed_over_vm(record: FailoverRecord, vm: str) -> FailedOverVm:
    try:
        return record.vm(vm)
    except KeyError as e:
        raise PermanentError(str(e)) from e


def tracking_since(fovm: FailedOverVm, fo_wl: Workload) -> dict[str, Checkpoint]:
    """Where the next read of the failed-over VM starts: the previous pass's new
    checkpoints, else the tracking its production boot started; per disk."""
    if fovm.failback_checkpoints:
        return {cp.disk: cp for cp in fovm.failback_checkpoints}
    if fovm.failback_checkpoint:  # a record written before checkpoints were per disk
        return {d.id: Checkpoint(disk=d.id, token=fovm.failback_checkpoint, identity=fo_wl.ref.id)
                for d in fo_wl.disks}
    if fovm.instance.tracking_checkpoints:
        return {cp.disk: cp for cp in fovm.instance.tracking_checkpoints}
    if fovm.instance.tracking:
        return {d.id: Checkpoint(disk=d.id, token=fovm.instance.tracking, identity=fo_wl.ref.id)
                for d in fo_wl.disks}
    return {}  # no tracking: the pass compares hashes


def failback_sides(ctx: ActivityContext, protection: str) -> tuple[Source, Source]:
    """(original platform's Source, failed-over platform's Source), checked for what a
    failback needs: power on both sides, direct disks of the original."""
    prot = ctx.catalog.get_protection(protection)
    original = ctx.source(prot.spec.source_platform)
    failed_over = ctx.source(prot.spec.target_platform)
    require_power(original, "source")
    require_direct_disks(original, "source")
    require_power(failed_over, "target")
    return original, failed_over


def original_for_pass(original: Source, fovm: FailedOverVm, disks: int) -> Workload:
    """The original VM, checked to be shut off (after settling what a killed attempt of
    ours left on it) and to have as many disks as the failed-over one."""
    power = require_power(original, "source")
    orig_wl = original.workload(fovm.source_vm)
    if orig_wl.power_state != "shutoff":
        power.settle(orig_wl.ref.id)
        orig_wl = original.workload(fovm.source_vm)
    if orig_wl.power_state != "shutoff":
        raise PermanentError(
            f"the original VM {orig_wl.name!r} is {orig_wl.power_state}; it must stay "
            "shut off while the failback writes its disks")
    if disks != len(orig_wl.disks):
        raise PermanentError(
            f"the failed-over VM has {disks} disks, the original {len(orig_wl.disks)}; "
            "failback needs the same disks")
    return orig_wl


def failed_over_extents(frozen: Frozen, disk: str, uri: str, size: int
                        ) -> tuple[Extents, Extents | None]:
    """The failed-over disk's allocation (NBD block status of its frozen export), and,
    when its tracking covers the pass, what it wrote since: its Source's ``changes``
    as (offset, length, flags) with flag 1 = changed."""
    alloc = blockstream.block_status(uri, "base:allocation", disk_size=size)
    cs = frozen.changes(disk)
    if cs.summary.kind != ChangeKind.INCREMENTAL:
        return alloc, None
    return alloc, [(e.offset, e.length, 1) for e in cs.extents]


def original_changes(ctx: ActivityContext, record: FailoverRecord, fovm: FailedOverVm, *,
                     group: bool, orig_wl: Workload, original: Source, pass_id: str
                     ) -> tuple[dict[str, Extents] | None, Mode]:
    """What the original VM wrote after the point it was failed over from, from its
    protection's own change tracking; None (compare hashes instead) when unknown."""
    if fovm.original_synced:
        return {}, "tracked"
    cat = ctx.catalog
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
        # Not committed: the original's tracking keeps everything since its checkpoint
        # (the failback's writes too) for the protection's return.
        frozen.release(committed=False)
        frozen.close()


def _clip(extents: Extents, size: int) -> Extents:
    return [(o, min(n, size - o), f) for o, n, f in extents if o < size]


def fit_to_original(alloc: Extents, dirty: Extents | None, size: int, orig_size: int,
                    orig_disk: str) -> tuple[Extents, Extents | None, int]:
    """A failed-over disk larger than the original's, because its platform rounds disk
    sizes up (EBS volumes are whole GiB, so a 32 MiB disk recovered there is 1 GiB):
    failed back as the original's first ``orig_size`` bytes, when nothing was written
    beyond them (the guest never saw more, or the operator did not grow into it).
    Anything else would lose data or leave stale bytes: refused, saying what to do."""
    beyond = [(o, n) for o, n, f in alloc if not f & 2 and o + n > orig_size]
    if orig_size < size and not beyond:
        return _clip(alloc, orig_size), (_clip(dirty, orig_size) if dirty is not None
                                         else None), orig_size
    what = (f"holds data beyond the original's {orig_size} bytes (from offset "
            f"{max(orig_size, beyond[0][0])})" if beyond and orig_size < size
            else f"is {size} bytes, the original {orig_size}")
    raise PermanentError(f"disk {orig_disk}: the failed-over disk {what}; grow the original's "
                         "disk to the failed-over size, then fail back again")


def sync_disk(src_uri: str, size: int, alloc: Extents, dirty: Extents | None, orig_disk: str,
              dst: DiskAccess, orig_dirty: dict[str, Extents] | None, result: FailbackPass,
              live: list[blockstream.Stream], granularity: int = GRANULARITY) -> None:
    """Write one failed-over disk (``src_uri``) into the original's (``dst``): the union
    of both sides' tracked changes, or every block whose hash differs where either
    side's tracking is unknown."""
    if dst.size != size:
        alloc, dirty, size = fit_to_original(alloc, dirty, size, dst.size, orig_disk)
    if orig_dirty is not None and dirty is not None:
        fo_bytes = sum(n for _, n, f in dirty if f & 1)
        orig = orig_dirty.get(orig_disk, [])
        extents = blockstream.plan_extents(alloc, [*dirty, *orig], disk_size=size,
                                           granularity=granularity)
        result.failed_over_bytes += fo_bytes
        result.original_bytes += sum(n for _, n, _ in orig)
        stream = blockstream.Stream(src_uri, dst.uri, extents, disk_size=size, hash="none")
    else:
        # Tracking unknown on one side: read both, write only blocks that differ.
        result.mode = "hash-compare"
        manifest = blockstream.zero_manifest(size, granularity)
        hashing = blockstream.Stream(dst.uri, None, [blockstream.Extent(0, size)],
                                     disk_size=size, manifest=manifest, block_size=granularity)
        live.append(hashing)
        hashing.run()
        extents = [blockstream.Extent(o, n, bool(f & 2)) for o, n, f in alloc]
        stream = blockstream.Stream(src_uri, dst.uri, extents, disk_size=size,
                                    manifest=manifest, block_size=granularity, compare=True)
    live.append(stream)
    p = stream.run()
    result.bytes_written += p.bytes_written
    result.bytes_zeroed += p.bytes_zero
    result.bytes_read += p.bytes_read
    result.bytes_skipped += p.bytes_skipped
    result.disk_size += size


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


def disk_hashes(source: Source, vm: str, protection: str) -> list[tuple[str, str]]:
    """sha256 of every disk of the shut-off ``vm``: through its platform's DirectDisks,
    or, on a platform that offers none (the failed-over side need not: failback only
    writes into the original), through a freeze of it that is not committed, so its
    tracking stays where it was."""
    if capabilities_of(source).direct_disks and isinstance(source, DirectDisks):
        with source.open_disks(vm, readonly=True) as disks:
            return [(d.disk, export_sha256(d.uri)) for d in disks]
    wl = source.workload(vm)
    frozen = source.freeze(tracking_protection(protection), f"fbverify-{uuid.uuid4().hex[:8]}",
                           [wl], {}, FreezeOptions(offline_ok=True))
    try:
        return [(d.id, export_sha256(frozen.export(d.id).uri)) for d in frozen.handle.disks]
    finally:
        frozen.release(committed=False)
        frozen.close()


def pass_id_of_activity() -> str:
    info = activity.info()
    return f"{(info.workflow_run_id or 'local').replace('-', '')[-8:]}-{info.activity_id}"


class FailbackActivities:
    def __init__(self, ctx: ActivityContext) -> None:
        self.ctx = ctx

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
                failback_sides(self.ctx, inp.protection)
                cat.transition(inp.protection, [S.FAILED_OVER], S.FAILING_BACK, "fail back")
            return record

        return await in_thread(run)

    @activity.defn(name="failback.abort")
    async def failback_abort(self, protection: str) -> None:
        def run() -> None:
            with permanent():
                prot = self.ctx.catalog.get_protection(protection)
                source = self.ctx.source(prot.spec.source_platform)
                if isinstance(source, PowerControl):
                    power = require_power(source, "source")
                    for wl in prot.workloads:
                        power.settle(wl.ref.id)
                if prot.state == S.FAILING_BACK:
                    self.ctx.catalog.set_protection_state(protection, S.FAILED_OVER)

        await in_thread(run)

    @activity.defn(name="failback.sync")
    async def failback_sync(self, inp: FailbackSyncInput) -> FailbackPass:
        """One pass: the failed-over VM's changes since the last pass (the first pass
        also the original VM's own changes after the failover point) written into the
        original VM's disks; the original must be shut off."""
        live: list[blockstream.Stream] = []
        pass_id = pass_id_of_activity()
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
            fovm = failed_over_vm(record, inp.vm)
            prot = cat.get_protection(inp.protection)
            original, failed_over = failback_sides(self.ctx, inp.protection)
            fo_wl = failed_over.workload(fovm.instance.id)
            orig_wl = original_for_pass(original, fovm, len(fo_wl.disks))
            orig_dirty, mode = original_changes(
                self.ctx, record, fovm, group=len(prot.workloads) > 1, orig_wl=orig_wl,
                original=original, pass_id=pass_id)
            frozen = failed_over.freeze(tracking_protection(inp.protection), pass_id, [fo_wl],
                                        tracking_since(fovm, fo_wl), FreezeOptions(offline_ok=True))
        result = FailbackPass(protection=inp.protection, vm=fovm.vm, final=inp.final, mode=mode)
        direct = require_direct_disks(original, "source")
        try:
            with direct.open_disks(orig_wl.ref.id, readonly=False) as dsts:
                for fo_disk, orig_disk, dst in zip(fo_wl.disks, orig_wl.disks, dsts, strict=True):
                    src = frozen.export(fo_disk.id)
                    alloc, dirty = failed_over_extents(frozen, fo_disk.id, src.uri, src.size)
                    sync_disk(src.uri, src.size, alloc, dirty, orig_disk.id, dst, orig_dirty,
                              result, live)
            # The record first: a crash before the release leaves both checkpoints, and
            # the retry reads from the new one (it already exists).
            fovm.failback_checkpoints = frozen.new_checkpoints()
            fovm.original_synced = True
            cat.put_dr_record(inp.protection, record.model_dump_json())
        except BaseException:
            frozen.release(committed=False)
            frozen.close()
            raise
        frozen.release(committed=True)
        frozen.close()
        result.checkpoint = ",".join(sorted({cp.token for cp in fovm.failback_checkpoints}))
        result.seconds = time.monotonic() - t0
        return result

    @activity.defn(name="failback.verify")
    async def failback_verify(self, protection: str) -> FailbackVerify:
        """sha256 of every disk of both VMs (both shut off): proof before the original
        becomes production again."""

        def run() -> FailbackVerify:
            with permanent():
                record = record_of(self.ctx, protection)
                original, failed_over = failback_sides(self.ctx, protection)
                diffs, disks = [], 0
                for v in record.vms:
                    a = disk_hashes(original, v.source_vm, protection)
                    b = disk_hashes(failed_over, v.instance.id, protection)
                    if len(a) != len(b):
                        diffs.append(f"{v.vm}: {len(a)} disks at the original, {len(b)} "
                                     "failed over")
                    for (da, ha), (_, hb) in zip(a, b, strict=False):
                        disks += 1
                        if ha != hb:
                            diffs.append(f"{v.vm} {da}: original {ha[:16]} != "
                                         f"failed-over {hb[:16]}")
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
                    power = power_of(self.ctx, prot.spec.source_platform, "source")
                    booted = [v.source_vm for v in record.vms]
                    for ref in booted + [w.ref.id for w in prot.workloads if w.ref.id not in booted]:
                        power.power_on(ref)
                try:
                    cat.clear_dr_record(inp.protection, state=S.PROTECTING)
                except CatalogError as e:
                    raise PermanentError(str(e)) from e

        await in_thread(run)


__all__ = ["FailbackActivities"]
