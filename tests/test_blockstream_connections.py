"""blockstream against servers that limit connections, do not advertise
multi-conn, or stop answering: nothing hangs, the bytes arrive, durable_offset
only covers what every connection flushed, and a failed run resends at most
``max_unflushed``.  Real qemu-nbd / nbdkit servers started here.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.nbd import NbdServer, nbdkit, qemu_nbd

from blockstream import BlockstreamError, Extent, Progress, Stream, copy

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
DISK = 64 * MiB


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha256_export(uri: str, tmp: Path) -> str:
    """sha256 of what an NBD export reads as (nbdcopy to a raw file)."""
    out = tmp / f"readback-{os.getpid()}-{time.monotonic_ns()}.raw"
    subprocess.run(["nbdcopy", "--connections=1", uri, str(out)], check=True, timeout=120)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def sha256_qcow2(path: Path) -> str:
    raw = path.with_suffix(".raw-readback")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True)
    try:
        return sha256_file(raw)
    finally:
        raw.unlink()


@pytest.fixture(scope="module")
def source_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB of random data (a zero MiB in the middle)."""
    path = tmp_path_factory.mktemp("conn-src") / "src.raw"
    with open(path, "wb") as f:
        for i in range(DISK // MiB):
            f.write(bytes(MiB) if i == 20 else os.urandom(MiB))
    return path


@pytest.fixture(scope="module")
def src(source_file: Path) -> Iterator[NbdServer]:
    with qemu_nbd(source_file, fmt="raw", read_only=True) as srv:
        yield srv


@pytest.fixture
def dst_qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK)], check=True)
    return path


def whole() -> list[Extent]:
    return [Extent(0, DISK)]


# ---- servers that serve one client ---------------------------------------------


def test_qemu_nbd_default_sharing_does_not_hang(src: NbdServer, source_file: Path, dst_qcow2: Path) -> None:
    """qemu-nbd without -e serves one client: the extra connections wait in its
    listen backlog.  The copy runs on the first pair; the others are dropped."""
    with qemu_nbd(dst_qcow2, fmt="qcow2", shared=1) as dst:
        p = copy(src.uri, dst.uri, whole(), disk_size=DISK, connections=4, connect_timeout=3.0)
    assert p.done and p.durable_offset == DISK
    assert p.connections == 1 and p.connections + p.connections_dropped == 4, p
    assert not p.multi_conn
    assert sha256_qcow2(dst_qcow2) == sha256_file(source_file)


def test_qemu_nbd_default_sharing_as_source(source_file: Path, dst_qcow2: Path) -> None:
    with qemu_nbd(source_file, fmt="raw", read_only=True, shared=1) as s, \
            qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        p = copy(s.uri, dst.uri, whole(), disk_size=DISK, connections=3, connect_timeout=3.0)
    assert p.done and p.connections == 1 and p.connections_dropped == 2, p
    assert sha256_qcow2(dst_qcow2) == sha256_file(source_file)


def test_one_client_nbdkit_refuses_the_extra_connections(src: NbdServer, source_file: Path,
                                                          tmp_path: Path) -> None:
    """nbdkit's limit filter closes every connection beyond the first: they are
    dropped at once and the copy goes on with one."""
    with nbdkit("memory", f"size={DISK}", "limit=1", filters=["limit"]) as dst:
        p = copy(src.uri, dst.uri, whole(), disk_size=DISK, connections=4)
        assert p.done and p.connections == 1 and p.connections_dropped == 3, p
        assert sha256_export(dst.uri, tmp_path) == sha256_file(source_file)


def test_busy_one_client_server_fails_the_connect_naming_it(src: NbdServer, dst_qcow2: Path) -> None:
    """When another client holds a one-client server, the first pair cannot
    connect: the stream fails after connect_timeout, naming the endpoint."""
    with qemu_nbd(dst_qcow2, fmt="qcow2", shared=1) as dst:
        assert dst.socket_path is not None
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.connect(str(dst.socket_path))
        try:
            assert holder.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"  # it is served
            with pytest.raises(BlockstreamError) as ei:
                copy(src.uri, dst.uri, whole(), disk_size=DISK, connections=2, connect_timeout=2.0)
        finally:
            holder.close()
    e = ei.value
    assert e.endpoint == "destination" and e.errno == errno.ETIMEDOUT, e
    assert str(dst.socket_path) in str(e) and "handshake" in str(e)


