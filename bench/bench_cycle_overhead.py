#!/usr/bin/env python3
"""Per-cycle workflow overhead of real replication cycles: cycle wall time - copy time.

    .venv/bin/python bench/bench_cycle_overhead.py               # 10 incremental cycles
    .venv/bin/python bench/bench_cycle_overhead.py --cycles 30 --rate 200 --interval 2

The same stack as tests/test_replication_e2e.py (tests/harness): the Temporal
dev server and one worker process (``transcend_stack``), a TCG test guest on
libvirt (qemu:///system) writing ``--rate`` records of 512 bytes per second to
its disk, and a protection of it into a local qcow2-chain KVM target with the
default policy (long RPO: cycles are driven with the ``sync_now`` update).
After the first (full) cycle, ``--cycles`` incremental cycles are run one
after the other, ``--interval`` seconds apart (the guest writes meanwhile).

Then ``Catalog.cycles()`` gives, per cycle, ``wall_seconds`` (CycleWorkflow
start → just before the catalog report: protection.view, cycle.start,
target.prepare, source.freeze, target.begin, stream.disk, verify.sample,
target.commit, source.release, retention.apply and the workflow tasks
between them) and ``copy_seconds`` (the span of the stream.disk activities as
the workflow sees it: scheduling → completion, NBD endpoint setup included).
Printed per cycle and as median / p95 (nearest rank) over the incremental
cycles: wall, copy, overhead = wall - copy, and overhead / wall.

Two more columns come from Temporal's history of each CycleWorkflow (read
after the run): ``stream`` = the seconds ``Stream.run()`` itself took (the
StreamResult of the stream.disk activity), and a table of the median time of
every activity type (scheduled → completed, and of that scheduled → started,
i.e. task-queue latency), so the overhead can be attributed.  ``client`` is
the time the benchmark waited for each ``sync_now`` (update sent → the
replication workflow's status shows the cycle finished; 0.5 s polling).

Everything (TRANSCEND_HOME, dev server database, guest disk, replicas) lives
in a temporary directory under /var/tmp that is removed at the end; the
domain is destroyed and undefined, the worker and dev server stopped, also on
failure or Ctrl-C.  The guest image cache (/var/cache/transcend-test-guest)
is reused, built on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.harness, transcend, temporal

from tests.harness.guest import BOOT_MARKER, ERROR_MARKER, build_guest, make_guest_disk  # noqa: E402
from tests.harness.libvirtd import (  # noqa: E402
    ensure_libvirtd,
    running_domain,
    stop_libvirtd,
    traversable,
    wait_for_console,
)
from tests.harness.procs import processes_mentioning  # noqa: E402
from tests.harness.protect import (  # noqa: E402
    add_kvm_platforms,
    protection_spec,
    start_protection,
    sync_now,
    wait_first_point,
)
from tests.harness.stack import Stack, transcend_stack  # noqa: E402
from transcend.api import CYCLE_WORKFLOW, StreamResult  # noqa: E402
from transcend.catalog import CycleRecord  # noqa: E402

BOOT_TIMEOUT = 300
PROTECTION = "bench"


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


@dataclass
class WorkflowTimes:
    started: float  # epoch seconds of WorkflowExecutionStarted
    stream_seconds: float  # sum of StreamResult.seconds (one per disk)
    activities: dict[str, list[tuple[float, float]]]  # type -> [(scheduled→started, scheduled→completed)]


async def cycle_histories(stack: Stack, protection: str) -> list[WorkflowTimes]:
    """Per CycleWorkflow of the protection (oldest first): Stream.run seconds and
    the activity timings, from Temporal's history."""
    client = await stack.client()
    out: list[WorkflowTimes] = []
    query = f'WorkflowType="{CYCLE_WORKFLOW}" AND TranscendProtection="{protection}"'
    async for wf in client.list_workflows(query):
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        sched: dict[int, tuple[str, float]] = {}
        started_at: dict[int, float] = {}
        acts: dict[str, list[tuple[float, float]]] = defaultdict(list)
        stream = 0.0
        t0 = 0.0
        for ev in history.events:
            t = ev.event_time.ToNanoseconds() / 1e9
            if ev.HasField("workflow_execution_started_event_attributes"):
                t0 = t
            elif ev.HasField("activity_task_scheduled_event_attributes"):
                sched[ev.event_id] = (ev.activity_task_scheduled_event_attributes.activity_type.name, t)
            elif ev.HasField("activity_task_started_event_attributes"):
                started_at[ev.activity_task_started_event_attributes.scheduled_event_id] = t
            elif ev.HasField("activity_task_completed_event_attributes"):
                a = ev.activity_task_completed_event_attributes
                name, ts = sched[a.scheduled_event_id]
                acts[name].append((started_at.get(a.scheduled_event_id, ts) - ts, t - ts))
                if name == "stream.disk":
                    (res,) = await client.data_converter.decode(a.result.payloads, [StreamResult])
                    stream += res.seconds
        out.append(WorkflowTimes(started=t0, stream_seconds=stream, activities=dict(acts)))
    out.sort(key=lambda w: w.started)
    return out


