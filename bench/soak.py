"""Issue 13, point 9: a soak. Steady mixed load for ``--soak-minutes`` (25) against real worker
processes, with a RabbitMQ restart at 1/3 and a Redis restart at 2/3 of the run.

On demand only (``make soak`` or ``python -m bench --only soak``): it is not part of the
default ``make bench``. It starts what it may restart (:mod:`bench.private_services`): a
redis-server and a RabbitMQ node of its own on free ports, never the machine's shared ones.

The load (:mod:`bench.soak_load`), from one thread, every job confirmed by RabbitMQ:
transactional sends (``--soak-send-rate``, 40/s) with a key and recipient each, a campaign's
sends (``--soak-campaign-rate``, 20/s; the campaign created in the campaign store as
``campaign start`` would), a management job every 15 s (``list_clients``,
``refresh_phone_token``) and 1 % hostile jobs (a fixed mix the worker must dead-letter as
invalid). ``verloop-worker run`` (``--soak-pool``, 2x8) sends to the Verloop simulator at 20 ms,
which answers 2 % of sends with a 5xx.

Sampled every minute (more often in runs under 15 minutes, so a fit has enough points): RSS and
open files of every worker process (the ``run`` process and its descendants, from /proc),
Redis ``used_memory``, ``DBSIZE`` (with the keys by family, the ledger's apart), clients, and
the outbox's ``XLEN``; queue depths. After a warm-up (a fifth of the run, at most 5 minutes)
each is fitted by least squares, within the stretches between restarts (a level that moves at a
restart, Redis reloading its AOF for one, is not taken for a trend), leaving out the first
samples after each restart.

"Flat", in figures (growth only: shrinking is fine):

* worker RSS: every process grows less than 5 % of its own level per hour;
* Redis memory: it grows by design, one ledger entry per send kept ``LEDGER_TTL_S`` (30 days);
  beyond that entry's own size (``MEMORY USAGE``, sampled) and 100 bytes for its expiry entry
  and hash-table slots, nothing may grow per new entry;
* keys: the ledger's are one per send (checked at the end); the others grow less than one per
  1,000 jobs;
* outbox: grows less than one event per 1,000 jobs, and is empty once the queues drained.

At the end, after the load stops and the queues drain: every job published has a final
outcome (outcome events on a queue of ours bound to ``verloop.events``; hostile jobs in the
dead-letter queues with outcome ``invalid``), and nobody was messaged twice (every recipient is
unique, so the simulator's records of the run must hold each at most once; its
``duplicates`` counts repeated idempotency keys).

Samples, fits and the accounting go to ``bench/results/soak.json`` (rewritten after every
sample, so a run cut short keeps what it measured); worker, RabbitMQ and Redis logs to
``bench/results/soak*.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import orjson
import pika
import pika.exceptions
import redis

from bench.common import (
    CLIENT_ID,
    RESULTS,
    BenchError,
    Result,
    WorkerProcess,
    configure_simulator,
    machine_cpu,
    messages,
    process_cpu_s,
    simulator,
    stats,
    system_token,
    verloop_worker,
    wait_for,
    worker,
    worker_env,
    write_json,
)
from bench.private_services import Broker, PrivateRabbit, PrivateRedis, SharedRabbit
from bench.soak_load import (
    CAMPAIGN_QUEUE,
    EVENTS_QUEUE,
    FINAL,
    MANAGE_QUEUE,
    PHONES,
    SEND_QUEUE,
    Job,
    Load,
    Outcomes,
)
from worker.campaigns.store import CampaignRef, CampaignStore

NAME = "soak"
LATENCY_MS = 20.0
#: 2 % of sends answered 5xx (retried by the worker: each must still go out exactly once).
ERROR_RATES = {"500": 0.01, "503": 0.01}
CAMPAIGN = "soak-campaign"
MANAGE_EVERY_S = 15.0
HOSTILE_SHARE = 0.01
OUTAGE_S = 10.0
QUEUES = (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE)
ALL_QUEUES = [q + suffix for q in QUEUES for suffix in ("", ".DQ", ".XQ")] + [EVENTS_QUEUE]
OUTBOX = "verloop:events:outbox"
PARKED = "verloop:events:parked"
LEDGER_FAMILY = "verloop:ledger"

#: The targets (see the module docstring).
RSS_GROWTH_PER_H = 0.05
LEDGER_ENTRY_OVERHEAD_B = 100
PER_JOBS = 1000
DRAIN_STALL_S = 180.0
DRAIN_MAX_S = 900.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "soak (issue 13; on demand: `make soak` or --only soak, never in the default run)"
    )
    group.add_argument(
        "--soak-minutes", type=float, default=25.0, help="how long the load runs (default 25)"
    )
    group.add_argument("--soak-pool", default="2x8", help="PROCESSESxTHREADS of the worker")
    group.add_argument("--soak-send-rate", type=float, default=40.0, help="transactional/s")
    group.add_argument("--soak-campaign-rate", type=float, default=20.0, help="campaign jobs/s")
    group.add_argument(
        "--soak-shared-rabbitmq",
        action="store_true",
        help="no private RabbitMQ node: drop the connections of vhost verloop-bench-soak on the "
        "shared broker instead of restarting it (what happens when no node can be started)",
    )


# --- the run -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """When things happen, in seconds from the start of the load."""

    duration_s: float
    interval_s: float
    warmup_s: float
    settle_s: float
    restarts: list[tuple[float, str]]

    @classmethod
    def of(cls, minutes: float) -> Plan:
        duration = minutes * 60
        interval = min(60.0, duration / 15)
        return cls(
            duration_s=duration,
            interval_s=interval,
            warmup_s=min(300.0, duration / 5),
            settle_s=min(60.0, 2 * interval),
            restarts=[(duration / 3, "rabbitmq"), (2 * duration / 3, "redis")],
        )


@dataclass
class Run:
    """Everything measured, as written to ``soak.json``."""

    config: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    analysis: dict[str, Any] = field(default_factory=dict)

    def save(self, partial: bool) -> None:
        write_json(NAME, {"partial": partial, **asdict(self)})


def run(args: argparse.Namespace) -> list[Result]:
    if args.soak_minutes < 2:
        raise ValueError("--soak-minutes must be at least 2 (warm-up, two restarts, samples)")
    plan = Plan.of(args.soak_minutes)
    processes, _, threads = args.soak_pool.lower().partition("x")
    rates = {
        "send": args.soak_send_rate,
        "campaign": args.soak_campaign_rate,
        "manage": 1 / MANAGE_EVERY_S,
        # 1 % of all jobs: hostile / (good + hostile)
        "hostile": (args.soak_send_rate + args.soak_campaign_rate)
        * HOSTILE_SHARE
        / (1 - HOSTILE_SHARE),
    }
    print(
        f"soak: {plan.duration_s / 60:g} min of {rates['send']:g} transactional + "
        f"{rates['campaign']:g} campaign jobs/s, a management job every {MANAGE_EVERY_S:g} s, "
        f"{HOSTILE_SHARE:.0%} hostile; worker {processes} processes x {threads} threads; "
        f"simulator {LATENCY_MS:g} ms, 2 % 5xx; RabbitMQ restart at "
        f"{plan.restarts[0][0] / 60:.1f} min, Redis at {plan.restarts[1][0] / 60:.1f} min "
        f"({OUTAGE_S:g} s down each); samples every {plan.interval_s:g} s, warm-up "
        f"{plan.warmup_s:g} s",
        flush=True,
    )
    for log in ("soak.log", "soak-redis.log", "soak-rabbitmq.log"):
        (RESULTS / log).unlink(missing_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="verloop-soak-"))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with contextlib.ExitStack() as stack:
            (workdir / "redis").mkdir()
            cache_server = PrivateRedis(workdir / "redis", RESULTS / "soak-redis.log")
            stack.callback(cache_server.stop)
            cache_server.start()
            broker = _start_broker(args, workdir, stack)
            print(f"  RabbitMQ: {broker.description}; Redis: a private redis-server (AOF on)")
            return _soak(args, plan, rates, broker, cache_server, int(processes), int(threads))
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # The private servers and the worker are stopped in `finally` blocks, which SIGTERM's
    # default action would skip.
    sys.exit(128 + signum)


def _start_broker(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> Broker:
    if not args.soak_shared_rabbitmq:
        (workdir / "rabbitmq").mkdir()
        node = PrivateRabbit(workdir / "rabbitmq", RESULTS / "soak-rabbitmq.log")
        stack.callback(node.stop)
        try:
            node.start()
            return node
        except BenchError as exc:
            print(f"  could not start a private RabbitMQ node: {exc}", flush=True)
    shared = SharedRabbit(ALL_QUEUES)
    shared.start()
    stack.callback(shared.stop)
    print(
        "  !!! FALLBACK: RabbitMQ is NOT restarted in this run. Its 'restart' closes every "
        "connection of vhost verloop-bench-soak on the shared broker for the outage "
        "(unacknowledged jobs are requeued, as on a restart; queues and broker stay up).",
        flush=True,
    )
    return shared


def _soak(
    args: argparse.Namespace,
    plan: Plan,
    rates: dict[str, float],
    broker: Broker,
    cache_server: PrivateRedis,
    processes: int,
    threads: int,
) -> list[Result]:
    run_id = uuid.uuid4().hex[:8]
    expected_jobs = sum(rates.values()) * plan.duration_s
    cache = redis.Redis.from_url(cache_server.url, decode_responses=True, socket_timeout=10)
    store = CampaignStore(cache)
    ref = CampaignRef(CLIENT_ID, CAMPAIGN)
    store.create(ref, {"client_id": CLIENT_ID, "template": "soak_offer"})
    record = Run(
        config={
            "minutes": plan.duration_s / 60,
            "plan": asdict(plan),
            "rates_per_s": rates,
            "pool": f"{processes}x{threads}",
            "rabbitmq": broker.description,
            "redis": "private redis-server, AOF everysec",
            "simulator": {"latency_ms": LATENCY_MS, "error_rates": ERROR_RATES},
            "run_id": run_id,
            "load_average_before": os.getloadavg(),
            "cores": os.cpu_count(),
        }
    )
    metrics_dir = RESULTS / "metrics-soak"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    outcomes = Outcomes(broker.amqp_url)
    outcomes.declare()
    with simulator(LATENCY_MS, message_log_limit=int(expected_jobs * 2) + 10_000) as sim:
        http = httpx.Client(base_url=sim.url, timeout=120)
        configure_simulator(http, {"latency_ms": LATENCY_MS, "error_rates": ERROR_RATES})
        env = worker_env(
            sim.url,
            system_token(sim.url),
            metrics=args.metrics,
            AMQP_URL=broker.amqp_url,
            REDIS_URL=cache_server.url,
            METRICS_DIR=str(metrics_dir),
        )
        log = RESULTS / "soak.log"
        with worker(verloop_worker(processes, threads), env, log) as proc:
            wait_for(lambda: b"ready for action" in log.read_bytes(), 90, "the worker", proc, 0.5)
            load = Load(broker.amqp_url, rates, run_id, CAMPAIGN)
            sampler = Sampler(proc, cache, broker.amqp_url, load, outcomes)
            outcomes.start()
            try:
                _drive(plan, record, load, sampler, broker, cache_server, proc, outcomes)
                store.checkpoint(
                    ref,
                    rows_done=load.counts["campaign"],
                    enqueued=load.counts["campaign"],
                    rejected=0,
                )
                store.finish_enqueue(ref, total_rows=load.counts["campaign"])
                drain = _drain(plan, record, load, sampler, outcomes, proc)
                final_stats = stats(http)
                records = [r for phone in PHONES for r in messages(http, phone)]
                dead = _dead_letters(broker.amqp_url)
                ledger = ledger_states(cache)
                worker_cpu = sampler.worker_cpu_s()
            finally:
                load.stop()
                outcomes.stop()
        http.close()
    outcomes.join(timeout=10)
    campaign = dict(store.get(ref).fields)
    cache.close()
    record.config["load_average_after"] = os.getloadavg()
    record.analysis = analyse(
        plan, record, load.jobs, outcomes, final_stats, records, dead, campaign, drain
    )
    record.analysis["redis"]["ledger_states_at_end"] = ledger
    record.analysis["machine"] = sampler.machine_busy() | {"worker_cpu_s": worker_cpu}
    record.analysis["load_generator"] = {
        "republished_after_lost_confirm": load.republished,
        "event_consumer_reconnects": outcomes.reconnects,
        "events_received": outcomes.received,
    }
    record.save(partial=False)
    return results(record.analysis)


def _drive(
    plan: Plan,
    record: Run,
    load: Load,
    sampler: Sampler,
    broker: Broker,
    cache_server: PrivateRedis,
    proc: WorkerProcess,
    outcomes: Outcomes,
) -> None:
    """The load phase: start the load, sample, restart RabbitMQ then Redis, stop the load."""
    restart = {"rabbitmq": broker.restart, "redis": cache_server.restart}
    pending = list(plan.restarts)
    sampler.start()
    load.start()
    next_sample = 0.0
    while True:
        now = sampler.elapsed()
        if now >= plan.duration_s:
            break
        if now >= next_sample:
            record.samples.append(sampler.take("load"))
            record.save(partial=True)
            _progress(record.samples[-1])
            next_sample += plan.interval_s
        elif pending and now >= pending[0][0]:
            _, what = pending.pop(0)
            print(f"  {now / 60:5.1f} min: restarting {what} ({OUTAGE_S:g} s down)", flush=True)
            began, wall = sampler.elapsed(), time.time()
            restart[what](OUTAGE_S)
            record.restarts.append(
                {
                    "what": what,
                    "at_s": began,
                    "back_at_s": sampler.elapsed(),
                    "wall_start": wall,
                    "wall_back": time.time(),
                }
            )
        else:
            due = min([next_sample, plan.duration_s] + [t for t, _ in pending[:1]])
            _sleep_watching(due - now, proc, load, outcomes)
    load.stop()
    load.join(timeout=330)
    if load.is_alive():
        raise BenchError("the load generator did not stop within 330 s")
    record.samples.append(sampler.take("end of load"))
    record.save(partial=True)
    _progress(record.samples[-1])


def _drain(
    plan: Plan, record: Run, load: Load, sampler: Sampler, outcomes: Outcomes, proc: WorkerProcess
) -> dict[str, Any]:
    """Wait until every job has its final outcome, the queues are empty and the outbox too;
    give up after a stall of ``DRAIN_STALL_S`` (what is missing then is reported as lost)."""
    good = [job.message_id for job in load.jobs if job.kind != "hostile"]
    hostile = sum(1 for job in load.jobs if job.kind == "hostile")
    began = time.monotonic()
    best, moved = len(good) + 1, began
    next_sample = began + plan.interval_s
    while True:
        proc.check()
        missing = sum(1 for message_id in good if not outcomes.final(message_id))
        depths = sampler.queue_depths() or {}
        waiting = sum(v for k, v in depths.items() if not k.endswith(".XQ") and k != EVENTS_QUEUE)
        dead = sum(v for k, v in depths.items() if k.endswith(".XQ"))
        outbox = sampler.outbox_length()
        now = time.monotonic()
        if missing == 0 and waiting == 0 and outbox == 0 and dead >= hostile:
            break
        if missing < best:
            best, moved = missing, now
        if now - moved > DRAIN_STALL_S or now - began > DRAIN_MAX_S:
            print(f"  drain gave up: {missing} jobs without a final outcome", flush=True)
            break
        if now >= next_sample:
            record.samples.append(sampler.take("drain"))
            record.save(partial=True)
            next_sample += plan.interval_s
        time.sleep(2)
    took = time.monotonic() - began
    record.samples.append(sampler.take("drained"))
    record.save(partial=True)
    print(f"  drained in {took:.0f} s", flush=True)
    return {"seconds": took, "missing_at_end": missing, "outbox_at_end": outbox}


def _sleep_watching(seconds: float, proc: WorkerProcess, load: Load, outcomes: Outcomes) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        proc.check()
        for thread in (load, outcomes):
            if thread.error is not None:
                raise BenchError(f"{thread.name} failed: {thread.error!r}")
        time.sleep(min(0.5, left))


def _progress(sample: dict[str, Any]) -> None:
    cache = sample["redis"] or {}
    rss = sum(p["rss_kb"] for p in sample["processes"].values()) / 1024
    print(
        f"  {sample['t'] / 60:5.1f} min [{sample['phase']}]: {sample['published']} published, "
        f"{sample['events']} events; worker RSS {rss:.0f} MB; Redis "
        f"{cache.get('used_memory', 0) / 2**20:.1f} MB, {cache.get('dbsize', '?')} keys "
        f"({cache.get('families', {}).get(LEDGER_FAMILY, '?')} ledger), outbox "
        f"{cache.get('outbox', '?')}",
        flush=True,
    )


# --- sampling ------------------------------------------------------------------------------------
class Sampler:
    """Takes one sample of the worker's processes, Redis and RabbitMQ (see the module docstring)."""

    def __init__(
        self, proc: WorkerProcess, cache: redis.Redis, amqp_url: str, load: Load, outcomes: Outcomes
    ) -> None:
        self.proc = proc
        self.cache = cache
        self.amqp_url = amqp_url
        self.load = load
        self.outcomes = outcomes
        self.started = time.monotonic()
        self._cpu_first: dict[int, float] = {}
        self._machine_first: tuple[float, float] | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._cpu_first = process_cpu_s(self.proc.pids())
        self._machine_first = machine_cpu()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def take(self, phase: str) -> dict[str, Any]:
        return {
            "t": round(self.elapsed(), 1),
            "wall": time.time(),
            "phase": phase,
            "processes": _processes(self.proc.pids()),
            "redis": self._redis(),
            "queues": self.queue_depths(),
            "published": len(self.load.jobs),
            "events": self.outcomes.received,
            "load_average": os.getloadavg()[0],
        }

    def worker_cpu_s(self) -> float:
        now = process_cpu_s(self.proc.pids())
        return sum(now[pid] - self._cpu_first.get(pid, 0.0) for pid in now)

    def machine_busy(self) -> dict[str, float]:
        last = machine_cpu()
        if last is None or self._machine_first is None:
            return {}
        busy = (last[0] - self._machine_first[0]) / (last[1] - self._machine_first[1])
        return {"machine_busy": busy}

    def outbox_length(self) -> int | None:
        try:
            return int(self.cache.xlen(OUTBOX))
        except redis.RedisError:
            return None

    def _redis(self) -> dict[str, Any] | None:
        try:
            memory = self.cache.info("memory")
            keyspace = self.cache.info("keyspace").get("db0", {})
            families: Counter[str] = Counter()
            ledger_sample: list[str] = []
            for key in self.cache.scan_iter(count=1000):
                family = key_family(key)
                families[family] += 1
                if family == LEDGER_FAMILY and len(ledger_sample) < 50:
                    ledger_sample.append(key)
            pipe = self.cache.pipeline(transaction=False)
            for key in ledger_sample:
                pipe.memory_usage(key, samples=0)
            sizes = [size for size in pipe.execute() if size]
            return {
                "used_memory": int(memory["used_memory"]),
                "dbsize": int(self.cache.dbsize()),
                "expiring": int(keyspace.get("expires", 0)) if isinstance(keyspace, dict) else 0,
                "families": dict(families),
                "ledger_entry_bytes": statistics.fmean(sizes) if sizes else None,
                "clients": int(self.cache.info("clients")["connected_clients"]),
                "outbox": int(self.cache.xlen(OUTBOX)),
                "parked": int(self.cache.xlen(PARKED)),
            }
        except redis.RedisError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    def queue_depths(self) -> dict[str, int] | None:
        """Ready jobs per queue (None while RabbitMQ does not answer)."""
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        except (pika.exceptions.AMQPError, OSError):
            return None
        depths = {}
        try:
            for queue in ALL_QUEUES:
                channel = connection.channel()
                try:
                    depths[queue] = channel.queue_declare(queue, passive=True).method.message_count
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    depths[queue] = 0  # not declared yet
        except (pika.exceptions.AMQPError, OSError):
            return None
        finally:
            if connection.is_open:
                connection.close()
        return depths


