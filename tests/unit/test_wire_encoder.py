"""Unit tests for worker.runtime.broker.WireEncoder: every body a consumer reads becomes a
message."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.errors import DecodeError

from worker.jobs.producer import encode_job
from worker.jobs.wire import UNDECODABLE_ACTOR, raw_body_of
from worker.runtime import broker
from worker.runtime.broker import WireEncoder

QUEUE = "verloop.send"
MAX_BYTES = 4096
KWARGS = {"client_id": "acme", "phone_id": "p1", "to": "+919876543210"}


@pytest.fixture
def encoder() -> WireEncoder:
    """An encoder with a small body limit."""
    return WireEncoder(MAX_BYTES)


@pytest.fixture
def consuming() -> Iterator[str]:
    """Make this thread look like a consumer of QUEUE, and stop after the test."""
    broker._consuming.name = QUEUE
    yield QUEUE
    broker._consuming.name = None


def dumps(value: Any) -> bytes:
    """JSON bytes of ``value``."""
    return json.dumps(value).encode("utf-8")


@pytest.mark.usefixtures("consuming")
def test_a_full_valid_envelope_passes_through_unchanged(encoder: WireEncoder) -> None:
    """A complete dramatiq message decodes to exactly what was encoded."""
    body = encode_job("send_message", KWARGS, queue=QUEUE, message_id="m-1")
    decoded = encoder.decode(body)
    assert decoded == json.loads(body)
    message = dramatiq.Message(**decoded)
    assert message.actor_name == "send_message"
    assert message.message_id == "m-1"


@pytest.mark.usefixtures("consuming")
def test_a_minimal_envelope_gets_defaults(encoder: WireEncoder) -> None:
    """{"actor_name", "kwargs"} is completed with queue, args, options, id and timestamp."""
    before = int(time.time() * 1000)
    decoded = encoder.decode(dumps({"actor_name": "send_message", "kwargs": KWARGS}))
    after = int(time.time() * 1000)
    assert decoded["actor_name"] == "send_message"
    assert decoded["kwargs"] == KWARGS
    assert decoded["queue_name"] == QUEUE
    assert decoded["args"] == []
    assert decoded["options"] == {}
    assert uuid.UUID(decoded["message_id"])
    assert before <= decoded["message_timestamp"] <= after
    assert dramatiq.Message(**decoded).queue_name == QUEUE


@pytest.mark.usefixtures("consuming")
def test_an_envelope_without_kwargs_gets_empty_kwargs(encoder: WireEncoder) -> None:
    """kwargs defaults to an empty object (list_clients needs none)."""
    decoded = encoder.decode(dumps({"actor_name": "list_clients"}))
    assert decoded["actor_name"] == "list_clients"
    assert decoded["kwargs"] == {}


INVALID_BODIES = [
    pytest.param(b"this is not json", "body is not JSON", id="not-json"),
    pytest.param(b'{"actor_name": "caf\xe9"}', "body is not UTF-8 text", id="not-utf8"),
    pytest.param(b"", "body is not JSON", id="empty"),
    pytest.param(dumps(["send_message", {}]), "body is a JSON list, not an object", id="array"),
    pytest.param(dumps("send_message"), "body is a JSON str, not an object", id="string"),
    pytest.param(
        dumps({"actor_name": "send_message", "kwargs": {}, "priority": 1}),
        "unknown top-level field(s) 'priority'",
        id="unknown-field",
    ),
    pytest.param(
        dumps({"actor_name": "send_message", "kwargs": [1, 2]}),
        "'kwargs' must be a JSON object",
        id="kwargs-list",
    ),
    pytest.param(
        dumps({"actor_name": "send_message", "args": {}}),
        "'args' must be a JSON array",
        id="args-object",
    ),
    pytest.param(dumps({"kwargs": {}}), "missing 'actor_name'", id="no-actor-name"),
    pytest.param(
        dumps({"actor_name": 7, "kwargs": {}}), "'actor_name' must be a JSON string", id="actor-int"
    ),
    pytest.param(dumps({"actor_name": "", "kwargs": {}}), "actor_name is empty", id="actor-empty"),
    pytest.param(
        dumps({"actor_name": "send_message", "queue_name": "verloop.manage"}),
        "queue_name 'verloop.manage' does not match the queue it arrived on ('verloop.send')",
        id="other-queue",
    ),
    pytest.param(
        dumps({"actor_name": "send_message", "kwargs": {"pad": "x" * MAX_BYTES}}),
        "the limit is 4096",
        id="too-large",
    ),
    pytest.param(
        dumps({"actor_name": "send_message", "message_timestamp": True}),
        "'message_timestamp' must be a JSON integer",
        id="timestamp-bool",
    ),
    pytest.param(
        dumps({"actor_name": "send_message", "message_timestamp": 1.5}),
        "'message_timestamp' must be a JSON integer",
        id="timestamp-float",
    ),
    pytest.param(
        dumps({"actor_name": "send_message", "message_id": None}),
        "'message_id' must be a JSON string",
        id="message-id-null",
    ),
]


@pytest.mark.usefixtures("consuming")
@pytest.mark.parametrize(("body", "says"), INVALID_BODIES)
def test_an_invalid_body_becomes_an_undecodable_message_keeping_the_bytes(
    encoder: WireEncoder, body: bytes, says: str
) -> None:
    """A body that is not a valid job becomes an UNDECODABLE_ACTOR message saying why."""
    decoded = encoder.decode(body)
    assert decoded["actor_name"] == UNDECODABLE_ACTOR
    assert decoded["queue_name"] == QUEUE
    assert decoded["kwargs"]["reason"].startswith("not a valid job: ")
    assert says in decoded["kwargs"]["reason"]
    assert raw_body_of(decoded["kwargs"]) == body
    assert dramatiq.Message(**decoded).actor_name == UNDECODABLE_ACTOR


@pytest.mark.usefixtures("consuming")
def test_the_reason_for_a_huge_body_does_not_contain_the_body(encoder: WireEncoder) -> None:
    """An oversized body is rejected unread: its reason is short and holds none of it."""
    body = dumps({"actor_name": "send_message", "kwargs": {"pad": "q" * 100_000}})
    reason = encoder.decode(body)["kwargs"]["reason"]
    assert "qqqq" not in reason
    assert len(reason) < 200


@pytest.mark.usefixtures("consuming")
def test_a_deeply_nested_body_becomes_an_undecodable_message() -> None:
    """A body of 100,000 nested arrays is dead-lettered with a reason, like other bad bodies."""
    body = b"[" * 100_000
    decoded = WireEncoder(256 * 1024).decode(body)
    assert decoded["actor_name"] == UNDECODABLE_ACTOR
    assert raw_body_of(decoded["kwargs"]) == body


def test_outside_a_consumer_thread_invalid_json_raises_decode_error(encoder: WireEncoder) -> None:
    """Tools and tests (no consuming queue) get dramatiq's own DecodeError."""
    assert broker._consuming.name is None
    with pytest.raises(DecodeError):
        encoder.decode(b"this is not json")


