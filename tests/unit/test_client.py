"""Unit tests for worker.verloop.client.VerloopClient, over httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from worker.errors import (
    ConfigurationError,
    JobFailure,
    OutcomeUnknown,
    PermanentFailure,
    TransientFailure,
)
from worker.settings import EndpointOverride
from worker.verloop.client import VerloopClient
from worker.verloop.endpoints import resolve_endpoints

BASE_URL = "https://partners.example.test"
SYSTEM_TOKEN = "sys-token-5f1c2a9e"
PHONE_TOKEN = "phone-token-8b7d3c11"
PASSWORD = "hunter2-password"
SEND_BODY = {
    "messaging_product": "whatsapp",
    "recipient_type": "individual",
    "to": "+919876543210",
    "type": "text",
    "text": {"body": "hi"},
}

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers with a fixed handler."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def last(self) -> httpx.Request:
        """The most recent request."""
        return self.requests[-1]


def make_client(
    answer: Handler, overrides: dict[str, EndpointOverride] | None = None
) -> tuple[VerloopClient, Recorder]:
    """A client whose every call is answered by ``answer``."""
    recorder = Recorder(answer)
    client = VerloopClient(
        base_url=BASE_URL,
        api_prefix="/api/v2/whatsapp",
        endpoints=resolve_endpoints(overrides or {}),
        timeout=httpx.Timeout(1.0),
        limits=httpx.Limits(max_connections=4),
        transport=httpx.MockTransport(recorder),
    )
    return client, recorder


def answer_json(body: Any, status: int = 200, **headers: str) -> Handler:
    """A handler that answers every request with this JSON body."""
    return lambda request: httpx.Response(status, json=body, headers=headers)


def answer_raw(content: bytes, status: int = 200) -> Handler:
    """A handler that answers every request with these bytes."""
    return lambda request: httpx.Response(status, content=content)


def raise_error(kind: type[httpx.TransportError]) -> Handler:
    """A handler that fails the request with an httpx transport error."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise kind("simulated", request=request)

    return handler


@pytest.fixture
def closing() -> Iterator[list[VerloopClient]]:
    """Clients appended here are closed after the test."""
    clients: list[VerloopClient] = []
    yield clients
    for client in clients:
        client.close()


def client_for(
    closing: list[VerloopClient],
    answer: Handler,
    overrides: dict[str, EndpointOverride] | None = None,
) -> tuple[VerloopClient, Recorder]:
    """make_client, closed after the test."""
    client, recorder = make_client(answer, overrides)
    closing.append(client)
    return client, recorder


# --- authenticate ------------------------------------------------------------------------------


def test_authenticate_posts_credentials_to_the_auth_path_from_the_root(
    closing: list[VerloopClient],
) -> None:
    """Auth is POST /api/v2/auth (outside the API prefix), JSON body, empty Authorization."""
    client, recorder = client_for(closing, answer_json({"system_user_token": SYSTEM_TOKEN}))
    assert client.authenticate("partner", PASSWORD) == SYSTEM_TOKEN
    request = recorder.last
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/api/v2/auth"
    assert request.headers["Authorization"] == ""
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"username": "partner", "password": PASSWORD}


def test_an_auth_answer_without_the_expected_key_is_a_permanent_failure_naming_it(
    closing: list[VerloopClient],
) -> None:
    """An auth answer lacking system_user_token fails permanently and names the key looked for."""
    client, _ = client_for(closing, answer_json({"access_token": SYSTEM_TOKEN}))
    with pytest.raises(PermanentFailure) as info:
        client.authenticate("partner", PASSWORD)
    assert "system_user_token" in str(info.value)
    assert "VERLOOP_ENDPOINTS" in str(info.value)
    assert SYSTEM_TOKEN not in str(info.value)
    assert PASSWORD not in str(info.value)


# --- get_phone_token ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["token", "phone_number_token"])
def test_get_phone_token_gets_with_query_and_raw_system_token(
    closing: list[VerloopClient], key: str
) -> None:
    """The current variant GETs with client_id/phone_id in the query and accepts either key."""
    client, recorder = client_for(closing, answer_json({key: PHONE_TOKEN}))
    assert client.get_phone_token(SYSTEM_TOKEN, "acme", "phone-1") == PHONE_TOKEN
    request = recorder.last
    assert request.method == "GET"
    assert request.url.path == "/api/v2/whatsapp/get_phone_token"
    assert dict(request.url.params) == {"client_id": "acme", "phone_id": "phone-1"}
    assert request.headers["Authorization"] == SYSTEM_TOKEN
    assert request.headers["Accept"] == "application/json"
    assert request.content == b""


