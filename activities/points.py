"""Point activities: verify a whole point against its manifest, boot from a point."""

from __future__ import annotations

import asyncio
import time

from temporalio import activity

import blockstream
from activities.context import ActivityContext, in_thread, permanent
from connectors.base import PermanentError
from connectors.registry import declared_capabilities
from transcend.api import BootInput, BootResult, VerifyInput, VerifyResult
from transcend.guestprep import CONVERTS_TO, GuestPrep, ReIpRule
from transcend.models import BootSpec, PlatformInfo, ProtectionPolicy


class PointActivities:
    def __init__(self, ctx: ActivityContext) -> None:
        self.ctx = ctx

    @activity.defn(name="point.target")
    async def point_target(self, point_id: str) -> PlatformInfo:
        def run() -> PlatformInfo:
            with permanent():
                point = self.ctx.catalog.get_point(point_id)
                rec = self.ctx.catalog.get_protection(point.protection)
                return self.ctx.catalog.get_platform(rec.spec.target_platform)

        return await in_thread(run)

    @activity.defn(name="point.verify")
    async def verify(self, inp: VerifyInput) -> VerifyResult:
        cat = self.ctx.catalog
        with permanent():
            point = await asyncio.to_thread(cat.get_point, inp.point_id)
            rec = await asyncio.to_thread(cat.get_protection, point.protection)
        target = self.ctx.target(rec.spec.target_platform)
        checked: dict[str, int] = {}
        bad: dict[str, list[int]] = {}
        read: dict[str, int] = {}
        for disk in point.disks:
            expected, _header = blockstream.unpack_manifest(cat.manifest(point.id, disk.disk))
            ep = await asyncio.to_thread(target.open, point, disk.disk)
            try:
                actual = bytearray(len(expected))
                extents = await asyncio.to_thread(_what_to_read, ep.uri, disk.size)
                stream = blockstream.Stream(
                    ep.uri, None, extents, disk_size=disk.size,
                    manifest=actual, block_size=disk.block_size,
                )
                task = asyncio.create_task(asyncio.to_thread(stream.run))
                started = time.monotonic()
                try:
                    while not task.done():
                        await asyncio.wait({task}, timeout=2.0)
                        p = stream.progress()
                        activity.heartbeat(
                            {"disk": disk.disk, "bytes_read": p.bytes_read, "bytes_total": p.bytes_total,
                             "rate": p.rate, "elapsed_seconds": time.monotonic() - started}
                        )
                    read[disk.disk] = task.result().bytes_read
                except asyncio.CancelledError:
                    stream.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise
            finally:
                await asyncio.to_thread(target.close, point, disk.disk)
            checked[disk.disk] = len(expected) // blockstream.HASH_SIZE
            diff = mismatched_blocks(actual, expected)
            if diff:
                bad[disk.disk] = diff
        return VerifyResult(point_id=point.id, disks=checked, mismatched_blocks=bad, ok=not bad,
                            bytes_read=read)

    @activity.defn(name="point.boot")
    async def boot(self, inp: BootInput) -> BootResult:
        def run() -> BootResult:
            cat = self.ctx.catalog
            with permanent():
                point = cat.get_point(inp.point_id)
                rec = cat.get_protection(point.protection)
                target = self.ctx.target(rec.spec.target_platform)
                workload = rec.workloads[0] if rec.workloads else None
                if inp.vm:
                    workload = next((w for w in rec.workloads if w.name == inp.vm), None)
                    if workload is None:
                        raise PermanentError(
                            f"protection {rec.name!r} has no VM {inp.vm!r}; its VMs: "
                            f"{', '.join(w.name for w in rec.workloads)}")
                # A test network of the protection's policy replaces the isolated one.
                network = inp.network or (rec.spec.policy.test_network if inp.isolated else "")
                inst = target.boot(
                    point,
                    BootSpec(name=inp.name, network=network, isolated=inp.isolated,
                             workload=workload, network_map=rec.spec.policy.network_map,
                             guest_prep=guest_prep_for(
                                 self.ctx, rec.spec.source_platform, rec.spec.target_platform,
                                 inp.convert, reip_rules(inp.reip, rec.spec.policy,
                                                         test=inp.isolated))),
                )
            return BootResult(point_id=point.id, instance_id=inst.id, name=inst.name,
                              console_log=inst.console_log, prepared=inst.prepared)

        return await in_thread(run)


def reip_rules(given: list[ReIpRule], policy: ProtectionPolicy, *, test: bool) -> list[ReIpRule]:
    """The operation's own re-IP rules, else the protection's runbook rules: those for
    test failovers (isolated boots) or those for failover and migration."""
    if given:
        return given
    return policy.test_reip if test else policy.reip


def guest_prep_for(ctx: ActivityContext, source_platform: str, target_platform: str,
                   convert: str, reip: list[ReIpRule]) -> GuestPrep | None:
    """What a boot does to the guest first: conversion when asked, or ("auto") when the
    guest comes from a platform whose guests need other drivers (``guest_family``) and
    the converter can adapt it to the target's (virt-v2v converts to KVM's virtio
    only: ``CONVERTS_TO``); the re-IP rules as given (the operation's, else the policy's)."""
    if convert == "auto":
        source = declared_capabilities(ctx.catalog.get_platform(source_platform).kind, "source")
        target = declared_capabilities(ctx.catalog.get_platform(target_platform).kind, "target")
        needs = (source.guest_family != target.guest_family
                 and target.guest_family in CONVERTS_TO)
    else:
        needs = convert == "always"
    prep = GuestPrep(convert=needs, reip=reip)
    return prep if prep.needed() else None


def _what_to_read(uri: str, size: int) -> list[blockstream.Extent]:
    """The point's export as it is allocated: data ranges are read and hashed, ranges
    it reports as reading zeros get the zero-block hash unread (what a read would
    return, so a corrupt map that zeroes data still mismatches the manifest). A server
    without block status is read whole."""
    try:
        status = blockstream.block_status(uri, "base:allocation", disk_size=size)
    except blockstream.BlockstreamError:
        return [blockstream.Extent(0, size)]
    return [blockstream.Extent(o, n, zero=bool(f & blockstream.STATE_ZERO)) for o, n, f in status]


#: a slice of the manifests compared at once (4,096 entries) before looking inside it
_SLICE = 4096 * blockstream.HASH_SIZE


def mismatched_blocks(actual: bytes | bytearray, expected: bytes | bytearray,
                      limit: int = 100) -> list[int]:
    """The first ``limit`` block numbers whose hashes differ: slices are compared whole
    (memcmp) and only a differing slice entry by entry, so a 1 TiB disk's 16 M entries
    cost milliseconds when they match."""
    hs = blockstream.HASH_SIZE
    out: list[int] = []
    view_a, view_e = memoryview(actual), memoryview(expected)
    for start in range(0, len(expected), _SLICE):
        end = min(start + _SLICE, len(expected))
        if view_a[start:end] == view_e[start:end]:
            continue
        for off in range(start, end, hs):
            if view_a[off:off + hs] != view_e[off:off + hs]:
                out.append(off // hs)
                if len(out) == limit:
                    return out
    return out
