#!/usr/bin/env python3
"""What an incremental cycle costs next to a full copy, at the data-path level.

    .venv/bin/python bench/bench_incremental.py                 # 16 GiB disk
    .venv/bin/python bench/bench_incremental.py --quick         # 2 GiB disk
    .venv/bin/python bench/bench_incremental.py --size 4G --dirty 1,5,10 --repeat 5 --verify

Setup (timed and printed, not part of the result):

* the source is a qcow2 (64 KiB clusters) with ``--data-percent`` (50) % of
  its virtual size allocated with random data in runs of ~16 MiB, the rest
  unallocated: ``nbdkit sparse-random size=N percent=50 random-content=true``
  converted with ``qemu-img convert -W -m 8`` (only the allocated half is
  written; ~1 min for 16 GiB on 2 cores here);
* ``qemu-storage-daemon`` opens it as ``--blockdev driver=file,node-name=file0
  --blockdev driver=qcow2,file=file0,node-name=fmt0`` with a QMP monitor on a
  unix socket, and starts an NBD server (``nbd-server-start``) on another.

Then for every dirty fraction (default 1 % and 10 %):

1. ``block-dirty-bitmap-add`` node fmt0 name b0 granularity 65536
   (not persistent), and a *writable* NBD export of fmt0
   (``block-export-add``);
2. dirty the fraction: random non-overlapping 64 KiB-aligned runs of 1..16
   granules (64 KiB .. 1 MiB), written with ``qemu-io`` through the writable
   NBD export (``write -P <byte>``: non-zero data, so it is allocated data
   in the source and read by the copy).  Runs land on data and on holes alike;
   the exact union of dirtied granules is kept;
3. remove the writable export, ``block-dirty-bitmap-disable`` b0 (QEMU
   refuses to export an enabled bitmap read-only while the node is writable:
   a real cycle freezes the bitmap the same way), and export fmt0 read-only
   with ``bitmaps: ["b0"]``;
4. **full** (``--repeat`` times, interleaved with 5., medians reported):
   ``block_status(src, "base:allocation")`` → ``plan_extents(alloc,
   None, ...)`` → ``Stream(src, dst, extents, ...).run()`` into a fresh qcow2
   served by ``qemu-nbd --cache=none``;
5. **incremental**: the same with ``plan_extents(alloc,
   block_status(src, "qemu:dirty-bitmap:b0"), ...)`` into another fresh
   qcow2;
6. remove the read-only export and the bitmap.

Both Streams run with the parameters of a real cycle (activities/cycle.py):
a manifest (every block hashed with xxh128), 64 KiB blocks, 4 connections,
``flush_interval`` 64 MiB.  The manifest is the all-zero-disk one in both
cases (a real incremental starts from the previous point's, same size and
cost).  Reported per case: bytes planned (non-zero extents), bytes read,
seconds for planning (block-status queries + plan_extents) and for the copy,
and the ratios incremental / full of total time and of bytes read.  Nothing is
asserted about time; the run fails if the incremental copy read more than the
dirtied granules (``bytes_read > dirty granules * 64 KiB``) or if the full
copy did not read every planned byte.  ``--verify`` also ``qemu-img compare``s
the first full copy of each case with the source (reads both again).

The source is read from the page cache in both cases (the machine has more
RAM than the allocated data): this measures the data path (NBD, hashing,
destination writes), not the source disk.  Everything lives in a temporary
directory under /var/tmp (``--tmpdir``) and in short socket directories under
/tmp; all are removed and every process started here is stopped at the end,
also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import re
import shutil
import signal
import socket
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/harness: NbdServer, qemu_nbd

from harness.nbd import nbdkit, qemu_nbd  # noqa: E402

import blockstream  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
GRANULE = 65536
MAX_RUN_GRANULES = 16
QEMU_IO_BATCH = 512  # -c commands per qemu-io process


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 16G, 2GiB, 512M)")
    n = int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}[m.group(2).upper()]
    if n <= 0 or n % GRANULE:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 64 KiB, got {n}")
    return n


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {' '.join(argv)[:300]}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


# --------------------------------------------------------------------------- QMP


class Qmp:
    """A minimal synchronous QMP client on a unix socket."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited with {proc.returncode}")
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no QMP socket at {path} after {timeout}s") from None
                time.sleep(0.05)
        self.sock.settimeout(120)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"unexpected QMP greeting {greeting!r}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, command: str, /, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"QMP {command} {arguments}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@dataclass
