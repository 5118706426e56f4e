"""The Temporal UI as the operations console (issue #23): a dev server started by
``transcend server`` shows a Replication workflow's input decoded, read from the page's
text in headless Chromium; with the codec server stopped the same page shows no
plaintext. The saved views are queries Temporal accepts and that find what they ask."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from temporal import search_attributes as sa
from temporal.devserver import free_port, start_dev_server
from tests.harness.browser import Browser
from transcend.api import REPLICATION_WORKFLOW, TEST_FAILOVER_WORKFLOW, ReplicationInput
from transcend.client import connect
from transcend.codec_server import load_or_create_tokens, token_file
from transcend.config import settings
from transcend.models import ProtectionPolicy, ProtectionSpec
from transcend.views import views

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = "vm-decoded-7f3a"  # appears only inside the (encrypted) workflow input
WID = "ui-codec-check"
#: an encrypted payload as the UI shows it when nothing decodes it: long base64
CIPHERTEXT = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int]]:
    port = free_port()
    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSCEND_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("TRANSCEND_TEMPORAL_ADDRESS", f"127.0.0.1:{port}")
    settings.cache_clear()
    yield tmp_path, port
    settings.cache_clear()


def _transcend_server(port: int, ui_port: int, codec_port: int, log: Path) -> subprocess.Popen[bytes]:
    """``transcend server``, waited for until it says the dev server is up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "transcend.cli", "server", "--port", str(port),
         "--ui-port", str(ui_port), "--codec-port", str(codec_port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log.open("ab"), stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline, out = time.monotonic() + 90, b""
    while b"Temporal dev server on" not in out:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"transcend server did not start: {out!r} {log.read_text()[-2000:]}")
        if select.select([proc.stdout], [], [], 1)[0]:
            out += os.read(proc.stdout.fileno(), 4096)
    return proc


async def _start_replication(rpo: int) -> str:
    """A Replication workflow nobody works on: its input sits encrypted in history."""
    client = await connect()
    handle = await client.start_workflow(
        REPLICATION_WORKFLOW, ReplicationInput(protection="uicheck", spec=ProtectionSpec(
            name="uicheck", source_platform="src", workloads=[WORKLOAD], target_platform="dst",
            policy=ProtectionPolicy(rpo_seconds=rpo))),
        id=WID, task_queue="nobody-polls-this")
    assert handle.result_run_id is not None
    return handle.result_run_id


def test_ui_shows_decoded_input_only_with_the_codec_server(home: tuple[Path, int]) -> None:
    tmp, port = home
    ui_port, codec_port = free_port(), free_port()
    server = _transcend_server(port, ui_port, codec_port, tmp / "server.log")
    try:
        run_id = asyncio.run(_start_replication(1234))
        page = f"http://127.0.0.1:{ui_port}/namespaces/default/workflows/{WID}/{run_id}/history"
        with Browser(tmp / "profile", tmp / "chromium.log") as browser:
            text = browser.wait_for_text(browser.open(page),
                                         lambda t: WORKLOAD in t and "1234" in t, timeout=60)
        # the protection's name and RPO, decoded (neither is in the workflow's id)
        assert '"uicheck"' in text and WORKLOAD in text, text[-3000:]
        assert "rpo_seconds" in text and "1234" in text, text[-3000:]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    # The UI still points at the codec endpoint, but nobody answers there.
    token = load_or_create_tokens(token_file(settings()))[0]
    dev = start_dev_server(tmp / "temporal.db", port=port, ui_port=ui_port,
                           codec_endpoint=f"http://127.0.0.1:{codec_port}/{token}")
    try:
        with Browser(tmp / "profile2", tmp / "chromium2.log") as browser:
            session = browser.open(page)
            # the page has rendered the Input card, as the ciphertext the history holds
            text = browser.wait_for_text(session, lambda t: WID in t and CIPHERTEXT.search(t)
                                         is not None, timeout=60)
            assert CIPHERTEXT.search(text), text[-3000:]
        assert "uicheck" not in text and WORKLOAD not in text and "rpo_seconds" not in text, \
            text[-3000:]
    finally:
        dev.stop()


async def _count(client: Client, query: str, want: int) -> int:
    """Visibility is eventually consistent: wait (bounded) for the count to reach ``want``."""
    n = -1
    for _ in range(40):
        n = (await client.count_workflows(query)).count
        if n == want:
            return n
        await asyncio.sleep(0.25)
    return n


def test_saved_views_are_valid_queries_that_find_what_they_ask(home: tuple[Path, int]) -> None:
    tmp, port = home
    dev = start_dev_server(tmp / "temporal.db", port=port, ui_port=free_port())

    async def check() -> None:
        client = await connect()
        past = datetime(2026, 1, 1, tzinfo=UTC)
        # no worker runs these: they stay Running with the search attributes set at start
        await client.start_workflow(
            REPLICATION_WORKFLOW, ReplicationInput(protection="late"), id="replication/late",
            task_queue="nobody", search_attributes=TypedSearchAttributes([
                SearchAttributePair(sa.HEALTH, "warning"), SearchAttributePair(sa.RPO_TARGET, 300),
                SearchAttributePair(sa.RPO_ACHIEVED, 900), SearchAttributePair(sa.TEST_FAILOVER_DUE, past)]))
        await client.start_workflow(
            REPLICATION_WORKFLOW, ReplicationInput(protection="fine"), id="replication/fine",
            task_queue="nobody", search_attributes=TypedSearchAttributes([
                SearchAttributePair(sa.HEALTH, "healthy"), SearchAttributePair(sa.RPO_TARGET, 900),
                SearchAttributePair(sa.RPO_ACHIEVED, 600)]))
        await client.start_workflow(TEST_FAILOVER_WORKFLOW, "x", id="test-failover/late",
                                    task_queue="nobody")
        expect = {"unhealthy": 1, "failed": 0, "rpo-breach": 1, "dr-running": 0,
                  "test-failovers": 1, "test-failover-overdue": 1, "cycles-failed-today": 0}
        found = {v.name: v for v in views(datetime.now(UTC), [300, 900])}
        assert set(found) == set(expect)
        for name, want in expect.items():
            assert await _count(client, found[name].query, want) == want, (name, found[name].query)
        # without the catalog's targets the breach view is still a valid query
        empty = {v.name: v for v in views(datetime.now(UTC), [])}["rpo-breach"]
        assert await _count(client, empty.query, 0) == 0

    try:
        asyncio.run(check())
    finally:
        dev.stop()
