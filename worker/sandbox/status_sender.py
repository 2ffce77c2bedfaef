"""Posting the simulator's status webhooks in the background, never in a send's way.

An accepted send only draws its statuses and schedules the first (no I/O, no await); tasks on
the server's loop post them when due: each status of a message after the previous one's first
attempt, so without ``reorder`` they arrive in order. A failed POST (non-2xx, refused, slower
than ``timeout_s``) is tried again after a doubling backoff, then dropped and counted, as Meta
retries; statuses beyond ``queue_limit`` are dropped and counted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from worker.sandbox.state import MessageRecord
from worker.sandbox.status_plan import plan_statuses, sign, webhook_body
from worker.sandbox.statuses import PhoneNumber, StatusCallbacks
from worker.sandbox.validation import digits_of

__all__ = ["StatusSender", "StatusStats"]

_MAX_BACKOFF_S: Final = 60.0
_USER_AGENT: Final = "facebookexternalua"  # what Meta's webhook requests say they are


@dataclass(slots=True)
class StatusStats:
    """The ``statuses`` part of ``/admin/stats``; each posted duplicate counts as one more."""

    planned: int = 0
    posted: int = 0
    retried: int = 0
    dropped: int = 0
    """Given up: attempts used up, the webhook turned off, or the queue full."""
    dropped_queue_full: int = 0
    requests: int = 0
    failed_requests: int = 0
    best: Counter[str] = field(default_factory=Counter)
    """Messages by what they were planned to come to (read, delivered, failed = never
    delivered, sent), for end-to-end checks of a funnel."""
    failure_codes: Counter[int] = field(default_factory=Counter)

    def to_json(self, pending: int) -> dict[str, Any]:
        """The JSON form, with the statuses still waiting."""
        return {
            "planned": self.planned,
            "posted": self.posted,
            "retried": self.retried,
            "dropped": self.dropped,
            "dropped_queue_full": self.dropped_queue_full,
            "pending": pending,
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "best": dict(self.best),
            "failure_codes": {str(code): n for code, n in sorted(self.failure_codes.items())},
        }


@dataclass(slots=True)
class _Chain:
    """The statuses of one message not yet scheduled."""

    number: PhoneNumber
    posts: deque[tuple[float, dict[str, Any]]]
    generation: int


@dataclass(slots=True)
class _Item:
    chain: _Chain
    status: dict[str, Any]
    attempt: int = 1


class StatusSender:
    """Status webhooks of one sandbox: planned on each accepted send, posted by background tasks
    (:meth:`start`, :meth:`stop`). Not thread-safe: it lives on the server's event loop."""

    def __init__(
        self, configured: StatusCallbacks, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Start with ``configured`` (what :meth:`reset` returns to); nothing runs yet."""
        self.configured = configured
        self.stats = StatusStats()
        self._clock = clock
        self._heap: list[tuple[float, int, _Item]] = []
        self._order = itertools.count()
        self._ready: asyncio.Queue[_Item] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._pending = 0
        self._generation = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.configure(configured)

    @property
    def config(self) -> StatusCallbacks:
        """The active settings."""
        return self._config

    @property
    def pending(self) -> int:
        """Statuses planned and neither posted nor dropped yet."""
        return self._pending

    def configure(self, config: StatusCallbacks) -> None:
        """Use ``config`` from now on (reseeded); statuses waiting go out under its URL."""
        self._config = config
        self._rng = random.Random(config.seed)

    def reset(self) -> None:
        """Back to the configured settings; forget waiting statuses and counters."""
        self._generation += 1  # statuses in flight are settled without counting
        self._heap.clear()
        while not self._ready.empty():
            self._ready.get_nowait()
        self._pending = 0
        self.stats = StatusStats()
        self.configure(self.configured)

    def on_sent(self, record: MessageRecord) -> None:
        """Plan the statuses of an accepted send; the first is posted after its delay."""
        config = self._config
        if config.url is None:
            return
        plan = plan_statuses(
            config,
            self._rng,
            wamid=record["id"],
            recipient_id=digits_of(record["to"]),
            message_type=record["type"],
            now=record["received_at"],
        )
        count = len(plan.posts)
        stats = self.stats
        if self._pending + count > config.queue_limit:
            stats.dropped += count
            stats.dropped_queue_full += count
            return
        self._pending += count
        stats.planned += count
        stats.best[plan.best] += 1
        for status in {id(status): status for _, status in plan.posts}.values():
            for error in status.get("errors", ()):
                stats.failure_codes[error["code"]] += 1
        number = config.number_for(record["phone_id"])
        self._next(_Chain(number, deque(plan.posts), self._generation))

    # --- scheduling ------------------------------------------------------------------

    def _next(self, chain: _Chain) -> None:
        if chain.generation == self._generation and chain.posts:
            delay, status = chain.posts.popleft()
            self._push(self._clock() + delay, _Item(chain, status))

    def _push(self, due: float, item: _Item) -> None:
        heapq.heappush(self._heap, (due, next(self._order), item))
        self._wake.set()

    async def _dispatch(self) -> None:
        """Move due statuses to the posting tasks; sleep until the next one is due."""
        heap = self._heap
        while True:
            self._wake.clear()
            now = self._clock()
            while heap and heap[0][0] <= now:
                self._ready.put_nowait(heapq.heappop(heap)[2])
            if not heap:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), heap[0][0] - now)

    # --- posting ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background tasks (on the server's loop)."""
        if self._tasks:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), headers={"User-Agent": _USER_AGENT}
        )
        self._tasks = [asyncio.create_task(self._dispatch(), name="sandbox-status-dispatch")]
        self._tasks += [
            asyncio.create_task(self._work(self._session), name=f"sandbox-status-post-{n}")
            for n in range(self.configured.concurrency)
        ]

    async def stop(self) -> None:
        """Stop the tasks; statuses still waiting are not posted."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _work(self, session: aiohttp.ClientSession) -> None:
        ready = self._ready
        while True:
            items = [await ready.get()]
            while len(items) < self._config.batch and not ready.empty():
                items.append(ready.get_nowait())
            await self._post(session, items)

    async def _post(self, session: aiohttp.ClientSession, items: list[_Item]) -> None:
        """POST ``items`` as one signed webhook, then settle each of them."""
        config = self._config
        items = [item for item in items if item.chain.generation == self._generation]
        if not items:
            return
        if config.url is None:  # turned off while they waited
            for item in items:
                self._settle(item, ok=False, final=True)
            return
        groups: dict[PhoneNumber, list[dict[str, Any]]] = {}
        for item in items:
            groups.setdefault(item.chain.number, []).append(item.status)
        body = json.dumps(webhook_body(config.waba_id, groups.items()), separators=(",", ":"))
        raw = body.encode()
        headers = {
            "Content-Type": "application/json",
            config.signature_header: sign(config.app_secret, raw),
        }
        self.stats.requests += 1
        try:
            async with session.post(
                config.url,
                data=raw,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=config.timeout_s),
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300
        except Exception:  # noqa: BLE001  # refused, reset, timed out: an attempt that failed
            ok = False
        if not ok:
            self.stats.failed_requests += 1
        for item in items:
            self._settle(item, ok=ok, final=False)

    def _settle(self, item: _Item, *, ok: bool, final: bool) -> None:
        """Count one attempt's outcome; schedule the message's next status and any retry."""
        if item.chain.generation != self._generation:
            return  # reset while it was in flight
        if item.attempt == 1:
            self._next(item.chain)
        config, stats = self._config, self.stats
        if ok:
            stats.posted += 1
        elif not final and item.attempt < config.max_attempts:
            stats.retried += 1
            backoff = min(_MAX_BACKOFF_S, config.retry_backoff_s * 2 ** (item.attempt - 1))
            self._push(self._clock() + backoff, _Item(item.chain, item.status, item.attempt + 1))
            return
        else:
            stats.dropped += 1
        self._pending -= 1
