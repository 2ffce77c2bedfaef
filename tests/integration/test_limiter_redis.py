"""The Redis limiter (one Lua script) against a real Redis: the same decisions as the memory one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from tests.integration.conftest import REDIS_URL
from worker.errors import Deferred
from worker.limits import Decision, LimitPolicy, MemoryLimiter, RedisLimiter, Verdict
from worker.limits.redis_limiter import LEASE_LATE_S, lease_holds
from worker.runtime.services import open_redis
from worker.send.gate import GateSettings, SendGate
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings

PHONE = "phone-1"
ALICE = "+919876543210"
BOB = "+919876543211"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """The worker's kind of Redis client on the test database, emptied first."""
    cache = open_redis(Settings(redis_url=REDIS_URL))
    cache.flushdb()
    yield cache
    cache.close()


def policy(rate: float = 10.0, account_rate: float | None = None) -> LimitPolicy:
    return LimitPolicy(
        default_rate=rate,
        overrides={"fast": 50.0},
        reserve=0.1,
        max_wait_s=0.45,
        account_rate=account_rate,
    )


#: One call on a limiter; a bare number in a sequence is a pause of that many seconds.
Step = Callable[[MemoryLimiter | RedisLimiter], Decision | None]


def acquire(phone: str, recipient: str, lane: str) -> Step:
    return lambda limiter: limiter.acquire(phone, recipient, lane)  # type: ignore[arg-type]


def cool(phone: str, recipient: str, seconds: float) -> Step:
    return lambda limiter: limiter.cool_recipient(phone, recipient, seconds)


def pause(phone: str, seconds: float, *, campaign_only: bool) -> Step:
    return lambda limiter: limiter.pause(phone, seconds, campaign_only=campaign_only)


def penalize(phone: str, factor: float, seconds: float) -> Step:
    return lambda limiter: limiter.penalize(phone, factor, seconds)


def hold_marketing(recipient: str, seconds: float) -> Step:
    return lambda limiter: limiter.hold_marketing(recipient, seconds)


def run_side_by_side(
    rules: LimitPolicy, client: redis.Redis, steps: list[Step | float]
) -> list[tuple[Decision, Decision, float]]:
    """Each step on the memory limiter, then at once on the Redis one: the decisions paired
    with the longest lag so far between the two limiters' clocks.

    Each limiter schedules from its own "now"; if the machine stalls between the two calls
    of a step, the Redis limiter's schedule runs that much later from then on. On a quiet
    machine the lag is about a millisecond; the comparison allows for it, no more.
    """
    memory, shared = MemoryLimiter(rules), RedisLimiter(client, rules)
    pairs = []
    lag = 0.0
    for step in steps:
        if isinstance(step, float):
            time.sleep(step)
            continue
        started = time.monotonic()
        ours, theirs = step(memory), step(shared)
        lag = max(lag, time.monotonic() - started)
        if ours is not None and theirs is not None:
            pairs.append((ours, theirs, lag))
    return pairs


def assert_same(pairs: list[tuple[Decision, Decision, float]]) -> None:
    for n, (ours, theirs, lag) in enumerate(pairs):
        assert theirs.verdict is ours.verdict, f"decision {n}: {theirs} != {ours}"
        assert theirs.wait_s == pytest.approx(ours.wait_s, abs=0.02 + lag), f"decision {n}"


def assert_plan(
    pairs: list[tuple[Decision, Decision, float]],
    expected: list[tuple[Verdict, float]],
    busy_s: float,
) -> None:
    """The memory limiter's decisions are the expected ones. A wait comes out shorter by the
    time the machine took between the step that set it and the ask (`busy_s`, the run's time
    outside its pauses, bounds that); it is never longer."""
    assert len(pairs) == len(expected)
    for n, ((ours, _, _), (verdict, wait_s)) in enumerate(zip(pairs, expected, strict=True)):
        assert ours.verdict is verdict, f"decision {n}: {ours}"
        assert wait_s - 0.02 - busy_s <= ours.wait_s <= wait_s + 0.02, f"decision {n}: {ours}"


def test_the_redis_limiter_paces_like_the_memory_limiter(client: redis.Redis) -> None:
    """Bursts, reserved slots, max wait, campaign asks and other numbers: the same decisions."""
    steps: list[Step | float] = [
        *(acquire(PHONE, ALICE, "transactional") for _ in range(7)),
        acquire(PHONE, BOB, "campaign"),
        acquire("phone-2", ALICE, "campaign"),
        acquire("phone-2", ALICE, "campaign"),
        acquire("fast", ALICE, "campaign"),
        acquire("fast", ALICE, "campaign"),
        0.25,
        acquire("phone-2", ALICE, "campaign"),
        acquire(PHONE, ALICE, "transactional"),
        acquire(PHONE, ALICE, "campaign"),
    ]
    pairs = run_side_by_side(policy(10), client, steps)
    assert_same(pairs)
    verdicts = [ours.verdict for ours, _, _ in pairs]
    assert verdicts == [
        *[Verdict.GO] * 6,
        Verdict.WAIT,  # the 7th transactional send: 0.5 s > max wait
        Verdict.WAIT,  # a campaign send on a busy number
        Verdict.GO,
        Verdict.WAIT,
        Verdict.GO,
        Verdict.WAIT,
        Verdict.GO,  # phone-2 free again after 0.25 s
        Verdict.GO,  # its slot is now within max wait
        Verdict.WAIT,
    ]


