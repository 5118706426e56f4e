"""The replication cycle as activities: start -> freeze -> begin -> stream ->
verify sample -> commit -> release -> retention.

Every activity is idempotent for its input, so Temporal may retry any of them after
a worker dies. The stream activity heartbeats its durable offset and the path of
its partial manifest; a retried attempt resumes from there instead of copying the
disk again.

Blocking work (libvirt, qemu-img, the C streamer, the catalog) runs in threads
(``asyncio.to_thread``) so the worker's event loop keeps heartbeating; the C
streamer releases the GIL for the whole copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

import blockstream
from activities.context import ActivityContext, heartbeating, in_thread, permanent
from connectors.base import (
    Busy,
    ChangeSet,
    Frozen,
    PermanentError,
    Staging,
    Target,
    capabilities_of,
)
from transcend import nbdtls, pullexport
from transcend import retention as retention_rules
from transcend.api import (
    AbortInput,
    BeginInput,
    CommitInput,
    CycleContext,
    CycleInput,
    CycleRecordInput,
    FreezeResult,
    ReleaseInput,
    RetentionResult,
    StreamInput,
    StreamResult,
    VerifySampleInput,
    VerifySampleResult,
)
from transcend.catalog import CycleRecord, NotFoundError
from transcend.config import site_task_queue
from transcend.models import (
    ChangeKind,
    Checkpoint,
    DiskInfo,
    FreezeOptions,
    FrozenHandle,
    NbdEndpoint,
    PointDisk,
    PointMeta,
    ProtectionState,
    RecoveryPoint,
    StagingHandle,
    effective_transfer,
    manifest_block_size,
    replica_disks,
)
from transcend.telemetry import record_cycle, record_queue_lag, record_stream

log = logging.getLogger(__name__)

FLUSH_INTERVAL_MAX = 64 << 20
FLUSH_INTERVAL_MIN = 1 << 20
FLUSH_SECONDS = 2
STREAM_REQUEST = 4 << 20  # blockstream's default max_request
HEARTBEAT_EVERY = 2.0


def _unpacked(staged: bytes) -> bytes | bytearray:
    """A staged manifest as the raw array: packed by this version, raw from workers
    before it (a cycle that spans the upgrade)."""
    if staged[:4] != blockstream.MANIFEST_MAGIC:
        return staged
    try:
        return blockstream.unpack_manifest(staged)[0]
    except blockstream.ManifestError:
        return staged  # a raw array that happens to start like a header


def _manifest_path(home: Path, protection: str, cycle_id: str, disk: str) -> Path:
    return home / "work" / protection / cycle_id / f"{disk.replace('/', '%2F')}.manifest"


def _progress_path(home: Path, protection: str, cycle_id: str, disk: str) -> Path:
    return home / "work" / protection / cycle_id / f"{disk.replace('/', '%2F')}.progress"


@dataclass(frozen=True)
class Attempts:
    """What the earlier attempts of one disk's stream did, from the last progress they
    recorded (heartbeat details or the local record, whichever is further on):
    ``durable_offset`` where this attempt may resume, ``written``/``read`` the bytes
    they moved in all, ``resent`` what this attempt moves again. With these, a disk's
    ``bytes_written`` over all attempts is its data plus ``resent`` (pull: reads)."""

    durable_offset: int = 0
    written: int = 0
    read: int = 0
    resent: int = 0
    unsaved: int = 0

    @classmethod
    def from_details(cls, d: dict[str, Any]) -> Attempts:
        return cls(
            durable_offset=int(d.get("durable_offset") or 0),
            written=int(d.get("prior_written") or 0) + int(d.get("bytes_written") or 0),
            read=int(d.get("prior_read") or 0) + int(d.get("bytes_read") or 0),
            resent=int(d.get("resent") or 0),
            unsaved=int(d.get("unsaved") or 0),
        )

    @classmethod
    def load(cls, heartbeat_details: Any, record: Path) -> Attempts:
        found = []
        if heartbeat_details and isinstance(heartbeat_details[0], dict):
            found.append(cls.from_details(heartbeat_details[0]))
        try:
            local = json.loads(record.read_text())
        except (OSError, ValueError):
            local = None
        if isinstance(local, dict):
            found.append(cls.from_details(local))
        # counters only grow along one stream's attempts: the larger is the newer
        return max(found, key=lambda a: (a.written + a.read, a.durable_offset), default=cls())

    def resent_from(self, resume_from: int, *, pull: bool) -> Attempts:
        """These attempts as seen by one resuming at ``resume_from``: what they moved
        beyond their durable offset is moved again; all of it when the resume point was
        lost (no partial manifest here) and the copy starts over."""
        lost = resume_from == 0
        again = (self.read if pull else self.written) if lost else self.resent + self.unsaved
        return Attempts(durable_offset=resume_from, written=self.written, read=self.read,
                        resent=again)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def resize_manifest(manifest: bytearray, disk_size: int, block_size: int) -> bytearray:
    """Grow (or shrink) a manifest to a new disk size; new blocks are zero blocks."""
    want = blockstream.manifest_size(disk_size, block_size)
    if len(manifest) == want:
        # The last block's hash depends on its length: recompute if the size changed
        # within the last block. Same length and same size: nothing to do.
        return manifest
    keep = min(len(manifest), want) - blockstream.HASH_SIZE  # last old block may be partial
    out = blockstream.zero_manifest(disk_size, block_size)
    if keep > 0:
        out[:keep] = manifest[:keep]
    return out


class CycleActivities:
    def __init__(self, ctx: ActivityContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------------ start

    @activity.defn(name="cycle.start")
    async def start(self, inp: CycleInput) -> CycleContext:
        record_queue_lag(activity.info())
        return await in_thread(self._start, inp)

    def _start(self, inp: CycleInput) -> CycleContext:
        cat = self.ctx.catalog
        with permanent():
            rec = cat.get_protection(inp.protection)
            source_info = cat.get_platform(rec.spec.source_platform)
            target_info = cat.get_platform(rec.spec.target_platform)
            check_transfer(rec.spec.policy.transfer, source_info.site, target_info.site)
            source = self.ctx.source(source_info.name)
            check_pull_source(rec.spec.policy.transfer, source)
            # Refresh the VM's shape: a grown or added disk must exist on the replica
            # before anything is written to it.
            workloads = [source.workload(w.ref.id) for w in rec.workloads]
        cat.update_workloads(inp.protection, workloads)
        started = datetime.now(UTC)
        info = activity.info()
        # Run ids are UUIDv7: the first characters are a timestamp, the last ones random.
        run_id = (info.workflow_run_id or info.workflow_id or "local").replace("-", "")
        return CycleContext(
            protection=inp.protection,
            cycle_id=started.strftime("%Y%m%dT%H%M%SZ") + "-" + run_id[-8:],
            source=source_info,
            target=target_info,
            source_queue=site_task_queue(source_info.site),
            target_queue=site_task_queue(target_info.site),
            workloads=workloads,
            policy=rec.spec.policy,
            last_point=cat.latest_point(inp.protection),
            state=rec.state,
            force_resync=inp.force_resync,
            final=inp.final,
            started_at=started,
        )

    @activity.defn(name="target.prepare")
    async def prepare(self, ctx: CycleContext) -> None:
        def run() -> None:
            with permanent():
                target = self.ctx.target(ctx.target.name)
                target.prepare(ctx.protection, replica_disks(ctx.workloads), ctx.workloads)

        await in_thread(run)

    # ------------------------------------------------------------------ freeze

    @activity.defn(name="source.freeze")
    async def freeze(self, ctx: CycleContext) -> FreezeResult:
        return await in_thread(self._freeze, ctx)

    def _freeze(self, ctx: CycleContext) -> FreezeResult:
        source = self.ctx.source(ctx.source.name)
        since = self.ctx.catalog.checkpoints(ctx.protection)
        with permanent():
            frozen = source.freeze(
                ctx.protection, ctx.cycle_id, ctx.workloads, since,
                FreezeOptions(force_resync=ctx.force_resync, offline_ok=ctx.final),
            )
        handle = frozen.handle
        # A disk the replica already holds but the source has no checkpoint for (the
        # catalog lost it, a disk was re-added) cannot be copied as FULL: FULL copies
        # only allocated extents over the previous layer and would leave stale data
        # where the source is now empty. Resync compares every block instead.
        last_disks = {d.disk for d in ctx.last_point.disks} if ctx.last_point else set()
        for disk in handle.disks:
            if handle.kinds[disk.id] == ChangeKind.FULL and disk.id in last_disks:
                handle.kinds[disk.id] = ChangeKind.RESYNC
                handle.reasons[disk.id] = "no source checkpoint for a disk the replica holds"
        try:
            changes = {d.id: frozen.changes(d.id) for d in handle.disks}
            checkpoints = frozen.new_checkpoints()
            if _transfer(ctx) == "pull":
                self._serve_pull(ctx, frozen, changes)
        finally:
            frozen.close()
        return FreezeResult(frozen=handle, changes=[c.summary for c in changes.values()],
                            checkpoints=checkpoints)

    def _serve_pull(self, ctx: CycleContext, frozen: Frozen,
                    changes: dict[str, ChangeSet]) -> None:
        """Pull: the target site streams; give it the change sets (through the catalog)
        and the frozen disks (TLS fronts on this site's address) in the handle."""
        for disk, cs in changes.items():
            self.ctx.catalog.stage_changes(ctx.protection, ctx.cycle_id, disk,
                                           pullexport.pack_changes(cs))
        with permanent():
            frozen.handle.remote = pullexport.serve_frozen(self.ctx.settings, frozen)

    # ------------------------------------------------------------------ staging

    @activity.defn(name="target.begin")
    async def begin(self, inp: BeginInput) -> StagingHandle:
        return await in_thread(self._begin, inp)

    def _begin(self, inp: BeginInput) -> StagingHandle:
        target = self.ctx.target(inp.ctx.target.name)
        handle = self._begin_staging(inp, target)
        # The manifest's block size follows what the target writes (EBS direct: 512 KiB)
        # and stays the previous point's while that still fits, so its manifest carries.
        last = inp.ctx.last_point
        previous = last.disks[0].block_size if last and last.disks else None
        handle.block_size = manifest_block_size(capabilities_of(target).write_granularity, previous)
        return handle

    def _begin_staging(self, inp: BeginInput, target: Target) -> StagingHandle:
        ctx = inp.ctx
        with permanent():
            if _transfer(ctx) in ("local", "pull"):
                # The writer is on this host: the source site's worker (local) or this
                # site's own stream reading the source's frozen export (pull).
                staging = target.begin(ctx.protection, ctx.cycle_id, inp.disks, ctx.last_point)
                return staging.handle
            # Push: the source site writes from another host, over TCP with TLS.
            remote = nbdtls.remote_export(self.ctx.settings)
            begin_remote = getattr(target, "begin_remote", None)
            if begin_remote is None:
                raise PermanentError(
                    f"target platform {ctx.target.name!r} ({ctx.target.kind}) cannot "
                    "serve a push transfer from another site yet; put both platforms at one "
                    "site (one host) with transfer 'local', or use a KVM target")
            staging = begin_remote(ctx.protection, ctx.cycle_id, inp.disks, ctx.last_point,
                                   remote)
            return staging.handle

    @activity.defn(name="target.abort")
    async def abort(self, inp: AbortInput) -> None:
        def run() -> None:
            self.ctx.target(inp.ctx.target.name).resume(inp.staging).abort()
            self.ctx.catalog.drop_staged_manifests(inp.ctx.protection, inp.ctx.cycle_id)

        await in_thread(run)

    # ------------------------------------------------------------------ stream

    @activity.defn(name="stream.disk")
    async def stream(self, inp: StreamInput) -> StreamResult:
        info = activity.info()
        record_queue_lag(info)
        ppath = _progress_path(self.ctx.settings.home, inp.ctx.protection, inp.ctx.cycle_id,
                               inp.disk)
        prior = Attempts.load(info.heartbeat_details, ppath)
        # preparing can take a while (connecting; hashing the replica once when the block
        # size changes): heartbeat meanwhile, carrying the previous attempt's progress
        prepared = await heartbeating(
            asyncio.to_thread(self._prepare_stream, inp, prior.durable_offset),
            details=info.heartbeat_details)
        stream, manifest, original, mpath, changes, resume_from, frozen, staging = prepared
        uris = {"source": inp.frozen.remote[inp.disk].uri if inp.disk in inp.frozen.remote else "",
                "destination": (inp.staging.remote[inp.disk].uri
                                if inp.disk in inp.staging.remote else "")}
        resent = prior.resent_from(resume_from, pull=bool(uris["source"]))
        policy = inp.ctx.policy
        try:
            # The site's bandwidth limit is shared by every stream this worker runs,
            # weighted by the protection's priority (transcend/bandwidth.py).
            with self.ctx.site_bandwidth().registered(
                    f"{inp.ctx.protection}/{inp.disk}", stream, policy.priority,
                    policy.bandwidth_bytes_per_s):
                return await self._run_stream(inp, stream, manifest, original, mpath, changes,
                                              resume_from, uris, resent)
        finally:
            # The NBD servers this activity started, if the connectors start them per use.
            await asyncio.to_thread(_close_all, frozen, staging)

    async def _run_stream(self, inp: StreamInput, stream: blockstream.Stream, manifest: bytearray,
                          original: bytes | bytearray, mpath: Path, changes: ChangeSet,
                          resume_from: int, uris: dict[str, str],
                          resent: Attempts) -> StreamResult:
        started = time.monotonic()
        pull = bool(uris.get("source"))
        task = asyncio.create_task(asyncio.to_thread(stream.run))
        saved_at = resume_from
        watchdog = StallWatchdog(self._stall_seconds(inp))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=HEARTBEAT_EVERY)
                p = stream.progress()
                durable = p.durable_offset - p.durable_offset % inp.block_size
                if durable > saved_at:
                    await asyncio.to_thread(
                        self._save_partial, mpath, manifest, original, durable, inp.block_size
                    )
                    saved_at = durable
                self._progress(inp, _progress_details(p, saved_at, started, resent, pull))
                if not task.done() and watchdog.stalled(p):
                    # A cut link stalls the NBD connections until TCP gives up (~15
                    # min): give up sooner, keep what is durable, let Temporal retry.
                    stream.cancel()
                    # The engine stops within seconds, unless a connection is still
                    # being opened (a SYN to a dead link): keep heartbeating until then.
                    while not task.done():
                        await asyncio.wait({task}, timeout=HEARTBEAT_EVERY)
                        activity.heartbeat(_progress_details(stream.progress(), saved_at,
                                                             started, resent, pull))
                    saved_at = self._keep_durable(inp, stream, mpath, manifest, original,
                                                  saved_at, started, resent, pull)
                    raise ApplicationError(
                        f"copying disk {inp.disk}: no progress for {watchdog.seconds:.0f} s "
                        f"({_peers(uris)}): the link or an NBD server stalled; retrying from "
                        f"offset {saved_at} (TRANSCEND_STREAM_STALL_SECONDS sets the limit)",
                        type="StreamStalled")
            final = task.result()
        except asyncio.CancelledError:
            stream.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        except blockstream.BlockstreamError as e:
            refused = nbdtls.tls_refusal(uris.get(e.endpoint or "", ""), e.nbd_error or str(e),
                                         self.ctx.settings)
            if refused is not None:
                # A certificate problem does not heal by retrying; say so at once.
                raise ApplicationError(f"copying disk {inp.disk}: {refused}",
                                       type="TlsRefused", non_retryable=True) from e
            # Keep what is durable; Temporal retries and the next attempt resumes.
            self._keep_durable(inp, stream, mpath, manifest, original, saved_at, started,
                               resent, pull)
            raise ApplicationError(
                f"copying disk {inp.disk} failed at {e}", type="StreamError"
            ) from e
        # Packed (zstd): a 1 TiB disk's manifest is 256 MiB raw, mostly the same zero-block
        # hash, and a few KiB packed; the catalog is not a bus for the raw array. The
        # target site's verify and commit may run on another host: they read it from
        # the shared catalog, not from this host's file.
        packed, raw_sha = await asyncio.to_thread(
            lambda: (blockstream.pack_manifest(manifest, block_size=inp.block_size,
                                               disk_size=stream.disk_size),
                     hashlib.sha256(manifest).hexdigest()))
        await asyncio.to_thread(_write_atomic, mpath, packed)
        await asyncio.to_thread(self.ctx.catalog.stage_manifest, inp.ctx.protection,
                                inp.ctx.cycle_id, inp.disk, packed)
        # Every attempt's bytes count (a killed one's as far as its last progress record
        # says): the cycle record, the SLA report and the metrics see what really moved.
        written = resent.written + final.bytes_written
        record_stream(inp.ctx.protection, inp.disk, changes.summary.kind, written,
                      time.monotonic() - started)
        return StreamResult(
            disk=inp.disk,
            kind=changes.summary.kind,
            bytes_read=resent.read + final.bytes_read,
            bytes_written=written,
            attempt_bytes_read=final.bytes_read,
            attempt_bytes_written=final.bytes_written,
            bytes_zero=final.bytes_zero,
            bytes_skipped=final.bytes_skipped,
            bytes_total=final.bytes_total,
            seconds=time.monotonic() - started,
            resumed_from=resume_from,
            bytes_resent=resent.resent,
            manifest_file=str(mpath),
            manifest_sha256=raw_sha,
        )

    def _keep_durable(self, inp: StreamInput, stream: blockstream.Stream, mpath: Path,
                      manifest: bytearray, original: bytes | bytearray, saved_at: int, started: float,
                      resent: Attempts, pull: bool) -> int:
        """After a failed or cancelled run: save the partial manifest up to the final
        durable offset and heartbeat it (with what the next attempt sends again)."""
        p = stream.progress()
        durable = p.durable_offset - p.durable_offset % inp.block_size
        if durable > saved_at:
            self._save_partial(mpath, manifest, original, durable, inp.block_size)
            saved_at = durable
        self._progress(inp, _progress_details(p, saved_at, started, resent, pull))
        return saved_at

    def _progress(self, inp: StreamInput, details: dict[str, Any]) -> None:
        """Heartbeat the progress and keep it in a local record too: Temporal throttles
        heartbeats (one per 0.8 heartbeat timeout reaches the server), so after a kill -9
        the server's copy can be far older than this record, written every
        HEARTBEAT_EVERY. A retry on this host resumes from, and counts from, the newer."""
        activity.heartbeat(details)
        path = _progress_path(self.ctx.settings.home, inp.ctx.protection, inp.ctx.cycle_id,
                              inp.disk)
        try:
            _write_atomic(path, json.dumps(details).encode())
        except OSError as e:  # the heartbeat still carries it
            log.warning("progress record %s not written: %s", path, e)

    def _stall_seconds(self, inp: StreamInput) -> float:
        """The site's stall limit, longer where the policy's own bandwidth limit makes
        one request (up to 4 MiB per connection) take a while."""
        limit = float(self.ctx.settings.stream_stall_seconds)
        rate = inp.ctx.policy.bandwidth_bytes_per_s
        if rate:
            limit = max(limit, 3 * inp.ctx.policy.connections * STREAM_REQUEST / rate)
        return limit

    def _prepare_stream(
        self, inp: StreamInput, resume_from: int
    ) -> tuple[blockstream.Stream, bytearray, bytes | bytearray, Path, ChangeSet, int, Frozen | None,
               Staging | None]:
        frozen: Frozen | None = None
        staging: Staging | None = None
        try:
            if inp.disk in inp.frozen.remote:
                # Pull: this is the target site; the frozen disk is served by the source
                # site over TLS and its change set was staged in the catalog by the freeze.
                with permanent():
                    src = inp.frozen.remote[inp.disk]
                    src = src.model_copy(
                        update={"uri": nbdtls.with_local_credentials(src.uri, self.ctx.settings)})
                changes = pullexport.unpack_changes(self.ctx.catalog.staged_changes(
                    inp.ctx.protection, inp.ctx.cycle_id, inp.disk))
            else:
                frozen = self.ctx.source(inp.ctx.source.name).reopen(inp.frozen)
                changes = frozen.changes(inp.disk)
                src = frozen.export(inp.disk)
                src = src.model_copy(
                    update={"uri": nbdtls.with_local_credentials(src.uri, self.ctx.settings)})
            if inp.disk in inp.staging.remote:
                # Push: the staging lives on the target site's host, served over TLS;
                # only its URI is used here, with this site's client certificate.
                dst = inp.staging.remote[inp.disk]
                with permanent():
                    dst = dst.model_copy(
                        update={"uri": nbdtls.with_local_credentials(dst.uri, self.ctx.settings)})
            else:
                staging = self.ctx.target(inp.ctx.target.name).resume(inp.staging)
                dst = staging.endpoint(inp.disk)
            return (*self._plan_stream(inp, resume_from, changes, src, dst), frozen, staging)
        except BaseException:
            _close_all(frozen, staging)
            raise

    def _plan_stream(
        self, inp: StreamInput, resume_from: int, changes: ChangeSet, src: NbdEndpoint,
        dst: NbdEndpoint
    ) -> tuple[blockstream.Stream, bytearray, bytes | bytearray, Path, ChangeSet, int]:
        disk_size = src.size
        mpath = _manifest_path(self.ctx.settings.home, inp.ctx.protection, inp.ctx.cycle_id, inp.disk)
        kind = changes.summary.kind
        original = self._base_manifest(inp, kind, disk_size, dst)
        manifest = bytearray(original)
        partial = mpath.with_name(mpath.name + ".partial")
        saved = _unpacked(partial.read_bytes()) if resume_from and partial.exists() else b""
        if resume_from and len(saved) == len(original):
            manifest = bytearray(saved)
        else:
            resume_from = 0
        extents = [blockstream.Extent(e.offset, e.length, e.zero) for e in changes.extents]
        stream = blockstream.Stream(
            src.uri,
            dst.uri,
            extents,
            disk_size=disk_size,
            manifest=manifest,
            block_size=inp.block_size,
            compare=kind == ChangeKind.RESYNC,
            connections=inp.ctx.policy.connections,
            rate_limit=inp.ctx.policy.bandwidth_bytes_per_s,
            start_offset=resume_from,
            flush_interval=flush_interval(inp.ctx.policy.bandwidth_bytes_per_s),
            # and at least every few seconds: on a slow link a failed attempt then
            # resends only what crossed since the last round
            flush_seconds=FLUSH_SECONDS,
            # and never more than this beyond durable_offset, however slow the
            # flushes (a busy host): the bound on what a retry resends
            max_unflushed=resend_bound(inp.ctx.policy.bandwidth_bytes_per_s,
                                       inp.ctx.policy.connections),
        )
        return stream, manifest, original, mpath, changes, resume_from

    def _base_manifest(self, inp: StreamInput, kind: ChangeKind, disk_size: int,
                       dst: NbdEndpoint) -> bytes | bytearray:
        """The manifest the copy starts from: the previous point's (the copy updates
        the blocks it touches) or all zero blocks for a disk seen the first time."""
        last = inp.ctx.last_point
        if kind != ChangeKind.FULL and last and any(d.disk == inp.disk for d in last.disks):
            packed = self.ctx.catalog.manifest(last.id, inp.disk)
            manifest, header = blockstream.unpack_manifest(packed)
            if header.get("block_size") != inp.block_size:
                return self._rehash(inp, dst, disk_size, int(header.get("block_size", 0)))
            # read-only from here (the copy's live manifest is a copy of it): no bytes()
            # copy of what is 256 MiB for a terabyte
            return resize_manifest(manifest, disk_size, inp.block_size)
        return blockstream.zero_manifest(disk_size, inp.block_size)

    def _rehash(self, inp: StreamInput, dst: NbdEndpoint, disk_size: int, was: int) -> bytearray:
        """The target now writes in units the previous point's manifest blocks are not a
        whole number of (its write granularity grew): the old hashes cannot be split or
        joined, so hash what the staging holds, which is the previous point until this
        copy writes, in the new block size. Costs one read of the replica disk, once."""
        log.warning("%s/%s: the manifest block size changes from %d to %d (the target's "
                    "write granularity); hashing the replica's %d bytes once", inp.ctx.protection,
                    inp.disk, was, inp.block_size, disk_size)
        manifest = blockstream.zero_manifest(disk_size, inp.block_size)
        blockstream.Stream(dst.uri, None, [blockstream.Extent(0, disk_size)], disk_size=disk_size,
                           manifest=manifest, block_size=inp.block_size,
                           connections=inp.ctx.policy.connections).run()
        return manifest

    @staticmethod
    def _save_partial(
        path: Path, live: bytearray, original: bytes | bytearray, durable: int, block_size: int
    ) -> None:
        # Entries below the durable offset are final; above it the copy may have
        # hashed blocks whose writes are not flushed yet, so the original entries are
        # kept there: a resumed compare-mode copy must not skip an unflushed block.
        cut = (durable // block_size) * blockstream.HASH_SIZE
        data = bytes(live[:cut]) + original[cut:]
        # packed: written every few seconds, and 256 MiB raw for a 1 TiB disk
        _write_atomic(path.with_name(path.name + ".partial"),
                      blockstream.pack_manifest(data, block_size=block_size))

    # ------------------------------------------------------------------ verify sample

    @activity.defn(name="verify.sample")
    async def verify_sample(self, inp: VerifySampleInput) -> VerifySampleResult:
        return await in_thread(self._verify_sample, inp)

    def _verify_sample(self, inp: VerifySampleInput) -> VerifySampleResult:
        staging = self.ctx.target(inp.ctx.target.name).resume(inp.staging)
        try:
            ep = staging.endpoint(inp.disk)
            expected = self._staged_manifest(inp.ctx, inp.disk, "")
            nblocks = len(expected) // blockstream.HASH_SIZE
            rng = random.Random(inp.seed)
            picks = sorted(rng.sample(range(nblocks), min(inp.blocks, nblocks)))
            with permanent():
                uri = nbdtls.with_local_credentials(ep.uri, self.ctx.settings)
                mismatches = self._check_blocks(uri, ep.size, expected, picks, inp.block_size)
        finally:
            staging.close()  # the NBD server endpoint() started, if the target starts one
        return VerifySampleResult(disk=inp.disk, blocks_checked=len(picks), mismatches=mismatches)

    def _check_blocks(self, uri: str, size: int, expected: bytes | bytearray, picks: list[int],
                      block_size: int) -> list[int]:
        try:
            return check_blocks(uri, size, expected, picks, block_size)
        except blockstream.BlockstreamError as e:
            refused = nbdtls.tls_refusal(uri, e.nbd_error or str(e), self.ctx.settings)
            if refused is not None:
                raise refused from e
            raise

    def _new_checkpoints(self, inp: CommitInput) -> list[Checkpoint]:
        """From the freeze (taken at the source site); the source connector is asked only
        for a cycle frozen by an older worker (it may touch the source site's files)."""
        if inp.checkpoints is not None:
            return inp.checkpoints
        return self.ctx.source(inp.ctx.source.name).reopen(inp.frozen).new_checkpoints()

    def _staged_manifest(self, ctx: CycleContext, disk: str, manifest_file: str
                         ) -> bytes | bytearray:
        """The manifest ``stream.disk`` made, raw."""
        return _unpacked(self._staged_as_stored(ctx, disk, manifest_file))

    def _staged_as_stored(self, ctx: CycleContext, disk: str, manifest_file: str) -> bytes:
        """The manifest ``stream.disk`` made, as staged (packed; raw from older workers),
        from the catalog (it may have run on another host); a cycle streamed by an older
        worker left only its file."""
        try:
            return self.ctx.catalog.staged_manifest(ctx.protection, ctx.cycle_id, disk)
        except NotFoundError:
            path = Path(manifest_file) if manifest_file else _manifest_path(
                self.ctx.settings.home, ctx.protection, ctx.cycle_id, disk)
            return path.read_bytes()

    def _point_manifest(self, inp: CommitInput, s: StreamResult, disk: DiskInfo
                        ) -> tuple[bytes, str]:
        """(packed manifest, sha256 of the raw one) for the point: the staged bytes as
        they are when the stream packed them and said their raw digest (no unpack and
        repack of a terabyte's 256 MiB), else packed here."""
        staged = self._staged_as_stored(inp.ctx, s.disk, s.manifest_file)
        if s.manifest_sha256 and staged[:4] == blockstream.MANIFEST_MAGIC:
            with contextlib.suppress(blockstream.ManifestError):
                info = blockstream.manifest_info(staged)
                if info["block_size"] == inp.block_size and info["disk_size"] == disk.size:
                    return staged, s.manifest_sha256
        raw = _unpacked(staged)
        return (blockstream.pack_manifest(raw, block_size=inp.block_size, disk_size=disk.size),
                hashlib.sha256(raw).hexdigest())

    # ------------------------------------------------------------------ commit

    @activity.defn(name="target.commit")
    async def commit(self, inp: CommitInput) -> RecoveryPoint:
        return await in_thread(self._commit, inp)

    def _commit(self, inp: CommitInput) -> RecoveryPoint:
        cat = self.ctx.catalog
        try:
            return cat.get_point(inp.ctx.cycle_id)  # a retry after the catalog commit
        except NotFoundError:
            pass
        staging = self.ctx.target(inp.ctx.target.name).resume(inp.staging)
        kinds = set(inp.frozen.kinds.values())
        kind = (
            ChangeKind.RESYNC if ChangeKind.RESYNC in kinds
            else ChangeKind.FULL if kinds == {ChangeKind.FULL}
            else ChangeKind.INCREMENTAL
        )
        meta = PointMeta(
            cycle_id=inp.ctx.cycle_id,
            instant=inp.frozen.instant,
            consistency=inp.frozen.consistency,
            block_size=inp.block_size,
            kind=kind,
            bytes_written=sum(s.bytes_written for s in inp.streams),
            checkpoints=self._new_checkpoints(inp),
        )
        streams = {s.disk: s for s in inp.streams}
        manifests = {d.id: self._point_manifest(inp, streams[d.id], d) for d in inp.staging.disks}
        locations = staging.commit(meta)
        packed = {}
        disks = []
        for disk, location in zip(inp.staging.disks, locations, strict=True):
            packed[disk.id], raw_sha = manifests[disk.id]
            disks.append(
                PointDisk(
                    disk=disk.id,
                    size=disk.size,
                    location=location,
                    block_size=inp.block_size,
                    manifest_sha256=raw_sha,
                )
            )
        now = datetime.now(UTC)
        point = RecoveryPoint(
            id=inp.ctx.cycle_id,
            protection=inp.ctx.protection,
            seq=cat.next_seq(inp.ctx.protection),
            instant=inp.frozen.instant,
            committed_at=now,
            consistency=inp.frozen.consistency,
            disks=disks,
            bytes_written=meta.bytes_written,
            kind=kind,
        )
        stored = cat.commit_point(point, packed, meta.checkpoints)
        cat.drop_staged_manifests(inp.ctx.protection, inp.ctx.cycle_id)
        return stored

    # ------------------------------------------------------------------ release

    @activity.defn(name="source.release")
    async def release(self, inp: ReleaseInput) -> None:
        def run() -> None:
            if inp.frozen.remote:  # pull: nobody reads the frozen disks any more
                pullexport.stop_frozen(self.ctx.settings, inp.frozen)
            source = self.ctx.source(inp.ctx.source.name)
            source.reopen(inp.frozen).release(inp.committed)
            work = self.ctx.settings.home / "work" / inp.ctx.protection / inp.ctx.cycle_id
            if inp.committed:
                _remove_tree(work)

        await in_thread(run)

    # ------------------------------------------------------------------ retention

    @activity.defn(name="retention.apply")
    async def retention(self, ctx: CycleContext) -> RetentionResult:
        return await in_thread(self._retention, ctx)

    def _retention(self, ctx: CycleContext) -> RetentionResult:
        cat = self.ctx.catalog
        target = self.ctx.target(ctx.target.name)
        rec = cat.get_protection(ctx.protection)
        result = RetentionResult()
        # Finish deletions a crash interrupted, then decide anew.
        pending = cat.deleting_points(ctx.protection)
        _, to_delete = retention_rules.select_points(
            cat.points(ctx.protection), rec.spec.policy.retention, datetime.now(UTC)
        )
        for point in [*pending, *to_delete]:
            cat.mark_deleting(point.id)
            successor = _successor(cat.points(ctx.protection), point)
            try:
                moved = target.delete(point, successor)
            except Busy as e:
                log.info("retention: %s busy (%s); retried after the next cycle", point.id, e)
                result.busy.append(point.id)
                continue
            if moved is not None:
                cat.update_point(moved)
            cat.finish_delete(point.id)
            result.deleted.append(point.id)
        result.kept = len(cat.points(ctx.protection))
        return result

    # ------------------------------------------------------------------ bookkeeping

    @activity.defn(name="cycle.record")
    async def record(self, inp: CycleRecordInput) -> None:
        o = inp.outcome
        rec = CycleRecord(
            cycle_id=o.cycle_id,
            protection=inp.ctx.protection,
            started_at=inp.ctx.started_at,
            finished_at=o.committed_at or datetime.now(UTC),
            instant=o.instant,
            status="committed" if o.status == "committed" else "failed",
            kind=o.kind,
            bytes_read=inp.bytes_read,
            bytes_written=o.bytes_written,
            bytes_zero=inp.bytes_zero,
            bytes_skipped=inp.bytes_skipped,
            bytes_resent=inp.bytes_resent,
            copy_seconds=o.copy_seconds,
            wall_seconds=o.wall_seconds,
            rpo_seconds=o.rpo_seconds,
            point_id=o.point_id,
            error=o.error,
        )
        await in_thread(self.ctx.catalog.record_cycle, rec)
        record_cycle(inp.ctx.protection, rec.status, o.wall_seconds, o.rpo_seconds)

    @activity.defn(name="protection.state")
    async def protection_state(self, protection: str) -> ProtectionState:
        rec = await in_thread(self.ctx.catalog.get_protection, protection)
        return rec.state


def _transfer(ctx: CycleContext) -> str:
    return effective_transfer(ctx.policy, ctx.source.site, ctx.target.site)


def check_transfer(transfer: str, source_site: str, target_site: str) -> None:
    """Refuse a local (unix socket) transfer between two sites at the cycle's start: the
    target's sockets are on another host than the source site's worker."""
    if transfer == "local" and source_site != target_site:
        raise PermanentError(
            f"the protection's transfer is 'local' (NBD on unix sockets, one host) but its "
            f"source is at site {source_site!r} and its target at site {target_site!r}: set "
            "the policy's transfer to 'push' (or 'auto') for NBD over TLS between the sites "
            "(docs/sites.md)")


def check_pull_source(transfer: str, source: object) -> None:
    """Pull needs frozen exports that live from freeze to release (the fronts of
    transcend/pullexport.py point at them): a source that declares ``serve_remote``."""
    if transfer == "pull" and not capabilities_of(source).serve_remote:
        info = getattr(source, "info", None)
        raise PermanentError(
            f"the protection's transfer is 'pull' but its source platform "
            f"{getattr(info, 'name', '?')!r} ({getattr(info, 'kind', '?')}) does not serve its "
            "frozen disks to another site; use 'push' (the target site serves its staging) "
            "or 'auto'")


def flush_interval(bandwidth: int | None) -> int:
    """Bytes written between flushes, i.e. how far ``durable_offset`` lags the copy.

    A crashed attempt re-copies at most this much. Unthrottled: 64 MiB (a flush per
    fraction of a second at LAN speed). Throttled: about FLUSH_SECONDS of the limit, so
    a slow WAN link still makes durable progress that a retry can resume from. The
    stream also flushes every FLUSH_SECONDS whatever it wrote (a slow link the policy
    does not throttle), so the lag is at most min(this, FLUSH_SECONDS of the copy).
    """
    if bandwidth is None:
        return FLUSH_INTERVAL_MAX
    return max(FLUSH_INTERVAL_MIN, min(FLUSH_INTERVAL_MAX, bandwidth * FLUSH_SECONDS))


def resend_bound(bandwidth: int | None, connections: int) -> int:
    """The most a failed stream attempt sends again: the engine takes no new data
    request while this much is taken beyond ``durable_offset`` (``max_unflushed``),
    so the bound holds whatever the load: one flush interval plus one request per
    connection."""
    return flush_interval(bandwidth) + connections * STREAM_REQUEST


class StallWatchdog:
    """Whether a running copy stopped moving: no request completed (written, zeroed
    or skipped as equal) and nothing became durable for ``seconds``. Reads are not
    progress: with a stuck destination the engine keeps reading ahead into its
    buffers for a while. A throttled copy still completes a request every few
    seconds."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last: tuple[int, ...] = ()
        self._since = time.monotonic()

    def stalled(self, p: blockstream.Progress) -> bool:
        now = time.monotonic()
        counters = (p.bytes_written, p.bytes_zero, p.bytes_skipped, p.durable_offset)
        if counters != self._last:
            self._last, self._since = counters, now
            return False
        return now - self._since >= self.seconds


def _peers(uris: dict[str, str]) -> str:
    named = [f"{side} {nbdtls.peer(u)}" for side, u in uris.items() if nbdtls.is_tls_uri(u)]
    return ", ".join(named) or "local NBD servers"


def _progress_details(p: blockstream.Progress, durable: int, started: float,
                      prior: Attempts | None = None, pull: bool = False) -> dict[str, Any]:
    prior = prior or Attempts()
    remaining = max(0, p.bytes_total - (p.bytes_read + p.bytes_skipped + p.bytes_zero))
    # What crossed the network beyond the durable offset (reads in a pull, writes
    # otherwise): if this attempt fails, the next one moves it again.
    unsaved = (p.bytes_read - p.read_durable) if pull else (p.bytes_written - p.written_durable)
    return {
        "durable_offset": durable,
        "resent": prior.resent,
        # what the attempts before this one moved in all (the next attempt adds this one's)
        "prior_written": prior.written,
        "prior_read": prior.read,
        "unsaved": max(0, unsaved),
        "bytes_read": p.bytes_read,
        "bytes_written": p.bytes_written,
        "bytes_zero": p.bytes_zero,
        "bytes_skipped": p.bytes_skipped,
        "bytes_total": p.bytes_total,
        "rate": p.rate,
        "eta_seconds": (remaining / p.rate) if p.rate > 0 else None,
        "elapsed_seconds": time.monotonic() - started,
    }


def check_blocks(uri: str, size: int, expected: bytes | bytearray, blocks: list[int],
                 block_size: int) -> list[int]:
    """Hash the given blocks of an export and return those that differ from ``expected``."""
    if not blocks:
        return []
    scratch = bytearray(len(expected))
    extents = [
        blockstream.Extent(b * block_size, min(block_size, size - b * block_size)) for b in blocks
    ]
    blockstream.Stream(
        uri, None, extents, disk_size=size, manifest=scratch, block_size=block_size, connections=1
    ).run()
    hs = blockstream.HASH_SIZE
    return [b for b in blocks if scratch[b * hs:(b + 1) * hs] != expected[b * hs:(b + 1) * hs]]


def _successor(points: list[RecoveryPoint], point: RecoveryPoint) -> RecoveryPoint | None:
    later = [p for p in points if p.seq > point.seq and p.id != point.id]
    return min(later, key=lambda p: p.seq) if later else None


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


__all__ = ["CycleActivities", "FrozenHandle", "PermanentError"]


def _close_all(*objs: Frozen | Staging | None) -> None:
    """Close each, even when one fails (the first error is raised after the rest)."""
    first: BaseException | None = None
    for o in objs:
        if o is None:
            continue
        try:
            o.close()
        except Exception as e:  # each one gets its chance
            first = first or e
    if first is not None:
        raise first
