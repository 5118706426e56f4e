"""Direct NBD access to the disks of a shut-off libvirt domain (failback).

A failback writes the failed-over VM's changes straight into the original VM's own
disk images, which only a qemu-nbd of our own can do while the domain is off:
libvirt has no writable export of a disk. qemu-nbd takes QEMU's image lock, so the
domain cannot be started while we write (and we cannot open a disk QEMU holds).

Writes through qemu-nbd go through QEMU's block layer: the enabled persistent dirty
bitmaps in a qcow2 image (libvirt checkpoints) record them. That is what lets the
original protection continue incrementally after a failback: its last checkpoint
holds the original VM's own changes plus everything the failback wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt

from connectors.base import ConnectorError, DiskAccess, PermanentError
from connectors.common.qemu import NbdExport, run_qemu_img
from connectors.kvm.domain import domain_disks
from connectors.kvm.source import KvmSource, open_libvirt


def _image_info(path: str) -> tuple[str, int]:
    """Format and virtual size of an image (``qemu-img info``, shared lock)."""
    info = json.loads(run_qemu_img(["info", "-U", "--output=json", path],
                                   what=f"reading {path}").stdout)
    return str(info.get("format", "raw")), int(info["virtual-size"])


def _disks_of(source: KvmSource, ref: str) -> tuple[str, list[tuple[str, str]]]:
    conn = open_libvirt(source.uri)
    try:
        dom = source._lookup(conn, ref)
        if dom.isActive():
            raise PermanentError(
                f"VM {dom.name()!r} is running; its disks can only be written directly "
                "while it is shut off")
        root = ET.fromstring(dom.XMLDesc(0))
        disks = []
        for d in domain_disks(root):
            target, src = d.find("target"), d.find("source")
            if target is None or src is None:
                continue
            path = src.get("file") or src.get("dev") or ""
            if not path:
                raise PermanentError(
                    f"disk {target.get('dev')} of {dom.name()!r} is not a local file or "
                    "block device; failback into it is not supported")
            disks.append((target.get("dev", ""), path))
        return dom.name(), disks
    except libvirt.libvirtError as e:
        raise ConnectorError(f"reading the disks of {ref!r} failed: {e}") from e
    finally:
        conn.close()


@contextlib.contextmanager
def open_disks(source: KvmSource, ref: str, *, readonly: bool) -> Iterator[list[DiskAccess]]:
    """qemu-nbd exports of every disk of the shut-off VM ``ref``, in domain order; stopped
    (and so flushed) on exit. An export left by a crashed process is replaced."""
    name, disks = _disks_of(source, ref)
    tag = hashlib.sha1(f"{source.uri}/{ref}".encode()).hexdigest()[:12]
    run = Path(source.work_dir) / "direct" / tag
    run.mkdir(parents=True, exist_ok=True)
    exports: list[NbdExport] = []
    try:
        out = []
        for dev, path in disks:
            sock = run / f"{dev}.sock"
            fmt, size = _image_info(path)
            export = NbdExport(
                image=path, socket_path=str(sock), pid_file=str(run / f"{dev}.pid"),
                log_file=str(run / f"{dev}.log"), export_name=dev, readonly=readonly, fmt=fmt,
            )
            export.stop()  # one left by a crashed attempt (maybe of the other mode)
            exports.append(export)
            export.start()
            out.append(DiskAccess(disk=dev, size=size, uri=export.uri))
        yield out
    finally:
        errors = []
        for export in exports:
            try:
                export.stop()
            except ConnectorError as e:
                errors.append(str(e))
        if errors:
            raise ConnectorError(f"closing the disks of {name!r}: {'; '.join(errors)}")
