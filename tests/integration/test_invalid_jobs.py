"""Bad input is dead-lettered at once with its reason, never retried, never sent, and the worker
keeps going."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pika
import pytest

from tests.integration.conftest import AMQP_URL, Simulator, dead_letters, wait_until
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.producer import Producer, queue_arguments
from worker.runtime.app import WorkerApp

GOOD_KWARGS: dict[str, Any] = {
    "client_id": "acme",
    "phone_id": "phone-1",
    "to": "+919876543210",
    "message": {"type": "text", "text": {"body": "hello"}},
}


def envelope(actor: str = "send_message", **kwargs: Any) -> bytes:
    return json.dumps({"actor_name": actor, "kwargs": {**GOOD_KWARGS, **kwargs}}).encode()


def without(key: str) -> bytes:
    kwargs = {k: v for k, v in GOOD_KWARGS.items() if k != key}
    return json.dumps({"actor_name": "send_message", "kwargs": kwargs}).encode()


def raw_envelope(**fields: Any) -> bytes:
    """A send_message envelope with some top-level fields set (or replaced) as given."""
    return json.dumps({"actor_name": "send_message", "kwargs": GOOD_KWARGS, **fields}).encode()


def raw_text_envelope(key: str, raw_value: str) -> bytes:
    """A send_message envelope whose kwarg ``key`` is ``raw_value``, JSON text written by hand
    (for what json.dumps will not write: NaN, lone surrogates, huge numbers)."""
    kwargs = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in GOOD_KWARGS.items() if k != key]
    kwargs.append(f'"{key}": {raw_value}')
    return ('{"actor_name": "send_message", "kwargs": {' + ", ".join(kwargs) + "}}").encode()


#: (id, body as published, words the dead letter's reason must contain)
CORPUS: list[tuple[str, bytes, str]] = [
    ("not-json", b"this is not json", "not JSON"),
    ("not-utf8", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("json-array", b"[1, 2, 3]", "not an object"),
    ("json-string", b'"send_message"', "not an object"),
    ("empty-body", b"", "not JSON"),
    ("unknown-actor", envelope("send_mesage"), "unknown actor 'send_mesage'"),
    ("missing-actor", json.dumps({"kwargs": GOOD_KWARGS}).encode(), "missing 'actor_name'"),
    (
        "kwargs-not-object",
        json.dumps({"actor_name": "send_message", "kwargs": []}).encode(),
        "'kwargs' must be a JSON object",
    ),
    (
        "unknown-top-level-field",
        json.dumps({"actor_name": "send_message", "kwargs": GOOD_KWARGS, "prio": 1}).encode(),
        "unknown top-level field",
    ),
    (
        "other-queue-name",
        json.dumps(
            {"actor_name": "send_message", "kwargs": GOOD_KWARGS, "queue_name": "default"}
        ).encode(),
        "does not match the queue",
    ),
    (
        "positional-args",
        json.dumps(
            {"actor_name": "send_message", "args": ["acme"], "kwargs": GOOD_KWARGS}
        ).encode(),
        "keyword arguments only",
    ),
    ("missing-to", without("to"), "to: Field required"),
    ("missing-message", without("message"), "message: Field required"),
    ("bad-phone-number", envelope(to="+12"), "to:"),
    ("phone-without-plus", envelope(to="919876543210"), "E.164"),
    ("unknown-message-type", envelope(message={"type": "hologram"}), "hologram"),
    ("misspelt-idempotency-key", envelope(idempotncy_key="k1"), "idempotncy_key: unknown field"),
    (
        "text-over-4096",
        envelope(message={"type": "text", "text": {"body": "x" * 4097}}),
        "at most 4096 characters",
    ),
    ("client-id-wrong-type", envelope(client_id=42), "client_id"),
    ("image-without-link", envelope(message={"type": "image", "image": {}}), "image.link"),
    ("oversized-body", envelope(metadata={"blob": "y" * 300_000}), "limit is"),
    # Full-width digits and a right-to-left override: libphonenumber alone would accept it.
    (
        "odd-unicode-phone",
        envelope(to="+" + "".join(chr(0xFF10 + int(d)) for d in "919876543210") + "\u202e"),
        "to:",
    ),
    # --- more bodies that are not JSON objects ---
    ("json-null", b"null", "not an object"),
    ("utf8-bom", b"\xef\xbb\xbf" + envelope(), "not JSON"),
    ("utf16-body", json.dumps({"actor_name": "send_message"}).encode("utf-16"), "not UTF-8"),
    ("nul-byte-outside-strings", envelope()[:-1] + b"\x00}", "not JSON"),
    ("nested-too-deeply", b"[" * 100_000, "nested too deeply"),
    ("huge-garbage", b"\x00\xff" * 400_000, "limit is"),
    # --- envelope fields of the wrong type ---
    ("kwargs-null", raw_envelope(kwargs=None), "'kwargs' must be a JSON object"),
    ("actor-name-a-number", raw_envelope(actor_name=7), "'actor_name' must be a JSON string"),
    ("empty-actor-name", raw_envelope(actor_name=""), "actor_name is empty"),
    ("options-an-array", raw_envelope(options=[]), "'options' must be a JSON object"),
    ("timestamp-a-string", raw_envelope(message_timestamp="now"), "'message_timestamp' must be"),
    ("timestamp-a-boolean", raw_envelope(message_timestamp=True), "'message_timestamp' must be"),
    (
        "args-instead-of-kwargs",
        json.dumps({"actor_name": "send_message", "args": list(GOOD_KWARGS.values())}).encode(),
        "keyword arguments only",
    ),
    # --- invalid numbers ---
    ("nan-literal", raw_text_envelope("metadata", '{"score": NaN}'), "NaN"),
    ("infinity-literal", raw_text_envelope("metadata", '{"score": -Infinity}'), "Infinity"),
    ("integer-of-5000-digits", raw_text_envelope("metadata", "9" * 5000), "5000 digits"),
    ("phone-as-a-number", envelope(to=919876543210), "to: Input should be a valid string"),
    ("phone-as-a-float", envelope(to=9.19876543210e11), "to: Input should be a valid string"),
    # --- kwargs of the wrong type or missing ---
    ("missing-client-id", without("client_id"), "client_id: Field required"),
    ("idempotency-key-a-number", envelope(idempotency_key=5), "idempotency_key"),
    ("text-body-a-number", envelope(message={"type": "text", "text": {"body": 5}}), "text.body"),
    ("empty-text-body", envelope(message={"type": "text", "text": {"body": ""}}), "text.body"),
    ("message-type-missing", envelope(message={"text": {"body": "hi"}}), "message"),
    (
        "template-without-name",
        envelope(message={"type": "template", "template": {"language": {"code": "en"}}}),
        "template.name: Field required",
    ),
    ("metadata-over-4096", envelope(metadata={"note": "z" * 5000}), "metadata: must be at most"),
    # --- odd Unicode ---
    ("zero-width-space-in-phone", envelope(to="+91987654\u200b3210"), "to: may contain only"),
    ("rtl-override-in-client-id", envelope(client_id="acme\u202e"), "client_id"),
    ("nul-in-phone-id", envelope(phone_id="phone\x001"), "phone_id"),
    (
        "full-width-digits-in-phone",
        envelope(to="+" + "".join(chr(0xFF10 + int(d)) for d in "919876543210")),
        "to: may contain only",
    ),
    ("emoji-phone", envelope(to="+\U0001f4de"), "to: may contain only"),
    (
        "lone-surrogate-in-text",
        raw_text_envelope("message", '{"type": "text", "text": {"body": "hi \\ud800"}}'),
        "surrogate",
    ),
    ("lone-surrogate-in-metadata", raw_text_envelope("metadata", '{"x": "\\udc00"}'), "surrogate"),
    ("lone-surrogate-as-field-name", raw_text_envelope("\\udfff", "1"), "surrogate"),
]


def _tagged(case_id: str, body: bytes) -> bytes:
    """Give decodable envelopes the case id as message_id, so their dead letter can be found."""
    try:
        envelope = json.loads(body.decode("utf-8"))  # bytes would lose a byte-order mark
    except (ValueError, RecursionError):
        return body
    if not isinstance(envelope, dict):
        return body
    return json.dumps({**envelope, "message_id": case_id}).encode()


CORPUS = [(case_id, _tagged(case_id, body), expected) for case_id, body, expected in CORPUS]


def publish_raw(bodies: list[bytes], queue: str = "verloop.send") -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
    for body in bodies:
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )
    connection.close()


def test_every_malformed_job_is_dead_lettered_with_its_reason_and_nothing_is_sent(
    simulator: Simulator, start_worker: Callable[..., WorkerApp], producer: Producer
) -> None:
    """The whole corpus lands in the dead-letter queue, one letter each, bodies byte-for-byte,
    reasons that say what is wrong; then a good job still goes out."""
    start_worker()
    publish_raw([body for _, body, _ in CORPUS])
    letters: list[tuple[dict[str, Any], bytes]] = []
    wait_until(lambda: letters.extend(dead_letters()) or len(letters) >= len(CORPUS), timeout=20)
    assert len(letters) == len(CORPUS), [h[DEAD_LETTER_HEADER]["reason"] for h, _ in letters]
    # A body that could not be decoded is kept byte for byte; a decoded one by its message id.
    found = {}
    for headers, body in letters:
        info = headers[DEAD_LETTER_HEADER]
        found[info["message_id"]] = found[body] = info
    for case_id, body, expected in CORPUS:
        info = found.get(case_id) or found[body]
        assert expected in info["reason"], f"{case_id}: {info['reason']!r}"
        assert info["outcome"] == "invalid", case_id
        assert info["attempts"] == 1, case_id
    assert simulator.send_requests() == 0

    producer.send_message(**GOOD_KWARGS)
    wait_until(simulator.messages)


@pytest.mark.parametrize("queue", ["verloop.manage"])
def test_a_malformed_management_job_is_dead_lettered_on_its_own_queue(
    simulator: Simulator, start_worker: Callable[..., WorkerApp], queue: str
) -> None:
    """refresh_phone_token without phone_id is dead-lettered to verloop.manage.XQ."""
    start_worker()
    body = json.dumps({"actor_name": "refresh_phone_token", "kwargs": {"client_id": "a"}}).encode()
    publish_raw([body], queue=queue)
    [(headers, got)] = wait_until(lambda: dead_letters(queue))
    assert json.loads(got)["kwargs"] == {"client_id": "a"}
    assert "phone_id: Field required" in headers[DEAD_LETTER_HEADER]["reason"]
