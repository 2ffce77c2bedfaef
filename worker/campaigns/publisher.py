"""Publishing a campaign's rows: the confirm loop of one run over the file.

Pipelined on one pika ``SelectConnection``: up to ``window`` persistent, ``mandatory`` messages
in flight to ``verloop.campaign`` (declared first with the worker's arguments); the checkpoint
advances as confirms arrive. The connection goes to the first node of ``AMQP_URL`` that
answers. Resume, Ctrl-C and failures: :mod:`worker.campaigns.enqueue`.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

import orjson
import pika
import pika.exceptions
import pika.spec

from worker.campaigns.reader import RawRow
from worker.campaigns.rejects import RejectsFile
from worker.campaigns.rows import RowValidator
from worker.campaigns.store import CampaignRef, CampaignStore
from worker.connections.amqp import amqp_parameter_list
from worker.connections.queues import QueueType, inequivalent_queue
from worker.errors import EnqueueError
from worker.jobs.models import CAMPAIGN_QUEUE
from worker.jobs.producer import queue_arguments
from worker.jobs.wire import build_envelope
from worker.observability.logging import mask_url, scrub_text

__all__ = [
    "CONFIRM_TIMEOUT_S",
    "CampaignEnqueueError",
    "Checkpoint",
    "PublishRun",
    "encode_envelope",
]

#: Rows handled per turn of the event loop, so acks and socket writes are served in between.
_SLICE: Final = 256
#: A run with messages in flight and no confirm for this long fails (resumable).
CONFIRM_TIMEOUT_S: Final = 60.0
_ACTOR: Final = "send_message"


class CampaignEnqueueError(EnqueueError):
    """The run stopped before the end; running the same command again resumes it."""


class Checkpoint(NamedTuple):
    """Rows done from the start of the file, and the counts up to there."""

    rows_done: int
    enqueued: int
    rejected: int


class _Pending(NamedTuple):
    tag: int
    row: int
    message_id: str
    after: Checkpoint


class PublishRun:
    """One pass over the file on one connection (see the module docstring)."""

    def __init__(
        self,
        *,
        amqp_url: str,
        exchange: str,
        queue_type: QueueType = "classic",
        rows: Iterator[RawRow],
        validator: RowValidator,
        rejects: RejectsFile,
        store: CampaignStore,
        campaign: CampaignRef,
        start: Checkpoint,
        window: int,
        max_job_bytes: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.queue_type = queue_type
        self.rows = rows
        self.validator = validator
        self.rejects = rejects
        self.store = store
        self.campaign = campaign
        self.window = window
        self.max_job_bytes = max_job_bytes
        self.progress = progress
        self.rows_done, self.enqueued, self.rejected = start
        self.confirmed = start
        self.checkpointed = start
        self.pending: collections.deque[_Pending] = collections.deque()
        self.acked_early: set[int] = set()
        self.next_tag = 0
        self.eof = False
        self.done = False
        self.error: str | None = None
        self.last_confirm = time.monotonic()
        self.pump_scheduled = False
        self.closing = False
        #: Ctrl-C: publish nothing more, wait for the confirms in flight, checkpoint, stop.
        self.interrupted = False
        self.connection: Any = None
        self.channel: Any = None
        #: The last connection could not be opened at all (the next node is tried).
        self.open_failed = False

    # --- connection lifecycle ------------------------------------------------------------------
    def run(self) -> None:
        nodes = amqp_parameter_list(self.amqp_url)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main_thread else None
        try:
            for parameters in nodes:  # the first node that answers
                self.error, self.open_failed = None, False
                self.connection = pika.SelectConnection(
                    parameters,
                    on_open_callback=self._on_open,
                    on_open_error_callback=self._on_open_error,
                    on_close_callback=self._on_closed,
                )
                try:
                    self.connection.ioloop.start()
                finally:
                    self.connection.ioloop.close()  # its wake-up socket pair
                if not self.open_failed or self.interrupted:
                    break
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
            self.rejects.flush()
        if self.error is not None:
            raise CampaignEnqueueError(self.error)
        if self.interrupted and not self.eof:
            raise KeyboardInterrupt

    def _on_sigint(self, *_: object) -> None:
        if self.interrupted:  # a second Ctrl-C: stop at once (the checkpoint is still right)
            raise KeyboardInterrupt
        self.interrupted = True
        self.connection.ioloop.add_callback_threadsafe(self._guarded(self._pump))

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, _: Any, exc: BaseException) -> None:
        self.open_failed = True
        self.error = f"cannot connect to RabbitMQ at {mask_url(self.amqp_url)} ({_describe(exc)})"
        self.connection.ioloop.stop()

    def _on_closed(self, _: Any, exc: BaseException) -> None:
        if not self.closing and self.error is None:
            self.error = self._stopped_at(f"the connection to RabbitMQ closed ({_describe(exc)})")
        self.connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_ok)

    def _on_confirm_ok(self, _: Any) -> None:
        if self.exchange:
            # Needs no permission; a missing exchange closes the channel, naming it.
            self.channel.exchange_declare(self.exchange, passive=True, callback=self._on_declared)
            return
        self.channel.queue_declare(
            CAMPAIGN_QUEUE,
            durable=True,
            arguments=queue_arguments(CAMPAIGN_QUEUE, self.queue_type),
            callback=self._on_declared,
        )

    def _on_declared(self, _: Any) -> None:
        self.connection.ioloop.call_later(1.0, self._watch)
        self._schedule()

    def _on_channel_closed(self, _: Any, exc: BaseException) -> None:
        if not self.closing:
            problem = inequivalent_queue(exc, self.queue_type)
            if problem is not None:
                self._fail(problem)
                return
            self._fail(self._stopped_at(f"RabbitMQ closed the channel ({_describe(exc)})"))

    # --- publishing ----------------------------------------------------------------------------
    def _schedule(self) -> None:
        if not self.pump_scheduled and not self.closing:
            self.pump_scheduled = True
            self.connection.ioloop.call_later(0, self._guarded(self._pump))

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - any failure stops the run, resumably
                self._fail(self._stopped_at(_describe(exc)))

        return call

    def _pump(self) -> None:
        self.pump_scheduled = False
        if self.closing:
            return
        budget = _SLICE
        pending, rows, validator = self.pending, self.rows, self.validator
        properties_ts = int(time.time())
        while budget and len(pending) < self.window and not self.interrupted:
            row = next(rows, None)
            if row is None:
                self.eof = True
                break
            budget -= 1
            self.rows_done += 1
            if row.blank:
                continue
            kwargs, reason = validator.validate(row)
            body = b""
            message_id = ""
            if kwargs is not None:
                message_id = str(uuid.uuid4())
                body = encode_envelope(kwargs, message_id)
                if len(body) > self.max_job_bytes:
                    reason = (
                        f"the job would be {len(body)} bytes; the worker takes at most "
                        f"{self.max_job_bytes} (MAX_JOB_BYTES)"
                    )
            if reason is not None:
                self.rejected += 1
                self.rejects.write(row, reason)
                continue
            self.channel.basic_publish(
                self.exchange,
                CAMPAIGN_QUEUE,
                body,
                pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent,
                    content_type="application/json",
                    message_id=message_id,
                    timestamp=properties_ts,
                ),
                mandatory=True,
            )
            self.next_tag += 1
            self.enqueued += 1
            pending.append(
                _Pending(
                    self.next_tag,
                    row.number,
                    message_id,
                    Checkpoint(self.rows_done, self.enqueued, self.rejected),
                )
            )
        if not pending:
            self._advance(self._current())
        if self.progress is not None:
            self.progress(self.rows_done)
        if (self.eof or self.interrupted) and not pending:
            self._finish()
        elif len(pending) < self.window and not self.interrupted:
            self._schedule()

    def _current(self) -> Checkpoint:
        return Checkpoint(self.rows_done, self.enqueued, self.rejected)

    # --- confirms ------------------------------------------------------------------------------
    def _on_confirm(self, frame: Any) -> None:
        try:
            self._confirm(frame.method)
        except Exception as exc:  # noqa: BLE001 - e.g. Redis down while checkpointing
            self._fail(self._stopped_at(_describe(exc)))

    def _confirm(self, method: Any) -> None:
        if self.closing:
            return
        tag, multiple = method.delivery_tag, method.multiple
        pending = self.pending
        if isinstance(method, pika.spec.Basic.Nack):
            refused = [p.row for p in pending if p.tag == tag or (multiple and p.tag <= tag)]
            self._fail(self._stopped_at(f"RabbitMQ refused (nack) row(s) {_rows(refused)}"))
            return
        self.last_confirm = time.monotonic()
        last: _Pending | None = None
        if multiple:
            while pending and pending[0].tag <= tag:
                last = pending.popleft()
        elif pending and pending[0].tag == tag:
            last = pending.popleft()
        else:
            self.acked_early.add(tag)
        while pending and pending[0].tag in self.acked_early:
            self.acked_early.discard(pending[0].tag)
            last = pending.popleft()
        if last is not None:
            self._advance(last.after if pending else self._current())
        if (self.eof or self.interrupted) and not pending:
            self._finish()
        elif len(pending) < self.window and not self.interrupted:
            self._schedule()

    def _on_return(self, _: Any, method: Any, properties: Any, __: bytes) -> None:
        rows = [p.row for p in self.pending if p.message_id == properties.message_id]
        self._fail(
            self._stopped_at(
                f"RabbitMQ could not route row(s) {_rows(rows)} to {CAMPAIGN_QUEUE}"
                f"{f' through exchange {self.exchange!r}' if self.exchange else ''} "
                f"({method.reply_text})"
            )
        )

    def _advance(self, point: Checkpoint) -> None:
        """Move the confirmed point and write it as the checkpoint (rejects flushed first)."""
        if self.error is not None or point.rows_done <= self.confirmed.rows_done:
            return
        self.confirmed = point
        self.rejects.flush()
        self.store.checkpoint(
            self.campaign,
            rows_done=point.rows_done,
            enqueued=point.enqueued,
            rejected=point.rejected,
        )
        self.checkpointed = point

    def _watch(self) -> None:
        if self.closing:
            return
        if self.pending and time.monotonic() - self.last_confirm > CONFIRM_TIMEOUT_S:
            self._fail(
                self._stopped_at(
                    f"RabbitMQ confirmed nothing for {CONFIRM_TIMEOUT_S:.0f} s "
                    "(is it blocked by a resource alarm?)"
                )
            )
            return
        self.connection.ioloop.call_later(1.0, self._watch)

    # --- the end -------------------------------------------------------------------------------
    def _stopped_at(self, what: str) -> str:
        first = self.pending[0].row if self.pending else self.confirmed.rows_done + 1
        return (
            f"{what}; rows from {first} on are not confirmed (the checkpoint is at row "
            f"{self.checkpointed.rows_done}: run the same command again to resume)"
        )

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = scrub_text(message)
        self._close()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._advance(self._current())
        self._close()

    def _close(self) -> None:
        if self.closing:
            return
        self.closing = True
        conn = self.connection
        if conn is not None and conn.is_open:
            conn.close()
        elif conn is not None and not conn.is_closing:
            conn.ioloop.stop()


def encode_envelope(kwargs: dict[str, Any], message_id: str) -> bytes:
    """A row's job body: :func:`worker.jobs.wire.build_envelope` for ``send_message`` on the
    campaign queue, written with orjson (it runs for every row). For the rows' kwargs, all
    text, these are :func:`worker.jobs.wire.encode_job`'s bytes exactly (a unit test checks)."""
    return orjson.dumps(build_envelope(_ACTOR, kwargs, queue=CAMPAIGN_QUEUE, message_id=message_id))


def _rows(rows: list[int], limit: int = 10) -> str:
    if not rows:
        return "?"
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
