#!/usr/bin/env python3
"""Scale: N protections on their RPO schedules against the Temporal dev server and
ONE worker; schedule lag, cycles done, worker and dev server CPU and memory, and
how they grow with N.

    .venv/bin/python bench/bench_scale.py --quick      # counts 20,50; RPO 60 s; 120 s each, ~6 min
    .venv/bin/python bench/bench_scale.py --counts 100,300,1000 --rpo 300 --duration 600 \\
        --out bench/results/scale.json

Per count N, from scratch: a fresh ``temporal server start-dev`` (SQLite) and one
worker process (tests/harness/stack.py), the worker loading the synthetic
connector plugin (``TRANSCEND_PLUGINS=tests.harness.synthetic``), and two
``nbdkit file dir=`` servers for the synthetic source snapshots and target
exports (tests/harness/synthetic.py: 4 MiB disks, 256 KiB of data, 2 blocks of
64 KiB written per cycle; every cycle goes through blockstream between real NBD
endpoints, verify.sample, commit, release and retention as for KVM).

1. **Onboarding**: N protections (``vm-NNNNN`` → replica, RPO ``--rpo``, retention
   "all 1h") are started as Replication workflows through a Temporal client, the
   way other systems do (docs/workflow-api.md; ``--create-concurrency`` at a
   time). Each registers, creates its Schedule ``rpo/<p>`` and runs its full first
   cycle. Reported: seconds until every protection has its first point.
2. **Measurement window** of ``--duration`` seconds from then on: the Schedules
   start Cycle workflows at their interval (``max(10, rpo - p95 cycle time)``,
   i.e. the RPO at first), each at its own offset within the interval (a hash of
   the protection's name, activities/protection.py ``schedule_offset``), so the N
   cycles of one interval are spread over it rather than due in one burst. Then up
   to ``--grace`` seconds for the cycles due in the window to finish.
3. **Results** from Temporal's visibility (every Cycle workflow whose *due* time,
   the scheduler's ``TemporalScheduledStartTime`` / the time suffix Temporal puts
   in the workflow id, lies in the window):

   * schedule lag = workflow start - due (the dev server's scheduler, including
     BUFFER_ONE waiting for a previous cycle of the same protection);
   * pickup lag = the ``cycle.start`` activity's time (CycleRecord.started_at in
     the catalog) - due: when the worker actually began the cycle;
   * cycle time = workflow close - start; "drain" = per tick, the last cycle's
     close - due (how long one burst of N cycles takes);
   * cycles due (from each Schedule's interval and offset, read in one paginated
     listing of the Schedules), started, completed, failed, and the skipped-overlap
     / missed-catch-up-window counters of ``--describe`` Schedules spread over all
     (describing 1,000 one by one overloads the dev server);
   * CPU from /proc, sampled every ``--sample`` s over the window: the worker
     process, the dev server process (and their children), the two nbdkit
     servers, the whole machine (shared: other sessions' load is in it) and the
     load average; CPU % is of one core; RSS of the dev server and the worker at
     the end and the maximum; CPU seconds per completed cycle.

   p50/p95 are nearest-rank. Growth = value at the largest count / value at the
   smallest.
4. **Correctness**: for ``--check`` protections (spread over all), the newest
   point's image file hashes (SHA-256) equal the synthetic source's content at the
   generation its checkpoint names (``synthetic.expected_image``); for
   ``--verify`` of them the VerifyPoint workflow re-reads the point through the
   target's NBD export and compares every block with the catalog's manifest. Any
   mismatch fails the run (exit 1).

Output: a table per count and a growth table; ``--out FILE`` writes everything
as JSON. Each count uses a temporary directory in ``--tmpdir`` (/var/tmp) that is
removed at the end; the worker, dev server and nbdkit servers are stopped, also on
failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.harness, transcend, temporal

from temporalio.client import Client, WorkflowExecutionStatus  # noqa: E402
from temporalio.common import SearchAttributeKey  # noqa: E402

from tests.harness import synthetic  # noqa: E402
from tests.harness.procs import processes_mentioning  # noqa: E402
from tests.harness.protect import protection_spec, start_protection, verify_point  # noqa: E402
from tests.harness.stack import Stack, transcend_stack  # noqa: E402
from transcend.api import CYCLE_WORKFLOW, schedule_id  # noqa: E402
from transcend.catalog import Catalog, NotFoundError  # noqa: E402
from transcend.models import PlatformKind, PlatformSpec  # noqa: E402

PLUGIN = "tests.harness.synthetic"
SCHEDULED_AT = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")
CLK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


# --------------------------------------------------------------------------- /proc sampling


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out[ppid].append(int(d.name))
    return out


def tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_rss(pids: list[int]) -> tuple[float, int]:
    """CPU seconds (user+system, reaped children included) and RSS bytes of ``pids``."""
    cpu, rss = 0.0, 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(x) for x in f[11:15]) / CLK
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(f[:8])
    idle = f[3] + f[4]
    return (total - idle) / CLK, total / CLK


@dataclass
class Sample:
    t: float
    cpu: dict[str, float]
    rss: dict[str, int]
    machine_busy: float
    machine_total: float
    load1: float


class Sampler:
    """Samples CPU and RSS of named process trees every ``every`` seconds in a thread."""

    def __init__(self, roles: dict[str, list[int]], every: float) -> None:
        self.roles, self.every = roles, every
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> Sample:
        ch = _children()
        cpu, rss = {}, {}
        for role, pids in self.roles.items():
            all_pids = [q for p in pids for q in tree(p, ch)]
            cpu[role], rss[role] = cpu_rss(all_pids)
        busy, total = machine_cpu()
        return Sample(time.time(), cpu, rss, busy, total, os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.every)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        inside = [s for s in self.samples if t0 <= s.t <= t1 + self.every]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        wall = b.t - a.t
        out: dict[str, Any] = {"seconds": wall}
        for role in self.roles:
            cpu = b.cpu[role] - a.cpu[role]
            out[role] = {
                "cpu_seconds": cpu,
                "cpu_percent": 100 * cpu / wall if wall else 0.0,
                "rss_end": b.rss[role],
                "rss_max": max(s.rss[role] for s in inside),
            }
        ncpu = os.cpu_count() or 1
        out["machine"] = {
            "busy_percent_of_all_cores": 100 * (b.machine_busy - a.machine_busy)
            / max(1e-9, b.machine_total - a.machine_total),
            "cores": ncpu,
            "load1_max": max(s.load1 for s in inside),
            "load1_mean": statistics.fmean(s.load1 for s in inside),
        }
        return out


# --------------------------------------------------------------------------- one count


@dataclass
class CycleRow:
    protection: str
    due: float
    started: float
    closed: float | None
    status: str
    run_id: str
    picked: float | None = None


@dataclass
class CountResult:
    count: int
    rpo: int
    duration: float
    onboarding_seconds: float
    onboarded: int
    window: tuple[float, float]
    intervals: dict[str, int] = field(default_factory=dict)
    due: int = 0
    started: int = 0
    completed: int = 0
    failed: int = 0
    running_at_end: int = 0
    skipped_overlap: int = 0
    missed_catchup: int = 0
    describe_failed: int = 0  # Schedules missing from the listing
    described: int = 0  # Schedules whose counters were read
    schedule_lag: dict[str, float | None] = field(default_factory=dict)
    pickup_lag: dict[str, float | None] = field(default_factory=dict)
    cycle_seconds: dict[str, float | None] = field(default_factory=dict)
    drain_seconds: list[float] = field(default_factory=list)
    completed_per_second: float = 0.0
    resources: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)


def stats(values: list[float]) -> dict[str, float | None]:
    return {"n": float(len(values)), "p50": pct(values, 0.5), "p95": pct(values, 0.95),
            "max": max(values) if values else None}


def due_time(wf_id: str, attrs: Any) -> float | None:
    """The scheduled (due) time of a workflow started by a Schedule."""
    with contextlib.suppress(Exception):
        v = attrs.get(SCHEDULED_AT)
        if v is not None:
            return float(v.timestamp())
    # Temporal appends "-<RFC 3339 scheduled time>" to the action's workflow id
    tail = wf_id[-20:]
    with contextlib.suppress(ValueError):
        return datetime.strptime(tail, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    return None


async def gather_limited(n: int, coros: list[Any]) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


def _has_point(cat: Catalog, protection: str) -> bool:
    try:
        return cat.latest_point(protection) is not None
    except NotFoundError:  # not registered yet
        return False


def _with_points(cat: Catalog, names: list[str]) -> set[str]:
    return {p for p in names if _has_point(cat, p)}


async def onboard(client: Client, cat: Catalog, names: list[str], args: argparse.Namespace) -> float:
    t0 = time.monotonic()
    specs = [protection_spec(p, f"vm-{p.removeprefix('p-')}", "syn-src", "syn-dst", rpo=args.rpo,
                             retention="all 1h") for p in names]
    await gather_limited(args.create_concurrency, [start_protection(client, s) for s in specs])
    print(f"  {len(names)} Replication workflows started in {time.monotonic() - t0:.1f} s", flush=True)
    waiting = set(names)
    deadline = time.monotonic() + args.onboard_timeout
    last_print = 0.0
    while waiting and time.monotonic() < deadline:
        await asyncio.sleep(3)
        done = await asyncio.to_thread(_with_points, cat, list(waiting))
        waiting -= done
        if time.monotonic() - last_print > 15:
            last_print = time.monotonic()
            print(f"  onboarding: {len(names) - len(waiting)}/{len(names)} have a first point "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    if waiting:
        print(f"  {len(waiting)} protections have no first point after {args.onboard_timeout} s",
              file=sys.stderr)
    return time.monotonic() - t0


async def list_cycles(client: Client, running_only: bool = False) -> list[CycleRow]:
    rows = []
    query = f'WorkflowType="{CYCLE_WORKFLOW}"' + (' AND ExecutionStatus="Running"' if running_only else "")
    async for wf in client.list_workflows(query, page_size=1000):
        due = due_time(wf.id, wf.typed_search_attributes)
        if due is None or not wf.id.startswith("cycle/"):
            continue
        protection = wf.id.removeprefix("cycle/")[:-21]
        rows.append(CycleRow(
            protection=protection, due=due, started=wf.start_time.timestamp(),
            closed=wf.close_time.timestamp() if wf.close_time else None,
            status=wf.status.name if wf.status else "UNKNOWN", run_id=wf.run_id,
        ))
    return rows


async def wait_idle(client: Client, t_end: float, grace: float) -> None:
    """Until no Cycle due before ``t_end`` is still running (or ``grace`` s passed)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            listed = await list_cycles(client, running_only=True)
        except Exception as e:  # an overloaded dev server times out: try again
            print(f"  listing cycles: {e}", file=sys.stderr)
            await asyncio.sleep(5)
            continue
        running = [r for r in listed if r.status == WorkflowExecutionStatus.RUNNING.name and r.due < t_end]
        if not running:
            return
        await asyncio.sleep(5)


