"""Per-number rate limits end to end: real RabbitMQ, real Redis, the simulator counting sends.

The simulator, given ``per_number_rate`` and ``enforce_limits: false``, accepts every send but
counts the ones over the limit in ``rate_limit_violations``: zero means nothing exceeded it.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    OwnRedis,
    Simulator,
    dead_letters,
    queue_depth,
    redis_client,
    wait_until,
    worker_process,
)
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.producer import Producer
from worker.runtime.app import WorkerApp

PHONE = "phone-1"
TEXT = {"type": "text", "text": {"body": "Your code is 4711"}}
CAMPAIGN = "verloop.campaign"
CAMPAIGN_QUEUES = [CAMPAIGN + suffix for suffix in ("", ".DQ", ".XQ")]
#: Sends leave at their slot times, but reach the simulator after however long the machine
#: takes to run the HTTP call: a span of arrival times can be this much shorter than the slots'.
JITTER_S = 0.25


def recipient(n: int) -> str:
    return f"+9198765{n:05d}"


def send(
    producer: Producer,
    n: int,
    *,
    key: str | None = None,
    queue: str = "verloop.send",
    phone_id: str = PHONE,
) -> str:
    return producer.send_message(
        client_id="acme",
        phone_id=phone_id,
        to=recipient(n),
        message=TEXT,
        idempotency_key=key or f"job-{n}",
        queue=queue,
    )


def pair_limit(to: str, retry_after: str) -> dict[str, Any]:
    """A scripted 131056 (pair rate limit) answer for one recipient."""
    return {
        "status": 400,
        "body": {"error": {"code": 131056, "message": "pair rate limit"}},
        "headers": {"Retry-After": retry_after},
        "to": to,
        "count": 1,
    }


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The largest number of ``times`` inside any closed window of ``window_s`` seconds."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] > window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


def received(simulator: Simulator, **filters: str) -> list[float]:
    return sorted(m["received_at"] for m in simulator.messages(**filters))


def keys_sent_once(simulator: Simulator, keys: list[str]) -> bool:
    seen = [m["idempotency_key"] for m in simulator.messages()]
    return sorted(seen) == sorted(keys)


def sent_in_log(path: Path) -> int:
    """How many jobs a worker process logged as sent (its JSON log lines)."""
    count = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("event") == "job" and entry.get("outcome") == "sent":
            count += 1
    return count


@pytest.fixture(autouse=True)
def empty_campaign_queues() -> Iterator[None]:
    """The campaign queue is not among the shared fixture's queues: empty it before and after."""

    def delete() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for queue in CAMPAIGN_QUEUES:
            channel.queue_delete(queue)
        connection.close()

    delete()
    yield
    delete()


