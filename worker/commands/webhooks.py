"""``verloop-worker webhooks``: the status webhook receiver (:mod:`worker.webhooks`)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

import click

from worker.commands.context import current_settings
from worker.connections.amqp import amqp_parameter_list
from worker.errors import ConfigurationError
from worker.observability.logging import configure_logging, register_secret
from worker.runtime.lifeline import follow_parent_from_environment

__all__ = ["run_loop", "webhooks"]


@click.command(short_help="Receive WhatsApp's status webhooks.")
def webhooks() -> None:
    """Receive WhatsApp's status webhooks (Meta's Cloud API format) and queue them.

    \b
    Each POST to WEBHOOK_PATH is checked (size, then its X-Hub-Signature-256 HMAC with
    WEBHOOK_APP_SECRET); its statuses are published as record_statuses jobs to verloop.status
    through STATUS_EXCHANGE (batched across requests), its inbound messages as
    inbound.message.<phone_number_id> events on EVENTS_EXCHANGE, and it is answered 200 only
    once RabbitMQ confirmed them all: 401 for a bad signature (nothing published), 413 for a
    body over WEBHOOK_MAX_BODY_BYTES, 400 for a body that is not a webhook, 503 while RabbitMQ
    cannot take it (WhatsApp retries).
    A GET with hub.verify_token = WEBHOOK_VERIFY_TOKEN answers hub.challenge (Meta's check).

    \b
    Settings (environment or --env-file; see config/example.env):
      WEBHOOK_APP_SECRET        required: the app secret bodies are signed with
      WEBHOOK_VERIFY_TOKEN      the token of the verification GET (unset: refused)
      WEBHOOK_BIND, WEBHOOK_PORT, WEBHOOK_PATH    where it listens (0.0.0.0:8088/webhooks/whatsapp)
      WEBHOOK_SIGNATURE_HEADER, WEBHOOK_MAX_BODY_BYTES, WEBHOOK_PUBLISH_TIMEOUT_S,
      WEBHOOK_BATCH_MAX, WEBHOOK_BATCH_LINGER_MS
      WEBHOOK_METRICS_PORT      /metrics and /healthz on METRICS_BIND (0: off)
      AMQP_URL, STATUS_EXCHANGE, EVENTS_EXCHANGE, SHUTDOWN_TIMEOUT_S, LOG_FORMAT, LOG_LEVEL

    \b
    It serves plain HTTP: TLS belongs to the ingress or load balancer in front of it (WhatsApp
    calls https:// URLs only). A worker must have started once: it declares verloop.status,
    STATUS_EXCHANGE and the events exchange (until then bodies are answered 503). Stop it with
    SIGTERM or Ctrl-C: requests in flight are answered first.
    """
    follow_parent_from_environment()  # started by `run --sandbox`: stop when it dies
    settings = current_settings()
    if settings.webhook_app_secret is None:
        raise click.UsageError(
            "WEBHOOK_APP_SECRET is not set: the receiver cannot check the signature of "
            "WhatsApp's webhooks without the app's secret (Meta's app dashboard, App settings "
            "> Basic); set it in the environment or the --env-file (see config/example.env)"
        )
    try:
        amqp_parameter_list(settings.amqp_url.get_secret_value())
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    register_secret(settings.webhook_app_secret.get_secret_value())
    if settings.webhook_verify_token is not None:
        register_secret(settings.webhook_verify_token.get_secret_value())
    _check_port("WEBHOOK_BIND:WEBHOOK_PORT", settings.webhook_bind, settings.webhook_port)
    if settings.webhook_metrics_port:
        where = "METRICS_BIND:WEBHOOK_METRICS_PORT"
        _check_port(where, settings.metrics_bind, settings.webhook_metrics_port)
    configure_logging(settings.log_format, settings.log_level)
    from worker.webhooks.serve import serve

    run_loop(serve(settings))


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed (a dependency, except on Windows): it takes
    a fifth less CPU per request than asyncio's own loop (bench/webhooks.py)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main)
        return
    uvloop.run(main)


def _check_port(names: str, host: str, port: int) -> None:
    """Refuse to start (exit 2) when ``host:port`` cannot be bound, naming the settings."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise click.UsageError(
                f"{names} {host}:{port} cannot be used: {exc.strerror}; another program "
                f"holds it, or the address is not this machine's"
            ) from None
