"""Sending alerts from workflow code (the delivery itself is the activity ``alert.send``).

Deterministic: no I/O, clock or randomness but Temporal's.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from transcend.alerts import Alert
    from transcend.api import CONTROL_TASK_QUEUE

#: A receiver that is down is retried for about a quarter of an hour (1 s doubling to
#: 60 s, 20 attempts) before the alert is given up and logged.
ALERT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=20,
)
#: One attempt: a webhook has 5 s to connect and 10 s to answer (transcend/alerts.py).
ALERT_ATTEMPT_TIMEOUT = timedelta(seconds=30)


async def send_alert(alert: Alert) -> None:
    """Deliver an alert; never fails the calling workflow. An alert that could not be
    delivered after all retries is logged (workflow logger) and dropped: a broken
    receiver must not stop replication or a failover."""
    try:
        await workflow.execute_activity(
            "alert.send", alert, result_type=int, task_queue=CONTROL_TASK_QUEUE,
            start_to_close_timeout=ALERT_ATTEMPT_TIMEOUT, retry_policy=ALERT_RETRY,
        )
    except ActivityError as e:
        workflow.logger.warning(
            "alert %s for %s not delivered after %d attempts: %s; check the receivers "
            "(alert_webhooks) and the worker log", alert.kind, alert.protection,
            ALERT_RETRY.maximum_attempts, e.cause or e)


class AlertQueue:
    """A workflow's alerts, sent one at a time, in order, by a background task.

    A receiver that is down is retried for minutes; the workflow must not wait that
    long before it handles the next cycle or answers an update, so ``put`` returns at
    once. ``pending()`` lists what is not yet delivered (the one being sent included),
    to hand over on continue-as-new; ``drained()`` waits until all are sent.
    """

    def __init__(self) -> None:
        self._pending: list[Alert] = []
        self._sender: asyncio.Task[None] | None = None

    def put(self, alert: Alert) -> None:
        self._pending.append(alert)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all())

    async def _send_all(self) -> None:
        try:
            while self._pending:
                await send_alert(self._pending[0])
                self._pending.pop(0)
        finally:
            self._sender = None

    def pending(self) -> list[Alert]:
        return list(self._pending)

    async def drained(self, timeout: timedelta | None = None) -> bool:
        """True when every alert was sent (or given up) within ``timeout``."""
        try:
            await workflow.wait_condition(lambda: not self._pending, timeout=timeout)
        except TimeoutError:
            return False
        return True
