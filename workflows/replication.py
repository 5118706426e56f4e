"""The long-lived owner of one protection: ``replication/<protection>``.

It registers the protection (validating everything before the catalog is written),
creates the Temporal Schedule that starts cycles at the RPO cadence, then follows
the cycles' outcomes (signalled by each CycleWorkflow): last point, RPO achieved,
health, the search attributes the Temporal UI filters on. It accepts updates to
pause, resume, change the policy and sync now, and continues-as-new so its history
stays bounded however long the protection lives.

Deterministic: no I/O, clock or randomness but Temporal's.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from temporal import search_attributes as sa
    from transcend.alerts import Alert
    from transcend.api import (
        CONTROL_TASK_QUEUE,
        REPLICATION_WORKFLOW,
        CycleOutcome,
        DrStateSignal,
        PauseInput,
        PolicyChange,
        PolicyUpdate,
        ProtectionView,
        RegisterPlan,
        RegisterWorkloads,
        ReplicationCarry,
        ReplicationInput,
        ReplicationStatus,
        ScheduleInput,
        StateChange,
        TestFailoverReport,
    )
    from transcend.config import site_task_queue
    from transcend.models import Health, ProtectionPolicy, ProtectionState, Workload
    from workflows.cycle import SHORT
    from workflows.notify import AlertQueue

MIN_INTERVAL = 10
# workflow.patched() id of the half-RPO floor and of leaving full cycles out of the
# interval's sample (histories written before them replay the old rule).
INTERVAL_PATCH = "interval-half-rpo-floor"
# workflow.patched() id of unprotect ending the running cycle and removing the source's
# tracking (histories of removals before it replay without those activities).
FORGET_PATCH = "remove-forgets-source"
WINDOW = 50  # cycles kept for p95 and cadence
MAX_EVENTS_PER_RUN = 500
FAILED_AFTER = 3


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def schedule_interval(policy: ProtectionPolicy, cycle_seconds: list[float],
                      floor_half_rpo: bool = True) -> int:
    """Start cycles often enough that interval + cycle time stays within the RPO, but
    never more often than every half RPO.

    Why the floor: cycles that take longer than half the RPO mean the site is short of
    capacity (workers, bandwidth, the Temporal server), and their time is then mostly
    queueing. Starting them more often only adds load: the 1,000-protection benchmark
    showed the feedback (slow onboarding cycles shrank 705 intervals from 300 s to
    10 s, 22,865 cycles fell due in 5 minutes and nothing kept up). With the floor the
    protection reports its RPO breach (health warning) instead.
    ``floor_half_rpo`` is False only to replay histories written before the floor."""
    if policy.continuous:
        return max(MIN_INTERVAL, policy.rpo_seconds)
    expected = p95(cycle_seconds) or 0.0
    floor = policy.rpo_seconds // 2 if floor_half_rpo else 0
    return max(MIN_INTERVAL, floor, int(policy.rpo_seconds - expected))


def health_alert(protection: str, health: Health, reason: str, c: ReplicationCarry,
                 rpo_target: int, now: datetime) -> Alert | None:
    """The alert a change of health calls for, once per transition: ``c.alerted`` (updated
    here) remembers the problem last alerted, so a protection that stays in breach cycle
    after cycle is alerted once, and its recovery once.

    A pause (the operator's own doing), a DR operation (those workflows send their own
    alerts) and one or two failed cycles (FAILED_AFTER is what "repeatedly" means) raise
    no alert and clear none.
    """
    if health == Health.FAILED:
        problem: Literal["rpo_breached", "cycle_failing"] | None = "cycle_failing"
    elif health == Health.HEALTHY:
        problem = None
    elif c.dr_state is None and not c.paused and not c.consecutive_failures:
        problem = "rpo_breached"  # the warnings left are _evaluate_health's two RPO rules
    else:
        return None
    if problem == c.alerted:
        return None
    details = {
        "health": health.value, "reason": reason, "rpo_target_seconds": rpo_target,
        "rpo_last_seconds": c.recent_rpo[-1] if c.recent_rpo else None,
        "last_point_id": c.last_point_id,
        "last_point_instant": c.last_point_instant.isoformat() if c.last_point_instant else None,
        "consecutive_failures": c.consecutive_failures, "last_error": c.last_error,
    }
    if problem == "rpo_breached":
        alert = Alert(
            kind="rpo_breached", protection=protection, severity="warning", at=now, details=details,
            message=f"Protection {protection!r} is not meeting its RPO target of {rpo_target}s "
                    f"({reason}). Run `transcend status {protection}`: if cycles run but take too "
                    "long, raise the RPO or the bandwidth limit, or use continuous mode; if none "
                    "runs, check that a worker is up.")
    elif problem == "cycle_failing":
        alert = Alert(
            kind="cycle_failing", protection=protection, severity="critical", at=now,
            details=details, message=f"Replication of {protection!r} is failing: {reason}. "
                                     "The worker log has each cycle's error.")
    else:
        alert = Alert(
            kind="health_recovered", protection=protection, severity="info", at=now,
            details={**details, "recovered_from": c.alerted},
            message=f"Protection {protection!r} is healthy again ({reason}) after "
                    f"{c.alerted}; no action needed.")
    c.alerted = problem
    return alert


def test_failover_due(policy: ProtectionPolicy, c: ReplicationCarry) -> datetime | None:
    """When the next successful test failover is due: the policy's cadence counted from
    the last successful one (when it became healthy), or from when replication started.
    A failed test failover proves nothing and does not move the due time."""
    if policy.test_failover_every_seconds is None:
        return None
    ok = [r for r in c.test_failovers if r.ok]
    since = (ok[-1].healthy_at or ok[-1].started_at) if ok else c.protected_since
    if since is None:
        return None
    return since + timedelta(seconds=policy.test_failover_every_seconds)


def drill_alert(protection: str, policy: ProtectionPolicy, c: ReplicationCarry,
                now: datetime) -> Alert | None:
    """The test_failover_overdue alert, once per due time (``c.drill_alerted_due``,
    updated here). Not while paused or during a DR operation: a drill then is neither
    possible nor the point."""
    due = test_failover_due(policy, c)
    if due is None or now < due or c.paused or c.dr_state is not None:
        return None
    if c.drill_alerted_due == due:
        return None
    c.drill_alerted_due = due
    last = c.test_failovers[-1] if c.test_failovers else None
    ok = [r for r in c.test_failovers if r.ok]
    every = policy.test_failover_every_seconds
    if ok:
        when = f"since {ok[-1].started_at:%Y-%m-%d %H:%M}Z"
    else:
        when = f"since replication started ({c.protected_since:%Y-%m-%d %H:%M}Z)"
    return Alert(
        kind="test_failover_overdue", protection=protection, severity="warning", at=now,
        message=f"Protection {protection!r} has had no successful test failover {when}; the "
                f"policy asks for one every {every}s. Run `transcend test-failover {protection}` "
                "(it boots the newest point on an isolated network and measures the RTO).",
        details={
            "due_at": due.isoformat(), "test_failover_every_seconds": every,
            "last_test_failover_at": last.started_at.isoformat() if last else None,
            "last_test_failover_ok": last.ok if last else None,
            "last_test_failover_error": last.error if last else "",
            "last_successful_rto_seconds": ok[-1].rto_seconds if ok else None,
        })


@workflow.defn(name=REPLICATION_WORKFLOW)
class ReplicationWorkflow:
    def __init__(self) -> None:
        self._protection = ""
        self._view: ProtectionView | None = None
        self._carry = ReplicationCarry()
        self._outcomes: list[CycleOutcome] = []
        self._events = 0
        self._lock = asyncio.Lock()
        self._removed = False
        self._current_cycle: str | None = None
        self._health = Health.HEALTHY
        self._health_reason = "no cycle yet"
        self._dr_signals: list[DrStateSignal] = []
        self._memo = ""
        self._alerts = AlertQueue()

    # ------------------------------------------------------------------ run

    @workflow.run
    async def run(self, inp: ReplicationInput) -> ReplicationStatus:
        self._protection = inp.protection
        if inp.carry is not None:
            self._carry = inp.carry
            for alert in self._carry.pending_alerts:  # the previous run had not sent them
                self._alerts.put(alert)
            self._carry.pending_alerts = []
        if inp.spec is not None and inp.carry is None:
            if inp.spec.name != inp.protection:
                raise ApplicationError(
                    f"spec.name {inp.spec.name!r} differs from protection {inp.protection!r}",
                    non_retryable=True,
                )
            self._view = await self._register(inp)
        else:
            self._view = await workflow.execute_activity(
                "protection.view", inp.protection, result_type=ProtectionView,
                task_queue=CONTROL_TASK_QUEUE, **SHORT
            )
        if self._carry.protected_since is None:
            self._carry.protected_since = workflow.now()
        self._evaluate_health()
        self._upsert_attributes()
        if inp.carry is None:
            self._carry.interval_seconds = schedule_interval(self._view.policy, [])
            await self._ensure_schedule(trigger_now=self._carry.last_point_id is None)
        while True:
            try:
                await workflow.wait_condition(
                    lambda: bool(self._outcomes) or bool(self._dr_signals) or self._removed
                    or self._should_continue(),
                    timeout=self._next_wakeup(),
                )
            except TimeoutError:
                # No cycle finished within an RPO: re-evaluate health (a stopped worker or
                # a stuck source shows up as an RPO breach here, not only after a cycle).
                self._evaluate_health()
                self._upsert_attributes()
                continue
            async with self._lock:
                while self._dr_signals:
                    await self._on_dr_state(self._dr_signals.pop(0))
                while self._outcomes:
                    await self._on_outcome(self._outcomes.pop(0))
            if self._removed:
                # The catalog and the UI's search attributes say so too: a removed
                # protection is not mistaken for one that silently stopped.
                await workflow.execute_activity(
                    "protection.set_state",
                    StateChange(protection=self._protection, state=ProtectionState.REMOVED,
                                health=self._health, reason="replication removed by the operator"),
                    task_queue=CONTROL_TASK_QUEUE, **SHORT
                )
                self._upsert_attributes()
                # Alerts still being retried get a minute more; then the run ends without them.
                await self._alerts.drained(timeout=timedelta(minutes=1))
                break
            if self._should_continue():
                await workflow.wait_condition(workflow.all_handlers_finished)
                self._carry.pending_alerts = self._alerts.pending()
                workflow.continue_as_new(
                    ReplicationInput(protection=self._protection, carry=self._carry)
                )
        return self.status()

    def _next_wakeup(self) -> timedelta:
        """At least every RPO (health is re-evaluated even when no cycle finishes), and
        when a test failover falls due."""
        wait = timedelta(seconds=self._view_policy().rpo_seconds)
        due = test_failover_due(self._view_policy(), self._carry)
        if due is not None and due > workflow.now():
            wait = min(wait, due - workflow.now() + timedelta(seconds=1))
        return wait

    def _should_continue(self) -> bool:
        return self._events >= MAX_EVENTS_PER_RUN or workflow.info().is_continue_as_new_suggested()

    def _view_policy(self) -> ProtectionPolicy:
        assert self._view is not None
        return self._view.policy

    async def _register(self, inp: ReplicationInput) -> ProtectionView:
        assert inp.spec is not None
        plan: RegisterPlan = await workflow.execute_activity(
            "protection.resolve", inp.spec, result_type=RegisterPlan,
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        workloads: list[Workload] = await workflow.execute_activity(
            "source.describe", plan, result_type=list[Workload],
            task_queue=site_task_queue(plan.source.site), **SHORT
        )
        args = RegisterWorkloads(plan=plan, workloads=workloads)
        await workflow.execute_activity(
            "target.check", args, task_queue=site_task_queue(plan.target.site),
            **SHORT
        )
        view: ProtectionView = await workflow.execute_activity(
            "protection.add", args, result_type=ProtectionView,
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        return view

    async def _ensure_schedule(self, trigger_now: bool = False) -> None:
        assert self._view is not None
        await workflow.execute_activity(
            "schedule.ensure",
            ScheduleInput(
                protection=self._protection,
                interval_seconds=self._carry.interval_seconds,
                paused=self._carry.paused or self._carry.dr_state is not None,
                trigger_now=trigger_now,
                search_attributes={
                    "SOURCE_PLATFORM": self._view.source.name,
                    "TARGET_PLATFORM": self._view.target.name,
                    "SOURCE_KIND": str(self._view.source.kind),
                    "TARGET_KIND": str(self._view.target.kind),
                },
            ),
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )

    # ------------------------------------------------------------------ outcomes

    @workflow.signal(name="cycle_finished")
    def cycle_finished(self, outcome: CycleOutcome) -> None:
        self._outcomes.append(outcome)

    @workflow.signal(name="test_failover_finished")
    def test_failover_finished(self, report: TestFailoverReport) -> None:
        """Kept (the last 20) so the measured RTO of every test is on the protection."""
        self._carry.test_failovers = [*self._carry.test_failovers, report][-20:]
        if self._view is not None:  # the test-failover due time moved: the UI shows it
            self._upsert_attributes()

    @workflow.signal(name="dr_state")
    def dr_state(self, signal: DrStateSignal) -> None:
        """From the Failover/Migration/Failback workflows: what happened to production."""
        self._dr_signals.append(signal)

    async def _on_dr_state(self, signal: DrStateSignal) -> None:
        self._events += 1
        c = self._carry
        returning = c.dr_state is not None and signal.state in (
            ProtectionState.PROTECTING, ProtectionState.PAUSED)
        if signal.state in (ProtectionState.PROTECTING, ProtectionState.PAUSED):
            c.dr_state, c.dr_reason = None, ""
        else:
            c.dr_state, c.dr_reason = signal.state, signal.reason
        self._evaluate_health()
        self._upsert_attributes()
        if returning and not c.paused:
            # Failed back (or a failover undone): the schedule runs again, and a cycle
            # now brings the replica up to date.
            await workflow.execute_activity(
                "schedule.pause", PauseInput(protection=self._protection, paused=False),
                task_queue=CONTROL_TASK_QUEUE, **SHORT
            )
            if signal.reason.startswith("failed back"):
                await workflow.execute_activity(
                    "schedule.trigger", self._protection, task_queue=CONTROL_TASK_QUEUE, **SHORT
                )

    @workflow.signal(name="cycle_started")
    def cycle_started(self, cycle_id: str) -> None:
        self._current_cycle = cycle_id

    async def _on_outcome(self, o: CycleOutcome) -> None:
        self._events += 1
        self._current_cycle = None
        c = self._carry
        if o.status == "committed":
            c.cycles_ok += 1
            c.consecutive_failures = 0
            c.last_point_id = o.point_id
            c.last_point_instant = o.instant
            if o.rpo_seconds is not None:
                c.recent_rpo = [*c.recent_rpo, o.rpo_seconds][-WINDOW:]
            # A full copy (the first cycle, a resync) says nothing about the next
            # incremental one, which the interval is for.
            if o.kind == "incremental" or not workflow.patched(INTERVAL_PATCH):
                c.recent_cycle_seconds = [*c.recent_cycle_seconds, o.wall_seconds][-WINDOW:]
            c.last_error = o.error  # a warning (release or retention failed) or ""
        elif o.status == "failed":
            c.cycles_failed += 1
            c.consecutive_failures += 1
            c.last_error = o.error
        before = (self._health, self._health_reason)
        self._evaluate_health()
        self._upsert_attributes()
        if (self._health, self._health_reason) != before:
            await workflow.execute_activity(
                "protection.set_state",
                StateChange(
                    protection=self._protection,
                    state=ProtectionState.PAUSED if c.paused else ProtectionState.PROTECTING,
                    health=self._health, reason=self._health_reason,
                ),
                task_queue=CONTROL_TASK_QUEUE, **SHORT
            )
        policy = self._view_policy()
        wanted = schedule_interval(policy, c.recent_cycle_seconds,
                                   floor_half_rpo=workflow.patched(INTERVAL_PATCH))
        if abs(wanted - c.interval_seconds) > max(5, c.interval_seconds // 5):
            c.interval_seconds = wanted
            await self._ensure_schedule()
        if policy.continuous and o.status == "committed" and not c.paused and c.dr_state is None:
            await workflow.execute_activity(
                "schedule.trigger", self._protection, task_queue=CONTROL_TASK_QUEUE,
                **SHORT
            )

    def _evaluate_health(self) -> None:
        c = self._carry
        target = self._view_policy().rpo_seconds
        now = workflow.now()
        age = (now - c.last_point_instant).total_seconds() if c.last_point_instant else None
        if c.dr_state is not None:
            # Not replicating on purpose: the DR operation's own status says how it went.
            self._health = Health.WARNING
            self._health_reason = f"{c.dr_state.value}: {c.dr_reason}"
        elif c.paused:
            self._health, self._health_reason = Health.WARNING, "replication paused; resume it"
        elif c.consecutive_failures >= FAILED_AFTER:
            self._health = Health.FAILED
            self._health_reason = (
                f"{c.consecutive_failures} cycles failed in a row; last error: {c.last_error}. "
                "Fix the cause, then `transcend sync` to retry now"
            )
        elif c.consecutive_failures:
            self._health = Health.WARNING
            self._health_reason = f"last cycle failed: {c.last_error}"
        elif c.recent_rpo and c.recent_rpo[-1] > target:
            self._health = Health.WARNING
            self._health_reason = (
                f"RPO {c.recent_rpo[-1]:.0f}s exceeded the target {target}s: cycles take "
                "longer than the RPO allows; raise the RPO, the bandwidth or use continuous mode"
            )
        elif age is not None and age > target * 2 and c.cycles_ok:
            self._health = Health.WARNING
            self._health_reason = f"no new point for {age:.0f}s (RPO target {target}s)"
        elif c.last_point_id is None:
            self._health, self._health_reason = Health.HEALTHY, "waiting for the first point"
        else:
            self._health, self._health_reason = Health.HEALTHY, "within RPO"
        alert = health_alert(self._protection, self._health, self._health_reason, c, target, now)
        if alert is not None:
            self._alerts.put(alert)  # sent in the background: a dead receiver delays nothing
        drill = drill_alert(self._protection, self._view_policy(), c, now)
        if drill is not None:
            self._alerts.put(drill)

    def _upsert_attributes(self) -> None:
        assert self._view is not None
        c = self._carry
        updates: list[SearchAttributeUpdate[Any]] = [
            sa.PROTECTION.value_set(self._protection),
            sa.SOURCE_PLATFORM.value_set(self._view.source.name),
            sa.TARGET_PLATFORM.value_set(self._view.target.name),
            sa.SOURCE_KIND.value_set(str(self._view.source.kind)),
            sa.TARGET_KIND.value_set(str(self._view.target.kind)),
            sa.SITE.value_set(self._view.source.site),
            sa.HEALTH.value_set(self._health.value),
            sa.STATE.value_set(self._state().value),
            sa.RPO_TARGET.value_set(self._view.policy.rpo_seconds),
        ]
        if c.recent_rpo:
            updates.append(sa.RPO_ACHIEVED.value_set(int(c.recent_rpo[-1])))
        if c.last_point_instant:
            updates.append(sa.LAST_POINT.value_set(c.last_point_instant))
        # Only protections with a test-failover cadence carry this attribute: a cluster
        # upgraded without registering it (an unknown attribute fails the workflow task)
        # keeps replicating everything that does not use the feature.
        due = test_failover_due(self._view.policy, c)
        if due is not None:
            updates.append(sa.TEST_FAILOVER_DUE.value_set(due))
        elif workflow.info().typed_search_attributes.get(sa.TEST_FAILOVER_DUE) is not None:
            updates.append(sa.TEST_FAILOVER_DUE.value_unset())
        workflow.upsert_search_attributes(updates)
        summary = self._summary()
        if summary != self._memo:
            # The line the Temporal UI shows for this workflow (memo "summary").
            workflow.upsert_memo({"summary": summary})
            self._memo = summary

    def _summary(self) -> str:
        assert self._view is not None
        c = self._carry
        rpo = f"RPO target {self._view.policy.rpo_seconds}s"
        if c.recent_rpo:
            rpo += f", last {c.recent_rpo[-1]:.0f}s"
        last = (f"last point {c.last_point_instant:%Y-%m-%d %H:%M:%S}Z"
                if c.last_point_instant else "no point yet")
        due = test_failover_due(self._view.policy, c)
        drill = (f"; test failover overdue since {due:%Y-%m-%d %H:%M}Z"
                 if due is not None and workflow.now() >= due else "")
        return (f"{self._view.source.name} -> {self._view.target.name}: {self._state().value}, "
                f"{self._health.value} ({self._health_reason}); {rpo}; {last}; "
                f"cycles {c.cycles_ok} ok / {c.cycles_failed} failed{drill}")

    # ------------------------------------------------------------------ operator API

    def _state(self) -> ProtectionState:
        c = self._carry
        if self._removed:
            return ProtectionState.REMOVED
        if c.dr_state is not None:
            return c.dr_state
        return ProtectionState.PAUSED if c.paused else ProtectionState.PROTECTING

    def _refuse_during_dr(self, what: str) -> None:
        if self._carry.dr_state is not None:
            raise ApplicationError(
                f"cannot {what}: the protection is {self._carry.dr_state.value} "
                f"({self._carry.dr_reason}); fail back first", type="WrongState",
                non_retryable=True)

    @workflow.query
    def status(self) -> ReplicationStatus:
        c = self._carry
        policy = self._view.policy if self._view else None
        due = test_failover_due(policy, c) if policy else None
        return ReplicationStatus(
            protection=self._protection,
            state=self._state(),
            health=self._health,
            health_reason=self._health_reason,
            rpo_target_seconds=policy.rpo_seconds if policy else 0,
            rpo_last_seconds=c.recent_rpo[-1] if c.recent_rpo else None,
            rpo_p95_seconds=p95(c.recent_rpo),
            last_point_id=c.last_point_id,
            last_point_instant=c.last_point_instant,
            cycles_ok=c.cycles_ok,
            cycles_failed=c.cycles_failed,
            schedule_interval_seconds=c.interval_seconds,
            current_cycle=self._current_cycle,
            last_error=c.last_error,
            last_test_failover=c.test_failovers[-1] if c.test_failovers else None,
            test_failover_due_at=due,
            test_failover_overdue=due is not None and workflow.now() >= due,
        )

    @workflow.update(name="pause")
    async def pause(self) -> ReplicationStatus:
        return await self._set_paused(True)

    @workflow.update(name="resume")
    async def resume(self) -> ReplicationStatus:
        return await self._set_paused(False)

    async def _set_paused(self, paused: bool) -> ReplicationStatus:
        await workflow.wait_condition(lambda: self._view is not None)
        self._refuse_during_dr("pause or resume")
        async with self._lock:
            if self._carry.paused != paused:
                await workflow.execute_activity(
                    "schedule.pause", PauseInput(protection=self._protection, paused=paused),
                    task_queue=CONTROL_TASK_QUEUE, **SHORT
                )
                self._carry.paused = paused
                self._evaluate_health()
                await workflow.execute_activity(
                    "protection.set_state",
                    StateChange(
                        protection=self._protection,
                        state=ProtectionState.PAUSED if paused else ProtectionState.PROTECTING,
                        health=self._health, reason=self._health_reason,
                    ),
                    task_queue=CONTROL_TASK_QUEUE, **SHORT
                )
                self._upsert_attributes()
        return self.status()

    @workflow.update(name="set_policy")
    async def set_policy(self, change: PolicyChange) -> ReplicationStatus:
        await workflow.wait_condition(lambda: self._view is not None)
        async with self._lock:
            assert self._view is not None
            await workflow.execute_activity(
                "protection.update_policy",
                PolicyUpdate(protection=self._protection, policy=change.policy),
                task_queue=CONTROL_TASK_QUEUE, **SHORT
            )
            self._view.policy = change.policy
            self._carry.interval_seconds = schedule_interval(
                change.policy, self._carry.recent_cycle_seconds,
                floor_half_rpo=workflow.patched(INTERVAL_PATCH),
            )
            await self._ensure_schedule()
            self._evaluate_health()
            self._upsert_attributes()
        return self.status()

    @workflow.update(name="sync_now")
    async def sync_now(self) -> ReplicationStatus:
        await workflow.wait_condition(lambda: self._view is not None)
        self._refuse_during_dr("sync")
        if self._carry.paused:
            raise ApplicationError("protection is paused; resume it first", non_retryable=True)
        await workflow.execute_activity(
            "schedule.trigger", self._protection, task_queue=CONTROL_TASK_QUEUE,
            **SHORT
        )
        return self.status()

    @workflow.update(name="remove")
    async def remove(self) -> ReplicationStatus:
        """Stop replicating: the schedule is deleted; recovery points stay on the target.
        Allowed when failed over (a migration's cutover), not while a DR operation runs."""
        await workflow.wait_condition(lambda: self._view is not None)
        if self._carry.dr_state in (ProtectionState.FAILING_OVER, ProtectionState.FAILING_BACK):
            self._refuse_during_dr("remove")
        async with self._lock:
            await workflow.execute_activity(
                "schedule.delete", self._protection, task_queue=CONTROL_TASK_QUEUE,
                **SHORT
            )
            self._removed = True
            if workflow.patched(FORGET_PATCH):
                await self._leave_nothing_behind()
        return self.status()

    async def _leave_nothing_behind(self) -> None:
        """After the schedule is gone: no cycle starts any more (the state says removed),
        the running one ends (cancelled while it copies: it aborts its staging and
        releases its freeze), then the source forgets this protection's tracking
        (checkpoints and bitmaps, snapshots) and only this protection's. A failure is
        kept in ``last_error``; removal itself always completes."""
        assert self._view is not None
        await workflow.execute_activity(
            "protection.set_state",
            StateChange(protection=self._protection, state=ProtectionState.REMOVED,
                        health=self._health, reason="replication removed by the operator"),
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        problems = []
        try:
            await workflow.execute_activity(
                "protection.end_cycles", self._protection, result_type=list[str],
                task_queue=CONTROL_TASK_QUEUE, start_to_close_timeout=timedelta(hours=1),
                heartbeat_timeout=SHORT["heartbeat_timeout"], retry_policy=SHORT["retry_policy"],
            )
        except ActivityError as e:
            problems.append(f"ending the running cycle failed: {e.cause or e}")
        try:
            await workflow.execute_activity(
                "source.forget", self._protection, result_type=list[str],
                task_queue=site_task_queue(self._view.source.site), **SHORT
            )
        except ActivityError as e:
            problems.append(f"removing the source's change tracking failed: {e.cause or e}; "
                            "docs/operations.md (\"Removing a protection\") says what it "
                            "leaves and how to remove it by hand")
        if problems:
            self._carry.last_error = "; ".join(problems)
