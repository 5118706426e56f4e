"""Shared CLI plumbing: the command group, its error handling (one line and
exit code 2 for what the operator can act on), clients and small parsers/formatters."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar

import click
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from transcend.api import (
    BootTier,
    HealthCheck,
)
from transcend.guestprep import ReIpRule
from transcend.models import (
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

        from transcend.catalog import CatalogError
        from transcend.client import TemporalUnreachable

        try:
            return super().invoke(ctx)
        except CatalogError as e:
            fail(str(e))
        except WorkflowAlreadyStartedError as e:
            fail(f"{e.workflow_id} is already running (use `transcend status`, `policy` or "
                 "`unprotect` to change it)")
        except RPCError as e:
            fail(f"Temporal: {e.message} (is the server at TRANSCEND_TEMPORAL_ADDRESS reachable?)")
        except TemporalUnreachable as e:
            fail(str(e))


#: How long a command that waits on a workflow rides out Temporal being unreachable (a
#: dev-server restart, a cluster failover) before it gives up; the workflow itself
#: runs on regardless.
OUTAGE_TOLERANCE = 300.0


def _transient(e: RPCError) -> bool:
    return e.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED) or (
        e.status == RPCStatusCode.UNKNOWN and "transport" in e.message.lower())


async def riding_out_outages(call: Callable[[], Awaitable[T]], what: str,
                             tolerance: float = OUTAGE_TOLERANCE) -> T:
    """``await call()``, calling it again while Temporal is unreachable, for up to
    ``tolerance`` seconds: a long ``verify`` or ``failover --wait`` survives a server
    restart instead of failing with a transport error (issue #16)."""
    deadline: float | None = None
    delay = 1.0
    while True:
        try:
            return await call()
        except RPCError as e:
            if not _transient(e):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + tolerance
                click.echo(f"Temporal is unreachable while waiting for {what} ({e.message}); "
                           f"retrying for up to {tolerance:.0f} s (the workflow runs on)", err=True)
            elif now > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


@click.group(cls=_Group)
def main() -> None:
    """transcend: replicate VMs across platforms and recover them."""



def _failure_text(e: BaseException) -> str:
    parts = []
    cur: BaseException | None = e
    while cur is not None:
        if str(cur) and str(cur) not in parts:
            parts.append(str(cur))
        cur = cur.__cause__
    return ": ".join(parts)


def _parse_size(text: str) -> int:
    """``10M``, ``1.5GiB``, ``512k``, ``4096`` (bytes, powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"{text!r} is not a size: give a number with an optional unit "
                         "K, M or G (powers of 1024), e.g. 50M or 1.5G") from None
    if value < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return int(value * units[unit])


def input_error(e: Exception, model: Any = None) -> str:
    """A refused input as one line: ``field: what is wrong, what is allowed`` for a
    model's validation error (transcend/validation.py; with ``model``, an unknown field
    lists the known ones), else the error's own text."""
    from pydantic import ValidationError

    from transcend.validation import describe

    return describe(e, model) if isinstance(e, ValidationError) else str(e)



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



def _with(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco



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
