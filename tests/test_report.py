"""`transcend topology` and `transcend report`: the tree, the self-contained HTML SLA
report checked against the catalog it was made from, and the report rendered by
headless Chromium (the screenshot is kept in /var/tmp for people to look at)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from transcend.api import TestFailoverReport as RtoReport  # alias: pytest would collect Test*
from transcend.catalog import Catalog, CycleRecord
from transcend.config import Settings
from transcend.models import (
    DiskInfo,
    Health,
    PlatformSpec,
    ProtectionPolicy,
    ProtectionSpec,
    ProtectionState,
    Workload,
    WorkloadRef,
)
from transcend.report import percentile, render_report, topology_tree

# Cycles are placed relative to the real clock: the CLI reports "the last 7 days from now".
NOW = datetime.now(UTC).replace(microsecond=0)
WINDOW = timedelta(days=7)
SCREENSHOT_COPY = Path("/var/tmp/transcend-report-screenshot.png")
TRANSCEND = Path(sys.executable).with_name("transcend")
# Hostile text in the catalog: it must come out escaped, never as markup.
DB_REASON = "RPO 1h 20m over target 1h <script>alert(1)</script> & more"


@dataclass
class Data:
    home: Path
    catalog: Catalog
    cycles: dict[str, list[CycleRecord]]  # everything recorded, per protection


def _workload(platform: str, vm: str) -> Workload:
    return Workload(ref=WorkloadRef(platform=platform, id=vm), name=vm, cpus=1, memory_mib=256,
                    disks=[DiskInfo(id="vda", size=1 << 30)])


def _cycle(protection: str, n: int, started: datetime, status: str, *, rpo: float | None = None,
           written: int = 0, kind: str = "incremental", error: str = "") -> CycleRecord:
    done = started + timedelta(seconds=40)
    return CycleRecord(
        cycle_id=f"cycle/{protection}/{n:03d}", protection=protection, started_at=started,
        finished_at=None if status == "running" else done,
        instant=started + timedelta(seconds=2) if status == "committed" else None,
        status=status, kind=kind, bytes_written=written, bytes_read=written, copy_seconds=30.0,
        wall_seconds=40.0, rpo_seconds=rpo, error=error,
        point_id=f"pt-{protection}-{n}" if status == "committed" else None,
    )


def _series(name: str, every: timedelta, n: int, rpo_base: float, failed_at: set[int]) -> list[CycleRecord]:
    """``n`` cycles ``every`` apart ending near NOW: the first a full copy (no RPO yet,
    there is no previous point), some failed, the rest incremental with varying RPO
    and sizes; plus one cycle 10 days ago (outside the window) and one still running."""
    start = NOW - every * n
    out = [_cycle(name, 0, NOW - timedelta(days=10), "committed", rpo=rpo_base, written=5 << 20)]
    for i in range(1, n + 1):
        t = start + every * (i - 1)
        if i == 1:
            out.append(_cycle(name, i, t, "committed", written=64 << 20, kind="full"))
        elif i in failed_at:
            out.append(_cycle(name, i, t, "failed", error=f"source {name} <unreachable> at cycle {i}"))
        else:
            out.append(_cycle(name, i, t, "committed", rpo=rpo_base * (0.6 + 0.1 * (i % 8)),
                              written=(i * 37 % 11 + 1) << 20))
    out.append(_cycle(name, n + 1, NOW - timedelta(seconds=5), "running"))
    return out


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Data]:
    home = tmp_path / "home"
    cat = Catalog.from_settings(Settings(home=home))
    cat.add_platform(PlatformSpec(name="kvm-a", kind="kvm", site="dc1", config={"uri": "qemu:///system"}))
    cat.add_platform(PlatformSpec(name="kvm-b", kind="kvm", site="dc2", config={"root": "/srv/replicas"}))
    cat.add_protection(ProtectionSpec(name="web", source_platform="kvm-a", target_platform="kvm-b",
                                      workloads=["web1"], policy=ProtectionPolicy(rpo_seconds=900)),
                       [_workload("kvm-a", "web1")])
    cat.add_protection(ProtectionSpec(name="db", source_platform="kvm-b", target_platform="kvm-a",
                                      workloads=["db1"], policy=ProtectionPolicy(rpo_seconds=3600)),
                       [_workload("kvm-b", "db1")])
    cat.set_protection_state("web", ProtectionState.PROTECTING, health=Health.HEALTHY)
    cat.set_protection_state("db", ProtectionState.PROTECTING, health=Health.WARNING, reason=DB_REASON)
    cycles = {
        "web": _series("web", timedelta(minutes=15), 14, 900, {5, 9}),
        "db": _series("db", timedelta(hours=1), 8, 3600, {4}),
    }
    for series in cycles.values():
        for c in series:
            cat.record_cycle(c)
    try:
        yield Data(home, cat, cycles)
    finally:
        cat.close()


def _in_window(cycles: list[CycleRecord], status: str) -> list[CycleRecord]:
    return [c for c in cycles if c.status == status and c.started_at >= NOW - WINDOW]


def _marks(document: str, tag: str, cls: str, protection: str) -> list[str]:
    """The cycle ids of the chart marks ``<tag class="cls…" data-cycle="…">`` of one protection."""
    ids = re.findall(rf'<{tag} class="{cls}(?: [^"]*)?" data-cycle="([^"]+)"', document)
    return [i for i in ids if i.startswith(f"cycle/{protection}/")]


def _report(d: Data, rtos: dict[str, list[RtoReport]] | None, note: str = "") -> str:
    protections = d.catalog.list_protections()
    cycles = {p.name: d.catalog.cycles(p.name, since=NOW - WINDOW) for p in protections}
    return render_report(d.catalog.list_platforms(), protections, cycles, rtos, NOW, WINDOW,
                         rto_note=note)


def _assert_self_contained(document: str) -> None:
    assert "http://" not in document and "https://" not in document
    assert not re.search(r"""=["']?//""", document)  # protocol-relative references
    assert "<script" not in document.lower()
    assert not re.search(r"\s(src|srcset|data-src)=", document)
    assert not re.search(r"<(link|img|iframe|object|embed|image|use)\b", document)
    # The only url() is the arrowheads' reference to a marker in the same document.
    assert all(ref.startswith("#arrow-") for ref in re.findall(r"url\(([^)]*)\)", document))
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', document))


