"""Blocking connections to RabbitMQ outside dramatiq: reading ``AMQP_URL``, opening, closing,
a channel reopened on a new connection after a failure, and publishing a batch in one write.

Every pika ``BlockingConnection`` of the worker's tools opens and closes here, so a URL pika
cannot read is reported the same way everywhere (never quoting a secret), and closing a broken
connection never raises.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from worker.errors import ConfigurationError
from worker.observability.logging import unreadable_url

__all__ = [
    "ReconnectingChannel",
    "amqp_parameters",
    "close_quietly",
    "join_pending_writes",
    "open_connection",
    "publish_unflushed",
]


def amqp_parameters(
    url: str,
    *,
    connection_attempts: int | None = None,
    socket_timeout: float | None = None,
    blocked_connection_timeout: float | None = None,
    heartbeat: int | None = None,
) -> pika.URLParameters:
    """pika's connection parameters for ``url``, with those given here set over the URL's.

    Raises:
        ConfigurationError: pika cannot read the URL. The message names at most the parameter
            it refused: pika's own messages can quote a value (it evaluates ``ssl_options``,
            which may hold a key file's password).
    """
    try:
        parameters = pika.URLParameters(url)
    except Exception as exc:  # noqa: BLE001 - pika raises many kinds, a SyntaxError among them
        raise ConfigurationError(unreadable_url("AMQP_URL", url, exc)) from None
    if connection_attempts is not None:
        parameters.connection_attempts = connection_attempts
    if socket_timeout is not None:
        parameters.socket_timeout = socket_timeout
    if blocked_connection_timeout is not None:
        parameters.blocked_connection_timeout = blocked_connection_timeout
    if heartbeat is not None:
        parameters.heartbeat = heartbeat
    return parameters


def open_connection(target: str | pika.ConnectionParameters) -> Any:
    """A new ``BlockingConnection`` to ``target`` (a URL, read by :func:`amqp_parameters`).

    Raises:
        ConfigurationError: the URL cannot be read.
        pika.exceptions.AMQPError, OSError: RabbitMQ could not be reached or refused us.
    """
    parameters = amqp_parameters(target) if isinstance(target, str) else target
    return pika.BlockingConnection(parameters)


def close_quietly(connection: Any) -> None:
    """Close ``connection`` if it is open; one that breaks while closing is closed all the same."""
    if connection is not None and connection.is_open:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            connection.close()


# --- a batch in one write -------------------------------------------------------------------------
# pika's BlockingChannel.basic_publish sends each message at once: a poll and a send() per
# frame, three frames a message. A batch committed at its end (AMQP transaction) need not: these
# two functions let its messages wait in the connection's buffer and leave in one send().
# They reach into pika 1.x's internals (``BlockingChannel._impl``, the transport's
# ``_tx_buffers``); without them they fall back to pika's ordinary, slower, behaviour, and
# tests/integration/test_amqp_connections.py fails so that a pika upgrade that moved them is
# noticed.


def publish_unflushed(channel: Any) -> Callable[..., None]:
    """``basic_publish(exchange, routing_key, body, properties)`` for ``channel`` (a
    ``BlockingChannel`` in transaction mode) that only marshals the message into the
    connection's output buffer; the channel's next synchronous call (``tx_commit``) sends it.

    It raises what ``BlockingChannel.basic_publish`` raises for a message that cannot be
    encoded (``ShortStringTooLong``...), before anything of that message is buffered.
    """
    # The underlying asynchronous channel's basic_publish is BlockingChannel's without the
    # flush that follows it (outside confirm mode, which a batch in one write cannot use).
    publish: Callable[..., None] | None = getattr(
        getattr(channel, "_impl", None), "basic_publish", None
    )
    return publish if callable(publish) else channel.basic_publish


def join_pending_writes(connection: Any) -> bool:
    """Join what ``connection`` (a ``BlockingConnection``) has buffered into one chunk, so it
    leaves in one send(): pika's transport sends each buffered frame with a send() of its own.
    False (nothing done) where pika's internals are not the expected ones."""
    transport = getattr(getattr(connection, "_impl", None), "_transport", None)
    chunks = getattr(transport, "_tx_buffers", None)
    if not isinstance(chunks, deque):
        return False
    if len(chunks) > 1:
        joined = b"".join(chunks)
        chunks.clear()
        chunks.append(joined)
    return True


class ReconnectingChannel:
    """One channel on one blocking connection, opened on first use and opened again, on a new
    connection, once either is closed or :meth:`reset` was called (after a failure).

    ``setup`` prepares each new channel (publisher confirms, a declaration...) before it is
    handed out; should it fail, the connection is closed on the next :meth:`reset` or
    :meth:`channel`. Not thread-safe, like the connection itself.
    """

    def __init__(
        self,
        target: str | pika.ConnectionParameters,
        *,
        setup: Callable[[Any], None] | None = None,
    ) -> None:
        self._target = target
        self._setup = setup
        self._connection: Any = None
        self._channel: Any = None

    @property
    def connection(self) -> Any:
        """The connection now held, or None."""
        return self._connection

    def channel(self) -> Any:
        """The channel, opened now (with ``setup``) unless the one held is still open.

        Raises:
            ConfigurationError: the URL cannot be read.
            pika.exceptions.AMQPError, OSError: from opening or ``setup``; call :meth:`reset`
                (or just this again) to try once more on a new connection.
        """
        channel, connection = self._channel, self._connection
        if channel is not None and channel.is_open and connection.is_open:
            return channel
        self.reset()
        self._connection = open_connection(self._target)
        channel = self._connection.channel()
        if self._setup is not None:
            self._setup(channel)
        self._channel = channel
        return channel

    def reset(self) -> None:
        """Forget the channel and close its connection (quietly: it may be broken already)."""
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)
