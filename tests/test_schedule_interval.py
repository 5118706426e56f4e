"""The Schedule's interval rule (workflows/replication.py ``schedule_interval``)."""

from __future__ import annotations

from transcend.models import ProtectionPolicy
from workflows.replication import MIN_INTERVAL, schedule_interval


def _policy(rpo: int, continuous: bool = False) -> ProtectionPolicy:
    return ProtectionPolicy(rpo_seconds=rpo, continuous=continuous)


def test_interval_leaves_room_for_the_cycle() -> None:
    assert schedule_interval(_policy(300), []) == 300
    assert schedule_interval(_policy(300), [20.0, 50.0, 30.0]) == 250  # the slowest of three


def test_interval_never_below_half_the_rpo() -> None:
    # Cycles of ~290 s are queueing: starting them every 10 s would add load (the
    # 1,000-protection benchmark's feedback loop); the floor is half the RPO.
    assert schedule_interval(_policy(300), [290.0] * 10) == 150
    assert schedule_interval(_policy(300), [290.0] * 10, floor_half_rpo=False) == MIN_INTERVAL
    assert schedule_interval(_policy(15), [14.0]) == MIN_INTERVAL


def test_continuous_mode_uses_the_rpo() -> None:
    assert schedule_interval(_policy(60, continuous=True), [59.0]) == 60
