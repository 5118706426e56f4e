"""``transcend``: a thin Temporal client and catalog reader for people.

Everything that changes replication goes through the documented workflows
(docs/workflow-api.md), exactly as other systems would start them; the CLI only
reads the catalog directly and writes platform definitions into it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from transcend.api import (
    BOOT_WORKFLOW,
    CONTROL_TASK_QUEUE,
    CYCLE_WORKFLOW,
    FAILBACK_WORKFLOW,
    FAILOVER_WORKFLOW,
    MIGRATION_WORKFLOW,
    REPLICATION_WORKFLOW,
    TEST_FAILOVER_WORKFLOW,
    VERIFY_WORKFLOW,
    BootInput,
    BootResult,
    BootTier,
    ConvertMode,
    FailbackInput,
    FailbackStatus,
    FailoverInput,
    FailoverStatus,
    HealthCheck,
    PolicyChange,
    ReplicationInput,
    ReplicationStatus,
    TestFailoverInput,
    TestFailoverReport,
    TestFailoverStatus,
    VerifyInput,
    VerifyResult,
    boot_id,
    failback_id,
    failover_id,
    replication_id,
    test_failover_id,
    verify_id,
)
from transcend.guestprep import ReIpRule
from transcend.models import (
    PlatformKind,
    PlatformSpec,
    ProtectionPolicy,
    ProtectionSpec,
    RetentionPolicy,
    format_duration,
    parse_duration,
)

T = TypeVar("T")


def _catalog():  # type: ignore[no-untyped-def]
    from transcend.catalog import Catalog

    return Catalog.from_settings()


async def _client() -> Client:
    from transcend.client import connect

    return await connect()


def run_async(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            fail(f"{what} {v!r} must be KEY=VALUE")
        k, _, val = v.partition("=")
        out[k] = val
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _age(t: datetime | None) -> str:
    if t is None:
        return "-"
    return format_duration(max(0, (datetime.now(UTC) - t).total_seconds())) + " ago"


class _Group(click.Group):
    """Errors the operator can act on become one line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from temporalio.exceptions import WorkflowAlreadyStartedError

        from transcend.catalog import CatalogError

        try:
            return super().invoke(ctx)
        except CatalogError as e:
            fail(str(e))
        except WorkflowAlreadyStartedError as e:
            fail(f"{e.workflow_id} is already running (use `transcend status`, `policy` or "
                 "`unprotect` to change it)")
        except RPCError as e:
            fail(f"Temporal: {e.message} (is the server at TRANSCEND_TEMPORAL_ADDRESS reachable?)")


@click.group(cls=_Group)
def main() -> None:
    """transcend: replicate VMs across platforms and recover them."""


# ------------------------------------------------------------------ server


@main.command()
@click.option("--port", default=7233, show_default=True)
@click.option("--ui-port", default=8233, show_default=True)
def server(port: int, ui_port: int) -> None:
    """Run the embedded Temporal dev server (SQLite file under $TRANSCEND_HOME)."""
    from temporal.devserver import start_dev_server
    from transcend.config import settings

    s = start_dev_server(settings().home / "temporal.db", port=port, ui_port=ui_port)
    click.echo(f"Temporal dev server on {s.address}; UI {s.ui_url}")
    try:
        s.process.wait()
    except KeyboardInterrupt:
        s.stop()


# ------------------------------------------------------------------ platforms


@main.group()
def platform() -> None:
    """Platforms: endpoints with credentials (kept encrypted in the catalog)."""


@platform.command("add")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice([k.value for k in PlatformKind]))
@click.option("--site", default="local", show_default=True)
@click.option("--config", "config", multiple=True, help="KEY=VALUE (e.g. uri=qemu:///system)")
@click.option("--secret", "secret", multiple=True, help="KEY=VALUE credential, stored encrypted")
@click.option("--replace", is_flag=True)
def platform_add(name: str, kind: str, site: str, config: tuple[str, ...],
                 secret: tuple[str, ...], replace: bool) -> None:
    try:
        spec = PlatformSpec(name=name, kind=PlatformKind(kind), site=site,
                            config=_pairs(config, "--config"), secret=_pairs(secret, "--secret"))
    except ValidationError as e:
        fail(str(e))
        return
    try:
        info = _catalog().add_platform(spec, replace=replace)
    except Exception as e:
        fail(str(e))
        return
    click.echo(f"platform {info.name} ({info.kind.value}, site {info.site}) saved")


@platform.command("list")
def platform_list() -> None:
    for p in _catalog().list_platforms():
        click.echo(f"{p.name:20} {p.kind.value:10} site={p.site:10} {json.dumps(p.config)}")


@main.command()
@click.argument("platform_name")
def workloads(platform_name: str) -> None:
    """List the VMs a source platform offers."""
    from connectors.registry import source_for

    cat = _catalog()
    try:
        src = source_for(cat.get_platform(platform_name), cat.platform_secret(platform_name))
        items = src.inventory()
    except Exception as e:
        fail(str(e))
        return
    for w in items:
        disks = ", ".join(f"{d.id}:{_human_bytes(d.size)}" for d in w.disks)
        click.echo(f"{w.name:24} {w.power_state:9} cpus={w.cpus} mem={w.memory_mib}MiB "
                   f"fw={w.firmware} disks=[{disks}] id={w.ref.id}")


