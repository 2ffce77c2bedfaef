"""The status actor (``record_status``) draining a backlog of statuses, every feature on.

Sends are recorded first (their wamid links, as the finisher writes them, in a campaign), then a
backlog of three statuses per message (sent, delivered, read; a share failed instead of read,
some duplicated, all shuffled so ``read`` often comes before ``delivered``) is put on
``verloop.status``, and real worker processes drain it: link lookup, the record script (once
each, best status, funnel counters, event into the outbox), the limiter's reaction to failures,
the log line and metrics. The rate is measured between 10 % and 90 % of the backlog; the
campaign's funnel is checked against what was sent at the end (so a fast wrong answer fails).

Target (issue 15, item 5): keep up with 3,000 statuses/s (three per message at 1,000 messages/s).
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from typing import Any

import pika
import redis

from bench.common import (
    AMQP_URL,
    REDIS_URL,
    RESULTS,
    BenchError,
    CpuSample,
    Result,
    clear_queues,
    clear_redis,
    cpu_between,
    publish_backlog,
    simulator,
    system_token,
    verloop_worker,
    worker,
    worker_env,
    write_json,
)
from worker.campaigns.store import CampaignRef, CampaignStore
from worker.jobs.producer import encode_job
from worker.receipts.links import Link, Receipts
from worker.receipts.models import STATUS_ACTOR, STATUS_QUEUE

NAME = "receipts"
TARGET_PER_S = 3000.0
CAMPAIGN = CampaignRef("bench", "bench-funnel")
#: Of the messages: this share fails (131026) instead of being read; this share of statuses is
#: sent twice.
FAILED_SHARE = 0.05
DUPLICATE_SHARE = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--status-messages", type=int, default=4000, help="messages; 3 statuses each"
    )
    group.add_argument("--status-processes", type=int, default=2)
    group.add_argument("--status-threads", type=int, default=8)
    group.add_argument(
        "--status-batch",
        type=int,
        default=25,
        help="statuses per job (the receiver's batch at about 3,000/s with a 10 ms linger)",
    )


def _link_sends(messages: int) -> list[str]:
    """Record ``messages`` sends of the campaign as the finisher does; their wamids."""
    cache = redis.Redis.from_url(REDIS_URL)
    CampaignStore(cache).create(CAMPAIGN, {"client_id": CAMPAIGN.client_id, "template": "t"})
    receipts = Receipts(cache, ttl_s=3600)
    wamids = [f"wamid.bench{n:07d}" for n in range(messages)]
    pipe = cache.pipeline(transaction=False)
    for n, wamid in enumerate(wamids):
        link = Link(
            message_id=str(uuid.uuid4()),
            client_id=CAMPAIGN.client_id,
            phone_id=f"bench-phone-{n % 4}",
            to=f"+9198{n:08d}",
            lane="campaign",
            sent_at=time.time(),
            campaign_id=CAMPAIGN.campaign_id,
        )
        for command in receipts.link_commands(wamid, link):
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
    pipe.execute()
    receipts.close()
    cache.close()
    return wamids


def _backlog(wamids: list[str], rng: random.Random, batch: int) -> tuple[list[bytes], int, int]:
    """The status jobs (shuffled statuses, ``batch`` per job), how many messages fail, and how
    many statuses there are."""
    jobs: list[dict[str, Any]] = []
    failed = 0
    now = int(time.time())
    for n, wamid in enumerate(wamids):
        last: dict[str, Any] = {"status": "read"}
        if rng.random() < FAILED_SHARE:
            failed += 1
            last = {"status": "failed", "errors": [{"code": 131026, "title": "undeliverable"}]}
        statuses = [{"status": "sent"}, {"status": "delivered"}, last]
        if last["status"] == "failed":
            statuses = [statuses[0], last]
        for status in statuses:
            kwargs = {"wamid": wamid, "timestamp": now, "recipient_id": f"9198{n:08d}", **status}
            jobs.append(kwargs)
            if rng.random() < DUPLICATE_SHARE:
                jobs.append(kwargs)
    rng.shuffle(jobs)
    bodies = [
        encode_job(
            STATUS_ACTOR,
            {"statuses": jobs[n : n + batch]},
            queue=STATUS_QUEUE,
            message_id=str(uuid.uuid4()),
        )
        for n in range(0, len(jobs), batch)
    ]
    return bodies, failed, len(jobs)


def _ready(channel: Any) -> int:
    return int(channel.queue_declare(STATUS_QUEUE, passive=True).method.message_count)


def run(args: argparse.Namespace) -> list[Result]:
    RESULTS.mkdir(exist_ok=True)
    clear_redis()
    rng = random.Random(15)
    wamids = _link_sends(args.status_messages)
    bodies, failed, statuses = _backlog(wamids, rng, args.status_batch)
    publish_backlog({STATUS_QUEUE: bodies})
    total = len(bodies)
    low, high = int(total * 0.1), int(total * 0.9)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    first = last = None
    try:
        with simulator(0) as sim:
            env = worker_env(sim.url, system_token(sim.url))
            command = [
                *verloop_worker(args.status_processes, args.status_threads),
                "-Q",
                STATUS_QUEUE,
            ]
            with worker(command, env, RESULTS / "receipts.log") as proc:
                deadline = time.monotonic() + 600
                while last is None:
                    proc.check()
                    if time.monotonic() > deadline:
                        raise BenchError(f"status worker stalled; see {proc.log}")
                    done = total - _ready(channel)
                    if first is None and done >= low:
                        first = CpuSample.take(proc, sim)
                    if done >= high:
                        last = CpuSample.take(proc, sim)
                    connection.sleep(0.02)
                # Let it finish the rest before the funnel is read.
                while _ready(channel) > 0:
                    proc.check()
                    connection.sleep(0.1)
                time.sleep(2)
    finally:
        connection.close()
        clear_queues()
    assert first is not None
    elapsed = last.t - first.t
    measured = (high - low) * statuses / total  # statuses in the jobs measured
    rate = measured / elapsed
    cpu = cpu_between(first, last)
    cpu_ms = 1000 * cpu["worker"] * elapsed / measured
    cache = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    funnel = CampaignStore(cache).get(CAMPAIGN).fields
    cache.close()
    messages = len(wamids)
    expected = {
        "status:delivered": messages - failed,
        "status:read": messages - failed,
        "status:failed": failed,
    }
    found = {k: int(funnel.get(k, 0)) for k in expected}
    correct = found == expected
    met = rate >= TARGET_PER_S and correct
    print(
        f"status actor, {args.status_processes} processes x {args.status_threads} threads, "
        f"{messages} messages, {statuses} statuses (shuffled, {DUPLICATE_SHARE:.0%} duplicated) "
        f"in {total} jobs of {args.status_batch}"
    )
    print(f"  statuses recorded:     {rate:8.1f} /s  (target >= {TARGET_PER_S:g}/s)")
    print(f"  worker CPU per status: {cpu_ms:8.2f} ms; machine {cpu['machine_busy']:.0%} busy")
    print(f"  funnel: {found} (expected {expected}: {'right' if correct else 'WRONG'})")
    details = {"rate": rate, "cpu_ms": cpu_ms, "funnel": found, "expected": expected}
    write_json(NAME, details)
    return [
        Result(
            NAME,
            f"{rate:.0f} statuses/s recorded, funnel {'right' if correct else 'WRONG'}",
            f">= {TARGET_PER_S:g}/s, funnel exact",
            met,
            details,
        )
    ]