def test_the_redis_limiter_holds_and_penalizes_like_the_memory_limiter(
    client: redis.Redis,
) -> None:
    """Cooling recipients, paused numbers, quality pauses and penalties: the same decisions."""
    steps: list[Step | float] = [
        cool(PHONE, ALICE, 2.0),
        cool(PHONE, ALICE, 0.5),  # holds only lengthen
        acquire(PHONE, ALICE, "transactional"),
        acquire(PHONE, BOB, "transactional"),
        pause("phone-2", 3.0, campaign_only=True),
        acquire("phone-2", ALICE, "campaign"),
        acquire("phone-2", ALICE, "transactional"),
        pause("phone-3", 4.0, campaign_only=False),
        acquire("phone-3", ALICE, "transactional"),
        acquire("phone-3", ALICE, "campaign"),
        penalize("phone-4", 0.5, 10.0),
        penalize("phone-4", 0.5, 10.0),
        acquire("phone-4", ALICE, "transactional"),
        acquire("phone-4", ALICE, "transactional"),
        acquire("phone-4", ALICE, "campaign"),
        cool("phone-5", ALICE, 0.2),
        0.25,
        acquire("phone-5", ALICE, "campaign"),
    ]
    started = time.monotonic()
    pairs = run_side_by_side(policy(10), client, steps)
    busy_s = time.monotonic() - started - 0.25
    assert_same(pairs)
    expected = [
        (Verdict.RECIPIENT_COOLING, 2.0),
        (Verdict.GO, 0.0),
        (Verdict.CAMPAIGN_PAUSED, 3.0),
        (Verdict.GO, 0.0),
        (Verdict.NUMBER_PAUSED, 4.0),
        (Verdict.NUMBER_PAUSED, 4.0),
        (Verdict.GO, 0.0),  # penalized to 2.5/s: one interval is 0.4 s
        (Verdict.GO, 0.0),
        (Verdict.WAIT, 0.8),
        (Verdict.GO, 0.0),  # the cooldown is over
    ]
    assert_plan(pairs, expected, busy_s)


def test_the_redis_limiter_holds_a_marketing_capped_recipient_like_the_memory_limiter(
    client: redis.Redis,
) -> None:
    """131049: the recipient's campaign sends wait, from every number; their transactional
    sends and other recipients' campaign sends go; a shorter hold does not shorten it; a
    hold ends."""
    steps: list[Step | float] = [
        hold_marketing(ALICE, 3.0),
        hold_marketing(ALICE, 1.0),  # holds only lengthen
        acquire(PHONE, ALICE, "campaign"),
        acquire("phone-2", ALICE, "campaign"),
        acquire(PHONE, ALICE, "transactional"),
        acquire("phone-4", BOB, "campaign"),
        hold_marketing(BOB, 0.2),
        acquire("phone-3", BOB, "campaign"),
        0.25,
        acquire("phone-3", BOB, "campaign"),  # the hold is over
        acquire("phone-3", ALICE, "campaign"),
    ]
    started = time.monotonic()
    pairs = run_side_by_side(policy(10), client, steps)
    busy_s = time.monotonic() - started - 0.25
    assert_same(pairs)
    expected = [
        (Verdict.RECIPIENT_CAPPED, 3.0),
        (Verdict.RECIPIENT_CAPPED, 3.0),
        (Verdict.GO, 0.0),
        (Verdict.GO, 0.0),
        (Verdict.RECIPIENT_CAPPED, 0.2),
        (Verdict.GO, 0.0),
        (Verdict.RECIPIENT_CAPPED, 2.75),
    ]
    assert_plan(pairs, expected, busy_s)


