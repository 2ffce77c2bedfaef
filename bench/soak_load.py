"""The soak's traffic and its bookkeeping: what was published, and what became of it.

* :class:`Load` publishes a steady mix from one thread, each job confirmed by RabbitMQ
  (:class:`worker.jobs.producer.Producer`): transactional sends, campaign sends, management jobs now
  and then, and 1 % hostile jobs (:data:`HOSTILE`) that the worker must dead-letter as invalid.
  Every job is known by its message id (hostile ones by a marker in their body), so each can
  be accounted for at the end. A publish whose confirm is lost (the broker restarting) is
  published again, as a producer would: the copy must be suppressed, not sent.
* :class:`Outcomes` consumes the outcome events (a queue of ours bound to ``verloop.events``)
  and remembers every job's final outcomes.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pika
import pika.exceptions

from bench.common import CLIENT_ID, BenchError
from worker.errors import EnqueueError
from worker.finish.events import declare_exchange
from worker.jobs.producer import Producer, encode_job

SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE = "verloop.send", "verloop.campaign", "verloop.manage"
PHONES = ("soak-1", "soak-2", "soak-3", "soak-4")
CAMPAIGN_PHONES = PHONES[:2]  # shared with transactional sends: the two lanes meet there
EVENTS_EXCHANGE = "verloop.events"
EVENTS_QUEUE = "soak.events"
#: Final outcomes (README, "Outcome events"); retrying and deferred are not final.
FINAL = frozenset({"sent", "suppressed", "dead_lettered", "cancelled", "done"})
#: How long one job may wait for RabbitMQ's confirm (a broker restart takes seconds).
_PUBLISH_DEADLINE_S = 300.0


@dataclass(slots=True)
class Job:
    """One logical job the load published (confirmed at least once)."""

    kind: str  #: send, campaign, manage or hostile
    queue: str
    message_id: str  #: the hostile kind's marker for hostile jobs
    to: str | None = None
    hostile_kind: str | None = None
    copies: int = 1  #: >1 when a confirm was lost and the job published again


# --- the jobs ------------------------------------------------------------------------------------
def _text(n: int) -> dict[str, Any]:
    return {"type": "text", "text": {"body": f"Your soak code is {n}"}}


def _template(n: int) -> dict[str, Any]:
    return {
        "type": "template",
        "template": {
            "name": "soak_offer",
            "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": f"R{n}"}]}],
        },
    }


def send_kwargs(n: int, run_id: str) -> dict[str, Any]:
    """A transactional send to a recipient of its own, with a key of its own."""
    return {
        "client_id": CLIENT_ID,
        "phone_id": PHONES[n % len(PHONES)],
        "to": f"+9196{n:08d}",
        "message": _text(n),
        "idempotency_key": f"soak-{run_id}-{n}",
        "metadata": {"soak_job": n},
    }


def campaign_kwargs(n: int, campaign_id: str) -> dict[str, Any]:
    """A campaign send (no idempotency key: the ledger keys it by campaign and recipient)."""
    return {
        "client_id": CLIENT_ID,
        "phone_id": CAMPAIGN_PHONES[n % len(CAMPAIGN_PHONES)],
        "to": f"+9197{n:08d}",
        "campaign_id": campaign_id,
        "message": _template(n),
    }


def _envelope(queue: str, actor: str, kwargs: dict[str, Any], marker: str) -> dict[str, Any]:
    return {
        "queue_name": queue,
        "actor_name": actor,
        "args": [],
        "kwargs": kwargs,
        "options": {},
        "message_id": marker,
        "message_timestamp": int(time.time() * 1000),
    }


def _body(envelope: dict[str, Any], *, ascii_only: bool = False) -> bytes:
    return json.dumps(envelope, ensure_ascii=ascii_only).encode("utf-8")


def _send(marker: str, **change: Any) -> dict[str, Any]:
    kwargs = {
        "client_id": CLIENT_ID,
        "phone_id": PHONES[0],
        "to": "+919800000001",
        "message": _text(0),
    } | change
    return _envelope(SEND_QUEUE, "send_message", kwargs, marker)


def _with(envelope: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return envelope | fields


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        node = {"n": node}
    return node


def _eta_next_year(m: str) -> tuple[str, bytes]:
    eta = int(time.time() * 1000) + 365 * 86_400_000
    return SEND_QUEUE, _body(_with(_send(m), options={"eta": eta}))


def _campaign_time_limit(m: str) -> tuple[str, bytes]:
    job = _envelope(CAMPAIGN_QUEUE, "send_message", campaign_kwargs(0, "soak-other"), m)
    return CAMPAIGN_QUEUE, _body(_with(job, options={"time_limit": 1}))


def _manage_without_phone(m: str) -> tuple[str, bytes]:
    job = _envelope(MANAGE_QUEUE, "refresh_phone_token", {"client_id": CLIENT_ID}, m)
    return MANAGE_QUEUE, _body(job)


def _lone_surrogate(m: str) -> tuple[str, bytes]:
    # Only an ASCII-escaped body can carry it (as \ud800): it is not text in any encoding.
    return SEND_QUEUE, _body(
        _send(m, message={"type": "text", "text": {"body": "\ud800"}}), ascii_only=True
    )


def _sent(**change: Any) -> Callable[[str], tuple[str, bytes]]:
    """A transactional send with ``change`` made to its kwargs."""
    return lambda m: (SEND_QUEUE, _body(_send(m, **change)))


def _enveloped(**fields: Any) -> Callable[[str], tuple[str, bytes]]:
    """A transactional send with ``fields`` of its envelope replaced."""
    return lambda m: (SEND_QUEUE, _body(_with(_send(m), **fields)))


#: A fixed mix of bodies the worker refuses (README, "What happens to a job"), taken in turn:
#: (name, marker -> (queue, body)). Each body carries its marker (its message id, or text in a
#: body that is not a job), which is how its dead letter is found.
HOSTILE: tuple[tuple[str, Callable[[str], tuple[str, bytes]]], ...] = (
    ("not JSON", lambda m: (SEND_QUEUE, f"{m}: this is not a job {{".encode())),
    ("not UTF-8", lambda m: (SEND_QUEUE, b"\xff\xfe" + m.encode() + b"\xc3\x28")),
    ("option throws", _enveloped(options={"throws": 1})),
    ("option time_limit (campaign)", _campaign_time_limit),
    ("metadata integer over 64 bits", _sent(metadata={"order": 2**64})),
    ("idempotency key with CR/LF", _sent(idempotency_key="otp\r\nX-Injected: 1")),
    ("128-character non-ASCII client_id", _sent(client_id="é" * 128)),
    ("eta a year ahead", _eta_next_year),
    ("unknown actor", _enveloped(actor_name="drop_tables")),
    ("misspelt field", _sent(idempotncy_key="k")),
    ("not E.164", _sent(to="+91 98765-4321x")),
    ("text over 4,096 characters", _sent(message={"type": "text", "text": {"body": "x" * 4097}})),
    ("NaN", _sent(metadata={"score": float("nan")})),
    ("lone surrogate", _lone_surrogate),
    ("unknown top-level field", _enveloped(priority=5)),
    ("positional args", _enveloped(args=[1])),
    ("metadata nested 40 deep", _sent(metadata=_nested(40))),
    ("body over MAX_JOB_BYTES", _sent(metadata={"pad": "x" * 300_000})),
    ("queue_name of another queue", _enveloped(queue_name=CAMPAIGN_QUEUE)),
    ("management job without phone_id", _manage_without_phone),
)


def hostile_marker(run_id: str, n: int) -> str:
    """A marker no other job's body contains (zero-padded: no marker is a prefix of another)."""
    return f"soak-hostile-{run_id}-{n:07d}"


