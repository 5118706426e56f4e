#!/usr/bin/env python3
"""What a small change costs on a large sparse disk, through the whole product.

    .venv/bin/python bench/bench_large_disk.py                   # 1 GiB and 1 TiB
    .venv/bin/python bench/bench_large_disk.py --sizes 1G,1T,16T --data 256M
    .venv/bin/python bench/bench_large_disk.py --quick           # 1 GiB and 64 GiB, 32 MiB of data

For each disk size, in one run with one dev server and one worker (tests/harness/
stack.py) on the local libvirt (tests/harness/drkit.py's KVM kit: a domain with one
blank qcow2 disk of that virtual size, no OS):

1. ``--data`` bytes of random data are written into the disk through QEMU (16 MiB
   runs spread over the disk), and the protection's first (full) point is taken;
2. one ``--change`` (128 KiB) write, then ``sync_now``: **cycle** is the wall time of
   that incremental cycle as the client sees it, **catalog** the bytes the catalog
   (SQLite file and its WAL) grew by during it;
3. ``VerifyPoint`` of the new point: **verify** its wall time and the bytes it read.

Printed per size, and as ratios to the first (smallest) size: the goal (issue #16) is
the 1 TiB cycle within 2x of the 1 GiB one and verify proportional to data, not to the
disk's size. Nothing is asserted; the point's bytes are checked by the verify itself
(it fails the run if they differ from the manifest). Everything lives under a
temporary directory in /var/tmp and is removed at the end, with the domains.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness.drkit import KvmKit  # noqa: E402
from tests.harness.libvirtd import ensure_libvirtd, traversable  # noqa: E402
from tests.harness.protect import (  # noqa: E402
    protection_spec,
    start_protection,
    sync_now,
    verify_point,
    wait_first_point,
)
from tests.harness.stack import transcend_stack  # noqa: E402

MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def catalog_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("catalog.sqlite*") if p.is_file())


async def measure(stack, kit: KvmKit, size: int, data: int, change: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    name = f"ld-{size >> 30}g-{os.getpid() % 10000}"
    vm = kit.make_vm(name, [size], model=False)
    runs = max(1, data // (16 * MiB))
    stride = size // runs
    for i in range(runs):
        kit.write(vm, 0, i * stride, os.urandom(min(16 * MiB, data)))
    client = await stack.client()
    handle = await start_protection(client, protection_spec(name, name, "src", "dst"))
    t0 = time.monotonic()
    st = await wait_first_point(handle, timeout=3600)
    full = time.monotonic() - t0
    assert st.cycles_failed == 0, st.last_error
    kit.write(vm, 0, size // 2 + 4096, os.urandom(change))
    before = catalog_bytes(stack.home)
    t0 = time.monotonic()
    st = await sync_now(handle, timeout=3600)
    cycle = time.monotonic() - t0
    grew = catalog_bytes(stack.home) - before
    assert st.cycles_failed == 0, st.last_error
    point = st.last_point_id or ""
    t0 = time.monotonic()
    result = await verify_point(client, point)
    verify = time.monotonic() - t0
    assert result.ok, result
    await handle.execute_update("remove")
    kit.remove_vm(name)
    return {"size": size, "full": full, "cycle": cycle, "catalog": grew, "verify": verify,
            "verify_read": sum(result.bytes_read.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1G,1T")
    ap.add_argument("--data", default="256M", help="data written into each disk first")
    ap.add_argument("--change", default="128K", help="the incremental change")
    ap.add_argument("--quick", action="store_true", help="1 GiB and 64 GiB, 32 MiB of data")
    ap.add_argument("--tmpdir", default="/var/tmp")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in ("1G,64G" if args.quick else args.sizes).split(",")]
    data = parse_size("32M" if args.quick else args.data)
    change = parse_size(args.change)
    ensure_libvirtd()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-large-", dir=args.tmpdir) as tmp:
        root = Path(tmp)
        with traversable(root), transcend_stack(root / "home") as stack:
            kit = KvmKit(root / "kit")
            try:
                cat = stack.catalog()
                kit.add_platform(cat, "src")
                kit.add_platform(cat, "dst")
                for size in sizes:
                    rows.append(asyncio.run(measure(stack, kit, size, data, change)))
            finally:
                kit.close()
    ref = rows[0]
    print(f"data {data / MiB:.0f} MiB per disk, change {change / 1024:.0f} KiB; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'disk':>8} {'full s':>8} {'cycle s':>8} {'catalog KiB':>12} {'verify s':>9} "
          f"{'verify read MiB':>16} {'cycle x':>8} {'verify x':>9}")
    for r in rows:
        print(f"{r['size'] / (1 << 30):>7.0f}G {r['full']:>8.1f} {r['cycle']:>8.2f} "
              f"{r['catalog'] / 1024:>12.0f} {r['verify']:>9.2f} {r['verify_read'] / MiB:>16.1f} "
              f"{r['cycle'] / ref['cycle']:>8.2f} {r['verify'] / ref['verify']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
