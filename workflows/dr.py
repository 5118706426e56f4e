"""Failover, migration and failback of a protection (``failover/<p>``, ``failback/<p>``).

Failover (unplanned): lock the protection (state FAILING_OVER), stop its schedule
and wait for a running cycle, replicate once more if the source still answers,
shut the source down, boot the chosen point as the production VM at the target
with change tracking started before its first instruction, record the failover
(state FAILED_OVER). Migration (planned) shuts the source down cleanly *first*, so
the final cycle holds every write the guest made. Until the production VM is
booted, a failure undoes everything (state, schedule, source power); after it,
the failover stands and a failed health check is reported, not rolled back.

A consistency group (a protection of several VMs) fails over in its boot order:
tiers one after the other, the VMs of a tier together, each a ``ProductionVm``
child workflow (boot + its health check); its sources shut down in the reverse
order. The failover stands from the first production boot: a later tier that fails
leaves the VMs that booted running and the protection failed over, for the operator
to fix or fail back.

Failback: sync the failed-over VM into the original VM's own disks (the first pass
writes the union of both sides' changes since the point), optionally repeat until
the ``migrate`` signal, then shut the failed-over VM down, a final pass, compare,
start the original and hand the protection back to replication.

Deterministic: no I/O, clock or randomness but Temporal's.
"""

from __future__ import annotations

import asyncio
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
        PRODUCTION_VM_WORKFLOW,
        BootTier,
        CycleInput,
        CycleOutcome,
        DestroyInput,
        DrStateSignal,
        FailbackFinishInput,
        FailbackHashes,
        FailbackInput,
        FailbackPass,
        FailbackReleaseInput,
        FailbackServed,
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
        ProductionVmInput,
        ProtectionView,
        RecoveredVm,
        SourcePower,
        TestFailoverInput,
        cycle_id_prefix,
        replication_id,
    )
    from transcend.config import site_task_queue
    from transcend.models import Instance, ProtectionState, RecoveryPoint
    from workflows.cycle import HEARTBEAT, NON_RETRYABLE, SHORT, STREAM, _cause, record_rto
    from workflows.failover import BOOT, wait_healthy
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


class _Unhealthy(RecoveredVm):
    """A VM that booted as production but failed its health check (workflow-internal)."""

    error: str = ""


