"""The Source and Target contracts (connectors/base.py), checked the same way for every
connector.

Each test runs once per platform in tests/harness/conformance.py, through nothing
but the contract. For sources (freeze, changes, export, new_checkpoints, release,
reopen) the central property is the one replication depends on: applying a cycle's
change set, read from its export, onto the previous instant gives exactly the new
instant; a connector that misses a changed block fails here, whatever its mechanism.
For targets (prepare, begin, endpoint, commit, abort, open, delete): a point holds
exactly what was written on top of the previous one, an aborted cycle leaves no
trace, and deleting a point leaves its successor's bytes unchanged."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.base import ChangeSet, Frozen, NotFound, Target
from tests.harness.conformance import SOURCES, TARGETS, SourceUnderTest
from tests.harness.libvirtd import ensure_libvirtd
from transcend.models import (
    ChangeKind,
    Checkpoint,
    DiskInfo,
    FreezeOptions,
    PointDisk,
    PointMeta,
    RecoveryPoint,
    Workload,
    WorkloadRef,
)

G = 64 * 1024
MiB = 1 << 20


@pytest.fixture(scope="module", params=sorted(SOURCES))
def sut(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[SourceUnderTest]:
    """One VM per platform for the module; each test is its own protection."""
    if request.param == "kvm":
        ensure_libvirtd()
    with SOURCES[request.param](tmp_path_factory.mktemp(request.param)) as s:
        yield s


def _read(frozen: Frozen, disk: str, out: Path) -> bytes:
    ep = frozen.export(disk)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", ep.uri, str(out)],
                   check=True, capture_output=True)
    data = out.read_bytes()
    assert len(data) == ep.size
    return data


def _blocks(cs: ChangeSet, *, zero: bool | None = None) -> set[int]:
    return {b for e in cs.extents if zero is None or e.zero == zero
            for b in range(e.offset // G, (e.offset + e.length - 1) // G + 1)}


def _apply(base: bytes, new: bytes, cs: ChangeSet) -> bytes:
    out = bytearray(base)
    for e in cs.extents:
        out[e.offset:e.offset + e.length] = bytes(e.length) if e.zero else new[e.offset:e.offset + e.length]
    return bytes(out)


def _cycle(s: SourceUnderTest, cycle: str, since: dict[str, Checkpoint],
           opts: FreezeOptions | None = None, *, protection: str = "conf") -> Frozen:
    return s.source.freeze(protection, cycle, [s.workload], since, opts or FreezeOptions())


def test_lookup_by_id_and_name(sut: SourceUnderTest) -> None:
    by_id = sut.source.workload(sut.workload.ref.id)
    by_name = sut.source.workload(sut.workload.name)
    assert by_id.ref == by_name.ref == sut.workload.ref
    assert [d.id for d in by_id.disks] == [sut.disk]
    assert by_id.disks[0].size == 32 * MiB
    assert sut.workload.ref.id in [w.ref.id for w in sut.source.inventory()]
    with pytest.raises(NotFound, match="no-such-vm"):
        sut.source.workload("no-such-vm")


def test_change_sets_rebuild_every_instant(sut: SourceUnderTest, tmp_path: Path) -> None:
    d = sut.disk
    sut.write(0, 2 * G, 0xA1)
    sut.write(7 * MiB + 3 * G, G, 0xA2)

    # FULL: every block that holds data is in a data extent.
    f1 = _cycle(sut, "c1", {})
    assert f1.handle.kinds[d] == ChangeKind.FULL
    cs1 = f1.changes(d)
    img1 = _read(f1, d, tmp_path / "1.raw")
    nonzero = {i // G for i in range(0, len(img1), G) if img1[i:i + G].strip(b"\0")}
    assert nonzero and nonzero <= _blocks(cs1, zero=False)
    assert {0, 1, (7 * MiB) // G + 3} <= nonzero
    assert cs1.summary.data_bytes == sum(e.length for e in cs1.extents if not e.zero)
    f1.close()
    cp1 = {c.disk: c for c in f1.new_checkpoints()}
    assert set(cp1) == {d} and cp1[d].token
    f1.release(committed=True)

    # INCREMENTAL: the previous instant + this change set = this instant.
    sut.write(G, G, 0xB1)  # overwrites part of the first write
    sut.write(20 * MiB, 3 * G + 512, 0xB2)  # ends inside a block
    f2 = _cycle(sut, "c2", cp1)
    assert f2.handle.kinds[d] == ChangeKind.INCREMENTAL
    cs2 = f2.changes(d)
    img2 = _read(f2, d, tmp_path / "2.raw")
    assert img2 != img1
    assert _apply(img1, img2, cs2) == img2
    assert {1, (20 * MiB) // G, (20 * MiB) // G + 3} <= _blocks(cs2)
    assert cs2.summary.data_bytes < 32 * MiB // 4  # incremental, not a full read
    # The same instant reopened (another activity, another process) answers the same.
    again = sut.source.reopen(f2.handle)
    assert again.changes(d).extents == cs2.extents
    f2.close()
    cp2 = {c.disk: c for c in f2.new_checkpoints()}
    f2.release(committed=True)
    again.release(committed=True)  # release is idempotent

    # An uncommitted cycle loses nothing: the next one still sees its changes.
    sut.write(12 * MiB, G, 0xC1)
    f3 = _cycle(sut, "c3", cp2)
    f3.release(committed=False)
    sut.write(14 * MiB, G, 0xC2)
    f4 = _cycle(sut, "c4", cp2)
    cs4 = f4.changes(d)
    img4 = _read(f4, d, tmp_path / "4.raw")
    assert {(12 * MiB) // G, (14 * MiB) // G} <= _blocks(cs4)
    assert _apply(img2, img4, cs4) == img4
    f4.close()
    f4.release(committed=True)


def test_resync_covers_the_whole_disk(sut: SourceUnderTest) -> None:
    sut.write(MiB, G, 0xD1)
    f0 = _cycle(sut, "r0", {}, protection="resync")
    f0.release(committed=True)
    f = _cycle(sut, "r1", {c.disk: c for c in f0.new_checkpoints()},
               FreezeOptions(force_resync=True), protection="resync")
    assert f.handle.kinds[sut.disk] == ChangeKind.RESYNC
    cs = f.changes(sut.disk)
    covered = sorted((e.offset, e.offset + e.length) for e in cs.extents)
    pos = 0
    for start, end in covered:
        assert start <= pos, f"gap at {pos}"
        pos = max(pos, end)
    assert pos == 32 * MiB
    assert MiB // G in _blocks(cs, zero=False)
    f.close()
    f.release(committed=False)


def test_retried_freeze_returns_the_same_instant(sut: SourceUnderTest, tmp_path: Path) -> None:
    sut.write(0, G, 0xE1)
    first = _cycle(sut, "t1", {}, protection="retry")
    img = _read(first, sut.disk, tmp_path / "a.raw")
    first.close()
    sut.write(0, G, 0xE2)  # after the instant: must not show in a retried freeze
    retried = _cycle(sut, "t1", {}, protection="retry")
    assert retried.handle.instant == first.handle.instant
    assert _read(retried, sut.disk, tmp_path / "b.raw") == img
    retried.close()
    retried.release(committed=False)
    first.release(committed=False)


# --------------------------------------------------------------------------- targets

T_SIZE = 8 * MiB


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with TARGETS[request.param](tmp_path_factory.mktemp(f"t-{request.param}")) as t:
        yield t


def _qemu_io(uri: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run([*args, uri], capture_output=True, text=True, check=True)
    assert "error" not in (out.stdout + out.stderr).lower(), out


def _commit(target: Target, protection: str, cycle: str, disks: list[DiskInfo],
            last: RecoveryPoint | None, writes: list[tuple[int, int, int]],
            expected: bytearray, seq: int) -> RecoveryPoint:
    staging = target.begin(protection, cycle, disks, last)
    ep = staging.endpoint("vda")
    assert ep.writable and ep.size == T_SIZE
    _qemu_io(ep.uri, *[f"write -P {p:#x} {o} {n}" for o, n, p in writes])
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
        assert not ep.writable
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", ep.uri, str(out)],
                       check=True, capture_output=True)
        return out.read_bytes()
    finally:
        target.close(point, "vda")


def test_target_points_abort_and_delete(target: Target, tmp_path: Path) -> None:
    disks = [DiskInfo(id="vda", size=T_SIZE)]
    wl = Workload(ref=WorkloadRef(platform="src", id="conf-vm"), name="conf-vm", cpus=1,
                  memory_mib=64, disks=disks)
    target.prepare("tconf", disks, [wl])
    target.prepare("tconf", disks, [wl])  # idempotent
    expected = bytearray(T_SIZE)
    p1 = _commit(target, "tconf", "p1", disks, None, [(0, 2 * G, 0x11), (5 * MiB, G, 0x12)],
                 expected, 1)
    first = bytes(expected)
    assert _point_bytes(target, p1, tmp_path / "p1.raw") == first

    # An aborted cycle leaves no trace in the next one.
    staging = target.begin("tconf", "p2", disks, p1)
    _qemu_io(staging.endpoint("vda").uri, f"write -P 0x66 {MiB} {G}")
    staging.close()
    staging.abort()
    p3 = _commit(target, "tconf", "p3", disks, p1, [(G, 512, 0x31), (7 * MiB, G, 0x32)],
                 expected, 2)
    third = bytes(expected)
    assert _point_bytes(target, p3, tmp_path / "p3.raw") == third
    assert _point_bytes(target, p1, tmp_path / "p1b.raw") == first  # never written

    # Retention: the successor keeps its bytes.
    moved = target.delete(p1, p3)
    p3 = moved or p3
    assert _point_bytes(target, p3, tmp_path / "p3b.raw") == third
