"""``make bench``: the worker's send path against a naive dramatiq actor, in the same run.

Both run as real worker processes (same ``--processes`` and ``--threads``) against the Verloop
simulator at 20 ms latency, draining a backlog of the same size from RabbitMQ. The rate is
measured by the simulator between 10 % and 90 % of the backlog, so process start-up and the
tail are left out. Rounds alternate (naive, ours, naive, ours...) so drift on the machine hits
both; the median of each is compared.

Target (issue 2): ours >= 0.9 x naive.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pika

from worker.producer import encode_job, queue_arguments

VHOST = "verloop-bench"
AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
REDIS_URL = "redis://127.0.0.1:6379/14"
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 0.9


def ensure_vhost() -> None:
    """Use a vhost of our own so a running worker or test is not disturbed."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        sys.exit(f"rabbitmqctl not found: create vhost {VHOST!r} for user guest and retry")
    subprocess.run([ctl, "-q", "add_vhost", VHOST], capture_output=True, check=False)
    subprocess.run(
        [ctl, "-q", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"],
        capture_output=True,
        check=True,
    )


@contextlib.contextmanager
def simulator(latency_ms: float) -> Iterator[str]:
    """The Verloop simulator in its own process."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.sandbox",
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
            "--message-log-limit",
            "1000",
            "--username",
            "bench",
            "--password",
            "bench-password",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    try:
        yield line.removeprefix("sandbox listening on ")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def reset_queues(channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
    for queue in ("bench.naive", "verloop.send"):
        for suffix in ("", ".DQ", ".XQ"):
            channel.queue_delete(queue + suffix)


def publish_backlog(actor: str, queue: str, jobs: int) -> None:
    """Put ``jobs`` messages on ``queue`` (confirmed), before any worker runs."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    reset_queues(channel)
    channel.confirm_delivery()
    channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
    properties = pika.BasicProperties(delivery_mode=2)
    for n in range(jobs):
        to = f"+9198{n:08d}"
        if actor == "send_message":
            kwargs = {
                "client_id": "bench",
                "phone_id": "bench-phone",
                "to": to,
                "message": {"type": "text", "text": {"body": f"bench {n}"}},
            }
        else:
            kwargs = {"to": to, "text": f"bench {n}"}
        body = encode_job(actor, kwargs, queue=queue, message_id=str(uuid.uuid4()))
        channel.basic_publish("", queue, body, properties)
    connection.close()


def measure(
    sim: str, latency_ms: float, jobs: int, command: list[str], env: dict[str, str], log: Path
) -> float:
    """Start the worker, wait for the backlog to drain at the simulator; return sends/s."""
    http = httpx.Client(base_url=sim, timeout=10)
    http.post("/admin/reset").raise_for_status()  # counters, and faults too: set latency again
    http.put("/admin/faults", json={"latency_ms": latency_ms}).raise_for_status()
    low, high = int(jobs * 0.1), int(jobs * 0.9)
    t_low = t_high = None
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        try:
            while t_high is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"worker exited or stalled; see {log}")
                sent = http.get("/admin/stats").json()["sent"]
                now = time.monotonic()
                if t_low is None and sent >= low:
                    t_low = now
                if sent >= high:
                    t_high = now
                time.sleep(0.02)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert t_low is not None
    return (high - low) / (t_high - t_low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=5000, help="backlog size per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()

    ensure_vhost()
    RESULTS.mkdir(exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("VERLOOP_", "AMQP"))}
    pool = ["--processes", str(args.processes), "--threads", str(args.threads)]
    rates: dict[str, list[float]] = {"naive": [], "ours": []}
    with simulator(args.latency_ms) as sim:
        system_token = httpx.post(
            f"{sim}/api/v2/auth", json={"username": "bench", "password": "bench-password"}
        ).json()["system_user_token"]
        phone_token = httpx.get(
            f"{sim}/api/v2/whatsapp/get_phone_token",
            params={"client_id": "bench", "phone_id": "bench-phone"},
            headers={"Authorization": system_token},
        ).json()["token"]
        naive_env = base_env | {
            "BENCH_AMQP_URL": AMQP_URL,
            "BENCH_VERLOOP_URL": sim,
            "BENCH_PHONE_TOKEN": phone_token,
        }
        ours_env = base_env | {
            "AMQP_URL": AMQP_URL,
            "REDIS_URL": REDIS_URL,
            "VERLOOP_BASE_URL": sim,
            "VERLOOP_SYSTEM_TOKEN": system_token,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            # The limiter is on (every send takes a slot in Redis) but set above what the
            # machine can send, so it does not bind: this measures its cost, not its pacing.
            "RATE_LIMIT_PER_NUMBER": "10000",
        }
        for round_no in range(1, args.rounds + 1):
            publish_backlog("naive_send", "bench.naive", args.jobs)
            rate = measure(
                sim,
                args.latency_ms,
                args.jobs,
                [str(BIN / "dramatiq"), "bench.naive", *pool, "--skip-logging"],
                naive_env,
                RESULTS / "naive.log",
            )
            rates["naive"].append(rate)
            print(f"round {round_no}: naive dramatiq actor {rate:8.1f} sends/s", flush=True)
            publish_backlog("send_message", "verloop.send", args.jobs)
            rate = measure(
                sim,
                args.latency_ms,
                args.jobs,
                [str(BIN / "verloop-worker"), "run", *pool],
                ours_env,
                RESULTS / "ours.log",
            )
            rates["ours"].append(rate)
            print(f"round {round_no}: verloop-worker       {rate:8.1f} sends/s", flush=True)

    naive = statistics.median(rates["naive"])
    ours = statistics.median(rates["ours"])
    ratio = ours / naive
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print()
    print(
        f"send path, {args.processes} processes x {args.threads} threads, "
        f"simulator latency {args.latency_ms:g} ms, backlog {args.jobs}, median of "
        f"{args.rounds} rounds"
    )
    print(f"  naive dramatiq actor (baseline): {naive:8.1f} sends/s")
    print(f"  verloop-worker send path:        {ours:8.1f} sends/s")
    print(f"  ratio ours/naive:                {ratio:8.3f}  (target >= {TARGET_RATIO}: {verdict})")
    (RESULTS / "send_path.json").write_text(
        json.dumps(
            {"args": vars(args), "rates": rates, "naive": naive, "ours": ours, "ratio": ratio},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
