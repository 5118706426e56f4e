"""The topology tree (``transcend topology``) and the SLA report (``transcend report``).

Pure functions: the caller reads the catalog (and, for RTOs, Temporal) and passes
the data in; nothing here does I/O. The report is one HTML document with inline CSS
and SVG charts drawn here: no JavaScript, no fonts, images or styles from anywhere
else, and no URL at all, so it can be mailed, archived or opened on an isolated
recovery site as it is. Its Content-Security-Policy forbids every load, so a browser
proves that too.

Every chart mark carries a stable class and the cycle it shows (``<circle
class="rpo-point" data-cycle="…">``, ``<rect class="cycle-bar" data-cycle="…">``)
so tests and other tools can check the report against the catalog.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from transcend.api import TestFailoverReport
from transcend.catalog import CycleRecord, ProtectionRecord
from transcend.models import PlatformInfo, format_duration

__all__ = ["percentile", "render_report", "topology_tree"]


def _e(value: object) -> str:
    """Escape for HTML text and attribute values (also valid inside inline SVG)."""
    return html.escape(str(value), quote=True)


def _utc(t: datetime) -> datetime:
    # The catalog hands out aware UTC datetimes; a naive one is taken as UTC like the catalog does.
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def human_duration(seconds: float | None) -> str:
    """``42s``, ``15m 05s``, ``3h 20m``, ``2d 04h``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, the same rule the Replication workflow uses for its p95
    (workflows/replication.py), so the report and ``transcend status`` agree."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- topology tree


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _status(p: ProtectionRecord) -> str:
    health = p.health.value
    if p.health_reason and health != "healthy":
        health += f" ({_one_line(p.health_reason)})"
    return f"{p.state.value}, {health}"


def topology_tree(platforms: Sequence[PlatformInfo], protections: Sequence[ProtectionRecord]) -> str:
    """Sites → platforms (kind) → the protections each platform is the source or the
    target of, as a text tree (sorted by name, so the output is stable)."""
    if not platforms:
        return "no platforms in the catalog; add one with `transcend platform add`"
    by_name = {p.name: p for p in platforms}
    sites = sorted({p.site for p in platforms})
    lines: list[str] = []
    for site in sites:
        lines.append(f"site {site}")
        members = sorted((p for p in platforms if p.site == site), key=lambda p: p.name)
        for i, plat in enumerate(members):
            last_plat = i == len(members) - 1
            lines.append(f"{'└── ' if last_plat else '├── '}{plat.name} ({plat.kind})")
            indent = "    " if last_plat else "│   "
            entries: list[str] = []
            for prot in sorted(protections, key=lambda p: p.name):
                src, dst = prot.spec.source_platform, prot.spec.target_platform
                if src == plat.name:
                    entries.append(f"source of {prot.name} → {dst}{_site_note(by_name, dst, site)}: "
                                   f"{_status(prot)}")
                if dst == plat.name:
                    entries.append(f"target of {prot.name} ← {src}{_site_note(by_name, src, site)}: "
                                   f"{_status(prot)}")
            if not entries:
                entries.append("(no protections)")
            for j, entry in enumerate(entries):
                lines.append(f"{indent}{'└── ' if j == len(entries) - 1 else '├── '}{entry}")
    # The catalog's foreign keys make this impossible; shown rather than dropped if a
    # caller passes a partial platform list.
    orphans = [p for p in protections
               if p.spec.source_platform not in by_name or p.spec.target_platform not in by_name]
    if orphans:
        lines.append("protections on platforms not listed above")
        for j, prot in enumerate(sorted(orphans, key=lambda p: p.name)):
            lines.append(f"{'└── ' if j == len(orphans) - 1 else '├── '}{prot.name}: "
                         f"{prot.spec.source_platform} → {prot.spec.target_platform}, {_status(prot)}")
    return "\n".join(lines)


def _site_note(by_name: Mapping[str, PlatformInfo], other: str, site: str) -> str:
    info = by_name.get(other)
    if info is None:
        return " (not in the catalog)"
    return "" if info.site == site else f" (site {info.site})"


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class _Summary:
    record: ProtectionRecord
    committed: list[CycleRecord]  # in the window, oldest first
    failed: list[CycleRecord]
    rpo_last: float | None
    rpo_p50: float | None
    rpo_p95: float | None
    rpo_max: float | None
    last_point_at: datetime | None
    last_rto: TestFailoverReport | None
    rtos: list[TestFailoverReport]
    rtos_known: bool