@pytest.mark.parametrize("key", ["phone_number_token", "token"])
def test_the_legacy_get_phone_token_posts_the_ids_as_json(
    closing: list[VerloopClient], key: str
) -> None:
    """The legacy variant POSTs {"client_id", "phone_id"} and accepts either key."""
    client, recorder = client_for(closing, answer_json({key: PHONE_TOKEN}))
    assert client.get_phone_token(SYSTEM_TOKEN, "acme", "phone-1", legacy=True) == PHONE_TOKEN
    request = recorder.last
    assert request.method == "POST"
    assert request.url.path == "/api/v2/whatsapp/get_phone_token"
    assert request.url.query == b""
    assert json.loads(request.content) == {"client_id": "acme", "phone_id": "phone-1"}
    assert request.headers["Authorization"] == SYSTEM_TOKEN


def test_a_phone_token_answer_with_an_empty_token_is_a_permanent_failure(
    closing: list[VerloopClient],
) -> None:
    """An empty token string is not accepted as a token."""
    client, _ = client_for(closing, answer_json({"token": ""}))
    with pytest.raises(PermanentFailure, match="token, phone_number_token"):
        client.get_phone_token(SYSTEM_TOKEN, "acme", "phone-1")


# --- send_message ------------------------------------------------------------------------------


def test_send_message_posts_the_body_with_the_phone_token_and_idempotency_key(
    closing: list[VerloopClient],
) -> None:
    """send_message POSTs the message body, the raw phone token and the Idempotency-Key."""
    client, recorder = client_for(closing, answer_json({"messages": [{"id": "wamid.X"}]}))
    result = client.send_message(PHONE_TOKEN, SEND_BODY, idempotency_key="otp-4711")
    assert result.message_id == "wamid.X"
    assert result.http_status == 200
    request = recorder.last
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/api/v2/whatsapp/send_message"
    assert json.loads(request.content) == SEND_BODY
    assert request.headers["Authorization"] == PHONE_TOKEN
    assert request.headers["Idempotency-Key"] == "otp-4711"


def test_send_message_without_an_idempotency_key_sends_no_such_header(
    closing: list[VerloopClient],
) -> None:
    """No Idempotency-Key header is sent when the job has none."""
    client, recorder = client_for(closing, answer_json({"message_id": "m-1"}))
    client.send_message(PHONE_TOKEN, SEND_BODY)
    assert "Idempotency-Key" not in recorder.last.headers


@pytest.mark.parametrize(
    ("body", "message_id"),
    [
        ({"messages": [{"id": "wamid.X"}]}, "wamid.X"),
        ({"message_id": "abc-123"}, "abc-123"),
        ({"messageId": "abc-456"}, "abc-456"),
        ({"data": {"message_id": 789}}, "789"),
        ({"status": "queued"}, None),
        ([], None),
    ],
)
def test_the_message_id_is_found_in_common_answer_shapes(
    closing: list[VerloopClient], body: Any, message_id: str | None
) -> None:
    """The message id is read from the usual places, as a string; absent means None."""
    client, _ = client_for(closing, answer_json(body, status=201))
    result = client.send_message(PHONE_TOKEN, SEND_BODY)
    assert result.message_id == message_id
    assert result.http_status == 201


@pytest.mark.parametrize("content", [b"OK", b"", b"\xff\xfe not json"])
def test_a_2xx_without_a_json_body_is_still_a_success(
    closing: list[VerloopClient], content: bytes
) -> None:
    """An accepted send is never failed for an unreadable answer; its id is just unknown."""
    client, _ = client_for(closing, answer_raw(content, status=202))
    result = client.send_message(PHONE_TOKEN, SEND_BODY)
    assert result.message_id is None
    assert result.http_status == 202


def test_a_503_answer_raises_a_transient_failure(closing: list[VerloopClient]) -> None:
    """A 503 from the send endpoint is retryable and keeps the status."""
    client, _ = client_for(closing, answer_raw(b"", status=503))
    with pytest.raises(TransientFailure) as info:
        client.send_message(PHONE_TOKEN, SEND_BODY)
    assert info.value.details.http_status == 503
    assert info.value.details.reason.startswith("send failed")


