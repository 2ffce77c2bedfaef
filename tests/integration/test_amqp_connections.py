"""worker.connections.amqp against the real RabbitMQ: parameters, opening, closing quietly, the
channel that is opened again after a failure, and a batch published in one write."""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions
import pytest

from tests.integration.conftest import AMQP_URL
from worker.connections.amqp import (
    ReconnectingChannel,
    amqp_parameters,
    close_quietly,
    join_pending_writes,
    open_connection,
    publish_unflushed,
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


def test_a_committed_batch_leaves_in_one_write_and_arrives_whole() -> None:
    """publish_unflushed and join_pending_writes rely on pika 1.x's internals
    (``BlockingChannel._impl``, the transport's ``_tx_buffers``). Should a pika upgrade move
    them, the relay still works (one send() per frame, as before) but this test fails."""
    connection = open_connection(AMQP_URL)
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.tx_select()
        publish = publish_unflushed(channel)
        assert publish != channel.basic_publish  # the buffering call, not the fallback
        transport = connection._impl._transport
        sends: list[int] = []
        send = transport._sigint_safe_send

        def counted(sock: Any, data: bytes) -> int:
            sends.append(len(data))
            return int(send(sock, data))

        transport._sigint_safe_send = counted
        for n in range(50):
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                timestamp=1_700_000_000 + n,
                type="send.sent",
                message_id=f"m-{n}",
            )
            publish("", queue, b'{"n": %d}' % n, properties)
        assert sends == []  # buffered, nothing sent yet
        assert transport.get_write_buffer_size() > 0
        assert join_pending_writes(connection)
        assert len(transport._tx_buffers) == 1
        channel.tx_commit()
        assert len(sends) <= 2  # the batch, then the commit (not 150 frames one by one)
        got = []
        for _ in range(50):
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            assert method is not None
            got.append((body, properties.message_id, properties.timestamp, properties.type))
        assert got == [
            (b'{"n": %d}' % n, f"m-{n}", 1_700_000_000 + n, "send.sent") for n in range(50)
        ]
        assert properties.delivery_mode == 2
        assert properties.content_type == "application/json"
    finally:
        close_quietly(connection)


def test_a_message_that_cannot_be_encoded_is_refused_before_it_is_buffered() -> None:
    """A routing key over AMQP's 255 bytes raises before anything of it is buffered: the
    messages around it are committed, the channel stays open."""
    connection = open_connection(AMQP_URL)
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.tx_select()
        publish = publish_unflushed(channel)
        publish("", queue, b"first")
        size = connection._impl._transport.get_write_buffer_size()
        with pytest.raises(pika.exceptions.ShortStringTooLong):
            publish("", "q" * 300, b"refused")
        assert connection._impl._transport.get_write_buffer_size() == size
        publish("", queue, b"second")
        join_pending_writes(connection)
        channel.tx_commit()
        bodies = [channel.basic_get(queue, auto_ack=True)[2] for _ in range(2)]
        assert bodies == [b"first", b"second"]
        assert channel.is_open
    finally:
        close_quietly(connection)


def test_without_pika_s_internals_a_batch_falls_back_to_ordinary_publishing() -> None:
    class Plain:
        def basic_publish(self, *args: Any) -> None:
            raise AssertionError("not called here")

    plain = Plain()
    assert publish_unflushed(plain) == plain.basic_publish
    assert join_pending_writes(plain) is False
    assert join_pending_writes(None) is False