# ------------------------------------------------------------------ protections


@main.command()
@click.argument("name")
@click.option("--source", "source", required=True, help="source platform")
@click.option("--vm", "vms", multiple=True, required=True, help="VM name or id (repeat for a group)")
@click.option("--target", "target", required=True, help="target platform")
@click.option("--rpo", default="15m", show_default=True, help="e.g. 60s, 15m, 1h")
@click.option("--retention", default="all 4h, hourly 2d, daily 2w", show_default=True)
@click.option("--continuous", is_flag=True, help="start the next cycle as one commits")
@click.option("--bandwidth", default=None, help="bytes/s limit, e.g. 100M")
@click.option("--test-failover-every", "drill", default=None,
              help="alert when no test failover succeeded for this long, e.g. 30d")
@click.option("--priority", type=click.Choice(["critical", "normal", "low"]), default=None,
              help="weight in the site bandwidth limit (critical 4, normal 2, low 1)")
@click.option("--transfer", type=click.Choice(["auto", "local", "push", "pull"]), default=None,
              help="how data crosses between sites: auto (local on one site, push across); "
                   "pull when only the source site can be dialled")
@click.option("--connections", type=int, default=None,
              help="NBD connections per disk stream (1-16, default 4; more for long fat links)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait for the first point")
@click.option("--timeout", default=3600, show_default=True)
@run_async
async def protect(name: str, source: str, vms: tuple[str, ...], target: str, rpo: str,
                  retention: str, continuous: bool, bandwidth: str | None, drill: str | None,
                  priority: str | None, transfer: str | None, connections: int | None, wait: bool,
                  timeout: int) -> None:
    """Protect VMs: register, schedule cycles at the RPO and take the first point."""
    try:
        policy = ProtectionPolicy.model_validate({
            "rpo_seconds": parse_duration(rpo), "retention": RetentionPolicy.parse(retention),
            "continuous": continuous,
            "bandwidth_bytes_per_s": _parse_size(bandwidth) if bandwidth else None,
            "test_failover_every_seconds": parse_duration(drill) if drill else None,
            **({"priority": priority} if priority else {}),
            **({"transfer": transfer} if transfer else {}),
            **({"connections": connections} if connections is not None else {}),
        })
        spec = ProtectionSpec(name=name, source_platform=source, workloads=list(vms),
                              target_platform=target, policy=policy)
    except (ValidationError, ValueError) as e:
        fail(str(e))
        return
    client = await _client()
    try:
        handle = await client.start_workflow(
            REPLICATION_WORKFLOW, ReplicationInput(protection=name, spec=spec),
            id=replication_id(name), task_queue=CONTROL_TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        )
    except RPCError as e:
        fail(f"cannot start the protection: {e.message}")
        return
    click.echo(f"protecting {name}: workflow {handle.id} (Temporal UI: search "
               f"TranscendProtection=\"{name}\")")
    if wait:
        await _wait_first_point(client, name, timeout)


async def _wait_first_point(client: Client, name: str, timeout: int) -> None:
    handle = client.get_workflow_handle(replication_id(name))
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        desc = await handle.describe()
        if desc.status != WorkflowExecutionStatus.RUNNING:
            try:
                await handle.result()
            except WorkflowFailureError as e:
                fail(f"protection {name} failed: {_failure_text(e)}")
            return
        try:
            st = await handle.query("status", result_type=ReplicationStatus)
        except RPCError:
            await asyncio.sleep(1)
            continue
        if st.last_point_id:
            click.echo(f"first point {st.last_point_id} committed")
            return
        await _print_progress(client, name)
        await asyncio.sleep(2)
    fail(f"no point within {timeout}s; see `transcend status {name}`")


def _failure_text(e: BaseException) -> str:
    parts = []
    cur: BaseException | None = e
    while cur is not None:
        if str(cur) and str(cur) not in parts:
            parts.append(str(cur))
        cur = cur.__cause__
    return ": ".join(parts)


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    return int(float(t[: len(t) - len(unit)]) * units[unit])


async def running_cycle_progress(client: Client, name: str) -> list[dict[str, Any]]:
    """Live progress of a protection's running cycle: its phase (workflow query) and
    every stream activity's heartbeat (bytes, rate, ETA)."""
    out: list[dict[str, Any]] = []
    query = (f'WorkflowType="{CYCLE_WORKFLOW}" AND ExecutionStatus="Running" '
             f'AND TranscendProtection="{name}"')
    async for wf in client.list_workflows(query):
        handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
        try:
            phase = await handle.query("progress")
        except RPCError:
            phase = {}
        desc = await handle.describe()
        for pa in desc.raw_description.pending_activities:
            if pa.activity_type.name != "stream.disk" or not pa.heartbeat_details.payloads:
                continue
            details = await client.data_converter.decode(pa.heartbeat_details.payloads)
            out.append({"workflow": wf.id, "phase": phase.get("phase"), **details[0]})
        if not out:
            out.append({"workflow": wf.id, "phase": phase.get("phase")})
    return out


