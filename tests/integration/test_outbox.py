"""Outcome events through the Redis outbox: kept before the ack, published at least once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pika
import pytest
import redis

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    SANDBOX_PASSWORD,
    Simulator,
    dead_letters,
    free_port,
    queue_depth,
    redis_client,
    wait_until,
)
from tests.integration.test_ledger_and_events import Events, send
from worker.connections.redis_direct import ThreadConnections
from worker.finish.outbox import GROUP, PARKED_STREAM, STREAM, EventOutbox, OutboxRelay
from worker.jobs.models import SEND_QUEUE
from worker.jobs.producer import Producer, encode_job
from worker.runtime.app import WorkerApp

EXCHANGE = "verloop.events"


def _fields(n: int) -> dict[str, object]:
    return {
        "message_id": f"m-{n}",
        "actor": "send_message",
        "queue": SEND_QUEUE,
        "outcome": "sent",
        "client_id": "acme",
        "phone_id": "phone-1",
        "verloop_message_id": f"wamid.{n}",
        "attempt": 1,
    }


def _outbox_length(cache: redis.Redis) -> int:
    return int(cache.xlen(STREAM))


def test_an_event_rabbitmq_refuses_waits_in_the_outbox_and_goes_out_once_it_can(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The exchange exists with another type, so declaring it fails (406) and nothing can be
    published. The job is sent and acknowledged once; its event stays in the outbox, and the
    relay says why. Once the exchange is right, the relay publishes it: nothing was lost."""
    exchange = "verloop.events-outbox-test"
    admin = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = admin.channel()
    channel.exchange_delete(exchange)
    channel.exchange_declare(exchange, exchange_type="fanout", durable=False)
    try:
        # The relay tries again 2 s after a failure: the exchange is put right (and a queue
        # bound) well inside that gap, so the retry cannot publish before the queue is bound.
        start_worker(events_exchange=exchange, events_relay_retry_s=2.0)
        send(producer, idempotency_key="outbox-1")
        wait_until(simulator.messages)
        output: list[str] = []

        def relay_failed() -> bool:
            output.append(capsys.readouterr().out)
            return "could not be relayed" in output[-1]

        wait_until(relay_failed)
        logged = "".join(output)
        assert SANDBOX_PASSWORD not in logged  # the relay's error names no secret
        assert simulator.server.system_user_token not in logged
        cache = redis_client(REDIS_URL)
        assert _outbox_length(cache) == 1
        assert queue_depth(SEND_QUEUE) == 0
        assert dead_letters() == []

        # Put the exchange right, with a subscriber bound, and the relay delivers the event.
        channel.exchange_delete(exchange)
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, exchange, routing_key="send.#")

        def one_event() -> bytes | None:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            return body if method is not None else None

        body = wait_until(one_event)
        assert b'"idempotency_key":"outbox-1"' in body
        wait_until(lambda: _outbox_length(cache) == 0)
        assert len(simulator.messages()) == 1
        time.sleep(0.3)
        assert one_event() is None  # published once
    finally:
        channel.exchange_delete(exchange)
        admin.close()


