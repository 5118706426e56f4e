"""KVM target against real qemu-img, qemu-nbd, nbdcopy and libvirtd (TCG).

Data is written into staging exports with ``qemu-io`` and read back with
``nbdcopy``; every point is compared with an in-memory model of what was written
at its cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.base import ConnectorError, PermanentError, Staging, Target
from connectors.common.qemu import backing_path, export_sha256, processes_using, qcow2_header
from connectors.kvm import domain as dx
from connectors.kvm.target import Busy, KvmTarget
from tests.harness.libvirtd import traversable
from transcend.models import (
    BootSpec,
    ChangeKind,
    DiskInfo,
    NicInfo,
    PlatformInfo,
    PlatformKind,
    PointDisk,
    PointMeta,
    RecoveryPoint,
    StagingHandle,
    Workload,
    WorkloadRef,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "qemu-io", "nbdcopy")),
        reason="needs qemu-utils and libnbd-bin",
    ),
]

KiB = 1024
MiB = 1024 * KiB
PROT = "prot1"


# --------------------------------------------------------------------------- helpers


def make_target(root: Path, **config: object) -> KvmTarget:
    info = PlatformInfo(name="kvm-dr", kind=PlatformKind.KVM, site="local",
                        config={"root": str(root), **config})
    return KvmTarget(info, {})


class Disk:
    """What a disk should contain: an in-memory model updated with every write."""

    def __init__(self, disk_id: str, size: int) -> None:
        self.id = disk_id
        self.data = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.data)

    def info(self) -> DiskInfo:
        return DiskInfo(id=self.id, size=self.size)

    def grow(self, size: int) -> None:
        self.data.extend(bytes(size - self.size))

    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def qemu_io(uri: str, commands: list[str]) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "error" not in out.lower() and "failed" not in out.lower(), out


def write_random(uri: str, disk: Disk, rng: random.Random, scratch: Path, writes: int = 6,
                 zeros: int = 2, lo: int | None = None) -> None:
    """Random data at random (also unaligned) offsets, plus zero writes, through ``uri``."""
    commands = []
    for i in range(writes + zeros):
        length = rng.choice([512, 4 * KiB, 64 * KiB, 200 * KiB + 512, 1 * MiB])
        start = lo if lo is not None else 0
        offset = rng.randrange(start, disk.size - length) // 512 * 512
        if i < writes:
            payload = rng.randbytes(length)
            f = scratch / f"w{i}.bin"
            f.write_bytes(payload)
            commands.append(f"write -q -s {f} {offset} {length}")
            disk.data[offset:offset + length] = payload
        else:
            commands.append(f"write -q -z {offset} {length}")
            disk.data[offset:offset + length] = bytes(length)
    qemu_io(uri, commands)


def point(cycle_id: str, seq: int, disks: list[Disk], locations: list[str]) -> RecoveryPoint:
    now = datetime.now(UTC)
    return RecoveryPoint(
        id=cycle_id, protection=PROT, seq=seq, instant=now, committed_at=now,
        disks=[PointDisk(disk=d.id, size=d.size, location=loc, block_size=65536)
               for d, loc in zip(disks, locations, strict=True)],
    )


def meta(cycle_id: str) -> PointMeta:
    return PointMeta(cycle_id=cycle_id, instant=datetime.now(UTC), block_size=65536,
                     kind=ChangeKind.INCREMENTAL)


def point_sha(target: KvmTarget, rp: RecoveryPoint, disk: str) -> str:
    ep = target.open(rp, disk)
    try:
        assert not ep.writable
        return export_sha256(ep.uri)
    finally:
        target.close(rp, disk)


def file_sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cycle(target: KvmTarget, cycle_id: str, seq: int, disks: list[Disk],
              last: RecoveryPoint | None, rng: random.Random, scratch: Path,
              **kw: int) -> tuple[RecoveryPoint, dict[str, str]]:
    staging = target.begin(PROT, cycle_id, [d.info() for d in disks], last)
    for d in disks:
        ep = staging.endpoint(d.id)
        assert ep.writable and ep.size == d.size
        write_random(ep.uri, d, rng, scratch, **kw)
    locations = staging.commit(meta(cycle_id))
    return point(cycle_id, seq, disks, locations), {d.id: d.sha() for d in disks}


def no_export_running(target: KvmTarget) -> bool:
    return not any(p.suffix == ".pid" for p in target.run_dir.iterdir())


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    p = tmp_path / "scratch"
    p.mkdir()
    return p


@pytest.fixture
def target(tmp_path: Path) -> Iterator[KvmTarget]:
    t = make_target(tmp_path / "replicas")
    yield t
    kill_exports(t)


def kill_exports(t: KvmTarget) -> None:
    """Leave no qemu-nbd behind, whatever a failing test did."""
    for pid_file in t.run_dir.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


# --------------------------------------------------------------------------- cycles


def test_full_and_incremental_cycles_read_back_identical(target: KvmTarget, scratch: Path):
    rng = random.Random(1)
    disks = [Disk("vda", 8 * MiB), Disk("web/vdb", 4 * MiB)]
    target.prepare(PROT, [d.info() for d in disks])
    assert isinstance(target, Target)
    assert isinstance(target.begin(PROT, "c0", [d.info() for d in disks], None), Staging)
    target.resume(StagingHandle(platform=target.info.name, protection=PROT, cycle_id="c0",
                                disks=[d.info() for d in disks])).abort()
    points: list[tuple[RecoveryPoint, dict[str, str]]] = []
    last = None
    for seq in range(1, 6):
        last, shas = run_cycle(target, f"c{seq}", seq, disks, last, rng, scratch)
        points.append((last, shas))
        assert no_export_running(target), "commit must stop the staging export"

    # the contents really differ from cycle to cycle (the comparison below can fail)
    assert len({shas["vda"] for _, shas in points}) == 5
    for rp, shas in points:
        for d in disks:
            assert point_sha(target, rp, d.id) == shas[d.id], (rp.id, d.id)

    for seq, (rp, _) in enumerate(points, start=1):
        for pd in rp.disks:
            layer = Path(pd.location)
            dirname = pd.disk.replace("/", "%2F")
            assert layer == target.root / PROT / dirname / f"c{seq}.qcow2"
            assert stat.S_IMODE(layer.stat().st_mode) == 0o444
            expected_backing = (str(layer.parent / f"c{seq - 1}.qcow2") if seq > 1 else "")
            assert backing_path(layer) == expected_backing
            assert qcow2_header(layer).cluster_size == 64 * KiB
        assert not list((target.root / PROT / "vda").glob("staging-*"))

    # commit is idempotent: a retried commit (another process, a handle without the
    # connector's data) returns the same layers, unchanged
    handle = StagingHandle(platform=target.info.name, protection=PROT, cycle_id="c5",
                           disks=[d.info() for d in disks])
    rp5, shas5 = points[-1]
    again = make_target(target.root).resume(handle).commit(meta("c5"))
    assert again == [pd.location for pd in rp5.disks]
    assert point_sha(target, rp5, "vda") == shas5["vda"]
    assert point_sha(target, rp5, "web/vdb") == shas5["web/vdb"]


def test_abort_and_retried_begin(target: KvmTarget, scratch: Path):
    rng = random.Random(2)
    vda = Disk("vda", 4 * MiB)
    p1, shas1 = run_cycle(target, "c1", 1, [vda], None, rng, scratch)
    layer1_sha = file_sha(p1.disks[0].location)

    # abort: staging file and export gone, the existing point untouched
    staging = target.begin(PROT, "c2", [vda.info()], p1)
    staging_file = target.root / PROT / "vda" / "staging-c2.qcow2"
    assert staging_file.exists()
    write_random(staging.endpoint("vda").uri, Disk("vda", vda.size), rng, scratch)
    staging.abort()
    assert not staging_file.exists()
    assert no_export_running(target)
    staging.abort()  # idempotent
    assert file_sha(p1.disks[0].location) == layer1_sha
    assert point_sha(target, p1, "vda") == shas1["vda"]

    # begin twice with the same cycle id (a retried activity, another process): the
    # bytes written by the first attempt are still there
    staging = target.begin(PROT, "c3", [vda.info()], p1)
    write_random(staging.endpoint("vda").uri, vda, rng, scratch)
    other = make_target(target.root)
    again = other.begin(PROT, "c3", [vda.info()], p1)
    assert export_sha256(again.endpoint("vda").uri) == vda.sha()

    # the export dies (worker host trouble): resume() restarts it, bytes intact
    pid = int(next(target.run_dir.glob("st-*.pid")).read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (Path(f"/proc/{pid}/stat").exists()
           and Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    resumed = other.resume(again.handle.model_copy(deep=True))
    ep = resumed.endpoint("vda")
    assert export_sha256(ep.uri) == vda.sha()
    write_random(ep.uri, vda, rng, scratch)
    locations = resumed.commit(meta("c3"))
    p3 = point("c3", 3, [vda], locations)
    assert point_sha(target, p3, "vda") == vda.sha()
    assert point_sha(target, p1, "vda") == shas1["vda"]
    with pytest.raises(PermanentError, match="committed"):
        resumed.abort()
    with pytest.raises(PermanentError, match="already committed"):
        target.begin(PROT, "c3", [vda.info()], p1)


def test_begin_over_changed_plan_recreates_staging(target: KvmTarget, scratch: Path):
    """A staging file left by a different plan (other base) is not reused."""
    rng = random.Random(3)
    vda = Disk("vda", 2 * MiB)
    p1, _ = run_cycle(target, "c1", 1, [vda], None, rng, scratch)
    first = target.begin(PROT, "c2", [vda.info()], None)  # planned as a full copy
    write_random(first.endpoint("vda").uri, Disk("vda", vda.size), rng, scratch)
    second = target.begin(PROT, "c2", [vda.info()], p1)  # now incremental over p1
    assert backing_path(target.root / PROT / "vda" / "staging-c2.qcow2") == p1.disks[0].location
    assert export_sha256(second.endpoint("vda").uri) == vda.sha()
    second.abort()


# --------------------------------------------------------------------------- retention


def test_retention_merges_without_changing_remaining_points(target: KvmTarget, scratch: Path):
    rng = random.Random(4)
    vda, vdb = Disk("vda", 6 * MiB), Disk("vdb", 2 * MiB)
    pts: list[RecoveryPoint] = []
    last = None
    for seq in range(1, 6):
        # zero writes in later cycles land on data of earlier ones: the merge must keep
        # them as zeros (not let the older data show through)
        last, _ = run_cycle(target, f"c{seq}", seq, [vda, vdb], last, rng, scratch,
                            writes=5, zeros=4)
        pts.append(last)
    before = {(rp.id, d): point_sha(target, rp, d) for rp in pts for d in ("vda", "vdb")}
    assert before[("c5", "vda")] == vda.sha()

    def remaining_unchanged(alive: list[RecoveryPoint]) -> None:
        for rp in alive:
            for d in ("vda", "vdb"):
                assert point_sha(target, rp, d) == before[(rp.id, d)], (rp.id, d)
                assert stat.S_IMODE(Path(rp.disks[0].location).stat().st_mode) == 0o444

    p1, p2, p3, p4, p5 = pts
    # the oldest: p2 absorbs p1; p2 keeps its path, p1's layer disappears
    assert target.delete(p1, p2) == p2
    assert not Path(p1.disks[0].location).exists() and not Path(p1.disks[1].location).exists()
    assert backing_path(p2.disks[0].location) == ""
    remaining_unchanged([p2, p3, p4, p5])
    assert target.delete(p1, p2) == p2  # twice: nothing left to do
    remaining_unchanged([p2, p3, p4, p5])

    # a middle point: p4 absorbs p3, p5 still reads through p4's (unchanged) path
    target.delete(p3, p4)
    assert not Path(p3.disks[0].location).exists()
    assert backing_path(p4.disks[0].location) == p2.disks[0].location
    assert backing_path(p5.disks[0].location) == p4.disks[0].location
    target.delete(p3, p4)
    remaining_unchanged([p2, p4, p5])

    # busy: an export of a later point holds the chain; nothing may change
    files = sorted((target.root / PROT).glob("*/*.qcow2"))
    snapshot = {f: (file_sha(f), f.stat().st_mode) for f in files}
    target.open(p5, "vda")
    with pytest.raises(Busy):
        target.delete(p2, p4)
    assert processes_using([p2.disks[0].location])  # still exported by qemu-nbd
    target.close(p5, "vda")
    assert sorted((target.root / PROT).glob("*/*.qcow2")) == files
    assert {f: (file_sha(f), f.stat().st_mode) for f in files} == snapshot

    # busy: a staging layer is written over the newest point
    staging = target.begin(PROT, "c6", [vda.info(), vdb.info()], p5)
    with pytest.raises(Busy):
        target.delete(p5, None)
    with pytest.raises(Busy):
        target.delete(p4, p5)
    staging.abort()
    assert {f: (file_sha(f), f.stat().st_mode) for f in files} == snapshot

    # the newest point, no successor: its layer just goes
    with pytest.raises(PermanentError, match="successor"):
        target.delete(p4, None)  # p5 is backed by it: refusing to break p5
    target.delete(p5, None)
    assert not Path(p5.disks[0].location).exists()
    remaining_unchanged([p2, p4])


def test_retention_crash_before_rename_is_redone(target: KvmTarget, scratch: Path):
    """A crash after ``qemu-img commit`` but before the rename leaves the successor
    readable; running delete again finishes the job."""
    rng = random.Random(5)
    vda = Disk("vda", 4 * MiB)
    p1, _ = run_cycle(target, "c1", 1, [vda], None, rng, scratch)
    p2, shas2 = run_cycle(target, "c2", 2, [vda], p1, rng, scratch)
    p3, shas3 = run_cycle(target, "c3", 3, [vda], p2, rng, scratch)
    l1, l2 = p1.disks[0].location, p2.disks[0].location
    # what delete does up to the rename, then "crash"
    os.chmod(l1, 0o644)
    subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", "-d", l2], check=True)
    assert point_sha(target, p2, "vda") == shas2["vda"]
    assert point_sha(target, p3, "vda") == shas3["vda"]
    target.delete(p1, p2)
    assert not Path(l1).exists()
    assert point_sha(target, p2, "vda") == shas2["vda"]
    assert point_sha(target, p3, "vda") == shas3["vda"]


# --------------------------------------------------------------------------- growth


def test_disk_growth(target: KvmTarget, scratch: Path):
    rng = random.Random(6)
    vda = Disk("vda", 3 * MiB)
    p1, shas1 = run_cycle(target, "c1", 1, [vda], None, rng, scratch)
    old = bytes(vda.data)
    vda.grow(7 * MiB)
    staging = target.begin(PROT, "c2", [vda.info()], p1)
    ep = staging.endpoint("vda")
    assert ep.size == 7 * MiB
    # before writing: the old data plus zeros beyond
    expected = hashlib.sha256(old + bytes(4 * MiB)).hexdigest()
    assert export_sha256(ep.uri) == expected == vda.sha()
    write_random(ep.uri, vda, rng, scratch, lo=3 * MiB)
    p2 = point("c2", 2, [vda], staging.commit(meta("c2")))
    assert vda.data[:3 * MiB] == old
    assert point_sha(target, p2, "vda") == vda.sha()
    assert point_sha(target, p1, "vda") == shas1["vda"]
    assert target.open(p2, "vda").size == 7 * MiB
    target.close(p2, "vda")
    # merging the small point into the grown one keeps the grown content
    target.delete(p1, p2)
    assert point_sha(target, p2, "vda") == vda.sha()
    # a disk never shrinks
    with pytest.raises(PermanentError, match="shrank"):
        target.begin(PROT, "c3", [DiskInfo(id="vda", size=2 * MiB)], p2)


# --------------------------------------------------------------------------- errors


def test_root_uncreatable_or_unwritable(tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(PermanentError, match=str(afile / "replicas")):
        make_target(afile / "replicas")
    with pytest.raises(PermanentError, match="root"):
        KvmTarget(PlatformInfo(name="x", kind=PlatformKind.KVM, site="s", config={}), {})

    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not permitted here: cannot make a directory root can't write")
    try:
        with pytest.raises(PermanentError, match=f"{locked} is not writable"):
            make_target(locked)
        with pytest.raises(PermanentError, match=f"{locked / 'sub'} cannot be created"):
            make_target(locked / "sub")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_low_free_space_refused(tmp_path: Path):
    t = make_target(tmp_path / "r", min_free_bytes=1 << 60)
    with pytest.raises(ConnectorError, match="is full"):
        t.prepare(PROT, [DiskInfo(id="vda", size=MiB)])


def test_disk_full_mid_cycle(tmp_path: Path, scratch: Path):
    """ENOSPC while writing a staging layer: the write fails, the point survives, the
    next qemu-img surfaces 'is full'."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    t = make_target(mnt / "r", min_free_bytes=0, run_dir=str(tmp_path / "run"))
    try:
        rng = random.Random(7)
        vda = Disk("vda", 16 * MiB)
        p1, shas1 = run_cycle(t, "c1", 1, [vda], None, rng, scratch, writes=2, zeros=0)
        staging = t.begin(PROT, "c2", [vda.info()], p1)
        blob = scratch / "big.bin"
        blob.write_bytes(rng.randbytes(6 * MiB))
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -s {blob} 0 {6 * MiB}",
                               staging.endpoint("vda").uri], capture_output=True, text=True)
        assert "No space left on device" in proc.stdout + proc.stderr
        staging.abort()
        assert point_sha(t, p1, "vda") == shas1["vda"]
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(64 * KiB))
        finally:
            os.close(fd)
        with pytest.raises(ConnectorError, match=f"{t.root} is full"):
            t.begin(PROT, "c3", [vda.info()], p1)
        assert point_sha(t, p1, "vda") == shas1["vda"]
    finally:
        kill_exports(t)
        time.sleep(0.2)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_names_that_would_escape_the_root(target: KvmTarget):
    with pytest.raises(PermanentError):
        target.prepare("../etc", [DiskInfo(id="vda", size=MiB)])
    with pytest.raises(PermanentError):
        target.prepare(PROT, [DiskInfo(id="..", size=MiB)])
    with pytest.raises(PermanentError):
        target.begin(PROT, "../x", [DiskInfo(id="vda", size=MiB)], None)


