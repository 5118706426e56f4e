"""The questions operators ask the Temporal UI, as visibility queries over transcend's
search attributes (temporal/search_attributes.py), with links that open the UI's
workflow list filtered by them (``transcend views``; docs/operations.md "Saved views").

The UI keeps saved views in the browser, so they cannot be installed from here: these
are the queries to paste (or the links to bookmark), computed for "now" and for the
catalog's RPO targets where the question depends on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote

from temporal import search_attributes as sa
from transcend.api import (
    FAILBACK_WORKFLOW,
    FAILOVER_WORKFLOW,
    MIGRATION_WORKFLOW,
    REPLICATION_WORKFLOW,
    TEST_FAILOVER_WORKFLOW,
)
from transcend.models import Health

RUNNING = 'ExecutionStatus = "Running"'


@dataclass(frozen=True)
class View:
    name: str
    question: str
    query: str

    def url(self, ui_url: str, namespace: str) -> str:
        return (f"{ui_url.rstrip('/')}/namespaces/{quote(namespace, safe='')}/workflows"
                f"?query={quote(self.query, safe='')}")


def _any(attribute: str, values: Iterable[str]) -> str:
    return "(" + " OR ".join(f'{attribute} = "{v}"' for v in values) + ")"


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def views(now: datetime, rpo_targets: Iterable[int]) -> list[View]:
    """``now``: an aware datetime (the overdue and last-day views compare with it);
    ``rpo_targets``: the RPO targets (seconds) in use, for the breach view: visibility
    cannot compare two attributes, so it asks, per target, for achieved > target."""
    replication = f'WorkflowType = "{REPLICATION_WORKFLOW}" AND {RUNNING}'
    targets = sorted(set(rpo_targets))
    breach = " OR ".join(
        f"({sa.RPO_TARGET.name} = {t} AND {sa.RPO_ACHIEVED.name} > {t})" for t in targets)
    out = [
        View("unhealthy", "Which protections are not healthy (warning or failed)?",
             f"{replication} AND {_any(sa.HEALTH.name, (Health.WARNING, Health.FAILED))}"),
        View("failed", "Which protections have failed (cycles failing in a row)?",
             f'{replication} AND {sa.HEALTH.name} = "{Health.FAILED}"'),
        # no protections yet: a query that is valid and matches nothing
        View("rpo-breach", "Which protections' last point is older than their RPO allows?",
             f"{replication} AND ({breach})" if breach
             else f"{replication} AND {sa.RPO_ACHIEVED.name} < 0"),
        View("dr-running", "Which failovers, migrations and failbacks are running?",
             f"{_any('WorkflowType', (FAILOVER_WORKFLOW, MIGRATION_WORKFLOW, FAILBACK_WORKFLOW))}"
             f" AND {RUNNING}"),
        View("test-failovers", "Which test failovers are running (VMs booted in isolation)?",
             f'WorkflowType = "{TEST_FAILOVER_WORKFLOW}" AND {RUNNING}'),
        View("test-failover-overdue", "Whose test failover (DR drill) is overdue?",
             f'{replication} AND {sa.TEST_FAILOVER_DUE.name} < "{_iso(now)}"'),
        View("cycles-failed-today", "Which replication cycles failed in the last 24 hours?",
             f'WorkflowType = "Cycle" AND ExecutionStatus = "Failed" AND '
             f'CloseTime > "{_iso(now - timedelta(days=1))}"'),
    ]
    return out