# ---- multi-conn durability -------------------------------------------------------

LOG_LINE = re.compile(
    r"^(\S+ \S+) connection=(\d+) (\.\.\.)?(Write|Flush|Zero) id=(\d+)"
    r"(?: offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+))?"
    r"(?:.*return=(-?\d+))?"
)


def _log_events(path: Path) -> list[tuple[float, int, str, str, int, int, int]]:
    """(wall time, connection, kind, 'call'/'return', id, offset, count)."""
    out = []
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        stamp, conn, ret, kind, rid, off, cnt = m.group(1, 2, 3, 4, 5, 6, 7)
        t = time.mktime(time.strptime(stamp.split(".")[0], "%Y-%m-%d %H:%M:%S")) + float(
            "0." + stamp.split(".")[1])
        out.append((t, int(conn), kind, "return" if ret else "call", int(rid),
                    int(off, 16) if off else 0, int(cnt, 16) if cnt else 0))
    return out


def _flushed_everywhere(events: list[tuple[float, int, str, str, int, int, int]], disk: int
                        ) -> list[tuple[float, int]]:
    """After each flush reply: (time, F) with F the lowest offset of a write
    whose connection has not flushed since the write completed (disk if none):
    everything below F is durable on a server without multi-conn."""
    pending: dict[int, list[tuple[int, int]]] = {}   # conn -> completed, unflushed writes
    calls: dict[tuple[int, int], tuple[int, int]] = {}
    flush_calls: dict[tuple[int, int], list[tuple[int, int]]] = {}
    out = []
    for t, conn, kind, phase, rid, off, cnt in events:
        if kind in ("Write", "Zero"):
            if phase == "call":
                calls[(conn, rid)] = (off, cnt)
            else:
                pending.setdefault(conn, []).append(calls.pop((conn, rid)))
        elif phase == "call":
            # a flush covers what completed on its connection before it was sent
            flush_calls[(conn, rid)] = list(pending.get(conn, []))
        else:
            covered = flush_calls.pop((conn, rid))
            pending[conn] = [w for w in pending.get(conn, []) if w not in covered]
            lows = [o for ws in pending.values() for o, _ in ws]
            out.append((t, min(lows) if lows else disk))
    return out


def test_without_multi_conn_durable_offset_needs_every_connection_flushed(
        src: NbdServer, source_file: Path, tmp_path: Path) -> None:
    """A destination that does not advertise NBD_FLAG_CAN_MULTI_CONN: each flush
    covers only its own connection.  Every durable_offset the stream published
    must be below what all connections had flushed by then (from nbdkit's log of
    every write and flush, per connection).  Flushing only one connection per
    round would publish offsets above writes still unflushed elsewhere."""
    log = tmp_path / "nbdkit.log"
    image = tmp_path / "dst.raw"
    with open(image, "wb") as f:
        f.truncate(DISK)
    with nbdkit("file", str(image), f"logfile={log}", "multi-conn-mode=disable",
                filters=["log", "multi-conn"]) as dst:
        s = Stream(src.uri, dst.uri, whole(), disk_size=DISK, connections=3, max_request=MiB,
                   in_flight=4, flush_interval=4 * MiB, rate_limit=24 * MiB)
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                p = s.progress()
                samples.append((time.time(), p.durable_offset))
                time.sleep(0.005)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            p = s.run()
        finally:
            done.set()
            t.join()
    assert p.done and not p.multi_conn and p.connections == 3, p
    assert sha256_file(image) == sha256_file(source_file)
    events = _log_events(log)
    writers = {c for _, c, k, ph, *_ in events if k == "Write" and ph == "return"}
    assert len(writers) == 3, writers
    flushes = {c: sum(1 for _, cc, k, ph, *_ in events if cc == c and k == "Flush" and ph == "return")
               for c in writers}
    assert all(n >= 3 for n in flushes.values()), flushes   # rounds, not only the final flush
    bound = _flushed_everywhere(events, DISK)
    advanced = sorted({d for _, d in samples if 0 < d < DISK})
    assert len(advanced) >= 3, advanced                      # durable moved during the copy
    for ts, d in samples:
        if d == 0:
            continue
        # the last flush reply logged before this sample (the reply is logged
        # before it is sent, the offset is published after it arrived)
        known = [f for t_f, f in bound if t_f <= ts]
        assert known and d <= max(known), (ts, d, known[-3:] if known else None)


