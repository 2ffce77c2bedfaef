"""What happens once a job's outcome is final: its outcome event and its campaign's progress."""

from __future__ import annotations

from typing import Any

import pika.exceptions
import structlog
from dramatiq.errors import BrokerConnectionError

from worker.campaigns.store import CampaignRef
from worker.errors import RedisUnavailable
from worker.finish.events import declare_exchange, publish_event
from worker.finish.middleware import JobRecord
from worker.runtime.services import Lifecycle

__all__ = ["OutcomeReporter"]

_log = structlog.get_logger()


class OutcomeReporter:
    """The outcome middleware's ``on_final``: publish the event, count campaign progress.

    Neither may fail the job: it already happened (a message sent cannot be unsent). The event
    goes to the outbox (:mod:`worker.finish.outbox`) unless it is already there (added with the
    send)
    or delivery is ``direct``; if Redis does not answer it is published directly instead. A
    failed direct publish is tried once more on a fresh connection; a failure after that is
    logged and the job's log line says ``event_published=false``.
    """

    def __init__(self, lifecycle: Lifecycle, exchange: str) -> None:
        self.lifecycle = lifecycle
        self.exchange = exchange

    def __call__(self, broker: Any, message: Any, record: JobRecord) -> None:
        fields = record.fields
        campaign_id, client_id = fields.get("campaign_id"), fields.get("client_id")
        if campaign_id and client_id and not record.campaign_counted:
            try:
                self.lifecycle.services.campaigns.count_outcome(
                    CampaignRef(client_id, campaign_id),
                    fields["outcome"],
                    fields.get("dead_letter"),
                )
            except RedisUnavailable:
                record.bind(campaign_counted=False)
                _log.warning("campaign progress not counted: Redis did not answer")
        if not self.exchange or record.event_queued:
            return
        outbox = self.lifecycle.services.outbox
        if outbox is not None:
            try:
                outbox.add(fields, record.extra)
                return
            except RedisUnavailable:
                record.bind(event_outbox=False)
        self._publish(broker, record)

    def _publish(self, broker: Any, record: JobRecord) -> None:
        for attempt in (1, 2):
            try:
                publish_event(broker.channel, self.exchange, record.fields, record.extra)
                return
            except (pika.exceptions.AMQPError, BrokerConnectionError) as exc:
                # A missing exchange closes the channel (404); a dead connection is replaced.
                del broker.connection
                if attempt == 2:
                    record.bind(event_published=False)
                    _log.error("outcome event not published", error=type(exc).__name__)
                    return
                try:
                    declare_exchange(broker.channel, self.exchange)
                except (pika.exceptions.AMQPError, BrokerConnectionError):
                    del broker.connection
