"""``verloop-worker campaign``: start, watch, pause, resume, cancel and list campaigns."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import redis

from worker.campaigns.enqueue import CampaignEnqueueError, default_campaign_id, enqueue_campaign
from worker.campaigns.reader import FileFormat, detect_format
from worker.campaigns.spec import MAX_BODY_PARAMS, CampaignInputError, CampaignSpec
from worker.campaigns.store import CampaignState, CampaignStore
from worker.commands.campaign_support import (
    Progress,
    describe,
    eta_text,
    funnel_lines,
    print_summary,
    schedule_from_options,
)
from worker.commands.context import current_settings
from worker.errors import ConfigurationError, RedisUnavailable
from worker.observability.logging import scrub_text
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


def _failure(exc: Exception) -> click.ClickException:
    """The exit-1 error for a store that failed (a campaign not found included)."""
    if isinstance(exc, RedisUnavailable):
        return click.ClickException(f"{exc}; is Redis running? (`verloop-worker check`)")
    return click.ClickException(str(exc))


@click.group()
def campaign() -> None:
    """Send one template to a list of recipients, and control it while it runs.

    \b
      verloop-worker campaign start recipients.csv --client-id C --phone-id P \\
          --template spring_sale --body-params 2
      verloop-worker campaign status ID      progress, delivery funnel, rate and ETA
      verloop-worker campaign pause ID       workers hold its jobs within seconds
      verloop-worker campaign resume ID
      verloop-worker campaign cancel ID      its remaining jobs are dropped, not sent
      verloop-worker campaign list

    Workers honour a state change within CAMPAIGN_STATE_CACHE_S (1 s by default). Paused jobs
    wait in RabbitMQ's delay queue and look again every CAMPAIGN_PAUSE_RECHECK_S, without
    using a retry. Cancelling cannot be undone.
    """


@campaign.command(short_help="Enqueue a campaign from a CSV or JSON Lines file (resumable).")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@click.option("--client-id", required=True, help="Verloop client id sending the campaign.")
@click.option(
    "--phone-id",
    "phone_ids",
    multiple=True,
    help="Sending number (repeatable: rows are spread over them by recipient, the same way on "
    "every run). A phone_id column overrides it per row.",
)
@click.option("--template", required=True, help="Approved WhatsApp template name.")
@click.option("--language", default="en_US", show_default=True, help="Template language code.")
@click.option(
    "--body-params",
    type=click.IntRange(0, MAX_BODY_PARAMS),
    help="Body parameters the template takes; rows with another count are rejected. "
    "CSV default: the number of body_N columns. Required for JSON Lines.",
)
@click.option(
    "--campaign-id",
    help="Campaign id. Default: derived from the file and template, so the same command "
    "resumes the same campaign.",
)
@click.option(
    "--rejects",
    "rejects_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write rejected rows with their reason [default: FILE.rejects.csv]. Its "
    "'row' column counts data rows from 1, the CSV header not counted: not the line number.",
)
@click.option("--window", help="Send window, e.g. 09:00-21:00 (enforced by the workers).")
@click.option("--timezone", help="IANA time zone of --window and --start-at [default: UTC].")
@click.option("--start-at", help="Send nothing before this time (ISO 8601).")
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["csv", "jsonl"]),
    help="File format [default: from the name: .jsonl/.ndjson is JSON Lines, else CSV].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=2000,
    show_default=True,
    help="Messages in flight unconfirmed at once; also the most a crash can publish twice.",
)
@click.option(
    "--env-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Settings file (dotenv format); environment variables win.",
)
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
def start(
    file: Path,
    client_id: str,
    phone_ids: tuple[str, ...],
    template: str,
    language: str,
    body_params: int | None,
    campaign_id: str | None,
    rejects_path: Path | None,
    window: str | None,
    timezone: str | None,
    start_at: str | None,
    file_format: FileFormat | None,
    batch_size: int,
    env_file: Path | None,
    no_progress: bool,
) -> None:
    """Enqueue one template message per row of FILE to the verloop.campaign queue.

    \b
    CSV: a header row, then one row per recipient. Columns:
      to            recipient, E.164 (+919876543210)
      body_1..N     the template's body parameters, in order
      header_1      optional: the template's text header parameter
      phone_id      optional: sending number for this row (overrides --phone-id)
    JSON Lines (.jsonl): one object per line:
      {"to": "+91...", "body": ["Asha", "42"], "header": ["Diwali"], "phone_id": "123"}

    Every row is validated as the worker would (number, parameter count...). Bad rows are
    written to the rejects file with their reason and not enqueued. Its "row" column is the
    row's number among the data rows, from 1, the header not counted: in a CSV file row N is
    usually line N+1 (later, after a quoted cell that spans lines), in JSON Lines line N.
    Every message is confirmed by RabbitMQ; a refused one stops the run with exit code 1.

    Resumable: progress is checkpointed in Redis as RabbitMQ confirms. Run the same command
    again after a crash or Ctrl-C and it continues after the last checkpoint. Ctrl-C waits for
    the messages in flight to be confirmed (press it twice to stop at once). After a crash, up
    to --batch-size rows published after the last checkpoint are enqueued twice; the workers
    send each recipient of a campaign once, so nobody gets the message twice.

    The send window and start time are stored with the campaign; the workers hold its
    messages until then. Exit codes: 0 done, 1 failed (resume by running again), 2 bad usage.
    """
    try:
        schedule = schedule_from_options(window, timezone, start_at)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    settings = current_settings(env_file)
    fmt = file_format or detect_format(file)
    campaign_id = campaign_id or default_campaign_id(
        file, client_id=client_id, template=template, language=language
    )
    spec = CampaignSpec(
        campaign_id=campaign_id,
        client_id=client_id,
        phone_ids=tuple(dict.fromkeys(phone_ids)),
        template=template,
        language=language,
        body_params=body_params,
    )
    cache = open_redis(settings, timeout_s=5.0)
    show = not no_progress and sys.stdout.isatty()
    try:
        with Progress(file.stat().st_size, enabled=show) as progress:
            result = enqueue_campaign(
                file,
                spec,
                amqp_url=settings.amqp_url.get_secret_value(),
                exchange=settings.producer_exchange,
                queue_type=settings.queue_type,
                store=CampaignStore(cache),
                rejects_path=rejects_path,
                file_format=fmt,
                batch_size=batch_size,
                schedule=schedule,
                max_job_bytes=settings.max_job_bytes,
                progress=progress.update if show else None,
            )
    except (CampaignInputError, ConfigurationError) as exc:
        raise click.UsageError(scrub_text(str(exc))) from None
    except (CampaignEnqueueError, RedisUnavailable) as exc:
        raise click.ClickException(f"campaign {campaign_id}: {scrub_text(str(exc))}") from None
    except redis.RedisError as exc:
        raise click.ClickException(
            f"campaign {campaign_id}: Redis did not answer ({type(exc).__name__}); "
            "run the same command again to resume"
        ) from None
    except OSError as exc:
        raise click.ClickException(f"campaign {campaign_id}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: campaign {campaign_id} is checkpointed; run the same command "
            "again to resume",
            err=True,
        )
        sys.exit(1)
    finally:
        cache.close()
    print_summary(result)


_CLIENT = click.option(
    "--client-id",
    help="The campaign's client; needed only when several clients have a campaign of that id.",
)


@campaign.command()
@click.argument("campaign_id")
@_CLIENT
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(campaign_id: str, client_id: str | None, as_json: bool) -> None:
    """Show a campaign's progress: counts by outcome, current rate and ETA, and its delivery
    funnel (delivered, read, failed by error code) as WhatsApp's statuses report it.

    A running campaign shows as done once its file is all enqueued and every job has an
    outcome (sent, dead-lettered, suppressed or cancelled). Statuses come after that, and
    "awaiting" counts the sent messages that have none yet.
    """
    try:
        with _store() as store:
            found = store.get(store.find(campaign_id, client_id))
    except (ConfigurationError, RedisUnavailable) as exc:
        raise _failure(exc) from None
    info = describe(found)
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
        *funnel_lines(found.funnel),
        f"not sent   {info['dead_lettered']} dead-lettered "
        f"({kinds['failed']} failed, {kinds['invalid']} invalid, {kinds['gave_up']} gave up)",
        f"suppressed {info['suppressed']} duplicates (already sent)",
        f"cancelled  {info['cancelled']}",
        f"pending    {info['pending']}",
        f"rate       {info['rate_per_s']}/s over the last minute",
        f"eta        {eta_text(info['eta_s'], info['state'])}",
    ]
    if info["window"]:
        lines.append(f"window     {info['window']}")
    click.echo("\n".join(lines))


def _change_state(campaign_id: str, client_id: str | None, state: CampaignState, verb: str) -> None:
    try:
        with _store() as store:
            previous = store.set_state(store.find(campaign_id, client_id), state)
    except (ConfigurationError, RedisUnavailable) as exc:
        raise _failure(exc) from None
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
            infos = [describe(status) for status in store.list(limit)]
    except RedisUnavailable as exc:
        raise _failure(exc) from None
    if as_json:
        for info in infos:
            click.echo(json.dumps(info))
        return
    if not infos:
        click.echo("no campaigns yet (start one with `verloop-worker campaign start`)")
        return
    click.echo(
        f"{'CAMPAIGN':<28} {'CLIENT':<16} {'STATE':<9} {'CREATED':<16} {'ENQUEUED':>9} "
        f"{'SENT':>9} {'DELIVERED':>9} {'READ':>9} {'FAILED':>7} {'DLQ':>7} {'PENDING':>8}"
    )
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["created_at"]))
        funnel = info["funnel"]
        click.echo(
            f"{info['campaign_id']:<28} {info['client_id']:<16} {info['state']:<9} "
            f"{created:<16} {info['enqueued']:>9} {info['sent']:>9} {funnel['delivered']:>9} "
            f"{funnel['read']:>9} {funnel['failed']:>7} {info['dead_lettered']:>7} "
            f"{info['pending']:>8}"
        )
