"""deploy/rabbitmq/definitions.json's least-privilege users, tried on the real RabbitMQ.

The users and their permission patterns are read from the definitions file and created in a
vhost of their own, so what ops deploy is what is tested: the worker runs with its user, the
producer can publish but not read, a subscriber can follow events and nothing else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from worker.app import WorkerApp
from worker.producer import Producer

from .conftest import Simulator, wait_until

DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy/rabbitmq/definitions.json"
VHOST = "verloop-perm-test"
PASSWORD = "perm-test-password"  # throwaway users in a throwaway vhost
TEXT = {"type": "text", "text": {"body": "hi"}}


def url(user: str) -> str:
    return f"amqp://{user}:{PASSWORD}@127.0.0.1:5672/{VHOST}"


def ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, check=True, timeout=60)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, dict[str, str]]]:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create the definitions' users (RabbitMQ's CLI)")
    definitions = json.loads(DEFINITIONS.read_text())
    permissions = {p["user"]: p for p in definitions["permissions"] if p["user"] != "verloop-admin"}
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", VHOST], capture_output=True, timeout=60)
    ctl("add_vhost", VHOST)
    ctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")  # to clean up queues
    for user, perm in permissions.items():
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)
        ctl("add_user", user, PASSWORD)
        ctl("set_permissions", "-p", VHOST, user, perm["configure"], perm["write"], perm["read"])
    yield permissions
    for user in permissions:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", VHOST], capture_output=True, timeout=60)


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
