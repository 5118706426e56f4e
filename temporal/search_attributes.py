"""Custom search attributes that make the Temporal UI the operations console.

Registered by the embedded dev server at start (``--search-attribute``) and, on a
real cluster, by ``transcend temporal setup`` through the operator service.
Saved views in the UI filter on them, e.g.
``TranscendHealth = "warning" OR TranscendHealth = "failed"`` or
``TranscendSourceKind = "vmware" AND TranscendTargetKind = "aws"``.
"""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeKey

PROTECTION = SearchAttributeKey.for_keyword("TranscendProtection")
SOURCE_PLATFORM = SearchAttributeKey.for_keyword("TranscendSourcePlatform")
TARGET_PLATFORM = SearchAttributeKey.for_keyword("TranscendTargetPlatform")
SOURCE_KIND = SearchAttributeKey.for_keyword("TranscendSourceKind")
TARGET_KIND = SearchAttributeKey.for_keyword("TranscendTargetKind")
SITE = SearchAttributeKey.for_keyword("TranscendSite")
HEALTH = SearchAttributeKey.for_keyword("TranscendHealth")
STATE = SearchAttributeKey.for_keyword("TranscendState")
RPO_TARGET = SearchAttributeKey.for_int("TranscendRpoTargetSeconds")
RPO_ACHIEVED = SearchAttributeKey.for_int("TranscendRpoAchievedSeconds")
LAST_POINT = SearchAttributeKey.for_datetime("TranscendLastPointTime")
#: When the next successful test failover is due (policy test_failover_every_seconds);
#: ``TranscendTestFailoverDue < "<now>"`` lists the protections whose drill is overdue.
TEST_FAILOVER_DUE = SearchAttributeKey.for_datetime("TranscendTestFailoverDue")

ALL: list[SearchAttributeKey[Any]] = [
    PROTECTION,
    SOURCE_PLATFORM,
    TARGET_PLATFORM,
    SOURCE_KIND,
    TARGET_KIND,
    SITE,
    HEALTH,
    STATE,
    RPO_TARGET,
    RPO_ACHIEVED,
    LAST_POINT,
    TEST_FAILOVER_DUE,
]

_CLI_TYPES = {"KEYWORD": "Keyword", "INT": "Int", "DATETIME": "Datetime"}


def dev_server_flags() -> list[str]:
    """``--search-attribute Name=Type`` flags for ``temporal server start-dev``."""
    flags: list[str] = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}={_CLI_TYPES[key.indexed_value_type.name]}"]
    return flags
