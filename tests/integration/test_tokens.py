"""Phone tokens against the real simulator and Redis: who was refused, bounded per-process
state, unambiguous cache keys and ``tokens list``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pydantic import SecretStr
from structlog.testing import capture_logs

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    SANDBOX_PASSWORD,
    SANDBOX_USER,
    Simulator,
    dead_letters,
    redis_client,
    wait_until,
)
from worker.commands.main import cli
from worker.errors import PermanentFailure
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.producer import Producer
from worker.runtime.app import WorkerApp
from worker.runtime.services import open_redis, open_verloop_client
from worker.sandbox import SandboxConfig, SandboxServer
from worker.settings import Settings
from worker.verloop.tokens import PhoneTokens, SystemToken, token_cache_entries, token_key

TEXT = {"type": "text", "text": {"body": "hello"}}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def build(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., PhoneTokens]]:
    """PhoneTokens as a worker process wires them, with knobs for the test; closed after."""
    opened: list[Any] = []

    def make(
        *,
        configured_system_token: str | None = None,
        login: bool = True,
        refusal_ttl_s: float = 60.0,
        max_entries: int = 100,
        clock: Callable[[], float] = time.monotonic,
        **settings_overrides: Any,
    ) -> PhoneTokens:
        settings = make_settings(**settings_overrides)
        client = open_verloop_client(settings)
        cache = open_redis(settings)
        opened.extend([client, cache])
        system = SystemToken(
            client,
            token=SecretStr(configured_system_token) if configured_system_token else None,
            username=SANDBOX_USER if login else None,
            password=SecretStr(SANDBOX_PASSWORD) if login else None,
            check_interval_s=60.0,
            clock=clock,
        )
        return PhoneTokens(
            client,
            cache,
            system,
            configured={},
            refusal_ttl_s=refusal_ttl_s,
            max_entries=max_entries,
            clock=clock,
        )

    yield make
    for resource in opened:
        resource.close()


def requests(simulator: Simulator, endpoint: str) -> int:
    return int(simulator.stats()["requests"].get(endpoint, 0))


def send(producer: Producer, client_id: str, phone_id: str, to: str = "+919876543210") -> str:
    return producer.send_message(client_id=client_id, phone_id=phone_id, to=to, message=TEXT)


# --- a refused client does not cost the system token ---------------------------------------------
def test_one_refused_client_leaves_the_configured_system_token_to_everyone_else(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Verloop refuses get_phone_token for one client (401, as for a bad system token). Its jobs
    are dead-lettered naming the client and number, the next one without asking Verloop again;
    the configured VERLOOP_SYSTEM_TOKEN (no username/password to log in again) keeps working
    for every other client. (Before: the refusal dropped the token, and every later fetch of
    the process failed until restart.)"""
    system_token = simulator.server.system_user_token
    simulator.faults(phone_token_refusals={"blocked": 401})
    start_worker(verloop_system_token=system_token, verloop_username=None, verloop_password=None)
    send(producer, "blocked", "phone-9")
    [(first, _)] = wait_until(dead_letters)
    send(producer, "acme", "phone-1")
    wait_until(lambda: len(simulator.messages(client_id="acme")) == 1)
    send(producer, "blocked", "phone-9", to="+919876543211")
    [(second, _)] = wait_until(dead_letters)
    send(producer, "acme", "phone-2")
    wait_until(lambda: len(simulator.messages(client_id="acme")) == 2)

    for headers in (first, second):
        info = headers[DEAD_LETTER_HEADER]
        assert info["outcome"] == "failed"
        assert info["http_status"] == 401
        assert (
            "refused to issue a phone token for client 'blocked', number 'phone-9'"
            in (info["reason"])
        )
        assert "although it accepts the system user token" in info["reason"]
        assert "TOKEN_REFUSAL_TTL_S" in info["reason"]
        assert system_token not in json.dumps(headers, default=str)
    # blocked once (the second job was answered from memory), acme's two numbers once each;
    # one check of the system token.
    assert requests(simulator, "get_phone_token") == 3
    assert requests(simulator, "list_clients") == 1
    assert requests(simulator, "auth") == 0


