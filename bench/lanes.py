"""The per-number rate limiter's two lanes: transactional sends beside a saturating campaign
(options and setup shared in ``bench/rate_limits.py``).

lanes: 1 number at 50/s saturated by 2,000 campaign jobs (``verloop.campaign``), then 200
transactional sends (``verloop.send``) 50 ms apart, each carrying its enqueue time in its
``idempotency_key`` (``lane-<n>-<unix time>``), which the simulator records (the worker
does not forward ``metadata``). Latency = the simulator's ``received_at`` - enqueue time, so
it includes the simulator's 20 ms. Target p99 < 500 ms; the campaign's rate meanwhile is
reported. The target is for one worker consuming both queues; the same processes and
threads split into one worker per queue (``-Q``) are measured too, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import (
    AMQP_URL,
    CLIENT_ID,
    RESULTS,
    BenchError,
    Result,
    clear_queues,
    clear_redis,
    messages,
    percentile,
    publish_backlog,
    send_job,
    simulator,
    stats,
    system_token,
    verloop_worker,
    wait_for,
    worker,
    worker_env,
    write_json,
)
from bench.rate_limits import LATENCY_MS, limited_simulator, parse_pool, sent_count
from worker.jobs.producer import Producer

NAME = "lanes"


def run(args: argparse.Namespace) -> list[Result]:
    """Transactional sends while a campaign saturates the same number: their latency.

    Run twice: with one worker pool consuming both queues (the configuration the target is
    for), then, for comparison, with the same processes and threads split into two
    ``verloop-worker run`` instances, one per queue (``-Q``).
    """
    limit, target_ms = 50.0, 500.0
    processes, threads = parse_pool(args.rl_pool)
    print(
        f"lanes: 1 number limited at {limit:g}/s, {args.lane_campaign_jobs} campaign jobs on "
        f"verloop.campaign, then {args.lane_sends} transactional sends on verloop.send "
        f"{args.lane_spacing_ms:g} ms apart; simulator {LATENCY_MS:g} ms",
        flush=True,
    )
    results: list[Result] = []
    summary: dict[str, Any] = {"limit": limit, "target_p99_ms": target_ms, "variants": {}}
    variants: list[tuple[str, str, list[tuple[list[str], str]]]] = [
        (
            "one pool",
            f"one worker, {processes} processes x {threads} threads, both queues",
            [(verloop_worker(processes, threads), "lanes.log")],
        )
    ]
    if args.lane_split and processes >= 2:
        half = processes // 2
        variants.append(
            (
                "split pools",
                f"two workers, -Q verloop.send ({half}x{threads}) and -Q verloop.campaign "
                f"({processes - half}x{threads})",
                [
                    ([*verloop_worker(half, threads), "-Q", "verloop.send"], "lanes_send.log"),
                    (
                        [*verloop_worker(processes - half, threads), "-Q", "verloop.campaign"],
                        "lanes_campaign.log",
                    ),
                ],
            )
        )
    for name, description, workers in variants:
        print(f"  {name}: {description}", flush=True)
        data = _lane_run(args, limit, workers)
        variant_results, details = _lane_results(data, limit, target_ms, name)
        results.extend(variant_results)
        summary["variants"][name] = {"description": description, **details}
        if name != "one pool":
            # A comparison, not the configuration the target is for.
            for result in variant_results:
                if result.met is not None:
                    verdict = "met" if result.met else "not met"
                    result.target += f" (comparison only: {verdict})"
                    result.met = None
    write_json("lanes", summary | {"results": results})
    return results


def _lane_run(
    args: argparse.Namespace, limit: float, workers: list[tuple[list[str], str]]
) -> dict[str, Any]:
    phone, sends = "lane-1", int(args.lane_sends)
    campaign_jobs, spacing = args.lane_campaign_jobs, args.lane_spacing_ms / 1000
    clear_redis()
    with simulator(LATENCY_MS, message_log_limit=campaign_jobs + sends + 1000) as sim:
        http = limited_simulator(sim, limit)
        publish_backlog(
            {
                "verloop.campaign": [
                    send_job(phone, n, queue="verloop.campaign", idempotency_key=f"camp-{n}")
                    for n in range(campaign_jobs)
                ]
            }
        )
        system = system_token(sim.url)
        enqueued: dict[str, float] = {}
        records: list[dict[str, Any]] = []
        try:
            with contextlib.ExitStack() as stack:
                procs = [
                    stack.enter_context(
                        worker(
                            command,
                            worker_env(
                                sim.url,
                                system,
                                metrics=args.metrics,
                                RATE_LIMIT_PER_NUMBER=f"{limit:g}",
                            ),
                            RESULTS / log,
                        )
                    )
                    for command, log in workers
                ]

                def check() -> None:
                    for proc in procs:
                        proc.check()

                wait_for(
                    lambda: sent_count(http, phone) >= 3 * limit,
                    60,
                    "the campaign to run 3 s",
                )
                check()
                start = time.monotonic()
                with Producer(AMQP_URL) as producer:
                    for n in range(sends):
                        pause = start + n * spacing - time.monotonic()
                        if pause > 0:
                            time.sleep(pause)
                        check()
                        now = time.time()
                        key = f"lane-{n}-{now:.6f}"
                        producer.send_message(
                            client_id=CLIENT_ID,
                            phone_id=phone,
                            to=f"+9197{n:08d}",
                            message={"type": "text", "text": {"body": f"lane {n}"}},
                            idempotency_key=key,
                        )
                        enqueued[key] = now

                def all_arrived() -> bool:
                    check()
                    records[:] = messages(http, phone)
                    got = sum(1 for r in records if (r["idempotency_key"] or "") in enqueued)
                    return got >= sends

                try:
                    wait_for(all_arrived, 30, "every transactional send", interval_s=0.5)
                except BenchError as exc:
                    print(f"  ! {exc}; the missing ones count as infinitely late")
                final = stats(http)
        finally:
            clear_queues()
            http.close()
    jobs = _job_lines([RESULTS / log for _, log in workers])
    return {"records": records, "enqueued": enqueued, "final": final, "jobs": jobs}


def _job_lines(logs: list[Path]) -> dict[str, dict[str, Any]]:
    """The worker's one log line per transactional job, by idempotency key (to split the
    latency into waiting for a worker thread, waiting in the limiter, and the send)."""
    lines: dict[str, dict[str, Any]] = {}
    for log in logs:
        with log.open(encoding="utf-8", errors="replace") as text:
            for line in text:
                if '"lane":"transactional"' not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                key = entry.get("idempotency_key")
                if entry.get("event") == "job" and isinstance(key, str):
                    lines[key] = entry
    return lines


def _lane_results(
    data: dict[str, Any], limit: float, target_ms: float, name: str
) -> tuple[list[Result], dict[str, Any]]:
    records, enqueued, final = data["records"], data["enqueued"], data["final"]
    received = {r["idempotency_key"]: r["received_at"] for r in records}
    latencies = [
        (received[key] - t) * 1000 if key in received else float("inf")
        for key, t in enqueued.items()
    ]
    missing = sum(1 for v in latencies if v == float("inf"))
    first = min(enqueued.values())
    last = max(received.get(k, 0.0) for k in enqueued) if not missing else max(enqueued.values())

    def is_campaign(record: dict[str, Any]) -> bool:
        return (record["idempotency_key"] or "").startswith("camp-")

    during = [r for r in records if first <= r["received_at"] <= last]
    campaign = sum(1 for r in during if is_campaign(r)) / (last - first)
    transactional = sum(1 for r in during if not is_campaign(r)) / (last - first)
    p50, p95, p99 = (percentile(latencies, q) for q in (50, 95, 99))
    met = p99 < target_ms
    print(
        f"    transactional enqueue -> received by the simulator (incl. its {LATENCY_MS:g} ms):"
        f" p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, max {max(latencies):.0f} ms, "
        f"missing {missing} (target p99 < {target_ms:g} ms: {'met' if met else 'NOT met'})"
    )
    # Where the time went, from the worker's own log line of each job.
    in_limiter = [float(j.get("limit_wait_ms", 0.0)) for j in data["jobs"].values()]
    in_job = [float(j.get("duration_ms", 0.0)) for j in data["jobs"].values()]
    before = [
        (received[key] - t) * 1000 - float(data["jobs"][key].get("duration_ms", 0.0))
        for key, t in enqueued.items()
        if key in received and key in data["jobs"]
    ]
    breakdown: dict[str, Any] = {}
    if in_job and before:
        breakdown = {
            "waiting_for_a_thread_p99_ms": percentile(before, 99),
            "limiter_wait_p99_ms": percentile(in_limiter, 99),
            "job_duration_p99_ms": percentile(in_job, 99),
        }
        print(
            f"    of which (worker log, p99): before a worker thread started the job ~"
            f"{breakdown['waiting_for_a_thread_p99_ms']:.0f} ms; waiting in the limiter "
            f"{breakdown['limiter_wait_p99_ms']:.0f} ms; the job itself "
            f"{breakdown['job_duration_p99_ms']:.0f} ms"
        )
    print(
        f"    meanwhile ({last - first:.1f} s): campaign {campaign:.1f}/s + transactional "
        f"{transactional:.1f}/s = {campaign + transactional:.1f}/s of the {limit:g}/s limit; "
        f"simulator violations {final['rate_limit_violations']}",
        flush=True,
    )
    results = [
        Result(
            f"3. lanes ({name}): transactional p99",
            f"{p99:.0f} ms (p50 {p50:.0f} ms)",
            f"< {target_ms:g} ms",
            met,
        ),
        Result(
            f"3. lanes ({name}): campaign rate",
            f"{campaign:.1f}/s (+ {transactional:.1f}/s transactional)",
            f"(none; limit {limit:g}/s)",
            None,
        ),
    ]
    finite = [v for v in latencies if v != float("inf")]
    details = {
        "latency_ms": {
            "p50": _finite(p50),
            "p95": _finite(p95),
            "p99": _finite(p99),
            "max": _finite(max(latencies)),
            "mean": statistics.fmean(finite) if finite else None,
            "all": [_finite(v) for v in latencies],
        },
        "breakdown": breakdown,
        "missing": missing,
        "window_s": last - first,
        "campaign_rate": campaign,
        "transactional_rate": transactional,
        "simulator_stats": final,
    }
    return results, details


def _finite(value: float) -> float | None:
    """JSON has no infinity: a send that never arrived is ``null``."""
    return None if value == float("inf") else value