def test_a_connect_timeout_raises_a_transient_failure_saying_it_timed_out(
    closing: list[VerloopClient],
) -> None:
    """A timeout becomes a TransientFailure whose reason says the call timed out."""
    client, _ = client_for(closing, raise_error(httpx.ConnectTimeout))
    with pytest.raises(TransientFailure, match="timed out") as info:
        client.send_message(PHONE_TOKEN, SEND_BODY)
    assert "ConnectTimeout" in str(info.value)
    assert info.value.__cause__ is None
    assert not isinstance(info.value, OutcomeUnknown)


@pytest.mark.parametrize(
    "kind",
    [
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.PoolTimeout,
        httpx.WriteError,
        httpx.WriteTimeout,
        httpx.LocalProtocolError,
    ],
)
def test_a_request_that_never_reached_verloop_is_a_plain_transient_failure(
    closing: list[VerloopClient], kind: type[httpx.TransportError]
) -> None:
    """Failures before the request was written whole: Verloop cannot have acted on it, so a
    retry is safe (not an unknown outcome)."""
    client, _ = client_for(closing, raise_error(kind))
    with pytest.raises(TransientFailure, match="could not reach Verloop") as info:
        client.send_message(PHONE_TOKEN, SEND_BODY)
    assert not isinstance(info.value, OutcomeUnknown)
    assert kind.__name__ in str(info.value)


@pytest.mark.parametrize("kind", [httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError])
def test_a_request_sent_without_an_answer_is_an_unknown_outcome(
    closing: list[VerloopClient], kind: type[httpx.TransportError]
) -> None:
    """A read timeout or a connection dropped before the answer: the request was written, so
    Verloop may have sent the message; the failure says so."""
    client, _ = client_for(closing, raise_error(kind))
    with pytest.raises(OutcomeUnknown, match="after the request was sent") as info:
        client.send_message(PHONE_TOKEN, SEND_BODY)
    assert kind.__name__ in str(info.value)


def test_list_clients_returns_the_body_as_verloop_sent_it(closing: list[VerloopClient]) -> None:
    """list_clients GETs /list_clients with the system token and returns the parsed body."""
    clients = {"clients": [{"id": "acme"}, {"id": "globex"}]}
    client, recorder = client_for(closing, answer_json(clients))
    assert client.list_clients(SYSTEM_TOKEN) == clients
    assert recorder.last.method == "GET"
    assert recorder.last.url.path == "/api/v2/whatsapp/list_clients"
    assert recorder.last.headers["Authorization"] == SYSTEM_TOKEN


# --- endpoint overrides ------------------------------------------------------------------------


def test_an_endpoint_override_changes_the_url_called(closing: list[VerloopClient]) -> None:
    """Overriding the send path sends to the new path under the API prefix."""
    overrides = {"send": EndpointOverride(path="/v3/send")}
    client, recorder = client_for(closing, answer_json({"message_id": "m-1"}), overrides)
    client.send_message(PHONE_TOKEN, SEND_BODY)
    assert str(recorder.last.url) == f"{BASE_URL}/api/v2/whatsapp/v3/send"


def test_an_override_of_method_and_response_keys_is_used(closing: list[VerloopClient]) -> None:
    """Overriding the method and the response keys changes both the call and the id lookup."""
    overrides = {"send": EndpointOverride(method="PUT", response_keys=("result.ref",))}
    answer = answer_json({"result": {"ref": "r-9"}, "message_id": "ignored"})
    client, recorder = client_for(closing, answer, overrides)
    assert client.send_message(PHONE_TOKEN, SEND_BODY).message_id == "r-9"
    assert recorder.last.method == "PUT"


def test_an_auth_path_override_stays_outside_the_api_prefix(closing: list[VerloopClient]) -> None:
    """The older documented auth path /auth is called from the root when configured."""
    overrides = {"auth": EndpointOverride(path="/auth")}
    client, recorder = client_for(closing, answer_json({"system_user_token": "t-1"}), overrides)
    client.authenticate("partner", PASSWORD)
    assert str(recorder.last.url) == f"{BASE_URL}/auth"


def test_an_override_for_an_unknown_endpoint_is_a_configuration_error() -> None:
    """A misspelt endpoint name in VERLOOP_ENDPOINTS stops the worker at start."""
    with pytest.raises(ConfigurationError, match="unknown endpoint 'sendd'"):
        resolve_endpoints({"sendd": EndpointOverride(path="/x")})


# --- no token or password in any failure -------------------------------------------------------

