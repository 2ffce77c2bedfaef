"""Acknowledgements that wake the consumer thread once per batch, not once per job.

Dramatiq's worker threads acknowledge a job by asking the consumer thread (which owns the AMQP
connection) to send ``basic.ack``: one wake-up of that thread (a write to its wake-up pipe), one
poll, one frame and one ``send`` per job. Here a worker thread adds its job's delivery tag to a
list and wakes the consumer thread only if no wake-up is already pending; the consumer thread
then sends every tag on the list in one write. Under load several jobs share one wake-up;
alone, a job's ack leaves as soon as before.

Nothing else changes: a job is still acknowledged only after it finished (its outcome recorded),
and an ack that cannot be sent (the connection died) leaves the job unacknowledged, so RabbitMQ
delivers it again, which the idempotency ledger answers.
"""

from __future__ import annotations

import threading
from typing import Any

import pika.exceptions
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer
from dramatiq.errors import ConnectionClosed

from worker.connections.amqp import join_pending_writes

__all__ = ["BatchedAckConsumer"]


class BatchedAckConsumer(_RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer with batched acknowledgements (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._acks: list[int] = []
        self._acks_lock = threading.Lock()
        #: A wake-up of the consumer thread is pending: it will send what is on the list.
        self._ack_wake_pending = False
        #: Acks sent, and the wake-ups (writes) that sent them.
        self.acks_sent = 0
        self.ack_writes = 0

    def ack(self, message: Any) -> None:
        """Called by a worker thread once its job is finished."""
        try:
            self.known_tags.remove(message._tag)
        except KeyError:  # delivered on a connection since replaced: RabbitMQ redelivers it
            self.logger.warning("Failed to ack message: not in known tags.")
            return
        with self._acks_lock:
            self._acks.append(message._tag)
            if self._ack_wake_pending:
                return
            self._ack_wake_pending = True
        try:
            self.connection.add_callback_threadsafe(self._send_acks)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            with self._acks_lock:
                self._ack_wake_pending = False
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _send_acks(self) -> None:
        """On the consumer thread: send every ack on the list, in one write."""
        with self._acks_lock:
            tags, self._acks = self._acks, []
            self._ack_wake_pending = False
        if not tags:
            return
        impl = getattr(self.channel, "_impl", None)
        flush = getattr(self.channel, "_flush_output", None)
        if impl is not None and callable(flush):
            for tag in tags:
                impl.basic_ack(delivery_tag=tag)  # buffered
            join_pending_writes(self.connection)  # into one chunk, one send()
            flush()  # what BlockingChannel.basic_ack does after each ack
        else:  # pika's internals are not the expected ones: one flush per ack
            for tag in tags:
                self.channel.basic_ack(tag)
        self.acks_sent += len(tags)
        self.ack_writes += 1
