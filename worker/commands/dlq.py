"""``verloop-worker dlq``: list, show, replay, purge and export dead letters.

The command line around :mod:`worker.dlq`; shared options, tables and the export file are in
:mod:`worker.commands.dlq_support`. Exit code 1 also when something was left undone (a dead
letter not replayed, a purge declined).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from worker.commands import dlq_support as support
from worker.commands.context import SettingsContext, current_env_file, current_settings
from worker.dlq import DeadLetterEntry, DeadLetterStore, Edit, Filters, ReplayOptions, id_matches
from worker.errors import RedisUnavailable
from worker.runtime.services import open_redis
from worker.send.ledger import Ledger

__all__ = ["dlq"]


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
    ctx.obj = SettingsContext(current_env_file(env_file))


# --- list ---------------------------------------------------------------------------------------
@dlq.command(name="list", short_help="List dead letters and why they died.")
@support.filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.option("--limit", type=click.IntRange(1), help="Show at most this many.")
def list_dead_letters(
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
    filters = support.filters_from_options(**criteria)
    now_ms = support.now_ms()
    console = support.console()
    table = support.table()
    shown = matched = 0
    with support.store(queues) as store:
        depths = store.depths()
        total = sum(depths.values())
        with support.progress(total, "reading") as tick:
            for entry in store.entries(filters, on_read=tick):
                matched += 1
                if limit is not None and shown >= limit:
                    continue
                shown += 1
                if as_json:
                    click.echo(json.dumps(entry.summary(now_ms), ensure_ascii=False))
                else:
                    support.add_row(table, entry, now_ms)
    if as_json:
        return
    if shown:
        console.print(table)
    per_queue = ", ".join(f"{support.short_queue(q)} {n}" for q, n in depths.items())
    more = f" (showing {shown})" if shown < matched else ""
    hint = "; ids shortened (--json has them whole)" if shown else ""
    console.print(
        f"{matched} of {total} dead letters match{more}; by queue: {per_queue}{hint}",
        highlight=False,
        markup=False,
    )


# --- show ---------------------------------------------------------------------------------------
@dlq.command(short_help="Show one dead letter in full.")
@click.argument("message_id")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    callback=support.queue_names,
    help="Only look in this queue.",
)
def show(message_id: str, queues: tuple[str, ...]) -> None:
    """Show the dead letter MESSAGE_ID: its reason header and its job, recipient masked.

    The short id the listing shows (a prefix of 8 or more characters) is enough.
    """
    now_ms = support.now_ms()
    found: list[DeadLetterEntry] = []
    with support.store(queues) as store:
        for entry in store.entries(Filters()):
            if id_matches(entry.id, message_id):
                found.append(entry)
    exact = [e for e in found if e.id == message_id]
    found = exact or found
    if not found:
        raise click.ClickException(f"no dead letter {message_id!r} in {support.where(queues)}")
    if len({e.id for e in found}) > 1:
        ids = ", ".join(sorted({e.id for e in found})[:10])
        raise click.UsageError(f"{message_id!r} matches several dead letters: {ids}")
    for n, entry in enumerate(found):
        if n:
            click.echo()
        click.echo(json.dumps(entry.details(now_ms), indent=2, ensure_ascii=False))


@dlq.command(short_help="Send dead letters again.")
@support.filter_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter (of --queue).")
@click.option(
    "--set",
    "edits",
    multiple=True,
    callback=support.edits_option,
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
def replay(
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
    filters = support.filters_from_options(**criteria)
    if filters.empty and not everything:
        raise click.UsageError("say which dead letters to replay: filters, --id, or --all")
    settings = current_settings()
    options = ReplayOptions(
        edits=edits, dry_run=dry_run, drop_sent=drop_sent, resend_uncertain=resend_uncertain
    )
    counts: dict[str, int] = {}
    cache = open_redis(settings)
    try:
        ledger = Ledger(cache, ttl_s=settings.ledger_ttl_s, lease_s=60)
        with support.store(queues) as store:
            total = sum(store.depths().values())
            with support.progress(total, "replaying") as tick:
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
    click.echo(f"{'dry run: ' if dry_run else ''}{summary} ({support.where(queues)})", err=True)
    if counts.get("skipped"):
        sys.exit(1)


# --- purge --------------------------------------------------------------------------------------
@dlq.command(short_help="Delete dead letters (asks first).")
@support.filter_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter (of --queue).")
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Do not ask for confirmation.")
def purge(
    queues: tuple[str, ...],
    everything: bool,
    assume_yes: bool,
    **criteria: Any,
) -> None:
    """Delete the matching dead letters for good; the others stay in their queue (in their
    order). Asks "Purge N dead letters ...? [y/N]" unless --yes.

    The dead letters counted are held while you answer, so exactly those are deleted.
    """
    filters = support.filters_from_options(**criteria)
    if filters.empty and not everything:
        raise click.UsageError("say which dead letters to purge: filters, --id, or --all")
    with support.store(queues) as store:
        total = sum(store.depths().values())
        chosen: list[tuple[Any, int]] = []
        per_queue: dict[str, int] = {}
        with support.progress(total, "reading") as tick:
            for held in store.held(filters, on_read=tick):
                chosen.append((held.channel, held.delivery_tag))
                per_queue[held.entry.queue] = per_queue.get(held.entry.queue, 0) + 1
        if not chosen:
            store.release()
            click.echo(f"no dead letters match in {support.where(queues)}; nothing purged")
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
@support.filter_options
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
def export(
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
    filters = support.filters_from_options(**criteria)
    if remove and filters.empty and not everything:
        raise click.UsageError("--remove without filters needs --all")
    if remove and output is None:
        raise click.UsageError("--remove needs --output (the file must be written first)")
    count = 0
    with support.store(queues) as store:
        total = sum(store.depths().values())
        chosen: list[tuple[Any, int]] = []
        with support.open_output(output) as out, support.progress(total, "exporting") as tick:
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
