"""Operations on one recovery point: full verification against its manifest, and
booting a VM from it on a throw-away overlay."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from transcend.api import (
        BOOT_WORKFLOW,
        CONTROL_TASK_QUEUE,
        VERIFY_WORKFLOW,
        BootInput,
        BootResult,
        VerifyInput,
        VerifyResult,
    )
    from transcend.config import site_task_queue
    from transcend.models import PlatformInfo
    from workflows.cycle import NON_RETRYABLE, SHORT

LONG: dict[str, Any] = dict(
    start_to_close_timeout=timedelta(hours=12),
    heartbeat_timeout=timedelta(seconds=60),
    retry_policy=RetryPolicy(maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE),
)


@workflow.defn(name=VERIFY_WORKFLOW)
class VerifyPointWorkflow:
    """Re-read every block of every disk of a point and compare with its manifest."""

    @workflow.run
    async def run(self, inp: VerifyInput) -> VerifyResult:
        target: PlatformInfo = await workflow.execute_activity(
            "point.target", inp.point_id, result_type=PlatformInfo,
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        result: VerifyResult = await workflow.execute_activity(
            "point.verify", inp, result_type=VerifyResult,
            task_queue=site_task_queue(target.site), **LONG
        )
        if not result.ok:
            raise ApplicationError(
                f"point {inp.point_id} does not match its manifest: {result.mismatched_blocks}",
                type="VerifyFailed", non_retryable=True,
            )
        return result


@workflow.defn(name=BOOT_WORKFLOW)
class BootPointWorkflow:
    """Boot a VM from a point on a throw-away overlay (the point is never written)."""

    @workflow.run
    async def run(self, inp: BootInput) -> BootResult:
        target: PlatformInfo = await workflow.execute_activity(
            "point.target", inp.point_id, result_type=PlatformInfo,
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        result: BootResult = await workflow.execute_activity(
            "point.boot", inp, result_type=BootResult,
            task_queue=site_task_queue(target.site), **SHORT
        )
        return result
