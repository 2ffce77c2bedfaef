"""The worker's send path against a naive dramatiq actor (limiter on, not binding).

Both run as real worker processes (same ``--processes`` and ``--threads``) against the Verloop
simulator at 20 ms latency, draining a backlog of the same size from RabbitMQ. The rate is
measured by the simulator between 10 % and 90 % of the backlog, so process start-up and the
tail are left out. Rounds alternate (naive, ours, naive, ours...) so drift on the machine hits
both; the median of each is compared.

The worker's rate limiter is on (every send takes a slot in Redis) with
``RATE_LIMIT_PER_NUMBER=10000``, above what this machine can send, so it does not bind: this
measures the send path's cost, limiter included, not its pacing.

Targets: ours >= 0.9 x naive's sends/s (issue 2, and the rate-limit issue's item 4), and the
worker processes' CPU per send <= 1.2 x naive's (issue 16), both from the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Sequence

import httpx

from bench.common import (
    AMQP_URL,
    BIN,
    RESULTS,
    BenchError,
    CpuSample,
    Result,
    Simulator,
    clear_queues,
    clear_redis,
    cpu_between,
    phone_token,
    publish_backlog,
    simulator,
    system_token,
    verloop_worker,
    worker,
    worker_env,
    write_json,
)
from worker.jobs.producer import encode_job

NAME = "send_path"
TARGET_RATIO = 0.9
#: Issue 16: every feature on, at most this many times the naive actor's CPU per send.
TARGET_CPU_RATIO = 1.2
PHONE = "bench-phone"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's options (the names it always had)."""
    group = parser.add_argument_group("send_path")
    group.add_argument("--processes", type=int, default=2)
    group.add_argument("--threads", type=int, default=8)
    group.add_argument("--jobs", type=int, default=5000, help="backlog size per round")
    group.add_argument("--rounds", type=int, default=5)
    group.add_argument("--latency-ms", type=float, default=20.0)


def backlog(actor: str, queue: str, jobs: int) -> list[bytes]:
    """``jobs`` bodies for the naive actor or for ``send_message``."""
    bodies = []
    for n in range(jobs):
        to = f"+9198{n:08d}"
        if actor == "send_message":
            kwargs = {
                "client_id": "bench",
                "phone_id": PHONE,
                "to": to,
                "message": {"type": "text", "text": {"body": f"bench {n}"}},
            }
        else:
            kwargs = {"to": to, "text": f"bench {n}"}
        bodies.append(encode_job(actor, kwargs, queue=queue, message_id=str(uuid.uuid4())))
    return bodies


def measure(
    sim: Simulator,
    latency_ms: float,
    jobs: int,
    command: list[str],
    env: dict[str, str],
    log: str,
    redis_pids: Sequence[int] | None = None,
) -> tuple[float, dict[str, float]]:
    """Start the worker, wait for the backlog to drain at the simulator; return sends/s, and
    the CPU each part used per send (ms) and the machine's busy share, over the same span
    (Redis: the server on 6379, or the processes ``redis_pids``)."""
    http = httpx.Client(base_url=sim.url, timeout=10)
    http.post("/admin/reset").raise_for_status()  # counters, and faults too: set latency again
    http.put("/admin/faults", json={"latency_ms": latency_ms}).raise_for_status()
    low, high = int(jobs * 0.1), int(jobs * 0.9)
    first = last = None
    with worker(command, env, RESULTS / log) as proc:
        deadline = time.monotonic() + 300
        while last is None:
            proc.check()
            if time.monotonic() > deadline:
                raise BenchError(f"worker stalled; see {proc.log}")
            sent = http.get("/admin/stats").json()["sent"]
            if first is None and sent >= low:
                first = CpuSample.take(proc, sim, redis_pids)
            if sent >= high:
                last = CpuSample.take(proc, sim, redis_pids)
            time.sleep(0.02)
    http.close()
    assert first is not None
    elapsed, sends = last.t - first.t, high - low
    cpu = cpu_between(first, last)
    per_send = {
        part: 1000 * cpu[part] * elapsed / sends
        for part in ("worker", "simulator", "rabbitmq", "redis")
    }
    return sends / elapsed, per_send | {"machine_busy": cpu["machine_busy"]}


def _cpu_text(cpu: dict[str, float]) -> str:
    return (
        f"CPU ms per send: worker {cpu['worker']:.2f}, simulator {cpu['simulator']:.2f}, "
        f"RabbitMQ {cpu['rabbitmq']:.2f}, Redis {cpu['redis']:.2f}; "
        f"machine {cpu['machine_busy']:.0%} busy"
    )


