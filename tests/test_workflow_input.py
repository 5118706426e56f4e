"""Bad workflow input fails the workflow at once, naming the field, and registers
nothing (issue #16).

Every workflow type is started as another system would: a plain
``temporalio.client.Client`` with the project's data converter (the encrypting codec)
and a JSON object for the input, against a real dev server and worker. Before the
fix such a start left a workflow RUNNING whose workflow task failed every ~10 s
with a pydantic traceback, forever."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from tests.harness.stack import Stack, transcend_stack
from transcend.api import (
    CONTROL_TASK_QUEUE,
    REPLICATION_WORKFLOW,
    VERIFY_WORKFLOW,
    WORKFLOW_INPUTS,
    replication_id,
    schedule_id,
)
from transcend.client import codec_keys
from transcend.codec import data_converter
from transcend.models import PlatformKind, PlatformSpec
from transcend.validation import INVALID_INPUT

# A workflow that fails on its input does so in its first workflow task; this is only
# the bound after which a start that did not fail counts as stuck.
FAIL_WITHIN_SECONDS = 60

GOOD_SPEC: dict[str, Any] = {
    "name": "web",
    "source_platform": "src",
    "workloads": ["vm-1"],
    "target_platform": "dst",
    "policy": {"rpo_seconds": 60, "retention": "all 4h"},
}


def _spec(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD_SPEC)
    policy = changes.pop("policy", {})
    spec.update(changes)
    spec["policy"].update(policy)
    return spec


def _replication(spec: dict[str, Any]) -> dict[str, Any]:
    return {"protection": spec["name"], "spec": spec}


HEALTH = {"kind": "none"}
BOOT = {"point_id": "p", "name": "vm", "target_platform": "dst", "target_queue": "q"}

# (workflow type, input, text the failure must contain: the field named)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("Replication", _replication(_spec(policy={"rpo_seconds": -1})), "spec.policy.rpo_seconds"),
    ("Replication", _replication(_spec(policy={"connections": 0})), "spec.policy.connections"),
    ("Replication", _replication(_spec(workloads=[])), "spec.workloads"),
    ("Replication", _replication(_spec(name="my web")), "spec.name"),
    ("Replication", {"protection": "web", "spec": _spec(policy={"rpo_sconds": 60})},
     "spec.policy.rpo_sconds"),
    ("Cycle", {"protection": "web", "force_resnyc": True}, "force_resnyc"),
    ("VerifyPoint", {"point": "p1"}, "point_id"),
    ("BootPoint", {"point_id": "p1", "name": "a vm"}, "name"),
    ("TestFailover", {"protection": "web", "keep_seconds": -1}, "keep_seconds"),
    ("RecoverVm", {"point_id": "p1", "vm": "vm-1", "name": "t", "health": HEALTH,
                   "target_platform": "dst"}, "target_queue"),
    ("ProductionVm", {"boot": BOOT, "health": {"kind": "console"}, "target_queue": "q"},
     "health"),
    ("Failover", {"protection": "web", "shutdown_timeout_seconds": 0}, "shutdown_timeout_seconds"),
    ("Migration", {"protection": "web", "boot_order": [{"vms": []}]}, "boot_order[0].vms"),
    ("Failback", {"protection": "web", "sync_interval_seconds": 1}, "sync_interval_seconds"),
]


@pytest.fixture(scope="module")
def input_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with transcend_stack(tmp_path_factory.mktemp("input") / "home") as s:
        cat = s.catalog()
        # Platforms a valid spec would register against: the only thing wrong is the field.
        for name in ("src", "dst"):
            cat.add_platform(PlatformSpec(name=name, kind=PlatformKind.SYNTHETIC,
                                          config={"root": str(s.home / name)}))
        try:
            yield s
        except BaseException:
            print(s.worker_log_tail())
            raise


async def _plain_client(stack: Stack) -> Client:
    s = stack.settings
    return await Client.connect(s.temporal_address, namespace=s.temporal_namespace,
                                data_converter=data_converter(codec_keys(s)))


def test_every_workflow_type_has_a_validated_input() -> None:
    """A workflow added without an entry in WORKFLOW_INPUTS would get stuck again."""
    from worker import WORKFLOWS

    for cls in WORKFLOWS:
        defn = workflow._Definition.must_from_class(cls)
        assert defn.name in WORKFLOW_INPUTS, f"{defn.name} is missing from api.WORKFLOW_INPUTS"
        assert defn.arg_types == [WORKFLOW_INPUTS[defn.name]], defn.name
    assert {c[0] for c in CASES} == set(WORKFLOW_INPUTS)


async def _start_and_fail(client: Client, wf_type: str, payload: dict[str, Any],
                          wf_id: str) -> ApplicationError:
    handle = await client.start_workflow(wf_type, payload, id=wf_id, task_queue=CONTROL_TASK_QUEUE,
                                         id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
    try:
        try:
            await asyncio.wait_for(handle.result(), FAIL_WITHIN_SECONDS)
        except TimeoutError:
            pytest.fail(f"{wf_type} with bad input did not fail within {FAIL_WITHIN_SECONDS}s "
                        "(its workflow task is retried instead)")
    except WorkflowFailureError as e:
        assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED
        assert isinstance(e.cause, ApplicationError), repr(e.cause)
        return e.cause
    finally:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test: bad input was not refused")
    pytest.fail(f"{wf_type} with bad input completed")


def test_bad_input_fails_every_workflow_at_once(input_stack: Stack) -> None:
    asyncio.run(_bad_input_fails_every_workflow_at_once(input_stack))


async def _bad_input_fails_every_workflow_at_once(input_stack: Stack) -> None:
    client = await _plain_client(input_stack)
    # The first start takes the protection's real workflow ID: once failed it is free
    # again (before, `protect` of the name said "already running").
    ids = [replication_id("web")] + [f"bad-input/{t}/{uuid.uuid4().hex[:8]}" for t, _, _ in CASES[1:]]
    failures: list[ApplicationError] = []
    for (wf_type, payload, _), wf_id in zip(CASES, ids, strict=True):
        failures.append(await _start_and_fail(client, wf_type, payload, wf_id))
    for (wf_type, _, field), err in zip(CASES, failures, strict=True):
        assert err.type == INVALID_INPUT, (wf_type, err.type, str(err))
        assert err.non_retryable, wf_type
        assert f"{field}:" in err.message, (wf_type, err.message)
        assert "errors.pydantic.dev" not in err.message
    # The message says what is allowed and what was given.
    assert "spec.policy.rpo_seconds: must be greater than or equal to 10, got -1" in failures[0].message
    assert "known fields:" in failures[4].message and "rpo_seconds" in failures[4].message
    # Nothing was registered or scheduled under the protection's name.
    assert input_stack.catalog().list_protections() == []
    with pytest.raises(RPCError) as info:
        await client.get_schedule_handle(schedule_id("web")).describe()
    assert info.value.status == RPCStatusCode.NOT_FOUND
    again = await client.start_workflow(REPLICATION_WORKFLOW, CASES[0][1], id=replication_id("web"),
                                        task_queue=CONTROL_TASK_QUEUE,
                                        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(again.result(), FAIL_WITHIN_SECONDS)


def test_valid_input_still_reaches_the_workflow(input_stack: Stack) -> None:
    asyncio.run(_valid_input_still_reaches_the_workflow(input_stack))


async def _valid_input_still_reaches_the_workflow(input_stack: Stack) -> None:
    """The converter only changes what happens to input that does not validate: a valid
    VerifyPoint of an unknown point runs and fails on its own terms."""
    client = await _plain_client(input_stack)
    handle = await client.start_workflow(VERIFY_WORKFLOW, {"point_id": "no-such-point"},
                                         id=f"verify/{uuid.uuid4().hex}",
                                         task_queue=CONTROL_TASK_QUEUE)
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), FAIL_WITHIN_SECONDS)
    cause = info.value.cause
    while cause.__cause__ is not None and not isinstance(cause, ApplicationError):
        cause = cause.__cause__
    assert not (isinstance(cause, ApplicationError) and cause.type == INVALID_INPUT)
    assert "no-such-point" in str(info.value.cause) or "no-such-point" in str(cause)


def test_protection_names_in_inputs_are_protection_names() -> None:
    """No network needed: the model itself refuses a name no protection can have."""
    from pydantic import ValidationError

    from transcend.api import CycleInput, FailoverInput

    for model in (CycleInput, FailoverInput):
        with pytest.raises(ValidationError):
            model.model_validate({"protection": "my web"})
