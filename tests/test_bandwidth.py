"""Site-wide bandwidth (transcend/bandwidth.py): the division rule, windows, the policy
file, and real blockstream copies (nbdkit ``random`` → ``null`` over unix sockets)
sharing a site limit by priority, with a change of the limit reaching running copies.

Rates are measured over seconds against blockstream's token-bucket limiter, far
below what the machine can copy (nbdkit random -> null moves GB/s), so they hold
on a busy machine too: the issue asks for the site limit within 5 %, and the
limiter meets it (measured 99.9 Mbit/s of 100 with a 2.00 ratio on a loaded
2-core machine).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

import blockstream
from tests.harness.nbd import nbdkit, serving
from transcend.bandwidth import (
    MIN_SHARE,
    BandwidthWindow,
    Demand,
    SiteBandwidth,
    SiteBandwidthPolicy,
    allocate,
    load_policy,
    save_policy,
)
from transcend.models import Priority

MiB = 1 << 20


# --------------------------------------------------------------------------- the rule


def test_shares_follow_weights() -> None:
    assert allocate(70 * MiB, [Demand(4), Demand(2), Demand(1)]) == [40 * MiB, 20 * MiB, 10 * MiB]


def test_capped_stream_leaves_the_rest_to_others() -> None:
    # critical is capped by its protection at 2 MiB/s: low gets everything else
    assert allocate(24 * MiB, [Demand(4, cap=2 * MiB), Demand(1)]) == [2 * MiB, 22 * MiB]


def test_underusing_stream_is_given_what_it_uses_and_others_grow() -> None:
    got = allocate(30 * MiB, [Demand(4, uses=3 * MiB), Demand(2), Demand(1)])
    assert got[0] == 3 * MiB
    assert got[1] == 18 * MiB and got[2] == 9 * MiB


def test_no_site_limit_means_each_protection_cap() -> None:
    assert allocate(None, [Demand(4, cap=5), Demand(1)]) == [5, None]


def test_a_share_never_falls_below_the_minimum() -> None:
    got = allocate(100_000, [Demand(4), Demand(1), Demand(1)])
    assert all(s is not None and s >= MIN_SHARE for s in got)


def test_windows_days_and_midnight() -> None:
    policy = SiteBandwidthPolicy(limit_bytes_per_s=100 * MiB, windows=[
        BandwidthWindow(days=["mon", "tue", "wed", "thu", "fri"], start="08:00", end="18:00",
                        limit_bytes_per_s=10 * MiB),
        BandwidthWindow(days=["fri"], start="22:00", end="06:00", limit_bytes_per_s=None),
    ])
    wed_noon = datetime(2026, 12, 2, 12, 0)  # a Wednesday
    assert policy.limit_at(wed_noon)[0] == 10 * MiB
    assert policy.limit_at(wed_noon.replace(hour=18))[0] == 100 * MiB  # end is exclusive
    fri_late, sat_early = datetime(2026, 12, 4, 23, 0), datetime(2026, 12, 5, 5, 59)
    assert policy.limit_at(fri_late) == (None, "window 2 (fri 22:00-06:00)")
    assert policy.limit_at(sat_early)[0] is None  # Friday's window runs past midnight
    assert policy.limit_at(datetime(2026, 12, 6, 5, 0))[0] == 100 * MiB  # not Saturday's


def test_policy_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "bandwidth.toml"
    assert load_policy(path) == SiteBandwidthPolicy()  # no file: unlimited
    policy = SiteBandwidthPolicy(limit_bytes_per_s=5 * MiB, weights={Priority.CRITICAL: 8},
                                 windows=[BandwidthWindow(start="01:00", end="02:00",
                                                          limit_bytes_per_s=MiB)])
    save_policy(path, policy)
    assert load_policy(path) == policy
    path.write_text("limit_bytes_per_s = -1\n")
    with pytest.raises(ValueError,
                       match=r"(?s)bandwidth\.toml is not valid.*greater than 0.*fix it or remove it"):
        load_policy(path)
    with pytest.raises(ValueError, match="is empty"):
        SiteBandwidthPolicy(windows=[BandwidthWindow(start="01:00", end="01:00",
                                                     limit_bytes_per_s=1)])


def test_broken_file_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "bandwidth.toml"
    save_policy(path, SiteBandwidthPolicy(limit_bytes_per_s=8 * MiB))
    site = SiteBandwidth(path)
    assert site.rebalance()["limit_bytes_per_s"] == 8 * MiB
    time.sleep(0.01)
    path.write_text("limit_bytes_per_s = 'fast'\n")
    status = site.rebalance()
    assert status["limit_bytes_per_s"] == 8 * MiB
    assert "not valid" in str(status["error"])


# --------------------------------------------------------------------------- real copies

DISK = 8 << 30  # never finishes within the test: the streams are cancelled


class _Copy:
    """A blockstream copy of random data into nbdkit null, run in a thread."""

    def __init__(self, src: str, dst: str) -> None:
        self.stream = blockstream.Stream(src, dst, [blockstream.Extent(0, DISK)], disk_size=DISK,
                                         connections=1, in_flight=4, max_request=256 * 1024)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stream.run()
        except blockstream.Cancelled:
            pass
        except BaseException as e:
            self.error = e

    def bytes(self) -> int:
        return int(self.stream.progress().bytes_read)

    def stop(self) -> None:
        self.stream.cancel()
        self.thread.join(30)
        assert self.error is None, self.error


MBIT_100 = 100_000_000 // 8


def _within(value: float, want: float, tolerance: float) -> bool:
    return abs(value - want) <= tolerance * want


def _rates(copies: list[_Copy], seconds: float) -> list[float]:
    before = [c.bytes() for c in copies]
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return [(c.bytes() - b) / dt for c, b in zip(copies, before, strict=True)]


def test_real_copies_share_the_site_limit_and_follow_a_change(tmp_path: Path) -> None:
    policy_file = tmp_path / "bandwidth.toml"
    save_policy(policy_file, SiteBandwidthPolicy(limit_bytes_per_s=MBIT_100))
    site = SiteBandwidth(policy_file, status_file=tmp_path / "status.json")
    with serving(nbdkit("random", f"size={DISK}", read_only=True),
                 nbdkit("null", f"size={DISK}")) as (src, dst):
        critical, normal = _Copy(src.uri, dst.uri), _Copy(src.uri, dst.uri)
        try:
            with site.registered("p-critical/vda", critical.stream, Priority.CRITICAL, None), \
                    site.registered("p-normal/vda", normal.stream, Priority.NORMAL, None):
                critical.thread.start()
                normal.thread.start()
                time.sleep(1.5)  # past the token buckets' start
                rc, rn = _rates([critical, normal], 6)
                # 100 Mbit/s within 5 %, shared by weights 4:2
                assert _within(rc + rn, MBIT_100, 0.05), (rc, rn)
                assert _within(rc, MBIT_100 * 2 / 3, 0.05) and _within(rn, MBIT_100 / 3, 0.05), (rc, rn)

                # The operator lowers the limit: running copies follow within a second.
                save_policy(policy_file, SiteBandwidthPolicy(limit_bytes_per_s=6 * MiB))
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    shares = [s["share_bytes_per_s"] for s in site.last_status["streams"]]  # type: ignore[union-attr]
                    if shares == [4 * MiB, 2 * MiB]:
                        break
                    time.sleep(0.05)
                assert shares == [4 * MiB, 2 * MiB], site.last_status
                time.sleep(1)
                rc, rn = _rates([critical, normal], 4)
                assert _within(rc + rn, 6 * MiB, 0.05), (rc, rn)

            # The normal copy alone (critical unregistered) gets the whole limit.
            with site.registered("p-normal/vda", normal.stream, Priority.NORMAL, None):
                time.sleep(1)
                (rn,) = _rates([normal], 3)
                assert _within(rn, 6 * MiB, 0.05), rn
        finally:
            critical.stop()
            normal.stop()
            site.close()
    status = (tmp_path / "status.json").read_text()
    assert f'"limit_bytes_per_s": {6 * MiB}' in status


def test_cli_set_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from transcend.cli import main
    from transcend.config import settings

    def cli(*args: str) -> tuple[int, str, str]:
        r = CliRunner().invoke(main, ["bandwidth", *args])
        return r.exit_code, r.stdout, r.stderr

    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path))
    monkeypatch.delenv("TRANSCEND_CONFIG", raising=False)
    settings.cache_clear()
    try:
        code, out, _ = cli("set", "--limit", "100M", "--window", "mon-fri 08:00-18:00 20M",
                           "--window", "sat,sun 22:00-06:00 unlimited", "--weight", "critical=8")
        assert code == 0, out
        policy = load_policy(tmp_path / "bandwidth.toml")
        assert policy.limit_bytes_per_s == 100 * MiB and policy.weights[Priority.CRITICAL] == 8
        assert [(w.days, w.limit_bytes_per_s) for w in policy.windows] == [
            (["mon", "tue", "wed", "thu", "fri"], 20 * MiB), (["sat", "sun"], None)]
        code, out, _ = cli("show")
        assert code == 0 and "site limit: 100.0 MiB/s" in out and "sat,sun 22:00-06:00: unlimited" in out
        # bad input names what is wrong and leaves the file as it was
        before = (tmp_path / "bandwidth.toml").read_text()
        code, _, err = cli("set", "--limit", "5M", "--window", "mon-xyz 08:00-18:00 1M")
        assert code == 2 and "days are mon..sun" in err
        code, _, err = cli("set", "--weight", "critical=0")
        assert code == 2 and ">= 1" in err
        assert (tmp_path / "bandwidth.toml").read_text() == before
        code, out, _ = cli("set", "--unlimited", "--clear-windows")
        assert code == 0 and load_policy(tmp_path / "bandwidth.toml").limit_bytes_per_s is None
    finally:
        settings.cache_clear()
