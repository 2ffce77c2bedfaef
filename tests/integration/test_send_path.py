"""A job on RabbitMQ becomes a message at Verloop: sends, retries, dead letters, tokens."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.integration.conftest import (
    AMQP_URL,
    QUEUES,
    Simulator,
    dead_letters,
    queue_depth,
    wait_until,
)
from worker.errors import InvalidJob
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.producer import Producer
from worker.runtime.app import WorkerApp, create_app
from worker.settings import Settings

TEXT = {"type": "text", "text": {"body": "Your code is 4711"}}
TEMPLATE = {
    "type": "template",
    "template": {
        "name": "order_shipped",
        "language": {"code": "en_US"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "A-1001"}]}],
    },
}


def send(producer: Producer, to: str = "+919876543210", **kwargs: Any) -> str:
    values: dict[str, Any] = {"client_id": "acme", "phone_id": "phone-1", "to": to}
    values.setdefault("message", TEXT)
    values.update(kwargs)
    return producer.send_message(**values)


def test_a_text_job_from_the_producer_reaches_verloop_exactly_once(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """A text job is sent once, with the Cloud API body, from the right number."""
    start_worker()
    send(producer, idempotency_key="otp-1")
    [record] = wait_until(simulator.messages)
    assert record["to"] == "+919876543210"
    assert record["phone_id"] == "phone-1"
    assert record["client_id"] == "acme"
    assert record["body"]["text"] == {"body": "Your code is 4711", "preview_url": False}
    assert record["idempotency_key"] == "otp-1"
    assert queue_depth("verloop.send") == 0
    assert simulator.send_requests() == 1


def test_a_template_job_is_sent_with_its_language_and_parameters(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """A template job arrives with its name, language and components intact."""
    start_worker()
    send(producer, message=TEMPLATE)
    [record] = wait_until(simulator.messages)
    assert record["type"] == "template"
    assert record["body"]["template"]["name"] == "order_shipped"
    assert record["body"]["template"]["language"]["code"] == "en_US"
    assert record["body"]["template"]["components"][0]["parameters"][0]["text"] == "A-1001"


@pytest.mark.parametrize(
    "envelope",
    [
        pytest.param(
            {
                "queue_name": "verloop.send",
                "actor_name": "send_message",
                "args": [],
                "kwargs": {
                    "client_id": "acme",
                    "phone_id": "phone-1",
                    "to": "+919876543210",
                    "message": TEXT,
                },
                "options": {},
                "message_id": "5f0c8c52-4d0a-4c47-9d3b-6f7b1b0e8a01",
                "message_timestamp": 1764000000000,
            },
            id="full-dramatiq-envelope",
        ),
        pytest.param(
            {
                "actor_name": "send_message",
                "kwargs": {
                    "client_id": "acme",
                    "phone_id": "phone-1",
                    "to": "+919876543210",
                    "message": TEXT,
                },
            },
            id="minimal-envelope",
        ),
    ],
)
def test_a_job_published_with_plain_pika_and_no_dramatiq_is_sent(
    simulator: Simulator, start_worker: Callable[..., WorkerApp], envelope: dict[str, Any]
) -> None:
    """The README's plain-AMQP recipe works: any language can enqueue a send."""
    start_worker()
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        exchange="",
        routing_key="verloop.send",
        body=json.dumps(envelope).encode(),
        properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
        mandatory=True,
    )
    connection.close()
    [record] = wait_until(simulator.messages)
    assert record["to"] == "+919876543210"
    assert dead_letters() == []


def _missing_queues() -> list[str]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    missing = []
    try:
        for queue in QUEUES:
            channel = connection.channel()
            try:
                channel.queue_declare(queue, passive=True)  # 404 closes the channel
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                missing.append(queue)
    finally:
        connection.close()
    return missing


def test_the_broker_declares_every_queue_before_consumers_start(
    make_settings: Callable[..., Settings],
) -> None:
    """Queues exist before any consumer connects: ``mandatory`` publishes are never refused."""
    app = create_app(make_settings())
    assert _missing_queues() == QUEUES
    app.broker.declare_queues_now()
    assert _missing_queues() == []
    app.broker.close()


def test_every_queue_exists_as_soon_as_the_worker_has_started(
    start_worker: Callable[..., WorkerApp],
) -> None:
    start_worker()
    assert _missing_queues() == []


