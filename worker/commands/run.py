"""``verloop-worker run``: start the worker processes under dramatiq's process manager.

Settings and services are checked first (and the queues declared, so queues of another
``QUEUE_TYPE`` are named here), so a bad setup stops here with one sentence rather than in
every worker process; then the metrics and health folders are prepared and the process
manager is supervised (signals passed on; it never outlives us). ``--sandbox``: see
:mod:`worker.commands.sandbox`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click
import pika.exceptions
from dramatiq.common import dq_name, xq_name

from worker.commands.check import service_problems
from worker.commands.context import current_env_file, current_settings
from worker.commands.sandbox import (
    banner,
    refuse_real_verloop_settings,
    simulator,
    status_receiver,
)
from worker.connections.amqp import close_quietly, open_connection
from worker.connections.queues import (
    dead_letter_queue_arguments,
    inequivalent_queue,
    work_queue_arguments,
)
from worker.errors import ConfigurationError
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.observability.logging import configure_logging, resolve_log_format
from worker.receipts.models import STATUS_QUEUE
from worker.runtime.health import HEALTH_DIR_ENV, health_dir
from worker.runtime.lifeline import PARENT_PID_VARIABLE
from worker.settings import Settings

__all__ = ["run"]


@click.command(short_help="Run the worker daemon.")
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(1),
    default=os.cpu_count() or 1,
    show_default=True,
    help="Worker processes (one per core is a good start).",
)
@click.option(
    "-t",
    "--threads",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Threads per process: sends in flight at once (each mostly waits on Verloop).",
)
@click.option("-Q", "--queues", multiple=True, help="Consume only these queues (repeatable).")
@click.option(
    "--sandbox",
    is_flag=True,
    help="Send to the Verloop simulator instead of Verloop (started for you).",
)
@click.option(
    "--sandbox-url", help="With --sandbox: use this running simulator instead of starting one."
)
@click.option(
    "--demo",
    type=click.IntRange(0),
    default=0,
    help="With --sandbox: enqueue this many sample messages at start.",
)
def run(
    processes: int,
    threads: int,
    queues: tuple[str, ...],
    sandbox: bool,
    sandbox_url: str | None,
    demo: int,
) -> None:
    """Run the worker daemon (stop it with Ctrl-C or SIGTERM; in-flight jobs finish first).

    Without --sandbox it refuses to start unless Verloop credentials are set:
    VERLOOP_SYSTEM_TOKEN, or VERLOOP_USERNAME and VERLOOP_PASSWORD.
    """
    env_file = current_env_file()
    settings = current_settings()
    if sandbox:
        refuse_real_verloop_settings(settings, sandbox_url, env_file)
    try:
        settings.load_phone_tokens()  # a broken tokens file stops us here, not in every process
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    if (sandbox_url or demo) and not sandbox:
        raise click.UsageError("--sandbox-url and --demo need --sandbox")
    if not sandbox and not settings.has_verloop_credentials:
        raise click.UsageError(
            "no Verloop credentials: set VERLOOP_SYSTEM_TOKEN, or VERLOOP_USERNAME and "
            "VERLOOP_PASSWORD (see config/example.env), or try it with --sandbox"
        )
    if settings.metrics_port:
        _check_metrics_port(settings)
    fmt = resolve_log_format(settings.log_format)
    configure_logging(fmt, settings.log_level)
    # Worker processes write to a pipe, so the terminal is judged here, once.
    os.environ.update(LOG_FORMAT=fmt, LOG_LEVEL=settings.log_level)
    if env_file is not None:
        os.environ["VERLOOP_WORKER_ENV_FILE"] = str(env_file.resolve())

    env = _child_environment()
    # The simulator posts each accepted send's statuses to a receiver of our own.
    with (
        status_receiver(sandbox and sandbox_url is None, env=env) as statuses_to,
        simulator(sandbox, sandbox_url, env=env, statuses_to=statuses_to) as url,
    ):
        if url is not None:
            settings = current_settings()  # the sandbox overrides are in the environment now
            banner(url)
        problems = [(name, p) for name, _, p in service_problems(settings) if p is not None]
        queue_problem = None if problems else _queue_type_problem(settings)
        if queue_problem is not None:
            problems.append(("RabbitMQ", queue_problem))
        if problems:
            for name, problem in problems:
                click.secho(f"✗ {name}: {problem}", fg="red", err=True)
            sys.exit(1)
        if demo:
            _enqueue_demo(settings, demo)
        if settings.metrics_port:
            os.environ.update(_metrics_environment(settings))
        # The worker processes' health files (worker.runtime.health), read by `check --live`.
        os.environ[HEALTH_DIR_ENV] = str(_emptied(health_dir(settings), "*.json"))
        args = [
            "worker.runtime.app:boot",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--skip-logging",
            "--worker-shutdown-timeout",
            str(int(settings.shutdown_timeout_s * 1000)),
        ]
        if queues:
            args += ["--queues", *queues]
        code = _supervise([sys.executable, "-m", "worker.runtime.supervisor", *args])
    sys.exit(code)


def _queue_type_problem(settings: Settings) -> str | None:
    """Declare the worker's queues as its processes will (they do it again at boot): the
    sentence to show if RabbitMQ has them with other arguments (another QUEUE_TYPE), else None
    (RabbitMQ not answering now is left to the processes, which wait for it)."""
    try:
        connection = open_connection(settings.amqp_url.get_secret_value())
    except (pika.exceptions.AMQPError, OSError):
        return None
    try:
        channel = connection.channel()
        for queue in (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE, STATUS_QUEUE):
            arguments = work_queue_arguments(queue, settings.queue_type)
            channel.queue_declare(queue, durable=True, arguments=arguments)
            channel.queue_declare(dq_name(queue), durable=True, arguments=arguments)
            xq_arguments = dead_letter_queue_arguments(settings.queue_type)
            channel.queue_declare(xq_name(queue), durable=True, arguments=xq_arguments)
    except (pika.exceptions.AMQPError, OSError) as exc:
        return inequivalent_queue(exc, settings.queue_type)
    finally:
        close_quietly(connection)
    return None


def _metrics_environment(settings: Settings) -> dict[str, str]:
    """A metrics directory for this instance (one per port, emptied now) and where to serve.

    prometheus-client's multiprocess mode keeps one file per worker process there; files left
    by an earlier run would add its counts to this one's, and two instances on one host must
    not share files (they cannot share a port either).
    """
    directory = _emptied(settings.instance_dir("metrics"), "*.db")
    return {
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "dramatiq_prom_db": str(directory),
        "dramatiq_prom_host": settings.metrics_bind,
        "dramatiq_prom_port": str(settings.metrics_port),
    }


def _emptied(directory: Path, pattern: str) -> Path:
    """``directory``, made if missing, without an earlier run's ``pattern`` files."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(pattern):
        stale.unlink()
    return directory


