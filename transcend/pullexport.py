"""Pull transfers: the source site serves a cycle's frozen disks to the target site.

In a *pull* transfer (docs/sites.md) the target site runs ``stream.disk``: it reads
the frozen instant over the network and writes its staging layers locally. Two
things cross from the source site to the target site for that:

* **The frozen disks**, as NBD over TCP with TLS. A source connector exports its
  frozen instant where its own site reaches it (KVM: libvirt's pull-mode backup
  socket, inside QEMU). ``serve_frozen`` puts a read-only ``qemu-nbd`` in front of
  each export: its image *is* the local NBD URI (QEMU's nbd block driver), served
  on the site address with the site's server certificate and ``verify-peer=on``.
  ``base:allocation`` passes through (QEMU's nbd driver asks the backend), so the
  reader still sees holes. The fronts are detached with pid files under
  ``$TRANSCEND_HOME/pull``, like the staging exports of a push transfer, and are
  found again by any source-site worker process (``source.release`` stops them).
* **The change set** (which extents to copy), because only the source site can ask
  its platform (the dirty bitmap is a meta context of the *local* export). It is
  computed once by ``source.freeze`` and stored in the shared catalog next to the
  cycle's staged manifests (``pack_changes``); ``stream.disk`` at the target site
  reads it back (``unpack_changes``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

from connectors.base import ChangeExtent, ChangeSet, Frozen
from connectors.common.qemu import NbdExport, TcpListen, serve_tcp
from transcend.config import Settings
from transcend.models import ChangeSummary, DiskId, FrozenHandle, NbdEndpoint
from transcend.nbdtls import RemoteExport, remote_export

# offset, length (u64 each), zero flag (u8): little endian, no padding
_EXTENT = struct.Struct("<QQB")
_MAGIC = b"TRCHG1\n"


def _front_dir(settings: Settings) -> Path:
    d = settings.home / "pull"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _protection_key(protection: str) -> str:
    return hashlib.sha256(protection.encode()).hexdigest()[:8]


def _front_files(settings: Settings, handle: FrozenHandle, disk: DiskId) -> tuple[Path, Path]:
    """Pid and log file of a front: ``pf-<protection key>-<cycle+disk key>``, so the
    fronts a failed cycle of the protection left behind can be found."""
    key = hashlib.sha256(f"{handle.protection}\0{handle.cycle_id}\0{disk}".encode()).hexdigest()
    stem = f"pf-{_protection_key(handle.protection)}-{key[:16]}"
    d = _front_dir(settings)
    return d / f"{stem}.pid", d / f"{stem}.log"


def _front(settings: Settings, handle: FrozenHandle, disk: DiskId, image_uri: str,
           remote: RemoteExport | None) -> NbdExport:
    pid_file, log_file = _front_files(settings, handle, disk)
    return NbdExport(
        image=image_uri,
        socket_path="",
        pid_file=str(pid_file),
        log_file=str(log_file),
        export_name=disk,
        readonly=True,
        # the image is an NBD connection, not a file: there is no page cache to bypass
        cache="writeback",
        fmt="raw",
        tcp=(TcpListen(remote.address, 0, remote.tls_dir, psk=remote.psk) if remote
             else TcpListen("", 0, "")),
    )


def serve_frozen(settings: Settings, frozen: Frozen) -> dict[DiskId, NbdEndpoint]:
    """Serve every disk of ``frozen`` on this site's address with TLS; return the URIs
    (``nbds://address:port/disk``, without credentials) for ``FrozenHandle.remote``.
    Idempotent: a retried freeze keeps running fronts and their ports."""
    remote = remote_export(settings, transfer="pull")
    _stop_leftovers(settings, frozen.handle)
    out: dict[DiskId, NbdEndpoint] = {}
    for disk in frozen.handle.disks:
        local = frozen.export(disk.id)
        front = serve_tcp(_front(settings, frozen.handle, disk.id, local.uri, remote),
                          remote.port_min, remote.port_max, "a pull export of a frozen disk")
        out[disk.id] = NbdEndpoint(uri=front.uri, size=local.size, writable=False)
    return out


def _stop_leftovers(settings: Settings, handle: FrozenHandle) -> None:
    """Stop the fronts of the protection's earlier cycles: one that failed before its
    release (a freeze that never returned) left them serving a dead backup export.
    A protection runs one cycle at a time, so every other cycle's front is stale."""
    mine = {str(_front_files(settings, handle, d.id)[0]) for d in handle.disks}
    for pid_file in _front_dir(settings).glob(f"pf-{_protection_key(handle.protection)}-*.pid"):
        if str(pid_file) not in mine:
            NbdExport(image="", socket_path="", pid_file=str(pid_file),
                      log_file=str(pid_file.with_suffix(".log")), export_name="",
                      readonly=True, tcp=TcpListen("", 0, "")).stop(kill=True, timeout=10.0)
            pid_file.unlink(missing_ok=True)


def stop_frozen(settings: Settings, handle: FrozenHandle) -> None:
    """Stop the fronts of ``handle`` (idempotent; nothing is written through them)."""
    for disk in handle.remote:
        _front(settings, handle, disk, "", None).stop(kill=True, timeout=10.0)


_RAW = struct.Struct("<QQI")
_RAW_MAGIC = b"TREXT1\n"


def pack_extents(extents: list[tuple[int, int, int]]) -> bytes:
    """Block-status extents ``(offset, length, flags)`` as bytes for the catalog."""
    return _RAW_MAGIC + zlib.compress(b"".join(_RAW.pack(*e) for e in extents), 6)


def _unzip(data: bytes, magic: bytes, what: str) -> bytes:
    if not data.startswith(magic):
        raise ValueError(f"not {what}")
    try:
        return zlib.decompress(data[len(magic):])
    except zlib.error as e:
        raise ValueError(f"{what} damaged: {e}") from e


def unpack_extents(data: bytes) -> list[tuple[int, int, int]]:
    raw = _unzip(data, _RAW_MAGIC, "packed extents")
    if len(raw) % _RAW.size:
        raise ValueError("packed extents are truncated")
    return [(o, n, f) for o, n, f in _RAW.iter_unpack(raw)]


def pack_changes(changes: ChangeSet) -> bytes:
    """A change set as bytes for the catalog: a JSON summary line, then the extents
    packed (17 bytes each), compressed."""
    body = b"".join(_EXTENT.pack(e.offset, e.length, int(e.zero)) for e in changes.extents)
    head = changes.summary.model_dump_json().encode() + b"\n"
    return _MAGIC + zlib.compress(head + body, 6)


def unpack_changes(data: bytes) -> ChangeSet:
    raw = _unzip(data, _MAGIC, "a packed change set")
    head, _, body = raw.partition(b"\n")
    if len(body) % _EXTENT.size:
        raise ValueError("packed change set is truncated")
    summary = ChangeSummary.model_validate(json.loads(head))
    extents = [ChangeExtent(off, length, bool(zero))
               for off, length, zero in _EXTENT.iter_unpack(body)]
    return ChangeSet(summary=summary, extents=extents)


__all__ = ["pack_changes", "pack_extents", "serve_frozen", "stop_frozen", "unpack_changes",
           "unpack_extents"]