FAILURES = [
    # (answer, how many of the five calls fail)
    pytest.param(answer_raw(b"", status=503), 5, id="503"),
    pytest.param(answer_json({"code": "unauthenticated", "msg": "bad token"}, 401), 5, id="401"),
    pytest.param(answer_raw(b"", status=403), 5, id="403"),
    pytest.param(
        answer_json({"error": {"code": 131026, "message": "undeliverable"}}, 400), 5, id="400"
    ),
    pytest.param(answer_json({}, 429, **{"Retry-After": "5"}), 5, id="429"),
    pytest.param(answer_raw(b"<html>bad gateway</html>", status=502), 5, id="502-html"),
    # list_clients and send accept a 2xx without the expected keys; the token calls do not.
    pytest.param(answer_json({"unexpected": True}), 3, id="missing-key"),
    pytest.param(raise_error(httpx.ConnectTimeout), 5, id="connect-timeout"),
    pytest.param(raise_error(httpx.ReadTimeout), 5, id="read-timeout"),
    pytest.param(raise_error(httpx.ConnectError), 5, id="connect-error"),
]


def calls(client: VerloopClient) -> list[Callable[[], Any]]:
    """Every client call, each made with the secret values of this module."""
    return [
        lambda: client.authenticate("partner", PASSWORD),
        lambda: client.get_phone_token(SYSTEM_TOKEN, "acme", "phone-1"),
        lambda: client.get_phone_token(SYSTEM_TOKEN, "acme", "phone-1", legacy=True),
        lambda: client.list_clients(SYSTEM_TOKEN),
        lambda: client.send_message(PHONE_TOKEN, SEND_BODY, idempotency_key="k-1"),
    ]


@pytest.mark.parametrize(("answer", "expected_failures"), FAILURES)
def test_no_failure_text_contains_the_token_or_password_used(
    closing: list[VerloopClient], answer: Handler, expected_failures: int
) -> None:
    """Whatever goes wrong, the error's text and details hold no token and no password."""
    client, _ = client_for(closing, answer)
    texts = []
    for call in calls(client):
        try:
            call()
        except JobFailure as exc:
            texts.append(f"{exc} {exc.args!r} {exc.details!r}")
    assert len(texts) == expected_failures
    for text in texts:
        for secret in (SYSTEM_TOKEN, PHONE_TOKEN, PASSWORD):
            assert secret not in text


# --- answers that are hostile or cut short -----------------------------------------------------
class _Chunks(httpx.SyncByteStream):
    """A response body streamed in chunks, optionally failing after them."""

    def __init__(self, chunks: list[bytes], then: type[httpx.TransportError] | None = None):
        self.chunks = chunks
        self.then = then
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sent += len(chunk)
            yield chunk
        if self.then is not None:
            raise self.then("connection dropped mid-body")


def test_an_accepted_send_whose_answer_is_cut_short_is_still_sent(
    closing: list[VerloopClient],
) -> None:
    """The status line said 200: the message went out even if the body never arrived whole."""
    stream = _Chunks([b'{"messages": [{"id": "wam'], then=httpx.ReadError)
    client, _ = client_for(closing, lambda request: httpx.Response(200, stream=stream))
    result = client.send_message(PHONE_TOKEN, SEND_BODY)
    assert result.http_status == 200
    assert result.message_id is None


def test_an_answer_is_read_up_to_a_bound_and_no_further(closing: list[VerloopClient]) -> None:
    """A 2xx answer of endless bytes is not read into memory: reading stops at the bound and
    the send counts as accepted."""
    from worker.verloop.client import MAX_RESPONSE_BYTES

    stream = _Chunks([b" " * 65536] * (4 * MAX_RESPONSE_BYTES // 65536))
    client, _ = client_for(closing, lambda request: httpx.Response(200, stream=stream))
    result = client.send_message(PHONE_TOKEN, SEND_BODY)
    assert result.http_status == 200
    assert stream.sent <= MAX_RESPONSE_BYTES + 65536


@pytest.mark.parametrize("status", [200, 400, 503])
def test_an_answer_nested_thousands_deep_is_classified_by_its_status(
    closing: list[VerloopClient], status: int
) -> None:
    """A body nested far deeper than any real answer neither crashes the client nor turns an
    accepted send into a failure (it used to raise RecursionError, handled as a failed send)."""
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    client, _ = client_for(closing, answer_raw(deep, status=status))
    if status == 200:
        assert client.send_message(PHONE_TOKEN, SEND_BODY).message_id is None
        return
    expected = PermanentFailure if status == 400 else TransientFailure
    with pytest.raises(expected) as info:
        client.send_message(PHONE_TOKEN, SEND_BODY)
    assert info.value.details.http_status == status
