#!/usr/bin/env python3
"""AWS data path: the product's reads and writes through EBS direct against a plain
concurrent boto3 loop over the same local endpoint, in the same run.

    .venv/bin/python bench/bench_aws.py            # 512 MiB of data
    .venv/bin/python bench/bench_aws.py --quick    # 128 MiB
    .venv/bin/python bench/bench_aws.py --data 1GiB --repeat 3 --out bench/results/aws.json

Both sides talk to the test double (tests/harness/aws/: moto's EC2 and the EBS
direct model, one local process), so the numbers measure the product's overhead on
top of the API calls, not AWS: the model's own cost is in both sides alike.

* **read**: an instance whose volume holds ``--data`` random bytes; the product
  freezes it (``CreateSnapshots``), serves the snapshot through nbdkit's Python
  plugin (connectors/common/blockapi.py) and blockstream copies it, hashing every
  block, into ``nbdkit null``. The loop: ``ListSnapshotBlocks`` then
  ``GetSnapshotBlock`` of every block on ``--connections`` threads, each checksum
  checked.
* **write**: blockstream copies the same data from a qemu-nbd export of a raw file
  into the AWS target's staging (``StartSnapshot``, ``PutSnapshotBlock``) and the
  point is committed (``CompleteSnapshot``). The loop: ``StartSnapshot``, every block
  put on ``--connections`` threads with its checksum, ``CompleteSnapshot``.

Each row prints MiB/s of data, the ratio product/loop (the goal is >= 0.80 each way)
and the peak RSS of the nbdkit process serving the disk (the worker's memory per disk
stream). Every run is checked: the copy's bytes equal the data (read: the manifest
equals the data's block hashes; write: the committed snapshot read back through boto3).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blockstream
from connectors.registry import source_for, target_for
from tests.harness.aws import aws_sim
from tests.harness.conformance import aws_platform
from tests.harness.nbd import nbdkit, qemu_nbd
from transcend.models import ChangeKind, DiskInfo, FreezeOptions, PointMeta

BLOCK = 524288
MiB = 1 << 20
GiB = 1 << 30


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    t = text.lower().removesuffix("ib").removesuffix("b")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class Peak:
    """Peak RSS (VmHWM) of the nbdkit processes serving a directory, sampled."""

    def __init__(self, marker: str) -> None:
        self.marker, self.peak_kib, self._stop = marker, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Peak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"nbdkit" not in cmd or self.marker.encode() not in cmd:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                except OSError:
                    continue


def product_read(sim: Any, tmp: Path, instance: str, size: int, data: bytes,
                 cycle: str, connections: int) -> tuple[float, int]:
    src = source_for(*aws_platform(sim, "bench", tmp))
    wl = src.workload(instance)
    frozen = src.freeze("bench", cycle, [wl], {}, FreezeOptions())
    disk = wl.disks[0].id
    try:
        cs = frozen.changes(disk)
        extents = [blockstream.Extent(e.offset, e.length, zero=e.zero) for e in cs.extents]
        ep = frozen.export(disk)
        manifest = blockstream.zero_manifest(size, BLOCK, "xxh128")
        with nbdkit("null", f"size={size}") as null, Peak("tblk-") as peak:
            t0 = time.perf_counter()
            blockstream.Stream(ep.uri, null.uri, extents, disk_size=size, manifest=manifest, block_size=BLOCK,
                               connections=4, hash="xxh128").run()
            elapsed = time.perf_counter() - t0
        expected = blockstream.hash_blocks(data, BLOCK, "xxh128")
        if bytes(manifest)[:len(expected)] != bytes(expected):
            raise SystemExit("read check failed: the manifest differs from the data's hashes")
        return elapsed, peak.peak_kib
    finally:
        frozen.close()
        frozen.release(committed=False)


def loop_read(sim: Any, snapshot: str, data: bytes, connections: int) -> float:
    ebs = sim.client("ebs")
    t0 = time.perf_counter()
    tokens: dict[int, str] = {}
    kwargs: dict[str, Any] = {"SnapshotId": snapshot, "MaxResults": 10000}
    while True:
        page = ebs.list_snapshot_blocks(**kwargs)
        tokens.update({b["BlockIndex"]: b["BlockToken"] for b in page.get("Blocks", [])})
        if not page.get("NextToken"):
            break
        kwargs["NextToken"] = page["NextToken"]

    def get(item: tuple[int, str]) -> None:
        index, token = item
        r = ebs.get_snapshot_block(SnapshotId=snapshot, BlockIndex=index, BlockToken=token)
        body = r["BlockData"].read()
        if b64sha(body) != r["Checksum"] or body != data[index * BLOCK:(index + 1) * BLOCK]:
            raise SystemExit(f"loop read check failed at block {index}")

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(get, sorted(tokens.items())))
    return time.perf_counter() - t0


def product_write(sim: Any, tmp: Path, raw: Path, size: int, data: bytes, cycle: str,
                  connections: int) -> tuple[float, int]:
    target = target_for(*aws_platform(sim, "bench", tmp))
    disk = DiskInfo(id="vda", size=size)
    with qemu_nbd(raw, fmt="raw", read_only=True) as src:
        t0 = time.perf_counter()
        staging = target.begin("bench", cycle, [disk], None)
        with Peak("tblk-") as peak:
            ep = staging.endpoint("vda")
            extents = [blockstream.Extent(0, len(data))]
            blockstream.Stream(src.uri, ep.uri, extents, disk_size=size, connections=4,
                               hash="xxh128", block_size=BLOCK,
                               manifest=blockstream.zero_manifest(size, BLOCK, "xxh128")).run()
            staging.close()
        locations = staging.commit(PointMeta(cycle_id=cycle, instant=datetime.now(UTC),
                                             block_size=BLOCK, kind=ChangeKind.FULL))
        elapsed = time.perf_counter() - t0
    if sim.read_snapshot(locations[0], len(data)) != data:
        raise SystemExit("write check failed: the committed snapshot differs from the data")
    sim.client("ec2").delete_snapshot(SnapshotId=locations[0])
    return elapsed, peak.peak_kib


def loop_write(sim: Any, size: int, data: bytes, connections: int) -> float:
    ebs = sim.client("ebs")
    t0 = time.perf_counter()
    snap = ebs.start_snapshot(VolumeSize=max(1, -(-size // GiB)))["SnapshotId"]
    sums: dict[int, str] = {}

    def put(index: int) -> None:
        block = data[index * BLOCK:(index + 1) * BLOCK]
        sums[index] = b64sha(block)
        ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=index, BlockData=block,
                               DataLength=BLOCK, Checksum=sums[index], ChecksumAlgorithm="SHA256")

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(put, range(len(data) // BLOCK)))
    agg = hashlib.sha256(b"".join(base64.b64decode(sums[i]) for i in sorted(sums))).digest()
    ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=len(sums),
                          Checksum=base64.b64encode(agg).decode(), ChecksumAlgorithm="SHA256",
                          ChecksumAggregationMethod="LINEAR")
    elapsed = time.perf_counter() - t0
    sim.client("ec2").delete_snapshot(SnapshotId=snap)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="512MiB")
    ap.add_argument("--quick", action="store_true", help="128 MiB, one repetition")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16, help="requests in flight (both sides)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    data_size = parse_size("128MiB" if args.quick else args.data)
    repeat = 1 if args.quick else args.repeat
    data = os.urandom(data_size - data_size % BLOCK)
    size = -(-len(data) // GiB) * GiB
    rows: dict[str, list[float]] = {"read product": [], "read loop": [], "write product": [],
                                    "write loop": []}
    rss: dict[str, int] = {"read": 0, "write": 0}
    with tempfile.TemporaryDirectory(prefix="bench-aws-", dir="/var/tmp") as d:
        tmp = Path(d)
        raw = tmp / "data.raw"
        with open(raw, "wb") as f:
            f.write(data)
            f.truncate(size)
        with aws_sim(tmp / "sim") as sim:
            instance = sim.make_instance("bench", volume_gib=[size // GiB])
            vol = sim.volume_ids(instance)[0]
            sim.write(vol, 0, data)
            ec2 = sim.client("ec2")
            snap = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
            sim.wait_snapshot(snap)
            for i in range(repeat + 1):  # the first round warms up, uncounted
                t_read, kib_r = product_read(sim, tmp, instance, size, data, f"r{i}", args.connections)
                t_loop = loop_read(sim, snap, data, args.connections)
                t_write, kib_w = product_write(sim, tmp, raw, size, data, f"w{i}", args.connections)
                t_wloop = loop_write(sim, size, data, args.connections)
                if i:
                    rows["read product"].append(t_read)
                    rows["read loop"].append(t_loop)
                    rows["write product"].append(t_write)
                    rows["write loop"].append(t_wloop)
                rss["read"], rss["write"] = max(rss["read"], kib_r), max(rss["write"], kib_w)
                print(f"round {i}{' (warm-up)' if not i else ''}: read {t_read:.2f}s vs "
                      f"{t_loop:.2f}s, write {t_write:.2f}s vs {t_wloop:.2f}s", flush=True)
            ec2.delete_snapshot(SnapshotId=snap)
    mib = len(data) / MiB
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "cpus": os.cpu_count(), "data_bytes": len(data), "repeat": repeat,
        "connections": args.connections, "seconds": rows,
        "mib_s": {k: mib / v for k, v in med.items()},
        "ratio_read": med["read loop"] / med["read product"],
        "ratio_write": med["write loop"] / med["write product"],
        "nbdkit_peak_rss_mib": {k: v / 1024 for k, v in rss.items()},
    }
    print(f"\n{mib:.0f} MiB of data, {args.connections} requests in flight, median of {repeat}")
    print(f"{'':14}{'product MiB/s':>14}{'loop MiB/s':>12}{'ratio':>8}{'nbdkit RSS':>12}")
    for way in ("read", "write"):
        print(f"{way:14}{result['mib_s'][way + ' product']:14.1f}{result['mib_s'][way + ' loop']:12.1f}"
              f"{result['ratio_' + way]:8.2f}{rss[way] / 1024:10.0f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
