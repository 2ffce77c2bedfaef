"""``verloop-worker check``: are RabbitMQ, Redis and Verloop reachable, or is ``run`` alive?

:func:`service_problems` is also what ``run`` checks before it starts its worker processes.
"""

from __future__ import annotations

import sys

import click
import pika
import pika.exceptions
import redis
import redis.sentinel

from worker.commands.context import current_settings
from worker.connections.amqp import amqp_parameter_list
from worker.errors import ConfigurationError, JobFailure
from worker.observability.logging import mask_url, scrub_text, unreadable_url
from worker.runtime.health import health_dir, read_health
from worker.runtime.services import open_redis, open_verloop_client
from worker.settings import Settings
from worker.verloop.tokens import SystemToken

__all__ = ["check", "service_problems"]

#: What ``check`` says without Verloop credentials: a setup that runs only against the
#: simulator has none (``run --sandbox`` brings the simulator's login).
NO_CREDENTIALS = (
    "no credentials: set VERLOOP_SYSTEM_TOKEN, or VERLOOP_USERNAME and VERLOOP_PASSWORD. "
    "Only using the simulator? It brings its own login: check RabbitMQ and Redis with "
    "`verloop-worker check --services-only`, and start with `verloop-worker run --sandbox`"
)


@click.command(short_help="Check RabbitMQ, Redis and Verloop auth.")
@click.option("--services-only", is_flag=True, help="Check RabbitMQ and Redis, not Verloop.")
@click.option(
    "--live",
    is_flag=True,
    help="Check instead that this host's `run` (same METRICS_PORT) has all its worker threads, "
    "none stuck in a job: a liveness probe.",
)
def check(services_only: bool, live: bool) -> None:
    """Check that RabbitMQ, Redis and Verloop authentication work; exit 0 if all do, else 1."""
    settings = current_settings()
    if live:
        _check_live(settings)
    problems = False
    for name, url, problem in service_problems(settings):
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


def service_problems(settings: Settings) -> list[tuple[str, str, str | None]]:
    """(service, masked URL, problem or None) for RabbitMQ and Redis; a problem is one plain
    sentence saying how to start the service."""
    amqp = settings.amqp_url.get_secret_value()
    amqp_problem = None
    try:
        # One node answering is enough: every AMQP user goes to the first that answers.
        params = amqp_parameter_list(amqp, connection_attempts=1, socket_timeout=3)
        pika.BlockingConnection(params).close()
    except ConfigurationError as exc:
        amqp_problem = str(exc)
    except (pika.exceptions.AMQPError, OSError) as exc:
        amqp_problem = f"cannot connect to {mask_url(amqp)} ({type(exc).__name__}). " + (
            _tls_hint(exc, "AMQP_URL", "?ssl_options={'ca_certs': '/path/ca.pem'}")
            or "Is it running? Start it with: rabbitmq-server -detached"
        )
    redis_url = mask_url(settings.redis_url.get_secret_value())
    if settings.redis_sentinels:  # addresses and a name: nothing secret
        redis_url += (
            f" (primary {settings.redis_sentinel_service!r} of the sentinels "
            f"{settings.redis_sentinels})"
        )
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
    except redis.sentinel.MasterNotFoundError as exc:
        redis_problem = _no_primary(settings, redis_url, exc)
    except redis.RedisError as exc:
        redis_problem = f"cannot connect to {redis_url} ({type(exc).__name__}). " + (
            _tls_hint(exc, "REDIS_URL", "?ssl_ca_certs=/path/ca.pem")
            or "Start it with: redis-server --daemonize yes"
        )
    finally:
        client.close()
    return [("RabbitMQ", mask_url(amqp), amqp_problem), ("Redis", redis_url, redis_problem)]


def _no_primary(settings: Settings, redis_url: str, exc: BaseException) -> str:
    """Why the sentinels named no primary. The error's own text (each sentinel's reply) is not
    shown: only whether one of them refused the sentinels' credentials."""
    text = str(exc)
    if any(word in text for word in ("AuthenticationError", "WRONGPASS", "NOAUTH")):
        return (
            f"the sentinels of {redis_url} refused their credentials ({type(exc).__name__}); "
            "check REDIS_SENTINEL_PASSWORD and REDIS_SENTINEL_USERNAME (the sentinels' own, "
            "not the primary's password in REDIS_URL)"
        )
    return (
        f"no sentinel of {redis_url} named a primary ({type(exc).__name__}): check "
        "REDIS_SENTINELS and REDIS_SENTINEL_SERVICE (the name in the sentinels' `sentinel "
        "monitor` line), and that they run (redis-server /path/sentinel.conf --sentinel)"
    )


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
        return NO_CREDENTIALS
    client = open_verloop_client(settings)
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
