"""A job can only ever hurt itself: what a careless or hostile producer sends never makes the
worker message anyone twice, stall other jobs or their events, or lose a worker thread."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from dramatiq import Worker
from dramatiq.middleware import Middleware

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    Simulator,
    dead_letters,
    queue_depth,
    redis_client,
    wait_until,
)
from tests.integration.test_invalid_jobs import GOOD_KWARGS, publish_raw
from tests.integration.test_ledger_and_events import Events, send
from worker.commands.main import cli
from worker.connections.redis_keys import join_parts
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.finish.outbox import PARKED_STREAM, STREAM, OutboxRelay
from worker.jobs.producer import Producer
from worker.limits import LimitPolicy, RedisLimiter, Verdict
from worker.runtime.app import WorkerApp, create_app
from worker.runtime.health import HEALTH_DIR_ENV, ThreadWatch
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings

TEXT = {"type": "text", "text": {"body": "hello"}}


@pytest.fixture
def events() -> Iterator[Events]:
    """A subscriber to every outcome event."""
    subscriber = Events()
    yield subscriber
    subscriber.close()


def job(queue: str = "verloop.send", **fields: Any) -> bytes:
    """A send_message envelope: GOOD_KWARGS changed by ``kwargs``, other top-level ``fields``."""
    kwargs = {**GOOD_KWARGS, **fields.pop("kwargs", {})}
    envelope = {"actor_name": "send_message", "queue_name": queue, "kwargs": kwargs, **fields}
    envelope.setdefault("message_id", str(uuid.uuid4()))
    return json.dumps(envelope).encode()


def thread_watch(app: WorkerApp) -> ThreadWatch:
    return next(m for m in app.broker.middleware if isinstance(m, ThreadWatch))


# --- duplicates -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ('{"order": 12345678901234567890123}', "metadata.order: an integer of 23 digits"),
        ('{"a": ' + "[" * 300 + "1" + "]" * 300 + "}", "nested more than 32 levels deep"),
    ],
    ids=["integer-over-64-bits", "nested-300-deep"],
)
def test_metadata_the_event_cannot_carry_is_refused_before_sending_not_sent_again_and_again(
    simulator: Simulator,
    start_worker: Callable[..., WorkerApp],
    events: Events,
    metadata: str,
    reason: str,
) -> None:
    """These jobs used to be sent, then fail while their outcome event was built, and be
    retried: the recipient got the message six or seven times."""
    start_worker()
    body = job().replace(b'"kwargs": {', b'"kwargs": {"metadata": ' + metadata.encode() + b", ")
    publish_raw([body])
    [(headers, kept)] = wait_until(dead_letters)
    assert json.loads(kept)["kwargs"] == json.loads(body)["kwargs"]  # the job as it came
    info = headers[DEAD_LETTER_HEADER]
    assert info["outcome"] == "invalid"
    assert reason in info["reason"]
    [(key, event)] = events.wait_for(1)
    assert key == "send.dead_lettered.acme.phone-1.none"
    assert "metadata" not in event  # what could not be encoded is not in the event either
    time.sleep(0.5)
    assert simulator.send_requests() == 0
    assert dead_letters() == []


def test_after_verloop_accepted_a_message_a_refused_outbox_write_never_sends_it_again(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
) -> None:
    """Sent is sent: the outbox stream is not a stream (WRONGTYPE), so the event cannot go
    with the ledger record. The record stands, the job is acknowledged once, the event is
    published directly instead, and the failure is counted in the job's log line."""
    cache = redis_client(REDIS_URL)
    cache.set(STREAM, "not a stream")
    start_worker(threads=1)
    send(producer, idempotency_key="after-send-1")
    [(key, event)] = events.wait_for(1)
    assert key == "send.sent.acme.phone-1.none"
    [record] = simulator.messages()
    assert event["verloop_message_id"] == record["id"]
    recorded = cache.get("verloop:ledger:key:4:acme:12:after-send-1")
    assert recorded == b"s:" + record["id"].encode()
    time.sleep(1.0)
    assert len(simulator.messages()) == 1
    assert queue_depth("verloop.send") == 0
    assert dead_letters() == []


