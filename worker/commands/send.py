"""``verloop-worker send``: enqueue one message from the shell, validated as a worker would."""

from __future__ import annotations

import json
from typing import Any

import click

from worker.commands.context import current_settings
from worker.errors import ConfigurationError, EnqueueError, InvalidJob
from worker.jobs.models import SEND_QUEUE
from worker.jobs.phones import mask_phone
from worker.observability.logging import scrub_text

__all__ = ["send"]


@click.command(short_help="Enqueue one message.")
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
def send(
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
    settings = current_settings()
    try:
        with Producer(
            settings.amqp_url.get_secret_value(),
            exchange=settings.producer_exchange,
            queue_type=settings.queue_type,
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