async def _print_progress(client: Client, name: str) -> None:
    for p in await running_cycle_progress(client, name):
        if "bytes_total" in p:
            done = p["bytes_read"] + p["bytes_zero"] + p["bytes_skipped"]
            eta = p.get("eta_seconds")
            click.echo(
                f"  {p['phase']}: {_human_bytes(done)} / {_human_bytes(p['bytes_total'])} "
                f"at {_human_bytes(p['rate'])}/s, ETA {format_duration(eta) if eta else '-'}"
            )
        else:
            click.echo(f"  cycle {p['workflow']}: {p['phase']}")


@main.command()
@click.argument("name", required=False)
@run_async
async def status(name: str | None) -> None:
    """Protections with health, RPO target/achieved, last point and live progress."""
    cat = _catalog()
    records = [cat.get_protection(name)] if name else cat.list_protections()
    client = await _client()
    click.echo(f"{'PROTECTION':20} {'SOURCE->TARGET':24} {'STATE':11} {'HEALTH':8} "
               f"{'RPO tgt/last/p95':20} {'LAST POINT':14} CYCLES ok/failed")
    for rec in records:
        try:
            st = await client.get_workflow_handle(replication_id(rec.name)).query(
                "status", result_type=ReplicationStatus)
        except RPCError:
            st = None
        pair = f"{rec.spec.source_platform}->{rec.spec.target_platform}"
        if st is None:
            click.echo(f"{rec.name:20} {pair:24} {rec.state.value:11} {rec.health.value:8} "
                       f"(workflow not running)")
            continue
        rpo = (f"{format_duration(st.rpo_target_seconds)}/"
               f"{format_duration(st.rpo_last_seconds) if st.rpo_last_seconds else '-'}/"
               f"{format_duration(st.rpo_p95_seconds) if st.rpo_p95_seconds else '-'}")
        click.echo(f"{rec.name:20} {pair:24} {st.state.value:11} {st.health.value:8} {rpo:20} "
                   f"{_age(st.last_point_instant):14} {st.cycles_ok}/{st.cycles_failed}")
        if st.health.value != "healthy":
            click.echo(f"  {st.health_reason}")
        if st.last_test_failover is not None:
            t = st.last_test_failover
            result = (f"RTO {t.rto_seconds:.1f}s" if t.ok and t.rto_seconds is not None
                      else f"FAILED: {t.error}")
            click.echo(f"  last test failover {_age(t.started_at)} from point {t.point_id}: {result}")
        if st.test_failover_due_at is not None:
            when = st.test_failover_due_at.strftime("%Y-%m-%d %H:%M UTC")
            click.echo(f"  test failover OVERDUE since {when}: run `transcend test-failover {rec.name}`"
                       if st.test_failover_overdue else f"  next test failover due {when}")
        await _print_progress(client, rec.name)


@main.command()
@click.argument("name")
def points(name: str) -> None:
    """Recovery points of a protection, oldest first."""
    cat = _catalog()
    try:
        pts = cat.points(name)
    except Exception as e:
        fail(str(e))
        return
    for p in pts:
        click.echo(f"{p.id:36} seq={p.seq:<5} {p.instant.isoformat(timespec='seconds')} "
                   f"{p.kind.value:11} {p.consistency:11} written={_human_bytes(p.bytes_written)}")


async def _update(name: str, update: str, arg: Any = None) -> ReplicationStatus:
    client = await _client()
    handle = client.get_workflow_handle(replication_id(name))
    try:
        if arg is None:
            return await handle.execute_update(update, result_type=ReplicationStatus)
        return await handle.execute_update(update, arg, result_type=ReplicationStatus)
    except RPCError as e:
        fail(f"protection {name!r}: {e.message}")
        raise
    except Exception as e:
        fail(f"protection {name!r}: {_failure_text(e)}")
        raise


@main.command()
@click.argument("name")
@click.option("--wait/--no-wait", default=False)
@run_async
async def sync(name: str, wait: bool) -> None:
    """Start a cycle now (queued behind a running one)."""
    st = await _update(name, "sync_now")
    click.echo(f"cycle requested for {name}")
    if wait:
        client = await _client()
        before = st.cycles_ok + st.cycles_failed
        handle = client.get_workflow_handle(replication_id(name))
        while True:
            st = await handle.query("status", result_type=ReplicationStatus)
            if st.cycles_ok + st.cycles_failed > before:
                click.echo(f"last point {st.last_point_id}; health {st.health.value}")
                return
            await _print_progress(client, name)
            await asyncio.sleep(2)


@main.command()
@click.argument("name")
@run_async
async def pause(name: str) -> None:
    await _update(name, "pause")
    click.echo(f"{name} paused")


@main.command()
@click.argument("name")
@run_async
async def resume(name: str) -> None:
    await _update(name, "resume")
    click.echo(f"{name} resumed")


@main.command()
@click.argument("name")
@click.option("--rpo")
@click.option("--retention")
@click.option("--continuous/--scheduled", default=None)
@click.option("--test-failover-every", "drill", default=None,
              help="test-failover cadence, e.g. 30d; 'off' for none")
@click.option("--bandwidth", default=None, help="bytes/s limit of each disk stream, e.g. 100M; "
              "'off' for none")
