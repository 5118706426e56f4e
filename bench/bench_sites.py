#!/usr/bin/env python3
"""Benchmark blockstream between two sites (network namespaces) with NBD over TLS.

    .venv/bin/python bench/bench_sites.py                  # 2 GiB, 3 repeats, < 10 min
    .venv/bin/python bench/bench_sites.py --quick          # 256 MiB, 1 repeat, ~1 min
    .venv/bin/python bench/bench_sites.py --repeat 5 --rate-mbit 500 --out sites.json

Two sites ``a`` and ``b`` are two network namespaces joined by a veth pair
or a TUN delay line (tests/harness/netns.py, ``two_sites``); the link between
them is left unshaped or shaped.  A throw-away CA (transcend/pki.py) issues site
``a``'s and site ``b``'s bundles with their link addresses as IP SANs.

* Site a (source): a raw image of random data (os.urandom, generated once,
  served from the page cache) exported read-only by ``qemu-nbd`` on a unix
  socket inside namespace a.  blockstream runs inside namespace a (``ip netns
  exec``, a child process of this script that prints one JSON line) and copies
  the first N bytes of it with a manifest (xxh128 of every 64 KiB block, as in
  a replication cycle) to site b over TLS: ``nbds://<b>:PORT/?tls-certificates=
  <site a's bundle>`` (libnbd checks b's certificate against the address).
* Site b (target), one of three "sinks" (``--sinks``; all three by default):

  - ``qemu-nbd``: a fresh sparse raw file in the work directory per run, served
    writable over TCP on b's link address with ``tls-creds-x509,
    endpoint=server,verify-peer=on`` (site b's bundle), ``--cache=writeback``:
    blockstream's flushes (every 256 MiB and at the end) become fsync()s, so
    this sink includes the disk.
  - ``qemu-nbd-unsafe``: the same qemu-nbd with ``--cache=unsafe`` (flushes
    ignored, data stays in the page cache): qemu-nbd's own TLS/NBD/write path
    without the disk.
  - ``null``: ``nbdkit null`` with ``--tls=require --tls-verify-peer``; writes
    are discarded, so this is the network + TLS + blockstream path alone.

* Raw TCP reference: ``iperf3 -s`` in b, ``iperf3 -c -P 1`` and ``-P 4`` in a,
  over the same link, interleaved with the copies (MB/s received; ``-t``
  ``--iperf-seconds``).  iperf3 before 3.16 runs all streams in one thread.

Rows: links x {1, 4} connections (iperf3 streams with the same count).  The
links are: unshaped; rate-limited to ``--rate-mbit`` (default 1000, both
directions; tbf when the kernel has no sch_netem); the same rate with 0.1 %
loss on a -> b (netem, or an nftables rule dropping packets at random where
the kernel has no netem); the same rate plus 25 ms one-way delay on each
direction (RTT +50 ms); and that plus 0.1 % loss.  Delay uses the kernel's
netem qdisc; where the kernel has none (``--link auto``, the default), the
delay rows run on a second pair of sites whose link is the harness's TUN delay
line (tests/harness/delayline.c: the same rate limit with tbf, loss with
nftables, the delay added in user space), with their own raw TCP reference
measured over that same link.  ``--link tun`` runs every row on the delay
line, ``--link veth`` none (delay rows then print "skipped: kernel lacks
sch_netem").
On a rate-limited link N is cut to about ``--seconds-per-copy`` (10 s) worth of
data at the configured rate, so the shaped rows do not take minutes each.

Each measurement runs ``--repeat`` times (the order of the measurements rotates
from one repetition to the next); the table shows medians.  MB = 10^6 bytes
(as iperf3).  blockstream's time is ``Stream.run()``: TLS connects, the copy
and the final flush (Python start-up is not included).  ratio = blockstream
MB/s / raw TCP MB/s with the same number of connections/streams.  The CPU
table shows CPU seconds per GB (medians) of blockstream, of the sink server
and of the source server, taken around ``Stream.run()`` by the child, and how
many of the machine's CPUs were busy on average meanwhile (everything, other
users' load included): near the number of CPUs means the run was CPU-bound.
Both sites share this machine's CPUs, unlike two real sites.

Correctness: before measuring, each sink must refuse plain NBD and TLS
without a client certificate (so the measured path is TLS with peer
verification).  Every copy's manifest must equal the hashes of the source data
(so the source was read right), it must have written all N bytes, and for the
qemu-nbd sinks the destination file's first N bytes must equal the source
file's (compared byte by byte after the server has stopped).  Any mismatch
stops the benchmark with exit status 1.

Everything lives in a temporary directory under /var/tmp (``--tmpdir``; the
unix socket in a short one under /tmp), removed at the end; the namespaces,
the servers and iperf3 are stopped by the harness's context manager, also on
failure, Ctrl-C or SIGTERM.  Needs root (network namespaces), iperf3, qemu-nbd
and nbdkit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/harness (like bench_blockstream.py)

from harness.netns import (  # noqa: E402
    LinkKind,
    NamespacesUnavailable,
    NetemUnavailable,
    Site,
    TwoSites,
    two_sites,
)

import blockstream  # noqa: E402
from transcend import pki  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
BLOCK = blockstream.BLOCK_SIZE_DEFAULT
CHUNK = 64 * MiB
# inside the namespaces: private ports, nothing else listens there
NBD_PORT = 10809
NULL_PORT = 10810
IPERF_PORT = 5201
CONNECTIONS = (1, 4)
SINKS = ("qemu-nbd", "null", "qemu-nbd-unsafe")
DEFAULT_SINKS = "qemu-nbd,qemu-nbd-unsafe,null"
READY_TIMEOUT = 15.0
NETEM_SKIP = "skipped: kernel lacks sch_netem"


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Link:
    """How the site link is shaped for one group of rows."""

    name: str
    rate_mbit: float | None = None
    delay_ms: float = 0.0  # one way, added on both directions
    loss_pct: float = 0.0  # a -> b only: the direction the data flows

    def shape(self, s: TwoSites) -> str:
        """Apply the shaping; returns the qdisc used.  Raises NetemUnavailable
        for delay/loss without sch_netem (the harness's probe)."""
        if self.rate_mbit is None and not self.delay_ms and not self.loss_pct:
            s.clear()
            return "none"
        qdisc = s.netem("a", delay_ms=self.delay_ms, loss_pct=self.loss_pct, rate_mbit=self.rate_mbit)
        s.netem("b", delay_ms=self.delay_ms, rate_mbit=self.rate_mbit)
        return qdisc


def make_links(rate_mbit: float) -> list[Link]:
    r = f"{rate_mbit:g} Mbit/s"
    return [
        Link("unshaped"),
        Link(r, rate_mbit),
        Link(f"{r}, 0.1 % loss", rate_mbit, loss_pct=0.1),
        Link(f"{r}, RTT +50 ms", rate_mbit, delay_ms=25),
        Link(f"{r}, RTT +50 ms, 0.1 % loss", rate_mbit, delay_ms=25, loss_pct=0.1),
    ]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 2GiB, 512M)")
    size = int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}[m.group(2).upper()]
    if size <= 0 or size % CHUNK:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 64 MiB")
    return size


