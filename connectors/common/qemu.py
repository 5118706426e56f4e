"""Small helpers around qemu-img and qemu-nbd, shared by every connector that serves files.

- ``run_qemu_img``: run qemu-img, turn its failures into ConnectorError subclasses
  carrying the command's stderr (``ImageLocked`` for lock conflicts, ``DiskFull``
  for ENOSPC, ``PermanentError`` when the tool is missing).
- ``qcow2_header`` / ``backing_chain``: read a qcow2 header directly (no process,
  no image lock) for the virtual size and the backing file.
- ``NbdExport``: a detached ``qemu-nbd --fork`` export with a pid file, a unix
  socket and a log file, started with a readiness wait, checked for liveness
  (pid file + /proc, guarding against pid reuse and zombies) and stopped cleanly
  (SIGTERM, then wait: qemu-nbd flushes and closes its images on the way out).
- ``processes_using``: which processes hold a file open (read from /proc), so the
  target never modifies a file another process has open.
- ``export_sha256``: hash a whole NBD export by reading it with ``nbdcopy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from connectors.base import ConnectorError, PermanentError

QCOW2_MAGIC = b"QFI\xfb"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


class ImageLocked(ConnectorError):
    """qemu refused to open an image because another process holds a conflicting lock."""


class DiskFull(ConnectorError):
    """The filesystem holding an image ran out of space (ENOSPC)."""


class PortInUse(ConnectorError):
    """qemu-nbd could not listen on its TCP port: something else holds it."""


def _tail(text: str, limit: int = 4000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _classify(cmd: str, stderr: str, what: str) -> ConnectorError:
    msg = f"{what} failed: {cmd}: {_tail(stderr) or 'no error output'}"
    low = stderr.lower()
    if "address already in use" in low:
        return PortInUse(msg)
    if "cannot assign requested address" in low:
        return PermanentError(
            f"{msg}: the site address is not an address of this host; set "
            "TRANSCEND_SITE_ADDRESS to one of its addresses (or a name resolving to one)")
    if "lock" in low and ("failed to get" in low or "another process" in low):
        return ImageLocked(msg)
    if "no space left on device" in low:
        return DiskFull(msg)
    return ConnectorError(msg)


def run_tool(argv: Sequence[str], *, what: str, timeout: float = 3600.0,
             ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run a qemu/libnbd command line tool; raise a ConnectorError naming ``what``."""
    cmd = " ".join(argv)
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError as e:
        raise PermanentError(
            f"{what}: {argv[0]} is not installed (install qemu-utils and libnbd-bin)"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise ConnectorError(f"{what} timed out after {timeout:.0f}s: {cmd}") from e
    if proc.returncode not in ok_codes:
        raise _classify(cmd, proc.stderr or proc.stdout, f"{what} (exit {proc.returncode})")
    return proc


def run_qemu_img(args: Sequence[str], *, what: str, timeout: float = 3600.0,
                 ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    return run_tool(["qemu-img", *args], what=what, timeout=timeout, ok_codes=ok_codes)


# --------------------------------------------------------------------------- qcow2 header


@dataclass(frozen=True)
class Qcow2Header:
    virtual_size: int
    backing_file: str  # as written in the header ("" = none)
    cluster_size: int


def qcow2_header(path: str | os.PathLike[str]) -> Qcow2Header:
    """Parse the fixed part of a qcow2 header (and the backing file name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if len(head) < 32 or head[:4] != QCOW2_MAGIC:
                raise ConnectorError(f"{path} is not a qcow2 image")
            _version, bf_offset, bf_size, cluster_bits, size = struct.unpack(">IQIIQ", head[4:32])
            backing = ""
            if bf_offset and bf_size:
                f.seek(bf_offset)
                backing = f.read(bf_size).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ConnectorError(f"cannot read qcow2 header of {path}: {e}") from e
    return Qcow2Header(virtual_size=size, backing_file=backing, cluster_size=1 << cluster_bits)


def backing_path(path: str | os.PathLike[str]) -> str:
    """The absolute path of ``path``'s backing file, or ``""``."""
    backing = qcow2_header(path).backing_file
    if not backing:
        return ""
    if "://" in backing or backing.startswith("json:"):
        raise ConnectorError(f"{path} has a non-file backing {backing!r}")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), backing))


