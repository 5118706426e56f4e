"""blockstream: copy extents between NBD endpoints, hashing every block.

The hot loop is C (``blockstream._blockstream``: libnbd AIO, pthreads, the GIL
released for the whole copy).  Python plans the extents and reads progress.
See docs/blockstream.md for the threading model, durability and resume rules,
the hash choice and the manifest format.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from blockstream import _blockstream as _c

__all__ = [
    "BLOCK_SIZE_DEFAULT",
    "HASHES",
    "HASH_SIZE",
    "MANIFEST_MAGIC",
    "BlockstreamError",
    "Cancelled",
    "Extent",
    "ManifestError",
    "Progress",
    "Stream",
    "block_status",
    "copy",
    "hash_blocks",
    "manifest_info",
    "manifest_size",
    "pack_manifest",
    "plan_extents",
    "unpack_manifest",
    "zero_manifest",
]

BLOCK_SIZE_DEFAULT = 65536
HASH_SIZE = 16
HASHES = ("xxh128", "blake2b", "none")

MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 16 << 20
MIN_REQUEST = 4 << 10
MAX_REQUEST = 32 << 20
MAX_CONNECTIONS = 64
MAX_IN_FLIGHT = 1024
MAX_BUFFER_BYTES = 8 << 30  # connections * in_flight * max_request
_MAX_SIZE = 1 << 62

# base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO) and dirty bitmap flag
STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1


def _int(name: str, value: object, lo: int = 0, hi: int = _MAX_SIZE) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _block_size(value: object) -> int:
    bs = _int("block_size", value, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
    if bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    return bs


def _hash_name(value: object, *, allow_none: bool = True) -> str:
    if not isinstance(value, str):
        raise TypeError(f"hash must be a str, not {type(value).__name__}")
    if value not in HASHES or (value == "none" and not allow_none):
        allowed = HASHES if allow_none else HASHES[:2]
        raise ValueError(f"hash must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class Extent:
    """A byte range of the disk.

    ``zero=True`` means the source is known to read as zeros there: it is not
    read, its blocks get the zero-block hash and are written with NBD
    write_zeroes.
    """

    offset: int
    length: int
    zero: bool = False

    def __post_init__(self) -> None:
        _int("offset", self.offset)
        _int("length", self.length)
        if not isinstance(self.zero, bool):
            raise TypeError("zero must be a bool")

    @property
    def end(self) -> int:
        return self.offset + self.length


# BlockstreamError(message, *, extent=None, nbd_error="", errno=0, endpoint=None)
# and its subclass Cancelled are created by the C module (module state), so the
# engine raises them without any set-up from here.
BlockstreamError = _c.BlockstreamError
Cancelled = _c.Cancelled


class ManifestError(ValueError):
    """A packed manifest is corrupt or does not match its header."""


@dataclass
class Progress:
    """A snapshot of a stream's counters (see docs/blockstream.md)."""

    bytes_read: int
    bytes_written: int
    bytes_zero: int
    bytes_skipped: int
    bytes_total: int
    extents_done: int
    extents_total: int
    durable_offset: int
    rate: float
    done: bool
    # bytes read / data written by the requests below durable_offset; a run that
    # fails moves bytes_read - read_durable (bytes_written - written_durable) again
    read_durable: int = 0
    written_durable: int = 0
    # connection pairs copying; extra pairs the servers refused or that did not
    # complete their handshake within connect_timeout (the copy went on without
    # them); whether every server advertised NBD_FLAG_CAN_MULTI_CONN (without it
    # each flush round flushes every connection; see docs/blockstream.md)
    connections: int = 0
    connections_dropped: int = 0
    multi_conn: bool = False

    @classmethod
    def _from_tuple(cls, t: tuple[Any, ...]) -> Progress:
        return cls(*t)


def _extent_tuples(extents: Iterable[object]) -> object:
    """Extent objects as the (offset, length, zero) tuples the C engine takes;
    anything else is passed on for the engine to check."""
    if isinstance(extents, (str, bytes)) or not isinstance(extents, Iterable):
        return extents
    return [(e.offset, e.length, e.zero) if isinstance(e, Extent) else e for e in extents]


