"""Activities of the DR operations: choose the point, check a recovered VM's health,
tear a test instance down. Booting itself is ``point.boot`` (activities/points.py)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import ActivityContext, in_thread, permanent
from transcend.api import BootTier, DestroyInput, HealthInput, RtoSample, TestFailoverInput
from transcend.models import ProtectionState, RecoveryPoint
from transcend.telemetry import record_rto

CONSOLE_POLL_SECONDS = 0.5


class FailoverActivities:
    def __init__(self, ctx: ActivityContext) -> None:
        self.ctx = ctx

    @activity.defn(name="failover.choose_point")
    async def choose_point(self, inp: TestFailoverInput) -> RecoveryPoint:
        """The point to recover: the one asked for (it must belong to the protection) or
        the newest. Refused with the reason when the protection cannot be tested."""

        def run() -> RecoveryPoint:
            cat = self.ctx.catalog
            with permanent():
                rec = cat.get_protection(inp.protection)
                if rec.state == ProtectionState.REMOVED:
                    raise ApplicationError(
                        f"protection {inp.protection!r} was removed; its points can still be "
                        "booted with `transcend boot`", type="WrongState", non_retryable=True)
                if inp.point_id:
                    point = cat.get_point(inp.point_id)
                    if point.protection != inp.protection:
                        raise ApplicationError(
                            f"point {inp.point_id} belongs to {point.protection!r}, not "
                            f"{inp.protection!r}", type="WrongPoint", non_retryable=True)
                    return point
                points = cat.points(inp.protection)
            if not points:
                raise ApplicationError(
                    f"protection {inp.protection!r} has no recovery point yet; wait for the "
                    "first cycle (`transcend status`)", type="NoPoint", non_retryable=True)
            return points[-1]

        return await in_thread(run)

    @activity.defn(name="failover.tiers")
    async def tiers(self, inp: TestFailoverInput) -> list[BootTier]:
        """The boot order, checked against the protection's VMs: each exactly once."""

        def run() -> list[BootTier]:
            with permanent():
                vms = [w.name for w in self.ctx.catalog.get_protection(inp.protection).workloads]
            return boot_tiers(inp.protection, vms, inp.boot_order)

        return await in_thread(run)

    @activity.defn(name="metrics.rto")
    async def rto(self, sample: RtoSample) -> None:
        """Workflows measure the RTO; this puts it on the worker's metrics endpoint."""
        record_rto(sample.protection, sample.seconds)

    @activity.defn(name="instance.health")
    async def health(self, inp: HealthInput) -> datetime:
        """Wait until the recovered VM passes its health check; returns when it did."""
        if inp.health.kind == "none":
            return datetime.now(UTC)
        pattern = re.compile(inp.health.pattern, re.MULTILINE)
        log = Path(inp.instance.console_log)
        deadline = time.monotonic() + inp.health.timeout_seconds
        while True:
            text = await asyncio.to_thread(_read_text, log)
            if pattern.search(text):
                return datetime.now(UTC)
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"health check failed: {inp.health.pattern!r} did not appear on the console "
                    f"of {inp.instance.name} within {inp.health.timeout_seconds} s; console tail:\n"
                    f"{text[-1500:]}",
                    type="HealthCheckFailed", non_retryable=True,
                )
            activity.heartbeat(len(text))
            await asyncio.sleep(CONSOLE_POLL_SECONDS)

    @activity.defn(name="instance.destroy")
    async def destroy(self, inp: DestroyInput) -> None:
        """Stop and remove a recovered instance and its overlays (idempotent)."""

        def run() -> None:
            cat = self.ctx.catalog
            with permanent():
                point = cat.get_point(inp.point_id)
                rec = cat.get_protection(point.protection)
                self.ctx.target(rec.spec.target_platform).destroy(inp.instance)

        await in_thread(run)


def boot_tiers(protection: str, vms: list[str], boot_order: list[BootTier]) -> list[BootTier]:
    """``boot_order`` checked against the protection's VMs (each exactly once), or one
    tier per VM in the protection's order when none is given."""
    if not boot_order:
        return [BootTier(vms=[vm]) for vm in vms]
    ordered = [vm for tier in boot_order for vm in tier.vms]
    unknown = sorted(set(ordered) - set(vms))
    twice = sorted({vm for vm in ordered if ordered.count(vm) > 1})
    missing = [vm for vm in vms if vm not in ordered]
    if unknown or twice or missing:
        raise ApplicationError(
            f"boot order of {protection!r} must name each of its VMs ({', '.join(vms)}) "
            f"exactly once: unknown {unknown}, twice {twice}, missing {missing}",
            type="WrongInput", non_retryable=True)
    return boot_order


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
