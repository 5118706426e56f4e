"""The EBS direct APIs model: snapshots as maps of 512 KiB blocks, lineage, tokens, a clock.

Pure Python, no HTTP and no moto: ``ebs_api`` turns requests into calls here and
``ec2_join`` keeps moto's EC2 snapshots in step through a :class:`Listener`. Every
rule is cited in tests/harness/aws/README.md.

Storage: block data lives once per distinct content in ``<root>/blobs`` (named by its
SHA-256), reference-counted by the snapshots whose block map points at it. A snapshot's
map is its whole content (inherited blocks included, copied from the parent when the
child starts: the parent is completed, so it can no longer change), so deleting a parent
never changes what its children read, and the parent's blocks stay on disk while any
child refers to them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

BLOCK_SIZE = 524288  # bytes; the only block size (API reference: PutSnapshotBlock DataLength)
BLOCKS_PER_GIB = (1 << 30) // BLOCK_SIZE  # 2048
MAX_VOLUME_GIB = 65536  # StartSnapshot VolumeSize: "The maximum size is 65536 GiB (64 TiB)"
NEXT_TOKEN_TTL = 60 * 60  # FAQ: "the next token is valid for 60 minutes"
BLOCK_TOKEN_TTL = 7 * 24 * 60 * 60  # FAQ: "block tokens are valid for seven days"
DEFAULT_TIMEOUT_MIN = 60  # StartSnapshot Timeout: "defaults to 60 minutes"
MIN_TIMEOUT_MIN, MAX_TIMEOUT_MIN = 10, 4320
MIN_RESULTS, MAX_RESULTS = 100, 10000  # ListSnapshotBlocks/ListChangedBlocks MaxResults
DEFAULT_RESULTS = MAX_RESULTS  # AWS documents no default; the model uses the maximum
MAX_TAGS = 50
ZERO_BLOCK = bytes(BLOCK_SIZE)

# model states; "sealing" is shown as "pending" (CompleteSnapshot starts an asynchronous
# workflow; an EC2 CreateSnapshot(s) snapshot is pending when the call returns)
PENDING, SEALING, COMPLETED, ERROR = "pending", "sealing", "completed", "error"


class EbsError(Exception):
    """An error the EBS direct APIs answer with (code = the botocore error code)."""

    def __init__(self, code: str, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.reason = reason


def validation(message: str, reason: str | None = None) -> EbsError:
    return EbsError("ValidationException", 400, message, reason)


def not_found(snapshot_id: str) -> EbsError:
    return EbsError("ResourceNotFoundException", 404,
                    f"The snapshot '{snapshot_id}' does not exist.", "SNAPSHOT_NOT_FOUND")


def b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def linear_checksum(digests: Iterable[bytes]) -> str:
    """CompleteSnapshot's LINEAR aggregate: base64 SHA-256 over the concatenated raw
    SHA-256 digests of the written blocks, in ascending block index order."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return base64.b64encode(h.digest()).decode()


class Clock:
    """Wall time plus an offset the admin API can advance (token expiry, Timeout)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> float:
        self.offset += seconds
        return self.now()


class Listener(Protocol):
    """What the EC2 side (moto) learns from the model."""

    def snapshot_started(self, snap: Snap) -> None: ...

    def state_changed(self, snap: Snap) -> None: ...


class _NoListener:
    def snapshot_started(self, snap: Snap) -> None:
        pass

    def state_changed(self, snap: Snap) -> None:
        pass


class BlobStore:
    """Block contents by SHA-256, reference counted; files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.refs: dict[bytes, int] = {}

    def _path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.root / h[:2] / h

    def put(self, data: bytes, digest: bytes | None = None) -> bytes:
        """Store ``data`` (if new) and take one reference to it."""
        digest = digest or hashlib.sha256(data).digest()
        if digest not in self.refs:
            p = self._path(digest)
            if not p.exists():
                p.parent.mkdir(exist_ok=True)
                tmp = p.with_suffix(f".tmp{threading.get_ident()}")
                tmp.write_bytes(data)
                os.replace(tmp, p)
            self.refs[digest] = 0
        self.refs[digest] += 1
        return digest

    def incref(self, digest: bytes) -> None:
        self.refs[digest] += 1

    def decref(self, digest: bytes) -> None:
        n = self.refs[digest] - 1
        if n:
            self.refs[digest] = n
            return
        del self.refs[digest]
        self._path(digest).unlink(missing_ok=True)

    def read(self, digest: bytes) -> bytes:
        return self._path(digest).read_bytes()

    def count(self) -> int:
        return len(self.refs)


