"""deploy/rabbitmq/definitions.json's least-privilege users, tried on the real RabbitMQ.

The users and their permission patterns, the queues, exchanges and bindings are read from the
definitions file and created in a vhost of their own, so what ops deploy is what is tested:
the worker runs with its user (and redeclares what the definitions declared, so their
arguments must match), the producer can publish but not read, the jobs producer can reach the
job queues and nothing else, a subscriber can follow events and nothing else, the webhook
receiver's user publishes status jobs and inbound-message events and nothing else. The vhost and
the users get a suffix of this run's own, so runs on a shared RabbitMQ do not meet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
from dramatiq.common import dq_name, xq_name

from tests.integration import test_webhooks
from tests.integration.conftest import Simulator, wait_until, worker_env
from tests.integration.test_webhooks import RunningReceiver, status, webhook
from worker.errors import EnqueueError
from worker.jobs.producer import Producer, queue_arguments
from worker.jobs.wire import encode_job
from worker.receipts.models import STATUS_ACTOR, STATUS_QUEUE
from worker.runtime.app import WorkerApp
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "deploy/rabbitmq/definitions.json"
RUN = uuid.uuid4().hex[:8]
VHOST = f"verloop-perm-test-{RUN}"
PASSWORD = "perm-test-password"  # throwaway users in a throwaway vhost
#: The webhook receiver in this process (its fixture lives with its tests).
start_receiver = test_webhooks.start_receiver
TEXT = {"type": "text", "text": {"body": "hi"}}


def rabbit_user(user: str) -> str:
    """The throwaway user made for ``user`` of the definitions."""
    return f"{user}.{RUN}"


def url(user: str) -> str:
    return f"amqp://{rabbit_user(user)}:{PASSWORD}@127.0.0.1:5672/{VHOST}"


def ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, check=True, timeout=60)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, dict[str, str]]]:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create the definitions' users (RabbitMQ's CLI)")
    definitions = json.loads(DEFINITIONS.read_text())
    permissions = {p["user"]: p for p in definitions["permissions"] if p["user"] != "verloop-admin"}
    ctl("add_vhost", VHOST)
    try:
        ctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")  # to declare and clean up
        for user, perm in permissions.items():
            ctl("add_user", rabbit_user(user), PASSWORD)
            ctl(
                "set_permissions",
                "-p",
                VHOST,
                rabbit_user(user),
                perm["configure"],
                perm["write"],
                perm["read"],
            )
        for topic in definitions["topic_permissions"]:
            ctl(
                "set_topic_permissions",
                "-p",
                VHOST,
                rabbit_user(topic["user"]),
                topic["exchange"],
                topic["write"],
                topic["read"],
            )
        _declare_definitions(definitions)
        yield permissions
    finally:
        for user in permissions:
            subprocess.run(
                ["rabbitmqctl", "-q", "delete_user", rabbit_user(user)],
                capture_output=True,
                timeout=60,
            )
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", VHOST], capture_output=True, timeout=60
        )


def _declare_definitions(definitions: dict[str, Any]) -> None:
    """The definitions' queues, exchanges and bindings, in the test vhost (as guest)."""
    connection = pika.BlockingConnection(
        pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
    )
    channel = connection.channel()
    for queue in definitions["queues"]:
        channel.queue_declare(
            queue["name"],
            durable=queue["durable"],
            auto_delete=queue["auto_delete"],
            arguments=queue["arguments"],
        )
    for exchange in definitions["exchanges"]:
        channel.exchange_declare(
            exchange["name"],
            exchange_type=exchange["type"],
            durable=exchange["durable"],
            auto_delete=exchange["auto_delete"],
            internal=exchange["internal"],
            arguments=exchange["arguments"],
        )
    for binding in definitions["bindings"]:
        assert binding["destination_type"] == "queue"
        channel.queue_bind(
            binding["destination"],
            binding["source"],
            routing_key=binding["routing_key"],
            arguments=binding["arguments"],
        )
    connection.close()


