"""A synthetic connector (test code, a connector plugin): small disks that change a
little every cycle, copied through the real data path.

Registered for ``PlatformKind.SYNTHETIC`` when imported, so a worker loads it with
``worker.py --plugin tests.harness.synthetic`` (or ``TRANSCEND_PLUGINS``). Used by
bench/bench_scale.py (many protections on their schedules) and tests/test_plugins.py.

Every VM is made up: any valid name is a VM with one disk ``vda`` of ``disk_mib``
MiB whose first ``data_kib`` KiB hold pseudo-random bytes seeded by the name (the
rest is a hole). Each freeze is one more *generation*: ``blocks_per_cycle``
64 KiB blocks chosen and filled from ``(vm, generation)`` are written to the live
disk first (the guest's writes since the previous cycle), then the disk is copied
to a snapshot file (the frozen instant). The content of a VM at generation ``g``
is therefore a pure function (``expected_image``), which the benchmark uses to check
the replicas by hash without keeping old snapshots. The checkpoint token is the
generation: the changes since a checkpoint are the blocks written by the
generations after it (a cycle that did not commit leaves the catalog's checkpoint
where it was, so the next cycle still sees every change).

Data path: the NBD endpoints are real and blockstream copies between them, but
instead of a server process per freeze and per staging layer (what the KVM
connector does with libvirt's backup job and qemu-nbd), each side has ONE
long-lived ``nbdkit file dir=DIR`` server, started by the benchmark or test
(``synthetic_servers``): every file in the directory is an export named by its file
name. The source serves ``<root>/snap`` read-only (snapshots ``<protection>~<cycle>~
<disk>.img``); the target serves ``<root>/exports`` read-write (staging layers
``….staging``, committed points ``….point``). So a cycle starts no process: at
1,000 protections on 2 cores a process start and NBD handshake wait per freeze and
per stage (~7 per second at an RPO of 300 s) would be measured instead of the
control plane, which is what the scale benchmark is about. The cost not
represented is the KVM connector's libvirt backup job and qemu-nbd start.

Platform config (``PlatformSpec.config``), source: ``root``, ``socket`` (the source
nbdkit's unix socket), ``disk_mib`` (4), ``data_kib`` (256), ``blocks_per_cycle``
(2); target: ``root``, ``socket``, ``write_granularity`` (512). Points are full sparse
image files (a copy of the previous point plus this cycle's writes); retention deletes
the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.base import ChangeExtent, ChangeSet, ConnectorError, NotFound, PermanentError
from connectors.registry import register
from tests.harness.locks import file_lock
from transcend.models import (
    BootSpec,
    Capabilities,
    ChangeKind,
    ChangeSummary,
    Checkpoint,
    DiskId,
    DiskInfo,
    FreezeOptions,
    FrozenHandle,
    Instance,
    NbdEndpoint,
    PlatformInfo,
    PlatformKind,
    PointMeta,
    RecoveryPoint,
    StagingHandle,
    Workload,
    WorkloadRef,
)

BLOCK = 65536
DISK = "vda"
VM_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
SEP = "~"  # never in protection names, cycle ids or disk ids: export names stay unique


@dataclass(frozen=True)
class Shape:
    disk_size: int
    data_bytes: int
    blocks_per_cycle: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        disk = int(config.get("disk_mib", 4)) << 20
        data = min(disk, int(config.get("data_kib", 256)) << 10)
        return cls(disk_size=disk, data_bytes=data, blocks_per_cycle=int(config.get("blocks_per_cycle", 2)))

    @property
    def blocks(self) -> int:
        return self.disk_size // BLOCK


def base_data(vm: str, shape: Shape) -> bytes:
    """The first ``data_bytes`` of the disk before any cycle."""
    return random.Random(f"synthetic-base/{vm}").randbytes(shape.data_bytes)


def generation_writes(vm: str, gen: int, shape: Shape) -> list[tuple[int, bytes]]:
    """The (block number, 64 KiB) writes of generation ``gen`` >= 1, in write order."""
    rng = random.Random(f"synthetic-gen/{vm}/{gen}")
    picks = sorted(rng.sample(range(shape.blocks), min(shape.blocks_per_cycle, shape.blocks)))
    return [(b, rng.randbytes(BLOCK)) for b in picks]


def changed_blocks(vm: str, after: int, upto: int, shape: Shape) -> list[int]:
    """Blocks written by the generations ``after`` < g <= ``upto``."""
    out: set[int] = set()
    for g in range(after + 1, upto + 1):
        out.update(b for b, _ in generation_writes(vm, g, shape))
    return sorted(out)


def expected_image(vm: str, gen: int, config: dict[str, Any]) -> bytes:
    """The whole disk of ``vm`` at generation ``gen`` (what a point frozen then holds)."""
    shape = Shape.from_config(config)
    img = bytearray(shape.disk_size)
    img[: shape.data_bytes] = base_data(vm, shape)
    for g in range(1, gen + 1):
        for b, data in generation_writes(vm, g, shape):
            img[b * BLOCK:(b + 1) * BLOCK] = data
    return bytes(img)


def _extents(blocks: list[int], shape: Shape) -> list[ChangeExtent]:
    """Runs of consecutive blocks as extents."""
    out: list[ChangeExtent] = []
    for b in blocks:
        off = b * BLOCK
        length = min(BLOCK, shape.disk_size - off)
        if out and out[-1].offset + out[-1].length == off:
            last = out.pop()
            out.append(ChangeExtent(last.offset, last.length + length))
        else:
            out.append(ChangeExtent(off, length))
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` keeping holes (tmp + rename, so a retry never sees half a
    file)."""
    tmp = dst.with_name(dst.name + ".tmp")
    with src.open("rb") as fi, tmp.open("wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            off = data
            while off < hole:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), hole - off, off, off)
                if n <= 0:
                    raise OSError(f"copy_file_range {src} -> {tmp} returned {n}")
                off += n
            pos = hole
        fo.truncate(size)
    tmp.replace(dst)




