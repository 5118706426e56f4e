"""block_status / plan_extents against qemu-nbd exports, including a qcow2 with
a persistent dirty bitmap, and an incremental copy driven by the bitmap."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
from harness.nbd import nbdkit, qemu_nbd

from blockstream import (
    BlockstreamError,
    Extent,
    block_status,
    copy,
    hash_blocks,
    plan_extents,
    zero_manifest,
)

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
G = 65536
SIZE = 32 * MiB


def qemu_io(image: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def raw_bytes(image: Path) -> bytes:
    out = image.with_suffix(".raw-readback")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def covers(entries: list[tuple[int, int, int]], size: int) -> bool:
    pos = 0
    for off, length, _ in entries:
        if off != pos or length <= 0:
            return False
        pos += length
    return pos == size


@pytest.fixture
def tracked(tmp_path: Path) -> tuple[Path, Path]:
    """A qcow2 with data, zeros and holes; a copy of it (the replica of the
    last cycle); then a persistent dirty bitmap and new writes on top."""
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
    qemu_io(img, "write -P 0x11 0 2M", "write -z 2M 1M", "write -P 0x33 20M 1M")
    replica = tmp_path / "replica.qcow2"
    shutil.copy(img, replica)
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", "-f", "qcow2", str(img), "bm0"], check=True)
    qemu_io(
        img,
        "write -P 0x55 8M 64k",  # new data in a hole
        "write -z 0 64k",  # data overwritten with zeros
        f"write -P 0x22 {12 * MiB + 100} 10",  # a few bytes, unaligned
        "write -P 0x44 20M 128k",  # data overwritten with data
        f"write -z {SIZE - 64 * KiB} 64k",
    )  # zeros over a hole
    return img, replica


def test_base_allocation(tracked: tuple[Path, Path]) -> None:
    img, _ = tracked
    with qemu_nbd(img, fmt="qcow2", read_only=True) as srv:
        alloc = block_status(srv.uri)
        assert covers(alloc, SIZE)
        part = block_status(srv.uri, disk_size=3 * MiB + 5)
        assert covers(part, 3 * MiB + 5)
        with pytest.raises(ValueError, match="larger than the export"):
            block_status(srv.uri, disk_size=SIZE + 512)
    zero = {(o, n) for o, n, f in alloc if f & 2}
    data = {(o, n) for o, n, f in alloc if not f & 2}
    assert (0, 64 * KiB) in zero  # zeroed cluster reads as zero
    assert (64 * KiB, 2 * MiB - 64 * KiB) in data
    assert any(o <= 2 * MiB and o + n >= 3 * MiB for o, n in zero)
    assert (8 * MiB, 64 * KiB) in data
    plan = plan_extents(alloc, None, disk_size=SIZE, granularity=G)
    assert plan == [
        Extent(64 * KiB, 2 * MiB - 64 * KiB),
        Extent(8 * MiB, G),
        Extent(12 * MiB, G),
        Extent(20 * MiB, MiB),
    ]


def test_dirty_bitmap_extents(tracked: tuple[Path, Path]) -> None:
    img, _ = tracked
    with qemu_nbd(img, fmt="qcow2", read_only=True, bitmap="bm0") as srv:
        dirty = block_status(srv.uri, "qemu:dirty-bitmap:bm0")
        alloc = block_status(srv.uri)
        with pytest.raises(BlockstreamError, match="qemu:dirty-bitmap:other") as ei:
            block_status(srv.uri, "qemu:dirty-bitmap:other")
        assert ei.value.endpoint == "source"
    assert covers(dirty, SIZE)
    assert [(o, n) for o, n, f in dirty if f & 1] == [
        (0, G),
        (8 * MiB, G),
        (12 * MiB, G),
        (20 * MiB, 2 * G),
        (SIZE - G, G),
    ]
    plan = plan_extents(alloc, dirty, disk_size=SIZE, granularity=G)
    assert plan == [
        Extent(0, G, zero=True),
        Extent(8 * MiB, G),
        Extent(12 * MiB, G),
        Extent(20 * MiB, 2 * G),
        Extent(SIZE - G, G, zero=True),
    ]


def test_incremental_copy_from_dirty_bitmap(tracked: tuple[Path, Path]) -> None:
    """The replica of the previous cycle plus the dirty extents == the disk."""
    img, replica = tracked
    content = raw_bytes(img)
    before = raw_bytes(replica)
    assert before != content
    manifest = bytearray(hash_blocks(before, G))  # the replica's manifest
    with qemu_nbd(img, fmt="qcow2", read_only=True, bitmap="bm0") as s, qemu_nbd(replica, fmt="qcow2") as d:
        plan = plan_extents(
            block_status(s.uri), block_status(s.uri, "qemu:dirty-bitmap:bm0"), disk_size=SIZE, granularity=G
        )
        p = copy(s.uri, d.uri, plan, disk_size=SIZE, manifest=manifest)
    assert p.bytes_read == 4 * G  # zero extents are not read
    assert p.bytes_zero == 2 * G
    assert raw_bytes(replica) == content
    assert bytes(manifest) == hash_blocks(content, G)
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(img), str(replica)], capture_output=True
    )
    assert r.returncode == 0


def test_nbdkit_without_dirty_bitmap_context() -> None:
    with nbdkit("memory", "size=1M") as srv:
        alloc = block_status(srv.uri)
        assert covers(alloc, MiB)
        assert all(f & 2 for _, _, f in alloc)  # empty memory reads as zero
        assert plan_extents(alloc, None, disk_size=MiB, granularity=G) == []
        with pytest.raises(BlockstreamError, match="qemu:dirty-bitmap:bm0"):
            block_status(srv.uri, "qemu:dirty-bitmap:bm0")


def test_block_status_errors(tmp_path: Path) -> None:
    with pytest.raises(BlockstreamError) as ei:
        block_status(f"nbd+unix:///?socket={tmp_path}/none.sock")
    assert ei.value.errno == errno.ENOENT and "connect" in ei.value.nbd_error
    with pytest.raises(TypeError):
        block_status(b"nbd://x")  # type: ignore[arg-type]
    assert zero_manifest(0) == bytearray()