def _assert_svgs_well_formed(document: str) -> int:
    """Every inline SVG parses as XML: the escaping held, the charts are complete."""
    svgs = re.findall(r"<svg\b.*?</svg>", document, flags=re.S)
    for svg in svgs:
        ET.fromstring(svg)
    return len(svgs)


# --------------------------------------------------------------------------- pure functions


def test_topology_tree_nests_sites_platforms_protections(data: Data) -> None:
    tree = topology_tree(data.catalog.list_platforms(), data.catalog.list_protections())
    assert tree == "\n".join([
        "site dc1",
        "└── kvm-a (kvm)",
        f"    ├── target of db ← kvm-b (site dc2): protecting, warning ({DB_REASON})",
        "    └── source of web → kvm-b (site dc2): protecting, healthy",
        "site dc2",
        "└── kvm-b (kvm)",
        f"    ├── source of db → kvm-a (site dc1): protecting, warning ({DB_REASON})",
        "    └── target of web ← kvm-a (site dc1): protecting, healthy",
    ])
    assert topology_tree([], []).startswith("no platforms in the catalog")


def test_report_charts_hold_the_cycles_in_the_window(data: Data) -> None:
    rtos = {
        "web": [RtoReport(point_id="pt-web-3", started_at=NOW - timedelta(hours=2),
                                   rto_seconds=42.5, ok=True)],
        "db": [RtoReport(point_id="pt-db-2", started_at=NOW - timedelta(hours=3), ok=False,
                                  error="health check timed out <console>")],
    }
    document = _report(data, rtos)
    assert document.startswith("<!DOCTYPE html>")
    _assert_self_contained(document)
    assert _assert_svgs_well_formed(document) >= 6  # topology, RTO, 2 charts per protection

    for name, series in data.cycles.items():
        committed = _in_window(series, "committed")
        failed = _in_window(series, "failed")
        assert committed and failed
        # One bar per committed cycle; one RPO point per committed cycle that measured an
        # RPO (the first, full cycle has no previous point to measure from).
        assert _marks(document, "rect", "cycle-bar", name) == [c.cycle_id for c in committed]
        assert _marks(document, "circle", "rpo-point", name) == [
            c.cycle_id for c in committed if c.rpo_seconds is not None]
        assert _marks(document, "line", "cycle-failed", name) == [c.cycle_id for c in failed]
        assert f"cycle/{name}/000" not in document  # 10 days old: outside the window
        assert 'data-platform="kvm-a"' in document and f'data-protection="{name}"' in document
        assert f'<section id="p-{name}">' in document

    # The summary's numbers are the catalog's.
    web_rpos = [c.rpo_seconds for c in _in_window(data.cycles["web"], "committed")
                if c.rpo_seconds is not None]
    assert percentile(web_rpos, 0.95) == sorted(web_rpos)[round(0.95 * (len(web_rpos) - 1))]
    assert re.search(r'>web</a></td><td>kvm-a → kvm-b</td><td>protecting</td>'
                     r'<td class="health-healthy">healthy</td><td>15m</td>', document)
    web_ok, web_failed = (len(_in_window(data.cycles["web"], s)) for s in ("committed", "failed"))
    assert (web_ok, web_failed) == (12, 2)
    assert f'<td>{web_ok} / <span class="bad">{web_failed}</span></td>' in document

    # RTOs: the measured one is drawn, the failed test listed; hostile text escaped.
    assert '<rect class="rto-bar" data-protection="web"' in document
    assert '<rect class="rto-bar" data-protection="db"' not in document  # its test failed
    assert "42.5s" in document and "health check timed out &lt;console&gt;" in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in document
    assert "source db &lt;unreachable&gt; at cycle 4" in document


