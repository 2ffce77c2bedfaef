"""Tests for the Verloop simulator (worker.sandbox), over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.sandbox import Faults, SandboxConfig, SandboxServer
from worker.sandbox.faults import FaultConfigError, FaultEngine

BASE = "/api/v2/whatsapp"
LEGACY_BASE = "/whatsapp"
CLIENT_ID = "demo-client"
PHONE_ID = "demo-phone-1"
TO = "+919876543210"
TEXT = {"messaging_product": "whatsapp", "recipient_type": "individual", "type": "text"}


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """A running sandbox with the default config."""
    with SandboxServer() as server:
        yield server


@pytest.fixture
def client(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    """An HTTP client pointed at the sandbox."""
    with httpx.Client(base_url=sandbox.url, timeout=5.0) as http:
        yield http


def system_token(client: httpx.Client) -> str:
    """Log in with the default credentials."""
    response = client.post(
        "/api/v2/auth", json={"username": "sandbox", "password": "sandbox-password"}
    )
    assert response.status_code == 200
    token: str = response.json()["system_user_token"]
    return token


def phone_token(client: httpx.Client, phone_id: str = PHONE_ID) -> str:
    """Fetch the phone token for (CLIENT_ID, phone_id)."""
    response = client.get(
        f"{BASE}/get_phone_token",
        params={"client_id": CLIENT_ID, "phone_id": phone_id},
        headers={"Authorization": system_token(client)},
    )
    assert response.status_code == 200
    token: str = response.json()["token"]
    return token


def send(
    client: httpx.Client, token: str, to: str = TO, text: str = "hi", **headers: str
) -> httpx.Response:
    """Send a text message with the given phone token."""
    return client.post(
        f"{BASE}/send_message",
        json={**TEXT, "to": to, "text": {"body": text}},
        headers={"Authorization": token, **headers},
    )


def set_faults(client: httpx.Client, **faults: Any) -> None:
    """Replace the sandbox's fault config."""
    response = client.put("/admin/faults", json=faults)
    assert response.status_code == 200, response.text


def stats(client: httpx.Client) -> dict[str, Any]:
    """Return /admin/stats."""
    result: dict[str, Any] = client.get("/admin/stats").json()
    return result


# --- auth and tokens ------------------------------------------------------------


def test_auth_with_correct_credentials_returns_the_same_token_every_time(
    client: httpx.Client, sandbox: SandboxServer
) -> None:
    """Correct credentials always yield the one system user token, on both auth paths."""
    first = system_token(client)
    legacy = client.post("/auth", json={"username": "sandbox", "password": "sandbox-password"})
    assert legacy.json() == {"system_user_token": first}
    assert first == sandbox.system_user_token


def test_auth_with_wrong_password_is_unauthenticated(client: httpx.Client) -> None:
    """A wrong password gets a Twirp-style 401."""
    response = client.post("/api/v2/auth", json={"username": "sandbox", "password": "nope"})
    assert response.status_code == 401
    assert response.json() == {"code": "unauthenticated", "msg": "invalid username or password"}


def test_auth_with_malformed_body_is_an_invalid_argument(client: httpx.Client) -> None:
    """A body that is not a credentials object gets a Twirp-style 400."""
    response = client.post("/api/v2/auth", content=b"not json")
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"


def test_both_get_phone_token_variants_return_the_same_token_for_a_pair(
    client: httpx.Client,
) -> None:
    """GET (query, Bearer prefix) and POST (JSON body, legacy base) agree on the token."""
    system = system_token(client)
    by_query = client.get(
        f"{BASE}/get_phone_token",
        params={"client_id": CLIENT_ID, "phone_id": PHONE_ID},
        headers={"Authorization": f"Bearer {system}"},
    )
    by_body = client.post(
        f"{LEGACY_BASE}/get_phone_token",
        json={"client_id": CLIENT_ID, "phone_id": PHONE_ID},
        headers={"Authorization": system},
    )
    assert by_query.status_code == by_body.status_code == 200
    assert by_query.json()["token"] == by_body.json()["phone_number_token"]
    assert phone_token(client, "demo-phone-2") != by_query.json()["token"]