# --- ambiguous answers --------------------------------------------------------------------------
def _campaign_job(producer: Producer, to: str) -> None:
    producer.enqueue(
        "send_message",
        {
            "client_id": "acme",
            "phone_id": "phone-1",
            "to": to,
            "message": TEXT,
            "campaign_id": "ambiguous",
        },
        queue="verloop.campaign",
    )


@pytest.mark.parametrize("after_accept", ["drop", "hang"])
def test_a_campaign_send_with_no_answer_is_dead_lettered_as_outcome_unknown_not_resent(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    after_accept: str,
) -> None:
    """Verloop took the message and the answer never came (the connection dropped, or the read
    timed out). Retrying would message the customer twice: by_lane dead-letters a campaign
    send as "outcome unknown", and the ledger keeps it from going out again."""
    simulator.faults(timeout_s=30)
    simulator.script({"after_accept": after_accept, "count": 1})
    start_worker(verloop_timeout_s=1.0)
    _campaign_job(producer, "+919876543210")
    [(headers, _)] = wait_until(lambda: dead_letters("verloop.campaign"), timeout=20)
    info = headers[DEAD_LETTER_HEADER]
    assert info["reason"].startswith("outcome unknown")
    assert "--resend-uncertain" in info["reason"]
    assert info["attempts"] == 1
    assert len(simulator.messages()) == 1
    # The same recipient enqueued again is not sent either: the ledger entry is uncertain.
    _campaign_job(producer, "+919876543210")
    wait_until(lambda: dead_letters("verloop.campaign"))
    assert len(simulator.messages()) == 1
    entry = Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=10).lookup(
        LedgerKey("campaign:" + join_parts("acme", "ambiguous", "+919876543210"))
    )
    assert entry.state == "pending"


def test_a_transactional_send_with_no_answer_is_resent_under_by_lane(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
) -> None:
    """A one-time password twice beats none: the transactional lane takes the uncertain claim
    over and sends again, with the same Idempotency-Key header."""
    simulator.script({"after_accept": "drop", "count": 1})
    start_worker(verloop_timeout_s=1.0)
    send(producer, idempotency_key="otp-ambiguous")
    [(key, event)] = events.wait_for(1)
    assert key.startswith("send.sent.")
    assert event["attempt"] == 2
    messages = simulator.messages()
    assert [m["idempotency_key"] for m in messages] == ["otp-ambiguous"] * 2