def _socket(config: dict[str, Any], role: str) -> str:
    sock = str(config.get("socket", ""))
    if not sock:
        raise PermanentError(f"synthetic {role}: config 'socket' (the nbdkit server's socket) is missing")
    if not os.path.exists(sock):
        raise ConnectorError(f"synthetic {role}: NBD server socket {sock} is not there (server stopped?)")
    return sock


def _uri(socket: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket}"


# --------------------------------------------------------------------------- source


class SyntheticSource:
    capabilities = Capabilities()

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        self.root = Path(info.config["root"])
        self.shape = Shape.from_config(info.config)
        self.live = self.root / "live"
        self.snap = self.root / "snap"

    def _disk_path(self, vm: str) -> Path:
        return self.live / f"{vm}.img"

    def _ensure_vm(self, vm: str) -> Path:
        if not VM_NAME.match(vm):
            raise NotFound(f"synthetic VM {vm!r}: not a valid name (a-z 0-9 . _ -)")
        path = self._disk_path(vm)
        if not path.exists():
            with file_lock(self.live / f"{vm}.lock"):
                if not path.exists():
                    tmp = path.with_name(path.name + ".tmp")
                    with tmp.open("wb") as f:
                        f.write(base_data(vm, self.shape))
                        f.truncate(self.shape.disk_size)
                    tmp.replace(path)
        return path

    def _workload(self, vm: str) -> Workload:
        path = self._ensure_vm(vm)
        return Workload(
            ref=WorkloadRef(platform=self.info.name, id=vm), name=vm, cpus=1, memory_mib=64,
            disks=[DiskInfo(id=DISK, size=self.shape.disk_size, name=DISK, source=str(path))],
            power_state="running",
        )

    def inventory(self) -> list[Workload]:
        if not self.live.exists():
            return []
        return [self._workload(p.stem) for p in sorted(self.live.glob("*.img"))]

    def workload(self, ref_or_name: str) -> Workload:
        return self._workload(ref_or_name)

    def freeze(self, protection: str, cycle_id: str, workloads: list[Workload],
               since: dict[DiskId, Checkpoint], opts: FreezeOptions) -> SyntheticFrozen:
        if len(workloads) != 1:
            raise PermanentError("the synthetic source freezes one VM per protection")
        vm = workloads[0].ref.id
        path = self._ensure_vm(vm)
        export = f"{protection}{SEP}{cycle_id}{SEP}{DISK}.img"
        meta = self.snap / f"{export}.json"
        if meta.exists():  # a retried freeze of the same cycle: the same instant
            return SyntheticFrozen(self, FrozenHandle.model_validate_json(meta.read_text()))
        state_file = self.live / f"{vm}.state"
        with file_lock(self.live / f"{vm}.lock"):
            state: dict[str, Any] = (json.loads(state_file.read_text()) if state_file.exists()
                                     else {"gen": 0, "cycle": ""})
            gen = int(state["gen"]) if state["cycle"] == cycle_id else int(state["gen"]) + 1
            # the guest's writes since the last freeze (idempotent: same blocks, same bytes)
            with path.open("r+b") as f:
                for b, data in generation_writes(vm, gen, self.shape):
                    f.seek(b * BLOCK)
                    f.write(data)
            _write_atomic(state_file, json.dumps({"gen": gen, "cycle": cycle_id}).encode())
            self.snap.mkdir(parents=True, exist_ok=True)
            sparse_copy(path, self.snap / export)
        cp = since.get(DISK)
        kind, reason, after = ChangeKind.FULL, "", None
        if cp is not None and opts.force_resync:
            kind, reason = ChangeKind.RESYNC, "resync requested"
        elif cp is not None:
            m = re.fullmatch(r"gen-(\d+)", cp.token)
            if cp.identity != vm or m is None or int(m.group(1)) >= gen:
                kind = ChangeKind.RESYNC
                reason = f"checkpoint {cp.token!r} is not valid for {vm} at gen {gen}"
            else:
                kind, after = ChangeKind.INCREMENTAL, int(m.group(1))
        handle = FrozenHandle(
            platform=self.info.name, protection=protection, cycle_id=cycle_id,
            instant=datetime.now(UTC), disks=list(workloads[0].disks),
            kinds={DISK: kind}, reasons={DISK: reason} if reason else {},
            data={"vm": vm, "gen": gen, "after": after, "export": export},
        )
        _write_atomic(meta, handle.model_dump_json().encode())
        return SyntheticFrozen(self, handle)

    def reopen(self, handle: FrozenHandle) -> SyntheticFrozen:
        return SyntheticFrozen(self, handle)

    def forget(self, protection: str, workloads: list[Workload]) -> list[str]:
        """The protection's snapshot files (a freeze never released). Its checkpoints
        are generations counted per VM, shared by every protection: nothing else to
        remove."""
        if not self.snap.exists():
            return []
        removed = []
        for f in sorted(self.snap.glob(f"{protection}{SEP}*")):
            f.unlink(missing_ok=True)
            removed.append(f.name)
        return removed


