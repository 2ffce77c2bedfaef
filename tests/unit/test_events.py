"""Outcome events: routing keys a subscriber can bind to, and bodies without secrets."""

from __future__ import annotations

from worker.events import build_event, routing_key


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
