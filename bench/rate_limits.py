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
   CPU used by the worker, the simulator, RabbitMQ and Redis is printed, to say what limits it.
3. lanes: 1 number at 50/s saturated by 2,000 campaign jobs (``verloop.campaign``), then 200
   transactional sends (``verloop.send``) 50 ms apart, each carrying its enqueue time in its
   ``idempotency_key`` (``lane-<n>-<unix time>``), which the simulator records. Latency = the
   simulator's ``received_at`` - enqueue time (so it includes the simulator's 20 ms).
   Target p99 < 500 ms; the campaign's rate meanwhile is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from worker.producer import Producer

from .common import (
    AMQP_URL,
    CLIENT_ID,
    RESULTS,
    BenchError,
    Result,
    Simulator,
    WorkerProcess,
    clear_queues,
    clear_redis,
    configure_simulator,
    machine_cpu,
    messages,
    percentile,
    pid_by_name,
    process_cpu_s,
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

LATENCY_MS = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the rate-limit benchmarks."""
    group = parser.add_argument_group("rate limits (fidelity, high_rate, lanes)")
    group.add_argument("--fidelity-seconds", type=float, default=20.0, help="steady window")
    group.add_argument("--fidelity-jobs", type=int, default=1500, help="backlog per number")
    group.add_argument(
        "--high-rate-configs",
        default="2x16,2x32,3x32",
        help="PROCESSESxTHREADS to try for the 1,000/s number, comma-separated",
    )
    group.add_argument("--high-rate-seconds", type=float, default=8.0, help="window per config")
    group.add_argument("--lane-campaign-jobs", type=int, default=2000)
    group.add_argument("--lane-sends", type=int, default=200)
    group.add_argument("--lane-spacing-ms", type=float, default=50.0)
    group.add_argument(
        "--rl-pool",
        default="2x8",
        help="PROCESSESxTHREADS for fidelity and lanes (the send path's default pool)",
    )


def _pool(text: str) -> tuple[int, int]:
    processes, _, threads = text.strip().lower().partition("x")
    return int(processes), int(threads)


def _sent(http: httpx.Client, phone_id: str) -> int:
    count: int = stats(http)["by_phone"].get(phone_id, 0)
    return count


def _simulated(
    sim: Simulator, per_number_rate: float, overrides: dict[str, float] | None = None
) -> httpx.Client:
    http = httpx.Client(base_url=sim.url, timeout=30)
    faults: dict[str, Any] = {
        "latency_ms": LATENCY_MS,
        "per_number_rate": per_number_rate,
        "enforce_limits": False,
    }
    if overrides:
        faults["per_number_rate_overrides"] = overrides
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
        env = worker_env(sim.url, system_token(sim.url), RATE_LIMIT_PER_NUMBER=f"{limit:g}")
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
    configs = [_pool(c) for c in args.high_rate_configs.split(",") if c.strip()]
    jobs = int((window + 6) * limit)  # enough for warm-up and window even at the limit
    print(
        f"high rate: 1 number limited at {limit:g}/s (RATE_LIMIT_OVERRIDES), transactional "
        f"backlog of {jobs} per configuration; simulator {LATENCY_MS:g} ms, per_number_rate "
        f"{limit:g}, enforce_limits false; {window:g} s window after warm-up",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    with simulator(LATENCY_MS) as sim:
        system = system_token(sim.url)
        env = worker_env(
            sim.url, system, RATE_LIMIT_OVERRIDES=json.dumps({phone: limit}), LOG_LEVEL="INFO"
        )
        for processes, threads in configs:
            clear_redis()
            http = _simulated(sim, limit)
            publish_backlog({"verloop.send": [send_job(phone, n) for n in range(jobs)]})
            try:
                with worker(
                    verloop_worker(processes, threads),
                    env,
                    RESULTS / f"high_rate_{processes}x{threads}.log",
                ) as proc:
                    run = _measure_high_rate(http, sim, proc, phone, window, jobs)
            finally:
                clear_queues()
            run |= {"processes": processes, "threads": threads}
            runs.append(run)
            http.close()
            print(
                f"  {processes} processes x {threads:2d} threads: {run['rate']:7.1f} sends/s "
                f"({run['rate'] / limit:.2f} of the limit); CPU cores used: worker "
                f"{run['cpu']['worker']:.2f}, simulator {run['cpu']['simulator']:.2f}, "
                f"RabbitMQ {run['cpu']['rabbitmq']:.2f}, Redis {run['cpu']['redis']:.2f}, "
                f"machine {run['cpu']['machine_busy']:.0%} busy; worker CPU per send "
                f"{run['worker_cpu_ms_per_send']:.2f} ms; violations {run['violations']}",
                flush=True,
            )
    best = max(runs, key=lambda r: r["rate"])
    met = best["rate"] >= target
    limiter = _what_limits(best, limit)
    print(
        f"  best: {best['processes']} processes x {best['threads']} threads, "
        f"{best['rate']:.1f} sends/s (target >= {target:g}/s: {'met' if met else 'NOT met'})"
    )
    print(f"  what limits it: {limiter}")
    write_json(
        "high_rate",
        {"limit": limit, "target": target, "runs": runs, "best": best, "limited_by": limiter},
    )
    return [
        Result(
            "2. one number at 1,000/s",
            f"{best['rate']:.0f}/s ({best['processes']}x{best['threads']})",
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
    broker_pids = pid_by_name("beam.smp")
    redis_pids = pid_by_name("redis-server")

    def sample() -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "sent": _sent(http, phone),
            "worker": process_cpu_s(proc.pids()),
            "simulator": process_cpu_s([sim.pid]),
            "rabbitmq": process_cpu_s(broker_pids),
            "redis": process_cpu_s(redis_pids),
            "machine": machine_cpu(),
        }

    first = sample()
    sleep_checking(window, proc)
    last = sample()
    elapsed = last["t"] - first["t"]
    sent = last["sent"] - first["sent"]
    if last["sent"] >= jobs:
        raise BenchError("the backlog ran out inside the window; raise the backlog")

    def cores(key: str) -> float:
        if first[key] is None or last[key] is None:
            return float("nan")
        return float(last[key] - first[key]) / elapsed

    busy = float("nan")
    if first["machine"] and last["machine"]:
        busy = (last["machine"][0] - first["machine"][0]) / (
            last["machine"][1] - first["machine"][1]
        )
    worker_cpu = cores("worker") * elapsed
    return {
        "rate": sent / elapsed,
        "window_s": elapsed,
        "cpu": {
            "worker": cores("worker"),
            "simulator": cores("simulator"),
            "rabbitmq": cores("rabbitmq"),
            "redis": cores("redis"),
            "machine_busy": busy,
        },
        "worker_cpu_ms_per_send": 1000 * worker_cpu / sent if sent else float("nan"),
        "violations": stats(http)["rate_limit_violations"],
    }


def _what_limits(best: dict[str, Any], limit: float) -> str:
    cpu = best["cpu"]
    if best["rate"] >= 0.9 * limit:
        return "the limiter (the rate is at the number's limit)"
    per_send = best["worker_cpu_ms_per_send"]
    if cpu["machine_busy"] >= 0.85:
        return (
            f"CPU: the machine's cores were {cpu['machine_busy']:.0%} busy (worker processes "
            f"{cpu['worker']:.2f} cores, simulator {cpu['simulator']:.2f}, RabbitMQ "
            f"{cpu['rabbitmq']:.2f}, Redis {cpu['redis']:.2f}); the worker spends "
            f"{per_send:.2f} ms of CPU per send, so on this machine, sharing it with the "
            f"simulator and the broker, it cannot reach {limit:g}/s"
        )
    return (
        f"not CPU alone ({cpu['machine_busy']:.0%} busy): concurrency or latency "
        f"({best['processes']}x{best['threads']} threads, each send >= {LATENCY_MS:g} ms), "
        "or lock contention in the worker"
    )


# --- 3. lanes ------------------------------------------------------------------------------------
def lanes(args: argparse.Namespace) -> list[Result]:
    """Transactional sends while a campaign saturates the same number: their latency."""
    limit, phone, target_ms = 50.0, "lane-1", 500.0
    campaign_jobs, sends = args.lane_campaign_jobs, args.lane_sends
    spacing = args.lane_spacing_ms / 1000
    processes, threads = _pool(args.rl_pool)
    print(
        f"lanes: 1 number limited at {limit:g}/s, {campaign_jobs} campaign jobs on "
        f"verloop.campaign, then {sends} transactional sends on verloop.send "
        f"{args.lane_spacing_ms:g} ms apart; {processes} processes x {threads} threads; "
        f"simulator {LATENCY_MS:g} ms",
        flush=True,
    )
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
        env = worker_env(sim.url, system_token(sim.url), RATE_LIMIT_PER_NUMBER=f"{limit:g}")
        enqueued: dict[str, float] = {}
        try:
            with worker(verloop_worker(processes, threads), env, RESULTS / "lanes.log") as proc:
                wait_for(
                    lambda: _sent(http, phone) >= 3 * limit, 60, "the campaign to run 3 s", proc
                )
                start = time.monotonic()
                with Producer(AMQP_URL) as producer:
                    for n in range(sends):
                        pause = start + n * spacing - time.monotonic()
                        if pause > 0:
                            time.sleep(pause)
                        proc.check()
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
                records: list[dict[str, Any]] = []

                def all_arrived() -> bool:
                    records[:] = messages(http, phone)
                    got = sum(1 for r in records if (r["idempotency_key"] or "") in enqueued)
                    return got >= sends

                try:
                    wait_for(all_arrived, 30, "every transactional send", proc, interval_s=0.5)
                except BenchError as exc:
                    print(f"  ! {exc}; the missing ones count as infinitely late")
                final = stats(http)
        finally:
            clear_queues()
        http.close()

    return _lane_results(records, enqueued, final, limit, target_ms, processes, threads)


def _lane_results(
    records: list[dict[str, Any]],
    enqueued: dict[str, float],
    final: dict[str, Any],
    limit: float,
    target_ms: float,
    processes: int,
    threads: int,
) -> list[Result]:
    received = {r["idempotency_key"]: r["received_at"] for r in records}
    latencies = [
        (received[key] - t) * 1000 if key in received else float("inf")
        for key, t in enqueued.items()
    ]
    missing = sum(1 for v in latencies if v == float("inf"))
    first = min(enqueued.values())
    last = max(received.get(k, 0.0) for k in enqueued) if not missing else max(enqueued.values())
    is_campaign: Callable[[dict[str, Any]], bool] = lambda r: (  # noqa: E731
        r["idempotency_key"] or ""
    ).startswith("camp-")
    during = [r for r in records if first <= r["received_at"] <= last]
    campaign = sum(1 for r in during if is_campaign(r)) / (last - first)
    transactional = sum(1 for r in during if not is_campaign(r)) / (last - first)
    p50, p95, p99 = (percentile(latencies, q) for q in (50, 95, 99))
    met = p99 < target_ms
    print(
        f"  transactional enqueue -> received by the simulator (incl. its {LATENCY_MS:g} ms): "
        f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, max {max(latencies):.0f} ms, "
        f"missing {missing} (target p99 < {target_ms:g} ms: {'met' if met else 'NOT met'})"
    )
    print(
        f"  meanwhile ({last - first:.1f} s): campaign {campaign:.1f}/s + transactional "
        f"{transactional:.1f}/s = {campaign + transactional:.1f}/s of the {limit:g}/s limit; "
        f"simulator violations {final['rate_limit_violations']}"
    )
    results = [
        Result(
            "3. lanes: transactional p99",
            f"{p99:.0f} ms (p50 {p50:.0f} ms)",
            f"< {target_ms:g} ms",
            met,
        ),
        Result(
            "3. lanes: campaign rate meanwhile",
            f"{campaign:.1f}/s (+ {transactional:.1f}/s transactional)",
            f"(no target; limit {limit:g}/s)",
            None,
        ),
    ]
    write_json(
        "lanes",
        {
            "limit": limit,
            "pool": {"processes": processes, "threads": threads},
            "latency_ms": {
                "p50": _finite(p50),
                "p95": _finite(p95),
                "p99": _finite(p99),
                "max": _finite(max(latencies)),
                "mean": statistics.fmean(v for v in latencies if v != float("inf"))
                if missing < len(latencies)
                else None,
                "all": [_finite(v) for v in latencies],
            },
            "missing": missing,
            "window_s": last - first,
            "campaign_rate": campaign,
            "transactional_rate": transactional,
            "simulator_stats": final,
            "results": results,
        },
    )
    return results


def _finite(value: float) -> float | None:
    """JSON has no infinity: a send that never arrived is ``null``."""
    return None if value == float("inf") else value


BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Result]]] = {
    "fidelity": fidelity,
    "high_rate": high_rate,
    "lanes": lanes,
}
