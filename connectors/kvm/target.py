"""KVM/libvirt target: recovery points as chains of immutable qcow2 layers.

Layout under the replica root (config ``root``)::

    <root>/<protection>/<disk>/<cycle_id>.qcow2          one layer per recovery point
    <root>/<protection>/<disk>/staging-<cycle_id>.qcow2  the cycle being written
    <root>/<protection>/.boot/<instance>/               overlays + console.log of booted VMs
    <run_dir>/                                           qemu-nbd pid files and logs

``<disk>`` is the disk id with ``%`` and ``/`` percent-encoded. Each layer's backing
file is the previous point's layer of the same disk (absolute path, format qcow2),
so a point's content is its layer plus that chain. Committed layers are 0444 and
never opened writable again, except by retention (``delete``), which merges a
successor into the deleted layer and renames the result over the successor's path.

Every method is idempotent and can be re-run by another process after a crash;
the ``StagingHandle`` carries everything needed to rebuild a staging (``resume``).
See docs/platforms/kvm.md, section "Target".
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

from connectors import base
from connectors.base import ConnectorError, NotFound, PermanentError
from connectors.common.qemu import (
    UNIX_PATH_MAX,
    DiskFull,
    ImageLocked,
    NbdExport,
    TcpListen,
    backing_chain,
    backing_path,
    create_qcow2,
    fsync_path,
    processes_using,
    qcow2_header,
    run_qemu_img,
    serve_tcp,
)
from connectors.kvm import domain as dx
from connectors.kvm.config import KvmConfig
from transcend.guestprep import GuestPrepError, prepare_guest
from transcend.models import (
    BootSpec,
    Capabilities,
    DiskId,
    DiskInfo,
    Instance,
    NbdEndpoint,
    PlatformInfo,
    PointDisk,
    PointMeta,
    RecoveryPoint,
    StagingHandle,
    Workload,
)
from transcend.nbdtls import RemoteExport

DEFAULT_URI = "qemu:///system"
CLUSTER_SIZE = 65536
DEFAULT_MIN_FREE = 256 * 1024 * 1024
HANDLE_VERSION = 1

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@-]{0,199}$")


class Busy(base.Busy):
    """A file the operation must change is in use (an export, a staging overlay, a
    booted instance). Retryable: it succeeds once the user lets go."""


def _check_name(kind: str, value: str) -> str:
    if not _SAFE_NAME.match(value or ""):
        raise PermanentError(
            f"{kind} {value!r} cannot be used in a file name: use letters, digits and . _ : + @ -, "
            "starting with a letter or digit"
        )
    return value


def disk_dirname(disk: DiskId) -> str:
    """The directory name of a disk: its id with ``%`` and ``/`` percent-encoded."""
    if not disk or disk.startswith(".") or "\0" in disk:
        raise PermanentError(f"disk id {disk!r} cannot be used as a directory name")
    return disk.replace("%", "%25").replace("/", "%2F")


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _find(disks: list[PointDisk], disk: DiskId) -> PointDisk | None:
    return next((d for d in disks if d.disk == disk), None)


class KvmTarget:
    """The KVM/libvirt ``Target``. Config (``info.config``):

    - ``root`` (required): replica directory, created if missing.
    - ``uri``: libvirt URI for ``boot`` (default ``qemu:///system``).
    - ``domain_type``: ``qemu`` (TCG) or ``kvm`` (default ``qemu``).
    - ``run_dir``: qemu-nbd sockets, pid files and logs (default ``<root>/.run``).
    - ``min_free_bytes``: refuse to start a cycle below this much free space
      (default 256 MiB).
    - ``cache``: qemu-nbd cache mode for exports (default ``none``; falls back to
      ``writeback`` on filesystems without O_DIRECT).
    """

    #: the platform config it accepts, checked by `transcend platform add`
    config_model = KvmConfig

    #: A production boot starts paused and gets a checkpoint on every disk before its
    #: first instruction; qemu-nbd writes any 512-byte sector; libvirt logs the serial
    #: console to a file on this host, which the target site's worker reads.
    capabilities = Capabilities(guest_family="kvm", health=["console", "tcp"],
                                tracking_at_boot=True, write_granularity=512)

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        cfg = info.config
        root = cfg.get("root")
        if not root or not isinstance(root, str):
            raise PermanentError(
                f"platform {info.name!r}: config 'root' (the directory that holds the "
                "replicas) is required"
            )
        self.root = Path(os.path.abspath(root))
        self.uri = str(cfg.get("uri") or DEFAULT_URI)
        self.domain_type = str(cfg.get("domain_type") or "qemu")
        if self.domain_type not in ("qemu", "kvm"):
            raise PermanentError(
                f"platform {info.name!r}: config 'domain_type' is {self.domain_type!r}; "
                "use 'qemu' (TCG) or 'kvm'"
            )
        self.run_dir = Path(os.path.abspath(str(cfg.get("run_dir") or self.root / ".run")))
        try:
            self.min_free = int(cfg.get("min_free_bytes", DEFAULT_MIN_FREE))
        except (TypeError, ValueError) as e:
            raise PermanentError(f"platform {info.name!r}: config 'min_free_bytes': {e}") from e
        self.cache = str(cfg.get("cache") or "none")
        self._ensure_dir(self.root, "replica root")
        self._ensure_dir(self.run_dir, "run directory")

    # ------------------------------------------------------------------ paths, checks

    def _ensure_dir(self, path: Path, what: str) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._full(path) from e
            raise PermanentError(
                f"{what} {path} cannot be created ({e.strerror or e}): create it, or set the "
                f"platform's config 'root' to a directory the worker can write"
            ) from e
        # Unique per call: activities of one worker construct targets in parallel
        # threads, and a shared probe name let one thread delete another's probe.
        probe = path / f".probe-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._full(path) from e
            raise PermanentError(
                f"{what} {path} is not writable ({e.strerror or e}): make it writable by the "
                f"worker's user, or set the platform's config 'root' to another directory"
            ) from e

    def _full(self, path: Path | str) -> ConnectorError:
        return ConnectorError(f"target directory {path} is full: free space or change root")

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turn filesystem and qemu failures into the connector's errors."""
        try:
            yield
        except ImageLocked as e:
            raise Busy(f"{what}: an image is in use by another process: {e}") from e
        except DiskFull as e:
            raise ConnectorError(
                f"target directory {self.root} is full: free space or change root ({e})"
            ) from e
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._full(self.root) from e
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise PermanentError(
                    f"{what}: {e}; make {self.root} writable by the worker or change root"
                ) from e
            raise ConnectorError(f"{what}: {e}") from e

    def _check_free(self, path: Path) -> None:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free:
            raise ConnectorError(
                f"target directory {path} is full: {free} bytes free (less than "
                f"min_free_bytes={self.min_free}): free space or change root"
            )

    def check(self) -> list[str]:
        """ConnectivityCheck: the replica root is writable with room, and libvirt (which
        boots points) answers at the URI."""
        probe = self.root / f".check-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise PermanentError(f"replica root {self.root} is not writable ({e.strerror or e}): "
                                 "make it writable by the worker or change root") from e
        self._check_free(self.root)
        st = os.statvfs(self.root)
        lines = [f"replica root {self.root}: writable, {st.f_bavail * st.f_frsize >> 20} MiB free"]
        conn = self._connect()
        try:
            lines.append(f"libvirt at {self.uri} ({conn.getHostname()}) for booting points")
        finally:
            conn.close()
        return lines

    def protection_dir(self, protection: str) -> Path:
        return self.root / _check_name("protection", protection)

    def disk_dir(self, protection: str, disk: DiskId) -> Path:
        return self.protection_dir(protection) / disk_dirname(disk)

    def layer_path(self, protection: str, cycle_id: str, disk: DiskId) -> Path:
        return self.disk_dir(protection, disk) / f"{_check_name('cycle id', cycle_id)}.qcow2"

    def staging_path(self, protection: str, cycle_id: str, disk: DiskId) -> Path:
        name = f"staging-{_check_name('cycle id', cycle_id)}.qcow2"
        return self.disk_dir(protection, disk) / name

    def boot_dir(self, protection: str, name: str) -> Path:
        return self.protection_dir(protection) / ".boot" / _check_name("instance name", name)

    def _socket_dir(self) -> Path:
        """run_dir, unless a socket there would exceed the unix path limit; then a short
        directory under the system temp dir derived from run_dir (so still stable)."""
        if len(str(self.run_dir)) + 1 + len("st-0123456789abcdef.sock") <= UNIX_PATH_MAX:
            return self.run_dir
        short = Path(tempfile.gettempdir()) / f"transcend-{_key(str(self.run_dir))[:12]}"
        short.mkdir(mode=0o700, exist_ok=True)
        return short

    def _export(self, kind: str, key: str, image: Path, export_name: str,
                readonly: bool) -> NbdExport:
        return NbdExport(
            image=str(image),
            socket_path=str(self._socket_dir() / f"{kind}-{key}.sock"),
            pid_file=str(self.run_dir / f"{kind}-{key}.pid"),
            log_file=str(self.run_dir / f"{kind}-{key}.log"),
            export_name=export_name,
            readonly=readonly,
            cache=self.cache,
        )

    def _staging_export(self, protection: str, cycle_id: str, disk: DiskId,
                        staging: Path) -> NbdExport:
        return self._export("st", _key("staging", protection, cycle_id, disk), staging, disk,
                            readonly=False)

    def _staging_tcp_export(self, protection: str, cycle_id: str, disk: DiskId, staging: Path,
                            remote: RemoteExport) -> NbdExport:
        """The push-transfer export of a staging layer: its own pid/log files ("sn"), so
        it never mistakes a unix-socket export of the same layer for itself. The port
        is a placeholder until ``_serve_tcp`` picks one."""
        key = _key("staging", protection, cycle_id, disk)
        return dataclasses.replace(
            self._export("sn", key, staging, disk, readonly=False), socket_path="",
            tcp=TcpListen(host=remote.address, port=0, tls_dir=remote.tls_dir, psk=remote.psk))

    @staticmethod
    def _serve_tcp(export: NbdExport, remote: RemoteExport) -> NbdExport:
        return serve_tcp(export, remote.port_min, remote.port_max, "a staging export")

    def _point_export(self, point: RecoveryPoint, pd: PointDisk) -> NbdExport:
        return self._export("rp", _key("point", point.protection, point.id, pd.disk),
                            Path(pd.location), pd.disk, readonly=True)

    # ------------------------------------------------------------------ Target

    def prepare(self, protection: str, disks: list[DiskInfo],
                workloads: list[Workload] | None = None) -> None:
        """Create the replica's directories (idempotent) and check free space. Disks
        grow at the next ``begin``: its staging layer has the new size."""
        ids = [d.id for d in disks]
        if len(set(ids)) != len(ids):
            raise PermanentError(f"protection {protection!r}: disk ids are not unique: {ids}")
        with self._io(f"preparing {protection}"):
            for d in disks:
                self.disk_dir(protection, d.id).mkdir(parents=True, exist_ok=True)
            self._check_free(self.protection_dir(protection))

    def begin(self, protection: str, cycle_id: str, disks: list[DiskInfo],
              last: RecoveryPoint | None) -> KvmStaging:
        """Staging layers exported on unix sockets (writers on this host)."""
        return self._begin(protection, cycle_id, disks, last, None)

    def begin_remote(self, protection: str, cycle_id: str, disks: list[DiskInfo],
                     last: RecoveryPoint | None, remote: RemoteExport) -> KvmStaging:
        """Staging layers exported over TCP with TLS on ``remote.address`` (a push
        transfer: the source site writes from another host). ``handle.remote`` holds
        the ``nbds://`` URIs; writers add their own client certificates."""
        return self._begin(protection, cycle_id, disks, last, remote)

    def _begin(self, protection: str, cycle_id: str, disks: list[DiskInfo],
               last: RecoveryPoint | None, remote: RemoteExport | None) -> KvmStaging:
        self.prepare(protection, disks)
        committed = [d.id for d in disks if self.layer_path(protection, cycle_id, d.id).exists()]
        if committed:
            raise PermanentError(
                f"cycle {cycle_id} of {protection!r} is already committed for disk(s) "
                f"{committed}: retry its commit instead of beginning it again"
            )
        entries: dict[str, dict[str, Any]] = {}
        for d in disks:
            backing = ""
            if last is not None and (pd := _find(last.disks, d.id)) is not None:
                backing = pd.location
                if not os.path.exists(backing):
                    raise NotFound(
                        f"layer {backing} of point {last.id} (disk {d.id}) is missing: the "
                        "replica is damaged; start a new full sync of this disk"
                    )
                old = qcow2_header(backing).virtual_size
                if d.size < old:
                    raise PermanentError(
                        f"disk {d.id} of {protection!r} shrank from {old} to {d.size} bytes; "
                        "replicas only grow: protect the workload again"
                    )
            staging = self.staging_path(protection, cycle_id, d.id)
            export = (self._staging_export(protection, cycle_id, d.id, staging) if remote is None
                      else self._staging_tcp_export(protection, cycle_id, d.id, staging, remote))
            with self._io(f"creating staging layer {staging}"):
                self._ensure_staging(staging, export, d.size, backing)
                if remote is not None:
                    export = self._serve_tcp(export, remote)
            entries[d.id] = {
                "staging": str(staging),
                "layer": str(self.layer_path(protection, cycle_id, d.id)),
                "backing": backing,
                "size": d.size,
                "socket": export.socket_path,
                "pid_file": export.pid_file,
                "log_file": export.log_file,
                "export": export.export_name,
                "cache": export.cache,
            }
            if export.tcp is not None:
                entries[d.id]["tcp"] = dataclasses.asdict(export.tcp)
        handle = StagingHandle(
            platform=self.info.name, protection=protection, cycle_id=cycle_id,
            disks=list(disks), data={"version": HANDLE_VERSION, "disks": entries},
        )
        staging_obj = KvmStaging(self, handle)
        staging_obj.start_exports()
        if remote is not None:
            handle.remote = {d.id: staging_obj.endpoint(d.id) for d in disks}
        return staging_obj

    def _ensure_staging(self, staging: Path, export: NbdExport, size: int, backing: str) -> None:
        """Reuse a staging file of the same plan (a retried begin keeps its bytes);
        replace one built on another base or size."""
        if staging.exists():
            try:
                hdr = qcow2_header(staging)
                same = hdr.virtual_size == size and backing_path(staging) == (backing or "")
            except ConnectorError:
                same = False
            if same:
                return
            export.stop(kill=True)
            staging.unlink()
        self._check_free(staging.parent)
        tmp = staging.with_name(f".{staging.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        create_qcow2(tmp, size, backing=backing, cluster_size=CLUSTER_SIZE)
        os.replace(tmp, staging)
        fsync_path(staging.parent, directory=True)

    def resume(self, handle: StagingHandle) -> KvmStaging:
        if handle.platform != self.info.name:
            raise PermanentError(
                f"staging handle belongs to platform {handle.platform!r}, not {self.info.name!r}"
            )
        staging = KvmStaging(self, handle)
        staging.start_exports()
        return staging

    def open(self, point: RecoveryPoint, disk: DiskId) -> NbdEndpoint:
        pd = _find(point.disks, disk)
        if pd is None:
            raise NotFound(f"point {point.id} of {point.protection!r} has no disk {disk!r}")
        if not os.path.exists(pd.location):
            raise NotFound(f"layer {pd.location} of point {point.id} (disk {disk}) is missing")
        export = self._point_export(point, pd)
        with self._io(f"exporting point {point.id} disk {disk}"):
            export.start()
            size = qcow2_header(pd.location).virtual_size
        return NbdEndpoint(uri=export.uri, size=size, writable=False)

    def close(self, point: RecoveryPoint, disk: DiskId) -> None:
        pd = _find(point.disks, disk)
        if pd is not None:
            self._point_export(point, pd).stop(kill=True)

    # ------------------------------------------------------------------ retention

    def _layers_in(self, directory: Path) -> list[Path]:
        return sorted(p for p in directory.glob("*.qcow2") if p.is_file())

    def _referrers(self, layer: Path) -> list[Path]:
        """qcow2 files in the layer's directory whose backing file is ``layer``."""
        out = []
        for f in self._layers_in(layer.parent):
            if f == layer:
                continue
            try:
                if backing_path(f) == str(layer):
                    out.append(f)
            except (ConnectorError, OSError):
                continue
        return out

    def _instances_on(self, protection: str, layer: Path) -> list[str]:
        """Booted instances (overlay dirs) whose chain includes ``layer``."""
        boot = self.protection_dir(protection) / ".boot"
        users = []
        for overlay in sorted(boot.glob("*/*.qcow2")):
            try:
                if str(layer) in backing_chain(overlay):
                    users.append(overlay.parent.name)
            except (ConnectorError, OSError):
                continue
        return sorted(set(users))

    def _check_unused(self, protection: str, files: list[Path], what: str) -> None:
        users = processes_using(files)
        if users:
            desc = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in users)
            raise Busy(f"{what}: in use by {desc}; close exports and destroy instances first")
        for f in files:
            instances = self._instances_on(protection, f)
            if instances:
                raise Busy(
                    f"{what}: booted instance(s) {instances} run on {f}; destroy them first"
                )

    def delete(self, point: RecoveryPoint, successor: RecoveryPoint | None
               ) -> RecoveryPoint | None:
        """Remove ``point``'s layers without changing any remaining point's content.

        With a successor: ``qemu-img commit`` the successor's layer into the deleted
        layer (which then holds the successor's content over the same base), and
        rename it over the successor's path, so every later layer's backing
        reference stays valid. Before the rename, the successor's chain still reads
        the same (its own clusters win), so a re-run after a crash redoes commit and
        rename; when the deleted layer is already gone, the disk is done."""
        if successor is not None and successor.protection != point.protection:
            raise PermanentError("successor belongs to another protection")
        for pd in point.disks:
            layer = Path(pd.location)
            if not layer.exists():
                continue  # done (or never there)
            spd = _find(successor.disks, pd.disk) if successor is not None else None
            what = f"deleting point {point.id} disk {pd.disk}"
            with self._io(what):
                if spd is None:
                    self._delete_tip(point.protection, layer, what)
                else:
                    self._merge_into(point.protection, layer, Path(spd.location), what)
        return successor

    def _delete_tip(self, protection: str, layer: Path, what: str) -> None:
        refs = self._referrers(layer)
        staging_refs = [r for r in refs if r.name.startswith(("staging-", ".staging-"))]
        if staging_refs:
            raise Busy(f"{what}: staging layer(s) {staging_refs} are written over it; "
                       "commit or abort that cycle first")
        if refs:
            raise PermanentError(
                f"{what}: layer(s) {[str(r) for r in refs]} are backed by {layer}; "
                "pass the next point as successor"
            )
        self._check_unused(protection, [layer], what)
        layer.unlink()
        fsync_path(layer.parent, directory=True)

    def _merge_into(self, protection: str, layer: Path, succ: Path, what: str) -> None:
        if not succ.exists():
            raise NotFound(f"{what}: the successor's layer {succ} is missing")
        if backing_path(succ) != str(layer):
            raise PermanentError(
                f"{what}: {succ} is not backed by {layer} (backing: "
                f"{backing_path(succ) or 'none'}); pass the point that directly follows"
            )
        self._check_unused(protection, [layer, succ], what)
        succ_size = qcow2_header(succ).virtual_size
        base = backing_path(layer)
        os.chmod(layer, 0o644)
        if not os.access(succ, os.W_OK):  # qemu-img commit opens the top read-write
            os.chmod(succ, 0o644)
        # -d: leave the successor's own file as it is, so its chain keeps reading the
        # same until the rename replaces it.
        run_qemu_img(["commit", "-q", "-f", "qcow2", "-t", "writeback", "-d", str(succ)],
                     what=what)
        merged = qcow2_header(layer)
        if merged.virtual_size != succ_size or backing_path(layer) != base:
            raise ConnectorError(
                f"{what}: after the merge {layer} has size {merged.virtual_size} and backing "
                f"{backing_path(layer)!r}, expected {succ_size} and {base!r}; nothing was renamed"
            )
        fsync_path(layer)
        os.chmod(layer, 0o444)
        os.replace(layer, succ)
        fsync_path(succ.parent, directory=True)

    # ------------------------------------------------------------------ boot

    def _connect(self) -> libvirt.virConnect:
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise ConnectorError(f"cannot connect to libvirt at {self.uri}: {e}") from e

    def _ensure_network(self, conn: libvirt.virConnect, name: str, *, create: bool) -> None:
        try:
            net = conn.networkLookupByName(name)
        except libvirt.libvirtError:
            if not create:
                raise PermanentError(
                    f"libvirt network {name!r} does not exist at {self.uri}") from None
            try:
                net = conn.networkDefineXML(dx.isolated_network_xml(name))
            except libvirt.libvirtError:
                net = conn.networkLookupByName(name)  # defined concurrently
        if not net.isActive():
            try:
                net.create()
            except libvirt.libvirtError as e:
                if not net.isActive():
                    raise ConnectorError(f"cannot start libvirt network {name!r}: {e}") from e
        if create:
            with contextlib.suppress(libvirt.libvirtError):
                net.setAutostart(True)

    def _drop_isolated_network(self, conn: libvirt.virConnect) -> None:
        """Remove the isolated network once no domain uses it (we created it on demand)."""
        uses = re.compile(rf"""network=['"]{re.escape(dx.ISOLATED_NETWORK)}['"]""")
        for other in conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if uses.search(other.XMLDesc(0)):
                    return
        with contextlib.suppress(libvirt.libvirtError):
            net = conn.networkLookupByName(dx.ISOLATED_NETWORK)
            if net.isActive():
                net.destroy()
            net.undefine()

    def vm_namespace(self) -> str:
        """Domain names live in the libvirt daemon this URI reaches."""
        return f"libvirt:{self.uri}"

    def boot(self, point: RecoveryPoint, spec: BootSpec) -> Instance:
        """Define and start domain ``spec.name`` on fresh overlays of ``point``."""
        protection = point.protection
        boot_dir = self.boot_dir(protection, spec.name)
        console_log = boot_dir / "console.log"
        conn = self._connect()
        try:
            dom = self._lookup(conn, name=spec.name)
            if dom is not None:
                md = dx.read_metadata(dom.XMLDesc(0))
                if md.get("protection") != protection or md.get("point") != point.id:
                    raise PermanentError(
                        f"a libvirt domain named {spec.name!r} already exists and is not an "
                        f"instance of point {point.id} of {protection!r}; choose another name"
                    )
                if dom.isActive():
                    self._begin_tracking(dom, spec)
                    return self._instance(dom, spec, console_log, md.get("network", ""))
                if self._files_present(dom) and boot_dir.is_dir():
                    self._start(dom, spec)
                    return self._instance(dom, spec, console_log, md.get("network", ""))
                # An earlier attempt died between defining the domain and starting it,
                # and its overlays are gone: define it again from scratch.
                with contextlib.suppress(libvirt.libvirtError):
                    self._undefine(dom)

            disks = self._boot_disks(point, spec)
            wl = spec.workload
            if spec.network:
                network = spec.network
            elif wl is not None and wl.nics:
                network = dx.ISOLATED_NETWORK
            else:
                network = ""
            nics: list[dx.BootNic] = []
            for nic in wl.nics if wl is not None else []:
                net = network
                if not spec.isolated and not spec.network and nic.network:
                    # not isolated, no network named: the runbook's mapping of the
                    # source's network, else the same name
                    net = spec.network_map.get(nic.network, nic.network)
                nics.append(dx.BootNic(network=net, mac=nic.mac, model=nic.model))
            for net in sorted({n.network for n in nics}):
                self._ensure_network(conn, net, create=net == dx.ISOLATED_NETWORK)

            with self._io(f"creating overlays for {spec.name}"):
                if boot_dir.exists():  # left by a boot that crashed before defining
                    shutil.rmtree(boot_dir)
                boot_dir.parent.mkdir(mode=0o755, exist_ok=True)
                boot_dir.mkdir(mode=0o755)
                self._check_free(boot_dir)
                bdisks = []
                for pd, info in disks:
                    overlay = boot_dir / f"{disk_dirname(pd.disk)}.qcow2"
                    create_qcow2(overlay, qcow2_header(pd.location).virtual_size,
                                 backing=pd.location, cluster_size=CLUSTER_SIZE)
                    bdisks.append(dx.BootDisk(
                        overlay=str(overlay), chain=backing_chain(pd.location),
                        bus=info.bus if info else "virtio",
                        boot_order=info.boot_order if info else None,
                    ))
            prepared = self._prepare_guest(spec, [b.overlay for b in bdisks], boot_dir)
            shape = dx.DomainShape(
                name=spec.name,
                domain_type=self.domain_type,
                cpus=spec.cpus or (wl.cpus if wl else 1),
                memory_mib=spec.memory_mib or (wl.memory_mib if wl else 512),
                firmware=wl.firmware if wl else "bios",
                secure_boot=wl.secure_boot if wl else False,
                machine=wl.machine if wl else "",
                disks=bdisks,
                nics=nics,
                console_log=str(console_log),
                metadata={"protection": protection, "point": point.id,
                          "boot_dir": str(boot_dir), "network": network,
                          "role": "production" if spec.production else "test"},
            )
            try:
                dom = conn.defineXML(dx.domain_xml(shape))
            except libvirt.libvirtError as e:
                if self._lookup(conn, name=spec.name) is None:
                    shutil.rmtree(boot_dir, ignore_errors=True)
                # else: defined meanwhile by an attempt whose call was still in flight
                # in libvirtd; our overlays stay for it and the retry takes it over.
                raise ConnectorError(f"defining domain {spec.name!r} failed: {e}") from e
            try:
                self._start(dom, spec)
            except ConnectorError:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    self._undefine(dom)
                shutil.rmtree(boot_dir, ignore_errors=True)
                raise
            instance = self._instance(dom, spec, console_log, network)
            instance.prepared = prepared
            return instance
        finally:
            conn.close()

    @staticmethod
    def _prepare_guest(spec: BootSpec, overlays: list[str], boot_dir: Path) -> list[str]:
        """Conversion and re-IP on the fresh overlays, before the domain exists (the
        point's layers are their read-only backing files). A failure removes the
        overlays and is permanent: the guest, not the moment, is the problem."""
        if spec.guest_prep is None or not spec.guest_prep.needed():
            return []
        try:
            return prepare_guest(overlays, spec.guest_prep)
        except (GuestPrepError, OSError, subprocess.SubprocessError) as e:
            shutil.rmtree(boot_dir, ignore_errors=True)
            raise PermanentError(f"preparing {spec.name!r} before its first boot failed: {e}") from e

    @staticmethod
    def _files_present(dom: libvirt.virDomain) -> bool:
        xml = ET.fromstring(dom.XMLDesc(0))
        files = [src.get("file", "") for src in xml.findall("devices/disk/source")]
        return all(f and os.path.exists(f) for f in files)

    def _boot_disks(self, point: RecoveryPoint, spec: BootSpec
                    ) -> list[tuple[PointDisk, DiskInfo | None]]:
        out: list[tuple[PointDisk, DiskInfo | None]] = []
        wl = spec.workload
        if wl is None:
            out = [(pd, None) for pd in point.disks]
        else:
            for info in wl.disks:
                pd = _find(point.disks, info.id) or _find(point.disks, f"{wl.name}/{info.id}")
                if pd is None:
                    raise NotFound(
                        f"point {point.id} has no disk {info.id!r} of workload {wl.name!r}"
                    )
                out.append((pd, info))
        if not out:
            raise PermanentError(f"point {point.id} has no disks to boot")
        for pd, _ in out:
            if not os.path.exists(pd.location):
                raise NotFound(f"layer {pd.location} of point {point.id} is missing")
        return out

    def _start(self, dom: libvirt.virDomain, spec: BootSpec) -> None:
        """Start the domain. A production VM starts paused, gets its change tracking,
        then runs: the checkpoint holds every block the guest ever writes."""
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if spec.production else 0)
        except libvirt.libvirtError as e:
            raise ConnectorError(
                f"starting domain {spec.name!r} failed: {e} (the qemu user must be able to "
                f"read the layers and traverse {self.root})"
            ) from e
        self._begin_tracking(dom, spec)

    @staticmethod
    def _begin_tracking(dom: libvirt.virDomain, spec: BootSpec) -> None:
        """Production only: the checkpoint ``spec.tracking_name`` on every disk, created
        while the CPUs are still stopped, then the guest runs. Idempotent."""
        if not spec.production:
            return
        if not spec.tracking_name:
            raise PermanentError("a production boot needs a tracking checkpoint name")
        try:
            names = {c.getName() for c in dom.listAllCheckpoints(0)}
            state, _ = dom.state()
            if spec.tracking_name not in names:
                if state != libvirt.VIR_DOMAIN_PAUSED:
                    # Running without its tracking (created by hand?): what it wrote so
                    # far is unknown, so refuse rather than promise an exact failback.
                    raise PermanentError(
                        f"domain {spec.name!r} runs without the change tracking a production "
                        "boot starts; destroy it and fail over again")
                cp = ET.Element("domaincheckpoint")
                ET.SubElement(cp, "name").text = spec.tracking_name
                ET.SubElement(cp, "description").text = "transcend: changes since failover"
                disks = ET.SubElement(cp, "disks")
                for d in dx.domain_disks(ET.fromstring(dom.XMLDesc(0))):
                    t = d.find("target")
                    if t is not None:
                        ET.SubElement(disks, "disk", name=t.get("dev", ""), checkpoint="bitmap")
                dom.checkpointCreateXML(ET.tostring(cp, "unicode"), 0)
            if state == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        except libvirt.libvirtError as e:
            raise ConnectorError(
                f"starting change tracking on {spec.name!r} failed: {e.get_error_message()}"
            ) from e

    def _instance(self, dom: libvirt.virDomain, spec: BootSpec, console_log: Path,
                  network: str) -> Instance:
        xml = ET.fromstring(dom.XMLDesc(0))
        overlays = [src.get("file", "") for src in xml.findall("devices/disk/source")]
        return Instance(
            platform=self.info.name, id=dom.UUIDString(), name=spec.name,
            console_log=str(console_log), overlays=overlays, network=network,
            state="running" if dom.isActive() else "stopped",
            tracking=spec.tracking_name if spec.production else "",
        )

    # ------------------------------------------------------------------ health (HealthProbe)

    def console_text(self, instance: Instance) -> str:
        """The serial console libvirt logs for the domain (``<serial type='file'>``)."""
        try:
            return Path(instance.console_log).read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def agent_ready(self, instance: Instance) -> bool:
        """The QEMU guest agent answers a ping (a guest without one never is)."""
        conn = self._connect()
        try:
            dom = self._lookup(conn, uuid=instance.id, name=instance.name)
            if dom is None or not dom.isActive():
                return False
            import libvirt_qemu

            libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
            return True
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()

    def address(self, instance: Instance) -> str:
        """The first IPv4 address libvirt knows for the domain (DHCP lease, else ARP)."""
        conn = self._connect()
        try:
            dom = self._lookup(conn, uuid=instance.id, name=instance.name)
            if dom is None or not dom.isActive():
                return ""
            for src in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                        libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP):
                try:
                    ifaces = dom.interfaceAddresses(src)
                except libvirt.libvirtError:
                    continue
                for iface in ifaces.values():
                    for a in iface.get("addrs") or []:
                        if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and a.get("addr"):
                            return str(a["addr"])
            return ""
        finally:
            conn.close()

    @staticmethod
    def _lookup(conn: libvirt.virConnect, *, uuid: str = "", name: str = ""
                ) -> libvirt.virDomain | None:
        if uuid:
            with contextlib.suppress(libvirt.libvirtError):
                return conn.lookupByUUIDString(uuid)
        if name:
            with contextlib.suppress(libvirt.libvirtError):
                return conn.lookupByName(name)
        return None

    @staticmethod
    def _undefine(dom: libvirt.virDomain) -> None:
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            dom.undefine()

    def destroy(self, instance: Instance) -> None:
        """Stop and undefine the domain, delete its overlay directory (idempotent).
        Refuses to touch a domain that is not a transcend instance."""
        dirs: set[Path] = {Path(o).parent for o in instance.overlays}
        conn = self._connect()
        try:
            dom = self._lookup(conn, uuid=instance.id, name=instance.name)
            if dom is not None:
                md = dx.read_metadata(dom.XMLDesc(0))
                if not md:
                    raise PermanentError(
                        f"domain {dom.name()!r} is not a transcend instance; not destroying it"
                    )
                if md.get("boot_dir"):
                    dirs.add(Path(md["boot_dir"]))
                if dom.isActive():
                    try:
                        dom.destroy()
                    except libvirt.libvirtError:
                        if dom.isActive():
                            raise
                with contextlib.suppress(libvirt.libvirtError):
                    self._undefine(dom)
                if md.get("network") == dx.ISOLATED_NETWORK:
                    self._drop_isolated_network(conn)
        except libvirt.libvirtError as e:
            raise ConnectorError(f"destroying {instance.name!r} failed: {e}") from e
        finally:
            conn.close()
        for d in dirs:
            # only our own overlay directories: <root>/<protection>/.boot/<name>
            if d.parent.name == ".boot" and d.is_relative_to(self.root):
                shutil.rmtree(d, ignore_errors=True)


