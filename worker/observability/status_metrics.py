"""The metrics of delivery receipts (the ``record_status`` actor): statuses by lane and by
number (the delivered-share alert reads these), failures by code, and the send-to-status lag."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from worker.finish.outcome import StatusFacts
from worker.observability.labels import LANES, Capped

__all__ = ["STATUS_LABELS", "StatusMetrics"]

#: Statuses as the metrics name them.
STATUS_LABELS: Final = ("sent", "delivered", "read", "failed", "other")
_LAG_BUCKETS: Final = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86_400)


class StatusMetrics:
    """Part of :class:`worker.observability.metrics.Metrics`; ``child`` is its cache of
    labelled series, ``codes`` caps the error-code label."""

    def __init__(
        self, registry: CollectorRegistry, child: Callable[..., Any], codes: Capped
    ) -> None:
        self._child = child
        self._codes = codes
        self.statuses = Counter(
            "verloop_statuses_total",
            "Statuses of sent messages recorded, each (message, status) once, by the send's "
            "lane (unknown: no send is recorded for the message).",
            ["status", "lane"],
            registry=registry,
        )
        self.ignored = Counter(
            "verloop_status_ignored_total",
            "Status jobs that changed nothing: a duplicate, or a message with no recorded send.",
            ["reason"],
            registry=registry,
        )
        self.lag = Histogram(
            "verloop_status_lag_seconds",
            "From a send's record to its delivered or read status (by WhatsApp's clock).",
            ["status"],
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.per_number = Counter(
            "verloop_number_statuses_total",
            "Statuses recorded per sending number (for its delivered share).",
            ["phone_id", "status"],
            registry=registry,
        )
        self.failures = Counter(
            "verloop_status_failures_total",
            "Failed statuses by WhatsApp's error code.",
            ["code"],
            registry=registry,
        )

    def start_known_series(self) -> None:
        for lane in (*LANES, "unknown"):
            for status in STATUS_LABELS:
                self._child(self.statuses, status, lane)
        for reason in ("duplicate", "unknown_message"):
            self._child(self.ignored, reason)
        for status in ("delivered", "read"):
            self._child(self.lag, status)

    def start_number(self, phone: str) -> None:
        """A number's series, at zero from its first job (its delivered share is judged by
        ``increase()``, which would miss the first status of a series born with it)."""
        for status in STATUS_LABELS:
            self._child(self.per_number, phone, status)

    def observe(self, status: StatusFacts, phone: str | None) -> None:
        """One status of a status job; ``phone`` is its number's label."""
        child = self._child
        if status.effect in (None, "waiting"):  # not recorded (yet)
            return
        if status.effect == "duplicate":
            child(self.ignored, "duplicate").inc()
            return
        if status.effect == "unknown":
            child(self.ignored, "unknown_message").inc()
            child(self.statuses, status.status, "unknown").inc()
            return
        child(self.statuses, status.status, status.send_lane or "unknown").inc()
        if phone is not None:
            child(self.per_number, phone, status.status).inc()
        if status.status == "failed":
            code, _ = self._codes(status.code or "none")
            child(self.failures, code).inc()
        elif status.status in ("delivered", "read") and status.lag_s is not None:
            child(self.lag, status.status).observe(status.lag_s)