def test_get_phone_token_without_a_valid_system_token_is_unauthenticated(
    client: httpx.Client,
) -> None:
    """A missing or wrong system token gets 401 unauthenticated."""
    params = {"client_id": CLIENT_ID, "phone_id": PHONE_ID}
    missing = client.get(f"{BASE}/get_phone_token", params=params)
    wrong = client.get(f"{BASE}/get_phone_token", params=params, headers={"Authorization": "x"})
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["code"] == "unauthenticated"


def test_get_phone_token_without_phone_id_is_an_invalid_argument(client: httpx.Client) -> None:
    """Missing parameters get 400 invalid_argument."""
    response = client.get(
        f"{BASE}/get_phone_token",
        params={"client_id": CLIENT_ID},
        headers={"Authorization": system_token(client)},
    )
    assert response.status_code == 400
    assert response.json() == {"code": "invalid_argument", "msg": "phone_id is required"}


def test_unknown_phones_are_not_found_when_the_sandbox_rejects_them() -> None:
    """With accept_unknown_phones off, only configured pairs get tokens."""
    config = SandboxConfig(clients={"c1": ["p1"]}, accept_unknown_phones=False)
    with SandboxServer(config) as server, httpx.Client(base_url=server.url) as http:
        headers = {"Authorization": server.system_user_token}
        known = http.get(
            f"{BASE}/get_phone_token", params={"client_id": "c1", "phone_id": "p1"}, headers=headers
        )
        unknown = http.get(
            f"{BASE}/get_phone_token", params={"client_id": "c1", "phone_id": "p9"}, headers=headers
        )
    assert known.status_code == 200
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "not_found"


def test_list_clients_includes_phones_created_on_demand(client: httpx.Client) -> None:
    """A phone first seen through get_phone_token shows up in list_clients."""
    system = system_token(client)
    client.get(
        f"{BASE}/get_phone_token",
        params={"client_id": "new-client", "phone_id": "new-phone"},
        headers={"Authorization": system},
    )
    response = client.get(f"{BASE}/list_clients", headers={"Authorization": system})
    assert response.json()["clients"] == [
        {"client_id": CLIENT_ID, "phone_ids": ["demo-phone-1", "demo-phone-2"]},
        {"client_id": "new-client", "phone_ids": ["new-phone"]},
    ]


# --- sending ------------------------------------------------------------------------


def test_send_message_returns_a_wamid_and_records_the_message(client: httpx.Client) -> None:
    """An accepted send answers like Meta's Cloud API and appears in /admin/messages."""
    response = send(client, phone_token(client), **{"Idempotency-Key": "key-1"})
    assert response.status_code == 200
    body = response.json()
    wamid = body["messages"][0]["id"]
    assert wamid.startswith("wamid.")
    assert body["contacts"] == [{"input": TO, "wa_id": "919876543210"}]
    [record] = client.get("/admin/messages", params={"to": "919876543210"}).json()["messages"]
    assert record["id"] == wamid
    assert (record["client_id"], record["phone_id"], record["to"]) == (CLIENT_ID, PHONE_ID, TO)
    assert record["type"] == "text"
    assert record["body"]["text"] == {"body": "hi"}
    assert record["idempotency_key"] == "key-1"
    assert abs(record["received_at"] - time.time()) < 60


def test_messages_can_be_filtered_by_phone_id(client: httpx.Client) -> None:
    """The phone_id filter only returns that phone's sends."""
    send(client, phone_token(client, "demo-phone-1"))
    send(client, phone_token(client, "demo-phone-2"))
    records = client.get("/admin/messages", params={"phone_id": "demo-phone-2"}).json()
    assert [r["phone_id"] for r in records["messages"]] == ["demo-phone-2"]


