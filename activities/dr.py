"""Activities of failover and migration (workflows/dr.py); failback's are in
activities/failback.py and activities/failback_sites.py.

State changes go through the catalog's compare-and-set (``Catalog.transition``), so
a request the protection's state does not allow is refused before anything changes,
and a retried activity finds its own earlier write. Platforms are reached only
through the connector contract and its declared capabilities (connectors/base.py):
power through ``PowerControl`` of the platform's Source, so any connector that
declares ``power`` takes part.

A consistency group fails over and back VM by VM (each VM is its own activity call,
``vm`` naming it); the record lists the VMs in boot order.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.client import ScheduleActionExecutionStartWorkflow, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.context import ActivityContext, in_thread, permanent
from activities.failover import boot_tiers
from activities.points import guest_prep_for, reip_rules
from connectors.base import PermanentError, PowerControl, require_power, vm_namespace
from transcend.api import (
    FailedOverVm,
    FailoverAbort,
    FailoverInput,
    FailoverPlan,
    FailoverRecord,
    ProductionBoot,
    SourcePower,
    schedule_id,
)
from transcend.models import (
    BootSpec,
    Instance,
    PlatformInfo,
    ProtectionState,
    Workload,
)

HEARTBEAT_EVERY = 2.0

S = ProtectionState


def tracking_protection(protection: str) -> str:
    """The name the failed-over VM's tracking is kept under (KVM: checkpoints
    ``transcend.<this>.*``), apart from the protection's own on the original VM."""
    return f"failback-{protection}"


def record_of(ctx: ActivityContext, protection: str) -> FailoverRecord:
    data = ctx.catalog.get_dr_record(protection)
    if data is None:
        state = ctx.catalog.get_protection(protection).state
        raise ApplicationError(
            f"protection {protection!r} is {state.value}, not failed over: there is nothing "
            "to fail back", type="WrongState", non_retryable=True)
    return FailoverRecord.model_validate_json(data)


def power_of(ctx: ActivityContext, platform: str, role: str) -> PowerControl:
    """The platform's Source as a PowerControl, or a PermanentError naming what is missing."""
    return require_power(ctx.source(platform), role)


def same_endpoint(source: object, target: object, a: PlatformInfo, b: PlatformInfo) -> bool:
    """Whether two platforms name the same VM namespace (one libvirt host registered
    as source and target): then the recovered VM needs a name of its own. The
    connectors say where their names live (``vm_namespace``)."""
    return a.site == b.site and vm_namespace(source, a) == vm_namespace(target, b)


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
                same_host = same_endpoint(self.ctx.source(source.name), self.ctx.target(target.name),
                                          source, target)
                names = {wl.name: production_name(wl.name, inp.name, group=len(rec.workloads) > 1,
                                                  same_host=same_host)
                         for wl in rec.workloads}
                if len(set(names.values())) != len(names):
                    raise PermanentError(f"two VMs would get the same name at the target: {names}")
                if inp.planned:
                    # A migration shuts the source down cleanly before its final cycle.
                    power_of(self.ctx, rec.spec.source_platform, "source")
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
                source = self.ctx.source(rec.spec.source_platform)
                if a.restart_vms or isinstance(source, PowerControl):
                    power = require_power(source, "source")
                    for wl in rec.workloads:
                        power.settle(wl.ref.id)
                    for ref in a.restart_vms:
                        power.power_on(ref)
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
                return power_of(self.ctx, p.platform, "VM's").power_off(
                    p.vm, p.timeout_seconds, p.force)

        return await in_thread(run)

    @activity.defn(name="source.power_on")
    async def power_on(self, p: SourcePower) -> None:
        def run() -> None:
            with permanent():
                power_of(self.ctx, p.platform, "VM's").power_on(p.vm)

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