@click.option("--priority", type=click.Choice(["critical", "normal", "low"]), default=None,
              help="weight in the site bandwidth limit (critical 4, normal 2, low 1)")
@click.option("--transfer", type=click.Choice(["auto", "local", "push", "pull"]), default=None,
              help="how data crosses between sites: auto (local on one site, push across); "
                   "pull when only the source site can be dialled")
@click.option("--connections", type=int, default=None,
              help="NBD connections per disk stream (1-16, default 4; more for long fat links)")
@click.option("--reip", "reip", multiple=True, metavar="FROM_CIDR=TO_CIDR",
              help="runbook re-IP rule for failover and migration (repeat; 'none' clears)")
@click.option("--test-reip", "test_reip", multiple=True, metavar="FROM_CIDR=TO_CIDR",
              help="re-IP rule for test failovers (repeat; 'none' clears)")
@run_async
async def policy(name: str, rpo: str | None, retention: str | None, continuous: bool | None,
                 drill: str | None, bandwidth: str | None, priority: str | None,
                 transfer: str | None, connections: int | None, reip: tuple[str, ...],
                 test_reip: tuple[str, ...]) -> None:
    """Change a protection's policy (validated before anything changes)."""
    current = _catalog().get_protection(name).spec.policy
    data = current.model_dump()
    try:
        if rpo:
            data["rpo_seconds"] = parse_duration(rpo)
        if retention:
            data["retention"] = retention
        if continuous is not None:
            data["continuous"] = continuous
        if drill:
            data["test_failover_every_seconds"] = None if drill == "off" else parse_duration(drill)
        if bandwidth:
            data["bandwidth_bytes_per_s"] = None if bandwidth == "off" else _parse_size(bandwidth)
        if priority:
            data["priority"] = priority
        if transfer:
            data["transfer"] = transfer
        if connections is not None:
            data["connections"] = connections
        for key, rules in (("reip", reip), ("test_reip", test_reip)):
            if rules:
                data[key] = [] if rules == ("none",) else parse_reip(rules)
        new = ProtectionPolicy.model_validate(data)
    except (ValidationError, ValueError) as e:
        fail(str(e))
        return
    await _update(name, "set_policy", PolicyChange(policy=new))
    click.echo(f"{name}: rpo {format_duration(new.rpo_seconds)}, retention {new.retention.describe()}")


@main.command("test-failover")
@click.argument("protection")
@click.option("--point", "point_id", default=None, help="point id (default: the newest)")
@click.option("--console-pattern", default="",
              help="regex that must appear on the VM's serial console (default: VM started is enough)")
@click.option("--health-timeout", default="10m", show_default=True)
@click.option("--keep", default="4h", show_default=True, help="clean up by itself after this long")
@click.option("--network", default="", help="target network (default: isolated)")
@click.option("--tier", "tiers", multiple=True, metavar="VM[,VM...][@DELAY]",
              help="groups: a boot tier, in order (repeat); its VMs boot together, the next "
                   "tier after their health checks and DELAY (e.g. db@30s, app,web)")
@click.option("--reip", "reip", multiple=True, metavar="FROM_CIDR=TO_CIDR",
              help="re-IP static addresses before the first boot, e.g. 10.1.2.0/24=192.168.9.0/24 "
                   "(repeat)")
@click.option("--convert", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="virt-v2v-in-place conversion before the first boot "
                                      "(auto: when the hypervisors differ)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait for the health check")
