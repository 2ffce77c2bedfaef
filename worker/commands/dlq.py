"""``verloop-worker dlq``: list, show, replay, purge and export dead letters.

The work is done by :mod:`worker.dlq`; this module is the command line around it (click for
the options, rich for tables and progress bars). Exit codes as everywhere: 0 done, 1 something
was left undone (a service failed, a dead letter was not replayed, a purge was declined),
2 bad usage or settings.
"""

from __future__ import annotations

import json
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

from worker.commands.context import SettingsContext
from worker.dlq import (
    DLQ_QUEUES,
    OUTCOMES,
    DeadLetterEntry,
    DeadLetterStore,
    DlqError,
    Edit,
    Filters,
    ReplayOptions,
    format_age,
    id_matches,
    parse_duration,
    parse_edit,
    short_id,
)
from worker.errors import RedisUnavailable
from worker.observability.logging import scrub_text
from worker.runtime.services import open_redis
from worker.send.ledger import Ledger

__all__ = ["dlq"]

#: Progress bars appear from this many dead letters on (and only on a terminal).
_PROGRESS_FROM = 200
#: Width of tables written to a pipe or file (a terminal's own width is used otherwise).
_PIPE_WIDTH = 200


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- options shared by the sub-commands -------------------------------------------------------
class _Duration(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _queue_names(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
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
        callback=_queue_names,
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
    click.option("--older-than", type=_Duration(), help="Dead-lettered longer ago, e.g. 2h."),
    click.option("--newer-than", type=_Duration(), help="Dead-lettered more recently, e.g. 30m."),
    click.option(
        "--id",
        "ids",
        multiple=True,
        help="This message id, or the first 8+ characters of it, as listed (repeatable).",
    ),
]


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_FILTER_OPTIONS):
        func = option(func)
    return func


def _filters(
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
def _store(obj: SettingsContext, queues: tuple[str, ...]) -> Iterator[DeadLetterStore]:
    settings = obj.settings()
    try:
        store = DeadLetterStore(settings.amqp_url.get_secret_value(), queues or DLQ_QUEUES)
    except DlqError as exc:
        raise click.ClickException(scrub_text(str(exc))) from None
    try:
        yield store
    except DlqError as exc:
        raise click.ClickException(scrub_text(str(exc))) from None
    finally:
        store.close()


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[], None] | None]:
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


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=_PIPE_WIDTH, soft_wrap=False)


def _short_queue(queue: str) -> str:
    return queue.removeprefix("verloop.")


def _where(queues: tuple[str, ...]) -> str:
    return ", ".join(f"{q}.XQ" for q in (queues or DLQ_QUEUES))


# --- the group --------------------------------------------------------------------------------
@click.group(
    name="dlq",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--env-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Settings file (dotenv format); defaults to the one given to verloop-worker.",
)
@click.pass_context
def dlq(ctx: click.Context, env_file: Path | None) -> None:
    """Inspect and handle dead letters (the <queue>.XQ queues of verloop.send,
    verloop.campaign and verloop.manage).

    \b
      dlq list [--reason TEXT] [--older-than 2h] ...   what is there, and why
      dlq show ID                                      one dead letter in full
      dlq replay --id ID [--set PATH=VALUE]            send it again (ledger-checked)
      dlq purge --reason TEXT                          delete (asks first)
      dlq export --output FILE                         JSON Lines, for your own tools

    Nothing is removed from a dead-letter queue except by replay (after RabbitMQ confirmed the
    replayed job), purge, and export --remove (after the file is written).
    """
    parent = ctx.find_object(SettingsContext)
    ctx.obj = SettingsContext(env_file or (parent.env_file if parent is not None else None))


pass_dlq = click.make_pass_decorator(SettingsContext)


# --- list ---------------------------------------------------------------------------------------
@dlq.command(name="list", short_help="List dead letters and why they died.")
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.option("--limit", type=click.IntRange(1), help="Show at most this many.")
@pass_dlq
def list_(
    obj: SettingsContext,
    /,
    queues: tuple[str, ...],
    as_json: bool,
    limit: int | None,
    **criteria: Any,
) -> None:
    """List dead letters: reason, age, attempts, actor, client, number, recipient (masked).

    Reading takes nothing away: every dead letter is back in its queue, in its place, when the
    listing ends. Dead letters RabbitMQ made itself (no reason header) are listed as
    "no reason recorded"; undecodable bodies as actor verloop.undecodable.
    """
    filters = _filters(**criteria)
    now_ms = _now_ms()
    console = _console()
    table = _table()
    shown = matched = 0
    with _store(obj, queues) as store:
        depths = store.depths()
        total = sum(depths.values())
        with _progress(total, "reading") as tick:
            for entry in store.entries(filters, on_read=tick):
                matched += 1
                if limit is not None and shown >= limit:
                    continue
                shown += 1
                if as_json:
                    click.echo(json.dumps(entry.summary(now_ms), ensure_ascii=False))
                else:
                    _add_row(table, entry, now_ms)
    if as_json:
        return
    if shown:
        console.print(table)
    per_queue = ", ".join(f"{_short_queue(q)} {n}" for q, n in depths.items())
    more = f" (showing {shown})" if shown < matched else ""
    hint = "; ids shortened (--json has them whole)" if shown else ""
    console.print(
        f"{matched} of {total} dead letters match{more}; by queue: {per_queue}{hint}",
        highlight=False,
        markup=False,
    )


