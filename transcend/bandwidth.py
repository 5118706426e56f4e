"""Site-wide bandwidth: one limit shared by every copy a site's worker runs.

A site's WAN link is shared by all its protections. The operator sets a site
limit (and time-of-day windows with their own limits) in ``<home>/bandwidth.toml``
(``transcend bandwidth set``); the worker's ``SiteBandwidth`` re-reads that file
when it changes and, every ``PERIOD`` seconds, divides the limit among the running
streams by their protection's priority weight (critical 4, normal 2, low 1), then
applies each share with ``blockstream.Stream.set_rate_limit`` (thread-safe, takes
effect at once). So a change of the file reaches running copies within a second.

Unused bandwidth is redistributed ("water-filling"): a stream that cannot use its
share, because its protection's own ``bandwidth_bytes_per_s`` caps it lower or
because it runs slower than its share (a slow disk, a slow peer), keeps what it
uses (plus headroom to grow) and the rest goes to the others by weight.

What is in use now is written to ``<home>/bandwidth-status.json`` (``transcend
bandwidth show``) and exported as metrics by the worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from transcend.models import Priority
from transcend.telemetry import record_site_bandwidth

PERIOD = 0.5  # seconds between two allocations
DEFAULT_WEIGHTS: dict[Priority, int] = {Priority.CRITICAL: 4, Priority.NORMAL: 2, Priority.LOW: 1}
# A stream is "not using its share" when it ran below this fraction of it for
# SETTLE seconds; it is then given what it uses times HEADROOM, so it can grow back.
UNDERUSE = 0.8
SETTLE = 2.0
HEADROOM = 1.25
MIN_SHARE = 64 * 1024  # bytes/s: a stream never gets less (it would stall its heartbeats)

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class BandwidthWindow(BaseModel):
    """A time of day (site-local clock) with its own limit, e.g. business hours."""

    model_config = ConfigDict(extra="forbid")

    days: list[Day] = Field(default_factory=lambda: list(DAYS))
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM")
    end: str = Field(pattern=r"^([01]\d|2[0-4]):[0-5]\d$", description="HH:MM; before start: "
                     "the window runs past midnight")
    limit_bytes_per_s: int | None = Field(default=None, gt=0, description="None (or absent in "
                                          "the file): unlimited in the window")

    def contains(self, at: datetime) -> bool:
        minute = at.hour * 60 + at.minute
        start, end = _minutes(self.start), _minutes(self.end)
        day = DAYS[at.weekday()]
        if start <= end:
            return day in self.days and start <= minute < end
        # Past midnight: the part after midnight belongs to the previous day's window.
        previous = DAYS[(at.weekday() - 1) % 7]
        return (day in self.days and minute >= start) or (previous in self.days and minute < end)


class SiteBandwidthPolicy(BaseModel):
    """``<home>/bandwidth.toml``: the site limit, windows, and priority weights."""

    model_config = ConfigDict(extra="forbid")

    limit_bytes_per_s: int | None = Field(default=None, gt=0, description="outside every "
                                          "window; None: unlimited")
    windows: list[BandwidthWindow] = Field(default_factory=list, description="the first that "
                                           "contains the time wins")
    weights: dict[Priority, int] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: dict[Priority, int]) -> dict[Priority, int]:
        if any(w < 1 for w in v.values()):
            raise ValueError("priority weights must be whole numbers >= 1")
        return {**DEFAULT_WEIGHTS, **v}

    @model_validator(mode="after")
    def _windows_distinct(self) -> SiteBandwidthPolicy:
        for w in self.windows:
            if w.start == w.end:
                raise ValueError(f"window {w.start}-{w.end} is empty; give different times")
        return self

    def limit_at(self, at: datetime) -> tuple[int | None, str]:
        """The limit in force at ``at`` (site-local time) and what set it."""
        for i, w in enumerate(self.windows):
            if w.contains(at):
                return w.limit_bytes_per_s, f"window {i + 1} ({','.join(w.days)} {w.start}-{w.end})"
        return self.limit_bytes_per_s, "site limit"


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def load_policy(path: Path) -> SiteBandwidthPolicy:
    """The policy file, or no limit when it does not exist. A broken file raises with
    the file's name and what is wrong."""
    if not path.exists():
        return SiteBandwidthPolicy()
    try:
        return SiteBandwidthPolicy.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ValueError(f"bandwidth policy {path} is not valid: {e}; fix it or remove it "
                         "(`transcend bandwidth set --unlimited`)") from e


