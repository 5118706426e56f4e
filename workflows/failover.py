"""Test failover: recover a point as a throw-away VM, prove it healthy, measure the RTO,
keep it for the operator, then clean up. Replication goes on meanwhile: the point is
only ever read (the VM runs on an overlay) and retention skips it while it is in use.

Deterministic: no I/O, clock or randomness but Temporal's.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from transcend.api import (
        CONTROL_TASK_QUEUE,
        TEST_FAILOVER_WORKFLOW,
        BootInput,
        BootResult,
        DestroyInput,
        HealthInput,
        TestFailoverInput,
        TestFailoverReport,
        TestFailoverStatus,
        replication_id,
    )
    from transcend.config import site_task_queue
    from transcend.models import Instance, PlatformInfo, RecoveryPoint
    from workflows.cycle import CLEANUP, HEARTBEAT, NON_RETRYABLE, SHORT, _cause


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
        """End the test now: the VM and its overlays are removed."""
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
        target_q = site_task_queue(target.site)
        instance: Instance | None = None
        try:
            st.phase = "booting"
            boot: BootResult = await workflow.execute_activity(
                "point.boot",
                BootInput(point_id=point.id, name=inp.name or f"{inp.protection}-test",
                          network=inp.network, isolated=not inp.network),
                result_type=BootResult, task_queue=target_q, **SHORT
            )
            instance = Instance(platform=target.name, id=boot.instance_id, name=boot.name,
                                console_log=boot.console_log)
            st.instance = instance
            st.phase = "health-check"
            healthy_at: datetime = await workflow.execute_activity(
                "instance.health", HealthInput(instance=instance, health=inp.health),
                result_type=datetime, task_queue=target_q,
                start_to_close_timeout=timedelta(seconds=inp.health.timeout_seconds + 60),
                heartbeat_timeout=HEARTBEAT,
                retry_policy=RetryPolicy(maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE),
            )
            st.rto_seconds = (healthy_at - started).total_seconds()
            await self._report(TestFailoverReport(
                point_id=point.id, started_at=started, healthy_at=healthy_at,
                rto_seconds=st.rto_seconds, ok=True))
            st.phase = "running"
            with contextlib.suppress(TimeoutError):  # kept long enough: clean up by itself
                await workflow.wait_condition(lambda: self._cleanup,
                                              timeout=timedelta(seconds=inp.keep_seconds))
        except ActivityError as e:
            st.error = _cause(e)
            await self._report(TestFailoverReport(point_id=point.id, started_at=started, ok=False,
                                                  error=st.error))
        finally:
            # Also on cancellation: a test never leaves a VM or overlay behind.
            st.phase = "cleaning"
            name = inp.name or f"{inp.protection}-test"
            try:
                await workflow.execute_activity(
                    "instance.destroy",
                    DestroyInput(point_id=point.id, instance=instance or Instance(
                        platform=target.name, id="", name=name)),
                    task_queue=target_q, **CLEANUP
                )
            except ActivityError as e:
                if instance is not None:
                    raise
                # The boot never returned: nothing of ours may exist under that name
                # (the connector refuses to touch a foreign domain).
                workflow.logger.info("no instance %s to clean up: %s", name, _cause(e))
        if st.error:
            st.phase = "failed"
            raise ApplicationError(f"test failover of {inp.protection} failed: {st.error}",
                                   type="TestFailoverFailed", non_retryable=True)
        st.phase = "done"
        return st

    async def _report(self, report: TestFailoverReport) -> None:
        try:
            await workflow.get_external_workflow_handle(
                replication_id(self._status.protection)
            ).signal("test_failover_finished", report)
        except ApplicationError:
            workflow.logger.warning("replication workflow of %s not running", self._status.protection)