def test_send_with_an_unknown_token_gets_oauth_error_190(client: httpx.Client) -> None:
    """A token that was never issued (even with a Bearer prefix) gets 401 code 190."""
    response = send(client, "Bearer not-a-token")
    assert response.status_code == 401
    assert response.json() == {
        "error": {"message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190}
    }


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"type": "text", "text": {"body": "hi"}}',
        b'{"to": "+919876543210", "text": {"body": "hi"}}',
        b'{"to": "+919876543210", "type": "image"}',
    ],
    ids=["not-json", "missing-to", "missing-type", "missing-type-object"],
)
def test_send_with_a_malformed_body_gets_error_code_100(
    client: httpx.Client, payload: bytes
) -> None:
    """Bodies Meta would refuse get 400 with Graph error code 100, and are not recorded."""
    response = client.post(
        f"{BASE}/send_message", content=payload, headers={"Authorization": phone_token(client)}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 100
    assert stats(client)["sent"] == 0


def test_revoking_a_phone_token_makes_the_old_token_unauthorized(client: httpx.Client) -> None:
    """After revocation the old token gets 401 and get_phone_token hands out the new one."""
    old = phone_token(client)
    revoked = client.post(
        "/admin/revoke_phone_token", json={"client_id": CLIENT_ID, "phone_id": PHONE_ID}
    )
    new = revoked.json()["token"]
    assert new != old
    assert send(client, old).status_code == 401
    assert phone_token(client) == new
    assert send(client, new).status_code == 200


def get_token_answer(client: httpx.Client, client_id: str, phone_id: str) -> httpx.Response:
    return client.get(
        f"{BASE}/get_phone_token",
        params={"client_id": client_id, "phone_id": phone_id},
        headers={"Authorization": system_token(client)},
    )


def test_phone_token_refusals_refuse_one_client_or_number_with_a_valid_system_token(
    client: httpx.Client,
) -> None:
    """A refused client gets 401 unauthenticated for every number (as a bad system token would),
    a refused number 403 permission_denied, an unknown one 404; the rest and list_clients work."""
    set_faults(
        client,
        phone_token_refusals={"blocked": 401, f"{CLIENT_ID}/demo-phone-2": 403, "x/gone": 404},
    )
    for phone in ("p1", "p2"):
        refused = get_token_answer(client, "blocked", phone)
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthenticated"
    number = get_token_answer(client, CLIENT_ID, "demo-phone-2")
    assert (number.status_code, number.json()["code"]) == (403, "permission_denied")
    gone = get_token_answer(client, "x", "gone")
    assert (gone.status_code, gone.json()["code"]) == (404, "not_found")
    assert get_token_answer(client, CLIENT_ID, PHONE_ID).status_code == 200
    listed = client.get(f"{BASE}/list_clients", headers={"Authorization": system_token(client)})
    assert listed.status_code == 200
    assert client.get("/admin/faults").json()["phone_token_refusals"] == {
        "blocked": 401,
        f"{CLIENT_ID}/demo-phone-2": 403,
        "x/gone": 404,
    }
    client.post("/admin/reset")
    assert get_token_answer(client, "blocked", "p1").status_code == 200


@pytest.mark.parametrize(
    ("refusals", "fragment"),
    [
        ({"acme": 500}, "HTTP status in [401, 404]"),
        ({"acme": 402}, "must be 401, 403 or 404"),
        ({"a/b/c": 401}, "'client_id' or 'client_id/phone_id'"),
        ({"": 401}, "'client_id' or 'client_id/phone_id'"),
        (["acme"], "JSON object"),
    ],
)
def test_bad_phone_token_refusals_are_rejected(
    client: httpx.Client, refusals: Any, fragment: str
) -> None:
    """Invalid phone_token_refusals get 400 naming the problem."""
    response = client.patch("/admin/faults", json={"phone_token_refusals": refusals})
    assert response.status_code == 400
    assert fragment in response.json()["error"]


# --- scripted responses ----------------------------------------------------------------


def test_scripted_503s_are_served_in_order_before_success(client: httpx.Client) -> None:
    """Two scripted 503s with default bodies come first, then sends succeed again."""
    token = phone_token(client)
    script = client.post("/admin/script", json={"responses": [{"status": 503, "count": 2}]})
    assert script.json() == {"pending": 2}
    statuses = [send(client, token).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert stats(client)["scripted_responses"] == 2
    assert len(client.get("/admin/messages").json()["messages"]) == 1


def test_scripted_response_for_a_recipient_leaves_other_recipients_alone(
    client: httpx.Client,
) -> None:
    """An entry with `to` is consumed only by sends to that number, with its custom body."""
    token = phone_token(client)
    client.post(
        "/admin/script",
        json={"responses": [{"status": 500, "to": "919999999999", "body": {"custom": True}}]},
    )
    assert send(client, token, to=TO).status_code == 200
    hit = send(client, token, to="+91 99999 99999")
    assert (hit.status_code, hit.json()) == (500, {"custom": True})


def test_a_scripted_success_with_a_delay_is_sent_and_answered_late(client: httpx.Client) -> None:
    """A 200 entry without body lets the send through, recorded, after ``delay_ms``."""
    token = phone_token(client)
    client.post("/admin/script", json={"responses": [{"status": 200, "delay_ms": 400}]})
    started = time.monotonic()
    slow = send(client, token)
    slow_s = time.monotonic() - started
    started = time.monotonic()
    assert send(client, token).status_code == 200
    fast_s = time.monotonic() - started
    assert slow.status_code == 200
    assert slow_s >= 0.4 > fast_s
    assert len(client.get("/admin/messages").json()["messages"]) == 2


def test_scripted_429_has_a_default_body_and_retry_after(client: httpx.Client) -> None:
    """A scripted 429 without body or headers gets code 130429 and Retry-After: 1."""
    client.post("/admin/script", json={"responses": [{"status": 429}]})
    response = send(client, phone_token(client))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == 130429


def test_scripted_timeout_hangs_longer_than_the_client_waits(client: httpx.Client) -> None:
    """A scripted timeout outlasts a short client timeout; the next send is normal."""
    token = phone_token(client)
    set_faults(client, timeout_s=2.0)
    client.post("/admin/script", json={"responses": [{"timeout": True}]})
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            f"{BASE}/send_message",
            json={**TEXT, "to": TO, "text": {"body": "hi"}},
            headers={"Authorization": token},
            timeout=0.2,
        )
    assert send(client, token).status_code == 200


@pytest.mark.parametrize("after_accept", ["hang", "drop"])
def test_a_send_accepted_then_never_answered_is_recorded(
    client: httpx.Client, after_accept: str
) -> None:
    """The ambiguous outcome: the message is recorded as sent, and the client gets no answer
    (its read times out, or the connection is dropped)."""
    token = phone_token(client)
    set_faults(client, timeout_s=2.0)
    client.post("/admin/script", json={"responses": [{"after_accept": after_accept}]})
    with pytest.raises((httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(
            f"{BASE}/send_message",
            json={**TEXT, "to": TO, "text": {"body": "hi"}},
            headers={"Authorization": token},
            timeout=0.5,
        )
    assert len(client.get("/admin/messages").json()["messages"]) == 1
    assert send(client, token).status_code == 200


def test_random_timeouts_answer_504_after_timeout_s(client: httpx.Client) -> None:
    """With timeout_rate 1 a send waits timeout_s and then gets 504."""
    token = phone_token(client)
    set_faults(client, timeout_rate=1.0, timeout_s=0.2)
    started = time.monotonic()
    response = send(client, token)
    assert response.status_code == 504
    assert time.monotonic() - started >= 0.2
    assert stats(client)["injected_timeouts"] == 1


def test_invalid_script_entries_are_rejected(client: httpx.Client) -> None:
    """A script entry without status (and not a timeout) gets 400 and queues nothing."""
    response = client.post("/admin/script", json={"responses": [{"count": 2}]})
    assert response.status_code == 400
    assert "status" in response.json()["error"]
    odd = client.post("/admin/script", json={"responses": [{"after_accept": "explode"}]})
    assert odd.status_code == 400
    assert "after_accept must be hang or drop" in odd.json()["error"]
    assert client.get("/admin/script").json()["pending"] == 0


# --- rate limits -----------------------------------------------------------------------


def test_per_number_rate_rejects_excess_sends_with_429_and_retry_after(
    client: httpx.Client,
) -> None:
    """Beyond per_number_rate a send gets 429 with Retry-After and counts as rejected."""
    token = phone_token(client)
    set_faults(client, per_number_rate=2)
    statuses = [send(client, token, to=f"+9198765432{i:02}") for i in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert int(statuses[2].headers["Retry-After"]) >= 1
    assert statuses[2].json() == {"error": {"message": "Rate limit hit", "code": 130429}}
    counters = stats(client)
    assert (counters["rejected_rate_limited"], counters["rate_limit_violations"]) == (1, 0)
    assert counters["sent"] == 2


def test_per_number_rate_override_applies_to_that_phone_only(client: httpx.Client) -> None:
    """An override limits its own phone while other phones use the default (unlimited)."""
    limited, free = phone_token(client, "demo-phone-1"), phone_token(client, "demo-phone-2")
    set_faults(client, per_number_rate_overrides={"demo-phone-1": 1})
    assert [send(client, limited).status_code for _ in range(2)] == [200, 429]
    assert [send(client, free).status_code for _ in range(2)] == [200, 200]


def test_unenforced_limits_accept_excess_sends_but_count_violations(
    client: httpx.Client,
) -> None:
    """With enforce_limits false over-limit sends succeed and are counted as violations."""
    token = phone_token(client)
    set_faults(client, per_number_rate=1, per_pair_rate=1, enforce_limits=False)
    statuses = [send(client, token).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    counters = stats(client)
    assert (counters["rate_limit_violations"], counters["rejected_rate_limited"]) == (2, 0)


def test_per_pair_rate_rejects_repeat_sends_to_the_same_recipient(client: httpx.Client) -> None:
    """A second send to one recipient within the window gets 400 code 131056."""
    token = phone_token(client)
    set_faults(client, per_pair_rate=1, per_pair_window_s=5)
    first, repeat = send(client, token), send(client, token)
    other = send(client, token, to="+15551234567")
    assert (first.status_code, repeat.status_code, other.status_code) == (200, 400, 200)
    assert repeat.json()["error"]["code"] == 131056
    assert stats(client)["rejected_pair_limited"] == 1


def test_token_bucket_refills_at_the_configured_rate() -> None:
    """The engine allows one more send per 1/rate seconds once the burst is used up."""
    now = [100.0]
    engine = FaultEngine(Faults(per_number_rate=2), clock=lambda: now[0])
    verdicts = [engine.check_limits("p", "1").exceeded for _ in range(3)]
    assert verdicts == [None, None, "per_number"]
    assert engine.check_limits("p", "1").retry_after_s == 1
    now[0] += 0.5
    assert engine.check_limits("p", "1").exceeded is None
    assert engine.check_limits("other-phone", "1").exceeded is None


# --- random faults, stats, reset, config ------------------------------------------------


def test_seeded_error_rates_produce_the_same_outcomes_every_time(client: httpx.Client) -> None:
    """The same seed yields the same sequence of injected 500s and successes."""
    token = phone_token(client)

    def run() -> list[int]:
        set_faults(client, error_rates={"500": 0.5}, seed=42)
        return [send(client, token).status_code for _ in range(16)]

    first, second = run(), run()
    assert first == second
    assert set(first) == {200, 500}
    assert stats(client)["injected_errors"] == first.count(500) * 2


def test_injected_500_has_the_default_graph_error_body(client: httpx.Client) -> None:
    """An error_rates 500 answers with code 131000 'Something went wrong'."""
    token = phone_token(client)
    set_faults(client, error_rates={"500": 1.0})
    response = send(client, token)
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "Something went wrong", "code": 131000}}


def test_stats_count_requests_responses_phones_and_duplicates(client: httpx.Client) -> None:
    """Stats reflect endpoint calls, statuses, per-phone sends and repeated idempotency keys."""
    token = phone_token(client)
    send(client, token, **{"Idempotency-Key": "same"})
    send(client, token, **{"Idempotency-Key": "same"})
    send(client, token)
    send(client, "bad-token")
    counters = stats(client)
    assert counters["sent"] == 3
    assert counters["duplicates"] == 1
    assert counters["by_phone"] == {PHONE_ID: 3}
    assert counters["requests"] == {"auth": 1, "get_phone_token": 1, "send_message": 4}
    assert counters["responses"] == {"200": 5, "401": 1}


def test_stats_record_the_highest_number_of_concurrent_sends(
    client: httpx.Client, sandbox: SandboxServer
) -> None:
    """Five sends overlapping in injected latency give max_concurrency 5."""
    token = phone_token(client)
    set_faults(client, latency_ms=300)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=sandbox.url, timeout=5.0) as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        f"{BASE}/send_message",
                        json={**TEXT, "to": TO, "text": {"body": "hi"}},
                        headers={"Authorization": token},
                    )
                    for _ in range(5)
                )
            )
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 5
    assert stats(client)["max_concurrency"] == 5


