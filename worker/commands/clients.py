"""``verloop-worker clients``: the partner's clients and numbers, as a running worker sees them."""

from __future__ import annotations

import json

import click

from worker.commands.context import current_settings
from worker.commands.management import (
    JSON_OPTION,
    TIMEOUT_OPTION,
    raise_if_failed,
    run_management_job,
)

__all__ = ["clients"]


@click.command()
@TIMEOUT_OPTION
@JSON_OPTION
def clients(timeout: float, as_json: bool) -> None:
    """List the partner's clients and their numbers (a list_clients job run by a worker)."""
    event = run_management_job(current_settings(), "list_clients", {}, timeout)
    raise_if_failed(event)
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
