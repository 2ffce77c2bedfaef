"""Fault configuration and fault decisions for the Verloop sandbox.

Each value's checks are in :mod:`worker.sandbox.validation`, scripted responses in
:mod:`worker.sandbox.script`. Pure Python (no aiohttp) so the decision logic can be
unit-tested without a server.  Everything random goes through a ``random.Random`` seeded from
``Faults.seed`` so a failing test run can be replayed exactly.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.sandbox.limits import PairWindow, TokenBucket
from worker.sandbox.script import ScriptQueue
from worker.sandbox.validation import (
    FaultConfigError,
    integer,
    json_object,
    number,
    probability,
    reject_unknown,
    status_code,
)

__all__ = [
    "FaultConfigError",
    "FaultEngine",
    "FaultResponse",
    "Faults",
    "LimitVerdict",
    "default_error",
    "refusal_code",
]

# (Graph API error code, message) per HTTP status, modelled on what Meta's
# WhatsApp Cloud API returns, so client code parses realistic bodies.
_DEFAULT_ERRORS: Final[Mapping[int, tuple[int, str]]] = {
    400: (100, "Invalid parameter"),
    401: (190, "Invalid OAuth access token."),
    403: (10, "Application does not have permission for this action"),
    404: (100, "Unsupported request"),
    429: (130429, "Rate limit hit"),
    500: (131000, "Something went wrong"),
    502: (131000, "Bad gateway"),
    503: (131016, "Service unavailable"),
    504: (131000, "Gateway timeout"),
}
# Twirp codes of get_phone_token's refusals (the shape Verloop's other errors take).
_REFUSAL_CODES: Final[Mapping[int, str]] = {
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
}
# Graph API puts an error "type" only on request/auth errors.
_TYPED_STATUSES: Final = frozenset({400, 401, 403, 404})


def refusal_code(status: int) -> str:
    """The Twirp code of a get_phone_token refusal with ``status`` (401, 403 or 404)."""
    return _REFUSAL_CODES[status]


def default_error(status: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Return the default ``(body, headers)`` the sandbox sends for an error status."""
    code, message = _DEFAULT_ERRORS.get(
        status, (100, "Request failed") if status < 500 else (131000, "Something went wrong")
    )
    error: dict[str, Any] = {"message": message, "code": code}
    if status in _TYPED_STATUSES:
        error["type"] = "OAuthException"
    headers = {"Retry-After": "1"} if status == 429 else {}
    return {"error": error}, headers