async def retried(what: str, fn: Any, attempts: int = 5) -> Any:
    """An RPC against a dev server that may still be overloaded: retried with back-off."""
    for i in range(attempts):
        try:
            return await fn()
        except Exception as e:
            if i == attempts - 1:
                raise
            print(f"  {what}: {e}; retrying", file=sys.stderr)
            await asyncio.sleep(5 * (i + 1))
    raise AssertionError("unreachable")


async def schedule_intervals(client: Client, names: list[str], rpo: int
                             ) -> tuple[dict[str, tuple[int, int]], int]:
    """Per protection its Schedule's (interval, offset), from ONE paginated listing.

    Describing 1,000 Schedules one by one against a busy dev server fails ("consistent
    query buffer is full"); the listing carries each spec. A Schedule missing from the
    listing counts with the RPO as interval and offset 0 (returned: how many)."""
    wanted = {schedule_id(p): p for p in names}
    got: dict[str, tuple[int, int]] = {}

    async def listing() -> None:
        async for s in await client.list_schedules(page_size=500, rpc_timeout=timedelta(seconds=60)):
            p = wanted.get(s.id)
            if p is None or s.schedule is None or not s.schedule.spec.intervals:
                continue
            iv = s.schedule.spec.intervals[0]
            got[p] = (int(iv.every.total_seconds()), int(iv.offset.total_seconds()) if iv.offset else 0)

    await retried("listing schedules", listing)
    missing = [p for p in names if p not in got]
    for p in missing:
        got[p] = (rpo, 0)
    return got, len(missing)


