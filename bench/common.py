"""What every benchmark shares: the simulator, the vhost, backlogs, worker processes, results.

Everything runs on 127.0.0.1, in RabbitMQ vhost ``verloop-bench`` and Redis db 14, so a running
worker or the integration tests (vhost ``verloop-test``, db 15) are not disturbed. Every wait is
bounded in time: a stuck worker stops the benchmark with a message, never hangs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pika
import redis

from worker.jobs.producer import encode_job, queue_arguments

VHOST = "verloop-bench"
AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
REDIS_URL = "redis://127.0.0.1:6379/14"
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "results"
#: The RabbitMQ definitions ``deploy/`` ships; the bench vhost gets their policies.
DEFINITIONS = Path(__file__).parent.parent / "deploy" / "rabbitmq" / "definitions.json"
CLIENT_ID = "bench"
SIM_USERNAME = "bench"
SIM_PASSWORD = "bench-password"  # noqa: S105 - the simulator's throwaway login

#: Every queue a benchmark may fill; deleted (with their delay and dead-letter queues) between
#: runs so no job of one benchmark is left for the next.
BENCH_QUEUES = (
    "bench.naive",
    "verloop.send",
    "verloop.campaign",
    "verloop.manage",
    "verloop.status",
)


class BenchError(RuntimeError):
    """A benchmark could not run to the end (worker died, stalled, backlog lost...)."""


@dataclass
class Result:
    """One line of the final summary table."""

    benchmark: str
    figure: str
    target: str
    met: bool | None  #: None: informational, no target
    details: dict[str, Any] = field(default_factory=dict)


def ensure_vhost() -> None:
    """Use a vhost of our own so a running worker or test is not disturbed, with the policies
    that ``deploy/rabbitmq/definitions.json`` ships (the campaign queue is lazy there: on
    RabbitMQ before 3.12 that halves RabbitMQ's work per enqueued job)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        sys.exit(f"rabbitmqctl not found: create vhost {VHOST!r} for user guest and retry")
    subprocess.run([ctl, "-q", "add_vhost", VHOST], capture_output=True, check=False)
    subprocess.run(
        [ctl, "-q", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"],
        capture_output=True,
        check=True,
    )
    set_deploy_policies(ctl, VHOST)


def set_deploy_policies(
    ctl: str, vhost: str, *, node: str | None = None, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Apply the policies of ``deploy/rabbitmq/definitions.json`` to ``vhost``; return them.
    ``node`` and ``env`` name another node than the machine's and the environment to reach it."""
    policies: list[dict[str, Any]] = json.loads(DEFINITIONS.read_text(encoding="utf-8"))["policies"]
    target = ["-n", node] if node else []
    for policy in policies:
        subprocess.run(
            [
                ctl, "-q", *target, "set_policy", "-p", vhost, "--apply-to", policy["apply-to"],
                "--priority", str(policy["priority"]), policy["name"], policy["pattern"],
                json.dumps(policy["definition"]),
            ],
            capture_output=True,
            check=True,
            env=env,
        )  # fmt: skip
    return policies


def clear_redis() -> None:
    """Forget limiter state and cached phone tokens left in the bench's db by an earlier run
    (tokens of an earlier simulator would be rejected once, and a number's slot timestamp
    could still lie ahead)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match="verloop:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# --- the simulator -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Simulator:
    """A running simulator: its base URL and its process id (for CPU accounting)."""

    url: str
    pid: int


@contextlib.contextmanager
def simulator(latency_ms: float, message_log_limit: int = 1000) -> Iterator[Simulator]:
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
            str(message_log_limit),
            "--username",
            SIM_USERNAME,
            "--password",
            SIM_PASSWORD,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().strip() if ready else ""
    try:
        if not line.startswith("sandbox listening on "):
            raise BenchError("the Verloop simulator did not start")
        yield Simulator(line.removeprefix("sandbox listening on "), proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def system_token(sim: str) -> str:
    """Log in to the simulator as the worker would."""
    response = httpx.post(
        f"{sim}/api/v2/auth", json={"username": SIM_USERNAME, "password": SIM_PASSWORD}
    )
    response.raise_for_status()
    token: str = response.json()["system_user_token"]
    return token


def phone_token(sim: str, system: str, phone_id: str) -> str:
    """The phone token of ``phone_id`` (the naive actor has no token lookup of its own)."""
    response = httpx.get(
        f"{sim}/api/v2/whatsapp/get_phone_token",
        params={"client_id": CLIENT_ID, "phone_id": phone_id},
        headers={"Authorization": system},
    )
    response.raise_for_status()
    token: str = response.json()["token"]
    return token


def configure_simulator(http: httpx.Client, faults: dict[str, Any]) -> None:
    """Clear messages, counters and faults, then set ``faults`` (PUT: the rest default)."""
    http.post("/admin/reset").raise_for_status()
    http.put("/admin/faults", json=faults).raise_for_status()


def messages(http: httpx.Client, phone_id: str) -> list[dict[str, Any]]:
    """Every recorded send of ``phone_id`` (as far as ``--message-log-limit`` keeps them)."""
    response = http.get("/admin/messages", params={"phone_id": phone_id})
    response.raise_for_status()
    records: list[dict[str, Any]] = response.json()["messages"]
    return records


def stats(http: httpx.Client) -> dict[str, Any]:
    """The simulator's counters."""
    response = http.get("/admin/stats")
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


# --- RabbitMQ ------------------------------------------------------------------------------------
def reset_queues(channel: Any, queues: Iterable[str] = BENCH_QUEUES) -> None:
    """Delete the queues (and their ``.DQ``/``.XQ``) so each run starts empty."""
    for queue in queues:
        for suffix in ("", ".DQ", ".XQ"):
            channel.queue_delete(queue + suffix)


def clear_queues() -> None:
    """Delete every bench queue; called after a worker stopped, before the next benchmark."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        reset_queues(connection.channel())
    finally:
        connection.close()


def send_job(
    phone_id: str,
    n: int,
    *,
    queue: str = "verloop.send",
    idempotency_key: str | None = None,
) -> bytes:
    """The body of one ``send_message`` job to a distinct recipient."""
    kwargs: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "phone_id": phone_id,
        "to": f"+9198{n:08d}",
        "message": {"type": "text", "text": {"body": f"bench {n}"}},
    }
    if idempotency_key is not None:
        kwargs["idempotency_key"] = idempotency_key
    return encode_job("send_message", kwargs, queue=queue, message_id=str(uuid.uuid4()))


def publish_backlog(backlogs: dict[str, list[bytes]], *, reset: bool = True) -> None:
    """Put the given bodies on their queues before any worker runs.

    Publishing without a confirm per message is much faster (pika's blocking channel waits for
    each one); instead the queues' depth is checked afterwards, so a lost message stops the
    benchmark rather than skewing it.
    """
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        if reset:
            reset_queues(channel)
        properties = pika.BasicProperties(delivery_mode=2)
        for queue, bodies in backlogs.items():
            channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
            for body in bodies:
                channel.basic_publish("", queue, body, properties)
        deadline = time.monotonic() + 60
        for queue, bodies in backlogs.items():
            while True:
                depth = channel.queue_declare(queue, passive=True).method.message_count
                if depth >= len(bodies):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{queue}: {depth} of {len(bodies)} jobs arrived")
                connection.sleep(0.05)
    finally:
        connection.close()


# --- worker processes ----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_env(sim: str, system: str, *, metrics: bool = True, **settings: str) -> dict[str, str]:
    """The environment of a ``verloop-worker run``: this machine's, minus any worker settings
    it may carry, plus the simulator, the bench vhost and db, and ``settings``.

    Metrics stay on, as they are by default in production (so their cost is measured), but are
    served on 127.0.0.1 on a free port, with their files under ``bench/results/metrics``.
    """
    own = ("VERLOOP_", "AMQP", "REDIS_URL", "RATE_LIMIT_", "LOG_", "METRICS_", "PROMETHEUS_")
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(own)}
    base = {k: v for k, v in base.items() if not k.lower().startswith("dramatiq_prom")}
    env = base | {
        "AMQP_URL": AMQP_URL,
        "REDIS_URL": REDIS_URL,
        "VERLOOP_BASE_URL": sim,
        "VERLOOP_SYSTEM_TOKEN": system,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "METRICS_BIND": "127.0.0.1",
        "METRICS_PORT": str(free_port()) if metrics else "0",
        "METRICS_DIR": str(RESULTS / "metrics"),
    }
    return env | settings


class WorkerProcess:
    """A worker (``verloop-worker run`` or ``dramatiq``) as a subprocess logging to a file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(command, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        """Raise if the worker exited."""
        if self.proc.poll() is not None:
            raise BenchError(f"worker exited with {self.proc.returncode}; see {self.log}")

    def pids(self) -> list[int]:
        """The main process and all its descendants (supervisor, dramatiq's worker processes,
        the metrics exposition process)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop(0)
            found.append(pid)
            todo.extend(_children(pid))
        return found

    def stop(self) -> None:
        """SIGTERM, then wait (in-flight jobs finish first); SIGKILL if it takes too long."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()


@contextlib.contextmanager
def worker(command: list[str], env: dict[str, str], log: Path) -> Iterator[WorkerProcess]:
    """Run a worker for the duration of the block."""
    proc = WorkerProcess(command, env, log)
    try:
        yield proc
    finally:
        proc.stop()


def verloop_worker(processes: int, threads: int) -> list[str]:
    """The command line of our worker."""
    return [str(BIN / "verloop-worker"), "run", "-p", str(processes), "-t", str(threads)]


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    proc: WorkerProcess | None = None,
    interval_s: float = 0.05,
) -> None:
    """Poll ``condition`` until it holds; raise after ``timeout_s`` or if the worker exits."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None:
            proc.check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def sleep_checking(seconds: float, proc: WorkerProcess) -> None:
    """Sleep, but stop early with an error if the worker dies."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        proc.check()
        time.sleep(min(0.2, left))


# --- CPU accounting (from /proc, Linux only; None elsewhere) -------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def process_cpu_s(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU seconds used so far by each of ``pids`` still running."""
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            found[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError, ValueError):
            continue
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two :func:`process_cpu_s` samples by the processes in both."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) / _TICKS for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)


def pids_listening(port: int) -> list[int]:
    """The processes listening on TCP ``port`` (here RabbitMQ's 5672 and Redis's 6379, to read
    their CPU; they are only read, never signalled)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the worker's processes, the simulator, RabbitMQ and Redis,
    and the machine's (busy, total), at one moment (``t``, monotonic)."""

    t: float
    worker: dict[int, float]
    simulator: dict[int, float]
    rabbitmq: dict[int, float]
    redis: dict[int, float]
    machine: tuple[float, float] | None

    @classmethod
    def take(
        cls, proc: WorkerProcess, sim: Simulator, redis_pids: Sequence[int] | None = None
    ) -> CpuSample:
        """A sample now (RabbitMQ and Redis found by their listening ports, 5672 and 6379,
        unless ``redis_pids`` names the Redis processes)."""
        return cls(
            t=time.monotonic(),
            worker=process_cpu_s(proc.pids()),
            simulator=process_cpu_s([sim.pid]),
            rabbitmq=process_cpu_s(pids_listening(5672)),
            redis=process_cpu_s(pids_listening(6379) if redis_pids is None else redis_pids),
            machine=machine_cpu(),
        )


def cpu_between(first: CpuSample, last: CpuSample) -> dict[str, Any]:
    """Cores each part used between two samples, the worker's processes busiest first, and
    the share of the machine that was busy."""
    elapsed = last.t - first.t
    busy = float("nan")
    if first.machine and last.machine:
        busy = (last.machine[0] - first.machine[0]) / (last.machine[1] - first.machine[1])
    per_process = [cpu_used({pid: cpu}, last.worker) / elapsed for pid, cpu in first.worker.items()]
    return {
        "worker": cpu_used(first.worker, last.worker) / elapsed,
        "worker_processes": sorted(per_process, reverse=True),
        "simulator": cpu_used(first.simulator, last.simulator) / elapsed,
        "rabbitmq": cpu_used(first.rabbitmq, last.rabbitmq) / elapsed,
        "redis": cpu_used(first.redis, last.redis) / elapsed,
        "machine_busy": busy,
    }


# --- the machine ---------------------------------------------------------------------------------
def loop_seconds(steps: int = 10_000_000) -> float:
    """Seconds one core takes for an empty ``steps``-step Python loop, best of three: how fast
    this machine runs the interpreter right now. Figures from runs whose loop times differ are
    not comparable (a worker send is mostly interpreter work)."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(steps):
            pass
        best = min(best, time.perf_counter() - began)
    return best


# --- results -------------------------------------------------------------------------------------
def write_json(name: str, data: Any) -> Path:
    """Write ``bench/results/<name>.json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Result):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank: for p99 of 200 values, the 198th."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]