def _failure_type(e: ChildWorkflowError) -> str:
    cause = e.cause
    return cause.type or "" if isinstance(cause, ApplicationError) else ""


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
                          if st.phase == "failed" and not st.vms else
                          "Production runs at the target; check the VM and its health check."),
                       st.model_dump(mode="json"))
            await self._alerts.drained(timeout=ALERT_GRACE)
            raise
        vm = ", ".join(v.instance.name for v in st.vms) or "?"
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
        was_running: list[str] = []  # source VMs this failover shut down (platform ids)
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
                errors = await self._shutdown_sources(inp, plan, source_q, was_running)
                if errors:
                    raise ApplicationError("; ".join(errors), type="ShutdownFailed",
                                           non_retryable=True)
            if inp.planned or inp.final_cycle:
                st.phase = "final-cycle"
                st.final_cycle = await self._final_cycle(p, required=inp.planned)
            if not inp.planned and inp.shutdown_source:
                st.phase = "shutdown-source"
                # A disaster: the source site may be gone. The failover goes on; the
                # operator sees why a source could not be stopped.
                errors = await self._shutdown_sources(inp, plan, source_q, was_running)
                if errors:
                    st.error = "could not shut the source down: " + "; ".join(errors)
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
            booted = await self._boot_tiers(inp, plan, point, was_running, target_q)
        except (ActivityError, ChildWorkflowError, ApplicationError) as e:
            cause = _cause(e)
            record: FailoverRecord | None = await workflow.execute_activity(
                "failover.record", p, result_type=FailoverRecord | None,  # type: ignore[arg-type]
                task_queue=CONTROL_TASK_QUEUE, **UNDO)
            if record is not None:
                # Some VM booted as production: the failover stands (see the module doc).
                up = {v.vm for v in record.vms}
                st.error = (f"failed over part of the group: {cause}. Running at the target: "
                            f"{', '.join(v.instance.name for v in record.vms)}; not booted: "
                            f"{', '.join(vm for vm in plan.names if vm not in up)}."
                            f" Fix the cause and boot the rest with `transcend boot`, or bring "
                            f"everything home with `transcend failback {p}`")
                await _tell_replication(p, S.FAILED_OVER, st.error)
                st.phase = "failed"
                raise ApplicationError(st.error, type="GroupFailoverIncomplete",
                                       non_retryable=True) from e
            st.phase = "compensating"
            st.error = cause
            await workflow.execute_activity(
                "failover.abort",
                FailoverAbort(protection=p, previous_state=plan.previous_state,
                              restart_vms=was_running),
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
        names = ", ".join(v.instance.name for v in booted)
        await _tell_replication(p, S.FAILED_OVER,
                                f"failed over to {plan.target.name} as {names} from point {point.id}")
        unhealthy = [v for v in booted if isinstance(v, _Unhealthy)]
        if unhealthy:
            st.error = "failed over, but the health check failed: " + "; ".join(
                f"{v.instance.name}: {v.error}" for v in unhealthy)
            st.phase = "failed"
            raise ApplicationError(st.error, type="HealthCheckFailed", non_retryable=True)
        st.rto_seconds = (max(v.healthy_at for v in st.vms) - started).total_seconds()
        await record_rto(p, st.rto_seconds)
        if any(step.when == "after-boot" for step in inp.runbook):
            st.phase = "runbook"
            stop = await run_steps(inp.runbook, "after-boot", protection=p, operation=what,
                                   point_id=point.id, vms=[v.instance.name for v in st.vms],
                                   queue=target_q, results=st.steps)
            if stop:
                st.error = f"failed over, but {stop}"
                st.phase = "failed"
                raise ApplicationError(st.error, type="RunbookFailed", non_retryable=True)
        st.phase = "done"
        return st

    async def _shutdown_sources(self, inp: FailoverInput, plan: FailoverPlan, queue: str,
                                was_running: list[str]) -> list[str]:
        """Shut the source VMs down, last boot tier first, a tier's VMs together; the
        ones that were running are added to ``was_running``. Returns what failed."""
        errors: list[str] = []
        for tier in reversed(plan.tiers):
            refs = [plan.workload(vm).ref.id for vm in tier.vms]
            results = await asyncio.gather(*[
                workflow.execute_activity(
                    "source.power_off",
                    SourcePower(platform=plan.source.name, vm=ref,
                                timeout_seconds=inp.shutdown_timeout_seconds,
                                force=inp.force_off and not inp.planned),
                    result_type=bool, task_queue=queue, **_power(inp.shutdown_timeout_seconds))
                for ref in refs], return_exceptions=True)
            for vm, ref, r in zip(tier.vms, refs, results, strict=True):
                if isinstance(r, BaseException):
                    errors.append(f"{vm}: {_cause(r)}")
                elif r and ref not in was_running:
                    was_running.append(ref)
            if errors and inp.planned:
                break  # a migration stops at once; it is undone
        return errors

    async def _boot_tiers(self, inp: FailoverInput, plan: FailoverPlan, point: RecoveryPoint,
                          was_running: list[str], target_q: str) -> list[RecoveredVm]:
        """Boot the point's VMs as production in the boot order: a tier's VMs together
        (child workflows), the next tier once all of them passed their health check and
        the tier's delay passed. A failed boot raises; a failed health check stops the
        boot order and is returned as an ``_Unhealthy`` entry (the VM runs)."""
        st = self._status
        booted: list[RecoveredVm] = []
        for i, tier in enumerate(plan.tiers):
            st.tier = i
            results = await asyncio.gather(*[
                self._production_vm(inp, plan, point, vm, tier, was_running, target_q)
                for vm in tier.vms], return_exceptions=True)
            failed: BaseException | None = None
            for r in results:
                if isinstance(r, RecoveredVm):
                    booted.append(r)
                    if not isinstance(r, _Unhealthy):
                        st.vms.append(r)
                    if st.instance is None:
                        st.instance = r.instance
                elif failed is None:
                    failed = r
            if failed is not None:
                raise failed
            if any(isinstance(r, _Unhealthy) for r in results):
                break  # the next tier waits for this one's health: it never boots
            if tier.delay_seconds and i + 1 < len(plan.tiers):
                await workflow.sleep(tier.delay_seconds)
        return booted

    async def _production_vm(self, inp: FailoverInput, plan: FailoverPlan, point: RecoveryPoint,
                             vm: str, tier: BootTier, was_running: list[str],
                             target_q: str) -> RecoveredVm:
        ref = plan.workload(vm).ref.id
        try:
            result: RecoveredVm = await workflow.execute_child_workflow(
                PRODUCTION_VM_WORKFLOW,
                ProductionVmInput(
                    boot=ProductionBoot(protection=inp.protection, point_id=point.id, vm=vm,
                                        name=plan.names[vm], network=inp.network,
                                        planned=inp.planned, final_cycle=self._status.final_cycle,
                                        source_was_running=ref in was_running,
                                        convert=inp.convert, reip=inp.reip),
                    health=tier.health or inp.health, target_queue=target_q),
                id=f"{workflow.info().workflow_id}/{vm}", result_type=RecoveredVm)
        except ChildWorkflowError as e:
            if _failure_type(e) != "HealthCheckFailed":
                raise
            # Booted (it is in the failover record) but not healthy: the VM runs.
            record: FailoverRecord | None = await workflow.execute_activity(
                "failover.record", inp.protection, result_type=FailoverRecord | None,  # type: ignore[arg-type]
                task_queue=CONTROL_TASK_QUEUE, **UNDO)
            mine = next((v for v in record.vms if v.vm == vm), None) if record else None
            if mine is None:
                raise
            return _Unhealthy(vm=vm, instance=mine.instance, booted_at=workflow.now(),
                              healthy_at=workflow.now(), error=_cause(e))
        return result

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


@workflow.defn(name=PRODUCTION_VM_WORKFLOW)
class ProductionVmWorkflow:
    """Boot one VM of a failover as production and wait for its health check (a child
    of Failover/Migration; its ID is ``<parent ID>/<VM>``)."""

    @workflow.run
    async def run(self, inp: ProductionVmInput) -> RecoveredVm:
        instance: Instance = await workflow.execute_activity(
            "failover.boot", inp.boot, result_type=Instance, task_queue=inp.target_queue,
            **BOOT)
        booted_at = healthy_at = workflow.now()
        if inp.health.kind != "none":
            try:
                healthy_at = await wait_healthy(instance, inp.health, inp.target_queue)
            except ActivityError as e:
                raise ApplicationError(f"{instance.name}: {_cause(e)}", type="HealthCheckFailed",
                                       non_retryable=True) from e
        return RecoveredVm(vm=inp.boot.vm, instance=instance, booted_at=booted_at,
                           healthy_at=healthy_at)


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
        self._target_q = ""
        self._between_sites = False

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
        # Original and failed-over VM on different sites: no worker reaches both, so a
        # pass, the verify and the finish are split by site (activities/failback_sites.py).
        self._target_q = target_q
        self._between_sites = view.source.site != view.target.site
        stopped: list[str] = []  # failed-over VMs this failback shut down (platform ids)
        try:
            st.phase = "syncing"
            # The originals diverged: whatever they wrote after the point is replaced.
            await self._power_off_all(view.source.name, [v.source_vm for v in reversed(record.vms)],
                                      inp, source_q, [])
            await self._passes(record, False, source_q)
            while not (inp.migrate_now or self._migrate):
                st.phase = "waiting"
                try:
                    await workflow.wait_condition(
                        lambda: self._migrate,
                        timeout=timedelta(seconds=inp.sync_interval_seconds))
                except TimeoutError:
                    st.phase = "syncing"
                    await self._passes(record, False, source_q)
            st.phase = "shutdown-failed-over"
            # Last booted first, like the failover's shutdown of the sources.
            await self._power_off_all(view.target.name,
                                      [v.instance.id for v in reversed(record.vms)], inp,
                                      target_q, stopped)
            st.phase = "final-sync"
            await self._passes(record, True, source_q)
            if inp.verify:
                st.phase = "verify"
                v = await self._verify(p, source_q)
                if not v.identical:
                    raise ApplicationError(
                        f"after the final pass the disks differ: {v.detail}",
                        type="FailbackVerifyFailed", non_retryable=True)
        except (ActivityError, ApplicationError) as e:
            st.error = _cause(e)
            for ref in reversed(stopped):
                await workflow.execute_activity(
                    "source.power_on", SourcePower(platform=view.target.name, vm=ref),
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
        keep = inp.keep_failed_over
        if self._between_sites and not keep:
            # The failed-over VMs are removed at their own site first (idempotent).
            for fv in reversed(record.vms):
                await workflow.execute_activity(
                    "instance.destroy", DestroyInput(point_id=record.point_id, instance=fv.instance),
                    task_queue=target_q, **UNDO)
            keep = True
        await workflow.execute_activity(
            "failback.finish",
            FailbackFinishInput(protection=p, start_original=inp.start_original,
                                keep_failed_over=keep),
            task_queue=source_q, **UNDO)
        await _tell_replication(p, S.PROTECTING, "failed back; replication resumed")
        st.phase = "done"
        return st

    async def _power_off_all(self, platform: str, refs: list[str], inp: FailbackInput, queue: str,
                             stopped: list[str]) -> None:
        """Shut VMs down cleanly (never forced), one after the other; those that were
        running are added to ``stopped`` as they stop, so an undo starts exactly them."""
        for ref in refs:
            if await workflow.execute_activity(
                    "source.power_off",
                    SourcePower(platform=platform, vm=ref,
                                timeout_seconds=inp.shutdown_timeout_seconds, force=False),
                    result_type=bool, task_queue=queue, **_power(inp.shutdown_timeout_seconds)):
                stopped.append(ref)

    async def _passes(self, record: FailoverRecord, final: bool, queue: str) -> None:
        """One pass for every failed-over VM (a group's one after the other)."""
        for v in record.vms:
            await self._pass(record.protection, v.vm, final, queue)

    async def _verify(self, p: str, source_q: str) -> FailbackVerify:
        if not self._between_sites:
            v: FailbackVerify = await workflow.execute_activity(
                "failback.verify", p, result_type=FailbackVerify, task_queue=source_q, **STREAM)
            return v
        original, failed_over = await asyncio.gather(
            workflow.execute_activity("failback.hashes", args=[p, "original"],
                                      result_type=FailbackHashes, task_queue=source_q, **STREAM),
            workflow.execute_activity("failback.hashes", args=[p, "failed-over"],
                                      result_type=FailbackHashes, task_queue=self._target_q,
                                      **STREAM))
        diffs = original.differences(failed_over)
        disks = sum(len(d) for d in original.disks.values())
        return FailbackVerify(protection=p, identical=not diffs,
                              detail="; ".join(diffs) or f"{disks} disk(s) identical")

    async def _pass(self, protection: str, vm: str, final: bool, queue: str) -> None:
        sync = FailbackSyncInput(protection=protection, vm=vm, final=final)
        if self._between_sites:
            result = await self._pass_between_sites(sync, queue)
        else:
            result = await workflow.execute_activity(
                "failback.sync", sync, result_type=FailbackPass, task_queue=queue, **STREAM)
        self._status.passes.append(result)
        self._status.bytes_written += result.bytes_written + result.bytes_zeroed

    async def _pass_between_sites(self, sync: FailbackSyncInput, source_q: str) -> FailbackPass:
        """Serve the failed-over VM at the target site, copy at the source site, release
        at the target site (keeping the new checkpoint only if the copy was recorded)."""
        served: FailbackServed = await workflow.execute_activity(
            "failback.serve", sync, result_type=FailbackServed, task_queue=self._target_q,
            **SHORT)
        try:
            result: FailbackPass = await workflow.execute_activity(
                "failback.pull", served, result_type=FailbackPass, task_queue=source_q,
                **STREAM)
        except ActivityError:
            await workflow.execute_activity(
                "failback.release", FailbackReleaseInput(served=served, committed=False),
                task_queue=self._target_q, **UNDO)
            raise
        await workflow.execute_activity(
            "failback.release", FailbackReleaseInput(served=served, committed=True),
            task_queue=self._target_q, **UNDO)
        return result
