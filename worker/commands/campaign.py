"""``verloop-worker campaign``: start, watch, pause, resume, cancel and list campaigns."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from worker.campaigns.store import OUTCOME_COUNTERS, CampaignState, CampaignStatus, CampaignStore
from worker.commands.campaign_start import start
from worker.commands.context import current_settings
from worker.errors import ConfigurationError, RedisUnavailable
from worker.runtime.services import open_redis

__all__ = ["campaign"]


@contextmanager
def _store() -> Iterator[CampaignStore]:
    """The campaign store, its Redis client closed when the command is done with it."""
    cache = open_redis(current_settings())
    try:
        yield CampaignStore(cache)
    finally:
        cache.close()


def _fail(exc: Exception) -> None:
    if isinstance(exc, RedisUnavailable):
        raise click.ClickException(f"{exc}; is Redis running? (`verloop-worker check`)")
    raise click.ClickException(str(exc))


@click.group()
def campaign() -> None:
    """Send one template to a list of recipients, and control it while it runs.

    \b
      verloop-worker campaign start recipients.csv --client-id C --phone-id P \\
          --template spring_sale --body-params 2
      verloop-worker campaign status ID      progress, rate and ETA
      verloop-worker campaign pause ID       workers hold its jobs within seconds
      verloop-worker campaign resume ID
      verloop-worker campaign cancel ID      its remaining jobs are dropped, not sent
      verloop-worker campaign list

    Workers honour a state change within CAMPAIGN_STATE_CACHE_S (1 s by default). Paused jobs
    wait in RabbitMQ's delay queue and look again every CAMPAIGN_PAUSE_RECHECK_S, without
    using a retry. Cancelling cannot be undone.
    """


campaign.add_command(start)


def _describe(status: CampaignStatus) -> dict[str, Any]:
    fields = status.fields
    eta = status.eta_s
    return {
        "campaign_id": status.campaign_id,
        "state": status.state,
        "template": fields.get("template"),
        "client_id": status.ref.client_id,
        "total_rows": status.count("total_rows") if "total_rows" in fields else None,
        "rows_read": status.count("rows_done"),
        "enqueued": status.count("enqueued"),
        "rejected": status.count("rejected"),
        "enqueue_finished": "enqueue_finished" in fields,
        **{name: status.count(name) for name in OUTCOME_COUNTERS},
        "dead_lettered_by_kind": {
            kind: status.count(f"dead_lettered:{kind}") for kind in ("invalid", "failed", "gave_up")
        },
        "pending": max(0, status.count("enqueued") - status.finished),
        "rate_per_s": round(status.rate_per_s, 2),
        "eta_s": None if eta is None else round(eta, 1),
        "window": (
            f"{fields['window_start']}-{fields['window_end']} {fields.get('timezone', 'UTC')}"
            if "window_start" in fields
            else None
        ),
        "created_at": float(fields.get("created_at", 0) or 0),
    }


def _eta_text(seconds: float | None, state: str) -> str:
    if seconds is None:
        return "unknown (paused)" if state == "paused" else "unknown (no sends in the last minute)"
    if seconds <= 0:
        return "done"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_CLIENT = click.option(
    "--client-id",
    help="The campaign's client; needed only when several clients have a campaign of that id.",
)


@campaign.command()
@click.argument("campaign_id")
@_CLIENT
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(campaign_id: str, client_id: str | None, as_json: bool) -> None:
    """Show a campaign's progress: counts by outcome, current rate and ETA."""
    try:
        with _store() as store:
            info = _describe(store.get(store.find(campaign_id, client_id)))
    except (ConfigurationError, RedisUnavailable) as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(info))
        return
    total = info["total_rows"] if info["total_rows"] is not None else "still reading"
    kinds = info["dead_lettered_by_kind"]
    lines = [
        f"campaign   {info['campaign_id']}  ({info['state']})",
        f"template   {info['template']}  client {info['client_id']}",
        f"rows       {total} in file, {info['enqueued']} enqueued, {info['rejected']} rejected",
        f"sent       {info['sent']}",
        f"failed     {info['dead_lettered']} dead-lettered "
        f"({kinds['failed']} failed, {kinds['invalid']} invalid, {kinds['gave_up']} gave up)",
        f"suppressed {info['suppressed']} duplicates (already sent)",
        f"cancelled  {info['cancelled']}",
        f"pending    {info['pending']}",
        f"rate       {info['rate_per_s']}/s over the last minute",
        f"eta        {_eta_text(info['eta_s'], info['state'])}",
    ]
    if info["window"]:
        lines.append(f"window     {info['window']}")
    click.echo("\n".join(lines))


def _change_state(campaign_id: str, client_id: str | None, state: CampaignState, verb: str) -> None:
    try:
        with _store() as store:
            previous = store.set_state(store.find(campaign_id, client_id), state)
    except (ConfigurationError, RedisUnavailable) as exc:
        _fail(exc)
        return
    if previous == state:
        click.echo(f"campaign {campaign_id} was already {state}")
    else:
        click.echo(f"campaign {campaign_id} {verb} (was {previous}); workers follow within seconds")


@campaign.command()
@click.argument("campaign_id")
@_CLIENT
def pause(campaign_id: str, client_id: str | None) -> None:
    """Hold a campaign's jobs (no retry used) until it is resumed."""
    _change_state(campaign_id, client_id, "paused", "paused")


@campaign.command()
@click.argument("campaign_id")
@_CLIENT
def resume(campaign_id: str, client_id: str | None) -> None:
    """Let a paused campaign's jobs go out again."""
    _change_state(campaign_id, client_id, "running", "resumed")


@campaign.command()
@click.argument("campaign_id")
@_CLIENT
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cancel(campaign_id: str, client_id: str | None, yes: bool) -> None:
    """Drop a campaign's remaining jobs: they are acknowledged as cancelled, not sent."""
    if not yes:
        click.confirm(f"Cancel campaign {campaign_id}? This cannot be undone", abort=True)
    _change_state(campaign_id, client_id, "cancelled", "cancelled")


@campaign.command(name="list")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per campaign.")
def list_campaigns(limit: int, as_json: bool) -> None:
    """List campaigns, newest first."""
    try:
        with _store() as store:
            infos = [_describe(status) for status in store.list(limit)]
    except RedisUnavailable as exc:
        _fail(exc)
        return
    if as_json:
        for info in infos:
            click.echo(json.dumps(info))
        return
    if not infos:
        click.echo("no campaigns yet (start one with `verloop-worker campaign start`)")
        return
    click.echo(
        f"{'CAMPAIGN':<28} {'CLIENT':<16} {'STATE':<9} {'CREATED':<16} {'ENQUEUED':>9} "
        f"{'SENT':>9} {'FAILED':>7} {'PENDING':>8}"
    )
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["created_at"]))
        click.echo(
            f"{info['campaign_id']:<28} {info['client_id']:<16} {info['state']:<9} "
            f"{created:<16} {info['enqueued']:>9} {info['sent']:>9} {info['dead_lettered']:>7} "
            f"{info['pending']:>8}"
        )