def _processes(pids: list[int]) -> dict[str, dict[str, Any]]:
    found = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it exited meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        found[str(pid)] = {
            "rss_kb": int(fields["VmRSS"].split()[0]),
            "rss_anon_kb": int(fields.get("RssAnon", "0 kB").split()[0]),
            "threads": int(fields["Threads"]),
            "fds": fds,
            "ppid": int(fields["PPid"]),
            "command": command[-80:],
        }
    return found


_NUMBER = re.compile(r"\d+")


def key_family(key: str) -> str:
    """A Redis key with its ids and numbers left out: ``verloop:ledger`` for every ledger
    entry; ``4:acme:...`` parts (length-prefixed ids, :mod:`worker.connections.redis_keys`) become
    ``*``."""
    if key.startswith(LEDGER_FAMILY + ":"):
        return LEDGER_FAMILY
    words: list[str] = []
    rest = key
    while rest:
        head, sep, tail = rest.partition(":")
        if _NUMBER.fullmatch(head) and sep and len(tail) >= int(head) > 0:
            words.append("*")
            rest = tail[int(head) :].removeprefix(":")
        else:
            words.append("#" if _NUMBER.fullmatch(head) else head)
            rest = tail
    return ":".join(words)


def ledger_states(cache: redis.Redis) -> dict[str, int]:
    """Ledger entries by state: ``sent`` (``s:``), ``claim`` (``p:``, a send whose record
    was never written, or in flight), anything else by its first characters."""
    states: Counter[str] = Counter()
    keys = list(cache.scan_iter(match=LEDGER_FAMILY + ":*", count=1000))
    for start in range(0, len(keys), 1000):
        for value in cache.mget(keys[start : start + 1000]):
            text = str(value or "")
            states[{"s:": "sent", "p:": "claim"}.get(text[:2], text[:2] or "gone")] += 1
    return dict(states)


