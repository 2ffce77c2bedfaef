"""The actors: each job's path, step by step, top to bottom.

``send_message``:
  1. validate the job (:func:`worker.jobs.models.parse_job`)  → invalid: dead letter, no retry
  2. its ``options.eta`` not reached yet                → re-delayed, no retry used
  3. a campaign job: its campaign's state and window   → cancelled: acknowledged, not sent;
                                                          paused / outside window: re-delayed
  4. find the phone token (file → memory → Redis → Verloop)
  5. wait for the number's slot (:mod:`worker.limits`)  → too far: re-delayed, no retry used
  6. claim the job's ledger entry (:mod:`worker.send.ledger`) → already sent: acknowledged as
                                                          ``suppressed``, not sent again
  7. call Verloop's send endpoint                       → clear failure: claim released, retry
                                                          or dead letter; no answer: the claim is
                                                          uncertain (UNCERTAIN_SEND_POLICY)
  8. record the send in the ledger, with its campaign's progress and its outcome event
     (:mod:`worker.finish.outbox`), in one round trip; nothing after Verloop's acceptance can turn
     the job into a retry
  9. on a rejected token: refresh it once and send again; rejected again: dead letter

Failures are raised, not handled here: :mod:`worker.finish.middleware` retries or dead-letters
them, and
writes the job's one log line and outcome event, to which each step adds its fields.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import structlog

from worker.campaigns.store import CampaignRef
from worker.campaigns.window import seconds_until_open
from worker.errors import (
    Deferred,
    JobFailure,
    OutcomeUnknown,
    PermanentFailure,
    RedisUnavailable,
    TokenInvalid,
    TransientFailure,
)
from worker.finish.middleware import JobRecord, current_job
from worker.jobs.models import (
    ACTOR_QUEUES,
    ID_PATTERN,
    Job,
    ListClientsJob,
    RefreshClientTokensJob,
    RefreshPhoneTokenJob,
    SendMessageJob,
    parse_job,
)
from worker.jobs.phones import mask_phone
from worker.limits import Lane
from worker.runtime.services import Lifecycle, Services
from worker.send.gate import HOLD_REASON, held_while_redis_is_down
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings
from worker.verloop.client_list import client_phones

_log = structlog.get_logger()

#: A job due within this long of now runs now (a delay round trip would take about as long).
SCHEDULE_SLACK_S = 0.05
_IDENTIFIER = re.compile(ID_PATTERN)

__all__ = ["list_clients", "refresh_phone_token", "register_actors", "send_message"]


def send_message(services: Services, job: SendMessageJob, record: JobRecord) -> None:
    """Send one WhatsApp message (see the module docstring for the steps)."""
    lane: Lane = "campaign" if record.fields.get("lane") == "campaign" else "transactional"
    try:
        if job.campaign_id is not None and not _campaign_allows(
            services, CampaignRef(job.client_id, job.campaign_id), record
        ):
            return
        tokens = services.phone_tokens
        token, source = tokens.get(job.client_id, job.phone_id)
        record.bind(token_source=source)
        try:
            _paced_send(services, token, job, lane, record)
        except TokenInvalid:
            token, source = tokens.refresh(job.client_id, job.phone_id, rejected=token)
            record.bind(token_source=source, token_refreshed=True)
            try:
                _paced_send(services, token, job, lane, record)
            except TokenInvalid as exc:
                raise PermanentFailure(
                    "Verloop rejected the phone token again after refreshing it; check the "
                    "number's token in Verloop (Client Details → Generate Token)",
                    http_status=exc.details.http_status,
                    code=exc.details.code,
                ) from None
    except RedisUnavailable as exc:
        raise held_while_redis_is_down(exc, "redis_unavailable") from None


def _campaign_allows(services: Services, campaign: CampaignRef, record: JobRecord) -> bool:
    """Whether a campaign job may be sent now; False if its campaign was cancelled.

    Raises:
        Deferred: the campaign is paused, has not started, or is outside its send window.
    """
    state, window, start_at = services.campaigns.gate(campaign)
    if state == "cancelled":
        record.bind(outcome="cancelled")
        return False
    settings = services.settings
    if state == "paused":
        raise Deferred(settings.campaign_pause_recheck_s, "campaign paused", kind="campaign_paused")
    now = time.time()
    if start_at is not None and now < start_at:
        raise Deferred(start_at - now, "campaign has not started yet", kind="campaign_scheduled")
    if window is not None:
        wait = seconds_until_open(window, now)
        if wait > 0:
            raise Deferred(
                wait,
                f"outside the send window {window[0]}-{window[1]} {window[2]}",
                kind="send_window",
            )
    return True


def _takes_over_uncertain(settings: Settings, lane: Lane) -> bool:
    policy = settings.uncertain_send_policy
    return policy == "resend" or (policy == "by_lane" and lane == "transactional")


def _paced_send(
    services: Services, token: str, job: SendMessageJob, lane: Lane, record: JobRecord
) -> None:
    """One call to Verloop in the number's next slot, unless the ledger says it was sent
    (then the outcome is ``suppressed``). The ledger claim is released if the call clearly
    failed, marked uncertain if its outcome is unknown, and recorded as sent if it went out."""
    # The slot first: a job re-delayed for its slot, or held while Redis is down, has not
    # claimed anything, so no claim of a call that never started can look uncertain later.
    slot = services.gate.admit(job.phone_id, job.to, lane)
    if slot.waited_s > 0.0005:
        record.bind(limit_wait_ms=round(slot.waited_s * 1000, 1))
    key = job.ledger_key(record.fields["message_id"])
    owner = f"{threading.get_ident()}:{record.fields['message_id']}"
    ledger = services.ledger
    claim = ledger.claim(
        key,
        owner,
        take_over_uncertain=_takes_over_uncertain(services.settings, lane),
        holds=slot.holds,
    )
    if claim.state == "sent":
        record.bind(outcome="suppressed", verloop_message_id=claim.detail or None)
        return
    if claim.state == "held":
        # The slot came from a lease, and this recipient (or the number) is on hold.
        raise Deferred(claim.retry_in_s, HOLD_REASON, kind="recipient_cooling")
    if claim.state == "busy":
        # Usually the other delivery is done in a moment: look again soon, not at lease end.
        raise Deferred(
            min(claim.retry_in_s, 1.0) + 0.25,
            "another delivery of this job is being sent right now",
            kind="in_flight",
        )
    if claim.state == "uncertain":
        raise _outcome_unknown("an earlier delivery of this job")
    if claim.after_uncertain:
        record.bind(resent_after_uncertain=True)
    try:
        result = services.verloop.send_message(
            token, job.request_body(), idempotency_key=job.idempotency_key
        )
    except (TokenInvalid, PermanentFailure) as exc:
        # Verloop answered, and did not send it.
        _release(ledger, key, owner)
        if not isinstance(exc, TokenInvalid):
            services.gate.react(job.phone_id, job.to, lane, exc)
        raise
    except OutcomeUnknown as exc:
        _mark_uncertain(ledger, key, owner)
        record.bind(outcome_unknown=exc.details.reason)
        if _takes_over_uncertain(services.settings, lane):
            raise  # retried; the retry finds the uncertain claim and takes it over
        raise _outcome_unknown("this delivery") from None
    except TransientFailure as exc:
        # Verloop was not reached, or answered and did not send it (5xx, 429...).
        _release(ledger, key, owner)
        services.gate.react(job.phone_id, job.to, lane, exc)
        raise
    except BaseException:
        # Not foreseen (a bug, an interruption): the request may have been written.
        _mark_uncertain(ledger, key, owner)
        raise
    record.bind(
        outcome="sent", verloop_message_id=result.message_id, http_status=result.http_status
    )
    campaign = None if job.campaign_id is None else CampaignRef(job.client_id, job.campaign_id)
    _record_sent(services, key, result.message_id, campaign, record)


def _outcome_unknown(whose: str) -> PermanentFailure:
    return PermanentFailure(
        f"outcome unknown: {whose} reached Verloop and no answer came back (or its worker "
        "stopped mid-call), so it may have been delivered; if it was not, replay it with "
        "`verloop-worker dlq replay --resend-uncertain`"
    )


def _record_sent(
    services: Services,
    key: LedgerKey,
    message_id: str | None,
    campaign: CampaignRef | None,
    record: JobRecord,
) -> None:
    """Write down a message Verloop accepted: the ledger entry first, with its campaign's
    progress and its outcome event in the same round trip.

    Never raises: the message is sent, and nothing here may turn that into a retry (a resend).
    Whatever fails is logged and counted, and the rest still happens.
    """
    also: list[tuple[Any, ...]] = []
    steps: list[str] = []
    if campaign is not None:
        commands = services.campaigns.outcome_commands(campaign, "sent")
        also += commands
        steps += ["campaign"] * len(commands)
    outbox = services.outbox
    if outbox is not None:
        try:
            also.append(outbox.command(record.fields, record.extra))
            steps.append("event")
        except Exception:  # noqa: BLE001 - an event that cannot be built must not undo the send
            _after_send_failed(record, "event", "the outcome event could not be encoded")
            record.event_queued = True  # nothing more to try: the reporter must not retry it
    try:
        replies = services.ledger.mark_sent(key, message_id, also=also)
    except Exception:  # noqa: BLE001 - Redis down or anything else: logged, never a resend
        # Sent, but not written down: acknowledging is right (sending again is not). The ledger
        # writes the record with its next claim that reaches Redis; a redelivery before that
        # finds the claim and treats it as an uncertain outcome.
        record.bind(ledger="not_recorded")
        _after_send_failed(record, "ledger", "a sent message could not be recorded in the ledger")
        return
    failed = {
        step for step, reply in zip(steps, replies, strict=True) if isinstance(reply, Exception)
    }
    record.campaign_counted = campaign is not None and "campaign" not in failed
    record.event_queued = record.event_queued or ("event" in steps and "event" not in failed)
    for step in sorted(failed):
        _after_send_failed(record, step, f"Redis refused the sent message's {step} update")


def _after_send_failed(record: JobRecord, step: str, what: str) -> None:
    record.after_send_failures.append(step)
    _log.error(what + "; the message was sent and is not sent again", step=step)


def _release(ledger: Ledger, key: LedgerKey, owner: str) -> None:
    try:
        ledger.release(key, owner)
    except RedisUnavailable:
        # The claim's lease runs out by itself; until then another delivery waits for it.
        _log.warning("could not release a ledger claim: Redis did not answer")


def _mark_uncertain(ledger: Ledger, key: LedgerKey, owner: str) -> None:
    try:
        ledger.mark_uncertain(key, owner)
    except RedisUnavailable:
        # The claim's lease runs out by itself, which makes it uncertain just the same.
        _log.warning("could not mark a ledger claim uncertain: Redis did not answer")


def list_clients(services: Services, job: ListClientsJob, record: JobRecord) -> None:
    """List the partner's clients and their numbers; the list goes out in the job's event."""
    clients = client_phones(services.verloop.list_clients(services.system_token.get()))
    record.bind(outcome="done", clients=len(clients))
    record.extra["result"] = {"clients": clients}


def refresh_phone_token(services: Services, job: RefreshPhoneTokenJob, record: JobRecord) -> None:
    """Forget the cached token of one number and fetch it again from Verloop."""
    _, source = services.phone_tokens.refresh(job.client_id, job.phone_id, rejected=None)
    record.bind(outcome="done", token_source=source)
    record.extra["result"] = {"phones": [{"phone_id": job.phone_id, "refreshed": True}]}


def refresh_client_tokens(
    services: Services, job: RefreshClientTokensJob, record: JobRecord
) -> None:
    """Refresh the token of every number of one client, as ``list_clients`` lists them.

    One number failing does not stop the others; the result says which were refreshed. If
    none could be, the job fails with the first reason (and is retried or dead-lettered).
    """
    listed = client_phones(services.verloop.list_clients(services.system_token.get()))
    phone_ids = next((c["phone_ids"] for c in listed if c["client_id"] == job.client_id), None)
    if phone_ids is None:
        raise PermanentFailure(f"Verloop's client list has no client {job.client_id!r}")
    results: list[dict[str, Any]] = []
    first_failure: JobFailure | None = None
    for phone_id in phone_ids:
        try:
            services.phone_tokens.refresh(job.client_id, phone_id, rejected=None)
            results.append({"phone_id": phone_id, "refreshed": True})
        except JobFailure as exc:
            first_failure = first_failure or exc
            results.append({"phone_id": phone_id, "refreshed": False, "reason": exc.details.reason})
    if phone_ids and first_failure is not None and not any(r["refreshed"] for r in results):
        raise first_failure
    refreshed = sum(1 for r in results if r["refreshed"])
    record.bind(outcome="done", client_id=job.client_id, phones=len(results), refreshed=refreshed)
    record.extra["result"] = {"phones": results}


_Handler = Callable[[Services, Any, JobRecord], None]
_HANDLERS: dict[str, _Handler] = {
    "send_message": send_message,
    "list_clients": list_clients,
    "refresh_phone_token": refresh_phone_token,
    "refresh_client_tokens": refresh_client_tokens,
}


def _describe(record: JobRecord, job: Job) -> None:
    """Add the job's identifying fields to its log line (the recipient masked)."""
    if isinstance(job, SendMessageJob):
        record.bind(
            client_id=job.client_id,
            phone_id=job.phone_id,
            to=mask_phone(job.to),
            message_type=job.message.type,
            idempotency_key=job.idempotency_key,
            campaign_id=job.campaign_id,
        )
        record.extra["to"] = job.to
    elif isinstance(job, RefreshPhoneTokenJob):
        record.bind(client_id=job.client_id, phone_id=job.phone_id)
    if job.metadata is not None:
        record.bind(metadata=job.metadata)
        record.extra["metadata"] = job.metadata


