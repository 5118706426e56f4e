"""Protection lifecycle activities: register (validate + catalog), the Temporal
Schedule that drives the RPO cadence, and state changes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from datetime import timedelta

from temporalio import activity
from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.context import ActivityContext, heartbeating, in_thread, permanent
from temporal import search_attributes as sa
from transcend.api import (
    CONTROL_TASK_QUEUE,
    CYCLE_WORKFLOW,
    CycleInput,
    PauseInput,
    PolicyUpdate,
    ProtectionView,
    RegisterPlan,
    RegisterWorkloads,
    ScheduleInput,
    StateChange,
    cycle_id_prefix,
    schedule_id,
)
from transcend.catalog import AlreadyExists, NotFoundError, ProtectionRecord
from transcend.models import Health, ProtectionSpec, ProtectionState, Workload, replica_disks

log = logging.getLogger(__name__)

# Cycle phases (workflows/cycle.py ``progress``) in which unprotect cancels a cycle:
# its staging and freeze are known to the workflow, which undoes both.
CANCEL_PHASES = frozenset({"stream", "verify"})
# Phases it waits out first: an activity of them cancelled mid-way would finish after
# the cycle ended and leave a freeze or a staging layer nobody undoes.
EARLY_PHASES = frozenset({"starting", "start", "freeze", "begin", ""})


def _name_taken(removed: ProtectionRecord) -> ApplicationError:
    """A removed protection keeps its name with its points and history (``remove``
    deletes no data), so a new protection cannot take the name over."""
    return ApplicationError(
        f"protection {removed.name!r} was removed on {removed.updated_at:%Y-%m-%d %H:%M} UTC and "
        f"its recovery points are kept under that name on {removed.spec.target_platform!r}: "
        "choose another name for the new protection",
        type="ProtectionNameTaken", non_retryable=True,
    )

class ProtectionActivities:
    def __init__(self, ctx: ActivityContext) -> None:
        self.ctx = ctx

    # Registration is four steps so that each runs where its data is (the source
    # site checks the VMs, the target site prepares the replica's home) and the
    # catalog is written last: bad input never leaves a half-registered protection.

    @activity.defn(name="protection.resolve")
    async def resolve(self, spec: ProtectionSpec) -> RegisterPlan:
        def run() -> RegisterPlan:
            cat = self.ctx.catalog
            with permanent():
                existing = None
                with contextlib.suppress(NotFoundError):
                    existing = cat.get_protection(spec.name)
                if existing is not None and existing.state == ProtectionState.REMOVED:
                    raise _name_taken(existing)
                if existing is not None and existing.spec != spec:
                    raise ApplicationError(
                        f"protection {spec.name!r} already exists with another spec; "
                        "change its policy with `transcend policy`, or choose another name",
                        type="AlreadyExists", non_retryable=True,
                    )
                return RegisterPlan(
                    spec=spec,
                    source=cat.get_platform(spec.source_platform),
                    target=cat.get_platform(spec.target_platform),
                    exists=existing is not None,
                )

        return await in_thread(run)

    @activity.defn(name="source.describe")
    async def describe(self, plan: RegisterPlan) -> list[Workload]:
        def run() -> list[Workload]:
            with permanent():
                source = self.ctx.source(plan.source.name)
                return [source.workload(w) for w in plan.spec.workloads]

        return await in_thread(run)

    @activity.defn(name="target.check")
    async def check_target(self, args: RegisterWorkloads) -> None:
        def run() -> None:
            with permanent():
                target = self.ctx.target(args.plan.target.name)
                target.prepare(args.plan.spec.name, replica_disks(args.workloads), args.workloads)

        await in_thread(run)

    @activity.defn(name="protection.add")
    async def add(self, args: RegisterWorkloads) -> ProtectionView:
        def run() -> ProtectionView:
            cat = self.ctx.catalog
            with permanent():
                name = args.plan.spec.name
                try:
                    cat.add_protection(args.plan.spec, args.workloads)
                except AlreadyExists:
                    # A retry of this activity finds its own row: carry on (and finish
                    # the state change if the first attempt stopped before it).  A removed
                    # protection keeps its name, points and history; taking the name over
                    # would start a protection whose every cycle is skipped as "removed".
                    old = cat.get_protection(name)
                    if old.state == ProtectionState.REMOVED:
                        raise _name_taken(old) from None
                    if old.state != ProtectionState.PREPARING:
                        return self._view(name)
                cat.set_protection_state(name, ProtectionState.PROTECTING, health=Health.HEALTHY)
                return self._view(name)

        return await in_thread(run)

    @activity.defn(name="protection.view")
    async def view(self, protection: str) -> ProtectionView:
        def run() -> ProtectionView:
            with permanent():
                return self._view(protection)

        return await in_thread(run)

    def _view(self, protection: str) -> ProtectionView:
        cat = self.ctx.catalog
        rec = cat.get_protection(protection)
        return ProtectionView(
            protection=protection,
            state=rec.state,
            policy=rec.spec.policy,
            source=cat.get_platform(rec.spec.source_platform),
            target=cat.get_platform(rec.spec.target_platform),
        )

    @activity.defn(name="protection.set_state")
    async def set_state(self, c: StateChange) -> None:
        """Health and protecting/paused from the Replication workflow. A DR operation's
        state (failing over, failed over, failing back) is only changed by the DR
        workflows: here only the health is updated then."""

        def run() -> None:
            cat = self.ctx.catalog
            current = cat.get_protection(c.protection).state
            dr = (ProtectionState.FAILING_OVER, ProtectionState.FAILED_OVER,
                  ProtectionState.FAILING_BACK)
            state = current if current in dr and c.state != ProtectionState.REMOVED else c.state
            cat.set_protection_state(c.protection, state, health=c.health, reason=c.reason)

        await in_thread(run)

    @activity.defn(name="protection.update_policy")
    async def update_policy(self, u: PolicyUpdate) -> None:
        await in_thread(self.ctx.catalog.update_policy, u.protection, u.policy)

    # ------------------------------------------------------------------ schedule

    def _client(self):  # type: ignore[no-untyped-def]
        if self.ctx.client is None:
            raise ApplicationError("schedule activities need a Temporal client", non_retryable=True)
        return self.ctx.client

    @activity.defn(name="schedule.ensure")
    async def ensure_schedule(self, inp: ScheduleInput) -> None:
        # Heartbeats: on a busy server (hundreds of protections onboarding) the
        # create/update RPCs can outlast the heartbeat timeout without being stuck.
        await heartbeating(self._ensure_schedule(inp))

    async def _ensure_schedule(self, inp: ScheduleInput) -> None:
        client = self._client()
        attrs = TypedSearchAttributes(
            [
                SearchAttributePair(sa.PROTECTION, inp.protection),
                *[
                    SearchAttributePair(getattr(sa, k), v)
                    for k, v in inp.search_attributes.items()
                    if hasattr(sa, k)
                ],
            ]
        )
        action = ScheduleActionStartWorkflow(
            CYCLE_WORKFLOW,
            CycleInput(protection=inp.protection),
            id=cycle_id_prefix(inp.protection),
            task_queue=CONTROL_TASK_QUEUE,
            typed_search_attributes=attrs,
            execution_timeout=timedelta(hours=24),
        )
        schedule = Schedule(
            action=action,
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(
                every=timedelta(seconds=inp.interval_seconds),
                offset=timedelta(seconds=schedule_offset(inp.protection, inp.interval_seconds)))]),
            # BUFFER_ONE: a cycle is never started while one runs; one request
            # (a tick or "sync now") waits and runs right after.
            policy=SchedulePolicy(
                overlap=ScheduleOverlapPolicy.BUFFER_ONE, catchup_window=timedelta(minutes=1)
            ),
            state=ScheduleState(paused=inp.paused, note="transcend RPO cadence"),
        )
        sid = schedule_id(inp.protection)
        try:
            await client.create_schedule(sid, schedule, trigger_immediately=inp.trigger_now)
            return
        except ScheduleAlreadyRunningError:
            pass
        handle = client.get_schedule_handle(sid)

        def updater(current: ScheduleUpdateInput) -> ScheduleUpdate:
            new = current.description.schedule
            new.action = action
            new.spec = schedule.spec
            new.policy = schedule.policy
            if new.state.paused != inp.paused:
                new.state.paused = inp.paused
            return ScheduleUpdate(schedule=new)

        await handle.update(updater)
        if inp.trigger_now:
            await handle.trigger(overlap=ScheduleOverlapPolicy.BUFFER_ONE)

    @activity.defn(name="schedule.trigger")
    async def trigger_schedule(self, protection: str) -> None:
        await self._client().get_schedule_handle(schedule_id(protection)).trigger(
            overlap=ScheduleOverlapPolicy.BUFFER_ONE
        )

    @activity.defn(name="schedule.pause")
    async def pause_schedule(self, p: PauseInput) -> None:
        handle = self._client().get_schedule_handle(schedule_id(p.protection))
        if p.paused:
            await handle.pause(note="paused by transcend")
        else:
            await handle.unpause(note="resumed by transcend")

    # ------------------------------------------------------------------ removal

    @activity.defn(name="protection.end_cycles")
    async def end_cycles(self, protection: str) -> list[str]:
        """Let the protection's running cycles end before its source tracking is removed,
        and end them soon: a cycle copying (or sampling) is cancelled, so it aborts its
        staging (the layer and its NBD export) and releases the source; one still
        starting, freezing or beginning is let reach the copy first (cancelled while a
        freeze or begin activity runs, the activity would finish on its own after the
        cycle ended and leave what it made behind); one committing or releasing is let
        finish. Returns the ids of the cycles it waited for."""
        return await heartbeating(self._end_cycles(protection))

    async def _end_cycles(self, protection: str) -> list[str]:
        client = self._client()
        query = (f'WorkflowType="{CYCLE_WORKFLOW}" AND {sa.PROTECTION.name}="{protection}" '
                 'AND ExecutionStatus="Running"')
        ended: list[str] = []
        async for wf in client.list_workflows(query):
            handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
            while True:
                try:
                    desc = await handle.describe()
                    if desc.status != WorkflowExecutionStatus.RUNNING:
                        break
                    phase = str((await handle.query("progress")).get("phase", ""))
                except (RPCError, WorkflowQueryFailedError) as e:
                    # no worker answers the query right now: ask again
                    log.info("cycle %s of %s: progress unknown (%s)", wf.id, protection, e)
                    await asyncio.sleep(2)
                    continue
                if phase in CANCEL_PHASES:
                    await handle.cancel()
                    break
                if phase not in EARLY_PHASES:
                    break  # committing, releasing, aborting: it ends by itself
                await asyncio.sleep(1)
            with contextlib.suppress(WorkflowFailureError):
                await handle.result()
            ended.append(wf.id)
        return ended

    @activity.defn(name="source.forget")
    async def forget_source(self, protection: str) -> list[str]:
        """Remove what the protection made at its source (checkpoints, dirty bitmaps,
        snapshots, a freeze still held): ``Source.forget``. Runs at the source's site."""
        def run() -> list[str]:
            cat = self.ctx.catalog
            with permanent():
                rec = cat.get_protection(protection)
                source = self.ctx.source(rec.spec.source_platform)
            removed = source.forget(protection, rec.workloads)
            for item in removed:
                log.info("unprotect %s: removed %s", protection, item)
            return removed

        return await in_thread(run)

    @activity.defn(name="schedule.delete")
    async def delete_schedule(self, protection: str) -> None:
        try:
            await self._client().get_schedule_handle(schedule_id(protection)).delete()
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise


def schedule_offset(protection: str, interval_seconds: int) -> int:
    """Where in each interval the protection's cycles start: a stable spread by name.

    Temporal aligns interval schedules to the Unix epoch, so without an offset every
    protection with the same RPO would be due in the same second and each tick would
    be a burst of all of them (bench/bench_scale.py measured it). A hash of the name
    spreads them evenly and keeps each one's phase across worker restarts and
    schedule updates (jitter would move it at every tick)."""
    if interval_seconds <= 1:
        return 0
    digest = hashlib.sha256(protection.encode()).digest()
    return int.from_bytes(digest[:8], "big") % interval_seconds
