"""Outcome events: routing keys a subscriber can bind to, and bodies without secrets."""

from __future__ import annotations

import pytest

from worker.finish import events
from worker.finish.events import build_event, routing_key, routing_word
from worker.finish.outbox import EventOutbox


def test_a_send_s_routing_key_names_outcome_client_number_and_campaign() -> None:
    fields = {
        "actor": "send_message",
        "outcome": "sent",
        "client_id": "acme",
        "phone_id": "phone-1",
        "campaign_id": "spring",
    }
    assert routing_key(fields) == "send.sent.acme.phone-1.spring"


def test_dots_and_wildcards_in_identifiers_stay_inside_one_word() -> None:
    fields = {
        "actor": "send_message",
        "outcome": "dead_lettered",
        "client_id": "acme.in",
        "phone_id": "p#1",
        "campaign_id": None,
    }
    assert routing_key(fields) == "send.dead_lettered.acme_in.p_1.none"


def test_a_management_job_s_routing_key_names_its_actor() -> None:
    assert routing_key({"actor": "list_clients", "outcome": "done"}) == "manage.list_clients.done"


def test_the_event_carries_the_job_s_fields_and_the_unmasked_recipient() -> None:
    fields = {
        "actor": "send_message",
        "outcome": "sent",
        "client_id": "acme",
        "phone_id": "phone-1",
        "to": "+91******3210",
        "verloop_message_id": "wamid.1",
        "duration_ms": 12.5,
    }
    event = build_event(fields, {"to": "+919876543210", "metadata": {"order": 1}})
    assert event["event"] == "send.sent"
    assert event["version"] == 1
    assert event["to"] == "+919876543210"
    assert event["verloop_message_id"] == "wamid.1"
    assert event["metadata"] == {"order": 1}
    assert "duration_ms" not in event  # log-only fields stay in the log


def test_a_routing_key_stays_within_amqp_s_255_bytes_whatever_the_ids() -> None:
    """Three 128-character ids (the longest valid ones) and even non-ASCII ones: each long
    word is cut and tagged with a hash of the whole, so the key stays short and distinct."""
    long_ids = {"client_id": "c" * 128, "phone_id": "p" * 128, "campaign_id": "k" * 128}
    key = routing_key({"actor": "send_message", "outcome": "dead_lettered", **long_ids})
    assert len(key.encode()) <= 255
    assert len(key.split(".")) == 5
    other = routing_key(
        {"actor": "send_message", "outcome": "dead_lettered", **long_ids, "client_id": "c" * 127}
    )
    assert other != key
    odd = routing_key({"actor": "send_message", "outcome": "sent", "client_id": "é" * 128})
    assert odd.isascii()
    assert len(odd.encode()) <= 255


def test_a_short_identifier_is_kept_as_it_is() -> None:
    key = routing_key(
        {"actor": "send_message", "outcome": "sent", "client_id": "a" * 64, "phone_id": "p-1"}
    )
    assert key == f"send.sent.{'a' * 64}.p-1.none"


def test_routing_words_from_the_cache_are_the_words_made_afresh() -> None:
    """Short identifiers' words are kept to be reused: the same words, and none kept for
    long identifiers or for anything but a plain non-empty string."""
    values: list[object] = ["acme", "acme.in", "p#1", "é" * 10, "c" * 128, "", None, 5, "a*b"]
    first = [routing_word(v) for v in values]
    again = [routing_word(v) for v in values]
    assert first == again == [events._word(v) for v in values]
    assert first[:4] == ["acme", "acme_in", "p_1", "_" * 10]
    assert "c" * 128 not in events._WORDS
    assert "" not in events._WORDS


def test_the_routing_word_cache_is_bounded() -> None:
    for n in range(events._MAX_WORDS + 100):
        assert routing_word(f"client-{n}") == f"client-{n}"
    assert len(events._WORDS) <= events._MAX_WORDS


def test_the_outbox_command_carries_the_entry_s_fields_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events.time, "time", lambda: 1_700_000_000.1234)
    fields = {"actor": "send_message", "outcome": "sent", "client_id": "acme", "message_id": "m"}
    extra = {"to": "+919876543210"}
    outbox = EventOutbox(None, stream="s", max_len=10)  # type: ignore[arg-type]
    command = outbox.command(fields, extra)
    assert command[:6] == ("XADD", "s", "MAXLEN", "~", 10, "*")
    entry = EventOutbox.entry(fields, extra)
    assert list(zip(command[6::2], command[7::2], strict=True)) == list(entry.items())
    assert list(entry) == ["k", "b", "t", "m", "a"]
    assert entry["k"] == "send.sent.acme.none.none"
    assert entry["t"] == "send.sent"
    assert (entry["m"], entry["a"]) == ("m", "1700000000")
    assert entry["b"] == (
        '{"version":1,"event":"send.sent","outcome":"sent","at":1700000000.123,'
        '"message_id":"m","actor":"send_message","client_id":"acme","to":"+919876543210"}'
    )
