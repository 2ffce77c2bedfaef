"""Redis through Sentinel, rehearsed with real processes on loopback (tests/integration/
redis_sentinels.py): the primary is SIGKILLed, the sentinels promote the replica, and the
worker's clients follow without a restart; while no primary answers, the limiter and the ledger
hold their sends. With LEDGER_DURABILITY=replica a record counts once a replica has it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.redis_sentinels import (
    DOWN_AFTER_MS,
    PRIMARY_PASSWORD,
    SENTINEL_PASSWORD,
    SERVICE,
    SentinelGroup,
    sentinel_group,
)
from worker.commands.check import service_problems
from worker.connections.redis import open_redis
from worker.connections.redis_direct import ThreadConnections
from worker.errors import LedgerNotReplicated, RedisUnavailable
from worker.limits import LimitPolicy, RedisLimiter, Verdict
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings

#: The sentinels' down-after, their vote and the promotion: well inside the issue's 30 s.
FAILOVER_WITHIN_S = 15.0


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with sentinel_group(tmp_path) as processes:
        yield processes


def through(group: SentinelGroup, **more: object) -> Settings:
    """Settings reaching the group's primary through its sentinels (REDIS_URL's host unused)."""
    return Settings(
        redis_url=f"redis://:{PRIMARY_PASSWORD}@unused.invalid:1/0",
        redis_sentinels=group.sentinels,
        redis_sentinel_service=SERVICE,
        redis_sentinel_password=SENTINEL_PASSWORD,
        **more,  # type: ignore[arg-type]
    )


def test_the_clients_follow_a_failover_and_hold_sends_while_no_primary_answers(
    group: SentinelGroup,
) -> None:
    cache = open_redis(through(group))
    direct = ThreadConnections(cache)
    ledger = Ledger(cache, ttl_s=3600, lease_s=60, connections=direct)
    policy = LimitPolicy(
        default_rate=100.0, overrides={}, reserve=0.1, max_wait_s=1.0, account_rate=None
    )
    limiter = RedisLimiter(cache, policy, connections=direct)
    try:
        before = ledger.claim(LedgerKey("before"), "first", take_over_uncertain=False)
        assert before.state == "claimed"
        assert cache.set("plain", "1")
        assert cache.execute_command("WAIT", 1, 2000) == 1  # replicated before the kill
        old = group.ports["primary"]
        group.kill(old)
        killed = time.monotonic()

        held: list[str] = []
        resumed_after_s = None
        attempt = 0
        while time.monotonic() - killed < FAILOVER_WITHIN_S + 5:
            attempt += 1
            try:
                claim = ledger.claim(LedgerKey(f"k{attempt}"), "me", take_over_uncertain=False)
                decision = limiter.acquire(f"phone-{attempt}", "+919876543210", "campaign")
            except RedisUnavailable as exc:  # the limiter's is a RedisUnavailable too
                held.append(str(exc))
                time.sleep(0.05)
                continue
            assert claim.state == "claimed"
            assert decision.verdict is Verdict.GO
            resumed_after_s = time.monotonic() - killed
            break

        assert held, "calls went on while no primary answered"
        assert resumed_after_s is not None, "the clients never reached the promoted replica"
        assert DOWN_AFTER_MS / 1000 <= resumed_after_s < FAILOVER_WITHIN_S
        assert group.primary_port() == group.ports["replica"]
        # What the old primary had replicated is there; the claim is another owner's.
        assert ledger.claim(LedgerKey("before"), "other", take_over_uncertain=False).state == "busy"
        assert cache.get("plain") == "1"
        for text in held:
            assert PRIMARY_PASSWORD not in text
            assert SENTINEL_PASSWORD not in text
    finally:
        limiter.close()
        ledger.close()
        cache.close()


def test_a_replica_durable_record_counts_once_a_replica_has_it(group: SentinelGroup) -> None:
    settings = through(group, ledger_durability="replica", ledger_replica_timeout_ms=300)
    cache = open_redis(settings)
    ledger = Ledger(
        cache,
        ttl_s=3600,
        lease_s=60,
        replicas=1,
        replica_timeout_ms=settings.ledger_replica_timeout_ms,
    )
    try:
        ledger.claim(LedgerKey("one"), "me", take_over_uncertain=False)
        assert ledger.mark_sent(LedgerKey("one"), "wamid.1", also=[("INCR", "count")]) == [1]
        with group.server(group.ports["replica"]) as replica:
            assert replica.get("verloop:ledger:one") == b"s:wamid.1"

        group.kill(group.ports["replica"])
        ledger.claim(LedgerKey("two"), "me", take_over_uncertain=False)
        started = time.monotonic()
        with pytest.raises(LedgerNotReplicated) as caught:
            ledger.mark_sent(LedgerKey("two"), "wamid.2", also=[("INCR", "count")])
        waited_s = time.monotonic() - started
        assert caught.value.replies == [2]  # the others were written on the primary
        assert 0.25 <= waited_s < 1.5
        assert ledger.unrecorded == 1  # kept, to be written again with a later claim
        # The later claim tries again (and, still without a replica, keeps it).
        ledger.claim(LedgerKey("three"), "me", take_over_uncertain=False)
        assert ledger.unrecorded == 1
        assert ledger.lookup(LedgerKey("two")).message_id == "wamid.2"
    finally:
        ledger.close()
        cache.close()


def test_check_reaches_the_primary_through_the_sentinels_and_names_no_password(
    group: SentinelGroup,
) -> None:
    settings = through(group)
    redis_row = service_problems(settings)[1]
    assert redis_row[2] is None
    assert group.sentinels in redis_row[1]

    for port in list(group.sentinel_ports):
        group.kill(port)
    _service, target, problem = service_problems(settings)[1]
    assert problem is not None
    assert "REDIS_SENTINEL_SERVICE" in problem  # no sentinel answers: none named a primary
    for text in (target, problem):
        assert PRIMARY_PASSWORD not in text
        assert SENTINEL_PASSWORD not in text


def test_check_says_the_sentinels_refused_their_password_not_the_primarys(
    group: SentinelGroup,
) -> None:
    """A wrong REDIS_SENTINEL_PASSWORD is named as such (not as the primary's password, nor
    as a Redis that is not running); no password shows."""
    settings = Settings(
        redis_url=f"redis://:{PRIMARY_PASSWORD}@unused.invalid:1/0",
        redis_sentinels=group.sentinels,
        redis_sentinel_service=SERVICE,
        redis_sentinel_password="not-the-sentinels-password",
    )
    _service, target, problem = service_problems(settings)[1]
    assert problem is not None
    assert "REDIS_SENTINEL_PASSWORD" in problem
    assert "refused the password in REDIS_URL" not in problem
    assert "Start it with" not in problem
    for text in (target, problem):
        assert PRIMARY_PASSWORD not in text
        assert SENTINEL_PASSWORD not in text
        assert "not-the-sentinels-password" not in text
