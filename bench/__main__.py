"""``make bench`` (``python -m bench``): every benchmark in one run, then a summary table.

* ``send_path``: the worker's send path against a naive dramatiq actor, limiter on but not
  binding (``bench/send_path.py``); target ours >= 0.9 x naive.
* ``fidelity``, ``high_rate``, ``lanes``: the per-number rate limiter (``bench/fidelity.py``,
  ``bench/high_rate.py``, ``bench/lanes.py``; their shared options in ``bench/rate_limits.py``).
* ``campaign_enqueue``: ``campaign start``'s enqueuer on a 1,000,000-row CSV against dramatiq's
  confirmed enqueue (``bench/campaign_enqueue.py``); targets >= 10,000 rows/s, < 200 MB, >= 5 x.
* ``campaign_send``: a 50,000-recipient campaign over two numbers at 250/s each
  (``bench/campaign_send.py``); targets >= 0.95 of each limit, 0 duplicates, 0 lost.
* ``receipts``: the status actor draining shuffled, duplicated statuses of a campaign
  (``bench/receipts.py``); target >= 3,000 statuses/s with the funnel exact.
* ``webhooks``: the status webhook receiver taking signed statuses, one per request, with
  publisher confirms (``bench/webhooks.py``); targets >= 3,000 statuses/s, p99 < 100 ms.
* ``durable_ledger``: the send path with ``LEDGER_DURABILITY=replica`` through Sentinel (a
  primary, a replica, three sentinels of its own) against one Redis of its own with the
  default ``primary``, alternating rounds (``bench/durable_ledger.py``); figures only.
* ``soak``, on demand only (``make soak``, ``--only soak``; ``--soak-minutes``, 25 by
  default): steady mixed load (transactional, campaign, management and 1 % hostile jobs, 2 %
  of sends answered 5xx) with a RabbitMQ and a Redis restart, both private servers it starts
  itself (``bench/soak.py``); targets: worker RSS, Redis memory beyond the ledger, keys and
  the outbox flat; nothing lost, nobody messaged twice.
* ``ledger_backends``, on demand only (``--only ledger_backends``): one send's ledger writes
  (claim, record) in Redis and in PostgreSQL with synchronous commit, the measurement behind
  ``LEDGER_DURABILITY`` (``bench/ledger_backends.py``; needs a PostgreSQL, ``PGHOST``).

``--only NAME`` (repeatable) runs some of them. Figures and logs go to ``bench/results/``.
Everything uses RabbitMQ vhost ``verloop-bench`` and Redis db 14 on 127.0.0.1, except the soak
(its own RabbitMQ node and redis-server, see ``bench/private_services.py``).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable

import httpx
from pika.exceptions import AMQPError

from bench import (
    campaign_enqueue,
    campaign_send,
    durable_ledger,
    fidelity,
    high_rate,
    lanes,
    ledger_backends,
    rate_limits,
    receipts,
    send_path,
    soak,
    webhooks,
)
from bench.common import RESULTS, Result, ensure_vhost, loop_seconds, write_json

BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Result]]] = {
    send_path.NAME: send_path.run,
    fidelity.NAME: fidelity.run,
    high_rate.NAME: high_rate.run,
    lanes.NAME: lanes.run,
    campaign_send.NAME: campaign_send.run,
    campaign_enqueue.NAME: campaign_enqueue.run,
    receipts.NAME: receipts.run,
    webhooks.NAME: webhooks.run,
    durable_ledger.NAME: durable_ledger.run,
    soak.NAME: soak.run,
    ledger_backends.NAME: ledger_backends.run,
}
#: Run only when named with --only: too long for every `make bench`.
ON_DEMAND = frozenset({soak.NAME, ledger_backends.NAME})


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)} "
        f"({', '.join(sorted(ON_DEMAND))} only this way)",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="run the worker with METRICS_PORT=0 (by default metrics are on, on 127.0.0.1)",
    )
    send_path.add_arguments(parser)
    rate_limits.add_arguments(parser)
    campaign_enqueue.add_arguments(parser)
    campaign_send.add_arguments(parser)
    receipts.add_arguments(parser)
    webhooks.add_arguments(parser)
    soak.add_arguments(parser)
    ledger_backends.add_arguments(parser)
    durable_ledger.add_arguments(parser)
    args = parser.parse_args()

    RESULTS.mkdir(exist_ok=True)
    # Two runs at once share the bench vhost, its queues and the worker logs: one's cleanup
    # deletes the other's queues mid-run, and both figures are wrong. The lock is released
    # when this process exits, however it exits.
    lock = (RESULTS / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(
            "another `make bench` is running on this machine (bench/results/.lock is held); "
            "benchmarks share queues and cores, so wait for it to finish"
        )
    selected = args.only or [name for name in BENCHMARKS if name not in ON_DEMAND]
    if set(selected) - ON_DEMAND:  # the soak brings its own RabbitMQ and Redis
        ensure_vhost()
    shutil.rmtree(RESULTS / "metrics", ignore_errors=True)  # the workers' metrics files, last run
    results: list[Result] = []
    failed: list[str] = []
    started = time.monotonic()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{os.cpu_count()} cores, load average {load} before starting: anything else running "
        "shares the cores with the worker, and the figures move with it"
    )
    loop_s = loop_seconds()
    print(
        f"interpreter speed: a 10M-step Python loop takes {loop_s:.2f} s on one core "
        "(compare it before comparing figures across runs)"
    )
    for name in selected:
        print(f"\n=== {name} ===", flush=True)
        began = time.monotonic()
        try:
            results.extend(BENCHMARKS[name](args))
        except (RuntimeError, OSError, ValueError, KeyError, httpx.HTTPError, AMQPError) as exc:
            traceback.print_exc()
            failed.append(name)
            results.append(Result(name, f"did not finish: {exc}", "-", False))
        print(f"({name}: {time.monotonic() - began:.0f} s)", flush=True)

    results.extend(_receipts_against_sends(results))
    print(f"\n=== summary ({time.monotonic() - started:.0f} s) ===")
    rows = [("benchmark", "figure", "target", "")] + [
        (r.benchmark, r.figure, r.target, _verdict(r.met)) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3]]))
    write_json("summary", {"benchmarks": selected, "loop_s": loop_s, "results": results})
    # A target not met is a finding, printed above; only a benchmark that could not run fails.
    sys.exit(1 if failed else 0)


def _receipts_against_sends(results: list[Result]) -> list[Result]:
    """Statuses per second (the receiver's and the status actor's) per send per second of the
    send path, all measured in this run: WhatsApp sends about three statuses per message."""
    sends = next(
        (r.details.get("sends_per_s") for r in results if "sends_per_s" in r.details), None
    )
    found = {
        "receiver": next((r for r in results if r.benchmark == webhooks.NAME), None),
        "status actor": next((r for r in results if r.benchmark == receipts.NAME), None),
    }
    rows = []
    for who, result in found.items():
        if result is None:
            continue
        per_s = result.details.get("statuses_per_s") or result.details.get("rate")
        if not sends or not per_s:
            figure = "not measured: the send path did not run in this run"
        else:
            figure = f"{per_s / sends:.2f} statuses per send ({per_s:.0f}/s vs {sends:.0f} sends/s)"
        print(f"{who} against the send path, this run: {figure}")
        rows.append(Result(f"{who} / send path", figure, "- (about 3 statuses a message)", None))
    return rows


def _verdict(met: bool | None) -> str:
    return "-" if met is None else "met" if met else "NOT met"


if __name__ == "__main__":
    main()