class Stream:
    """One copy (or hash-only pass) of a list of extents.

    ``run()`` blocks the calling thread with the GIL released; ``cancel()``,
    ``set_rate_limit()`` and ``progress()`` may be called from other threads
    meanwhile.  A Stream runs once; resume with a new Stream and
    ``start_offset=progress().durable_offset``.

    ``durable_offset`` advances by flush rounds: one starts after
    ``flush_interval`` bytes were written, or (``flush_seconds`` > 0) after that
    many seconds with anything written, whichever comes first, or when
    ``max_unflushed`` (data bytes taken beyond ``durable_offset``: what a failed
    run sends again) is reached, which also holds new requests back.

    ``connect_timeout``: seconds for connecting and the NBD handshake (the first
    connection pair fails the stream; an extra pair is dropped).
    ``request_timeout``: seconds without any reply on a connection that has
    commands outstanding before the stream fails with the extent (0: no limit).
    """

    def __init__(
        self,
        source: str,
        destination: str | None,
        extents: Sequence[Extent],
        *,
        disk_size: int,
        manifest: bytearray | None = None,
        block_size: int = BLOCK_SIZE_DEFAULT,
        hash: str = "xxh128",
        compare: bool = False,
        max_request: int = 4 << 20,
        connections: int = 4,
        in_flight: int = 16,
        rate_limit: int | None = None,
        allow_trim: bool = False,
        start_offset: int = 0,
        flush_interval: int = 256 << 20,
        flush_seconds: float = 0.0,
        connect_timeout: float = 30.0,
        request_timeout: float = 60.0,
        max_unflushed: int | None = None,
    ) -> None:
        # Every argument is checked once, by the C engine (TypeError / ValueError
        # before anything is connected).
        self._c = _c.Stream(
            source,
            destination,
            _extent_tuples(extents),
            disk_size,
            block_size=block_size,
            hash=hash,
            compare=compare,
            max_request=max_request,
            connections=connections,
            in_flight=in_flight,
            rate_limit=rate_limit,
            allow_trim=allow_trim,
            start_offset=start_offset,
            flush_interval=flush_interval,
            flush_seconds=flush_seconds,
            manifest=manifest,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            max_unflushed=max_unflushed,
        )
        self.source = source
        self.destination = destination
        self.disk_size = disk_size
        self.block_size = block_size
        self.manifest = manifest

    def run(self) -> Progress:
        """Copy everything; returns the final progress.

        Raises BlockstreamError (with the failing extent, side and NBD error)
        or Cancelled.
        """
        return Progress._from_tuple(self._c.run())

    def cancel(self) -> None:
        """Stop soon; run() raises Cancelled.  Thread-safe."""
        self._c.cancel()

    def set_rate_limit(self, bytes_per_s: int | None) -> None:
        """Change the source read rate limit (None: unlimited).  Thread-safe."""
        self._c.set_rate_limit(bytes_per_s)

    def progress(self) -> Progress:
        """A consistent snapshot of the counters.  Thread-safe and cheap."""
        return Progress._from_tuple(self._c.progress())


def copy(source: str, destination: str | None, extents: Sequence[Extent], **kw: Any) -> Progress:
    """``Stream(source, destination, extents, **kw).run()``."""
    return Stream(source, destination, extents, **kw).run()


