"""The per-number rate limiter under load: fidelity, a 1,000/s number, and the two lanes.

Each benchmark runs the real worker (``verloop-worker run``, Redis limiter in db 14) against
the Verloop simulator at 20 ms latency, from a backlog published before the worker starts.
The simulator is told each number's limit with ``enforce_limits: false``: it accepts every send
and counts those above the limit as ``rate_limit_violations``.

This module holds what the three share: their options, the pool they run, and the
simulator they send to. The benchmarks: ``bench/fidelity.py``, ``bench/high_rate.py``,
``bench/lanes.py``.
"""

from __future__ import annotations

import argparse

import httpx

from bench.common import Simulator, configure_simulator, stats

__all__ = ["LATENCY_MS", "add_arguments", "limited_simulator", "parse_pool", "sent_count"]

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


def parse_pool(text: str) -> tuple[int, int]:
    """``PxT`` (processes x threads) as two numbers."""
    processes, _, threads = text.strip().lower().partition("x")
    return int(processes), int(threads)


def sent_count(http: httpx.Client, phone_id: str) -> int:
    """Sends the simulator has accepted from ``phone_id`` so far."""
    count: int = stats(http)["by_phone"].get(phone_id, 0)
    return count


def limited_simulator(sim: Simulator, per_number_rate: float) -> httpx.Client:
    """A client for the simulator's admin API, after telling it the number's limit: it
    accepts sends over it and counts them as violations."""
    http = httpx.Client(base_url=sim.url, timeout=30)
    faults = {"latency_ms": LATENCY_MS, "per_number_rate": per_number_rate, "enforce_limits": False}
    configure_simulator(http, faults)
    return http
