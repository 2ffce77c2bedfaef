"""Unit tests for worker.jobs.wire: every envelope the worker's own tools build (producer,
campaign enqueue, dead-letter replay) is one its consumers accept, and the parser's checks."""

from __future__ import annotations

import json
import time
from typing import Any

import pika
import pytest

from worker.campaigns.enqueue import encode_envelope
from worker.dlq import DeadLetterEntry
from worker.dlq.store import replay_body
from worker.jobs import producer
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.jobs.registry import JOB_TYPES
from worker.jobs.wire import (
    ENVELOPE_FIELDS,
    build_envelope,
    dump_envelope,
    encode_job,
    parse_envelope,
)

KNOWN = frozenset(JOB_TYPES)
MAX_BYTES = 256 * 1024
MAX_DELAY_MS = 7 * 86_400_000
KWARGS: dict[str, Any] = {
    "client_id": "acme",
    "phone_id": "p1",
    "to": "+919876543210",
    "message": {"type": "text", "text": {"body": "Grüße ✓ \u2028"}},
}


def parse(body: bytes, queue: str) -> dict[str, Any]:
    """The envelope as a consumer of ``queue`` in a worker reads it."""
    return parse_envelope(
        body, queue=queue, max_bytes=MAX_BYTES, max_delay_ms=MAX_DELAY_MS, known_actors=KNOWN
    )


