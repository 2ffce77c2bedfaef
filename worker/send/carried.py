"""Sent jobs' records, carried by the next ledger claim's round trip instead of one of their own.

A send makes two Redis round trips: the ledger claim before its call to Verloop, and the
record (with its campaign counter, status link and event) after it. On a busy worker another
job's claim follows a finished job within a fraction of a millisecond, so the record waits for
it and both go in one write; each round trip saved is worth about a tenth of a send's CPU. A
thread of this class writes whatever waited ``max_delay_s`` with no claim to carry it (a quiet
worker); it looks every ``max_delay_s`` while records come, rather than being woken for each, and
sleeps until woken once they stop. :meth:`CarriedWrites.flush` writes everything at once (shutdown).

The job's acknowledgement waits for its record (:mod:`worker.runtime.consumer`), so nothing is
lost if the process dies first: the job is delivered again and its ledger entry, still a claim,
is treated like that of a worker that died mid-call. Callbacks run on whichever thread wrote
the batch; they must not raise (a raise is logged) and should be quick.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

__all__ = ["CarriedWrites", "Written"]

_log = structlog.get_logger()

Command = Sequence[Any]
#: What a batch's writer hands each callback: its commands' replies (a refused command's reply
#: is its ``redis.ResponseError``), or the exception that kept the batch from being written.
Written = list[Any] | BaseException


@dataclass(slots=True)
class _Pending:
    commands: list[Command]
    on_written: Callable[[Written], None]
    added: float = field(default_factory=time.monotonic)


class CarriedWrites:
    """Commands waiting for a round trip to carry them (see the module docstring).

    ``execute`` writes commands in one round trip and returns their replies (refusals as
    replies); ``max_delay_s`` is how long a write waits for a carrier before this object's
    thread writes it.
    """

    def __init__(
        self, execute: Callable[[list[Command]], list[Any]], *, max_delay_s: float
    ) -> None:
        self._execute = execute
        self.max_delay_s = max_delay_s
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: The thread waits for a first record (it is woken); else it looks every max_delay_s.
        self._idle = False
        self._adds = 0
        #: Batches written: carried by a claim, and written by the thread or a flush.
        self.carried = 0
        self.written_alone = 0

    def add(self, commands: list[Command], on_written: Callable[[Written], None]) -> None:
        """Queue ``commands``; ``on_written`` is called once they are written or have failed."""
        with self._lock:
            stopped = self._stopping
            if not stopped:
                self._pending.append(_Pending(commands, on_written))
                self._adds += 1
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="ledger-records", daemon=True
                    )
                    self._thread.start()
                elif self._idle:  # a busy thread looks again by itself: no wake-up per record
                    self._wake.notify()
        if stopped:  # closing: nothing would carry it any more
            self._write([_Pending(commands, on_written)])

    def take(self) -> list[_Pending]:
        """Everything queued, for a caller whose round trip carries it (then :meth:`settle`)."""
        if not self._pending:  # read without the lock: a write missed now waits for the next
            return []
        with self._lock:
            taken, self._pending = self._pending, []
        return taken

    @staticmethod
    def commands(taken: list[_Pending]) -> list[Command]:
        """The commands of what :meth:`take` returned, in order."""
        return [command for pending in taken for command in pending.commands]

    def settle(self, taken: list[_Pending], replies: Written) -> None:
        """Hand each carried write its replies (the first ``len(commands(taken))`` of
        ``replies``), or the exception that kept the round trip from writing them."""
        if not taken:
            return
        self.carried += 1
        _deliver(taken, replies)

    def flush(self) -> None:
        """Write everything queued now, on this thread."""
        taken = self.take()
        if taken:
            self._write(taken)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued and stop the thread; later writes are written at once."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        self.flush()

    def _write(self, taken: list[_Pending]) -> None:
        try:
            replies: Written = self._execute(self.commands(taken))
        except Exception as exc:  # noqa: BLE001 - handed to each write's callback
            replies = exc
        self.written_alone += 1
        _deliver(taken, replies)

    def _run(self) -> None:
        seen = -1
        while True:
            with self._lock:
                if not self._pending and self._adds == seen and not self._stopping:
                    # Nothing queued since the last look: wait to be woken by the next record.
                    self._idle = True
                    while not self._pending and not self._stopping:
                        self._wake.wait()
                    self._idle = False
                if self._stopping:
                    return
                seen = self._adds
                now = time.monotonic()
                cutoff = now - self.max_delay_s
                if not self._pending or self._pending[0].added > cutoff:
                    # Claims usually carry the records first; look again when the oldest is
                    # due (or in max_delay_s), without a wake-up per record.
                    oldest = self._pending[0].added if self._pending else now
                    self._wake.wait(oldest - cutoff)
                    continue
                due = [p for p in self._pending if p.added <= cutoff]
                self._pending = [p for p in self._pending if p.added > cutoff]
            self._write(due)


def _deliver(taken: list[_Pending], replies: Written) -> None:
    at = 0
    for pending in taken:
        if isinstance(replies, BaseException):
            mine: Written = replies
        else:
            mine = replies[at : at + len(pending.commands)]
            at += len(pending.commands)
        try:
            pending.on_written(mine)
        except Exception:  # noqa: BLE001 - one write's handling must not stop the others'
            _log.exception("handling a carried ledger write failed")
