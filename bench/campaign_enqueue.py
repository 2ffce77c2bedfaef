"""``campaign start``'s enqueuer against dramatiq's own confirmed enqueue.

1. A CSV of ``--campaign-rows`` rows (default 1,000,000; mixed countries, a header and two
   body parameters, 0.1 % bad numbers) is written to a temporary folder.
2. Our enqueuer (``worker.campaigns.enqueue``, publisher confirms pipelined) enqueues all of it
   to ``verloop.campaign`` in a child process; its rate (rows read / its own seconds, file
   hashing included) and its peak RSS (the child's own ``VmHWM``; ``ru_maxrss`` from ``wait4``
   where there is no /proc) are taken, and the queue depth is checked against what it says it
   enqueued.
3. The first ``--dramatiq-rows`` rows (default 20,000) of the same file, read and validated by
   the same reader, are sent with dramatiq's ``RabbitmqBroker(confirm_delivery=True)`` and
   ``actor.send`` (one blocking confirm per message), in the same run.

Targets (campaign issue): >= 10,000 rows/s, peak memory < 200 MB, >= 5 x dramatiq's rate.
RabbitMQ vhost ``verloop-bench`` and Redis db 14; the queue is emptied afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pika
import redis

from bench.common import (
    AMQP_URL,
    REDIS_URL,
    BenchError,
    Result,
    clear_queues,
    clear_redis,
    cpu_used,
    pids_listening,
    process_cpu_s,
    write_json,
)
from worker.campaigns.enqueue import enqueue_campaign
from worker.campaigns.reader import CampaignFile
from worker.campaigns.rows import RowValidator
from worker.campaigns.spec import CampaignSpec
from worker.campaigns.store import CampaignStore
from worker.jobs.models import CAMPAIGN_QUEUE

NAME = "campaign_enqueue"
TARGET_RATE = 10_000.0
TARGET_RSS_MB = 200.0
TARGET_RATIO = 5.0
SPEC = CampaignSpec(
    campaign_id="bench-campaign",
    client_id="bench",
    phone_ids=("bench-phone-1", "bench-phone-2", "bench-phone-3"),
    template="bench_offer",
    language="en_US",
    body_params=2,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--campaign-rows", type=int, default=1_000_000)
    group.add_argument("--dramatiq-rows", type=int, default=20_000)
    group.add_argument("--campaign-batch-size", type=int, default=2000)


def write_campaign_csv(path: Path, rows: int, seed: int = 7) -> None:
    """Mixed valid numbers (India, US, Brazil, UK) and 0.1 % invalid ones, written in chunks."""
    rng = random.Random(seed)
    patterns = ["+91{}{:09d}"] * 14 + ["+1415{}{:06d}"] * 3 + ["+55119{}{:07d}"] * 2
    patterns += ["+447400{}{:05d}"]
    with path.open("w", encoding="utf-8") as handle:
        handle.write("to,body_1,body_2,header_1\n")
        chunk: list[str] = []
        for n in range(rows):
            if n % 1000 == 999:
                to = f"+91{n:05d}"  # too short: rejected
            else:
                pattern = patterns[n % len(patterns)]
                lead = rng.choice("9876") if pattern.startswith("+91") else rng.randint(2, 9)
                to = pattern.format(lead, n % 100_000)
            chunk.append(f"{to},Customer {n},{n % 997} off,Diwali\n")
            if len(chunk) == 50_000:
                handle.write("".join(chunk))
                chunk.clear()
        handle.write("".join(chunk))


def _queue_depth() -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        method = connection.channel().queue_declare(CAMPAIGN_QUEUE, passive=True).method
        return int(method.message_count)
    finally:
        connection.close()


def _ours(path: Path, batch_size: int) -> dict[str, Any]:
    """Run our enqueuer in a child process; its result, wall time and peak RSS."""
    began = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.campaign_enqueue", "--child", str(path), str(batch_size)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise BenchError(f"the enqueuer exited with {child.returncode}")
    result: dict[str, Any] = json.loads(output)
    result["wall_s"] = time.monotonic() - began
    # The child's own high-water mark: its ru_maxrss also counts the pages it shared with this
    # process when it was forked (Linux keeps the larger of the two across exec), so after the
    # other benchmarks have grown this process it read 211 MB for a 65 MB enqueuer.
    result["peak_rss_mb"] = result.pop("vm_hwm_kib", usage.ru_maxrss) / 1024  # KiB
    # CPU of the whole child (start-up and file hashing included): what one core must do.
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["cpu_us_per_row"] = result["cpu_s"] / max(result["rows_read"], 1) * 1e6
    return result


def _dramatiq(path: Path, rows: int) -> dict[str, Any]:
    """dramatiq's own confirmed enqueue of the first ``rows`` rows, same reading and validation."""
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=AMQP_URL, confirm_delivery=True)

    def send_message(**kwargs: Any) -> None:
        """Never run here: only enqueued."""

    actor = dramatiq.actor(broker=broker, actor_name="send_message", queue_name=CAMPAIGN_QUEUE)(
        send_message
    )
    spec = dataclasses.replace(SPEC, campaign_id="bench-dramatiq")
    sent = 0
    began = time.monotonic()
    try:
        with CampaignFile(path) as source:
            validator = RowValidator(spec, source)
            for row in source.rows():
                if row.number > rows:
                    break
                kwargs, _ = validator.validate(row)
                if kwargs is not None:
                    actor.send(**kwargs)
                    sent += 1
        seconds = time.monotonic() - began
    finally:
        broker.close()
    return {"rows": rows, "sent": sent, "seconds": seconds, "rows_per_s": rows / seconds}


