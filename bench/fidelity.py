"""The per-number rate limiter's fidelity: four numbers at 50/s (options and setup
shared in ``bench/rate_limits.py``).

fidelity: 4 numbers at 50/s, 1,500 transactional jobs each (``verloop.send``), interleaved.
After a warm-up, a 20 s window: each number's sends received by the simulator in the window
(``received_at`` of ``/admin/messages``) / (50/s x 20 s). Target 0.95-1.00 each, and 0
violations over the whole run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import (
    RESULTS,
    Result,
    clear_queues,
    clear_redis,
    messages,
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

NAME = "fidelity"


def run(args: argparse.Namespace) -> list[Result]:
    """Four numbers at 50/s: each one's achieved rate over a steady window, and violations."""
    limit, phones = 50.0, [f"fid-{i}" for i in range(1, 5)]
    per_number, window = args.fidelity_jobs, args.fidelity_seconds
    processes, threads = parse_pool(args.rl_pool)
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
        http = limited_simulator(sim, limit)
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
                    lambda: all(sent_count(http, p) >= 2 * limit for p in phones),
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
