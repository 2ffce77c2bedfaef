"""QUEUE_TYPE's queue arguments, and the nodes of a multi-node AMQP_URL."""

from __future__ import annotations

import pika.exceptions
import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL

from worker.connections.amqp import amqp_parameter_list, amqp_parameters, split_amqp_urls
from worker.connections.queues import (
    DELIVERY_LIMIT,
    dead_letter_queue_arguments,
    inequivalent_queue,
    work_queue_arguments,
)
from worker.errors import ConfigurationError
from worker.jobs.producer import queue_arguments
from worker.runtime.broker import VerloopBroker
from worker.settings import MAX_SINGLE_DELAY_S, Settings


def test_classic_arguments_are_dramatiq_s_own() -> None:
    """The default path declares exactly what dramatiq's RabbitmqBroker declares."""
    dramatiq_broker = VerloopBroker(url="amqp://guest:guest@127.0.0.1:1/%2F")
    assert work_queue_arguments("verloop.send") == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "verloop.send.XQ",
    }
    assert work_queue_arguments("verloop.send") == dramatiq_broker._build_queue_arguments(
        "verloop.send"
    )
    assert dead_letter_queue_arguments() == {"x-message-ttl": DEAD_MESSAGE_TTL}
    assert queue_arguments("verloop.send") == work_queue_arguments("verloop.send")


def test_quorum_arguments_dead_letter_at_least_once_and_never_set_a_priority() -> None:
    arguments = work_queue_arguments("verloop.campaign", "quorum")
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-dead-letter-routing-key"] == "verloop.campaign.XQ"
    # at-least-once dead-lettering is only honoured with reject-publish overflow.
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-overflow"] == "reject-publish"
    assert "x-max-priority" not in arguments
    dead = dead_letter_queue_arguments("quorum")
    assert dead["x-queue-type"] == "quorum"
    assert dead["x-message-ttl"] == DEAD_MESSAGE_TTL
    assert dead["x-delivery-limit"] >= 2**31 - 1
    assert queue_arguments("verloop.campaign", "quorum") == arguments


def test_the_delivery_limit_outlasts_any_run_of_restarts_during_one_delay() -> None:
    """A delayed job is held unacknowledged for at most MAX_SINGLE_DELAY_S; one return per
    worker restart in that time must stay far below the limit even at a restart every 5 s."""
    assert MAX_SINGLE_DELAY_S / 5 < DELIVERY_LIMIT
    assert DELIVERY_LIMIT > 20  # RabbitMQ 4's default, which the worker must not inherit


def test_the_broker_declares_with_the_configured_type() -> None:
    broker = VerloopBroker(url="amqp://guest:guest@127.0.0.1:1/%2F", queue_type="quorum")
    assert broker._build_queue_arguments("verloop.send") == work_queue_arguments(
        "verloop.send", "quorum"
    )
    assert broker.max_priority is None


def test_queue_type_is_classic_unless_set_and_refuses_other_values() -> None:
    assert Settings().queue_type == "classic"
    assert Settings(queue_type="quorum").queue_type == "quorum"
    with pytest.raises(ValueError, match="queue_type"):
        Settings(queue_type="stream")


def test_only_an_inequivalent_argument_refusal_is_explained() -> None:
    refused = pika.exceptions.ChannelClosedByBroker(
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'verloop.send' in "
        "vhost '/': received 'quorum' but current is 'classic'",
    )
    problem = inequivalent_queue(refused, "quorum")
    assert problem is not None
    assert "QUEUE_TYPE=quorum" in problem
    assert "verloop.send" in problem
    assert "README.md" in problem
    assert inequivalent_queue(pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND"), "x") is None
    assert inequivalent_queue(OSError("refused"), "quorum") is None


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        ("amqp://u:p@h/%2F", ["amqp://u:p@h/%2F"]),
        ("amqp://u:p@a/%2F,amqp://u:p@b/%2F", ["amqp://u:p@a/%2F", "amqp://u:p@b/%2F"]),
        (" amqp://a/, AMQPS://b/ ,amqp://c/", ["amqp://a/", "AMQPS://b/", "amqp://c/"]),
        # A comma not followed by a scheme stays in its URL (a password, ssl_options).
        (
            "amqp://u:p,w@a/?ssl_options={'a':1,'b':2}",
            ["amqp://u:p,w@a/?ssl_options={'a':1,'b':2}"],
        ),
    ],
)
def test_amqp_url_splits_only_where_a_new_url_starts(value: str, urls: list[str]) -> None:
    assert split_amqp_urls(value) == urls


def test_each_node_gets_the_same_overrides() -> None:
    nodes = amqp_parameter_list(
        "amqp://u:p@a:5672/%2F,amqp://u:p@b:5673/v", connection_attempts=1, socket_timeout=3
    )
    assert [(n.host, n.port, n.virtual_host) for n in nodes] == [("a", 5672, "/"), ("b", 5673, "v")]
    assert {(n.connection_attempts, n.socket_timeout) for n in nodes} == {(1, 3)}


def test_amqp_parameters_takes_one_node_and_says_so_without_a_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        amqp_parameters("amqp://u:s3cret@a/%2F,amqp://u:s3cret@b/%2F")
    assert "s3cret" not in str(caught.value)
    assert "amqp_parameter_list" in str(caught.value)
    with pytest.raises(ConfigurationError):
        amqp_parameter_list(" ")