async def schedule_counters(client: Client, names: list[str], sample: int) -> dict[str, int]:
    """Skipped-overlap and missed-catch-up-window counters of ``sample`` Schedules spread
    over all, described one at a time (the counters are not in the listing)."""
    n = min(sample, len(names))
    picks = [names[round(i * (len(names) - 1) / max(1, n - 1))] for i in range(n)] if n else []
    out = {"described": 0, "skipped_overlap": 0, "missed_catchup": 0}
    for p in picks:
        try:
            d = await retried(f"describe {p}", lambda p=p: client.get_schedule_handle(
                schedule_id(p)).describe(rpc_timeout=timedelta(seconds=30)), attempts=3)
        except Exception:
            continue
        out["described"] += 1
        out["skipped_overlap"] += d.info.num_actions_skipped_overlap
        out["missed_catchup"] += d.info.num_actions_missed_catchup_window
    return out


def ticks(t0: float, t1: float, every: int, offset: int) -> int:
    """How many times k*every + offset lie in [t0, t1)."""
    return max(0, math.ceil((t1 - offset) / every) - math.ceil((t0 - offset) / every))


def pickup_times(cat: Catalog, names: list[str], since: datetime) -> dict[tuple[str, str], float]:
    """(protection, last 8 hex of the run id) -> CycleRecord.started_at (cycle.start ran)."""
    out = {}
    for p in names:
        for c in cat.cycles(p, since=since, limit=100_000):
            out[(p, c.cycle_id.rsplit("-", 1)[-1])] = c.started_at.timestamp()
    return out