@run_async
async def test_failover(protection: str, point_id: str | None, console_pattern: str,
                        health_timeout: str, keep: str, network: str, tiers: tuple[str, ...],
                        reip: tuple[str, ...], convert: ConvertMode, wait: bool) -> None:
    """Boot a point as a throw-away VM in an isolated network and measure the RTO.
    Replication continues; `transcend cleanup PROTECTION` ends the test."""
    try:
        inp = TestFailoverInput(
            protection=protection, point_id=point_id, network=network,
            keep_seconds=parse_duration(keep), boot_order=parse_tiers(tiers),
            reip=parse_reip(reip), convert=convert,
            health=HealthCheck(kind="console" if console_pattern else "none", pattern=console_pattern,
                               timeout_seconds=parse_duration(health_timeout)),
        )
    except (ValidationError, ValueError) as e:
        fail(str(e))
        return
    client = await _client()
    handle = await client.start_workflow(
        TEST_FAILOVER_WORKFLOW, inp, id=test_failover_id(protection), task_queue=CONTROL_TASK_QUEUE,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    click.echo(f"test failover of {protection} started: workflow {handle.id}")
    if not wait:
        return
    while True:
        desc = await handle.describe()
        if desc.status != WorkflowExecutionStatus.RUNNING:
            try:
                await handle.result()
            except WorkflowFailureError as e:
                fail(_failure_text(e))
            return
        st = await handle.query("progress", result_type=TestFailoverStatus)
        if st.phase == "running":
            vm = st.instance.name if st.instance else "?"
            click.echo(f"VM {vm} is up from point {st.point_id}: RTO {st.rto_seconds:.1f}s; "
                       f"console {st.instance.console_log if st.instance else '-'}")
            click.echo(f"end the test with: transcend cleanup {protection}")
            return
        await asyncio.sleep(1)


@main.command()
@click.argument("protection")
@run_async
async def cleanup(protection: str) -> None:
    """End a running test failover: its VM and overlays are removed."""
    client = await _client()
    handle = client.get_workflow_handle(test_failover_id(protection), result_type=TestFailoverStatus)
    try:
        await handle.signal("cleanup")
        st = await handle.result()
    except RPCError as e:
        fail(f"no test failover of {protection!r} is running ({e.message})")
        return
    except WorkflowFailureError as e:
        fail(_failure_text(e))
        return
    click.echo(f"test failover of {protection} cleaned up (RTO was "
               f"{st.rto_seconds:.1f}s)" if st.rto_seconds is not None else f"{protection}: cleaned up")


def parse_reip(rules: tuple[str, ...]) -> list[ReIpRule]:
    """``--reip 10.1.2.0/24=192.168.9.0/24`` -> re-IP rules."""
    out = []
    for r in rules:
        a, sep, b = r.partition("=")
        if not sep:
            raise ValueError(f"--reip {r!r}: write FROM_CIDR=TO_CIDR, e.g. 10.1.2.0/24=192.168.9.0/24")
        out.append(ReIpRule(from_cidr=a.strip(), to_cidr=b.strip()))
    return out


def parse_tiers(tiers: tuple[str, ...]) -> list[BootTier]:
    """``--tier db@30s --tier app,web`` -> boot tiers (empty: the protection's order)."""
    out = []
    for t in tiers:
        vms, _, delay = t.partition("@")
        names = [v.strip() for v in vms.split(",") if v.strip()]
        if not names:
            raise ValueError(f"--tier {t!r} names no VM; write VM[,VM...][@DELAY]")
        out.append(BootTier(vms=names, delay_seconds=parse_duration(delay) if delay else 0))
    return out


def _health(console_pattern: str, health_timeout: str) -> HealthCheck:
    return HealthCheck(kind="console" if console_pattern else "none", pattern=console_pattern,
                       timeout_seconds=parse_duration(health_timeout))


async def _follow(handle: Any, status_type: type[Any], describe: Callable[[Any], str]) -> Any:
    """Print the operation's phase as it changes until the workflow ends; its result."""
    last = ""
    while True:
        desc = await handle.describe()
        try:
            st = await handle.query("progress", result_type=status_type)
            line = describe(st)
            if line != last:
                click.echo(f"  {line}")
                last = line
        except RPCError:
            pass
        if desc.status != WorkflowExecutionStatus.RUNNING:
            try:
                return await handle.result()
            except WorkflowFailureError as e:
                fail(_failure_text(e))
        await asyncio.sleep(1)


def _failover_line(st: FailoverStatus) -> str:
    extra = f" point {st.point_id}" if st.point_id else ""
    if st.final_cycle:
        extra += f"; final cycle {st.final_cycle}"
    return f"{st.phase}{extra}"


async def _start_failover(workflow: str, inp: FailoverInput, wait: bool) -> None:
    client = await _client()
    try:
        handle = await client.start_workflow(
            workflow, inp, id=failover_id(inp.protection), task_queue=CONTROL_TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE, result_type=FailoverStatus)
    except WorkflowAlreadyStartedError:
        fail(f"a failover or migration of {inp.protection!r} is already running")
        return
    click.echo(f"{workflow.lower()} of {inp.protection} started: workflow {handle.id}")
    if not wait:
        return
    st: FailoverStatus = await _follow(handle, FailoverStatus, _failover_line)
    vm = ", ".join(v.instance.name for v in st.vms) or (st.instance.name if st.instance else "?")
    rto = f"RTO {st.rto_seconds:.1f}s" if st.rto_seconds is not None else ""
    click.echo(f"{inp.protection}: production now runs as {vm} from point {st.point_id}; {rto}")
    if st.error:
        click.echo(f"  warning: {st.error}")
    click.echo(f"bring it home with: transcend failback {inp.protection}")


_failover_options = [
    click.option("--name", default="", help="production VM name at the target "
                 "(default: the source VM's; with -dr on the same host)"),
    click.option("--network", default="", help="target network (default: the source NICs')"),
    click.option("--console-pattern", default="", help="health check: regex on the serial console"),
    click.option("--health-timeout", default="10m", show_default=True),
    click.option("--shutdown-timeout", default="5m", show_default=True),
    click.option("--tier", "tiers", multiple=True, metavar="VM[,VM...][@DELAY]",
                 help="groups: a boot tier, in order (repeat); sources shut down in the "
                      "reverse order"),
    click.option("--reip", "reip", multiple=True, metavar="FROM_CIDR=TO_CIDR",
                 help="re-IP static addresses before the first boot (repeat)"),
    click.option("--convert", type=click.Choice(["auto", "always", "never"]), default="auto",
                 show_default=True, help="virt-v2v-in-place conversion before the first boot"),
    click.option("--wait/--no-wait", default=True, show_default=True),
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


@main.command()
@click.argument("protection")
@click.option("--point", "point_id", default=None, help="point id (default: the newest)")
@click.option("--final-cycle/--no-final-cycle", default=True, show_default=True,
              help="replicate once more first if the source answers")
@click.option("--shutdown-source/--no-shutdown-source", default=True, show_default=True)
@_with(_failover_options)
@run_async
async def failover(protection: str, point_id: str | None, final_cycle: bool,
                   shutdown_source: bool, name: str, network: str, console_pattern: str,
                   health_timeout: str, shutdown_timeout: str, tiers: tuple[str, ...],
                   reip: tuple[str, ...], convert: ConvertMode, wait: bool) -> None:
    """Unplanned failover: run the protection's VMs at the target from a point."""
    try:
        inp = FailoverInput(protection=protection, point_id=point_id, final_cycle=final_cycle,
                            shutdown_source=shutdown_source, name=name, network=network,
                            boot_order=parse_tiers(tiers), reip=parse_reip(reip), convert=convert,
                            shutdown_timeout_seconds=parse_duration(shutdown_timeout),
                            health=_health(console_pattern, health_timeout))
    except (ValidationError, ValueError) as e:
        fail(str(e))
        return
    await _start_failover(FAILOVER_WORKFLOW, inp, wait)


@main.command()
@click.argument("protection")
@_with(_failover_options)
@run_async
async def migrate(protection: str, name: str, network: str, console_pattern: str,
                  health_timeout: str, shutdown_timeout: str, tiers: tuple[str, ...],
                  reip: tuple[str, ...], convert: ConvertMode, wait: bool) -> None:
    """Planned migration: shut the source down cleanly, replicate the last changes, run
    the VMs at the target. Nothing the guests wrote is lost."""
    try:
        inp = FailoverInput(protection=protection, planned=True, name=name, network=network,
                            boot_order=parse_tiers(tiers), reip=parse_reip(reip), convert=convert,
                            shutdown_timeout_seconds=parse_duration(shutdown_timeout),
                            health=_health(console_pattern, health_timeout))
    except (ValidationError, ValueError) as e:
        fail(str(e))
        return
    await _start_failover(MIGRATION_WORKFLOW, inp, wait)


def _failback_line(st: FailbackStatus) -> str:
    return (f"{st.phase}: {len(st.passes)} pass(es), "
            f"{st.bytes_written / 2**20:.1f} MiB written back")


@main.command()
@click.argument("protection")
@click.option("--migrate-now/--keep-syncing", default=True, show_default=True,
              help="keep syncing until `transcend failback PROTECTION --migrate` instead")
@click.option("--migrate", "signal_migrate", is_flag=True,
              help="tell a running failback to migrate back now")
@click.option("--sync-interval", default="5m", show_default=True)
@click.option("--start-original/--no-start-original", default=True, show_default=True)
@click.option("--keep-failed-over", is_flag=True, help="leave the failed-over VM defined, off")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="compare both VMs' disks before the original starts")
@click.option("--wait/--no-wait", default=True, show_default=True)
@run_async
async def failback(protection: str, migrate_now: bool, signal_migrate: bool, sync_interval: str,
                   start_original: bool, keep_failed_over: bool, verify: bool, wait: bool) -> None:
    """Bring a failed-over VM home: write back only what changed, then migrate back."""
    client = await _client()
    if signal_migrate:
        handle = client.get_workflow_handle(failback_id(protection), result_type=FailbackStatus)
        try:
            await handle.signal("migrate")
        except RPCError as e:
            fail(f"no failback of {protection!r} is running ({e.message})")
            return
    else:
        try:
            inp = FailbackInput(protection=protection, migrate_now=migrate_now,
                                sync_interval_seconds=parse_duration(sync_interval),
                                start_original=start_original, keep_failed_over=keep_failed_over,
                                verify=verify)
        except (ValidationError, ValueError) as e:
            fail(str(e))
            return
        try:
            handle = await client.start_workflow(
                FAILBACK_WORKFLOW, inp, id=failback_id(protection), task_queue=CONTROL_TASK_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE, result_type=FailbackStatus)
        except WorkflowAlreadyStartedError:
            fail(f"a failback of {protection!r} is already running; `--migrate` tells it to "
                 "migrate back now")
            return
        click.echo(f"failback of {protection} started: workflow {handle.id}")
    if not wait:
        return
    st: FailbackStatus = await _follow(handle, FailbackStatus, _failback_line)
    click.echo(f"{protection}: failed back ({st.bytes_written / 2**20:.1f} MiB written back in "
               f"{len(st.passes)} pass(es)); replication resumed")


@main.command()
@click.argument("name")
@run_async
async def unprotect(name: str) -> None:
    """Stop replicating (points stay on the target)."""
    await _update(name, "remove")
    click.echo(f"{name}: replication stopped; its points remain")


@main.command()
@click.argument("point_id")
@run_async
async def verify(point_id: str) -> None:
    """Re-read a point and compare every block with its manifest."""
    client = await _client()
    try:
        result: VerifyResult = await client.execute_workflow(
            VERIFY_WORKFLOW, VerifyInput(point_id=point_id), id=verify_id(point_id),
            task_queue=CONTROL_TASK_QUEUE, result_type=VerifyResult,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        )
    except WorkflowFailureError as e:
        fail(_failure_text(e))
        return
    blocks = sum(result.disks.values())
    click.echo(f"point {point_id}: OK, {blocks} blocks on {len(result.disks)} disk(s) match the manifest")


@main.command()
@click.argument("point_id")
@click.option("--name", required=True, help="name of the VM to create")
@click.option("--network", default="", help="target network (default: isolated)")
@run_async
async def boot(point_id: str, name: str, network: str) -> None:
    """Boot a VM from a point on a throw-away overlay (the point is never written)."""
    client = await _client()
    try:
        result: BootResult = await client.execute_workflow(
            BOOT_WORKFLOW, BootInput(point_id=point_id, name=name, network=network,
                                     isolated=not network),
            id=boot_id(point_id, name), task_queue=CONTROL_TASK_QUEUE, result_type=BootResult,
        )
    except (WorkflowFailureError, ValidationError) as e:
        fail(_failure_text(e))
        return
    click.echo(f"VM {result.name} running ({result.instance_id}); console log {result.console_log}")


# ------------------------------------------------------------------ topology and report


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


# ------------------------------------------------------------------ certificates (NBD over TLS)


def _pki_dir(directory: Path | None) -> Path:
    from transcend.config import settings

    return directory if directory is not None else settings().pki_dir


def _pki_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dir", "directory", default=None, type=click.Path(file_okay=False, path_type=Path),
        help="CA directory  [default: $TRANSCEND_HOME/pki]")(fn)


