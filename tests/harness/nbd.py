"""Start real NBD servers (qemu-nbd, nbdkit) for tests and benchmarks.

Small API, meant to be reused by every test that needs an NBD endpoint::

    from harness.nbd import qemu_nbd, nbdkit, make_x509, make_psk

    with qemu_nbd(image, fmt="qcow2") as srv:       # unix socket
        copy(srv.uri, ...)
    with qemu_nbd(image, tcp=True, tls=make_x509(tmp)) as srv:
        ...                                          # nbds://localhost:PORT/
    srv.kill()    # SIGKILL: a crashed server
    srv.stop()    # SIGTERM, then SIGKILL after a grace period

Every server runs in the foreground as a child of the test process (own
session, so a stray signal to the test's group does not reach it), listens on
a unix socket in a short private directory or on a free 127.0.0.1 port, and
is ready when it has sent the NBD greeting.  ``with`` stops it and removes the
directory.  Server stderr goes to ``server.log`` next to the socket; its tail
is put into the error when a server does not come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NbdServer",
    "TlsPsk",
    "TlsX509",
    "free_port",
    "make_psk",
    "make_x509",
    "nbdkit",
    "qemu_nbd",
]

READY_TIMEOUT = 15.0


@dataclass(frozen=True)
class TlsX509:
    """x509 credentials: ``server_dir`` holds ca-cert.pem, server-cert.pem and
    server-key.pem (the layout qemu and nbdkit read); ``client_dir`` holds
    ca-cert.pem and client-cert.pem/client-key.pem (libnbd's layout)."""

    server_dir: Path
    client_dir: Path

    def client_query(self) -> str:
        return f"tls-certificates={self.client_dir}"


@dataclass(frozen=True)
class TlsPsk:
    """A pre-shared key file (psktool format) and the client user name."""

    psk_file: Path
    username: str

    def client_query(self) -> str:
        # tls-username= is what newer libnbd and blockstream understand; for
        # TCP the URI also carries the user in its authority (libnbd 1.14)
        return f"tls-psk-file={self.psk_file}&tls-username={self.username}"


def _run(argv: Sequence[str], cwd: Path | None = None) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, cwd=cwd)


def make_x509(workdir: Path, hostname: str = "localhost", *, ca_name: str = "transcend test CA") -> TlsX509:
    """Create a CA, a server certificate for ``hostname`` (and 127.0.0.1, ::1)
    and a client certificate with certtool (gnutls-bin)."""
    workdir = Path(workdir)
    server = workdir / "server"
    client = workdir / "client"
    server.mkdir(parents=True, exist_ok=True)
    client.mkdir(parents=True, exist_ok=True)
    ca_key = workdir / "ca-key.pem"
    ca_cert = server / "ca-cert.pem"
    (workdir / "ca.info").write_text(f'cn = "{ca_name}"\nca\ncert_signing_key\nexpiration_days = 30\n')
    _run(["certtool", "--generate-privkey", "--outfile", str(ca_key)])
    _run(
        [
            "certtool",
            "--generate-self-signed",
            "--load-privkey",
            str(ca_key),
            "--template",
            str(workdir / "ca.info"),
            "--outfile",
            str(ca_cert),
        ]
    )
    shutil.copy(ca_cert, client / "ca-cert.pem")

    def issue(name: str, key: Path, cert: Path, extra: str) -> None:
        info = workdir / f"{name}.info"
        info.write_text(
            f'organization = "transcend tests"\ncn = "{hostname}"\n'
            f"expiration_days = 30\nsigning_key\nencryption_key\n{extra}"
        )
        _run(["certtool", "--generate-privkey", "--outfile", str(key)])
        _run(
            [
                "certtool",
                "--generate-certificate",
                "--load-ca-certificate",
                str(ca_cert),
                "--load-ca-privkey",
                str(ca_key),
                "--load-privkey",
                str(key),
                "--template",
                str(info),
                "--outfile",
                str(cert),
            ]
        )

    issue(
        "server",
        server / "server-key.pem",
        server / "server-cert.pem",
        f'dns_name = "{hostname}"\nip_address = "127.0.0.1"\nip_address = "::1"\ntls_www_server\n',
    )
    issue("client", client / "client-key.pem", client / "client-cert.pem", "tls_www_client\n")
    for key in (ca_key, server / "server-key.pem", client / "client-key.pem"):
        key.chmod(0o600)
    return TlsX509(server_dir=server, client_dir=client)


