"""Acks batched per wake-up of the consumer thread (worker.runtime.consumer), on real RabbitMQ."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from tests.integration.conftest import Simulator, WorkerStarter, queue_depth, wait_until
from worker.jobs.producer import Producer
from worker.runtime.app import create_app
from worker.runtime.consumer import BatchedAckConsumer
from worker.settings import Settings

QUEUE = "verloop.send"


def publish(producer: Producer, count: int) -> None:
    for n in range(count):
        producer.send_message(
            client_id="acme",
            phone_id="phone-1",
            to=f"+9198765{n:05d}",
            message={"type": "text", "text": {"body": f"ack {n}"}},
        )


def test_acks_made_while_the_consumer_thread_is_busy_leave_in_one_write(
    make_settings: Callable[..., Settings], producer: Producer
) -> None:
    app = create_app(make_settings())
    broker: Any = app.broker
    publish(producer, 5)
    consumer = broker.consume(QUEUE, prefetch=10, timeout=200)
    try:
        assert isinstance(consumer, BatchedAckConsumer)
        messages: list[Any] = []
        while len(messages) < 5:
            message = next(consumer)
            if message is not None:
                messages.append(message)
        # Five worker threads finish while the consumer thread is not running its loop.
        threads = [threading.Thread(target=consumer.ack, args=(m,)) for m in messages]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (consumer.acks_sent, consumer.ack_writes) == (0, 0)
        assert next(consumer) is None  # the consumer thread's loop: sends them, then waits
        assert (consumer.acks_sent, consumer.ack_writes) == (5, 1)
    finally:
        consumer.close()  # type: ignore[no-untyped-call]
        broker.close()
    # Closing a connection returns its unacknowledged messages to the queue: none came back.
    assert queue_depth(QUEUE) == 0


def test_every_job_of_a_busy_worker_is_acknowledged_once(
    simulator: Simulator, producer: Producer, start_worker: WorkerStarter
) -> None:
    app = start_worker(threads=8)
    publish(producer, 200)
    wait_until(lambda: len(simulator.messages()) >= 200, timeout=60)
    worker = start_worker.worker_of(app)
    consumers = [
        thread.consumer
        for thread in worker.consumers.values()
        if isinstance(thread.consumer, BatchedAckConsumer)
    ]
    wait_until(lambda: sum(c.acks_sent for c in consumers) >= 200)
    assert sum(c.acks_sent for c in consumers) == 200
    start_worker.stop(app)
    # Unacknowledged jobs would be back on the queue once the worker's connections closed.
    assert queue_depth(QUEUE) == 0
    assert len(simulator.messages()) == 200
