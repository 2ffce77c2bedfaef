"""The steps of one send, each testable alone: admit, claim, call, and the sent outcome.

1. :func:`admit`: wait for the number's slot (:mod:`worker.send.gate`); while Redis is down the
   job is held, not sent (the gate's policy).
2. :func:`claim`: claim the job's ledger entry; already sent: ``suppressed``, not sent again.
3. :func:`call`: call Verloop. A clear failure releases the claim; no answer marks it uncertain
   (``UNCERTAIN_SEND_POLICY``); anything unforeseen marks it uncertain too.
4. record: the ``sent`` outcome names the ledger entry, and :mod:`worker.finish.finish` writes
   it first, with the campaign counter and the event, in one round trip.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import structlog

from worker.errors import (
    Deferred,
    OutcomeUnknown,
    PermanentFailure,
    RedisUnavailable,
    TokenInvalid,
    TransientFailure,
)
from worker.finish.outcome import JobOutcome, JobRun, Lane, Outcome
from worker.jobs.models import SendMessageJob
from worker.send.gate import HOLD_REASON, Admission
from worker.send.ledger import Claim, Ledger, LedgerKey
from worker.settings import Settings
from worker.verloop.client import SendResult

if TYPE_CHECKING:
    from worker.runtime.services import Services

__all__ = ["admit", "call", "claim", "paced_send", "sent"]

_log = structlog.get_logger()


def paced_send(services: Services, token: str, job: SendMessageJob, run: JobRun) -> JobOutcome:
    """One call to Verloop in the number's next slot, unless the ledger says it was sent."""
    lane = run.ctx.lane
    slot = admit(services, job, lane, run)
    key = job.ledger_key(run.ctx.message_id)
    owner = f"{threading.get_ident()}:{run.ctx.message_id}"
    taken = claim(services, key, owner, lane, slot)
    if taken.state == "sent":
        return JobOutcome(Outcome.SUPPRESSED, verloop_message_id=taken.detail or None)
    if taken.after_uncertain:
        run.note(resent_after_uncertain=True)
    result = call(services, token, job, key, owner, run)
    return sent(result, key)


def admit(services: Services, job: SendMessageJob, lane: Lane, run: JobRun) -> Admission:
    """Wait for the number's slot (first: a job re-delayed for its slot, or held while Redis is
    down, has claimed nothing, so no claim of a call that never started can look uncertain).

    Raises:
        Deferred: the slot is too far away, or Redis is down (the gate's policy).
    """
    slot = services.gate.admit(job.phone_id, job.to, lane)
    if slot.waited_s > 0.0005:
        run.limit_wait_ms = round(slot.waited_s * 1000, 1)
    return slot


def claim(services: Services, key: LedgerKey, owner: str, lane: Lane, slot: Admission) -> Claim:
    """Claim the ledger entry for one call; returns a ``claimed`` or ``sent`` claim.

    Raises:
        Deferred: a hold applies, or another delivery of this job is being sent right now.
        PermanentFailure: an earlier delivery's outcome is unknown, and the policy keeps it.
        RedisUnavailable: Redis did not answer.
    """
    taken = services.ledger.claim(
        key,
        owner,
        take_over_uncertain=_takes_over_uncertain(services.settings, lane),
        holds=slot.holds,
    )
    if taken.state == "held":
        # The slot came from a lease, and this recipient (or the number) is on hold.
        raise Deferred(taken.retry_in_s, HOLD_REASON, kind="recipient_cooling")
    if taken.state == "busy":
        # Usually the other delivery is done in a moment: look again soon, not at lease end.
        raise Deferred(
            min(taken.retry_in_s, 1.0) + 0.25,
            "another delivery of this job is being sent right now",
            kind="in_flight",
        )
    if taken.state == "uncertain":
        raise _outcome_unknown("an earlier delivery of this job")
    return taken


def call(
    services: Services, token: str, job: SendMessageJob, key: LedgerKey, owner: str, run: JobRun
) -> SendResult:
    """Call Verloop's send endpoint under a claim, and settle the claim if the call failed.

    Raises:
        TokenInvalid, PermanentFailure, TransientFailure: Verloop did not send it (claim
            released), or its outcome is unknown (claim uncertain).
    """
    ledger, lane = services.ledger, run.ctx.lane
    try:
        return services.verloop.send_message(
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
        run.note(outcome_unknown=exc.details.reason)
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


def sent(result: SendResult, key: LedgerKey) -> JobOutcome:
    """The outcome of a message Verloop accepted; the finisher records it in the ledger."""
    return JobOutcome(
        Outcome.SENT,
        verloop_message_id=result.message_id,
        http_status=result.http_status,
        ledger_key=key,
    )


def _takes_over_uncertain(settings: Settings, lane: Lane) -> bool:
    policy = settings.uncertain_send_policy
    return policy == "resend" or (policy == "by_lane" and lane == "transactional")


def _outcome_unknown(whose: str) -> PermanentFailure:
    return PermanentFailure(
        f"outcome unknown: {whose} reached Verloop and no answer came back (or its worker "
        "stopped mid-call), so it may have been delivered; if it was not, replay it with "
        "`verloop-worker dlq replay --resend-uncertain`"
    )


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