def test_latency_is_added_to_api_requests_but_not_admin_ones(client: httpx.Client) -> None:
    """latency_ms delays partner-API calls and leaves /admin fast."""
    set_faults(client, latency_ms=200)
    started = time.monotonic()
    system_token(client)
    api_elapsed = time.monotonic() - started
    started = time.monotonic()
    client.get("/admin/health")
    admin_elapsed = time.monotonic() - started
    assert api_elapsed >= 0.2
    assert admin_elapsed < 0.2


def test_reset_clears_messages_counters_and_faults_but_keeps_tokens(
    client: httpx.Client,
) -> None:
    """After reset nothing is recorded, faults are none and old phone tokens still work."""
    token = phone_token(client)
    send(client, token)
    set_faults(client, latency_ms=5, error_rates={"503": 0.5})
    assert client.post("/admin/reset").json() == {"ok": True}
    assert client.get("/admin/messages").json() == {"messages": []}
    assert stats(client)["sent"] == 0
    assert client.get("/admin/faults").json() == Faults().to_json()
    assert send(client, token).status_code == 200


def test_reset_with_tokens_invalidates_phone_tokens(client: httpx.Client) -> None:
    """Reset with {"tokens": true} makes previously issued phone tokens unknown."""
    token = phone_token(client)
    client.post("/admin/reset", json={"tokens": True})
    assert send(client, token).status_code == 401
    assert phone_token(client) != token


