"""Outcome events: routing keys a subscriber can bind to, and bodies without secrets."""

from __future__ import annotations

from worker.finish.events import build_event, routing_key


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