# --- fault configuration ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """What the sandbox should do wrong; the default instance injects nothing.

    Validated on construction, so an invalid instance cannot exist.
    """

    latency_ms: float = 0.0
    """Fixed latency added to every API (non-admin) request."""
    latency_jitter_ms: float = 0.0
    """Extra uniform random latency in ``[0, latency_jitter_ms]`` on top of ``latency_ms``."""
    error_rates: Mapping[int, float] = field(default_factory=dict)
    """Probability per HTTP status (400-599) that a send fails with that status."""
    timeout_rate: float = 0.0
    """Probability that a send hangs ``timeout_s`` seconds and then answers 504."""
    timeout_s: float = 30.0
    per_number_rate: float | None = None
    """Accepted sends per second per phone_id (token bucket, burst = rate); None = unlimited."""
    per_number_rate_overrides: Mapping[str, float] = field(default_factory=dict)
    """phone_id -> rate, overriding ``per_number_rate`` for that phone."""
    per_pair_rate: int | None = None
    """Accepted sends per ``per_pair_window_s`` to one (phone_id, recipient); None = unlimited."""
    per_pair_window_s: float = 6.0
    """Window for ``per_pair_rate``; 6 s mirrors Meta's one-message-per-6-seconds pair limit."""
    seed: int | None = None
    """Seed for random faults; None = nondeterministic."""
    enforce_limits: bool = True
    """False: over-limit sends are accepted but counted as rate-limit violations."""
    phone_token_refusals: Mapping[str, int] = field(default_factory=dict)
    """``"client_id"`` (every number of it) or ``"client_id/phone_id"`` -> the status (401, 403
    or 404) get_phone_token answers for it, with a valid system user token: a client or number
    the partner may not use (401 looks exactly like a refused system token)."""

    def __post_init__(self) -> None:
        """Validate every field and take private copies of the mappings."""
        # Normalise ints to floats so to_json() is stable whatever the caller passed.
        floats = {
            "latency_ms": number("latency_ms", self.latency_ms),
            "latency_jitter_ms": number("latency_jitter_ms", self.latency_jitter_ms),
            "timeout_rate": probability("timeout_rate", self.timeout_rate),
            "timeout_s": number("timeout_s", self.timeout_s, strict=True),
            "per_pair_window_s": number("per_pair_window_s", self.per_pair_window_s, strict=True),
        }
        if self.per_number_rate is not None:
            floats["per_number_rate"] = number("per_number_rate", self.per_number_rate, strict=True)
        if self.per_pair_rate is not None:
            integer("per_pair_rate", self.per_pair_rate, minimum=1)
        if self.seed is not None:
            integer("seed", self.seed, minimum=-(2**63))
        if not isinstance(self.enforce_limits, bool):
            raise FaultConfigError(f"enforce_limits must be a boolean, got {self.enforce_limits!r}")
        error_rates = {
            status_code("error_rates key", status, low=400): probability(
                f"error_rates[{status}]", rate
            )
            for status, rate in json_object("error_rates", self.error_rates).items()
        }
        if sum(error_rates.values()) + self.timeout_rate > 1.0 + 1e-9:
            raise FaultConfigError("sum of error_rates and timeout_rate must not exceed 1")
        overrides = {
            str(phone): number(f"per_number_rate_overrides[{phone}]", rate, strict=True)
            for phone, rate in json_object(
                "per_number_rate_overrides", self.per_number_rate_overrides
            ).items()
        }
        refusals = {}
        for target, status in json_object(
            "phone_token_refusals", self.phone_token_refusals
        ).items():
            if not isinstance(target, str) or not target or target.count("/") > 1:
                raise FaultConfigError(
                    f"phone_token_refusals keys must be 'client_id' or 'client_id/phone_id', "
                    f"got {target!r}"
                )
            code = status_code(f"phone_token_refusals[{target}]", status, low=401, high=404)
            if code not in _REFUSAL_CODES:
                raise FaultConfigError(
                    f"phone_token_refusals[{target}] must be 401, 403 or 404, got {status!r}"
                )
            refusals[target] = code
        for name, value in floats.items():
            object.__setattr__(self, name, value)
        # Private copies: a frozen config must not change when the caller's dict does.
        object.__setattr__(self, "error_rates", error_rates)
        object.__setattr__(self, "per_number_rate_overrides", overrides)
        object.__setattr__(self, "phone_token_refusals", refusals)

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Build from a JSON object (as sent to ``PUT /admin/faults``); missing keys default."""
        obj = json_object("faults", data)
        reject_unknown("faults", obj, cls.__dataclass_fields__)
        try:
            return cls(**obj)  # type: ignore[arg-type]  # values are validated in __post_init__
        except TypeError as exc:  # e.g. error_rates given as a list
            raise FaultConfigError(str(exc)) from exc

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form accepted by :meth:`from_json`."""
        return {
            "latency_ms": self.latency_ms,
            "latency_jitter_ms": self.latency_jitter_ms,
            "error_rates": {str(status): rate for status, rate in self.error_rates.items()},
            "timeout_rate": self.timeout_rate,
            "timeout_s": self.timeout_s,
            "per_number_rate": self.per_number_rate,
            "per_number_rate_overrides": dict(self.per_number_rate_overrides),
            "per_pair_rate": self.per_pair_rate,
            "per_pair_window_s": self.per_pair_window_s,
            "seed": self.seed,
            "enforce_limits": self.enforce_limits,
            "phone_token_refusals": dict(self.phone_token_refusals),
        }

    def phone_token_refusal(self, client_id: str, phone_id: str) -> int | None:
        """The status get_phone_token refuses (client_id, phone_id) with, or None."""
        refusals = self.phone_token_refusals
        return refusals.get(f"{client_id}/{phone_id}", refusals.get(client_id))

    def rate_for(self, phone_id: str) -> float | None:
        """Return the per-second send limit for ``phone_id`` (None = unlimited)."""
        return self.per_number_rate_overrides.get(phone_id, self.per_number_rate)


