"""What every activity needs: settings, the catalog, connectors by platform name,
and the mapping of connector errors onto Temporal's retry semantics."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from connectors.base import PermanentError, Source, Target
from connectors.registry import source_for, target_for
from transcend.catalog import Catalog, CatalogError
from transcend.config import Settings


@contextmanager
def permanent() -> Iterator[None]:
    """Turn errors that retrying cannot fix into non-retryable application errors, so a
    bad credential or a vanished VM fails the workflow step at once with its message."""
    try:
        yield
    except PermanentError as e:
        raise ApplicationError(str(e), type=type(e).__name__, non_retryable=True) from e
    except CatalogError as e:
        raise ApplicationError(str(e), type=type(e).__name__, non_retryable=True) from e


@dataclass
class ActivityContext:
    settings: Settings
    catalog: Catalog
    client: Client | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def source(self, platform: str) -> Source:
        with permanent():
            info = self.catalog.get_platform(platform)
            return source_for(info, self.catalog.platform_secret(platform))

    def target(self, platform: str) -> Target:
        with permanent():
            info = self.catalog.get_platform(platform)
            return target_for(info, self.catalog.platform_secret(platform))