@main.group()
def ca() -> None:
    """Certificates for NBD over TLS between sites: a small CA, one x509 bundle per
    site (qemu-nbd, nbdkit and libnbd read it as is), PSK files as the alternative."""


@ca.command("init")
@click.option("--name", default="transcend CA", show_default=True, help="the CA's common name")
@click.option("--days", default=3650, show_default=True, type=int, help="validity")
@click.option("--force", is_flag=True, help="replace an existing CA (every site must be re-issued)")
@_pki_dir_option
def ca_init(name: str, days: int, force: bool, directory: Path | None) -> None:
    """Create the CA (EC P-256 key, mode 0600) under DIR/ca."""
    from transcend.pki import CA_CERT, PkiError, ca_dir, init_ca

    d = _pki_dir(directory)
    try:
        cert = init_ca(d, name, days, force=force)
    except PkiError as e:
        fail(str(e))
        return
    click.echo(f"CA {cert.subject.rfc4514_string()} valid until "
               f"{cert.not_valid_after_utc:%Y-%m-%d}: {ca_dir(d) / CA_CERT}")


@ca.command("issue")
@click.argument("site")
@click.option("--host", "hosts", multiple=True, help="DNS name peers dial to reach the site (repeat)")
@click.option("--ip", "ips", multiple=True, help="IP address peers dial to reach the site (repeat)")
@click.option("--days", default=825, show_default=True, type=int, help="validity")
@click.option("--force", is_flag=True, help="replace the site's existing certificates")
@_pki_dir_option
def ca_issue(site: str, hosts: tuple[str, ...], ips: tuple[str, ...], days: int, force: bool,
             directory: Path | None) -> None:
    """Issue SITE's server and client certificates into DIR/sites/SITE."""
    from transcend.pki import PkiError, issue_site

    try:
        b = issue_site(_pki_dir(directory), site, hosts, ips, days, force=force)
    except PkiError as e:
        fail(str(e))
        return
    sans = ", ".join(f"{n}" for n in [*hosts, *ips])
    click.echo(f"site {site}: server certificate for {sans} and client certificate, valid until "
               f"{b.server_cert.not_valid_after_utc:%Y-%m-%d}"
               + (" (cut to the CA's expiry)" if b.clamped else ""))
    click.echo(f"copy {b.directory} to site {site} (keys are 0600) and use it as\n"
               f"  qemu-nbd --object tls-creds-x509,id=tls0,dir={b.directory},endpoint=server "
               "--tls-creds tls0 ...\n"
               f"  nbdkit --tls=require --tls-verify-peer --tls-certificates={b.directory} ...\n"
               f"  client URI: nbds://HOST:PORT/EXPORT?tls-certificates={b.directory}")