async def wait_histories(stack: Stack, n: int, timeout: float = 20.0) -> list[WorkflowTimes]:
    """cycle_histories, retried until it lists ``n`` workflows (visibility lags)."""
    deadline = time.monotonic() + timeout
    while True:
        h = await cycle_histories(stack, PROTECTION)
        if len(h) >= n or time.monotonic() > deadline:
            return h
        await asyncio.sleep(1.0)


async def run_cycles(
    stack: Stack, work: Path, args: argparse.Namespace
) -> tuple[list[CycleRecord], list[float]]:
    image = build_guest()
    vm = f"transcend-bench-{os.getpid()}"
    disk = make_guest_disk(work / "src.qcow2", rate=args.rate, progress_every=1000,
                           disk_size=args.disk_mib << 20, image=image)
    console = work / "console.log"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, work / "replicas")
    client = await stack.client()
    client_seconds: list[float] = []
    with running_domain(vm, disk, console) as dom:
        print(f"booting {vm} (TCG) ...", flush=True)
        wait_for_console(console, rf"^{BOOT_MARKER} seq=0", BOOT_TIMEOUT,
                         fail_pattern=rf"^{ERROR_MARKER}.*", domain=dom)
        t = time.monotonic()
        handle = await start_protection(client, protection_spec(PROTECTION, vm, src, dst))
        st = await wait_first_point(handle)
        if st.cycles_failed:
            raise RuntimeError(f"first cycle failed: {st.last_error}\n{stack.worker_log_tail()}")
        print(f"full cycle done in {time.monotonic() - t:.1f} s; {args.cycles} incremental cycles ...",
              flush=True)
        for i in range(args.cycles):
            await asyncio.sleep(args.interval)  # the guest writes between points
            t = time.monotonic()
            st = await sync_now(handle)
            client_seconds.append(time.monotonic() - t)
            if st.cycles_failed:
                raise RuntimeError(f"cycle {i + 1} failed: {st.last_error}\n{stack.worker_log_tail()}")
            print(f"  cycle {i + 1}/{args.cycles}: {client_seconds[-1]:.2f} s", flush=True)
        # nothing more may start while the domain and the stack go away
        try:
            await handle.terminate("benchmark done")
        except Exception as e:  # not fatal: the dev server is stopped anyway
            print(f"terminating the replication workflow: {e}", file=sys.stderr)
    cycles = [c for c in cat.cycles(PROTECTION) if c.status == "committed"]
    return cycles, client_seconds


