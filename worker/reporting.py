"""What happens once a job's outcome is final: its outcome event and its campaign's progress."""

from __future__ import annotations

from typing import Any

import structlog

from .errors import RedisUnavailable
from .outcomes import JobRecord
from .services import Lifecycle

__all__ = ["OutcomeReporter"]

_log = structlog.get_logger()


class OutcomeReporter:
    """The outcome middleware's ``on_final``: publish the event, count campaign progress.

    Neither may fail the job: it already happened (a message sent cannot be unsent). An event
    RabbitMQ did not take (see :class:`worker.events.EventPublisher`) is logged, and the job's
    log line says ``event_published=false``.
    """

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def __call__(self, broker: Any, message: Any, record: JobRecord) -> None:
        fields = record.fields
        campaign_id = fields.get("campaign_id")
        if campaign_id and not record.extra.pop("campaign_counted", False):
            try:
                self.lifecycle.services.campaigns.count_outcome(
                    campaign_id, fields["outcome"], fields.get("dead_letter")
                )
            except RedisUnavailable:
                record.bind(campaign_counted=False)
                _log.warning("campaign progress not counted: Redis did not answer")
        publisher = self.lifecycle.services.events
        if publisher is not None and not publisher.publish(fields, record.extra):
            record.bind(event_published=False)
