"""QUEUE_TYPE and several RabbitMQ hosts, on the real single-node RabbitMQ.

With ``QUEUE_TYPE=quorum`` every queue the worker declares is a quorum queue with the arguments
of worker.connections.queues (read back with ``rabbitmqctl``), jobs are sent, retried and
deferred through the delay queue and dead-lettered to the XQ; classic queues stay dramatiq's.
An ``AMQP_URL`` whose first node is a dead port still reaches the live one from every AMQP user.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
from dramatiq.common import dq_name, xq_name

from tests.integration.conftest import (
    AMQP_URL,
    QUEUES,
    REDIS_URL,
    Simulator,
    dead_letters,
    free_port,
    redis_client,
    wait_until,
)
from tests.integration.tcp_proxy import TcpProxy
from worker.campaigns.enqueue import enqueue_campaign
from worker.campaigns.spec import CampaignSpec
from worker.campaigns.store import CampaignStore
from worker.commands.check import service_problems
from worker.commands.run import _queue_type_problem
from worker.connections.queues import (
    DEAD_LETTER_DELIVERY_LIMIT,
    DELIVERY_LIMIT,
    dead_letter_queue_arguments,
    work_queue_arguments,
)
from worker.dlq.store import DeadLetterStore
from worker.errors import EnqueueError
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.models import CAMPAIGN_QUEUE, SEND_QUEUE
from worker.jobs.producer import Producer
from worker.receipts.models import STATUS_QUEUE
from worker.runtime.app import WorkerApp, create_app
from worker.settings import Settings
from worker.webhooks.publisher import Publisher

VHOST = unquote(urlsplit(AMQP_URL).path[1:]) or "/"
MAIN_QUEUES = ("verloop.send", "verloop.campaign", "verloop.manage", "verloop.status")
TEXT = {"type": "text", "text": {"body": "Your code is 4711"}}
PASSWORD = urlsplit(AMQP_URL).password or "guest"


def listed_queues() -> dict[str, dict[str, Any]]:
    """Every queue of the test vhost as RabbitMQ reports it: name -> {type, arguments}."""
    ctl = shutil.which("rabbitmqctl")
    assert ctl is not None, (
        "rabbitmqctl is needed to read queue types (apt-get install rabbitmq-server)"
    )
    listed = subprocess.run(
        [ctl, "-q", "list_queues", "-p", VHOST, "name", "type", "arguments", "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {q["name"]: q for q in json.loads(listed.stdout)}


def arguments_of(queue: dict[str, Any]) -> dict[str, Any]:
    # rabbitmqctl lists arguments as [name, type, value] triples (or a {name: value} map).
    raw = queue["arguments"]
    if isinstance(raw, dict):
        return raw
    return {name: value for name, _type, value in raw}


def dead_port_url() -> str:
    """AMQP_URL's credentials and vhost on a local port nothing listens on."""
    parts = urlsplit(AMQP_URL)
    userinfo = parts.netloc.rsplit("@", 1)[0]
    return parts._replace(netloc=f"{userinfo}@127.0.0.1:{free_port()}").geturl()


def two_nodes() -> str:
    """AMQP_URL as a cluster whose first node is down."""
    return f"{dead_port_url()},{AMQP_URL}"


def send(producer: Producer, n: int = 0, **kwargs: Any) -> str:
    return producer.send_message(
        client_id="acme", phone_id="phone-1", to=f"+91987654{n:04d}", message=TEXT, **kwargs
    )


def spy_on_delays(app: WorkerApp) -> list[str]:
    """The queues of the delayed publishes (retries, deferrals) the worker makes from now on."""
    delayed: list[str] = []
    original = app.broker.enqueue

    def enqueue(message: Any, *, delay: int | None = None) -> Any:
        sent = original(message, delay=delay)
        if delay is not None:
            delayed.append(sent.queue_name)
        return sent

    app.broker.enqueue = enqueue  # type: ignore[method-assign]
    return delayed


# --- queue types ----------------------------------------------------------------------------------
def test_a_quorum_worker_declares_every_queue_quorum_with_the_arguments_it_needs(
    start_worker: Callable[..., WorkerApp],
) -> None:
    start_worker(queue_type="quorum")
    queues = listed_queues()
    assert set(QUEUES) <= set(queues)
    for main in MAIN_QUEUES:
        work = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": xq_name(main),
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        for name in (main, dq_name(main)):
            assert queues[name]["type"] == "quorum", name
            assert arguments_of(queues[name]) == work, name
        assert queues[xq_name(main)]["type"] == "quorum"
        assert arguments_of(queues[xq_name(main)]) == {
            "x-queue-type": "quorum",
            "x-message-ttl": DEAD_MESSAGE_TTL,
            "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT,
        }
    assert not any("x-max-priority" in arguments_of(q) for q in queues.values())


