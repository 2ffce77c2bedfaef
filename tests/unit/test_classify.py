"""Unit tests for worker.verloop.classify: failed Verloop answers become our errors."""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any

import httpx
import pytest

from worker.errors import JobFailure, PermanentFailure, TokenInvalid, TransientFailure
from worker.verloop.classify import classify_response, parse_retry_after


def classify(status: int, body: Any = None, headers: dict[str, str] | None = None) -> JobFailure:
    """Classify a response; ``body`` is JSON-encoded unless it is already bytes."""
    if body is None:
        content = b""
    elif isinstance(body, bytes):
        content = body
    else:
        content = json.dumps(body).encode()
    return classify_response(status, content, httpx.Headers(headers or {}), what="send")


def meta(code: int | str, message: str = "meta says no") -> dict[str, Any]:
    """A Meta Cloud API error body."""
    return {"error": {"message": message, "type": "OAuthException", "code": code}}


CASES = [
    # (status, body, headers, class, code, retry_after)
    pytest.param(500, None, {}, TransientFailure, None, None, id="500-no-body"),
    pytest.param(503, None, {}, TransientFailure, None, None, id="503"),
    pytest.param(502, b"<html>Bad gateway</html>", {}, TransientFailure, None, None, id="502-html"),
    pytest.param(504, None, {}, TransientFailure, None, None, id="504"),
    pytest.param(408, None, {}, TransientFailure, None, None, id="408"),
    pytest.param(429, None, {"Retry-After": "7"}, TransientFailure, None, 7.0, id="429-seconds"),
    pytest.param(429, None, {}, TransientFailure, None, None, id="429-no-retry-after"),
    pytest.param(400, meta(131026), {}, PermanentFailure, "131026", None, id="undeliverable"),
    pytest.param(400, meta(131056), {}, TransientFailure, "131056", 10.0, id="pair-rate"),
    pytest.param(
        400, meta(131056), {"Retry-After": "3"}, TransientFailure, "131056", 3.0, id="pair-header"
    ),
    pytest.param(503, meta(131057), {}, TransientFailure, "131057", 60.0, id="maintenance"),
    pytest.param(429, meta(130429), {}, TransientFailure, "130429", 1.0, id="throughput"),
    pytest.param(400, meta(4), {}, TransientFailure, "4", 30.0, id="app-call-limit"),
    pytest.param(400, meta(80007), {}, TransientFailure, "80007", 30.0, id="account-limit"),
    pytest.param(400, meta(190), {}, TokenInvalid, "190", None, id="code-190"),
    pytest.param(400, meta(0), {}, TokenInvalid, "0", None, id="code-0"),
    pytest.param(401, None, {}, TokenInvalid, None, None, id="401-no-body"),
    pytest.param(403, None, {}, TokenInvalid, None, None, id="403"),
    pytest.param(
        503,
        {"code": "unavailable", "msg": "try later"},
        {},
        TransientFailure,
        "unavailable",
        None,
        id="twirp-unavailable",
    ),
    pytest.param(
        400,
        {"code": "invalid_argument", "msg": "bad to"},
        {},
        PermanentFailure,
        "invalid_argument",
        None,
        id="twirp-invalid-argument",
    ),
    pytest.param(
        401,
        {"code": "unauthenticated", "msg": "bad token"},
        {},
        TokenInvalid,
        "unauthenticated",
        None,
        id="twirp-unauthenticated",
    ),
    pytest.param(
        500,
        {"code": "Internal", "msg": "oops"},
        {},
        TransientFailure,
        "internal",
        None,
        id="twirp-code-case-insensitive",
    ),
    pytest.param(
        404,
        {"code": "not_found", "msg": "no client"},
        {},
        PermanentFailure,
        "not_found",
        None,
        id="twirp-not-found",
    ),
    pytest.param(400, meta(132001), {}, PermanentFailure, "132001", None, id="template-missing"),
    pytest.param(400, meta(131048), {}, PermanentFailure, "131048", None, id="spam-rate"),
    pytest.param(400, meta(131047), {}, PermanentFailure, "131047", None, id="outside-24h"),
    pytest.param(403, meta(200), {}, PermanentFailure, "200", None, id="permission"),
    pytest.param(500, meta(2), {}, TransientFailure, "2", None, id="code-2-at-500"),
    pytest.param(500, meta(131000), {}, TransientFailure, "131000", None, id="code-131000"),
    pytest.param(404, b"Not Found", {}, PermanentFailure, None, None, id="404-plain"),
    pytest.param(422, None, {}, PermanentFailure, None, None, id="422"),
    pytest.param(
        400,
        {"data": {"errors": [{"detail": {"code": 131056, "message": "pair rate"}}]}},
        {},
        TransientFailure,
        "131056",
        10.0,
        id="code-nested-deep",
    ),
    pytest.param(400, meta("131056"), {}, TransientFailure, "131056", 10.0, id="string-code"),
    pytest.param(
        400,
        {"flag": {"code": True}, "error": {"code": 131026}},
        {},
        PermanentFailure,
        "131026",
        None,
        id="boolean-code-skipped",
    ),
]


