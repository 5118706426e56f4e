"""A throw-away PostgreSQL cluster for tests.

``postgres_cluster()`` runs ``initdb`` into a fresh directory under /tmp, starts the
server listening on a unix socket in that directory (and, with ``tcp=True``, on
127.0.0.1 at a free port), waits until ``pg_isready`` says it accepts connections,
and on exit (also when the test failed or startup did not finish) stops it and
deletes the directory. PostgreSQL refuses to run as root, so as root every server
command runs as the ``postgres`` OS user through ``runuser -u postgres --``.

The server binaries are found in ``$TRANSCEND_PG_BINDIR``, else in the newest
``/usr/lib/postgresql/*/bin`` (Debian's layout), else on ``PATH``.

    with postgres_cluster() as pg:
        url = pg.create_database("t1")   # postgresql+psycopg://postgres@/t1?host=...
        ...

    with postgres_url() as url:          # a cluster and one database in it
        ...

Durability is switched off (``fsync=off``): the data is thrown away anyway.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

__all__ = ["PostgresCluster", "PostgresError", "find_bindir", "postgres_cluster", "postgres_url"]

OS_USER = "postgres"
DB_USER = "postgres"


class PostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    env = os.environ.get("TRANSCEND_PG_BINDIR")
    if env:
        return Path(env)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in p.parent.name.split(".") if x.isdigit())

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: version(p.parent))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresError(
        "PostgreSQL server binaries not found (initdb): install them "
        "(Debian: apt-get install postgresql) or set TRANSCEND_PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresCluster:
    base: Path
    bindir: Path
    port: int
    tcp: bool = False
    _as_user: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base

    @property
    def log_file(self) -> Path:
        return self.base / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3). Over the unix socket, or TCP when started with it."""
        if self.tcp:
            return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{dbname}"
        return f"postgresql+psycopg://{DB_USER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=DB_USER, dbname=dbname, autocommit=True
        )

    def create_database(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ lifecycle

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as_user, *args]
        p = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=timeout, check=False)
        if p.returncode != 0:
            raise PostgresError(
                f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stdout}{p.stderr}\n"
                f"--- server log ---\n{self.log_tail()}"
            )
        return p

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", DB_USER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        options = [
            "-k", str(self.socket_dir),
            "-p", str(self.port),
            "-c", "listen_addresses=" + ("127.0.0.1" if self.tcp else ""),
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=60",
        ]  # fmt: skip
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.data_dir),
            "-l", str(self.log_file),
            "-o", shlex.join(options),
            "-w", "-t", "60",
            "start",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run(
                [
                    str(self.bindir / "pg_isready"),
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                    "-U",
                    DB_USER,
                    "-d",
                    "postgres",
                ],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL in {self.base} not ready after 30 s:\n{self.log_tail()}")
            time.sleep(0.1)

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        """Stop the server (immediate shutdown: the data is thrown away); never raises."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        pid = self._postmaster_pid()
        with contextlib.suppress(Exception):
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                "-w", "-t", "30", "stop",
                timeout=40,
            )  # fmt: skip
            return
        if pid:  # pg_ctl failed: kill the postmaster we started (its children follow it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def postgres_cluster(*, tcp: bool = False) -> Iterator[PostgresCluster]:
    """Start a throw-away cluster; stop it and delete its directory on exit."""
    bindir = find_bindir()
    root = os.geteuid() == 0
    # as root the server runs as `postgres`, which must reach the directory: not under
    # pytest's 0700 tmp dirs, so right under /tmp (override with TRANSCEND_PG_TMPDIR)
    parent = os.environ.get("TRANSCEND_PG_TMPDIR") or ("/tmp" if root else None)
    base = Path(tempfile.mkdtemp(prefix="transcend-pg-", dir=parent))
    as_user: list[str] = []
    if root:
        pw = pwd.getpwnam(OS_USER)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", OS_USER, "--"]
    cluster = PostgresCluster(base=base, bindir=bindir, port=_free_port(), tcp=tcp, _as_user=as_user)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def postgres_url(dbname: str = "transcend_test", *, tcp: bool = False) -> Iterator[str]:
    """A throw-away cluster with one empty database; yields its SQLAlchemy URL."""
    with postgres_cluster(tcp=tcp) as cluster:
        yield cluster.create_database(dbname)
