"""Unit tests for worker.limits: the pacing algorithm in memory, the send gate, and settings."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace

import pytest
import redis

from worker.errors import ConfigurationError, Deferred, JobFailure
from worker.limits import (
    Decision,
    LimitPolicy,
    MemoryLimiter,
    RedisLimiter,
    Verdict,
    pacing,
)
from worker.runtime.services import open_limiter, open_redis
from worker.send.gate import PAIR_COOLDOWN_S, REDIS_DOWN_RETRY_S, GateSettings, SendGate
from worker.settings import MAX_SINGLE_DELAY_S, Settings
from worker.verloop.classify import classify_response

PHONE = "phone-1"
OTHER_PHONE = "phone-2"
ALICE = "+919876543210"
BOB = "+919876543211"

GO = Verdict.GO
WAIT = Verdict.WAIT


class FakeClock:
    """Stands in for ``time`` inside worker.limits.pacing, so decisions are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The memory limiter's clock, moved only by the test."""
    fake = FakeClock()
    monkeypatch.setattr(pacing, "time", fake)
    return fake


def policy(
    rate: float = 10.0,
    *,
    reserve: float = 0.1,
    max_wait_s: float = 0.45,
    overrides: dict[str, float] | None = None,
    account_rate: float | None = None,
) -> LimitPolicy:
    return LimitPolicy(
        default_rate=rate,
        overrides=overrides or {},
        reserve=reserve,
        max_wait_s=max_wait_s,
        account_rate=account_rate,
    )


def is_go(decision: Decision, wait_s: float = 0.0) -> bool:
    return decision.verdict is GO and decision.wait_s == pytest.approx(wait_s, abs=1e-9)


def is_wait(decision: Decision, wait_s: float) -> bool:
    return decision.verdict is WAIT and decision.wait_s == pytest.approx(wait_s, abs=1e-9)


# --- the bucket -----------------------------------------------------------------------------------
def test_the_first_send_on_a_number_goes_at_once_in_both_lanes(clock: FakeClock) -> None:
    """An idle number has a free slot now, for transactional and campaign sends alike."""
    limiter = MemoryLimiter(policy())
    assert is_go(limiter.acquire(PHONE, ALICE, "transactional"))
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "campaign"))


def test_transactional_sends_reserve_slots_one_interval_apart_after_the_reserve_burst(
    clock: FakeClock,
) -> None:
    """At 10/s with a reserve of one: two go now, then each waits 0.1 s more, up to max wait."""
    limiter = MemoryLimiter(policy(10, max_wait_s=0.45))
    decisions = [limiter.acquire(PHONE, ALICE, "transactional") for _ in range(7)]
    waits = [0.0, 0.0, 0.1, 0.2, 0.3, 0.4]
    assert all(is_go(d, w) for d, w in zip(decisions, waits, strict=False))
    assert is_wait(decisions[6], 0.5)


def test_a_slot_beyond_max_wait_is_refused_and_nothing_is_reserved(clock: FakeClock) -> None:
    """WAIT takes no slot: asking again gives the same answer, and the slot is still free later."""
    limiter = MemoryLimiter(policy(10, max_wait_s=0.45))
    for _ in range(6):
        limiter.acquire(PHONE, ALICE, "transactional")
    assert is_wait(limiter.acquire(PHONE, ALICE, "transactional"), 0.5)
    assert is_wait(limiter.acquire(PHONE, ALICE, "transactional"), 0.5)
    clock.advance(0.1)
    assert is_go(limiter.acquire(PHONE, ALICE, "transactional"), 0.4)


def test_campaign_sends_never_reserve_a_slot_ahead(clock: FakeClock) -> None:
    """A campaign send takes only a slot free now; otherwise it is told how long until one is."""
    limiter = MemoryLimiter(policy(10))
    assert is_go(limiter.acquire(PHONE, ALICE, "campaign"))
    for _ in range(5):
        assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.1)
    clock.advance(0.1)
    assert is_go(limiter.acquire(PHONE, ALICE, "campaign"))
    clock.advance(0.04)
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.06)