def test_with_the_dead_letter_policy_a_send_with_no_answer_is_not_resent(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    simulator.script({"after_accept": "drop", "count": 1})
    start_worker(verloop_timeout_s=1.0, uncertain_send_policy="dead_letter")
    send(producer, idempotency_key="otp-once")
    [(headers, _)] = wait_until(dead_letters)
    assert headers[DEAD_LETTER_HEADER]["reason"].startswith("outcome unknown")
    time.sleep(0.5)
    assert len(simulator.messages()) == 1


# --- threads --------------------------------------------------------------------------------------
def test_options_that_change_how_the_worker_runs_a_job_are_refused_and_no_thread_dies(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """options.throws on a job that fails validation used to kill the worker thread that ran
    it, acknowledging the job with no dead letter, log line or event. time_limit interrupted a
    send halfway (and the job was sent again)."""
    app = start_worker(threads=2)
    bodies = [
        job(options={"throws": 1}, kwargs={"to": "not a number"}),
        job(options={"throws": 1}),
        job(options={"time_limit": 1}),
        job(options={"max_retries": 10**6}),
        job(options={"broker_priority": 2**70}),
    ]
    publish_raw(bodies)
    letters: list[tuple[dict[str, Any], bytes]] = []
    wait_until(lambda: letters.extend(dead_letters()) or len(letters) == len(bodies))
    for headers, _ in letters:
        assert "not accepted" in headers[DEAD_LETTER_HEADER]["reason"]
    assert simulator.send_requests() == 0
    count = thread_watch(app).check()
    assert (count.alive, count.dead) == (2, 0)
    send(producer, idempotency_key="after-hostile-options")
    wait_until(simulator.messages)


class _DieOn(Middleware):
    """A middleware with a bug: it raises what no handler catches, for jobs marked so."""

    def after_process_message(self, broker: Any, message: Any, **_: Any) -> None:
        if message.kwargs.get("metadata") == {"die": True}:
            raise SystemExit("a bug in a middleware")


@pytest.fixture
def worker_with_a_buggy_middleware(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WorkerApp]:
    """A worker of two threads writing health files under tmp_path, with :class:`_DieOn`."""
    monkeypatch.setenv(HEALTH_DIR_ENV, str(tmp_path / "verloop-worker-health-0"))
    app = create_app(make_settings())
    app.broker.add_middleware(_DieOn())
    worker = Worker(app.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    yield app
    worker.stop(timeout=10_000)
    app.broker.close()


# The test kills a thread on purpose; pytest would report the thread's exception as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_thread_is_counted_and_fails_the_liveness_check(
    simulator: Simulator,
    producer: Producer,
    worker_with_a_buggy_middleware: WorkerApp,
    tmp_path: Path,
) -> None:
    """A thread that dies is not replaced: the watch notices, and `check --live` fails so the
    process is restarted. Until the death it reports healthy."""
    app = worker_with_a_buggy_middleware
    folder = tmp_path / "verloop-worker-health-0"
    runner = CliRunner()
    env = {"METRICS_DIR": str(tmp_path), "METRICS_PORT": "0"}
    wait_until(lambda: list(folder.glob("*.json")))
    alive = runner.invoke(cli, ["check", "--live"], env=env)
    assert alive.exit_code == 0, alive.output
    assert "1 worker process(es) with all their threads" in alive.output

    send(producer, idempotency_key="die-1", metadata={"die": True})
    wait_until(lambda: thread_watch(app).check().dead == 1)
    failing = wait_until(
        lambda: (r := runner.invoke(cli, ["check", "--live"], env=env)).exit_code == 1 and r
    )
    assert "1 of 2 threads died" in failing.output


# --- schedules ------------------------------------------------------------------------------------
def test_jobs_scheduled_far_ahead_do_not_hold_the_queue_for_the_jobs_behind_them(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Jobs with options.eta a day ahead used to sit in the consumer's memory, taking the
    queue's whole prefetch (threads x 2): the jobs behind them were not sent. Now they wait in
    the delay queue, and eta beyond MAX_JOB_DELAY_S (a year) is refused."""
    start_worker(threads=2)
    day_ahead = int((time.time() + 86_400) * 1000)
    year_ahead = int((time.time() + 365 * 86_400) * 1000)
    publish_raw(
        [job(options={"eta": day_ahead}, kwargs={"to": f"+9198765{n:05d}"}) for n in range(12)]
        + [job(options={"eta": year_ahead}, kwargs={"to": "+919876500099"})]
    )
    for n in range(20):
        send(producer, to=f"+9198766{n:05d}", idempotency_key=f"behind-{n}")
    wait_until(lambda: len(simulator.messages()) == 20, timeout=20)
    [(headers, _)] = wait_until(dead_letters)
    assert "MAX_JOB_DELAY_S" in headers[DEAD_LETTER_HEADER]["reason"]
    assert all(m["to"].startswith("+9198766") for m in simulator.messages())


def test_a_job_scheduled_a_moment_ahead_is_sent_at_its_time(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    start_worker()
    eta_ms = int((time.time() + 1.5) * 1000)
    publish_raw([job(options={"eta": eta_ms})])
    [record] = wait_until(simulator.messages)
    assert record["received_at"] >= eta_ms / 1000


# --- events ---------------------------------------------------------------------------------------
def test_long_or_odd_ids_do_not_stall_anyone_s_events(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
) -> None:
    """An invalid job with 128-character non-ASCII ids used to make a routing key over AMQP's
    255 bytes; the relay took pika's error for an outage and stopped every later event. Valid
    128-character ids on all three words must fit too."""
    start_worker()
    odd = "é" * 128
    publish_raw([job(kwargs={"client_id": odd, "phone_id": odd})])
    longest = "c" * 128
    producer.enqueue(
        "send_message",
        {
            "client_id": longest,
            "phone_id": "p" * 128,
            "to": "+919876543210",
            "message": TEXT,
            "campaign_id": "k" * 128,
        },
        queue="verloop.campaign",
    )
    for n in range(5):
        send(producer, to=f"+91987654320{n}", idempotency_key=f"after-odd-{n}")
    got = events.wait_for(7)
    keys = [key for key, _ in got]
    assert all(len(key.encode()) <= 255 for key in keys)
    assert sum(key.startswith("send.sent.acme.") for key in keys) == 5
    invalid = next(event for key, event in got if key.startswith("send.dead_lettered."))
    assert "client_id" not in invalid  # an id that is not an id goes nowhere
    long_one = next(event for _, event in got if event.get("campaign_id") == "k" * 128)
    assert long_one["client_id"] == longest  # the body carries the full ids


def test_an_outbox_entry_that_cannot_be_published_is_parked_and_the_rest_go_out() -> None:
    """An entry whose routing key is too long for AMQP (written by an older worker, or by
    hand) is parked with its reason; the events around it are published."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    good = {"k": "send.sent.acme.phone-1.none", "b": '{"message_id": "m-1"}', "m": "m-1"}
    cache.xadd(STREAM, good)
    bad_id = cache.xadd(STREAM, {**good, "k": "send.sent." + "x" * 300, "m": "m-2"})
    cache.xadd(STREAM, {**good, "m": "m-3", "b": '{"message_id": "m-3"}'})
    subscriber = Events("send.#")
    parked: list[str] = []
    relay = OutboxRelay(cache, AMQP_URL, "verloop.events", consumer="t:1", on_parked=parked.append)
    try:
        relay.run_once()
        assert relay.run_once() == 2
        assert sorted(e["message_id"] for _, e in subscriber.wait_for(2)) == ["m-1", "m-3"]
        [(_, kept)] = cache.xrange(PARKED_STREAM)
        assert kept["entry"] == bad_id
        assert kept["m"] == "m-2"
        assert "routing key longer than AMQP's 255 bytes" in kept["reason"]
        assert parked == ["too_long"]
        assert cache.xlen(STREAM) == 0
    finally:
        relay.stop(timeout_s=0)
        subscriber.close()


def test_the_outbox_stream_is_bounded(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """With the relays gone (events exchange refused), the stream stops growing at its bound."""
    cache = redis_client(REDIS_URL)
    app = start_worker(events_outbox_max_len=1000, events_exchange="amq.verloop-refused")
    outbox = app.lifecycle.services.outbox
    assert outbox is not None
    fields = {"message_id": "m", "actor": "send_message", "outcome": "sent"}
    for _ in range(3000):
        outbox.add(fields, None)
    assert 1000 <= cache.xlen(STREAM) < 1500  # MAXLEN ~ trims whole nodes of the stream


# --- idempotency keys -----------------------------------------------------------------------------
def test_an_idempotency_key_that_cannot_be_a_header_is_dead_lettered_at_once(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    """It used to be accepted, fail as an HTTP header and be retried eight times."""
    start_worker()
    publish_raw([job(kwargs={"idempotency_key": "otp\r\nX-Evil: 1"})])
    [(headers, _)] = wait_until(dead_letters)
    info = headers[DEAD_LETTER_HEADER]
    assert (info["outcome"], info["attempts"]) == ("invalid", 1)
    assert "idempotency_key" in info["reason"]
    assert simulator.send_requests() == 0


# --- leased slots ------------------------------------------------------------------------------
def test_a_leased_slot_still_honours_the_recipient_s_hold() -> None:
    """Above 80/s a process leases slots and takes them without asking Redis; such a slot
    carries the holds it skipped, and the ledger claim (the send's next round trip) checks
    them: a recipient held after 131056 waits, others go."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    fast = LimitPolicy(
        default_rate=1000.0, overrides={}, reserve=0.1, max_wait_s=2.0, account_rate=None
    )
    limiter = RedisLimiter(cache, fast)
    ledger = Ledger(cache, ttl_s=3600, lease_s=10)
    try:
        held, other = "+919876543210", "+919876543211"
        limiter.cool_recipient("phone-1", held, 5.0)
        decision = None
        for _ in range(200):
            # Sends to others keep a fast pace, so the limiter leases slots; a send to the held
            # recipient that asks Redis itself is told to wait, one that takes a leased slot
            # gets the holds to check.
            assert limiter.acquire("phone-1", other, "transactional").verdict is Verdict.GO
            decision = limiter.acquire("phone-1", held, "transactional")
            if decision.holds:
                break
            assert decision.verdict is Verdict.RECIPIENT_COOLING
        assert decision is not None
        assert decision.holds, "the limiter never leased a slot"
        assert decision.verdict is Verdict.GO
        held_key, free_key = LedgerKey("key:acme:held"), LedgerKey("key:acme:free")
        claim = ledger.claim(held_key, "me", take_over_uncertain=False, holds=decision.holds)
        assert claim.state == "held"
        assert 3.0 < claim.retry_in_s <= 5.0
        free = ledger.claim(
            free_key,
            "me",
            take_over_uncertain=False,
            holds=limiter.acquire("phone-1", other, "transactional").holds,
        )
        assert free.state == "claimed"
    finally:
        limiter.close()
        ledger.close()


def test_the_hold_a_claim_checks_is_the_one_the_limiter_sets(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """End to end on a 1,000/s number: sends to a recipient on hold wait (no retry used) while
    the number's other sends go out."""
    cache: redis.Redis = redis_client(REDIS_URL)
    app = start_worker(threads=4, rate_limit_overrides={"phone-1": 1000.0})
    app.lifecycle.services.gate.limiter.cool_recipient("phone-1", "+919876543210", 3.0)
    for n in range(60):
        send(producer, to=f"+9198765{n + 43211:05d}", idempotency_key=f"other-{n}")
    send(producer, to="+919876543210", idempotency_key="held-1")
    wait_until(lambda: len(simulator.messages()) >= 60)
    assert all(m["to"] != "+919876543210" for m in simulator.messages())
    [record] = wait_until(lambda: simulator.messages(to="+919876543210"), timeout=10)
    assert cache.pttl("verloop:rl:{phone-1}:pair:+919876543210") < 500
    assert record["idempotency_key"] == "held-1"


def test_a_reason_quoting_huge_field_names_stays_short_and_the_job_is_dead_lettered(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    """An unknown field named with 100,000 characters: the reason names it, cut short, so the
    dead letter's header fits in an AMQP frame and the job keeps its reason."""
    start_worker()
    publish_raw([job(kwargs={"x" * 100_000: 1}), job(queue_name="q" * 100_000)])
    letters: list[tuple[dict[str, Any], bytes]] = []
    wait_until(lambda: letters.extend(dead_letters()) or len(letters) == 2)
    for headers, _ in letters:
        reason = headers[DEAD_LETTER_HEADER]["reason"]
        assert len(reason) <= 1000
        assert "unknown field" in reason or "does not match the queue" in reason