def test_events_a_dead_relay_took_are_published_by_another() -> None:
    """A relay that took a batch and died never confirmed it: another relay takes the batch
    over once it has been idle long enough, publishes it, and empties the outbox."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    outbox = EventOutbox(cache)
    for n in range(5):
        outbox.add(_fields(n), {"to": f"+9198765432{n:02d}"})
    cache.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    taken = cache.xreadgroup(GROUP, "dead-host:1", {STREAM: ">"}, count=10)
    assert len(taken[0][1]) == 5  # taken by a relay that then died

    subscriber = Events("send.#")
    relay = OutboxRelay(cache, AMQP_URL, EXCHANGE, consumer="alive:2", reclaim_s=1.0)
    try:
        assert relay.run_once() == 0  # not idle long enough yet: left to its owner
        time.sleep(1.1)
        relay._next_reclaim = 0.0  # look again now rather than in 10 s
        published = 0
        deadline = time.monotonic() + 10
        while published < 5 and time.monotonic() < deadline:
            published += relay.run_once()
        assert published == 5
        events = subscriber.wait_for(5)
        assert sorted(e["message_id"] for _, e in events) == [f"m-{n}" for n in range(5)]
        assert {k for k, _ in events} == {"send.sent.acme.phone-1.none"}
        assert _outbox_length(cache) == 0
        assert cache.xpending(STREAM, GROUP)["pending"] == 0
    finally:
        relay.stop(timeout_s=1)
        subscriber.close()


def test_the_consumers_of_relays_that_exited_are_forgotten() -> None:
    """Each process's relay joins the group under its own name: those of exited processes
    (nothing pending, long silent) are dropped; one still holding a batch is kept."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    outbox = EventOutbox(cache)
    cache.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    cache.xreadgroup(GROUP, "exited:1", {STREAM: ">"}, count=10)  # read nothing, then exited
    outbox.add(_fields(1), None)
    cache.xreadgroup(GROUP, "holding:2", {STREAM: ">"}, count=10)  # took the event, then died
    time.sleep(0.6)
    relay = OutboxRelay(
        cache, AMQP_URL, EXCHANGE, consumer="alive:3", reclaim_s=60.0, forget_after_s=0.5
    )
    try:
        relay.run_once()
        names = {c["name"] for c in cache.xinfo_consumers(STREAM, GROUP)}
        assert "exited:1" not in names
        assert "holding:2" in names  # its batch is taken over first (after reclaim_s)
        assert cache.xpending(STREAM, GROUP)["pending"] == 1
    finally:
        relay.stop(timeout_s=0)


def test_an_outbox_entry_that_is_not_an_event_is_parked_and_the_rest_still_go_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An entry without routing key or body (written by hand, say) cannot block the stream:
    it is parked with its id in the log, and the events around it are published."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    outbox = EventOutbox(cache)
    outbox.add(_fields(1), None)
    bad_id = cache.xadd(STREAM, {"note": "not an event"})
    outbox.add(_fields(2), None)
    subscriber = Events("send.#")
    relay = OutboxRelay(cache, AMQP_URL, EXCHANGE, consumer="alive:4")
    try:
        assert relay.run_once() == 0  # its own pending entries first: none yet
        assert relay.run_once() == 2  # all three taken: two published, one parked
        events = subscriber.wait_for(2)
        assert sorted(e["message_id"] for _, e in events) == ["m-1", "m-2"]
        assert _outbox_length(cache) == 0
        assert f"entry={bad_id}" in capsys.readouterr().out
        [(_, parked)] = cache.xrange(PARKED_STREAM)
        assert (parked["note"], parked["reason"]) == ("not an event", "no routing key or body")
    finally:
        relay.stop(timeout_s=0)
        subscriber.close()


def test_an_outbox_entry_that_is_not_utf8_is_parked_and_the_relay_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bytes that are not UTF-8 in an entry (written by hand, say) once made every read of the
    stream fail, killing each process's relay thread: now that entry alone is parked, with its
    bytes escaped, and the events around it go out."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    raw = redis_client(REDIS_URL, decode_responses=False)
    outbox = EventOutbox(cache)
    outbox.add(_fields(1), None)
    bad_id = raw.xadd(STREAM, {b"k": b"send.sent.\xff", b"b": b"{}"}).decode()
    outbox.add(_fields(2), None)
    subscriber = Events("send.#")
    relay = OutboxRelay(cache, AMQP_URL, EXCHANGE, consumer="alive:5")
    try:
        assert relay.run_once() == 0  # its own pending entries first: none yet
        assert relay.run_once() == 2  # all three taken: two published, one parked
        events = subscriber.wait_for(2)
        assert sorted(e["message_id"] for _, e in events) == ["m-1", "m-2"]
        assert _outbox_length(cache) == 0
        assert f"entry={bad_id}" in capsys.readouterr().out
        [(_, parked)] = cache.xrange(PARKED_STREAM)
        assert parked["reason"] == "its fields are not UTF-8 text"
        assert parked["k"] == "send.sent.\\xff"
        outbox.add(_fields(3), None)  # and the relay still relays
        assert relay.run_once() == 1
    finally:
        relay.stop(timeout_s=0)
        subscriber.close()


