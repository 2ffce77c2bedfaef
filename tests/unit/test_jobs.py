"""Unit tests for the job contract: worker.jobs.models.parse_job and SendMessageJob."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from worker.errors import InvalidJob
from worker.jobs.models import (
    MAX_METADATA_BYTES,
    TEXT_MAX_CHARS,
    ListClientsJob,
    RefreshPhoneTokenJob,
    SendMessageJob,
)
from worker.jobs.registry import parse_job

TO = "+919876543210"


def send_kwargs(**changes: Any) -> dict[str, Any]:
    """A valid send_message kwargs dict, with top-level fields replaced or added."""
    kwargs: dict[str, Any] = {
        "client_id": "acme",
        "phone_id": "phone-1",
        "to": TO,
        "message": {"type": "text", "text": {"body": "Your code is 4711"}},
        "idempotency_key": "otp-4711",
    }
    kwargs.update(changes)
    return kwargs


def without(kwargs: dict[str, Any], field: str) -> dict[str, Any]:
    """A copy of ``kwargs`` without ``field``."""
    result = copy.deepcopy(kwargs)
    del result[field]
    return result


def invalid_reason(actor: str, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> str:
    """The text of the InvalidJob that parse_job raises for this job."""
    with pytest.raises(InvalidJob) as info:
        parse_job(actor, args, kwargs)
    return str(info.value)


# --- valid jobs --------------------------------------------------------------------------------

VALID_MESSAGES = [
    {"type": "text", "text": {"body": "hello", "preview_url": True}},
    {
        "type": "template",
        "template": {
            "name": "order_update",
            "language": {"code": "en_US"},
            "components": [
                {"type": "body", "parameters": [{"type": "text", "text": "4711"}]},
                {
                    "type": "button",
                    "sub_type": "url",
                    "index": "0",
                    "parameters": [{"type": "text", "text": "track/4711"}],
                },
            ],
        },
    },
    {"type": "image", "image": {"link": "https://cdn.example.com/a.jpg", "caption": "look"}},
    {
        "type": "document",
        "document": {"link": "https://cdn.example.com/invoice.pdf", "filename": "invoice.pdf"},
    },
    {"type": "video", "video": {"link": "https://cdn.example.com/clip.mp4"}},
    {"type": "audio", "audio": {"link": "https://cdn.example.com/voice.ogg"}},
    {
        "type": "interactive",
        "interactive": {
            "type": "button",
            "body": {"text": "Confirm your order?"},
            "footer": {"text": "Reply below"},
            "action": {"buttons": [{"type": "reply", "reply": {"id": "yes", "title": "Yes"}}]},
        },
    },
]


@pytest.mark.parametrize("message", VALID_MESSAGES, ids=[m["type"] for m in VALID_MESSAGES])
def test_a_send_message_job_of_every_message_type_is_valid(message: dict[str, Any]) -> None:
    """Each supported message type parses into a SendMessageJob of that type."""
    job = parse_job("send_message", (), send_kwargs(message=message))
    assert isinstance(job, SendMessageJob)
    assert job.message.type == message["type"]
    assert job.to == TO


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+91 98765 43210", "+919876543210"),
        ("+91-98765-43210", "+919876543210"),
        ("  +919876543210  ", "+919876543210"),
        ("+1 (415) 555-0123", "+14155550123"),
    ],
)
def test_the_recipient_is_normalised_to_e164(raw: str, expected: str) -> None:
    """Spaces, dashes and brackets in the recipient are removed to give E.164."""
    job = parse_job("send_message", (), send_kwargs(to=raw))
    assert isinstance(job, SendMessageJob)
    assert job.to == expected


def test_a_text_of_exactly_4096_characters_is_valid() -> None:
    """WhatsApp's text limit is inclusive: 4,096 characters are accepted."""
    body = "x" * TEXT_MAX_CHARS
    job = parse_job(
        "send_message", (), send_kwargs(message={"type": "text", "text": {"body": body}})
    )
    assert isinstance(job, SendMessageJob)
    assert job.request_body()["text"]["body"] == body


def test_a_list_clients_job_with_only_metadata_is_valid() -> None:
    """list_clients takes optional metadata and nothing else."""
    job = parse_job("list_clients", (), {"metadata": {"ticket": "OPS-1"}})
    assert isinstance(job, ListClientsJob)
    assert job.metadata == {"ticket": "OPS-1"}


def test_a_refresh_phone_token_job_is_valid() -> None:
    """refresh_phone_token takes a client id and a phone id."""
    job = parse_job("refresh_phone_token", [], {"client_id": "acme", "phone_id": "p:1@x"})
    assert isinstance(job, RefreshPhoneTokenJob)
    assert (job.client_id, job.phone_id) == ("acme", "p:1@x")


