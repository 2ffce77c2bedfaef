"""A job's typed context and outcome, and the one vocabulary of outcomes.

The outcome middleware builds a :class:`JobRun` for each delivery; the actor fills in what the
job says about itself (:class:`JobFacts`) and its handler's :class:`JobOutcome`, or raises and
the middleware turns the exception into one. The log line, the metrics and the event are all
renderings of the finished :class:`JobRun`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Literal

from worker.jobs.phones import mask_phone
from worker.limits.pacing import Lane

if TYPE_CHECKING:
    from worker.send.ledger import LedgerKey

__all__ = [
    "CAMPAIGN_OUTCOMES",
    "FINAL_OUTCOMES",
    "KEPT_OUTCOMES",
    "MANAGE_OUTCOMES",
    "SEND_OUTCOMES",
    "DeadLetterKind",
    "Failure",
    "JobContext",
    "JobFacts",
    "JobOutcome",
    "JobRun",
    "Lane",
    "Outcome",
    "StatusFacts",
]

DeadLetterKind = Literal["invalid", "failed", "gave_up"]


class Outcome(StrEnum):
    """What became of one delivery of a job."""

    SENT = "sent"  # Verloop accepted the message
    SUPPRESSED = "suppressed"  # the ledger says it was sent already: not sent again
    CANCELLED = "cancelled"  # its campaign was cancelled: not sent
    DONE = "done"  # a management job finished
    DEAD_LETTERED = "dead_lettered"  # kept in the dead-letter queue with its reason
    RETRYING = "retrying"  # failed; a copy waits in the delay queue for its next attempt
    DEFERRED = "deferred"  # not its time yet; a copy waits, no retry used
    REJECTED = "rejected"  # its retry or dead letter was not confirmed: RabbitMQ dead-letters it


#: After these the job is gone from the queues for good; each gets an outcome event.
FINAL_OUTCOMES: Final = frozenset(
    {Outcome.SENT, Outcome.SUPPRESSED, Outcome.CANCELLED, Outcome.DONE, Outcome.DEAD_LETTERED}
)
#: After these the job is safe: finished, or a copy of it is on RabbitMQ.
KEPT_OUTCOMES: Final = FINAL_OUTCOMES | {Outcome.RETRYING, Outcome.DEFERRED}
#: The final outcomes a campaign counts, in the order its status shows them.
CAMPAIGN_OUTCOMES: Final = (
    Outcome.SENT,
    Outcome.DEAD_LETTERED,
    Outcome.SUPPRESSED,
    Outcome.CANCELLED,
)

#: What can become of a send job's delivery, and of a management job's.
SEND_OUTCOMES: Final = (
    Outcome.SENT,
    Outcome.SUPPRESSED,
    Outcome.CANCELLED,
    Outcome.RETRYING,
    Outcome.DEFERRED,
    Outcome.DEAD_LETTERED,
    Outcome.REJECTED,
)
MANAGE_OUTCOMES: Final = (
    Outcome.DONE,
    Outcome.RETRYING,
    Outcome.DEAD_LETTERED,
    Outcome.REJECTED,
)


@dataclass(frozen=True, slots=True)
class JobContext:
    """Where a delivery came from: built by the middleware before the actor runs."""

    message_id: str
    actor: str
    queue: str
    lane: Lane
    #: 1 for the first delivery, +1 per retry (deferrals do not count).
    attempt: int
    #: ``options.eta`` of a job whose time has not come yet (Unix ms).
    not_before_ms: int | None = None


@dataclass(slots=True)
class JobFacts:
    """What the job says about itself: well-formed ids before validation, all after it."""

    client_id: str | None = None
    phone_id: str | None = None
    #: The recipient in full, once the job is valid: the event carries it, the log masks it.
    to: str | None = None
    #: What an invalid job gave as its recipient (printable, cut short): logged masked only.
    unchecked_to: str | None = None
    #: Set once a send job is valid.
    message_type: str | None = None
    idempotency_key: str | None = None
    campaign_id: str | None = None
    metadata: Mapping[str, Any] | None = None

    @property
    def is_valid_send(self) -> bool:
        """Whether a send job was validated (its message type is known then)."""
        return self.message_type is not None


@dataclass(slots=True)
class StatusFacts:
    """One status of a status job, and what recording it did (see :mod:`worker.receipts`)."""

    wamid: str
    #: ``sent``, ``delivered``, ``read``, ``failed`` or ``other``.
    status: str
    #: When it happened (Unix s, WhatsApp's clock).
    at: int
    #: The first error's code, for a failure.
    code: str | None = None
    #: ``recorded``, ``duplicate``, ``unknown`` (no send known for the wamid) or ``waiting``
    #: (not known yet: looked for again later).
    effect: str | None = None
    #: The send's lane and number, and seconds from its record to this status.
    send_lane: str | None = None
    phone_id: str | None = None
    lag_s: float | None = None


def _status_counts(statuses: list[StatusFacts]) -> dict[str, Any]:
    """A status job's part of its log line: how many statuses, and what became of them."""
    effects = Counter(status.effect or "not_recorded" for status in statuses)
    return {"statuses": len(statuses), "status_effects": dict(effects)}


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a job failed: the exception's class, the reason, and what Verloop answered."""

    error: str
    reason: str
    http_status: int | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a handler returns, or what the middleware makes of what it raised."""

    kind: Outcome
    #: Verloop's id of the message (sent, or suppressed as sent before).
    verloop_message_id: str | None = None
    http_status: int | None = None
    #: The ledger entry to record as sent (a send's last step, written by the finisher).
    ledger_key: LedgerKey | None = field(default=None, repr=False)
    #: A management job's result, carried by its event.
    result: Mapping[str, Any] | None = None
    failure: Failure | None = None
    dead_letter: DeadLetterKind | None = None
    #: Why the job waits (``Deferred.kind``), and how long until it runs again.
    deferral: str | None = None
    retry_in_s: float | None = None
    deferrals: int | None = None
    #: A reason that is not a failure's (a deferral's).
    reason: str | None = None
    #: The finisher writes no event of the job's own (a status job's statuses have theirs).
    quiet: bool = False
    #: Events the finisher publishes straight to RabbitMQ (a status job's, with
    #: ``EVENTS_DELIVERY=direct``): (fields, extra) each.
    events: tuple[tuple[Mapping[str, Any], Mapping[str, Any]], ...] = ()

    @property
    def final(self) -> bool:
        """Whether the job is gone from the queues for good."""
        return self.kind in FINAL_OUTCOMES


class Afterwards:
    """Steps that wait for a final outcome's writes carried by a later round trip
    (:mod:`worker.send.carried`): run when they are done, or at once if they are already."""

    __slots__ = ("_done", "_lock", "_waiting")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._waiting: list[Callable[[], None]] = []

    def then(self, step: Callable[[], None]) -> None:
        with self._lock:
            if not self._done:
                self._waiting.append(step)
                return
        step()

    def done(self) -> None:
        with self._lock:
            self._done = True
            waiting, self._waiting = self._waiting, []
        for step in waiting:
            step()


@dataclass(slots=True)
class JobRun:
    """One delivery of a job, from the middleware's start to its outcome."""

    ctx: JobContext
    facts: JobFacts = field(default_factory=JobFacts)
    outcome: JobOutcome | None = None
    started: float = field(default_factory=time.perf_counter)
    #: Which token served the send (``configured``, ``memory``, ``redis``, ``verloop``).
    token_source: str | None = None
    token_refreshed: bool = False
    limit_wait_ms: float | None = None
    #: Other details of the steps, for the log line alone.
    notes: dict[str, Any] = field(default_factory=dict)
    #: Steps after a send was accepted that failed (logged and counted, never a resend).
    after_send_failures: list[str] = field(default_factory=list)
    #: A status job's statuses, and what recording each did.
    statuses: list[StatusFacts] = field(default_factory=list)
    #: Set when the outcome's writes wait for a later round trip (a sent job's carried record):
    #: its log line waits for them too.
    written_later: Afterwards | None = None

    def note(self, **values: Any) -> None:
        """Add details to the job's log line."""
        self.notes.update(values)

    @property
    def kind(self) -> Outcome | None:
        """The outcome's kind, once there is one."""
        return None if self.outcome is None else self.outcome.kind

    def log_fields(self) -> dict[str, Any]:
        """The job's log line (the recipient masked; empty values left out)."""
        ctx, facts, outcome = self.ctx, self.facts, self.outcome
        fields: dict[str, Any] = {
            "message_id": ctx.message_id,
            "actor": ctx.actor,
            "queue": ctx.queue,
            "lane": ctx.lane,
            "attempt": ctx.attempt,
            "client_id": facts.client_id,
            "phone_id": facts.phone_id,
            "to": _masked(facts.to or facts.unchecked_to),
            "message_type": facts.message_type,
            "idempotency_key": facts.idempotency_key,
            "campaign_id": facts.campaign_id,
            "metadata": facts.metadata,
            "token_source": self.token_source,
            "token_refreshed": self.token_refreshed or None,
            "limit_wait_ms": self.limit_wait_ms,
            **self.notes,
        }
        if outcome is not None:
            fields.update(_outcome_fields(outcome))
        if self.statuses:
            fields.update(_status_counts(self.statuses))
        return {k: v for k, v in fields.items() if v is not None}

    def event_fields(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(fields, extra) of the job's event: its log fields, and what the log line does
        not carry (the full recipient, the producer's metadata, a management result)."""
        extra: dict[str, Any] = {}
        if self.facts.to is not None:
            extra["to"] = self.facts.to
        if self.facts.metadata is not None:
            extra["metadata"] = self.facts.metadata
        if self.outcome is not None and self.outcome.result is not None:
            extra["result"] = self.outcome.result
        return self.log_fields(), extra


def _masked(phone: str | None) -> str | None:
    return None if phone is None else mask_phone(phone)


def _outcome_fields(outcome: JobOutcome) -> dict[str, Any]:
    failure = outcome.failure
    return {
        "outcome": outcome.kind.value,
        "verloop_message_id": outcome.verloop_message_id,
        "error": None if failure is None else failure.error,
        "reason": outcome.reason if failure is None else failure.reason,
        "http_status": outcome.http_status if failure is None else failure.http_status,
        "code": None if failure is None else failure.code,
        "dead_letter": outcome.dead_letter,
        "deferral": outcome.deferral,
        "retry_in_s": outcome.retry_in_s,
        "deferrals": outcome.deferrals,
    }