def test_a_transactional_send_finds_the_reserve_free_while_a_campaign_saturates_the_number(
    clock: FakeClock,
) -> None:
    """At 20/s after a second of campaign, H = 2 transactional sends go at once; campaign waits."""
    limiter = MemoryLimiter(policy(20, reserve=0.1))
    started = clock.now
    campaign_sent = 0
    while campaign_sent < 20:
        decision = limiter.acquire(PHONE, ALICE, "campaign")
        if decision.verdict is GO:
            assert decision.wait_s == 0
            campaign_sent += 1
        else:
            assert 0 < decision.wait_s <= 0.05 + 1e-9
            clock.advance(decision.wait_s + 1e-6)
    assert clock.now - started == pytest.approx(0.95, abs=1e-3)  # 20 sends, 50 ms apart
    assert is_go(limiter.acquire(PHONE, BOB, "transactional"))
    assert is_go(limiter.acquire(PHONE, BOB, "transactional"))
    assert is_go(limiter.acquire(PHONE, BOB, "transactional"), 0.05)
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.2)


def test_the_reserve_is_a_share_of_the_rate_and_at_least_one_message() -> None:
    """H = max(1, RATE_LIMIT_RESERVE * rate) for transactional sends; campaign sends have none."""
    rules = policy(5, reserve=0.1, overrides={"fast": 100})
    assert rules.tolerance_slots(PHONE, "transactional") == 1
    assert rules.tolerance_slots("fast", "transactional") == pytest.approx(10)
    assert rules.tolerance_slots("fast", "campaign") == 0
    assert policy(5, reserve=0).tolerance_slots(PHONE, "transactional") == 1
    # A campaign lookahead extends the transactional tolerance by as many slots.
    ahead = replace(rules, campaign_lookahead_s=0.05)
    assert ahead.tolerance_slots("fast", "transactional") == pytest.approx(10 + 0.05 * 100)
    assert ahead.tolerance_slots("fast", "campaign") == 0
    assert ahead.max_wait_for("campaign") == 0.05
    assert ahead.max_wait_for("transactional") == rules.max_wait_s


def test_a_larger_reserve_lets_h_plus_one_transactional_sends_go_at_once(
    clock: FakeClock,
) -> None:
    """At 100/s with a 10% reserve, 11 sends go now and the 12th waits one interval."""
    limiter = MemoryLimiter(policy(100, reserve=0.1))
    decisions = [limiter.acquire(PHONE, ALICE, "transactional") for _ in range(12)]
    assert all(is_go(d) for d in decisions[:11])
    assert is_go(decisions[11], 0.01)


def test_a_number_override_sets_that_numbers_rate_only(clock: FakeClock) -> None:
    """RATE_LIMIT_OVERRIDES gives one number 50/s while the others keep the default 10/s."""
    limiter = MemoryLimiter(policy(10, overrides={"fast": 50}))
    limiter.acquire("fast", ALICE, "campaign")
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire("fast", ALICE, "campaign"), 0.02)
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.1)


def test_numbers_are_paced_independently(clock: FakeClock) -> None:
    """A saturated number does not hold back another one."""
    limiter = MemoryLimiter(policy(10))
    limiter.acquire(PHONE, ALICE, "campaign")
    assert limiter.acquire(PHONE, ALICE, "campaign").verdict is WAIT
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "campaign"))


def test_the_account_wide_limit_spaces_sends_across_numbers_without_a_burst(
    clock: FakeClock,
) -> None:
    """With an account limit of 5/s, sends from different numbers are 0.2 s apart."""
    limiter = MemoryLimiter(policy(100, account_rate=5, max_wait_s=0.45))
    assert is_go(limiter.acquire(PHONE, ALICE, "transactional"))
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "transactional"), 0.2)
    assert is_go(limiter.acquire("phone-3", ALICE, "transactional"), 0.4)
    assert is_wait(limiter.acquire("phone-4", ALICE, "transactional"), 0.6)
    assert is_wait(limiter.acquire("phone-5", ALICE, "campaign"), 0.6)
    clock.advance(0.61)
    assert is_go(limiter.acquire("phone-5", ALICE, "campaign"))


def most_in_any_window(times: list[float], window_s: float) -> int:
    ordered = sorted(times)
    return max(
        sum(1 for t in ordered[i:] if t - start <= window_s + 1e-9)
        for i, start in enumerate(ordered)
    )


def test_a_number_stays_within_its_limit_when_the_account_limit_delays_its_sends(
    clock: FakeClock,
) -> None:
    """With the account bucket a second ahead, a 10/s number still sends <= rate*W + H + 1."""
    limiter = MemoryLimiter(policy(10, account_rate=100, max_wait_s=2.0))
    for n in range(100):  # other numbers' sends fill the account bucket for the next second
        assert limiter.acquire(f"other-{n}", ALICE, "transactional").verdict is GO
    sends = []
    for _ in range(15):
        decision = limiter.acquire(PHONE, ALICE, "transactional")
        if decision.verdict is GO:
            sends.append(clock.now + decision.wait_s)
    # Paced at the number's 10/s behind the account's second: the last ones are further than
    # the 2 s bound and would be re-delayed.
    assert 10 <= len(sends) < 15
    assert most_in_any_window(sends, 1.0) <= 10 * 1.0 + 1 + 1
    assert most_in_any_window(sends, 0.2) <= 10 * 0.2 + 1 + 1


