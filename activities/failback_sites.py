"""Failback when the original VM and the failed-over VM are at different sites.

On one site, ``failback.sync`` (activities/failback.py) reads the failed-over VM and
writes the original's disks in one activity. Between sites no worker reaches
both libvirt hosts, so a pass is three activities, each where its platform is:

1. ``failback.serve`` (target site): freeze the failed-over VM (pull-mode backup
   with its failback checkpoint), stage its allocation and its changes since the
   last pass in the catalog, and serve its disks over TLS (the pull fronts of
   transcend/pullexport.py) on the target site's address.
2. ``failback.pull`` (source site): check the original (shut off, same disks),
   read the original's own changes after the failover point from its tracking,
   and copy the union from the fronts into the original's disks; then record the
   new failback checkpoint, as ``failback.sync`` does.
3. ``failback.release`` (target site): stop the fronts and end the backup, keeping
   the new checkpoint only when the pass was recorded.

``failback.hashes`` hashes one side's disks at that side's site, for the verify
step the workflow compares.
"""

from __future__ import annotations

import time

from temporalio import activity
from temporalio.exceptions import ApplicationError

import blockstream
from activities.context import ActivityContext, in_thread, permanent
from activities.dr import record_of, tracking_protection
from activities.failback import (
    copy_with_progress,
    disk_hashes,
    failback_sides,
    failed_over_extents,
    failed_over_vm,
    original_changes,
    original_for_pass,
    pass_id_of_activity,
    sync_disk,
    tracking_since,
)
from connectors.base import PermanentError, capabilities_of, require_direct_disks
from transcend import nbdtls, pullexport
from transcend.api import (
    FailbackHashes,
    FailbackPass,
    FailbackReleaseInput,
    FailbackServed,
    FailbackSyncInput,
)
from transcend.models import FreezeOptions


def _staged(pass_id: str) -> str:
    """The catalog's cycle key of a failback pass's staged extents."""
    return f"failback-{pass_id}"