@pytest.mark.parametrize(("status", "body", "headers", "expected", "code", "retry_after"), CASES)
def test_a_failed_response_is_classified_by_status_and_code(
    status: int,
    body: Any,
    headers: dict[str, str],
    expected: type[JobFailure],
    code: str | None,
    retry_after: float | None,
) -> None:
    """Each (status, body, headers) gives the expected error class, code and retry_after."""
    failure = classify(status, body, headers)
    assert type(failure) is expected
    assert failure.details.http_status == status
    assert failure.details.code == code
    assert failure.details.retry_after == retry_after
    assert failure.retryable is (expected is TransientFailure)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, TransientFailure), (408, TransientFailure), (401, TokenInvalid)],
)
def test_a_body_code_that_echoes_the_http_status_does_not_override_the_status(
    status: int, expected: type[JobFailure]
) -> None:
    """A body like {"code": 429, "message": ...} is classified like its HTTP status."""
    failure = classify(status, {"code": status, "message": "rate limited or unauthorised"})
    assert type(failure) is expected


def test_a_retry_after_http_date_becomes_seconds_from_now() -> None:
    """A Retry-After given as an HTTP date is turned into the seconds left until it."""
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    failure = classify(429, None, {"Retry-After": when})
    assert isinstance(failure, TransientFailure)
    assert failure.details.retry_after is not None
    assert 100 <= failure.details.retry_after <= 121


def test_the_reason_carries_verloops_message_text() -> None:
    """The reason quotes the message Verloop or Meta sent."""
    failure = classify(400, meta(131026, "Message undeliverable"))
    assert failure.details.reason == "send failed: Message undeliverable"
    assert "Message undeliverable" in str(failure)
    assert "HTTP 400" in str(failure)
    assert "code 131026" in str(failure)


def test_the_reason_names_the_status_when_there_is_no_message() -> None:
    """Without a message in the body, the reason says the HTTP status in words."""
    assert classify(503).details.reason == "send failed: service unavailable"


def test_a_huge_error_message_is_truncated_in_the_reason() -> None:
    """A 100 KB error message does not make a 100 KB reason."""
    failure = classify(400, {"code": "invalid_argument", "msg": "z" * 100_000})
    assert failure.details.reason.startswith("send failed: zzz")
    assert len(failure.details.reason) <= 320


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 7 ", 7.0),
        ("2.5", 2.5),
        ("0", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("Mon, 99 Foo 2024", None),
    ],
)
def test_retry_after_is_parsed_as_seconds_or_none(
    value: str | None, expected: float | None
) -> None:
    """Retry-After numbers become seconds; missing or garbage values become None."""
    assert parse_retry_after(value) == expected


def test_a_negative_retry_after_never_gives_a_negative_wait() -> None:
    """A negative Retry-After is not used as a negative delay."""
    result = parse_retry_after("-5")
    assert result is None or result >= 0


def test_a_retry_after_date_in_the_past_means_no_wait() -> None:
    """A Retry-After date already passed gives zero seconds, not a negative number."""
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_a_retry_after_date_is_measured_from_the_given_now() -> None:
    """The ``now`` argument is the reference point for an HTTP date."""
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    reference = email.utils.parsedate_to_datetime(date).timestamp() - 30
    assert parse_retry_after(date, now=reference) == pytest.approx(30.0)


@pytest.mark.parametrize("value", ["nan", "NaN"])
def test_a_non_finite_retry_after_is_garbage(value: str) -> None:
    """Retry-After values that are not finite numbers are ignored like other garbage."""
    result = parse_retry_after(value)
    assert result is None or math.isfinite(result)