def _dead_letters(amqp_url: str) -> list[dict[str, Any]]:
    """Every dead letter, taken off its queue (the run is over): queue, header, body."""
    found = []
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for queue in QUEUES:
            while True:
                method, properties, body = channel.basic_get(queue + ".XQ", auto_ack=True)
                if method is None:
                    break
                header = dict((properties.headers or {}).get("x-verloop-dead-letter") or {})
                found.append({"queue": queue, "header": _plain(header), "body": body})
    finally:
        connection.close()
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    return value


# --- the analysis --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """A least-squares growth rate within the stretches between restarts."""

    slope_per_h: float
    level: float  #: mean of the fitted samples
    peak: float  #: over every sample of the run, drain included
    samples: int

    @property
    def relative_per_h(self) -> float:
        return self.slope_per_h / self.level if self.level else float("inf")


def fit(
    points: list[tuple[float, float]], cuts: list[float], peak: float | None = None
) -> Fit | None:
    """Pooled slope of ``(t seconds, value)`` within the segments ``cuts`` separate (each
    segment keeps its own level, so a step at a restart is not a trend); None if fewer than
    three points or no segment with two."""
    segments: dict[int, list[tuple[float, float]]] = {}
    for t, value in points:
        segments.setdefault(sum(1 for cut in cuts if t >= cut), []).append((t / 3600, value))
    sxy = sxx = 0.0
    for segment in segments.values():
        if len(segment) < 2:
            continue
        mx = statistics.fmean(x for x, _ in segment)
        my = statistics.fmean(y for _, y in segment)
        sxy += sum((x - mx) * (y - my) for x, y in segment)
        sxx += sum((x - mx) ** 2 for x, _ in segment)
    if len(points) < 3 or sxx == 0:
        return None
    values = [value for _, value in points]
    return Fit(
        sxy / sxx, statistics.fmean(values), max(values) if peak is None else peak, len(values)
    )


