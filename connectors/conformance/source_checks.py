"""Source checks: freeze, changes, export, new_checkpoints, release, reopen, lookups."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from connectors.base import ChangeSet, Frozen, NotFound
from connectors.conformance.common import (
    DISK_SIZE,
    G,
    MiB,
    SourceUnderTest,
    check_capabilities,
    expect,
    read_export,
)
from transcend.models import ChangeKind, Checkpoint, FreezeOptions


def _size(sut: SourceUnderTest) -> int:
    """The disk's size: ``DISK_SIZE``, or the ``disk_size`` a platform whose disks cannot be
    that small declares on its SourceUnderTest (EBS volumes are whole GiB)."""
    return int(getattr(sut, "disk_size", DISK_SIZE))


def _read(frozen: Frozen, disk: str, out: Path) -> bytes:
    ep = frozen.export(disk)
    data = read_export(ep.uri, out)
    expect(len(data) == ep.size, f"export of {disk} is {len(data)} bytes, its endpoint says {ep.size}")
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


def check_lookup_by_id_and_name(sut: SourceUnderTest, tmp_path: Path) -> None:
    by_id = sut.source.workload(sut.workload.ref.id)
    by_name = sut.source.workload(sut.workload.name)
    expect(by_id.ref == by_name.ref == sut.workload.ref,
           f"workload() by id and by name disagree: {by_id.ref} / {by_name.ref}")
    expect([d.id for d in by_id.disks] == [sut.disk], f"disks {[d.id for d in by_id.disks]}")
    expect(by_id.disks[0].size == _size(sut), f"disk size {by_id.disks[0].size}, not {_size(sut)}")
    expect(sut.workload.ref.id in [w.ref.id for w in sut.source.inventory()],
           "the VM is missing from inventory()")
    try:
        sut.source.workload("no-such-vm")
    except NotFound as e:
        expect("no-such-vm" in str(e), f"NotFound does not name the VM: {e}")
    else:
        raise AssertionError("workload('no-such-vm') did not raise NotFound")
    check_capabilities(sut.source)


def check_change_sets_rebuild_every_instant(sut: SourceUnderTest, tmp_path: Path) -> None:
    d = sut.disk
    sut.write(0, 2 * G, 0xA1)
    sut.write(7 * MiB + 3 * G, G, 0xA2)

    # FULL: every block that holds data is in a data extent.
    f1 = _cycle(sut, "c1", {})
    expect(f1.handle.kinds[d] == ChangeKind.FULL, f"first cycle is {f1.handle.kinds[d]}, not full")
    cs1 = f1.changes(d)
    img1 = _read(f1, d, tmp_path / "1.raw")
    nonzero = {i // G for i in range(0, len(img1), G) if img1[i:i + G].strip(b"\0")}
    expect(nonzero and nonzero <= _blocks(cs1, zero=False),
           f"blocks holding data outside the full change set: {sorted(nonzero - _blocks(cs1, zero=False))}")
    expect({0, 1, (7 * MiB) // G + 3} <= nonzero, "the guest's writes are not in the export")
    expect(cs1.summary.data_bytes == sum(e.length for e in cs1.extents if not e.zero),
           "summary.data_bytes does not add up the data extents")
    f1.close()
    cp1 = {c.disk: c for c in f1.new_checkpoints()}
    expect(set(cp1) == {d} and cp1[d].token, f"new_checkpoints(): {cp1}")
    f1.release(committed=True)

    # INCREMENTAL: the previous instant + this change set = this instant.
    sut.write(G, G, 0xB1)  # overwrites part of the first write
    sut.write(20 * MiB, 3 * G + 512, 0xB2)  # ends inside a block
    f2 = _cycle(sut, "c2", cp1)
    expect(f2.handle.kinds[d] == ChangeKind.INCREMENTAL, f"second cycle is {f2.handle.kinds[d]}")
    cs2 = f2.changes(d)
    img2 = _read(f2, d, tmp_path / "2.raw")
    expect(img2 != img1, "the second instant equals the first")
    expect(_apply(img1, img2, cs2) == img2,
           "previous instant + change set != this instant: a changed block is missing")
    expect({1, (20 * MiB) // G, (20 * MiB) // G + 3} <= _blocks(cs2), "written blocks missing")
    expect(cs2.summary.data_bytes < _size(sut) // 4, "an incremental change set reads too much")
    # The same instant reopened (another activity, another process) answers the same.
    again = sut.source.reopen(f2.handle)
    expect(again.changes(d).extents == cs2.extents, "reopen() answers other changes")
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
    expect({(12 * MiB) // G, (14 * MiB) // G} <= _blocks(cs4),
           "changes of an uncommitted cycle were lost")
    expect(_apply(img2, img4, cs4) == img4, "previous instant + change set != this instant")
    f4.close()
    f4.release(committed=True)


def check_resync_covers_the_whole_disk(sut: SourceUnderTest, tmp_path: Path) -> None:
    sut.write(MiB, G, 0xD1)
    f0 = _cycle(sut, "r0", {}, protection="resync")
    f0.release(committed=True)
    f = _cycle(sut, "r1", {c.disk: c for c in f0.new_checkpoints()},
               FreezeOptions(force_resync=True), protection="resync")
    expect(f.handle.kinds[sut.disk] == ChangeKind.RESYNC, f"force_resync gave {f.handle.kinds}")
    cs = f.changes(sut.disk)
    pos = 0
    for start, end in sorted((e.offset, e.offset + e.length) for e in cs.extents):
        expect(start <= pos, f"a resync's change set has a gap at {pos}")
        pos = max(pos, end)
    expect(pos == _size(sut), f"a resync's change set ends at {pos}, not {_size(sut)}")
    expect(MiB // G in _blocks(cs, zero=False), "a resync omits written data")
    f.close()
    f.release(committed=False)


def check_retried_freeze_returns_the_same_instant(sut: SourceUnderTest, tmp_path: Path) -> None:
    sut.write(0, G, 0xE1)
    first = _cycle(sut, "t1", {}, protection="retry")
    img = _read(first, sut.disk, tmp_path / "a.raw")
    first.close()
    sut.write(0, G, 0xE2)  # after the instant: must not show in a retried freeze
    retried = _cycle(sut, "t1", {}, protection="retry")
    expect(retried.handle.instant == first.handle.instant, "a retried freeze took a new instant")
    expect(_read(retried, sut.disk, tmp_path / "b.raw") == img,
           "a retried freeze exports other bytes than the first")
    retried.close()
    retried.release(committed=False)
    first.release(committed=False)


SOURCE_CHECKS: list[Callable[[SourceUnderTest, Path], None]] = [
    check_lookup_by_id_and_name,
    check_change_sets_rebuild_every_instant,
    check_resync_covers_the_whole_disk,
    check_retried_freeze_returns_the_same_instant,
]
