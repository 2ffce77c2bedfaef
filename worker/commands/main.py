"""``verloop-worker``: run the worker, enqueue a message, run the simulator, check the setup.

Built with click (sub-commands, ``--help`` generated from the docstrings, typed options).
Exit codes: 0 success, 1 a service or job failed, 2 bad usage or settings.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import pika
import pika.exceptions
import redis

from worker.commands.campaign import campaign
from worker.commands.context import SettingsContext
from worker.commands.dlq import dlq
from worker.commands.management import clients, tokens
from worker.errors import ConfigurationError, EnqueueError, InvalidJob, JobFailure
from worker.jobs.models import SEND_QUEUE
from worker.jobs.phones import mask_phone
from worker.jobs.producer import amqp_parameters
from worker.jobs.registry import jobs_json_schema
from worker.observability.logging import (
    configure_logging,
    mask_url,
    resolve_log_format,
    scrub_text,
    unreadable_url,
)
from worker.runtime.health import HEALTH_DIR_ENV, health_dir, read_health
from worker.runtime.lifeline import PARENT_PID_VARIABLE
from worker.runtime.services import open_redis, open_verloop_client
from worker.settings import Settings
from worker.verloop.tokens import SystemToken

__all__ = ["main"]

_SANDBOX_USERNAME = "sandbox"
_SANDBOX_PASSWORD = "sandbox-password"  # noqa: S105 - the simulator's well-known fake login


pass_context = click.make_pass_decorator(SettingsContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--env-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="VERLOOP_WORKER_ENV_FILE",
    help="Settings file (dotenv format, see config/example.env). Environment variables win.",
)
@click.version_option(package_name="verloop-worker")
@click.pass_context
def cli(ctx: click.Context, env_file: Path | None) -> None:
    """Send WhatsApp messages through Verloop from jobs on RabbitMQ.

    \b
    Start here:
      verloop-worker check                 are RabbitMQ, Redis and Verloop reachable?
      verloop-worker run --sandbox         run against the built-in Verloop simulator
      verloop-worker send --to +91... --text hi --client-id C --phone-id P
    """
    ctx.obj = SettingsContext(env_file)


# --- run ------------------------------------------------------------------------------------------
@cli.command(short_help="Run the worker daemon.")
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
@pass_context
def run(
    obj: SettingsContext,
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
    settings = obj.settings()
    if sandbox:
        _refuse_real_verloop_settings(settings, sandbox_url, obj.env_file)
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
    if obj.env_file is not None:
        os.environ["VERLOOP_WORKER_ENV_FILE"] = str(obj.env_file.resolve())

    with _maybe_sandbox(sandbox, sandbox_url) as url:
        if url is not None:
            settings = obj.settings()  # the sandbox overrides are in the environment now
            _banner(url)
        problems = [(name, p) for name, _, p in _check_services(settings) if p is not None]
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


#: Settings that aim a run at the real Verloop: --sandbox refuses to start when the user gave
#: any of them, since only the URL and the login are replaced by the simulator's (the system
#: token is dropped with --sandbox-url, letting a settings file's one through, and the phone
#: tokens file is read as it is) and the rest would reach the simulator.
_REAL_VERLOOP_SETTINGS = (
    "verloop_system_token",
    "verloop_username",
    "verloop_password",
    "verloop_phone_tokens_file",
)


def _refuse_real_verloop_settings(
    settings: Settings, sandbox_url: str | None, env_file: Path | None
) -> None:
    """Stop ``run --sandbox`` (exit 2) when the user's own settings carry Verloop credentials
    or another Verloop URL; called before :func:`_maybe_sandbox` sets the simulator's."""
    given = settings.model_fields_set
    names = [name for name in _REAL_VERLOOP_SETTINGS if name in given]
    if "verloop_base_url" in given and (
        sandbox_url is None or settings.verloop_base_url != sandbox_url.rstrip("/")
    ):
        names.append("verloop_base_url")
    if not names:
        return
    file = env_file or os.environ.get("VERLOOP_WORKER_ENV_FILE") or "the settings file"
    in_environment = {key.upper() for key, value in os.environ.items() if value}
    where = [
        f"{name.upper()} (from {'the environment' if name.upper() in in_environment else file})"
        for name in names
    ]
    raise click.UsageError(
        "--sandbox will not run with real Verloop settings, which would be sent to the "
        f"simulator: {', '.join(where)}. The simulator brings its own URL and login: unset "
        "these, or use a settings file without them (VERLOOP_BASE_URL may name the simulator "
        "given with --sandbox-url)."
    )


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


