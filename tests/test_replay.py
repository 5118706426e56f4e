"""Replay tests: the current workflow code replays the histories earlier versions
wrote (tests/histories/<version>/, recorded by test_plugins.py's real-worker test with
TRANSCEND_RECORD_HISTORIES). A ``workflow.patched`` change that is not guarded, or a
guarded one that changed the old path, fails here with Temporal's nondeterminism
error. Record a new directory whenever a patch is added, so the next one is checked
against it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.harness import replay
from transcend.codec import data_converter

VERSIONS = sorted(p for p in replay.HISTORIES.iterdir() if p.is_dir())


def test_there_are_recorded_histories() -> None:
    assert VERSIONS, f"no recorded histories under {replay.HISTORIES}"
    kinds = {h.workflow_id.split("/")[0] for v in VERSIONS for h in replay.load(v)[0]}
    assert {"replication", "cycle"} <= kinds, kinds


@pytest.mark.parametrize("version", VERSIONS, ids=[v.name for v in VERSIONS])
def test_recorded_histories_replay(version: Path) -> None:
    histories, key = replay.load(version)
    done = asyncio.run(replay.replay(histories, [key]))
    assert len(done) == len(histories) > 0


def test_a_changed_history_is_caught(tmp_path: Path) -> None:
    """The check can fail: a recorded Replication history whose first activity is
    renamed no longer matches what the code schedules."""
    histories, key = replay.load(VERSIONS[-1])
    h = next(h for h in histories if h.workflow_id.startswith("replication/"))
    doc = json.loads(h.to_json())
    for ev in doc["events"]:
        attrs = ev.get("activityTaskScheduledEventAttributes")
        if attrs:
            attrs["activityType"]["name"] = "no.such.activity"
            break
    else:
        pytest.fail("the recorded Replication history schedules no activity")
    changed = WorkflowHistory.from_json(h.workflow_id, doc)

    from worker import WORKFLOWS

    with pytest.raises(Exception, match=r"(?i)nondetermin|activity type"):
        asyncio.run(Replayer(workflows=WORKFLOWS, data_converter=data_converter([key]))
                    .replay_workflow(changed))