def run(args: argparse.Namespace) -> list[Result]:
    rows, batch = args.campaign_rows, args.campaign_batch_size
    clear_queues()
    clear_redis()
    with tempfile.TemporaryDirectory(prefix="campaign-bench-") as folder:
        path = Path(folder) / "campaign.csv"
        began = time.monotonic()
        write_campaign_csv(path, rows)
        print(
            f"wrote {rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in "
            f"{time.monotonic() - began:.1f} s",
            flush=True,
        )
        try:
            rabbit = pids_listening(5672)
            before = process_cpu_s(rabbit)
            ours = _ours(path, batch)
            ours["rabbitmq_cpu_s"] = cpu_used(before, process_cpu_s(rabbit))
            depth = _queue_depth()
            if depth != ours["enqueued"]:
                raise BenchError(f"{ours['enqueued']} enqueued but {depth} on the queue")
            print(
                f"ours:     {ours['rows_read']:,} rows ({ours['enqueued']:,} enqueued, "
                f"{ours['rejected']:,} rejected) in {ours['seconds']:.1f} s = "
                f"{ours['rows_per_s']:,.0f} rows/s, peak RSS {ours['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            print(
                f"          CPU: enqueuer {ours['cpu_us_per_row']:.0f} µs/row (one core: "
                f"{1e6 / ours['cpu_us_per_row']:,.0f} rows/s), RabbitMQ "
                f"{ours['rabbitmq_cpu_s'] / ours['rows_read'] * 1e6:.0f} µs/row",
                flush=True,
            )
            clear_queues()
            theirs = _dramatiq(path, min(args.dramatiq_rows, rows))
            depth = _queue_depth()
            if depth != theirs["sent"]:
                raise BenchError(f"dramatiq sent {theirs['sent']} but {depth} are on the queue")
            print(
                f"dramatiq: {theirs['rows']:,} rows in {theirs['seconds']:.1f} s = "
                f"{theirs['rows_per_s']:,.0f} rows/s (confirm_delivery=True, actor.send)",
                flush=True,
            )
        finally:
            clear_queues()
            clear_redis()
    ratio = ours["rows_per_s"] / theirs["rows_per_s"]
    print(f"ratio:    {ratio:.1f} x", flush=True)
    details = {"ours": ours, "dramatiq": theirs, "ratio": ratio, "batch_size": batch}
    write_json(NAME, details)
    return [
        Result(
            NAME,
            f"{ours['rows_per_s']:,.0f} rows/s ({rows:,} rows)",
            f">= {TARGET_RATE:,.0f} rows/s",
            ours["rows_per_s"] >= TARGET_RATE,
            details,
        ),
        Result(
            f"{NAME} memory",
            f"{ours['peak_rss_mb']:.0f} MB peak RSS",
            f"< {TARGET_RSS_MB:.0f} MB",
            ours["peak_rss_mb"] < TARGET_RSS_MB,
        ),
        Result(
            f"{NAME} vs dramatiq",
            f"{ratio:.1f} x (dramatiq {theirs['rows_per_s']:,.0f} rows/s)",
            f">= {TARGET_RATIO:.0f} x",
            ratio >= TARGET_RATIO,
        ),
    ]


def _own_peak_rss() -> dict[str, int]:
    """``{"vm_hwm_kib": ...}``: this process's peak resident memory since its exec (Linux's
    ``VmHWM``), or nothing where /proc has no such line."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return {"vm_hwm_kib": int(line.split()[1])}
    return {}


def _child(path: Path, batch_size: int) -> None:
    """The measured process: enqueue the file, print the result as JSON."""
    store = CampaignStore(redis.Redis.from_url(REDIS_URL, decode_responses=True))
    result = enqueue_campaign(path, SPEC, amqp_url=AMQP_URL, store=store, batch_size=batch_size)
    print(
        json.dumps(
            {
                "rows_read": result.rows_read,
                "enqueued": result.enqueued,
                "rejected": result.rejected,
                "seconds": result.seconds,
                "rows_per_s": result.rows_per_s,
                **_own_peak_rss(),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("run it with `python -m bench --only campaign_enqueue`")
