"""Test failover: recover a point as a throw-away VM, prove it healthy, measure the RTO,
keep it for the operator, then clean up. Replication goes on meanwhile: the point is
only ever read (the VM runs on an overlay) and retention skips it while it is in use.

Deterministic: no I/O, clock or randomness but Temporal's.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from transcend.api import (
        CONTROL_TASK_QUEUE,
        RECOVER_VM_WORKFLOW,
        TEST_FAILOVER_WORKFLOW,
        BootInput,
        BootResult,
        BootTier,
        DestroyInput,
        HealthCheck,
        HealthInput,
        RecoveredVm,
        RecoverVmInput,
        TestFailoverInput,
        TestFailoverReport,
        TestFailoverStatus,
        replication_id,
    )
    from transcend.config import site_task_queue
    from transcend.models import Instance, PlatformInfo, RecoveryPoint
    from workflows.cycle import CLEANUP, HEARTBEAT, NON_RETRYABLE, SHORT, _cause, record_rto
    from workflows.runbook import run_steps


# A boot may convert the guest (virt-v2v-in-place) before starting it: minutes for a
# real guest. The activity heartbeats meanwhile (in_thread), so a dead worker is still
# noticed within the heartbeat timeout.
BOOT: dict[str, Any] = {**SHORT, "start_to_close_timeout": timedelta(hours=1)}


async def wait_healthy(instance: Instance, health: HealthCheck, queue: str) -> datetime:
    """When ``instance`` passed its health check (``instance.health`` at its site)."""
    healthy_at: datetime = await workflow.execute_activity(
        "instance.health", HealthInput(instance=instance, health=health),
        result_type=datetime, task_queue=queue,
        start_to_close_timeout=timedelta(seconds=health.timeout_seconds + 60),
        heartbeat_timeout=HEARTBEAT,
        retry_policy=RetryPolicy(maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE),
    )
    return healthy_at


@workflow.defn(name=RECOVER_VM_WORKFLOW)
class RecoverVmWorkflow:
    """Boot one VM of a point and wait for its health check (a child of a test failover;
    one per VM so a group's VMs show, retry and fail separately in the UI)."""

    @workflow.run
    async def run(self, inp: RecoverVmInput) -> RecoveredVm:
        boot: BootResult = await workflow.execute_activity(
            "point.boot",
            BootInput(point_id=inp.point_id, name=inp.name, network=inp.network,
                      isolated=inp.isolated, vm=inp.vm, convert=inp.convert, reip=inp.reip),
            result_type=BootResult, task_queue=inp.target_queue, **BOOT
        )
        booted_at = workflow.now()
        instance = Instance(platform=inp.target_platform, id=boot.instance_id, name=boot.name,
                            console_log=boot.console_log, prepared=boot.prepared)
        healthy_at = await wait_healthy(instance, inp.health, inp.target_queue)
        return RecoveredVm(vm=inp.vm, instance=instance, booted_at=booted_at, healthy_at=healthy_at)


@workflow.defn(name=TEST_FAILOVER_WORKFLOW)
class TestFailoverWorkflow:
    def __init__(self) -> None:
        self._status = TestFailoverStatus(protection="", phase="choosing")
        self._cleanup = False

    @workflow.query(name="progress")
    def progress(self) -> TestFailoverStatus:
        return self._status

    @workflow.signal(name="cleanup")
    def cleanup(self) -> None:
        """End the test now: the VMs and their overlays are removed."""
        self._cleanup = True

    @workflow.run
    async def run(self, inp: TestFailoverInput) -> TestFailoverStatus:
        st = self._status
        st.protection = inp.protection
        st.started_at = started = workflow.now()
        point: RecoveryPoint = await workflow.execute_activity(
            "failover.choose_point", inp, result_type=RecoveryPoint,
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        st.point_id = point.id
        target: PlatformInfo = await workflow.execute_activity(
            "point.target", point.id, result_type=PlatformInfo,
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        tiers: list[BootTier] = await workflow.execute_activity(
            "failover.tiers", inp, result_type=list[BootTier],
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        target_q = site_task_queue(target.site)
        base = inp.name or f"{inp.protection}-test"
        group = sum(len(t.vms) for t in tiers) > 1
        names = {vm: f"{base}-{vm}" if group else base for t in tiers for vm in t.vms}
        try:
            if any(step.when == "before-boot" for step in inp.runbook):
                st.phase = "runbook"
                stop = await run_steps(inp.runbook, "before-boot", protection=inp.protection,
                                       operation="test-failover", point_id=point.id, vms=[],
                                       queue=target_q, results=st.steps)
                if stop:
                    raise ApplicationError(stop, type="RunbookFailed", non_retryable=True)
            st.phase = "booting"
            for i, tier in enumerate(tiers):
                st.tier = i
                await self._boot_tier(inp, point, tier, names, target, target_q)
                if tier.delay_seconds:
                    await workflow.sleep(tier.delay_seconds)
            healthy_at = max(v.healthy_at for v in st.vms)
            st.rto_seconds = (healthy_at - started).total_seconds()
            await record_rto(inp.protection, st.rto_seconds)
            if any(step.when == "after-boot" for step in inp.runbook):
                st.phase = "runbook"
                stop = await run_steps(inp.runbook, "after-boot", protection=inp.protection,
                                       operation="test-failover", point_id=point.id,
                                       vms=[v.instance.name for v in st.vms], queue=target_q,
                                       results=st.steps)
                if stop:
                    raise ApplicationError(stop, type="RunbookFailed", non_retryable=True)
            await self._report(TestFailoverReport(
                point_id=point.id, started_at=started, healthy_at=healthy_at,
                rto_seconds=st.rto_seconds, ok=True))
            st.phase = "running"
            with contextlib.suppress(TimeoutError):  # kept long enough: clean up by itself
                await workflow.wait_condition(lambda: self._cleanup,
                                              timeout=timedelta(seconds=inp.keep_seconds))
        except (ActivityError, ChildWorkflowError, ApplicationError) as e:
            st.error = _cause(e)
            await self._report(TestFailoverReport(point_id=point.id, started_at=started, ok=False,
                                                  error=st.error))
        finally:
            # Also on cancellation: a test never leaves a VM or overlay behind. Every VM
            # that may have been booted is removed by name, last booted first (the
            # connector refuses to touch a domain that is not a transcend instance).
            st.phase = "cleaning"
            known = {v.vm: v.instance for v in st.vms}
            for vm in reversed(list(names)):
                instance = known.get(vm) or Instance(platform=target.name, id="", name=names[vm])
                try:
                    await workflow.execute_activity(
                        "instance.destroy", DestroyInput(point_id=point.id, instance=instance),
                        task_queue=target_q, **CLEANUP
                    )
                except ActivityError as e:
                    if vm in known:
                        raise
                    workflow.logger.info("no instance %s to clean up: %s", names[vm], _cause(e))
        if st.error:
            st.phase = "failed"
            raise ApplicationError(f"test failover of {inp.protection} failed: {st.error}",
                                   type="TestFailoverFailed", non_retryable=True)
        st.phase = "done"
        return st

    async def _boot_tier(self, inp: TestFailoverInput, point: RecoveryPoint, tier: BootTier,
                         names: dict[str, str], target: PlatformInfo, target_q: str) -> None:
        """Boot the tier's VMs together (child workflows); all must pass their check."""
        st = self._status
        results = await asyncio.gather(*[
            workflow.execute_child_workflow(
                RECOVER_VM_WORKFLOW,
                RecoverVmInput(point_id=point.id, vm=vm, name=names[vm], network=inp.network,
                               isolated=not inp.network, health=tier.health or inp.health,
                               target_platform=target.name, target_queue=target_q,
                               convert=inp.convert, reip=inp.reip),
                id=f"{workflow.info().workflow_id}/{vm}", result_type=RecoveredVm,
            )
            for vm in tier.vms
        ], return_exceptions=True)
        for r in results:
            if isinstance(r, RecoveredVm):
                st.vms.append(r)
                if st.instance is None:
                    st.instance = r.instance
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _report(self, report: TestFailoverReport) -> None:
        try:
            await workflow.get_external_workflow_handle(
                replication_id(self._status.protection)
            ).signal("test_failover_finished", report)
        except ApplicationError:
            workflow.logger.warning("replication workflow of %s not running", self._status.protection)
