"""EBS direct blocks: listing, reading and writing snapshots, 512 KiB at a time.

Standard library and boto3 only: the two backends below (``SnapshotReader``,
``SnapshotWriter``) run inside nbdkit's embedded Python behind
``connectors/common/blockapi.py``; the listing helpers also run in the worker.

What AWS documents and this code relies on (docs/platforms/aws.md has the links):

* ``BlockSize`` is 524288; a snapshot's blocks are listed with a ``BlockToken``
  each, which ``GetSnapshotBlock`` needs (valid 7 days). Pages may be empty and
  still carry a ``NextToken`` (valid 60 minutes): keep paging until there is none.
* ``GetSnapshotBlock`` answers the block's SHA-256 (base64); the data is checked
  against it and fetched again when it does not match.
* ``PutSnapshotBlock`` takes exactly one 512 KiB block with its SHA-256, into a
  snapshot started by ``StartSnapshot`` and still pending. Blocks not written are
  the parent's (``ParentSnapshotId``), or zeros without a parent.
* ``CompleteSnapshot`` wants the number of distinct blocks written and, with the
  LINEAR aggregation, the SHA-256 of their checksums concatenated in block order.
  EBS keeps no list of a pending snapshot's blocks that a client can read, so the
  writer journals each acknowledged block (index and checksum) in a local file,
  fsynced on NBD flush; a retried write appends again and the last entry wins.
  Nor can a pending snapshot be read: the writer keeps a shadow of the cycle's
  blocks for the verify sample (``SnapshotWriter``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

BLOCK = 524288
PAGE = 10000
READ_ATTEMPTS = 3


def client_from_params(params: dict[str, Any], service: str) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=params.get("access_key_id") or None,
        aws_secret_access_key=params.get("secret_access_key") or None,
        aws_session_token=params.get("session_token") or None,
        region_name=params["region"])
    endpoint = params.get("ebs_endpoint_url") if service == "ebs" else params.get("endpoint_url")
    conns = int(params.get("connections", 16))
    return session.client(service, endpoint_url=endpoint or None, config=Config(
        retries={"mode": "standard", "max_attempts": int(params.get("max_attempts", 10))},
        max_pool_connections=max(10, conns + 4), connect_timeout=20, read_timeout=120))


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    return str((response or {}).get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _paged(call: Any, key: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Every entry of a ListSnapshotBlocks / ListChangedBlocks, all pages, ascending.
    Empty pages with a NextToken are followed; an expired NextToken restarts the
    listing after the last block seen (StartingBlockIndex)."""
    token = ""
    last = -1
    restarts = 0
    while True:
        args = dict(kwargs, MaxResults=PAGE)
        if token:
            args["NextToken"] = token
        elif last >= 0:
            args["StartingBlockIndex"] = last + 1
        try:
            page = call(**args)
        except Exception as e:
            if token and _code(e) == "ValidationException" and restarts < 5:
                token, restarts = "", restarts + 1  # the token expired: resume by index
                continue
            raise
        for entry in page.get(key, []):
            if int(entry["BlockIndex"]) > last:
                last = int(entry["BlockIndex"])
                yield entry
        token = page.get("NextToken") or ""
        if not token:
            return


def snapshot_blocks(ebs: Any, snapshot: str) -> dict[int, str]:
    """Block index -> block token of every block written in ``snapshot`` (or inherited)."""
    return {int(b["BlockIndex"]): str(b["BlockToken"])
            for b in _paged(ebs.list_snapshot_blocks, "Blocks", SnapshotId=snapshot)}


def changed_blocks(ebs: Any, first: str, second: str) -> list[tuple[int, str]]:
    """(block index, the second snapshot's token or "" when the block holds nothing
    there any more) for every block that differs between the two snapshots."""
    return [(int(b["BlockIndex"]), str(b.get("SecondBlockToken") or ""))
            for b in _paged(ebs.list_changed_blocks, "ChangedBlocks", FirstSnapshotId=first,
                            SecondSnapshotId=second)]


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def get_block(ebs: Any, snapshot: str, index: int, token: str) -> bytes:
    """One block, its checksum checked (fetched again when it does not match)."""
    for _ in range(READ_ATTEMPTS):
        r = ebs.get_snapshot_block(SnapshotId=snapshot, BlockIndex=index, BlockToken=token)
        with r["BlockData"] as body:
            data = body.read()
        if r.get("ChecksumAlgorithm", "SHA256") == "SHA256" and sha256_b64(data) == r.get("Checksum"):
            return bytes(data)
    raise OSError(f"block {index} of snapshot {snapshot}: the data never matched the "
                  f"checksum EBS sent ({READ_ATTEMPTS} reads)")


