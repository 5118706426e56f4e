"""The RPO Schedule's phase: protections with the same interval are spread over it."""

from __future__ import annotations

from collections import Counter

from activities.protection import schedule_offset


def test_offsets_are_stable_in_range_and_spread() -> None:
    names = [f"vm-{i:04d}" for i in range(1000)]
    offsets = [schedule_offset(n, 300) for n in names]
    assert all(0 <= o < 300 for o in offsets)
    assert offsets == [schedule_offset(n, 300) for n in names]  # the same after a restart
    # Spread like a uniform draw: 1,000 protections over 300 s put at most a handful in
    # any one second (the aligned schedules put all 1,000 in the same one).
    assert max(Counter(offsets).values()) <= 12
    assert len(set(offsets)) > 250
    assert schedule_offset("web", 1) == 0
    assert schedule_offset("web", 10) != schedule_offset("db", 10) or \
        schedule_offset("web", 300) != schedule_offset("db", 300)
