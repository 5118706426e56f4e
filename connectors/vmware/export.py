"""NBD exports of a frozen vSphere disk, served by nbdkit for blockstream to read.

Two ways, chosen per platform:

* **VDDK** (``vddk_libdir`` set): nbdkit's ``vddk`` plugin opens the disk through
  VMware's Virtual Disk Development Kit with the snapshot's moref, so any disk
  chain (older snapshots, delta formats) reads correctly, over NBD(SSL)/HotAdd/SAN.
* **Datastore file endpoint** (the default): nbdkit's ``curl`` plugin reads the
  frozen base disk's ``-flat.vmdk`` with HTTPS range requests on
  ``/folder/<path>?dcPath=…&dsName=…``, authenticated by the API session's cookie.
  Correct only when the snapshot's disk is a base (flat) disk, i.e. the VM had no
  older snapshot; the source checks that before it exports.

The commands are built by pure functions (unit-tested); secrets go to 0600 files
named on the command line (``+FILE``), never into argv, which ``ps`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from connectors.base import PermanentError
from connectors.common.sockserver import SocketServer, write_secret

NBDKIT = "nbdkit"


@dataclass(frozen=True)
class CurlSource:
    url: str
    cookie_file: Path
    ca_file: str = ""  # "" with verify=False: thumbprint-pinned or insecure
    verify: bool = True


@dataclass(frozen=True)
class VddkSource:
    libdir: str
    server: str
    user: str
    password_file: Path
    thumbprint: str  # SHA-1, colon-separated, as VDDK wants it
    vm_moref: str
    snapshot_moref: str
    file: str  # "[datastore] dir/disk.vmdk" of the snapshot's disk
    port: int = 443
    transports: str = "nbdssl:nbd"
    config_file: str = ""


def nbdkit_command(src: CurlSource | VddkSource, sock: Path, *, readonly: bool = True) -> list[str]:
    """The nbdkit command line serving ``src`` on the unix socket ``sock`` (read-only
    unless a VDDK target writes through it)."""
    if not readonly and isinstance(src, CurlSource):
        raise PermanentError("the datastore file endpoint is read-only; writing needs VDDK")
    cmd = [NBDKIT, *(["--readonly"] if readonly else []), "--exit-with-parent", "--foreground",
           "--unix", str(sock),
           # A transient HTTP/VDDK error is retried inside nbdkit before blockstream
           # sees it; blockstream's own retry then resumes from its durable offset.
           "--filter=retry"]
    if isinstance(src, CurlSource):
        cmd += ["curl", f"url={src.url}", f"cookie=+{src.cookie_file}", "timeout=300",
                "followlocation=false", "protocols=https"]
        if not src.verify:
            cmd.append("sslverify=false")
        elif src.ca_file:
            cmd.append(f"cainfo={src.ca_file}")
        return cmd
    cmd += ["vddk", f"libdir={src.libdir}", f"server={src.server}", f"user={src.user}",
            f"password=+{src.password_file}", f"thumbprint={src.thumbprint}",
            f"vm=moref={src.vm_moref}", f"file={src.file}", f"transports={src.transports}"]
    if src.snapshot_moref:  # a target writes the VM's current disk: no snapshot
        cmd.insert(cmd.index(f"file={src.file}"), f"snapshot={src.snapshot_moref}")
    if src.port != 443:
        cmd.append(f"port={src.port}")
    if src.config_file:
        cmd.append(f"config={src.config_file}")
    return cmd


def vddk_thumbprint(sha1_hex: str) -> str:
    """``aabb…`` -> ``AA:BB:…`` (VDDK's format)."""
    h = "".join(c for c in sha1_hex.lower() if c in "0123456789abcdef")
    if len(h) != 40:
        raise PermanentError("VDDK needs the SHA-1 thumbprint of the vCenter/ESXi certificate "
                             "(40 hex digits) in the platform config thumbprint")
    return ":".join(h[i:i + 2] for i in range(0, 40, 2)).upper()


def serve_nbdkit(make_source: CurlSourceFactory | VddkSourceFactory, what: str, *,
                 readonly: bool = True) -> SocketServer:
    return SocketServer.start(
        lambda d, sock: nbdkit_command(make_source(d), sock, readonly=readonly), what,
        prefix="vmw")


def serve_file(path: Path, *, writable: bool, what: str) -> SocketServer:
    """qemu-nbd over one raw file (the VMware target's ``file`` writer)."""
    def command(_: Path, sock: Path) -> list[str]:
        return ["qemu-nbd", "--format=raw", "--persistent", "--shared=16", "--cache=none",
                "--aio=native", *([] if writable else ["--read-only"]), f"--socket={sock}",
                str(path)]
    return SocketServer.start(command, what, prefix="vmw")


class CurlSourceFactory:
    """Builds the CurlSource inside the export's private directory (the cookie file)."""

    def __init__(self, url: str, cookie: str, ca_file: str, verify: bool) -> None:
        self.url, self.cookie, self.ca_file, self.verify = url, cookie, ca_file, verify

    def __call__(self, directory: Path) -> CurlSource:
        return CurlSource(url=self.url, cookie_file=write_secret(directory, "cookie", self.cookie),
                          ca_file=self.ca_file, verify=self.verify)


class VddkSourceFactory:
    def __init__(self, password: str, **fields: object) -> None:
        self.password, self.fields = password, fields

    def __call__(self, directory: Path) -> VddkSource:
        return VddkSource(password_file=write_secret(directory, "password", self.password),
                          **self.fields)  # type: ignore[arg-type]
