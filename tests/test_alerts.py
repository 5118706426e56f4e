"""Alerts: the webhook notifier against a real HTTP receiver, the settings, the
``alert.send`` activity, the once-per-transition rule, and end to end a protection whose
RPO no cycle can meet alerting a webhook receiver that fails twice before it answers.

The receiver is an ``http.server`` in a thread, started by each test: every check
compares what actually arrived over HTTP (body bytes, headers, HMAC) with what was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.alerts import AlertActivities
from activities.context import ActivityContext
from tests.harness.guest import GuestImage
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    protection_spec,
    start_protection,
    status,
    wait_first_point,
    wait_for,
)
from tests.harness.stack import Stack
from transcend import alerts as alerts_module
from transcend.alerts import Alert, Notifier, NotifierError, WebhookNotifier, notifiers_from_settings
from transcend.api import ReplicationCarry, ReplicationStatus
from transcend.api import TestFailoverReport as FailoverReport
from transcend.catalog import Catalog
from transcend.config import Settings, load_settings
from transcend.models import Health, ProtectionPolicy, ProtectionState
from workflows.replication import FAILED_AFTER, drill_alert, health_alert
from workflows.replication import test_failover_due as drill_due

SECRET = "correct horse battery staple"


# --------------------------------------------------------------------------- receiver


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A webhook receiver: answers ``statuses`` in turn (with ``error_body``), then 200."""

    statuses: list[int] = field(default_factory=list)
    error_body: bytes = b"receiver says no"
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/hook") -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def snapshot(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def delivered(self) -> list[dict[str, Any]]:
        """Alerts the receiver accepted (answered 2xx), in arrival order."""
        return [r.json() for r in self.snapshot() if 200 <= r.status < 300]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
        with self.lock:
            code = self.statuses.pop(0) if self.statuses else 200
            self.requests.append(Request(h.path, dict(h.headers.items()), body, code))
        reply = b"ok" if code < 300 else self.error_body
        h.send_response(code)
        if 300 <= code < 400:
            h.send_header("Location", "http://127.0.0.1:9/elsewhere")
        h.send_header("Content-Length", str(len(reply)))
        h.end_headers()
        h.wfile.write(reply)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rx.handle(self)

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    rx.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
    thread = threading.Thread(target=rx.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rx
    finally:
        rx.server.shutdown()
        rx.server.server_close()
        thread.join(timeout=10)


def an_alert(kind: str = "rpo_breached") -> Alert:
    return Alert.model_validate({
        "kind": kind, "protection": "web", "severity": "warning",
        "message": "Protection 'web' is not meeting its RPO target of 10s; raise the RPO",
        "at": datetime(2026, 11, 23, 11, 6, 7, tzinfo=UTC),
        "details": {"rpo_target_seconds": 10, "rpo_last_seconds": 31.5, "last_point_id": None},
    })


def expected_signature(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- webhook notifier


def test_webhook_posts_the_alert_json_signed(receiver: Receiver) -> None:
    alert = an_alert()
    WebhookNotifier(receiver.url("/hooks/ops"), secret=SECRET).send(alert)

    (req,) = receiver.snapshot()
    assert req.path == "/hooks/ops"
    assert req.headers["Content-Type"] == "application/json"
    assert Alert.model_validate_json(req.body) == alert
    assert req.json()["at"] == "2026-11-23T11:06:07Z"
    assert req.headers["X-Transcend-Signature"] == expected_signature(req.body)
    assert req.headers["X-Transcend-Alert-Kind"] == "rpo_breached"
    assert req.headers["X-Transcend-Alert-Id"] == hashlib.sha256(req.body).hexdigest()[:32]


def test_webhook_without_secret_is_unsigned_and_retries_carry_the_same_id(receiver: Receiver) -> None:
    alert = an_alert()
    notifier = WebhookNotifier(receiver.url())
    notifier.send(alert)
    notifier.send(alert)
    first, second = receiver.snapshot()
    assert "X-Transcend-Signature" not in first.headers
    assert first.body == second.body
    assert first.headers["X-Transcend-Alert-Id"] == second.headers["X-Transcend-Alert-Id"]


def test_webhook_non_2xx_raises_with_status_and_body(receiver: Receiver) -> None:
    receiver.statuses = [500]
    receiver.error_body = b"database is locked, try later"
    notifier = WebhookNotifier(receiver.url("/hooks/T0KEN-in-path"))
    with pytest.raises(NotifierError) as e:
        notifier.send(an_alert())
    text = str(e.value)
    assert "HTTP 500" in text
    assert "database is locked, try later" in text
    assert "T0KEN" not in text, "webhook paths often hold tokens; errors must not show them"
    assert len(receiver.snapshot()) == 1


def test_webhook_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.statuses = [302]
    with pytest.raises(NotifierError, match=r"HTTP 302.*redirects are not followed"):
        WebhookNotifier(receiver.url()).send(an_alert())
    assert [r.status for r in receiver.snapshot()] == [302]


def test_webhook_unreachable_says_what_to_check(receiver: Receiver) -> None:
    url = receiver.url()
    assert receiver.server is not None
    receiver.server.shutdown()
    receiver.server.server_close()  # nothing listens on the port any more
    with pytest.raises(NotifierError, match="check that the receiver is running"):
        WebhookNotifier(url, timeout=(2.0, 2.0)).send(an_alert())


def test_webhook_refuses_a_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="not an http"):
        WebhookNotifier("ftp://example.com/hook")


# --------------------------------------------------------------------------- settings, registry


def test_settings_from_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSCEND_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("TRANSCEND_ALERT_WEBHOOKS", " http://a.example/x , https://b.example/y,")
    monkeypatch.setenv("TRANSCEND_ALERT_WEBHOOK_SECRET", SECRET)
    s = load_settings()
    assert s.alert_webhooks == ["http://a.example/x", "https://b.example/y"]
    assert s.alert_webhook_secret == SECRET

    monkeypatch.delenv("TRANSCEND_ALERT_WEBHOOKS")
    toml = tmp_path / "transcend.toml"
    toml.write_text('alert_webhooks = ["https://c.example/hook"]\n')
    assert load_settings(str(toml)).alert_webhooks == ["https://c.example/hook"]

    monkeypatch.setenv("TRANSCEND_ALERT_WEBHOOKS", "hooks.example.com/x")
    with pytest.raises(ValidationError, match="not an http:// or https:// URL"):
        load_settings()


def test_notifiers_from_settings_and_plugging_in_a_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    assert notifiers_from_settings(Settings()) == []
    (n,) = notifiers_from_settings(Settings(alert_webhooks=["https://h.example/a"],
                                            alert_webhook_secret=SECRET))
    assert isinstance(n, WebhookNotifier)
    assert (n.url, n.secret) == ("https://h.example/a", SECRET)

    sent: list[Alert] = []

    class Memory:
        def send(self, alert: Alert) -> None:
            sent.append(alert)

    monkeypatch.setitem(alerts_module._KINDS, "memory", lambda s: [Memory()])
    built = notifiers_from_settings(Settings())
    assert len(built) == 1
    built[0].send(an_alert())
    assert sent == [an_alert()]


# --------------------------------------------------------------------------- the activity


class Failing:
    def __str__(self) -> str:
        return "failing notifier"

    def send(self, alert: Alert) -> None:
        raise NotifierError("failing notifier: receiver down")


@pytest.fixture
def activity_ctx(tmp_path: Path) -> ActivityContext:
    s = Settings(home=tmp_path)
    return ActivityContext(settings=s, catalog=Catalog.from_settings(s))


def test_activity_without_notifiers_returns_zero(activity_ctx: ActivityContext) -> None:
    acts = AlertActivities(activity_ctx)  # the settings configure none
    assert acts.notifiers == []
    assert asyncio.run(ActivityEnvironment().run(acts.send, an_alert())) == 0


def test_activity_sends_to_every_notifier_and_fails_when_one_fails(
    activity_ctx: ActivityContext, receiver: Receiver
) -> None:
    good: list[Notifier] = [WebhookNotifier(receiver.url("/a")), WebhookNotifier(receiver.url("/b"))]
    ok = AlertActivities(activity_ctx, notifiers=good)
    assert asyncio.run(ActivityEnvironment().run(ok.send, an_alert())) == 2
    assert sorted(r.path for r in receiver.snapshot()) == ["/a", "/b"]

    mixed = AlertActivities(activity_ctx, notifiers=[*good, Failing()])
    with pytest.raises(ApplicationError) as e:
        asyncio.run(ActivityEnvironment().run(mixed.send, an_alert("cycle_failing")))
    assert e.value.type == "AlertNotDelivered"
    assert not e.value.non_retryable, "a failed delivery must be retried by Temporal"
    assert "reached 2 of 3 notifiers" in str(e.value)
    assert "receiver down" in str(e.value)
    # the others were still tried in that attempt
    assert [r.json()["kind"] for r in receiver.snapshot()][2:] == ["cycle_failing"] * 2


def test_activity_from_settings_uses_the_configured_webhook(tmp_path: Path, receiver: Receiver) -> None:
    s = Settings(home=tmp_path, alert_webhooks=[receiver.url()], alert_webhook_secret=SECRET)
    acts = AlertActivities(ActivityContext(settings=s, catalog=Catalog.from_settings(s)))
    assert asyncio.run(ActivityEnvironment().run(acts.send, an_alert())) == 1
    (req,) = receiver.snapshot()
    assert req.headers["X-Transcend-Signature"] == expected_signature(req.body)


# --------------------------------------------------------------------------- once per transition


def test_health_alert_once_per_transition() -> None:
    c = ReplicationCarry()
    now = datetime(2026, 11, 23, tzinfo=UTC)
    kinds: list[str | None] = []

    def step(health: Health, reason: str, **carry: Any) -> None:
        for k, v in carry.items():
            setattr(c, k, v)
        alert = health_alert("web", health, reason, c, 60, now)
        kinds.append(alert.kind if alert else None)

    step(Health.HEALTHY, "waiting for the first point")
    step(Health.WARNING, "RPO 75s exceeded the target 60s", recent_rpo=[75.0], last_point_id="p1")
    step(Health.WARNING, "RPO 80s exceeded the target 60s", recent_rpo=[75.0, 80.0])
    step(Health.WARNING, "last cycle failed: boom", consecutive_failures=1, last_error="boom")
    step(Health.FAILED, f"{FAILED_AFTER} cycles failed in a row", consecutive_failures=FAILED_AFTER)
    step(Health.FAILED, "4 cycles failed in a row", consecutive_failures=FAILED_AFTER + 1)
    step(Health.WARNING, "replication paused; resume it", paused=True)
    step(Health.HEALTHY, "within RPO", paused=False, consecutive_failures=0, recent_rpo=[30.0])
    step(Health.HEALTHY, "within RPO")
    step(Health.WARNING, "failing_over: started", dr_state=ProtectionState.FAILING_OVER)
    step(Health.WARNING, "replication paused; resume it", dr_state=None, paused=True)
    assert kinds == [None, "rpo_breached", None, None, "cycle_failing", None, None,
                     "health_recovered", None, None, None]
    assert c.alerted is None


def test_health_alert_payload_says_what_to_do() -> None:
    c = ReplicationCarry(recent_rpo=[31.0], last_point_id="p2",
                         last_point_instant=datetime(2026, 11, 23, 11, tzinfo=UTC))
    now = datetime(2026, 11, 23, 11, 0, 31, tzinfo=UTC)
    alert = health_alert("db", Health.WARNING, "RPO 31s exceeded the target 10s", c, 10, now)
    assert alert is not None and c.alerted == "rpo_breached"
    assert (alert.kind, alert.severity, alert.protection, alert.at) == ("rpo_breached", "warning", "db", now)
    assert "raise the RPO" in alert.message and "transcend status db" in alert.message
    assert alert.details["rpo_last_seconds"] == 31.0
    assert alert.details["last_point_instant"] == "2026-11-23T11:00:00+00:00"
    json.loads(alert.model_dump_json())  # JSON values only: it travels as a payload

    c.recent_rpo = [5.0]
    back = health_alert("db", Health.HEALTHY, "within RPO", c, 10, now + timedelta(seconds=20))
    assert back is not None
    assert (back.kind, back.severity, back.details["recovered_from"]) == ("health_recovered", "info",
                                                                          "rpo_breached")


def test_drill_alert_once_per_due_time_and_a_failed_test_does_not_count() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    policy = ProtectionPolicy(rpo_seconds=60, test_failover_every_seconds=7 * 86400)
    c = ReplicationCarry(protected_since=start)
    assert drill_due(ProtectionPolicy(rpo_seconds=60), c) is None  # no cadence, never due
    due = start + timedelta(days=7)
    assert drill_due(policy, c) == due
    assert drill_alert("db", policy, c, due - timedelta(seconds=1)) is None
    first = drill_alert("db", policy, c, due)
    assert first is not None and (first.kind, first.severity) == ("test_failover_overdue", "warning")
    assert first.details["due_at"] == due.isoformat() and first.details["last_test_failover_at"] is None
    assert "transcend test-failover db" in first.message
    assert drill_alert("db", policy, c, due + timedelta(hours=1)) is None  # once per due time
    json.loads(first.model_dump_json())

    # A failed test does not move the due time; a successful one does, from when it was
    # healthy, and the next overdue is alerted again.
    failed = FailoverReport(point_id="p1", started_at=due + timedelta(hours=2), ok=False,
                                error="health check timed out")
    c.test_failovers = [failed]
    assert drill_due(policy, c) == due
    assert drill_alert("db", policy, c, due + timedelta(hours=3)) is None
    healthy_at = due + timedelta(hours=4, minutes=2)
    c.test_failovers = [failed, FailoverReport(point_id="p2", started_at=due + timedelta(hours=4),
                                                   healthy_at=healthy_at, rto_seconds=120.0, ok=True)]
    next_due = healthy_at + timedelta(days=7)
    assert drill_due(policy, c) == next_due
    assert drill_alert("db", policy, c, next_due - timedelta(minutes=1)) is None
    # Not while paused or during a DR operation; alerted once that is over.
    c.paused = True
    assert drill_alert("db", policy, c, next_due) is None
    c.paused, c.dr_state = False, ProtectionState.FAILED_OVER
    assert drill_alert("db", policy, c, next_due) is None
    c.dr_state = None
    second = drill_alert("db", policy, c, next_due + timedelta(minutes=5))
    assert second is not None and second.details["last_successful_rto_seconds"] == 120.0
    assert second.details["due_at"] == next_due.isoformat()


def test_policy_refuses_a_drill_cadence_under_a_minute() -> None:
    with pytest.raises(ValidationError, match="test_failover_every_seconds"):
        ProtectionPolicy(rpo_seconds=60, test_failover_every_seconds=30)


# --------------------------------------------------------------------------- end to end


RPO_REASON = re.compile(r"^RPO (\d+)s exceeded the target (\d+)s|^no new point for (\d+)s")


def _rpo_breach(st: ReplicationStatus) -> bool:
    return st.health == Health.WARNING and RPO_REASON.match(st.health_reason) is not None


async def _listed(client: Client, query: str) -> list[str]:
    """Workflow ids a visibility query returns (what the UI's list view shows), polled
    for up to 20 s: visibility lags the workflow a little."""
    found: list[str] = []
    for _ in range(40):
        found = [w.id async for w in client.list_workflows(query)]
        if found:
            break
        await asyncio.sleep(0.5)
    return found


@pytest.mark.guest
@pytest.mark.timeout(600)
def test_rpo_breach_alerts_a_webhook_with_retries(
    guest_image: GuestImage, stack: Stack, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.statuses = [500, 500]  # the first two deliveries fail; Temporal retries
    stack.kill_workers()
    stack.env["TRANSCEND_ALERT_WEBHOOKS"] = receiver.url("/hooks/transcend")
    stack.env["TRANSCEND_ALERT_WEBHOOK_SECRET"] = SECRET
    stack.start_worker()
    asyncio.run(_rpo_breach_alert(guest_image, stack, tmp_path, receiver))


async def _rpo_breach_alert(guest_image: GuestImage, stack: Stack, tmp_path: Path,
                            receiver: Receiver) -> None:
    vm = f"transcend-alerts-{os.getpid()}"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    started = datetime.now(UTC)
    with booted_guest(guest_image, tmp_path, vm):
        # RPO 10 s, the minimum: the Schedule cannot start cycles more often than every
        # 10 s, so interval + cycle time is always above it; at 1 MiB/s the first, full
        # copy alone takes longer than the RPO.
        # And a test failover due every minute, which none will meet.
        handle = await start_protection(
            client, protection_spec("alerts", vm, src, dst, rpo=10, bandwidth=1 << 20,
                                    test_failover_every=60))
        st = await wait_first_point(handle, 300)
        assert st.cycles_failed == 0, f"first cycle failed: {st.last_error}"

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not receiver.delivered() and loop.time() < deadline:
            await asyncio.sleep(0.5)
        requests = receiver.snapshot()
        assert receiver.delivered(), f"no alert delivered; requests {requests}\n{stack.worker_log_tail()}"

        # The first alert failed twice and was delivered by the third attempt (alerts go
        # out one at a time, in order): the same bytes each time, signed with the
        # configured secret.
        first = requests[:3]
        assert [r.status for r in first] == [500, 500, 200], [(r.status, r.body) for r in requests]
        assert first[0].body == first[1].body == first[2].body
        for r in first:
            assert r.path == "/hooks/transcend"
            assert r.headers["X-Transcend-Signature"] == expected_signature(r.body)
        while not any(a["kind"] == "rpo_breached" for a in receiver.delivered()) \
                and loop.time() < deadline:
            await asyncio.sleep(0.5)
        rpo_alerts = [r for r in receiver.snapshot()
                      if r.status == 200 and r.json()["kind"] == "rpo_breached"]
        assert rpo_alerts, [r.body for r in receiver.snapshot()]
        alert = Alert.model_validate_json(rpo_alerts[0].body)
        assert alert.kind == "rpo_breached"
        assert alert.protection == "alerts"
        assert alert.severity == "warning"
        assert started <= alert.at <= datetime.now(UTC)
        assert alert.details["health"] == "warning"
        assert alert.details["rpo_target_seconds"] == 10
        assert "transcend status alerts" in alert.message
        m = RPO_REASON.match(alert.details["reason"])
        assert m is not None, alert.details["reason"]
        if m.group(1):  # "RPO Xs exceeded": the measured RPO of the last cycle
            assert alert.details["rpo_last_seconds"] > 10
            assert int(m.group(1)) == round(alert.details["rpo_last_seconds"])
        else:  # "no new point for Xs": more than twice the RPO
            assert int(m.group(3)) > 20

        # Cycles go on breaching the RPO. The protection is in warning for it, and the
        # alerts follow the transitions: one per change, never the same one twice in a
        # row however many cycles breach (a transient recovery is alerted as such).
        ok_at_alert = (await status(handle)).cycles_ok
        st = await wait_for(lambda: status(handle),
                            lambda s: s.cycles_ok >= ok_at_alert + 3 and _rpo_breach(s)
                            and receiver.delivered()[-1]["kind"] == "rpo_breached",
                            180, "three more cycles, in RPO breach, with the alert delivered")
        assert st.rpo_target_seconds == 10
        assert st.health == Health.WARNING
        assert st.rpo_last_seconds is not None and st.rpo_last_seconds > 10, st
        delivered = [a["kind"] for a in receiver.delivered() if a["protection"] == "alerts"
                     and a["kind"] != "test_failover_overdue"]
        assert delivered[0] == "rpo_breached"
        assert set(delivered) <= {"rpo_breached", "health_recovered"}, delivered
        assert all(a != b for a, b in pairwise(delivered)), delivered
        assert len(delivered) < st.cycles_ok, (delivered, st.cycles_ok)
        # The catalog (what `transcend status` shows) says so too; written just after.
        for _ in range(40):
            if cat.get_protection("alerts").health == Health.WARNING:
                break
            await asyncio.sleep(0.5)
        assert cat.get_protection("alerts").health == Health.WARNING
        # The Temporal UI's list view finds it: the visibility query for unhealthy
        # protections returns exactly this one (visibility lags the workflow a little).
        found = await _listed(client, 'WorkflowType = "Replication" AND TranscendHealth != "healthy"')
        assert found == [handle.id], found

        # No test failover ran: a minute after replication started the drill is overdue,
        # alerted once (not again at each wake-up), and the UI lists it by due time.
        st = await wait_for(lambda: status(handle), lambda s: s.test_failover_overdue, 120,
                            "the test failover overdue")
        assert st.test_failover_due_at is not None and st.last_test_failover is None
        overdue: list[dict[str, Any]] = []
        for _ in range(120):
            overdue = [a for a in receiver.delivered() if a["kind"] == "test_failover_overdue"]
            if overdue:
                break
            await asyncio.sleep(0.5)
        assert overdue, receiver.delivered()
        drill = Alert.model_validate(overdue[0])
        assert (drill.protection, drill.severity) == ("alerts", "warning")
        assert drill.details["due_at"] == st.test_failover_due_at.isoformat()
        assert drill.details["test_failover_every_seconds"] == 60
        assert drill.details["last_test_failover_at"] is None
        protected_since = st.test_failover_due_at - timedelta(seconds=60)
        assert started <= protected_since <= drill.at
        assert "transcend test-failover alerts" in drill.message
        memo = await (await handle.describe()).memo_value("summary")
        assert isinstance(memo, str) and "test failover overdue since" in memo, memo
        found = await _listed(client, 'WorkflowType = "Replication" AND TranscendTestFailoverDue < '
                                      f'"{datetime.now(UTC).isoformat()}"')
        assert found == [handle.id], found
        await asyncio.sleep(12)  # at least one more wake-up (RPO 10 s): still one alert
        assert [a["kind"] for a in receiver.delivered()].count("test_failover_overdue") == 1

        await handle.execute_update("pause", result_type=ReplicationStatus)
