"""Unit tests for worker.verloop.tokens.SystemToken, with Verloop behind httpx.MockTransport.

PhoneTokens needs Redis and is covered by the integration tests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from worker.errors import PermanentFailure
from worker.observability.logging import forget_secrets, scrub_text
from worker.verloop.client import VerloopClient
from worker.verloop.endpoints import resolve_endpoints
from worker.verloop.tokens import SystemToken

USERNAME = "partner"
PASSWORD = "hunter2-password"
CONFIGURED = "configured-system-token-1"


class FakeAuth:
    """A MockTransport handler playing Verloop's auth endpoint: one new token per login."""

    def __init__(self, *, status: int = 200, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s
        self.logins = 0
        self.bodies: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v2/auth"
        with self._lock:
            self.logins += 1
            number = self.logins
            self.bodies.append(json.loads(request.content))
        time.sleep(self.delay_s)  # widen the window in which other threads could log in too
        if self.status != 200:
            return httpx.Response(
                self.status, json={"code": "unauthenticated", "msg": "invalid username or password"}
            )
        return httpx.Response(200, json={"system_user_token": f"obtained-token-{number}"})


@pytest.fixture(autouse=True)
def _clean_secrets() -> Iterator[None]:
    """SystemToken registers secrets with the log redactor; forget them after each test."""
    yield
    forget_secrets()


@pytest.fixture
def auth() -> FakeAuth:
    """A working auth endpoint."""
    return FakeAuth()


def make_verloop(auth: FakeAuth) -> VerloopClient:
    """A Verloop client whose calls reach ``auth``."""
    return VerloopClient(
        base_url="https://partners.example.test",
        api_prefix="/api/v2/whatsapp",
        endpoints=resolve_endpoints({}),
        timeout=httpx.Timeout(1.0),
        limits=httpx.Limits(max_connections=16),
        transport=httpx.MockTransport(auth),
    )


@pytest.fixture
def client(auth: FakeAuth) -> Iterator[VerloopClient]:
    """A Verloop client whose calls reach ``auth``."""
    verloop = make_verloop(auth)
    yield verloop
    verloop.close()


def with_login(client: VerloopClient, password: str = PASSWORD) -> SystemToken:
    """A SystemToken that has a username and password, and no configured token."""
    return SystemToken(client, token=None, username=USERNAME, password=SecretStr(password))


def test_a_configured_token_is_returned_without_calling_verloop(
    client: VerloopClient, auth: FakeAuth
) -> None:
    """VERLOOP_SYSTEM_TOKEN is used as is: no login happens."""
    system = SystemToken(client, token=SecretStr(CONFIGURED), username=None, password=None)
    assert system.get() == CONFIGURED
    assert system.get() == CONFIGURED
    assert auth.logins == 0


def test_username_and_password_log_in_once(client: VerloopClient, auth: FakeAuth) -> None:
    """The first get() logs in with the credentials; later ones reuse the token."""
    system = with_login(client)
    tokens = {system.get() for _ in range(5)}
    assert tokens == {"obtained-token-1"}
    assert auth.logins == 1
    assert auth.bodies == [{"username": USERNAME, "password": PASSWORD}]


def test_many_threads_getting_the_token_log_in_only_once() -> None:
    """Concurrent get() calls from several threads share one login."""
    slow = FakeAuth(delay_s=0.05)
    verloop = make_verloop(slow)
    system = with_login(verloop)
    results: list[str] = []
    results_lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(5):
            token = system.get()
            with results_lock:
                results.append(token)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    verloop.close()
    assert len(results) == 40
    assert set(results) == {"obtained-token-1"}
    assert slow.logins == 1


def test_an_invalidated_token_is_replaced_by_logging_in_again(
    client: VerloopClient, auth: FakeAuth
) -> None:
    """After invalidate(rejected), the next get() logs in again and returns the new token."""
    system = with_login(client)
    first = system.get()
    assert system.invalidate(first) is True
    assert system.get() == "obtained-token-2"
    assert auth.logins == 2


def test_invalidating_a_token_already_replaced_keeps_the_current_one(
    client: VerloopClient, auth: FakeAuth
) -> None:
    """A stale rejection (of a token already replaced) does not force another login."""
    system = with_login(client)
    first = system.get()
    system.invalidate(first)
    second = system.get()
    system.invalidate(first)
    assert system.get() == second
    assert auth.logins == 2


def test_a_rejected_configured_token_falls_back_to_logging_in(
    client: VerloopClient, auth: FakeAuth
) -> None:
    """With both a configured token and credentials, a rejected configured token is replaced."""
    system = SystemToken(
        client, token=SecretStr(CONFIGURED), username=USERNAME, password=SecretStr(PASSWORD)
    )
    assert system.get() == CONFIGURED
    assert system.invalidate(CONFIGURED) is True
    assert system.get() == "obtained-token-1"
    assert auth.logins == 1


def test_a_rejected_configured_token_without_credentials_cannot_be_renewed(
    client: VerloopClient, auth: FakeAuth
) -> None:
    """Without credentials a rejected configured token is gone, and get() fails permanently."""
    system = SystemToken(client, token=SecretStr(CONFIGURED), username=None, password=None)
    assert system.invalidate(CONFIGURED) is False
    with pytest.raises(PermanentFailure, match="VERLOOP_SYSTEM_TOKEN"):
        system.get()
    assert auth.logins == 0


def test_a_wrong_password_is_a_permanent_failure_without_the_password() -> None:
    """A 401 at login is permanent, names the settings, and never shows the password."""
    refusing = FakeAuth(status=401)
    verloop = make_verloop(refusing)
    system = with_login(verloop, password="wrong-hunter2-password")
    with pytest.raises(PermanentFailure) as info:
        system.get()
    verloop.close()
    text = f"{info.value} {info.value.details!r}"
    assert "VERLOOP_USERNAME/VERLOOP_PASSWORD" in text
    assert info.value.details.http_status == 401
    assert "wrong-hunter2-password" not in text
    assert info.value.__cause__ is None


def test_no_credentials_at_all_is_a_permanent_failure(
    client: VerloopClient, auth: FakeAuth
) -> None:
    """Neither a token nor a username and password: get() fails permanently, saying what to set."""
    system = SystemToken(client, token=None, username=None, password=None)
    assert system.can_renew is False
    with pytest.raises(PermanentFailure, match="VERLOOP_USERNAME and VERLOOP_PASSWORD"):
        system.get()
    assert auth.logins == 0


def test_the_password_and_obtained_token_are_registered_with_the_log_redactor(
    client: VerloopClient,
) -> None:
    """Once seen, the password and the obtained token are scrubbed from any logged text."""
    system = with_login(client)
    token = system.get()
    scrubbed = scrub_text(f"login {PASSWORD} gave {token}")
    assert PASSWORD not in scrubbed
    assert token not in scrubbed
    assert scrubbed == "login [REDACTED] gave [REDACTED]"
