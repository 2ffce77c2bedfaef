"""The per-number rate limiter under load: fidelity, a 1,000/s number, and the two lanes.

Each benchmark runs the real worker (``verloop-worker run``, Redis limiter in db 14) against
the Verloop simulator at 20 ms latency, from a backlog published before the worker starts.
The simulator is told each number's limit with ``enforce_limits: false``: it accepts every send
and counts those above the limit as ``rate_limit_violations``.

1. fidelity: 4 numbers at 50/s, 1,500 transactional jobs each (``verloop.send``), interleaved.
   After a warm-up, a 20 s window: each number's sends received by the simulator in the window
   (``received_at`` of ``/admin/messages``) / (50/s x 20 s). Target 0.95-1.00 each, and 0
   violations over the whole run.
2. high_rate: 1 number at 1,000/s (``RATE_LIMIT_OVERRIDES``), a few processes x threads tried
   in turn, rate from ``/admin/stats`` over a window after warm-up. Target >= 900/s for the best.
   The CPU used by the worker, the simulator, RabbitMQ and Redis is printed, and the naive
   actor's rate with the best pool, to say what limits it.
3. lanes: 1 number at 50/s saturated by 2,000 campaign jobs (``verloop.campaign``), then 200
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
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench import send_path
from bench.common import (
    AMQP_URL,
    BIN,
    CLIENT_ID,
    RESULTS,
    BenchError,
    CpuSample,
    Result,
    Simulator,
    WorkerProcess,
    clear_queues,
    clear_redis,
    configure_simulator,
    cpu_between,
    messages,
    percentile,
    phone_token,
    publish_backlog,
    send_job,
    simulator,
    sleep_checking,
    stats,
    system_token,
    verloop_worker,
    wait_for,
    worker,
    worker_env,
    write_json,
)
from worker.jobs.producer import Producer

LATENCY_MS = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the rate-limit benchmarks."""
    group = parser.add_argument_group("rate limits (fidelity, high_rate, lanes)")
    group.add_argument("--fidelity-seconds", type=float, default=20.0, help="steady window")
    group.add_argument("--fidelity-jobs", type=int, default=1500, help="backlog per number")
    group.add_argument(
        "--high-rate-configs",
        default="2x8,2x32,4x8,4x16",
        help="PROCESSESxTHREADS[:LOG_LEVEL] to try for the 1,000/s number, comma-separated",
    )
    group.add_argument("--high-rate-seconds", type=float, default=8.0, help="window per config")
    group.add_argument(
        "--no-high-rate-naive",
        dest="high_rate_naive",
        action="store_false",
        help="skip the naive actor's reference run at the best pool",
    )
    group.add_argument("--lane-campaign-jobs", type=int, default=2000)
    group.add_argument("--lane-sends", type=int, default=200)
    group.add_argument("--lane-spacing-ms", type=float, default=50.0)
    group.add_argument(
        "--no-lane-split",
        dest="lane_split",
        action="store_false",
        help="skip the comparison with one worker per queue",
    )
    group.add_argument(
        "--rl-pool",
        default="2x8",
        help="PROCESSESxTHREADS for fidelity and lanes (the send path's default pool)",
    )


def _pool(text: str) -> tuple[int, int]:
    processes, _, threads = text.strip().lower().partition("x")
    return int(processes), int(threads)


def _config(text: str) -> tuple[int, int, str]:
    """``PxT`` or ``PxT:LEVEL`` (the worker's LOG_LEVEL; INFO by default)."""
    pool, _, level = text.strip().partition(":")
    return (*_pool(pool), level.upper() or "INFO")


def _sent(http: httpx.Client, phone_id: str) -> int:
    count: int = stats(http)["by_phone"].get(phone_id, 0)
    return count


def _simulated(sim: Simulator, per_number_rate: float) -> httpx.Client:
    """A client for the simulator's admin API, after telling it the number's limit: it
    accepts sends over it and counts them as violations."""
    http = httpx.Client(base_url=sim.url, timeout=30)
    faults = {"latency_ms": LATENCY_MS, "per_number_rate": per_number_rate, "enforce_limits": False}
    configure_simulator(http, faults)
    return http