def report(cycles: list[CycleRecord], client_seconds: list[float], histories: list[WorkflowTimes],
           args: argparse.Namespace) -> None:
    stream_by_index: list[float | None] = [None] * len(cycles)
    if len(histories) == len(cycles):  # both oldest first, one workflow per committed cycle
        stream_by_index = [h.stream_seconds for h in histories]
    client_by_index: list[float | None] = [None] * (len(cycles) - len(client_seconds)) + list(client_seconds)
    print()
    print(f"guest: {args.disk_mib} MiB disk, {args.rate:g} records/s x 512 B; {args.interval:g} s between "
          f"cycles; 1 worker + Temporal dev server (SQLite); seconds")
    hdr = (f"{'#':>3} {'kind':<12}{'read':>10}{'wall':>8}{'copy':>8}{'stream':>8}{'overhead':>10}"
           f"{'ovh/wall':>10}{'client':>8}")
    print(hdr)
    print("-" * len(hdr))
    for i, c in enumerate(cycles):
        o = c.wall_seconds - c.copy_seconds
        s = stream_by_index[i]
        cl = client_by_index[i]
        print(f"{i:>3} {c.kind:<12}{c.bytes_read / 1024:>8.0f}Ki{c.wall_seconds:>8.2f}{c.copy_seconds:>8.2f}"
              f"{'' if s is None else f'{s:.2f}':>8}{o:>10.2f}"
              f"{o / c.wall_seconds if c.wall_seconds else 0:>10.1%}"
              f"{'' if cl is None else f'{cl:.2f}':>8}")
    incr = [i for i, c in enumerate(cycles) if c.kind == "incremental"]
    if not incr:
        print("no incremental cycles")
        return
    wall = [cycles[i].wall_seconds for i in incr]
    copy = [cycles[i].copy_seconds for i in incr]
    ovh = [w - c for w, c in zip(wall, copy, strict=True)]
    frac = [o / w for o, w in zip(ovh, wall, strict=True) if w]
    rows: list[tuple[str, list[float], str]] = [
        ("wall", wall, "s"), ("copy", copy, "s"), ("overhead", ovh, "s"), ("overhead/wall", frac, "%"),
    ]
    streams = [s for i in incr if (s := stream_by_index[i]) is not None]
    if streams:
        rows.insert(2, ("Stream.run", streams, "s"))
    clients = [cl for i in incr if (cl := client_by_index[i]) is not None]
    if clients:
        rows.append(("client sync_now", clients, "s"))
    print()
    print(f"over {len(incr)} incremental cycles:{'median':>12}{'p95':>10}{'min':>10}{'max':>10}")
    for name, vals, unit in rows:
        f = (lambda v: f"{v:.1%}") if unit == "%" else (lambda v: f"{v:.2f}")
        print(f"  {name:<32}{f(statistics.median(vals)):>10}{f(p95(vals)):>10}{f(min(vals)):>10}"
              f"{f(max(vals)):>10}")
    if len(histories) == len(cycles):
        acts: dict[str, list[tuple[float, float]]] = defaultdict(list)
        order: list[str] = []
        for i in incr:
            for name, times in histories[i].activities.items():
                if name not in order:
                    order.append(name)
                acts[name].extend(times)
        print()
        print(f"activities of the incremental cycles (median s):{'queued':>9}{'total':>9}{'n':>5}")
        for name in order:
            q = statistics.median(t[0] for t in acts[name])
            tot = statistics.median(t[1] for t in acts[name])
            print(f"  {name:<45}{q:>9.3f}{tot:>9.3f}{len(acts[name]):>5}")
        print("  (queued = scheduled -> started; total = scheduled -> completed)")
    else:
        print(f"(history: {len(histories)} cycle workflows for {len(cycles)} committed cycles; "
              "per-activity table skipped)")


def stray_processes(marker: str) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (our work dir),
    libvirt's qemu excepted (running_domain destroys it through libvirt)."""
    return processes_mentioning(marker, exclude=("qemu-system",))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10, help="incremental cycles after the full one (10)")
    ap.add_argument("--rate", type=float, default=20.0, help="guest records/s of 512 B (20)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between cycles (1)")
    ap.add_argument("--disk-mib", type=int, default=256, help="guest disk size in MiB (256)")
    ap.add_argument("--tmpdir", default="/var/tmp")
    args = ap.parse_args()
    if args.cycles < 1:
        ap.error("--cycles must be >= 1")

    libvirtd = ensure_libvirtd()
    work = Path(tempfile.mkdtemp(prefix="bench-cycle-", dir=args.tmpdir))
    try:
        # traversable: the qemu user opens the guest disk and the replicas
        with traversable(work), transcend_stack(work / "home") as stack:
            try:
                cycles, client_seconds = asyncio.run(run_cycles(stack, work, args))
                histories = asyncio.run(wait_histories(stack, len(cycles)))
            except BaseException:
                print(stack.worker_log_tail(), file=sys.stderr)
                raise
        report(cycles, client_seconds, histories, args)
    finally:
        for pid in stray_processes(str(work)):  # children of the worker that outlived it
            print(f"stopping leftover process {pid}", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        for pid in stray_processes(str(work)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
        if libvirtd.started:
            stop_libvirtd(libvirtd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