def _describe_unvalidated(record: JobRecord, kwargs: dict[str, Any]) -> None:
    """Name the job in its log line and event even if it turns out to be invalid: the ids that
    are well-formed (an id that is not goes nowhere; the dead letter's reason names it)."""
    for key in ("client_id", "phone_id"):
        value = kwargs.get(key)
        if isinstance(value, str) and _IDENTIFIER.match(value):
            record.bind(**{key: value})
    to = kwargs.get("to")
    if isinstance(to, str) and to.isascii() and to.isprintable():
        record.bind(to=mask_phone(to[:32]))


def _wait_for_schedule(record: JobRecord) -> None:
    """A job whose ``options.eta`` has not come yet goes back to wait for it, in hops through
    the delay queue (each under RabbitMQ's consumer timeout), without using a retry."""
    if record.not_before_ms is None:
        return
    wait_s = record.not_before_ms / 1000 - time.time()
    if wait_s > SCHEDULE_SLACK_S:
        when = dt.datetime.fromtimestamp(record.not_before_ms / 1000, dt.UTC)
        raise Deferred(
            wait_s,
            f"scheduled for {when.isoformat(timespec='seconds')} (options.eta)",
            kind="scheduled",
        )


def register_actors(
    broker: dramatiq.Broker, lifecycle: Lifecycle
) -> dict[str, dramatiq.Actor[..., None]]:
    """Declare every actor on ``broker``; each validates its job, then runs its handler."""

    def make(name: str, handler: _Handler) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            record = current_job()
            _describe_unvalidated(record, kwargs)
            job = parse_job(name, args, kwargs)
            _describe(record, job)
            _wait_for_schedule(record)
            handler(lifecycle.services, job, record)

        run.__name__ = name
        run.__qualname__ = name
        return run

    return {
        name: dramatiq.Actor(
            make(name, handler),
            broker=broker,
            actor_name=name,
            queue_name=ACTOR_QUEUES[name],
            priority=0,
            options={},
        )
        for name, handler in _HANDLERS.items()
    }