def _table() -> Table:
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


def _add_row(table: Table, entry: DeadLetterEntry, now_ms: int) -> None:
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
        _short_queue(entry.queue),
        format_age(info["age_s"]),
        info["outcome"],
        "-" if info["attempts"] is None else str(info["attempts"]),
        info["actor"] or "-",
        client,
        info["to"] or "-",
        reason,
    )


# --- show ---------------------------------------------------------------------------------------
@dlq.command(short_help="Show one dead letter in full.")
@click.argument("message_id")
@click.option(
    "--queue", "queues", multiple=True, callback=_queue_names, help="Only look in this queue."
)
@pass_dlq
def show(obj: SettingsContext, message_id: str, queues: tuple[str, ...]) -> None:
    """Show the dead letter MESSAGE_ID: its reason header and its job, recipient masked.

    The short id the listing shows (a prefix of 8 or more characters) is enough.
    """
    now_ms = _now_ms()
    found: list[DeadLetterEntry] = []
    with _store(obj, queues) as store:
        for entry in store.entries(Filters()):
            if id_matches(entry.id, message_id):
                found.append(entry)
    exact = [e for e in found if e.id == message_id]
    found = exact or found
    if not found:
        raise click.ClickException(f"no dead letter {message_id!r} in {_where(queues)}")
    if len({e.id for e in found}) > 1:
        ids = ", ".join(sorted({e.id for e in found})[:10])
        raise click.UsageError(f"{message_id!r} matches several dead letters: {ids}")
    for n, entry in enumerate(found):
        if n:
            click.echo()
        click.echo(json.dumps(entry.details(now_ms), indent=2, ensure_ascii=False))


