"""Read and check the sequence-numbered records the test guest writes to its disk.

The records partition is partition 3 of the guest disk's MBR (type 0xda).  Slot 0 is
the config sector (:class:`tests.harness.guest.GuestConfig`); record N lives in slot N,
bytes ``[N * record_size, (N + 1) * record_size)`` of the partition::

    bytes   0..63   b"TRNSCREC <seq %012d> <record_size %08d> <md5 hex>\\n"
    bytes  64..127  b"boot=<boot id> uptime=<s>" space-padded to 63 bytes + b"\\n"
    bytes 128..     FILL_LINE repeated (constant)

and the md5 covers bytes 0..30 and 64..record_size-1.  A record is valid when the
magic, the number (equal to its slot), the size and the checksum all match.

Sources: a local image in any qemu format (raw is read directly, others through
``qemu-img convert -U``, so a running domain's disk can be read too) or an NBD URI
(``nbd://``, ``nbd+unix://``, ... read with ``nbdcopy``).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .guest import FILL_LINE, RECORD_MAGIC, SECTOR, GuestConfig

__all__ = [
    "check_contiguous",
    "make_record",
    "parse_records",
    "partition_table",
    "read_config",
    "read_records",
    "records_region",
    "write_records_region",
]

Source = str | os.PathLike[str]

_NBD_SCHEMES = ("nbd:", "nbds:", "nbd+unix:", "nbds+unix:", "nbd+vsock:", "nbds+vsock:")


def _is_nbd(source: Source) -> bool:
    return isinstance(source, str) and source.startswith(_NBD_SCHEMES)


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@contextmanager
def _as_raw(source: Source) -> Iterator[Path]:
    """A raw, directly readable view of ``source`` (a temporary sparse copy if needed)."""
    if _is_nbd(source):
        with tempfile.TemporaryDirectory(prefix="transcend-records-") as tmp:
            out = Path(tmp) / "disk.raw"
            _run(["nbdcopy", str(source), str(out)])
            yield out
        return
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_block_device():
        yield path
        return
    fmt = _image_format(path)
    if fmt == "raw":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="transcend-records-") as tmp:
        out = Path(tmp) / "disk.raw"
        _run(["qemu-img", "convert", "-U", "-q", "-f", fmt, "-O", "raw",
              str(path), str(out)])
        yield out


def _mbr_partitions(mbr: bytes) -> list[tuple[int, int, int]]:
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise ValueError("no MBR partition table (missing 0x55aa signature)")
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i : 462 + 16 * i]
        ptype = entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if ptype and count:
            parts.append((start * SECTOR, count * SECTOR, ptype))
    return parts


def partition_table(source: Source) -> list[tuple[int, int, int]]:
    """``(offset, size, type)`` in bytes of each MBR primary partition of a disk."""
    if not _is_nbd(source):
        return _mbr_partitions(_read_mbr(Path(source)))
    with _as_raw(source) as raw, raw.open("rb") as f:
        return _mbr_partitions(f.read(SECTOR))


def records_region(raw_disk: bytes | mmap.mmap) -> tuple[int, int]:
    """``(offset, size)`` of the records partition (3rd partition, type 0xda) of a raw disk."""
    parts = _mbr_partitions(bytes(raw_disk[:SECTOR]))
    if len(parts) < 3 or parts[2][2] != 0xDA:
        raise ValueError(f"not a transcend guest disk: partitions {parts}")
    return parts[2][0], parts[2][1]


def make_record(seq: int, record_size: int = SECTOR, info: str = "boot=python") -> bytes:
    """The exact bytes the guest writes for record ``seq`` (``info`` is the second line)."""
    body = info.encode().ljust(63)[:63] + b"\n"
    fill_len = record_size - 128
    body += (FILL_LINE * (fill_len // len(FILL_LINE) + 1))[:fill_len]
    prefix = b"%s %012d %08d " % (RECORD_MAGIC, seq, record_size)
    digest = hashlib.md5(prefix + body).hexdigest().encode()
    return prefix + digest + b"\n" + body


def _valid(slot: bytes, seq: int | None, record_size: int) -> int | None:
    """The record number in ``slot`` if the record is intact, else None."""
    if slot[:8] != RECORD_MAGIC or slot[63:64] != b"\n":
        return None
    try:
        n = int(slot[9:21])
        size = int(slot[22:30])
    except ValueError:
        return None
    if size != record_size or (seq is not None and n != seq):
        return None
    digest = hashlib.md5(slot[:31] + slot[64:record_size]).hexdigest().encode()
    return n if digest == slot[31:63] else None


def parse_records(
    data: bytes | mmap.mmap, record_size: int, offset: int = 0, length: int | None = None
) -> list[int]:
    """Record numbers found in a records partition, in slot order.

    ``data[offset:offset + length]`` is the partition (default: all of ``data``).  Slot
    N normally holds record N.  An intact record found in the wrong slot is reported
    with its own number (so :func:`check_contiguous` flags it); torn or corrupted
    records (bad checksum) are left out, leaving a gap.
    """
    if length is None:
        length = len(data) - offset
    found: list[int] = []
    limit = offset + length - record_size  # last possible slot start
    pos = offset + record_size  # slot 0 is the config sector
    while pos <= limit:
        hit = data.find(RECORD_MAGIC, pos, offset + length)
        if hit < 0:
            break
        slot = hit - (hit - offset) % record_size
        if hit == slot and slot <= limit:
            n = _valid(data[slot : slot + record_size], None, record_size)
            if n is not None:
                found.append(n)
        pos = slot + record_size
    return found


def read_config(source: Source) -> GuestConfig:
    """The workload config stored on a guest disk (image path or NBD URI)."""
    with _as_raw(source) as raw, raw.open("rb") as f:
        offset, _ = records_region(f.read(SECTOR))
        f.seek(offset)
        return GuestConfig.from_sector(f.read(SECTOR))


def read_records(source: Source) -> list[int]:
    """Record numbers of the valid records on a guest disk, in slot order.

    ``source``: a local image (any qemu format; raw read directly) or an NBD URI.
    Use :func:`check_contiguous` on the result.
    """
    with _as_raw(source) as raw, raw.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            raise ValueError(f"{source}: empty disk")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            offset, length = records_region(m)
            if offset + length > size:
                raise ValueError(f"{source}: records partition ends past the disk ({size} bytes)")
            config = GuestConfig.from_sector(m[offset : offset + SECTOR])
            return parse_records(m, config.record_size, offset, length)


def write_records_region(image: Source, offset: int, data: bytes, *, fmt: str | None = None) -> None:
    """Write ``data`` at byte ``offset`` of the records partition of a local guest disk.

    For tests that seed or damage records (e.g. ``make_record`` output at
    ``seq * record_size``).  Any qemu format; the image must not be in use.
    """
    path = Path(image)
    fmt = fmt or _image_format(path)
    start, size = records_region(_read_mbr(path, fmt))
    if offset < 0 or offset + len(data) > size:
        raise ValueError(f"write of {len(data)} bytes at {offset} outside the records partition")
    with tempfile.NamedTemporaryFile(prefix="transcend-records-") as f:
        f.write(data)
        f.flush()
        _run(["qemu-io", "-f", fmt, "-c", f"write -q -s {f.name} {start + offset} {len(data)}",
              str(path)])


def _image_format(path: Path) -> str:
    info = json.loads(_run(["qemu-img", "info", "-U", "--output=json", str(path)]))
    return str(info["format"])


def _read_mbr(path: Path, fmt: str | None = None) -> bytes:
    """First sector of a local image of any format (``qemu-img dd``; skip=0 only)."""
    fmt = fmt or _image_format(path)
    if fmt == "raw" or path.is_block_device():
        with path.open("rb") as f:
            return f.read(SECTOR)
    with tempfile.TemporaryDirectory(prefix="transcend-records-") as tmp:
        out = Path(tmp) / "mbr"
        _run(["qemu-img", "dd", "-U", "-f", fmt, "-O", "raw", f"bs={SECTOR}", "count=1",
              f"if={path}", f"of={out}"])
        return out.read_bytes()


def check_contiguous(records: Sequence[int]) -> int:
    """Check that ``records`` is exactly 1, 2, ..., N and return N (0 for no records).

    Raises AssertionError naming the first gap, duplicate or misplaced record.
    """
    for i, n in enumerate(records):
        expected = i + 1
        if n != expected:
            if n < expected:
                why = "duplicate or misplaced record"
            elif n == expected + 1:
                why = f"record {expected} missing or damaged"
            else:
                why = f"records {expected}..{n - 1} missing or damaged"
            what = f"expected record {expected}, found {n} ({why})"
            raise AssertionError(
                f"records are not a contiguous prefix: {what} "
                f"(position {i}; {len(records)} records, last {records[-1]})"
            )
    return len(records)
