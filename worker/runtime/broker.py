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
the original body (see :mod:`worker.finish.middleware`).
"""

from __future__ import annotations

import base64
import json
import math
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
from dramatiq.middleware import Middleware

from worker.errors import InvalidJob
from worker.finish.events import declare_exchange
from worker.settings import MAX_SINGLE_DELAY_S

__all__ = ["UNDECODABLE_ACTOR", "VerloopBroker", "WireEncoder", "build_broker", "raw_body_of"]

#: Actor name given to bodies that are not dramatiq messages; never declared.
UNDECODABLE_ACTOR = "verloop.undecodable"

#: The fields of a dramatiq message; any other top-level field makes a body invalid.
_ENVELOPE_FIELDS = frozenset(
    {"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"}
)

#: The options a job may carry, with their JSON types. A producer may set ``eta`` (when to run
#: the job, Unix milliseconds); the rest is the worker's own bookkeeping on the copies it
#: enqueues again (a retry's count and last error, deferrals, the job's schedule), read back as
#: is when those copies come round. Any other option (dramatiq's ``throws``, ``time_limit``,
#: ``max_retries``, callbacks...) would let a job change how the worker treats it: refused.
_OPTION_TYPES: dict[str, tuple[type[Any], ...]] = {
    "eta": (int, float),
    "not_before": (int,),
    "retries": (int,),
    "deferrals": (int,),
    "last_error": (str,),
}
#: Bounds of the bookkeeping counters and text.
_MAX_COUNTER = 1_000_000
_MAX_LAST_ERROR_CHARS = 1000
#: What a message id may be: it becomes an AMQP property and part of a Redis key.
_MESSAGE_ID = re.compile(r"[!-~]{1,128}")


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
            envelope = json.loads(
                text,
                parse_constant=_not_a_json_number,
                parse_float=_finite_number,
                object_pairs_hook=_unique_names,
            )
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
            raise ValueError(f"unknown top-level field(s) {_names(unknown)}")
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
                f"queue_name {envelope['queue_name'][:100]!r} does not match the queue it "
                f"arrived on ({queue!r})"
            )
        if not envelope["actor_name"]:
            raise ValueError("actor_name is empty")
        if self.known_actors is not None and envelope["actor_name"] not in self.known_actors:
            raise ValueError(f"unknown actor {envelope['actor_name'][:100]!r}")
        if not _MESSAGE_ID.fullmatch(envelope["message_id"]):
            raise ValueError("message_id must be 1-128 printable ASCII characters")
        if not 0 <= envelope["message_timestamp"] < 2**63:
            raise ValueError("message_timestamp must be Unix milliseconds")
        self._check_options(envelope["options"], queue)
        return envelope

    def _check_options(self, options: dict[str, Any], queue: str) -> None:
        """Refuse options a job may not set, and keep a scheduled job off a main queue's
        prefetch (see :data:`_OPTION_TYPES`)."""
        unknown = sorted(set(options) - set(_OPTION_TYPES))
        if unknown:
            raise ValueError(
                f"option(s) {_names(unknown)} not accepted: a job may set "
                "only options.eta (Unix milliseconds)"
            )
        now_ms = int(time.time() * 1000)
        value: Any
        for name, value in options.items():
            kinds = _OPTION_TYPES[name]
            if isinstance(value, bool) or not isinstance(value, kinds):
                kind = "number" if float in kinds else _JSON_TYPE_NAMES[kinds[0]]
                raise ValueError(f"options.{name} must be a JSON {kind}")
            if name in ("retries", "deferrals") and not 0 <= value <= _MAX_COUNTER:
                raise ValueError(f"options.{name} must be between 0 and {_MAX_COUNTER}")
            if name == "last_error" and len(value) > _MAX_LAST_ERROR_CHARS:
                raise ValueError(f"options.last_error is over {_MAX_LAST_ERROR_CHARS} characters")
            if name in ("eta", "not_before"):
                if not math.isfinite(value) or value - now_ms > self.max_delay_ms:
                    raise ValueError(
                        f"options.{name} is more than {self.max_delay_ms / 86_400_000:g} days "
                        "ahead (MAX_JOB_DELAY_S)"
                    )
                options[name] = int(value)
        eta = options.get("eta")
        if queue == q_name(queue):
            # A main queue's consumer holds a job with an eta in memory until then, in one of
            # the queue's few prefetch slots: enough of them would stop the queue. The job runs
            # now instead, and waits for its time through the delay queue (see worker.send.actors).
            options.pop("eta", None)
            if eta is not None and eta > now_ms:
                options["not_before"] = max(eta, options.get("not_before", 0))
        elif eta is not None and eta - now_ms > MAX_SINGLE_DELAY_S * 1000:
            # On a delay queue a job is held unacknowledged until its eta: past RabbitMQ's
            # consumer timeout the channel would be closed. It comes back in hops instead.
            options["not_before"] = max(eta, options.get("not_before", 0))
            options["eta"] = now_ms + MAX_SINGLE_DELAY_S * 1000


#: A ``\\uD800``-``\\uDFFF`` escape: only bodies that have one need the lone-surrogate check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _names(names: list[str]) -> str:
    """A few of a producer's names, each cut short, for a reason (which travels in a header)."""
    return ", ".join(repr(name[:60]) for name in names[:5])


def _not_a_json_number(name: str) -> Any:
    # Python's json module reads NaN and Infinity; JSON has no such numbers.
    raise ValueError(f"body is not JSON ({name} is not a JSON number)")


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers disagree on a repeated name (first wins, last wins, error): a job whose
    # meaning depends on the reader, such as two actor_names, is refused.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"body has the name {name[:60]!r} twice in one object")
            seen.add(name)
    return obj


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a JSON number no encoder can write back
        raise ValueError(f"body has a number too large for a double ({text[:40]})")
    return value


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
    max_delay_s: float = 7 * 86_400,
) -> VerloopBroker:
    """Build the broker, set it as dramatiq's global one, and return it.

    Dramatiq's default middleware is left out on purpose: retries and dead letters are ours
    (:mod:`worker.finish.middleware`); callbacks and pipelines would let a job's options start
    arbitrary
    actors; its time limit interrupts a thread wherever it is, a send halfway included (every
    wait inside a job has a timeout of its own, and :mod:`worker.runtime.health` reports a stuck
    one).
    """
    dramatiq.set_encoder(WireEncoder(max_job_bytes, known_actors, max_delay_s=max_delay_s))
    broker = VerloopBroker(
        low_priority_queues=low_priority_queues,
        events_exchange=events_exchange,
        url=amqp_url,
        confirm_delivery=True,
        middleware=[_TrackConsumingQueue(), *middleware],
    )
    dramatiq.set_broker(broker)
    return broker