def test_outside_a_consumer_thread_a_valid_body_decodes_as_dramatiq_does(
    encoder: WireEncoder,
) -> None:
    """Outside a consumer a valid body decodes unchanged, without defaults added."""
    body = dumps({"actor_name": "send_message", "kwargs": KWARGS})
    assert encoder.decode(body) == {"actor_name": "send_message", "kwargs": KWARGS}


def test_encode_is_dramatiqs_json(encoder: WireEncoder) -> None:
    """encode() writes JSON that decode() reads back."""
    data = {"actor_name": "send_message", "kwargs": {"text": "héllo"}}
    assert json.loads(encoder.encode(data)) == data


def test_raw_body_of_kwargs_without_a_body_is_empty() -> None:
    """raw_body_of tolerates kwargs that carry no raw body."""
    assert raw_body_of({}) == b""


@pytest.mark.usefixtures("consuming")
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"actor_name": "send_message", "kwargs": {"metadata": {"x": NaN}}}', "NaN"),
        (b'{"actor_name": "send_message", "kwargs": {"metadata": {"x": -Infinity}}}', "Infinity"),
        (b'{"actor_name": "send_message", "kwargs": {"to": "\\ud83d"}}', "surrogate"),
        (b'{"actor_name": "send_message", "kwargs": {"to": "\\udc00x"}}', "surrogate"),
    ],
)
def test_bodies_that_are_not_strict_json_text_are_refused(
    encoder: WireEncoder, body: bytes, says: str
) -> None:
    """NaN/Infinity are not JSON, and a lone surrogate escape is not text: both are refused."""
    decoded = encoder.decode(body)
    assert decoded["actor_name"] == UNDECODABLE_ACTOR
    assert says in decoded["kwargs"]["reason"]


