"""The CLI when Temporal or the worker is down (issue #16): a command waiting on a
workflow (verify, failover --wait, ...) rides out a Temporal restart instead of failing
with a transport error; `status` with no worker says the worker does not answer
instead of "not running"."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from temporal.devserver import free_port, start_dev_server
from tests.harness.seed import seed_web_protection
from transcend.api import REPLICATION_WORKFLOW, ReplicationInput, replication_id
from transcend.cli import main
from transcend.cli.common import riding_out_outages
from transcend.client import connect
from transcend.config import settings

OUTAGE = 15.0  # longer than the SDK's own retries of a long poll (~10 s)


def test_a_wait_survives_a_dev_server_restart(tmp_path: Path) -> None:
    db = tmp_path / "temporal.db"
    port, ui_port = free_port(), free_port()
    dev = start_dev_server(db, port=port, ui_port=ui_port)

    async def run() -> None:
        nonlocal dev
        client = await Client.connect(dev.address)
        # nobody works on these: each ends when the test terminates it
        bare_h = await client.start_workflow("Nobody", id="bare", task_queue="nobody")
        ridden_h = await client.start_workflow("Nobody", id="ridden", task_queue="nobody")
        bare = asyncio.create_task(bare_h.result())
        ridden = asyncio.create_task(riding_out_outages(ridden_h.result, "ridden"))
        await asyncio.sleep(1)
        dev.stop()
        await asyncio.sleep(OUTAGE)
        dev = start_dev_server(db, port=port, ui_port=ui_port)  # same history
        await bare_h.terminate("test over")
        await ridden_h.terminate("test over")
        # the control: without riding it out, the wait failed with the outage
        with pytest.raises(RPCError):
            await bare
        # ridden out: the wait reconnected and saw how the workflow really ended
        with pytest.raises(WorkflowFailureError):
            await ridden

    try:
        asyncio.run(run())
    finally:
        dev.stop()


def test_status_with_no_worker_says_the_worker_does_not_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = start_dev_server(tmp_path / "temporal.db", port=free_port(), ui_port=free_port())
    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSCEND_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("TRANSCEND_TEMPORAL_ADDRESS", dev.address)
    settings.cache_clear()
    try:
        seed_web_protection(tmp_path)

        async def start() -> None:  # running, but no worker polls its queue
            client = await connect()
            await client.start_workflow(REPLICATION_WORKFLOW, ReplicationInput(protection="web"),
                                        id=replication_id("web"), task_queue="nobody")

        asyncio.run(start())
        r = CliRunner().invoke(main, ["status"])
        assert "web" in r.stdout and "workflow running, but no worker answered" in r.stdout, \
            (r.stdout, r.stderr)
        assert "workflow not running" not in r.stdout
    finally:
        settings.cache_clear()
        dev.stop()