@ca.command("psk")
@click.argument("site")
@click.option("--identity", default=None, help="PSK identity (TLS user name)  [default: SITE]")
@click.option("--force", is_flag=True, help="replace the site's existing key")
@_pki_dir_option
def ca_psk(site: str, identity: str | None, force: bool, directory: Path | None) -> None:
    """Write a pre-shared key for SITE to DIR/sites/SITE/keys.psk (identity:hexkey, 0600)."""
    from transcend.pki import PSK_FILE, PkiError, psk_new, site_dir

    try:
        info = psk_new(site_dir(_pki_dir(directory), site) / PSK_FILE, identity or site, force=force)
    except PkiError as e:
        fail(str(e))
        return
    click.echo(f"PSK for identity {info.identity}: {info.path}\n"
               "give the same file to both sides and use it as\n"
               f"  qemu-nbd --object tls-creds-psk,id=tls0,dir={info.path.parent},endpoint=server "
               "--tls-creds tls0 ...\n"
               f"  nbdkit --tls=require --tls-psk={info.path} ...\n"
               f"  client URI: nbds://{info.identity}@HOST:PORT/EXPORT?tls-psk-file={info.path}")


@ca.command("list")
@_pki_dir_option
def ca_list(directory: Path | None) -> None:
    """The CA and each site's certificates: subject, SANs, expiry, chain to the CA."""
    from transcend.pki import PkiError, describe

    try:
        entries = describe(_pki_dir(directory))
    except PkiError as e:
        fail(str(e))
        return
    for c in entries:
        who = "CA" if c.role == "ca" else f"{c.site} {c.role}"
        state = "ok" if c.chains else ("EXPIRED" if c.expired else "BROKEN")
        sans = f" [{', '.join(c.sans)}]" if c.sans else ""
        click.echo(f"{who:24} {state:7} until {c.not_after:%Y-%m-%d}  {c.subject}{sans}")
        for p in c.problems:
            click.echo(f"{'':24} ! {p}")


