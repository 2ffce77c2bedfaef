"""The dead-letter tooling's pure parts: parsing options, reading entries, filtering."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pika
import pytest

from worker.dlq import (
    NO_REASON,
    DeadLetterEntry,
    Edit,
    Filters,
    apply_edits,
    format_age,
    id_matches,
    parse_duration,
    parse_edit,
    redact_secrets,
    short_id,
)
from worker.finish.deadletters import DEAD_LETTER_HEADER

NOW_MS = 1_764_000_000_000
JOB_ID = "5f0c8c52-4d0a-4c47-9d3b-6f7b1b0e8a01"
KWARGS: dict[str, Any] = {
    "client_id": "acme",
    "phone_id": "phone-1",
    "to": "+919876543210",
    "campaign_id": "sale-1",
    "message": {
        "type": "template",
        "template": {"name": "Order-V2", "language": {"code": "en"}, "components": []},
    },
}


def entry(
    body: bytes | None = None, header: dict[str, Any] | None = None, **headers: Any
) -> DeadLetterEntry:
    if body is None:
        envelope = {"actor_name": "send_message", "kwargs": KWARGS, "message_id": JOB_ID}
        body = json.dumps(envelope).encode()
    table = dict(headers)
    if header is not None:
        table[DEAD_LETTER_HEADER] = header
    properties = pika.BasicProperties(headers=table or None)
    return DeadLetterEntry.from_delivery("verloop.send", properties, body)


HEADER = {
    "reason": "send failed: Message undeliverable",
    "outcome": "failed",
    "attempts": 2,
    "http_status": 400,
    "code": "131026",
    "dead_lettered_at_ms": NOW_MS - 3 * 3600 * 1000,
    "actor": "send_message",
    "message_id": JOB_ID,
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("7d", 604_800), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "h", "2x", "2h junk", "-1h"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="like 90s"):
        parse_duration(text)


def test_ages_read_well() -> None:
    assert [format_age(s) for s in (None, 5, 125, 3 * 3600 + 300, 2 * 86_400 + 4 * 3600)] == [
        "-",
        "5s",
        "2m",
        "3h05m",
        "2d04h",
    ]


def test_edits_parse_json_values_and_fall_back_to_text() -> None:
    assert parse_edit("message.template.name=order_v2") == Edit(
        ("message", "template", "name"), "order_v2"
    )
    assert parse_edit('metadata={"a": 1}').value == {"a": 1}
    assert parse_edit('x="123"').value == "123"
    assert parse_edit("x=123").value == 123
    for bad in ("novalue", "=x", "a..b=1"):
        with pytest.raises(ValueError, match=r"PATH=VALUE|empty segment"):
            parse_edit(bad)


def test_edits_apply_to_a_copy_and_refuse_paths_the_job_does_not_have() -> None:
    edited = apply_edits(
        KWARGS,
        [
            parse_edit("message.template.name=order_v2"),
            parse_edit('message.template.components=[{"type": "body"}]'),
            parse_edit("message.template.components.0.type=header"),
            parse_edit("idempotency_key=k-1"),
        ],
    )
    assert edited["message"]["template"]["name"] == "order_v2"
    assert edited["message"]["template"]["components"] == [{"type": "header"}]
    assert edited["idempotency_key"] == "k-1"
    assert KWARGS["message"]["template"]["name"] == "Order-V2"  # the original is untouched
    with pytest.raises(ValueError, match="messsage: no such field"):
        apply_edits(KWARGS, [parse_edit("messsage.template.name=x")])
    with pytest.raises(ValueError, match="not an index"):
        apply_edits(KWARGS, [parse_edit("message.template.components.3.type=x")])
    with pytest.raises(ValueError, match="is not an object"):
        apply_edits(KWARGS, [parse_edit("to.x=1")])


def test_an_entry_reads_our_header_and_the_job() -> None:
    e = entry(header=HEADER)
    assert e.id == JOB_ID
    assert (e.reason, e.outcome, e.attempts, e.http_status, e.code) == (
        "send failed: Message undeliverable",
        "failed",
        2,
        400,
        "131026",
    )
    assert e.age_s(NOW_MS) == 3 * 3600
    assert (e.client_id, e.phone_id, e.campaign_id, e.recipient) == (
        "acme",
        "phone-1",
        "sale-1",
        "+919876543210",
    )
    assert not e.undecodable
    summary = e.summary(NOW_MS)
    assert summary["to"] == "+91******3210"
    assert "+919876543210" not in json.dumps(summary)
    details = e.details(NOW_MS)
    assert details["body"]["kwargs"]["to"] == "+91******3210"
    assert "+919876543210" not in json.dumps(details)


def test_an_entry_without_our_header_has_no_reason_recorded_and_rabbitmqs_time() -> None:
    died = dt.datetime.fromtimestamp((NOW_MS - 60_000) / 1000, dt.UTC)
    e = entry(**{"x-death": [{"queue": "verloop.send", "reason": "rejected", "time": died}]})
    assert e.reason == NO_REASON
    assert e.outcome == "unknown"
    assert e.id == JOB_ID  # from the body
    assert e.age_s(NOW_MS) == 60
    assert e.x_death is not None
    assert e.x_death["reason"] == "rejected"


def test_an_undecodable_body_gets_a_stable_id_and_is_exported_as_base64() -> None:
    raw = b"\xff\xfe not json"
    first, second = entry(raw), entry(raw)
    assert first.undecodable
    assert first.id == second.id
    assert first.id.startswith("sha256-")
    record = first.export_record()
    assert record["body_encoding"] == "base64"
    assert base64.b64decode(record["body"]) == raw
    assert entry().export_record()["body_encoding"] == "text"
    assert entry(b'{"actor_name": "x", "kwargs": {}, "bogus": 1}').undecodable


def test_filters_combine_every_criterion() -> None:
    e = entry(header=HEADER)
    assert Filters().matches(e, NOW_MS)
    assert Filters(reason="UNDELIVERABLE").matches(e, NOW_MS)
    assert not Filters(reason="token").matches(e, NOW_MS)
    assert Filters(outcomes=frozenset({"failed", "invalid"})).matches(e, NOW_MS)
    assert not Filters(outcomes=frozenset({"gave_up"})).matches(e, NOW_MS)
    assert Filters(client_id="acme", phone_id="phone-1", campaign_id="sale-1").matches(e, NOW_MS)
    assert not Filters(client_id="acme", phone_id="phone-2").matches(e, NOW_MS)
    assert Filters(recipient="+919876543210").matches(e, NOW_MS)
    assert Filters(older_than_s=2 * 3600, newer_than_s=4 * 3600).matches(e, NOW_MS)
    assert not Filters(older_than_s=4 * 3600).matches(e, NOW_MS)
    assert not Filters(newer_than_s=3600).matches(e, NOW_MS)
    assert not Filters(older_than_s=1).matches(entry(), NOW_MS)  # age unknown: no match
    assert Filters(ids=frozenset({JOB_ID[:8]})).matches(e, NOW_MS)
    assert not Filters(ids=frozenset({JOB_ID[:7]})).matches(e, NOW_MS)


def test_short_ids_find_their_entry_again() -> None:
    assert short_id(JOB_ID) == "5f0c8c52"
    assert id_matches(JOB_ID, short_id(JOB_ID))
    hashed = "sha256-0123456789abcdef01234567"
    assert id_matches(hashed, short_id(hashed))
    assert short_id(hashed) == "sha256-01234567"


def test_token_like_keys_and_urls_are_never_printed() -> None:
    shown = redact_secrets(
        {"phone_token": "abc", "nested": [{"Authorization": "x"}], "url": "amqp://u:pw@h/"}
    )
    assert shown == {
        "phone_token": "[REDACTED]",
        "nested": [{"Authorization": "[REDACTED]"}],
        "url": "amqp://u:***@h/",
    }


def test_an_unreachable_rabbitmq_is_one_clear_line_without_the_password() -> None:
    from click.testing import CliRunner

    from worker.commands.dlq import dlq

    env = {
        "AMQP_URL": "amqp://guest:s3cret-passw0rd@127.0.0.1:1/%2F",
        "VERLOOP_WORKER_ENV_FILE": "",
    }
    result = CliRunner().invoke(dlq, ["list"], env=env)
    assert result.exit_code == 1
    assert "cannot connect to RabbitMQ" in result.output
    assert "s3cret-passw0rd" not in result.output
    assert len(result.output.strip().splitlines()) == 1
