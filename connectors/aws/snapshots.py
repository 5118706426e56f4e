"""EC2 snapshots transcend made: tags, lookup, waiting, deletion.

Every snapshot transcend creates carries ``transcend:protection`` and
``transcend:role`` tags; deletion goes through ``delete_owned``, which refuses a
snapshot without them, so an operator's own snapshots are never touched.
"""

from __future__ import annotations

import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws.session import AwsSession, error_code, translate
from connectors.base import ConnectorError

PROTECTION_TAG = "transcend:protection"
CYCLE_TAG = "transcend:cycle"
ROLE_TAG = "transcend:role"
DISK_TAG = "transcend:disk"
WAIT_DELAY = 2.0


def tags(protection: str, cycle_id: str, role: str, **extra: str) -> list[dict[str, str]]:
    out = {PROTECTION_TAG: protection, CYCLE_TAG: cycle_id, ROLE_TAG: role, **extra}
    return [{"Key": k, "Value": v} for k, v in out.items()]


def tag_map(snapshot: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in snapshot.get("Tags", []) or []}


def find(s: AwsSession, **tag_filters: str) -> list[dict[str, Any]]:
    """Our snapshots whose tags match (``protection=…, cycle=…, role=…``)."""
    names = {"protection": PROTECTION_TAG, "cycle": CYCLE_TAG, "role": ROLE_TAG, "disk": DISK_TAG}
    filters = [{"Name": f"tag:{names[k]}", "Values": [v]} for k, v in tag_filters.items()]
    try:
        return [snap for page in s.ec2.get_paginator("describe_snapshots").paginate(
                    OwnerIds=["self"], Filters=filters) for snap in page["Snapshots"]]
    except (ClientError, BotoCoreError) as e:
        raise translate(e, "listing transcend's snapshots") from e


def describe(s: AwsSession, snapshot_id: str) -> dict[str, Any] | None:
    try:
        found = s.ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    except ClientError as e:
        if error_code(e) in ("InvalidSnapshot.NotFound", "InvalidSnapshotID.Malformed"):
            return None
        raise translate(e, f"describing snapshot {snapshot_id}") from e
    return found[0] if found else None


def wait_completed(s: AwsSession, ids: list[str], what: str, timeout: float = 3600.0) -> None:
    """Until every snapshot is ``completed`` (EBS direct reads only completed ones). A
    retried activity waits again; an ``error`` state is final."""
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending:
        try:
            snaps = s.ec2.describe_snapshots(SnapshotIds=pending)["Snapshots"]
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"waiting for {what}") from e
        for snap in snaps:
            if snap["State"] == "error":
                raise ConnectorError(f"snapshot {snap['SnapshotId']} of {what} failed "
                                     f"({snap.get('StateMessage', 'no reason given')})")
        pending = [x["SnapshotId"] for x in snaps if x["State"] != "completed"]
        if pending and time.monotonic() > deadline:
            raise ConnectorError(f"{what}: snapshots {', '.join(pending)} still pending after "
                                 f"{timeout:.0f}s; the activity retries and waits again")
        if pending:
            time.sleep(WAIT_DELAY)


def delete_owned(s: AwsSession, snapshot_id: str, protection: str) -> bool:
    """Delete one of ``protection``'s snapshots; False when it is already gone. A snapshot
    without our tags is refused (never delete what transcend did not make)."""
    snap = describe(s, snapshot_id)
    if snap is None:
        return False
    owner = tag_map(snap).get(PROTECTION_TAG)
    if owner != protection:
        raise ConnectorError(f"snapshot {snapshot_id} is not one of protection {protection!r}'s "
                             f"(its {PROTECTION_TAG} tag is {owner!r}); transcend leaves it alone")
    try:
        s.ec2.delete_snapshot(SnapshotId=snapshot_id)
    except ClientError as e:
        if error_code(e) == "InvalidSnapshot.NotFound":
            return False
        raise translate(e, f"deleting snapshot {snapshot_id}") from e
    return True