def backing_chain(path: str | os.PathLike[str]) -> list[str]:
    """``[path, backing, backing's backing, ...]`` as absolute paths."""
    chain = [os.path.abspath(path)]
    while True:
        nxt = backing_path(chain[-1])
        if not nxt:
            return chain
        if nxt in chain or len(chain) > 10_000:
            raise ConnectorError(f"backing chain of {path} loops at {nxt}")
        chain.append(nxt)


def create_qcow2(path: str | os.PathLike[str], size: int, *, backing: str = "",
                 cluster_size: int = 65536) -> None:
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing:
        args += ["-F", "qcow2", "-b", backing]
    run_qemu_img([*args, os.fspath(path), str(size)], what=f"creating {path}")


# --------------------------------------------------------------------------- files


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def processes_using(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[int, str]]:
    """``(pid, command)`` of every other process with one of ``paths`` open (by inode)."""
    wanted: set[tuple[int, int]] = set()
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return []
    found: list[tuple[int, str]] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            fds = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    st = os.stat(fd.path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in wanted:
                    found.append((pid, _cmdline(pid)[:200]))
                    break
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _argv_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]


def _running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 in a container does not always reap)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"x")


# --------------------------------------------------------------------------- qemu-nbd


def nbd_uri(export: str, socket_path: str) -> str:
    return f"nbd+unix:///{quote(export, safe='/')}?socket={quote(socket_path, safe='/')}"


def nbds_uri(export: str, host: str, port: int) -> str:
    """TLS over TCP, without client credentials (each reader adds its own site's)."""
    h = f"[{host}]" if ":" in host else host
    return f"nbds://{h}:{port}/{quote(export, safe='/')}"


@dataclass(frozen=True)
class TcpListen:
    """Where a TCP export listens and the x509 directory it serves TLS with (qemu's
    tls-creds-x509 layout: ca-cert.pem, server-cert.pem, server-key.pem). Clients must
    present a certificate of the same CA (``verify-peer=on``)."""

    host: str
    port: int
    tls_dir: str
    # PSK instead of x509: tls_dir holds keys.psk (identity:hexkey lines); a client
    # must know one identity's key, which authenticates both ends
    psk: bool = False