@dataclass
class Snap:
    id: str
    volume_size: int  # GiB
    origin: str  # "ebs" (StartSnapshot) or "ec2" (CreateSnapshot(s), CopySnapshot, AMI)
    state: str
    start_time: float
    blocks: dict[int, bytes] = field(default_factory=dict)  # whole content: index -> digest
    written: dict[int, bytes] = field(default_factory=dict)  # PutSnapshotBlock'd in this one
    parent: str | None = None  # ParentSnapshotId, or the source volume's snapshot (EC2)
    volume_key: str | None = None  # EC2 snapshots: the source volume id
    description: str = ""
    tags: list[dict[str, str]] = field(default_factory=list)
    encrypted: bool = False
    kms_key_arn: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_MIN * 60
    last_activity: float = 0.0
    message: str = ""  # StateMessage (error states)
    final_state: str = COMPLETED  # where a sealing snapshot goes when it settles
    final_message: str = ""

    @property
    def visible_state(self) -> str:
        return PENDING if self.state == SEALING else self.state

    def summary(self) -> dict[str, Any]:
        return {
            "SnapshotId": self.id, "State": self.visible_state, "ModelState": self.state,
            "Origin": self.origin, "VolumeSize": self.volume_size, "Parent": self.parent,
            "VolumeKey": self.volume_key, "Blocks": len(self.blocks),
            "WrittenBlocks": len(self.written), "Message": self.message,
            "Encrypted": self.encrypted, "KmsKeyArn": self.kms_key_arn,
        }


class _Tokens:
    """Opaque, stateless, tamper-proof tokens (HMAC over the bound parameters)."""

    MAC_LEN = 16

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)

    def make(self, *fields: object) -> str:
        payload = "|".join(str(f) for f in fields).encode()
        mac = hmac.new(self.key, payload, hashlib.sha256).digest()[: self.MAC_LEN]
        return base64.b64encode(payload + mac).decode()

    def open(self, token: str) -> list[str] | None:
        try:
            raw = base64.b64decode(token.encode(), validate=True)
        except (ValueError, UnicodeError):
            return None
        payload, mac = raw[: -self.MAC_LEN], raw[-self.MAC_LEN:]
        want = hmac.new(self.key, payload, hashlib.sha256).digest()[: self.MAC_LEN]
        if len(raw) <= self.MAC_LEN or not hmac.compare_digest(mac, want):
            return None
        return payload.decode().split("|")


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(9)[:17]


