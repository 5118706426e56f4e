"""Activities of the DR operations: choose the point, check a recovered VM's health,
tear a test instance down. Booting itself is ``point.boot`` (activities/points.py)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import ActivityContext, in_thread, permanent
from connectors.base import HealthProbe, capabilities_of, health_probe
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
        """Wait until the recovered VM passes its health check, asking its target
        platform (``HealthProbe``); returns when it did."""
        if inp.health.kind == "none":
            return datetime.now(UTC)
        with permanent():
            target = self.ctx.target(inp.instance.platform)
            probe = health_probe(target)
            kind = inp.health.kind
            if probe is None or kind not in capabilities_of(target).health:
                raise ApplicationError(
                    f"health check {kind!r} is not offered by platform {inp.instance.platform!r} "
                    f"(it offers: {', '.join(capabilities_of(target).health) or 'none'}); "
                    "choose one of those or kind 'none'",
                    type="HealthCheckUnsupported", non_retryable=True)
        deadline = time.monotonic() + inp.health.timeout_seconds
        last = ""
        while True:
            ok, last = await asyncio.to_thread(_probe_once, probe, inp)
            if ok:
                return datetime.now(UTC)
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"health check failed: {_what(inp)} for {inp.instance.name} not within "
                    f"{inp.health.timeout_seconds} s; {last}",
                    type="HealthCheckFailed", non_retryable=True,
                )
            activity.heartbeat(len(last))
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


def _what(inp: HealthInput) -> str:
    h = inp.health
    return {"console": f"{h.pattern!r} on the console", "agent": "the guest agent ready",
            "tcp": f"a TCP connection to port {h.port}"}.get(h.kind, h.kind)


def _probe_once(probe: HealthProbe, inp: HealthInput) -> tuple[bool, str]:
    """One look: (passed, what was seen, for the failure message)."""
    h = inp.health
    if h.kind == "console":
        text = probe.console_text(inp.instance)
        return bool(re.search(h.pattern, text, re.MULTILINE)), f"console tail:\n{text[-1500:]}"
    if h.kind == "agent":
        return probe.agent_ready(inp.instance), "the guest agent did not answer"
    address = probe.address(inp.instance)
    if not address:
        return False, "the platform reports no address for it"
    try:
        with socket.create_connection((address, h.port), timeout=3):
            return True, ""
    except OSError as e:
        return False, f"{address}:{h.port}: {e}"
