"""Reading, replaying, purging and exporting dead letters on RabbitMQ."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pika
import pika.exceptions
from dramatiq.common import xq_name

from worker.connections.amqp import amqp_parameter_list, close_quietly, open_connection
from worker.connections.queues import QueueType
from worker.dlq.edits import Edit, apply_edits
from worker.dlq.entries import DLQ_QUEUES, DeadLetterEntry, DlqError
from worker.dlq.filters import Filters
from worker.errors import ConfigurationError, EnqueueError, InvalidJob
from worker.jobs.models import SendMessageJob
from worker.jobs.phones import mask_phone
from worker.jobs.producer import Producer
from worker.jobs.registry import parse_job
from worker.jobs.wire import encode_job
from worker.observability.logging import scrub_text
from worker.send.ledger import Ledger, LedgerKey

__all__ = [
    "DeadLetterStore",
    "Held",
    "ReplayOptions",
    "ReplayResult",
    "replay_body",
]


# --- reading -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Held:
    """A dead letter taken from its queue and not yet acknowledged."""

    entry: DeadLetterEntry
    channel: Any
    delivery_tag: int

    def remove(self) -> None:
        """Acknowledge it: it leaves the dead-letter queue for good.

        Raises:
            DlqError: the channel is gone (the dead letter is back in its queue).
        """
        try:
            self.channel.basic_ack(self.delivery_tag)
        except pika.exceptions.AMQPError as exc:
            raise DlqError(
                f"could not remove {self.entry.id} from {xq_name(self.entry.queue)} "
                f"({type(exc).__name__}); it is still there"
            ) from None


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    edits: tuple[Edit, ...] = ()
    dry_run: bool = False
    drop_sent: bool = False
    resend_uncertain: bool = False


ReplayStatus = Literal["replayed", "would_replay", "dropped", "would_drop", "skipped"]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    id: str
    queue: str
    status: ReplayStatus
    note: str
    to: str | None = None  # masked

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue": self.queue,
            "status": self.status,
            "note": self.note,
            "to": self.to,
        }


class DeadLetterStore:
    """The dead-letter queues of ``queues`` on one RabbitMQ connection. Not thread-safe.

    Use as a context manager; every method that reads takes messages without acknowledging
    them and returns them to their queue when it finishes (see the module docstring).
    """

    def __init__(
        self,
        amqp_url: str,
        queues: Sequence[str] = DLQ_QUEUES,
        *,
        queue_type: QueueType = "classic",
    ) -> None:
        self.queues = tuple(queues)
        try:
            # No heartbeats: the connection idles while an operator reads a purge prompt, and
            # its unacknowledged messages must still be there when they answer. A dead peer is
            # noticed by TCP; RabbitMQ's consumer timeout (30 minutes) bounds the wait.
            params = amqp_parameter_list(
                amqp_url,
                connection_attempts=1,
                socket_timeout=5,
                blocked_connection_timeout=30,
                heartbeat=0,
            )
        except ConfigurationError as exc:
            raise DlqError(str(exc)) from None
        try:
            self._connection = open_connection(params)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise DlqError(f"cannot connect to RabbitMQ ({type(exc).__name__})") from None
        # Replays go through the producer's confirmed publishing, on a connection of its own.
        self._producer = Producer(amqp_url, queue_type=queue_type)
        self._reading: list[Any] = []

    def __enter__(self) -> DeadLetterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection: every dead letter read and not removed is back in its queue."""
        self._reading = []
        self._producer.close()
        close_quietly(self._connection)

    # --- reading ---------------------------------------------------------------------------------
    def depths(self) -> dict[str, int]:
        """Dead letters waiting per work queue (0 when its dead-letter queue does not exist)."""
        depths = {}
        for queue in self.queues:
            channel = self._connection.channel()
            try:
                ok = channel.queue_declare(xq_name(queue), passive=True)
                depths[queue] = int(ok.method.message_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise DlqError(f"cannot read {xq_name(queue)}: {exc.reply_text}") from None
                depths[queue] = 0
            finally:
                if channel.is_open:
                    channel.close()
        return depths

    def held(
        self, filters: Filters, *, on_read: Callable[[], None] | None = None
    ) -> Iterator[Held]:
        """Every matching dead letter, held unacknowledged until :meth:`release` (or
        :meth:`close`), which returns every one not removed with :meth:`Held.remove` to its
        queue, in its place.

        Each queue is read up to the depth it had when reading began. ``on_read`` is called
        for every message read, matching or not.
        """
        for queue, depth in self.depths().items():
            if depth == 0:
                continue
            channel = self._connection.channel()
            self._reading.append(channel)
            for _ in range(depth):
                now_ms = int(time.time() * 1000)
                try:
                    method, properties, body = channel.basic_get(xq_name(queue), auto_ack=False)
                except pika.exceptions.AMQPError as exc:
                    raise DlqError(
                        f"reading {xq_name(queue)} failed ({type(exc).__name__}); "
                        "every dead letter not yet handled stays in its queue"
                    ) from None
                if method is None:
                    break
                if on_read is not None:
                    on_read()
                entry = DeadLetterEntry.from_delivery(queue, properties, bytes(body))
                if filters.matches(entry, now_ms):
                    yield Held(entry, channel, method.delivery_tag)

    def release(self) -> None:
        """Return every dead letter read and not removed to its queue."""
        channels, self._reading = self._reading, []
        for channel in channels:
            if channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.close()  # unacknowledged messages return to their queue

    def entries(
        self, filters: Filters, *, on_read: Callable[[], None] | None = None
    ) -> Iterator[DeadLetterEntry]:
        """Every matching dead letter, read-only: all of them are back in their queue when
        the iteration ends (or is closed)."""
        try:
            for held in self.held(filters, on_read=on_read):
                yield held.entry
        finally:
            self.release()

    # --- removing --------------------------------------------------------------------------------
    @staticmethod
    def remove(helds: Iterable[tuple[Any, int]]) -> int:
        """Acknowledge (channel, delivery tag) pairs of dead letters taken by :meth:`held`
        and not released yet; returns how many.

        Raises:
            DlqError: a channel is gone; what was not removed is back in its queue.
        """
        count = 0
        for channel, tag in helds:
            try:
                channel.basic_ack(tag)
            except pika.exceptions.AMQPError as exc:
                raise DlqError(
                    f"removing dead letters failed after {count} ({type(exc).__name__}); "
                    "the others are still in their queue"
                ) from None
            count += 1
        return count

    # --- replay ----------------------------------------------------------------------------------
    def replay(
        self,
        filters: Filters,
        options: ReplayOptions,
        ledger: Ledger | None,
        *,
        on_read: Callable[[], None] | None = None,
    ) -> Iterator[ReplayResult]:
        """Replay every matching dead letter (see the module docstring for the rules).

        Raises:
            DlqError: a publish was not confirmed or RabbitMQ went away; the dead letter
                being replayed and every later one stay in their queue.
            RedisUnavailable: the ledger could not be read; the same holds.
        """
        try:
            for held in self.held(filters, on_read=on_read):
                yield self._replay_one(held, options, ledger)
        finally:
            self.release()

    def _replay_one(
        self, held: Held, options: ReplayOptions, ledger: Ledger | None
    ) -> ReplayResult:
        entry = held.entry
        masked = mask_phone(entry.recipient) if entry.recipient else None

        def result(status: ReplayStatus, note: str) -> ReplayResult:
            return ReplayResult(entry.id, entry.queue, status, note, masked)

        if entry.undecodable:
            return result(
                "skipped",
                "undecodable body: cannot be replayed (export it, fix it, enqueue it again)",
            )
        payload = entry.payload or {}
        actor = str(payload["actor_name"])
        try:
            kwargs = apply_edits(entry.kwargs, options.edits)
        except ValueError as exc:
            return result("skipped", f"edit does not apply: {exc}")
        args = payload.get("args") or []
        try:
            job = parse_job(actor, args if isinstance(args, list) else [args], kwargs)
        except InvalidJob as exc:
            return result("skipped", f"invalid, not replayed: {scrub_text(str(exc))}")
        message_id = str(payload.get("message_id") or entry.id)
        if isinstance(job, SendMessageJob):
            masked = mask_phone(job.to)
            outcome = self._check_ledger(entry, job, message_id, options, ledger, held)
            if outcome is not None:
                status, note = outcome
                return ReplayResult(entry.id, entry.queue, status, note, masked)
        edited = f" with {', '.join(e.dotted for e in options.edits)} set" if options.edits else ""
        if options.dry_run:
            return ReplayResult(
                entry.id, entry.queue, "would_replay", f"would replay{edited}", masked
            )
        self._publish(entry.queue, replay_body(entry, actor, kwargs, message_id), message_id)
        try:
            held.remove()
        except DlqError:
            raise DlqError(
                f"{entry.id} was replayed but could not be removed from "
                f"{xq_name(entry.queue)}; it is still there (the ledger keeps a second "
                "replay of a send that went out from sending it again)"
            ) from None
        return ReplayResult(
            entry.id, entry.queue, "replayed", f"replayed to {entry.queue}{edited}", masked
        )

    @staticmethod
    def _check_ledger(
        entry: DeadLetterEntry,
        job: SendMessageJob,
        message_id: str,
        options: ReplayOptions,
        ledger: Ledger | None,
        held: Held,
    ) -> tuple[ReplayStatus, str] | None:
        """None to go ahead; else why not. The original job's key is checked too, should an
        edit have changed the key (a message sent under either is not sent again)."""
        if ledger is None:
            raise DlqError("replaying send_message jobs needs the idempotency ledger (Redis)")
        keys = [job.ledger_key(message_id)]
        try:
            original = parse_job("send_message", [], entry.kwargs)
        except InvalidJob:
            original = None
        if isinstance(original, SendMessageJob):
            key = original.ledger_key(message_id)
            if key not in keys:
                keys.append(key)
        pending: list[LedgerKey] = []
        for key in keys:
            found = ledger.lookup(key)
            if found.state == "sent":
                sent = f"already sent (Verloop id {found.message_id or 'unknown'})"
                if not options.drop_sent:
                    return "skipped", f"{sent}, not replayed (--drop-sent removes it)"
                if options.dry_run:
                    return "would_drop", f"{sent}: would remove it, not replay it"
                held.remove()
                return "dropped", f"{sent}: removed from the dead-letter queue, not replayed"
            if found.state == "pending":
                pending.append(key)
        if pending and not options.resend_uncertain:
            return "skipped", (
                "outcome unknown (the ledger holds an unfinished send): not replayed; "
                "--resend-uncertain sends it again, at the risk of a duplicate"
            )
        if pending and not options.dry_run:
            for key in pending:
                ledger.forget_pending(key)
        return None

    def _publish(self, queue: str, body: bytes, message_id: str) -> None:
        try:
            self._producer.publish_body(queue, body, message_id)
        except EnqueueError as exc:
            raise DlqError(f"{scrub_text(str(exc))}; it stays a dead letter") from None


def replay_body(
    entry: DeadLetterEntry, actor: str, kwargs: dict[str, Any], message_id: str
) -> bytes:
    """The body a dead letter is replayed as: a new envelope for its original queue, keeping
    its message id, with no args and no options (retry and deferral counts start again)."""
    return encode_job(actor, kwargs, queue=entry.queue, message_id=message_id)