def save_policy(path: Path, policy: SiteBandwidthPolicy) -> None:
    """Write the policy atomically (a running worker never reads half a file)."""
    lines = []
    if policy.limit_bytes_per_s is not None:
        lines.append(f"limit_bytes_per_s = {policy.limit_bytes_per_s}")
    if policy.weights != DEFAULT_WEIGHTS:
        lines.append("[weights]")
        lines += [f"{k.value} = {v}" for k, v in policy.weights.items()]
    for w in policy.windows:
        lines.append("\n[[windows]]")
        lines.append(f"days = {json.dumps(w.days)}")
        lines.append(f'start = "{w.start}"')
        lines.append(f'end = "{w.end}"')
        if w.limit_bytes_per_s is not None:
            lines.append(f"limit_bytes_per_s = {w.limit_bytes_per_s}")
    text = "\n".join(lines) + "\n"  # plain keys, then [weights], then [[windows]]: valid TOML
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- allocation


@dataclass
class Demand:
    """One running stream as the allocator sees it."""

    weight: int
    cap: int | None = None  # the protection's own limit
    uses: float | None = None  # what it uses when it does not use its share; None: all it gets


def allocate(limit: int | None, demands: list[Demand]) -> list[int | None]:
    """Each stream's rate limit: ``limit`` divided by weight, no stream above its cap or
    what it uses, the rest redistributed to the others by weight (water-filling).
    Without a site limit, each stream gets its cap (None: unlimited)."""
    if limit is None:
        return [d.cap for d in demands]
    out: list[int | None] = [None] * len(demands)
    open_ = list(range(len(demands)))
    remaining = float(limit)
    while open_:
        total = sum(demands[i].weight for i in open_)
        fair = {i: remaining * demands[i].weight / total for i in open_}
        bounded = [i for i in open_ if _bound(demands[i]) < fair[i]]
        if not bounded:
            for i in open_:
                out[i] = max(MIN_SHARE, math.floor(fair[i]))
            break
        for i in bounded:  # these take what they can use; the rest is shared again
            share = _bound(demands[i])
            out[i] = max(MIN_SHARE, math.floor(share))
            remaining -= share
            open_.remove(i)
        remaining = max(0.0, remaining)
    return out


def _bound(d: Demand) -> float:
    bounds = [b for b in (d.cap, d.uses) if b is not None]
    return min(bounds) if bounds else math.inf


# --------------------------------------------------------------------------- the worker's allocator


class RateLimited(Protocol):
    """What the allocator needs of a stream (blockstream.Stream has both)."""

    def set_rate_limit(self, bytes_per_s: int | None) -> None: ...

    def progress(self) -> object: ...


@dataclass
class _Entry:
    name: str
    stream: RateLimited
    priority: Priority
    cap: int | None
    share: int | None = None
    rate: float = 0.0
    under_since: float | None = None


