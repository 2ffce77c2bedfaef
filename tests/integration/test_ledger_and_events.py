"""Each job is sent once whatever RabbitMQ redelivers, and its final outcome is published."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    Simulator,
    dead_letters,
    queue_depth,
    redis_client,
    wait_until,
)
from worker.connections.redis_keys import join_parts
from worker.jobs.models import SEND_QUEUE
from worker.jobs.producer import Producer, encode_job
from worker.runtime.app import WorkerApp
from worker.send.ledger import LedgerKey

TEXT = {"type": "text", "text": {"body": "Your code is 4711"}}
EXCHANGE = "verloop.events"


class Events:
    """A queue bound to the events exchange, as an upstream subscriber would have."""

    def __init__(self, binding: str = "#") -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, EXCHANGE, routing_key=binding)

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        got = []
        while True:
            method, _, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return got
            got.append((method.routing_key, json.loads(body)))

    def wait_for(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        seen: list[tuple[str, dict[str, Any]]] = []

        def enough() -> bool:
            seen.extend(self.take())
            return len(seen) >= count

        wait_until(enough)
        return seen

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def events() -> Iterator[Events]:
    subscriber = Events()
    yield subscriber
    subscriber.close()


def send(producer: Producer, to: str = "+919876543210", **kwargs: Any) -> str:
    values: dict[str, Any] = {"client_id": "acme", "phone_id": "phone-1", "to": to, "message": TEXT}
    values.update(kwargs)
    return producer.send_message(**values)


def test_a_sent_job_publishes_an_event_with_verloop_s_message_id(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
) -> None:
    start_worker()
    message_id = send(producer, idempotency_key="otp-1", metadata={"order": 42})
    [(key, event)] = events.wait_for(1)
    [record] = simulator.messages()
    assert key == "send.sent.acme.phone-1.none"
    assert event["event"] == "send.sent"
    assert event["outcome"] == "sent"
    assert event["message_id"] == message_id
    assert event["verloop_message_id"] == record["id"]
    assert event["to"] == "+919876543210"  # subscribers get the recipient; logs mask it
    assert event["metadata"] == {"order": 42}
    assert event["idempotency_key"] == "otp-1"


def test_a_dead_lettered_job_publishes_its_reason(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
) -> None:
    failures = Events("send.dead_lettered.#")
    try:
        simulator.script({"status": 400, "body": {"error": {"code": 131026}}, "count": 1})
        start_worker()
        send(producer)
        [(key, event)] = failures.wait_for(1)
    finally:
        failures.close()
    assert key == "send.dead_lettered.acme.phone-1.none"
    assert event["dead_letter"] == "failed"
    assert event["code"] == "131026"
    assert event["http_status"] == 400
    assert event["reason"] == "send failed: bad request"
    assert len(dead_letters()) == 1


def test_the_same_job_enqueued_twice_is_sent_once_and_the_second_is_suppressed(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
) -> None:
    start_worker(threads=1)
    send(producer, idempotency_key="order-7-shipped")
    send(producer, idempotency_key="order-7-shipped")
    got = events.wait_for(2)
    assert sorted(key.split(".")[1] for key, _ in got) == ["sent", "suppressed"]
    [record] = simulator.messages()
    suppressed = next(event for key, event in got if event["outcome"] == "suppressed")
    assert suppressed["verloop_message_id"] == record["id"]
    assert simulator.stats()["duplicates"] == 0


def test_a_redelivered_job_without_a_key_is_not_sent_again(
    simulator: Simulator, start_worker: Callable[..., WorkerApp], events: Events
) -> None:
    """RabbitMQ redelivers with the same dramatiq message id: the ledger keys on it."""
    start_worker(threads=1)
    body = encode_job(
        "send_message",
        {"client_id": "acme", "phone_id": "phone-1", "to": "+919876543210", "message": TEXT},
        queue=SEND_QUEUE,
        message_id=str(uuid.uuid4()),
    )
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for _ in range(2):
        channel.basic_publish("", SEND_QUEUE, body, pika.BasicProperties(delivery_mode=2))
    connection.close()
    got = events.wait_for(2)
    assert sorted(event["outcome"] for _, event in got) == ["sent", "suppressed"]
    assert len(simulator.messages()) == 1


def _stale_claim(key: str) -> None:
    """A claim whose worker died mid-call: its lease ended a minute ago."""
    past_ms = int((time.time() - 60) * 1000)
    redis_client(REDIS_URL).set(f"verloop:ledger:{key}", f"p:{past_ms}:host:1:2:x")


def test_a_campaign_job_whose_earlier_delivery_died_mid_call_is_dead_lettered_not_resent(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    _stale_claim("campaign:spring:+919876543210")
    start_worker()
    producer.enqueue(
        "send_message",
        {
            "client_id": "acme",
            "phone_id": "phone-1",
            "to": "+919876543210",
            "message": TEXT,
            "campaign_id": "spring",
        },
        queue="verloop.campaign",
    )
    [(headers, _)] = wait_until(lambda: dead_letters("verloop.campaign"))
    reason = headers["x-verloop-dead-letter"]["reason"]
    assert reason.startswith("outcome unknown")
    assert "--resend-uncertain" in reason
    assert simulator.messages() == []


def test_a_transactional_job_whose_earlier_delivery_died_mid_call_is_resent(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """A one-time password twice beats none: the default policy resends transactional jobs."""
    _stale_claim("key:acme:otp-9")
    start_worker()
    send(producer, idempotency_key="otp-9")
    [record] = wait_until(simulator.messages)
    assert record["idempotency_key"] == "otp-9"
    # Taken over from the claim under the earlier key form; recorded under today's (the record
    # follows the send by up to LEDGER_RECORD_CARRY_MS, worker.send.carried).
    cache = redis_client(REDIS_URL)
    entry = wait_until(
        lambda: (
            (found := cache.get("verloop:ledger:key:4:acme:5:otp-9"))
            and found[:2] == b"s:"
            and found
        )
    )
    assert entry == b"s:" + record["id"].encode()


def test_a_delivery_that_finds_a_live_claim_waits_for_it_without_using_a_retry(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
) -> None:
    """Another worker is sending this very job: wait for its lease, then find it sent."""
    cache = redis_client(REDIS_URL)
    start_worker()  # first: on a slow machine starting it may take longer than a short lease
    ends_ms = int((time.time() + 2.0) * 1000)
    cache.set("verloop:ledger:key:acme:otp-10", f"p:{ends_ms}:other-host:1:2:y")
    send(producer, idempotency_key="otp-10")
    time.sleep(0.5)
    assert simulator.messages() == []  # still waiting for the other claim
    # The other worker finishes: the ledger says sent, so this delivery is suppressed.
    cache.set("verloop:ledger:key:acme:otp-10", "s:wamid.other")
    [(_, event)] = events.wait_for(1)
    assert event["outcome"] == "suppressed"
    assert event["verloop_message_id"] == "wamid.other"
    assert event["attempt"] == 1  # the wait used no retry
    assert simulator.messages() == []


def test_with_events_off_nothing_is_published(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
) -> None:
    start_worker(events_enabled=False)
    send(producer, idempotency_key="quiet-1")
    send(producer, to="+919876543211", idempotency_key="quiet-2")
    wait_until(lambda: len(simulator.messages()) == 2)
    time.sleep(0.2)  # the jobs' acknowledgements follow their sends
    assert events.take() == []


def test_a_job_whose_event_rabbitmq_refuses_is_still_acknowledged_once(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Direct delivery: an "amq." exchange can be neither declared nor published to, so the
    event is refused; the job (already sent) is acknowledged anyway, and its log line says so.
    (Through the outbox, the default, a refused event waits there: see test_outbox.py.)"""
    start_worker(events_exchange="amq.verloop-no-such-exchange", events_delivery="direct")
    send(producer, idempotency_key="no-events")
    wait_until(simulator.messages)
    wait_until(lambda: "event_published=False" in capsys.readouterr().out, timeout=10)
    time.sleep(0.5)
    assert len(simulator.messages()) == 1
    assert queue_depth(SEND_QUEUE) == 0
    assert dead_letters() == []


def test_a_send_no_replica_confirmed_is_acknowledged_with_its_event_and_counted_once(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    events: Events,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """LEDGER_DURABILITY=replica on a Redis without replicas: WAIT confirms nothing, so the
    record is "not replicated". The job was sent: it is acknowledged (no resend, no dead
    letter), its event still goes out, its log line says so, and the record is on the primary,
    so the same job sent again is suppressed."""
    app = start_worker(ledger_durability="replica", ledger_replica_timeout_ms=50)
    message_id = send(producer, idempotency_key="no-replica")
    [(_, event)] = events.wait_for(1)
    assert (event["message_id"], event["outcome"]) == (message_id, "sent")
    wait_until(lambda: "ledger=not_replicated" in capsys.readouterr().out, timeout=10)
    [record] = simulator.messages()
    entry = app.lifecycle.services.ledger.lookup(
        LedgerKey("key:" + join_parts("acme", "no-replica"))
    )
    assert (entry.state, entry.message_id) == ("sent", record["id"])
    send(producer, idempotency_key="no-replica")
    [(_, again)] = events.wait_for(1)
    assert again["outcome"] == "suppressed"
    assert len(simulator.messages()) == 1
    assert queue_depth(SEND_QUEUE) == 0
    assert dead_letters() == []