def _fitted(
    samples: list[dict[str, Any]], plan: Plan, restarts: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[float]]:
    """The samples a fit uses: load phase, after the warm-up, not just after a restart."""
    backs = [r["back_at_s"] for r in restarts]
    chosen = [
        s
        for s in samples
        if s["phase"] == "load"
        and s["t"] >= plan.warmup_s
        and not any(0 <= s["t"] - back < plan.settle_s for back in backs)
    ]
    return chosen, [r["at_s"] for r in restarts]


def analyse(
    plan: Plan,
    record: Run,
    jobs: list[Job],
    outcomes: Outcomes,
    final_stats: dict[str, Any],
    records: list[dict[str, Any]],
    dead: list[dict[str, Any]],
    campaign: dict[str, str],
    drain: dict[str, Any],
) -> dict[str, Any]:
    samples = record.samples
    chosen, cuts = _fitted(samples, plan, record.restarts)
    jobs_per_h = len(jobs) / plan.duration_s * 3600
    analysis: dict[str, Any] = {"drain": drain, "fitted_samples": len(chosen)}

    # Worker RSS: each process present throughout the fit.
    pids = set.intersection(*(set(s["processes"]) for s in chosen)) if chosen else set()
    per_process = {}
    for pid in sorted(pids):
        points = [(s["t"], s["processes"][pid]["rss_kb"] / 1024) for s in chosen]
        peak = max(s["processes"][pid]["rss_kb"] for s in samples if pid in s["processes"]) / 1024
        per_process[pid] = {
            "rss": _dump(fit(points, cuts, peak)),
            "fds": _dump(fit([(s["t"], s["processes"][pid]["fds"]) for s in chosen], cuts)),
            "command": chosen[-1]["processes"][pid]["command"],
        }
    total = fit(
        [(s["t"], sum(p["rss_kb"] for p in s["processes"].values()) / 1024) for s in chosen],
        cuts,
        max(sum(p["rss_kb"] for p in s["processes"].values()) for s in samples) / 1024,
    )
    all_pids = {pid for s in samples for pid in s["processes"]}
    open_files = [s["processes"][pid]["fds"] for s in chosen for pid in pids]
    growths = [p["fds"]["slope_per_h"] for p in per_process.values() if p["fds"]]
    analysis["rss_mb"] = {
        "steps_at_restarts": restart_steps(samples, record.restarts, plan.settle_s),
        "total": _dump(total),
        "per_process": per_process,
        "processes_seen": sorted(all_pids),
        "processes_throughout": sorted(pids),
    }

    # Redis.
    with_redis = [s for s in chosen if "used_memory" in (s["redis"] or {})]
    everywhere = [s["redis"] for s in samples if "used_memory" in (s["redis"] or {})]
    memory = fit(
        [(s["t"], s["redis"]["used_memory"]) for s in with_redis],
        cuts,
        max((r["used_memory"] for r in everywhere), default=0),
    )
    ledger = fit([(s["t"], s["redis"]["families"].get(LEDGER_FAMILY, 0)) for s in with_redis], cuts)
    others = fit(
        [
            (s["t"], s["redis"]["dbsize"] - s["redis"]["families"].get(LEDGER_FAMILY, 0))
            for s in with_redis
        ],
        cuts,
        max((r["dbsize"] - r["families"].get(LEDGER_FAMILY, 0) for r in everywhere), default=0),
    )
    keys = fit(
        [(s["t"], s["redis"]["dbsize"]) for s in with_redis],
        cuts,
        max((r["dbsize"] for r in everywhere), default=0),
    )
    outbox = fit(
        [(s["t"], s["redis"]["outbox"]) for s in with_redis],
        cuts,
        max((r["outbox"] for r in everywhere), default=0),
    )
    clients = fit(
        [(s["t"], s["redis"]["clients"]) for s in with_redis],
        cuts,
        max((r["clients"] for r in everywhere), default=0),
    )
    entry_sizes = [r["ledger_entry_bytes"] for r in everywhere if r.get("ledger_entry_bytes")]
    entry_bytes = statistics.fmean(entry_sizes) if entry_sizes else None
    per_entry = (
        memory.slope_per_h / ledger.slope_per_h
        if memory and ledger and ledger.slope_per_h > 0
        else None
    )
    last = everywhere[-1] if everywhere else {}
    good_sends = sum(1 for job in jobs if job.kind in ("send", "campaign"))
    analysis["redis"] = {
        "used_memory": _dump(memory),
        "dbsize": _dump(keys),
        "ledger_keys": _dump(ledger),
        "other_keys": _dump(others),
        "outbox": _dump(outbox),
        "clients": _dump(clients),
        "ledger_entry_bytes": entry_bytes,
        "memory_per_new_ledger_entry": per_entry,
        "ledger_keys_at_end": last.get("families", {}).get(LEDGER_FAMILY),
        "sends_published": good_sends,
        "families_at_end": last.get("families"),
        "parked_at_end": last.get("parked"),
        "worker_open_files": {
            "low": min(open_files),
            "high": max(open_files),
            "max_slope_per_h": max(growths),
        }
        if open_files and growths
        else None,
    }
    analysis["targets"] = {
        "rss_growth_per_h": RSS_GROWTH_PER_H,
        "keys_and_outbox_growth_per_h": jobs_per_h / PER_JOBS,
        "memory_per_ledger_entry": (entry_bytes or 0) + LEDGER_ENTRY_OVERHEAD_B,
    }
    analysis["accounting"] = account(jobs, outcomes, records, dead, final_stats)
    analysis["campaign"] = campaign
    analysis["restarts"] = [_recovery(r, records, plan) for r in record.restarts]
    analysis["simulator"] = final_stats
    analysis["worker_log"] = log_summary(RESULTS / "soak.log")
    return analysis


