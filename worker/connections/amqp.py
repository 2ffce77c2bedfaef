"""Blocking connections to RabbitMQ outside dramatiq: reading ``AMQP_URL``, opening, closing,
a channel reopened on a new connection after a failure, and publishing a batch in one write.

Every pika ``BlockingConnection`` of the worker's tools opens and closes here, so a URL pika
cannot read is reported the same way everywhere (never quoting a secret), and closing a broken
connection never raises.

``AMQP_URL`` may name several nodes of a cluster, separated by commas (a comma starts a new URL
only where ``amqp://`` or ``amqps://`` follows, so one inside ``ssl_options`` stays put): every
connection goes to the first node that answers, and a connection opened again after its node
went goes to the first that answers then.
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import pika
import pika.exceptions

from worker.errors import ConfigurationError
from worker.observability.logging import mask_url, unreadable_url

__all__ = [
    "ReconnectingChannel",
    "amqp_parameter_list",
    "amqp_parameters",
    "close_quietly",
    "join_pending_writes",
    "open_connection",
    "publish_unflushed",
    "split_amqp_urls",
]

#: A comma followed by the scheme of another AMQP URL: where ``AMQP_URL`` names the next node.
_NEXT_URL = re.compile(r",\s*(?=amqps?://)", re.IGNORECASE)

#: A connection target: one URL (or several, comma-separated), or pika parameters to try in turn.
Target: TypeAlias = str | pika.ConnectionParameters | Sequence[pika.ConnectionParameters]


def split_amqp_urls(value: str) -> list[str]:
    """The URLs in ``value``: one, or several separated by commas (each new one starting with
    ``amqp://`` or ``amqps://``), in the order they are tried."""
    return [url.strip() for url in _NEXT_URL.split(value.strip()) if url.strip()]


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
    if len(split_amqp_urls(url)) > 1:
        raise ConfigurationError(
            f"AMQP_URL {mask_url(url)} names several nodes: read it with amqp_parameter_list"
        )
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


def amqp_parameter_list(
    urls: str,
    *,
    connection_attempts: int | None = None,
    socket_timeout: float | None = None,
    blocked_connection_timeout: float | None = None,
    heartbeat: int | None = None,
) -> list[pika.URLParameters]:
    """:func:`amqp_parameters` for each URL of ``urls`` (see :func:`split_amqp_urls`), in order.

    Raises:
        ConfigurationError: pika cannot read one of them (the message masks every URL).
    """
    found = split_amqp_urls(urls)
    if not found:
        raise ConfigurationError("AMQP_URL is empty; see config/example.env")
    return [
        amqp_parameters(
            url,
            connection_attempts=connection_attempts,
            socket_timeout=socket_timeout,
            blocked_connection_timeout=blocked_connection_timeout,
            heartbeat=heartbeat,
        )
        for url in found
    ]


def open_connection(target: Target) -> Any:
    """A new ``BlockingConnection`` to the first node of ``target`` that answers (URLs are read
    by :func:`amqp_parameter_list`; pika tries a list of parameters in order).

    Raises:
        ConfigurationError: a URL cannot be read.
        pika.exceptions.AMQPError, OSError: no node could be reached, or one refused us.
    """
    if isinstance(target, str):
        parameters: Any = amqp_parameter_list(target)
        if len(parameters) == 1:
            parameters = parameters[0]
    else:
        parameters = target
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
        target: Target,
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
