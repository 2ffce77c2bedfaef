"""The per-number rate limiter at 1,000/s on one number (options and setup shared
in ``bench/rate_limits.py``).

high_rate: 1 number at 1,000/s (``RATE_LIMIT_OVERRIDES``), a few processes x threads tried
in turn, rate from ``/admin/stats`` over a window after warm-up. Target >= 900/s for the best.
The CPU used by the worker, the simulator, RabbitMQ and Redis is printed, and the naive
actor's rate with the best pool, to say what limits it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import httpx

from bench import send_path
from bench.common import (
    AMQP_URL,
    BIN,
    RESULTS,
    BenchError,
    CpuSample,
    Result,
    Simulator,
    WorkerProcess,
    clear_queues,
    clear_redis,
    cpu_between,
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
from bench.rate_limits import LATENCY_MS, limited_simulator, parse_pool, sent_count

NAME = "high_rate"


def run(args: argparse.Namespace) -> list[Result]:
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
            http = limited_simulator(sim, limit)
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
    wait_for(lambda: sent_count(http, phone) >= 500, 60, "the worker to send 500", proc)
    time.sleep(1.0)
    sent_first, first = sent_count(http, phone), CpuSample.take(proc, sim)
    sleep_checking(window, proc)
    sent_last, last = sent_count(http, phone), CpuSample.take(proc, sim)
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
    http = limited_simulator(sim, limit)
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


def _config(text: str) -> tuple[int, int, str]:
    """``PxT`` or ``PxT:LEVEL`` (the worker's LOG_LEVEL; INFO by default)."""
    pool, _, level = text.strip().partition(":")
    return (*parse_pool(pool), level.upper() or "INFO")
