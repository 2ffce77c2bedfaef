"""A sent job's record carried by the next claim (worker.send.carried), and its acknowledgement
held until then (worker.runtime.consumer): real Redis, RabbitMQ, simulator and processes."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.conftest import (
    REDIS_URL,
    Simulator,
    WorkerStarter,
    dead_letters,
    free_port,
    queue_depth,
    redis_client,
    wait_until,
    worker_process,
)
from tests.integration.test_ledger_and_events import Events, send
from tests.integration.test_process import descendants
from worker.connections.redis_keys import join_parts
from worker.errors import RedisUnavailable
from worker.finish import middleware
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.producer import Producer
from worker.observability.logging import log_job_line as write_job_line
from worker.runtime.app import WorkerApp, create_app
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings


@pytest.fixture
def events() -> Iterator[Events]:
    subscriber = Events()
    yield subscriber
    subscriber.close()


class Written:
    """What a carried write's callback received, and on which thread."""

    def __init__(self) -> None:
        self.result: list[Any] | RedisUnavailable | None = None
        self.thread: str | None = None
        self.done = threading.Event()

    def __call__(self, result: list[Any] | RedisUnavailable) -> None:
        self.result, self.thread = result, threading.current_thread().name
        self.done.set()


def key(name: str) -> LedgerKey:
    return LedgerKey(f"key:{name}:{time.time_ns()}")


def test_a_record_waits_for_the_next_claim_and_goes_in_its_round_trip() -> None:
    cache = redis_client(REDIS_URL)
    ledger = Ledger(cache, ttl_s=3600, lease_s=10, carry_s=1.0)
    try:
        first, second = key("first"), key("second")
        assert ledger.claim(first, "job-1", take_over_uncertain=False).state == "claimed"
        written = Written()
        ledger.mark_sent_later(first, "wamid.1", written, also=[("INCR", "test:carried:count")])
        assert ledger.lookup(first).state == "pending"  # not written yet: nothing carried it
        assert not written.done.is_set()
        assert ledger.claim(second, "job-2", take_over_uncertain=False).state == "claimed"
        # The claim's round trip wrote the record first, and answered the callback.
        assert written.done.is_set()
        assert written.thread == threading.current_thread().name
        assert isinstance(written.result, list)
        assert len(written.result) == 1  # the reply of the one command `also` added
        assert ledger.lookup(first).message_id == "wamid.1"
        assert ledger.carried is not None
        assert (ledger.carried.carried, ledger.carried.written_alone) == (1, 0)
    finally:
        cache.delete("test:carried:count")
        ledger.close()


def test_a_record_no_claim_carries_is_written_alone_within_carry_s() -> None:
    ledger = Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=10, carry_s=0.05)
    try:
        entry = key("alone")
        ledger.claim(entry, "job-1", take_over_uncertain=False)
        written = Written()
        ledger.mark_sent_later(entry, "wamid.2", written)
        assert written.done.wait(2.0)
        assert written.thread == "ledger-records"
        assert ledger.lookup(entry).message_id == "wamid.2"
        assert ledger.carried is not None
        assert ledger.carried.written_alone == 1
    finally:
        ledger.close()


def test_closing_the_ledger_writes_what_waits() -> None:
    ledger = Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=10, carry_s=1.0)
    entry = key("closing")
    ledger.claim(entry, "job-1", take_over_uncertain=False)
    written = Written()
    ledger.mark_sent_later(entry, "wamid.3", written)
    ledger.close()
    assert written.done.is_set()
    assert Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=10).lookup(entry).state == "sent"


def test_a_record_redis_did_not_take_is_reported_and_kept_for_later() -> None:
    """Nothing listens on the port: the flush fails, the callback gets the RedisUnavailable
    that mark_sent would have raised (no URL or password in it), and the record is kept."""
    dead = redis.Redis.from_url(
        f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5
    )
    ledger = Ledger(dead, ttl_s=3600, lease_s=10, carry_s=1.0)
    try:
        written = Written()
        ledger.mark_sent_later(key("down"), "wamid.4", written)
        assert ledger.carried is not None
        ledger.carried.flush()
        assert isinstance(written.result, RedisUnavailable)
        assert "hunter2" not in str(written.result)
        assert ledger.unrecorded == 1
    finally:
        ledger.close()


def test_a_claim_whose_round_trip_fails_fails_the_records_it_carried_too() -> None:
    """The claim is held (RedisUnavailable, as without carrying) and each carried record gets
    the same error in its callback and is kept to be written later."""
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    ledger = Ledger(dead, ttl_s=3600, lease_s=10, carry_s=1.0)
    try:
        written = Written()
        ledger.mark_sent_later(key("carried-down"), "wamid.6", written)
        with pytest.raises(RedisUnavailable):
            ledger.claim(key("claim-down"), "job-2", take_over_uncertain=False)
        assert isinstance(written.result, RedisUnavailable)
        assert ledger.unrecorded == 1
    finally:
        ledger.close()


def test_a_callback_that_raises_does_not_stop_the_others_or_the_claim() -> None:
    ledger = Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=10, carry_s=1.0)
    try:

        def broken(result: list[Any] | RedisUnavailable) -> None:
            raise ValueError("a bug in a callback")

        first, second = key("broken"), key("after-broken")
        ledger.mark_sent_later(first, "wamid.7", broken)
        written = Written()
        ledger.mark_sent_later(second, "wamid.8", written)
        assert ledger.claim(key("carrier"), "job-3", take_over_uncertain=False).state == "claimed"
        assert written.done.is_set()
        assert ledger.lookup(first).message_id == "wamid.7"
        assert ledger.lookup(second).message_id == "wamid.8"
    finally:
        ledger.close()


