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
    """Acknowledgements that wait until their job is released (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: message id -> None (held, not acknowledged yet) or (consumer, message) parked.
        self._held: dict[str, tuple[HoldingConsumer, Any] | None] = {}
        #: Writes what every held job waits for (the ledger's pending records), at once.
        self.flush: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, message_id: str) -> None:
        """The job's acknowledgement waits for :meth:`release`."""
        with self._lock:
            self._held[message_id] = None

    def park(self, consumer: HoldingConsumer, message: Any) -> bool:
        """Keep ``message``'s acknowledgement if its job is held; False if it may leave now."""
        with self._lock:
            if message.message_id not in self._held:
                return False
            self._held[message.message_id] = (consumer, message)
            return True

    def release(self, message_id: str) -> None:
        """The job may be acknowledged: now, if its acknowledgement was parked."""
        with self._lock:
            parked = self._held.pop(message_id, None)
        if parked is not None:
            consumer, message = parked
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