@pytest.mark.usefixtures("consuming")
def test_an_escaped_surrogate_pair_is_text_and_passes() -> None:
    """``\\ud83d\\ude00`` is an escaped emoji, not a lone surrogate."""
    body = b'{"actor_name": "send_message", "kwargs": {"metadata": {"m": "\\ud83d\\ude00"}}}'
    decoded = WireEncoder(MAX_BYTES).decode(body)
    assert decoded["actor_name"] == "send_message"
    assert decoded["kwargs"]["metadata"]["m"] == "\U0001f600"


# --- options: only what a producer may set -------------------------------------------------------
def _with_options(**options: Any) -> bytes:
    return dumps({"actor_name": "send_message", "kwargs": KWARGS, "options": options})


@pytest.mark.usefixtures("consuming")
@pytest.mark.parametrize(
    ("options", "reason"),
    [
        # dramatiq reads these: a job must not change how the worker treats it
        ({"throws": 1}, "'throws' not accepted"),
        ({"time_limit": 1}, "'time_limit' not accepted"),
        ({"max_retries": 1000}, "'max_retries' not accepted"),
        ({"broker_priority": 2**70}, "'broker_priority' not accepted"),
        ({"on_success": "list_clients"}, "'on_success' not accepted"),
        ({"pipe_target": {"actor_name": "x"}}, "'pipe_target' not accepted"),
        ({"notify_shutdown": True}, "'notify_shutdown' not accepted"),
        # the worker's own bookkeeping, of the wrong type or out of bounds
        ({"retries": -1}, "options.retries must be between"),
        ({"retries": True}, "options.retries must be a JSON integer"),
        ({"retries": 10**12}, "options.retries must be between"),
        ({"deferrals": "3"}, "options.deferrals must be a JSON integer"),
        ({"last_error": "x" * 1001}, "options.last_error is over"),
        ({"eta": "tomorrow"}, "options.eta must be a JSON number"),
        ({"eta": int(time.time() * 1000) + 365 * 86_400_000}, "days ahead (MAX_JOB_DELAY_S)"),
        ({"not_before": int(time.time() * 1000) + 30 * 86_400_000}, "days ahead"),
    ],
)
def test_options_a_producer_may_not_set_make_the_job_invalid(
    encoder: WireEncoder, options: dict[str, Any], reason: str
) -> None:
    """Only options.eta (and the worker's own counters, well-typed) pass; the reason names the
    option, so the producer can fix it."""
    decoded = encoder.decode(_with_options(**options))
    assert decoded["actor_name"] == UNDECODABLE_ACTOR
    assert reason in decoded["kwargs"]["reason"]


@pytest.mark.usefixtures("consuming")
def test_the_worker_s_own_bookkeeping_passes() -> None:
    """A retried or deferred copy carries retries, deferrals and last_error: they stay."""
    options = {"retries": 2, "deferrals": 5, "last_error": "send timed out"}
    decoded = WireEncoder(MAX_BYTES).decode(_with_options(**options))
    assert decoded["options"] == options


