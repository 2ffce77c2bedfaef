"""The events outbox: outcome events reach RabbitMQ through a Redis stream, so a job's ack
never waits for a publisher confirm.

The finisher adds each event to ``verloop:events:outbox`` before the job is acknowledged; a relay
thread per process reads it as consumer group ``relay``, publishes a batch in one AMQP
transaction (sent in one write) and deletes it only once RabbitMQ committed (at least once).
Unconfirmed entries are retried, or taken over from a dead relay; an entry that can never be
published is parked in ``verloop:events:parked`` so it cannot hold back the rest. README.md,
"Outcome events", has the settings.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
import pika
import pika.exceptions
import redis
import structlog

from worker.connections.amqp import (
    close_quietly,
    join_pending_writes,
    open_connection,
    publish_unflushed,
)
from worker.connections.redis import RedisErrors, as_text
from worker.finish.events import build_event, declare_exchange, routing_key

__all__ = ["GROUP", "PARKED_STREAM", "PARK_KINDS", "STREAM", "EventOutbox", "OutboxRelay"]

STREAM: Final = "verloop:events:outbox"
GROUP: Final = "relay"
#: Where entries that cannot be published go, with their reason (see the module docstring).
PARKED_STREAM: Final = "verloop:events:parked"
#: The parked stream keeps about this many entries (the newest).
PARKED_MAX_LEN: Final = 10_000
#: AMQP's limit on a routing key and on the short-string properties.
_SHORT_STRING_BYTES: Final = 255
#: A text of at most this many characters is within that limit (4 UTF-8 bytes at most each).
_SURELY_SHORT_CHARS: Final = _SHORT_STRING_BYTES // 4
#: What publishing an entry raises when the entry itself is at fault (not the connection):
#: pika's ShortStringTooLong is an AMQPError, so it is listed before the outage handling sees it.
_ENTRY_FAULTS = (
    pika.exceptions.ShortStringTooLong,
    ValueError,
    TypeError,
    UnicodeError,
    struct.error,
)

_log = structlog.get_logger()
#: Adding an event: a Redis error becomes RedisUnavailable("events outbox: <error>").
_REDIS: Final = RedisErrors("events outbox: {error}")


def _entry_values(
    fields: Mapping[str, Any], extra: Mapping[str, Any] | None
) -> tuple[str, str, str, str, str]:
    """The stream entry of one event, its fields' values in order ``k``, ``b``, ``t``, ``m``,
    ``a``: routing key, body, and the AMQP properties' values (type, message id, timestamp)."""
    key = routing_key(fields)
    body = build_event(fields, extra, key=key)
    return (
        key,
        orjson.dumps(body, default=str).decode(),
        body["event"],
        str(fields.get("message_id") or ""),
        str(int(body["at"])),
    )


