"""A WhatsApp webhook body → status job kwargs, inbound-message events and ignored items."""

from __future__ import annotations

from typing import Any

import pytest

from worker.receipts.models import StatusEntry
from worker.webhooks.mapping import MalformedBody, inbound_routing_key, map_body, status_kwargs

NOW_MS = 1_700_000_123_456


def body(*changes: Any, entry_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": list(changes), **(entry_extra or {})}],
    }


def change(value: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    metadata = {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"}
    return {
        "field": field,
        "value": {"messaging_product": "whatsapp", "metadata": metadata, **value},
    }


FAILED = {
    "id": "wamid.HBgLMTIzNDU2Nzg5MDEVAgARGBI1",
    "status": "failed",
    "timestamp": "1700000000",
    "recipient_id": "919876543210",
    "errors": [
        {
            "code": 131026,
            "title": "Message undeliverable",
            "message": "Message undeliverable",
            "error_data": {"details": "Message Undeliverable."},
            "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
        }
    ],
}
DELIVERED = {
    "id": "wamid.HBgLMTIzNDU2Nzg5MDEVAgARGBI2",
    "status": "delivered",
    "timestamp": "1700000001",
    "recipient_id": "919876543210",
    "conversation": {"id": "abc", "origin": {"type": "utility"}},
    "pricing": {"billable": True, "pricing_model": "CBP", "category": "utility"},
}


def test_statuses_map_to_status_entries_field_by_field() -> None:
    mapped = map_body(body(change({"statuses": [DELIVERED, FAILED]})), NOW_MS)
    assert (mapped.invalid, mapped.events, mapped.ignored) == ([], [], [])
    assert mapped.statuses == [
        {
            "wamid": "wamid.HBgLMTIzNDU2Nzg5MDEVAgARGBI2",
            "status": "delivered",
            "timestamp": 1700000001,
            "recipient_id": "919876543210",
            "phone_number_id": "106540352242922",
            "received_at_ms": NOW_MS,
            "pricing_category": "utility",
        },
        {
            "wamid": "wamid.HBgLMTIzNDU2Nzg5MDEVAgARGBI1",
            "status": "failed",
            "timestamp": 1700000000,
            "recipient_id": "919876543210",
            "phone_number_id": "106540352242922",
            "received_at_ms": NOW_MS,
            "errors": [
                {
                    "code": 131026,
                    "title": "Message undeliverable",
                    "message": "Message undeliverable",
                    "details": "Message Undeliverable.",
                }
            ],
        },
    ]
    for kwargs in mapped.statuses:
        StatusEntry.model_validate(kwargs)  # the actor takes them


def test_the_receivers_clock_is_used_when_none_is_given() -> None:
    [kwargs] = map_body(body(change({"statuses": [DELIVERED]}))).statuses
    assert kwargs["received_at_ms"] > NOW_MS


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        ({"id": "has spaces"}, "wamid"),
        ({"id": None}, "wamid"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": 1.5}, "timestamp"),
        ({"status": "Delivered!"}, "status"),
        ({"recipient_id": "+91 98765"}, "recipient_id"),
        ({"errors": "boom"}, "errors"),
        ({"errors": [{"code": "x" * 10}]}, "errors"),
    ],
)
def test_a_value_that_does_not_fit_is_passed_as_it_is_with_a_reason(
    changed: dict[str, Any], field: str
) -> None:
    entry = {**DELIVERED, **changed}
    mapped = map_body(body(change({"statuses": [DELIVERED, entry]})), NOW_MS)
    assert len(mapped.statuses) == 1
    [invalid] = mapped.invalid
    assert invalid.reason.startswith(field)
    expected = status_kwargs(entry, "106540352242922", NOW_MS)
    assert invalid.kwargs == expected
    for value in changed.values():  # the reason names the field, never the value
        if isinstance(value, str) and len(value) > 3:
            assert value not in invalid.reason


def test_items_that_are_not_statuses_or_messages_are_ignored_with_a_short_reason() -> None:
    mapped = map_body(
        {
            "entry": [
                "not an object",
                {"id": "x"},
                {
                    "changes": [
                        7,
                        change({"statuses": [DELIVERED]}, field="account_update"),
                        {"field": "messages", "value": "nope"},
                        change({"statuses": ["x", None, DELIVERED], "messages": {"a": 1}}),
                    ]
                },
            ]
        },
        NOW_MS,
    )
    assert len(mapped.statuses) == 1
    assert mapped.ignored == [
        "an entry without a list of changes",
        "an entry without a list of changes",
        "a change that is a number",
        "a change of field 'account_update'",
        "a change whose value is a string",
        "an item of statuses that is a string",
        "an item of statuses that is missing or null",
        "messages that is an object, not a list",
    ]


@pytest.mark.parametrize("data", [[], "x", 1, None, {}, {"entry": {}}, {"entry": "a"}])
def test_a_body_that_is_not_a_webhook_is_malformed(data: Any) -> None:
    with pytest.raises(MalformedBody):
        map_body(data, NOW_MS)


def test_inbound_messages_become_events_with_contacts_when_given() -> None:
    message = {"from": "919876543210", "id": "wamid.in", "type": "text", "text": {"body": "hi"}}
    contacts = [{"profile": {"name": "Asha"}, "wa_id": "919876543210"}]
    mapped = map_body(body(change({"messages": [message], "contacts": contacts})), NOW_MS)
    [event] = mapped.events
    assert event.routing_key == "inbound.message.106540352242922"
    assert event.body["at"] > 0
    assert {k: v for k, v in event.body.items() if k != "at"} == {
        "version": 1,
        "event": "inbound.message",
        "phone_number_id": "106540352242922",
        "display_phone_number": "15550783881",
        "message": message,
        "contacts": contacts,
    }
    [without] = map_body(body(change({"messages": [message]})), NOW_MS).events
    assert "contacts" not in without.body
    assert without.message_id != event.message_id


def test_routing_key_words_follow_the_events_rules() -> None:
    assert inbound_routing_key("1065.40*35#") == "inbound.message.1065_40_35_"
    assert inbound_routing_key(None) == "inbound.message.none"
    long_key = inbound_routing_key("9" * 300)
    assert len(long_key) < 100
    assert "~" in long_key
