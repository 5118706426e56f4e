"""Commands that describe the estate: topology and the SLA report."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from transcend.api import (
    ReplicationStatus,
    TestFailoverReport,
    replication_id,
)
from transcend.cli.common import (
    _catalog,
    _client,
    fail,
    main,
)
from transcend.models import (
    parse_duration,
)


@main.command()
def topology() -> None:
    """Sites, platforms and the protections between them, as a tree."""
    from transcend.report import topology_tree

    cat = _catalog()
    click.echo(topology_tree(cat.list_platforms(), cat.list_protections()))


# The report must not hang on an unreachable Temporal: RTOs are the only thing it needs
# Temporal for, so connecting and each query get this long before they are skipped.
RTO_TIMEOUT_SECONDS = 5.0
# Far more cycles than a week at the shortest RPO (10 s) holds, so the window decides.
REPORT_CYCLE_LIMIT = 100_000


async def _test_failover_reports(
    names: list[str], timeout: float
) -> tuple[dict[str, list[TestFailoverReport]] | None, str]:
    """Each protection's last test failover, from its Replication workflow's ``status``
    query (test-failover reports live there, not in the catalog). ``(None, why)`` when
    Temporal cannot be reached; a protection whose workflow does not answer is left out
    of the mapping and named in the note."""
    from transcend.config import settings

    address = settings().temporal_address
    try:
        client = await asyncio.wait_for(_client(), timeout)
    except TimeoutError:
        return None, f"Temporal at {address} did not answer within {timeout:.0f}s"
    except Exception as e:  # any connect failure only costs the report its RTO section
        # connect() already names the address and what to do.
        return None, str(e) or f"cannot reach Temporal at {address} ({type(e).__name__})"

    async def one(name: str) -> ReplicationStatus:
        return await client.get_workflow_handle(replication_id(name)).query(
            "status", result_type=ReplicationStatus, rpc_timeout=timedelta(seconds=timeout))

    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    out: dict[str, list[TestFailoverReport]] = {}
    silent: list[str] = []
    for name, res in zip(names, results, strict=True):
        if isinstance(res, BaseException):
            silent.append(name)
        else:
            out[name] = [res.last_test_failover] if res.last_test_failover else []
    note = (f"RTO unknown for {', '.join(silent)}: the Replication workflow did not answer "
            "(not running, or no worker)") if silent else ""
    return out, note


@main.command()
@click.option("--out", "out_path", default="transcend-report.html", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="HTML file to write")
@click.option("--window", default="7d", show_default=True,
              help="report the cycles started within this long (e.g. 24h, 7d, 4w)")
def report(out_path: Path, window: str) -> None:
    """Write the SLA report: one self-contained HTML file with RPO achieved over time,
    cycle sizes, RTOs and a topology picture (no JavaScript, no external references)."""
    from transcend.report import render_report

    try:
        window_seconds = parse_duration(window)
    except ValueError as e:
        fail(f"--window: {e}")
        return
    if window_seconds <= 0:
        fail("--window must be longer than 0s (e.g. 7d)")
    cat = _catalog()
    now = datetime.now(UTC)
    since = now - timedelta(seconds=window_seconds)
    platforms = cat.list_platforms()
    protections = cat.list_protections()
    cycles = {p.name: cat.cycles(p.name, since=since, limit=REPORT_CYCLE_LIMIT) for p in protections}
    last_point_at: dict[str, datetime | None] = {}
    for p in protections:
        latest = cat.latest_point(p.name)
        last_point_at[p.name] = latest.instant if latest else None
    rtos: dict[str, list[TestFailoverReport]] | None = {}
    note = ""
    if protections:
        rtos, note = asyncio.run(_test_failover_reports([p.name for p in protections],
                                                        RTO_TIMEOUT_SECONDS))
    document = render_report(platforms, protections, cycles, rtos, now,
                             timedelta(seconds=window_seconds), last_point_at=last_point_at,
                             rto_note=note)
    # Write next to the destination and rename, so a reader never sees half a report.
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        tmp.write_text(document, encoding="utf-8")
        os.replace(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write the report to {out_path}: {e.strerror or e}; choose another --out")
        return
    if note:
        click.echo(f"note: {note}", err=True)
    click.echo(str(out_path.resolve()))