@dataclass
class SiteBandwidth:
    """The allocator of one worker process (one per site): streams register while they
    copy; a thread re-divides the site limit every ``period`` seconds."""

    policy_file: Path
    status_file: Path | None = None
    period: float = PERIOD
    clock: Callable[[], datetime] = field(default=lambda: datetime.now().astimezone())
    _entries: dict[int, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _policy: SiteBandwidthPolicy = field(default_factory=SiteBandwidthPolicy)
    _mtime: float | None = None
    _error: str = ""
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    last_status: dict[str, object] = field(default_factory=dict)

    @contextlib.contextmanager
    def registered(self, name: str, stream: RateLimited, priority: Priority,
                   cap: int | None) -> Iterator[None]:
        """Share the site limit with ``stream`` while the block runs. The stream gets
        its share before this returns (it may already be running)."""
        key = id(stream)
        with self._lock:
            self._entries[key] = _Entry(name, stream, priority, cap)
        self._ensure_thread()
        self.rebalance()
        try:
            yield
        finally:
            with self._lock:
                self._entries.pop(key, None)
            self._wake.set()  # the others get its share at once

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="site-bandwidth",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.rebalance()
            except Exception as e:  # never let the allocator die: report and go on
                self._error = f"bandwidth allocation failed: {e!r}"
            self._wake.wait(self.period)
            self._wake.clear()

    def _reload(self) -> None:
        try:
            mtime: float | None = self.policy_file.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime:
            return
        try:
            self._policy = load_policy(self.policy_file)
            self._error = ""
        except ValueError as e:
            self._error = str(e)  # the last good policy stays in force
        self._mtime = mtime

    def rebalance(self) -> dict[str, object]:
        """Re-read the policy if it changed, measure, divide, apply; returns the status."""
        now_wall = self.clock()
        now = time.monotonic()
        with self._lock:
            self._reload()
            limit, source = self._policy.limit_at(now_wall)
            entries = list(self._entries.values())
            for e in entries:
                e.rate = float(getattr(e.stream.progress(), "rate", 0.0))
                if e.share is not None and e.rate < UNDERUSE * e.share:
                    e.under_since = e.under_since if e.under_since is not None else now
                else:
                    e.under_since = None
            demands = [Demand(weight=self._policy.weights[e.priority], cap=e.cap,
                              uses=(max(e.rate * HEADROOM, MIN_SHARE)
                                    if e.under_since is not None and now - e.under_since >= SETTLE
                                    else None))
                       for e in entries]
            shares = allocate(limit, demands)
            for e, share in zip(entries, shares, strict=True):
                if share != e.share:
                    e.stream.set_rate_limit(share)
                    if e.share is None or share is None or share > e.share:
                        e.under_since = None  # give it time to use a larger share
                    e.share = share
            status: dict[str, object] = {
                "at": now_wall.isoformat(timespec="seconds"),
                "limit_bytes_per_s": limit, "limit_from": source,
                "in_use_bytes_per_s": round(sum(e.rate for e in entries)),
                "error": self._error,
                "streams": [{"name": e.name, "priority": e.priority.value, "cap": e.cap,
                             "share_bytes_per_s": e.share, "rate_bytes_per_s": round(e.rate)}
                            for e in entries],
            }
            self.last_status = status
        record_site_bandwidth(limit, float(status["in_use_bytes_per_s"]))  # type: ignore[arg-type]
        if self.status_file is not None:
            _write_json(self.status_file, status)
        return status


def _write_json(path: Path, data: dict[str, object]) -> None:
    with contextlib.suppress(OSError):  # a status file is a convenience, never a failure
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


def policy_path(home: Path) -> Path:
    """Where a site's worker and `transcend bandwidth` keep the policy."""
    return home / "bandwidth.toml"


def status_path(home: Path) -> Path:
    return home / "bandwidth-status.json"


def parse_window(text: str, parse_rate: Callable[[str], int]) -> BandwidthWindow:
    """``"mon-fri 08:00-18:00 20M"`` / ``"sat,sun 00:00-24:00 unlimited"`` / ``"22:00-06:00 1G"``."""
    parts = text.split()
    if len(parts) == 2:
        parts = ["mon-sun", *parts]
    if len(parts) != 3 or "-" not in parts[1]:
        raise ValueError(f"window {text!r}: write [DAYS] HH:MM-HH:MM RATE, e.g. "
                         "'mon-fri 08:00-18:00 20M' or '22:00-06:00 unlimited'")
    days_text, times, rate = parts
    start, _, end = times.partition("-")
    days: list[Day] = []
    for item in days_text.lower().split(","):
        first, _, last = item.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"window {text!r}: days are mon..sun, as a range (mon-fri) or a "
                             "list (sat,sun)")
        a = DAYS.index(first)
        b = DAYS.index(last) if last else a
        days += [DAYS[(a + i) % 7] for i in range((b - a) % 7 + 1)]
    limit = None if rate.lower() in ("unlimited", "none", "off") else parse_rate(rate)
    return BandwidthWindow(days=list(dict.fromkeys(days)), start=start, end=end,
                           limit_bytes_per_s=limit)