def manifest_size(disk_size: int, block_size: int = BLOCK_SIZE_DEFAULT) -> int:
    """Bytes of the manifest of a disk: one 16-byte hash per (partial) block."""
    disk_size = _int("disk_size", disk_size)
    block_size = _block_size(block_size)
    return -(-disk_size // block_size) * HASH_SIZE


def zero_manifest(disk_size: int, block_size: int = BLOCK_SIZE_DEFAULT, hash: str = "xxh128") -> bytearray:
    """The manifest of an all-zero disk (a fresh destination)."""
    disk_size = _int("disk_size", disk_size)
    block_size = _block_size(block_size)
    hash = _hash_name(hash, allow_none=False)
    result: bytearray = _c.zero_manifest(disk_size, block_size, hash)
    return result


def hash_blocks(data: bytes, block_size: int, hash: str = "xxh128") -> bytes:
    """Hash ``data`` block by block exactly like the streamer (last block: its
    actual length)."""
    _int("block_size", block_size, 1)
    hash = _hash_name(hash, allow_none=False)
    result: bytes = _c.hash_blocks(data, block_size, hash)
    return result


# ---- manifest packing -------------------------------------------------------

_MAGIC = b"BSMF"
#: The first bytes of a packed manifest (its format: docs/blockstream.md "Manifest format").
MANIFEST_MAGIC = _MAGIC
_VERSION = 1
# magic, version, flags, hash name, block_size, disk_size, entries
_HEADER = struct.Struct("<4sHH8sIQQ")
_CHECK = struct.Struct("<Q")


def pack_manifest(
    manifest: bytes | bytearray | memoryview,
    *,
    block_size: int = BLOCK_SIZE_DEFAULT,
    disk_size: int | None = None,
    hash: str = "xxh128",
) -> bytes:
    """Compress a manifest (zstd) behind a small self-describing header.

    ``disk_size`` defaults to ``entries * block_size`` (exact for disks whose
    size is a multiple of the block size).
    """
    data = memoryview(manifest).cast("B")  # no copy: a terabyte's manifest is 256 MiB
    if len(data) % HASH_SIZE:
        raise ValueError(f"manifest length {len(data)} is not a multiple of {HASH_SIZE}")
    block_size = _block_size(block_size)
    hash = _hash_name(hash, allow_none=False)
    entries = len(data) // HASH_SIZE
    if disk_size is None:
        disk_size = entries * block_size
    disk_size = _int("disk_size", disk_size)
    if manifest_size(disk_size, block_size) != len(data):
        raise ValueError(
            f"manifest has {entries} entries but disk_size {disk_size} with block_size"
            f" {block_size} needs {manifest_size(disk_size, block_size) // HASH_SIZE}"
        )
    header = _HEADER.pack(_MAGIC, _VERSION, 0, hash.encode().ljust(8, b"\0"), block_size, disk_size, entries)
    header += _CHECK.pack(_c.xxh64(header))
    compressed: bytes = _c.zstd_compress(data, 3)
    return header + compressed


def manifest_info(packed: bytes) -> dict[str, Any]:
    """The header of a packed manifest (version, hash, block_size, disk_size, entries),
    checked (checksum, magic, geometry) without decompressing the entries. Raises
    ManifestError like unpack_manifest."""
    hsize = _HEADER.size + _CHECK.size
    if len(packed) < hsize:
        raise ManifestError("packed manifest is truncated")
    header = bytes(packed[: _HEADER.size])
    (check,) = _CHECK.unpack_from(packed, _HEADER.size)
    if _c.xxh64(header) != check:
        raise ManifestError("packed manifest header checksum mismatch")
    magic, version, flags, hname, block_size, disk_size, entries = _HEADER.unpack(header)
    if magic != _MAGIC:
        raise ManifestError("not a blockstream manifest (bad magic)")
    if version != _VERSION or flags != 0:
        raise ManifestError(f"unsupported manifest version {version}")
    hash = hname.rstrip(b"\0").decode("ascii", "replace")
    if hash not in HASHES[:2]:
        raise ManifestError(f"unknown manifest hash {hash!r}")
    try:
        want = manifest_size(disk_size, block_size)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"bad manifest geometry: {e}") from None
    if want != entries * HASH_SIZE:
        raise ManifestError("manifest entry count does not match disk_size/block_size")
    return {"version": version, "hash": hash, "block_size": block_size,
            "disk_size": disk_size, "entries": entries}


def unpack_manifest(packed: bytes) -> tuple[bytearray, dict[str, Any]]:
    """Inverse of pack_manifest.  Raises ManifestError on any corruption."""
    packed = bytes(packed)
    info = manifest_info(packed)
    try:
        data = _c.zstd_decompress(packed[_HEADER.size + _CHECK.size:],
                                  info["entries"] * HASH_SIZE)
    except ValueError as e:
        raise ManifestError(f"packed manifest body is corrupt: {e}") from None
    return data, info