def test_metadata_just_under_the_limit_is_valid() -> None:
    """Metadata whose JSON is within 4 KB is accepted."""
    metadata = {"note": "x" * (MAX_METADATA_BYTES - 20)}
    job = parse_job("send_message", (), send_kwargs(metadata=metadata))
    assert isinstance(job, SendMessageJob)
    assert job.metadata == metadata


# --- invalid jobs ------------------------------------------------------------------------------

INVALID_SENDS = [
    pytest.param(send_kwargs(to="+91 12345"), "to:", id="bad-phone-number"),
    pytest.param(send_kwargs(to="919876543210"), "to: must be in E.164 form", id="no-plus"),
    pytest.param(send_kwargs(to="+abc"), "to:", id="letters-only"),
    pytest.param(
        send_kwargs(message={"type": "sms", "sms": {"body": "hi"}}),
        "message:",
        id="unknown-message-type",
    ),
    pytest.param(without(send_kwargs(), "client_id"), "client_id: Field required", id="no-client"),
    pytest.param(without(send_kwargs(), "to"), "to: Field required", id="no-recipient"),
    pytest.param(
        without(send_kwargs(), "idempotency_key") | {"idempotncy_key": "otp-4711"},
        "idempotncy_key: unknown field",
        id="misspelt-field",
    ),
    pytest.param(
        send_kwargs(message={"type": "text", "text": {"body": "x" * (TEXT_MAX_CHARS + 1)}}),
        "message.text.body:",
        id="text-over-4096",
    ),
    pytest.param(
        send_kwargs(message={"type": "text", "text": {"body": "hi", "bold": True}}),
        "message.text.bold: unknown field",
        id="unknown-nested-field",
    ),
    pytest.param(
        send_kwargs(metadata={"note": "x" * MAX_METADATA_BYTES}),
        "metadata: must be at most 4096 bytes",
        id="metadata-over-4kb",
    ),
    pytest.param(send_kwargs(client_id="acme corp"), "client_id:", id="client-id-with-space"),
    pytest.param(send_kwargs(phone_id=""), "phone_id:", id="empty-phone-id"),
    pytest.param(
        send_kwargs(message={"type": "image", "image": {"link": "not a url"}}),
        "message.image.link:",
        id="image-without-url",
    ),
    pytest.param(
        send_kwargs(
            message={
                "type": "template",
                "template": {"name": "Order Update", "language": {"code": "en"}},
            }
        ),
        "message.template.name:",
        id="template-name-with-capitals",
    ),
    pytest.param(send_kwargs(idempotency_key=""), "idempotency_key:", id="empty-idempotency-key"),
]


@pytest.mark.parametrize(("kwargs", "names"), INVALID_SENDS)
def test_an_invalid_send_message_job_is_rejected_naming_the_field(
    kwargs: dict[str, Any], names: str
) -> None:
    """Each malformed send_message job gives an InvalidJob whose text names the bad field."""
    reason = invalid_reason("send_message", kwargs)
    assert reason.startswith("invalid send_message job: ")
    assert names in reason


def test_a_misspelt_field_says_unknown_field() -> None:
    """A misspelt idempotency key is reported as an unknown field, not silently dropped."""
    kwargs = without(send_kwargs(), "idempotency_key") | {"idempotncy_key": "otp-4711"}
    assert "unknown field (check its spelling)" in invalid_reason("send_message", kwargs)


def test_a_text_over_4096_characters_is_invalid() -> None:
    """A text body one character over WhatsApp's limit is rejected."""
    kwargs = send_kwargs(message={"type": "text", "text": {"body": "y" * (TEXT_MAX_CHARS + 1)}})
    assert "at most 4096 characters" in invalid_reason("send_message", kwargs)


def test_the_reason_does_not_echo_input_values() -> None:
    """A long rejected body text is not copied into the reason."""
    body = "secret-ish customer text " * 200
    kwargs = send_kwargs(message={"type": "text", "text": {"body": body}}, to="+91 12345")
    reason = invalid_reason("send_message", kwargs)
    assert "secret-ish customer text" not in reason
    assert "+91 12345" not in reason
    assert len(reason) < 500


def test_positional_arguments_are_rejected() -> None:
    """Jobs take keyword arguments only; positional ones make the job invalid."""
    reason = invalid_reason("send_message", send_kwargs(), args=("acme",))
    assert "keyword arguments only" in reason
    assert "1 positional" in reason


def test_an_unknown_actor_is_rejected_listing_the_known_ones() -> None:
    """A job for an actor the worker does not run is invalid, and the known actors are named."""
    reason = invalid_reason("send_sms", {})
    assert "unknown actor 'send_sms'" in reason
    for known in ("send_message", "list_clients", "refresh_phone_token"):
        assert known in reason


def test_at_most_five_problems_are_listed_and_the_rest_are_counted() -> None:
    """A job with many errors lists five and says how many more there are."""
    kwargs = {f"extra_{i}": i for i in range(8)}
    reason = invalid_reason("list_clients", kwargs)
    assert reason.count("unknown field") == 5
    assert "and 3 more" in reason