# ---- processes ------------------------------------------------------------------------


def proc_cpu_seconds(pid: int | None) -> float:
    """user + system CPU seconds of one process so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has used so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def listening(pid: int, port: int) -> bool:
    """Whether the network namespace of ``pid`` has a TCP listener on ``port``.
    /proc/PID/net/tcp shows that process's namespace, so this needs no
    process started inside the namespace."""
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


class Server:
    """A server process started in a site by the harness (which also stops it
    when the namespaces go; ``stop`` is for servers that live for one run)."""

    def __init__(self, s: TwoSites, site: Site, argv: list[str], log: Path) -> None:
        self.label = argv[0]
        self.log = log
        self._logf: IO[bytes] = open(log, "ab")  # noqa: SIM115 -- closed in stop()
        # `ip netns exec` execs the command: the pid is the server's own
        self.proc: subprocess.Popen[bytes] = s.popen(
            site, argv, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT
        )

    def wait_ready(self, port: int | None = None, socket_path: Path | None = None) -> Server:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if port is not None and listening(self.proc.pid, port):
                return self
            if socket_path is not None and socket_path.exists():
                return self
            time.sleep(0.02)
        raise BenchError(f"{self.label} did not come up in {READY_TIMEOUT:g}s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid if self.proc.poll() is None else None)

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


# ---- the session: namespaces, certificates, source, long-lived servers -----------------


@dataclass
class Session:
    s: TwoSites
    workdir: Path
    sockdir: Path
    size: int
    src_image: Path
    expected: bytearray  # xxh128 manifest of the source image
    site_a: Path  # site a's bundle (client side of the TLS connection)
    site_b: Path  # site b's bundle (server side)
    source: Server
    iperf: Server
    null: Server | None

    @property
    def source_uri(self) -> str:
        return f"nbd+unix:///?socket={self.sockdir / 'src.sock'}"

    def target_uri(self, port: int) -> str:
        return f"nbds://{self.s.address('b')}:{port}/?tls-certificates={self.site_a}"


def make_source(path: Path, size: int) -> bytearray:
    """Random data (no zero blocks: every block really crosses the link);
    returns the xxh128 manifest of what was written."""
    manifest = blockstream.zero_manifest(size, BLOCK, "xxh128")
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            data = os.urandom(CHUNK)
            os.pwrite(f.fileno(), data, off)
            b0 = off // BLOCK * blockstream.HASH_SIZE
            hashes = blockstream.hash_blocks(data, BLOCK, "xxh128")
            manifest[b0 : b0 + len(hashes)] = hashes
    return manifest


def make_pki(workdir: Path, s: TwoSites) -> tuple[Path, Path]:
    """A CA and one bundle per site, each naming the site's link address."""
    base = workdir / "pki"
    pki.init_ca(base, "bench_sites CA", days=2)
    a = pki.issue_site(base, "a", ips=[s.address("a")], days=1).directory
    b = pki.issue_site(base, "b", ips=[s.address("b")], days=1).directory
    return a, b


