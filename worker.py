"""The transcend worker: runs the workflows and the activities of one site.

Each site runs this process with its own ``TRANSCEND_SITE``; it polls the site's
task queue (activities that touch that site's platforms run here, next to their
data) and, unless ``--no-control``, the shared control queue (workflows and
catalog/schedule activities). Workers dial out to Temporal, so sites behind NAT
work. SIGTERM/SIGINT shut down gracefully: running activities get
``--grace`` seconds to finish or heartbeat, then Temporal retries them elsewhere.

Configuration: ``$TRANSCEND_CONFIG`` (TOML) and ``TRANSCEND_*`` variables
(transcend/config.py). Connectors that are not built in are loaded as plugins:
``--plugin MODULE`` (repeatable) and the comma-separated ``TRANSCEND_PLUGINS``
name modules that call ``connectors.registry.register`` when imported.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from activities.alerts import AlertActivities
from activities.context import ActivityContext
from activities.cycle import CycleActivities
from activities.dr import DrActivities
from activities.failback import FailbackActivities
from activities.failback_sites import FailbackSiteActivities
from activities.failover import FailoverActivities
from activities.points import PointActivities
from activities.protection import ProtectionActivities
from activities.runbook import run as run_runbook_step
from connectors.registry import load_plugins, plugin_modules_from_env
from transcend.api import CONTROL_TASK_QUEUE
from transcend.catalog import Catalog
from transcend.client import connect
from transcend.config import Settings, load_settings
from transcend.telemetry import setup_telemetry
from workflows.cycle import CycleWorkflow
from workflows.dr import FailbackWorkflow, FailoverWorkflow, MigrationWorkflow, ProductionVmWorkflow
from workflows.failover import RecoverVmWorkflow, TestFailoverWorkflow
from workflows.points import BootPointWorkflow, VerifyPointWorkflow
from workflows.replication import ReplicationWorkflow

log = logging.getLogger("transcend.worker")

WORKFLOWS: list[type] = [
    ReplicationWorkflow, CycleWorkflow, VerifyPointWorkflow, BootPointWorkflow, TestFailoverWorkflow,
    FailoverWorkflow, MigrationWorkflow, FailbackWorkflow, RecoverVmWorkflow, ProductionVmWorkflow,
]


def activities(ctx: ActivityContext) -> list[Any]:
    cycle, protection, points = CycleActivities(ctx), ProtectionActivities(ctx), PointActivities(ctx)
    failover, dr = FailoverActivities(ctx), DrActivities(ctx)
    failback, failback_sites = FailbackActivities(ctx), FailbackSiteActivities(ctx)
    alerts = AlertActivities(ctx)
    return [
        cycle.start, cycle.prepare, cycle.freeze, cycle.begin, cycle.abort, cycle.stream,
        cycle.verify_sample, cycle.commit, cycle.release, cycle.retention, cycle.record,
        cycle.protection_state,
        protection.resolve, protection.describe, protection.check_target, protection.add,
        protection.view, protection.set_state, protection.update_policy,
        protection.ensure_schedule, protection.trigger_schedule, protection.pause_schedule,
        protection.delete_schedule, protection.end_cycles, protection.forget_source,
        points.point_target, points.verify, points.boot,
        failover.choose_point, failover.tiers, failover.health, failover.destroy, failover.rto,
        dr.check, dr.abort, dr.wait_idle, dr.power_off, dr.power_on, dr.boot, dr.record,
        failback.failback_check, failback.failback_abort, failback.failback_sync,
        failback.failback_verify, failback.failback_finish,
        failback_sites.serve, failback_sites.pull, failback_sites.release, failback_sites.hashes,
        alerts.send, run_runbook_step,
    ]


def build_workers(client: Client, s: Settings, *, control: bool = True) -> list[Worker]:
    ctx = ActivityContext(settings=s, catalog=Catalog.from_settings(s), client=client)
    acts = activities(ctx)
    common: dict[str, Any] = dict(
        activities=acts,
        max_concurrent_activities=32,
        graceful_shutdown_timeout=timedelta(seconds=30),
        # The SDK otherwise sends a heartbeat at most every 80 % of the heartbeat
        # timeout (24 s for a stream): the durable offset a retry resumes from and
        # the progress operators see would lag that much. Streams heartbeat every 2 s.
        max_heartbeat_throttle_interval=timedelta(seconds=2),
        default_heartbeat_throttle_interval=timedelta(seconds=2),
    )
    workers = [Worker(client, task_queue=s.task_queue, **common)]
    if control:
        workers.append(Worker(client, task_queue=CONTROL_TASK_QUEUE, workflows=WORKFLOWS, **common))
    return workers


async def run(s: Settings, *, control: bool = True) -> None:
    # Telemetry before the client: the SDK's metrics come from the Runtime it connects with.
    tel = (setup_telemetry(s, metrics_port=s.metrics_port or None)
           if s.metrics_port or s.otlp_endpoint else None)
    client = await connect(s, runtime=tel.runtime if tel else None,
                           interceptors=tel.interceptors() if tel else ())
    if tel:
        await tel.start()
    workers = build_workers(client, s, control=control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker for site %s on %s (control: %s)", s.site, s.temporal_address, control)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    print(f"transcend worker ready: site={s.site} queues="
          f"{','.join(w.task_queue for w in workers)}", flush=True)
    done, _ = await asyncio.wait([*tasks, asyncio.create_task(stop.wait())],
                                 return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t in tasks and t.exception():
            raise t.exception()  # type: ignore[misc]
    log.info("shutting down gracefully")
    await asyncio.gather(*(w.shutdown() for w in workers))
    if tel:
        await tel.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="transcend worker for one site")
    ap.add_argument("--config", help="TOML settings file (default $TRANSCEND_CONFIG)")
    ap.add_argument("--site", help="site name (default $TRANSCEND_SITE or 'local')")
    ap.add_argument("--no-control", action="store_true", help="do not run workflows")
    ap.add_argument("--metrics-port", type=int,
                    help="serve Prometheus metrics on this port (default $TRANSCEND_METRICS_PORT; off)")
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import this connector plugin module (repeatable; also $TRANSCEND_PLUGINS, "
                         "comma-separated)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    plugins = load_plugins([*plugin_modules_from_env(), *args.plugin])
    if plugins:
        log.info("connector plugins loaded: %s", ", ".join(plugins))
    s = load_settings(args.config)
    if args.site:
        s = s.model_copy(update={"site": args.site})
    if args.metrics_port is not None:
        s = s.model_copy(update={"metrics_port": args.metrics_port})
    asyncio.run(run(s, control=not args.no_control))


if __name__ == "__main__":
    main()
