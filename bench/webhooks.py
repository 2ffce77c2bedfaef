"""The status webhook receiver (``verloop-worker webhooks``): signed statuses in, confirmed
``record_statuses`` jobs out.

The receiver runs as a real subprocess (its own process, its RabbitMQ connection with publisher
confirms, metrics on); this process is the sender: bodies of one status each, as WhatsApp posts
them, signed with the app secret, over kept-alive HTTP/1.1 connections. Two phases:

* **at the target rate**: 3,000 statuses/s offered on a schedule (open loop: a late answer does
  not slow the sender; latency counts from when the request was due), p50 and p99 latency;
* **saturation**: ``--webhook-connections`` connections each sending its next body as soon as
  the last is answered: the most statuses per second the receiver accepts here.

Only 200s count; at the end every status accepted must be in ``verloop.status`` (read back and
counted), so a fast wrong answer fails. The sender is a minimal HTTP/1.1 client on asyncio
streams: aiohttp's client costs as much CPU per request as the receiver, and on 2 cores it would
measure itself.

Target (issue 15, item 5): >= 3,000 statuses/s accepted with confirms, p99 < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pika

from bench import common
from bench.common import (
    BIN,
    RESULTS,
    BenchError,
    Result,
    WorkerProcess,
    clear_queues,
    cpu_used,
    free_port,
    machine_cpu,
    percentile,
    pids_listening,
    process_cpu_s,
    reset_queues,
    wait_for,
    worker,
    write_json,
)
from worker.jobs.producer import queue_arguments
from worker.receipts.models import STATUS_QUEUE
from worker.settings import Settings
from worker.webhooks.signature import sign

NAME = "webhooks"
TARGET_PER_S = 3000.0
TARGET_P99_MS = 100.0
SECRET = "bench-webhook-app-secret"  # noqa: S105 - the benchmark's throwaway app secret
PATH = "/webhooks/whatsapp"
STATUS_EXCHANGE = Settings.model_fields["status_exchange"].default
#: Distinct bodies made in advance (and signed), then sent round-robin.
BODIES = 30_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--webhook-seconds", type=float, default=8.0, help="length of each measured phase"
    )
    group.add_argument(
        "--webhook-rate",
        type=float,
        default=TARGET_PER_S,
        help="statuses/s offered in the latency phase",
    )
    group.add_argument(
        "--webhook-connections",
        type=int,
        default=128,
        help="sender connections (WhatsApp delivers many webhooks at once)",
    )


@dataclass
class Phase:
    """What one phase saw: latencies (s) of the 200s, other answers by status."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        accepted = len(self.latencies)
        return {
            "accepted": accepted,
            "accepted_per_s": accepted / self.seconds if self.seconds else 0.0,
            "p50_ms": 1000 * percentile(self.latencies, 50) if accepted else float("nan"),
            "p99_ms": 1000 * percentile(self.latencies, 99) if accepted else float("nan"),
            "refused": dict(self.refused),
        }


# --- the sender -----------------------------------------------------------------------------------
def _body(n: int, phone_number_id: str) -> bytes:
    """One status in Meta's webhook shape, as WhatsApp posts it (one per request)."""
    status = {
        "id": f"wamid.HBgMOTE5ODc2NTQzMjEwFQIAERgSQkVOQ0gwMDAw{n:08d}AA==",
        "status": ("sent", "delivered", "read")[n % 3],
        "timestamp": str(int(time.time())),
        "recipient_id": f"9198{n:08d}",
        "conversation": {"id": f"conv{n % 1000:05d}", "origin": {"type": "marketing"}},
        "pricing": {"billable": True, "pricing_model": "CBP", "category": "marketing"},
    }
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone_number_id},
        "statuses": [status],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def requests(port: int, count: int) -> list[bytes]:
    """``count`` complete signed HTTP/1.1 requests, each with its own wamid."""
    made = []
    for n in range(count):
        body = _body(n, f"10987654321{n % 4}")
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nUser-Agent: facebookexternalua\r\n"
            f"X-Hub-Signature-256: {sign(body, SECRET.encode())}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        made.append(head.encode() + body)
    return made


