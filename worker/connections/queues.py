"""The arguments every queue of the worker is declared with, classic or quorum (``QUEUE_TYPE``).

RabbitMQ refuses (``PRECONDITION_FAILED``) a declaration whose arguments differ from the queue's,
so the worker's broker, the producer API and the campaign enqueuer all take them from here.

``classic`` (the default) is dramatiq's own: a work queue and its delay queue dead-letter to
``<queue>.XQ``, which keeps a dead letter for a week.

``quorum`` adds, on the work and delay queues:

* ``x-delivery-limit`` :data:`DELIVERY_LIMIT`. A retry or a deferral is acknowledged and
  published again (a new message, counted from zero), so a job comes back from RabbitMQ only
  when the connection of the consumer holding it closed: a worker restarted, killed, or cut
  off from its node. A delayed job is held, unacknowledged, by the delay-queue consumer for up
  to 25 minutes (``MAX_SINGLE_DELAY_S``): every restart in that time counts one. The limit is
  far above what restarts add up to, and a job that goes past it (one that kills every worker
  that takes it) is dead-lettered, not dropped. RabbitMQ 4.0 and later limit deliveries to 20
  unless told otherwise; before 4.0 there is no default.
* ``x-dead-letter-strategy: at-least-once`` with ``x-overflow: reject-publish`` (which it
  requires): a job dead-lettered by RabbitMQ stays in its queue until ``<queue>.XQ`` confirms it
  (the default, at-most-once, loses it if the dead-letter queue does not take it).

and on ``<queue>.XQ`` an ``x-delivery-limit`` of :data:`DEAD_LETTER_DELIVERY_LIMIT`: the
``dlq`` commands read dead letters without acknowledging them, and every read returns them
(RabbitMQ 3.x counts each return as a delivery); with no dead-letter exchange of its own a
dead letter past the limit would be dropped, so the limit is beyond any number of reads.

No queue has ``x-max-priority`` (quorum queues refuse it before RabbitMQ 4.3): campaign jobs
are kept behind transactional ones by having a queue of their own, not by AMQP priorities.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
from dramatiq.common import xq_name

__all__ = [
    "DEAD_LETTER_DELIVERY_LIMIT",
    "DELIVERY_LIMIT",
    "QUEUE_TYPES",
    "QueueType",
    "dead_letter_queue_arguments",
    "inequivalent_queue",
    "work_queue_arguments",
]

QueueType = Literal["classic", "quorum"]
QUEUE_TYPES: Final = ("classic", "quorum")

#: Deliveries of one message a quorum work or delay queue allows (see the module docstring).
DELIVERY_LIMIT: Final = 1000
#: The same for a quorum dead-letter queue: the largest signed 32-bit integer, so that reading
#: dead letters never drops one.
DEAD_LETTER_DELIVERY_LIMIT: Final = 2**31 - 1

#: Where an operator reads how to move a deployment from one queue type to the other.
MIGRATION_DOC: Final = 'README.md, "Running against a RabbitMQ cluster"'

_PRECONDITION_FAILED: Final = 406


def work_queue_arguments(queue: str, queue_type: QueueType = "classic") -> dict[str, Any]:
    """The arguments of work queue ``queue`` and of its delay queue (dramatiq declares both
    the same way)."""
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": xq_name(queue),
    }
    if queue_type == "quorum":
        arguments.update(
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        )
    return arguments


def dead_letter_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """The arguments of every ``<queue>.XQ``."""
    # A static TTL: messages expire in order, from the head (dramatiq's own value).
    arguments: dict[str, Any] = {"x-message-ttl": DEAD_MESSAGE_TTL}
    if queue_type == "quorum":
        arguments.update({"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT})
    return arguments


def inequivalent_queue(exc: BaseException, queue_type: str) -> str | None:
    """What to tell the operator when RabbitMQ refused a queue declaration because the queue
    exists with other arguments (another type, most often); None for any other failure.

    RabbitMQ's reply names the queue and the argument, never a secret.
    """
    if getattr(exc, "reply_code", None) != _PRECONDITION_FAILED:
        return None
    text = str(getattr(exc, "reply_text", ""))
    if "inequivalent arg" not in text:
        return None
    return (
        f"RabbitMQ refused to declare a queue with QUEUE_TYPE={queue_type}: {text}. The "
        "queue exists with other arguments; a queue's type cannot change. Set QUEUE_TYPE to the "
        f"type the queues have, or move them to the new type ({MIGRATION_DOC})"
    )