def log_summary(log: Path, top: int = 40) -> dict[str, Any]:
    """The worker's warnings and errors, counted by message (digits left out), and the sends
    whose writes after Verloop accepted them failed (``after_send_failures``, by step)."""
    counts: Counter[str] = Counter()
    after_send: Counter[str] = Counter()
    with log.open("rb") as lines:
        for line in lines:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                counts[
                    "(not a JSON log line) " + _NUMBER.sub("#", line.decode(errors="replace"))[:100]
                ] += 1
                continue
            if not isinstance(entry, dict):
                continue
            after_send.update(entry.get("after_send_failures") or ())
            level = entry.get("level")
            if level in ("warning", "error", "critical"):
                what = str(entry.get("event"))
                if what == "job":  # the job's own line: what happened to it says more
                    what = f"job {entry.get('outcome')}: {entry.get('reason')}"
                counts[f"{level}: {_NUMBER.sub('#', what)[:100]}"] += 1
    return {"warnings": dict(counts.most_common(top)), "after_send_failures": dict(after_send)}


def restart_steps(
    samples: list[dict[str, Any]], restarts: list[dict[str, Any]], settle_s: float
) -> list[float]:
    """Total worker RSS (MB) once settled after each restart minus just before it: a fit
    within segments leaves these steps out, so they are reported apart."""

    def total(sample: dict[str, Any]) -> float:
        return float(sum(p["rss_kb"] for p in sample["processes"].values())) / 1024

    steps = []
    for restart in restarts:
        before = [s for s in samples if s["t"] < restart["at_s"]]
        after = [s for s in samples if s["t"] >= restart["back_at_s"] + settle_s]
        if before and after:
            steps.append(total(after[0]) - total(before[-1]))
    return steps


