"""The jobs exchange on the real RabbitMQ: a worker declares and binds it, producers publish
through it, and it reaches the job queues only."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import pika
import pytest
import structlog

from tests.integration.conftest import AMQP_URL, Simulator, queue_depth, wait_until
from worker.errors import EnqueueError
from worker.jobs.producer import Producer, queue_arguments
from worker.observability.logging import configure_logging
from worker.receipts.models import STATUS_QUEUE
from worker.runtime.app import WorkerApp, create_app
from worker.runtime.jobs_exchange import JOB_QUEUES, JobsExchange
from worker.settings import Settings

TEXT = {"type": "text", "text": {"body": "hi"}}
EXCHANGE = "verloop.jobs"
STATUSES = "verloop.statuses"


def routed(routing_key: str, exchange: str = EXCHANGE) -> bool:
    """Whether a mandatory publish to the exchange reaches a queue (it is not returned)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        channel.basic_publish(exchange, routing_key, b"{}", mandatory=True)
    except pika.exceptions.UnroutableError:
        return False
    finally:
        connection.close()
    return True


def test_a_worker_binds_the_job_queues_and_a_producer_sends_through_the_exchange(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    start_worker()
    with Producer(AMQP_URL, exchange=EXCHANGE) as producer:
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543210", message=TEXT
        )
    [record] = wait_until(simulator.messages)
    assert record["to"] == "+919876543210"


def test_the_exchange_reaches_the_job_queues_and_nothing_else(
    make_settings: Callable[..., Settings],
) -> None:
    """A delay or dead-letter queue's name as routing key goes nowhere: the publish comes back
    as unroutable, and a producer gets an error naming the queues the exchange reaches."""
    app = create_app(make_settings())  # a worker's boot, without consumers to take the probes
    app.broker.declare_queues_now()
    app.broker.close()
    JobsExchange(AMQP_URL, EXCHANGE, status_exchange=STATUSES).before_worker_boot(None, None)
    for queue in JOB_QUEUES:
        assert routed(queue)
        assert queue_depth(queue) == 1
    for queue in ("verloop.send.XQ", "verloop.send.DQ", "verloop.campaign.XQ", "events.mine"):
        assert not routed(queue)
    # The statuses exchange (the webhook receiver's) reaches the status queue alone.
    assert routed(STATUS_QUEUE, STATUSES)
    assert queue_depth(STATUS_QUEUE) == 1
    assert not routed(STATUS_QUEUE, EXCHANGE)
    for queue in (*JOB_QUEUES, "verloop.status.XQ"):
        assert not routed(queue, STATUSES)
    with Producer(AMQP_URL, exchange=EXCHANGE) as producer, pytest.raises(EnqueueError) as err:
        producer.send_message(
            client_id="acme",
            phone_id="phone-1",
            to="+919876543210",
            message=TEXT,
            queue="verloop.send.XQ",
        )
    assert "has no queue bound as 'verloop.send.XQ'" in str(err.value)
    assert queue_depth("verloop.send.XQ") == 0


def test_a_missing_jobs_exchange_is_named_in_the_error() -> None:
    """No worker has declared it (and no definitions did): EnqueueError says so, at once."""
    producer = Producer(AMQP_URL, exchange="verloop.jobs-never-declared")
    with producer, pytest.raises(EnqueueError) as err:
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543210", message=TEXT
        )
    assert "exchange 'verloop.jobs-never-declared' does not exist" in str(err.value)
    assert "a worker declares it when it starts" in str(err.value)


def test_bindings_that_fail_at_boot_are_made_once_the_queues_exist() -> None:
    """The queues are missing when the worker boots (RabbitMQ refuses the binding): the boot
    goes on, a warning says so, and the bindings are made as soon as the queues are there."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", "INFO", stream=stream)
    middleware = JobsExchange(AMQP_URL, EXCHANGE, retry_s=0.1)
    try:
        middleware.before_worker_boot(None, None)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        [warning] = [x for x in lines if x["event"].startswith("could not declare the jobs")]
        assert "NOT_FOUND" in warning["error"]
        assert not routed("verloop.send")

        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for queue in JOB_QUEUES:
            channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
        connection.close()
        wait_until(lambda: all(routed(queue) for queue in JOB_QUEUES), timeout=10)
        assert "jobs exchange declared" in stream.getvalue()
    finally:
        middleware.before_worker_shutdown(None, None)
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()