def _summarize(
    rec: ProtectionRecord,
    cycles: Sequence[CycleRecord],
    since: datetime,
    rtos: Sequence[TestFailoverReport] | None,
    last_point_at: datetime | None,
) -> _Summary:
    in_window = sorted((c for c in cycles if _utc(c.started_at) >= since),
                       key=lambda c: (_utc(c.started_at), c.cycle_id))
    committed = [c for c in in_window if c.status == "committed"]
    failed = [c for c in in_window if c.status in ("failed", "aborted")]
    rpos = [c.rpo_seconds for c in committed if c.rpo_seconds is not None]
    if last_point_at is None:
        # Without the catalog's latest point, the newest committed cycle's instant is
        # the best answer (it is the same point unless retention deleted it).
        instants = [_utc(c.instant) for c in committed if c.instant is not None]
        last_point_at = max(instants) if instants else None
    reports = sorted(rtos or [], key=lambda r: _utc(r.started_at))
    return _Summary(
        record=rec, committed=committed, failed=failed,
        rpo_last=rpos[-1] if rpos else None,
        rpo_p50=percentile(rpos, 0.5), rpo_p95=percentile(rpos, 0.95),
        rpo_max=max(rpos) if rpos else None,
        last_point_at=_utc(last_point_at) if last_point_at else None,
        last_rto=reports[-1] if reports else None,
        rtos=reports, rtos_known=rtos is not None,
    )


_BAD = ' class="bad"'


def _rto_text(r: TestFailoverReport | None, known: bool) -> str:
    if not known:
        return "unknown"
    if r is None:
        return "no test yet"
    if r.ok and r.rto_seconds is not None:
        return human_duration(r.rto_seconds) if r.rto_seconds >= 60 else f"{r.rto_seconds:.1f}s"
    return "test failed"


def _summary_table(rows: Sequence[_Summary], generated_at: datetime) -> str:
    head = ("protection", "source → target", "state", "health", "RPO target", "RPO last", "p50",
            "p95", "max", "cycles ok / failed", "last point age", "last RTO")
    out = ['<table class="summary"><thead><tr>', *(f"<th>{_e(h)}</th>" for h in head),
           "</tr></thead><tbody>"]
    for s in rows:
        rec = s.record
        target = rec.spec.policy.rpo_seconds

        def rpo_cell(v: float | None, target: int = target) -> str:
            return f"<td{_BAD if v is not None and v > target else ''}>{_e(human_duration(v))}</td>"

        age = (generated_at - s.last_point_at).total_seconds() if s.last_point_at else None
        health = rec.health.value
        reason = f'<div class="reason">{_e(rec.health_reason)}</div>' if rec.health_reason else ""
        out.append(
            f'<tr><td><a href="#p-{_e(rec.name)}">{_e(rec.name)}</a></td>'
            f"<td>{_e(rec.spec.source_platform)} → {_e(rec.spec.target_platform)}</td>"
            f"<td>{_e(rec.state.value)}</td>"
            f'<td class="health-{_e(health)}">{_e(health)}{reason}</td>'
            f"<td>{_e(format_duration(target))}</td>"
            f"{rpo_cell(s.rpo_last)}{rpo_cell(s.rpo_p50)}{rpo_cell(s.rpo_p95)}{rpo_cell(s.rpo_max)}"
            f"<td>{len(s.committed)} / <span{_BAD if s.failed else ''}>{len(s.failed)}</span></td>"
            f"{rpo_cell(age)}"
            f"<td>{_e(_rto_text(s.last_rto, s.rtos_known))}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


# --------------------------------------------------------------------------- chart helpers

_W, _H = 900, 230  # chart size in px (the SVG scales down with the page)
_L, _R, _T, _B = 70, 16, 14, 36  # plot margins: room for the axis labels


def _f(x: float) -> str:
    return f"{x:.1f}"


def _nice_step(span: float, target_ticks: int, steps: Sequence[float] | None = None) -> float:
    """A round step that cuts ``span`` into at most about ``target_ticks`` parts."""
    raw = span / max(1, target_ticks)
    if steps:
        return next((s for s in steps if s >= raw), steps[-1] * math.ceil(raw / steps[-1]))
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


_DURATION_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 3 * 3600,
                   6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400)


