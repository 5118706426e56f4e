"""Commands for protections: protect, status, points, cycles, policy, verify, boot."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import click
from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from temporalio.common import WorkflowIDReusePolicy
from temporalio.service import RPCError

from transcend.api import (
    BOOT_WORKFLOW,
    CONTROL_TASK_QUEUE,
    CYCLE_WORKFLOW,
    REPLICATION_WORKFLOW,
    VERIFY_WORKFLOW,
    BootInput,
    BootResult,
    PolicyChange,
    ReplicationInput,
    ReplicationStatus,
    VerifyInput,
    VerifyResult,
    boot_id,
    replication_id,
    verify_id,
)
from transcend.cli.common import (
    _age,
    _catalog,
    _client,
    _failure_text,
    _human_bytes,
    _parse_size,
    fail,
    input_error,
    main,
    parse_reip,
    riding_out_outages,
    run_async,
)
from transcend.client import TemporalUnreachable
from transcend.models import (
    ProtectionPolicy,
    ProtectionSpec,
    RetentionPolicy,
    format_duration,
    parse_duration,
)

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
        fail(input_error(e))
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
        desc = await riding_out_outages(handle.describe, f"workflow {handle.id}")
        if desc.status != WorkflowExecutionStatus.RUNNING:
            try:
                await riding_out_outages(handle.result, f"workflow {handle.id}")
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
    try:
        client: Client | None = await _client()
    except TemporalUnreachable as e:
        client, unreachable = None, str(e)
    click.echo(f"{'PROTECTION':20} {'SOURCE->TARGET':24} {'STATE':11} {'HEALTH':8} "
               f"{'RPO tgt/last/p95':20} {'LAST POINT':14} CYCLES ok/failed")
    for rec in records:
        pair = f"{rec.spec.source_platform}->{rec.spec.target_platform}"
        if client is None:
            last = cat.latest_point(rec.name)
            click.echo(f"{rec.name:20} {pair:24} {rec.state.value:11} {rec.health.value:8} "
                       f"{format_duration(rec.spec.policy.rpo_seconds)}/?/?{'':14} "
                       f"{_age(last.instant if last else None):14} (live state unknown)")
            continue
        st, why = await _live_status(client, rec.name)
        if st is None:
            click.echo(f"{rec.name:20} {pair:24} {rec.state.value:11} {rec.health.value:8} "
                       f"({why})")
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
    if client is None:
        fail(f"the catalog's view only, live state unknown: {unreachable}")


# How long `status` waits for a workflow to answer its query: a running workflow whose
# worker is down gets no answer at all (the query waits for a worker to poll).
QUERY_WAIT = timedelta(seconds=5)


async def _live_status(client: Client, name: str) -> tuple[ReplicationStatus | None, str]:
    """The Replication workflow's status query, or None and why not."""
    handle = client.get_workflow_handle(replication_id(name))
    try:
        return await handle.query("status", result_type=ReplicationStatus,
                                  rpc_timeout=QUERY_WAIT), ""
    except (RPCError, WorkflowQueryFailedError) as e:
        try:
            running = (await handle.describe(rpc_timeout=QUERY_WAIT)).status == \
                WorkflowExecutionStatus.RUNNING
        except RPCError:
            running = False
        if running:
            return None, (f"workflow running, but no worker answered its status query within "
                          f"{QUERY_WAIT.seconds}s: is a control worker up? ({_short(e)})")
        return None, "workflow not running"


def _short(e: BaseException) -> str:
    text = getattr(e, "message", "") or str(e)
    return text.splitlines()[0][:120] if text else type(e).__name__


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
        fail(input_error(e))
        return
    await _update(name, "set_policy", PolicyChange(policy=new))
    click.echo(f"{name}: rpo {format_duration(new.rpo_seconds)}, retention {new.retention.describe()}")


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
        handle = await client.start_workflow(
            VERIFY_WORKFLOW, VerifyInput(point_id=point_id), id=verify_id(point_id),
            task_queue=CONTROL_TASK_QUEUE, result_type=VerifyResult,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        )
        # a verify of a large point takes a while: ride out a Temporal restart meanwhile
        result: VerifyResult = await riding_out_outages(handle.result, f"the verify of {point_id}")
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