# --- pacing ---------------------------------------------------------------------------------------
def test_two_worker_processes_sharing_redis_hold_a_number_to_its_limit(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """60 jobs at 20/s over two processes take ~3 s; no 1 s window exceeds rate + burst + 1."""
    rate, jobs = 20, 60
    # H with the default RATE_LIMIT_RESERVE of 0.1, plus the campaign lookahead's slots.
    burst = max(1, 0.1 * rate) + 0.05 * rate
    simulator.faults(per_number_rate=rate, enforce_limits=False)
    env = {"RATE_LIMIT_PER_NUMBER": str(rate)}
    with (
        worker_process(simulator, tmp_path / "a.log", "--threads", "4", **env) as first,
        worker_process(simulator, tmp_path / "b.log", "--threads", "4", **env) as second,
    ):
        for n in range(jobs):
            send(producer, n)
        wait_until(lambda: len(simulator.messages()) >= jobs, timeout=40)
        for proc in (first, second):  # stopped together, to keep the test short
            proc.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        assert second.wait(timeout=30) == 0
    sent_by = [sent_in_log(tmp_path / name) for name in ("a.log", "b.log")]
    assert min(sent_by) > 0  # both processes sent, sharing the limit
    assert sum(sent_by) == jobs
    times = received(simulator)
    stats = simulator.stats()
    assert len(times) == jobs
    assert stats["duplicates"] == 0
    ideal = (jobs - burst - 1) / rate  # the first H + 1 go at once, then one per 1/rate
    assert ideal - JITTER_S <= times[-1] - times[0] <= ideal * 3
    late = rate * JITTER_S  # sends whose arrival the machine delayed into the next window
    assert most_in_any_window(times, 1.0) <= rate * 1.0 + burst + 1 + late
    assert most_in_any_window(times, 2.0) <= rate * 2.0 + burst + 1 + late
    assert stats["rate_limit_violations"] == 0
    assert dead_letters() == []


def account_lead_s() -> float:
    """How far ahead of now the account-wide bucket is reserved, in seconds."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    try:
        seconds, micros = cache.time()
        tat = float(cache.get("verloop:rl:account:tat") or 0)
    finally:
        cache.close()
    return (tat - (seconds * 1_000_000 + micros)) / 1_000_000


def test_a_number_stays_within_its_limit_while_the_account_limit_delays_its_sends(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """With the account limit a second behind, a 5/s number's ten jobs still go at 5/s."""
    rate = 5
    simulator.faults(per_number_rate_overrides={PHONE: rate}, enforce_limits=False)
    start_worker(
        threads=48,
        rate_limit_per_number=100,
        rate_limit_overrides={PHONE: rate},
        rate_limit_account_per_s=10,  # a slow machine's in-process worker must outpace it
    )
    for n in range(40):
        send(producer, n, phone_id=f"other-{n}")
    # It peaks near 2 s, then runs down (more slowly built up on a slow machine).
    wait_until(lambda: 0.6 <= account_lead_s() <= 1.8, timeout=30, interval=0.02)
    for n in range(40, 50):
        send(producer, n)
    wait_until(lambda: len(simulator.messages(phone_id=PHONE)) >= 10, timeout=30)
    times = received(simulator, phone_id=PHONE)
    burst = max(1, 0.1 * rate) + 0.05 * rate
    assert most_in_any_window(times, 1.0) <= rate + burst + 1 + rate * JITTER_S
    assert simulator.stats()["rate_limit_violations"] == 0


def test_a_job_whose_slot_is_beyond_max_wait_is_re_delayed_and_sent_without_using_a_retry(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """At 2/s, max wait 0.3 s and no retries, four jobs are all sent once over about a second."""
    start_worker(rate_limit_per_number=2, rate_limit_max_wait_s=0.3, retry_max_retries=0)
    keys = [f"job-{n}" for n in range(4)]
    for n in range(4):
        send(producer, n)
    wait_until(lambda: len(simulator.messages()) >= 4, timeout=15)
    times = received(simulator)
    # Slots at 0, 0, 0.5 and 1.0 s; arrival times at the simulator carry scheduling jitter.
    assert times[-1] - times[0] >= 1.0 - JITTER_S
    assert keys_sent_once(simulator, keys)
    assert simulator.send_requests() == 4  # deferred jobs never called Verloop early
    assert dead_letters() == []


def test_a_deferral_neither_uses_nor_resets_the_jobs_retries(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """500, 131056, 500 with one retry allowed: dead-lettered after 2 attempts and 1 deferral."""
    simulator.script(
        {"status": 500, "count": 1}, pair_limit(recipient(0), "1"), {"status": 500, "count": 1}
    )
    start_worker(retry_max_retries=1)
    send(producer, 0)
    [(headers, body)] = wait_until(dead_letters, timeout=15)
    info = headers[DEAD_LETTER_HEADER]
    assert info["outcome"] == "gave_up"
    assert info["attempts"] == 2
    assert info["http_status"] == 500
    options = json.loads(body)["options"]
    assert options["retries"] == 1
    assert options["deferrals"] == 1
    assert simulator.send_requests() == 3
    assert simulator.messages() == []


def test_one_hot_recipient_does_not_slow_the_other_recipients_on_the_number(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """A 131056 recipient waits out Retry-After and is sent once; ten others go meanwhile."""
    hot = recipient(0)
    simulator.script(pair_limit(hot, "2"))
    start_worker(rate_limit_per_number=20, retry_max_retries=0)
    enqueued = time.time()
    for n in range(11):
        send(producer, n)
    wait_until(lambda: simulator.stats()["responses"].get("400") == 1)
    send(producer, 0, key="hot-again")  # during the cooldown: held by the limiter, not sent
    wait_until(lambda: len(simulator.messages(to=hot)) >= 2, timeout=15)
    hot_at = received(simulator, to=hot)
    others = [m["received_at"] for m in simulator.messages() if m["to"] != hot]
    assert len(others) == 10
    assert max(others) - enqueued < 2.0  # not held behind the hot recipient's cooldown
    assert min(hot_at) - enqueued >= 2.0  # the cooldown was respected by both hot jobs
    assert min(hot_at) > max(others)
    assert sorted(m["idempotency_key"] for m in simulator.messages(to=hot)) == [
        "hot-again",
        "job-0",
    ]
    assert simulator.send_requests() == 13  # one refused call, then twelve accepted
    assert simulator.stats()["responses"]["400"] == 1
    assert dead_letters() == []


def test_a_transactional_job_goes_out_promptly_while_a_campaign_saturates_the_number(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Behind a 5 s campaign backlog at 20/s, a one-time code arrives within a second."""
    rate, backlog = 20, 100
    simulator.faults(per_number_rate=rate, enforce_limits=False)
    # The backlog first: enqueueing it with a confirm each can take seconds on a slow machine.
    for n in range(backlog):
        send(producer, n, queue=CAMPAIGN, key=f"campaign-{n}")
    start_worker(threads=8, rate_limit_per_number=rate)  # 8 threads, 16 campaign jobs prefetched
    wait_until(lambda: len(simulator.messages()) >= 10)
    otp_to = recipient(999)
    still_queued = backlog - len(simulator.messages())
    enqueued = time.time()
    send(producer, 999, key="otp")
    [otp] = wait_until(lambda: simulator.messages(to=otp_to))
    assert still_queued >= rate  # at least a second of campaign was ahead of the code
    assert otp["received_at"] - enqueued < 1.0
    wait_until(lambda: len(simulator.messages()) >= backlog + 1, timeout=30)
    times = received(simulator)
    assert times[-1] - times[0] >= (backlog - 1) / rate - JITTER_S  # campaign never bursts
    assert most_in_any_window(times, 1.0) <= rate + max(1, 0.1 * rate) + 1 + rate * JITTER_S
    assert simulator.stats()["rate_limit_violations"] == 0
    assert simulator.stats()["duplicates"] == 0


def test_a_quality_answer_pauses_campaign_sends_on_that_number_only(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """After 131048 the number's campaign jobs wait QUALITY_PAUSE_S; the rest go at once."""
    simulator.script(
        {"status": 400, "body": {"error": {"code": 131048, "message": "Spam rate limit hit"}}}
    )
    start_worker(quality_pause_s=2.0, rate_limit_per_number=20)
    flagged_at = time.time()
    send(producer, 0, queue=CAMPAIGN, key="flagged")
    [(headers, _)] = wait_until(lambda: dead_letters(CAMPAIGN))
    assert headers[DEAD_LETTER_HEADER]["code"] == "131048"
    for n in range(1, 4):
        send(producer, n, queue=CAMPAIGN, key=f"campaign-{n}")
    send(producer, 10, queue=CAMPAIGN, phone_id="phone-2", key="other-number")
    enqueued = time.time()
    send(producer, 11, key="otp")
    wait_until(lambda: simulator.messages(to=recipient(11)))
    wait_until(lambda: simulator.messages(to=recipient(10)))
    [otp_at] = received(simulator, to=recipient(11))
    assert otp_at - enqueued < 1.0
    assert [m["to"] for m in simulator.messages(phone_id=PHONE)] == [recipient(11)]
    wait_until(lambda: len(simulator.messages(phone_id=PHONE)) >= 4, timeout=15)
    campaign = [m["received_at"] for m in simulator.messages(phone_id=PHONE)][1:]
    assert len(campaign) == 3
    assert min(campaign) >= flagged_at + 2.0
    assert dead_letters(CAMPAIGN) == []  # the paused jobs were deferred, not failed


def test_a_marketing_capped_recipient_s_campaign_sends_wait_while_their_otp_goes(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """131049 held a recipient for 2 s: their campaign sends from two numbers are deferred (not
    failed, no retry used) and sent once the hold ends; their one-time code and another
    recipient's campaign send go at once."""
    app = start_worker(rate_limit_per_number=20)
    capped, other = recipient(0), recipient(1)
    held_at = time.time()
    app.lifecycle.services.gate.limiter.hold_marketing(capped, 2.0)
    send(producer, 0, queue=CAMPAIGN, key="offer-1")
    send(producer, 0, queue=CAMPAIGN, phone_id="phone-2", key="offer-2")
    send(producer, 1, queue=CAMPAIGN, key="offer-other")
    send(producer, 0, key="otp")
    wait_until(lambda: simulator.messages(to=other))
    [otp] = wait_until(lambda: simulator.messages(to=capped))
    assert otp["idempotency_key"] == "otp"
    assert otp["received_at"] - held_at < 1.5
    wait_until(lambda: len(simulator.messages(to=capped)) == 3, timeout=15)
    offers = simulator.messages(to=capped)[1:]
    assert sorted(m["idempotency_key"] for m in offers) == ["offer-1", "offer-2"]
    assert min(m["received_at"] for m in offers) >= held_at + 2.0
    assert simulator.send_requests() == 4  # held, not tried and refused
    assert dead_letters(CAMPAIGN) == []


def test_a_429_slows_the_number_down_for_a_while(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """After one 429 the job is retried and sent, and the 10/s number is then paced at 5/s."""
    simulator.script({"status": 429, "headers": {"Retry-After": "0"}})
    start_worker(rate_limit_per_number=10, rate_limit_penalty_factor=0.5, rate_limit_penalty_s=20)
    send(producer, 0)
    wait_until(simulator.messages)
    assert simulator.send_requests() == 2
    cache = redis_client(REDIS_URL, decode_responses=True)
    try:
        assert float(cache.get("verloop:rl:{phone-1}:penalty") or 1) == 0.5
        assert 0 < cache.pttl("verloop:rl:{phone-1}:penalty") <= 20_000
    finally:
        cache.close()
    simulator.faults(per_number_rate=5, enforce_limits=False)
    for n in range(1, 11):
        send(producer, n)
    wait_until(lambda: len(simulator.messages()) >= 11)
    times = received(simulator)[1:]
    # 8 intervals of 0.2 s (1.6 s); unpenalized it would be 0.8 s. Midway tells them apart
    # whatever a slow machine's jitter does to the first and last arrivals.
    assert times[-1] - times[0] >= 1.2
    assert simulator.stats()["rate_limit_violations"] == 0


# --- backends -------------------------------------------------------------------------------------
def limiter_keys() -> list[str]:
    cache = redis_client(REDIS_URL, decode_responses=True)
    try:
        return sorted(cache.keys("verloop:rl:*"))
    finally:
        cache.close()


def test_the_memory_backend_paces_a_single_worker_without_redis(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """RATE_LIMIT_BACKEND=memory holds one worker to 10/s and writes no limiter keys."""
    simulator.faults(per_number_rate=10, enforce_limits=False)
    start_worker(rate_limit_backend="memory", rate_limit_per_number=10)
    for n in range(12):
        send(producer, n)
    wait_until(lambda: len(simulator.messages()) >= 12)
    times = received(simulator)
    # The first sends use the tolerance (H = 1 slot, plus 0.05 s of campaign lookahead = 0.5
    # slot), then one every 0.1 s.
    assert times[-1] - times[0] >= (12 - 1 - 1.5) * 0.1 - JITTER_S
    assert simulator.stats()["rate_limit_violations"] == 0
    assert limiter_keys() == []


def test_the_redis_backend_is_the_default(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Without RATE_LIMIT_BACKEND the number's pace is kept in Redis, with a time to live."""
    start_worker()
    send(producer, 0)
    wait_until(simulator.messages)
    assert limiter_keys() == ["verloop:rl:{phone-1}:tat"]
    cache = redis_client(REDIS_URL)
    try:
        assert cache.pttl("verloop:rl:{phone-1}:tat") > 0
    finally:
        cache.close()


# --- Redis outage ---------------------------------------------------------------------------------
def test_redis_stopped_and_restarted_mid_run_holds_sends_and_then_sends_every_job_once(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    own_redis: OwnRedis,
) -> None:
    """Nothing is sent while Redis is down; after, every job is sent once and the worker lives."""
    rate, jobs = 10, 30
    simulator.faults(per_number_rate=rate, enforce_limits=False)
    start_worker(
        redis_url=own_redis.url,
        rate_limit_per_number=rate,
        rate_limit_max_wait_s=0.5,
        retry_max_retries=0,  # a held send that used a retry would be dead-lettered
    )
    keys = [f"job-{n}" for n in range(jobs)]
    for n in range(jobs):
        send(producer, n)
    wait_until(lambda: len(simulator.messages()) >= 5)
    own_redis.kill()
    time.sleep(1.0)  # sends already given a slot (at most max wait away) may still go out
    held, calls = len(simulator.messages()), simulator.send_requests()
    time.sleep(2.0)
    assert simulator.send_requests() == calls  # no call to Verloop without the limiter
    assert len(simulator.messages()) == held
    assert held < jobs
    own_redis.start()
    wait_until(lambda: len(simulator.messages()) >= jobs, timeout=20)
    assert keys_sent_once(simulator, keys)
    stats = simulator.stats()
    assert stats["duplicates"] == 0
    assert stats["rate_limit_violations"] == 0
    assert dead_letters() == []
    send(producer, jobs, key="after-the-outage")
    wait_until(lambda: simulator.messages(to=recipient(jobs)))
    assert queue_depth("verloop.send") == 0


def test_a_job_for_a_new_number_enqueued_while_redis_is_down_is_sent_once_it_is_back(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    own_redis: OwnRedis,
) -> None:
    """A job for an uncached number enqueued during a Redis outage is sent once Redis is back."""
    start_worker(redis_url=own_redis.url)
    send(producer, 0)
    wait_until(simulator.messages)
    own_redis.kill()
    send(producer, 1, phone_id="phone-2")
    time.sleep(2.0)
    assert simulator.messages(phone_id="phone-2") == []
    own_redis.start()
    letters: list[tuple[dict[str, Any], bytes]] = []

    def settled() -> bool:
        letters.extend(dead_letters())
        return bool(letters or simulator.messages(phone_id="phone-2"))

    wait_until(settled, timeout=15)
    assert letters == []
    assert len(simulator.messages(phone_id="phone-2")) == 1


def test_redis_going_down_between_a_rejected_token_and_its_refresh_holds_the_job(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    own_redis: OwnRedis,
) -> None:
    """A 401 arrives while Redis is down: the refresh cannot reach the token cache, so the job
    is held (no retry used) and sent once Redis is back."""
    start_worker(redis_url=own_redis.url, retry_max_retries=0, ledger_lease_s=1.0)
    send(producer, 0)  # caches the number's token
    wait_until(simulator.messages)
    simulator.revoke_phone_token("acme", PHONE)  # the cached token is now refused
    simulator.faults(latency_ms=1500)
    send(producer, 1, key="refresh-during-outage")
    wait_until(lambda: simulator.stats()["in_flight"] >= 1)
    own_redis.kill()  # the 401 comes back after this; the refresh finds Redis down
    time.sleep(2.0)
    assert simulator.messages(to=recipient(1)) == []
    simulator.faults(latency_ms=0)
    own_redis.start()
    [record] = wait_until(lambda: simulator.messages(to=recipient(1)), timeout=20)
    assert record["idempotency_key"] == "refresh-during-outage"
    assert simulator.stats()["responses"]["401"] == 1  # the stale token was refused once
    assert dead_letters() == []  # held, not failed: with no retries allowed, a retry would be