# --- holds ----------------------------------------------------------------------------------------
def test_a_cooling_recipient_is_held_while_others_on_the_number_are_not(clock: FakeClock) -> None:
    """131056 holds one (number, recipient) pair; its held asks reserve nothing."""
    limiter = MemoryLimiter(policy(10))
    limiter.cool_recipient(PHONE, ALICE, 2.0)
    for _ in range(5):
        decision = limiter.acquire(PHONE, ALICE, "transactional")
        assert decision.verdict is Verdict.RECIPIENT_COOLING
        assert decision.wait_s == pytest.approx(2.0)
    assert is_go(limiter.acquire(PHONE, BOB, "transactional"))
    assert is_go(limiter.acquire(PHONE, BOB, "transactional"))
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "transactional"))
    clock.advance(2.0)
    assert limiter.acquire(PHONE, ALICE, "transactional").verdict is GO


def test_holds_only_ever_lengthen(clock: FakeClock) -> None:
    """A shorter hold given later does not shorten a longer one already in force."""
    limiter = MemoryLimiter(policy())
    limiter.cool_recipient(PHONE, ALICE, 5.0)
    limiter.cool_recipient(PHONE, ALICE, 1.0)
    assert limiter.acquire(PHONE, ALICE, "transactional").wait_s == pytest.approx(5.0)
    limiter.pause(PHONE, 3.0, campaign_only=False)
    limiter.pause(PHONE, 1.0, campaign_only=False)
    assert limiter.acquire(PHONE, BOB, "campaign") == Decision(Verdict.NUMBER_PAUSED, 3.0)


def test_a_paused_number_holds_both_lanes(clock: FakeClock) -> None:
    """131057 (maintenance) pauses transactional and campaign sends on that number only."""
    limiter = MemoryLimiter(policy())
    limiter.pause(PHONE, 60.0, campaign_only=False)
    assert limiter.acquire(PHONE, ALICE, "transactional") == Decision(Verdict.NUMBER_PAUSED, 60.0)
    assert limiter.acquire(PHONE, ALICE, "campaign") == Decision(Verdict.NUMBER_PAUSED, 60.0)
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "campaign"))
    clock.advance(60.0)
    assert is_go(limiter.acquire(PHONE, ALICE, "campaign"))


def test_a_quality_pause_holds_only_campaign_sends(clock: FakeClock) -> None:
    """131048 pauses the number's campaign lane; its transactional sends still go."""
    limiter = MemoryLimiter(policy())
    limiter.pause(PHONE, 30.0, campaign_only=True)
    assert limiter.acquire(PHONE, ALICE, "campaign") == Decision(Verdict.CAMPAIGN_PAUSED, 30.0)
    assert is_go(limiter.acquire(PHONE, ALICE, "transactional"))
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "campaign"))
    clock.advance(30.0)
    assert is_go(limiter.acquire(PHONE, ALICE, "campaign"))


def test_a_marketing_capped_recipient_is_held_for_campaign_sends_from_every_number(
    clock: FakeClock,
) -> None:
    """131049 holds one recipient's campaign sends, whichever number sends them; their
    transactional sends and other recipients' campaign sends go, and held asks reserve
    nothing (the next campaign send on the number goes at once)."""
    limiter = MemoryLimiter(policy())
    limiter.hold_marketing(ALICE, 3600.0)
    for phone in (PHONE, OTHER_PHONE, "phone-3"):
        assert limiter.acquire(phone, ALICE, "campaign") == Decision(
            Verdict.RECIPIENT_CAPPED, 3600.0
        )
    assert is_go(limiter.acquire(PHONE, BOB, "campaign"))
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "transactional"))
    clock.advance(1800.0)
    assert limiter.acquire(PHONE, ALICE, "campaign") == Decision(Verdict.RECIPIENT_CAPPED, 1800.0)
    clock.advance(1800.0)
    assert is_go(limiter.acquire(PHONE, ALICE, "campaign"))