class EbsModel:
    def __init__(self, root: Path, *, clock: Clock | None = None, owner_id: str = "123456789012",
                 region: str = "us-east-1", listener: Listener | None = None) -> None:
        self.clock = clock or Clock()
        self.blobs = BlobStore(root / "blobs")
        self.owner_id = owner_id
        self.region = region
        self.listener: Listener = listener or _NoListener()
        self.snaps: dict[str, Snap] = {}
        # lineage outlives deletion: id -> (parent, volume_key)
        self.lineage: dict[str, tuple[str | None, str | None]] = {}
        self.idempotency: dict[str, tuple[str, dict[str, Any]]] = {}
        self.tokens = _Tokens()
        self.empty_pages = 0
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ helpers

    def _get(self, snapshot_id: str) -> Snap:
        snap = self.snaps.get(snapshot_id)
        if snap is None:
            raise not_found(snapshot_id)
        return snap

    def _set_state(self, snap: Snap, state: str, message: str = "") -> None:
        snap.state = state
        snap.message = message
        self.listener.state_changed(snap)

    def _completed(self, snapshot_id: str) -> Snap:
        snap = self._get(snapshot_id)
        if snap.state != COMPLETED:
            raise validation(f"The snapshot '{snapshot_id}' is not in the completed state "
                             f"(it is {snap.visible_state}).", "INVALID_SNAPSHOT_ID")
        return snap

    def get(self, snapshot_id: str) -> Snap | None:
        with self.lock:
            return self.snaps.get(snapshot_id)

    def lineage_of(self, snapshot_id: str) -> set[str]:
        """The snapshot, its ancestors (ParentSnapshotId chains, and for EC2 snapshots the
        snapshot their volume was created from), and the volumes of all of them."""
        out: set[str] = set()
        cur: str | None = snapshot_id
        while cur is not None and cur not in out:
            out.add(cur)
            parent, vol = self.lineage.get(cur, (None, None))
            if vol:
                out.add(vol)
            cur = parent
        return out

    def related(self, a: Snap, b: Snap) -> bool:
        la, lb = self.lineage_of(a.id), self.lineage_of(b.id)
        if a.id in lb or b.id in la:
            return True
        return (a.volume_key is not None and a.volume_key in lb) or \
               (b.volume_key is not None and b.volume_key in la)

    # ------------------------------------------------------------------ time

    def sweep(self) -> list[Snap]:
        """Pending snapshots past their Timeout (since the last write, or the start) go to
        ``error``. Returns those that changed."""
        now = self.clock.now()
        changed: list[Snap] = []
        with self.lock:
            for snap in self.snaps.values():
                if snap.state == PENDING and snap.origin == "ebs" and \
                        now > snap.last_activity + snap.timeout_s:
                    self._set_state(snap, ERROR, "The snapshot timed out: no PutSnapshotBlock "
                                    "or CompleteSnapshot within its Timeout.")
                    changed.append(snap)
        return changed

    def settle(self) -> list[Snap]:
        """Finish the asynchronous part: sealing snapshots reach their final state."""
        changed: list[Snap] = []
        with self.lock:
            for snap in self.snaps.values():
                if snap.state == SEALING:
                    self._set_state(snap, snap.final_state, snap.final_message)
                    changed.append(snap)
        return changed

    # ------------------------------------------------------------------ EC2 side

    def capture_volume(self, snapshot_id: str, *, volume_id: str, size_gib: int, path: Path | None,
                       source_snapshot: str | None, description: str = "", encrypted: bool = False,
                       settled: bool = False) -> Snap:
        """An EC2 snapshot of a volume file: its allocated 512 KiB blocks, now."""
        with self.lock:
            snap = Snap(id=snapshot_id, volume_size=size_gib, origin="ec2",
                        state=COMPLETED if settled else SEALING, start_time=self.clock.now(),
                        parent=source_snapshot, volume_key=volume_id, description=description,
                        encrypted=encrypted)
            if path is not None and path.exists():
                for index, data in read_allocated_blocks(path):
                    snap.blocks[index] = self.blobs.put(data)
            self.snaps[snapshot_id] = snap
            self.lineage[snapshot_id] = (source_snapshot, volume_id)
            return snap

    def copy_snapshot(self, source_id: str, new_id: str) -> Snap | None:
        with self.lock:
            src = self.snaps.get(source_id)
            if src is None:
                return None
            snap = Snap(id=new_id, volume_size=src.volume_size, origin="ec2", state=SEALING,
                        start_time=self.clock.now(), parent=src.parent, volume_key=src.volume_key,
                        encrypted=src.encrypted, kms_key_arn=src.kms_key_arn)
            for i, d in src.blocks.items():
                self.blobs.incref(d)
                snap.blocks[i] = d
            self.snaps[new_id] = snap
            self.lineage[new_id] = self.lineage.get(source_id, (None, None))
            return snap

    def drop(self, snapshot_id: str) -> None:
        """EC2 DeleteSnapshot: the snapshot is gone; children keep their own references."""
        with self.lock:
            snap = self.snaps.pop(snapshot_id, None)
            if snap is None:
                return
            for d in snap.blocks.values():
                self.blobs.decref(d)

    def fill_volume(self, snapshot_id: str, path: Path) -> int:
        """Write the snapshot's content into a (sparse, zeroed) volume file. Returns blocks."""
        with self.lock:
            snap = self.snaps.get(snapshot_id)
            if snap is None:
                return 0
            items = sorted(snap.blocks.items())
            fd = os.open(path, os.O_WRONLY)
            try:
                for index, d in items:
                    os.pwrite(fd, self.blobs.read(d), index * BLOCK_SIZE)
                os.fsync(fd)
            finally:
                os.close(fd)
            return len(items)

    # ------------------------------------------------------------------ StartSnapshot

    def start_snapshot(self, req: dict[str, Any]) -> dict[str, Any]:
        token = req.get("ClientToken")
        fingerprint_src = {k: v for k, v in req.items() if k != "ClientToken"}
        fingerprint = repr(sorted(fingerprint_src.items(), key=lambda kv: kv[0]))
        with self.lock:
            if token is not None and token in self.idempotency:
                seen, response = self.idempotency[token]
                if seen != fingerprint:
                    raise EbsError("ConflictException", 409,
                                   "The request uses the same client token as a previous, but "
                                   "non-identical request.")
                return response
            response = self._start(req)
            if token is not None:
                self.idempotency[token] = (fingerprint, response)
            return response

    def _start(self, req: dict[str, Any]) -> dict[str, Any]:
        size = req.get("VolumeSize")
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_VOLUME_GIB:
            raise validation(f"VolumeSize must be an integer from 1 to {MAX_VOLUME_GIB} GiB.",
                             "INVALID_VOLUME_SIZE")
        parent_id = req.get("ParentSnapshotId")
        if parent_id is not None and "Encrypted" in req:
            raise validation("You can't specify ParentSnapshotId and Encrypted in the same "
                             "request.", "INVALID_PARAMETER_VALUE")
        timeout = req.get("Timeout", DEFAULT_TIMEOUT_MIN)
        if not isinstance(timeout, int) or not MIN_TIMEOUT_MIN <= timeout <= MAX_TIMEOUT_MIN:
            raise validation(f"Timeout must be from {MIN_TIMEOUT_MIN} to {MAX_TIMEOUT_MIN} "
                             "minutes.", "INVALID_PARAMETER_VALUE")
        description = req.get("Description") or ""
        if len(description) > 255:
            raise validation("Description is longer than 255 characters.", "INVALID_PARAMETER_VALUE")
        tags = req.get("Tags") or []
        if len(tags) > MAX_TAGS:
            raise validation(f"A snapshot can have at most {MAX_TAGS} tags.", "INVALID_TAG")
        for t in tags:
            key = t.get("Key", "")
            if not key or len(key) > 127 or len(t.get("Value", "")) > 255 or \
                    key.lower().startswith("aws:"):
                raise validation(f"Invalid tag {t!r}.", "INVALID_TAG")
        kms = req.get("KmsKeyArn")
        if kms is not None and not (kms.startswith("arn:aws") and ":kms:" in kms and ":key/" in kms):
            raise validation("KmsKeyArn is not a KMS key ARN.", "INVALID_CUSTOMER_KEY")
        parent: Snap | None = None
        if parent_id is not None:
            parent = self._get(parent_id)
            if parent.state != COMPLETED:
                raise validation(f"The parent snapshot '{parent_id}' is not completed.",
                                 "INVALID_SNAPSHOT_ID")
            if size < parent.volume_size:
                raise validation(f"VolumeSize {size} GiB is smaller than the parent snapshot's "
                                 f"{parent.volume_size} GiB.", "INVALID_VOLUME_SIZE")
        encrypted = bool(req.get("Encrypted")) or bool(kms) or (parent is not None and parent.encrypted)
        if encrypted and not kms:
            kms = parent.kms_key_arn if parent is not None and parent.kms_key_arn else \
                f"arn:aws:kms:{self.region}:{self.owner_id}:key/ebs-default-key"
        now = self.clock.now()
        snap = Snap(id=new_snapshot_id(), volume_size=size, origin="ebs", state=PENDING,
                    start_time=now, parent=parent_id, description=description,
                    tags=[{"Key": t["Key"], "Value": t.get("Value", "")} for t in tags],
                    encrypted=encrypted, kms_key_arn=kms if encrypted else None,
                    timeout_s=timeout * 60, last_activity=now)
        if parent is not None:
            for i, d in parent.blocks.items():
                self.blobs.incref(d)
                snap.blocks[i] = d
        self.snaps[snap.id] = snap
        self.lineage[snap.id] = (parent_id, None)
        self.listener.snapshot_started(snap)
        resp: dict[str, Any] = {
            "SnapshotId": snap.id, "OwnerId": self.owner_id, "Status": PENDING,
            "StartTime": now, "VolumeSize": size, "BlockSize": BLOCK_SIZE,
            "Tags": snap.tags, "SseType": "sse-ebs" if encrypted else "none",
        }
        if description:
            resp["Description"] = description
        if parent_id:
            resp["ParentSnapshotId"] = parent_id
        if snap.kms_key_arn:
            resp["KmsKeyArn"] = snap.kms_key_arn
        return resp

    # ------------------------------------------------------------------ PutSnapshotBlock

    def put_block(self, snapshot_id: str, index: int, data: bytes, *, data_length: int | None,
                  checksum: str | None, algorithm: str | None, progress: int | None = None) -> str:
        digest = hashlib.sha256(data).digest()
        actual = base64.b64encode(digest).decode()
        with self.lock:
            snap = self._get(snapshot_id)
            if snap.state != PENDING or snap.origin != "ebs":
                raise validation(f"The snapshot '{snapshot_id}' is not in the pending state "
                                 f"(it is {snap.visible_state}); blocks can be written only to "
                                 "a pending snapshot.", "INVALID_SNAPSHOT_ID")
            if not 0 <= index < snap.volume_size * BLOCKS_PER_GIB:
                raise validation(f"BlockIndex {index} is outside the {snap.volume_size} GiB "
                                 f"volume (0..{snap.volume_size * BLOCKS_PER_GIB - 1}).",
                                 "INVALID_BLOCK")
            if data_length != BLOCK_SIZE:
                raise validation(f"DataLength must be {BLOCK_SIZE}, not {data_length}.",
                                 "INVALID_PARAMETER_VALUE")
            if len(data) != data_length:
                raise validation(f"The block data is {len(data)} bytes but DataLength is "
                                 f"{data_length}.", "INVALID_PARAMETER_VALUE")
            if algorithm != "SHA256":
                raise validation("ChecksumAlgorithm must be SHA256.", "INVALID_PARAMETER_VALUE")
            if checksum != actual:
                raise validation("The checksum of the block data does not match the "
                                 "x-amz-Checksum header.", "INVALID_PARAMETER_VALUE")
            if progress is not None and not 0 <= progress <= 100:
                raise validation("Progress must be from 0 to 100.", "INVALID_PARAMETER_VALUE")
            new = self.blobs.put(data, digest)
            old = snap.blocks.get(index)
            snap.blocks[index] = new
            snap.written[index] = new
            if old is not None:
                self.blobs.decref(old)
            snap.last_activity = self.clock.now()
        return actual

    # ------------------------------------------------------------------ CompleteSnapshot

    def complete(self, snapshot_id: str, *, changed_blocks_count: int | None, checksum: str | None,
                 algorithm: str | None, aggregation: str | None) -> str:
        with self.lock:
            snap = self._get(snapshot_id)
            if snap.state != PENDING or snap.origin != "ebs":
                raise validation(f"The snapshot '{snapshot_id}' is not in the pending state "
                                 f"(it is {snap.visible_state}).", "INVALID_SNAPSHOT_ID")
            if changed_blocks_count is None or changed_blocks_count < 0:
                raise validation("ChangedBlocksCount is required (>= 0).", "INVALID_PARAMETER_VALUE")
            if checksum is not None:
                if algorithm != "SHA256":
                    raise validation("ChecksumAlgorithm must be SHA256 when Checksum is sent.",
                                     "INVALID_PARAMETER_VALUE")
                if aggregation != "LINEAR":
                    raise validation("ChecksumAggregationMethod must be LINEAR when Checksum is "
                                     "sent.", "INVALID_PARAMETER_VALUE")
            problems = []
            if changed_blocks_count != len(snap.written):
                problems.append(f"ChangedBlocksCount {changed_blocks_count} does not match the "
                                f"{len(snap.written)} blocks written")
            if checksum is not None:
                want = linear_checksum(snap.written[i] for i in sorted(snap.written))
                if checksum != want:
                    problems.append("the aggregated checksum does not match the written blocks")
            snap.final_state = ERROR if problems else COMPLETED
            snap.final_message = "; ".join(problems)
            self._set_state(snap, SEALING)
            return PENDING

    # ------------------------------------------------------------------ list calls

    def _page_args(self, max_results: int | None) -> int:
        n = DEFAULT_RESULTS if max_results is None else max_results
        if not MIN_RESULTS <= n <= MAX_RESULTS:
            raise validation(f"MaxResults must be from {MIN_RESULTS} to {MAX_RESULTS}.",
                             "INVALID_PARAMETER_VALUE")
        return n

    def _start_index(self, op: str, first: str, second: str, next_token: str | None,
                     starting: int | None) -> int:
        if next_token is None:
            if starting is not None and starting < 0:
                raise validation("StartingBlockIndex must be >= 0.", "INVALID_PARAMETER_VALUE")
            return starting or 0
        fields = self.tokens.open(next_token)
        if fields is None or len(fields) != 6 or fields[0] != "p":
            raise validation("The pagination token is not valid.", "INVALID_PAGE_TOKEN")
        _, t_op, t_first, t_second, t_index, t_expiry = fields
        if (t_op, t_first, t_second) != (op, first, second):
            raise validation("The pagination token was issued for other parameters.",
                             "INVALID_PAGE_TOKEN")
        if self.clock.now() > float(t_expiry):
            raise validation("The pagination token has expired.", "INVALID_PAGE_TOKEN")
        return int(t_index)

    def _page(self, op: str, first: str, second: str, indices: list[int], start: int,
              limit: int) -> tuple[list[int], str | None]:
        now = self.clock.now()
        pos = next((k for k, i in enumerate(indices) if i >= start), len(indices))
        if self.empty_pages > 0:
            self.empty_pages -= 1
            nxt = indices[pos] if pos < len(indices) else start
            return [], self.tokens.make("p", op, first, second, nxt, now + NEXT_TOKEN_TTL)
        page = indices[pos: pos + limit]
        rest = indices[pos + limit:]
        token = self.tokens.make("p", op, first, second, rest[0], now + NEXT_TOKEN_TTL) \
            if rest else None
        return page, token

    def _block_token(self, snapshot_id: str, index: int, expiry: float) -> str:
        return self.tokens.make("b", snapshot_id, index, expiry)

    def list_blocks(self, snapshot_id: str, *, max_results: int | None, next_token: str | None,
                    starting: int | None) -> dict[str, Any]:
        with self.lock:
            snap = self._completed(snapshot_id)
            limit = self._page_args(max_results)
            start = self._start_index("lsb", "", snapshot_id, next_token, starting)
            page, token = self._page("lsb", "", snapshot_id, sorted(snap.blocks), start, limit)
            expiry = self.clock.now() + BLOCK_TOKEN_TTL
            resp: dict[str, Any] = {
                "Blocks": [{"BlockIndex": i, "BlockToken": self._block_token(snapshot_id, i, expiry)}
                           for i in page],
                "ExpiryTime": expiry, "VolumeSize": snap.volume_size, "BlockSize": BLOCK_SIZE,
            }
            if token:
                resp["NextToken"] = token
            return resp

    def list_changed(self, first_id: str | None, second_id: str, *, max_results: int | None,
                     next_token: str | None, starting: int | None) -> dict[str, Any]:
        with self.lock:
            second = self._completed(second_id)
            first = self._completed(first_id) if first_id else None
            if first is not None and not self.related(first, second):
                raise validation(f"The snapshots '{first_id}' and '{second_id}' are not of the "
                                 "same volume/snapshot lineage.", "UNRELATED_SNAPSHOTS")
            limit = self._page_args(max_results)
            start = self._start_index("lcb", first_id or "", second_id, next_token, starting)
            a = first.blocks if first is not None else {}
            b = second.blocks
            changed = sorted(i for i in set(a) | set(b) if a.get(i) != b.get(i))
            page, token = self._page("lcb", first_id or "", second_id, changed, start, limit)
            expiry = self.clock.now() + BLOCK_TOKEN_TTL
            entries = []
            for i in page:
                e: dict[str, Any] = {"BlockIndex": i}
                if i in a and first_id:
                    e["FirstBlockToken"] = self._block_token(first_id, i, expiry)
                if i in b:
                    e["SecondBlockToken"] = self._block_token(second_id, i, expiry)
                entries.append(e)
            size = max(second.volume_size, first.volume_size if first else 0)
            resp: dict[str, Any] = {"ChangedBlocks": entries, "ExpiryTime": expiry,
                                    "VolumeSize": size, "BlockSize": BLOCK_SIZE}
            if token:
                resp["NextToken"] = token
            return resp

    # ------------------------------------------------------------------ GetSnapshotBlock

    def get_block(self, snapshot_id: str, index: int, block_token: str | None) -> tuple[bytes, str]:
        with self.lock:
            snap = self._completed(snapshot_id)
            if not 0 <= index < snap.volume_size * BLOCKS_PER_GIB:
                raise validation(f"BlockIndex {index} is outside the snapshot.", "INVALID_BLOCK")
            fields = self.tokens.open(block_token or "")
            if fields is None or len(fields) != 4 or fields[0] != "b":
                raise validation("The block token is not valid.", "INVALID_BLOCK_TOKEN")
            _, t_snap, t_index, t_expiry = fields
            if t_snap != snapshot_id or int(t_index) != index:
                raise validation("The block token was issued for another snapshot or block.",
                                 "INVALID_BLOCK_TOKEN")
            if self.clock.now() > float(t_expiry):
                raise validation("The block token has expired.", "INVALID_BLOCK_TOKEN")
            digest = snap.blocks.get(index)
            if digest is None:
                raise validation(f"Block {index} is not in the snapshot.", "INVALID_BLOCK")
            data = self.blobs.read(digest)
        return data, base64.b64encode(digest).decode()


def read_allocated_blocks(path: Path) -> Iterable[tuple[int, bytes]]:
    """(index, 512 KiB data) for every block of ``path`` that holds allocated extents
    (SEEK_DATA/SEEK_HOLE), in ascending order; a short last block is zero-padded."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0  # always a block boundary past every block already yielded
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            last = (end - 1) // BLOCK_SIZE
            for index in range(start // BLOCK_SIZE, last + 1):
                data = os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
                if len(data) < BLOCK_SIZE:
                    data += bytes(BLOCK_SIZE - len(data))
                yield index, data
            pos = (last + 1) * BLOCK_SIZE
    finally:
        os.close(fd)