def tls_server_object(site_dir: Path) -> str:
    return f"tls-creds-x509,id=tls0,dir={site_dir},endpoint=server,verify-peer=on"


def start_session(s: TwoSites, workdir: Path, sockdir: Path, size: int, sinks: list[str]) -> Session:
    t = time.perf_counter()
    src_image = workdir / "src.raw"
    print(f"creating a {size / GiB:g} GiB random source image in {workdir} ...", flush=True)
    expected = make_source(src_image, size)
    print(f"  done in {time.perf_counter() - t:.1f}s", flush=True)
    site_a, site_b = make_pki(workdir, s)
    sock = sockdir / "src.sock"
    source = Server(s, "a", ["qemu-nbd", "-f", "raw", "--read-only", "--persistent", "--shared=64",
                             "-k", str(sock), str(src_image)], workdir / "source.log")
    source.wait_ready(socket_path=sock)
    iperf = Server(s, "b", ["iperf3", "-s", "-B", s.address("b"), "-p", str(IPERF_PORT)],
                   workdir / "iperf3.log").wait_ready(port=IPERF_PORT)
    null = None
    if "null" in sinks:
        null = Server(s, "b", ["nbdkit", "-f", "-i", s.address("b"), "-p", str(NULL_PORT),
                               "--tls=require", f"--tls-certificates={site_b}", "--tls-verify-peer",
                               "null", f"size={size}"], workdir / "nbdkit-null.log")
        null.wait_ready(port=NULL_PORT)
    return Session(s, workdir, sockdir, size, src_image, expected, site_a, site_b, source, iperf, null)


# ---- measurements -------------------------------------------------------------------------


