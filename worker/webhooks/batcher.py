"""Statuses from concurrent requests, published together as one ``record_statuses`` job.

WhatsApp posts one status per request; a job (a RabbitMQ message, a confirm, a dramatiq round
in the worker) per status would cost three times the sends'. A batch is published when it holds
``max_size`` statuses or ``linger_s`` after its first one arrived, whichever comes first; each
request waits for the batches its statuses went into, and is answered 200 only once they are all
confirmed (503 if one is not).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from worker.jobs.wire import encode_job
from worker.receipts.models import STATUS_ACTOR, STATUS_QUEUE

__all__ = ["Batcher", "encode_statuses"]

#: Publishes an encoded job: (body, message id), raises when not confirmed.
PublishJob = Callable[[bytes, str], Awaitable[None]]


def encode_statuses(statuses: Sequence[dict[str, Any]]) -> tuple[bytes, str]:
    """A ``record_statuses`` job of ``statuses`` (the wire format of :mod:`worker.jobs.wire`):
    its body and message id."""
    message_id = str(uuid.uuid4())
    kwargs = {"statuses": list(statuses)}
    return encode_job(STATUS_ACTOR, kwargs, queue=STATUS_QUEUE, message_id=message_id), message_id


class Batcher:
    """Collects statuses into batches; :meth:`add` returns the futures of the batches they
    joined (see the module docstring)."""

    def __init__(self, publish: PublishJob, *, max_size: int, linger_s: float) -> None:
        self._publish = publish
        self.max_size = max_size
        self.linger_s = linger_s
        self._batch: list[dict[str, Any]] = []
        self._done: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._publishing: set[asyncio.Task[None]] = set()

    def add(self, statuses: Sequence[dict[str, Any]]) -> list[asyncio.Future[None]]:
        """Put ``statuses`` in the open batch (opening new ones as they fill up)."""
        joined: list[asyncio.Future[None]] = []
        for status in statuses:
            if self._done is None:
                loop = asyncio.get_running_loop()
                self._done = loop.create_future()
                self._done.add_done_callback(_retrieve)
                self._timer = loop.call_later(self.linger_s, self.flush)
            self._batch.append(status)
            if not joined or joined[-1] is not self._done:
                joined.append(self._done)
            if len(self._batch) >= self.max_size:
                self.flush()
        return joined

    def flush(self) -> None:
        """Publish the open batch now (its timer fired, it is full, or the receiver stops)."""
        if self._timer is not None:
            self._timer.cancel()
        batch, done = self._batch, self._done
        self._batch, self._done, self._timer = [], None, None
        if done is None:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch, done))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def drain(self) -> None:
        """Publish the open batch and wait for every batch being published (shutting down)."""
        self.flush()
        if self._publishing:
            await asyncio.wait(set(self._publishing))

    async def _send(self, batch: list[dict[str, Any]], done: asyncio.Future[None]) -> None:
        body, message_id = encode_statuses(batch)
        try:
            await self._publish(body, message_id)
        except Exception as exc:  # noqa: BLE001 - handed to every request that waits on it
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a batch's failure as seen: every request may have given up waiting on it."""
    if not future.cancelled():
        future.exception()