class SyntheticFrozen:
    def __init__(self, source: SyntheticSource, handle: FrozenHandle) -> None:
        self.source = source
        self.handle = handle

    def _check(self, disk: DiskId) -> None:
        if disk != DISK:
            raise PermanentError(f"disk {disk!r} is not part of this frozen instant")

    def export(self, disk: DiskId) -> NbdEndpoint:
        self._check(disk)
        export = self.handle.data["export"]
        if not (self.source.snap / export).exists():
            raise ConnectorError(f"snapshot {export} is gone (released?)")
        return NbdEndpoint(uri=_uri(_socket(self.source.info.config, "source"), export),
                           size=self.source.shape.disk_size)

    def changes(self, disk: DiskId) -> ChangeSet:
        self._check(disk)
        shape = self.source.shape
        vm, gen = self.handle.data["vm"], int(self.handle.data["gen"])
        kind = self.handle.kinds[disk]
        if kind == ChangeKind.INCREMENTAL:
            extents = _extents(changed_blocks(vm, int(self.handle.data["after"]), gen, shape), shape)
        elif kind == ChangeKind.FULL:
            data_blocks = range((shape.data_bytes + BLOCK - 1) // BLOCK)
            extents = _extents(sorted(set(data_blocks) | set(changed_blocks(vm, 0, gen, shape))), shape)
        else:
            extents = [ChangeExtent(0, shape.disk_size)]
        return ChangeSet(
            summary=ChangeSummary(
                disk=disk, kind=kind, reason=self.handle.reasons.get(disk, ""), extents=len(extents),
                data_bytes=sum(e.length for e in extents), disk_size=shape.disk_size, granularity=BLOCK,
            ),
            extents=extents,
        )

    def new_checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(disk=DISK, token=f"gen-{self.handle.data['gen']}",
                           identity=self.handle.data["vm"], instant=self.handle.instant)]

    def close(self) -> None:
        return None  # the NBD server is shared and long-lived: nothing started per object

    def release(self, committed: bool) -> None:
        export = self.handle.data["export"]
        for p in (self.source.snap / export, self.source.snap / f"{export}.json"):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- target