def test_a_list_clients_job_with_an_unknown_field_is_invalid() -> None:
    """list_clients rejects fields it does not define."""
    assert "client_id: unknown field" in invalid_reason("list_clients", {"client_id": "acme"})


# --- request body ------------------------------------------------------------------------------


def test_the_request_body_is_a_cloud_api_message_object() -> None:
    """request_body() has the Cloud API envelope, the normalised recipient and the content."""
    job = parse_job("send_message", (), send_kwargs(to="+91 98765 43210"))
    assert isinstance(job, SendMessageJob)
    assert job.request_body() == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "+919876543210",
        "type": "text",
        "text": {"body": "Your code is 4711", "preview_url": False},
    }


def test_the_request_body_leaves_out_unset_optional_fields() -> None:
    """Optional fields left unset (caption) do not appear as nulls in the body."""
    message = {"type": "image", "image": {"link": "https://cdn.example.com/a.jpg"}}
    job = parse_job("send_message", (), send_kwargs(message=message))
    assert isinstance(job, SendMessageJob)
    body = job.request_body()
    assert body["type"] == "image"
    assert body["image"] == {"link": "https://cdn.example.com/a.jpg"}
    assert "idempotency_key" not in body
    assert "metadata" not in body


@pytest.mark.parametrize("message", VALID_MESSAGES, ids=[m["type"] for m in VALID_MESSAGES])
def test_the_request_body_is_the_message_dumped_as_json_without_nulls(
    message: dict[str, Any],
) -> None:
    """request_body() calls the message's serializer itself: the same as model_dump's JSON."""
    job = parse_job("send_message", (), send_kwargs(message=message))
    assert isinstance(job, SendMessageJob)
    content = job.message.model_dump(mode="json", exclude_none=True)
    assert job.request_body() == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": TO,
        **content,
    }


def test_a_job_is_frozen() -> None:
    """A parsed job cannot be changed after validation."""
    job = parse_job("send_message", (), send_kwargs())
    with pytest.raises(ValueError, match="frozen"):
        job.to = "+14155550123"  # type: ignore[misc]


# --- values that must travel: log line, event, HTTP header ---------------------------------------
@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"order": 2**64}, "metadata.order: an integer of 20 digits does not fit in 64 bits"),
        ({"order": -(2**63) - 1}, "metadata.order: an integer of 19 digits"),
        ({"x": float("inf")}, "metadata.x: inf is not a JSON number"),
        ({"x": "\ud800"}, "metadata.x: has a lone UTF-16 surrogate"),
        ({"\udfff": 1}, "metadata: has a lone UTF-16 surrogate"),
        ({"x": b"bytes"}, "metadata.x: a bytes is not a JSON value"),
    ],
)
def test_metadata_the_event_encoder_cannot_write_is_invalid(
    metadata: dict[str, Any], reason: str
) -> None:
    """These used to be accepted, sent, then fail the outcome event after Verloop took the
    message (and the job was retried: the recipient messaged again)."""
    with pytest.raises(InvalidJob) as info:
        parse_job("send_message", [], send_kwargs(metadata=metadata))
    assert reason in str(info.value)


def test_the_largest_64_bit_integers_are_valid() -> None:
    job = parse_job("send_message", [], send_kwargs(metadata={"a": 2**64 - 1, "b": -(2**63)}))
    assert job.metadata == {"a": 2**64 - 1, "b": -(2**63)}


def test_kwargs_nested_deeper_than_the_limit_are_invalid_wherever_they_nest() -> None:
    from worker.jobs.models import MAX_JSON_DEPTH

    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]
    for kwargs in (
        send_kwargs(metadata={"a": deep}),
        send_kwargs(
            message={
                "type": "interactive",
                "interactive": {"type": "button", "action": {"buttons": deep}},
            }
        ),
    ):
        with pytest.raises(InvalidJob, match="nested more than"):
            parse_job("send_message", [], kwargs)


@pytest.mark.parametrize(
    "key",
    ["a\r\nX-Injected: 1", "ключ", "tab\there", " leading", "trailing ", "x" * 201, ""],
)
def test_an_idempotency_key_that_cannot_be_an_http_header_is_invalid(key: str) -> None:
    """It used to be accepted, then fail as a header and be retried as transient."""
    with pytest.raises(InvalidJob, match="idempotency_key"):
        parse_job("send_message", [], send_kwargs(idempotency_key=key))


def test_an_idempotency_key_of_printable_ascii_with_inner_spaces_is_valid() -> None:
    job = parse_job("send_message", [], send_kwargs(idempotency_key="order 42/shipped:v2"))
    assert isinstance(job, SendMessageJob)
    assert job.idempotency_key == "order 42/shipped:v2"
