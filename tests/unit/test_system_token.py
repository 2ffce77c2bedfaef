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

from worker.errors import PermanentFailure, TransientFailure
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


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeVerloop(FakeAuth):
    """Auth plus list_clients, which refuses the tokens in ``refused`` (or answers
    ``list_status`` to everyone when it is set)."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        super().__init__(delay_s=delay_s)
        self.refused: set[str] = set()
        self.list_status: int | None = None
        self.checks: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/api/v2/whatsapp/list_clients":
            return super().__call__(request)
        token = request.headers["Authorization"]
        with self._lock:
            self.checks.append(token)
        time.sleep(self.delay_s)
        if self.list_status is not None:
            return httpx.Response(self.list_status, json={"code": "x", "msg": "no"})
        if token in self.refused:
            return httpx.Response(401, json={"code": "unauthenticated", "msg": "bad token"})
        return httpx.Response(200, json={"clients": []})


@pytest.fixture
def verloop() -> FakeVerloop:
    return FakeVerloop()


def system_for(
    fake: FakeVerloop,
    clock: Clock,
    *,
    configured: str | None = None,
    login: bool = True,
    interval_s: float = 60.0,
) -> tuple[SystemToken, VerloopClient]:
    client = make_verloop(fake)
    system = SystemToken(
        client,
        token=SecretStr(configured) if configured else None,
        username=USERNAME if login else None,
        password=SecretStr(PASSWORD) if login else None,
        check_interval_s=interval_s,
        clock=clock,
    )
    return system, client


def test_a_token_list_clients_refuses_is_dropped_and_replaced_by_one_login(
    verloop: FakeVerloop,
) -> None:
    """get_phone_token and list_clients both refuse the token: it is refused, and the next
    get() logs in again."""
    system, client = system_for(verloop, Clock())
    first = system.get()
    verloop.refused.add(first)
    assert system.is_refused(first) is True
    assert system.get() == "obtained-token-2"
    assert verloop.logins == 2
    client.close()


def test_a_token_list_clients_accepts_is_kept(verloop: FakeVerloop) -> None:
    """A configured token list_clients accepts is not refused: no login, the same token."""
    system, client = system_for(verloop, Clock(), configured=CONFIGURED)
    assert system.is_refused(CONFIGURED) is False
    assert verloop.checks == [CONFIGURED]
    assert system.get() == CONFIGURED
    assert verloop.logins == 0
    client.close()


def test_a_token_is_checked_at_most_once_per_interval(verloop: FakeVerloop) -> None:
    """Refusals within SYSTEM_TOKEN_CHECK_INTERVAL_S reuse the check's answer; after it, the
    token is checked again."""
    clock = Clock()
    system, client = system_for(verloop, clock, configured=CONFIGURED, interval_s=60)
    for _ in range(5):
        assert system.is_refused(CONFIGURED) is False
    assert len(verloop.checks) == 1
    clock.now += 61
    assert system.is_refused(CONFIGURED) is False
    assert len(verloop.checks) == 2
    client.close()


def test_a_token_just_obtained_by_logging_in_is_checked_too(verloop: FakeVerloop) -> None:
    """A token revoked right after the login is still found out by the first refusal."""
    system, client = system_for(verloop, Clock())
    token = system.get()
    verloop.refused.add(token)
    assert system.is_refused(token) is True
    assert verloop.checks == [token]
    assert system.get() == "obtained-token-2"
    client.close()


def test_many_threads_refused_at_once_check_once_and_log_in_once() -> None:
    """A burst of refusals with the same token: one list_clients check and one login, not one
    per job."""
    slow = FakeVerloop(delay_s=0.05)
    system, client = system_for(slow, Clock(), configured=CONFIGURED)
    slow.refused.add(CONFIGURED)
    start = threading.Barrier(8)
    answers: list[tuple[bool, str]] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        refused = system.is_refused(CONFIGURED)
        token = system.get()
        with lock:
            answers.append((refused, token))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    client.close()
    assert answers == [(True, "obtained-token-1")] * 8
    assert slow.checks == [CONFIGURED]
    assert slow.logins == 1


def test_a_refused_configured_token_without_credentials_is_tried_again_after_the_interval(
    verloop: FakeVerloop,
) -> None:
    """Without a username and password a refused VERLOOP_SYSTEM_TOKEN fails get() for the
    interval, saying so, and is used again after it."""
    clock = Clock()
    system, client = system_for(verloop, clock, configured=CONFIGURED, login=False)
    verloop.refused.add(CONFIGURED)
    assert system.is_refused(CONFIGURED) is True
    with pytest.raises(PermanentFailure) as info:
        system.get()
    assert "Verloop refused VERLOOP_SYSTEM_TOKEN" in str(info.value)
    assert "SYSTEM_TOKEN_CHECK_INTERVAL_S" in str(info.value)
    assert CONFIGURED not in str(info.value)
    clock.now += 61
    assert system.get() == CONFIGURED
    assert verloop.logins == 0
    client.close()


def test_a_refused_configured_token_with_credentials_falls_back_to_logging_in(
    verloop: FakeVerloop,
) -> None:
    """With both a configured token and credentials, a refused configured token is replaced by
    a login, for good."""
    clock = Clock()
    system, client = system_for(verloop, clock, configured=CONFIGURED)
    assert system.get() == CONFIGURED
    verloop.refused.add(CONFIGURED)
    assert system.is_refused(CONFIGURED) is True
    assert system.get() == "obtained-token-1"
    clock.now += 3600
    assert system.get() == "obtained-token-1"
    assert verloop.logins == 1
    client.close()


def test_a_refused_login_is_not_tried_again_within_the_interval() -> None:
    """A wrong password: one login attempt per interval, not one per job."""
    refusing = FakeVerloop()
    refusing.status = 401
    clock = Clock()
    system, client = system_for(refusing, clock)
    for _ in range(3):
        with pytest.raises(PermanentFailure, match="VERLOOP_USERNAME/VERLOOP_PASSWORD"):
            system.get()
    assert refusing.logins == 1
    clock.now += 61
    with pytest.raises(PermanentFailure):
        system.get()
    assert refusing.logins == 2
    refusing.status = 200
    clock.now += 61
    assert system.get() == "obtained-token-3"
    client.close()


def test_a_check_that_cannot_reach_verloop_decides_nothing(verloop: FakeVerloop) -> None:
    """list_clients answers 503: a transient failure (the job is retried), the token stays and
    the next refusal checks again."""
    system, client = system_for(verloop, Clock(), configured=CONFIGURED, login=False)
    verloop.list_status = 503
    with pytest.raises(TransientFailure):
        system.is_refused(CONFIGURED)
    assert system.get() == CONFIGURED
    verloop.list_status = None
    assert system.is_refused(CONFIGURED) is False
    assert len(verloop.checks) == 2
    client.close()


def test_a_check_that_fails_without_refusing_keeps_the_token(verloop: FakeVerloop) -> None:
    """list_clients answers 404 (a wrong path, say): that is no refusal of the token."""
    system, client = system_for(verloop, Clock(), configured=CONFIGURED, login=False)
    verloop.list_status = 404
    assert system.is_refused(CONFIGURED) is False
    assert system.get() == CONFIGURED
    client.close()


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
