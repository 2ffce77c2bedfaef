"""Outcome events: every job's final outcome, published to a RabbitMQ topic exchange.

Exchange, routing keys and body are a public contract, described in README.md's "Outcome
events". Identifiers become one routing-key word each (other characters become ``_``; past
:data:`MAX_WORD_CHARS`, a prefix and a hash) so a key stays within AMQP's 255 bytes; the body
carries them in full. Delivery: :mod:`worker.finish.outbox` and :mod:`worker.finish.finish`.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
import pika

from worker.receipts.models import STATUS_ACTOR

__all__ = [
    "EVENT_VERSION",
    "MAX_WORD_CHARS",
    "build_event",
    "declare_exchange",
    "publish_event",
    "routing_key",
    "routing_word",
]

EVENT_VERSION: Final = 1
#: The longest identifier a routing key carries as it is (three of them, with the fixed words,
#: stay well within AMQP's 255-byte limit on routing keys).
MAX_WORD_CHARS: Final = 64
_DIGEST_CHARS: Final = 12
#: Anything but these becomes ``_`` in a routing-key word (``.``, ``*`` and ``#`` mean
#: something to topic bindings).
_NOT_WORD = re.compile(r"[^A-Za-z0-9_:@-]")

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
    "wamid",
    "status",
    "status_at",
    "send_message_id",
)


#: Words already made for short identifiers (a few distinct clients, numbers, campaigns and
#: outcomes make almost every key): at most this many, each at most ``MAX_WORD_CHARS`` long.
_WORDS: dict[str, str] = {}
_MAX_WORDS: Final = 4096


def routing_word(value: Any) -> str:
    """One routing-key word for an identifier: other characters than letters, digits and
    ``_:@-`` become ``_``, a longer one is cut to a prefix and a hash, none is ``none``.
    Shared by every routing key of ``EVENTS_EXCHANGE`` (the webhook receiver's too)."""
    if type(value) is str and value:
        word = _WORDS.get(value)
        if word is None:
            word = _word(value)
            if len(value) <= MAX_WORD_CHARS and len(_WORDS) < _MAX_WORDS:
                _WORDS[value] = word
        return word
    return _word(value)


def _word(value: Any) -> str:
    text = str(value) if value not in (None, "") else "none"
    word = _NOT_WORD.sub("_", text)
    if len(word) > MAX_WORD_CHARS:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        word = f"{word[: MAX_WORD_CHARS - _DIGEST_CHARS - 1]}~{digest[:_DIGEST_CHARS]}"
    return word


def routing_key(fields: Mapping[str, Any]) -> str:
    """The routing key of a job's event, from its log record's fields: a send's
    ``send.<outcome>.<client>.<phone>.<campaign>``, a recorded status's
    ``status.<status>.<client>.<phone>.<campaign>``, any other job's
    ``manage.<actor>.<outcome>``."""
    actor, outcome = fields.get("actor"), fields.get("outcome")
    if actor == "send_message":
        return _per_number("send", outcome, fields)
    if actor == STATUS_ACTOR and fields.get("status"):  # one status of a status job
        return _per_number("status", fields.get("status"), fields)
    return f"manage.{routing_word(actor)}.{routing_word(outcome)}"


def _per_number(kind: str, what: Any, fields: Mapping[str, Any]) -> str:
    words = (what, fields.get("client_id"), fields.get("phone_id"), fields.get("campaign_id"))
    return ".".join((kind, *map(routing_word, words)))


def build_event(
    fields: Mapping[str, Any], extra: Mapping[str, Any] | None = None, *, key: str | None = None
) -> dict[str, Any]:
    """The event body: ``{"version", "event", "outcome", "at", ...the job's fields}``.

    ``key`` is the event's routing key when the caller has it already.
    ``extra`` carries what the log line does not: the full recipient ``to`` (logs mask it),
    the producer's ``metadata``, and management results such as the client list.
    """
    key = key or routing_key(fields)
    get = fields.get
    event: dict[str, Any] = {
        "version": EVENT_VERSION,
        "event": ".".join(key.split(".", 2)[:2]),
        "outcome": get("outcome"),
        "at": round(time.time(), 3),
    }
    for name in _FROM_RECORD:
        value = get(name)
        if value is not None:
            event[name] = value
    if extra:
        for name, value in extra.items():
            if value is not None:
                event[name] = value
    return event


def declare_exchange(channel: Any, exchange: str) -> None:
    """Declare the events exchange (idempotent)."""
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)


def publish_event(
    channel: Any, exchange: str, fields: Mapping[str, Any], extra: Mapping[str, Any] | None
) -> None:
    """Publish one job's event on ``channel`` (confirmed if the channel is in confirm mode)."""
    key = routing_key(fields)
    body = build_event(fields, extra, key=key)
    channel.basic_publish(
        exchange=exchange,
        routing_key=key,
        body=orjson.dumps(body, default=str),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            timestamp=int(body["at"]),
            type=body["event"],
            message_id=str(fields.get("message_id") or ""),
        ),
    )