def test_a_marketing_hold_only_ever_lengthens(clock: FakeClock) -> None:
    """A shorter marketing hold given later (a second 131049 status) leaves the longer one."""
    limiter = MemoryLimiter(policy())
    limiter.hold_marketing(ALICE, 100.0)
    limiter.hold_marketing(ALICE, 10.0)
    assert limiter.acquire(PHONE, ALICE, "campaign").wait_s == pytest.approx(100.0)
    limiter.hold_marketing(ALICE, 200.0)
    assert limiter.acquire(PHONE, ALICE, "campaign").wait_s == pytest.approx(200.0)


# --- penalties ------------------------------------------------------------------------------------
def test_a_penalty_lowers_the_numbers_rate_for_its_duration(clock: FakeClock) -> None:
    """After penalize(0.5, 5 s) a 10/s number is paced at 5/s, and at 10/s once it lapses."""
    limiter = MemoryLimiter(policy(10))
    limiter.penalize(PHONE, 0.5, 5.0)
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.2)
    assert is_go(limiter.acquire(OTHER_PHONE, ALICE, "campaign"))
    clock.advance(5.1)
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.1)


def test_penalties_stack_while_they_last_down_to_a_floor(clock: FakeClock) -> None:
    """Repeated penalties multiply, but the rate never drops below a tenth of the limit."""
    limiter = MemoryLimiter(policy(10))
    limiter.penalize(PHONE, 0.5, 10.0)
    limiter.penalize(PHONE, 0.5, 10.0)
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.4)
    for _ in range(5):
        limiter.penalize(PHONE, 0.5, 10.0)
    clock.advance(0.4)
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 1.0)


def test_a_lapsed_penalty_does_not_stack_with_a_new_one(clock: FakeClock) -> None:
    """A new penalty after the old one expired starts again from the full rate."""
    limiter = MemoryLimiter(policy(10))
    limiter.penalize(PHONE, 0.5, 1.0)
    clock.advance(2.0)
    limiter.penalize(PHONE, 0.5, 1.0)
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.2)


def test_a_penalty_keeps_the_transactional_reserve_in_messages(clock: FakeClock) -> None:
    """Penalized to 5/s, a number still lets H + 1 = 2 transactional sends go at once."""
    limiter = MemoryLimiter(policy(10))
    limiter.penalize(PHONE, 0.5, 10.0)
    decisions = [limiter.acquire(PHONE, ALICE, "transactional") for _ in range(3)]
    assert is_go(decisions[0])
    assert is_go(decisions[1])
    assert is_go(decisions[2], 0.2)


# --- the gate -------------------------------------------------------------------------------------
def gate(limiter: MemoryLimiter | RedisLimiter, max_wait_s: float = 0.45) -> SendGate:
    return SendGate(
        limiter,
        GateSettings(max_wait_s=max_wait_s, penalty_factor=0.5, penalty_s=30.0, quality_pause_s=60),
    )


def test_the_gate_sleeps_until_a_reserved_slot_and_says_how_long() -> None:
    """At 10/s the third transactional send in a row is admitted about 100 ms later."""
    send_gate = gate(MemoryLimiter(policy(10)))
    started = time.monotonic()
    waits = [send_gate.admit(PHONE, ALICE, "transactional").waited_s for _ in range(3)]
    assert waits[0] < 0.01
    assert waits[1] < 0.01
    assert 0.09 <= waits[2] < 0.5
    assert time.monotonic() - started >= 0.09


def test_the_gate_lets_a_campaign_send_wait_for_a_free_slot_within_max_wait() -> None:
    """A campaign send told WAIT 50 ms looks again after that and is admitted."""
    send_gate = gate(MemoryLimiter(policy(20)))
    send_gate.admit(PHONE, ALICE, "campaign")
    assert 0.04 <= send_gate.admit(PHONE, ALICE, "campaign").waited_s < 0.5


def test_the_gate_defers_a_send_whose_slot_is_beyond_max_wait_without_sleeping() -> None:
    """At 1/s with max wait 0.2 s, the third send is re-delayed about a second, at once."""
    send_gate = gate(MemoryLimiter(policy(1, max_wait_s=0.2)), max_wait_s=0.2)
    send_gate.admit(PHONE, ALICE, "transactional")
    send_gate.admit(PHONE, ALICE, "transactional")
    started = time.monotonic()
    with pytest.raises(Deferred) as info:
        send_gate.admit(PHONE, ALICE, "transactional")
    assert time.monotonic() - started < 0.1
    assert 0.9 <= info.value.delay_s <= 1.5
    assert "rate limit" in info.value.reason