def test_faults_put_replaces_the_config_and_get_returns_it(client: httpx.Client) -> None:
    """GET returns exactly what PUT stored, with unspecified fields back at defaults."""
    set_faults(client, latency_ms=7, seed=3)
    set_faults(client, error_rates={"503": 0.25}, per_number_rate=10)
    expected = Faults(error_rates={503: 0.25}, per_number_rate=10).to_json()
    assert client.get("/admin/faults").json() == expected


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"error_rates": {"500": 1.5}}, "probability"),
        ({"error_rates": {"200": 0.1}}, "HTTP status"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"per_pair_rate": 0.5}, "per_pair_rate"),
        ({"surprise": 1}, "unknown faults field"),
        ({"error_rates": {"500": 0.7}, "timeout_rate": 0.5}, "must not exceed 1"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_fault_config_is_rejected_with_a_clear_message(
    client: httpx.Client, body: Any, fragment: str
) -> None:
    """Invalid PUT /admin/faults bodies get 400 naming the problem; the config is unchanged."""
    set_faults(client, latency_ms=1)
    response = client.put("/admin/faults", json=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    assert client.get("/admin/faults").json()["latency_ms"] == 1.0


def test_faults_validate_when_built_in_python() -> None:
    """Constructing Faults with invalid values raises FaultConfigError."""
    with pytest.raises(FaultConfigError, match="timeout_s"):
        Faults(timeout_s=0)


def test_module_entry_point_prints_one_listening_line_and_serves() -> None:
    """`python -m worker.sandbox --port 0` announces its real URL and answers health checks."""
    repo_root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.sandbox", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        prefix = "sandbox listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        assert int(line.removeprefix(prefix)) > 0
        url = line.removeprefix("sandbox listening on ")
        assert httpx.get(f"{url}/admin/health").json() == {"ok": True}
    finally:
        process.terminate()
        remaining, _ = process.communicate(timeout=5)
    assert process.returncode == 0
    assert remaining == ""