class SnapshotReader:
    """A completed snapshot, read-only (``params``: snapshot, size, client params)."""

    block_size = BLOCK

    def __init__(self, params: dict[str, Any]) -> None:
        self.ebs = client_from_params(params, "ebs")
        self.snapshot = str(params["snapshot"])
        self.size = int(params["size"])
        self._tokens = snapshot_blocks(self.ebs, self.snapshot)
        self._lock = threading.Lock()

    def allocated(self) -> set[int]:
        return set(self._tokens)

    def read_block(self, index: int) -> bytes:
        token = self._tokens[index]
        try:
            return get_block(self.ebs, self.snapshot, index, token)
        except Exception as e:
            if _code(e) != "ValidationException":
                raise
            with self._lock:  # block tokens expire after 7 days: list again once
                self._tokens = snapshot_blocks(self.ebs, self.snapshot)
            return get_block(self.ebs, self.snapshot, index, self._tokens[index])

    def write_block(self, index: int, data: bytes) -> None:
        raise OSError("this snapshot is read-only")

    def flush(self) -> None:
        pass


class SnapshotWriter:
    """A pending snapshot (``params``: snapshot, parent or "", size, journal path).

    EBS cannot read a pending snapshot back, yet the cycle's verify sample reads the
    staged layer before commit. So every block written is also kept in a local sparse
    *shadow* file beside the journal (removed at commit or abort: a cycle needs free
    space there for the data it changes), and a read of a block written in this cycle
    returns the shadow's bytes only when their SHA-256 equals the checksum EBS
    acknowledged for that block: the sample then proves EBS holds what the manifest
    says."""

    block_size = BLOCK

    def __init__(self, params: dict[str, Any]) -> None:
        self.ebs = client_from_params(params, "ebs")
        self.snapshot = str(params["snapshot"])
        self.parent = SnapshotReader({**params, "snapshot": params["parent"]}) if params.get(
            "parent") else None
        self.size = int(params["size"])
        self.journal_path = str(params["journal"])
        self._written = read_journal(self.journal_path)
        self._journal = open(self.journal_path, "a")  # noqa: SIM115  # open for the export's life
        self._shadow = os.open(shadow_path(self.journal_path), os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def allocated(self) -> set[int]:
        return set(self._written) | (self.parent.allocated() if self.parent else set())

    def read_block(self, index: int) -> bytes:
        with self._lock:
            acknowledged = self._written.get(index)
        if acknowledged is not None:
            data = os.pread(self._shadow, BLOCK, index * BLOCK)
            if len(data) != BLOCK or sha256_b64(data) != acknowledged:
                raise OSError(f"block {index} of staged snapshot {self.snapshot}: the local copy "
                              "does not match the checksum EBS acknowledged")
            return data
        if self.parent is not None and index in self.parent.allocated():
            return self.parent.read_block(index)
        return bytes(BLOCK)

    def write_block(self, index: int, data: bytes) -> None:
        checksum = sha256_b64(data)
        os.pwrite(self._shadow, data, index * BLOCK)
        self.ebs.put_snapshot_block(SnapshotId=self.snapshot, BlockIndex=index, BlockData=data,
                                    DataLength=len(data), Checksum=checksum,
                                    ChecksumAlgorithm="SHA256")
        with self._lock:
            self._journal.write(f"{index} {checksum}\n")
            self._written[index] = checksum

    def flush(self) -> None:
        with self._lock:
            self._journal.flush()
            os.fsync(self._journal.fileno())
        os.fsync(self._shadow)


def shadow_path(journal: str) -> str:
    return journal + ".blocks"


def read_journal(path: str) -> dict[int, str]:
    """Block index -> checksum of the last acknowledged write (a torn last line, from a
    process killed while appending, is ignored: that write is redone by the resume)."""
    out: dict[int, str] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and line.endswith("\n") and parts[0].isdigit():
                    out[int(parts[0])] = parts[1]
    except FileNotFoundError:
        pass
    return out


def aggregate_checksum(checksums: dict[int, str]) -> str:
    """LINEAR aggregation: SHA-256 over the blocks' SHA-256 digests in index order."""
    h = hashlib.sha256()
    for index in sorted(checksums):
        h.update(base64.b64decode(checksums[index]))
    return base64.b64encode(h.digest()).decode()