def test_the_gate_defers_a_held_recipient_for_the_rest_of_its_cooldown() -> None:
    """A recipient cooling for 3 s is re-delayed about 3 s, with the 131056 reason."""
    limiter = MemoryLimiter(policy())
    limiter.cool_recipient(PHONE, ALICE, 3.0)
    with pytest.raises(Deferred) as info:
        gate(limiter).admit(PHONE, ALICE, "transactional")
    assert 2.9 <= info.value.delay_s <= 3.8
    assert "131056" in info.value.reason


def test_the_gate_defers_a_capped_recipient_s_campaign_send_and_admits_its_transactional_one() -> (
    None
):
    """A recipient at WhatsApp's marketing cap: their campaign send is re-delayed (no retry
    used) with its own kind and the 131049 reason, at most MAX_SINGLE_DELAY_S; an OTP to them
    is admitted."""
    limiter = MemoryLimiter(policy())
    limiter.hold_marketing(ALICE, 86_400.0)
    send_gate = gate(limiter)
    started = time.monotonic()
    with pytest.raises(Deferred) as info:
        send_gate.admit(PHONE, ALICE, "campaign")
    assert time.monotonic() - started < 0.1
    assert info.value.kind == "recipient_capped"
    assert info.value.reason == (
        "recipient reached WhatsApp's marketing message cap (131049); campaign sends to them wait"
    )
    assert info.value.delay_s == MAX_SINGLE_DELAY_S
    assert send_gate.admit(PHONE, ALICE, "transactional").waited_s < 0.1
    assert send_gate.admit(OTHER_PHONE, BOB, "campaign").waited_s < 0.1


def test_the_gate_holds_sends_when_the_limiter_cannot_be_reached() -> None:
    """Redis refusing connections: the send is re-delayed at once, never admitted."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = open_redis(Settings(redis_url=f"redis://127.0.0.1:{port}/0"))
    started = time.monotonic()
    try:
        with pytest.raises(Deferred) as info:
            gate(RedisLimiter(client, policy())).admit(PHONE, ALICE, "transactional")
    finally:
        client.close()
    assert time.monotonic() - started < 1.0
    assert REDIS_DOWN_RETRY_S <= info.value.delay_s <= REDIS_DOWN_RETRY_S * 1.25
    assert "held, not sent" in info.value.reason


def failure(status: int, code: int | None = None, retry_after: str | None = None) -> JobFailure:
    body = {} if code is None else {"error": {"code": code, "message": "limit"}}
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return classify_response(status, json.dumps(body).encode(), headers, what="send_message")


def test_a_pair_rate_limit_answer_cools_that_recipient_and_defers_the_job(
    clock: FakeClock,
) -> None:
    """131056 with Retry-After: 3 holds that recipient 3 s and re-delays the job 3 s."""
    limiter = MemoryLimiter(policy())
    with pytest.raises(Deferred) as info:
        gate(limiter).react(PHONE, ALICE, "transactional", failure(400, 131056, "3"))
    assert info.value.delay_s == 3.0
    assert limiter.acquire(PHONE, ALICE, "transactional") == Decision(
        Verdict.RECIPIENT_COOLING, 3.0
    )
    assert is_go(limiter.acquire(PHONE, BOB, "transactional"))


def test_a_pair_rate_limit_answer_without_retry_after_uses_the_default_cooldown(
    clock: FakeClock,
) -> None:
    """131056 alone cools the recipient for the default pair cooldown."""
    limiter = MemoryLimiter(policy())
    with pytest.raises(Deferred) as info:
        gate(limiter).react(PHONE, ALICE, "campaign", failure(400, 131056))
    assert info.value.delay_s == PAIR_COOLDOWN_S
    assert limiter.acquire(PHONE, ALICE, "campaign").wait_s == pytest.approx(PAIR_COOLDOWN_S)


def test_a_maintenance_answer_pauses_the_whole_number(clock: FakeClock) -> None:
    """131057 pauses every send on the number and re-delays the job."""
    limiter = MemoryLimiter(policy())
    with pytest.raises(Deferred):
        gate(limiter).react(PHONE, ALICE, "transactional", failure(400, 131057, "7"))
    assert limiter.acquire(PHONE, BOB, "transactional") == Decision(Verdict.NUMBER_PAUSED, 7.0)


@pytest.mark.parametrize(
    ("status", "code"), [(429, 130429), (400, 130429), (429, None)], ids=["429", "130429", "bare"]
)
def test_a_throughput_answer_slows_the_number_without_deferring(
    clock: FakeClock, status: int, code: int | None
) -> None:
    """429/130429 halves the number's rate; the failure itself stays a (retried) failure."""
    limiter = MemoryLimiter(policy(10))
    gate(limiter).react(PHONE, ALICE, "transactional", failure(status, code))
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.2)