# ---- resend bound and stalls -------------------------------------------------------


def _watch(s: Stream) -> tuple[threading.Event, list[Progress], threading.Thread]:
    done = threading.Event()
    seen: list[Progress] = []

    def run() -> None:
        while not done.is_set():
            seen.append(s.progress())
            time.sleep(0.005)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return done, seen, t


def _run_in_thread(stream: Stream) -> tuple[threading.Thread, dict[str, object]]:
    """``stream.run()`` in a thread; its result ("p") or exception ("e") in the dict."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["p"] = stream.run()
        except BaseException as e:
            result["e"] = e

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    return runner, result


def test_stalled_destination_fails_with_the_extent_within_max_unflushed(
        src: NbdServer, source_file: Path, dst_qcow2: Path) -> None:
    """A destination that stops answering (SIGSTOP, connections stay open): the
    stream fails after request_timeout with the extent; what was moved beyond
    durable_offset never exceeded max_unflushed, however slow the flushes; a
    resume from durable_offset completes the identical disk."""
    cap = 6 * MiB
    with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        s = Stream(src.uri, dst.uri, whole(), disk_size=DISK, connections=2, max_request=MiB,
                   flush_interval=64 * MiB, flush_seconds=0.5, rate_limit=16 * MiB,
                   max_unflushed=cap, request_timeout=2.0)
        done, seen, watcher = _watch(s)
        runner, result = _run_in_thread(s)
        deadline = time.monotonic() + 30
        while s.progress().bytes_written < 12 * MiB:
            assert time.monotonic() < deadline and runner.is_alive(), result
            time.sleep(0.01)
        assert dst.pid is not None
        os.kill(dst.pid, signal.SIGSTOP)
        try:
            runner.join(30)
            assert not runner.is_alive(), "a stalled destination kept the stream waiting"
        finally:
            os.kill(dst.pid, signal.SIGCONT)
            done.set()
            watcher.join()
        e = result.get("e")
        assert isinstance(e, BlockstreamError), result
        assert e.endpoint == "destination" and e.errno == errno.ETIMEDOUT and e.extent, e
        assert "request_timeout" in str(e)
        final = s.progress()
        for p in [*seen, final]:
            assert p.bytes_written - p.written_durable <= cap, p
            assert p.bytes_read - p.read_durable <= cap, p
        start = final.durable_offset
        assert 0 < start < DISK, final
        again = copy(src.uri, dst.uri, whole(), disk_size=DISK, start_offset=start, connections=2)
        assert again.done
    assert sha256_qcow2(dst_qcow2) == sha256_file(source_file)


def test_stalled_source_fails_with_the_extent(source_file: Path, dst_qcow2: Path) -> None:
    with qemu_nbd(source_file, fmt="raw", read_only=True) as s, \
            qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        st = Stream(s.uri, dst.uri, whole(), disk_size=DISK, connections=2, max_request=MiB,
                    rate_limit=8 * MiB, request_timeout=2.0)
        runner, result = _run_in_thread(st)
        deadline = time.monotonic() + 30
        while st.progress().bytes_read < 4 * MiB:
            assert time.monotonic() < deadline and runner.is_alive(), result
            time.sleep(0.01)
        assert s.pid is not None
        os.kill(s.pid, signal.SIGSTOP)
        try:
            runner.join(30)
            assert not runner.is_alive(), "a stalled source kept the stream waiting"
        finally:
            os.kill(s.pid, signal.SIGCONT)
    e = result.get("e")
    assert isinstance(e, BlockstreamError), result
    assert e.endpoint == "source" and e.errno == errno.ETIMEDOUT and e.extent, e
    off, length = e.extent
    assert 0 <= off < DISK and 0 < length <= MiB