# --- publishing ----------------------------------------------------------------------------------
class Load(threading.Thread):
    """Publishes the mix at steady rates (jobs per second per kind) until :meth:`stop`."""

    def __init__(
        self, amqp_url: str, rates: dict[str, float], run_id: str, campaign_id: str
    ) -> None:
        super().__init__(name="soak-load", daemon=True)
        self.amqp_url = amqp_url
        self.rates = rates
        self.run_id = run_id
        self.campaign_id = campaign_id
        self.jobs: list[Job] = []
        self.counts: Counter[str] = Counter()
        self.republished = 0
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def _run(self) -> None:
        with Producer(self.amqp_url) as producer:
            started = time.monotonic()
            while not self._stopping.is_set():
                kind, due = min(
                    ((k, started + self.counts[k] / rate) for k, rate in self.rates.items()),
                    key=lambda pair: pair[1],
                )
                if self._stopping.wait(max(0.0, due - time.monotonic())):
                    break
                job, body = self._make(kind, self.counts[kind])
                self._publish(producer, job, body)
                self.counts[kind] += 1
                self.jobs.append(job)

    def _make(self, kind: str, n: int) -> tuple[Job, bytes]:
        message_id = str(uuid.uuid4())
        if kind == "send":
            kwargs = send_kwargs(n, self.run_id)
            body = encode_job("send_message", kwargs, queue=SEND_QUEUE, message_id=message_id)
            return Job(kind, SEND_QUEUE, message_id, kwargs["to"]), body
        if kind == "campaign":
            kwargs = campaign_kwargs(n, self.campaign_id)
            body = encode_job("send_message", kwargs, queue=CAMPAIGN_QUEUE, message_id=message_id)
            return Job(kind, CAMPAIGN_QUEUE, message_id, kwargs["to"]), body
        if kind == "manage":
            if n % 2:
                actor = "refresh_phone_token"
                kwargs = {"client_id": CLIENT_ID, "phone_id": PHONES[(n // 2) % len(PHONES)]}
            else:
                actor, kwargs = "list_clients", {}
            body = encode_job(actor, kwargs, queue=MANAGE_QUEUE, message_id=message_id)
            return Job(kind, MANAGE_QUEUE, message_id), body
        name, build = HOSTILE[n % len(HOSTILE)]
        marker = hostile_marker(self.run_id, n)
        queue, body = build(marker)
        return Job(kind, queue, marker, hostile_kind=name), body

    def _publish(self, producer: Producer, job: Job, body: bytes) -> None:
        deadline = time.monotonic() + _PUBLISH_DEADLINE_S
        while True:
            try:
                producer.publish_body(job.queue, body, job.message_id)
                return
            except EnqueueError as exc:
                # Not confirmed is not "not stored": the next attempt may make a second copy.
                if time.monotonic() > deadline:
                    raise BenchError(f"RabbitMQ did not take a job for 300 s: {exc}") from None
                job.copies += 1
                self.republished += 1
                time.sleep(1.0)


# --- outcome events ------------------------------------------------------------------------------
class Outcomes(threading.Thread):
    """Consumes the outcome events from a queue of ours; reconnects across broker restarts."""

    def __init__(self, amqp_url: str) -> None:
        super().__init__(name="soak-outcomes", daemon=True)
        self.amqp_url = amqp_url
        self.outcomes: dict[str, set[str]] = {}
        self.reasons: dict[str, str] = {}
        self.received = 0  #: events, duplicates included (delivery is at least once)
        self.reconnects = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def declare(self) -> None:
        """The exchange and our queue, bound to every event: before the worker starts, so no
        event is published before the queue is there to take it."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            declare_exchange(channel, EVENTS_EXCHANGE)
            channel.queue_declare(EVENTS_QUEUE, durable=True)
            channel.queue_bind(EVENTS_QUEUE, EVENTS_EXCHANGE, routing_key="#")
        finally:
            connection.close()

    def final(self, message_id: str) -> set[str]:
        with self._lock:
            return self.outcomes.get(message_id, set()) & FINAL

    def snapshot(self) -> tuple[dict[str, set[str]], dict[str, str]]:
        with self._lock:
            return {k: set(v) for k, v in self.outcomes.items()}, dict(self.reasons)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._consume()
                except (pika.exceptions.AMQPError, OSError):
                    self.reconnects += 1
                    self._stopping.wait(1.0)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def _consume(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=500)
            channel.basic_consume(EVENTS_QUEUE, self._on_event)
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=0.5)
        finally:
            if connection.is_open:
                connection.close()

    def _on_event(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        event = orjson.loads(body)
        message_id, outcome = str(event.get("message_id")), str(event.get("outcome"))
        with self._lock:
            self.received += 1
            self.outcomes.setdefault(message_id, set()).add(outcome)
            if outcome == "dead_lettered":
                self.reasons[message_id] = str(event.get("reason"))
        channel.basic_ack(method.delivery_tag)
