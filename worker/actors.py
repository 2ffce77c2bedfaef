"""The actors: each job's path, step by step, top to bottom.

``send_message``:
  1. validate the job (:func:`worker.jobs.parse_job`)  → invalid: dead letter, no retry
  2. a campaign job: its campaign's state and window   → cancelled: acknowledged, not sent;
                                                          paused / outside window: re-delayed
  3. find the phone token (file → memory → Redis → Verloop)
  4. claim the job's ledger entry (:mod:`worker.ledger`) → already sent: acknowledged as
                                                          ``suppressed``, not sent again
  5. wait for the number's slot (:mod:`worker.limits`)  → too far: re-delayed, no retry used
  6. call Verloop's send endpoint                       → classified failure: retry or dead letter;
                                                          rate-limit answers teach the limiter
  7. record the send in the ledger, with its campaign's progress and its outcome event
     (:mod:`worker.outbox`), in one round trip
  8. on a rejected token: refresh it once and send again; rejected again: dead letter

Failures are raised, not handled here: :mod:`worker.outcomes` retries or dead-letters them, and
writes the job's one log line and outcome event, to which each step adds its fields.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import structlog

from .campaigns.window import seconds_until_open
from .errors import Deferred, JobFailure, PermanentFailure, RedisUnavailable, TokenInvalid
from .jobs import (
    ACTOR_QUEUES,
    Job,
    ListClientsJob,
    RefreshClientTokensJob,
    RefreshPhoneTokenJob,
    SendMessageJob,
    parse_job,
)
from .ledger import Ledger
from .limits import Lane
from .limits.gate import held_while_redis_is_down
from .outcomes import JobRecord, current_job
from .phones import mask_phone
from .services import Lifecycle, Services
from .settings import Settings
from .verloop.clients import client_phones

_log = structlog.get_logger()

__all__ = ["list_clients", "refresh_phone_token", "register_actors", "send_message"]


def send_message(services: Services, job: SendMessageJob, record: JobRecord) -> None:
    """Send one WhatsApp message (see the module docstring for the steps)."""
    lane: Lane = "campaign" if record.fields.get("lane") == "campaign" else "transactional"
    try:
        if job.campaign_id is not None and not _campaign_allows(services, job.campaign_id, record):
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


def _campaign_allows(services: Services, campaign_id: str, record: JobRecord) -> bool:
    """Whether a campaign job may be sent now; False if its campaign was cancelled.

    Raises:
        Deferred: the campaign is paused, has not started, or is outside its send window.
    """
    state, window, start_at = services.campaigns.gate(campaign_id)
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
    (then the outcome is ``suppressed``). The ledger claim is released if the call fails, kept
    as ``sent`` if not."""
    # The slot first: a job re-delayed for its slot, or held while Redis is down, has not
    # claimed anything, so no claim of a call that never started can look uncertain later.
    waited = services.gate.admit(job.phone_id, job.to, lane)
    if waited > 0.0005:
        record.bind(limit_wait_ms=round(waited * 1000, 1))
    key = job.ledger_key(record.fields["message_id"])
    owner = f"{threading.get_ident()}:{record.fields['message_id']}"
    ledger = services.ledger
    claim = ledger.claim(
        key, owner, take_over_uncertain=_takes_over_uncertain(services.settings, lane)
    )
    if claim.state == "sent":
        record.bind(outcome="suppressed", verloop_message_id=claim.detail or None)
        return
    if claim.state == "busy":
        # Usually the other delivery is done in a moment: look again soon, not at lease end.
        raise Deferred(
            min(claim.retry_in_s, 1.0) + 0.25,
            "another delivery of this job is being sent right now",
            kind="in_flight",
        )
    if claim.state == "uncertain":
        raise PermanentFailure(
            "outcome unknown: a worker stopped while this job was being sent to Verloop, so it "
            "may have been delivered; if it was not, replay it with "
            "`verloop-worker dlq replay --resend-uncertain`"
        )
    if claim.after_uncertain:
        record.bind(resent_after_uncertain=True)
    try:
        result = services.verloop.send_message(
            token, job.request_body(), idempotency_key=job.idempotency_key
        )
    except BaseException as exc:
        _release(ledger, key, owner)
        if isinstance(exc, JobFailure) and not isinstance(exc, TokenInvalid):
            services.gate.react(job.phone_id, job.to, lane, exc)
        raise
    record.bind(
        outcome="sent", verloop_message_id=result.message_id, http_status=result.http_status
    )
    campaign_id = job.campaign_id
    outbox = services.outbox

    def with_the_send(pipe: Any) -> None:
        if campaign_id is not None:
            services.campaigns.count_outcome_in(pipe, campaign_id, "sent")
        if outbox is not None:
            outbox.add_in(pipe, record.fields, record.extra)

    try:
        # The ledger entry, the campaign's progress and the outcome event in one round trip.
        ledger.mark_sent(key, result.message_id, also=with_the_send)
        record.campaign_counted = campaign_id is not None
        record.event_queued = outbox is not None
    except RedisUnavailable:
        # Sent, but not written down: acknowledging is right (sending again is not). A later
        # redelivery of this job would find the claim and treat it as an uncertain outcome.
        record.bind(ledger="not_recorded")
        _log.error("a sent message could not be recorded in the ledger: Redis did not answer")


def _release(ledger: Ledger, key: str, owner: str) -> None:
    try:
        ledger.release(key, owner)
    except RedisUnavailable:
        # The claim's lease runs out by itself; until then another delivery waits for it.
        _log.warning("could not release a ledger claim: Redis did not answer")


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
    """Name the job in its log line even if it turns out to be invalid."""
    for key in ("client_id", "phone_id"):
        value = kwargs.get(key)
        if isinstance(value, str):
            record.bind(**{key: value[:128]})
    to = kwargs.get("to")
    if isinstance(to, str):
        record.bind(to=mask_phone(to[:32]))


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
