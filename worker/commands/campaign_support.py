"""What the ``verloop-worker campaign`` commands share: start's schedule options, progress
bar and summary, and the figures ``status`` and ``list`` show."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import click

from worker.campaigns.enqueue import EnqueueResult, Schedule
from worker.campaigns.funnel import FailureCode, Funnel
from worker.campaigns.store import OUTCOME_COUNTERS, CampaignStatus
from worker.campaigns.window import check_zone, parse_window
from worker.errors import ConfigurationError

__all__ = [
    "REJECTS_NUMBERING",
    "Progress",
    "describe",
    "eta_text",
    "funnel_lines",
    "parse_start_at",
    "print_summary",
    "schedule_from_options",
    "shown_state",
]

#: How the rejects file numbers its rows, said wherever a user meets that number.
REJECTS_NUMBERING = "(its 'row' counts data rows from 1, the header not counted)"


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


def schedule_from_options(
    window: str | None, timezone: str | None, start_at: str | None
) -> Schedule | None:
    """The --window, --timezone and --start-at of ``campaign start`` (None: none given).

    Raises:
        ValueError: naming the option that is wrong.
    """
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


def print_summary(result: EnqueueResult) -> None:
    """What ``campaign start`` did, in a few aligned lines."""
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
    if result.rejects_path and result.rejected:
        lines.append(f"           {REJECTS_NUMBERING}")
    if result.blank:
        lines.append(f"blank      {result.blank} (skipped)")
    lines.append(f"time       {result.seconds:.1f} s ({result.rows_per_s:,.0f} rows/s)")
    click.echo("\n".join(lines))


def shown_state(status: CampaignStatus) -> str:
    """The state ``status`` and ``list`` show: the stored one, except ``done`` for a running
    campaign whose file is all enqueued and whose every job has an outcome.

    Computed here from the counters: Redis keeps ``running``, which workers and ``resume``
    read, and a campaign's jobs may still arrive from elsewhere.
    """
    pending = status.count("enqueued") - status.finished
    if status.state == "running" and "enqueue_finished" in status.fields and pending <= 0:
        return "done"
    return status.state


def describe(status: CampaignStatus) -> dict[str, Any]:
    """A campaign's figures, as ``campaign status --json`` prints them."""
    fields = status.fields
    eta = status.eta_s
    return {
        "campaign_id": status.campaign_id,
        "state": shown_state(status),
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
        "funnel": status.funnel.as_dict(),
    }


#: How many failure codes ``campaign status`` names; the others are summed.
SHOWN_CODES = 3


def funnel_lines(funnel: Funnel) -> list[str]:
    """``campaign status``'s lines for what WhatsApp reported after the sends ("-": nothing
    sent, or nothing delivered, to take a share of)."""
    lines = [
        f"delivered  {funnel.delivered} ({_percent(funnel.delivered_of_sent)} of sent)",
        f"read       {funnel.read} ({_percent(funnel.read_of_sent)} of sent, "
        f"{_percent(funnel.read_of_delivered)} of delivered)",
        f"failed     {funnel.failed} ({_percent(funnel.failed_of_sent)} of sent) after sending",
    ]
    top, rest = funnel.top_codes(SHOWN_CODES)
    if top:
        named = [_code_text(failure) for failure in top]
        if rest:
            others = len(funnel.by_code) - len(top)
            named.append(f"{rest} more under {others} other code{'s' if others > 1 else ''}")
        lines.append("           " + ", ".join(named))
    lines.append(f"awaiting   {funnel.awaiting_status} sent, no delivered or failed status yet")
    return lines


def _code_text(failure: FailureCode) -> str:
    name = f" {failure.name}" if failure.name else ""
    return f"{failure.code}{name}: {failure.count}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def eta_text(seconds: float | None, state: str) -> str:
    """The ETA of a campaign in words (``done`` once every job has an outcome)."""
    if seconds is None:
        return "unknown (paused)" if state == "paused" else "unknown (no sends in the last minute)"
    if seconds <= 0:
        return "done"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """A rich progress bar over the file's bytes, with rows/s and ETA; nothing when disabled."""

    def __init__(self, total_bytes: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total_bytes
        self._bar: Any = None
        self._task: Any = None
        self._began = time.monotonic()
        self._first_rows: int | None = None

    def __enter__(self) -> Progress:
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
