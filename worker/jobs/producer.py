"""The Python API for upstream systems: validate a job, publish it, and know it arrived.

Usage: README.md, "From Python: the producer API". Every publish is ``mandatory`` and waits for
RabbitMQ's confirm, so a job not stored raises :class:`EnqueueError`; an invalid one raises
:class:`InvalidJob` before anything is published. One producer per thread. At least once: a
confirm lost to a broken connection means a second publish, hence ``idempotency_key``.
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import Any

import pika
import pika.exceptions

from worker.connections.amqp import ReconnectingChannel, amqp_parameter_list, amqp_parameters
from worker.connections.queues import QueueType, inequivalent_queue, work_queue_arguments
from worker.errors import EnqueueError
from worker.jobs.models import SEND_QUEUE
from worker.jobs.registry import JOB_TYPES, parse_job
from worker.jobs.wire import encode_job
from worker.runtime.jobs_exchange import JOB_QUEUES

#: encode_job (worker.jobs.wire) and amqp_parameters (worker.connections.amqp) are re-exported:
#: they are part of the producer's public API.
__all__ = ["Producer", "amqp_parameters", "encode_job", "queue_arguments"]

#: How long a publish may block while RabbitMQ applies flow control before we give up.
_BLOCKED_TIMEOUT_S = 30
_PUBLISH_ATTEMPTS = 2
_ACCESS_REFUSED = 403
_NOT_FOUND = 404


def queue_arguments(queue: str, queue_type: QueueType = "classic") -> dict[str, Any]:
    """The arguments the worker declares its queues with; a producer must declare the same."""
    return work_queue_arguments(queue, queue_type)


class Producer:
    """Publishes validated jobs with publisher confirms (see the module docstring).

    ``exchange`` is where jobs go, with the queue name as routing key: ``""``, RabbitMQ's
    default exchange (each queue is declared before its first publish, so the user needs
    configure permission on it), or the jobs exchange (``verloop.jobs``, ``JOBS_EXCHANGE``):
    nothing is declared, for a RabbitMQ user that may write to that exchange and nothing else.
    ``queue_type`` must be the workers' ``QUEUE_TYPE`` (queues are declared with its
    arguments). ``amqp_url`` may name several nodes, comma-separated: see ``AMQP_URL``.
    """

    def __init__(
        self, amqp_url: str, *, exchange: str = "", queue_type: QueueType = "classic"
    ) -> None:
        self.exchange = exchange
        self.queue_type = queue_type
        self._amqp = ReconnectingChannel(
            amqp_parameter_list(amqp_url, blocked_connection_timeout=_BLOCKED_TIMEOUT_S),
            setup=self._setup_channel,
        )
        self._declared: set[str] = set()

    # --- jobs -----------------------------------------------------------------------------------
    def send_message(
        self,
        *,
        client_id: str,
        phone_id: str,
        to: str,
        message: dict[str, Any],
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        queue: str = SEND_QUEUE,
    ) -> str:
        """Enqueue one WhatsApp message; returns the job's message id."""
        kwargs: dict[str, Any] = {
            "client_id": client_id,
            "phone_id": phone_id,
            "to": to,
            "message": message,
        }
        if idempotency_key is not None:
            kwargs["idempotency_key"] = idempotency_key
        if metadata is not None:
            kwargs["metadata"] = metadata
        return self.enqueue("send_message", kwargs, queue=queue)

    def enqueue(self, actor_name: str, kwargs: dict[str, Any], *, queue: str | None = None) -> str:
        """Validate and publish any job; returns its message id.

        Raises:
            InvalidJob: the job would be rejected by the worker; nothing was published.
            EnqueueError: RabbitMQ did not confirm the job.
        """
        job = parse_job(actor_name, (), kwargs)
        queue = queue or JOB_TYPES[actor_name].queue
        message_id = str(uuid.uuid4())
        body = encode_job(
            actor_name,
            job.model_dump(mode="json", exclude_none=True),
            queue=queue,
            message_id=message_id,
        )
        self.publish_body(queue, body, message_id)
        return message_id

    # --- connection -----------------------------------------------------------------------------
    def publish_body(self, queue: str, body: bytes, message_id: str) -> None:
        """Publish an already-encoded job body to ``queue`` and wait for RabbitMQ's confirm
        (a few attempts over a fresh connection on transport errors).

        Raises:
            EnqueueError: RabbitMQ refused, returned or never confirmed it.
        """
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/json",
            message_id=message_id,
            # Lets RabbitMQ report the age of the oldest waiting job (head message timestamp).
            timestamp=int(time.time()),
        )
        last_error: Exception | None = None
        for _ in range(_PUBLISH_ATTEMPTS):
            try:
                channel = self._ensure_channel(queue)
                channel.basic_publish(
                    exchange=self.exchange,
                    routing_key=queue,
                    body=body,
                    properties=properties,
                    mandatory=True,
                )
                return
            except pika.exceptions.UnroutableError:
                self._declared.discard(queue)  # the queue vanished: declare it again
                last_error = EnqueueError(self._unroutable(queue))
            except pika.exceptions.NackError:
                raise EnqueueError(f"RabbitMQ refused job {message_id} (nack)") from None
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._reset()
                if exc.reply_code in (_ACCESS_REFUSED, _NOT_FOUND):
                    raise EnqueueError(self._refused(exc)) from None  # trying again cannot help
                problem = inequivalent_queue(exc, self.queue_type)
                if problem is not None:
                    raise EnqueueError(problem) from None
                last_error = exc
            except (pika.exceptions.AMQPError, OSError) as exc:
                last_error = exc
                self._reset()
        if isinstance(last_error, EnqueueError):
            raise last_error  # it says why (a job RabbitMQ could not route)
        raise EnqueueError(
            f"RabbitMQ did not confirm job {message_id}: {type(last_error).__name__}"
        ) from None

    def _ensure_channel(self, queue: str) -> Any:
        channel = self._amqp.channel()
        if not self.exchange and queue not in self._declared:
            arguments = queue_arguments(queue, self.queue_type)
            channel.queue_declare(queue=queue, durable=True, arguments=arguments)
            self._declared.add(queue)
        return channel

    def _setup_channel(self, channel: Any) -> None:
        """Prepare each new channel: publisher confirms, and nothing declared on it yet."""
        channel.confirm_delivery()
        self._declared.clear()
        if self.exchange:
            # Needs no permission, and a missing exchange is named before any publish.
            channel.exchange_declare(self.exchange, passive=True)

    def _unroutable(self, queue: str) -> str:
        if not self.exchange:
            return f"queue {queue!r} did not accept the job"
        return (
            f"exchange {self.exchange!r} has no queue bound as {queue!r}: it reaches "
            f"{', '.join(JOB_QUEUES)} once a worker has started"
        )

    def _refused(self, exc: pika.exceptions.ChannelClosedByBroker) -> str:
        if exc.reply_code == _NOT_FOUND and self.exchange:
            return (
                f"exchange {self.exchange!r} does not exist: a worker declares it when it "
                "starts (deploy/rabbitmq/definitions.json declares it too)"
            )
        return f"RabbitMQ refused the job: {exc.reply_text}"

    def _reset(self) -> None:
        # The connection may be broken already; a new one is opened on the next publish.
        self._amqp.reset()

    def close(self) -> None:
        """Close the connection."""
        self._reset()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
