"""Commands for recovery: test failover, failover, migration, failback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import click
from pydantic import ValidationError
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from transcend.api import (
    CONTROL_TASK_QUEUE,
    FAILBACK_WORKFLOW,
    FAILOVER_WORKFLOW,
    MIGRATION_WORKFLOW,
    TEST_FAILOVER_WORKFLOW,
    ConvertMode,
    FailbackInput,
    FailbackStatus,
    FailoverInput,
    FailoverStatus,
    HealthCheck,
    TestFailoverInput,
    TestFailoverStatus,
    failback_id,
    failover_id,
    test_failover_id,
)
from transcend.cli.common import (
    _catalog,
    _client,
    _failure_text,
    _health,
    _with,
    fail,
    input_error,
    main,
    parse_reip,
    parse_tiers,
    riding_out_outages,
    run_async,
)
from transcend.models import (
    ProtectionState,
    parse_duration,
)

S = ProtectionState


def _refuse_unless(protection: str, allowed: tuple[ProtectionState, ...], op: str,
                   hint: str) -> bool:
    """Refuse here, before anything is started, what the workflow would refuse (it
    checks again: this is only so that `--no-wait` does not say "started" and exit 0
    for a request that fails at once). True when the request may go on."""
    rec = _catalog().get_protection(protection)  # NotFoundError: one line, exit 2
    if rec.state not in allowed:
        fail(f"cannot {op} protection {protection!r}: it is {rec.state.value}; {hint}")
        return False
    return True


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
    except ValueError as e:  # pydantic's ValidationError too
        fail(input_error(e, TestFailoverInput))
        return
    if not _refuse_unless(protection, (S.PROTECTING, S.PAUSED), "test-fail over",
                          "a test failover needs a protected (or paused) protection with a point"):
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
        desc = await riding_out_outages(handle.describe, f"workflow {handle.id}")
        if desc.status != WorkflowExecutionStatus.RUNNING:
            try:
                await riding_out_outages(handle.result, f"workflow {handle.id}")
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
        st = await riding_out_outages(handle.result, f"workflow {handle.id}")
    except RPCError as e:
        fail(f"no test failover of {protection!r} is running ({e.message})")
        return
    except WorkflowFailureError as e:
        fail(_failure_text(e))
        return
    click.echo(f"test failover of {protection} cleaned up (RTO was "
               f"{st.rto_seconds:.1f}s)" if st.rto_seconds is not None else f"{protection}: cleaned up")


async def _follow(handle: Any, status_type: type[Any], describe: Callable[[Any], str]) -> Any:
    """Print the operation's phase as it changes until the workflow ends; its result."""
    last = ""
    while True:
        desc = await riding_out_outages(handle.describe, f"workflow {handle.id}")
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
                return await riding_out_outages(handle.result, f"workflow {handle.id}")
            except WorkflowFailureError as e:
                fail(_failure_text(e))
        await asyncio.sleep(1)


def _failover_line(st: FailoverStatus) -> str:
    extra = f" point {st.point_id}" if st.point_id else ""
    if st.final_cycle:
        extra += f"; final cycle {st.final_cycle}"
    return f"{st.phase}{extra}"


async def _start_failover(workflow: str, inp: FailoverInput, wait: bool) -> None:
    if not _refuse_unless(inp.protection, (S.PROTECTING, S.PAUSED, S.FAILING_OVER),
                          workflow.lower(), "only a protected (or paused) protection can; "
                          "`transcend failback` brings a failed-over one home"):
        return
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
        fail(input_error(e))
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
        fail(input_error(e))
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
    if signal_migrate:
        client = await _client()
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
        except ValueError as e:  # pydantic's ValidationError too
            fail(input_error(e, FailbackInput))
            return
        if not _refuse_unless(protection, (S.FAILED_OVER, S.FAILING_BACK), "fail back",
                              "only a failed-over protection can fail back (`transcend "
                              "failover` or `transcend migrate` first)"):
            return
        client = await _client()
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