@pytest.mark.parametrize(
    "hostile",
    [
        "{phone-1}:pause",
        "x:pair:+919876543210",
        "*",
        "+91987654321\r\nFLUSHALL",
        "\u202e+919876543210",
        "9" * 5000,
    ],
)
def test_a_hostile_recipient_string_holds_only_itself(client: redis.Redis, hostile: str) -> None:
    """The recipient ends its hold's key after a prefix of its own: no string names another
    key (a number's pause, a pair hold, another recipient) or writes one."""
    limiter = RedisLimiter(client, policy(10))
    limiter.hold_marketing(hostile, 5.0)
    [key] = client.keys("*")
    assert key == "verloop:rl:marketing-hold:" + hostile
    # (Campaign sends take only free slots: one number each.)
    assert limiter.acquire(PHONE, ALICE, "campaign").verdict is Verdict.GO
    assert limiter.acquire("phone-2", hostile[:-1], "campaign").verdict is Verdict.GO
    assert limiter.acquire("phone-3", hostile, "campaign").verdict is Verdict.RECIPIENT_CAPPED


def test_the_gate_defers_a_capped_recipient_s_campaign_send_on_the_redis_limiter(
    client: redis.Redis,
) -> None:
    """The deferral names the cap (kind recipient_capped); the recipient's OTP is admitted."""
    limiter = RedisLimiter(client, policy(10))
    send_gate = SendGate(limiter, GateSettings(0.45, 0.5, 30.0, 60.0))
    limiter.hold_marketing(ALICE, 60.0)
    with pytest.raises(Deferred) as info:
        send_gate.admit(PHONE, ALICE, "campaign")
    assert info.value.kind == "recipient_capped"
    assert "131049" in info.value.reason
    assert 59.0 <= info.value.delay_s <= 60.0 * 1.25 + 0.01
    assert send_gate.admit(PHONE, ALICE, "transactional").waited_s < 0.1
    assert send_gate.admit(PHONE, BOB, "campaign").waited_s < 0.2


def test_a_leased_slot_respects_the_marketing_hold_for_campaign_sends_only(
    client: redis.Redis,
) -> None:
    """A slot taken from a lease skipped the limiter's holds; the ledger claim checks the ones
    its lane must respect. A transactional send leased on a fast number to a capped recipient
    goes (the cap is not its lane's); a campaign send's holds hold that recipient until the
    hold ends, and not the others."""
    fast = LimitPolicy(
        default_rate=1000.0, overrides={}, reserve=0.1, max_wait_s=2.0, account_rate=None
    )
    limiter = RedisLimiter(client, fast)
    ledger = Ledger(client, ttl_s=3600, lease_s=10)
    try:
        limiter.hold_marketing(ALICE, 0.5)
        decision = None
        for _ in range(200):
            assert limiter.acquire(PHONE, BOB, "transactional").verdict is Verdict.GO
            decision = limiter.acquire(PHONE, ALICE, "transactional")
            assert decision.verdict is Verdict.GO  # the cap never holds transactional sends
            if decision.holds:
                break
        assert decision is not None
        assert decision.holds, "the limiter never leased a slot"
        assert decision.holds == lease_holds(PHONE, ALICE, "transactional")
        otp = ledger.claim(
            LedgerKey("acme:otp"), "me", take_over_uncertain=False, holds=decision.holds
        )
        assert otp.state == "claimed"
        campaign = lease_holds(PHONE, ALICE, "campaign")
        held = ledger.claim(
            LedgerKey("acme:offer"), "me", take_over_uncertain=False, holds=campaign
        )
        assert held.state == "held"
        assert 0.0 < held.retry_in_s <= 0.5
        other = lease_holds(PHONE, BOB, "campaign")
        claimed = ledger.claim(LedgerKey("acme:bob"), "me", take_over_uncertain=False, holds=other)
        assert claimed.state == "claimed"
        time.sleep(held.retry_in_s + 0.05)
        after = ledger.claim(
            LedgerKey("acme:offer"), "me", take_over_uncertain=False, holds=campaign
        )
        assert after.state == "claimed"
    finally:
        limiter.close()
        ledger.close()


def test_the_redis_limiter_applies_the_account_limit_like_the_memory_limiter(
    client: redis.Redis,
) -> None:
    """With RATE_LIMIT_ACCOUNT_PER_S, sends from different numbers share one spacing."""
    steps: list[Step | float] = [acquire(f"phone-{n}", ALICE, "transactional") for n in range(4)]
    steps.append(acquire("phone-9", ALICE, "campaign"))
    started = time.monotonic()
    pairs = run_side_by_side(policy(100, account_rate=5.0), client, steps)
    busy_s = time.monotonic() - started
    assert_same(pairs)
    expected = [
        (Verdict.GO, 0.0),
        (Verdict.GO, 0.2),
        (Verdict.GO, 0.4),
        (Verdict.WAIT, 0.6),
        (Verdict.WAIT, 0.6),
    ]
    assert_plan(pairs, expected, busy_s)


