"""Management jobs from the shell, for ``verloop-worker clients`` and ``tokens refresh``.

Each command enqueues a job on ``verloop.manage`` and waits for its outcome event, so it prints
what a running worker did with the fleet's credentials. Without an outcome within ``--timeout``
it says so: the job was published and may run all the same.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import click
import pika
import pika.exceptions

from worker.connections.amqp import open_connection
from worker.errors import ConfigurationError, EnqueueError
from worker.finish.events import declare_exchange
from worker.jobs.producer import Producer
from worker.jobs.registry import JOB_TYPES
from worker.observability.logging import mask_url
from worker.settings import Settings

__all__ = ["JSON_OPTION", "TIMEOUT_OPTION", "raise_if_failed", "run_management_job"]


def run_management_job(
    settings: Settings, actor: str, kwargs: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Enqueue one management job and return its outcome event.

    Raises:
        click.ClickException: RabbitMQ unreachable, or no outcome within ``timeout_s`` (the
            job was published all the same: it may still run, or have run).
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
            with Producer(url, queue_type=settings.queue_type) as producer:
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
        # All that is known: the job was published and no outcome came back in time. A
        # worker may be about to run it, or may have run it with its event arriving late.
        raise click.ClickException(
            f"no worker answered within {timeout_s:g}s. The {actor} job {message_id} was "
            f"published to {JOB_TYPES[actor].queue}; it may still run, or may have run with its "
            "result arriving too late. Its outcome event (routing key "
            f"manage.{actor}.<outcome> on {settings.outcome_exchange}, this message_id) or the "
            "worker's log says which. Is a worker running? (`verloop-worker run`)"
        )
    finally:
        if connection.is_open:
            connection.close()


def raise_if_failed(event: dict[str, Any]) -> None:
    """Exit 1 with the worker's reason unless the job's outcome is ``done``."""
    if event.get("outcome") != "done":
        reason = event.get("reason", "no reason given")
        raise click.ClickException(f"the job was {event.get('outcome')}: {reason}")


TIMEOUT_OPTION = click.option(
    "--timeout",
    type=click.FloatRange(0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for a worker to run the job.",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