class _Connection:
    """A kept-alive HTTP/1.1 connection: one request at a time, answers read by length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def call(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return int(head[9:12])

    def close(self) -> None:
        self.writer.close()


class Sender:
    """The load: the requests, sent round-robin over a pool of connections."""

    def __init__(self, port: int, requests: list[bytes], connections: int) -> None:
        self.port = port
        self.requests = requests
        self.connections = connections
        self.next = 0
        self.accepted = 0  # every 200, warm-up included: all must reach the queue
        self._pool: asyncio.Queue[_Connection] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.connections):
            self._pool.put_nowait(await _Connection.open(self.port))

    def close(self) -> None:
        while not self._pool.empty():
            self._pool.get_nowait().close()

    async def _one(self, phase: Phase, due: float) -> None:
        request = self.requests[self.next % len(self.requests)]
        self.next += 1
        connection = await self._pool.get()
        try:
            status = await connection.call(request)
        except (OSError, asyncio.IncompleteReadError):
            connection.close()
            connection = await _Connection.open(self.port)
            status = 0
        self._pool.put_nowait(connection)
        if status == 200:
            self.accepted += 1
            phase.latencies.append(time.perf_counter() - due)
        else:
            phase.refused[status] = phase.refused.get(status, 0) + 1

    async def at_rate(self, rate: float, seconds: float) -> Phase:
        """Open loop: request ``n`` is due at ``start + n / rate``, whether or not the
        earlier ones were answered (a request waiting for a connection is late, and its
        latency says so)."""
        phase = Phase(seconds)
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        sent = 0
        total = int(rate * seconds)
        while sent < total:
            now = time.perf_counter()
            while sent < total and start + sent / rate <= now:
                task = asyncio.create_task(self._one(phase, start + sent / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.001)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        return phase

    async def saturate(self, seconds: float) -> Phase:
        """Closed loop: each connection sends its next request once the last is answered."""
        phase = Phase(seconds)
        end = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < end:
                await self._one(phase, time.perf_counter())

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(self.connections)))
        phase.seconds = time.perf_counter() - started
        return phase


# --- the receiver ---------------------------------------------------------------------------------
def receiver_env(port: int, metrics_port: int) -> dict[str, str]:
    """This machine's environment minus any worker settings, plus the receiver's."""
    own = ("VERLOOP_", "AMQP", "REDIS_URL", "WEBHOOK_", "LOG_", "METRICS_", "PROMETHEUS_")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(own)}
    return env | {
        "AMQP_URL": common.AMQP_URL,
        "WEBHOOK_APP_SECRET": SECRET,
        "WEBHOOK_BIND": "127.0.0.1",
        "WEBHOOK_PORT": str(port),
        "WEBHOOK_METRICS_PORT": str(metrics_port),
        "METRICS_BIND": "127.0.0.1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }


def _statuses_on_queue(channel: Any) -> int:
    """Read back every job on ``verloop.status``; the statuses they carry."""
    statuses = 0
    for method, _, body in channel.consume(STATUS_QUEUE, auto_ack=True, inactivity_timeout=1):
        if method is None:
            break
        statuses += len(json.loads(body)["kwargs"]["statuses"])
    channel.cancel()
    return statuses


@dataclass(frozen=True)
class _Cpu:
    t: float
    receiver: dict[int, float]
    rabbitmq: dict[int, float]
    sender: float
    machine: tuple[float, float] | None

    @classmethod
    def take(cls, proc: WorkerProcess) -> _Cpu:
        return cls(
            time.monotonic(),
            process_cpu_s(proc.pids()),
            process_cpu_s(pids_listening(5672)),
            time.process_time(),
            machine_cpu(),
        )


def _cpu_per_status(first: _Cpu, last: _Cpu, accepted: int) -> dict[str, float]:
    per = 1000 / max(accepted, 1)
    busy = float("nan")
    if first.machine and last.machine:
        busy = (last.machine[0] - first.machine[0]) / (last.machine[1] - first.machine[1])
    return {
        "receiver_ms": cpu_used(first.receiver, last.receiver) * per,
        "rabbitmq_ms": cpu_used(first.rabbitmq, last.rabbitmq) * per,
        "sender_ms": (last.sender - first.sender) * per,
        "machine_busy": busy,
    }


async def _load(port: int, args: argparse.Namespace, proc: WorkerProcess) -> dict[str, Any]:
    sender = Sender(port, requests(port, BODIES), args.webhook_connections)
    # The sender's own full garbage collections would stall it (and show as the receiver's
    # latency): what is loaded by now is set aside, as the receiver does.
    gc.collect()
    gc.freeze()
    await sender.open()
    try:
        await sender.at_rate(args.webhook_rate, 1.0)  # warm-up, not measured
        first = _Cpu.take(proc)
        steady = await sender.at_rate(args.webhook_rate, args.webhook_seconds)
        middle = _Cpu.take(proc)
        saturated = await sender.saturate(args.webhook_seconds)
        last = _Cpu.take(proc)
    finally:
        sender.close()
    return {
        "at_rate": steady.figures() | {"offered_per_s": args.webhook_rate},
        "saturated": saturated.figures() | {"connections": args.webhook_connections},
        "cpu_at_rate": _cpu_per_status(first, middle, len(steady.latencies)),
        "cpu_saturated": _cpu_per_status(middle, last, len(saturated.latencies)),
        "accepted_total": sender.accepted,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run both phases against a fresh receiver; the figures (see the module docstring)."""
    RESULTS.mkdir(exist_ok=True)
    port, metrics_port = free_port(), free_port()
    connection = pika.BlockingConnection(pika.URLParameters(common.AMQP_URL))
    try:
        channel = connection.channel()
        reset_queues(channel, [STATUS_QUEUE])
        # As a worker declares and binds it: the receiver declares nothing and needs both.
        channel.queue_declare(STATUS_QUEUE, durable=True, arguments=queue_arguments(STATUS_QUEUE))
        channel.exchange_declare(STATUS_EXCHANGE, exchange_type="direct", durable=True)
        channel.queue_bind(STATUS_QUEUE, STATUS_EXCHANGE, routing_key=STATUS_QUEUE)
        command = [str(BIN / "verloop-worker"), "webhooks"]
        env = receiver_env(port, metrics_port)
        with worker(command, env, RESULTS / "webhooks.log") as proc:
            health = f"http://127.0.0.1:{metrics_port}/healthz"
            wait_for(lambda: _connected(health), 30, "the receiver to connect to RabbitMQ", proc)
            figures = asyncio.run(_load(port, args, proc))
            proc.check()
        figures["statuses_on_queue"] = _statuses_on_queue(channel)
    finally:
        connection.close()
        clear_queues()
    figures["statuses_per_s"] = figures["saturated"]["accepted_per_s"]  # for a ratio to sends
    if figures["statuses_on_queue"] != figures["accepted_total"]:
        raise BenchError(
            f"{figures['accepted_total']} statuses accepted but {figures['statuses_on_queue']} "
            f"on {STATUS_QUEUE}; see {RESULTS / 'webhooks.log'}"
        )
    return figures


