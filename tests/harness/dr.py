"""Helpers of the DR-operation tests: domain state, refused requests."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import libvirt
import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy

from tests.harness.protect import failure_text, wait_phase
from tests.harness.stack import Stack
from transcend.api import CONTROL_TASK_QUEUE

S = TypeVar("S")


def domain_active(name: str) -> bool:
    """Whether the domain exists and runs."""
    conn = libvirt.open("qemu:///system")
    try:
        return bool(conn.lookupByName(name).isActive())
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def remove_domain(name: str) -> None:
    """Destroy and undefine a domain if it exists: a failed-over VM a test kept
    (keep_failed_over) or left behind after a failure."""
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


async def refused(client: Client, workflow: str, inp: Any, wid: str) -> str:
    with pytest.raises(WorkflowFailureError) as e:
        await client.execute_workflow(workflow, inp, id=wid, task_queue=CONTROL_TASK_QUEUE,
                                      id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
    return failure_text(e.value)


async def result_despite_kill(stack: Stack, handle: WorkflowHandle[Any, S], status_type: type[Any],
                              phases: set[str], timeout: float = 900) -> S:
    """Wait until the operation is in one of ``phases``, kill -9 the worker, start a new
    one, and return the workflow's result: the operation must survive the crash."""
    await wait_phase(handle, status_type, phases, 300)
    stack.kill_workers()
    stack.start_worker()
    return await asyncio.wait_for(handle.result(), timeout)