def refused(action: Callable[[Any], Any], user: str) -> bool:
    """Whether RabbitMQ refuses ``action(channel)`` for ``user`` with ACCESS_REFUSED (403)."""
    connection = pika.BlockingConnection(pika.URLParameters(url(user)))
    try:
        action(connection.channel())
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()
    return False


def test_the_worker_user_runs_the_worker_and_the_producer_user_only_publishes(
    users: dict[str, dict[str, str]],
    simulator: Simulator,
    start_worker: Callable[..., WorkerApp],
) -> None:
    start_worker(amqp_url=url("verloop-worker"))
    events = pika.BlockingConnection(pika.URLParameters(url("verloop-subscriber")))
    channel = events.channel()
    channel.queue_declare("events.test", exclusive=True)
    channel.queue_bind("events.test", "verloop.events", routing_key="send.#")

    with Producer(url("verloop-producer")) as producer:
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543210", message=TEXT
        )
    [record] = wait_until(simulator.messages)
    assert record["to"] == "+919876543210"

    def event() -> Any:
        method, _, body = channel.basic_get("events.test", auto_ack=True)
        return json.loads(body) if method is not None else None

    assert wait_until(event)["outcome"] == "sent"
    events.close()

    # The producer can neither read nor purge jobs, nor see the dead letters.
    assert refused(lambda ch: ch.basic_get("verloop.send"), "verloop-producer")
    assert refused(lambda ch: ch.queue_purge("verloop.send"), "verloop-producer")
    assert refused(lambda ch: ch.basic_get("verloop.send.XQ"), "verloop-producer")
    # A subscriber follows events only.
    assert refused(lambda ch: ch.basic_get("verloop.send"), "verloop-subscriber")
    assert refused(lambda ch: ch.queue_declare("verloop.mine"), "verloop-subscriber")
    # KEDA reads queue lengths with a passive declare, and can do nothing else.
    connection = pika.BlockingConnection(pika.URLParameters(url("verloop-keda")))
    assert connection.channel().queue_declare("verloop.send", passive=True)
    connection.close()
    assert refused(lambda ch: ch.basic_get("verloop.send"), "verloop-keda")
    # The worker's user cannot touch anything outside verloop.*.
    assert refused(lambda ch: ch.queue_declare("other.queue"), "verloop-worker")


JOBS_PRODUCER = "verloop-jobs-producer"


FORGED = b'{"forged": true}'


def publish(exchange: str, routing_key: str) -> Callable[[Any], Any]:
    """A confirmed, mandatory publish (a refusal closes the channel before the confirm)."""

    def action(channel: Any) -> None:
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, FORGED, mandatory=True)

    return action


def depth(queue: str) -> int:
    connection = pika.BlockingConnection(
        pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
    )
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_the_jobs_producer_reaches_the_job_queues_and_can_forge_nothing_else(
    users: dict[str, dict[str, str]],
    simulator: Simulator,
    start_worker: Callable[..., WorkerApp],
) -> None:
    """Write on verloop.jobs only: its jobs reach the worker; a publish into a dead-letter or
    delay queue, a subscriber's event queue, a CLI reply queue or the events exchange is
    refused (ACCESS_REFUSED), and another queue's name routes nowhere through verloop.jobs."""
    start_worker(amqp_url=url("verloop-worker"))
    subscriber = pika.BlockingConnection(pika.URLParameters(url("verloop-subscriber")))
    subscriber.channel().queue_declare("events.forge-target")
    reply = pika.BlockingConnection(pika.URLParameters(url("verloop-worker")))
    reply.channel().queue_declare("verloop.cli.forge-target")

    with Producer(url(JOBS_PRODUCER), exchange="verloop.jobs") as producer:
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543210", message=TEXT
        )
    [record] = wait_until(simulator.messages)
    assert record["to"] == "+919876543210"

    targets = [
        "verloop.send.XQ",
        "verloop.send.DQ",
        "verloop.campaign.XQ",
        "events.forge-target",
        "verloop.cli.forge-target",
        "verloop.send",
    ]
    for queue in targets:
        assert refused(publish("", queue), JOBS_PRODUCER), queue
    assert refused(publish("verloop.events", "send.sent.acme.phone-1.none"), JOBS_PRODUCER)
    assert refused(lambda ch: ch.basic_get("verloop.send"), JOBS_PRODUCER)
    assert refused(lambda ch: ch.queue_declare("verloop.mine"), JOBS_PRODUCER)
    assert refused(
        lambda ch: ch.queue_bind("verloop.send.XQ", "verloop.jobs", routing_key="x"),
        JOBS_PRODUCER,
    )
    connection = pika.BlockingConnection(pika.URLParameters(url(JOBS_PRODUCER)))
    try:
        with pytest.raises(pika.exceptions.UnroutableError):
            publish("verloop.jobs", "verloop.send.XQ")(connection.channel())
    finally:
        connection.close()
    # The Producer's default way needs the default exchange: the refusal is named plainly.
    with Producer(url(JOBS_PRODUCER)) as producer, pytest.raises(EnqueueError) as err:
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543211", message=TEXT
        )
    assert "RabbitMQ refused the job: ACCESS_REFUSED" in str(err.value)
    assert PASSWORD not in str(err.value)

    assert [depth(q) for q in targets] == [0] * len(targets)
    subscriber.close()
    reply.close()


