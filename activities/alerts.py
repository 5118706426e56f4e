"""The activity that delivers alerts (transcend/alerts.py) to the configured notifiers."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import ActivityContext, in_thread
from transcend.alerts import Alert, Notifier, notifiers_from_settings


class AlertActivities:
    def __init__(self, ctx: ActivityContext, notifiers: list[Notifier] | None = None) -> None:
        self.ctx = ctx
        # Built once per worker: the settings do not change while it runs.
        self.notifiers = notifiers_from_settings(ctx.settings) if notifiers is None else notifiers

    @activity.defn(name="alert.send")
    async def send(self, alert: Alert) -> int:
        """Deliver the alert to every notifier, in parallel; returns how many received it.

        Any failure fails the attempt (after every notifier was tried, so one receiver
        that is down does not keep the others waiting), and Temporal retries it with
        back-off. A retry sends to all of them again: delivery is at-least-once.
        """
        if not self.notifiers:
            activity.logger.info("alert %s for %s not sent: no notifier configured "
                                 "(alert_webhooks)", alert.kind, alert.protection)
            return 0
        results = await asyncio.gather(*(in_thread(n.send, alert) for n in self.notifiers),
                                       return_exceptions=True)
        failures: list[str] = []
        for result in results:
            if isinstance(result, Exception):
                failures.append(str(result))
            elif isinstance(result, BaseException):
                raise result  # cancelled: not a delivery failure
        if failures:
            raise ApplicationError(
                f"alert {alert.kind} for {alert.protection!r} reached "
                f"{len(self.notifiers) - len(failures)} of {len(self.notifiers)} notifiers: "
                + "; ".join(failures), type="AlertNotDelivered")
        return len(self.notifiers)
