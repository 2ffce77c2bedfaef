"""A job's acknowledgement that waits for its record (:mod:`worker.send.carried`).

Dramatiq acknowledges a job as soon as its middleware returns. A sent job's ledger record may
still be waiting for the next claim's round trip then: its acknowledgement is *held* until the
record is written (or has failed and was handled), so that a process that dies in between
leaves the job unacknowledged and RabbitMQ delivers it again. :class:`HeldAcks` keeps the held
ones; :class:`HoldingConsumer` (dramatiq's RabbitMQ consumer, through the broker's
``consumer_class``) parks an acknowledgement that is held, and sends it when it is released. A
consumer closing (shutdown, or a lost connection) first writes every waiting record
(``HeldAcks.flush``), so their acknowledgements leave before its connection closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer

__all__ = ["HeldAcks", "HoldingConsumer"]

_log = structlog.get_logger()


class HeldAcks:
    """Acknowledgements that wait until their job is released (see the module docstring).

    A job is held by its queue and message id: a delayed job's delivery from the delay queue
    (``verloop.send.DQ``) shares its message id with the job it becomes on ``verloop.send``, and
    its acknowledgement must not wait for, or replace, the other's. Every acknowledgement
    parked under a held job leaves when it is released.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (queue, message id) -> the acknowledgements parked until it is released.
        self._held: dict[tuple[str, str], list[tuple[HoldingConsumer, Any]]] = {}
        #: Writes what every held job waits for (the ledger's pending records), at once.
        self.flush: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, queue: str, message_id: str) -> None:
        """Acknowledgements of the job ``message_id`` from ``queue`` wait for :meth:`release`."""
        with self._lock:
            self._held.setdefault((queue, message_id), [])

    def park(self, consumer: HoldingConsumer, message: Any) -> bool:
        """Keep ``message``'s acknowledgement if its job is held; False if it may leave now."""
        with self._lock:
            parked = self._held.get((consumer.queue_name, message.message_id))
            if parked is None:
                return False
            parked.append((consumer, message))
            return True

    def release(self, queue: str, message_id: str) -> None:
        """The job may be acknowledged: now, for every acknowledgement parked under it."""
        with self._lock:
            parked = self._held.pop((queue, message_id), [])
        for consumer, message in parked:
            consumer.ack_now(message)


class HoldingConsumer(_RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer whose acknowledgements may be held (module docstring)."""

    @property
    def _holds(self) -> HeldAcks:
        holds: HeldAcks = self.broker.held_acks
        return holds

    def ack(self, message: Any) -> None:
        if not self._holds.park(self, message):
            super().ack(message)  # type: ignore[no-untyped-call]

    def ack_now(self, message: Any) -> None:
        """Send a parked acknowledgement (from whichever thread released it)."""
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        except Exception as exc:  # noqa: BLE001 - the job is delivered again; the ledger answers
            _log.warning(
                "a held acknowledgement could not be sent; RabbitMQ will deliver the job again",
                message_id=message.message_id,
                error=type(exc).__name__,
            )

    def close(self) -> None:
        flush = self._holds.flush
        if flush is not None:
            try:
                flush()
            except Exception:  # noqa: BLE001 - the held jobs are delivered again
                _log.exception("writing the records held acknowledgements wait for failed")
        super().close()  # type: ignore[no-untyped-call]