def test_a_held_acknowledgement_whose_connection_closed_is_dropped_not_raised(
    make_settings: Callable[..., Settings], producer: Producer
) -> None:
    """Released after its consumer's connection closed: a warning, no exception in the thread
    that released it; RabbitMQ delivers the job again (the ledger answers that delivery)."""
    app = create_app(make_settings())
    broker: Any = app.broker
    send(producer, idempotency_key="held-closed")
    consumer = broker.consume("verloop.send", prefetch=1, timeout=200)
    try:
        message = wait_until(lambda: next(consumer), timeout=10)
        broker.held_acks.hold("verloop.send", message.message_id)
        consumer.ack(message)  # parked
        assert len(broker.held_acks) == 1
        consumer.connection.close()
        broker.held_acks.release("verloop.send", message.message_id)
        assert len(broker.held_acks) == 0
    finally:
        broker.close()
    wait_until(lambda: queue_depth("verloop.send") == 1)


def test_with_replicas_records_are_not_carried() -> None:
    ledger = Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=10, carry_s=1.0, replicas=1)
    try:
        assert ledger.carried is None
        with pytest.raises(RuntimeError):
            ledger.mark_sent_later(key("replica"), "wamid.5", Written())
    finally:
        ledger.close()


def test_a_sent_job_is_acknowledged_and_logged_only_once_its_record_is_written(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One job and nothing else to carry its record: the record waits its LEDGER_RECORD_CARRY_MS,
    and meanwhile the job is neither acknowledged nor logged, and its event is not out."""
    # The job lines written, read where they are made (whatever stream an earlier test left
    # logging configured with).
    logged: list[dict[str, Any]] = []

    def log_job_line(level: str, fields: dict[str, Any], exc_info: Any = None) -> None:
        logged.append(dict(fields))
        write_job_line(level, fields, exc_info)

    monkeypatch.setattr(middleware, "log_job_line", log_job_line)
    app = start_worker(ledger_record_carry_ms=1000)
    message_id = send(producer, idempotency_key="carried-1")
    wait_until(simulator.messages)
    ledger = app.lifecycle.services.ledger
    entry = LedgerKey("key:" + join_parts("acme", "carried-1"))
    time.sleep(0.3)
    assert len(app.broker.held_acks) == 1
    assert ledger.lookup(entry).state == "pending"
    assert [line for line in logged if line["message_id"] == message_id] == []
    assert events.take() == []
    # Then the ledger's thread writes it: the line, the event and the acknowledgement follow.
    [(_, event)] = events.wait_for(1)
    assert event["outcome"] == "sent"
    assert ledger.lookup(entry).message_id == simulator.messages()[0]["id"]
    wait_until(lambda: len(app.broker.held_acks) == 0)
    [line] = [line for line in logged if line["message_id"] == message_id]
    assert line["outcome"] == "sent"


def test_every_job_of_a_busy_worker_is_recorded_acknowledged_and_evented_once(
    simulator: Simulator,
    producer: Producer,
    start_worker: WorkerStarter,
    events: Events,
) -> None:
    app = start_worker(threads=8)
    for n in range(60):
        send(producer, to=f"+9198765{n:05d}", idempotency_key=f"busy-{n}")
    seen = events.wait_for(60)
    assert len({event["message_id"] for _, event in seen}) == 60
    ledger = app.lifecycle.services.ledger
    assert ledger.carried is not None
    assert ledger.carried.carried > 0  # most records rode with another job's claim
    wait_until(lambda: len(app.broker.held_acks) == 0)
    start_worker.stop(app)
    # An acknowledgement that never left would put its job back on the queue now.
    assert queue_depth("verloop.send") == 0
    assert len(simulator.messages()) == 60
    assert simulator.stats()["duplicates"] == 0
    for n in range(60):
        record = ledger.lookup(LedgerKey("key:" + join_parts("acme", f"busy-{n}")))
        assert record.state == "sent"


def test_a_worker_killed_before_its_record_is_written_loses_nothing(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """SIGKILL while a sent job's record waits: the job was not acknowledged, so RabbitMQ
    delivers it again; the ledger holds the dead worker's claim, so the new delivery treats it
    as an unknown outcome (here dead-lettered for an operator), and Verloop gets it once."""
    settings = {
        "LEDGER_RECORD_CARRY_MS": "1000",
        "LEDGER_LEASE_S": "1",
        "UNCERTAIN_SEND_POLICY": "dead_letter",
    }
    with worker_process(simulator, tmp_path / "first.log", "--threads", "2", **settings) as run:
        fleet = descendants(run.pid)
        send(producer, idempotency_key="killed-1")
        wait_until(simulator.messages, interval=0.01)
        # The worker processes first: a process whose parent dies stops gracefully (and would
        # write the record first).
        for pid in [*fleet, run.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.wait(timeout=10)
    ledger = Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=10)
    assert ledger.lookup(LedgerKey("key:" + join_parts("acme", "killed-1"))).state == "pending"
    wait_until(lambda: queue_depth("verloop.send") == 1)  # back on the queue, not lost

    with worker_process(simulator, tmp_path / "second.log", "--threads", "2", **settings):
        [(headers, _)] = wait_until(dead_letters, timeout=20)
    assert headers[DEAD_LETTER_HEADER]["reason"].startswith("outcome unknown")
    assert len(simulator.messages()) == 1