class KvmStaging:
    """One cycle's staging layers and their writable qemu-nbd exports."""

    def __init__(self, target: KvmTarget, handle: StagingHandle) -> None:
        self.target = target
        self.handle = handle
        t = target
        data = handle.data.get("disks", {})
        self._entries: dict[str, dict[str, Any]] = {}
        for d in handle.disks:
            e = dict(data.get(d.id) or {})
            staging = Path(e.get("staging")
                           or t.staging_path(handle.protection, handle.cycle_id, d.id))
            default = t._staging_export(handle.protection, handle.cycle_id, d.id, staging)
            e.setdefault("staging", str(staging))
            e.setdefault("layer", str(t.layer_path(handle.protection, handle.cycle_id, d.id)))
            e.setdefault("size", d.size)
            e.setdefault("socket", default.socket_path)
            e.setdefault("pid_file", default.pid_file)
            e.setdefault("log_file", default.log_file)
            e.setdefault("export", d.id)
            e.setdefault("cache", t.cache)
            self._entries[d.id] = e

    def _nbd(self, disk: DiskId) -> NbdExport:
        e = self._entry(disk)
        tcp = TcpListen(**e["tcp"]) if e.get("tcp") else None
        return NbdExport(image=e["staging"], socket_path=e["socket"], pid_file=e["pid_file"],
                         log_file=e["log_file"], export_name=e["export"], readonly=False,
                         cache=e["cache"], tcp=tcp)

    def _entry(self, disk: DiskId) -> dict[str, Any]:
        try:
            return self._entries[disk]
        except KeyError:
            raise NotFound(f"cycle {self.handle.cycle_id} has no disk {disk!r}") from None

    def start_exports(self) -> None:
        """(Re)start the export of every uncommitted disk whose staging file exists."""
        for disk, e in self._entries.items():
            if os.path.exists(e["layer"]) or not os.path.exists(e["staging"]):
                continue
            with self.target._io(f"exporting staging layer of {disk}"):
                self._nbd(disk).start()

    def endpoint(self, disk: DiskId) -> NbdEndpoint:
        e = self._entry(disk)
        if os.path.exists(e["layer"]):
            raise PermanentError(f"cycle {self.handle.cycle_id} disk {disk} is already committed")
        if not os.path.exists(e["staging"]):
            raise NotFound(
                f"staging layer {e['staging']} is gone (aborted?); begin the cycle again"
            )
        nbd = self._nbd(disk)
        with self.target._io(f"exporting staging layer of {disk}"):
            nbd.start()
            size = qcow2_header(e["staging"]).virtual_size
        return NbdEndpoint(uri=nbd.uri, size=size, writable=True)

    def commit(self, meta: PointMeta) -> list[str]:
        """Stop each export (qemu-nbd flushes on exit), check, fsync, make the file
        read-only and rename it to ``<cycle_id>.qcow2``. Returns the layer paths in
        ``handle.disks`` order. A re-run after a crash finishes the remaining disks."""
        if meta.cycle_id != self.handle.cycle_id:
            raise PermanentError(
                f"commit of cycle {meta.cycle_id} on the staging of cycle {self.handle.cycle_id}"
            )
        out = []
        for d in self.handle.disks:
            e = self._entries[d.id]
            layer, staging = Path(e["layer"]), Path(e["staging"])
            what = f"committing cycle {self.handle.cycle_id} disk {d.id}"
            if layer.exists():
                out.append(str(layer))
                continue
            if not staging.exists():
                raise NotFound(
                    f"{what}: staging layer {staging} is gone (aborted?); the cycle must be "
                    "run again"
                )
            with self.target._io(what):
                self._nbd(d.id).stop()
                users = processes_using([staging])
                if users:
                    raise Busy(f"{what}: {staging} is still open by {users}")
                proc = run_qemu_img(["check", "-q", "-f", "qcow2", str(staging)], what=what,
                                    ok_codes=(0, 2, 3))
                if proc.returncode == 2:
                    raise PermanentError(
                        f"{what}: {staging} is corrupt ({proc.stdout.strip()} "
                        f"{proc.stderr.strip()}); abort the cycle and run it again"
                    )
                fsync_path(staging)
                os.chmod(staging, 0o444)
                os.replace(staging, layer)
                fsync_path(layer.parent, directory=True)
            out.append(str(layer))
        return out

    def close(self) -> None:
        """Nothing to stop: the staging exports live until commit or abort (their
        qemu-nbd processes are found again by pid file in any worker process)."""

    def abort(self) -> None:
        """Stop the exports and delete the staging files (idempotent). Layers of a
        partly committed cycle are removed too (commit never returned, so no point
        can have been recorded); a fully committed cycle cannot be aborted."""
        entries = [self._entries[d.id] for d in self.handle.disks]
        if entries and all(os.path.exists(e["layer"]) for e in entries):
            raise PermanentError(
                f"cycle {self.handle.cycle_id} is committed; delete its point instead of aborting"
            )
        for d in self.handle.disks:
            e = self._entries[d.id]
            staging, layer = Path(e["staging"]), Path(e["layer"])
            with self.target._io(f"aborting cycle {self.handle.cycle_id} disk {d.id}"):
                self._nbd(d.id).stop(kill=True)
                for f in (staging, staging.with_name(f".{staging.name}.tmp")):
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
                if layer.exists():
                    what = f"aborting partly committed cycle {self.handle.cycle_id}"
                    self.target._delete_tip(self.handle.protection, layer, what)
                if staging.parent.exists():
                    fsync_path(staging.parent, directory=True)


def is_readonly(path: str | os.PathLike[str]) -> bool:
    """True when no one has write permission on ``path``."""
    mode = os.stat(path).st_mode
    return not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