@pytest.mark.usefixtures("consuming")
def test_a_future_eta_on_a_main_queue_becomes_the_job_s_schedule_not_a_held_delivery() -> None:
    """dramatiq would keep the delivery in memory until its eta, in one of the queue's few
    prefetch slots: the eta moves to not_before, which the actor honours through the delay
    queue."""
    eta = int(time.time() * 1000) + 86_400_000
    decoded = WireEncoder(MAX_BYTES).decode(_with_options(eta=eta))
    assert "eta" not in decoded["options"]
    assert decoded["options"]["not_before"] == eta


@pytest.mark.usefixtures("consuming")
def test_a_past_eta_on_a_main_queue_is_dropped() -> None:
    decoded = WireEncoder(MAX_BYTES).decode(_with_options(eta=1000.5))
    assert decoded["options"] == {}


def test_a_delay_queue_eta_beyond_the_consumer_timeout_comes_back_in_hops() -> None:
    """On a delay queue the delivery is held until its eta: an eta past RabbitMQ's consumer
    timeout is cut to a hop, and the real time kept as not_before."""
    from worker.settings import MAX_SINGLE_DELAY_S

    broker._consuming.name = QUEUE + ".DQ"
    try:
        eta = int(time.time() * 1000) + 3 * 86_400_000
        body = dumps(
            {
                "queue_name": QUEUE + ".DQ",
                "actor_name": "send_message",
                "kwargs": KWARGS,
                "options": {"eta": eta},
            }
        )
        decoded = WireEncoder(MAX_BYTES).decode(body)
    finally:
        broker._consuming.name = None
    assert decoded["options"]["not_before"] == eta
    hop = decoded["options"]["eta"] - int(time.time() * 1000)
    assert 0 < hop <= MAX_SINGLE_DELAY_S * 1000


@pytest.mark.usefixtures("consuming")
@pytest.mark.parametrize(
    ("message_id", "reason"),
    [
        ("x" * 129, "message_id must be 1-128 printable ASCII"),
        ("id with spaces", "message_id must be"),
        ("é", "message_id must be"),
        ("a\r\nb", "message_id must be"),
    ],
)
def test_a_message_id_that_cannot_be_an_amqp_property_or_key_is_refused(
    encoder: WireEncoder, message_id: str, reason: str
) -> None:
    decoded = encoder.decode(
        dumps({"actor_name": "send_message", "kwargs": KWARGS, "message_id": message_id})
    )
    assert decoded["actor_name"] == UNDECODABLE_ACTOR
    assert reason in decoded["kwargs"]["reason"]


@pytest.mark.usefixtures("consuming")
def test_a_number_too_large_for_a_double_is_refused(encoder: WireEncoder) -> None:
    """1e400 reads as infinity, which no encoder writes back."""
    body = b'{"actor_name": "send_message", "kwargs": {"metadata": {"x": 1e400}}}'
    decoded = encoder.decode(body)
    assert decoded["actor_name"] == UNDECODABLE_ACTOR
    assert "too large" in decoded["kwargs"]["reason"]


@pytest.mark.usefixtures("consuming")
@pytest.mark.parametrize(
    "body",
    [
        b'{"actor_name": "send_message", "actor_name": "list_clients", "kwargs": {}}',
        b'{"actor_name": "list_clients", "kwargs": {"metadata": {"a": 1, "a": 2}}}',
    ],
)
def test_a_name_twice_in_one_object_is_refused(encoder: WireEncoder, body: bytes) -> None:
    """Parsers disagree on which of two values wins: a job whose meaning depends on the
    reader (found by the property suite: a send that ran as list_clients) is refused."""
    decoded = encoder.decode(body)
    assert decoded["actor_name"] == UNDECODABLE_ACTOR
    assert "twice in one object" in decoded["kwargs"]["reason"]