class StorageDaemon:
    proc: subprocess.Popen[bytes]
    qmp: Qmp
    nbd_socket: Path
    log: Path

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def export(self, export_id: str, *, writable: bool, bitmaps: list[str] | None = None) -> str:
        args: dict[str, Any] = {"type": "nbd", "id": export_id, "node-name": "fmt0", "name": export_id,
                                "writable": writable}
        if bitmaps:
            args["bitmaps"] = bitmaps
        self.qmp.cmd("block-export-add", **args)
        return self.uri(export_id)

    def unexport(self, export_id: str, timeout: float = 30.0) -> None:
        """block-export-del, then wait until the export is really gone (it is
        removed asynchronously once its clients have disconnected)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.qmp.cmd("block-export-del", id=export_id)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        while any(e.get("id") == export_id for e in self.qmp.cmd("query-block-exports")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"export {export_id} still present after {timeout}s")
            time.sleep(0.05)


@contextlib.contextmanager
def storage_daemon(image: Path, sockdir: Path) -> Iterator[StorageDaemon]:
    qmp_path = sockdir / "qmp.sock"
    nbd_path = sockdir / "nbd.sock"
    log = sockdir / "qsd.log"
    argv = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,filename={image},node-name=file0",
        "--blockdev", "driver=qcow2,file=file0,node-name=fmt0",
        "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
        "--monitor", "chardev=qmp0",
    ]
    with open(log, "ab") as lf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, start_new_session=True)
    qmp: Qmp | None = None
    try:
        qmp = Qmp(qmp_path, proc)
        qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_path)}})
        yield StorageDaemon(proc=proc, qmp=qmp, nbd_socket=nbd_path, log=log)
    except BaseException:
        with contextlib.suppress(OSError):
            sys.stderr.write("--- qemu-storage-daemon log ---\n" + log.read_text(errors="replace")[-3000:])
        raise
    finally:
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.cmd("quit")
            qmp.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- setup


def make_source(image: Path, size: int, data_percent: int, seed: int) -> float:
    """A qcow2 with data_percent % random data in ~16 MiB runs; returns seconds."""
    t0 = time.monotonic()
    with nbdkit("sparse-random", f"size={size}", f"percent={data_percent}", "random-content=true",
                f"seed={seed}", read_only=True) as gen:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
             "-W", "-m", "8", gen.uri, str(image)])
    return time.monotonic() - t0


def pick_dirty_runs(size: int, fraction: float, rng: random.Random) -> list[tuple[int, int]]:
    """Non-overlapping (granule, count) runs covering round(fraction * granules)
    granules; sorted by granule."""
    granules = size // GRANULE
    target = max(1, round(fraction * granules))
    taken = bytearray(granules)
    runs: list[tuple[int, int]] = []
    done = 0
    while done < target:
        n = min(rng.randint(1, MAX_RUN_GRANULES), target - done)
        g = rng.randrange(0, granules - n + 1)
        if any(taken[g:g + n]):
            continue
        taken[g:g + n] = b"\1" * n
        runs.append((g, n))
        done += n
    runs.sort()
    return runs


def dirty(uri: str, runs: list[tuple[int, int]], rng: random.Random) -> float:
    """Write the runs through the NBD export with qemu-io; returns seconds."""
    t0 = time.monotonic()
    cmds = [f"write -q -P {rng.randint(1, 255)} {g * GRANULE} {n * GRANULE}" for g, n in runs]
    for i in range(0, len(cmds), QEMU_IO_BATCH):
        argv = ["qemu-io", "-f", "raw"]
        for c in cmds[i:i + QEMU_IO_BATCH]:
            argv += ["-c", c]
        argv.append(uri)
        run(argv)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- copies


@dataclass
class CopyResult:
    label: str
    extents: int
    planned: int  # bytes of non-zero extents
    planned_zero: int
    bytes_read: int
    bytes_written: int
    bytes_zero: int
    plan_seconds: float
    copy_seconds: float

    @property
    def seconds(self) -> float:
        return self.plan_seconds + self.copy_seconds


def copy_once(label: str, src_uri: str, dst_image: Path, size: int, incremental: bool,
              verify: bool) -> CopyResult:
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(dst_image), str(size)])
    try:
        with qemu_nbd(dst_image, fmt="qcow2", cache="none", discard="unmap") as dst:
            t0 = time.monotonic()
            alloc = blockstream.block_status(src_uri, "base:allocation")
            bitmap = blockstream.block_status(src_uri, "qemu:dirty-bitmap:b0") if incremental else None
            extents = blockstream.plan_extents(alloc, bitmap, disk_size=size, granularity=GRANULE)
            t1 = time.monotonic()
            manifest = blockstream.zero_manifest(size, GRANULE)
            stream = blockstream.Stream(src_uri, dst.uri, extents, disk_size=size, manifest=manifest,
                                        block_size=GRANULE, connections=4, flush_interval=64 << 20)
            p = stream.run()
            t2 = time.monotonic()
        if verify and not incremental:
            run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src_uri, str(dst_image)])
    finally:
        dst_image.unlink(missing_ok=True)
    return CopyResult(
        label=label, extents=len(extents),
        planned=sum(e.length for e in extents if not e.zero),
        planned_zero=sum(e.length for e in extents if e.zero),
        bytes_read=p.bytes_read, bytes_written=p.bytes_written, bytes_zero=p.bytes_zero,
        plan_seconds=t1 - t0, copy_seconds=t2 - t1,
    )


@dataclass
class Case:
    percent: float
    dirty_runs: int
    dirty_bytes: int
    dirty_seconds: float
    full: CopyResult
    incr: CopyResult


def median_of(results: list[CopyResult]) -> CopyResult:
    """Median plan and copy seconds of repeated identical copies (same bytes)."""
    first = results[0]
    for r in results[1:]:
        if (r.planned, r.bytes_read, r.extents) != (first.planned, first.bytes_read, first.extents):
            raise AssertionError(f"repeated {first.label} copies differ: {first} vs {r}")
    return dataclasses.replace(first, plan_seconds=statistics.median(r.plan_seconds for r in results),
                               copy_seconds=statistics.median(r.copy_seconds for r in results))


def run_case(qsd: StorageDaemon, work: Path, size: int, percent: float, rng: random.Random,
             verify: bool, repeat: int) -> Case:
    qsd.qmp.cmd("block-dirty-bitmap-add", node="fmt0", name="b0", granularity=GRANULE, persistent=False)
    try:
        runs = pick_dirty_runs(size, percent / 100, rng)
        dirty_bytes = sum(n for _, n in runs) * GRANULE
        rw = qsd.export("rw", writable=True)
        try:
            dirty_seconds = dirty(rw, runs, rng)
        finally:
            qsd.unexport("rw")
        qsd.qmp.cmd("block-dirty-bitmap-disable", node="fmt0", name="b0")
        src = qsd.export("src", writable=False, bitmaps=["b0"])
        fulls: list[CopyResult] = []
        incrs: list[CopyResult] = []
        try:
            for i in range(repeat):  # interleaved, so that drift hits both alike
                fulls.append(copy_once("full", src, work / "dst-full.qcow2", size, False, verify and i == 0))
                incrs.append(copy_once("incremental", src, work / "dst-incr.qcow2", size, True, False))
        finally:
            qsd.unexport("src")
    finally:
        qsd.qmp.cmd("block-dirty-bitmap-remove", node="fmt0", name="b0")
    full, incr = median_of(fulls), median_of(incrs)
    # the checks
    if incr.bytes_read > dirty_bytes:
        raise AssertionError(f"{percent}%: incremental read {incr.bytes_read} bytes, more than the "
                             f"{dirty_bytes} bytes of dirtied 64 KiB granules")
    if full.bytes_read != full.planned:
        raise AssertionError(f"{percent}%: full copy read {full.bytes_read} of {full.planned} planned bytes")
    return Case(percent, len(runs), dirty_bytes, dirty_seconds, full, incr)


# --------------------------------------------------------------------------- main


def report(size: int, data_percent: int, setup_seconds: float, cases: list[Case], repeat: int) -> None:
    print()
    print(f"disk {fmt_bytes(size)} qcow2, {data_percent}% random data; bitmap granularity 64 KiB; "
          f"source setup {setup_seconds:.1f} s; seconds: median of {repeat} copies")
    hdr = (f"{'case':<16}{'extents':>8}{'planned':>12}{'read':>12}{'zero':>11}"
           f"{'plan s':>8}{'copy s':>8}{'total s':>9}{'MiB/s':>8}")
    print(hdr)
    print("-" * len(hdr))
    for c in cases:
        for r in (c.full, c.incr):
            rate = r.bytes_read / MiB / r.copy_seconds if r.copy_seconds > 0 else 0.0
            print(f"{f'{c.percent:g}% {r.label}':<16}{r.extents:>8}{fmt_bytes(r.planned):>12}"
                  f"{fmt_bytes(r.bytes_read):>12}{fmt_bytes(r.bytes_zero):>11}"
                  f"{r.plan_seconds:>8.2f}{r.copy_seconds:>8.2f}{r.seconds:>9.2f}{rate:>8.0f}")
    print()
    print(f"{'dirty':>6}{'dirtied':>12}{'runs':>7}{'incr read':>12}{'bytes ratio':>13}"
          f"{'time ratio':>12}{'copy-time ratio':>17}{'time/bytes':>12}")
    for c in cases:
        print(f"{f'{c.percent:g}%':>6}{fmt_bytes(c.dirty_bytes):>12}{c.dirty_runs:>7}"
              f"{fmt_bytes(c.incr.bytes_read):>12}"
              f"{c.incr.bytes_read / c.full.bytes_read:>13.4f}"
              f"{c.incr.seconds / c.full.seconds:>12.4f}"
              f"{c.incr.copy_seconds / c.full.copy_seconds:>17.4f}"
              f"{(c.incr.seconds / c.full.seconds) / (c.incr.bytes_read / c.full.bytes_read):>12.2f}")
    print("bytes ratio = incremental bytes read / full bytes read; time ratio = (plan + copy) "
          "incremental / full;\ntime/bytes = time ratio / bytes ratio (1.0: time proportional to "
          "changed bytes); checked: incremental read <= dirtied granules")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("16G"), help="virtual disk size (16G)")
    ap.add_argument("--quick", action="store_true", help="2 GiB disk")
    ap.add_argument("--dirty", default="1,10", help="dirty percentages, comma separated (1,10)")
    ap.add_argument("--data-percent", type=int, default=50, help="allocated random data in the source (50)")
    ap.add_argument("--repeat", type=int, default=3, help="copies per case and kind; medians reported (3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verify", action="store_true",
                    help="qemu-img compare the first full copy of each case with the source")
    ap.add_argument("--tmpdir", default="/var/tmp", help="where the images go (/var/tmp)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    size = 2 * GiB if args.quick else args.size
    percents = [float(x) for x in args.dirty.split(",") if x.strip()]
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="bench-incremental-", dir=args.tmpdir))
    sockdir = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))
    try:
        image = work / "src.qcow2"
        print(f"creating the {fmt_bytes(size)} source ({args.data_percent}% random data) in {work} ...",
              flush=True)
        setup = make_source(image, size, args.data_percent, args.seed)
        print(f"  {setup:.1f} s", flush=True)
        cases: list[Case] = []
        with storage_daemon(image, sockdir) as qsd:
            for pct in percents:
                print(f"{pct:g}%: dirtying, then full and incremental copies ...", flush=True)
                c = run_case(qsd, work, size, pct, rng, args.verify, args.repeat)
                print(f"  dirtied {fmt_bytes(c.dirty_bytes)} in {c.dirty_runs} runs "
                      f"({c.dirty_seconds:.1f} s); "
                      f"full {c.full.seconds:.2f} s, incremental {c.incr.seconds:.2f} s", flush=True)
                cases.append(c)
        report(size, args.data_percent, setup, cases, args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "size": size, "data_percent": args.data_percent, "setup_seconds": setup,
                "repeat": args.repeat,
                "cases": [{"percent": c.percent, "dirty_bytes": c.dirty_bytes, "dirty_runs": c.dirty_runs,
                           "full": vars(c.full), "incremental": vars(c.incr)} for c in cases],
            }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
