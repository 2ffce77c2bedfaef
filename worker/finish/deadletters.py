"""Dead letters: the original job, untouched, plus why it died, in ``<queue>.XQ``.

The body is the job as received (an undecodable one byte for byte, a decoded one with the
optional envelope fields filled in, so it replays as it is); the reason is the header table
:data:`DEAD_LETTER_HEADER`, whose fields README.md lists ("What happens to a job", "Dead
letters"). A body nacked by dramatiq itself (only when publishing the dead letter failed) has
no such header; RabbitMQ's ``x-death`` still says when and from where.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

import pika
import pika.exceptions
from dramatiq.common import q_name, xq_name
from dramatiq.errors import BrokerConnectionError

from worker.errors import EnqueueError, FailureDetails

__all__ = ["DEAD_LETTER_HEADER", "DeadLetter", "publish_dead_letter"]

DEAD_LETTER_HEADER = "x-verloop-dead-letter"
_PUBLISH_ATTEMPTS = 3
_WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why a job was dead-lettered: what ops read later."""

    details: FailureDetails
    error: str
    outcome: Literal["invalid", "failed", "gave_up"]
    attempts: int
    queue: str
    actor: str
    message_id: str

    def header(self) -> dict[str, Any]:
        """The AMQP header table (strings and integers only, for every client's sake)."""
        now = dt.datetime.now(dt.UTC)
        table: dict[str, Any] = {
            "reason": self.details.reason,
            "error": self.error,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "dead_lettered_at": now.isoformat(timespec="seconds"),
            "dead_lettered_at_ms": int(now.timestamp() * 1000),
            "queue": self.queue,
            "actor": self.actor,
            "message_id": self.message_id,
            "worker": _WORKER_ID,
        }
        if self.details.http_status is not None:
            table["http_status"] = self.details.http_status
        if self.details.code is not None:
            table["code"] = self.details.code
        return table


def publish_dead_letter(broker: Any, body: bytes, letter: DeadLetter) -> None:
    """Publish ``body`` to the dead-letter queue of ``letter.queue``, confirmed by RabbitMQ.

    Uses the calling thread's broker channel (dramatiq keeps one per thread, in confirm mode).

    Raises:
        EnqueueError: RabbitMQ did not confirm it after a few reconnects.
    """
    routing_key = xq_name(q_name(letter.queue))
    properties = pika.BasicProperties(
        delivery_mode=2,
        content_type="application/json",
        message_id=letter.message_id,
        headers={DEAD_LETTER_HEADER: letter.header()},
    )
    last_error: Exception | None = None
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            broker.declare_queue(q_name(letter.queue), ensure=True)
            broker.channel.basic_publish(
                exchange="",
                routing_key=routing_key,
                body=body,
                properties=properties,
                mandatory=True,
            )
            return
        except (
            pika.exceptions.AMQPConnectionError,
            pika.exceptions.AMQPChannelError,
            BrokerConnectionError,
        ) as exc:
            last_error = exc
            del broker.connection  # the next attempt opens a fresh connection and channel
    raise EnqueueError(
        f"could not dead-letter message {letter.message_id} to {routing_key}: "
        f"{type(last_error).__name__}"
    )
