"""Issue 4, benchmark 2: a 50,000-recipient campaign over two numbers limited at 250/s each.

The campaign's jobs are put on ``verloop.campaign`` before the worker starts (with the
campaign's record in Redis, as ``campaign start`` leaves it), then ``verloop-worker run`` sends
them with everything on: limiter, idempotency ledger, campaign state checks, outcome events and
metrics. Reported: the achieved rate per number against its limit over the steady part of the
run, the total time, and the simulator's own count of duplicates (the same recipient twice) and
losses (recipients never messaged), both targets zero.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import redis

from bench.common import (
    CLIENT_ID,
    REDIS_URL,
    RESULTS,
    Result,
    clear_queues,
    clear_redis,
    configure_simulator,
    messages,
    publish_backlog,
    simulator,
    stats,
    system_token,
    verloop_worker,
    wait_for,
    worker,
    worker_env,
    write_json,
)
from worker.campaigns.store import CampaignRef, CampaignStore
from worker.jobs.producer import encode_job

NAME = "campaign_send"
LATENCY_MS = 20.0
LIMIT = 250.0
PHONES = ("camp-1", "camp-2")
CAMPAIGN = "bench-campaign"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("campaign send (issue 4, benchmark 2)")
    group.add_argument("--campaign-recipients", type=int, default=50_000)
    group.add_argument(
        "--campaign-pool",
        default="4x8",
        help="PROCESSESxTHREADS (on 2 cores 4x8 beats 2x16: fewer threads per process "
        "contend for its interpreter lock)",
    )


def _job(n: int) -> bytes:
    kwargs: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "phone_id": PHONES[n % len(PHONES)],
        "to": f"+9197{n:08d}",
        "campaign_id": CAMPAIGN,
        "message": {
            "type": "template",
            "template": {
                "name": "spring_sale",
                "language": {"code": "en_US"},
                "components": [{"type": "body", "parameters": [{"type": "text", "text": f"R{n}"}]}],
            },
        },
    }
    return encode_job(
        "send_message", kwargs, queue="verloop.campaign", message_id=str(uuid.uuid4())
    )


def run(args: argparse.Namespace) -> list[Result]:
    total = args.campaign_recipients
    processes, _, threads = args.campaign_pool.lower().partition("x")
    ideal_s = total / (LIMIT * len(PHONES))
    print(
        f"campaign: {total} recipients over {len(PHONES)} numbers limited at {LIMIT:g}/s "
        f"(ideal {ideal_s:.0f} s); {processes} processes x {threads} threads; simulator "
        f"{LATENCY_MS:g} ms, counting violations, duplicates and losses",
        flush=True,
    )
    clear_redis()
    store = CampaignStore(redis.Redis.from_url(REDIS_URL, decode_responses=True))
    store.create(
        CampaignRef(CLIENT_ID, CAMPAIGN), {"client_id": CLIENT_ID, "template": "spring_sale"}
    )
    started = time.monotonic()
    publish_backlog({"verloop.campaign": [_job(n) for n in range(total)]})
    store.checkpoint(CampaignRef(CLIENT_ID, CAMPAIGN), rows_done=total, enqueued=total, rejected=0)
    store.finish_enqueue(CampaignRef(CLIENT_ID, CAMPAIGN), total_rows=total)
    print(f"  backlog of {total} jobs published in {time.monotonic() - started:.1f} s", flush=True)

    with simulator(LATENCY_MS, message_log_limit=total + 1000) as sim:
        http = httpx.Client(base_url=sim.url, timeout=60)
        configure_simulator(
            http, {"latency_ms": LATENCY_MS, "per_number_rate": LIMIT, "enforce_limits": False}
        )
        env = worker_env(
            sim.url,
            system_token(sim.url),
            metrics=args.metrics,
            RATE_LIMIT_PER_NUMBER=f"{LIMIT:g}",
        )
        try:
            command = verloop_worker(int(processes), int(threads))
            with worker(command, env, RESULTS / "campaign_send.log") as proc:
                t0 = time.time()
                wait_for(
                    lambda: _settled(store) >= total,
                    ideal_s * 4 + 60,
                    f"all {total} campaign jobs to finish",
                    proc,
                    interval_s=1.0,
                )
                elapsed = time.time() - t0
                final = stats(http)
                records = {phone: messages(http, phone) for phone in PHONES}
        finally:
            clear_queues()
        http.close()

    status = store.get(CampaignRef(CLIENT_ID, CAMPAIGN))
    received = Counter(r["to"] for phone in PHONES for r in records[phone])
    duplicates = sum(count - 1 for count in received.values() if count > 1)
    lost = total - len(received)
    per_phone: dict[str, dict[str, float]] = {}
    results: list[Result] = []
    for phone in PHONES:
        times = sorted(r["received_at"] for r in records[phone])
        # The steady part: leave out the first and last 5 % (start-up and the tail).
        cut = len(times) // 20
        steady = times[cut : len(times) - cut]
        rate = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0
        per_phone[phone] = {"sent": len(times), "steady_rate": rate, "ratio": rate / LIMIT}
        print(f"  {phone}: {len(times)} sent, steady {rate:.1f}/s = {rate / LIMIT:.3f} of limit")
        results.append(
            Result(
                f"campaign {phone}",
                f"{rate:.1f}/s ({rate / LIMIT:.3f} of {LIMIT:g}/s)",
                ">= 0.95 of limit",
                rate / LIMIT >= 0.95,
            )
        )
    violations = final["rate_limit_violations"]
    print(
        f"  finished in {elapsed:.1f} s (ideal {ideal_s:.1f} s); simulator: {final['sent']} sent, "
        f"{duplicates} duplicates, {lost} lost, {violations} limit violations; campaign: "
        f"sent {status.count('sent')}, dead-lettered {status.count('dead_lettered')}, "
        f"suppressed {status.count('suppressed')}",
        flush=True,
    )
    results.append(
        Result(
            "campaign duplicates/losses",
            f"{duplicates} duplicates, {lost} lost, {violations} violations",
            "0 / 0 / 0",
            duplicates == 0 and lost == 0 and violations == 0,
        )
    )
    results.append(
        Result(
            "campaign total time",
            f"{elapsed:.1f} s for {total} (ideal {ideal_s:.1f} s)",
            "-",
            None,
        )
    )
    write_json(
        NAME,
        {
            "recipients": total,
            "elapsed_s": elapsed,
            "ideal_s": ideal_s,
            "per_phone": per_phone,
            "duplicates": duplicates,
            "lost": lost,
            "violations": violations,
            "campaign": dict(status.fields),
        },
    )
    return results


def _settled(store: CampaignStore) -> int:
    status = store.get(CampaignRef(CLIENT_ID, CAMPAIGN))
    return status.count("sent") + status.count("dead_lettered")
