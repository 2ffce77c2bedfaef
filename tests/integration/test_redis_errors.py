"""Redis errors become the worker's RedisUnavailable in one place (worker.connections.redis),
against a real Redis and one that cannot be reached; each component keeps its own message."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.integration.conftest import REDIS_URL
from worker.campaigns.store import CampaignRef, CampaignStore
from worker.connections.redis import RedisErrors, open_redis
from worker.errors import RedisUnavailable, VerloopWorkerError
from worker.finish.outbox import EventOutbox
from worker.limits import LimiterUnavailable, LimitPolicy, RedisLimiter
from worker.runtime.services import open_verloop_client
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings
from worker.verloop.tokens import PhoneTokens, SystemToken, token_cache_entries

ERRORS = RedisErrors("test store: {error}")
PASSWORD = "s3cret-redis-pass"


@pytest.fixture
def live() -> Iterator[redis.Redis]:
    """The worker's kind of client, on the test Redis."""
    client = open_redis(Settings(redis_url=REDIS_URL))
    yield client
    client.close()


@pytest.fixture
def down() -> Iterator[redis.Redis]:
    """The worker's kind of client, on a port nothing listens on (a stopped Redis), with a
    password in its URL that must never reach a message."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = open_redis(Settings(redis_url=f"redis://:{PASSWORD}@127.0.0.1:{port}/0"))
    yield client
    client.close()


def unavailable(call: Callable[[], Any]) -> RedisUnavailable:
    """What ``call`` raised: a RedisUnavailable that names no secret and chains nothing."""
    with pytest.raises(RedisUnavailable) as info:
        call()
    error = info.value
    assert PASSWORD not in str(error)
    assert "127.0.0.1" not in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
    return error


# --- the helper -------------------------------------------------------------------------------
def test_calls_that_succeed_pass_their_answers_through(live: redis.Redis) -> None:
    with ERRORS:
        live.set("errors:a", "1")
        assert live.incr("errors:a") == 2

    @ERRORS
    def read() -> Any:
        return live.get("errors:a")

    assert read() == "2"


def test_a_stopped_redis_becomes_redis_unavailable_naming_the_error_class(
    down: redis.Redis,
) -> None:
    def call() -> None:
        with ERRORS:
            down.get("anything")

    error = unavailable(call)
    assert type(error) is RedisUnavailable
    assert isinstance(error, VerloopWorkerError)
    assert str(error) == "test store: ConnectionError"


def test_the_decorator_translates_like_the_context_manager(down: redis.Redis) -> None:
    @ERRORS
    def read() -> Any:
        return down.get("anything")

    assert str(unavailable(read)) == "test store: ConnectionError"


def test_a_command_redis_refuses_is_translated_too(live: redis.Redis) -> None:
    """Every caller treated any redis-py error, a refusal included, as Redis unavailable."""
    live.set("errors:text", "not a number")

    def call() -> None:
        with ERRORS:
            live.incr("errors:text")

    assert str(unavailable(call)) == "test store: ResponseError"


def test_other_exceptions_pass_through_unchanged(live: redis.Redis) -> None:
    def call() -> None:
        with ERRORS:
            live.set("errors:b", "1")
            raise KeyError("not redis")

    with pytest.raises(KeyError, match="not redis"):
        call()
    assert live.get("errors:b") == "1"


def test_the_exception_class_is_the_component_s(down: redis.Redis) -> None:
    errors = RedisErrors("limiter: {error}", LimiterUnavailable)

    def call() -> None:
        with errors:
            down.get("anything")

    error = unavailable(call)
    assert type(error) is LimiterUnavailable
    assert str(error) == "limiter: ConnectionError"


def test_translate_makes_the_same_exception_for_an_error_returned_as_a_reply() -> None:
    error = ERRORS.translate(redis.ResponseError("WRONGTYPE Operation against a key"))
    assert type(error) is RedisUnavailable
    assert str(error) == "test store: ResponseError"


def test_a_message_must_say_where_the_error_goes() -> None:
    with pytest.raises(ValueError, match="error"):
        RedisErrors("test store")


def test_one_instance_serves_nested_and_repeated_blocks(live: redis.Redis) -> None:
    """Stateless: the same instance may be entered again, inside itself or after a failure."""
    with ERRORS, ERRORS:
        live.set("errors:c", "not a number")
    with pytest.raises(RedisUnavailable, match="ResponseError"), ERRORS, ERRORS:
        live.incr("errors:c")
    with ERRORS:
        assert live.get("errors:c") == "not a number"


# --- each component's message, as logs and the CLI show it ---------------------------------------
def test_the_ledger_says_idempotency_ledger(down: redis.Redis) -> None:
    ledger = Ledger(down, ttl_s=60, lease_s=1)
    key = LedgerKey("errors-job")
    try:
        for call in (
            lambda: ledger.claim(key, "owner", take_over_uncertain=False),
            lambda: ledger.mark_sent(key, "wamid.1"),
            lambda: ledger.mark_uncertain(key, "owner"),
            lambda: ledger.release(key, "owner"),
            lambda: ledger.lookup(key),
            lambda: ledger.forget_pending(key),
        ):
            assert str(unavailable(call)) == "idempotency ledger: ConnectionError"
        assert ledger.unrecorded == 1  # the record Redis did not take is kept for later
    finally:
        ledger.close()


def test_the_campaign_store_says_campaign_store(down: redis.Redis) -> None:
    store = CampaignStore(down)
    ref = CampaignRef("acme", "spring")
    for call in (
        lambda: store.create(ref, {"template": "t"}),
        lambda: store.checkpoint(ref, rows_done=1, enqueued=1, rejected=0),
        lambda: store.find("spring"),
        lambda: store.get(ref),
        lambda: store.list(),
        lambda: store.gate(ref),
        lambda: store.count_outcome(ref, "sent"),
    ):
        assert str(unavailable(call)) == "campaign store: ConnectionError"


def test_the_events_outbox_says_events_outbox(down: redis.Redis) -> None:
    outbox = EventOutbox(down)
    fields = {"job": "send_message", "outcome": "sent", "message_id": "m-1"}
    assert str(unavailable(lambda: outbox.add(fields, None))) == "events outbox: ConnectionError"


def test_the_limiter_raises_limiter_unavailable(down: redis.Redis) -> None:
    policy = LimitPolicy(default_rate=10.0, overrides={}, reserve=0.0, max_wait_s=1.0)
    limiter = RedisLimiter(down, policy)
    try:
        for call in (
            lambda: limiter.acquire("phone-1", "+919876543210", "campaign"),
            lambda: limiter.penalize("phone-1", 0.5, 1.0),
            lambda: limiter.cool_recipient("phone-1", "+919876543210", 1.0),
            lambda: limiter.pause("phone-1", 1.0, campaign_only=False),
        ):
            error = unavailable(call)
            assert type(error) is LimiterUnavailable
            assert str(error) == "rate limiter unavailable (Redis: ConnectionError)"
    finally:
        limiter.close()


def test_the_token_cache_says_token_cache_unavailable(down: redis.Redis) -> None:
    client = open_verloop_client(Settings(redis_url=REDIS_URL))
    system = SystemToken(client, token=None, username=None, password=None)
    tokens = PhoneTokens(client, down, system, configured={})
    try:
        for call in (
            lambda: tokens.get("acme", "phone-1"),
            lambda: tokens.refresh("acme", "phone-1", None),
            lambda: tokens.refresh("acme", "phone-1", "rejected-token"),
        ):
            error = unavailable(call)
            assert str(error) == "token cache unavailable (Redis: ConnectionError)"
    finally:
        client.close()


def test_tokens_list_keeps_redis_py_s_own_error(down: redis.Redis) -> None:
    """``tokens list`` names the Redis that did not answer from redis-py's error itself."""
    with pytest.raises(redis.ConnectionError):
        token_cache_entries(down)