class SyntheticTarget:
    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        self.exports = Path(info.config["root"]) / "exports"
        # ``write_granularity`` in the config: a block-API target's unit (EBS direct
        # writes 512 KiB), so tests can see the manifest block size follow it
        self.capabilities = Capabilities(
            write_granularity=int(info.config.get("write_granularity", 512)))

    def _name(self, protection: str, cycle_id: str, disk: DiskId, suffix: str) -> str:
        return f"{protection}{SEP}{cycle_id}{SEP}{disk.replace('/', '%')}.{suffix}"

    def prepare(self, protection: str, disks: list[DiskInfo],
                workloads: list[Workload] | None = None) -> None:
        self.exports.mkdir(parents=True, exist_ok=True)
        _socket(self.info.config, "target")

    def begin(self, protection: str, cycle_id: str, disks: list[DiskInfo],
              last: RecoveryPoint | None) -> SyntheticStaging:
        self.exports.mkdir(parents=True, exist_ok=True)
        names = {}
        for d in disks:
            name = self._name(protection, cycle_id, d.id, "staging")
            path = self.exports / name
            if not path.exists():  # a retry keeps what the first attempt staged
                prev = next((x for x in last.disks if x.disk == d.id), None) if last else None
                if prev is not None and Path(prev.location).exists():
                    sparse_copy(Path(prev.location), path)
                else:
                    path.touch()
                with path.open("r+b") as f:
                    if os.fstat(f.fileno()).st_size < d.size:
                        f.truncate(d.size)
            names[d.id] = name
        handle = StagingHandle(platform=self.info.name, protection=protection, cycle_id=cycle_id,
                               disks=list(disks), data={"exports": names})
        return SyntheticStaging(self, handle)

    def resume(self, handle: StagingHandle) -> SyntheticStaging:
        return SyntheticStaging(self, handle)

    def open(self, point: RecoveryPoint, disk: DiskId) -> NbdEndpoint:
        d = next((x for x in point.disks if x.disk == disk), None)
        if d is None or not Path(d.location).exists():
            raise NotFound(f"point {point.id} has no disk {disk!r} on {self.info.name}")
        return NbdEndpoint(uri=_uri(_socket(self.info.config, "target"), Path(d.location).name), size=d.size)

    def close(self, point: RecoveryPoint, disk: DiskId) -> None:
        return None

    def delete(self, point: RecoveryPoint, successor: RecoveryPoint | None) -> RecoveryPoint | None:
        # every point is a whole image: nothing for the successor to absorb
        for d in point.disks:
            Path(d.location).unlink(missing_ok=True)
        return None

    def boot(self, point: RecoveryPoint, spec: BootSpec) -> Instance:
        raise PermanentError("the synthetic target cannot boot points")

    def destroy(self, instance: Instance) -> None:
        return None


class SyntheticStaging:
    def __init__(self, target: SyntheticTarget, handle: StagingHandle) -> None:
        self.target = target
        self.handle = handle

    def endpoint(self, disk: DiskId) -> NbdEndpoint:
        name = self.handle.data["exports"].get(disk)
        if name is None:
            raise PermanentError(f"disk {disk!r} is not staged in {self.handle.cycle_id}")
        if not (self.target.exports / name).exists():
            raise ConnectorError(f"staging layer {name} is gone (aborted or committed?)")
        size = next(d.size for d in self.handle.disks if d.id == disk)
        return NbdEndpoint(uri=_uri(_socket(self.target.info.config, "target"), name), size=size,
                           writable=True)

    def commit(self, meta: PointMeta) -> list[str]:
        out = []
        for d in self.handle.disks:
            staging = self.target.exports / self.handle.data["exports"][d.id]
            point = staging.with_suffix(".point")
            if staging.exists():
                with staging.open("rb") as f:
                    os.fsync(f.fileno())
                staging.replace(point)
            elif not point.exists():
                raise ConnectorError(f"neither the staging layer nor the point of {d.id} exists")
            out.append(str(point))
        dirfd = os.open(self.target.exports, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return out

    def abort(self) -> None:
        for name in self.handle.data["exports"].values():
            (self.target.exports / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to stop: the one long-lived nbdkit serves every staged layer."""


register(PlatformKind.SYNTHETIC, SyntheticSource, SyntheticTarget)


# --------------------------------------------------------------------------- test/bench side


@dataclass
class SyntheticServers:
    """The two long-lived nbdkit servers and the platform configs that point at them."""

    root: Path
    source_socket: str
    target_socket: str
    pids: tuple[int, int]

    def source_config(self, *, disk_mib: int = 4, data_kib: int = 256,
                      blocks_per_cycle: int = 2) -> dict[str, Any]:
        return {"root": str(self.root / "src"), "socket": self.source_socket, "disk_mib": disk_mib,
                "data_kib": data_kib, "blocks_per_cycle": blocks_per_cycle}

    def target_config(self) -> dict[str, Any]:
        return {"root": str(self.root / "dst"), "socket": self.target_socket}


@contextlib.contextmanager
def synthetic_servers(root: Path) -> Iterator[SyntheticServers]:
    """Start ``nbdkit file dir=`` for the source snapshots (read-only) and the target
    exports (read-write) under ``root``; stopped on exit."""
    from tests.harness.nbd import nbdkit

    snap, exports = root / "src" / "snap", root / "dst" / "exports"
    for d in (snap, exports, root / "src" / "live"):
        d.mkdir(parents=True, exist_ok=True)
    src = nbdkit("file", f"dir={snap}", read_only=True)
    try:
        dst = nbdkit("file", f"dir={exports}")
        try:
            assert src.socket_path is not None and dst.socket_path is not None
            yield SyntheticServers(root=root, source_socket=str(src.socket_path),
                                   target_socket=str(dst.socket_path),
                                   pids=(src.pid or 0, dst.pid or 0))
        finally:
            dst.stop()
    finally:
        src.stop()
