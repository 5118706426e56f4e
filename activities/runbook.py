"""Runbook steps: operator commands run during a failover, migration or test failover,
with a timeout and their output captured for the operation's status."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from temporalio import activity

from activities.context import in_thread
from transcend.api import RunbookInput, StepResult

OUTPUT_LIMIT = 4000


def run_step(inp: RunbookInput) -> StepResult:
    """Run the step's command in its own process group (a timeout kills the whole
    group, children included). Returns the outcome; never raises for the command's
    own failure, so Temporal does not run a failed script again."""
    step = inp.step
    env = {**os.environ, **step.env,
           "TRANSCEND_PROTECTION": inp.protection, "TRANSCEND_OPERATION": inp.operation,
           "TRANSCEND_POINT": inp.point_id, "TRANSCEND_VMS": " ".join(inp.vms)}
    started = time.monotonic()
    try:
        proc = subprocess.Popen(step.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as e:
        return StepResult(name=step.name, when=step.when, ok=False, exit_code=None,
                          seconds=time.monotonic() - started,
                          stderr=f"cannot start {step.command[0]!r}: {e.strerror}; check the "
                                 "path and that the worker of the target site can run it")
    timed_out = False
    try:
        out, err = proc.communicate(timeout=step.timeout_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    code = None if timed_out else proc.returncode
    stderr = err.decode("utf-8", "replace")[-OUTPUT_LIMIT:]
    if timed_out:
        stderr += f"\n(killed after the step's timeout of {step.timeout_seconds} s)"
    return StepResult(name=step.name, when=step.when, ok=code == 0, exit_code=code,
                      timed_out=timed_out, seconds=time.monotonic() - started,
                      stdout=out.decode("utf-8", "replace")[-OUTPUT_LIMIT:], stderr=stderr)


@activity.defn(name="runbook.run")
async def run(inp: RunbookInput) -> StepResult:
    return await in_thread(run_step, inp)