def run(args: argparse.Namespace) -> list[Result]:
    """The rounds, the printed comparison, and ``results/send_path.json``."""
    RESULTS.mkdir(exist_ok=True)
    clear_redis()
    pool = ["--processes", str(args.processes), "--threads", str(args.threads)]
    rates: dict[str, list[float]] = {"naive": [], "ours": []}
    cpus: dict[str, list[dict[str, float]]] = {"naive": [], "ours": []}
    with simulator(args.latency_ms) as sim:
        system = system_token(sim.url)
        naive_env = worker_env(sim.url, system, metrics=False) | {
            "BENCH_AMQP_URL": AMQP_URL,
            "BENCH_VERLOOP_URL": sim.url,
            "BENCH_PHONE_TOKEN": phone_token(sim.url, system, PHONE),
        }
        # The limiter is on (every send takes a slot in Redis) but set above what the
        # machine can send, so it does not bind: this measures its cost, not its pacing.
        ours_env = worker_env(sim.url, system, metrics=args.metrics, RATE_LIMIT_PER_NUMBER="10000")
        try:
            for round_no in range(1, args.rounds + 1):
                publish_backlog({"bench.naive": backlog("naive_send", "bench.naive", args.jobs)})
                rate, cpu = measure(
                    sim,
                    args.latency_ms,
                    args.jobs,
                    [str(BIN / "dramatiq"), "bench.naive", *pool, "--skip-logging"],
                    naive_env,
                    "naive.log",
                )
                rates["naive"].append(rate)
                cpus["naive"].append(cpu)
                print(
                    f"round {round_no}: naive dramatiq actor {rate:8.1f} sends/s; {_cpu_text(cpu)}",
                    flush=True,
                )
                publish_backlog(
                    {"verloop.send": backlog("send_message", "verloop.send", args.jobs)}
                )
                rate, cpu = measure(
                    sim,
                    args.latency_ms,
                    args.jobs,
                    verloop_worker(args.processes, args.threads),
                    ours_env,
                    "ours.log",
                )
                rates["ours"].append(rate)
                cpus["ours"].append(cpu)
                print(
                    f"round {round_no}: verloop-worker       {rate:8.1f} sends/s; {_cpu_text(cpu)}",
                    flush=True,
                )
        finally:
            clear_queues()

    naive = statistics.median(rates["naive"])
    ours = statistics.median(rates["ours"])
    ratio = ours / naive
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print()
    print(
        f"send path, limiter on, not binding (RATE_LIMIT_PER_NUMBER=10000), "
        f"metrics {'on' if args.metrics else 'off'}, "
        f"{args.processes} processes x {args.threads} threads, "
        f"simulator latency {args.latency_ms:g} ms, backlog {args.jobs}, median of "
        f"{args.rounds} rounds"
    )
    print(f"  naive dramatiq actor (baseline): {naive:8.1f} sends/s")
    print(f"  verloop-worker send path:        {ours:8.1f} sends/s")
    print(f"  ratio ours/naive:                {ratio:8.3f}  (target >= {TARGET_RATIO}: {verdict})")
    median_cpu = {
        who: {part: statistics.median(c[part] for c in cpus[who]) for part in cpus[who][0]}
        for who in ("naive", "ours")
    }
    print(f"  naive, median {_cpu_text(median_cpu['naive'])}")
    print(f"  ours,  median {_cpu_text(median_cpu['ours'])}")
    cpu_ratio = median_cpu["ours"]["worker"] / median_cpu["naive"]["worker"]
    cpu_verdict = "met" if cpu_ratio <= TARGET_CPU_RATIO else "NOT met"
    print(
        f"  CPU per send, worker processes: ours {median_cpu['ours']['worker']:.3f} ms, naive "
        f"{median_cpu['naive']['worker']:.3f} ms; ratio {cpu_ratio:.3f} "
        f"(target <= {TARGET_CPU_RATIO}: {cpu_verdict})"
    )
    args_used = {
        k: getattr(args, k) for k in ("processes", "threads", "jobs", "rounds", "latency_ms")
    }
    write_json(
        NAME,
        {
            "args": args_used,
            "limiter": "on, not binding (RATE_LIMIT_PER_NUMBER=10000)",
            "metrics": args.metrics,
            "rates": rates,
            "cpu_ms_per_send": cpus,
            "naive": naive,
            "ours": ours,
            "ratio": ratio,
            "cpu_ratio": cpu_ratio,
        },
    )
    return [
        Result(
            "4. send path vs naive (limiter on, not binding)",
            f"ratio {ratio:.3f} ({ours:.0f} vs {naive:.0f} sends/s)",
            f">= {TARGET_RATIO}",
            ratio >= TARGET_RATIO,
            {"sends_per_s": ours, "naive_sends_per_s": naive},
        ),
        Result(
            "4. CPU per send, ours / naive",
            f"ratio {cpu_ratio:.3f} ({median_cpu['ours']['worker']:.2f} vs "
            f"{median_cpu['naive']['worker']:.2f} ms, worker processes)",
            f"<= {TARGET_CPU_RATIO}",
            cpu_ratio <= TARGET_CPU_RATIO,
        ),
    ]
