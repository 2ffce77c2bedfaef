"""``--only ledger_backends`` (on demand): what one send's ledger writes cost in Redis and in
PostgreSQL, the measurement behind ``LEDGER_DURABILITY``.

A send writes its ledger twice: the claim before the call and the record after it. This times
both, one after the other on one connection, for ``--ledger-sends`` distinct sends:

* **Redis**, the worker's own :class:`~worker.send.ledger.Ledger` (its Lua claim and its
  record) on the bench's Redis (db 14);
* **PostgreSQL**, the statements a PostgreSQL ledger would run: the claim an ``INSERT ... ON
  CONFLICT DO UPDATE ... WHERE`` (taken only if not sent and the lease is over or its own),
  the record an ``UPDATE``, each its own committed transaction with ``synchronous_commit`` on
  (the record must be on disk before the job is acknowledged). In a table of its own in the
  database ``PGDATABASE`` names (default ``postgres``) on ``PGHOST`` (default 127.0.0.1), made
  and dropped by the run.

It prints, per send, the client's CPU (this process: the driver's work and its system calls),
the server's CPU (Redis's process; the PostgreSQL backend serving the connection), and the
median and 99th-percentile wait. It is not part of every ``make bench``: it needs a
PostgreSQL, which the worker does not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable

import redis

from bench.common import (
    REDIS_URL,
    BenchError,
    Result,
    clear_redis,
    cpu_used,
    pids_listening,
    process_cpu_s,
)
from worker.send.ledger import Ledger, LedgerKey

NAME = "ledger_backends"

_CREATE = """
CREATE TABLE IF NOT EXISTS verloop_bench_ledger (
  key text PRIMARY KEY,
  state "char" NOT NULL,
  detail text NOT NULL DEFAULT '',
  lease_until timestamptz,
  owner text,
  expires_at timestamptz NOT NULL
)"""
_CLAIM = """
INSERT INTO verloop_bench_ledger AS l (key, state, lease_until, owner, expires_at)
VALUES (%(key)s, 'p', now() + %(lease_ms)s * interval '1 millisecond', %(owner)s,
        now() + %(ttl_s)s * interval '1 second')
ON CONFLICT (key) DO UPDATE
  SET state = 'p', lease_until = excluded.lease_until, owner = excluded.owner,
      expires_at = excluded.expires_at
  WHERE l.state <> 's' AND (l.lease_until < now() OR l.owner = excluded.owner)
RETURNING state"""
_RECORD = """
UPDATE verloop_bench_ledger SET state = 's', detail = %(detail)s, lease_until = NULL, owner = NULL
WHERE key = %(key)s"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--ledger-sends", type=int, default=3000, help="sends a round, each backend")
    group.add_argument("--ledger-rounds", type=int, default=5, help="rounds, backends alternating")


class _Timed:
    """Client CPU, server CPU and each send's wait, over one backend's sends."""

    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self.waits: list[float] = []

    def run(self, sends: int, one: Callable[[int], None]) -> dict[str, float]:
        server_before = process_cpu_s(self.server_pids)
        client_before = time.process_time()
        for n in range(sends):
            started = time.perf_counter()
            one(n)
            self.waits.append(time.perf_counter() - started)
        client = time.process_time() - client_before
        server = cpu_used(server_before, process_cpu_s(self.server_pids))
        waits = sorted(self.waits)
        return {
            "client_us": 1e6 * client / sends,
            "server_us": 1e6 * server / sends,
            "median_us": 1e6 * statistics.median(waits),
            "p99_us": 1e6 * waits[int(len(waits) * 0.99)],
        }


def _redis(sends: int) -> dict[str, float]:
    clear_redis()
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    ledger = Ledger(client, ttl_s=3600, lease_s=60)
    run = uuid.uuid4().hex
    owner = f"{threading.get_ident()}:bench"

    def one(n: int) -> None:
        key = LedgerKey(f"bench:{run}:{n}")
        if ledger.claim(key, owner, take_over_uncertain=False).state != "claimed":
            raise BenchError("a fresh Redis ledger entry was not claimed")
        ledger.mark_sent(key, f"wamid.{n}")

    try:
        client.ping()
        figures = _Timed(pids_listening(6379)).run(sends, one)
    finally:
        ledger.close()
        client.close()
    clear_redis()
    return figures


def _postgresql(sends: int) -> dict[str, float]:
    try:
        import psycopg
    except ImportError as exc:
        raise BenchError("psycopg is not installed: `make install` installs the dev tools") from exc
    host = os.environ.get("PGHOST", "127.0.0.1")
    try:
        connection = psycopg.connect(
            host=host,
            dbname=os.environ.get("PGDATABASE", "postgres"),
            user=os.environ.get("PGUSER", "postgres"),
            connect_timeout=5,
            autocommit=True,
        )
    except psycopg.Error as exc:
        raise BenchError(f"no PostgreSQL at {host} ({type(exc).__name__})") from exc
    run = uuid.uuid4().hex
    owner = f"{threading.get_ident()}:bench"
    with connection:
        connection.execute(_CREATE)
        connection.execute("SET synchronous_commit = on")
        backend = connection.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None

        def one(n: int) -> None:
            key = f"bench:{run}:{n}"
            claim = {"key": key, "lease_ms": 60_000, "owner": owner, "ttl_s": 3600}
            claimed = connection.execute(_CLAIM, claim, prepare=True).fetchone()
            if claimed is None or claimed[0] != "p":
                raise BenchError("a fresh PostgreSQL ledger entry was not claimed")
            connection.execute(_RECORD, {"key": key, "detail": f"wamid.{n}"}, prepare=True)

        try:
            return _Timed([int(backend[0])]).run(sends, one)
        finally:
            connection.execute("DROP TABLE IF EXISTS verloop_bench_ledger")


def run(args: argparse.Namespace) -> list[Result]:
    sends = args.ledger_sends
    rounds: dict[str, list[dict[str, float]]] = {"Redis": [], "PostgreSQL": []}
    for _ in range(args.ledger_rounds):
        # Alternating, so the machine's moods (which core the server shares) hit both.
        rounds["Redis"].append(_redis(sends))
        rounds["PostgreSQL"].append(_postgresql(sends))
    figures = {
        backend: {name: statistics.median(r[name] for r in taken) for name in taken[0]}
        for backend, taken in rounds.items()
    }
    print(
        f"one send's ledger writes (claim, then record), {sends} sends one after the other on "
        f"one connection, median of {args.ledger_rounds} rounds:"
    )
    header = ("backend", "client CPU", "server CPU", "median wait", "p99 wait")
    print("  {:<11} {:>11} {:>11} {:>12} {:>10}".format(*header))
    for backend, f in figures.items():
        print(
            f"  {backend:<11} {f['client_us']:8.1f} µs {f['server_us']:8.1f} µs "
            f"{f['median_us']:9.1f} µs {f['p99_us']:7.0f} µs"
        )
    redis_f, pg_f = figures["Redis"], figures["PostgreSQL"]
    return [
        Result(
            "ledger writes a send: PostgreSQL / Redis",
            f"client CPU {pg_f['client_us'] / redis_f['client_us']:.2f} x, server CPU "
            f"{pg_f['server_us'] / redis_f['server_us']:.2f} x, median wait "
            f"{pg_f['median_us'] / redis_f['median_us']:.2f} x",
            "-",
            None,
            figures,
        )
    ]