async def check_points(client: Client, cat: Catalog, names: list[str], src_cfg: dict[str, Any],
                       args: argparse.Namespace) -> dict[str, Any]:
    n = min(args.check, len(names))
    picks = [names[round(i * (len(names) - 1) / max(1, n - 1))] for i in range(n)] if n else []
    bad, checked, gens = [], 0, []
    for p in picks:
        point = cat.latest_point(p)
        if point is None:
            bad.append(f"{p}: no point")
            continue
        gen = int(cat.checkpoints(p)["vda"].token.removeprefix("gen-"))
        gens.append(gen)
        vm = f"vm-{p.removeprefix('p-')}"
        data = Path(point.disks[0].location).read_bytes()
        want = synthetic.expected_image(vm, gen, src_cfg)
        if hashlib.sha256(data).digest() != hashlib.sha256(want).digest():
            bad.append(f"{p}: point {point.id} differs from {vm} at generation {gen}")
        checked += 1
    verified = 0
    for p in picks[: args.verify]:
        point = cat.latest_point(p)
        if point is None:
            continue
        try:
            res = await verify_point(client, point.id)
            verified += 1
            if getattr(res, "mismatches", None):
                bad.append(f"{p}: VerifyPoint {point.id}: {res}")
        except Exception as e:  # a failed verification raises
            bad.append(f"{p}: VerifyPoint {point.id} failed: {e}")
    return {"hash_checked": checked, "generations": gens, "verify_point": verified, "errors": bad}


