"""The send path's use of the limiter: wait for a slot, react to Verloop's limit answers.

:meth:`SendGate.admit` runs right before each send call: it sleeps for a reserved slot (at most
``RATE_LIMIT_MAX_WAIT_S``) or raises :class:`Deferred` (a re-delay, no retry used).
:meth:`SendGate.react` (a send's answer) and :meth:`SendGate.react_to_status` (a failed status)
turn 429/130429, 131056, 131057, 131048 and 131049 into limiter state, as the table in
docs/verloop-api.md ("The platform's limits") says.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import structlog

from worker.errors import Deferred, JobFailure, RedisUnavailable
from worker.limits.pacing import Lane, RateLimiter, Verdict
from worker.limits.redis_limiter import LimiterUnavailable
from worker.settings import MAX_SINGLE_DELAY_S

__all__ = ["HOLD_REASON", "Admission", "GateSettings", "SendGate", "held_while_redis_is_down"]

_log = structlog.get_logger()

#: While Redis is down, a held send checks again about this often (never sent without a slot).
REDIS_DOWN_RETRY_S = 5.0
#: 131056 without Retry-After: how long that recipient waits.
PAIR_COOLDOWN_S = 10.0
#: 131057: the number is being upgraded "for about a minute".
MAINTENANCE_PAUSE_S = 60.0

_REASONS = {
    Verdict.WAIT: "rate limit: the number's next free slot is {s:.1f} s away",
    Verdict.RECIPIENT_COOLING: "recipient cooling down after a pair rate limit (131056)",
    Verdict.NUMBER_PAUSED: "number paused by Verloop (131057, maintenance)",
    Verdict.CAMPAIGN_PAUSED: "campaign sends paused on this number for quality (131048)",
    Verdict.RECIPIENT_CAPPED: (
        "recipient reached WhatsApp's marketing message cap (131049); campaign sends to them wait"
    ),
}


#: Why a send with a leased slot waits after all (see :class:`Admission`).
HOLD_REASON = (
    "held: the recipient (131056) or the number (131057) is on hold, or for a campaign send "
    "the number's campaign sends (131048) or the recipient's marketing messages (131049)"
)

#: The fixed names deferrals are counted under in metrics.
_KINDS = {
    Verdict.WAIT: "rate_limit",
    Verdict.RECIPIENT_COOLING: "recipient_cooling",
    Verdict.NUMBER_PAUSED: "number_paused",
    Verdict.CAMPAIGN_PAUSED: "campaign_paused",
    Verdict.RECIPIENT_CAPPED: "recipient_capped",
}


def held_while_redis_is_down(exc: RedisUnavailable, kind: str) -> Deferred:
    """The deferral for a send that cannot reach Redis: it waits, never sent without it."""
    _log.warning("sends held: Redis unreachable", reason=str(exc))
    # Spread, so a fleet's held sends do not all come back in the same instant.
    return Deferred(
        REDIS_DOWN_RETRY_S * random.uniform(1.0, 1.25), f"{exc}; held, not sent", kind=kind
    )


@dataclass(frozen=True, slots=True)
class Admission:
    """A send's slot: how long it waited for it, and the hold keys the send must still check
    (the slot came from a lease, see :class:`worker.limits.pacing.Decision`)."""

    waited_s: float
    holds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GateSettings:
    """The reaction knobs, from settings."""

    max_wait_s: float
    penalty_factor: float
    penalty_s: float
    quality_pause_s: float
    #: 131049: campaign sends to that recipient wait this long.
    marketing_hold_s: float = 86_400.0


class SendGate:
    """Admits sends at the pace the limiter allows; see the module docstring."""

    def __init__(self, limiter: RateLimiter, settings: GateSettings) -> None:
        self.limiter = limiter
        self.settings = settings

    def admit(self, phone_id: str, recipient: str, lane: Lane) -> Admission:
        """Wait for a slot.

        Raises:
            Deferred: the slot is further than the bound, the recipient or number is held, or
                the limiter cannot be reached (fail closed).
        """
        started = time.monotonic()
        deadline = started + self.settings.max_wait_s
        while True:
            try:
                decision = self.limiter.acquire(phone_id, recipient, lane)
            except LimiterUnavailable as exc:
                raise held_while_redis_is_down(exc, "limiter_unavailable") from None
            if decision.verdict is Verdict.GO:
                if decision.wait_s > 0:
                    time.sleep(decision.wait_s)
                return Admission(time.monotonic() - started, decision.holds)
            now = time.monotonic()
            if decision.verdict is Verdict.WAIT and now + decision.wait_s <= deadline:
                # Campaign sends take only free slots: look again when one should be free.
                time.sleep(decision.wait_s)
                continue
            # Nothing is reserved for a re-delayed job, so jobs held together must not all come
            # back in the same instant: spread them over a quarter of their delay.
            delay = min(decision.wait_s * random.uniform(1.0, 1.25) + 0.01, MAX_SINGLE_DELAY_S)
            raise Deferred(
                delay,
                _REASONS[decision.verdict].format(s=decision.wait_s),
                kind=_KINDS[decision.verdict],
            )

    def react(self, phone_id: str, recipient: str, lane: Lane, failure: JobFailure) -> None:
        """Record what a refused send says about the number; raise :class:`Deferred` when the
        job should simply wait instead of counting a retry."""
        details = failure.details
        deferred = self._remember(
            phone_id, recipient, details.code, details.http_status, details.retry_after
        )
        if deferred is not None:
            raise deferred from None

    def react_to_status(self, phone_id: str, recipient: str, code: str | None) -> None:
        """A failed status's error code gets the reaction the same code gets on a send's
        answer (a status arrives after its send: nothing waits on it)."""
        self._remember(phone_id, recipient, code, None, None)

    def _remember(
        self,
        phone_id: str,
        recipient: str,
        code: str | None,
        http_status: int | None,
        retry_after: float | None,
    ) -> Deferred | None:
        """Turn a limit code into limiter state; the deferral for a send that should wait."""
        try:
            if code == "130429" or (http_status == 429 and code in (None, "4", "80007")):
                self.limiter.penalize(
                    phone_id, self.settings.penalty_factor, self.settings.penalty_s
                )
                _log.warning(
                    "number slowed down after a rate-limit answer",
                    phone_id=phone_id,
                    code=code,
                    factor=self.settings.penalty_factor,
                    seconds=self.settings.penalty_s,
                )
            elif code == "131056":
                seconds = retry_after or PAIR_COOLDOWN_S
                self.limiter.cool_recipient(phone_id, recipient, seconds)
                return Deferred(
                    seconds, _REASONS[Verdict.RECIPIENT_COOLING], kind="recipient_cooling"
                )
            elif code == "131057":
                seconds = retry_after or MAINTENANCE_PAUSE_S
                self.limiter.pause(phone_id, seconds, campaign_only=False)
                return Deferred(seconds, _REASONS[Verdict.NUMBER_PAUSED], kind="number_paused")
            elif code == "131048":
                self.limiter.pause(phone_id, self.settings.quality_pause_s, campaign_only=True)
                _log.warning(
                    "campaign sends paused on a number for quality (131048)",
                    phone_id=phone_id,
                    seconds=self.settings.quality_pause_s,
                )
            elif code == "131049":
                self.limiter.hold_marketing(recipient, self.settings.marketing_hold_s)
        except LimiterUnavailable as exc:
            # The answer is still handled (retried, dead-lettered or recorded); only the
            # limiter's memory of it is lost.
            _log.warning("could not record a rate-limit answer", reason=str(exc))
        return None
