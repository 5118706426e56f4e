"""Alerts: what operators are told when a protection needs them, and how it reaches them.

An ``Alert`` is built by workflow code (deterministically: ``workflow.now()``, no I/O)
and delivered by the activity ``alert.send`` (activities/alerts.py) to every configured
``Notifier``. A notifier raises when delivery fails, so Temporal retries the activity
with back-off; delivery is therefore at-least-once, and a webhook receiver can drop a
repeat by its ``X-Transcend-Alert-Id`` header (the same for every retry of one alert).

Notifier kinds plug in through ``register_notifier_kind``; ``webhook`` is built in.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import requests
from pydantic import Field

from transcend.config import Settings
from transcend.models import Model

AlertKind = Literal[
    "rpo_breached",
    "cycle_failing",
    "health_recovered",
    "test_failover_overdue",
    "failover_started",
    "failover_finished",
    "failback_finished",
]

SIGNATURE_HEADER = "X-Transcend-Signature"
ALERT_ID_HEADER = "X-Transcend-Alert-Id"
KIND_HEADER = "X-Transcend-Alert-Kind"

#: (connect, read) seconds: the activity's start-to-close timeout (workflows/notify.py)
#: must leave room for one slow receiver, and a hung one must not hold a worker slot.
WEBHOOK_TIMEOUT = (5.0, 10.0)
BODY_EXCERPT = 300


class Alert(Model):
    """One thing an operator should know about a protection, in words, with what to do."""

    kind: AlertKind
    protection: str
    severity: Literal["info", "warning", "critical"]
    message: str = Field(description="what happened and the action to take")
    at: datetime = Field(description="when the condition was detected (UTC)")
    details: dict[str, Any] = Field(default_factory=dict, description="JSON values only")


class NotifierError(Exception):
    """An alert did not reach a receiver; the activity fails so Temporal retries it."""


class Notifier(Protocol):
    """Delivers alerts somewhere. ``send`` blocks (it runs in a thread) and raises on any
    failure, with a message naming the receiver and what went wrong, so the activity is
    retried. ``str(notifier)`` names the receiver without secrets (it shows in errors)."""

    def send(self, alert: Alert) -> None: ...


def alert_body(alert: Alert) -> bytes:
    """The exact bytes POSTed (and signed): the alert as JSON."""
    return alert.model_dump_json().encode()


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of the body keyed with the secret>`` (GitHub's format)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def redacted_url(url: str) -> str:
    """Scheme, host and port only: webhook paths and queries often carry tokens
    (Slack, Teams), and errors end up in Temporal histories and logs."""
    parts = urlsplit(url)
    tail = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{tail}"


class WebhookNotifier:
    """POSTs the alert as JSON to a URL; any 2xx is delivered, anything else raises.

    Headers: ``Content-Type: application/json``, ``X-Transcend-Alert-Kind``,
    ``X-Transcend-Alert-Id`` (SHA-256 of the body, stable across retries) and, with a
    secret, ``X-Transcend-Signature: sha256=<hex>`` (HMAC-SHA256 of the body) so the
    receiver can check the alert came from transcend. Redirects are not followed: a
    302 would silently turn the POST into a GET.
    """

    def __init__(self, url: str, *, secret: str = "",
                 timeout: tuple[float, float] = WEBHOOK_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"alert webhook {redacted_url(url)!r} is not an http:// or https:// URL")
        self.url = url
        self.secret = secret
        self.timeout = timeout

    def __str__(self) -> str:
        return f"webhook {redacted_url(self.url)}"

    __repr__ = __str__

    def headers(self, body: bytes, alert: Alert) -> dict[str, str]:
        h = {
            "Content-Type": "application/json",
            "User-Agent": "transcend-alerts",
            KIND_HEADER: alert.kind,
            ALERT_ID_HEADER: hashlib.sha256(body).hexdigest()[:32],
        }
        if self.secret:
            h[SIGNATURE_HEADER] = signature(self.secret, body)
        return h

    def send(self, alert: Alert) -> None:
        body = alert_body(alert)
        try:
            r = requests.post(self.url, data=body, headers=self.headers(body, alert),
                              timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as e:
            raise NotifierError(
                f"{self}: {type(e).__name__}: {e}; check that the receiver is running and "
                "reachable from the worker (retried with back-off)") from None
        if not 200 <= r.status_code < 300:
            excerpt = r.text[:BODY_EXCERPT].strip() or "(empty body)"
            hint = ("redirects are not followed: configure the final URL"
                    if 300 <= r.status_code < 400 else "check the receiver's logs")
            raise NotifierError(
                f"{self} answered HTTP {r.status_code}: {excerpt}; {hint} (retried with back-off)")


# --------------------------------------------------------------------------- registry

NotifierFactory = Callable[[Settings], list[Notifier]]

_KINDS: dict[str, NotifierFactory] = {}


def register_notifier_kind(kind: str, factory: NotifierFactory) -> None:
    """Add a kind of notifier (e-mail, a chat API, a pager): ``factory`` builds the
    configured ones from the settings, and returns none when the kind is not configured."""
    _KINDS[kind] = factory


def notifier_kinds() -> list[str]:
    return sorted(_KINDS)


def notifiers_from_settings(settings: Settings) -> list[Notifier]:
    """Every configured notifier of every registered kind (empty: alerts are dropped)."""
    return [n for factory in _KINDS.values() for n in factory(settings)]


def _webhooks(settings: Settings) -> list[Notifier]:
    return [WebhookNotifier(url, secret=settings.alert_webhook_secret)
            for url in settings.alert_webhooks]


register_notifier_kind("webhook", _webhooks)
