"""Pacing sends to each number's limit: the algorithm, its decisions, and an in-process backend.

Each number has a GCRA bucket (one timestamp ``tat``, emission interval ``T = 1/rate``) shared
by two lanes: **campaign** sends take only slots within ``RATE_LIMIT_CAMPAIGN_LOOKAHEAD_S`` (A)
of now; **transactional** sends have tolerance ``H*T + A`` (``H``: ``RATE_LIMIT_RESERVE``), so
they always find ``H`` slots free and never wait behind a campaign. In any ``W`` seconds a
number sends at most ``rate*W + H + A*rate + 1``, within the platform's one-second bucket while
``H + A*rate + 1 <= rate``. Around the bucket: 131056/131057/131048 holds, a recipient's
marketing cap (131049, campaign sends to them from every number), a penalty after a 429, and an
optional account-wide bucket.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

__all__ = [
    "Decision",
    "Lane",
    "LimitPolicy",
    "MemoryLimiter",
    "RateLimiter",
    "Verdict",
]

Lane = Literal["transactional", "campaign"]


class Verdict(Enum):
    """What the limiter decided for one send."""

    GO = 0  #: a slot is reserved: sleep ``wait_s``, then send
    WAIT = 1  #: no slot within reach: come back in ``wait_s`` (nothing reserved)
    RECIPIENT_COOLING = 2  #: this recipient hit the pair limit (131056)
    NUMBER_PAUSED = 3  #: the number is in maintenance (131057)
    CAMPAIGN_PAUSED = 4  #: campaign sends on this number are paused for quality (131048)
    RECIPIENT_CAPPED = 5  #: campaign sends to this recipient wait: marketing cap (131049)


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict and how long it says to wait, in seconds.

    ``holds``: Redis keys of holds this slot was not checked against (it came from a lease);
    the send checks them itself before calling Verloop (see
    :meth:`worker.send.ledger.Ledger.claim`).
    """

    verdict: Verdict
    wait_s: float
    holds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The limits in force, from settings."""

    default_rate: float
    overrides: dict[str, float]
    reserve: float
    max_wait_s: float
    account_rate: float | None = None
    campaign_lookahead_s: float = 0.0

    def rate_for(self, phone_id: str) -> float:
        """Messages per second allowed for one number."""
        return self.overrides.get(phone_id, self.default_rate)

    def tolerance_slots(self, phone_id: str, lane: Lane) -> float:
        """How many slots ahead of ``now`` a lane may be; see the module docstring."""
        if lane == "campaign":
            return 0.0
        rate = self.rate_for(phone_id)
        return max(1.0, self.reserve * rate) + self.campaign_lookahead_s * rate

    def max_wait_for(self, lane: Lane) -> float:
        """How far ahead a lane may reserve a slot and sleep until it."""
        return self.campaign_lookahead_s if lane == "campaign" else self.max_wait_s


class RateLimiter(Protocol):
    """Where limiter state lives: Redis for a fleet, memory for one development process."""

    def acquire(self, phone_id: str, recipient: str, lane: Lane) -> Decision:
        """Ask for a slot to send to ``recipient`` from ``phone_id``."""
        ...

    def penalize(self, phone_id: str, factor: float, seconds: float) -> None:
        """Multiply the number's rate by ``factor`` (< 1) for ``seconds``."""
        ...

    def cool_recipient(self, phone_id: str, recipient: str, seconds: float) -> None:
        """Hold sends to one recipient from one number for ``seconds``."""
        ...

    def pause(self, phone_id: str, seconds: float, *, campaign_only: bool) -> None:
        """Hold the number's sends (or only its campaign sends) for ``seconds``."""
        ...

    def hold_marketing(self, recipient: str, seconds: float) -> None:
        """Hold campaign sends to ``recipient`` (E.164) from every number for ``seconds``: they
        reached WhatsApp's cap on marketing messages (131049). Campaign sends count as
        marketing (a campaign sends a template to a list); transactional sends still go."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


#: The rate is never lowered below this share of the configured one by penalties.
MIN_PENALTY_FACTOR = 0.1
#: Holds that apply to campaign sends only.
_CAMPAIGN_ONLY = frozenset({Verdict.CAMPAIGN_PAUSED, Verdict.RECIPIENT_CAPPED})


class MemoryLimiter:
    """The same algorithm in this process only: for single-process development, chosen with
    ``RATE_LIMIT_BACKEND=memory``. Several processes with it would each send the full rate."""

    def __init__(self, policy: LimitPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}
        self._until: dict[tuple[str, ...], float] = {}
        self._penalty: dict[str, tuple[float, float]] = {}

    def acquire(self, phone_id: str, recipient: str, lane: Lane) -> Decision:
        with self._lock:
            now = time.monotonic()
            for key, verdict in (
                (("pair", phone_id, recipient), Verdict.RECIPIENT_COOLING),
                (("pause", phone_id), Verdict.NUMBER_PAUSED),
                (("quality", phone_id), Verdict.CAMPAIGN_PAUSED),
                (("marketing", recipient), Verdict.RECIPIENT_CAPPED),
            ):
                if verdict in _CAMPAIGN_ONLY and lane != "campaign":
                    continue
                remaining = self._until.get(key, 0.0) - now
                if remaining > 0:
                    return Decision(verdict, remaining)
            factor, until = self._penalty.get(phone_id, (1.0, 0.0))
            if until < now:
                factor = 1.0
            interval = 1.0 / (self.policy.rate_for(phone_id) * factor)
            tolerance = self.policy.tolerance_slots(phone_id, lane) * interval
            tat = max(self._tat.get(phone_id, now), now)
            wait = max(0.0, tat - tolerance - now)
            account_tat = 0.0
            account_interval = 0.0
            if self.policy.account_rate:
                account_interval = 1.0 / self.policy.account_rate
                account_tat = max(self._tat.get("\0account", now), now)
                wait = max(wait, account_tat - now)  # the account bucket has no burst
            if wait > self.policy.max_wait_for(lane):
                return Decision(Verdict.WAIT, wait)
            # The send happens at now + wait: each bucket advances from then (see the Lua script).
            sent_at = now + wait
            self._tat[phone_id] = max(tat, sent_at) + interval
            if account_interval:
                self._tat["\0account"] = max(account_tat, sent_at) + account_interval
            return Decision(Verdict.GO, wait)

    def penalize(self, phone_id: str, factor: float, seconds: float) -> None:
        with self._lock:
            now = time.monotonic()
            current, until = self._penalty.get(phone_id, (1.0, 0.0))
            current = current if until > now else 1.0
            self._penalty[phone_id] = (max(MIN_PENALTY_FACTOR, current * factor), now + seconds)

    def cool_recipient(self, phone_id: str, recipient: str, seconds: float) -> None:
        self._hold(("pair", phone_id, recipient), seconds)

    def pause(self, phone_id: str, seconds: float, *, campaign_only: bool) -> None:
        self._hold(("quality" if campaign_only else "pause", phone_id), seconds)

    def hold_marketing(self, recipient: str, seconds: float) -> None:
        self._hold(("marketing", recipient), seconds)

    def _hold(self, key: tuple[str, ...], seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            self._until[key] = max(self._until.get(key, 0.0), until)

    def close(self) -> None:
        """Nothing to release."""