def _entry(fields: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[Any, Any]:
    """The stream entry of one event, as a mapping (see :func:`_entry_values`)."""
    key, body, event_type, message_id, at = _entry_values(fields, extra)
    return {"k": key, "b": body, "t": event_type, "m": message_id, "a": at}


class EventOutbox:
    """Adds events to the outbox stream (see the module docstring)."""

    def __init__(
        self, cache: redis.Redis, *, stream: str = STREAM, max_len: int = 1_000_000
    ) -> None:
        self.cache = cache
        self.stream = stream
        self.max_len = max_len

    def command(
        self, fields: Mapping[str, Any], extra: Mapping[str, Any] | None
    ) -> tuple[Any, ...]:
        """The Redis command that adds the event, for a caller that sends it with others.

        Raises:
            TypeError, ValueError: the event cannot be encoded (the caller logs it and goes on).
        """
        key, body, event_type, message_id, at = _entry_values(fields, extra)
        return (
            "XADD", self.stream, "MAXLEN", "~", self.max_len, "*",
            "k", key, "b", body, "t", event_type, "m", message_id, "a", at,
        )  # fmt: skip

    @staticmethod
    def entry(fields: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[Any, Any]:
        """The stream entry of one event, for a caller that adds it itself (a status job's
        script adds it only when the status is new).

        Raises:
            TypeError, ValueError: the event cannot be encoded.
        """
        return _entry(fields, extra)

    def add(self, fields: Mapping[str, Any], extra: Mapping[str, Any] | None) -> None:
        """Add the event now.

        Raises:
            RedisUnavailable: Redis did not answer; the caller publishes directly.
            TypeError, ValueError: the event cannot be encoded.
        """
        entry = _entry(fields, extra)
        with _REDIS:
            self.cache.xadd(self.stream, entry, maxlen=self.max_len, approximate=True)


#: Why entries are parked, as metrics count them.
PARK_KINDS: Final = ("not_an_event", "too_long", "unencodable")


def _unpublishable(fields: Mapping[Any, Any]) -> tuple[str, str] | None:
    """(kind, reason) of an outbox entry that can never be published, or None."""
    key, body = fields.get("k"), fields.get("b")
    if not key or body is None:
        return "not_an_event", "no routing key or body"
    for name, field in (("routing key", "k"), ("message id", "m"), ("event type", "t")):
        text = as_text(fields.get(field, ""))
        if len(text) > _SURELY_SHORT_CHARS and (
            len(text.encode("utf-8", "surrogatepass")) > _SHORT_STRING_BYTES
        ):
            return "too_long", f"{name} longer than AMQP's {_SHORT_STRING_BYTES} bytes"
    return None


class OutboxRelay:
    """Publishes the outbox's events to the exchange; one per worker process, in a thread.

    :meth:`run_once` is one step (read a batch, publish it, delete it); :meth:`start` runs steps
    in a daemon thread until :meth:`stop`, which drains what is left for up to its timeout.
    """

    def __init__(
        self,
        cache: redis.Redis,
        amqp_url: str,
        exchange: str,
        *,
        stream: str = STREAM,
        group: str = GROUP,
        consumer: str | None = None,
        batch: int = 256,
        block_ms: int = 100,
        linger_ms: int = 100,
        retry_s: float = 1.0,
        reclaim_s: float = 30.0,
        forget_after_s: float = 3600.0,
        on_published: Callable[[int, bool], None] | None = None,
        on_parked: Callable[[str], None] | None = None,
        on_length: Callable[[int], None] | None = None,
    ) -> None:
        self.cache = cache
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.batch = batch
        self.block_ms = block_ms
        #: After a batch smaller than ``batch``, wait this long so the next one gathers more.
        self.linger_s = linger_ms / 1000
        self.retry_s = retry_s
        self.reclaim_s = reclaim_s
        #: A consumer (a relay's process) with nothing pending and silent this long is gone.
        self.forget_after_s = forget_after_s
        #: Called with (count, ok) after each batch: the metrics hook.
        self.on_published = on_published
        #: Called with the kind (one of :data:`PARK_KINDS`) of each parked entry.
        self.on_parked = on_parked
        #: Called with the outbox's length now and then (every housekeeping round).
        self.on_length = on_length
        self._connection: Any = None
        self._channel: Any = None
        #: Reads the stream without decoding (see :meth:`_read`), made on first use.
        self._undecoded: redis.Redis | None = None
        self._group_ready = False
        #: Our own pending entries (taken, not yet confirmed) come first.
        self._own_pending = True
        self._next_reclaim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    # --- the thread ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the relay in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="verloop-events-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after relaying what is left (for at most ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 1)
            stuck, self._thread = self._thread.is_alive(), None
            if stuck:  # still inside a call: leave the rest to the next relay
                return
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and self.run_once(block=False):
                pass
        except (redis.RedisError, pika.exceptions.AMQPError, OSError) as exc:
            _log.warning("events left in the outbox at shutdown", error=type(exc).__name__)
        self._close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                relayed = self.run_once(block=True)
                if 0 < relayed < self.batch and self.linger_s > 0:
                    # Each batch costs a read, a commit and an acknowledgement whatever its size:
                    # a short wait lets the next one carry many events instead of one or two.
                    self._stop.wait(self.linger_s)
                if self._failures:
                    _log.info("outcome events are being published again", after=self._failures)
                    self._failures = 0
            except (redis.RedisError, pika.exceptions.AMQPError, OSError) as exc:
                # Nothing is lost: the batch stays pending and is taken again after retry_s.
                self._close()
                self._own_pending = True
                if self._failures % 60 == 0:
                    _log.error(
                        "outcome events could not be relayed; they stay in the outbox",
                        error=type(exc).__name__,
                        detail=str(exc)[:200],
                        attempts=self._failures + 1,
                    )
                self._failures += 1
                if self.on_published is not None:
                    self.on_published(0, False)
                self._stop.wait(self.retry_s)

    # --- one step --------------------------------------------------------------------------------
    def run_once(self, *, block: bool = False) -> int:
        """Relay one batch; returns how many events RabbitMQ committed (0: nothing to do, or
        only entries that were not events, which are dropped)."""
        self._ensure_group()
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + min(self.reclaim_s, 10.0)
            if self._reclaim():
                self._own_pending = True
            self._forget_gone_consumers()
            if self.on_length is not None:
                self.on_length(int(self.cache.xlen(self.stream)))
        try:
            if self._own_pending:
                entries, undecodable = self._read("0", block_ms=None)
                if not entries and not undecodable:
                    self._own_pending = False
                    return 0
            else:
                entries, undecodable = self._read(">", block_ms=self.block_ms if block else None)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted (FLUSHDB): make it again
                self._group_ready = False
                return 0
            raise
        if not entries and not undecodable:
            if self._connection is not None and self._connection.is_open:
                self._connection.process_data_events(time_limit=0)  # heartbeats while idle
            return 0
        published, parked = self._publish(entries) if entries else (0, [])
        parked += [(i, f, ("unencodable", "its fields are not UTF-8 text")) for i, f in undecodable]
        ids = [entry_id for entry_id, _ in entries] + [entry_id for entry_id, _ in undecodable]
        pipe = self.cache.pipeline(transaction=False)
        for entry_id, fields, (_, reason) in parked:
            # Kept for a person to look at (XRANGE verloop:events:parked - +), not retried.
            kept: dict[Any, Any] = dict(fields)
            kept.update(entry=entry_id, reason=reason, parked_at=f"{time.time():.3f}")
            pipe.xadd(PARKED_STREAM, kept, maxlen=PARKED_MAX_LEN, approximate=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.execute()
        for entry_id, _, (kind, reason) in parked:
            _log.error(
                "outcome event parked: it cannot be published", entry=entry_id, reason=reason
            )
            if self.on_parked is not None:
                self.on_parked(kind)
        if self.on_published is not None:
            self.on_published(published, True)
        return published

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.cache.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _read(
        self, start: str, *, block_ms: int | None
    ) -> tuple[list[tuple[str, dict[str, str] | None]], list[tuple[str, dict[str, str]]]]:
        """A batch: its entries, and those whose bytes are not UTF-8 text (to be parked; their
        fields with such bytes escaped). The stream is read undecoded: a client that decodes
        would fail the whole read on one such entry, again at every read, and stall the relay
        of every process."""
        if self._undecoded is None:
            pool = self.cache.connection_pool
            kwargs = pool.connection_kwargs | {"decode_responses": False}
            self._undecoded = redis.Redis(
                connection_pool=redis.ConnectionPool(
                    connection_class=pool.connection_class, **kwargs
                )
            )
        answer: Any = self._undecoded.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch, block=block_ms
        )
        entries: list[tuple[str, dict[str, str] | None]] = []
        undecodable: list[tuple[str, dict[str, str]]] = []
        # [[stream, [(id, fields), ...]]]; a deleted entry still pending comes back as (id, None).
        for raw_id, raw in answer[0][1] if answer else ():
            entry_id = as_text(raw_id)
            if raw is None:
                entries.append((entry_id, None))
                continue
            try:
                entries.append((entry_id, {k.decode(): v.decode() for k, v in raw.items()}))
            except UnicodeDecodeError:
                escaped = {
                    k.decode(errors="backslashreplace"): v.decode(errors="backslashreplace")
                    for k, v in raw.items()
                }
                undecodable.append((entry_id, escaped))
        return entries, undecodable

    def _reclaim(self) -> bool:
        """Take over entries another relay took and left unconfirmed for ``reclaim_s``."""
        answer = self.cache.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=int(self.reclaim_s * 1000),
            start_id="0-0",
            count=self.batch,
            justid=True,
        )
        claimed = answer[1] if isinstance(answer, list | tuple) and len(answer) > 1 else []
        return bool(claimed)

    def _forget_gone_consumers(self) -> None:
        """Drop the group's consumers of relays that exited: nothing pending, long silent.

        Every process's relay joins the group under its own name; without this, each restart
        would leave one behind. A live relay reads every ``block_ms``, so it is never silent
        long; one dropped anyway would be re-created by its next read.
        """
        for info in self.cache.xinfo_consumers(self.stream, self.group):
            name = as_text(info.get("name", ""))
            pending, idle_ms = int(info.get("pending", 1)), int(info.get("idle", 0))
            if name != self.consumer and pending == 0 and idle_ms > self.forget_after_s * 1000:
                self.cache.xgroup_delconsumer(self.stream, self.group, name)

    def _publish(
        self, entries: list[tuple[str, dict[str, str] | None]]
    ) -> tuple[int, list[tuple[str, dict[str, str], tuple[str, str]]]]:
        """Publish the entries in one transaction, sent in one write; returns how many were
        published, and the entries parked instead (id, fields, (kind, reason))."""
        channel = self._open_channel()
        publish = publish_unflushed(channel)
        published = 0
        parked: list[tuple[str, dict[str, str], tuple[str, str]]] = []
        for entry_id, fields in entries:
            if fields is None:
                continue  # deleted after it was taken: it was published already
            why = _unpublishable(fields)
            if why is None:
                try:
                    self._publish_one(publish, fields)
                    published += 1
                    continue
                except _ENTRY_FAULTS as exc:
                    # Refused before anything of it was buffered: the channel is still good.
                    why = "unencodable", f"{type(exc).__name__}: {str(exc)[:200]}"
            parked.append((entry_id, {as_text(k): as_text(v) for k, v in fields.items()}, why))
        join_pending_writes(self._connection)
        channel.tx_commit()  # sends the batch and the commit; returns once RabbitMQ committed
        return published, parked

    def _publish_one(self, publish: Callable[..., None], fields: Mapping[str, Any]) -> None:
        timestamp = fields.get("a", "")
        publish(
            self.exchange,
            as_text(fields["k"]),
            as_text(fields["b"]).encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                timestamp=int(timestamp) if str(timestamp).isdigit() else None,
                type=as_text(fields.get("t", "")) or None,
                message_id=as_text(fields.get("m", "")) or None,
            ),
        )

    def _open_channel(self) -> Any:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._close()
        self._connection = open_connection(self.amqp_url)
        channel = self._connection.channel()
        declare_exchange(channel, self.exchange)
        channel.tx_select()
        self._channel = channel
        return channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)
        undecoded, self._undecoded = self._undecoded, None
        if undecoded is not None:
            undecoded.connection_pool.disconnect()