# --------------------------------------------------------------------------- boot


def _libvirt() -> object | None:
    try:
        import libvirt

        conn = libvirt.open("qemu:///system")
    except Exception:
        return None
    conn.close()
    return libvirt


@pytest.mark.skipif(_libvirt() is None, reason="needs libvirtd at qemu:///system")
def test_boot_runs_a_domain_on_an_overlay_and_destroy_removes_it(tmp_path: Path, scratch: Path):
    import xml.etree.ElementTree as ET

    import libvirt
    import libvirt_qemu

    rng = random.Random(8)
    t = make_target(tmp_path / "replicas")
    vda = Disk("vda", 8 * MiB)
    p1, _ = run_cycle(t, "c1", 1, [vda], None, rng, scratch)
    p2, shas2 = run_cycle(t, "c2", 2, [vda], p1, rng, scratch)
    layers = [p1.disks[0].location, p2.disks[0].location]
    before = {f: (file_sha(f), os.stat(f).st_uid, os.stat(f).st_gid,
                  stat.S_IMODE(os.stat(f).st_mode)) for f in layers}
    wl = Workload(ref=WorkloadRef(platform="src", id="web"), name="web", cpus=2, memory_mib=256,
                  disks=[DiskInfo(id="vda", size=vda.size, boot_order=1)],
                  nics=[NicInfo(mac="52:54:00:aa:bb:01", network="default")])
    name = f"tt-{uuid.uuid4().hex[:10]}"
    spec = BootSpec(name=name, workload=wl, memory_mib=128)
    conn = libvirt.open("qemu:///system")
    with traversable(tmp_path):
        inst = t.boot(p2, spec)
        try:
            dom = conn.lookupByUUIDString(inst.id)
            assert dom.isActive() and dom.name() == name
            root = ET.fromstring(dom.XMLDesc(0))
            assert root.get("type") == "qemu"
            assert int(root.findtext("vcpu") or 0) == 2
            assert int(root.findtext("memory") or 0) == 128 * 1024  # KiB
            overlay = t.root / PROT / ".boot" / name / "vda.qcow2"
            assert inst.overlays == [str(overlay)]
            assert [s.get("file") for s in root.findall("devices/disk/source")] == [str(overlay)]
            assert backing_path(overlay) == layers[1]
            assert dx.read_metadata(dom.XMLDesc(0))["point"] == "c2"
            assert inst.console_log == str(overlay.parent / "console.log")
            assert Path(inst.console_log).exists()  # virtlogd writes the serial console there
            nic = root.find("devices/interface/source")
            assert nic is not None and nic.get("network") == dx.ISOLATED_NETWORK
            assert inst.network == dx.ISOLATED_NETWORK
            net = conn.networkLookupByName(dx.ISOLATED_NETWORK)
            assert net.isActive() and "<forward" not in net.XMLDesc(0)

            # write through the guest's disk (the monitor's qemu-io): it lands in the
            # overlay, and the guest reads it back
            blocks = json.loads(libvirt_qemu.qemuMonitorCommand(
                dom, '{"execute": "query-block"}', 0))["return"]
            qdev = next(b["qdev"] for b in blocks
                        if b.get("inserted", {}).get("file") == str(overlay))
            hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            for cmd in ("write -P 0x5a 0 2M", "flush"):  # flush: qcow2 metadata to the file
                out = libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {qdev} "{cmd}"', hmp)
                assert "error" not in out.lower() and "failed" not in out.lower(), out
            check = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c",
                                    "read -P 0x5a 0 2M", str(overlay)],
                                   capture_output=True, text=True)
            assert "read 2097152/2097152" in check.stdout, check.stdout + check.stderr
            assert "fail" not in check.stdout + check.stderr
            extents = json.loads(subprocess.run(
                ["qemu-img", "map", "-U", "--output=json", str(overlay)],
                capture_output=True, text=True, check=True).stdout)
            assert extents[0]["start"] == 0 and extents[0]["depth"] == 0  # in the overlay
            assert processes_using([layers[0]]), "the running qemu holds the chain"

            # the point's chain is in use: retention must wait
            with pytest.raises(Busy):
                t.delete(p1, p2)
            # booting again with the same name and point returns the same instance
            assert t.boot(p2, spec).id == inst.id
            with pytest.raises(PermanentError, match="already exists"):
                t.boot(p1, spec)
        finally:
            t.destroy(inst)
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(name)
    assert not (t.root / PROT / ".boot" / name).exists()
    t.destroy(inst)  # idempotent
    after = {f: (file_sha(f), os.stat(f).st_uid, os.stat(f).st_gid,
                 stat.S_IMODE(os.stat(f).st_mode)) for f in layers}
    assert after == before, "the point's layers were changed (content, owner or mode)"
    assert point_sha(t, p2, "vda") == shas2["vda"]
    t.delete(p1, p2)  # free again once the instance is gone
    assert point_sha(t, p2, "vda") == shas2["vda"]
    conn.close()
    kill_exports(t)


