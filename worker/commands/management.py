"""``verloop-worker clients`` and ``verloop-worker tokens``: management jobs from the shell.

Each command enqueues a management job on ``verloop.manage`` and waits for its outcome event
on the events exchange, so what it prints is what a running worker did (with the worker's
credentials, rate limits and logs). No worker running: it says so after ``--timeout``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import click
import pika
import pika.exceptions
import redis

from worker.commands.context import current_settings
from worker.connections.amqp import open_connection
from worker.errors import ConfigurationError, EnqueueError
from worker.finish.events import declare_exchange
from worker.jobs.producer import Producer
from worker.jobs.registry import JOB_TYPES
from worker.observability.logging import mask_url
from worker.runtime.services import open_redis
from worker.settings import Settings
from worker.verloop.tokens import token_cache_entries

__all__ = ["clients", "tokens"]


def run_management_job(
    settings: Settings, actor: str, kwargs: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Enqueue one management job and return its outcome event.

    Raises:
        click.ClickException: RabbitMQ unreachable, or no outcome within ``timeout_s``.
    """
    if not settings.outcome_exchange:
        raise click.ClickException("EVENTS_ENABLED is false: workers publish no results to read")
    url = settings.amqp_url.get_secret_value()
    try:
        connection = open_connection(url)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    except pika.exceptions.AMQPError as exc:
        raise click.ClickException(
            f"RabbitMQ does not answer at {mask_url(url)} ({type(exc).__name__})"
        ) from None
    try:
        channel = connection.channel()
        declare_exchange(channel, settings.outcome_exchange)
        # Named under verloop.* so the worker's least-privilege RabbitMQ user may declare it.
        queue = channel.queue_declare(
            f"verloop.cli.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        ).method.queue
        channel.queue_bind(queue, settings.outcome_exchange, routing_key=f"manage.{actor}.*")
        try:
            with Producer(url) as producer:
                message_id = producer.enqueue(actor, kwargs)
        except EnqueueError as exc:
            raise click.ClickException(str(exc)) from None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                connection.sleep(0.05)
                continue
            event = json.loads(body)
            if event.get("message_id") == message_id:
                return dict(event)
        raise click.ClickException(
            f"no worker answered within {timeout_s:g}s; the job stays queued on "
            f"{JOB_TYPES[actor].queue}. Is a worker running? (`verloop-worker run`)"
        )
    finally:
        if connection.is_open:
            connection.close()


def _failed(event: dict[str, Any]) -> None:
    if event.get("outcome") != "done":
        reason = event.get("reason", "no reason given")
        raise click.ClickException(f"the job was {event.get('outcome')}: {reason}")


_TIMEOUT = click.option(
    "--timeout",
    type=click.FloatRange(0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for a worker to run the job.",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.command()
@_TIMEOUT
@_JSON
def clients(timeout: float, as_json: bool) -> None:
    """List the partner's clients and their numbers (a list_clients job run by a worker)."""
    event = run_management_job(current_settings(), "list_clients", {}, timeout)
    _failed(event)
    listed = event.get("result", {}).get("clients", [])
    if as_json:
        click.echo(json.dumps(listed))
        return
    if not listed:
        click.echo("Verloop lists no clients (or its answer had a shape we do not read)")
        return
    for client in listed:
        phones = ", ".join(client["phone_ids"]) or "no numbers"
        click.echo(f"{client['client_id']}: {phones}")


@click.group()
def tokens() -> None:
    """Phone-number tokens: what the fleet has cached, and refreshing them.

    Tokens themselves are never printed.
    """


@tokens.command(name="list")
@click.option("--client-id", help="Only this client's numbers.")
@_JSON
def list_tokens(client_id: str | None, as_json: bool) -> None:
    """Numbers whose token is cached in Redis, and for how long still."""
    settings = current_settings()
    cache = open_redis(settings)
    try:
        entries = token_cache_entries(cache, client_id)
    except redis.RedisError as exc:
        url = mask_url(settings.redis_url.get_secret_value())
        raise click.ClickException(
            f"Redis does not answer at {url} ({type(exc).__name__})"
        ) from None
    finally:
        cache.close()
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry))
        return
    if not entries:
        click.echo("no phone tokens cached (they are fetched on a number's first send)")
        return
    for entry in entries:
        ttl = entry["expires_in_s"]
        left = "no expiry" if ttl is None else f"expires in {ttl // 3600}h{ttl % 3600 // 60:02d}m"
        click.echo(f"{entry['client_id']}/{entry['phone_id']}: cached, {left}")


@tokens.command()
@click.option("--client-id", required=True, help="Verloop client id.")
@click.option("--phone-id", help="One number; without it, every number of the client.")
@_TIMEOUT
@_JSON
def refresh(client_id: str, phone_id: str | None, timeout: float, as_json: bool) -> None:
    """Fetch a number's token again from Verloop (or every number's, for a client)."""
    if phone_id is not None:
        actor, kwargs = "refresh_phone_token", {"client_id": client_id, "phone_id": phone_id}
    else:
        actor, kwargs = "refresh_client_tokens", {"client_id": client_id}
    event = run_management_job(current_settings(), actor, kwargs, timeout)
    _failed(event)
    phones = event.get("result", {}).get("phones", [])
    if as_json:
        click.echo(json.dumps(phones))
        return
    for phone in phones:
        if phone["refreshed"]:
            click.echo(f"{client_id}/{phone['phone_id']}: refreshed")
        else:
            click.echo(f"{client_id}/{phone['phone_id']}: NOT refreshed ({phone['reason']})")
    if any(not phone["refreshed"] for phone in phones):
        raise SystemExit(1)
