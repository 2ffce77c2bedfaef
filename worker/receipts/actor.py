"""The ``record_statuses`` handler: statuses of sent messages, each recorded once.

1. find each status's send by its wamid (:mod:`worker.receipts.links`; one round trip for all);
   a status whose send is not found yet may be early (its send is still being recorded): those
   go back to wait, in a copy of the job holding only them, until they are
   ``STATUS_UNKNOWN_GRACE_S`` old; then they are counted as unknown and logged, never an error;
2. record the others (one script each, all in one round trip): each (wamid, status) once, the
   best status kept, the campaign's funnel moved, the event of a new delivered, read or failed
   status queued (``status.<status>.<client>.<phone>.<campaign>``);
3. a new failed status's code gets the limiter's reaction (:meth:`SendGate.react_to_status`).

Redis down: the whole job waits and looks again (a status recorded before is then a duplicate).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from worker.errors import Deferred, RedisUnavailable
from worker.finish.outcome import JobOutcome, JobRun, Outcome, StatusFacts
from worker.receipts.links import Link, StatusRecord
from worker.receipts.models import FUNNEL_STATUSES, STATUS_ACTOR, StatusEntry, StatusJob
from worker.send.gate import held_while_redis_is_down

if TYPE_CHECKING:
    from worker.runtime.services import Services

__all__ = ["EARLY_RECHECK_S", "EVENT_STATUSES", "record_statuses", "status_event"]

#: A status whose send is not recorded yet looks again after about this long.
EARLY_RECHECK_S = 2.0
#: The statuses that get an event (``sent`` says what the send's own event said).
EVENT_STATUSES = frozenset({"delivered", "read", "failed"})


def record_statuses(services: Services, job: StatusJob, run: JobRun) -> JobOutcome:
    """Record a job's statuses (see the module docstring)."""
    run.statuses = [_facts(entry) for entry in job.statuses]
    try:
        links = services.receipts.links([entry.wamid for entry in job.statuses])
        early = _settle_unknown(services, job, run.statuses, links)
        found = [
            (entry, facts, link)
            for entry, facts, link in zip(job.statuses, run.statuses, links, strict=True)
            if link is not None
        ]
        records, direct = _records(services, run, found)
        effects = services.receipts.record(records) if records else []
    except RedisUnavailable as exc:
        for facts in run.statuses:
            facts.effect = None
        raise held_while_redis_is_down(exc, "redis_unavailable") from None
    events = []
    for (_, facts, link), (effect, _), event in zip(found, effects, direct, strict=True):
        facts.effect = effect  # "unknown" if its link expired in between
        if effect != "recorded":
            continue
        if event is not None:
            events.append(event)
        if facts.status == "failed":
            services.gate.react_to_status(link.phone_id, link.to, facts.code)
    if early:
        rest: dict[str, Any] = {"statuses": early}
        if job.metadata is not None:
            rest["metadata"] = job.metadata
        raise Deferred(
            EARLY_RECHECK_S * random.uniform(1.0, 1.25) + 0.05,
            f"{len(early)} of the statuses have no recorded send yet; looking again",
            kind="status_early",
            kwargs=rest,
        )
    return JobOutcome(Outcome.DONE, quiet=True, events=tuple(events))


def _facts(entry: StatusEntry) -> StatusFacts:
    known = entry.status == "failed" or entry.status in FUNNEL_STATUSES
    return StatusFacts(
        wamid=entry.wamid,
        status=entry.status if known else "other",
        at=entry.timestamp,
        code=str(entry.errors[0].code) if entry.errors else None,
    )


def _settle_unknown(
    services: Services,
    job: StatusJob,
    statuses: list[StatusFacts],
    links: list[Link | None],
) -> list[dict[str, Any]]:
    """Mark the statuses no send is known for: still young (returned, as kwargs, to be looked
    for again), or unknown for good."""
    early = []
    grace_s = services.settings.status_unknown_grace_s
    now = time.time()
    for entry, facts, link in zip(job.statuses, statuses, links, strict=True):
        if link is not None:
            continue
        if now - entry.timestamp < grace_s:
            facts.effect = "waiting"
            early.append(entry.model_dump(mode="json", exclude_defaults=True))
        else:
            facts.effect = "unknown"
    return early


def _records(
    services: Services, run: JobRun, found: list[tuple[StatusEntry, StatusFacts, Link]]
) -> tuple[list[StatusRecord], list[tuple[Mapping[str, Any], Mapping[str, Any]] | None]]:
    """What to record for each status with a send, and the event to publish directly for each
    that has one when events do not go through the outbox."""
    outbox = services.outbox  # None: events are off, or published directly
    events_on = bool(services.settings.outcome_exchange)
    records: list[StatusRecord] = []
    direct: list[tuple[Mapping[str, Any], Mapping[str, Any]] | None] = []
    for entry, facts, link in found:
        facts.send_lane, facts.phone_id = link.lane, link.phone_id
        facts.lag_s = max(0.0, facts.at - link.sent_at)
        wanted = events_on and facts.status in EVENT_STATUSES
        event = status_event(run, entry, facts, link) if wanted else None
        queued = None
        if event is not None and outbox is not None:
            queued = (outbox.stream, outbox.max_len, outbox.entry(*event))
        records.append(StatusRecord(entry.wamid, link, facts.status, facts.code, queued))
        direct.append(event if outbox is None else None)
    return records, direct


def status_event(
    run: JobRun, entry: StatusEntry, facts: StatusFacts, link: Link
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields, extra) of one status's event: the send's ids, the status, and for a failure
    its errors; the full recipient goes in ``extra`` as for a send's event."""
    fields: dict[str, Any] = {
        "message_id": run.ctx.message_id,
        "actor": STATUS_ACTOR,
        "outcome": "recorded",
        "status": facts.status,
        "status_at": facts.at,
        "wamid": entry.wamid,
        "verloop_message_id": entry.wamid,
        "send_message_id": link.message_id,
        "client_id": link.client_id,
        "phone_id": link.phone_id,
        "campaign_id": link.campaign_id,
        "idempotency_key": link.idempotency_key,
        "lane": link.lane,
        "code": facts.code,
    }
    extra: dict[str, Any] = {"to": link.to}
    if entry.errors:
        extra["errors"] = [error.model_dump(exclude_none=True) for error in entry.errors]
    return {k: v for k, v in fields.items() if v is not None}, extra
