"""Failover, migration and failback of a protection (``failover/<p>``, ``failback/<p>``).

Failover (unplanned): lock the protection (state FAILING_OVER), stop its schedule
and wait for a running cycle, replicate once more if the source still answers,
shut the source down, boot the chosen point as the production VM at the target
with change tracking started before its first instruction, record the failover
(state FAILED_OVER). Migration (planned) shuts the source down cleanly *first*, so
the final cycle holds every write the guest made. Until the production VM is
booted, a failure undoes everything (state, schedule, source power); after it,
the failover stands and a failed health check is reported, not rolled back.

Failback: sync the failed-over VM into the original VM's own disks (the first pass
writes the union of both sides' changes since the point), optionally repeat until
the ``migrate`` signal, then shut the failed-over VM down, a final pass, compare,
start the original and hand the protection back to replication.

Deterministic: no I/O, clock or randomness but Temporal's.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from transcend.alerts import Alert
    from transcend.api import (
        CONTROL_TASK_QUEUE,
        CYCLE_WORKFLOW,
        FAILBACK_WORKFLOW,
        FAILOVER_WORKFLOW,
        MIGRATION_WORKFLOW,
        CycleInput,
        CycleOutcome,
        DrStateSignal,
        FailbackFinishInput,
        FailbackInput,
        FailbackPass,
        FailbackStatus,
        FailbackSyncInput,
        FailbackVerify,
        FailoverAbort,
        FailoverInput,
        FailoverPlan,
        FailoverRecord,
        FailoverStatus,
        PauseInput,
        ProductionBoot,
        ProtectionView,
        SourcePower,
        TestFailoverInput,
        cycle_id_prefix,
        replication_id,
    )
    from transcend.config import site_task_queue
    from transcend.models import Instance, ProtectionState, RecoveryPoint
    from workflows.cycle import HEARTBEAT, NON_RETRYABLE, SHORT, STREAM, _cause, record_rto
    from workflows.failover import wait_healthy
    from workflows.notify import AlertQueue
    from workflows.runbook import run_steps

S = ProtectionState
WRONG_STATE = [*NON_RETRYABLE, "WrongState"]
CHECK: dict[str, Any] = {**SHORT, "retry_policy": RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
    maximum_attempts=8, non_retryable_error_types=WRONG_STATE)}
# Undo steps: retried for long, a compensation that gives up leaves a half-done state.
UNDO: dict[str, Any] = dict(
    start_to_close_timeout=timedelta(minutes=5), heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                             maximum_interval=timedelta(seconds=30), maximum_attempts=50,
                             non_retryable_error_types=NON_RETRYABLE))


def _power(timeout_seconds: int) -> dict[str, Any]:
    return dict(start_to_close_timeout=timedelta(seconds=timeout_seconds + 120),
                heartbeat_timeout=HEARTBEAT, retry_policy=SHORT["retry_policy"])


async def _tell_replication(protection: str, state: ProtectionState, reason: str) -> None:
    try:
        await workflow.get_external_workflow_handle(replication_id(protection)).signal(
            "dr_state", DrStateSignal(state=state, reason=reason))
    except ApplicationError:
        workflow.logger.warning("replication workflow of %s not running", protection)


ALERT_GRACE = timedelta(minutes=1)  # alerts still retried when the operation ends


def _alert(queue: AlertQueue, kind: str, protection: str, severity: str, message: str,
           details: dict[str, Any]) -> None:
    queue.put(Alert.model_validate({
        "kind": kind, "protection": protection, "severity": severity, "message": message,
        "at": workflow.now(), "details": details}))


class _Failover:
    def __init__(self) -> None:
        self._status = FailoverStatus(protection="")
        self._alerts = AlertQueue()

    async def _run_alerted(self, inp: FailoverInput) -> FailoverStatus:
        """``_run`` with alerts when it starts (after the checks) and when it ends."""
        what = "migration" if inp.planned else "failover"
        try:
            st = await self._run(inp)
        except Exception:
            st = self._status
            if st.phase != "checking":  # a refused request is the caller's answer, no alert
                _alert(self._alerts, "failover_finished", inp.protection, "critical",
                       f"{what} of {inp.protection!r} failed: {st.error}. "
                       + ("It was undone; production still runs at the source."
                          if st.phase == "failed" and st.instance is None else
                          "Production runs at the target; check the VM and its health check."),
                       st.model_dump(mode="json"))
            await self._alerts.drained(timeout=ALERT_GRACE)
            raise
        vm = st.instance.name if st.instance else "?"
        _alert(self._alerts, "failover_finished", inp.protection, "info",
               f"{what} of {inp.protection!r} finished: production runs as {vm} from point "
               f"{st.point_id}, RTO {st.rto_seconds:.0f}s. Fail back with "
               f"`transcend failback {inp.protection}`.", st.model_dump(mode="json"))
        await self._alerts.drained(timeout=ALERT_GRACE)
        return st

    async def _run(self, inp: FailoverInput) -> FailoverStatus:
        st = self._status
        st.protection, st.planned = inp.protection, inp.planned
        st.started_at = started = workflow.now()
        p = inp.protection
        plan: FailoverPlan = await workflow.execute_activity(
            "failover.check", inp, result_type=FailoverPlan, task_queue=CONTROL_TASK_QUEUE,
            **CHECK)
        what = "migration" if inp.planned else "failover"
        st.phase = "pausing"
        await _tell_replication(p, S.FAILING_OVER, f"{what} running ({workflow.info().workflow_id})")
        _alert(self._alerts, "failover_started", p, "warning",
               f"{what} of {p!r} to {plan.target.name} started "
               f"({workflow.info().workflow_id}); replication is stopped meanwhile.",
               {"workflow_id": workflow.info().workflow_id, "planned": inp.planned})
        source_q = site_task_queue(plan.source.site)
        target_q = site_task_queue(plan.target.site)
        power = SourcePower(platform=plan.source.name, vm=plan.workload.ref.id,
                            timeout_seconds=inp.shutdown_timeout_seconds,
                            force=inp.force_off and not inp.planned)
        source_was_running = False
        try:
            st.phase = "pausing"
            await workflow.execute_activity(
                "schedule.pause", PauseInput(protection=p, paused=True),
                task_queue=CONTROL_TASK_QUEUE, **SHORT)
            await workflow.execute_activity(
                "schedule.wait_idle", p, task_queue=CONTROL_TASK_QUEUE,
                start_to_close_timeout=timedelta(hours=24), heartbeat_timeout=HEARTBEAT,
                retry_policy=SHORT["retry_policy"])
            if inp.planned:
                st.phase = "shutdown-source"
                source_was_running = await workflow.execute_activity(
                    "source.power_off", power, result_type=bool, task_queue=source_q,
                    **_power(inp.shutdown_timeout_seconds))
            if inp.planned or inp.final_cycle:
                st.phase = "final-cycle"
                st.final_cycle = await self._final_cycle(p, required=inp.planned)
            if not inp.planned and inp.shutdown_source:
                st.phase = "shutdown-source"
                try:
                    source_was_running = await workflow.execute_activity(
                        "source.power_off", power, result_type=bool, task_queue=source_q,
                        **_power(inp.shutdown_timeout_seconds))
                except ActivityError as e:
                    # A disaster: the source site may be gone. The failover goes on; the
                    # operator sees why the source could not be stopped.
                    st.error = f"could not shut the source down: {_cause(e)}"
            point: RecoveryPoint = await workflow.execute_activity(
                "failover.choose_point",
                TestFailoverInput(protection=p, point_id=inp.point_id),
                result_type=RecoveryPoint, task_queue=CONTROL_TASK_QUEUE, **SHORT)
            st.point_id = point.id
            if any(step.when == "before-boot" for step in inp.runbook):
                st.phase = "runbook"
                stop = await run_steps(inp.runbook, "before-boot", protection=p, operation=what,
                                       point_id=point.id, vms=[], queue=target_q,
                                       results=st.steps)
                if stop:
                    raise ApplicationError(stop, type="RunbookFailed", non_retryable=True)
            st.phase = "booting"
            instance: Instance = await workflow.execute_activity(
                "failover.boot",
                ProductionBoot(protection=p, point_id=point.id, name=plan.name,
                               network=inp.network, planned=inp.planned,
                               final_cycle=st.final_cycle, source_was_running=source_was_running),
                result_type=Instance, task_queue=target_q, **SHORT)
        except (ActivityError, ChildWorkflowError, ApplicationError) as e:
            st.phase = "compensating"
            st.error = _cause(e)
            await workflow.execute_activity(
                "failover.abort",
                FailoverAbort(protection=p, previous_state=plan.previous_state,
                              restart_source=source_was_running),
                task_queue=source_q, **UNDO)
            if plan.previous_state == S.PROTECTING:
                await workflow.execute_activity(
                    "schedule.pause", PauseInput(protection=p, paused=False),
                    task_queue=CONTROL_TASK_QUEUE, **UNDO)
            await _tell_replication(p, plan.previous_state, f"{what} failed: {st.error}")
            st.phase = "failed"
            raise ApplicationError(
                f"{what} of {p} failed and was undone (source, schedule and state as before): "
                f"{st.error}", type="FailoverFailed", non_retryable=True) from e
        st.instance = instance
        await _tell_replication(p, S.FAILED_OVER,
                                f"failed over to {plan.target.name} as {instance.name} "
                                f"from point {point.id}")
        st.phase = "health-check"
        healthy_at = workflow.now()
        if inp.health.kind != "none":
            try:
                healthy_at = await wait_healthy(instance, inp.health, target_q)
            except ActivityError as e:
                st.error = f"failed over, but the health check failed: {_cause(e)}"
                st.phase = "failed"
                raise ApplicationError(st.error, type="HealthCheckFailed", non_retryable=True) from e
        st.rto_seconds = (healthy_at - started).total_seconds()
        await record_rto(p, st.rto_seconds)
        if any(step.when == "after-boot" for step in inp.runbook):
            st.phase = "runbook"
            stop = await run_steps(inp.runbook, "after-boot", protection=p, operation=what,
                                   point_id=point.id, vms=[instance.name], queue=target_q,
                                   results=st.steps)
            if stop:
                st.error = f"failed over, but {stop}"
                st.phase = "failed"
                raise ApplicationError(st.error, type="RunbookFailed", non_retryable=True)
        st.phase = "done"
        return st

    async def _final_cycle(self, protection: str, *, required: bool) -> str:
        try:
            outcome: CycleOutcome = await workflow.execute_child_workflow(
                CYCLE_WORKFLOW, CycleInput(protection=protection, final=True),
                id=f"{cycle_id_prefix(protection)}-final-{workflow.info().run_id}",
                task_queue=CONTROL_TASK_QUEUE, result_type=CycleOutcome)
        except ChildWorkflowError as e:
            if required:
                raise ApplicationError(f"the final cycle failed: {_cause(e)}",
                                       type="FinalCycleFailed", non_retryable=True) from e
            return f"failed ({_cause(e)}); the newest earlier point is recovered"
        if outcome.status != "committed":
            if required:
                raise ApplicationError(f"the final cycle did not commit: {outcome.status} "
                                       f"{outcome.error}", type="FinalCycleFailed",
                                       non_retryable=True)
            return f"{outcome.status} ({outcome.error})"
        return f"committed point {outcome.point_id}"


@workflow.defn(name=FAILOVER_WORKFLOW)
class FailoverWorkflow(_Failover):
    @workflow.query(name="progress")
    def progress(self) -> FailoverStatus:
        return self._status

    @workflow.run
    async def run(self, inp: FailoverInput) -> FailoverStatus:
        return await self._run_alerted(inp.model_copy(update={"planned": False}))


@workflow.defn(name=MIGRATION_WORKFLOW)
class MigrationWorkflow(_Failover):
    @workflow.query(name="progress")
    def progress(self) -> FailoverStatus:
        return self._status

    @workflow.run
    async def run(self, inp: FailoverInput) -> FailoverStatus:
        return await self._run_alerted(inp.model_copy(update={"planned": True, "final_cycle": True,
                                                      "shutdown_source": True,
                                                      "point_id": None}))


@workflow.defn(name=FAILBACK_WORKFLOW)
class FailbackWorkflow:
    def __init__(self) -> None:
        self._status = FailbackStatus(protection="")
        self._migrate = False
        self._alerts = AlertQueue()

    @workflow.query(name="progress")
    def progress(self) -> FailbackStatus:
        return self._status

    @workflow.signal(name="migrate")
    def migrate(self) -> None:
        """Stop syncing: shut the failed-over VM down and migrate back now."""
        self._migrate = True

    @workflow.run
    async def run(self, inp: FailbackInput) -> FailbackStatus:
        try:
            st = await self._run(inp)
        except Exception:
            if self._status.phase not in ("checking",):
                _alert(self._alerts, "failback_finished", inp.protection, "critical",
                       f"failback of {inp.protection!r} failed: {self._status.error}. Production "
                       "still runs at the target.", self._status.model_dump(mode="json"))
            await self._alerts.drained(timeout=ALERT_GRACE)
            raise
        _alert(self._alerts, "failback_finished", inp.protection, "info",
               f"failback of {inp.protection!r} finished: "
               f"{st.bytes_written / 2**20:.1f} MiB written back in {len(st.passes)} pass(es); "
               "replication resumed.", st.model_dump(mode="json"))
        await self._alerts.drained(timeout=ALERT_GRACE)
        return st

    async def _run(self, inp: FailbackInput) -> FailbackStatus:
        st = self._status
        p = st.protection = inp.protection
        record: FailoverRecord = await workflow.execute_activity(
            "failback.check", inp, result_type=FailoverRecord, task_queue=CONTROL_TASK_QUEUE,
            **CHECK)
        await _tell_replication(p, S.FAILING_BACK, f"failback running ({workflow.info().workflow_id})")
        view: ProtectionView = await workflow.execute_activity(
            "protection.view", p, result_type=ProtectionView, task_queue=CONTROL_TASK_QUEUE,
            **SHORT)
        source_q = site_task_queue(view.source.site)
        target_q = site_task_queue(view.target.site)
        failed_over_stopped = False
        try:
            st.phase = "syncing"
            await workflow.execute_activity(
                "source.power_off",
                SourcePower(platform=view.source.name, vm=record.source_vm,
                            timeout_seconds=inp.shutdown_timeout_seconds, force=False),
                result_type=bool, task_queue=source_q, **_power(inp.shutdown_timeout_seconds))
            await self._pass(p, False, source_q)
            while not (inp.migrate_now or self._migrate):
                st.phase = "waiting"
                try:
                    await workflow.wait_condition(
                        lambda: self._migrate,
                        timeout=timedelta(seconds=inp.sync_interval_seconds))
                except TimeoutError:
                    st.phase = "syncing"
                    await self._pass(p, False, source_q)
            st.phase = "shutdown-failed-over"
            failed_over_stopped = await workflow.execute_activity(
                "source.power_off",
                SourcePower(platform=view.target.name, vm=record.instance.id,
                            timeout_seconds=inp.shutdown_timeout_seconds, force=False),
                result_type=bool, task_queue=target_q, **_power(inp.shutdown_timeout_seconds))
            st.phase = "final-sync"
            await self._pass(p, True, source_q)
            if inp.verify:
                st.phase = "verify"
                v: FailbackVerify = await workflow.execute_activity(
                    "failback.verify", p, result_type=FailbackVerify, task_queue=source_q,
                    **STREAM)
                if not v.identical:
                    raise ApplicationError(
                        f"after the final pass the disks differ: {v.detail}",
                        type="FailbackVerifyFailed", non_retryable=True)
        except (ActivityError, ApplicationError) as e:
            st.error = _cause(e)
            if failed_over_stopped:
                await workflow.execute_activity(
                    "source.power_on",
                    SourcePower(platform=view.target.name, vm=record.instance.id),
                    task_queue=target_q, **UNDO)
            await workflow.execute_activity("failback.abort", p, task_queue=CONTROL_TASK_QUEUE,
                                            **UNDO)
            await _tell_replication(p, S.FAILED_OVER, f"failback failed: {st.error}")
            st.phase = "failed"
            raise ApplicationError(
                f"failback of {p} failed; production still runs at the target: {st.error}",
                type="FailbackFailed", non_retryable=True) from e
        # Past the final pass: only finishing remains, retried until it is done.
        st.phase = "restoring"
        await workflow.execute_activity(
            "failback.finish",
            FailbackFinishInput(protection=p, start_original=inp.start_original,
                                keep_failed_over=inp.keep_failed_over),
            task_queue=source_q, **UNDO)
        await _tell_replication(p, S.PROTECTING, "failed back; replication resumed")
        st.phase = "done"
        return st

    async def _pass(self, protection: str, final: bool, queue: str) -> None:
        result: FailbackPass = await workflow.execute_activity(
            "failback.sync", FailbackSyncInput(protection=protection, final=final),
            result_type=FailbackPass, task_queue=queue, **STREAM)
        self._status.passes.append(result)
        self._status.bytes_written += result.bytes_written + result.bytes_zeroed