def run_iperf(ses: Session, streams: int, seconds: float) -> dict[str, Any]:
    """iperf3 client in a -> server in b; MB/s received."""
    busy0, cpu0, srv0 = machine_busy_seconds(), children_cpu_seconds(), ses.iperf.cpu_seconds()
    t0 = time.perf_counter()
    cp = ses.s.run("a", ["iperf3", "-c", ses.s.address("b"), "-p", str(IPERF_PORT), "-t", f"{seconds:g}",
                         "-P", str(streams), "-J"], capture_output=True, text=True, timeout=seconds + 60)
    wall = time.perf_counter() - t0
    try:
        doc = json.loads(cp.stdout)
    except json.JSONDecodeError:
        doc = {}
    if cp.returncode != 0 or "error" in doc:
        raise BenchError(f"iperf3 -P {streams} failed (rc={cp.returncode}): {doc.get('error', '')}"
                         f"{cp.stderr[-2000:]}")
    recv = doc["end"]["sum_received"]
    return {
        "mb_s": recv["bits_per_second"] / 8 / MB,
        "bytes": recv["bytes"],
        "seconds": recv["seconds"],
        "client_cpu_s": children_cpu_seconds() - cpu0,
        "server_cpu_s": ses.iperf.cpu_seconds() - srv0,
        "machine_cpus_busy": (machine_busy_seconds() - busy0) / wall,
        "retransmits": doc["end"].get("sum_sent", {}).get("retransmits"),
    }


def start_qemu_sink(ses: Session, dst: Path, cache: str) -> Server:
    dst.unlink(missing_ok=True)
    with open(dst, "wb") as f:
        f.truncate(ses.size)  # fresh and sparse: a run that writes nothing cannot pass the check
    srv = Server(ses.s, "b", ["qemu-nbd", "-f", "raw", "--persistent", "--shared=64", f"--cache={cache}",
                              "-b", ses.s.address("b"), "-p", str(NBD_PORT),
                              "--object", tls_server_object(ses.site_b), "--tls-creds", "tls0", str(dst)],
                 ses.workdir / "qemu-nbd-dst.log")
    return srv.wait_ready(port=NBD_PORT)


def compare_files(src: Path, dst: Path, length: int) -> None:
    """The destination's first ``length`` bytes must be the source's."""
    with open(src, "rb") as fs, open(dst, "rb") as fd:
        for off in range(0, length, CHUNK):
            n = min(CHUNK, length - off)
            a, b = os.pread(fs.fileno(), n, off), os.pread(fd.fileno(), n, off)
            if a != b:
                bad = next(i for i in range(0, n, BLOCK) if a[i : i + BLOCK] != b[i : i + BLOCK])
                raise BenchError(f"destination differs from the source in the block at offset {off + bad}")


