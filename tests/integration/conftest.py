"""Real RabbitMQ, real Redis, and the Verloop simulator as a real HTTP server.

Tests use their own RabbitMQ vhost (``verloop-test``) and Redis database (15), so they never
touch what ``make run`` or a developer's worker uses. A missing service stops the whole run
with a message saying how to start it; nothing is skipped.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest
import redis
from dramatiq import Worker

from worker.connections.amqp import open_connection
from worker.finish.finish import JobFinisher
from worker.finish.outcome import JobRun
from worker.jobs.producer import Producer
from worker.observability.logging import forget_secrets
from worker.runtime.app import WorkerApp, create_app
from worker.runtime.services import Services
from worker.sandbox import SandboxConfig, SandboxServer
from worker.settings import Settings

TEST_VHOST = "verloop-test"
AMQP_URL = os.environ.get("TEST_AMQP_URL", f"amqp://guest:guest@127.0.0.1:5672/{TEST_VHOST}")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SANDBOX_USER = "sandbox"
SANDBOX_PASSWORD = "sandbox-password-for-tests"
#: Every queue the worker declares; deleted before each test so each starts empty.
QUEUES = [
    q + suffix
    for q in ("verloop.send", "verloop.campaign", "verloop.manage", "verloop.status")
    for suffix in ("", ".DQ", ".XQ")
]
VENV_BIN = Path(sys.executable).parent


#: Policies tests set on the test vhost are named with this prefix.
TEST_POLICY_PREFIX = "test-"


def _ensure_vhost() -> None:
    """Create the test vhost if missing, and clear any policy an interrupted run left on it (a
    leftover ``max-length`` policy makes RabbitMQ refuse the next run's publishes)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or "TEST_AMQP_URL" in os.environ:
        return
    listed = subprocess.run([ctl, "-q", "list_vhosts"], capture_output=True, text=True)
    if TEST_VHOST not in listed.stdout.split():
        subprocess.run([ctl, "-q", "add_vhost", TEST_VHOST], capture_output=True, check=False)
    subprocess.run(
        [ctl, "-q", "set_permissions", "-p", TEST_VHOST, "guest", ".*", ".*", ".*"],
        capture_output=True,
        check=False,
    )
    policies = subprocess.run(
        [ctl, "-q", "list_policies", "-p", TEST_VHOST, "--formatter", "json"],
        capture_output=True,
        text=True,
    )
    for policy in json.loads(policies.stdout or "[]"):
        if policy["name"].startswith(TEST_POLICY_PREFIX):
            subprocess.run(
                [ctl, "-q", "clear_policy", "-p", TEST_VHOST, policy["name"]], check=False
            )


#: How long a test run waits for another one on the same services (under pytest-timeout's 240 s).
RUN_LOCK_WAIT_S = 200.0


def _say(config: pytest.Config, text: str) -> None:
    """Print ``text`` on the terminal now, past pytest's output capture."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else nullcontext():
        print("\n" + text, file=sys.stderr, flush=True)


def _one_run_at_a_time(config: pytest.Config) -> None:
    """Wait, saying so, while another test run on this machine uses the same services: two
    runs emptying each other's queues and setting each other's policies fail at random. The
    lock is kept on ``config`` for the whole run (a second fixture of the same run, e.g. the
    property tests', finds it there: a second ``flock`` of ours would wait for ourselves)."""
    if getattr(config, "_verloop_run_lock", None) is not None:
        return
    name = re.sub(r"[^A-Za-z0-9]+", "_", f"{AMQP_URL}|{REDIS_URL}")
    handle = open(Path(tempfile.gettempdir()) / f"verloop-tests-{name}.lock", "w")  # noqa: SIM115
    waited_since = None
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if waited_since is None:
                waited_since = time.monotonic()
                _say(
                    config,
                    "another test run on this machine is using the same vhost and "
                    "Redis database; waiting for it to finish",
                )
            elif time.monotonic() - waited_since > RUN_LOCK_WAIT_S:
                pytest.exit(
                    f"another test run on this machine has held {handle.name} for over "
                    f"{RUN_LOCK_WAIT_S:.0f} s; run the tests again once it has finished",
                    returncode=3,
                )
            time.sleep(0.5)
    config._verloop_run_lock = handle  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def _services_answer(pytestconfig: pytest.Config) -> None:
    """Stop the run at once, saying how to fix it, if RabbitMQ or Redis do not answer."""
    _one_run_at_a_time(pytestconfig)
    _ensure_vhost()
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except pika.exceptions.AMQPError as exc:
        pytest.exit(
            f"RabbitMQ does not answer at {AMQP_URL} ({type(exc).__name__}). Start it with "
            f"`rabbitmq-server -detached`; the tests need vhost {TEST_VHOST!r} "
            f"(`rabbitmqctl add_vhost {TEST_VHOST}` and set_permissions for guest).",
            returncode=3,
        )
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as cache:
            cache.ping()
    except redis.RedisError as exc:
        pytest.exit(
            f"Redis does not answer at {REDIS_URL} ({type(exc).__name__}). Start it with "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379`.",
            returncode=3,
        )


#: Redis clients made by tests through :func:`redis_client`, closed when the test ends.
_test_redis_clients: list[redis.Redis] = []


def redis_client(url: str = REDIS_URL, **kwargs: Any) -> redis.Redis:
    """A Redis client for the running test, closed when it ends (its sockets must not be left
    for the garbage collector, which warns, failing whichever test it happens to run in)."""
    client = redis.Redis.from_url(url, **kwargs)
    _test_redis_clients.append(client)
    return client


@pytest.fixture(autouse=True)
def clean_state() -> Iterator[None]:
    """Empty queues and token cache before each test; forget registered secrets and close the
    test's Redis clients after."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for queue in QUEUES:
        channel.queue_delete(queue)
    connection.close()
    with redis.Redis.from_url(REDIS_URL) as cache:
        cache.flushdb()
    yield
    forget_secrets()
    while _test_redis_clients:
        _test_redis_clients.pop().close()
    # Collect now, so a socket or connection a test leaks is reported by that test's teardown
    # rather than by whichever later test the garbage collector happens to run in.
    gc.collect()


# --- the simulator -------------------------------------------------------------------------------
class Simulator:
    """The running simulator and its admin API."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.url = server.url
        self.http = httpx.Client(base_url=server.url, timeout=10)

    def messages(self, **filters: str) -> list[dict[str, Any]]:
        return list(self.http.get("/admin/messages", params=filters).json()["messages"])

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/admin/stats").json())

    def send_requests(self) -> int:
        return int(self.stats()["requests"].get("send_message", 0))

    def script(self, *responses: dict[str, Any]) -> None:
        self.http.post("/admin/script", json={"responses": list(responses)}).raise_for_status()

    def faults(self, **faults: Any) -> None:
        self.http.patch("/admin/faults", json=faults).raise_for_status()

    def revoke_phone_token(self, client_id: str, phone_id: str) -> str:
        answer = self.http.post(
            "/admin/revoke_phone_token", json={"client_id": client_id, "phone_id": phone_id}
        )
        answer.raise_for_status()
        return str(answer.json()["token"])

    def phone_token(self, client_id: str, phone_id: str) -> str:
        """The current token of a number, fetched the documented way."""
        answer = self.http.get(
            "/api/v2/whatsapp/get_phone_token",
            params={"client_id": client_id, "phone_id": phone_id},
            headers={"Authorization": self.server.system_user_token},
        )
        answer.raise_for_status()
        return str(answer.json()["token"])


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """A fresh Verloop simulator on a free port."""
    config = SandboxConfig(username=SANDBOX_USER, password=SANDBOX_PASSWORD)
    with SandboxServer(config) as server:
        sim = Simulator(server)
        yield sim
        sim.http.close()


# --- settings, producer, worker -------------------------------------------------------------------
@pytest.fixture
def make_settings(simulator: Simulator) -> Callable[..., Settings]:
    """Settings pointing at the test services and simulator, with fast retries."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "redis_url": REDIS_URL,
            "verloop_base_url": simulator.url,
            "verloop_username": SANDBOX_USER,
            "verloop_password": SANDBOX_PASSWORD,
            "retry_min_backoff_s": 0.05,
            "retry_max_backoff_s": 0.2,
            "verloop_timeout_s": 2.0,
            "metrics_port": 0,  # in-process workers have no metrics exposition process
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def services(make_settings: Callable[..., Settings]) -> Iterator[Services]:
    """One worker thread's services (real Redis, the simulator), for testing steps alone."""
    opened = Services.open(make_settings())
    yield opened
    opened.close()


class _Lifecycle:
    def __init__(self, services: Services) -> None:
        self.services = services


def finish_job(services: Services, run: JobRun, exchange: str = "verloop.events") -> None:
    """What the outcome middleware does with a final outcome: the finisher's writes."""
    JobFinisher(_Lifecycle(services), exchange)(None, run)  # type: ignore[arg-type]


@pytest.fixture
def producer() -> Iterator[Producer]:
    """A producer on the test vhost."""
    with Producer(AMQP_URL) as p:
        yield p


class WorkerStarter:
    """Starts in-process dramatiq workers (real RabbitMQ) and stops them at teardown.

    Called like a function, it returns the :class:`WorkerApp`; :meth:`worker_of` hands out the
    dramatiq ``Worker`` behind an app (its threads) and :meth:`stop` stops one early.
    """

    def __init__(self, make_settings: Callable[..., Settings]) -> None:
        self.make_settings = make_settings
        self.running: list[tuple[Worker, WorkerApp]] = []

    def __call__(
        self, threads: int = 4, *, as_process: bool = False, **overrides: Any
    ) -> WorkerApp:
        """``as_process``: also emit ``process_boot``, as dramatiq's CLI does in each worker
        process; only then does dramatiq's TimeLimit watch the jobs' time limits."""
        app = create_app(self.make_settings(**overrides))
        if as_process:
            app.broker.emit_after("process_boot")
        worker = Worker(app.broker, worker_threads=threads, worker_timeout=100)
        worker.start()
        self.running.append((worker, app))
        return app

    def worker_of(self, app: WorkerApp) -> Worker:
        return next(worker for worker, running in self.running if running is app)

    def stop(self, app: WorkerApp) -> None:
        worker = self.worker_of(app)
        self.running.remove((worker, app))
        worker.stop(timeout=10_000)
        app.broker.close()

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1][1])


@pytest.fixture
def start_worker(make_settings: Callable[..., Settings]) -> Iterator[WorkerStarter]:
    """Start an in-process dramatiq worker (real RabbitMQ); stopped at teardown."""
    starter = WorkerStarter(make_settings)
    yield starter
    starter.stop_all()


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def wait_for_progress(
    count: Callable[[], int], target: int, *, stall_s: float = 30.0, interval: float = 0.1
) -> int:
    """Poll ``count`` until it reaches ``target``; fail only if it stops moving for ``stall_s``.

    For long runs (thousands of jobs) whose total time depends on how fast the machine is: a
    slow machine still passes, a stuck worker still fails.
    """
    best, moved = -1, time.monotonic()
    while True:
        value = count()
        if value >= target:
            return value
        now = time.monotonic()
        if value > best:
            best, moved = value, now
        elif now - moved > stall_s:
            pytest.fail(f"stuck at {value} of {target} for {stall_s:g}s: {count}")
        time.sleep(interval)


def dead_letters(
    queue: str = "verloop.send", url: str = AMQP_URL
) -> list[tuple[dict[str, Any], bytes]]:
    """Take every message from ``queue``'s dead-letter queue: (headers, body) pairs. ``url``
    may list several nodes."""
    connection = open_connection(url)
    channel = connection.channel()
    letters = []
    try:
        while True:
            method, properties, body = channel.basic_get(queue + ".XQ", auto_ack=True)
            if method is None:
                break
            letters.append((dict(properties.headers or {}), body))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:  # no XQ yet means no dead letters
            raise
    finally:
        if connection.is_open:
            connection.close()
    return letters


def queue_depth(queue: str, url: str = AMQP_URL) -> int:
    """Ready messages in ``queue`` (0 if it does not exist); ``url`` may list several nodes."""
    connection = open_connection(url)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


# --- the real CLI in a subprocess ----------------------------------------------------------------
def worker_env(simulator: Simulator, **extra: str) -> dict[str, str]:
    """Environment for a ``verloop-worker`` subprocess aimed at the test services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERLOOP_", "AMQP", "REDIS"))}
    env.update(
        AMQP_URL=AMQP_URL,
        REDIS_URL=REDIS_URL,
        VERLOOP_BASE_URL=simulator.url,
        VERLOOP_USERNAME=SANDBOX_USER,
        VERLOOP_PASSWORD=SANDBOX_PASSWORD,
        RETRY_MIN_BACKOFF_S="0.05",
        RETRY_MAX_BACKOFF_S="0.2",
        LOG_FORMAT="json",
        METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@contextmanager
def worker_process(
    simulator: Simulator, log_path: Path, *args: str, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``verloop-worker run`` as a real process, its logs written to ``log_path``."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "verloop-worker"), "run", "--processes", "1", *args],
            env=worker_env(simulator, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: b"ready for action" in log_path.read_bytes(), timeout=30)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- a Redis of a test's own ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnRedis:
    """A throwaway redis-server on its own port, which a test may stop and start again."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            wait_until(lambda: self._answers(client), timeout=10)
        finally:
            client.close()

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A private Redis, so the machine's shared one is never stopped."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; this test starts and stops its own Redis")
    server = OwnRedis(binary, free_port())
    server.start()
    yield server
    server.kill()
