"""``verloop-worker tokens``: the phone-number tokens the fleet has cached, and refreshing them.

``tokens list`` reads the cache in Redis; ``tokens refresh`` is a management job run by a
worker (:mod:`worker.commands.management`). Tokens themselves are never printed.
"""

from __future__ import annotations

import json
import sys

import click
import redis

from worker.commands.context import current_settings
from worker.commands.management import (
    JSON_OPTION,
    TIMEOUT_OPTION,
    raise_if_failed,
    run_management_job,
)
from worker.observability.logging import mask_url
from worker.runtime.services import open_redis
from worker.verloop.tokens import token_cache_entries

__all__ = ["tokens"]


@click.group()
def tokens() -> None:
    """Phone-number tokens: what the fleet has cached, and refreshing them.

    Tokens themselves are never printed.
    """


@tokens.command(name="list")
@click.option("--client-id", help="Only this client's numbers.")
@JSON_OPTION
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
@TIMEOUT_OPTION
@JSON_OPTION
def refresh(client_id: str, phone_id: str | None, timeout: float, as_json: bool) -> None:
    """Fetch a number's token again from Verloop (or every number's, for a client)."""
    if phone_id is not None:
        actor, kwargs = "refresh_phone_token", {"client_id": client_id, "phone_id": phone_id}
    else:
        actor, kwargs = "refresh_client_tokens", {"client_id": client_id}
    event = run_management_job(current_settings(), actor, kwargs, timeout)
    raise_if_failed(event)
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
        sys.exit(1)