def run_child(ses: Session, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run this script's ``--child`` inside namespace a; its JSON line."""
    cp = ses.s.run("a", [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                   capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise BenchError(f"blockstream child failed (rc={cp.returncode}):\n{cp.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    return result


def sink_server(ses: Session, sink: str, dst: Path) -> tuple[Server, int, Server | None]:
    """(the server, its port, the server to stop after the run or None)."""
    if sink == "null":
        assert ses.null is not None
        return ses.null, NULL_PORT, None
    srv = start_qemu_sink(ses, dst, "unsafe" if sink == "qemu-nbd-unsafe" else "writeback")
    return srv, NBD_PORT, srv


def run_copy(ses: Session, sink: str, connections: int, length: int, timeout: float) -> dict[str, Any]:
    """One blockstream copy of [0, length) from a's source to b's sink, checked."""
    dst = ses.workdir / "dst.raw"
    manifest_path = ses.workdir / "manifest.bin"
    manifest_path.unlink(missing_ok=True)
    target, port, own = sink_server(ses, sink, dst)
    spec = {"src": ses.source_uri, "dst": ses.target_uri(port), "length": length, "disk_size": ses.size,
            "connections": connections, "manifest": str(manifest_path),
            "pids": {"sink": target.proc.pid, "source": ses.source.proc.pid}}
    try:
        r = run_child(ses, spec, timeout)
    except BenchError as e:
        raise BenchError(f"blockstream c{connections} -> {sink}: {e}\n{target.log_tail(1500)}") from e
    finally:
        if own is not None:
            own.stop()
    # checks: a fast copy of garbage must not count
    if not r["done"] or r["bytes_written"] != length or r["bytes_zero"] != 0:
        raise BenchError(f"blockstream -> {sink}: wrote {r['bytes_written']} bytes of data and "
                         f"{r['bytes_zero']} zero bytes (done={r['done']}), expected {length} of data")
    nhash = length // BLOCK * blockstream.HASH_SIZE
    if manifest_path.read_bytes()[:nhash] != bytes(ses.expected[:nhash]):
        raise BenchError(f"blockstream -> {sink}: manifest differs from the source data's hashes")
    if own is not None:
        compare_files(ses.src_image, dst, length)
        dst.unlink()
    return {
        "mb_s": length / MB / r["seconds"],
        "bytes": length,
        "seconds": r["seconds"],
        "blockstream_cpu_s": r["cpu_s"],
        "sink_cpu_s": r["pid_cpu_s"]["sink"],
        "source_cpu_s": r["pid_cpu_s"]["source"],
        "machine_cpus_busy": r["machine_busy_s"] / r["seconds"],
    }


def check_refusals(ses: Session, sink: str) -> dict[str, str]:
    """The sink must refuse plain NBD and TLS without a client certificate:
    proves the measured path really is TLS with peer verification."""
    bare = ses.workdir / "no-client-cert"
    bare.mkdir(exist_ok=True)
    shutil.copy(ses.site_a / pki.CA_CERT, bare)
    _, port, own = sink_server(ses, sink, ses.workdir / "dst.raw")
    errors: dict[str, str] = {}
    try:
        for what, uri in (("plain NBD", f"nbd://{ses.s.address('b')}:{port}/"),
                          ("TLS without a client certificate",
                           f"nbds://{ses.s.address('b')}:{port}/?tls-certificates={bare}")):
            r = run_child(ses, {"src": ses.source_uri, "dst": uri, "length": BLOCK, "disk_size": ses.size,
                                "connections": 1, "probe": True}, 60)
            if "error" not in r:
                raise BenchError(f"{sink} accepted {what}: TLS/verify-peer is not in effect")
            if "tls" not in r["error"].lower():  # refused, but not by TLS: something else is wrong
                raise BenchError(f"{sink}: {what} failed for another reason than TLS: {r['error']}")
            errors[what] = r["error"]
    finally:
        if own is not None:
            own.stop()
        (ses.workdir / "dst.raw").unlink(missing_ok=True)
    return errors


def child(spec_json: str) -> int:
    """The blockstream side, run inside namespace a; prints one JSON line.
    CPU figures are taken here, around Stream.run() alone (/proc is the
    host's: the namespaces only separate the network)."""
    spec = json.loads(spec_json)
    size, length = spec["disk_size"], spec["length"]
    extents = [blockstream.Extent(0, length)]
    if spec.get("probe"):
        try:
            blockstream.copy(spec["src"], spec["dst"], extents, disk_size=size, connections=1)
        except blockstream.BlockstreamError as e:
            print(json.dumps({"error": str(e)}))
            return 0
        print(json.dumps({"ok": True}))
        return 0
    manifest = blockstream.zero_manifest(size, BLOCK, "xxh128")
    stream = blockstream.Stream(spec["src"], spec["dst"], extents, disk_size=size,
                                manifest=manifest, connections=spec["connections"], hash="xxh128")
    pids: dict[str, int] = spec["pids"]
    pid0 = {k: proc_cpu_seconds(v) for k, v in pids.items()}
    busy0 = machine_busy_seconds()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    p = stream.run()
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    busy = machine_busy_seconds() - busy0
    pid_cpu = {k: proc_cpu_seconds(v) - pid0[k] for k, v in pids.items()}
    Path(spec["manifest"]).write_bytes(bytes(manifest))
    print(json.dumps({
        "bytes": length,
        "seconds": seconds,
        "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
        "pid_cpu_s": pid_cpu,
        "machine_busy_s": busy,
        "bytes_read": p.bytes_read,
        "bytes_written": p.bytes_written,
        "bytes_zero": p.bytes_zero,
        "done": p.done,
    }))
    return 0


# ---- driver --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    size: int
    repeat: int
    sinks: list[str]
    iperf_seconds: float
    seconds_per_copy: float
    links: list[Link]
    sender_wmem_max: int | None = None


def copy_length(opts: Options, link: Link) -> int:
    """All of the image on a fast link; on a rate-limited one about
    ``seconds_per_copy`` worth of data at the configured rate."""
    if link.rate_mbit is None:
        return opts.size
    n = int(link.rate_mbit * 1e6 / 8 * opts.seconds_per_copy) // CHUNK * CHUNK
    return max(CHUNK, min(opts.size, n))


def measure_link(ses: Session, opts: Options, link: Link) -> dict[str, Any]:
    try:
        qdisc = link.shape(ses.s)
    except NetemUnavailable as e:
        print(f"{link.name}: {NETEM_SKIP}", flush=True)
        return {"skipped": NETEM_SKIP, "reason": str(e)}
    length = copy_length(opts, link)
    tc = {site: ses.s.qdisc(site) for site in ("a", "b")}
    print(f"{link.name} (qdisc {qdisc}): copies of {length / MiB:g} MiB", flush=True)
    tasks: list[tuple[str, int]] = [("tcp", n) for n in CONNECTIONS]
    tasks += [(sink, n) for sink in opts.sinks for n in CONNECTIONS]
    runs: dict[str, list[dict[str, Any]]] = {f"{k}/{n}": [] for k, n in tasks}
    # time limit for one copy: far above anything plausible (>= 2 MB/s)
    timeout = 120 + length / (2 * MB)
    try:
        for i in range(opts.repeat):
            for kind, n in tasks[i % len(tasks) :] + tasks[: i % len(tasks)]:
                if kind == "tcp":
                    r = run_iperf(ses, n, opts.iperf_seconds)
                    what = f"iperf3 -P {n}"
                else:
                    r = run_copy(ses, kind, n, length, timeout)
                    what = f"blockstream c{n} -> {kind}"
                runs[f"{kind}/{n}"].append(r)
                print(f"  run {i + 1}: {what:<32} {r['mb_s']:8.1f} MB/s"
                      f"  machine CPUs busy {r['machine_cpus_busy']:.2f}" + ("  ok" if kind != "tcp" else ""),
                      flush=True)
    finally:
        ses.s.clear()
    return {"qdisc": qdisc, "tc": tc, "copy_bytes": length, "runs": runs, "median": summarize(runs)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, rs in runs.items():
        fields = [k for k, v in rs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
        out[key] = {k: statistics.median(r[k] for r in rs) for k in fields}
        out[key]["best_mb_s"] = max(r["mb_s"] for r in rs)
    return out


def warm_up(ses: Session, opts: Options) -> dict[str, dict[str, str]]:
    """Per sink: the refusal checks and one small uncounted copy (proves TLS
    and the servers work before any time is spent; warms up code paths)."""
    n = min(opts.size, 256 * MiB)
    refusals = {}
    for sink in opts.sinks:
        refusals[sink] = check_refusals(ses, sink)
        for what, err in refusals[sink].items():
            print(f"  {sink}: {what} refused: {err[:120]}", flush=True)
        run_copy(ses, sink, 4, n, 120)
    print(f"  warm-up copies of {n / MiB:g} MiB ok", flush=True)
    return refusals


def print_table(results: dict[str, dict[str, Any]], sinks: list[str]) -> None:
    head = f"{'link':<36} {'conns':>5} {'raw TCP':>8}"
    for sink in sinks:
        head += f" {'bs->' + sink:>19} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        if "skipped" in res:
            print(f"{name:<36} {'1, 4':>5}  {res['skipped']}")
            continue
        med = res["median"]
        for n in CONNECTIONS:
            tcp = med[f"tcp/{n}"]["mb_s"]
            line = f"{name:<36} {n:>5} {tcp:>8.1f}"
            for sink in sinks:
                bs = med[f"{sink}/{n}"]["mb_s"]
                line += f" {bs:>19.1f} {bs / tcp:>6.2f}"
            print(line)
    print("MB/s (10^6 bytes/s), medians; raw TCP = iperf3 with as many streams as blockstream has\n"
          "connections; bs = blockstream Stream.run() over NBD+TLS, xxh128 manifest on; ratio = bs / raw TCP")
    print()
    head = f"{'link':<36} {'conns':>5} {'sink':>16} {'CPU s/GB: bs':>13} {'sink':>6} {'source':>7}"
    print(head + f" {'machine CPUs busy':>18}")
    for name, res in results.items():
        if "skipped" in res:
            continue
        med = res["median"]
        for n in CONNECTIONS:
            t = med[f"tcp/{n}"]
            gb = t["bytes"] / MB / 1000
            print(f"{name:<36} {n:>5} {'iperf3':>16} {t['client_cpu_s'] / gb:>13.2f}"
                  f" {t['server_cpu_s'] / gb:>6.2f} {'':>7} {t['machine_cpus_busy']:>18.2f}")
            for sink in sinks:
                m = med[f"{sink}/{n}"]
                gb = m["bytes"] / MB / 1000
                print(f"{'':<36} {n:>5} {sink:>16} {m['blockstream_cpu_s'] / gb:>13.2f}"
                      f" {m['sink_cpu_s'] / gb:>6.2f} {m['source_cpu_s'] / gb:>7.2f}"
                      f" {m['machine_cpus_busy']:>18.2f}")
    print(f"CPU seconds per GB moved (medians; iperf3: client / server); {os.cpu_count()} CPUs here")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C, so every cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def versions() -> dict[str, str]:
    out = {}
    for tool, flag in (("qemu-nbd", "--version"), ("nbdkit", "--version"), ("iperf3", "--version")):
        with contextlib.suppress(OSError):
            text = subprocess.run([tool, flag], capture_output=True, text=True).stdout
            out[tool] = text.splitlines()[0] if text else ""
    return out


def check_tools(ap: argparse.ArgumentParser, sinks: list[str]) -> None:
    if shutil.which("iperf3") is None:
        ap.error("iperf3 not found: it measures the raw TCP reference; install it with "
                 "`apt-get install -y iperf3` (Debian/Ubuntu) or `dnf install -y iperf3`")
    need = {"ip": "iproute2", "tc": "iproute2", "qemu-nbd": "qemu-utils"}
    if "null" in sinks:
        need["nbdkit"] = "nbdkit"
    for tool, pkg in need.items():
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (apt-get install -y {pkg})")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="source image size (default 2GiB)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 1 repeat, short iperf3 runs (~1 min)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians (default 3)")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="rate of the shaped link (default 1000)")
    ap.add_argument("--sinks", default=DEFAULT_SINKS,
                    help=f"from {','.join(SINKS)} (default {DEFAULT_SINKS})")
    ap.add_argument("--iperf-seconds", type=float, default=5.0, help="length of an iperf3 run (default 5)")
    ap.add_argument("--seconds-per-copy", type=float, default=10.0,
                    help="on a rate-limited link, copy about this many seconds of data (default 10)")
    ap.add_argument("--link", choices=("auto", "veth", "tun"), default="auto",
                    help="site link: veth pair, TUN delay line, or auto (default): veth, and the "
                         "delay line for the delay rows when the kernel has no netem")
    ap.add_argument("--links", metavar="TEXT", default="",
                    help="only the link rows whose name contains TEXT (e.g. 'RTT')")
    ap.add_argument("--sender-wmem-max", type=int, metavar="BYTES",
                    help="set net.ipv4.tcp_wmem's maximum in site a (the sender: iperf3's client and "
                         "blockstream) to BYTES, e.g. 16777216; default: the namespace's own")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--tmpdir", default="/var/tmp", help="where the temporary directory goes")
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    return ap.parse_args(argv), ap


def run_links(kind: LinkKind, choice: str, links: list[Link], opts: Options, workdir: Path,
              sockdir: Path, results: dict[str, dict[str, Any]],
              refusals: dict[str, dict[str, dict[str, str]]]) -> list[Link]:
    """Measure ``links`` on sites joined by a ``kind`` link (a fresh session:
    its own namespaces, image, PKI, servers).  With ``--link auto`` a veth
    leaves the delay rows to the TUN delay line when the kernel has no netem;
    returns the links not measured here."""
    workdir.mkdir()
    sockdir.mkdir()
    with two_sites("bsite" if kind == "veth" else "bsitd", link=kind) as s:
        netem = s.netem_available()
        here = [x for x in links if kind == "tun" or netem or not x.delay_ms or choice == "veth"]
        if not here:
            return links
        how = ("delay line (TUN devices joined by tests/harness/delayline.c)" if kind == "tun"
               else "netem available" if netem else "netem NOT available (tbf for rates, nftables for loss)")
        print(f"{kind} link: a={s.address('a')} b={s.address('b')} (namespaces {s.ns['a']}, {s.ns['b']}); "
              f"{how}", flush=True)
        wmem = s.run("a", ["sysctl", "-n", "net.ipv4.tcp_wmem"], capture_output=True, text=True,
                     check=True).stdout.split()
        if opts.sender_wmem_max is not None:
            wmem[2] = str(opts.sender_wmem_max)
            s.run("a", ["sysctl", "-q", f"net.ipv4.tcp_wmem={' '.join(wmem)}"], check=True)
        print(f"site a (sender) net.ipv4.tcp_wmem = {' '.join(wmem)}", flush=True)
        ses = start_session(s, workdir, sockdir, opts.size, opts.sinks)
        refusals[kind] = warm_up(ses, opts)
        for link in here:
            results[link.name] = {"link": kind, "sender_tcp_wmem": " ".join(wmem),
                                  **measure_link(ses, opts, link)}
    return [x for x in links if x not in here]


def main(argv: list[str] | None = None) -> int:
    args, ap = parse_args(argv)
    if args.child:
        return child(args.child)
    sinks = [x for x in args.sinks.split(",") if x]
    if not sinks or any(x not in SINKS for x in sinks):
        ap.error(f"--sinks: choose from {','.join(SINKS)}")
    if args.repeat < 1 or args.rate_mbit <= 0 or args.iperf_seconds <= 0:
        ap.error("--repeat >= 1, --rate-mbit > 0, --iperf-seconds > 0")
    check_tools(ap, sinks)
    opts = Options(
        size=256 * MiB if args.quick else args.size,
        repeat=1 if args.quick else args.repeat,
        sinks=sinks,
        iperf_seconds=2.0 if args.quick else args.iperf_seconds,
        seconds_per_copy=2.0 if args.quick else args.seconds_per_copy,
        links=[x for x in make_links(args.rate_mbit) if args.links in x.name],
        sender_wmem_max=args.sender_wmem_max,
    )
    if not opts.links:
        ap.error(f"--links {args.links!r} matches no link row")
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    refusals: dict[str, dict[str, dict[str, str]]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="sitesbench-", dir=args.tmpdir))
    sockdir = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))  # unix socket paths are short
    try:
        with terminate_as_interrupt():
            pending = list(opts.links)
            for kind in ("veth", "tun"):
                if args.link not in ("auto", kind) or not pending:
                    continue
                pending = run_links(kind, args.link, pending, opts, workdir / kind, sockdir / kind,
                                    results, refusals)
            for link in pending:  # delay on a veth without netem and --link veth
                print(f"{link.name}: {NETEM_SKIP}", flush=True)
                results[link.name] = {"skipped": NETEM_SKIP}
            results = {link.name: results[link.name] for link in opts.links}
    except NamespacesUnavailable as e:
        print(f"cannot run: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    print()
    print(f"source {opts.size / GiB:g} GiB random data; {opts.repeat} run(s) per measurement; "
          f"{os.cpu_count()} CPUs; load average {load0[0]:.2f} at the start; {elapsed:.0f}s in all")
    print_table(results, sinks)
    if args.out:
        doc = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_start": load0, "loadavg_end": os.getloadavg()},
            "versions": versions(),
            "options": {**{k: v for k, v in vars(opts).items() if k != "links"},
                        "links": [vars(x) for x in opts.links]},
            "elapsed_s": elapsed,
            "refusals": refusals,
            "results": results,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        sys.exit(1)