def test_a_quality_answer_pauses_campaign_sends_on_the_number(clock: FakeClock) -> None:
    """131048 pauses the number's campaign lane for QUALITY_PAUSE_S; transactional still goes."""
    limiter = MemoryLimiter(policy())
    gate(limiter).react(PHONE, ALICE, "campaign", failure(400, 131048))
    assert limiter.acquire(PHONE, BOB, "campaign") == Decision(Verdict.CAMPAIGN_PAUSED, 60.0)
    assert is_go(limiter.acquire(PHONE, BOB, "transactional"))


def test_an_ordinary_failure_teaches_the_limiter_nothing(clock: FakeClock) -> None:
    """A 500 leaves the number's pace and holds as they were."""
    limiter = MemoryLimiter(policy(10))
    gate(limiter).react(PHONE, ALICE, "campaign", failure(500))
    limiter.acquire(PHONE, ALICE, "campaign")
    assert is_wait(limiter.acquire(PHONE, ALICE, "campaign"), 0.1)


# --- settings -------------------------------------------------------------------------------------
@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting from the real environment leaks into these tests."""
    for name in [*Settings.model_fields, "verloop_worker_env_file"]:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_default_backend_is_redis_and_memory_is_chosen_explicitly(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    """Without RATE_LIMIT_BACKEND the fleet-wide Redis limiter is used; =memory picks memory."""
    client = redis.Redis()  # never connected: building the limiter needs no Redis
    try:
        settings = Settings.load()
        assert settings.rate_limit_backend == "redis"
        assert isinstance(open_limiter(settings, client), RedisLimiter)
        clean_environment.setenv("RATE_LIMIT_BACKEND", "memory")
        assert isinstance(open_limiter(Settings.load(), client), MemoryLimiter)
    finally:
        client.close()


def test_rate_limit_settings_reach_the_limiter_policy(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    """RATE_LIMIT_* from the environment become the limiter's rates, reserve and max wait."""
    clean_environment.setenv("RATE_LIMIT_BACKEND", "memory")
    clean_environment.setenv("RATE_LIMIT_PER_NUMBER", "20")
    clean_environment.setenv("RATE_LIMIT_OVERRIDES", '{"phone-9": 1000}')
    clean_environment.setenv("RATE_LIMIT_RESERVE", "0.25")
    clean_environment.setenv("RATE_LIMIT_MAX_WAIT_S", "1.5")
    clean_environment.setenv("RATE_LIMIT_ACCOUNT_PER_S", "500")
    client = redis.Redis()
    try:
        rules = open_limiter(Settings.load(), client).policy  # type: ignore[attr-defined]
    finally:
        client.close()
    assert rules == LimitPolicy(
        default_rate=20,
        overrides={"phone-9": 1000},
        reserve=0.25,
        max_wait_s=1.5,
        account_rate=500,
        campaign_lookahead_s=0.05,
    )


@pytest.mark.parametrize("rate", ["-5", "0", "20000"])
def test_an_override_rate_out_of_range_is_a_configuration_error(
    clean_environment: pytest.MonkeyPatch, rate: str
) -> None:
    """A negative, zero or absurd per-number rate stops the worker at start, naming the number."""
    clean_environment.setenv("RATE_LIMIT_OVERRIDES", f'{{"phone-1": 20, "phone-7": {rate}}}')
    with pytest.raises(ConfigurationError) as info:
        Settings.load()
    message = str(info.value)
    assert "RATE_LIMIT_OVERRIDES" in message
    assert "phone-7" in message
    assert "phone-1" not in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RATE_LIMIT_BACKEND", "memcached"),
        ("RATE_LIMIT_PER_NUMBER", "-1"),
        ("RATE_LIMIT_RESERVE", "0.9"),
        ("RATE_LIMIT_MAX_WAIT_S", "0"),
        ("RATE_LIMIT_PENALTY_FACTOR", "1.5"),
        ("RATE_LIMIT_OVERRIDES", "[80]"),
    ],
)
def test_an_invalid_rate_limit_setting_is_a_configuration_error(
    clean_environment: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Each bad RATE_LIMIT_* value is refused at start with the setting's name."""
    clean_environment.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        Settings.load()
