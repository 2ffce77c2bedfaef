"""``verloop-worker campaign start``: enqueue a campaign from a CSV or JSON Lines file."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
import redis

from worker.campaigns.enqueue import (
    CampaignEnqueueError,
    EnqueueResult,
    Schedule,
    default_campaign_id,
    enqueue_campaign,
)
from worker.campaigns.reader import (
    MAX_BODY_PARAMS,
    CampaignInputError,
    CampaignSpec,
    FileFormat,
    detect_format,
)
from worker.campaigns.store import CampaignStore
from worker.campaigns.window import check_zone, parse_window
from worker.commands.context import current_settings
from worker.errors import ConfigurationError, RedisUnavailable
from worker.observability.logging import scrub_text

__all__ = ["parse_start_at", "start"]


def parse_start_at(value: str, timezone: str | None) -> float:
    """ISO 8601 (``2026-12-01T09:00``, ``...+05:30``, ``...Z``) → epoch seconds; a time without
    an offset is read in ``timezone`` (UTC if none)."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            "expected ISO 8601, e.g. 2026-12-01T09:00 or 2026-12-01T09:00+05:30"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone or "UTC"))
    return moment.timestamp()


@click.command(short_help="Enqueue a campaign from a CSV or JSON Lines file (resumable).")
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
    help="Where to write rejected rows with their reason [default: FILE.rejects.csv].",
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
    written to the rejects file with their reason and not enqueued. Every message is confirmed
    by RabbitMQ; a refused one stops the run with exit code 1.

    Resumable: progress is checkpointed in Redis as RabbitMQ confirms. Run the same command
    again after a crash or Ctrl-C and it continues after the last checkpoint. Ctrl-C waits for
    the messages in flight to be confirmed (press it twice to stop at once). After a crash, up
    to --batch-size rows published after the last checkpoint are enqueued twice; the workers
    send each recipient of a campaign once, so nobody gets the message twice.

    The send window and start time are stored with the campaign; the workers hold its
    messages until then. Exit codes: 0 done, 1 failed (resume by running again), 2 bad usage.
    """
    try:
        schedule = _schedule(window, timezone, start_at)
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
    cache = redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        decode_responses=True,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
    )
    show = not no_progress and sys.stdout.isatty()
    try:
        with _Progress(file.stat().st_size, enabled=show) as progress:
            result = enqueue_campaign(
                file,
                spec,
                amqp_url=settings.amqp_url.get_secret_value(),
                exchange=settings.producer_exchange,
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
    _summary(result)


def _schedule(window: str | None, timezone: str | None, start_at: str | None) -> Schedule | None:
    if window is None and timezone is None and start_at is None:
        return None
    start: str | None = None
    end: str | None = None
    try:
        zone = check_zone(timezone) if timezone else None
        if window is not None:
            start, end, _ = parse_window(window, zone or "UTC")
    except ConfigurationError as exc:
        raise ValueError(f"--window/--timezone: {exc}") from None
    when = None
    if start_at is not None:
        try:
            when = parse_start_at(start_at, zone)
        except ValueError as exc:
            raise ValueError(f"--start-at: {exc}") from None
    return Schedule(
        window_start=start,
        window_end=end,
        timezone=zone or ("UTC" if window is not None else None),
        start_at=when,
    )


def _summary(result: EnqueueResult) -> None:
    if result.already_finished:
        click.echo(
            f"campaign {result.campaign_id} was already enqueued ({result.enqueued} enqueued, "
            f"{result.rejected} rejected of {result.rows_read} rows): nothing to do"
        )
        return
    lines = [
        f"campaign   {result.campaign_id}" + (" (resumed)" if result.resumed else ""),
        f"rows read  {result.rows_read}"
        + (f" ({result.skipped} done by an earlier run)" if result.skipped else ""),
        f"enqueued   {result.enqueued}",
        f"rejected   {result.rejected}"
        + (f"  → {result.rejects_path}" if result.rejects_path and result.rejected else ""),
    ]
    if result.blank:
        lines.append(f"blank      {result.blank} (skipped)")
    lines.append(f"time       {result.seconds:.1f} s ({result.rows_per_s:,.0f} rows/s)")
    click.echo("\n".join(lines))


class _Progress:
    """A rich progress bar over the file's bytes, with rows/s and ETA; nothing when disabled."""

    def __init__(self, total_bytes: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total_bytes
        self._bar: Any = None
        self._task: Any = None
        self._began = time.monotonic()
        self._first_rows: int | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]enqueueing"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rows]:>10,} rows  {task.fields[rate]:>8,.0f} rows/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("enqueue", total=self.total, rows=0, rate=0.0)
        return self

    def update(self, bytes_read: int, rows: int) -> None:
        if self._bar is None:
            return
        if self._first_rows is None:  # rows skipped on resume are not this run's rate
            self._first_rows, self._began = rows, time.monotonic()
        elapsed = time.monotonic() - self._began
        rate = (rows - self._first_rows) / elapsed if elapsed > 0 else 0.0
        self._bar.update(self._task, completed=bytes_read, rows=rows, rate=rate)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
