"""What every activity needs: settings, the catalog, connectors by platform name,
and the mapping of connector errors onto Temporal's retry semantics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from connectors.base import PermanentError, Source, Target
from connectors.registry import source_for, target_for
from transcend.bandwidth import SiteBandwidth, policy_path, status_path
from transcend.catalog import Catalog, CatalogError
from transcend.config import Settings
from transcend.secrets import SecretError

T = TypeVar("T")


@contextmanager
def permanent() -> Iterator[None]:
    """Turn errors that retrying cannot fix into non-retryable application errors, so a
    bad credential or a vanished VM fails the workflow step at once with its message."""
    try:
        yield
    except PermanentError as e:
        raise ApplicationError(str(e), type=type(e).__name__, non_retryable=True) from e
    except (CatalogError, SecretError) as e:
        # A missing record or a key that cannot decrypt the stored credentials will not
        # fix itself between retries.
        raise ApplicationError(str(e), type=type(e).__name__, non_retryable=True) from e


@dataclass
class ActivityContext:
    settings: Settings
    catalog: Catalog
    client: Client | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _bandwidth: SiteBandwidth | None = None

    def site_bandwidth(self) -> SiteBandwidth:
        """The site's bandwidth allocator: one per worker process, shared by every copy
        this worker runs (transcend/bandwidth.py)."""
        with self._lock:
            if self._bandwidth is None:
                home = self.settings.home
                self._bandwidth = SiteBandwidth(policy_path(home), status_path(home))
            return self._bandwidth

    def source(self, platform: str) -> Source:
        with permanent():
            info = self.catalog.get_platform(platform)
            return source_for(info, self.catalog.platform_secret(platform))

    def target(self, platform: str) -> Target:
        with permanent():
            info = self.catalog.get_platform(platform)
            return target_for(info, self.catalog.platform_secret(platform))


#: How often in_thread() heartbeats; activities run with a heartbeat timeout of a few
#: times this (workflows/cycle.py), so a worker killed mid-activity is noticed in
#: seconds instead of after the activity's start-to-close timeout.
HEARTBEAT_SECONDS = 2.0


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run blocking connector or catalog code in a thread while heartbeating."""
    return await heartbeating(asyncio.to_thread(fn, *args))


async def heartbeating(work: Awaitable[T], details: Sequence[Any] = ()) -> T:
    """Await ``work`` while heartbeating, so a slow but live call (a Temporal RPC on a
    busy server, a thread) is not mistaken for a dead worker. ``details``: what each
    heartbeat carries (a stream repeats its last progress, which the next attempt
    resumes from, rather than erasing it)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_SECONDS)
        if done:
            return task.result()
        activity.heartbeat(*details)