def test_a_relay_whose_stream_was_deleted_makes_it_again() -> None:
    """FLUSHDB or DEL under a running relay: it re-creates its group and goes on."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    relay = OutboxRelay(cache, AMQP_URL, EXCHANGE, consumer="alive:5")
    subscriber = Events("send.#")
    try:
        relay.run_once()
        relay.run_once()  # the group exists, nothing to read
        cache.delete(STREAM)
        assert relay.run_once() == 0  # NOGROUP: noticed, the group is made again next time
        EventOutbox(cache).add(_fields(7), None)
        published = sum(relay.run_once() for _ in range(3))
        assert published == 1
        [(_, event)] = subscriber.wait_for(1)
        assert event["message_id"] == "m-7"
    finally:
        relay.stop(timeout_s=0)
        subscriber.close()


def test_when_redis_refuses_the_event_it_is_published_directly(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A dead-lettered job's event goes to the outbox in the finisher's round trip; if Redis
    does not answer it, the event is published on the worker's channel instead, not lost."""
    subscriber = Events("send.#")
    try:
        app = start_worker()
        services = app.lifecycle.services
        # The finisher's connections point at a port nobody listens on (the ledger's are fine).
        dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
        services.connections = ThreadConnections(dead)
        kwargs = {"client_id": "acme", "phone_id": "phone-1", "to": "not-a-number", "message": {}}
        job_id = str(uuid.uuid4())
        body = encode_job("send_message", kwargs, queue=SEND_QUEUE, message_id=job_id)
        producer.publish_body(SEND_QUEUE, body, job_id)
        [(key, event)] = subscriber.wait_for(1)
        assert key == "send.dead_lettered.acme.phone-1.none"
        assert event["dead_letter"] == "invalid"
        wait_until(lambda: "event_outbox=False" in capsys.readouterr().out)
    finally:
        subscriber.close()


def test_when_redis_refuses_the_event_in_the_finishers_round_trip_it_is_published_directly(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis answers but refuses the event's XADD (its key is not a stream): the refusal is
    logged and the event goes straight to the exchange, once."""
    subscriber = Events("send.#")
    try:
        app = start_worker()
        services = app.lifecycle.services
        redis_client(REDIS_URL).set("test:not-a-stream", "x")
        services.outbox = EventOutbox(services.cache, stream="test:not-a-stream")
        kwargs = {"client_id": "acme", "phone_id": "phone-1", "to": "not-a-number", "message": {}}
        job_id = str(uuid.uuid4())
        body = encode_job("send_message", kwargs, queue=SEND_QUEUE, message_id=job_id)
        producer.publish_body(SEND_QUEUE, body, job_id)
        [(key, event)] = subscriber.wait_for(1)
        assert key == "send.dead_lettered.acme.phone-1.none"
        assert event["message_id"] == job_id
        wait_until(lambda: "Redis refused the job's event update" in capsys.readouterr().out)
        time.sleep(0.5)
        assert subscriber.take() == []  # published once, not twice
    finally:
        subscriber.close()


def test_after_a_small_batch_the_relay_lingers_so_the_next_carries_many_events() -> None:
    """Each batch costs a read, a commit and an acknowledgement whatever its size. After one
    event alone, the relay waits its linger time: the five events added meanwhile go out
    together in one batch, not one by one."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    outbox = EventOutbox(cache)
    batches: list[tuple[int, bool]] = []
    subscriber = Events("send.#")
    relay = OutboxRelay(
        cache,
        AMQP_URL,
        EXCHANGE,
        consumer="alive:6",
        block_ms=50,
        linger_ms=1500,
        on_published=lambda count, ok: batches.append((count, ok)),
    )
    relay.start()
    try:
        outbox.add(_fields(0), None)
        wait_until(lambda: batches)
        for n in range(1, 6):
            outbox.add(_fields(n), None)
        wait_until(lambda: len(batches) >= 2)
        assert batches == [(1, True), (5, True)]
        events = subscriber.wait_for(6)
        assert sorted(e["message_id"] for _, e in events) == [f"m-{n}" for n in range(6)]
    finally:
        relay.stop(timeout_s=1)
        subscriber.close()