def test_send_and_campaign_start_publish_through_the_jobs_exchange_when_told(
    users: dict[str, dict[str, str]], simulator: Simulator, tmp_path: Path
) -> None:
    """PUBLISH_TO_JOBS_EXCHANGE=true: `send` and `campaign start` work with the jobs producer's
    user, before any worker ran (the definitions bind the exchange). Without it they use the
    default exchange, which that user may not write to: a plain error, exit 1."""
    recipients = tmp_path / "recipients.csv"
    recipients.write_text("to,body_1\n+919876543210,Asha\n+919876543211,Ravi\n")
    send = ["send", "--client-id", "acme", "--phone-id", "p1", "--to", "+919876543210"]
    start = ["campaign", "start", str(recipients), "--client-id", "acme", "--phone-id", "p1"]
    start += ["--template", "offer", "--no-progress"]

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "verloop-worker"), *args],
            env=worker_env(simulator, AMQP_URL=url(JOBS_PRODUCER), **env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused_send = cli(*send, "--text", "hi")
    assert refused_send.returncode == 1
    assert "ACCESS_REFUSED" in refused_send.stderr
    assert PASSWORD not in refused_send.stdout + refused_send.stderr
    assert depth("verloop.send") == 0

    sent = cli(*send, "--text", "hi", PUBLISH_TO_JOBS_EXCHANGE="true")
    assert sent.returncode == 0, sent.stderr
    started = cli(*start, PUBLISH_TO_JOBS_EXCHANGE="true")
    assert started.returncode == 0, started.stdout + started.stderr
    assert (depth("verloop.send"), depth("verloop.campaign")) == (1, 2)


WEBHOOKS = "verloop-webhooks"
STATUS_EXCHANGE = Settings.model_fields["status_exchange"].default


def test_the_webhooks_user_publishes_status_jobs_and_inbound_events_and_nothing_else(
    users: dict[str, dict[str, str]],
) -> None:
    """The receiver's user: a status job through the statuses exchange (bound to
    verloop.status alone) and an inbound.message event to verloop.events go through (and the
    worker's user declares and consumes the status queues); the default exchange (which would
    reach every queue), forged outcome events (a topic permission on the events exchange), the
    jobs exchange, declaring, binding and reading are refused."""
    guest = pika.BlockingConnection(
        pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
    )
    watch = guest.channel()
    watch.queue_declare("events.webhooks-check", exclusive=True)
    watch.queue_bind("events.webhooks-check", "verloop.events", routing_key="#")
    kwargs = {
        "statuses": [{"wamid": "wamid.perm-test", "status": "delivered", "timestamp": 1700000000}]
    }
    job = encode_job(STATUS_ACTOR, kwargs, queue=STATUS_QUEUE, message_id=str(uuid.uuid4()))
    event = json.dumps({"version": 1, "event": "inbound.message", "at": 1}).encode()

    connection = pika.BlockingConnection(pika.URLParameters(url(WEBHOOKS)))
    channel = connection.channel()
    channel.confirm_delivery()  # a refusal or an unroutable publish raises
    channel.basic_publish(STATUS_EXCHANGE, STATUS_QUEUE, job, mandatory=True)
    channel.basic_publish("verloop.events", "inbound.message.phone-1", event, mandatory=True)
    connection.close()

    # The worker's user declares the status queues as dramatiq does (the definitions' arguments
    # must be the same, or RabbitMQ refuses) and consumes the job.
    worker = pika.BlockingConnection(pika.URLParameters(url("verloop-worker")))
    consumer = worker.channel()
    for queue in (STATUS_QUEUE, dq_name(STATUS_QUEUE)):
        consumer.queue_declare(queue, durable=True, arguments=queue_arguments(STATUS_QUEUE))
    consumer.queue_declare(
        xq_name(STATUS_QUEUE), durable=True, arguments={"x-message-ttl": DEAD_MESSAGE_TTL}
    )
    method, _, body = consumer.basic_get(STATUS_QUEUE, auto_ack=True)
    assert method is not None
    assert body == job
    worker.close()
    method, _, body = watch.basic_get("events.webhooks-check", auto_ack=True)
    assert (method.routing_key if method else None, body) == ("inbound.message.phone-1", event)

    refusals = {
        "a forged status event": publish("verloop.events", "status.delivered.acme.p1.c1"),
        "a forged send event": publish("verloop.events", "send.sent.acme.phone-1.none"),
        "the jobs exchange": publish("verloop.jobs", "verloop.send"),
        "the default exchange": publish("", "verloop.send"),
        "the default exchange, even to the status queue": publish("", STATUS_QUEUE),
        "another exchange": publish("amq.topic", "inbound.message.phone-1"),
        "declaring the status queue": lambda ch: ch.queue_declare(
            STATUS_QUEUE, durable=True, arguments=queue_arguments(STATUS_QUEUE)
        ),
        "declaring a queue": lambda ch: ch.queue_declare("verloop.webhooks-own"),
        "declaring the events exchange": lambda ch: ch.exchange_declare(
            "verloop.events", exchange_type="topic", durable=True
        ),
        "binding": lambda ch: ch.queue_bind(STATUS_QUEUE, "verloop.events", routing_key="#"),
        "reading status jobs": lambda ch: ch.basic_get(STATUS_QUEUE),
        "reading send jobs": lambda ch: ch.basic_get("verloop.send"),
    }
    for what, action in refusals.items():
        assert refused(action, WEBHOOKS), what
    assert depth(STATUS_QUEUE) == 0
    assert watch.basic_get("events.webhooks-check", auto_ack=True)[0] is None

    guest.close()


def test_the_receiver_runs_with_the_webhooks_user(
    users: dict[str, dict[str, str]], start_receiver: Callable[..., RunningReceiver]
) -> None:
    """`verloop-worker webhooks` with the definitions' verloop-webhooks user: a status and an
    inbound message are published and confirmed (it declares nothing; the exchange check it
    makes is passive)."""
    guest = pika.BlockingConnection(
        pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
    )
    watch = guest.channel()
    watch.queue_purge(STATUS_QUEUE)
    watch.queue_declare("events.receiver-check", exclusive=True)
    watch.queue_bind("events.receiver-check", "verloop.events", routing_key="inbound.message.#")
    receiver = start_receiver(amqp_url=url(WEBHOOKS))
    message = {"from": "919876543210", "id": "wamid.in-perm", "type": "text"}
    assert receiver.post(webhook([status("wamid.perm")], messages=[message])).status_code == 200
    method, _, body = watch.basic_get(STATUS_QUEUE, auto_ack=True)
    assert method is not None
    assert json.loads(body)["kwargs"]["statuses"][0]["wamid"] == "wamid.perm"
    method, _, body = watch.basic_get("events.receiver-check", auto_ack=True)
    assert method is not None
    assert json.loads(body)["message"] == message
    guest.close()
    assert PASSWORD not in receiver.log.getvalue()