@pytest.mark.skipif(_libvirt() is None, reason="needs libvirtd at qemu:///system")
def test_destroy_refuses_foreign_domains(tmp_path: Path):
    import libvirt

    from transcend.models import Instance

    t = make_target(tmp_path / "replicas")
    name = f"tt-foreign-{uuid.uuid4().hex[:8]}"
    conn = libvirt.open("qemu:///system")
    dom = conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>")
    try:
        with pytest.raises(PermanentError, match="not a transcend instance"):
            t.destroy(Instance(platform="kvm-dr", id=dom.UUIDString(), name=name))
        assert conn.lookupByName(name) is not None
    finally:
        dom.undefine()
        conn.close()


def test_long_run_dir_gets_short_sockets(tmp_path: Path, scratch: Path):
    """unix socket paths are limited to 107 bytes; a deep run_dir still works."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    t = make_target(tmp_path / "r", run_dir=str(deep))
    try:
        vda = Disk("vda", MiB)
        p1, shas = run_cycle(t, "c1", 1, [vda], None, random.Random(9), scratch, writes=2)
        ep = t.open(p1, "vda")
        assert len(ep.uri.split("socket=", 1)[1]) <= 107
        assert export_sha256(ep.uri) == shas["vda"]
        t.close(p1, "vda")
    finally:
        kill_exports(t)
