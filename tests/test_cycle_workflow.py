"""The Cycle workflow's own logic, with fake activities on a real dev server (no
platform, no guest): what it does when one disk's stream fails while another's still
runs (issue #14: the sibling kept retrying into a staging being aborted)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from temporal.devserver import DevServer, free_port, start_dev_server
from transcend.api import (
    CONTROL_TASK_QUEUE,
    AbortInput,
    BeginInput,
    CycleContext,
    CycleInput,
    CycleRecordInput,
    FreezeResult,
    ProtectionView,
    ReleaseInput,
    StreamInput,
    StreamResult,
)
from transcend.codec import data_converter
from transcend.config import site_task_queue
from transcend.models import (
    ChangeKind,
    ChangeSummary,
    DiskInfo,
    FrozenHandle,
    PlatformInfo,
    ProtectionPolicy,
    ProtectionState,
    StagingHandle,
)
from workflows.cycle import CycleWorkflow

KEY = b"k" * 32
DISKS = [DiskInfo(id="vda", size=1 << 20), DiskInfo(id="vdb", size=1 << 20)]
SRC = PlatformInfo(name="src", kind="fake", site="local", config={})
DST = PlatformInfo(name="dst", kind="fake", site="local", config={})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    srv = start_dev_server(tmp_path_factory.mktemp("cyclewf") / "temporal.db", port=free_port(),
                           ui_port=free_port())
    try:
        yield srv
    finally:
        srv.stop()


class Fakes:
    """The activities one cycle calls; ``events`` is what happened, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.running: set[str] = set()

    def ctx(self, protection: str) -> CycleContext:
        return CycleContext(protection=protection, cycle_id=f"c-{protection}", source=SRC,
                            target=DST, source_queue=site_task_queue("local"),
                            target_queue=site_task_queue("local"), workloads=[],
                            policy=ProtectionPolicy(rpo_seconds=60), last_point=None,
                            state=ProtectionState.PROTECTING, started_at=datetime.now(UTC))

    def activities(self) -> list[object]:
        @activity.defn(name="protection.view")
        async def view(protection: str) -> ProtectionView:
            return ProtectionView(protection=protection, state=ProtectionState.PROTECTING,
                                  policy=ProtectionPolicy(rpo_seconds=60), source=SRC, target=DST)

        @activity.defn(name="cycle.start")
        async def start(inp: CycleInput) -> CycleContext:
            return self.ctx(inp.protection)

        @activity.defn(name="target.prepare")
        async def prepare(ctx: CycleContext) -> None:
            return None

        @activity.defn(name="source.freeze")
        async def freeze(ctx: CycleContext) -> FreezeResult:
            handle = FrozenHandle(platform="src", protection=ctx.protection, cycle_id=ctx.cycle_id,
                                  instant=datetime.now(UTC), disks=DISKS,
                                  kinds={d.id: ChangeKind.FULL for d in DISKS})
            return FreezeResult(frozen=handle, changes=[
                ChangeSummary(disk=d.id, kind=ChangeKind.FULL, disk_size=d.size) for d in DISKS])

        @activity.defn(name="target.begin")
        async def begin(inp: BeginInput) -> StagingHandle:
            return StagingHandle(platform="dst", protection=inp.ctx.protection,
                                 cycle_id=inp.ctx.cycle_id, disks=inp.disks)

        @activity.defn(name="stream.disk")
        async def stream(inp: StreamInput) -> StreamResult:
            if inp.disk == "vdb":
                # Let vda get going first, then fail for good.
                while "stream vda" not in self.events:
                    await asyncio.sleep(0.05)
                self.events.append("stream vdb failed")
                raise ApplicationError("vdb: the target refused the write", non_retryable=True)
            self.events.append(f"stream {inp.disk}")
            self.running.add(inp.disk)
            try:
                while True:  # a long copy: heartbeats until cancelled
                    activity.heartbeat({"durable_offset": 0})
                    await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                self.events.append(f"stream {inp.disk} cancelled")
                raise
            finally:
                self.running.discard(inp.disk)

        @activity.defn(name="target.abort")
        async def abort(inp: AbortInput) -> None:
            self.events.append("abort" + (" while " + ",".join(sorted(self.running))
                                          if self.running else ""))

        @activity.defn(name="source.release")
        async def release(inp: ReleaseInput) -> None:
            self.events.append(f"release committed={inp.committed}")

        @activity.defn(name="cycle.record")
        async def record(inp: CycleRecordInput) -> None:
            self.events.append(f"record {inp.outcome.status}")

        return [view, start, prepare, freeze, begin, stream, abort, release, record]


def test_a_failed_stream_cancels_its_siblings_before_the_staging_is_aborted(
        server: DevServer) -> None:
    asyncio.run(_failed_stream(server))


async def _failed_stream(server: DevServer) -> None:
    client = await Client.connect(server.address, data_converter=data_converter([KEY]))
    fakes = Fakes()
    acts = fakes.activities()
    async with Worker(client, task_queue=CONTROL_TASK_QUEUE, workflows=[CycleWorkflow],
                      activities=acts), \
            Worker(client, task_queue=site_task_queue("local"), activities=acts):
        protection = f"p{uuid.uuid4().hex[:6]}"
        with pytest.raises(WorkflowFailureError) as failed:
            await client.execute_workflow(
                CycleWorkflow.run, CycleInput(protection=protection),
                id=f"cycle/{protection}", task_queue=CONTROL_TASK_QUEUE,
                execution_timeout=timedelta(minutes=3))
    assert "vdb: the target refused the write" in str(failed.value.cause), failed.value.cause
    ev = fakes.events
    # vda was cancelled and had ended before the staging was aborted and the source
    # released; nothing ran after the cycle ended.
    assert "stream vda cancelled" in ev, ev
    assert "abort" in ev, ev
    assert ev.index("stream vda cancelled") < ev.index("abort"), ev
    assert ev.index("abort") < ev.index("release committed=False") < ev.index("record failed"), ev
    assert not fakes.running