@dataclass(frozen=True)
class NbdExport:
    """A qemu-nbd export of one image on a unix socket (or, with ``tcp``, on a TCP
    port with TLS), run detached.

    The pid file, log file and socket are all derived from ``socket_path`` so the
    export can be found again by a different process after a crash; a TCP export is
    found again by its pid file (its port is in the handle that started it)."""

    image: str
    socket_path: str
    pid_file: str
    log_file: str
    export_name: str
    readonly: bool
    cache: str = "none"
    fmt: str = "qcow2"
    tcp: TcpListen | None = None

    @property
    def uri(self) -> str:
        if self.tcp is not None:
            return nbds_uri(self.export_name, self.tcp.host, self.tcp.port)
        return nbd_uri(self.export_name, self.socket_path)

    def pid(self) -> int | None:
        """The pid of the running qemu-nbd serving this export, or None."""
        try:
            pid = int(Path(self.pid_file).read_text().strip())
        except (OSError, ValueError):
            return None
        if not _running(pid):
            return None
        cmd = _cmdline(pid)
        if "qemu-nbd" not in cmd or self._identity not in cmd:
            return None  # pid reused by something else
        return pid

    @property
    def _identity(self) -> str:
        """What only this export's qemu-nbd has on its command line."""
        return self.socket_path if self.tcp is None else f"--pid-file={self.pid_file}"

    def _reachable(self) -> bool:
        """A running qemu-nbd can be dialled: its socket exists (TCP: it holds its port
        for as long as it runs)."""
        return self.tcp is not None or os.path.exists(self.socket_path)

    def alive(self) -> bool:
        return self.pid() is not None and self._reachable()

    def running_listen(self) -> TcpListen | None:
        """Where and with which credentials the running qemu-nbd of this TCP export
        listens (a retried ``begin`` keeps the port a previous attempt chose), or None."""
        pid = self.pid()
        if pid is None or self.tcp is None:
            return None
        args = _argv_of(pid)
        try:
            host = args[args.index("--bind") + 1]
            port = int(args[args.index("--port") + 1])
        except (ValueError, IndexError):
            return None
        creds = next((a for a in args if a.startswith(("tls-creds-x509,", "tls-creds-psk,"))),
                     "")
        m = re.search(r"(?:^|,)dir=((?:[^,]|,,)*)", creds)
        return TcpListen(host, port, m.group(1).replace(",,", ",") if m else "",
                         psk=creds.startswith("tls-creds-psk,"))

    def _listen_args(self) -> list[str]:
        if self.tcp is None:
            return ["--socket", self.socket_path, "--shared=8"]
        # qemu's --object option syntax: a comma in a value is written twice
        tls_dir = self.tcp.tls_dir.replace(",", ",,")
        # More clients than on a unix socket: after a cut link the server keeps the
        # dead connections until TCP gives up on them, and the retried copy needs its own.
        creds = (f"tls-creds-psk,id=tls0,dir={tls_dir},endpoint=server" if self.tcp.psk else
                 f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on")
        return ["--bind", self.tcp.host, "--port", str(self.tcp.port), "--shared=32",
                "--object", creds, "--tls-creds", "tls0"]

    def argv(self, cache: str) -> list[str]:
        argv = [
            "qemu-nbd", "--fork", f"--pid-file={self.pid_file}", *self._listen_args(),
            "--export-name", self.export_name, "--format", self.fmt,
            "--persistent", f"--cache={cache}", "--aio=threads",
        ]
        if self.readonly:
            argv.append("--read-only")
        else:
            argv += ["--discard=unmap", "--detect-zeroes=unmap"]
        return [*argv, self.image]

    def start(self, *, timeout: float = 30.0) -> int:
        """Start the export if it is not running; return its pid (idempotent)."""
        pid = self.pid()
        if pid is not None and self._reachable():
            return pid
        if pid is not None:  # running but its socket is gone: nobody can reach it
            self.stop()
        for stale in (self.socket_path, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                if stale:
                    os.unlink(stale)
        try:
            return self._start(self.cache, timeout)
        except ConnectorError as e:
            if self.cache == "none" and ("O_DIRECT" in str(e) or "Invalid argument" in str(e)):
                # filesystems without O_DIRECT (tmpfs): fall back to the page cache;
                # qemu-nbd still flushes on NBD_CMD_FLUSH and on exit.
                return self._start("writeback", timeout)
            raise

    def _start(self, cache: str, timeout: float) -> int:
        argv = self.argv(cache)
        cmd = " ".join(argv)
        # The daemon keeps stderr; a pipe would never reach EOF, so log to a file.
        with open(self.log_file, "wb") as log:
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      timeout=timeout, check=False)
            except FileNotFoundError as e:
                raise PermanentError("qemu-nbd is not installed (install qemu-utils)") from e
            except subprocess.TimeoutExpired as e:
                raise ConnectorError(f"qemu-nbd did not start within {timeout:.0f}s: {cmd}") from e
        if proc.returncode != 0:
            raise _classify(cmd, self.log(), f"starting qemu-nbd (exit {proc.returncode})")
        deadline = time.monotonic() + timeout
        where = self.socket_path if self.tcp is None else f"{self.tcp.host}:{self.tcp.port}"
        while True:
            pid = self.pid()
            if pid is not None and self._greets():
                return pid
            if time.monotonic() > deadline:
                raise ConnectorError(
                    f"qemu-nbd for {self.image} is not answering on {where} "
                    f"after {timeout:.0f}s: {self.log() or 'no log output'}"
                )
            time.sleep(0.02)

    def _greets(self) -> bool:
        if self.tcp is None:
            return _greets(self.socket_path)
        # The NBD greeting comes before STARTTLS, so a plain connect sees it too.
        return _greets_tcp(self.tcp.host, self.tcp.port)

    def log(self) -> str:
        try:
            return _tail(Path(self.log_file).read_text(errors="replace"))
        except OSError:
            return ""

    def stop(self, *, timeout: float = 60.0, kill: bool = False) -> None:
        """SIGTERM and wait until the process is gone (qemu-nbd flushes on exit).

        If it does not exit within ``timeout``: SIGKILL when ``kill`` (nothing of the
        image is needed any more), else raise ConnectorError and leave it running."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout):
                if not kill:
                    raise ConnectorError(
                        f"qemu-nbd (pid {pid}) serving {self.image} did not exit within "
                        f"{timeout:.0f}s of SIGTERM; its writes may not be flushed yet"
                    )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10.0)
        for f in (self.socket_path, self.pid_file, self.log_file):
            with contextlib.suppress(FileNotFoundError):
                if f:
                    os.unlink(f)


def _export_key(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def serve_tcp(export: NbdExport, port_min: int, port_max: int, what: str) -> NbdExport:
    """Start the TCP ``export`` (its ``tcp`` says the address and credentials; the
    port is chosen) on a free port of ``port_min..port_max`` and return it with that
    port. A qemu-nbd a previous attempt started is kept (same address and
    credentials), so its port, which a peer at another site may know, stays."""
    if export.tcp is None:
        raise ValueError("serve_tcp needs an export with a TcpListen")
    want = export.tcp
    running = export.running_listen()
    if running is not None:
        if dataclasses.replace(running, port=0) == dataclasses.replace(want, port=0):
            return dataclasses.replace(export, tcp=running)
        export.stop(kill=True)  # the site's address or credentials changed since
    address = want.host
    span = port_max - port_min + 1
    # Start the search at a place derived from the export, so concurrent starts of
    # different disks rarely probe the same port first.
    first = _export_key(export.pid_file) % span
    for i in range(span):
        port = port_min + (first + i) % span
        candidate = dataclasses.replace(export, tcp=dataclasses.replace(want, port=port))
        try:
            if not port_free(address, port):
                continue
            candidate.start()
        except PortInUse:
            continue  # another process took it between the probe and the start
        except OSError as e:
            raise PermanentError(
                f"cannot listen on {address}:{port} ({e.strerror or e}): the site address "
                "must be an address of this host; set TRANSCEND_SITE_ADDRESS accordingly"
            ) from e
        return candidate
    raise ConnectorError(
        f"no free TCP port between {port_min} and {port_max} on {address} for {what}: "
        "widen TRANSCEND_NBD_PORT_MIN/MAX or let running cycles finish")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _greets(socket_path: str) -> bool:
    """True when something on the socket sends the NBD greeting."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(socket_path)
        return _read_greeting(s)
    except OSError:
        return False
    finally:
        s.close()


def _greets_tcp(host: str, port: int) -> bool:
    try:
        s = socket.create_connection((host, port), timeout=2.0)
    except OSError:
        return False
    try:
        return _read_greeting(s)
    except OSError:
        return False
    finally:
        s.close()


def _read_greeting(s: socket.socket) -> bool:
    data = b""
    while len(data) < 8:
        chunk = s.recv(8 - len(data))
        if not chunk:
            break
        data += chunk
    return data == b"NBDMAGIC"


def port_free(host: str, port: int) -> bool:
    """Nothing listens on ``host:port`` (a quick probe before starting qemu-nbd there;
    the start itself still handles losing a race for the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as qemu does: a port whose old connections linger in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


# --------------------------------------------------------------------------- reading exports


def export_sha256(uri: str, *, timeout: float = 3600.0) -> str:
    """sha256 of the whole content of an NBD export (zeros included), read by nbdcopy."""
    h = hashlib.sha256()
    try:
        proc = subprocess.Popen(["nbdcopy", "--", uri, "-"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise PermanentError("nbdcopy is not installed (install libnbd-bin)") from e
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    while chunk := proc.stdout.read(1 << 20):
        h.update(chunk)
        if time.monotonic() > deadline:
            proc.kill()
            break
    err = proc.stderr.read().decode(errors="replace")
    rc = proc.wait()
    if rc != 0:
        raise ConnectorError(f"reading {uri} with nbdcopy failed (exit {rc}): {_tail(err)}")
    return h.hexdigest()


def is_enospc(e: OSError) -> bool:
    return e.errno == errno.ENOSPC
