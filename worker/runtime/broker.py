"""The one place the dramatiq broker is built, and how it copes with bad input.

Dramatiq alone nacks an undecodable body or a job for an unknown actor into the dead-letter
queue with no reason (and a body naming another queue stops the worker thread). Here such a body
becomes a message for :data:`UNDECODABLE_ACTOR` (original bytes plus reason), and an unknown
actor that still gets through resolves to a stand-in raising :class:`InvalidJob`; the outcome
middleware then dead-letters both with their reason.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import dramatiq.errors
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import q_name, xq_name
from dramatiq.encoder import JSONEncoder
from dramatiq.middleware import Middleware, MiddlewareError

from worker.connections.amqp import split_amqp_urls
from worker.connections.queues import (
    QueueType,
    dead_letter_queue_arguments,
    inequivalent_queue,
    work_queue_arguments,
)
from worker.errors import InvalidJob
from worker.finish.events import declare_exchange
from worker.jobs.wire import UNDECODABLE_ACTOR, parse_envelope, undecodable_envelope
from worker.runtime.consumer import HeldAcks, HoldingConsumer

__all__ = ["VerloopBroker", "WireEncoder", "build_broker"]


class _ConsumingQueue(threading.local):
    #: The queue this thread consumes, set in consumer threads only.
    name: str | None = None


_consuming = _ConsumingQueue()


class WireEncoder(JSONEncoder):
    """Dramatiq's JSON encoding, with a decoder that never fails inside a consumer.

    A consumer thread reads every body with :func:`worker.jobs.wire.parse_envelope` (which
    fills in the optional fields, ``queue_name`` being the queue the body arrived on); one it
    refuses becomes an :data:`UNDECODABLE_ACTOR` message instead of an exception.
    """

    def __init__(
        self,
        max_bytes: int,
        known_actors: frozenset[str] | None = None,
        *,
        max_delay_s: float = 7 * 86_400,
    ) -> None:
        self.max_bytes = max_bytes
        # Unknown actor names are turned away here, so no label or log line ever carries a
        # name a producer made up (metric labels stay bounded), and the body is kept as sent.
        self.known_actors = known_actors
        self.max_delay_ms = int(max_delay_s * 1000)

    def decode(self, data: bytes) -> dict[str, Any]:
        queue = _consuming.name
        if queue is None:  # not a consumer thread (tools, tests): plain dramatiq behaviour
            return super().decode(data)
        try:
            return parse_envelope(
                data,
                queue=queue,
                max_bytes=self.max_bytes,
                max_delay_ms=self.max_delay_ms,
                known_actors=self.known_actors,
            )
        except ValueError as exc:
            return undecodable_envelope(data, f"not a valid job: {exc}", queue=queue)


class _RejectingActor:
    """Stands in for an actor that does not exist; running it raises :class:`InvalidJob`.

    Dramatiq and its middleware read ``priority`` and ``options`` from whatever ``get_actor``
    returns, so those are all it has.
    """

    priority = 0

    def __init__(self, actor_name: str) -> None:
        self.actor_name = actor_name
        self.options: dict[str, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if self.actor_name == UNDECODABLE_ACTOR:
            raise InvalidJob(str(kwargs.get("reason", "not a valid job")))
        raise InvalidJob(f"unknown actor {self.actor_name!r}")


class _Deprioritized:
    """An actor as seen from a low-priority queue's consumer thread: the same actor, with a
    priority that puts its jobs behind every other queue's in the worker's work queue."""

    def __init__(self, actor: Any, priority: int) -> None:
        self._actor = actor
        self.priority = priority

    def __getattr__(self, name: str) -> Any:
        return getattr(self._actor, name)


class VerloopBroker(RabbitmqBroker):
    """A RabbitMQ broker whose unknown actors fail as invalid jobs instead of vanishing, and
    whose low-priority queues' jobs wait behind the others inside each worker process.

    Dramatiq orders a process's fetched jobs by their actor's priority only, and campaign sends
    use the same ``send_message`` actor as transactional ones. A consumer thread looks the actor
    up to learn that priority (it is the only thing it reads), and it knows which queue it
    consumes, so for a low-priority queue it gets the actor with a lower priority: a one-time
    password fetched after a hundred campaign jobs is still the next job a thread takes.
    """

    #: Added to the priority of jobs from low-priority queues (dramatiq: higher runs later).
    LOW_PRIORITY_OFFSET = 1000

    def __init__(
        self,
        *,
        low_priority_queues: frozenset[str] = frozenset(),
        events_exchange: str = "",
        queue_type: QueueType = "classic",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.low_priority_queues = low_priority_queues
        self.events_exchange = events_exchange
        self.queue_type = queue_type
        #: Acknowledgements waiting for their job's ledger record (worker.runtime.consumer).
        self.held_acks = HeldAcks()

    # --- middleware hooks: only the ones a middleware defines -----------------------------------
    # Dramatiq calls every middleware's hook for every signal (four a job), most of them the
    # base class's empty method. The hooks a middleware really has are found once per signal, in
    # the same order; the cache is dropped when the middleware list changes.
    def add_middleware(self, middleware: Middleware, **kwargs: Any) -> None:
        super().add_middleware(middleware, **kwargs)
        self.__dict__.pop("_hook_cache", None)

    def _hooks(self, name: str) -> tuple[Any, ...]:
        cache: dict[str, tuple[int, tuple[Any, ...]]] = self.__dict__.setdefault("_hook_cache", {})
        found = cache.get(name)
        middleware = self.middleware
        if found is None or found[0] != len(middleware):
            empty = getattr(Middleware, name, None)
            hooks = tuple(
                getattr(m, name)
                for m in (reversed(middleware) if name.startswith("after_") else middleware)
                if empty is None or getattr(type(m), name, None) is not empty or name in vars(m)
            )
            found = cache[name] = (len(middleware), hooks)
        return found[1]

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for hook in self._hooks("before_" + signal):
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical(
                    "Unexpected failure in before_%s of %r.", signal, hook.__self__, exc_info=True
                )

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for hook in self._hooks("after_" + signal):
            try:
                hook(self, *args, **kwargs)
            except Exception:
                self.logger.critical(
                    "Unexpected failure in after_%s of %r.", signal, hook.__self__, exc_info=True
                )

    @property
    def consumer_class(self) -> type[HoldingConsumer]:
        """Dramatiq's consumer, whose acknowledgements may wait (worker.runtime.consumer)."""
        return HoldingConsumer

    # Every queue, its delay queue and its dead-letter queue are declared with the arguments of
    # worker.connections.queues (dramatiq's own for classic queues).
    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        return work_queue_arguments(queue_name, self.queue_type)

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self.channel.queue_declare(
            queue=xq_name(queue_name),
            durable=True,
            arguments=dead_letter_queue_arguments(self.queue_type),
        )

    def get_actor(self, actor_name: str) -> Any:
        actor = self.actors.get(actor_name)
        if actor is None:
            return _RejectingActor(actor_name)
        queue = _consuming.name
        if queue is not None and q_name(queue) in self.low_priority_queues:
            return _Deprioritized(actor, actor.priority + self.LOW_PRIORITY_OFFSET)
        return actor

    def declare_queues_now(self) -> None:
        """Create every queue (with its delay and dead-letter queues) and the events exchange
        on RabbitMQ now.

        Dramatiq declares a queue when a consumer thread first connects, some time after the
        worker started; a producer that publishes with ``mandatory`` in between gets its job
        back as unroutable. Called at worker boot. Should RabbitMQ not answer, the consumer
        threads declare the queues when they connect, as dramatiq does: a worker started
        before its broker still comes up.
        """
        try:
            for queue in sorted(self.queues):
                self.declare_queue(queue, ensure=True)
            if self.events_exchange:
                declare_exchange(self.channel, self.events_exchange)
        except (dramatiq.errors.BrokerConnectionError, pika.exceptions.AMQPError) as exc:
            cause = exc.message if isinstance(exc, dramatiq.errors.DramatiqError) else exc
            problem = inequivalent_queue(cause, self.queue_type)
            if problem is not None:
                self.logger.error("%s", problem)
            else:
                self.logger.warning("could not declare queues at boot (%s); consumers will", exc)
        finally:
            # The booting thread publishes nothing: do not keep its connection open unused.
            del self.connection