def _dump(value: Fit | None) -> dict[str, Any] | None:
    return None if value is None else asdict(value) | {"relative_per_h": value.relative_per_h}


def account(
    jobs: list[Job],
    outcomes: Outcomes,
    records: list[dict[str, Any]],
    dead: list[dict[str, Any]],
    final_stats: dict[str, Any],
) -> dict[str, Any]:
    """What became of every job (see the module docstring)."""
    seen, reasons = outcomes.snapshot()
    received = Counter(r["to"] for r in records)
    by_kind: dict[str, Counter[str]] = {}
    lost: list[dict[str, Any]] = []
    sent_not_received: list[str] = []
    dead_good: Counter[str] = Counter()
    for job in jobs:
        if job.kind == "hostile":
            continue
        final = seen.get(job.message_id, set()) & FINAL
        tally = by_kind.setdefault(job.kind, Counter())
        tally["jobs"] += 1
        tally["copies"] += job.copies - 1
        for outcome in final:
            tally[outcome] += 1
        if not final:
            lost.append({"kind": job.kind, "message_id": job.message_id, "to": job.to})
        if "sent" in final and job.to is not None and received[job.to] == 0:
            sent_not_received.append(job.message_id)
        if "dead_lettered" in final:
            dead_good[reasons.get(job.message_id, "?")[:120]] += 1
    expected = {job.to for job in jobs if job.to is not None}
    twice = {to: n for to, n in received.items() if n > 1}
    unexpected = sorted(to for to in received if to not in expected)

    markers = {job.message_id: job for job in jobs if job.kind == "hostile"}
    found: dict[str, dict[str, Any]] = {}
    other_dead: list[dict[str, Any]] = []
    for letter in dead:
        match = re.search(rb"soak-hostile-[0-9a-f]+-\d{7}", letter["body"])
        if match and match.group().decode() in markers:
            found[match.group().decode()] = letter
        else:
            other_dead.append({"queue": letter["queue"], "header": letter["header"]})
    hostile: dict[str, Counter[str]] = {}
    for marker, job in markers.items():
        tally = hostile.setdefault(job.hostile_kind or "?", Counter())
        tally["published"] += 1
        if marker in found:
            tally[f"outcome {found[marker]['header'].get('outcome')}"] += 1
        else:
            tally["missing"] += 1
    hostile_missing = sum(t["missing"] for t in hostile.values())
    hostile_not_invalid = sum(
        n
        for t in hostile.values()
        for k, n in t.items()
        if k.startswith("outcome ") and k != "outcome invalid"
    )
    return {
        "jobs": len(jobs),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "lost": len(lost),
        "lost_jobs": lost[:50],
        "sent_but_not_received": len(sent_not_received),
        "good_jobs_dead_lettered": dict(dead_good),
        "recipients_messaged_twice": len(twice),
        "twice_examples": dict(list(twice.items())[:20]),
        "unexpected_recipients": unexpected[:20],
        "simulator_duplicate_keys": final_stats.get("duplicates"),
        "simulator_records": len(records),
        "hostile": {k: dict(v) for k, v in hostile.items()},
        "hostile_published": len(markers),
        "hostile_missing": hostile_missing,
        "hostile_not_invalid": hostile_not_invalid,
        "other_dead_letters": other_dead[:50],
        "other_dead_letter_count": len(other_dead),
    }


