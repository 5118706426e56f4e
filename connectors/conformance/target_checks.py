"""Target checks: prepare, begin, endpoint, commit, abort, open, delete."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from connectors.base import Target
from connectors.conformance.common import G, MiB, check_capabilities, expect, qemu_io, read_export
from transcend.models import (
    ChangeKind,
    DiskInfo,
    PointDisk,
    PointMeta,
    RecoveryPoint,
    Workload,
    WorkloadRef,
)

T_SIZE = 8 * MiB


def _commit(target: Target, protection: str, cycle: str, disks: list[DiskInfo],
            last: RecoveryPoint | None, writes: list[tuple[int, int, int]],
            expected: bytearray, seq: int) -> RecoveryPoint:
    staging = target.begin(protection, cycle, disks, last)
    ep = staging.endpoint("vda")
    expect(ep.writable and ep.size == T_SIZE, f"staging endpoint {ep}")
    qemu_io(ep.uri, *[f"write -P {p:#x} {o} {n}" for o, n, p in writes])
    for o, n, p in writes:
        expected[o:o + n] = bytes([p]) * n
    staging.close()
    now = datetime.now(UTC)
    locations = staging.commit(PointMeta(cycle_id=cycle, instant=now, block_size=G,
                                         kind=ChangeKind.INCREMENTAL if last else ChangeKind.FULL))
    return RecoveryPoint(id=cycle, protection=protection, seq=seq, instant=now, committed_at=now,
                         disks=[PointDisk(disk="vda", size=T_SIZE, location=locations[0],
                                          block_size=G)])


def _point_bytes(target: Target, point: RecoveryPoint, out: Path) -> bytes:
    ep = target.open(point, "vda")
    try:
        expect(not ep.writable, "open() of a point is writable")
        return read_export(ep.uri, out)
    finally:
        target.close(point, "vda")


def check_target_points_abort_and_delete(target: Target, tmp_path: Path) -> None:
    check_capabilities(target)
    disks = [DiskInfo(id="vda", size=T_SIZE)]
    wl = Workload(ref=WorkloadRef(platform="src", id="conf-vm"), name="conf-vm", cpus=1,
                  memory_mib=64, disks=disks)
    target.prepare("tconf", disks, [wl])
    target.prepare("tconf", disks, [wl])  # idempotent
    expected = bytearray(T_SIZE)
    p1 = _commit(target, "tconf", "p1", disks, None, [(0, 2 * G, 0x11), (5 * MiB, G, 0x12)],
                 expected, 1)
    first = bytes(expected)
    expect(_point_bytes(target, p1, tmp_path / "p1.raw") == first,
           "the first point does not hold what was written")

    # An aborted cycle leaves no trace in the next one.
    staging = target.begin("tconf", "p2", disks, p1)
    qemu_io(staging.endpoint("vda").uri, f"write -P 0x66 {MiB} {G}")
    staging.close()
    staging.abort()
    p3 = _commit(target, "tconf", "p3", disks, p1, [(G, 512, 0x31), (7 * MiB, G, 0x32)],
                 expected, 2)
    third = bytes(expected)
    expect(_point_bytes(target, p3, tmp_path / "p3.raw") == third,
           "a point over its parent does not hold parent + writes (or an abort left a trace)")
    expect(_point_bytes(target, p1, tmp_path / "p1b.raw") == first,
           "writing a new point changed an older one")

    # Retention: the successor keeps its bytes.
    moved = target.delete(p1, p3)
    p3 = moved or p3
    expect(_point_bytes(target, p3, tmp_path / "p3b.raw") == third,
           "deleting a point changed its successor's bytes")


TARGET_CHECKS: list[Callable[[Target, Path], None]] = [check_target_points_abort_and_delete]
