"""Unit tests for the producer's wire format (no RabbitMQ needed)."""

from __future__ import annotations

import json
import time

from worker.jobs.models import SEND_QUEUE
from worker.jobs.producer import encode_job, queue_arguments

KWARGS = {
    "client_id": "acme",
    "phone_id": "p1",
    "to": "+919876543210",
    "message": {"type": "text", "text": {"body": "Grüße ✓"}},
}


def test_encode_job_writes_the_documented_dramatiq_envelope() -> None:
    """The body has exactly dramatiq's seven message fields, filled as documented."""
    before = int(time.time() * 1000)
    body = encode_job("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-123")
    after = int(time.time() * 1000)
    envelope = json.loads(body)
    assert set(envelope) == {
        "queue_name",
        "actor_name",
        "args",
        "kwargs",
        "options",
        "message_id",
        "message_timestamp",
    }
    assert envelope["queue_name"] == "verloop.send"
    assert envelope["actor_name"] == "send_message"
    assert envelope["args"] == []
    assert envelope["kwargs"] == KWARGS
    assert envelope["options"] == {}
    assert envelope["message_id"] == "m-123"
    assert before <= envelope["message_timestamp"] <= after


def test_encode_job_writes_compact_utf8_json() -> None:
    """Non-ASCII text is written as UTF-8, not \\u escapes, without padding spaces."""
    body = encode_job("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    assert "Grüße ✓".encode() in body
    assert b'", "' not in body
    body.decode("utf-8")


def test_queue_arguments_dead_letter_to_dramatiqs_xq_queue() -> None:
    """A producer declares the queue with dramatiq's dead-letter arguments."""
    assert queue_arguments("verloop.send") == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "verloop.send.XQ",
    }