@contextmanager
def _maybe_sandbox(enabled: bool, url: str | None) -> Iterator[str | None]:
    """Start the simulator (unless given its URL) and point this process's settings at it."""
    if not enabled:
        yield None
        return
    system_token = str(uuid.uuid4())
    proc: subprocess.Popen[str] | None = None
    if url is None:
        proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [
                sys.executable,
                "-m",
                "worker.sandbox",
                "--port",
                "0",
                "--username",
                _SANDBOX_USERNAME,
                "--password",
                _SANDBOX_PASSWORD,
                "--system-user-token",
                system_token,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=_child_environment(),
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("sandbox listening on "):
            proc.kill()
            raise click.ClickException("the Verloop simulator did not start")
        url = line.removeprefix("sandbox listening on ")
    os.environ.update(
        VERLOOP_BASE_URL=url,
        VERLOOP_USERNAME=_SANDBOX_USERNAME,
        VERLOOP_PASSWORD=_SANDBOX_PASSWORD,
        VERLOOP_SYSTEM_TOKEN=system_token if proc is not None else "",
    )
    if proc is None:
        del os.environ["VERLOOP_SYSTEM_TOKEN"]
    try:
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


def _banner(url: str) -> None:
    bar = "!" * 78
    for line in (
        bar,
        "  SANDBOX MODE: sending to the Verloop simulator at " + url,
        "  Nothing reaches Verloop or WhatsApp. Recorded sends: " + url + "/admin/messages",
        bar,
    ):
        click.secho(line, fg="yellow", bold=True, err=True)


def _enqueue_demo(settings: Settings, count: int) -> None:
    from worker.jobs.producer import Producer

    with Producer(settings.amqp_url.get_secret_value()) as producer:
        for n in range(count):
            producer.send_message(
                client_id="demo-client",
                phone_id=f"demo-phone-{n % 2 + 1}",
                to=f"+9198765{n:05d}",
                message={"type": "text", "text": {"body": f"Hello from verloop-worker #{n + 1}"}},
                idempotency_key=f"demo-{uuid.uuid4()}",
            )
    click.secho(f"enqueued {count} demo messages on {SEND_QUEUE}", fg="green", err=True)


# --- send -----------------------------------------------------------------------------------------
@cli.command(short_help="Enqueue one message.")
@click.option("--client-id", required=True, help="Verloop client id.")
@click.option("--phone-id", required=True, help="Verloop phone id of the sending number.")
@click.option("--to", "to", required=True, help="Recipient in E.164 form, e.g. +919876543210.")
@click.option("--text", help="Send a text message with this body.")
@click.option("--template", help="Send this approved template (name).")
@click.option("--language", default="en", show_default=True, help="Template language code.")
@click.option("--param", "params", multiple=True, help="Template body parameter (repeatable).")
@click.option(
    "--message-json",
    help='The whole message object as JSON, e.g. \'{"type":"image","image":{...}}\'.',
)
@click.option("--idempotency-key", help="Key that makes re-sends of this job harmless.")
@click.option("--metadata", help="JSON object echoed in the worker's log lines.")
@click.option("--queue", default=SEND_QUEUE, show_default=True)
@pass_context
def send(
    obj: SettingsContext,
    client_id: str,
    phone_id: str,
    to: str,
    text: str | None,
    template: str | None,
    language: str,
    params: tuple[str, ...],
    message_json: str | None,
    idempotency_key: str | None,
    metadata: str | None,
    queue: str,
) -> None:
    """Enqueue one message (validated first; confirmed by RabbitMQ)."""
    from worker.jobs.producer import Producer

    message = _message_from_options(text, template, language, params, message_json)
    settings = obj.settings()
    try:
        with Producer(
            settings.amqp_url.get_secret_value(), exchange=settings.producer_exchange
        ) as producer:
            message_id = producer.send_message(
                client_id=client_id,
                phone_id=phone_id,
                to=to,
                message=message,
                idempotency_key=idempotency_key,
                metadata=_json_option("--metadata", metadata) if metadata else None,
                queue=queue,
            )
    except (InvalidJob, ConfigurationError) as exc:
        raise click.UsageError(str(exc)) from None
    except EnqueueError as exc:
        raise click.ClickException(scrub_text(str(exc))) from None
    click.echo(f"enqueued {message_id} on {queue} (to {mask_phone(to)})")


def _json_option(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=name) from None


def _message_from_options(
    text: str | None,
    template: str | None,
    language: str,
    params: tuple[str, ...],
    message_json: str | None,
) -> dict[str, Any]:
    given = [x for x in (text, template, message_json) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --text, --template or --message-json")
    if text is not None:
        return {"type": "text", "text": {"body": text}}
    if template is not None:
        components = (
            [{"type": "body", "parameters": [{"type": "text", "text": p} for p in params]}]
            if params
            else []
        )
        return {
            "type": "template",
            "template": {
                "name": template,
                "language": {"code": language},
                "components": components,
            },
        }
    message = _json_option("--message-json", str(message_json))
    if not isinstance(message, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--message-json")
    return message


# --- sandbox --------------------------------------------------------------------------------------
@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    short_help="Run the Verloop simulator.",
)
@click.argument("simulator_args", nargs=-1, type=click.UNPROCESSED)
def sandbox(simulator_args: tuple[str, ...]) -> None:
    """Run the Verloop simulator (all options are the simulator's: see `sandbox --help`)."""
    from worker.sandbox.__main__ import main as sandbox_main

    sandbox_main(["--help"] if "-h" in simulator_args else list(simulator_args))


# --- check ----------------------------------------------------------------------------------------
@cli.command(short_help="Check RabbitMQ, Redis and Verloop auth.")
@click.option("--services-only", is_flag=True, help="Check RabbitMQ and Redis, not Verloop.")
@click.option(
    "--live",
    is_flag=True,
    help="Check instead that this host's `run` (same METRICS_PORT) has all its worker threads, "
    "none stuck in a job: a liveness probe.",
)
@pass_context
def check(obj: SettingsContext, services_only: bool, live: bool) -> None:
    """Check that RabbitMQ, Redis and Verloop authentication work; exit 0 if all do, else 1."""
    settings = obj.settings()
    if live:
        _check_live(settings)
    problems = False
    for name, url, problem in _check_services(settings):
        if problem is None:
            click.secho(f"✓ {name}: connected to {url}", fg="green")
        else:
            click.secho(f"✗ {name}: {problem}", fg="red")
            problems = True
    if services_only:
        sys.exit(1 if problems else 0)
    verloop_problem = _verloop_problem(settings)
    if verloop_problem is None:
        click.secho(f"✓ Verloop: authenticated at {settings.verloop_base_url}", fg="green")
    else:
        click.secho(f"✗ Verloop: {verloop_problem}", fg="red")
    sys.exit(1 if problems or verloop_problem else 0)


def _check_live(settings: Settings) -> None:
    directory = health_dir(settings)
    reporting, problems = read_health(directory)
    if reporting == 0 and not problems:
        problems = [f"no worker process reports in {directory} (is `verloop-worker run` running?)"]
    for problem in problems:
        click.secho(f"✗ {problem}", fg="red")
    if not problems:
        click.secho(f"✓ {reporting} worker process(es) with all their threads", fg="green")
    sys.exit(1 if problems else 0)


def _check_services(settings: Settings) -> list[tuple[str, str, str | None]]:
    """(service, masked URL, problem or None) for RabbitMQ and Redis; a problem is one plain
    sentence saying how to start the service."""
    amqp = settings.amqp_url.get_secret_value()
    amqp_problem = None
    try:
        params = amqp_parameters(amqp)
        params.connection_attempts = 1
        params.socket_timeout = 3
        pika.BlockingConnection(params).close()
    except ConfigurationError as exc:
        amqp_problem = str(exc)
    except (pika.exceptions.AMQPError, OSError) as exc:
        amqp_problem = f"cannot connect to {mask_url(amqp)} ({type(exc).__name__}). " + (
            _tls_hint(exc, "AMQP_URL", "?ssl_options={'ca_certs': '/path/ca.pem'}")
            or "Is it running? Start it with: rabbitmq-server -detached"
        )
    redis_url = mask_url(settings.redis_url.get_secret_value())
    redis_problem = None
    try:
        client = open_redis(settings)
    except (ValueError, TypeError) as exc:
        problem = unreadable_url("REDIS_URL", settings.redis_url.get_secret_value(), exc)
        return [("RabbitMQ", mask_url(amqp), amqp_problem), ("Redis", redis_url, problem)]
    try:
        client.ping()
    except (ValueError, TypeError) as exc:  # redis-py checks some URL parameters only now
        redis_problem = unreadable_url("REDIS_URL", settings.redis_url.get_secret_value(), exc)
    except redis.AuthenticationError as exc:
        redis_problem = (
            f"{redis_url} refused the password in REDIS_URL ({type(exc).__name__}); "
            "check REDIS_URL (redis://:PASSWORD@host:port/db)"
        )
    except redis.RedisError as exc:
        redis_problem = f"cannot connect to {redis_url} ({type(exc).__name__}). " + (
            _tls_hint(exc, "REDIS_URL", "?ssl_ca_certs=/path/ca.pem")
            or "Start it with: redis-server --daemonize yes"
        )
    finally:
        client.close()
    return [("RabbitMQ", mask_url(amqp), amqp_problem), ("Redis", redis_url, redis_problem)]


def _tls_hint(exc: BaseException, setting: str, ca_option: str) -> str | None:
    """What to do about a TLS failure (None if ``exc`` is not one); no secret is in it."""
    text = f"{type(exc).__name__} {exc}"
    if "CERTIFICATE_VERIFY_FAILED" in text or "CertVerification" in text:
        return (
            "The server's TLS certificate is not trusted: add its CA to "
            f"{setting} ({ca_option}) or to the system's trust store."
        )
    if "SSL" in text:
        return "The TLS handshake failed: is that port a TLS port (amqps/rediss)?"
    return None


def _verloop_problem(settings: Settings) -> str | None:
    if not settings.has_verloop_credentials:
        return "no credentials: set VERLOOP_SYSTEM_TOKEN, or VERLOOP_USERNAME and VERLOOP_PASSWORD"
    client = open_verloop_client(settings, threads=1)
    system = SystemToken(
        client,
        token=settings.verloop_system_token,
        username=settings.verloop_username,
        password=settings.verloop_password,
    )
    try:
        if settings.verloop_system_token is None:
            system.get()  # logs in with the username and password
        else:
            client.list_clients(system.get())  # a documented call that needs the token
    except JobFailure as exc:
        return scrub_text(str(exc))
    finally:
        client.close()
    return None


# --- schema ---------------------------------------------------------------------------------------
@cli.command(short_help="Print the JSON Schema of jobs.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file instead of standard output.",
)
def schema(output: Path | None) -> None:
    """Print the JSON Schema of every job's kwargs (config/jobs.schema.json)."""
    text = json.dumps(jobs_json_schema(), indent=2, sort_keys=False) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


cli.add_command(campaign)
cli.add_command(clients)
cli.add_command(tokens)
cli.add_command(dlq)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="verloop-worker")