def _connected(url: str) -> bool:
    try:
        return bool(httpx.get(url, timeout=1).json().get("rabbitmq") == "connected")
    except (httpx.HTTPError, ValueError):
        return False


def run(args: argparse.Namespace) -> list[Result]:
    """Measure, print, write ``results/webhooks.json``; the figures are in the Result's
    ``details`` (``statuses_per_s``: the saturation rate, for a ratio to the send path)."""
    figures = measure(args)
    steady, saturated = figures["at_rate"], figures["saturated"]
    all_taken = not steady["refused"] and steady["accepted"] >= 0.99 * args.webhook_rate * (
        args.webhook_seconds
    )
    met = (
        all_taken
        and saturated["accepted_per_s"] >= TARGET_PER_S
        and steady["p99_ms"] < TARGET_P99_MS
    )
    cpu = figures["cpu_saturated"]
    print(
        f"status webhooks: one status per signed request, 1 receiver process, publisher "
        f"confirms, {args.webhook_connections} sender connections"
    )
    print(
        f"  at {args.webhook_rate:g}/s offered: {steady['accepted_per_s']:8.1f} statuses/s "
        f"accepted, p50 {steady['p50_ms']:.1f} ms, p99 {steady['p99_ms']:.1f} ms "
        f"(target < {TARGET_P99_MS:g} ms), refused {steady['refused'] or 'none'}"
    )
    print(
        f"  saturated:    {saturated['accepted_per_s']:8.1f} statuses/s accepted "
        f"(target >= {TARGET_PER_S:g}/s), p50 {saturated['p50_ms']:.1f} ms, "
        f"p99 {saturated['p99_ms']:.1f} ms, refused {saturated['refused'] or 'none'}"
    )
    print(
        f"  CPU ms per status (saturated): receiver {cpu['receiver_ms']:.3f}, RabbitMQ "
        f"{cpu['rabbitmq_ms']:.3f}, sender {cpu['sender_ms']:.3f}; machine "
        f"{cpu['machine_busy']:.0%} busy"
    )
    print(f"  {figures['statuses_on_queue']} statuses on {STATUS_QUEUE}: every one accepted")
    write_json(NAME, figures)
    return [
        Result(
            NAME,
            f"{saturated['accepted_per_s']:.0f} statuses/s accepted; p99 "
            f"{steady['p99_ms']:.0f} ms at {args.webhook_rate:g}/s",
            f">= {TARGET_PER_S:g}/s, p99 < {TARGET_P99_MS:g} ms",
            met,
            figures,
        )
    ]
