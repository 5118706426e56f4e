"""Workflow histories for replay tests (tests/test_replay.py).

Every ``workflow.patched`` change must replay the histories the previous version
wrote: those are kept under ``tests/histories/<version>/`` as Temporal's JSON
history export, with the payload key they were encrypted with (a test key, made for
the recording). ``record`` writes a stack's histories there; ``replay`` runs
histories through the current workflow code and fails on any nondeterminism.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from pathlib import Path

from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from transcend.codec import data_converter

HISTORIES = Path(__file__).resolve().parents[1] / "histories"
KEY_FILE = "payload.key"


async def fetch_all(client: Client, query: str = "") -> list[WorkflowHistory]:
    """The histories of every workflow the server lists (``query``: a visibility filter)."""
    out = []
    async for wf in client.list_workflows(query or None):
        out.append(await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history())
    return out


def record(histories: Iterable[WorkflowHistory], key: bytes, directory: Path) -> list[Path]:
    """Write ``histories`` (encrypted with ``key``) as fixtures under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KEY_FILE).write_text(base64.b64encode(key).decode() + "\n")
    written = []
    for i, h in enumerate(histories):
        path = directory / f"{i:02d}-{h.workflow_id.replace('/', '_')}.json"
        path.write_text(json.dumps({"workflow_id": h.workflow_id,
                                    "history": json.loads(h.to_json())}, indent=1) + "\n")
        written.append(path)
    return written


def load(directory: Path) -> tuple[list[WorkflowHistory], bytes]:
    """The recorded histories of one directory and the key they were encrypted with."""
    key = base64.b64decode((directory / KEY_FILE).read_text().strip())
    out = []
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text())
        out.append(WorkflowHistory.from_json(doc["workflow_id"], doc["history"]))
    return out, key


async def replay(histories: Iterable[WorkflowHistory], keys: list[bytes]) -> list[str]:
    """Replay every history with the worker's workflows; the ids replayed. Raises on the
    first nondeterminism (or any workflow task failure the replay hits)."""
    from worker import WORKFLOWS

    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter(keys))
    done = []
    for h in histories:
        await replayer.replay_workflow(h)
        done.append(h.workflow_id)
    return done
