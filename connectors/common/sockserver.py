"""One NBD server process on a unix socket in a private directory.

Connectors serve frozen disks, staging layers and points through nbdkit or qemu-nbd
started here: the directory (socket, log, secret files) is private to the export and
removed when it stops. Secrets go to 0600 files named on the command line, never
into argv, which ``ps`` shows.
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
from collections.abc import Callable
from pathlib import Path

from connectors.base import ConnectorError, PermanentError

READY_TIMEOUT = 30.0


def write_secret(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return path


class SocketServer:
    """One NBD server process (nbdkit, qemu-nbd) on a unix socket in a private
    directory; ``stop()`` ends it and removes the directory (secret files included)."""

    def __init__(self, directory: Path, proc: subprocess.Popen[bytes], sock: Path, log: Path) -> None:
        self.directory, self.proc, self.sock, self.log = directory, proc, sock, log

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @classmethod
    def start(cls, command: Callable[[Path, Path], list[str]], what: str, *,
              prefix: str = "nbd") -> SocketServer:
        """``command(directory, socket)`` builds the command line (and may write secret
        files into the directory); returns once the socket accepts connections."""
        directory = Path(tempfile.mkdtemp(prefix=f"t{prefix}-", dir="/tmp"))  # short: socket path limit
        try:
            sock = directory / "nbd.sock"
            log = directory / "server.log"
            cmd = command(directory, sock)
            if shutil.which(cmd[0]) is None:
                raise PermanentError(f"{cmd[0]} is not installed (Debian package "
                                     f"{'qemu-utils' if cmd[0] == 'qemu-nbd' else cmd[0]})")
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            server = cls(directory, proc, sock, log)
            server._wait_ready(cmd[0], what)
            return server
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _wait_ready(self, program: str, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise ConnectorError(f"{program} serving {what} exited with "
                                     f"{self.proc.returncode}: {text.strip() or 'no output'}")
            if self.sock.exists():
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.sock))
                    return
            time.sleep(0.05)
        self.stop()
        raise ConnectorError(f"{program} serving {what} did not open its socket in "
                             f"{READY_TIMEOUT:.0f}s")

    def stop(self) -> None:
        """SIGTERM (qemu-nbd and nbdkit flush on the way out), SIGKILL after 30 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)