def _y_axis(ymax: float, fmt: Callable[[float], str], steps: Sequence[float] | None,
            unit: float = 1.0) -> tuple[float, str]:
    """The rounded top of the y axis and its grid lines with labels; without ``steps``
    the step is 1, 2 or 5 times a power of ten of ``unit``."""
    step = _nice_step(ymax, 4, steps) if steps else _nice_step(ymax / unit, 4) * unit
    top = step * max(1, math.ceil(ymax / step))
    parts = []
    plot_h = _H - _T - _B
    v = 0.0
    while v <= top + 1e-9:
        y = _T + plot_h - v / top * plot_h
        parts.append(f'<line class="grid" x1="{_L}" x2="{_W - _R}" y1="{_f(y)}" y2="{_f(y)}"/>'
                     f'<text class="tick" x="{_L - 6}" y="{_f(y + 4)}" text-anchor="end">'
                     f"{_e(fmt(v))}</text>")
        v += step
    return top, "".join(parts)


def _tick_duration(seconds: float) -> str:
    """Axis labels: ``30m``, ``1h 30m``, ``2d``: only the parts that are not zero."""
    s = round(seconds)
    if s == 0:
        return "0"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, s = divmod(s, size)
        if n:
            parts.append(f"{n}{unit}")
    return " ".join(parts[:2])