class FailbackSiteActivities:
    def __init__(self, ctx: ActivityContext) -> None:
        self.ctx = ctx

    @activity.defn(name="failback.serve")
    async def serve(self, inp: FailbackSyncInput) -> FailbackServed:
        return await in_thread(self._serve, inp, pass_id_of_activity())

    def _serve(self, inp: FailbackSyncInput, pass_id: str) -> FailbackServed:
        cat = self.ctx.catalog
        with permanent():
            record = record_of(self.ctx, inp.protection)
            fovm = failed_over_vm(record, inp.vm)
            _, failed_over = failback_sides(self.ctx, inp.protection)
            if not capabilities_of(failed_over).serve_remote:
                raise PermanentError(
                    f"the target platform {failed_over.info.name!r} cannot serve its disks to "
                    "another site (its connector does not offer serve_remote): fail back "
                    "with a worker that reaches both platforms")
            fo_wl = failed_over.workload(fovm.instance.id)
            frozen = failed_over.freeze(tracking_protection(inp.protection), pass_id, [fo_wl],
                                        tracking_since(fovm, fo_wl), FreezeOptions(offline_ok=True))
        try:
            for d in fo_wl.disks:
                src = frozen.export(d.id)
                alloc, dirty = failed_over_extents(frozen, d.id, src.uri, src.size)
                cat.stage_changes(inp.protection, _staged(pass_id), f"{d.id}/alloc",
                                  pullexport.pack_extents(alloc))
                if dirty is not None:
                    cat.stage_changes(inp.protection, _staged(pass_id), f"{d.id}/dirty",
                                      pullexport.pack_extents(dirty))
            with permanent():
                frozen.handle.remote = pullexport.serve_frozen(self.ctx.settings, frozen)
        except BaseException:
            pullexport.stop_frozen(self.ctx.settings, frozen.handle)
            frozen.release(committed=False)
            cat.drop_staged_manifests(inp.protection, _staged(pass_id))
            raise
        return FailbackServed(protection=inp.protection, vm=fovm.vm, final=inp.final,
                              pass_id=pass_id, frozen=frozen.handle,
                              checkpoints=frozen.new_checkpoints())

    @activity.defn(name="failback.pull")
    async def pull(self, served: FailbackServed) -> FailbackPass:
        live: list[blockstream.Stream] = []
        try:
            return await copy_with_progress(lambda: self._pull(served, live), live)
        except blockstream.BlockstreamError as e:
            uri = next(iter(served.frozen.remote.values()), None)
            refused = nbdtls.tls_refusal(uri.uri if uri else "", e.nbd_error or str(e),
                                         self.ctx.settings)
            if refused is not None:
                raise ApplicationError(f"failback copy: {refused}", type="TlsRefused",
                                       non_retryable=True) from e
            raise ApplicationError(f"failback copy failed: {e}", type="StreamError") from e

    def _pull(self, served: FailbackServed, live: list[blockstream.Stream]) -> FailbackPass:
        cat = self.ctx.catalog
        t0 = time.monotonic()
        handle = served.frozen
        with permanent():
            record = record_of(self.ctx, served.protection)
            fovm = failed_over_vm(record, served.vm)
            prot = cat.get_protection(served.protection)
            original = self.ctx.source(prot.spec.source_platform)
            direct = require_direct_disks(original, "source")
            orig_wl = original_for_pass(original, fovm, len(handle.disks))
            orig_dirty, mode = original_changes(
                self.ctx, record, fovm, group=len(prot.workloads) > 1, orig_wl=orig_wl,
                original=original, pass_id=served.pass_id)
        result = FailbackPass(protection=served.protection, vm=fovm.vm, final=served.final,
                              mode=mode)
        staged = _staged(served.pass_id)
        with direct.open_disks(orig_wl.ref.id, readonly=False) as dsts:
            for fo_disk, orig_disk, dst in zip(handle.disks, orig_wl.disks, dsts, strict=True):
                with permanent():
                    src = nbdtls.with_local_credentials(handle.remote[fo_disk.id].uri,
                                                        self.ctx.settings)
                alloc = pullexport.unpack_extents(
                    cat.staged_changes(served.protection, staged, f"{fo_disk.id}/alloc"))
                dirty = None
                if handle.kinds[fo_disk.id].value == "incremental":
                    dirty = pullexport.unpack_extents(
                        cat.staged_changes(served.protection, staged, f"{fo_disk.id}/dirty"))
                sync_disk(src, fo_disk.size, alloc, dirty, orig_disk.id, dst, orig_dirty,
                          result, live)
        # Recorded before the target site releases the backup: a crash in between
        # leaves both checkpoints there, and the next pass reads from the new one.
        fovm.failback_checkpoints = served.checkpoints
        fovm.original_synced = True
        cat.put_dr_record(served.protection, record.model_dump_json())
        result.checkpoint = ",".join(sorted({cp.token for cp in served.checkpoints}))
        result.seconds = time.monotonic() - t0
        return result

    @activity.defn(name="failback.release")
    async def release(self, inp: FailbackReleaseInput) -> None:
        def run() -> None:
            served = inp.served
            pullexport.stop_frozen(self.ctx.settings, served.frozen)
            prot = self.ctx.catalog.get_protection(served.protection)
            frozen = self.ctx.source(prot.spec.target_platform).reopen(served.frozen)
            frozen.release(committed=inp.committed)
            frozen.close()
            self.ctx.catalog.drop_staged_manifests(served.protection, _staged(served.pass_id))

        await in_thread(run)

    @activity.defn(name="failback.hashes")
    async def hashes(self, protection: str, side: str) -> FailbackHashes:
        """sha256 of every disk of one side's VMs (all shut off), at that side's site."""

        def run() -> FailbackHashes:
            with permanent():
                record = record_of(self.ctx, protection)
                prot = self.ctx.catalog.get_protection(protection)
                original = side == "original"
                platform = prot.spec.source_platform if original else prot.spec.target_platform
                source = self.ctx.source(platform)
                out = FailbackHashes(side="original" if original else "failed-over")
                for v in record.vms:
                    out.disks[v.vm] = disk_hashes(source, v.source_vm if original else v.instance.id,
                                                  protection)
            return out

        return await in_thread(run)


__all__ = ["FailbackSiteActivities"]