# --- replay -------------------------------------------------------------------------------------
def _edits(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> tuple[Edit, ...]:
    try:
        return tuple(parse_edit(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@dlq.command(short_help="Send dead letters again.")
@_filter_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter (of --queue).")
@click.option(
    "--set",
    "edits",
    multiple=True,
    callback=_edits,
    metavar="PATH=VALUE",
    help="Change the job first, e.g. message.template.name=order_v2 (repeatable; VALUE is "
    "JSON if it parses, else text).",
)
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option(
    "--drop-sent",
    is_flag=True,
    help="Remove dead letters the ledger says were sent (they are never replayed).",
)
@click.option(
    "--resend-uncertain",
    is_flag=True,
    help='Replay "outcome unknown" sends too (Verloop may have delivered them already).',
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_dlq
def replay(
    obj: SettingsContext,
    /,
    queues: tuple[str, ...],
    everything: bool,
    edits: tuple[Edit, ...],
    dry_run: bool,
    drop_sent: bool,
    resend_uncertain: bool,
    as_json: bool,
    **criteria: Any,
) -> None:
    """Publish dead letters again to their queue, then remove them from the dead-letter queue.

    \b
    Safety rules:
    - the original job is published (options reset, same message id), and removed from the
      dead-letter queue only once RabbitMQ confirmed it: an interruption loses nothing;
    - a send the idempotency ledger records as sent is never replayed (--drop-sent removes it);
    - an "outcome unknown" send is replayed only with --resend-uncertain;
    - an edited job is validated first; an invalid one stays where it is;
    - undecodable bodies cannot be replayed (export them).

    Exit code 1 when some matching dead letter was left in its queue.
    """
    filters = _filters(**criteria)
    if filters.empty and not everything:
        raise click.UsageError("say which dead letters to replay: filters, --id, or --all")
    settings = obj.settings()
    options = ReplayOptions(
        edits=edits, dry_run=dry_run, drop_sent=drop_sent, resend_uncertain=resend_uncertain
    )
    counts: dict[str, int] = {}
    cache = open_redis(settings)
    try:
        ledger = Ledger(cache, ttl_s=settings.ledger_ttl_s, lease_s=60)
        with _store(obj, queues) as store:
            total = sum(store.depths().values())
            with _progress(total, "replaying") as tick:
                try:
                    for result in store.replay(filters, options, ledger, on_read=tick):
                        counts[result.status] = counts.get(result.status, 0) + 1
                        if as_json:
                            click.echo(json.dumps(result.as_dict(), ensure_ascii=False))
                        else:
                            to = f" (to {result.to})" if result.to else ""
                            click.echo(f"{result.status:<12} {result.id}{to}: {result.note}")
                except RedisUnavailable as exc:
                    raise click.ClickException(
                        f"cannot read the idempotency ledger ({exc}); nothing more was "
                        "replayed, and the rest stays in the dead-letter queue"
                    ) from None
    finally:
        cache.close()
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing"
    click.echo(f"{'dry run: ' if dry_run else ''}{summary} ({_where(queues)})", err=True)
    if counts.get("skipped"):
        sys.exit(1)


# --- purge --------------------------------------------------------------------------------------
@dlq.command(short_help="Delete dead letters (asks first).")
@_filter_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter (of --queue).")
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Do not ask for confirmation.")
@pass_dlq
def purge(
    obj: SettingsContext,
    /,
    queues: tuple[str, ...],
    everything: bool,
    assume_yes: bool,
    **criteria: Any,
) -> None:
    """Delete the matching dead letters for good; the others stay in their queue (in their
    order). Asks "Purge N dead letters ...? [y/N]" unless --yes.

    The dead letters counted are held while you answer, so exactly those are deleted.
    """
    filters = _filters(**criteria)
    if filters.empty and not everything:
        raise click.UsageError("say which dead letters to purge: filters, --id, or --all")
    with _store(obj, queues) as store:
        total = sum(store.depths().values())
        chosen: list[tuple[Any, int]] = []
        per_queue: dict[str, int] = {}
        with _progress(total, "reading") as tick:
            for held in store.held(filters, on_read=tick):
                chosen.append((held.channel, held.delivery_tag))
                per_queue[held.entry.queue] = per_queue.get(held.entry.queue, 0) + 1
        if not chosen:
            store.release()
            click.echo(f"no dead letters match in {_where(queues)}; nothing purged")
            return
        where = ", ".join(f"{n} from {q}.XQ" for q, n in per_queue.items())
        if not assume_yes and not click.confirm(
            f"Purge {len(chosen)} dead letters ({where})?", default=False
        ):
            store.release()
            click.echo("nothing purged")
            sys.exit(1)
        removed = DeadLetterStore.remove(chosen)
        store.release()
    click.echo(f"purged {removed} dead letters ({where})")


# --- export -------------------------------------------------------------------------------------
@dlq.command(short_help="Write dead letters as JSON Lines.")
@_filter_options
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write to this file, readable by you only (mode 0600; a file or symlink already there "
    "is replaced, not written through). Default: standard output.",
)
@click.option(
    "--remove",
    is_flag=True,
    help="Then delete the exported dead letters (only after the file is written and synced).",
)
@click.option("--all", "everything", is_flag=True, help="With --remove and no filters: all.")
@pass_dlq
def export(
    obj: SettingsContext,
    /,
    queues: tuple[str, ...],
    output: Path | None,
    remove: bool,
    everything: bool,
    **criteria: Any,
) -> None:
    """Write the matching dead letters (all by default) as JSON Lines: every header field
    plus the original body, as text when it is UTF-8 JSON, else base64 ("body_encoding").

    Recipients are NOT masked in the export: it is the same data the queue holds, for your own
    tools. Nothing is removed unless --remove.
    """
    filters = _filters(**criteria)
    if remove and filters.empty and not everything:
        raise click.UsageError("--remove without filters needs --all")
    if remove and output is None:
        raise click.UsageError("--remove needs --output (the file must be written first)")
    count = 0
    with _store(obj, queues) as store:
        total = sum(store.depths().values())
        chosen: list[tuple[Any, int]] = []
        with _open_output(output) as out, _progress(total, "exporting") as tick:
            for held in store.held(filters, on_read=tick):
                out.write(json.dumps(held.entry.export_record(), ensure_ascii=False) + "\n")
                count += 1
                if remove:
                    chosen.append((held.channel, held.delivery_tag))
        # The file is closed, flushed and synced here.
        removed = DeadLetterStore.remove(chosen) if remove else 0
        store.release()
    target = str(output) if output is not None else "standard output"
    gone = f"; removed {removed} from the dead-letter queues" if remove else ""
    click.echo(f"exported {count} dead letters to {target}{gone}", err=True)


@contextmanager
def _open_output(output: Path | None) -> Iterator[IO[str]]:
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
