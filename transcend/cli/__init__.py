"""``transcend``: a thin Temporal client and catalog reader for people.

Everything that changes replication goes through the documented workflows
(docs/workflow-api.md), exactly as other systems would start them; the CLI only
reads the catalog directly and writes platform definitions into it.
"""


# Importing each module registers its commands on ``main``.
from transcend.cli import bandwidth, ca, dr, platforms, protections, report, server  # noqa: F401
from transcend.cli.common import entry, main
from transcend.cli.protections import running_cycle_progress

__all__ = ["entry", "main", "running_cycle_progress"]