# ---- block status and planning -----------------------------------------------


def block_status(
    uri: str, context: str = "base:allocation", *, disk_size: int | None = None
) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of ``context`` covering the export (or
    ``[0, disk_size)``), adjacent equal entries merged.

    Raises BlockstreamError naming the context when the server lacks it.
    """
    if not isinstance(uri, str) or not isinstance(context, str):
        raise TypeError("uri and context must be str")
    limit = 0 if disk_size is None else _int("disk_size", disk_size)
    if disk_size == 0:
        return []
    entries, export_size = _c.block_status(uri, context, limit)
    if disk_size is not None and disk_size > export_size:
        raise ValueError(f"disk_size {disk_size} is larger than the export ({export_size})")
    return list(entries)


def _merged(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _split(ranges: list[tuple[int, int]], zeros: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """Cut sorted merged ``ranges`` into pieces inside / outside ``zeros``."""
    out: list[tuple[int, int, bool]] = []
    j = 0
    for s, e in ranges:
        while j < len(zeros) and zeros[j][1] <= s:
            j += 1
        k = j
        pos = s
        while pos < e:
            if k >= len(zeros) or zeros[k][0] >= e:
                out.append((pos, e, False))
                break
            zs, ze = zeros[k]
            if zs > pos:
                out.append((pos, zs, False))
                pos = zs
            end = min(ze, e)
            out.append((pos, end, True))
            pos = end
            k += 1
    return out


def _check_status(name: str, entries: object) -> list[tuple[int, int, int]]:
    if not isinstance(entries, (list, tuple)):
        raise TypeError(f"{name} must be a list of (offset, length, flags)")
    out = []
    for item in entries:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise TypeError(f"{name} entries must be (offset, length, flags)")
        o, n, f = item
        out.append((_int(f"{name} offset", o), _int(f"{name} length", n), _int(f"{name} flags", f)))
    return out


def plan_extents(
    allocation: list[tuple[int, int, int]],
    dirty: list[tuple[int, int, int]] | None,
    *,
    disk_size: int,
    granularity: int,
) -> list[Extent]:
    """Turn block-status answers into the extent list a Stream takes.

    ``allocation``: base:allocation entries (flags bit0 HOLE, bit1 ZERO).
    ``dirty``: qemu:dirty-bitmap entries (flags bit0 dirty) or None for a full
    copy.  Only the ZERO flag makes a region skippable/zero: HOLE without ZERO
    (e.g. a backing file shows through) is data.  Regions the allocation list
    does not describe are data.  The result is sorted, merged, clipped to
    disk_size, with every edge on a multiple of ``granularity`` (or at
    disk_size); a zero extent is only ever made of whole granules.
    """
    disk_size = _int("disk_size", disk_size)
    g = _int("granularity", granularity, 1)
    alloc = _check_status("allocation", allocation)
    dirty_l = None if dirty is None else _check_status("dirty", dirty)

    def down(x: int) -> int:
        return x - x % g

    def up(x: int) -> int:
        return min(disk_size, -(-x // g) * g)

    zero_raw = _merged((o, min(o + n, disk_size)) for o, n, f in alloc if f & STATE_ZERO and o < disk_size)
    # whole granules inside the zero regions (the partial tail granule counts
    # when the zero region reaches the end of the disk)
    zero_full = _merged((up(s), e if e == disk_size else down(e)) for s, e in zero_raw)
    if dirty_l is None:
        pieces = _split([(0, disk_size)] if disk_size else [], zero_full)
        return [Extent(s, e - s) for s, e, z in pieces if not z]

    ranges = _merged(
        (down(o), up(min(o + n, disk_size)))
        for o, n, f in dirty_l
        if f & STATE_DIRTY and o < disk_size and n > 0
    )
    result: list[Extent] = []
    for s, e, z in _split(ranges, zero_full):
        if result and result[-1].zero == z and result[-1].end == s:
            last = result.pop()
            result.append(Extent(last.offset, e - last.offset, z))
        else:
            result.append(Extent(s, e - s, z))
    return result