# --- 1. fidelity ---------------------------------------------------------------------------------
def fidelity(args: argparse.Namespace) -> list[Result]:
    """Four numbers at 50/s: each one's achieved rate over a steady window, and violations."""
    limit, phones = 50.0, [f"fid-{i}" for i in range(1, 5)]
    per_number, window = args.fidelity_jobs, args.fidelity_seconds
    processes, threads = _pool(args.rl_pool)
    total = per_number * len(phones)
    print(
        f"fidelity: {len(phones)} numbers limited at {limit:g}/s (RATE_LIMIT_PER_NUMBER), "
        f"{per_number} transactional jobs each on verloop.send, interleaved; "
        f"{processes} processes x {threads} threads; simulator {LATENCY_MS:g} ms, "
        f"per_number_rate {limit:g}, enforce_limits false",
        flush=True,
    )
    clear_redis()
    with simulator(LATENCY_MS, message_log_limit=total + 1000) as sim:
        http = _simulated(sim, limit)
        publish_backlog({"verloop.send": [send_job(phones[n % 4], n) for n in range(total)]})
        env = worker_env(
            sim.url,
            system_token(sim.url),
            metrics=args.metrics,
            RATE_LIMIT_PER_NUMBER=f"{limit:g}",
        )
        try:
            with worker(verloop_worker(processes, threads), env, RESULTS / "fidelity.log") as proc:
                # Warm-up: processes up, tokens fetched, the first burst (the reserve) spent.
                wait_for(
                    lambda: all(_sent(http, p) >= 2 * limit for p in phones),
                    60,
                    "every number to send for 2 s",
                    proc,
                )
                time.sleep(1.0)
                t0 = time.time()
                sleep_checking(window, proc)
                t1 = time.time()
                by_phone = stats(http)["by_phone"]
                records = {p: messages(http, p) for p in phones}
                final = stats(http)
        finally:
            clear_queues()
        http.close()

    per_phone: dict[str, dict[str, Any]] = {}
    results: list[Result] = []
    edge = 1 / (limit * window)  # one message more or less, from where the window falls
    for phone in phones:
        times = sorted(r["received_at"] for r in records[phone])
        inside = [t for t in times if t0 <= t < t1]
        ratio = len(inside) / (limit * (t1 - t0))
        spread = (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 1 else 0.0
        exhausted = by_phone.get(phone, 0) >= per_number
        per_phone[phone] = {
            "in_window": len(inside),
            "window_s": t1 - t0,
            "rate": len(inside) / (t1 - t0),
            "ratio": ratio,
            "rate_first_to_last": spread,
            "max_in_any_1s": _max_in_window(times, 1.0),
            "backlog_exhausted_before_window_end": exhausted,
        }
        flag = "  (backlog ran out in the window!)" if exhausted else ""
        print(
            f"  {phone}: {len(inside):5d} sends in {t1 - t0:5.2f} s = "
            f"{len(inside) / (t1 - t0):6.2f}/s, ratio {ratio:.3f} of {limit:g}/s "
            f"(first-to-last {spread:6.2f}/s; max in any 1 s over the run "
            f"{per_phone[phone]['max_in_any_1s']}){flag}",
            flush=True,
        )
        results.append(
            Result(
                f"1. fidelity {phone}",
                f"ratio {ratio:.3f} ({len(inside) / (t1 - t0):.2f}/s)",
                "0.95-1.00",
                0.95 <= ratio <= 1.0 + edge and not exhausted,
            )
        )
    violations = final["rate_limit_violations"]
    print(
        f"  simulator: rate_limit_violations {violations} over the whole run (target 0), "
        f"rejected {final['rejected_rate_limited']}, sent {final['sent']}"
    )
    print(
        f"  target: each ratio within 0.95-1.00 (judged with {edge:.3f} allowance for one "
        "message at the window's edge) and 0 violations"
    )
    results.append(Result("1. fidelity violations", str(violations), "0", violations == 0))
    write_json(
        "fidelity",
        {
            "limit": limit,
            "lane": "transactional (verloop.send)",
            "pool": {"processes": processes, "threads": threads},
            "backlog_per_number": per_number,
            "window": {"start": t0, "end": t1},
            "numbers": per_phone,
            "rate_limit_violations": violations,
            "simulator_stats": final,
            "results": results,
        },
    )
    return results


def _max_in_window(times: list[float], width: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- 2. one number at 1,000/s --------------------------------------------------------------------
def high_rate(args: argparse.Namespace) -> list[Result]:
    """One number at 1,000/s: the best achieved rate over a few pool sizes, and its CPU."""
    limit, phone, target = 1000.0, "hi-1", 900.0
    window = args.high_rate_seconds
    configs = [_config(c) for c in args.high_rate_configs.split(",") if c.strip()]
    jobs = int((window + 6) * limit)  # enough for warm-up and window even at the limit
    print(
        f"high rate: 1 number limited at {limit:g}/s (RATE_LIMIT_OVERRIDES), transactional "
        f"backlog of {jobs} per configuration; simulator {LATENCY_MS:g} ms, per_number_rate "
        f"{limit:g}, enforce_limits false; {window:g} s window after warm-up; this machine "
        f"has {os.cpu_count()} cores",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    with simulator(LATENCY_MS) as sim:
        system = system_token(sim.url)
        for processes, threads, level in configs:
            env = worker_env(
                sim.url,
                system,
                metrics=args.metrics,
                RATE_LIMIT_OVERRIDES=json.dumps({phone: limit}),
                LOG_LEVEL=level,
            )
            clear_redis()
            http = _simulated(sim, limit)
            publish_backlog({"verloop.send": [send_job(phone, n) for n in range(jobs)]})
            try:
                with worker(
                    verloop_worker(processes, threads),
                    env,
                    RESULTS / f"high_rate_{processes}x{threads}_{level.lower()}.log",
                ) as proc:
                    run = _measure_high_rate(http, sim, proc, phone, window, jobs)
            finally:
                clear_queues()
            run |= {"processes": processes, "threads": threads, "log_level": level}
            runs.append(run)
            http.close()
            cpu = run["cpu"]
            print(
                f"  {processes} processes x {threads:2d} threads, LOG_LEVEL {level:7s}: "
                f"{run['rate']:6.1f} sends/s ({run['rate'] / limit:.2f} of the limit); "
                f"worker CPU {run['worker_cpu_ms_per_send']:.2f} ms per send; cores used: "
                f"worker {cpu['worker']:.2f} (busiest processes "
                f"{', '.join(f'{c:.2f}' for c in cpu['worker_processes'] if c >= 0.05)}), "
                "simulator "
                f"{cpu['simulator']:.2f}, RabbitMQ {cpu['rabbitmq']:.2f}, Redis "
                f"{cpu['redis']:.2f}; machine {cpu['machine_busy']:.0%} busy; "
                f"violations {run['violations']}",
                flush=True,
            )
        best = max(runs, key=lambda r: r["rate"])
        naive = _naive_reference(args, sim, system, phone, limit, window, jobs, best)
    met = best["rate"] >= target
    limiter = _what_limits(best, limit, naive)
    print(
        f"  best: {best['processes']} processes x {best['threads']} threads "
        f"(LOG_LEVEL {best['log_level']}), {best['rate']:.1f} sends/s "
        f"(target >= {target:g}/s: {'met' if met else 'NOT met'})"
    )
    print(f"  what limits it: {limiter}")
    write_json(
        "high_rate",
        {
            "limit": limit,
            "target": target,
            "runs": runs,
            "best": best,
            "naive_reference": naive,
            "limited_by": limiter,
        },
    )
    return [
        Result(
            "2. one number at 1,000/s",
            f"{best['rate']:.0f}/s ({best['processes']}x{best['threads']}, "
            f"LOG_LEVEL {best['log_level']})",
            f">= {target:g}/s",
            met,
            {"limited_by": limiter},
        )
    ]


def _measure_high_rate(
    http: httpx.Client,
    sim: Simulator,
    proc: WorkerProcess,
    phone: str,
    window: float,
    jobs: int,
) -> dict[str, Any]:
    wait_for(lambda: _sent(http, phone) >= 500, 60, "the worker to send 500", proc)
    time.sleep(1.0)
    sent_first, first = _sent(http, phone), CpuSample.take(proc, sim)
    sleep_checking(window, proc)
    sent_last, last = _sent(http, phone), CpuSample.take(proc, sim)
    elapsed = last.t - first.t
    sent = sent_last - sent_first
    if sent_last >= jobs:
        raise BenchError("the backlog ran out inside the window; raise the backlog")
    cpu = cpu_between(first, last)
    worker_cores = cpu["worker"]
    return {
        "rate": sent / elapsed,
        "window_s": elapsed,
        "cpu": cpu,
        "worker_cpu_ms_per_send": 1000 * worker_cores * elapsed / sent if sent else float("nan"),
        "violations": stats(http)["rate_limit_violations"],
    }


def _naive_reference(
    args: argparse.Namespace,
    sim: Simulator,
    system: str,
    phone: str,
    limit: float,
    window: float,
    jobs: int,
    best: dict[str, Any],
) -> dict[str, Any] | None:
    """The naive dramatiq actor (no limiter, validation, logging or metrics) with the best
    pool, measured the same way: how far this machine goes without the worker's send path."""
    if not args.high_rate_naive:
        return None
    processes, threads = best["processes"], best["threads"]
    http = _simulated(sim, limit)
    env = worker_env(sim.url, system, metrics=False) | {
        "BENCH_AMQP_URL": AMQP_URL,
        "BENCH_VERLOOP_URL": sim.url,
        "BENCH_PHONE_TOKEN": phone_token(sim.url, system, phone),
    }
    # Nothing paces the naive actor: it may send faster than the limit, so it gets twice the
    # backlog (a backlog that runs out inside the window would understate it).
    jobs *= 2
    publish_backlog({"bench.naive": send_path.backlog("naive_send", "bench.naive", jobs)})
    command = [
        str(BIN / "dramatiq"),
        "bench.naive",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--skip-logging",
    ]
    try:
        with worker(command, env, RESULTS / "high_rate_naive.log") as proc:
            run = _measure_high_rate(http, sim, proc, phone, window, jobs)
    finally:
        clear_queues()
        http.close()
    run |= {"processes": processes, "threads": threads}
    print(
        f"  for reference, the naive dramatiq actor (no limiter, validation, logging or "
        f"metrics), {processes} processes x {threads} threads: {run['rate']:6.1f} sends/s, "
        f"{run['worker_cpu_ms_per_send']:.2f} ms of CPU per send; machine "
        f"{run['cpu']['machine_busy']:.0%} busy",
        flush=True,
    )
    return run


def _what_limits(best: dict[str, Any], limit: float, naive: dict[str, Any] | None) -> str:
    cpu = best["cpu"]
    if best["rate"] >= 0.9 * limit:
        return "the limiter: the rate is at the number's limit"
    per_send = best["worker_cpu_ms_per_send"]
    needed = per_send * limit / 1000
    cores = os.cpu_count() or 1
    ours = cpu["worker"] + cpu["simulator"] + cpu["rabbitmq"] + cpu["redis"]
    others = max(0.0, cpu["machine_busy"] * cores - ours)
    text = (
        f"CPU. The worker spends {per_send:.2f} ms of CPU per send, so {limit:g}/s would need "
        f"{needed:.1f} cores for the worker processes alone; this machine has {cores}, and "
        f"they were {cpu['machine_busy']:.0%} busy: worker {cpu['worker']:.2f}, simulator "
        f"{cpu['simulator']:.2f}, RabbitMQ {cpu['rabbitmq']:.2f}, Redis {cpu['redis']:.2f}, "
        f"other processes (e.g. tests running meanwhile) {others:.2f} cores. "
    )
    if any(c >= 0.9 for c in cpu["worker_processes"]):
        text += "A worker process was at a full core (its GIL). "
    if naive is not None:
        text += (
            f"Even the naive dramatiq actor reaches only {naive['rate']:.0f}/s here "
            f"({naive['worker_cpu_ms_per_send']:.2f} ms of CPU per send). "
        )
    return text + (
        "More threads did not help (see the configurations above): they add GIL contention "
        "and CPU per send rather than throughput."
    )


# --- 3. lanes ------------------------------------------------------------------------------------
def lanes(args: argparse.Namespace) -> list[Result]:
    """Transactional sends while a campaign saturates the same number: their latency.

    Run twice: with one worker pool consuming both queues (the configuration the target is
    for), then, for comparison, with the same processes and threads split into two
    ``verloop-worker run`` instances, one per queue (``-Q``).
    """
    limit, target_ms = 50.0, 500.0
    processes, threads = _pool(args.rl_pool)
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
        http = _simulated(sim, limit)
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

                wait_for(lambda: _sent(http, phone) >= 3 * limit, 60, "the campaign to run 3 s")
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


BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Result]]] = {
    "fidelity": fidelity,
    "high_rate": high_rate,
    "lanes": lanes,
}
