"""The EBS direct APIs' REST-JSON surface (API version 2019-11-02) over :mod:`ebs_model`.

Routes, parameter locations and status codes follow botocore's service model for ``ebs``
(the same model the AWS API reference is generated from)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tests.harness.aws.ebs_model import BLOCK_SIZE, EbsError, EbsModel, validation

_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/snapshots/?$"), "StartSnapshot"),
    ("POST", re.compile(r"^/snapshots/completion/(?P<snap>[^/]+)/?$"), "CompleteSnapshot"),
    ("PUT", re.compile(r"^/snapshots/(?P<snap>[^/]+)/blocks/(?P<index>[^/]+)/?$"), "PutSnapshotBlock"),
    ("GET", re.compile(r"^/snapshots/(?P<snap>[^/]+)/blocks/(?P<index>[^/]+)/?$"), "GetSnapshotBlock"),
    ("GET", re.compile(r"^/snapshots/(?P<snap>[^/]+)/blocks/?$"), "ListSnapshotBlocks"),
    ("GET", re.compile(r"^/snapshots/(?P<snap>[^/]+)/changedblocks/?$"), "ListChangedBlocks"),
]
_SNAP_RE = re.compile(r"^snap-[0-9a-f]+$")


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


def operation(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for m, pattern, name in _ROUTES:
        if m == method:
            match = pattern.match(path)
            if match:
                return name, match.groupdict()
    return None


def _request_id() -> str:
    return str(uuid.uuid4())


def json_response(status: int, payload: dict[str, Any], headers: list[tuple[str, str]] | None = None
                  ) -> Response:
    return Response(status, json.dumps(payload).encode(),
                    [("Content-Type", "application/json"), ("x-amzn-RequestId", _request_id()),
                     *(headers or [])])


def error_response(code: str, status: int, message: str, reason: str | None = None) -> Response:
    """The REST-JSON error shape botocore parses: code in ``x-amzn-ErrorType``."""
    payload: dict[str, Any] = {"Message": message}
    if reason:
        payload["Reason"] = reason
    return json_response(status, payload, [("x-amzn-ErrorType", code)])


def _int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise validation(f"{name} must be an integer, not {value!r}.",
                         "INVALID_PARAMETER_VALUE") from None


def _snap(value: str | None, name: str = "SnapshotId") -> str:
    if not value or not _SNAP_RE.match(value) or len(value) > 64:
        raise validation(f"{name} {value!r} is not a snapshot id.", "INVALID_SNAPSHOT_ID")
    return value


class EbsApi:
    """``handle`` answers one request; ``quota``/``corrupt`` are asked of the fault layer."""

    def __init__(self, model: EbsModel, *, quota: Callable[[str], bool],
                 corrupt: Callable[[str], bool], count_bytes: Callable[[str, int], None]) -> None:
        self.model = model
        self.quota = quota
        self.corrupt = corrupt
        self.count_bytes = count_bytes

    def handle(self, op: str, args: dict[str, str], query: str, headers: dict[str, str],
               body: bytes) -> Response:
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        try:
            handler: Callable[..., Response] = getattr(self, "_" + op)
            return handler(args, q, headers, body)
        except EbsError as e:
            return error_response(e.code, e.status, e.message, e.reason)

    # ------------------------------------------------------------------ operations

    def _StartSnapshot(self, args: dict[str, str], q: dict[str, str], h: dict[str, str],
                       body: bytes) -> Response:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            raise validation("The request body is not JSON.", "INVALID_PARAMETER_VALUE") from None
        if not isinstance(req, dict):
            raise validation("The request body is not a JSON object.", "INVALID_PARAMETER_VALUE")
        if "ParentSnapshotId" in req:
            _snap(req["ParentSnapshotId"], "ParentSnapshotId")
        if self.quota("StartSnapshot"):
            raise EbsError("ServiceQuotaExceededException", 402,
                           "You have reached the maximum number of snapshots for your account.",
                           "DEPENDENCY_SERVICE_QUOTA_EXCEEDED")
        self.model.sweep()
        return json_response(201, self.model.start_snapshot(req))

    def _PutSnapshotBlock(self, args: dict[str, str], q: dict[str, str], h: dict[str, str],
                          body: bytes) -> Response:
        snap = _snap(args["snap"])
        index = _int(args["index"], "BlockIndex")
        assert index is not None
        if index < 0:
            raise validation("BlockIndex must be >= 0.", "INVALID_BLOCK")
        self.model.sweep()
        checksum = self.model.put_block(
            snap, index, body, data_length=_int(h.get("x-amz-data-length"), "DataLength"),
            checksum=h.get("x-amz-checksum"), algorithm=h.get("x-amz-checksum-algorithm"),
            progress=_int(h.get("x-amz-progress"), "Progress"))
        self.count_bytes("written", len(body))
        return Response(201, b"", [("x-amzn-RequestId", _request_id()),
                                   ("Content-Type", "application/json"),
                                   ("x-amz-Checksum", checksum),
                                   ("x-amz-Checksum-Algorithm", "SHA256")])

    def _CompleteSnapshot(self, args: dict[str, str], q: dict[str, str], h: dict[str, str],
                          body: bytes) -> Response:
        snap = _snap(args["snap"])
        self.model.sweep()
        status = self.model.complete(
            snap, changed_blocks_count=_int(h.get("x-amz-changedblockscount"), "ChangedBlocksCount"),
            checksum=h.get("x-amz-checksum"), algorithm=h.get("x-amz-checksum-algorithm"),
            aggregation=h.get("x-amz-checksum-aggregation-method"))
        return json_response(202, {"Status": status})

    def _ListSnapshotBlocks(self, args: dict[str, str], q: dict[str, str], h: dict[str, str],
                            body: bytes) -> Response:
        snap = _snap(args["snap"])
        self.model.sweep()
        return json_response(200, self.model.list_blocks(
            snap, max_results=_int(q.get("maxResults"), "MaxResults"),
            next_token=q.get("pageToken") or None,
            starting=_int(q.get("startingBlockIndex"), "StartingBlockIndex")))

    def _ListChangedBlocks(self, args: dict[str, str], q: dict[str, str], h: dict[str, str],
                           body: bytes) -> Response:
        second = _snap(args["snap"], "SecondSnapshotId")
        first = q.get("firstSnapshotId") or None
        if first is not None:
            _snap(first, "FirstSnapshotId")
        self.model.sweep()
        return json_response(200, self.model.list_changed(
            first, second, max_results=_int(q.get("maxResults"), "MaxResults"),
            next_token=q.get("pageToken") or None,
            starting=_int(q.get("startingBlockIndex"), "StartingBlockIndex")))

    def _GetSnapshotBlock(self, args: dict[str, str], q: dict[str, str], h: dict[str, str],
                          body: bytes) -> Response:
        snap = _snap(args["snap"])
        index = _int(args["index"], "BlockIndex")
        assert index is not None
        self.model.sweep()
        data, checksum = self.model.get_block(snap, index, q.get("blockToken"))
        if self.corrupt("GetSnapshotBlock"):
            # flip bytes in the data, keep the true checksum: the reader must notice
            data = bytes([data[0] ^ 0xFF]) + data[1:-1] + bytes([data[-1] ^ 0x5A])
        self.count_bytes("read", len(data))
        return Response(200, data, [("x-amzn-RequestId", _request_id()),
                                    ("Content-Type", "application/octet-stream"),
                                    ("x-amz-Data-Length", str(BLOCK_SIZE)),
                                    ("x-amz-Checksum", checksum),
                                    ("x-amz-Checksum-Algorithm", "SHA256")])