def test_a_producer_that_declares_the_queue_first_is_compatible_with_the_worker(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Jobs enqueued before any worker ran are sent once a worker starts."""
    for n in range(3):
        send(producer, to=f"+91987654321{n}")
    assert queue_depth("verloop.send") == 3
    start_worker()
    wait_until(lambda: len(simulator.messages()) == 3)


def test_the_producer_refuses_an_invalid_job_and_publishes_nothing(producer: Producer) -> None:
    """Validation happens before publishing: the error names the bad field."""
    with pytest.raises(InvalidJob, match="to:"):
        send(producer, to="12345")
    assert queue_depth("verloop.send") == 0


def test_a_transient_failure_is_retried_and_the_message_is_sent_once(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Two 503s, then success: three calls to Verloop, one accepted message, no dead letter."""
    simulator.script({"status": 503, "count": 2})
    start_worker()
    send(producer)
    wait_until(simulator.messages)
    assert simulator.send_requests() == 3
    assert len(simulator.messages()) == 1
    assert dead_letters() == []


def test_a_timeout_from_verloop_is_retried(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """A call that hangs past the client timeout is retried, then sent."""
    simulator.faults(timeout_s=5)
    simulator.script({"status": 504, "timeout": True, "count": 1})
    start_worker(verloop_timeout_s=0.5)
    send(producer)
    wait_until(simulator.messages)
    assert len(simulator.messages()) == 1


def test_a_429_waits_for_retry_after_before_retrying(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Retry-After: 1 is honoured even though the configured backoff is 50-200 ms."""
    simulator.script(
        {"status": 429, "headers": {"Retry-After": "1"}, "count": 1},
        {"status": 200, "count": 1},
    )
    start_worker()
    enqueued_at = time.time()
    send(producer)
    [record] = wait_until(simulator.messages)
    assert simulator.send_requests() == 2
    assert simulator.stats()["responses"]["429"] == 1
    # The refused call came at once; the accepted one at least a second later.
    assert record["received_at"] - enqueued_at >= 1.0


def test_a_permanent_failure_is_dead_lettered_at_once_with_its_reason(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """131026 (undeliverable) is not retried; the dead letter says why, and keeps the job."""
    simulator.script(
        {
            "status": 400,
            "body": {"error": {"code": 131026, "message": "Message undeliverable"}},
            "count": 5,
        }
    )
    start_worker()
    message_id = send(producer, metadata={"order": "A-1001"})
    [(headers, body)] = wait_until(dead_letters)
    info = headers[DEAD_LETTER_HEADER]
    assert info["outcome"] == "failed"
    assert info["error"] == "PermanentFailure"
    assert info["http_status"] == 400
    assert info["code"] == "131026"
    assert "Message undeliverable" in info["reason"]
    assert info["attempts"] == 1
    assert info["actor"] == "send_message"
    assert info["message_id"] == message_id
    assert json.loads(body)["kwargs"]["metadata"] == {"order": "A-1001"}
    assert simulator.send_requests() == 1
    assert simulator.messages() == []


def test_retries_that_never_succeed_end_in_the_dead_letter_queue(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """After RETRY_MAX_RETRIES retries the job is dead-lettered as gave_up with every attempt
    counted."""
    simulator.script({"status": 500, "count": 100})
    start_worker(retry_max_retries=2)
    send(producer)
    [(headers, _)] = wait_until(dead_letters)
    info = headers[DEAD_LETTER_HEADER]
    assert info["outcome"] == "gave_up"
    assert info["attempts"] == 3
    assert info["reason"].startswith("gave up after 3 attempts")
    assert simulator.send_requests() == 3


def test_a_rejected_phone_token_is_refreshed_once_and_the_send_retried(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """A token revoked at Verloop gives a 401; the worker fetches the new one and sends."""
    start_worker()
    send(producer, to="+919876543210")
    wait_until(simulator.messages)
    simulator.revoke_phone_token("acme", "phone-1")
    send(producer, to="+919876543211")
    wait_until(lambda: len(simulator.messages()) == 2)
    assert simulator.stats()["responses"].get("401") == 1
    assert simulator.send_requests() == 3
    assert dead_letters() == []


def test_a_token_rejected_again_after_refreshing_is_dead_lettered(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Two 401s in a row: one refresh, then a dead letter saying the token was refused."""
    simulator.script({"status": 401, "count": 2})
    start_worker()
    send(producer)
    [(headers, _)] = wait_until(dead_letters)
    info = headers[DEAD_LETTER_HEADER]
    assert info["outcome"] == "failed"
    assert "rejected the phone token again" in info["reason"]
    assert simulator.send_requests() == 2


def test_phone_tokens_are_fetched_once_for_a_fleet_of_workers(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """Two workers (separate token caches in memory, one Redis) fetch each token once."""
    start_worker(threads=4)
    start_worker(threads=4)
    for n in range(40):
        send(producer, to=f"+9198765{n:05d}")
    wait_until(lambda: len(simulator.messages()) == 40)
    assert simulator.stats()["requests"]["get_phone_token"] == 1


def test_management_jobs_list_clients_and_refresh_a_token(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """list_clients and refresh_phone_token run on verloop.manage and call Verloop."""
    start_worker()
    producer.enqueue("list_clients", {})
    producer.enqueue("refresh_phone_token", {"client_id": "acme", "phone_id": "phone-1"})
    wait_until(lambda: simulator.stats()["requests"].get("get_phone_token") == 1)
    wait_until(lambda: simulator.stats()["requests"].get("list_clients") == 1)
    assert dead_letters("verloop.manage") == []


def test_a_finished_job_leaves_no_warning_from_dramatiq(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The actor hands its outcome to the middleware on the job's run: dramatiq sees no return
    value, so it writes no "returned a value" warning for every job."""
    caplog.set_level(logging.WARNING, logger="dramatiq")
    start_worker()
    send(producer, idempotency_key="quiet-1")
    wait_until(simulator.messages)
    time.sleep(0.5)  # the warning would come right after the call, before the job's ack
    assert [r.getMessage() for r in caplog.records if r.name.startswith("dramatiq")] == []
