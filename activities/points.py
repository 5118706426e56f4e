"""Point activities: verify a whole point against its manifest, boot from a point."""

from __future__ import annotations

import asyncio
import time

from temporalio import activity

import blockstream
from activities.context import ActivityContext, in_thread, permanent
from connectors.base import PermanentError
from transcend.api import BootInput, BootResult, VerifyInput, VerifyResult
from transcend.guestprep import GuestPrep, ReIpRule
from transcend.models import BootSpec, PlatformInfo, PlatformKind, ProtectionPolicy


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
        for disk in point.disks:
            expected, _header = blockstream.unpack_manifest(cat.manifest(point.id, disk.disk))
            ep = await asyncio.to_thread(target.open, point, disk.disk)
            try:
                actual = bytearray(len(expected))
                stream = blockstream.Stream(
                    ep.uri, None, [blockstream.Extent(0, disk.size)], disk_size=disk.size,
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
                    task.result()
                except asyncio.CancelledError:
                    stream.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise
            finally:
                await asyncio.to_thread(target.close, point, disk.disk)
            hs = blockstream.HASH_SIZE
            n = len(expected) // hs
            checked[disk.disk] = n
            diff = [b for b in range(n) if actual[b * hs:(b + 1) * hs] != expected[b * hs:(b + 1) * hs]]
            if diff:
                bad[disk.disk] = diff[:100]
        return VerifyResult(point_id=point.id, disks=checked, mismatched_blocks=bad, ok=not bad)

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
    guest comes from another hypervisor and the target is KVM (virt-v2v converts to
    KVM only); the re-IP rules as given (the operation's, else the policy's)."""
    if convert == "auto":
        source = ctx.catalog.get_platform(source_platform).kind
        target = ctx.catalog.get_platform(target_platform).kind
        needs = source != target and target == PlatformKind.KVM
    else:
        needs = convert == "always"
    prep = GuestPrep(convert=needs, reip=reip)
    return prep if prep.needed() else None