def _supervise(command: list[str]) -> int:
    """Run dramatiq's process manager in its own session and pass stop signals on to it.

    A session of its own means a terminal's Ctrl-C reaches it once, through us, instead of
    twice (dramatiq takes a second signal as "kill now"). It stops when we die, even by
    SIGKILL (:mod:`worker.runtime.lifeline`).
    """
    proc = subprocess.Popen(  # noqa: S603 - our own module
        command, start_new_session=True, env=_child_environment()
    )

    def forward(signum: int, _: object) -> None:
        proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    return proc.wait()


def _child_environment() -> dict[str, str]:
    """This process's environment, naming it as the parent its child must not outlive."""
    return {**os.environ, PARENT_PID_VARIABLE: str(os.getpid())}


def _check_metrics_port(settings: Settings) -> None:
    """Refuse to start (exit 2) when the metrics port cannot be bound.

    dramatiq's exposition process would fail on it with a traceback, and the instance would
    run without metrics. Bound as http.server binds it (SO_REUSEADDR), so a port the last
    instance left in TIME_WAIT is not mistaken for a taken one.
    """
    where = f"{settings.metrics_bind}:{settings.metrics_port}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.metrics_bind, settings.metrics_port))
        except socket.gaierror as exc:
            raise _SettingsProblem(
                f"METRICS_BIND {settings.metrics_bind!r} is not an IPv4 address or host name "
                f"of this machine ({exc.strerror}); set METRICS_BIND (default 0.0.0.0)"
            ) from None
        except OSError as exc:
            raise _SettingsProblem(
                f"the metrics port {where} (METRICS_BIND:METRICS_PORT) cannot be used: "
                f"{exc.strerror}. Another verloop-worker instance on this host, or another "
                f"program, holds it (`ss -ltnp 'sport = :{settings.metrics_port}'` shows "
                "which). Stop it, or give this instance a METRICS_PORT of its own "
                "(METRICS_PORT=0 turns metrics off)."
            ) from None


class _SettingsProblem(click.ClickException):
    """Settings that cannot work on this host: exit code 2, like other bad settings."""

    exit_code = 2


def _enqueue_demo(settings: Settings, count: int) -> None:
    """A demo campaign of ``count`` messages, so `campaign status` shows its funnel."""
    from worker.campaigns.store import CampaignRef, CampaignStore
    from worker.connections.redis import open_redis
    from worker.jobs.producer import Producer

    campaign = CampaignRef("demo-client", f"demo-{time.strftime('%H%M%S')}")
    cache = open_redis(settings)
    store = CampaignStore(cache)
    try:
        store.create(campaign, {"client_id": campaign.client_id, "template": "(demo text)"})
        store.checkpoint(campaign, rows_done=count, enqueued=count, rejected=0)
        store.finish_enqueue(campaign, total_rows=count)
    finally:
        cache.close()
    with Producer(settings.amqp_url.get_secret_value(), queue_type=settings.queue_type) as producer:
        for n in range(count):
            kwargs = {
                "client_id": campaign.client_id,
                "phone_id": f"demo-phone-{n % 2 + 1}",
                "to": f"+9198765{n:05d}",
                "message": {
                    "type": "text",
                    "text": {"body": f"Hello from verloop-worker #{n + 1}"},
                },
                "campaign_id": campaign.campaign_id,
                "idempotency_key": f"demo-{uuid.uuid4()}",
            }
            producer.enqueue("send_message", kwargs, queue=CAMPAIGN_QUEUE)
    click.secho(
        f"enqueued a demo campaign of {count} messages on {CAMPAIGN_QUEUE}; its delivery funnel: "
        f"verloop-worker campaign status {campaign.campaign_id}",
        fg="green",
        err=True,
    )