async def run_count(stack: Stack, srv: synthetic.SyntheticServers, n: int, args: argparse.Namespace,
                    roles: dict[str, list[int]]) -> CountResult:
    cat = stack.catalog()
    src_cfg = srv.source_config()
    cat.add_platform(PlatformSpec(name="syn-src", kind=PlatformKind.SYNTHETIC, config=src_cfg))
    cat.add_platform(PlatformSpec(name="syn-dst", kind=PlatformKind.SYNTHETIC, config=srv.target_config()))
    client = await stack.client()
    names = [f"p-{i:05d}" for i in range(n)]
    sampler = Sampler(roles, args.sample).start()
    try:
        print(f"N={n}: onboarding ...", flush=True)
        onboarding = await onboard(client, cat, names, args)
        onboarded = len(_with_points(cat, names))
        t0 = time.time()
        print(f"N={n}: {onboarded} onboarded in {onboarding:.0f} s; measuring {args.duration:.0f} s "
              f"(RPO {args.rpo} s) ...", flush=True)
        await asyncio.sleep(args.duration)
        t1 = time.time()
        print(f"N={n}: window over; waiting up to {args.grace:.0f} s for the cycles due in it ...",
              flush=True)
        await wait_idle(client, t1, args.grace)
        t_idle = time.time()
    finally:
        sampler.stop()
    res = CountResult(count=n, rpo=args.rpo, duration=t1 - t0, onboarding_seconds=onboarding,
                      onboarded=onboarded, window=(t0, t1))
    res.resources = sampler.window(t0, t1)
    res.resources["after_window"] = sampler.window(t1, t_idle)
    rows = [r for r in await retried("listing cycles", lambda: list_cycles(client)) if t0 <= r.due < t1]
    intervals, res.describe_failed = await schedule_intervals(client, names, args.rpo)
    counters = await schedule_counters(client, names, args.describe)
    res.skipped_overlap, res.missed_catchup = counters["skipped_overlap"], counters["missed_catchup"]
    res.described = counters["described"]
    res.intervals = {str(k): v for k, v in sorted(
        {e: sum(1 for x in intervals.values() if x[0] == e) for e, _ in intervals.values()}.items())}
    res.due = sum(ticks(t0, t1, every, off) for every, off in intervals.values())
    picked = await asyncio.to_thread(pickup_times, cat, names, datetime.fromtimestamp(t0 - args.rpo, UTC))
    for r in rows:
        r.picked = picked.get((r.protection, r.run_id.replace("-", "")[-8:]))
    res.started = len(rows)
    res.completed = sum(1 for r in rows if r.status == "COMPLETED")
    res.failed = sum(1 for r in rows if r.status not in ("COMPLETED", "RUNNING"))
    res.running_at_end = sum(1 for r in rows if r.status == "RUNNING")
    res.schedule_lag = stats([r.started - r.due for r in rows])
    res.pickup_lag = stats([r.picked - r.due for r in rows if r.picked is not None])
    res.cycle_seconds = stats([r.closed - r.started for r in rows if r.closed and r.status == "COMPLETED"])
    by_tick: dict[float, list[CycleRow]] = defaultdict(list)
    for r in rows:
        by_tick[r.due].append(r)
    res.drain_seconds = [max(r.closed for r in rs if r.closed) - due
                         for due, rs in sorted(by_tick.items())
                         if len(rs) >= max(2, n // 2) and all(r.closed for r in rs)]
    res.completed_per_second = res.completed / res.duration if res.duration else 0.0
    try:
        res.check = await check_points(client, cat, names, src_cfg, args)
    except Exception as e:
        res.check = {"errors": [f"checking points failed: {e!r}"]}
    return res


# --------------------------------------------------------------------------- report


def _f(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / (1 << 20):.0f} MiB"


def report_count(r: CountResult) -> None:
    print()
    w = r.resources
    print(f"N={r.count}  RPO {r.rpo} s, window {r.duration:.0f} s, schedule intervals {r.intervals}; "
          f"onboarding {r.onboarding_seconds:.0f} s ({r.onboarded}/{r.count})")
    print(f"  cycles: due {r.due}, started {r.started}, completed {r.completed}, failed {r.failed}, "
          f"still running {r.running_at_end}; of {r.described} Schedules described, skipped(overlap) "
          f"{r.skipped_overlap}, missed(catch-up window) {r.missed_catchup}"
          f"{f' ({r.describe_failed} not in the listing)' if r.describe_failed else ''}; "
          f"{r.completed_per_second:.2f} cycles/s")
    for name, s in (("schedule lag (start - due)", r.schedule_lag),
                    ("pickup lag (cycle.start - due)", r.pickup_lag),
                    ("cycle time (close - start)", r.cycle_seconds)):
        print(f"  {name:<32} p50 {_f(s.get('p50'), ' s'):>10}  p95 {_f(s.get('p95'), ' s'):>10}  "
              f"max {_f(s.get('max'), ' s'):>10}")
    if r.drain_seconds:
        print(f"  burst drain per tick (last close - due): "
              f"{', '.join(f'{d:.0f}' for d in r.drain_seconds)} s")
    for role in ("worker", "server", "nbdkit"):
        x = w.get(role)
        if x:
            per = x["cpu_seconds"] / r.completed if r.completed else None
            print(f"  {role:<8} CPU {x['cpu_seconds']:8.1f} s = {x['cpu_percent']:5.1f} % of a core"
                  f"   RSS end {_mib(x['rss_end'])}, max {_mib(x['rss_max'])}"
                  f"   CPU per cycle {_f(per, ' s')}")
    m = w.get("machine")
    if m:
        print(f"  machine  {m['busy_percent_of_all_cores']:.0f} % of {m['cores']} cores busy (all "
              f"processes), load1 mean {m['load1_mean']:.1f} max {m['load1_max']:.1f}")
    c = r.check
    print(f"  check: {c.get('hash_checked')} points hash-equal to the source "
          f"(generations {c.get('generations')}), {c.get('verify_point')} VerifyPoint; "
          f"errors: {c.get('errors') or 'none'}")
    print(flush=True)


def report(results: list[CountResult]) -> dict[str, Any]:
    growth: dict[str, Any] = {}
    if len(results) >= 2:
        a, b = results[0], results[-1]

        def ratio(x: float | None, y: float | None) -> float | None:
            return None if x is None or y is None or x == 0 else y / x

        def res(r: CountResult, role: str, key: str) -> float | None:
            v = r.resources.get(role, {}).get(key)
            return None if v is None else float(v)

        def per_cycle(r: CountResult, role: str) -> float | None:
            v = res(r, role, "cpu_seconds")
            return None if v is None or not r.completed else v / r.completed

        rows = {
            "protections": ratio(a.count, b.count),
            "schedule lag p50": ratio(a.schedule_lag.get("p50"), b.schedule_lag.get("p50")),
            "schedule lag p95": ratio(a.schedule_lag.get("p95"), b.schedule_lag.get("p95")),
            "pickup lag p50": ratio(a.pickup_lag.get("p50"), b.pickup_lag.get("p50")),
            "pickup lag p95": ratio(a.pickup_lag.get("p95"), b.pickup_lag.get("p95")),
            "cycles completed/s": ratio(a.completed_per_second, b.completed_per_second),
            "worker CPU %": ratio(res(a, "worker", "cpu_percent"), res(b, "worker", "cpu_percent")),
            "worker CPU s per cycle": ratio(per_cycle(a, "worker"), per_cycle(b, "worker")),
            "server CPU %": ratio(res(a, "server", "cpu_percent"), res(b, "server", "cpu_percent")),
            "server CPU s per cycle": ratio(per_cycle(a, "server"), per_cycle(b, "server")),
            "server RSS max": ratio(res(a, "server", "rss_max"), res(b, "server", "rss_max")),
            "worker RSS max": ratio(res(a, "worker", "rss_max"), res(b, "worker", "rss_max")),
        }
        growth = {k: v for k, v in rows.items()}
        print(f"growth N={a.count} -> N={b.count} (value at {b.count} / value at {a.count}):")
        for k, v in rows.items():
            print(f"  {k:<26} {'-' if v is None else f'{v:.2f}x'}")
    return growth


# --------------------------------------------------------------------------- main


def stray_processes(marker: str) -> list[int]:
    return processes_mentioning(marker)


def one_count(n: int, args: argparse.Namespace) -> CountResult:
    work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-", dir=args.tmpdir))
    try:
        with synthetic.synthetic_servers(work / "data") as srv, \
                transcend_stack(work / "home", workers=0) as stack:
            stack.env["TRANSCEND_PLUGINS"] = PLUGIN
            worker = stack.start_worker()
            roles = {"worker": [worker.pid], "server": [stack.server.process.pid],
                     "nbdkit": list(srv.pids)}
            try:
                return asyncio.run(run_count(stack, srv, n, args, roles))
            except BaseException:
                print(stack.worker_log_tail(), file=sys.stderr)
                raise
            finally:
                stack.kill_workers(signal.SIGKILL)  # measured; no graceful drain of 1,000 cycles
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = stray_processes(str(work))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if pids:
                time.sleep(0.5)
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="100,300,1000",
                    help="protection counts, smallest first (100,300,1000)")
    ap.add_argument("--rpo", type=int, default=300, help="RPO of every protection in seconds (300)")
    ap.add_argument("--duration", type=float, default=600, help="measurement window per count, s (600)")
    ap.add_argument("--grace", type=float, help="wait for cycles due in the window, s (default: the RPO)")
    ap.add_argument("--quick", action="store_true", help="counts 20,50, RPO 60 s, 120 s windows (~6 min)")
    ap.add_argument("--create-concurrency", type=int, default=32, help="protections started at once (32)")
    ap.add_argument("--onboard-timeout", type=float, default=3600, help="max s until all have a point")
    ap.add_argument("--sample", type=float, default=2.0, help="/proc sampling period, s (2)")
    ap.add_argument("--check", type=int, default=20, help="protections whose newest point is hashed (20)")
    ap.add_argument("--describe", type=int, default=20,
                    help="Schedules described for their skipped/missed counters (20)")
    ap.add_argument("--verify", type=int, default=3, help="of those, VerifyPoint workflows (3)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--tmpdir", default="/var/tmp")
    args = ap.parse_args()
    if args.quick:
        args.counts, args.rpo, args.duration = "20,50", 60, 120
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if args.grace is None:
        args.grace = max(60.0, float(args.rpo))
    # SIGTERM like Ctrl-C: the finally blocks stop every process and remove the temp dirs
    signal.signal(signal.SIGTERM, _interrupt)
    results: list[CountResult] = []
    started = datetime.now(UTC)

    def write(growth: dict[str, Any]) -> None:
        if not args.out:
            return
        out = {
            "started": started.isoformat(), "argv": sys.argv[1:], "cores": os.cpu_count(),
            "synthetic": synthetic.SyntheticServers(Path("."), "", "", (0, 0)).source_config(),
            "results": [asdict(r) for r in results], "growth": growth,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")

    for n in counts:
        results.append(one_count(n, args))
        report_count(results[-1])
        write({})  # what is measured so far survives a later failure
    growth = report(results)
    write(growth)
    if args.out:
        print(f"\nwritten {args.out}")
    errors = [e for r in results for e in r.check.get("errors", [])]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