# --- decisions ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultResponse:
    """A random fault chosen for one send: an error status or a hang."""

    status: int
    timeout: bool = False


@dataclass(frozen=True, slots=True)
class LimitVerdict:
    """Result of checking a send against the rate limits.

    ``exceeded`` names the limit that was exceeded ("per_number" or "per_pair"),
    None if the send is within limits.  ``rejected`` tells whether the send must
    be refused (limits enforced) or merely counted as a violation.
    """

    exceeded: str | None = None
    rejected: bool = False
    retry_after_s: int = 1


_WITHIN_LIMITS: Final = LimitVerdict()


class FaultEngine:
    """Turns a :class:`Faults` config into per-request decisions.

    Holds the random generators, the rate-limit state and the script queue.
    Not thread-safe: it lives on the server's event loop.
    """

    def __init__(
        self, faults: Faults | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Start with ``faults`` (default: none) and the given monotonic clock."""
        self._clock = clock
        self.script = ScriptQueue()
        self.configure(faults or Faults())

    @property
    def faults(self) -> Faults:
        """The active fault configuration."""
        return self._faults

    def configure(self, faults: Faults) -> None:
        """Replace the configuration; reseeds randomness and forgets rate-limit history."""
        self._faults = faults
        # Separate generators so that jitter draws (which also happen for
        # non-send endpoints) don't shift the sequence of fault outcomes.
        self._fault_rng = random.Random(faults.seed)
        self._jitter_rng = random.Random(faults.seed)
        self._fixed_latency_s = faults.latency_ms / 1000.0
        self._jitter_s = faults.latency_jitter_ms / 1000.0
        # Cumulative thresholds: one uniform draw per send picks the outcome.
        thresholds: list[tuple[float, FaultResponse]] = []
        total = 0.0
        if faults.timeout_rate:
            total += faults.timeout_rate
            thresholds.append((total, FaultResponse(status=504, timeout=True)))
        for status, rate in sorted(faults.error_rates.items()):
            if rate:
                total += rate
                thresholds.append((total, FaultResponse(status=status)))
        self._thresholds = thresholds
        self._buckets: dict[str, TokenBucket] = {}
        self._pairs = (
            None
            if faults.per_pair_rate is None
            else PairWindow(faults.per_pair_rate, faults.per_pair_window_s)
        )

    def latency_s(self) -> float:
        """Return the latency to add to one API request, in seconds."""
        if self._jitter_s:
            return self._fixed_latency_s + self._jitter_rng.uniform(0.0, self._jitter_s)
        return self._fixed_latency_s

    def draw(self) -> FaultResponse | None:
        """Pick a random fault for one send, or None to let it through."""
        if not self._thresholds:
            return None
        roll = self._fault_rng.random()
        for threshold, response in self._thresholds:
            if roll < threshold:
                return response
        return None

    def check_limits(self, phone_id: str, wa_id: str) -> LimitVerdict:
        """Check one send against the rate limits and, if within them, count it."""
        now = self._clock()
        bucket: TokenBucket | None = None
        rate = self._faults.rate_for(phone_id)
        if rate is not None:
            bucket = self._buckets.get(phone_id)
            if bucket is None:
                bucket = self._buckets[phone_id] = TokenBucket(rate, now)
            if not bucket.available(now):
                return LimitVerdict(
                    exceeded="per_number",
                    rejected=self._faults.enforce_limits,
                    retry_after_s=max(1, math.ceil(bucket.wait_s(now))),
                )
        pairs = self._pairs
        if pairs is not None and not pairs.available((phone_id, wa_id), now):
            return LimitVerdict(
                exceeded="per_pair",
                rejected=self._faults.enforce_limits,
                retry_after_s=max(1, math.ceil(pairs.wait_s((phone_id, wa_id), now))),
            )
        # Commit only once both limits agree, so a refused send costs nothing.
        if bucket is not None:
            bucket.take()
        if pairs is not None:
            pairs.take((phone_id, wa_id), now)
        return _WITHIN_LIMITS

    def reset(self) -> None:
        """Drop the configuration back to no faults and clear the script."""
        self.script.clear()
        self.configure(Faults())