def test_report_without_rtos_says_so(data: Data) -> None:
    document = _report(data, None, note="cannot reach Temporal at 127.0.0.1:9")
    _assert_self_contained(document)
    assert "RTOs not available: cannot reach Temporal at 127.0.0.1:9" in document
    assert 'class="rto-bar' not in document
    assert document.count("<td>unknown</td>") == 2
    assert len(_marks(document, "rect", "cycle-bar", "web")) == len(_in_window(data.cycles["web"],
                                                                                "committed"))
    # Temporal answered for web (never tested) but not for db.
    partial = _report(data, {"web": []}, note="RTO unknown for db: the Replication workflow did not answer")
    assert "No test failover yet: web " in partial and "RTO unknown for db" in partial
    assert "RTO unknown: its Replication workflow did not answer" in partial.split('id="p-db"')[1]
    assert re.search(r">db</a>.*?<td>unknown</td></tr>", partial)
    assert re.search(r">web</a>.*?<td>no test yet</td></tr>", partial)


# --------------------------------------------------------------------------- CLI and Chromium


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli_env(home: Path) -> dict[str, str]:
    # Only this test's catalog: no TRANSCEND_* setting from the environment running the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCEND_")}
    env.update(TRANSCEND_HOME=str(home), TRANSCEND_TEMPORAL_ADDRESS=f"127.0.0.1:{_closed_port()}")
    return env


def test_cli_topology_and_report_render_in_chromium(data: Data, tmp_path: Path) -> None:
    env = _cli_env(data.home)
    topo = subprocess.run([str(TRANSCEND), "topology"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert topo.returncode == 0, topo.stderr
    assert topo.stdout.rstrip("\n") == topology_tree(data.catalog.list_platforms(),
                                                     data.catalog.list_protections())

    out = tmp_path / "out" / "sla report.html"  # a space: the file:// URL must cope
    out.parent.mkdir()
    t0 = time.monotonic()
    rep = subprocess.run([str(TRANSCEND), "report", "--out", str(out), "--window", "7d"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    assert time.monotonic() - t0 < 20, "an unreachable Temporal must not hold the report up"
    assert rep.stdout.strip().splitlines()[-1] == str(out.resolve())
    assert "note:" in rep.stderr and "Temporal" in rep.stderr
    document = out.read_text(encoding="utf-8")
    _assert_self_contained(document)
    _assert_svgs_well_formed(document)
    assert "RTOs not available:" in document
    for name, series in data.cycles.items():
        assert _marks(document, "rect", "cycle-bar", name) == [
            c.cycle_id for c in _in_window(series, "committed")]
        assert _marks(document, "circle", "rpo-point", name) == [
            c.cycle_id for c in _in_window(series, "committed") if c.rpo_seconds is not None]

    bad = subprocess.run([str(TRANSCEND), "report", "--out", str(out), "--window", "soon"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--window: not a duration" in bad.stderr

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed; run scripts/setup.sh (it installs Debian's chromium)"
    shot = tmp_path / "report.png"
    # Nothing in the report may load, and chromium itself is kept off the network and
    # out of the caller's profile.
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
           "--window-size=1280,2000", "--hide-scrollbars", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           out.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.is_file(), f"chromium wrote no screenshot: {r.stderr[-2000:]}"
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 2000)
    # A blank page compresses to a few KiB; tables, text and charts do not.
    assert len(png) > 40_000, f"screenshot is only {len(png)} bytes: did the page render?"
    shutil.copyfile(shot, SCREENSHOT_COPY)
    print(f"report {out}; screenshot {shot}, copied to {SCREENSHOT_COPY}")