def test_a_classic_worker_declares_dramatiq_s_queues_as_before(
    start_worker: Callable[..., WorkerApp],
) -> None:
    start_worker()
    queues = listed_queues()
    for main in MAIN_QUEUES:
        work = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": xq_name(main)}
        for name in (main, dq_name(main)):
            assert queues[name]["type"] == "classic", name
            assert arguments_of(queues[name]) == work, name
        assert queues[xq_name(main)]["type"] == "classic"
        assert arguments_of(queues[xq_name(main)]) == {"x-message-ttl": DEAD_MESSAGE_TTL}


def test_on_quorum_queues_a_job_is_sent_retried_and_deferred_through_the_delay_queue(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    """A 503 (retry) and a rate limit (deferral) both go through verloop.send.DQ, and each job
    is sent once."""
    simulator.script({"status": 503, "count": 1})
    app = start_worker(queue_type="quorum", rate_limit_per_number=2, rate_limit_max_wait_s=0.1)
    delayed = spy_on_delays(app)
    with Producer(AMQP_URL, queue_type="quorum") as producer:
        keys = [f"q-{n}" for n in range(4)]
        for n, key in enumerate(keys):
            send(producer, n, idempotency_key=key)
    wait_until(lambda: len(simulator.messages()) >= 4, timeout=20)
    assert sorted(m["idempotency_key"] for m in simulator.messages()) == keys
    assert simulator.send_requests() == 5  # one 503, four accepted
    assert len(delayed) >= 2  # the retry, and at least one job past the 2/s slot
    assert set(delayed) == {dq_name(SEND_QUEUE)}
    assert dead_letters() == []


def test_on_quorum_queues_an_invalid_job_is_dead_lettered_to_the_xq_with_its_reason(
    start_worker: Callable[..., WorkerApp],
) -> None:
    start_worker(queue_type="quorum")
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", SEND_QUEUE, b"{not json", mandatory=True)
    finally:
        connection.close()
    [(headers, body)] = wait_until(dead_letters)
    assert body == b"{not json"
    assert headers[DEAD_LETTER_HEADER]["outcome"] == "invalid"


def test_a_message_past_the_delivery_limit_is_dead_lettered_not_dropped() -> None:
    """At-least-once dead-lettering, shown on a queue of the same arguments with a small limit:
    a job returned once too often lands in the XQ (the worker's limit is far higher)."""
    queue = "verloop.limit-check"
    arguments = {**work_queue_arguments(queue, "quorum"), "x-delivery-limit": 1}
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.queue_declare(
            xq_name(queue), durable=True, arguments=dead_letter_queue_arguments("quorum")
        )
        channel.queue_declare(queue, durable=True, arguments=arguments)
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"job", mandatory=True)
        for _ in range(2):  # two returns: the second goes past a limit of one
            method, _, _ = channel.basic_get(queue)
            assert method is not None
            channel.basic_nack(method.delivery_tag, requeue=True)

        def dead() -> Any:
            return channel.basic_get(xq_name(queue), auto_ack=True)[0]

        assert wait_until(dead) is not None
        assert channel.basic_get(queue)[0] is None
    finally:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.queue_delete(xq_name(queue))
        connection.close()


def test_queues_of_the_other_type_are_named_at_boot_with_the_setting_and_the_guide(
    start_worker: Callable[..., WorkerApp], make_settings: Callable[..., Settings]
) -> None:
    app = start_worker()  # classic queues exist now
    start_worker.stop(app)  # type: ignore[attr-defined]
    problem = _queue_type_problem(make_settings(queue_type="quorum"))
    assert problem is not None
    assert "QUEUE_TYPE=quorum" in problem
    assert "Running against a RabbitMQ cluster" in problem
    assert _queue_type_problem(make_settings()) is None
    with Producer(AMQP_URL, queue_type="quorum") as producer, pytest.raises(EnqueueError) as caught:
        send(producer)
    assert "QUEUE_TYPE=quorum" in str(caught.value)


def test_the_broker_names_queues_of_the_other_type_in_its_boot_log(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker process started without `run`'s pre-flight still says what is wrong."""
    with Producer(AMQP_URL) as producer:  # a classic verloop.send exists now
        send(producer)
    app = create_app(make_settings(queue_type="quorum"))
    with caplog.at_level(logging.ERROR):
        app.broker.declare_queues_now()
    app.broker.close()
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "QUEUE_TYPE=quorum" in record.getMessage()
    assert "verloop.send" in record.getMessage()


# --- several hosts --------------------------------------------------------------------------------
def test_with_a_dead_first_node_the_worker_and_producer_reach_the_live_one(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    """Broker, its consumers, the jobs exchange, the events relay and the producer all skip the
    dead node: a job sent by the producer is sent, and its outcome event is published."""
    url = two_nodes()
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    events = channel.queue_declare("", exclusive=True).method.queue
    start_worker(amqp_url=url, queue_type="quorum")
    channel.queue_bind(events, "verloop.events", routing_key="#")
    try:
        with Producer(url, exchange="verloop.jobs", queue_type="quorum") as producer:
            message_id = send(producer)
        wait_until(simulator.messages)

        def event() -> Any:
            method, _, body = channel.basic_get(events, auto_ack=True)
            return json.loads(body) if method is not None else None

        assert wait_until(event, timeout=20)["message_id"] == message_id
    finally:
        connection.close()


def test_when_the_connected_node_goes_every_connection_moves_to_another(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    """The first node is a proxy to RabbitMQ: the worker and the producer connect through it;
    once it drops its connections and refuses new ones, consumers, the events relay and the
    producer reconnect to the second node and the next job is sent and reported."""
    proxy = TcpProxy()
    parts = urlsplit(AMQP_URL)
    userinfo = parts.netloc.rsplit("@", 1)[0]
    first = parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}").geturl()
    url = f"{first},{AMQP_URL}"
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        events = channel.queue_declare("", exclusive=True).method.queue
        start_worker(amqp_url=url, queue_type="quorum")
        channel.queue_bind(events, "verloop.events", routing_key="#")
        with Producer(url, queue_type="quorum") as producer:
            send(producer, 1)
            wait_until(lambda: len(simulator.messages()) == 1)
            assert proxy.handshakes > 0  # everything went through the first node
            proxy.refuse = True
            proxy.sever()
            second = send(producer, 2)
        wait_until(lambda: len(simulator.messages()) == 2, timeout=30)

        def reported() -> bool:
            while True:
                method, _, body = channel.basic_get(events, auto_ack=True)
                if method is None:
                    return False
                if json.loads(body)["message_id"] == second:
                    return True

        wait_until(reported, timeout=30)
        assert dead_letters() == []
    finally:
        connection.close()
        proxy.close()


def test_with_a_dead_first_node_the_tools_reach_the_live_one(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """`check`, the DLQ tools, the campaign enqueuer and the webhook receiver's publisher."""
    url = two_nodes()
    settings = make_settings(amqp_url=url)
    [(_, shown, problem), _] = service_problems(settings)
    assert problem is None
    assert shown.count(":***@") == 2

    with DeadLetterStore(url) as store:
        assert store.depths()["verloop.send"] == 0

    path = tmp_path / "people.csv"
    path.write_text("to,body_1\n+919800000001,Asha\n+919800000002,Ravi\n", encoding="utf-8")
    campaign = CampaignSpec("camp-nodes", "acme", ("phone-a",), "diwali_offer", "en_US", 1)
    result = enqueue_campaign(
        path, campaign, amqp_url=url, store=CampaignStore(redis_client(REDIS_URL))
    )
    assert result.enqueued == 2

    async def publish() -> None:
        publisher = Publisher(
            url, status_exchange="verloop.statuses", events_exchange="verloop.events", timeout_s=5
        )
        try:
            await publisher.publish_job(b'{"x": 1}', "m-1")
        finally:
            await publisher.close()

    _declare_status_route()
    asyncio.run(publish())
    assert _ready(STATUS_QUEUE) == 1
    assert _ready(CAMPAIGN_QUEUE) == 2


def test_no_node_answering_is_reported_without_any_password(
    make_settings: Callable[..., Settings],
) -> None:
    secret = "n0de-s3cret"
    urls = [dead_port_url().replace(f":{PASSWORD}@", f":{secret}@") for _ in range(2)]
    [(_, shown, problem), _] = service_problems(make_settings(amqp_url=",".join(urls)))
    assert problem is not None
    assert secret not in shown
    assert secret not in problem
    assert shown.count(":***@") == 2


def _declare_status_route() -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.queue_declare(
            STATUS_QUEUE,
            durable=True,
            arguments=work_queue_arguments(STATUS_QUEUE),
        )
        channel.exchange_declare("verloop.statuses", exchange_type="direct", durable=True)
        channel.exchange_declare("verloop.events", exchange_type="topic", durable=True)
        channel.queue_bind(STATUS_QUEUE, "verloop.statuses", routing_key=STATUS_QUEUE)
    finally:
        connection.close()


def _ready(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()