def make_psk(workdir: Path, username: str = "transcend") -> TlsPsk:
    """Create a PSK file with psktool (gnutls-bin).  qemu wants it named
    keys.psk inside a directory; the same file works for nbdkit and libnbd."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    psk = workdir / "keys.psk"
    _run(["psktool", "-u", username, "-p", str(psk)])
    psk.chmod(0o600)
    return TlsPsk(psk_file=psk, username=username)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NbdServer:
    """One NBD server process.  Use as a context manager (or start()/stop()).

    ``uri`` is the libnbd URI of the export, TLS parameters included.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workdir: Path,
        socket_path: Path | None = None,
        port: int | None = None,
        export: str = "",
        tls: TlsX509 | TlsPsk | None = None,
        tls_hostname: str = "localhost",
        owns_workdir: bool = False,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        if (socket_path is None) == (port is None):
            raise ValueError("give exactly one of socket_path and port")
        self.argv = list(argv)
        self.workdir = Path(workdir)
        self.socket_path = socket_path
        self.port = port
        self.export = export
        self.tls = tls
        self.tls_hostname = tls_hostname
        self.log_path = self.workdir / "server.log"
        self.ready_timeout = ready_timeout
        self._owns_workdir = owns_workdir
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addressing --------------------------------------------------------
    @property
    def uri(self) -> str:
        return self.uri_with(self.tls)

    def uri_with(self, tls: TlsX509 | TlsPsk | None) -> str:
        """The URI with other (e.g. wrong) client credentials, for negative tests."""
        query = []
        if self.socket_path is not None:
            scheme = "nbds+unix" if tls else "nbd+unix"
            authority = ""
            query.append(f"socket={self.socket_path}")
        else:
            scheme = "nbds" if tls else "nbd"
            authority = f"{self.tls_hostname if tls else '127.0.0.1'}:{self.port}"
            if isinstance(tls, TlsPsk):
                # libnbd 1.14 (nbdcopy, nbdinfo) reads the user only from here
                authority = f"{tls.username}@{authority}"
        if tls is not None:
            query.append(tls.client_query())
        q = ("?" + "&".join(query)) if query else ""
        return f"{scheme}://{authority}/{self.export}{q}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- life cycle --------------------------------------------------------
    def start(self) -> NbdServer:
        if self.proc is not None:
            raise RuntimeError("server already started")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self) -> socket.socket:
        if self.socket_path is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(1.0)
            s.connect(str(self.socket_path))
        else:
            s = socket.create_connection(("127.0.0.1", self.port or 0), timeout=1.0)
        return s

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with self._connect() as s:
                    greeting = s.recv(8, socket.MSG_WAITALL)
                if greeting == b"NBDMAGIC":
                    return
                last = RuntimeError(f"unexpected greeting {greeting!r}")
            except OSError as e:
                last = e
            time.sleep(0.02)
        raise TimeoutError(
            f"{self.argv[0]} not ready after {self.ready_timeout}s ({last}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes an owned workdir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NbdServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _workdir() -> Path:
    # unix socket paths are limited to 107 bytes: keep them short
    return Path(tempfile.mkdtemp(prefix="nbd-", dir="/tmp"))


def _listen(tcp: bool, workdir: Path) -> tuple[Path | None, int | None]:
    if tcp:
        return None, free_port()
    return workdir / "sock", None


def qemu_nbd(
    image: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    tcp: bool = False,
    tls: TlsX509 | TlsPsk | None = None,
    bitmap: str | None = None,
    read_only: bool = False,
    shared: int = 16,
    export: str = "",
    cache: str = "writeback",
    discard: str = "unmap",
    extra: Sequence[str] = (),
    start: bool = True,
) -> NbdServer:
    """qemu-nbd serving ``image`` (``fmt`` "raw"/"qcow2"/...; None: probe).

    Persistent (-t) and shared by ``shared`` clients, so several connections
    can come and go.  ``bitmap`` exports the persistent dirty bitmap as the
    meta context ``qemu:dirty-bitmap:<bitmap>``.
    """
    workdir = _workdir()
    sock, port = _listen(tcp, workdir)
    argv = ["qemu-nbd", "-t", "-e", str(shared), f"--cache={cache}", f"--discard={discard}"]
    if fmt:
        argv += ["-f", fmt]
    if sock is not None:
        argv += ["-k", str(sock)]
    else:
        argv += ["-b", "127.0.0.1", "-p", str(port)]
    if export:
        argv += ["-x", export]
    if read_only:
        argv.append("-r")
    if bitmap:
        argv += ["-B", bitmap]
    if isinstance(tls, TlsX509):
        argv += [
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=server,dir={tls.server_dir}",
            "--tls-creds",
            "tls0",
        ]
    elif isinstance(tls, TlsPsk):
        argv += [
            "--object",
            f"tls-creds-psk,id=tls0,endpoint=server,dir={tls.psk_file.parent}",
            "--tls-creds",
            "tls0",
        ]
    argv += [*extra, str(image)]
    srv = NbdServer(
        argv, workdir=workdir, socket_path=sock, port=port, export=export, tls=tls, owns_workdir=True
    )
    return srv.start() if start else srv


def nbdkit(
    plugin: str,
    *plugin_args: str,
    tcp: bool = False,
    tls: TlsX509 | TlsPsk | None = None,
    filters: Sequence[str] = (),
    read_only: bool = False,
    extra: Sequence[str] = (),
    start: bool = True,
) -> NbdServer:
    """nbdkit running ``plugin`` (e.g. ``nbdkit("memory", "size=64M")``)."""
    workdir = _workdir()
    sock, port = _listen(tcp, workdir)
    argv = ["nbdkit", "--foreground", "--exit-with-parent"]
    if sock is not None:
        argv += ["--unix", str(sock)]
    else:
        argv += ["--ipaddr", "127.0.0.1", "--port", str(port)]
    for f in filters:
        argv += ["--filter", f]
    if read_only:
        argv.append("--readonly")
    if isinstance(tls, TlsX509):
        argv += ["--tls=require", f"--tls-certificates={tls.server_dir}"]
    elif isinstance(tls, TlsPsk):
        argv += ["--tls=require", f"--tls-psk={tls.psk_file}"]
    argv += [*extra, plugin, *plugin_args]
    srv = NbdServer(argv, workdir=workdir, socket_path=sock, port=port, tls=tls, owns_workdir=True)
    return srv.start() if start else srv


@contextlib.contextmanager
def serving(*servers: NbdServer) -> Iterator[tuple[NbdServer, ...]]:
    """Stop every given server on exit, whatever happens."""
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()
