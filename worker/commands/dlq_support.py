"""What the ``verloop-worker dlq`` sub-commands share: the filter options, the store opened
from the settings, progress bars, the listing's table, and the owner-only export file."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.commands.context import current_settings
from worker.dlq import (
    DLQ_QUEUES,
    OUTCOMES,
    DeadLetterEntry,
    DeadLetterStore,
    DlqError,
    Edit,
    Filters,
    format_age,
    parse_duration,
    parse_edit,
    short_id,
)
from worker.observability.logging import scrub_text

__all__ = [
    "Duration",
    "add_row",
    "console",
    "edits_option",
    "filter_options",
    "filters_from_options",
    "now_ms",
    "open_output",
    "progress",
    "queue_names",
    "short_queue",
    "store",
    "table",
    "where",
]

#: Progress bars appear from this many dead letters on (and only on a terminal).
_PROGRESS_FROM = 200
#: Width of tables written to a pipe or file (a terminal's own width is used otherwise).
_PIPE_WIDTH = 200


def now_ms() -> int:
    return int(time.time() * 1000)


# --- options shared by the sub-commands -------------------------------------------------------
class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def queue_names(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """``send``, ``verloop.send`` and ``verloop.send.XQ`` all name the same queue."""
    names = []
    for value in values:
        name = value.removesuffix(".XQ")
        if not name.startswith("verloop."):
            name = "verloop." + name
        if name not in DLQ_QUEUES:
            raise click.BadParameter(f"{value!r} is not one of {', '.join(DLQ_QUEUES)}")
        names.append(name)
    return tuple(names)


_FILTER_OPTIONS = [
    click.option(
        "--queue",
        "queues",
        multiple=True,
        callback=queue_names,
        help="Only this queue's dead letters: send, campaign or manage (repeatable).",
    ),
    click.option("--reason", help="Reason contains this text (case-insensitive)."),
    click.option(
        "--outcome",
        "outcomes",
        multiple=True,
        type=click.Choice(OUTCOMES),
        help="This outcome (repeatable); unknown: no reason recorded.",
    ),
    click.option("--client-id", help="Jobs of this Verloop client."),
    click.option("--phone-id", help="Jobs from this sending number (Verloop phone id)."),
    click.option("--campaign", help="Jobs of this campaign id."),
    click.option("--to", "recipient", help="Jobs to this recipient (E.164)."),
    click.option("--older-than", type=Duration(), help="Dead-lettered longer ago, e.g. 2h."),
    click.option("--newer-than", type=Duration(), help="Dead-lettered more recently, e.g. 30m."),
    click.option(
        "--id",
        "ids",
        multiple=True,
        help="This message id, or the first 8+ characters of it, as listed (repeatable).",
    ),
]


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_FILTER_OPTIONS):
        func = option(func)
    return func


def filters_from_options(
    reason: str | None,
    outcomes: tuple[str, ...],
    client_id: str | None,
    phone_id: str | None,
    campaign: str | None,
    recipient: str | None,
    older_than: float | None,
    newer_than: float | None,
    ids: tuple[str, ...],
) -> Filters:
    if recipient is not None:
        from worker.jobs.phones import normalize_e164

        try:
            recipient = normalize_e164(recipient)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--to") from None
    return Filters(
        reason=reason,
        outcomes=frozenset(outcomes),
        client_id=client_id,
        phone_id=phone_id,
        campaign_id=campaign,
        recipient=recipient,
        older_than_s=older_than,
        newer_than_s=newer_than,
        ids=frozenset(ids),
    )


@contextmanager
def store(queues: tuple[str, ...]) -> Iterator[DeadLetterStore]:
    """The dead-letter store of ``queues`` (all by default); its errors exit 1, scrubbed."""
    settings = current_settings()
    try:
        store = DeadLetterStore(
            settings.amqp_url.get_secret_value(),
            queues or DLQ_QUEUES,
            queue_type=settings.queue_type,
        )
    except DlqError as exc:
        raise click.ClickException(scrub_text(str(exc))) from None
    try:
        yield store
    except DlqError as exc:
        raise click.ClickException(scrub_text(str(exc))) from None
    finally:
        store.close()


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[], None] | None]:
    """A rich progress bar on standard error when it is a terminal and there is a lot to do;
    yields the callback to call per dead letter read (or None)."""
    if total < _PROGRESS_FROM or not sys.stderr.isatty():
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)


def console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=_PIPE_WIDTH, soft_wrap=False)


def short_queue(queue: str) -> str:
    return queue.removeprefix("verloop.")


def where(queues: tuple[str, ...]) -> str:
    return ", ".join(f"{q}.XQ" for q in (queues or DLQ_QUEUES))


def table() -> Table:
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True)
    table.add_column("id", no_wrap=True)
    table.add_column("queue", no_wrap=True)
    table.add_column("age", no_wrap=True, justify="right")
    table.add_column("outcome", overflow="fold")
    table.add_column("tries", justify="right")
    table.add_column("actor", overflow="fold")
    table.add_column("client/phone", overflow="fold")
    table.add_column("to", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1, min_width=16)
    return table


def add_row(table: Table, entry: DeadLetterEntry, now_ms: int) -> None:
    info = entry.summary(now_ms)
    status = " ".join(
        str(x) for x in (info["http_status"], info["code"] and f"code {info['code']}") if x
    )
    reason = f"{info['reason']} [{status}]" if status else info["reason"]
    client = "/".join(x for x in (info["client_id"], info["phone_id"]) if x) or "-"
    if info["campaign_id"]:
        client += f" (campaign {info['campaign_id']})"
    table.add_row(
        short_id(info["id"]),
        short_queue(entry.queue),
        format_age(info["age_s"]),
        info["outcome"],
        "-" if info["attempts"] is None else str(info["attempts"]),
        info["actor"] or "-",
        client,
        info["to"] or "-",
        reason,
    )


def edits_option(
    _: click.Context, __: click.Parameter, values: tuple[str, ...]
) -> tuple[Edit, ...]:
    try:
        return tuple(parse_edit(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@contextmanager
def open_output(output: Path | None) -> Iterator[IO[str]]:
    """The export file, readable by its owner only (it holds unmasked recipients and bodies).

    It is written as a new file (mode 0600 whatever the umask) next to ``output`` and renamed
    onto it once complete and synced. Whatever was at ``output`` is replaced, never written
    through: a symlink planted there cannot send the export elsewhere, a file that existed
    keeps neither its looser mode nor its readers (one that had it open sees none of the
    export), and an export cut short leaves ``output`` as it was.
    """
    if output is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    directory = output.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, output)
    except BaseException as exc:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(exc, OSError) and exc.filename in (temporary, str(output)):
            raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
        raise
    # The rename is durable before --remove deletes anything.
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