def entry() -> None:
    """The ``transcend`` command: run the CLI, then leave without interpreter
    finalization. The Temporal client's native runtime keeps threads that can abort
    a finalizing interpreter ("PyGILState_Release: thread state ... must be current",
    temporalio/sdk-python#300), turning a successful command into a SIGABRT. By
    now output is flushed and nothing else needs cleaning up."""
    code = 0
    try:
        main(standalone_mode=True)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)



@main.group()
def bandwidth() -> None:
    """This site's bandwidth: one limit shared by every copy its worker runs, divided
    by protection priority (critical 4 : normal 2 : low 1), with time-of-day windows.
    Changes reach running copies within a second."""


def _bandwidth_files() -> tuple[Path, Path]:
    from transcend.bandwidth import policy_path, status_path
    from transcend.config import settings

    home = settings().home
    return policy_path(home), status_path(home)


@bandwidth.command("show")
def bandwidth_show() -> None:
    """The policy, and what the worker uses now (its status file)."""
    import json

    from transcend.bandwidth import load_policy

    policy_file, status_file = _bandwidth_files()
    try:
        policy = load_policy(policy_file)
    except ValueError as e:
        fail(str(e))
        return

    def rate(v: float | None) -> str:
        return "unlimited" if v is None else f"{v / 2**20:.1f} MiB/s"

    click.echo(f"site limit: {rate(policy.limit_bytes_per_s)}  ({policy_file})")
    for w in policy.windows:
        click.echo(f"  window {','.join(w.days)} {w.start}-{w.end}: {rate(w.limit_bytes_per_s)}")
    click.echo("weights: " + ", ".join(f"{k.value} {v}" for k, v in policy.weights.items()))
    if not status_file.exists():
        click.echo("in use: no status yet (the worker writes it while copies run)")
        return
    st = json.loads(status_file.read_text())
    click.echo(f"in use at {st['at']}: {rate(st['in_use_bytes_per_s'])} of "
               f"{rate(st['limit_bytes_per_s'])} ({st['limit_from']})"
               + (f"; error: {st['error']}" if st.get("error") else ""))
    for s in st["streams"]:
        click.echo(f"  {s['name']:<40} {s['priority']:<8} share {rate(s['share_bytes_per_s'])}, "
                   f"rate {rate(s['rate_bytes_per_s'])}")


@bandwidth.command("set")
@click.option("--limit", default=None, help="site limit outside windows, bytes/s (100M, 1G)")
@click.option("--unlimited", is_flag=True, help="no site limit outside windows")
@click.option("--window", "windows", multiple=True, metavar="'[DAYS] HH:MM-HH:MM RATE'",
              help="a window with its own limit, e.g. 'mon-fri 08:00-18:00 20M' (repeat; the "
                   "first that matches wins; replaces the windows)")
@click.option("--clear-windows", is_flag=True, help="remove every window")
@click.option("--weight", "weights", multiple=True, metavar="PRIORITY=N",
              help="priority weight, e.g. critical=8 (default critical 4, normal 2, low 1)")
def bandwidth_set(limit: str | None, unlimited: bool, windows: tuple[str, ...],
                  clear_windows: bool, weights: tuple[str, ...]) -> None:
    """Change the policy; everything not given stays as it is."""
    from transcend.bandwidth import SiteBandwidthPolicy, load_policy, parse_window, save_policy
    from transcend.models import Priority

    policy_file, _ = _bandwidth_files()
    try:
        policy = load_policy(policy_file) if policy_file.exists() else None
    except ValueError:
        policy = None  # a broken file is replaced by what is given now
    data = (policy or SiteBandwidthPolicy()).model_dump()
    try:
        if limit and unlimited:
            raise ValueError("give --limit or --unlimited, not both")
        if limit:
            data["limit_bytes_per_s"] = _parse_size(limit)
        if unlimited:
            data["limit_bytes_per_s"] = None
        if clear_windows:
            data["windows"] = []
        if windows:
            data["windows"] = [parse_window(w, _parse_size).model_dump() for w in windows]
        for w in weights:
            key, _, value = w.partition("=")
            data["weights"][Priority(key.strip().lower())] = int(value)
        new = SiteBandwidthPolicy.model_validate(data)
    except (ValueError, ValidationError) as e:
        fail(str(e))
        return
    save_policy(policy_file, new)
    click.echo(f"written {policy_file}; a running worker applies it within a second")


if __name__ == "__main__":
    entry()
