"""Retention selection: properties (hypothesis) and concrete schedules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transcend.models import PointDisk, RecoveryPoint, RetentionPolicy, RetentionRule
from transcend.retention import select_points

NOW = datetime(2026, 3, 10, 12, 34, 56, tzinfo=UTC)
H = 3600
D = 86400


def point(seq: int, instant: datetime) -> RecoveryPoint:
    return RecoveryPoint(
        id=f"p-{seq}",
        protection="p",
        seq=seq,
        instant=instant,
        committed_at=instant + timedelta(seconds=5),
        disks=[PointDisk(disk="vda", size=1 << 20, location=f"/l/{seq}", block_size=65536)],
    )


def series(ages: list[float]) -> list[RecoveryPoint]:
    """Points at NOW - age (seconds), seq increasing with the instant."""
    instants = sorted(NOW - timedelta(seconds=a) for a in ages)
    return [point(i + 1, t) for i, t in enumerate(instants)]


def ids(points: list[RecoveryPoint]) -> list[str]:
    return [p.id for p in points]


# --------------------------------------------------------------------------- properties

rules = st.lists(
    st.builds(
        RetentionRule,
        every=st.sampled_from([0, 0, 60, 900, H, 6 * H, D, 7 * D]),
        keep_for=st.integers(min_value=1, max_value=30 * D),
    ),
    min_size=1,
    max_size=4,
)
policies = st.builds(RetentionPolicy, rules=rules, min_points=st.integers(1, 8))
# ages in seconds, some in the future (clock skew), many duplicates of instants possible
ages = st.lists(st.integers(min_value=-120, max_value=40 * D), min_size=0, max_size=60)


@settings(max_examples=300, deadline=None)
@given(ages=ages, policy=policies, shuffle=st.randoms())
def test_properties(ages: list[int], policy: RetentionPolicy, shuffle: object) -> None:
    pts = series([float(a) for a in ages])
    given_order = list(pts)
    shuffle.shuffle(given_order)  # type: ignore[attr-defined]
    keep, delete = select_points(given_order, policy, NOW)

    # a partition of the input, each part ordered oldest first
    assert sorted(ids(keep) + ids(delete)) == sorted(ids(pts))
    assert not set(ids(keep)) & set(ids(delete))
    assert keep == sorted(keep, key=lambda p: (p.instant, p.seq))
    assert delete == sorted(delete, key=lambda p: (p.instant, p.seq))
    if not pts:
        assert keep == [] and delete == []
        return

    # the newest point is always kept
    assert pts[-1] in keep
    # at least min_points (or all of them)
    assert len(keep) >= min(policy.min_points, len(pts))
    # nothing younger than an `all` window is deleted
    for rule in policy.rules:
        if rule.every == 0:
            limit = NOW - timedelta(seconds=rule.keep_for)
            assert all(p.instant <= limit for p in delete)
    # stable: selecting again from what was kept keeps all of it
    keep2, delete2 = select_points(keep, policy, NOW)
    assert ids(keep2) == ids(keep) and delete2 == []
    # deterministic, whatever the input order
    assert select_points(pts, policy, NOW) == (keep, delete)


@settings(max_examples=150, deadline=None)
@given(ages=ages, step=st.integers(min_value=1, max_value=3 * H), policy=policies)
def test_no_churn_as_time_passes(ages: list[int], step: int, policy: RetentionPolicy) -> None:
    """Running retention later (with a newer point) never deletes a point that a
    bucket rule kept earlier while its bucket is still in the window."""
    pts = series([float(a) + step for a in ages])  # as seen `step` seconds later
    earlier = NOW - timedelta(seconds=step)
    keep_then, _ = select_points([p for p in pts if p.instant <= earlier], policy, earlier)
    newer = point(len(pts) + 1, NOW)
    keep_now, _ = select_points([*pts, newer], policy, NOW)
    for rule in policy.rules:
        if rule.every == 0:
            continue
        size = rule.every
        start = NOW.timestamp() - rule.keep_for
        for p in keep_then:
            bucket = int(p.instant.timestamp() // size)
            oldest = min(
                (q for q in pts if int(q.instant.timestamp() // size) == bucket),
                key=lambda q: (q.instant, q.seq),
            )
            if oldest is p and (bucket + 1) * size > start:
                assert p in keep_now


# --------------------------------------------------------------------------- examples


def test_empty() -> None:
    assert select_points([], RetentionPolicy.parse("all 1h"), NOW) == ([], [])


def test_newest_kept_even_when_old() -> None:
    pts = series([10 * D, 9 * D])
    keep, delete = select_points(pts, RetentionPolicy.parse("all 1h"), NOW)
    assert ids(keep) == ["p-2"] and ids(delete) == ["p-1"]


def test_min_points_adds_the_newest_others() -> None:
    pts = series([5 * D, 4 * D, 3 * D, 2 * D])
    policy = RetentionPolicy(rules=[RetentionRule(every=0, keep_for=H)], min_points=3)
    keep, delete = select_points(pts, policy, NOW)
    assert ids(keep) == ["p-2", "p-3", "p-4"] and ids(delete) == ["p-1"]


def test_all_window_boundary() -> None:
    pts = series([H + 1, H, H - 1, 0])
    keep, _ = select_points(pts, RetentionPolicy.parse("all 1h"), NOW)
    # strictly younger than the window is kept; exactly keep_for old is not
    assert ids(keep) == ["p-3", "p-4"]


def test_all_4h_hourly_2d_daily_2w() -> None:
    """A point every 15 minutes for three weeks, then the default policy."""
    start = datetime(2026, 2, 17, 0, 0, tzinfo=UTC)
    instants = []
    t = start
    while t <= NOW:
        instants.append(t)
        t += timedelta(minutes=15)
    pts = [point(i + 1, t) for i, t in enumerate(instants)]
    policy = RetentionPolicy.parse("all 4h, hourly 2d, daily 2w")
    keep, delete = select_points(pts, policy, NOW)
    kept = {p.instant for p in keep}

    # all 4h: every point of the last four hours
    assert {p.instant for p in pts if p.instant > NOW - timedelta(hours=4)} <= kept
    # hourly 2d: the first point of each hour whose hour ends after NOW - 2d
    two_days = NOW - timedelta(days=2)
    hourly = {p.instant for p in pts if p.instant.minute == 0 and p.instant + timedelta(hours=1) > two_days}
    assert hourly <= kept
    # daily 2w: the first point (00:00) of each day that ends after NOW - 14d
    two_weeks = NOW - timedelta(days=14)
    daily = {
        p.instant
        for p in pts
        if p.instant.hour == 0 and p.instant.minute == 0 and p.instant + timedelta(days=1) > two_weeks
    }
    assert daily <= kept
    assert kept == {p.instant for p in pts if p.instant > NOW - timedelta(hours=4)} | hourly | daily

    # counts: 4h of 15-minute points (16: the one exactly 4h old is out), hours of the
    # last two days (49 buckets intersect the window, minus those inside the 4h), 15 days
    assert len([t for t in kept if t > NOW - timedelta(hours=4)]) == 16
    assert len(daily) == 15
    assert min(kept) == datetime(2026, 2, 24, 0, 0, tzinfo=UTC)
    assert delete and all(p.instant < NOW - timedelta(hours=4) for p in delete)

    # run again one hour later after one more point: only old points leave
    later = NOW + timedelta(hours=1)
    more = [*keep, point(len(pts) + 1, later)]
    _, delete2 = select_points(more, policy, later)
    assert all(p.instant <= later - timedelta(hours=4) for p in delete2)
    assert all(p.instant < later - timedelta(days=2) or p.instant.minute != 0 for p in delete2)


def test_bucket_keeps_oldest_not_newest() -> None:
    base = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
    pts = [point(i + 1, base + timedelta(minutes=m)) for i, m in enumerate([5, 20, 50, 70, 95])]
    keep, delete = select_points(pts, RetentionPolicy.parse("hourly 1d"), NOW)
    # hour 10: oldest is :05; hour 11: oldest is 11:10; newest always
    assert ids(keep) == ["p-1", "p-4", "p-5"]
    assert ids(delete) == ["p-2", "p-3"]


def test_bucket_straddling_window_start_is_kept() -> None:
    """A bucket that only partly overlaps the window still keeps its oldest point, even
    though that point is older than keep_for."""
    now = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
    pts = series([0])
    old = point(0, datetime(2026, 3, 10, 10, 10, tzinfo=UTC))  # hour 10 ends 11:00 > 10:30
    keep, _ = select_points([old, *pts], RetentionPolicy.parse("hourly 2h"), now)
    assert old in keep


def test_ties_broken_by_seq() -> None:
    t = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
    pts = [point(3, t), point(1, t), point(2, t)]
    keep, delete = select_points(pts, RetentionPolicy.parse("hourly 1d"), NOW)
    assert ids(keep) == ["p-1", "p-3"] and ids(delete) == ["p-2"]


def test_naive_datetimes_are_utc() -> None:
    pts = series([3 * H, 30 * 60])
    naive = [p.model_copy(update={"instant": p.instant.replace(tzinfo=None)}) for p in pts]
    a = select_points(pts, RetentionPolicy.parse("all 1h"), NOW)
    b = select_points(naive, RetentionPolicy.parse("all 1h"), NOW.replace(tzinfo=None))
    assert ids(a[0]) == ids(b[0]) == ["p-2"]


@pytest.mark.parametrize("text", ["", "all", "hourly 0h", "often 2d",
                                  "all 4h, all 2h", "hourly 2d, every 1h for 1d",
                                  "all 1d, daily 12h"])
def test_policy_that_keeps_nothing_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        RetentionPolicy.parse(text)


def test_rules_that_keep_something_each_are_accepted() -> None:
    for text in ("all 4h, hourly 2d, daily 2w", "all 1h, daily 1w", "every 15m for 6h, hourly 2d"):
        assert len(RetentionPolicy.parse(text).rules) == len(text.split(","))
