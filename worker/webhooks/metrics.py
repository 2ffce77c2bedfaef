"""The receiver's metrics (``verloop-worker webhooks``, served on ``WEBHOOK_METRICS_PORT``).

Every label value is fixed here, and each series starts at zero so a rate is defined from the
first scrape.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

__all__ = ["ITEM_KINDS", "REQUEST_RESULTS", "ReceiverMetrics"]

#: What became of a request.
REQUEST_RESULTS: Final = (
    "accepted",
    "bad_signature",
    "too_large",
    "malformed",
    "unavailable",
    "verified",
    "verify_refused",
    "not_found",
)
#: What a body's items became: a status published, an inbound message's event, ignored.
ITEM_KINDS: Final = ("status", "message", "ignored")
_PUBLISH_BUCKETS: Final = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ReceiverMetrics:
    """Requests by result, items by kind, and the wait for RabbitMQ's confirms per request."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)  # CPU, memory, open files of the receiver
        self.registry = registry
        self._requests = Counter(
            "verloop_webhook_requests_total",
            "Webhook requests by result (accepted: every publish of the body confirmed).",
            ["result"],
            registry=self.registry,
        )
        self._items = Counter(
            "verloop_webhook_items_total",
            "Items of accepted bodies: statuses published, inbound messages published as "
            "events, items ignored (another field, not an object).",
            ["kind"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "verloop_webhook_publish_seconds",
            "Per request, from its first publish until RabbitMQ confirmed all of them (or "
            "the request gave up), batching linger included.",
            buckets=_PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self.requests = {result: self._requests.labels(result) for result in REQUEST_RESULTS}
        self.items = {kind: self._items.labels(kind) for kind in ITEM_KINDS}