def _recovery(restart: dict[str, Any], records: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """How sending went around a restart, from the simulator's ``received_at``: the longest
    gap between two sends, and when sending was back to half its pace after the service."""
    start, back = restart["wall_start"], restart["wall_back"]
    times = sorted(
        r["received_at"] for r in records if start - 30 <= r["received_at"] <= back + 120
    )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    per_second = Counter(int(t - back) for t in times if t >= back)
    normal = len([t for t in times if t < start]) / 30 if times else 0.0
    paced = next((s for s in range(120) if per_second[s] >= normal / 2), None)
    return restart | {
        "down_s": back - start,
        "longest_gap_between_sends_s": max(gaps) if gaps else None,
        "back_to_half_pace_after_s": paced,
        "sends_per_s_before": normal,
    }


# --- the summary ---------------------------------------------------------------------------------
def results(analysis: dict[str, Any]) -> list[Result]:
    """The summary table's rows (see the module docstring for the targets)."""
    targets = analysis["targets"]
    found = [
        _rss_result(analysis["rss_mb"], targets),
        *_redis_results(analysis["redis"], targets, analysis["drain"]),
        *_accounting_results(analysis["accounting"]),
        _bookkeeping_result(analysis),
    ]
    for restart in analysis["restarts"]:
        found.append(
            Result(
                f"soak {restart['what']} restart",
                f"at {restart['at_s'] / 60:.1f} min, {restart['down_s']:.0f} s down; longest gap "
                f"between sends {restart['longest_gap_between_sends_s'] or 0:.1f} s; half pace "
                f"{_seconds(restart['back_to_half_pace_after_s'])} after it was back",
                "-",
                None,
            )
        )
    return found


def _rss_result(rss: dict[str, Any], targets: dict[str, float]) -> Result:
    fits = [p["rss"] for p in rss["per_process"].values() if p["rss"]]
    total = rss["total"]
    if not fits or not total:
        return Result("soak worker RSS", "too few samples to fit", "-", False)
    worst = max(fits, key=lambda f: f["relative_per_h"])
    replaced = rss["processes_seen"] != rss["processes_throughout"]
    return Result(
        "soak worker RSS",
        f"{total['level']:.0f} MB in {len(fits)} processes, {total['slope_per_h']:+.1f} MB/h, "
        f"peak {total['peak']:.0f} MB; worst {worst['relative_per_h']:+.1%}/h of "
        f"{worst['level']:.0f} MB; steps at restarts "
        + ", ".join(f"{step:+.1f}" for step in rss["steps_at_restarts"])
        + " MB"
        + ("; a process was replaced" if replaced else ""),
        f"each < +{targets['rss_growth_per_h']:.0%} of its level/h",
        worst["relative_per_h"] < targets["rss_growth_per_h"] and not replaced,
    )


def _redis_results(
    cache: dict[str, Any], targets: dict[str, float], drain: dict[str, Any]
) -> list[Result]:
    found = []
    memory, per_entry = cache["used_memory"], cache["memory_per_new_ledger_entry"]
    if memory and per_entry is not None and cache["ledger_entry_bytes"]:
        found.append(
            Result(
                "soak Redis memory",
                f"{memory['slope_per_h'] / 2**20:+.1f} MB/h, peak {memory['peak'] / 2**20:.1f} MB: "
                f"{per_entry:.0f} B per new ledger entry (an entry "
                f"{cache['ledger_entry_bytes']:.0f} B)",
                f"<= entry + {LEDGER_ENTRY_OVERHEAD_B} B",
                per_entry <= targets["memory_per_ledger_entry"],
            )
        )
    else:
        found.append(Result("soak Redis memory", "too few samples to fit", "-", False))
    others, ledger, outbox = cache["other_keys"], cache["ledger_keys"], cache["outbox"]
    limit = targets["keys_and_outbox_growth_per_h"]
    if others and ledger and outbox:
        at_end, sends = cache["ledger_keys_at_end"], cache["sends_published"]
        found.append(
            Result(
                "soak Redis keys",
                f"ledger {ledger['slope_per_h']:+,.0f}/h, {at_end:,} for {sends:,} sends; others "
                f"{others['level']:.0f}, {others['slope_per_h']:+.0f}/h, peak {others['peak']:.0f}",
                f"others < +{limit:,.0f}/h; ledger = sends",
                others["slope_per_h"] < limit and at_end == sends,
            )
        )
        left = drain["outbox_at_end"]
        found.append(
            Result(
                "soak outbox",
                f"{outbox['slope_per_h']:+.0f}/h, peak {outbox['peak']:.0f}, {left} after drain",
                f"< +{limit:,.0f}/h; 0 after drain",
                outbox["slope_per_h"] < limit and left == 0,
            )
        )
    else:
        found.append(Result("soak Redis keys, outbox", "too few samples to fit", "-", False))
    clients = cache["clients"]
    files = cache.get("worker_open_files")
    if clients and files:
        found.append(
            Result(
                "soak connections",
                f"Redis clients {clients['level']:.0f} ({clients['slope_per_h']:+.0f}/h, peak "
                f"{clients['peak']:.0f}); worker open files {files['low']}-{files['high']} per "
                f"process, largest growth {files['max_slope_per_h']:+.0f}/h",
                "-",
                None,
            )
        )
    return found


def _accounting_results(books: dict[str, Any]) -> list[Result]:
    hostile, missing = books["hostile_published"], books["hostile_missing"]
    good = books["jobs"] - hostile
    return [
        Result(
            "soak nothing lost",
            f"{books['lost']} of {good:,} jobs without a final outcome; hostile "
            f"{hostile - missing}/{hostile} dead-lettered ({books['hostile_not_invalid']} not as "
            f"invalid); {books['sent_but_not_received']} sent but not received",
            "0 lost; hostile all invalid",
            books["lost"] == 0
            and missing == 0
            and books["hostile_not_invalid"] == 0
            and books["sent_but_not_received"] == 0,
        ),
        Result(
            "soak nobody messaged twice",
            f"{books['recipients_messaged_twice']} recipients twice in "
            f"{books['simulator_records']:,} sends; {books['simulator_duplicate_keys']} repeated "
            "keys",
            "0 / 0",
            books["recipients_messaged_twice"] == 0 and books["simulator_duplicate_keys"] == 0,
        ),
    ]


def _bookkeeping_result(analysis: dict[str, Any]) -> Result:
    """What the worker could not write after Verloop accepted a send (Redis down): it is
    documented (``verloop_after_send_failures_total``, never a resend), so no target."""
    states = analysis["redis"].get("ledger_states_at_end") or {}
    campaign = analysis["campaign"]
    sent = analysis["accounting"]["by_kind"].get("campaign", {}).get("sent", 0)
    failures = analysis["worker_log"]["after_send_failures"]
    return Result(
        "soak after-send writes",
        f"ledger {states.get('sent', 0):,} sent + {states.get('claim', 0)} claims left; campaign "
        f"counter {int(campaign.get('sent', 0)):,} of {sent:,} sent; failed writes "
        + (", ".join(f"{step} {n}" for step, n in failures.items()) or "none"),
        "-",
        None,
    )


def _seconds(value: int | None) -> str:
    return "not within 120 s" if value is None else f"{value} s"