# --- building ------------------------------------------------------------------------------------
def test_build_envelope_has_dramatiqs_fields_in_dramatiqs_order() -> None:
    """The builder writes exactly the fields the parser accepts, in a fixed order (so every
    encoder writes the same bytes), stamped now."""
    before = int(time.time() * 1000)
    envelope = build_envelope("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    after = int(time.time() * 1000)
    assert list(envelope) == [
        "queue_name",
        "actor_name",
        "args",
        "kwargs",
        "options",
        "message_id",
        "message_timestamp",
    ]
    assert set(envelope) == ENVELOPE_FIELDS
    assert envelope["args"] == []
    assert envelope["options"] == {}
    assert before <= envelope["message_timestamp"] <= after


def test_each_envelope_gets_its_own_args_and_options() -> None:
    """The parser normalises options in place: two envelopes must never share them."""
    first = build_envelope("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    second = build_envelope("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-2")
    first["options"]["retries"] = 1
    first["args"].append(1)
    assert second["options"] == {}
    assert second["args"] == []


def test_encode_job_is_the_dumped_envelope_and_stays_the_producers() -> None:
    """encode_job = dump_envelope(build_envelope(...)); the producer module re-exports it."""
    assert producer.encode_job is encode_job
    body = encode_job("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    assert body == dump_envelope(json.loads(body))


# --- every builder's envelope parses back --------------------------------------------------------
def test_a_producer_envelope_parses_back_unchanged() -> None:
    body = encode_job("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    assert parse(body, SEND_QUEUE) == json.loads(body)


def test_a_management_envelope_parses_back_on_its_queue() -> None:
    body = encode_job("list_clients", {}, queue=MANAGE_QUEUE, message_id="m-2")
    assert parse(body, MANAGE_QUEUE)["actor_name"] == "list_clients"


def test_a_campaign_envelope_parses_back_unchanged() -> None:
    kwargs = {**KWARGS, "campaign_id": "camp-1"}
    body = encode_envelope(kwargs, "0b1c-id")
    envelope = parse(body, CAMPAIGN_QUEUE)
    assert envelope == json.loads(body)
    assert envelope["queue_name"] == CAMPAIGN_QUEUE
    assert envelope["actor_name"] == "send_message"
    assert envelope["message_id"] == "0b1c-id"


def test_a_replayed_dead_letter_parses_back_with_its_id_and_no_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replay keeps the message id (the ledger key of a send without idempotency key) and
    drops the dead copy's args and options (its retry and deferral counts)."""
    dead = json.dumps(
        {
            "queue_name": SEND_QUEUE,
            "actor_name": "send_message",
            "args": [],
            "kwargs": KWARGS,
            "options": {"retries": 5, "last_error": "timed out", "not_before": 1},
            "message_id": "dead-1",
            "message_timestamp": 1,
        }
    ).encode()
    entry = DeadLetterEntry.from_delivery(SEND_QUEUE, pika.BasicProperties(), dead)
    monkeypatch.setattr("time.time", lambda: 1_795_000_000.123)
    body = replay_body(entry, "send_message", entry.kwargs, "dead-1")
    # compact UTF-8 JSON, fields in dramatiq's order, stamped now
    assert body == json.dumps(
        {
            "queue_name": SEND_QUEUE,
            "actor_name": "send_message",
            "args": [],
            "kwargs": KWARGS,
            "options": {},
            "message_id": "dead-1",
            "message_timestamp": 1_795_000_000_123,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    monkeypatch.undo()
    envelope = parse(body, SEND_QUEUE)
    assert envelope["message_id"] == "dead-1"
    assert envelope["options"] == {}
    assert envelope["args"] == []
    assert envelope["kwargs"] == KWARGS


# --- the parser, without a consumer thread -------------------------------------------------------
def test_the_parser_fills_in_a_minimal_envelope_for_its_queue() -> None:
    body = json.dumps({"actor_name": "send_message", "kwargs": KWARGS}).encode()
    envelope = parse(body, CAMPAIGN_QUEUE)
    assert set(envelope) == ENVELOPE_FIELDS
    assert envelope["queue_name"] == CAMPAIGN_QUEUE


def test_the_parser_refuses_an_actor_the_worker_does_not_run() -> None:
    body = encode_job("drop_tables", {}, queue=SEND_QUEUE, message_id="m-1")
    with pytest.raises(ValueError, match="unknown actor 'drop_tables'"):
        parse(body, SEND_QUEUE)
    # without known_actors any name passes (tools that read any job)
    envelope = parse_envelope(
        body, queue=SEND_QUEUE, max_bytes=MAX_BYTES, max_delay_ms=MAX_DELAY_MS
    )
    assert envelope["actor_name"] == "drop_tables"


def test_the_parser_refuses_a_body_over_the_limit_unread() -> None:
    body = encode_job("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    with pytest.raises(ValueError, match=f"the limit is {len(body) - 1}"):
        parse_envelope(body, queue=SEND_QUEUE, max_bytes=len(body) - 1, max_delay_ms=MAX_DELAY_MS)


def test_an_envelope_the_parser_refuses_for_its_fields_is_undecodable_for_the_dlq() -> None:
    """The dead-letter tooling judges a body by the same field list: what a consumer refused
    for an unknown field is not offered for replay."""
    body = json.dumps(
        {"actor_name": "send_message", "kwargs": KWARGS, "priority": 1, "message_id": "m-1"}
    ).encode()
    with pytest.raises(ValueError, match="unknown top-level field"):
        parse(body, SEND_QUEUE)
    assert DeadLetterEntry.from_delivery(SEND_QUEUE, pika.BasicProperties(), body).undecodable
    good = encode_job("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    assert not DeadLetterEntry.from_delivery(SEND_QUEUE, pika.BasicProperties(), good).undecodable


def test_an_eta_is_rewritten_by_queue_kind() -> None:
    """On a main queue a future eta becomes not_before; on a delay queue a far one is cut to
    a hop, keeping the real time as not_before."""
    eta = int(time.time() * 1000) + 86_400_000
    envelope = build_envelope("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    envelope["options"] = {"eta": eta}
    main = parse(dump_envelope(envelope), SEND_QUEUE)
    assert main["options"] == {"not_before": eta}
    envelope["queue_name"] = SEND_QUEUE + ".DQ"
    delayed = parse(dump_envelope(envelope), SEND_QUEUE + ".DQ")
    assert delayed["options"]["not_before"] == eta
    assert delayed["options"]["eta"] < eta
