"""Which recovery points a retention policy keeps.

``select_points`` is a pure, deterministic function of the points, the policy and
``now``; the retention activity calls it after each commit and deletes what it
returns as ``delete`` (``Catalog.mark_deleting`` → ``Target.delete`` →
``Catalog.finish_delete``).

Semantics (also in docs/catalog.md). A point's time is its ``instant`` (when the
source was frozen); a rule's window is everything after ``now - keep_for``.

* ``RetentionRule(every=0, keep_for=T)`` ("all 4h") keeps every point younger than
  ``T``: ``instant > now - T``.
* ``RetentionRule(every=E, keep_for=T)`` ("hourly 2d") cuts time into ``E``-second
  buckets aligned to the Unix epoch (UTC): ``[k*E, (k+1)*E)``. For each bucket that
  intersects the window (its end is after ``now - T``) it keeps the **oldest** point
  in that bucket. The oldest point of a bucket stays the oldest when newer points
  arrive, so the kept set does not churn from one run to the next and each kept
  point stays kept until its bucket leaves the window.
* A point is kept when any rule keeps it.
* The newest point is always kept.
* At least ``policy.min_points`` points are kept: when the rules keep fewer, the
  newest of the others are added until there are ``min_points`` (or all points).

Points are ordered by ``(instant, seq, id)``; ties on ``instant`` are therefore
broken by ``seq``. The selection is stable: ``select_points(keep, policy, now)``
keeps all of ``keep`` again. Naive datetimes are taken as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from transcend.models import RecoveryPoint, RetentionPolicy

__all__ = ["select_points"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _micros(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // _US


def _order(p: RecoveryPoint) -> tuple[int, int, str]:
    return (_micros(p.instant), p.seq, p.id)


def select_points(
    points: list[RecoveryPoint], policy: RetentionPolicy, now: datetime
) -> tuple[list[RecoveryPoint], list[RecoveryPoint]]:
    """Split ``points`` (of one protection) into ``(keep, delete)``, both ordered oldest
    first. See the module docstring for the rules."""
    ordered = sorted(points, key=_order)
    if not ordered:
        return [], []
    now_us = _micros(now)
    keys = [_order(p) for p in ordered]
    kept: set[int] = {len(ordered) - 1}  # indexes into ordered; the newest is always kept

    for rule in policy.rules:
        start = now_us - rule.keep_for * 1_000_000  # the window is (start, +inf)
        if rule.every == 0:
            kept.update(i for i, k in enumerate(keys) if k[0] > start)
            continue
        size = rule.every * 1_000_000
        seen_buckets: set[int] = set()
        for i, k in enumerate(keys):  # oldest first: the first point seen in a bucket wins
            bucket = k[0] // size
            if bucket in seen_buckets:
                continue
            seen_buckets.add(bucket)
            if (bucket + 1) * size > start:
                kept.add(i)

    if len(kept) < policy.min_points:
        for i in range(len(ordered) - 1, -1, -1):
            if len(kept) >= policy.min_points:
                break
            kept.add(i)

    keep = [p for i, p in enumerate(ordered) if i in kept]
    delete = [p for i, p in enumerate(ordered) if i not in kept]
    return keep, delete
