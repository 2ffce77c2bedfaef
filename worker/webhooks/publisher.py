"""Publishing to RabbitMQ from the receiver's event loop, each message confirmed.

aio-pika (on aiormq) keeps any number of publishes in flight on one channel and hands each
its own confirm, so concurrent requests never wait for one another's round trips. Status jobs go
to ``verloop.status`` through ``STATUS_EXCHANGE`` (a direct exchange bound to that queue alone,
so the receiver's RabbitMQ user reaches no other queue), ``mandatory`` and persistent: a job no
queue takes is returned and the request answered 503. Nothing is declared (the webhook user
needs no configure permission; its exchanges are only checked, passively): a worker declares
the queue, binds it and declares the exchanges when it starts.

The connection is opened on first use and again after it broke, to the first node of
``AMQP_URL`` that answers (it may list several, comma-separated); while none can be reached,
a new attempt is made at most every ``retry_s`` and the requests in between fail at once
(503: the sender retries) instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import structlog

from worker.connections.amqp import amqp_parameter_list
from worker.observability.logging import mask_url, scrub_text
from worker.receipts.models import STATUS_QUEUE
from worker.webhooks.throttle import LogThrottle

__all__ = ["Publisher", "Unavailable"]

_CONNECTION_NAME: Final = "verloop-webhooks"
_ERRORS = (aio_pika.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)
_log = structlog.get_logger("worker.webhooks")
_Channel = aio_pika.abc.AbstractChannel
_Exchange = aio_pika.abc.AbstractExchange


class Unavailable(Exception):
    """RabbitMQ did not take a message: the request is answered 503 and the sender retries.

    ``kind`` is one of ``unreachable``, ``no_queue``, ``no_exchange``, ``refused``,
    ``timeout``, ``lost``; the message says what to do, and never quotes a secret.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Publisher:
    """The receiver's RabbitMQ connection: a channel for jobs, a channel for events (a
    missing events exchange closes only its own channel)."""

    def __init__(
        self,
        amqp_url: str,
        *,
        status_exchange: str,
        events_exchange: str,
        timeout_s: float,
        retry_s: float = 1.0,
    ) -> None:
        self._nodes = amqp_parameter_list(amqp_url)  # a URL pika cannot read stops us now
        self._where = mask_url(amqp_url)
        self.status_exchange = status_exchange
        self.events_exchange = events_exchange
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._connection: aio_pika.abc.AbstractConnection | None = None
        #: ``jobs`` and ``events``: a channel and its exchange.
        self._exchanges: dict[str, tuple[_Channel, _Exchange]] = {}
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._failure: Unavailable | None = None
        self._failed_at = -float("inf")
        self._throttle = LogThrottle()

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._connection is not None and not self._connection.is_closed

    async def start(self) -> None:
        """Connect now, so the first request does not wait for it; RabbitMQ down is logged and
        tried again on demand."""
        with contextlib.suppress(Unavailable):  # logged by _connect or _problem
            await self._exchange("jobs")

    async def close(self) -> None:
        """Close the connection (after the last request was answered)."""
        connection, self._connection = self._connection, None
        self._exchanges.clear()
        if connection is not None and not connection.is_closed:
            await _close_quietly(connection)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5)

    async def publish_job(self, body: bytes, message_id: str) -> None:
        """Publish a status job to ``verloop.status`` and wait for its confirm.

        Raises:
            Unavailable: not confirmed (see its ``kind``).
        """
        await self._publish("jobs", _message(body, message_id), STATUS_QUEUE, mandatory=True)

    async def publish_event(
        self, routing_key: str, body: bytes, message_id: str, kind: str
    ) -> None:
        """Publish an event to the events exchange and wait for its confirm (not mandatory: an
        event nobody subscribed to is not an error).

        Raises:
            Unavailable: not confirmed.
        """
        message = _message(body, message_id, kind)
        await self._publish("events", message, routing_key, mandatory=False)

    async def _publish(
        self, which: str, message: aio_pika.Message, routing_key: str, *, mandatory: bool
    ) -> None:
        exchange = await self._exchange(which)
        try:
            await exchange.publish(
                message, routing_key, mandatory=mandatory, timeout=self.timeout_s
            )
        except aio_pika.exceptions.PublishError:
            raise self._problem("no_queue", self._unroutable()) from None
        except aio_pika.exceptions.DeliveryError:
            raise self._problem("refused", "RabbitMQ refused the message (nack)") from None
        except TimeoutError:
            raise self._problem(
                "timeout",
                f"RabbitMQ did not confirm within {self.timeout_s:g} s "
                "(WEBHOOK_PUBLISH_TIMEOUT_S); is it blocked (memory or disk alarm)?",
            ) from None
        except _ERRORS as exc:
            self._forget_connection()
            raise self._problem(
                "lost", f"the connection to RabbitMQ broke: {_describe(exc)}"
            ) from None

    async def _exchange(self, which: str) -> aio_pika.abc.AbstractExchange:
        """The open channel's exchange for ``jobs`` or ``events``, opened if need be."""
        opened = self._exchanges.get(which)
        if opened is not None and not opened[0].is_closed and self.connected:
            return opened[1]
        async with self._lock:
            opened = self._exchanges.get(which)
            if opened is None or opened[0].is_closed or not self.connected:
                opened = await self._open(which, await self._connect())
                self._exchanges[which] = opened
            return opened[1]

    async def _connect(self) -> aio_pika.abc.AbstractConnection:
        if self._connection is not None and not self._connection.is_closed:
            return self._connection
        self._exchanges.clear()
        if self._failure is not None and time.monotonic() - self._failed_at < self.retry_s:
            # Tried a moment ago: answer now rather than pile up (a new exception each time:
            # the one kept must not hold a traceback).
            raise Unavailable(self._failure.kind, self._failure.reason)
        try:
            self._connection = await self._connect_first()
        except (*_ERRORS, TimeoutError) as exc:
            self._failure = Unavailable(
                "unreachable", f"RabbitMQ at {self._where} cannot be reached: {_describe(exc)}"
            )
            self._failed_at = time.monotonic()
            self._throttle.warning(
                "unreachable", "RabbitMQ cannot be reached; answering 503 meanwhile",
                error=self._failure.reason, retry_s=self.retry_s,
            )  # fmt: skip
            raise Unavailable(self._failure.kind, self._failure.reason) from None
        if self._failure is not None:
            _log.info("connected to RabbitMQ again", amqp=self._where)
        self._failure = None
        return self._connection

    async def _connect_first(self) -> aio_pika.abc.AbstractConnection:
        """A connection to the first node that answers; the last node's failure if none does."""
        for index, params in enumerate(self._nodes):
            ssl = params.ssl_options
            try:
                return await aio_pika.connect(
                    host=params.host,
                    port=params.port,
                    login=params.credentials.username,
                    password=params.credentials.password,
                    virtualhost=params.virtual_host,
                    ssl=ssl is not None,
                    ssl_context=ssl.context if ssl is not None else None,
                    timeout=self.timeout_s,
                    client_properties={"connection_name": _CONNECTION_NAME},
                )
            except (*_ERRORS, TimeoutError):
                if index == len(self._nodes) - 1:
                    raise
        raise AssertionError("amqp_parameter_list returns at least one node")

    async def _open(
        self, which: str, connection: aio_pika.abc.AbstractConnection
    ) -> tuple[_Channel, _Exchange]:
        """A new channel in confirm mode and its exchange, checked to exist (passively)."""
        name = self.status_exchange if which == "jobs" else self.events_exchange
        try:
            channel = await connection.channel(
                publisher_confirms=True, on_return_raises=which == "jobs"
            )
            return channel, await channel.get_exchange(name, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise self._problem(
                "no_exchange",
                f"exchange {name!r} does not exist: start a worker: it declares it "
                "(deploy/rabbitmq/definitions.json declares it too)",
            ) from None
        except (*_ERRORS, TimeoutError) as exc:
            self._forget_connection()
            raise self._problem(
                "lost", f"could not open a channel on RabbitMQ: {_describe(exc)}"
            ) from None

    def _forget_connection(self) -> None:
        """After a failure on it: a new connection is opened on the next publish (aio-pika may
        still call a connection open whose socket is gone)."""
        connection, self._connection = self._connection, None
        self._exchanges.clear()
        if connection is not None and not connection.is_closed:
            task = asyncio.get_running_loop().create_task(_close_quietly(connection))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _unroutable(self) -> str:
        return (
            f"no queue {STATUS_QUEUE!r} is bound to exchange {self.status_exchange!r}: start a "
            "worker: it declares the queue and binds it"
        )

    def _problem(self, kind: str, reason: str) -> Unavailable:
        self._throttle.warning(kind, "RabbitMQ did not take a message; answering 503", error=reason)
        return Unavailable(kind, reason)


async def _close_quietly(connection: aio_pika.abc.AbstractConnection) -> None:
    with contextlib.suppress(*_ERRORS, TimeoutError):
        await asyncio.wait_for(connection.close(), timeout=5)


def _describe(exc: BaseException) -> str:
    """An exception in a few words, secrets and URL passwords removed."""
    text = str(exc)[:200]
    return scrub_text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _message(body: bytes, message_id: str, kind: str | None = None) -> aio_pika.Message:
    """A persistent JSON message, stamped with its id and the time."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        timestamp=int(time.time()),
        type=kind,
    )