_BYTE_UNITS = (("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40))


def _byte_unit(ymax: float) -> tuple[str, int]:
    # The largest unit the axis top reaches, so ticks are round in it (0, 20, 40 MiB).
    return next(((n, u) for n, u in reversed(_BYTE_UNITS) if ymax >= u), _BYTE_UNITS[0])


def _time_axis(since: datetime, until: datetime) -> str:
    span = max(1.0, (until - since).total_seconds())
    step = _nice_step(span, 7, _DURATION_STEPS)
    # Ticks on round UTC times (multiples of the step since the epoch).
    first = math.ceil(since.timestamp() / step) * step
    fmt = "%m-%d" if step >= 86400 else "%m-%d %H:%M"
    parts = []
    t = first
    while t <= until.timestamp():
        x = _L + (t - since.timestamp()) / span * (_W - _L - _R)
        label = datetime.fromtimestamp(t, UTC).strftime(fmt)
        parts.append(f'<line class="grid" x1="{_f(x)}" x2="{_f(x)}" y1="{_T}" y2="{_H - _B}"/>'
                     f'<text class="tick" x="{_f(x)}" y="{_H - _B + 16}" text-anchor="middle">'
                     f"{_e(label)}</text>")
        t += step
    return "".join(parts)


def _svg(title: str, body: str, width: int = _W, height: int = _H, cls: str = "chart") -> str:
    # No xmlns: inline SVG in HTML does not need it, and the report carries no URL at all.
    return (f'<svg class="{cls}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>{body}</svg>')


def _frame() -> str:
    return (f'<rect class="plot" x="{_L}" y="{_T}" width="{_W - _L - _R}" '
            f'height="{_H - _T - _B}"/>')


def _when(c: CycleRecord) -> datetime:
    # RPO achieved is known when the point commits, which is when the cycle finishes.
    return _utc(c.finished_at or c.started_at)


def _rpo_chart(s: _Summary, since: datetime, until: datetime) -> str:
    rec = s.record
    # A protection younger than the window would be squeezed into the right edge: start
    # its time axis when it started (its creation or its first cycle, if earlier).
    first = min([_utc(rec.created_at), *(_utc(c.started_at) for c in (*s.committed, *s.failed))])
    since = min(until - timedelta(minutes=10), max(since, first - (until - first) * 0.03))
    target = rec.spec.policy.rpo_seconds
    points = [(c, c.rpo_seconds) for c in s.committed if c.rpo_seconds is not None]
    title = f"RPO achieved by {rec.name} (target {format_duration(target)})"
    ymax = max([target * 1.2, *(v for _, v in points)])
    top, yaxis = _y_axis(ymax, _tick_duration, _DURATION_STEPS)
    span = max(1.0, (until - since).total_seconds())
    plot_w, plot_h = _W - _L - _R, _H - _T - _B

    def x(t: datetime) -> float:
        return _L + min(1.0, max(0.0, (t - since).total_seconds() / span)) * plot_w

    def y(v: float) -> float:
        return _T + plot_h - v / top * plot_h

    parts = [_frame(), yaxis, _time_axis(since, until)]
    ty = y(target)
    parts.append(f'<line class="rpo-target" x1="{_L}" x2="{_W - _R}" y1="{_f(ty)}" y2="{_f(ty)}"/>'
                 f'<text class="target-label" x="{_L + 6}" y="{_f(ty - 4)}">'
                 f"target {_e(format_duration(target))}</text>")
    if len(points) > 1:
        coords = " ".join(f"{_f(x(_when(c)))},{_f(y(v))}" for c, v in points)
        parts.append(f'<polyline class="rpo-line" points="{coords}"/>')
    for c, v in points:
        cls = "rpo-point breach" if v > target else "rpo-point"
        parts.append(
            f'<circle class="{cls}" data-cycle="{_e(c.cycle_id)}" cx="{_f(x(_when(c)))}" '
            f'cy="{_f(y(v))}" r="3.5"><title>{_e(_when(c).strftime("%Y-%m-%d %H:%M:%S"))} UTC: '
            f"RPO {_e(human_duration(v))} ({_e(c.kind or 'cycle')} {_e(c.cycle_id)})</title></circle>"
        )
    # Failed cycles as red ticks on the time axis: where the RPO grew because of them.
    for c in s.failed:
        fx = x(_when(c))
        parts.append(
            f'<line class="cycle-failed" data-cycle="{_e(c.cycle_id)}" x1="{_f(fx)}" x2="{_f(fx)}" '
            f'y1="{_H - _B - 10}" y2="{_H - _B}"><title>{_e(_when(c).strftime("%Y-%m-%d %H:%M:%S"))}'
            f" UTC: cycle {_e(c.cycle_id)} {_e(c.status)}: {_e(c.error or 'no error recorded')}"
            "</title></line>"
        )
    if not points:
        parts.append(f'<text class="empty" x="{_W / 2}" y="{_H / 2}" text-anchor="middle">'
                     "no RPO measured in this window</text>")
    return _svg(title, "".join(parts))


def _bytes_chart(s: _Summary) -> str:
    rec = s.record
    bars = s.committed
    title = f"Bytes written per committed cycle of {rec.name}"
    ymax = max([1, *(c.bytes_written for c in bars)])
    unit_name, unit = _byte_unit(ymax)
    top, yaxis = _y_axis(ymax, lambda v: f"{v / unit:g} {unit_name}" if v else "0", None, unit)
    plot_w, plot_h = _W - _L - _R, _H - _T - _B
    parts = [_frame(), yaxis]
    n = len(bars)
    # One slot per cycle (not by time): a slow cycle does not hide its neighbours.
    slot = plot_w / max(1, n)
    bar_w = max(0.5, slot * 0.8)
    for i, c in enumerate(bars):
        h = max(1.0, c.bytes_written / top * plot_h)  # at least 1px: an empty cycle still shows
        kind = "".join(ch for ch in (c.kind or "other") if ch.isalnum() or ch in "-_")
        parts.append(
            f'<rect class="cycle-bar kind-{_e(kind)}" data-cycle="{_e(c.cycle_id)}" '
            f'x="{_f(_L + i * slot + (slot - bar_w) / 2)}" y="{_f(_T + plot_h - h)}" '
            f'width="{_f(bar_w)}" height="{_f(h)}"><title>{_e(_when(c).strftime("%Y-%m-%d %H:%M:%S"))}'
            f" UTC: {_e(c.kind or 'cycle')} {_e(human_bytes(c.bytes_written))} written in "
            f"{_e(human_duration(c.copy_seconds))} ({_e(c.cycle_id)})</title></rect>"
        )
    if bars:
        for i in sorted({0, n - 1}):
            cx = _L + (i + 0.5) * slot
            anchor = "start" if i == 0 else "end"
            parts.append(f'<text class="tick" x="{_f(cx)}" y="{_H - _B + 16}" text-anchor="{anchor}">'
                         f"{_e(_when(bars[i]).strftime('%m-%d %H:%M'))}</text>")
    else:
        parts.append(f'<text class="empty" x="{_W / 2}" y="{_H / 2}" text-anchor="middle">'
                     "no committed cycle in this window</text>")
    return _svg(title, "".join(parts))


# --------------------------------------------------------------------------- RTOs


def _rto_section(rows: Sequence[_Summary], rtos_available: bool, note: str) -> str:
    if not rtos_available:
        return (f'<p class="note">RTOs not available: {_e(note or "no RTO data was passed in")}. '
                "Recovery times are kept by each protection's Replication workflow; run the "
                "report where Temporal is reachable to include them.</p>")
    out = []
    if note:
        out.append(f'<p class="note">{_e(note)}</p>')
    tested = [(s, r) for s in rows for r in s.rtos]
    measured = [(s, s.last_rto) for s in rows
                if s.last_rto is not None and s.last_rto.ok and s.last_rto.rto_seconds is not None]
    if measured:
        bar_h, gap, label_w = 22, 8, 180
        height = _T + len(measured) * (bar_h + gap) + 10
        vmax = max(r.rto_seconds or 0.0 for _, r in measured) or 1.0
        plot_w = _W - label_w - 120
        parts = []
        for i, (s, r) in enumerate(measured):
            y = _T + i * (bar_h + gap)
            w = max(1.0, (r.rto_seconds or 0.0) / vmax * plot_w)
            parts.append(
                f'<text class="tick" x="{label_w - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end">'
                f"{_e(s.record.name)}</text>"
                f'<rect class="rto-bar" data-protection="{_e(s.record.name)}" x="{label_w}" y="{y}" '
                f'width="{_f(w)}" height="{bar_h}"><title>{_e(s.record.name)}: RTO '
                f"{_e(_rto_text(r, True))}</title></rect>"
                f'<text class="tick" x="{_f(label_w + w + 6)}" y="{y + bar_h / 2 + 4}">'
                f"{_e(_rto_text(r, True))}</text>"
            )
        out.append(_svg("Last measured RTO per protection", "".join(parts), height=height))
    untested = [s.record.name for s in rows if s.rtos_known and not s.rtos]
    if untested:
        out.append(f'<p class="note">No test failover yet: {_e(", ".join(untested))} '
                   "(<code>transcend test-failover PROTECTION</code> measures the RTO).</p>")
    if not tested:
        return "".join(out)
    out.append("<table><thead><tr><th>protection</th><th>started (UTC)</th><th>point</th>"
               "<th>RTO</th><th>result</th></tr></thead><tbody>")
    for s, r in tested:
        result = "healthy" if r.ok else f"failed: {r.error}"
        out.append(f"<tr><td>{_e(s.record.name)}</td>"
                   f"<td>{_e(_utc(r.started_at).strftime('%Y-%m-%d %H:%M:%S'))}</td>"
                   f"<td><code>{_e(r.point_id)}</code></td>"
                   f"<td>{_e(_rto_text(r, True) if r.ok else '-')}</td>"
                   f"<td{'' if r.ok else _BAD}>{_e(result)}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


# --------------------------------------------------------------------------- topology picture

# An arc diagram: every platform on one line, grouped into site boxes, and every
# protection an arc from source to target, above the line when it points right and
# below when it points left. Arcs never cross a box, whatever the topology, and the two
# directions between a pair of platforms stay apart.
_PW, _PH = 160, 46  # platform box
_GAP_IN, _GAP_SITE, _PAD, _HEAD = 40, 60, 16, 26  # gaps between boxes, site padding and header
_NAME_CHARS = 22  # longer names are shortened in the box (the full name is its tooltip)


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 1] + "…"


@dataclass(frozen=True)
class _Arc:
    prot: ProtectionRecord
    x1: float
    x2: float
    above: bool
    height: float
    loop: bool


def _topology_svg(platforms: Sequence[PlatformInfo], protections: Sequence[ProtectionRecord]) -> str:
    if not platforms:
        return '<p class="note">No platforms in the catalog.</p>'
    sites = sorted({p.site for p in platforms})
    centre: dict[str, float] = {}
    site_boxes: list[tuple[str, float, float]] = []  # site, x, width
    plat_boxes: list[tuple[PlatformInfo, float]] = []  # platform, x
    x = 10.0
    for site in sites:
        members = sorted((p for p in platforms if p.site == site), key=lambda p: p.name)
        width = 2 * _PAD + len(members) * _PW + (len(members) - 1) * _GAP_IN
        for i, plat in enumerate(members):
            bx = x + _PAD + i * (_PW + _GAP_IN)
            plat_boxes.append((plat, bx))
            centre[plat.name] = bx + _PW / 2
        site_boxes.append((site, x, width))
        x += width + _GAP_SITE
    total_w = x - _GAP_SITE + 10

    arcs: list[_Arc] = []
    seen: dict[tuple[str, str], int] = {}
    for prot in sorted(protections, key=lambda p: p.name):
        src, dst = prot.spec.source_platform, prot.spec.target_platform
        if src not in centre or dst not in centre:
            continue
        k = seen.get((src, dst), 0)  # the k-th protection on this pair: a higher arc
        seen[(src, dst)] = k + 1
        if src == dst:
            # Source and target on the same platform: a loop on the left of the box's top.
            c = centre[src]
            arcs.append(_Arc(prot, c - 62, c - 30, True, 34 + 20 * k, True))
            continue
        right = centre[dst] > centre[src]
        # Leave and arrive off-centre so arrows into and out of one box do not overlap.
        off = 12 if right else -12
        span = abs(centre[dst] - centre[src])
        # Longer arcs are higher (so nested arcs and their labels stay apart), but only
        # logarithmically, so a wide fleet does not make the picture tall.
        arcs.append(_Arc(prot, centre[src] + off, centre[dst] - off, right,
                         30 + 40 * math.log2(1 + span / 200) + 24 * k, False))
    room_above = max([a.height for a in arcs if a.above], default=0) + 26
    room_below = max([a.height for a in arcs if not a.above], default=0) + 26
    site_y = room_above - _HEAD
    box_top = site_y + _HEAD
    box_bottom = box_top + _PH
    total_h = box_bottom + _PAD + room_below

    parts: list[str] = []
    for site, sx, sw in site_boxes:
        parts.append(f'<rect class="site" x="{_f(sx)}" y="{_f(site_y)}" width="{_f(sw)}" '
                     f'height="{_HEAD + _PH + _PAD}" rx="10"/>'
                     f'<text class="site-label" x="{_f(sx + 10)}" y="{_f(site_y + 18)}">site '
                     f"{_e(site)}</text>")
    for plat, bx in plat_boxes:
        parts.append(
            f'<g class="platform" data-platform="{_e(plat.name)}"><title>{_e(plat.name)} '
            f"({_e(plat.kind)}, site {_e(plat.site)})</title>"
            f'<rect x="{_f(bx)}" y="{_f(box_top)}" width="{_PW}" height="{_PH}" rx="6"/>'
            f'<text class="platform-name" x="{_f(bx + _PW / 2)}" y="{_f(box_top + 20)}" '
            f'text-anchor="middle">{_e(_short(plat.name))}</text>'
            f'<text class="platform-kind" x="{_f(bx + _PW / 2)}" y="{_f(box_top + 37)}" '
            f'text-anchor="middle">{_e(plat.kind)}</text></g>'
        )
    defs = "".join(
        f'<marker id="arrow-{h}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path class="arrowhead-{h}" '
        'd="M0,0 L10,5 L0,10 z"/></marker>'
        for h in ("healthy", "warning", "failed")
    )
    for a in arcs:
        prot = a.prot
        y = box_top if a.above else box_bottom
        sign = -1 if a.above else 1
        # A cubic with both control points at 4/3 of the height peaks at the height.
        cy = y + sign * a.height * 4 / 3
        spread = 8 if a.loop else 0  # a loop's control points lean out so it is round
        d = (f"M{_f(a.x1)},{_f(y)} C{_f(a.x1 - spread)},{_f(cy)} {_f(a.x2 + spread)},{_f(cy)} "
             f"{_f(a.x2)},{_f(y)}")
        if a.loop:  # left of the loop: arcs into this box arrive right of it
            lx, ly, anchor = a.x1 - 10, y - a.height + 4, "end"
        else:
            lx, ly, anchor = (a.x1 + a.x2) / 2, y + sign * a.height + (-6 if a.above else 15), "middle"
        health = prot.health.value
        parts.append(
            f'<g class="protection-arrow health-{_e(health)}" data-protection="{_e(prot.name)}">'
            f'<path d="{d}" marker-end="url(#arrow-{_e(health)})"><title>{_e(prot.name)}: '
            f"{_e(prot.spec.source_platform)} → {_e(prot.spec.target_platform)}, "
            f"{_e(_status(prot))}</title></path>"
            f'<text class="arrow-label" x="{_f(lx)}" y="{_f(ly)}" '
            f'text-anchor="{anchor}">{_e(prot.name)} ({_e(prot.state.value)})</text></g>'
        )
    body = f"<defs>{defs}</defs>{''.join(parts)}"
    # Wide fleets scroll sideways instead of shrinking the text to nothing.
    return ('<div class="scroll">'
            + _svg("Topology: sites, platforms and protections (source → target)", body,
                   width=round(total_w), height=round(total_h), cls="topology")
            + "</div>")


# --------------------------------------------------------------------------- document

_CSS = """
body{font-family:sans-serif;margin:24px;color:#1d232a;background:#fff;max-width:1200px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:16px;margin:22px 0 4px}
.meta,.note{color:#57606a;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7}
.bad{color:#b42318;font-weight:bold}
.health-healthy{color:#1a7f37}.health-warning{color:#9a6700}.health-failed{color:#b42318}
.reason{font-size:12px;color:#57606a;font-weight:normal}
svg{max-width:100%;height:auto;display:block;margin:6px 0}
.scroll{overflow-x:auto}svg.topology{max-width:none}
svg text{font-family:sans-serif}
.plot{fill:#fbfcfd;stroke:#d0d7de}
.grid{stroke:#e6e9ec;stroke-width:1}
.tick{font-size:11px;fill:#57606a}
.empty{font-size:14px;fill:#8c959f}
.rpo-target{stroke:#b42318;stroke-width:1.5;stroke-dasharray:6 4}
.target-label{font-size:11px;fill:#b42318}
.rpo-line{fill:none;stroke:#8cb4e0;stroke-width:1.2}
.rpo-point{fill:#0969da;stroke:#fff;stroke-width:1}
.rpo-point.breach{fill:#b42318}
.cycle-failed{stroke:#b42318;stroke-width:2}
.cycle-bar{fill:#0969da}.cycle-bar.kind-full{fill:#8250df}.cycle-bar.kind-resync{fill:#bf8700}
.rto-bar{fill:#1a7f37}
.site{fill:#f6f8fa;stroke:#8c959f;stroke-dasharray:5 3}
.site-label{font-size:13px;font-weight:bold;fill:#57606a}
.platform rect{fill:#fff;stroke:#0969da;stroke-width:1.5}
.platform-name{font-size:13px;font-weight:bold;fill:#1d232a}
.platform-kind{font-size:11px;fill:#57606a}
.protection-arrow path{fill:none;stroke-width:2}
.protection-arrow.health-healthy path{stroke:#1a7f37}
.protection-arrow.health-warning path{stroke:#bf8700}
.protection-arrow.health-failed path{stroke:#b42318}
.arrowhead-healthy{fill:#1a7f37}.arrowhead-warning{fill:#bf8700}.arrowhead-failed{fill:#b42318}
.arrow-label{font-size:12px;fill:#1d232a;paint-order:stroke;stroke:#fff;stroke-width:4px}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
code{font-size:12px}
"""

# Everything the document needs is inline; this forbids the browser to load anything else.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_report(
    platforms: Sequence[PlatformInfo],
    protections: Sequence[ProtectionRecord],
    cycles_by_protection: Mapping[str, Sequence[CycleRecord]],
    rtos_by_protection: Mapping[str, Sequence[TestFailoverReport]] | None,
    generated_at: datetime,
    window: timedelta,
    *,
    last_point_at: Mapping[str, datetime | None] | None = None,
    rto_note: str = "",
) -> str:
    """The SLA report as one self-contained HTML document.

    ``cycles_by_protection``: the catalog's cycles per protection (those started
    before ``generated_at - window`` are left out here). ``rtos_by_protection``:
    the test-failover reports per protection; ``None`` when they could not be
    read (``rto_note`` says why), a missing protection means its Replication
    workflow did not answer, an empty list that it was never tested.
    ``last_point_at``: the instant of each protection's newest point in the
    catalog (default: the newest committed cycle's instant in the window).
    """
    generated_at = _utc(generated_at)
    since = generated_at - window
    rows = [
        _summarize(
            rec, cycles_by_protection.get(rec.name, ()), since,
            None if rtos_by_protection is None else rtos_by_protection.get(rec.name),
            (last_point_at or {}).get(rec.name),
        )
        for rec in sorted(protections, key=lambda p: p.name)
    ]
    stamp = generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>transcend SLA report {_e(stamp)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>transcend SLA report</h1>",
        f'<p class="meta">Generated {_e(stamp)}; window {_e(format_duration(window.total_seconds()))} '
        f"(cycles started from {_e(since.strftime('%Y-%m-%d %H:%M:%S'))} UTC); "
        f"{len(platforms)} platform(s) on {len({p.site for p in platforms})} site(s), "
        f"{len(protections)} protection(s).</p>",
        "<h2>Summary</h2>",
    ]
    if rows:
        out.append(_summary_table(rows, generated_at))
        out.append('<p class="note">RPO achieved: from the previous point\'s instant to the '
                   "commit of the next, per committed cycle in the window (p50/p95 nearest rank). "
                   "Last point age: how much would be lost by a disaster now. Values over the "
                   "protection's RPO target are in red.</p>")
    else:
        out.append('<p class="note">No protections in the catalog.</p>')
    out += ["<h2>Topology</h2>", _topology_svg(platforms, protections),
            "<h2>Recovery time (test failovers)</h2>",
            _rto_section(rows, rtos_by_protection is not None, rto_note),
            "<h2>Protections</h2>"]
    for s in rows:
        rec = s.record
        pol = rec.spec.policy
        missing_rto = rtos_by_protection is not None and rec.name not in rtos_by_protection
        out += [
            f'<section id="p-{_e(rec.name)}"><h3>{_e(rec.name)}</h3>',
            f'<p class="meta">{_e(rec.spec.source_platform)} → {_e(rec.spec.target_platform)}; '
            f"VMs {_e(', '.join(rec.spec.workloads))}; RPO target {_e(format_duration(pol.rpo_seconds))}"
            f"{' (continuous)' if pol.continuous else ''}; retention {_e(pol.retention.describe())}; "
            f"{len(s.committed)} committed and {len(s.failed)} failed cycle(s) in the window"
            f"{'; RTO unknown: its Replication workflow did not answer' if missing_rto else ''}.</p>",
            _rpo_chart(s, since, generated_at),
            '<p class="legend note">RPO per committed cycle <span style="background:#0969da"></span>'
            'within target <span style="background:#b42318"></span>over target / failed cycle '
            "(tick on the time axis)</p>",
            _bytes_chart(s),
            '<p class="legend note">bytes written <span style="background:#8250df"></span>full '
            '<span style="background:#0969da"></span>incremental '
            '<span style="background:#bf8700"></span>resync</p>',
        ]
        if s.failed:
            out.append("<table><thead><tr><th>failed cycle</th><th>started (UTC)</th><th>error</th>"
                       "</tr></thead><tbody>")
            for c in s.failed[-10:]:
                out.append(f"<tr><td><code>{_e(c.cycle_id)}</code></td>"
                           f"<td>{_e(_utc(c.started_at).strftime('%Y-%m-%d %H:%M:%S'))}</td>"
                           f"<td>{_e(c.error or '-')}</td></tr>")
            out.append("</tbody></table>")
            if len(s.failed) > 10:
                out.append(f'<p class="note">{len(s.failed) - 10} earlier failed cycle(s) not listed.</p>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)