def test_limiter_keys_expire_so_idle_numbers_leave_nothing_behind(client: redis.Redis) -> None:
    """Every key the limiter writes has a time to live."""
    limiter = RedisLimiter(client, policy(10))
    limiter.acquire(PHONE, ALICE, "transactional")
    limiter.cool_recipient(PHONE, ALICE, 5.0)
    limiter.pause(PHONE, 5.0, campaign_only=True)
    limiter.pause(PHONE, 5.0, campaign_only=False)
    limiter.penalize(PHONE, 0.5, 5.0)
    limiter.hold_marketing(ALICE, 5.0)
    keys = client.keys("verloop:rl:*")
    assert len(keys) == 6
    for key in keys:
        assert client.pttl(key) > 0, key


def test_two_limiters_on_one_redis_never_hand_out_more_than_the_rate_together(
    client: redis.Redis,
) -> None:
    """Two limiters with four threads each get at most 20 + 1 campaign slots in 1 s at 20/s."""
    rules = policy(20)
    others = [open_redis(Settings(redis_url=REDIS_URL)) for _ in range(2)]
    limiters = [RedisLimiter(cache, rules) for cache in others]
    granted: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 1.0

    def ask(limiter: RedisLimiter) -> None:
        while time.monotonic() < deadline:
            decision = limiter.acquire(PHONE, ALICE, "campaign")
            if decision.verdict is Verdict.GO:
                with lock:
                    granted.append(time.monotonic())
            else:
                time.sleep(min(decision.wait_s, 0.01))

    threads = [threading.Thread(target=ask, args=(lim,)) for lim in limiters for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for cache in others:
        cache.close()
    # At most the rate plus the one tolerance slot: the bound that matters. At least half the
    # rate: the limiter did hand slots out (eight threads on a slow machine ask more slowly).
    assert 10 <= len(granted) <= 21


def evalsha_calls(cache: redis.Redis) -> int:
    return int(cache.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_two_processes_leasing_slots_on_a_fast_number_keep_its_pace(
    client: redis.Redis,
) -> None:
    """At 1,000/s two limiters (two processes) lease slots in batches: far fewer Redis calls
    than sends, and the sends' slot times still keep to the number's rate."""
    fast = LimitPolicy(
        default_rate=1000.0, overrides={}, reserve=0.1, max_wait_s=2.0, account_rate=None
    )
    limiters = [RedisLimiter(client, fast), RedisLimiter(client, fast)]
    times: list[float] = []
    lock = threading.Lock()
    calls_before = evalsha_calls(client)

    def sender(limiter: RedisLimiter) -> None:
        for _ in range(200):
            decision = limiter.acquire(PHONE, ALICE, "transactional")
            assert decision.verdict is Verdict.GO
            slot = time.monotonic() + decision.wait_s
            with lock:
                times.append(slot)
            time.sleep(max(0.0, slot - time.monotonic()))

    threads = [threading.Thread(target=sender, args=(lim,)) for lim in limiters for _ in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(times) == 800
    assert evalsha_calls(client) - calls_before < 800 / 4
    ordered = sorted(times)
    # Any 100 ms holds at most rate*W + reserve + 1, plus a leased slot's allowed lateness.
    busiest = max(sum(1 for t in ordered[i:] if t - start < 0.1) for i, start in enumerate(ordered))
    assert busiest <= 1000 * 0.1 + 100 + 1 + 1000 * LEASE_LATE_S
    assert ordered[-1] - ordered[0] >= 800 / 1000 * 0.8  # paced, not all at once


def test_processes_sharing_a_fast_number_lease_only_what_they_use_so_it_reaches_its_limit(
    client: redis.Redis,
) -> None:
    """Four limiters (four processes) of eight threads, each thread sending every 20 ms, ask
    for more than a 1,000/s number allows. Each process leases slots for its own pace, not the
    number's: leases sized to the number's rate were mostly dropped unused, and the number
    stayed at about half its limit (1,067 sends in these 2 s)."""
    fast = LimitPolicy(
        default_rate=1000.0, overrides={}, reserve=0.1, max_wait_s=2.0, account_rate=None
    )
    limiters = [RedisLimiter(client, fast) for _ in range(4)]
    sent: list[float] = []
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + 2.0

    def sender(limiter: RedisLimiter) -> None:
        while time.monotonic() < deadline:
            decision = limiter.acquire(PHONE, ALICE, "transactional")
            assert decision.verdict is Verdict.GO
            time.sleep(decision.wait_s)
            with lock:
                sent.append(time.monotonic())
            time.sleep(0.02)  # the call to Verloop

    threads = [threading.Thread(target=sender, args=(lim,)) for lim in limiters for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    in_time = [t for t in sent if t <= deadline]
    burst = 100 + 1 + 1000 * LEASE_LATE_S  # the reserve, one more, and leased slots' lateness
    assert len(in_time) <= 1000 * (deadline - started) + burst
    assert len(in_time) >= 0.9 * 1000 * (deadline - started)