def test_a_refused_client_costs_no_login_per_job(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """With VERLOOP_USERNAME/VERLOOP_PASSWORD, jobs of a refused client (not remembered here:
    TOKEN_REFUSAL_TTL_S=0) never log in again: the system token was checked once and works.
    (Before: every such job logged in again, twice.)"""
    simulator.faults(phone_token_refusals={"blocked": 401})
    start_worker(token_refusal_ttl_s=0)
    for n in range(3):
        send(producer, "blocked", f"phone-{n}")
    send(producer, "acme", "phone-1")
    wait_until(lambda: len(simulator.messages()) == 1)
    letters: list[Any] = []
    wait_until(lambda: letters.extend(dead_letters()) or len(letters) == 3)
    assert requests(simulator, "auth") == 1
    assert requests(simulator, "list_clients") == 1
    assert requests(simulator, "get_phone_token") == 4


# --- a refused system token ----------------------------------------------------------------------
def test_a_revoked_system_token_is_replaced_by_one_login_for_many_numbers(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """The system token is revoked at Verloop while eight threads fetch eight numbers: one
    check, one new login, and every number gets its token."""
    tokens = build()
    tokens.get("acme", "phone-0")
    simulator.http.post("/admin/revoke_system_token").raise_for_status()
    results: dict[str, str] = {}
    start = threading.Barrier(8)

    def fetch(phone: str) -> None:
        start.wait()
        results[phone] = tokens.get("acme", phone)[0]

    threads = [threading.Thread(target=fetch, args=(f"phone-{n}",)) for n in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == {p: simulator.phone_token("acme", p) for p in results}
    assert len(results) == 8
    assert requests(simulator, "auth") == 2
    assert requests(simulator, "list_clients") == 1


def test_a_refused_configured_system_token_without_credentials_says_so_and_is_not_retried(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """VERLOOP_SYSTEM_TOKEN alone, revoked: both calls refuse it, the job fails naming the
    setting (never the token), and other numbers fail at once without calling Verloop."""
    old = simulator.server.system_user_token
    tokens = build(configured_system_token=old, login=False)
    simulator.http.post("/admin/revoke_system_token").raise_for_status()
    with capture_logs() as logged, pytest.raises(PermanentFailure) as info:
        tokens.get("acme", "phone-1")
    assert "Verloop refused VERLOOP_SYSTEM_TOKEN" in str(info.value)
    assert old not in str(info.value)
    [warning] = logged
    assert warning["event"].startswith("Verloop refused the system user token")
    assert warning["renew"] == "none: no username/password"
    assert old not in repr(logged)
    calls = requests(simulator, "get_phone_token"), requests(simulator, "list_clients")
    assert calls == (1, 1)
    with pytest.raises(PermanentFailure, match="VERLOOP_SYSTEM_TOKEN"):
        tokens.get("acme", "phone-2")
    assert (requests(simulator, "get_phone_token"), requests(simulator, "list_clients")) == calls


# --- unknown and refused numbers are remembered --------------------------------------------------
def test_an_unknown_number_is_remembered_instead_of_fetched_on_every_job(
    make_settings: Callable[..., Settings], build: Callable[..., PhoneTokens]
) -> None:
    """A Verloop that does not know the number (404): the reason names the client and number;
    for TOKEN_REFUSAL_TTL_S the process answers from memory, then asks again."""
    config = SandboxConfig(
        username=SANDBOX_USER, password=SANDBOX_PASSWORD, accept_unknown_phones=False
    )
    clock = Clock()
    with SandboxServer(config) as strict:
        tokens = build(verloop_base_url=strict.url, refusal_ttl_s=30, clock=clock)
        for _ in range(3):
            with pytest.raises(PermanentFailure) as info:
                tokens.get("demo-client", "nope")
            reason = info.value.details.reason
            assert "no phone token for client 'demo-client', number 'nope'" in reason
            assert "unknown client_id/phone_id" in reason
            assert "check the client id and phone id" in reason
            assert info.value.details.http_status == 404
        stats = strict_stats(strict)
        assert stats["requests"]["get_phone_token"] == 1
        assert stats["requests"].get("list_clients", 0) == 0  # a 404 says nothing of the token
        clock.now += 31
        with pytest.raises(PermanentFailure):
            tokens.get("demo-client", "nope")
        assert strict_stats(strict)["requests"]["get_phone_token"] == 2


def strict_stats(server: SandboxServer) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/admin/stats", timeout=5).json())


def test_tokens_refresh_forgets_a_remembered_refusal(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """Once the partner may use the number again, `tokens refresh` (refresh without a rejected
    token) fetches it at once instead of waiting out TOKEN_REFUSAL_TTL_S."""
    simulator.faults(phone_token_refusals={"acme/phone-9": 403})
    tokens = build()
    with capture_logs() as logged, pytest.raises(PermanentFailure, match="number 'phone-9'"):
        tokens.get("acme", "phone-9")
    [warning] = logged
    assert (warning["client_id"], warning["phone_id"], warning["http_status"]) == (
        "acme",
        "phone-9",
        403,
    )
    assert simulator.server.system_user_token not in repr(logged)
    simulator.faults(phone_token_refusals={})
    with pytest.raises(PermanentFailure):
        tokens.get("acme", "phone-9")
    assert requests(simulator, "get_phone_token") == 1
    token, source = tokens.refresh("acme", "phone-9", rejected=None)
    assert (token, source) == (simulator.phone_token("acme", "phone-9"), "verloop")


# --- bounded per-process state -------------------------------------------------------------------
def test_per_number_state_keeps_the_most_recently_used_numbers_only(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """With TOKEN_LOCAL_MAX_ENTRIES=2: tokens in memory, fetch locks and remembered refusals
    each hold two numbers; the least recently used is forgotten (and read again from Redis, or
    asked of Verloop again)."""
    tokens = build(max_entries=2)
    for phone in ("p1", "p2", "p3"):
        assert tokens.get("acme", phone)[1] == "verloop"
    assert tokens.get("acme", "p3")[1] == "memory"
    assert tokens.get("acme", "p1")[1] == "redis"  # forgotten in memory, still in Redis
    assert len(tokens._locks) == 2

    simulator.faults(phone_token_refusals={"ghost": 404})
    for phone in ("q1", "q2", "q3"):
        with pytest.raises(PermanentFailure):
            tokens.get("ghost", phone)
    fetched = requests(simulator, "get_phone_token")
    with pytest.raises(PermanentFailure):
        tokens.get("ghost", "q3")
    assert requests(simulator, "get_phone_token") == fetched  # remembered
    with pytest.raises(PermanentFailure):
        tokens.get("ghost", "q1")
    assert requests(simulator, "get_phone_token") == fetched + 1  # forgotten, asked again


# --- unambiguous cache keys ----------------------------------------------------------------------
def test_ids_with_colons_never_share_a_cache_entry(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """Client 'a:b' + phone 'c' and client 'a' + phone 'b:c' get their own tokens (they shared
    the key verloop:phone-token:a:b:c before)."""
    tokens = build()
    first, _ = tokens.get("a:b", "c")
    second, source = tokens.get("a", "b:c")
    assert source == "verloop"
    assert first == simulator.phone_token("a:b", "c")
    assert second == simulator.phone_token("a", "b:c")
    assert first != second
    assert token_key(("a:b", "c")) != token_key(("a", "b:c"))


def test_a_phone_id_ending_in_lock_never_reads_a_fetch_lock_as_its_token(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """While number 'x' is being fetched (its fleet lock held), number 'x:lock' is looked up: it
    gets its own token, not the lock's owner id (which sat at its key before)."""
    simulator.faults(latency_ms=400)
    tokens = build()
    cache = redis_client(REDIS_URL, decode_responses=True)
    fetching = threading.Thread(target=tokens.get, args=("acme", "x"))
    fetching.start()
    wait_until(lambda: any("lock" in key for key in cache.scan_iter()), timeout=10, interval=0.01)
    token, _ = tokens.get("acme", "x:lock")
    fetching.join(timeout=10)
    assert token == simulator.phone_token("acme", "x:lock")


def test_old_format_cache_entries_are_ignored(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """A token cached under the old key format is neither used nor listed: it is a cache, the
    number's token is fetched again."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    cache.set("verloop:phone-token:acme:phone-1", "stale-token", ex=600)
    assert tokens_list("--json").output == ""
    token, source = build().get("acme", "phone-1")
    assert source == "verloop"
    assert token == simulator.phone_token("acme", "phone-1")


def tokens_list(*args: str) -> Any:
    env = {"AMQP_URL": AMQP_URL, "REDIS_URL": REDIS_URL}
    result = CliRunner().invoke(cli, ["tokens", "list", *args], env=env)
    assert result.exit_code == 0, result.output
    return result


def test_tokens_list_shows_ids_with_colons_as_they_are_and_never_a_token(
    simulator: Simulator, build: Callable[..., PhoneTokens]
) -> None:
    """`tokens list` reads the ids stored with each token instead of parsing keys: colons in
    ids survive, --client-id selects exactly that client, and no token is printed."""
    tokens = build()
    fetched = [tokens.get(c, p)[0] for c, p in (("a:b", "c"), ("a", "b:c"), ("a", "d"))]
    listed = tokens_list()
    lines = sorted(listed.output.splitlines())
    assert [line.split(": cached")[0] for line in lines] == ["a/b:c", "a/d", "a:b/c"]
    only_a = [
        json.loads(line) for line in tokens_list("--client-id", "a", "--json").output.splitlines()
    ]
    assert [(e["client_id"], e["phone_id"]) for e in only_a] == [("a", "b:c"), ("a", "d")]
    assert all(0 < e["expires_in_s"] <= 86_400 for e in only_a)
    for token in fetched:
        assert token not in listed.output


def test_tokens_list_matches_a_client_id_s_glob_characters_literally(
    simulator: Simulator,
) -> None:
    """`tokens list --client-id 'a*'` lists client a*'s numbers, not every client's."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    for client in ("a*", "ab"):
        cache.hset(
            token_key((client, "p1")), mapping={"token": "t", "client_id": client, "phone_id": "p1"}
        )
    assert [e["client_id"] for e in token_cache_entries(cache, "a*")] == ["a*"]
    assert len(token_cache_entries(cache)) == 2
