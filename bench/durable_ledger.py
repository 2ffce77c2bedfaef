"""The durable ledger's cost: the send path with ``LEDGER_DURABILITY=replica`` through Sentinel
against the single-node figures, in the same run (issue 17).

Both run the real worker (``verloop-worker run``, the same processes and threads as
``send_path``) draining the same backlog from RabbitMQ against the Verloop simulator at 20 ms,
limiter on but not binding, rounds alternating:

* **single node**: one ``redis-server`` of the benchmark's own, ``LEDGER_DURABILITY=primary``
  (the default);
* **replica**: a primary, one replica and three sentinels (:mod:`bench.sentinel_group`), the
  worker finding the primary through ``REDIS_SENTINELS`` and each ledger record waiting for
  the replica (``WAIT 1``, ``LEDGER_DURABILITY=replica``).

All servers are started the same way (passwords, no persistence), on free ports, in a temporary
folder, and stopped at the end. Redis's CPU is every process of the choice's (for ``replica``:
the primary, the replica and the sentinels). Informational: the issue asks for the figures,
with no target.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import (
    BenchError,
    Result,
    clear_queues,
    publish_backlog,
    simulator,
    system_token,
    verloop_worker,
    worker_env,
    write_json,
)
from bench.send_path import backlog, measure
from bench.sentinel_group import PRIMARY_PASSWORD, SentinelGroup

NAME = "durable_ledger"
CHOICES = ("single node", "replica")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--durable-rounds", type=int, default=3, help="rounds, choices alternating")


def _flush(group: SentinelGroup) -> None:
    """Forget the last round's ledger, tokens and limiter state (on the current primary)."""
    port = group.primary_port()
    if port is None:
        raise BenchError("no Redis primary answers")
    with group.server(port) as client:
        client.flushall()


def run(args: argparse.Namespace) -> list[Result]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not on PATH: this benchmark starts its own Redis servers")
    pool = (args.processes, args.threads)
    taken: dict[str, list[tuple[float, dict[str, float]]]] = {choice: [] for choice in CHOICES}
    with tempfile.TemporaryDirectory(prefix="verloop-durable-") as tmp:
        single = SentinelGroup(binary, Path(tmp) / "single", replicas=0, sentinels=0)
        replicated = SentinelGroup(binary, Path(tmp) / "replicated", replicas=1)
        for group in (single, replicated):
            group.workdir.mkdir()
        try:
            single.start()
            replicated.start()
            with simulator(args.latency_ms) as sim:
                system = system_token(sim.url)
                base = worker_env(
                    sim.url, system, metrics=args.metrics, RATE_LIMIT_PER_NUMBER="10000"
                )
                envs = {
                    "single node": base
                    | {
                        "REDIS_URL": f"redis://:{PRIMARY_PASSWORD}@127.0.0.1:"
                        f"{single.ports['primary']}/0",
                        "LEDGER_DURABILITY": "primary",
                    },
                    "replica": base | replicated.worker_env() | {"LEDGER_DURABILITY": "replica"},
                }
                groups = {"single node": single, "replica": replicated}
                try:
                    for round_no in range(1, args.durable_rounds + 1):
                        for choice in CHOICES:
                            _flush(groups[choice])
                            _publish(args.jobs)
                            rate, cpu = measure(
                                sim,
                                args.latency_ms,
                                args.jobs,
                                verloop_worker(*pool),
                                envs[choice],
                                "durable_ledger.log",
                                redis_pids=groups[choice].pids,
                            )
                            taken[choice].append((rate, cpu))
                            print(
                                f"round {round_no}: {choice:<11} {rate:7.1f} sends/s; CPU ms "
                                f"per send: worker {cpu['worker']:.3f}, Redis {cpu['redis']:.3f}",
                                flush=True,
                            )
                finally:
                    clear_queues()
        finally:
            single.stop()
            replicated.stop()
    return _summary(taken, args)


def _publish(jobs: int) -> None:
    publish_backlog({"verloop.send": backlog("send_message", "verloop.send", jobs)})


def _summary(
    taken: dict[str, list[tuple[float, dict[str, float]]]], args: argparse.Namespace
) -> list[Result]:
    medians = {
        choice: {
            "sends_per_s": statistics.median(rate for rate, _ in rounds),
            "worker_ms": statistics.median(cpu["worker"] for _, cpu in rounds),
            "redis_ms": statistics.median(cpu["redis"] for _, cpu in rounds),
        }
        for choice, rounds in taken.items()
    }
    one, durable = medians["single node"], medians["replica"]
    print(
        f"\nledger durability, {args.processes} processes x {args.threads} threads, simulator "
        f"{args.latency_ms:g} ms, backlog {args.jobs}, median of {args.durable_rounds} rounds:"
    )
    for choice, m in medians.items():
        print(
            f"  {choice:<11} {m['sends_per_s']:7.1f} sends/s; CPU ms per send: worker "
            f"{m['worker_ms']:.3f}, Redis {m['redis_ms']:.3f}"
        )
    cpu_ratio = durable["worker_ms"] / one["worker_ms"]
    rate_ratio = durable["sends_per_s"] / one["sends_per_s"]
    print(f"  replica / single node: worker CPU per send {cpu_ratio:.3f}, sends/s {rate_ratio:.3f}")
    write_json(NAME, {"medians": medians, "rounds": taken, "args": vars(args)})
    return [
        Result(
            "LEDGER_DURABILITY=replica / single node",
            f"worker CPU per send {cpu_ratio:.3f} ({durable['worker_ms']:.2f} vs "
            f"{one['worker_ms']:.2f} ms), sends/s {rate_ratio:.3f} "
            f"({durable['sends_per_s']:.0f} vs {one['sends_per_s']:.0f})",
            "-",
            None,
        )
    ]
