"""The one place the dramatiq broker is built, and how it copes with bad input.

Dramatiq on its own rejects a body it cannot decode, or a job for an actor it does not know, by
nacking it into the dead-letter queue with no word of why; a body whose ``queue_name`` names
another queue even stops the worker thread that took it. Here every body that reaches a consumer
becomes a dramatiq message:

* a body that is not a valid dramatiq message, or names an actor the worker does not run,
  becomes a message for :data:`UNDECODABLE_ACTOR` carrying the original bytes and the reason;
* should an unknown actor name get past that, it resolves to a stand-in actor that raises
  :class:`InvalidJob`;

so both reach the job outcome middleware, which dead-letters them with their reason and keeps
the original body (see :mod:`worker.outcomes`).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from typing import Any

import dramatiq
import dramatiq.errors
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import q_name
from dramatiq.encoder import JSONEncoder
from dramatiq.middleware import Middleware, TimeLimit

from .errors import InvalidJob
from .events import declare_exchange

__all__ = ["UNDECODABLE_ACTOR", "VerloopBroker", "WireEncoder", "build_broker", "raw_body_of"]

#: Actor name given to bodies that are not dramatiq messages; never declared.
UNDECODABLE_ACTOR = "verloop.undecodable"

#: The fields of a dramatiq message; any other top-level field makes a body invalid.
_ENVELOPE_FIELDS = frozenset(
    {"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"}
)


class _ConsumingQueue(threading.local):
    #: The queue this thread consumes, set in consumer threads only.
    name: str | None = None


_consuming = _ConsumingQueue()


class WireEncoder(JSONEncoder):
    """Dramatiq's JSON encoding, with a decoder that never fails inside a consumer.

    Optional envelope fields get defaults (``args``, ``options``, ``message_id``,
    ``message_timestamp``, and ``queue_name``: the queue the body arrived on), so a producer
    in any language can publish the minimal ``{"actor_name": ..., "kwargs": {...}}``.
    """

    def __init__(self, max_bytes: int, known_actors: frozenset[str] | None = None) -> None:
        self.max_bytes = max_bytes
        # Unknown actor names are turned away here, so no label or log line ever carries a
        # name a producer made up (metric labels stay bounded), and the body is kept as sent.
        self.known_actors = known_actors

    def decode(self, data: bytes) -> dict[str, Any]:
        queue = _consuming.name
        if queue is None:  # not a consumer thread (tools, tests): plain dramatiq behaviour
            return super().decode(data)
        try:
            return self._envelope(data, queue)
        except ValueError as exc:
            return {
                "queue_name": queue,
                "actor_name": UNDECODABLE_ACTOR,
                "args": [],
                "kwargs": {
                    "reason": f"not a valid job: {exc}",
                    "raw_body_b64": base64.b64encode(data).decode("ascii"),
                },
                "options": {},
                "message_id": str(uuid.uuid4()),
                "message_timestamp": int(time.time() * 1000),
            }

    def _envelope(self, data: bytes, queue: str) -> dict[str, Any]:
        if len(data) > self.max_bytes:
            raise ValueError(f"body is {len(data)} bytes; the limit is {self.max_bytes}")
        try:
            text = data.decode("utf-8")
            envelope = json.loads(text, parse_constant=_not_a_json_number)
        except UnicodeDecodeError:
            raise ValueError("body is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON ({exc.msg} at position {exc.pos})") from None
        except RecursionError:
            raise ValueError("body is JSON nested too deeply") from None
        if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(envelope):
            # A lone surrogate is not text: it cannot be logged, published or sent as UTF-8.
            raise ValueError("body has a \\u escape of a lone UTF-16 surrogate, which is not text")
        if not isinstance(envelope, dict):
            raise ValueError(f"body is a JSON {type(envelope).__name__}, not an object")
        unknown = sorted(set(envelope) - _ENVELOPE_FIELDS)
        if unknown:
            raise ValueError(f"unknown top-level field(s) {', '.join(map(repr, unknown[:5]))}")
        envelope.setdefault("queue_name", queue)
        envelope.setdefault("args", [])
        envelope.setdefault("kwargs", {})
        envelope.setdefault("options", {})
        envelope.setdefault("message_id", str(uuid.uuid4()))
        envelope.setdefault("message_timestamp", int(time.time() * 1000))
        for field, kind in _ENVELOPE_TYPES:
            if field not in envelope:
                raise ValueError(f"missing {field!r}")
            if not isinstance(envelope[field], kind) or isinstance(envelope[field], bool):
                raise ValueError(f"{field!r} must be a JSON {_JSON_TYPE_NAMES[kind]}")
        if envelope["queue_name"] != queue:
            raise ValueError(
                f"queue_name {envelope['queue_name']!r} does not match the queue it arrived on "
                f"({queue!r})"
            )
        if not envelope["actor_name"]:
            raise ValueError("actor_name is empty")
        if self.known_actors is not None and envelope["actor_name"] not in self.known_actors:
            raise ValueError(f"unknown actor {envelope['actor_name'][:100]!r}")
        return envelope


#: A ``\\uD800``-``\\uDFFF`` escape: only bodies that have one need the lone-surrogate check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _not_a_json_number(name: str) -> Any:
    # Python's json module reads NaN and Infinity; JSON has no such numbers.
    raise ValueError(f"body is not JSON ({name} is not a JSON number)")


def _has_lone_surrogate(envelope: Any) -> bool:
    try:
        json.dumps(envelope, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_JSON_TYPE_NAMES = {str: "string", list: "array", dict: "object", int: "integer"}
_ENVELOPE_TYPES = (
    ("actor_name", str),
    ("queue_name", str),
    ("args", list),
    ("kwargs", dict),
    ("options", dict),
    ("message_id", str),
    ("message_timestamp", int),
)


def raw_body_of(kwargs: dict[str, Any]) -> bytes:
    """The original bytes of a body that became an :data:`UNDECODABLE_ACTOR` message."""
    return base64.b64decode(str(kwargs.get("raw_body_b64", "")))


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
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.low_priority_queues = low_priority_queues
        self.events_exchange = events_exchange

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
    time_limit_ms: int = 5 * 60 * 1000,
) -> VerloopBroker:
    """Build the broker, set it as dramatiq's global one, and return it.

    Dramatiq's default retry, callback and pipeline middleware are left out on purpose: retries
    and dead letters are ours (:mod:`worker.outcomes`), and callbacks would let a job's options
    start arbitrary actors.
    """
    dramatiq.set_encoder(WireEncoder(max_job_bytes, known_actors))
    broker = VerloopBroker(
        low_priority_queues=low_priority_queues,
        events_exchange=events_exchange,
        url=amqp_url,
        confirm_delivery=True,
        middleware=[_TrackConsumingQueue(), TimeLimit(time_limit=time_limit_ms), *middleware],
    )
    dramatiq.set_broker(broker)
    return broker
