#!/usr/bin/env python3
"""Benchmark blockstream against nbdcopy on qemu-nbd endpoints.

    .venv/bin/python bench/bench_blockstream.py            # 4 GiB disk
    .venv/bin/python bench/bench_blockstream.py --quick    # 512 MiB disk
    .venv/bin/python bench/bench_blockstream.py --size 8GiB --repeat 5 --out result.json

The source is a qcow2 whose first half is random data (os.urandom) and whose
second half is unallocated.  It is served read-only by qemu-nbd; the
destination is a fresh qcow2 (recreated before every run) served by qemu-nbd
with ``--cache=none --discard=unmap`` (no ``--detect-zeroes``: each tool does
its own zero handling).  Both run over unix sockets, or over TCP loopback
with x509 TLS.

Per variant (unix/TLS, number of connections) three tools are run, interleaved,
``--repeat`` times each, and the median is reported:

* ``blockstream``: ``Stream(src, dst, extents, disk_size=, connections=N,
  hash="xxh128")`` with a manifest (so every block really is hashed), the
  extents planned from ``block_status(src)`` with ``plan_extents``; run in a
  child Python process so that it is measured like nbdcopy.
* ``nbdcopy``: ``nbdcopy --connections=N --flush SRC DST``, defaults otherwise.
* ``nbdcopy-4M``: the same with ``--request-size=4194304`` (blockstream's
  ``max_request``).

``--flush`` is given to nbdcopy because blockstream always flushes the
destination (every ``flush_interval`` and at the end): both finish with a
durable destination.  Wall time and CPU time (``RUSAGE_CHILDREN`` delta: user +
system of the tool's process) are measured around the whole child process,
connection setup and block-status queries included (for blockstream the
child also reports ``Stream.run()`` alone, shown as "(run())").  The qemu-nbd
servers' CPU time is reported separately, and so is the CPU time the rest of
the machine used during the run ("others", from /proc/stat: other users'
load, but also kernel threads working for the run, e.g. journal commits).
Before each run the benchmark waits up to ``--quiet-wait`` seconds for other
load to drop below a quarter CPU.  Throughput is MiB of *allocated source
data* (half the disk) per second; the table shows medians and the best run.

Every run is checked: the servers are stopped and ``qemu-img compare`` must
find the two qcow2 files identical; for blockstream the manifest must also
equal the block hashes of the generated data (computed with
``blockstream.hash_blocks`` over the bytes written to the source).  A run that
fails a check aborts the benchmark; every run printed with "ok" passed them.
One uncounted warm-up run of each tool comes first, and the order of the tools
rotates from one repetition to the next.

Everything lives in a temporary directory under /var/tmp (``--tmpdir``) that
is removed at the end, also on failure or Ctrl-C; every server and tool
process started here is stopped.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/harness: NbdServer, make_x509, free_port

from harness.nbd import NbdServer, TlsX509, free_port, make_x509  # noqa: E402

import blockstream  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK = blockstream.BLOCK_SIZE_DEFAULT
CHUNK = 64 * MiB
TOOLS = ("blockstream", "nbdcopy", "nbdcopy-4M")
NBDCOPY_4M = 4 * MiB  # == blockstream's default max_request


@dataclass(frozen=True)
class Variant:
    name: str
    connections: int
    tls: bool


VARIANTS = {
    "unix-c1": Variant("unix-c1", 1, False),
    "unix-c4": Variant("unix-c4", 4, False),
    "tls-c1": Variant("tls-c1", 1, True),
    "tls-c4": Variant("tls-c4", 4, True),
}
DEFAULT_VARIANTS = "unix-c1,unix-c4,tls-c4"


class BenchError(RuntimeError):
    pass


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 4GiB, 512M, 1073741824)")
    mult = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}[m.group(2).upper()]
    size = int(m.group(1)) * mult
    if size <= 0 or size % (2 * MiB):
        raise argparse.ArgumentTypeError("size must be a positive multiple of 2 MiB")
    return size


# ---- source image ---------------------------------------------------------------


def make_source(workdir: Path, size: int) -> tuple[Path, bytearray]:
    """qcow2: [0, size/2) random, [size/2, size) unallocated.  Returns the
    image and the expected xxh128 manifest (hashes of the bytes written)."""
    raw = workdir / "src.raw"
    image = workdir / "src.qcow2"
    half = size // 2
    manifest = blockstream.zero_manifest(size, BLOCK, "xxh128")
    with open(raw, "wb") as f:
        f.truncate(size)
        off = 0
        while off < half:
            n = min(CHUNK, half - off)
            data = os.urandom(n)
            os.pwrite(f.fileno(), data, off)
            b0 = off // BLOCK * blockstream.HASH_SIZE
            hashes = blockstream.hash_blocks(data, BLOCK, "xxh128")
            manifest[b0 : b0 + len(hashes)] = hashes
            off += n
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
        check=True,
        capture_output=True,
    )
    raw.unlink()
    return image, manifest


# ---- servers --------------------------------------------------------------------


class Servers:
    """Source (read-only) and destination qemu-nbd for one run."""

    def __init__(self, workdir: Path, src_image: Path, dst_image: Path, tls: TlsX509 | None) -> None:
        self.src = self._server(workdir / "s", src_image, tls, read_only=True)
        self.dst: NbdServer | None = None
        try:
            self.dst = self._server(workdir / "d", dst_image, tls, read_only=False)
        except BaseException:
            self.src.stop()
            raise

    @staticmethod
    def _server(d: Path, image: Path, tls: TlsX509 | None, *, read_only: bool) -> NbdServer:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        argv = ["qemu-nbd", "--persistent", "--shared=8", "-f", "qcow2"]
        if read_only:
            argv.append("--read-only")
        else:
            argv += ["--cache=none", "--discard=unmap"]
        sock: Path | None = None
        port: int | None = None
        if tls is None:
            sock = d / "sock"
            argv += ["-k", str(sock)]
        else:
            port = free_port()
            argv += [
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "--object",
                f"tls-creds-x509,id=tls0,endpoint=server,dir={tls.server_dir}",
                "--tls-creds",
                "tls0",
            ]
        argv.append(str(image))
        srv = NbdServer(argv, workdir=d, socket_path=sock, port=port, tls=tls, tls_hostname="127.0.0.1")
        return srv.start()

    def cpu_seconds(self) -> float:
        """user+system CPU of both servers so far (read before stopping)."""
        total = 0.0
        for srv in (self.src, self.dst):
            if srv is None or srv.pid is None:
                continue
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{srv.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        for srv in (self.dst, self.src):
            if srv is not None:
                srv.stop()


# ---- other load on the machine ------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(timeout: float, threshold: float = 0.25) -> float:
    """Wait (at most ``timeout`` s) until the machine used less than
    ``threshold`` CPUs over half a second; returns the last busy level."""
    deadline = time.monotonic() + timeout
    while True:
        b0 = machine_busy_seconds()
        time.sleep(0.5)
        busy = (machine_busy_seconds() - b0) / 0.5
        if busy < threshold or time.monotonic() >= deadline:
            return busy


# ---- one run ----------------------------------------------------------------------

_current_child: subprocess.Popen[bytes] | None = None


def run_child(argv: list[str], log: Path) -> tuple[float, float]:
    """Run argv to completion; (wall seconds, CPU seconds of the child)."""
    global _current_child
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        _current_child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            rc = _current_child.wait()
        finally:
            if _current_child.poll() is None:
                _current_child.kill()
                _current_child.wait()
            _current_child = None
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise BenchError(f"{argv[0]} exited with {rc}:\n{log.read_text(errors='replace')[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def one_run(
    tool: str,
    variant: Variant,
    workdir: Path,
    src_image: Path,
    expected: bytearray,
    size: int,
    tls: TlsX509 | None,
    bs_options: dict[str, int],
    quiet_wait: float,
) -> dict[str, Any]:
    dst_image = workdir / "dst.qcow2"
    dst_image.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(dst_image), str(size)],
        check=True,
        capture_output=True,
    )
    runs = workdir / "run"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    log = runs / "tool.log"
    result: dict[str, Any] = {"tool": tool, "variant": variant.name}
    servers = Servers(workdir, src_image, dst_image, tls)
    try:
        n = str(variant.connections)
        if tool == "blockstream":
            spec = runs / "spec.json"
            manifest_out = runs / "manifest.bin"
            inner_out = runs / "inner.json"
            spec.write_text(
                json.dumps(
                    {
                        "src": servers.src.uri,
                        "dst": servers.dst.uri if servers.dst else "",
                        "size": size,
                        "connections": variant.connections,
                        "manifest": str(manifest_out),
                        "inner": str(inner_out),
                        "options": bs_options,
                    }
                )
            )
            argv = [sys.executable, str(Path(__file__).resolve()), "--child-blockstream", str(spec)]
        else:
            argv = ["nbdcopy", f"--connections={n}", "--flush"]
            if tool == "nbdcopy-4M":
                argv.append(f"--request-size={NBDCOPY_4M}")
            argv += [servers.src.uri, servers.dst.uri if servers.dst else ""]
        result["busy_before"] = wait_quiet(quiet_wait)
        srv0, busy0 = servers.cpu_seconds(), machine_busy_seconds()
        wall, cpu = run_child(argv, log)
        srv = servers.cpu_seconds() - srv0
        # CPU used meanwhile by processes that are not part of this run
        other = max(0.0, machine_busy_seconds() - busy0 - cpu - srv)
        result.update(wall_s=wall, cpu_s=cpu, server_cpu_s=srv, other_cpu_s=other)
    finally:
        servers.stop()
    # checks: a fast but wrong run must not count
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src_image), str(dst_image)],
        capture_output=True,
        text=True,
    )
    if cmp.returncode != 0:
        raise BenchError(f"{tool} {variant.name}: destination differs from source: {cmp.stdout}{cmp.stderr}")
    if tool == "blockstream":
        if (runs / "manifest.bin").read_bytes() != bytes(expected):
            raise BenchError(
                f"blockstream {variant.name}: manifest differs from the hashes of the source data"
            )
        result["inner"] = json.loads((runs / "inner.json").read_text())
    return result


def child_blockstream(spec_path: str) -> int:
    """The blockstream side of a run, in its own process (like nbdcopy)."""
    spec = json.loads(Path(spec_path).read_text())
    size = spec["size"]
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    alloc = blockstream.block_status(spec["src"], "base:allocation")
    extents = blockstream.plan_extents(alloc, None, disk_size=size, granularity=BLOCK)
    manifest = blockstream.zero_manifest(size, BLOCK, "xxh128")
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    stream = blockstream.Stream(
        spec["src"],
        spec["dst"],
        extents,
        disk_size=size,
        manifest=manifest,
        connections=spec["connections"],
        hash="xxh128",
        **spec["options"],
    )
    progress = stream.run()
    t2 = time.perf_counter()
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    Path(spec["manifest"]).write_bytes(bytes(manifest))
    Path(spec["inner"]).write_text(
        json.dumps(
            {
                "plan_s": t1 - t0,
                "plan_cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                "run_s": t2 - t1,
                "run_cpu_s": r2.ru_utime + r2.ru_stime - r1.ru_utime - r1.ru_stime,
                "extents": len(extents),
                "bytes_read": progress.bytes_read,
                "bytes_written": progress.bytes_written,
                "bytes_zero": progress.bytes_zero,
                "durable_offset": progress.durable_offset,
            }
        )
    )
    return 0


# ---- driver -------------------------------------------------------------------------


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C, so every finally block runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def summarize(runs: list[dict[str, Any]], data_bytes: int) -> dict[str, Any]:
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    srv = statistics.median(r["server_cpu_s"] for r in runs)
    gib = data_bytes / GiB
    out: dict[str, Any] = {
        "median_wall_s": wall,
        "mib_per_s": data_bytes / MiB / wall,
        "best_mib_per_s": data_bytes / MiB / min(r["wall_s"] for r in runs),
        "cpu_s_per_gib": cpu / gib,
        "server_cpu_s_per_gib": srv / gib,
        "median_other_cpu_s": statistics.median(r["other_cpu_s"] for r in runs),
        "walls_s": [r["wall_s"] for r in runs],
        "runs": runs,
    }
    if all("inner" in r for r in runs):
        # blockstream: Stream.run() alone, without interpreter start-up and planning
        run_s = statistics.median(r["inner"]["run_s"] for r in runs)
        out["run_only_mib_per_s"] = data_bytes / MiB / run_s
        out["run_only_cpu_s_per_gib"] = statistics.median(r["inner"]["run_cpu_s"] for r in runs) / gib
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = (
        f"{'variant':<9} {'bs MiB/s':>9} {'(run())':>8} {'nbdcopy':>9} {'ratio':>6}"
        f" {'nbdc-4M':>9} {'ratio':>6}"
        f"  {'CPU s/GiB: bs':>14} {'nbdcopy':>8} {'nbdc-4M':>8}  {'server CPU s/GiB: bs/nbdc/4M':>28}"
    )
    print(head)
    print("-" * len(head))
    for name, tools in results.items():
        bs, nc, n4 = (tools[t] for t in TOOLS)
        srv = "/".join(f"{tools[t]['server_cpu_s_per_gib']:.2f}" for t in TOOLS)
        print(
            f"{name:<9} {bs['mib_per_s']:>9.0f} {bs['run_only_mib_per_s']:>8.0f} {nc['mib_per_s']:>9.0f}"
            f" {bs['mib_per_s'] / nc['mib_per_s']:>6.2f} {n4['mib_per_s']:>9.0f}"
            f" {bs['mib_per_s'] / n4['mib_per_s']:>6.2f}"
            f"  {bs['cpu_s_per_gib']:>14.2f} {nc['cpu_s_per_gib']:>8.2f} {n4['cpu_s_per_gib']:>8.2f}"
            f"  {srv:>28}"
        )
    print()
    print("best of the runs (the least disturbed), and the CPU other processes used during a run (median):")
    print(
        f"{'variant':<9} {'bs MiB/s':>9} {'nbdcopy':>9} {'ratio':>6} {'nbdc-4M':>9} {'ratio':>6}"
        "  others s: bs/nbdc/4M"
    )
    for name, tools in results.items():
        bs, nc, n4 = (tools[t]["best_mib_per_s"] for t in TOOLS)
        other = "/".join(f"{tools[t]['median_other_cpu_s']:.2f}" for t in TOOLS)
        print(f"{name:<9} {bs:>9.0f} {nc:>9.0f} {bs / nc:>6.2f} {n4:>9.0f} {bs / n4:>6.2f}  {other}")
    print(
        "MiB/s of allocated data, medians unless said;\n"
        "ratio = blockstream / nbdcopy (goal >= 0.9), both measured as whole processes;\n"
        "(run()) = blockstream's Stream.run() alone, without Python start-up and planning"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=4 * GiB, help="disk size (default 4GiB)")
    ap.add_argument("--quick", action="store_true", help="512 MiB disk")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and variant (median)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"from {','.join(VARIANTS)}")
    ap.add_argument(
        "--bs-opt",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="extra Stream() keyword for blockstream, e.g. max_request=262144 (repeatable)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        metavar="S",
        help="before each run wait up to S s for other load to drop below 0.25 CPU (default 10)",
    )
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--tmpdir", default="/var/tmp", help="where the temporary directory goes")
    ap.add_argument("--child-blockstream", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_blockstream:
        return child_blockstream(args.child_blockstream)
    size = 512 * MiB if args.quick else args.size
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    bs_options: dict[str, int] = {}
    for opt in args.bs_opt:
        name, _, value = opt.partition("=")
        if name not in ("max_request", "in_flight", "flush_interval") or not value.isdigit():
            ap.error(f"--bs-opt {opt!r}: expected max_request|in_flight|flush_interval=INT")
        bs_options[name] = int(value)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    for tool in ("qemu-nbd", "qemu-img", "nbdcopy", "certtool"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (apt-get install qemu-utils libnbd-bin gnutls-bin)")

    workdir = Path(tempfile.mkdtemp(prefix="bsbench-", dir=args.tmpdir))
    results: dict[str, dict[str, Any]] = {}
    try:
        with terminate_as_interrupt():
            t = time.perf_counter()
            print(f"creating a {size / GiB:g} GiB source (half random) in {workdir} ...", flush=True)
            src_image, expected = make_source(workdir, size)
            os.sync()  # write back the generated files now, not during the first runs
            print(f"  done in {time.perf_counter() - t:.1f}s", flush=True)
            tls = make_x509(workdir / "tls") if any(v.tls for v in variants) else None
            data_bytes = size // 2

            def tls_for(v: Variant) -> TlsX509 | None:
                return tls if v.tls else None

            print("  warm-up (not counted) ...", flush=True)
            for tool in TOOLS:
                v0 = variants[0]
                one_run(tool, v0, workdir, src_image, expected, size, tls_for(v0), bs_options, 0)
            for v in variants:
                per_tool: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
                for i in range(args.repeat):
                    # rotate the order so that no tool always runs first
                    for tool in TOOLS[i % len(TOOLS) :] + TOOLS[: i % len(TOOLS)]:
                        r = one_run(
                            tool,
                            v,
                            workdir,
                            src_image,
                            expected,
                            size,
                            tls_for(v),
                            bs_options,
                            args.quiet_wait,
                        )
                        per_tool[tool].append(r)
                        print(
                            f"  {v.name:<8} {tool:<12} run {i + 1}: {r['wall_s']:6.2f}s"
                            f" {data_bytes / MiB / r['wall_s']:7.0f} MiB/s  cpu {r['cpu_s']:5.2f}s"
                            f"  servers {r['server_cpu_s']:5.2f}s  others {r['other_cpu_s']:5.2f}s  ok",
                            flush=True,
                        )
                results[v.name] = {t: summarize(rs, data_bytes) for t, rs in per_tool.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"disk {size / GiB:g} GiB ({data_bytes / GiB:g} GiB random data, rest unallocated),"
        f" {args.repeat} runs each, {os.cpu_count()} CPUs"
    )
    print_table(results)
    if args.out:
        nbdcopy_version = subprocess.run(["nbdcopy", "--version"], capture_output=True, text=True).stdout
        qemu_version = subprocess.run(["qemu-nbd", "--version"], capture_output=True, text=True).stdout
        doc = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "versions": {
                "nbdcopy": nbdcopy_version.splitlines()[0] if nbdcopy_version else "",
                "qemu-nbd": qemu_version.splitlines()[0] if qemu_version else "",
            },
            "disk_size": size,
            "data_bytes": data_bytes,
            "repeat": args.repeat,
            "loadavg_at_end": os.getloadavg(),
            "blockstream_options": bs_options,
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
