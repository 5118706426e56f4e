"""One replication cycle: freeze -> changes -> begin -> stream -> verify sample ->
commit -> release -> retention, each step an activity at the site that owns the
data. Started by the protection's Temporal Schedule (never two at once: BUFFER_ONE)
or by the replication workflow's "sync now".

Deterministic: no I/O, clock or randomness but Temporal's.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

# workflow.patched() id: a failed disk stream cancels and awaits its siblings before the
# cycle compensates (histories written before it replay the plain gather).
CANCEL_SIBLINGS_PATCH = "cancel-sibling-streams"

with workflow.unsafe.imports_passed_through():
    from transcend.api import (
        CONTROL_TASK_QUEUE,
        CYCLE_WORKFLOW,
        AbortInput,
        BeginInput,
        CommitInput,
        CycleContext,
        CycleInput,
        CycleOutcome,
        CycleRecordInput,
        FreezeResult,
        ProtectionView,
        ReleaseInput,
        RetentionResult,
        RtoSample,
        StreamInput,
        StreamResult,
        VerifySampleInput,
        VerifySampleResult,
        replication_id,
    )
    from transcend.config import site_task_queue
    from transcend.models import (
        MANIFEST_BLOCK_SIZE,
        ChangeSummary,
        ProtectionState,
        RecoveryPoint,
        StagingHandle,
        effective_transfer,
    )

BLOCK_SIZE = MANIFEST_BLOCK_SIZE  # where the staging does not say (older workers)
NON_RETRYABLE = ["PermanentError", "NotFound", "NotFoundError", "AlreadyExists", "InUse"]

# Every activity heartbeats (activities/context.py in_thread, the stream its progress),
# so a worker that dies mid-activity is detected after HEARTBEAT, not after the
# start-to-close timeout, and the step is retried on another worker at once.
HEARTBEAT = timedelta(seconds=20)

SHORT: dict[str, Any] = dict(
    start_to_close_timeout=timedelta(minutes=5),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=8,
        non_retryable_error_types=NON_RETRYABLE,
    ),
)
STREAM: dict[str, Any] = dict(
    start_to_close_timeout=timedelta(hours=24),
    heartbeat_timeout=timedelta(seconds=30),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=2),
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=20,
        non_retryable_error_types=NON_RETRYABLE,
    ),
)
CLEANUP: dict[str, Any] = dict(
    start_to_close_timeout=timedelta(minutes=5),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
        maximum_attempts=30,
    ),
)


@workflow.defn(name=CYCLE_WORKFLOW)
class CycleWorkflow:
    def __init__(self) -> None:
        self._phase = "starting"
        self._ctx: CycleContext | None = None
        self._changes: list[ChangeSummary] = []
        self._streams: list[StreamResult] = []

    @workflow.query
    def progress(self) -> dict[str, Any]:
        """Phase and planned work; live bytes/rate/ETA are in the stream activities'
        heartbeat details (``transcend status`` reads both)."""
        return {
            "phase": self._phase,
            "cycle_id": self._ctx.cycle_id if self._ctx else None,
            "changes": [c.model_dump(mode="json") for c in self._changes],
            "streams_done": [s.model_dump(mode="json") for s in self._streams],
        }

    @workflow.run
    async def run(self, inp: CycleInput) -> CycleOutcome:
        t0 = workflow.now()
        view: ProtectionView = await workflow.execute_activity(
            "protection.view", inp.protection, result_type=ProtectionView,
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        allowed = ProtectionState.FAILING_OVER if inp.final else ProtectionState.PROTECTING
        if view.state != allowed:
            return CycleOutcome(
                cycle_id=workflow.info().workflow_id, status="skipped",
                error=f"protection is {view.state.value}",
            )
        with contextlib.suppress(ApplicationError):
            await workflow.get_external_workflow_handle(replication_id(inp.protection)).signal(
                "cycle_started", workflow.info().workflow_id
            )
        source_q = site_task_queue(view.source.site)
        target_q = site_task_queue(view.target.site)
        self._phase = "start"
        try:
            ctx: CycleContext = await workflow.execute_activity(
                "cycle.start", inp, result_type=CycleContext, task_queue=source_q, **SHORT
            )
        except ActivityError as e:
            # No cycle context, so nothing to record in the catalog; the replication
            # workflow still learns of the failure (health, consecutive failures).
            outcome = CycleOutcome(cycle_id=workflow.info().workflow_id, status="failed",
                                   wall_seconds=(workflow.now() - t0).total_seconds(),
                                   error=_cause(e))
            await self._signal(inp.protection, outcome)
            raise ApplicationError(f"cycle failed to start: {outcome.error}", type="CycleFailed") from e
        self._ctx = ctx
        try:
            await workflow.execute_activity(
                "target.prepare", ctx, task_queue=target_q, **SHORT
            )
        except ActivityError as e:
            outcome = CycleOutcome(cycle_id=ctx.cycle_id, status="failed",
                                   wall_seconds=(workflow.now() - t0).total_seconds(),
                                   error=_cause(e))
        else:
            outcome = await self._run_cycle(ctx, source_q, target_q, t0)
        await self._report(ctx, outcome)
        if outcome.status == "failed":
            raise ApplicationError(f"cycle {ctx.cycle_id} failed: {outcome.error}", type="CycleFailed")
        return outcome

    async def _run_cycle(
        self, ctx: CycleContext, source_q: str, target_q: str, t0: Any
    ) -> CycleOutcome:
        self._phase = "freeze"
        try:
            frozen: FreezeResult = await workflow.execute_activity(
                "source.freeze", ctx, result_type=FreezeResult, task_queue=source_q,
                start_to_close_timeout=timedelta(minutes=10), heartbeat_timeout=HEARTBEAT,
                retry_policy=SHORT["retry_policy"],
            )
        except ActivityError as e:
            return CycleOutcome(
                cycle_id=ctx.cycle_id, status="failed",
                wall_seconds=(workflow.now() - t0).total_seconds(), error=_cause(e),
            )
        self._changes = frozen.changes
        staging: StagingHandle | None = None
        committed = False
        try:
            self._phase = "begin"
            staging = await workflow.execute_activity(
                "target.begin", BeginInput(ctx=ctx, disks=frozen.frozen.disks),
                result_type=StagingHandle, task_queue=target_q, **SHORT
            )
            self._phase = "stream"
            # the target chose the manifest's block size (None from workers before it)
            block_size = staging.block_size or BLOCK_SIZE
            copy_started = workflow.now()
            # Push and local: the source site reads and writes to the staging; pull: the
            # target site reads the source site's frozen exports and writes locally.
            pull = effective_transfer(ctx.policy, ctx.source.site, ctx.target.site) == "pull"
            stream_q = target_q if pull else source_q
            streams = [
                workflow.execute_activity(
                    "stream.disk",
                    StreamInput(
                        ctx=ctx, frozen=frozen.frozen, staging=staging, disk=d.id,
                        block_size=block_size,
                    ),
                    result_type=StreamResult, task_queue=stream_q,
                    # a cancelled stream is over only when its activity says so: the
                    # compensation that follows must not race a copy still writing
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    **STREAM
                )
                for d in frozen.frozen.disks
            ]
            if workflow.patched(CANCEL_SIBLINGS_PATCH):
                self._streams = await all_or_cancel(streams)
            else:
                self._streams = list(await asyncio.gather(*streams))
            copy_seconds = (workflow.now() - copy_started).total_seconds()
            self._phase = "verify"
            await self._verify_sample(ctx, staging, target_q)
            self._phase = "commit"
            point: RecoveryPoint = await workflow.execute_activity(
                "target.commit",
                CommitInput(
                    ctx=ctx, frozen=frozen.frozen, staging=staging, block_size=block_size,
                    streams=self._streams, checkpoints=frozen.checkpoints,
                ),
                result_type=RecoveryPoint, task_queue=target_q, **SHORT
            )
            committed = True
        except (ActivityError, ApplicationError, asyncio.CancelledError) as e:
            self._phase = "abort"
            await self._compensate(ctx, frozen, staging, source_q, target_q)
            if isinstance(e, asyncio.CancelledError):
                raise
            return CycleOutcome(
                cycle_id=ctx.cycle_id, status="failed", kind=_kind(frozen.changes),
                wall_seconds=(workflow.now() - t0).total_seconds(), error=_cause(e),
            )
        # The point is committed from here on: a failed release or retention does not
        # undo it; it is reported with the point so the operator sees it.
        warnings: list[str] = []
        self._phase = "release"
        try:
            await workflow.execute_activity(
                "source.release", ReleaseInput(ctx=ctx, frozen=frozen.frozen, committed=True),
                task_queue=source_q, **CLEANUP
            )
        except ActivityError as e:
            warnings.append(f"releasing the source failed: {_cause(e)}")
        self._phase = "retention"
        try:
            await workflow.execute_activity(
                "retention.apply", ctx, result_type=RetentionResult, task_queue=target_q,
                **SHORT
            )
        except ActivityError as e:
            warnings.append(f"retention failed (retried next cycle): {_cause(e)}")
        self._phase = "done"
        previous = ctx.last_point.instant if ctx.last_point else None
        rpo = (point.committed_at - previous).total_seconds() if previous else None
        return CycleOutcome(
            cycle_id=ctx.cycle_id, status="committed", point_id=point.id, instant=point.instant,
            committed_at=point.committed_at, kind=point.kind.value,
            bytes_written=point.bytes_written, copy_seconds=copy_seconds,
            wall_seconds=(workflow.now() - t0).total_seconds(), rpo_seconds=rpo,
            error="; ".join(warnings),
        ) if committed else CycleOutcome(cycle_id=ctx.cycle_id, status="failed")

    async def _verify_sample(self, ctx: CycleContext, staging: StagingHandle, target_q: str) -> None:
        if ctx.policy.verify_sample_blocks == 0:
            return
        results: list[VerifySampleResult] = list(
            await asyncio.gather(
                *[
                    workflow.execute_activity(
                        "verify.sample",
                        VerifySampleInput(
                            staging=staging, ctx=ctx, disk=d.id,
                            block_size=staging.block_size or BLOCK_SIZE,
                            seed=workflow.random().getrandbits(63),
                            blocks=ctx.policy.verify_sample_blocks,
                        ),
                        result_type=VerifySampleResult, task_queue=target_q,
                        **SHORT
                    )
                    for d in staging.disks
                ]
            )
        )
        bad = {r.disk: r.mismatches for r in results if r.mismatches}
        if bad:
            raise ApplicationError(
                f"verification sample failed: blocks differ from the manifest {bad}; "
                "the staged layer was discarded",
                type="VerifyFailed", non_retryable=True,
            )

    async def _compensate(
        self, ctx: CycleContext, frozen: FreezeResult, staging: StagingHandle | None,
        source_q: str, target_q: str,
    ) -> None:
        if staging is not None:
            await workflow.execute_activity(
                "target.abort", AbortInput(ctx=ctx, staging=staging), task_queue=target_q,
                **CLEANUP
            )
        await workflow.execute_activity(
            "source.release", ReleaseInput(ctx=ctx, frozen=frozen.frozen, committed=False),
            task_queue=source_q, **CLEANUP
        )

    async def _report(self, ctx: CycleContext, outcome: CycleOutcome) -> None:
        await workflow.execute_activity(
            "cycle.record",
            CycleRecordInput(
                ctx=ctx, outcome=outcome,
                bytes_read=sum(s.bytes_read for s in self._streams),
                bytes_zero=sum(s.bytes_zero for s in self._streams),
                bytes_skipped=sum(s.bytes_skipped for s in self._streams),
                bytes_resent=sum(s.bytes_resent for s in self._streams),
            ),
            task_queue=CONTROL_TASK_QUEUE, **SHORT
        )
        await self._signal(ctx.protection, outcome)

    async def _signal(self, protection: str, outcome: CycleOutcome) -> None:
        try:
            await workflow.get_external_workflow_handle(replication_id(protection)).signal(
                "cycle_finished", outcome
            )
        except ApplicationError:
            workflow.logger.warning("replication workflow of %s not running", protection)


async def record_rto(protection: str, seconds: float) -> None:
    """Best effort: a metric never fails the operation that measured it."""
    try:
        await workflow.execute_activity(
            "metrics.rto", RtoSample(protection=protection, seconds=seconds),
            task_queue=CONTROL_TASK_QUEUE, start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=3))
    except ActivityError as e:
        workflow.logger.warning("RTO of %s not recorded as a metric: %s", protection, e)


def _kind(changes: list[ChangeSummary]) -> str:
    kinds = {c.kind.value for c in changes}
    return "resync" if "resync" in kinds else ("full" if kinds == {"full"} else "incremental")


def _cause(e: BaseException) -> str:
    parts = []
    cur: BaseException | None = e
    while cur is not None:
        msg = str(cur)
        if msg and msg not in parts:
            parts.append(msg)
        cur = cur.__cause__
    return ": ".join(parts) or type(e).__name__


async def all_or_cancel(calls: list[Any]) -> list[Any]:
    """Every call's result in order, like ``asyncio.gather``; but when one fails, the
    others are cancelled and awaited before its error is raised. A cycle compensates
    (aborts the staging, releases the source) right after: a sibling stream still
    retrying would write into a staging being removed, and its activity would outlive
    the cycle."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            if not t.done():
                t.cancel()
        # the siblings end as cancelled (or with their own error): only the first counts
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
