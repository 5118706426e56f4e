"""Running a DR operation's runbook steps from workflow code (deterministic)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from transcend.api import RunbookInput, RunbookStep, StepResult
    from workflows.cycle import HEARTBEAT


async def run_steps(steps: list[RunbookStep], when: str, *, protection: str, operation: str,
                    point_id: str, vms: list[str], queue: str,
                    results: list[StepResult]) -> str | None:
    """Run the steps of phase ``when`` in order, appending each outcome to ``results``.
    Returns why the operation must stop (a failed step without continue_on_error)."""
    for step in (s for s in steps if s.when == when):
        result: StepResult = await workflow.execute_activity(
            "runbook.run",
            RunbookInput(step=step, protection=protection, operation=operation,
                         point_id=point_id, vms=vms),
            result_type=StepResult, task_queue=queue,
            start_to_close_timeout=timedelta(seconds=step.timeout_seconds + 60),
            heartbeat_timeout=HEARTBEAT,
            # A step's own failure is a result, not an exception: only a lost worker
            # makes Temporal run it again.
            retry_policy=RetryPolicy(maximum_attempts=3, initial_interval=timedelta(seconds=2)),
        )
        results.append(result)
        if not result.ok and not step.continue_on_error:
            how = "timed out" if result.timed_out else f"exit {result.exit_code}"
            return (f"runbook step {step.name!r} ({when}) failed ({how}): "
                    f"{(result.stderr or result.stdout)[-500:].strip()}")
    return None