class _TrackConsumingQueue(Middleware):
    """Tells :class:`WireEncoder` which queue each consumer thread reads, and declares the
    queues before the consumers start."""

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        if isinstance(broker, VerloopBroker):
            broker.declare_queues_now()

    def after_consumer_thread_boot(self, broker: Any, thread: Any) -> None:
        _consuming.name = thread.queue_name


def build_broker(
    amqp_url: str,
    *,
    max_job_bytes: int,
    known_actors: frozenset[str],
    middleware: list[Middleware],
    low_priority_queues: frozenset[str] = frozenset(),
    events_exchange: str = "",
    max_delay_s: float = 7 * 86_400,
    queue_type: QueueType = "classic",
) -> VerloopBroker:
    """Build the broker, set it as dramatiq's global one, and return it.

    Dramatiq's default middleware is left out on purpose: retries and dead letters are ours
    (:mod:`worker.finish.middleware`); callbacks and pipelines would let a job's options start
    arbitrary actors; its time limit interrupts a thread wherever it is, a send halfway
    included (every wait inside a job has a timeout of its own, and
    :mod:`worker.runtime.health` reports a stuck one).

    ``amqp_url`` may name several nodes (comma-separated): each connection dramatiq opens goes
    to the first that answers.
    """
    dramatiq.set_encoder(WireEncoder(max_job_bytes, known_actors, max_delay_s=max_delay_s))
    urls = split_amqp_urls(amqp_url)
    broker = VerloopBroker(
        low_priority_queues=low_priority_queues,
        events_exchange=events_exchange,
        queue_type=queue_type,
        url=urls if len(urls) > 1 else amqp_url,
        confirm_delivery=True,
        middleware=[_TrackConsumingQueue(), *middleware],
    )
    dramatiq.set_broker(broker)
    return broker
