"""worker.connections.amqp against the real RabbitMQ: parameters, opening, closing quietly, and
the channel that is opened again after a failure."""

from __future__ import annotations

from typing import Any

import pika.exceptions
import pytest

from tests.integration.conftest import AMQP_URL
from worker.connections.amqp import (
    ReconnectingChannel,
    amqp_parameters,
    close_quietly,
    open_connection,
)
from worker.errors import ConfigurationError
from worker.jobs import producer


def test_amqp_parameters_sets_only_what_it_is_given() -> None:
    plain = amqp_parameters(AMQP_URL)
    tuned = amqp_parameters(
        AMQP_URL,
        connection_attempts=1,
        socket_timeout=5,
        blocked_connection_timeout=30,
        heartbeat=0,
    )
    assert (tuned.connection_attempts, tuned.socket_timeout) == (1, 5)
    assert (tuned.blocked_connection_timeout, tuned.heartbeat) == (30, 0)
    assert plain.heartbeat == pika.URLParameters(AMQP_URL).heartbeat
    assert producer.amqp_parameters is amqp_parameters  # still importable from the producer


def test_an_unreadable_url_is_a_configuration_error_without_the_password() -> None:
    url = "amqp://guest:s3cret-pw@127.0.0.1:5672/%2F?ssl_options=not-a-dict"
    with pytest.raises(ConfigurationError) as caught:
        open_connection(url)
    assert "s3cret-pw" not in str(caught.value)
    assert "AMQP_URL" in str(caught.value)


def test_close_quietly_takes_none_and_closed_connections() -> None:
    connection = open_connection(AMQP_URL)
    assert connection.is_open
    close_quietly(connection)
    assert not connection.is_open
    close_quietly(connection)
    close_quietly(None)


def test_the_channel_is_kept_while_open_and_set_up_once_per_connection() -> None:
    prepared: list[Any] = []
    holder = ReconnectingChannel(AMQP_URL, setup=prepared.append)
    try:
        first = holder.channel()
        assert holder.channel() is first
        assert prepared == [first]
        assert first.is_open
    finally:
        holder.reset()
    assert holder.connection is None
    assert not first.is_open


def test_a_closed_connection_is_replaced_by_a_new_one_on_next_use() -> None:
    prepared: list[Any] = []
    holder = ReconnectingChannel(AMQP_URL, setup=prepared.append)
    try:
        first = holder.channel()
        old = holder.connection
        old.close()  # as if RabbitMQ or the network dropped it
        second = holder.channel()
        assert second is not first
        assert holder.connection is not old
        assert second.is_open
        assert prepared == [first, second]
    finally:
        holder.reset()


def test_a_channel_closed_by_the_broker_is_replaced_on_next_use() -> None:
    holder = ReconnectingChannel(AMQP_URL)
    try:
        first = holder.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            first.queue_declare("verloop.no-such-queue", passive=True)
        second = holder.channel()
        assert second is not first
        assert second.is_open
    finally:
        holder.reset()


def test_a_failed_setup_leaves_no_connection_behind() -> None:
    """A setup that fails (here: a missing exchange) raises; the connection it opened is
    closed by the next attempt, which runs setup again on a new one."""
    calls: list[Any] = []

    def setup(channel: Any) -> None:
        calls.append(channel)
        channel.exchange_declare("verloop.no-such-exchange", passive=True)

    holder = ReconnectingChannel(AMQP_URL, setup=setup)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            holder.channel()
        failed = holder.connection
        assert failed is not None
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            holder.channel()
        assert not failed.is_open
        assert len(calls) == 2
    finally:
        holder.reset()
    assert holder.connection is None
