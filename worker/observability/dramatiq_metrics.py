"""dramatiq's own metrics (``dramatiq_*``), with each queue's and actor's series found once.

dramatiq's Prometheus middleware looks up the labelled series of four metrics for every message
it processes (a label tuple, a lock and a dict lookup each). :class:`DramatiqMetrics` keeps that
middleware as it is (its metrics, names, buckets, exposition process and shutdown) and only
remembers the series of each (queue, actor) pair: both are bounded, the queue being one the
worker consumes and the actor one it declared (:func:`worker.jobs.wire.parse_envelope`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from dramatiq.common import current_millis
from dramatiq.middleware.prometheus import Prometheus

__all__ = ["DramatiqMetrics"]


class _Series(NamedTuple):
    durations: Any
    inprogress: Any
    total: Any


class DramatiqMetrics(Prometheus):
    """dramatiq's Prometheus middleware, its series cached (see the module docstring)."""

    def after_process_boot(self, broker: Any) -> None:
        super().after_process_boot(broker)  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, str], _Series] = {}

    def _of(self, message: Any) -> _Series:
        key = (message.queue_name, message.actor_name)
        series = self._series.get(key)
        if series is None:  # two threads may both look it up: they get the same series
            series = self._series[key] = _Series(
                self.message_durations.labels(*key),
                self.inprogress_messages.labels(*key),
                self.total_messages.labels(*key),
            )
        return series

    def before_process_message(self, broker: Any, message: Any) -> None:
        if message.message_id in self.delayed_messages:
            self.delayed_messages.discard(message.message_id)
            self.inprogress_delayed_messages.labels(message.queue_name, message.actor_name).dec()
        self._of(message).inprogress.inc()
        self.message_start_times[message.message_id] = current_millis()

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        now = current_millis()
        started = self.message_start_times.pop(message.message_id, now)
        series = self._of(message)
        series.durations.observe(now - started)
        series.inprogress.dec()
        series.total.inc()
        if exception is not None:  # rare: looked up each time, as dramatiq does
            self.total_errored_messages.labels(message.queue_name, message.actor_name).inc()

    after_skip_message = after_process_message
