"""Outcome events: every job's final outcome, published to a RabbitMQ topic exchange.

Exchange ``EVENTS_EXCHANGE`` (``verloop.events``, durable, type ``topic``). Routing keys:

* sends: ``send.<outcome>.<client_id>.<phone_id>.<campaign_id or "none">``
* management jobs: ``manage.<actor>.<outcome>``

with ``<outcome>`` one of ``sent``, ``dead_lettered``, ``suppressed``, ``cancelled`` (sends) or
``done``, ``dead_lettered`` (management). Dots inside identifiers become ``_`` so every part
stays one routing-key word. Bind ``send.#`` for everything, ``send.dead_lettered.#`` for
failures, ``send.*.acme.#`` for one client, ``send.*.*.*.spring-sale`` for one campaign.

The body is JSON (see :func:`build_event`). A job is acknowledged only after RabbitMQ has taken
its event (at least once). One confirm per event cost a tenth of a busy worker's CPU, so each
worker process has one :class:`EventPublisher`: a thread with its own connection that publishes
the events of all the process's jobs in AMQP transactions, one commit per batch; a job's thread
waits for the commit that covers its event. If RabbitMQ refuses a batch twice, the jobs are still
acknowledged (they were sent: sending again would be worse) and their log lines say
``event_published=false``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
import pika
import pika.exceptions
import structlog

__all__ = [
    "EVENT_VERSION",
    "EventPublisher",
    "build_event",
    "declare_exchange",
    "routing_key",
]

_log = structlog.get_logger()

EVENT_VERSION: Final = 1

#: Fields of the job's log record copied into its event when present.
_FROM_RECORD: Final = (
    "message_id",
    "actor",
    "queue",
    "lane",
    "attempt",
    "client_id",
    "phone_id",
    "campaign_id",
    "idempotency_key",
    "verloop_message_id",
    "http_status",
    "code",
    "reason",
    "error",
    "dead_letter",
    "clients",
    "token_source",
    "suppressed_because",
)


def _word(value: Any) -> str:
    text = str(value) if value not in (None, "") else "none"
    return text.replace(".", "_").replace("*", "_").replace("#", "_")


def routing_key(fields: Mapping[str, Any]) -> str:
    """The routing key of a job's event, from its log record's fields."""
    outcome = _word(fields.get("outcome"))
    if fields.get("actor") == "send_message":
        return ".".join(
            (
                "send",
                outcome,
                _word(fields.get("client_id")),
                _word(fields.get("phone_id")),
                _word(fields.get("campaign_id")),
            )
        )
    return f"manage.{_word(fields.get('actor'))}.{outcome}"


def build_event(
    fields: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The event body: ``{"version", "event", "outcome", "at", ...the job's fields}``.

    ``extra`` carries what the log line does not: the full recipient ``to`` (logs mask it),
    the producer's ``metadata``, and management results such as the client list.
    """
    key = routing_key(fields)
    event: dict[str, Any] = {
        "version": EVENT_VERSION,
        "event": ".".join(key.split(".")[:2]),
        "outcome": fields.get("outcome"),
        "at": round(time.time(), 3),
    }
    for name in _FROM_RECORD:
        value = fields.get(name)
        if value is not None:
            event[name] = value
    if extra:
        event.update({k: v for k, v in extra.items() if v is not None})
    return event


def declare_exchange(channel: Any, exchange: str) -> None:
    """Declare the events exchange (idempotent)."""
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)


class _Pending:
    __slots__ = ("body", "done", "key", "message_id", "ok")

    def __init__(self, key: str, body: bytes, message_id: str) -> None:
        self.key = key
        self.body = body
        self.message_id = message_id
        self.done = threading.Event()
        self.ok = False


class EventPublisher:
    """Publishes events in batches from one thread: many jobs' events, one commit.

    :meth:`publish` returns once RabbitMQ committed the event (True), or after the batch failed
    twice or ``timeout_s`` passed (False). Batches are whatever is waiting when the thread comes
    round, up to ``max_batch``: under load they grow, when idle an event goes out at once.
    """

    def __init__(
        self, amqp_url: str, exchange: str, *, max_batch: int = 500, timeout_s: float = 10.0
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._connection: Any = None
        self._channel: Any = None
        self._thread = threading.Thread(target=self._run, name="verloop-events", daemon=True)
        self._thread.start()

    def publish(self, fields: Mapping[str, Any], extra: Mapping[str, Any] | None) -> bool:
        body = build_event(fields, extra)
        item = _Pending(
            routing_key(fields), orjson.dumps(body, default=str), str(fields.get("message_id"))
        )
        self._queue.put(item)
        return item.done.wait(self.timeout_s) and item.ok

    def close(self, timeout_s: float = 10.0) -> None:
        """Publish what is queued, then stop the thread and close the connection."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    # --- the publishing thread ---------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch: list[_Pending] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            if batch:
                self._commit(batch)
        self._disconnect()

    def _commit(self, batch: list[_Pending]) -> None:
        ok = False
        for attempt in (1, 2):
            try:
                channel = self._ensure_channel()
                for item in batch:
                    channel.basic_publish(
                        exchange=self.exchange,
                        routing_key=item.key,
                        body=item.body,
                        properties=pika.BasicProperties(
                            content_type="application/json",
                            delivery_mode=2,
                            message_id=item.message_id,
                        ),
                    )
                channel.tx_commit()
                ok = True
                break
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._disconnect()
                if attempt == 2:
                    _log.error(
                        "outcome events not published", events=len(batch), error=type(exc).__name__
                    )
        for item in batch:
            item.ok = ok
            item.done.set()

    def _ensure_channel(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self._disconnect()
            self._connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            channel = self._connection.channel()
            declare_exchange(channel, self.exchange)
            channel.tx_select()
            self._channel = channel
        return self._channel

    def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                connection.close()
