"""Statuses of concurrent requests batched into one job; each request learns its batch's fate."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from worker.receipts.models import STATUS_ACTOR, STATUS_QUEUE
from worker.webhooks.batcher import Batcher


class Sink:
    """A publish function that records the jobs (or fails, when told)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.fail = fail

    async def __call__(self, body: bytes, message_id: str) -> None:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        envelope = json.loads(body)
        assert envelope["message_id"] == message_id
        assert (envelope["actor_name"], envelope["queue_name"]) == (STATUS_ACTOR, STATUS_QUEUE)
        self.jobs.append(envelope["kwargs"])


def entries(*names: str) -> list[dict[str, Any]]:
    return [{"wamid": name} for name in names]


def test_a_full_batch_goes_at_once_and_the_rest_after_the_linger() -> None:
    async def scenario() -> list[list[str]]:
        sink = Sink()
        batcher = Batcher(sink, max_size=3, linger_s=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = batcher.add(entries("a", "b"))
        second = batcher.add(entries("c", "d"))  # c fills the first batch; d opens the next
        assert len(first) == 1
        assert len(second) == 2
        assert second[0] is first[0]
        await asyncio.wait_for(first[0], 1)
        assert loop.time() - started < 0.1  # full: not held for the linger
        await asyncio.wait_for(second[1], 1)
        assert loop.time() - started >= 0.19
        return [[e["wamid"] for e in job["statuses"]] for job in sink.jobs]

    assert asyncio.run(scenario()) == [["a", "b", "c"], ["d"]]


def test_a_failed_publish_reaches_every_request_of_the_batch() -> None:
    async def scenario() -> list[BaseException | None]:
        batcher = Batcher(Sink(RuntimeError("no confirm")), max_size=10, linger_s=0.01)
        futures = batcher.add(entries("a")) + batcher.add(entries("b"))
        await asyncio.wait(futures, timeout=1)
        return [f.exception() for f in futures]

    errors = asyncio.run(scenario())
    assert [str(e) for e in errors] == ["no confirm", "no confirm"]


def test_drain_publishes_the_open_batch_now() -> None:
    async def scenario() -> list[dict[str, Any]]:
        sink = Sink()
        batcher = Batcher(sink, max_size=10, linger_s=60)
        [future] = batcher.add(entries("a"))
        await asyncio.wait_for(batcher.drain(), 1)
        assert future.done()
        assert future.exception() is None
        return sink.jobs

    assert asyncio.run(scenario()) == [{"statuses": [{"wamid": "a"}]}]


def test_nothing_added_opens_no_batch() -> None:
    async def scenario() -> int:
        sink = Sink()
        batcher = Batcher(sink, max_size=2, linger_s=0)
        assert batcher.add([]) == []
        await batcher.drain()
        return len(sink.jobs)

    assert asyncio.run(scenario()) == 0


@pytest.mark.parametrize("size", [1, 2, 5])
def test_every_status_lands_in_exactly_one_job(size: int) -> None:
    async def scenario() -> list[str]:
        sink = Sink()
        batcher = Batcher(sink, max_size=size, linger_s=0)
        futures = [f for n in range(7) for f in batcher.add(entries(f"w{n}", f"x{n}"))]
        await asyncio.wait(futures, timeout=1)
        assert all(len(job["statuses"]) <= size for job in sink.jobs)
        return [e["wamid"] for job in sink.jobs for e in job["statuses"]]

    assert asyncio.run(scenario()) == [f"{p}{n}" for n in range(7) for p in ("w", "x")]
