"""Fault configuration and fault decisions for the Verloop sandbox.

Pure Python (no aiohttp) so the decision logic can be unit-tested without a
server.  Everything random goes through a ``random.Random`` seeded from
``Faults.seed`` so a failing test run can be replayed exactly.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.sandbox.limits import PairWindow, TokenBucket

__all__ = [
    "FaultConfigError",
    "FaultEngine",
    "FaultResponse",
    "Faults",
    "LimitVerdict",
    "ScriptQueue",
    "ScriptedResponse",
    "default_error",
    "digits_of",
    "refusal_code",
]

_NON_DIGITS: Final = re.compile(r"\D")

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


class FaultConfigError(ValueError):
    """Raised when a fault or script configuration is invalid."""


def digits_of(phone: str) -> str:
    """Return only the digits of ``phone`` (the WhatsApp ``wa_id`` form)."""
    return _NON_DIGITS.sub("", phone)


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


# --- validation helpers -------------------------------------------------------


def _number(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> float:
    # bool is an int subclass; "true" as a latency is a caller bug, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultConfigError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise FaultConfigError(f"{name} must be {relation} {minimum:g}, got {value!r}")
    return float(value)


def _probability(name: str, value: object) -> float:
    number = _number(name, value)
    if number > 1.0:
        raise FaultConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
    return number


def _integer(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise FaultConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _status(name: str, value: object, *, low: int, high: int = 599) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    status = _integer(name, value, minimum=-(2**31))
    if not low <= status <= high:
        raise FaultConfigError(f"{name} must be an HTTP status in [{low}, {high}], got {value!r}")
    return status


def _object(name: str, value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise FaultConfigError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _reject_unknown(name: str, data: Mapping[str, object], allowed: Iterable[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise FaultConfigError(
            f"unknown {name} field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


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
            "latency_ms": _number("latency_ms", self.latency_ms),
            "latency_jitter_ms": _number("latency_jitter_ms", self.latency_jitter_ms),
            "timeout_rate": _probability("timeout_rate", self.timeout_rate),
            "timeout_s": _number("timeout_s", self.timeout_s, strict=True),
            "per_pair_window_s": _number("per_pair_window_s", self.per_pair_window_s, strict=True),
        }
        if self.per_number_rate is not None:
            floats["per_number_rate"] = _number(
                "per_number_rate", self.per_number_rate, strict=True
            )
        if self.per_pair_rate is not None:
            _integer("per_pair_rate", self.per_pair_rate, minimum=1)
        if self.seed is not None:
            _integer("seed", self.seed, minimum=-(2**63))
        if not isinstance(self.enforce_limits, bool):
            raise FaultConfigError(f"enforce_limits must be a boolean, got {self.enforce_limits!r}")
        error_rates = {
            _status("error_rates key", status, low=400): _probability(
                f"error_rates[{status}]", rate
            )
            for status, rate in _object("error_rates", self.error_rates).items()
        }
        if sum(error_rates.values()) + self.timeout_rate > 1.0 + 1e-9:
            raise FaultConfigError("sum of error_rates and timeout_rate must not exceed 1")
        overrides = {
            str(phone): _number(f"per_number_rate_overrides[{phone}]", rate, strict=True)
            for phone, rate in _object(
                "per_number_rate_overrides", self.per_number_rate_overrides
            ).items()
        }
        refusals = {}
        for target, status in _object("phone_token_refusals", self.phone_token_refusals).items():
            if not isinstance(target, str) or not target or target.count("/") > 1:
                raise FaultConfigError(
                    f"phone_token_refusals keys must be 'client_id' or 'client_id/phone_id', "
                    f"got {target!r}"
                )
            code = _status(f"phone_token_refusals[{target}]", status, low=401, high=404)
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
        obj = _object("faults", data)
        _reject_unknown("faults", obj, cls.__dataclass_fields__)
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


# --- scripted responses -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptedResponse:
    """One entry of ``POST /admin/script``: a canned answer for the next matching send(s).

    A 2xx entry without ``body`` lets the send through normally (it is recorded, and
    answered after ``delay_ms``), which is how a script says "fail twice, then succeed" or
    "succeed slowly" for one recipient while random faults stay configured.
    """

    status: int = 504
    body: Any = None
    """JSON to return; None = the default body for ``status``."""
    headers: Mapping[str, str] | None = None
    """None = default headers for ``status`` (429 gets ``Retry-After: 1``)."""
    count: int = 1
    to: str | None = None
    """Only sends to this recipient (compared by digits) consume the entry."""
    delay_ms: float = 0.0
    timeout: bool = False
    """Hang ``Faults.timeout_s`` seconds, then answer 504 (``status`` is ignored)."""
    after_accept: str | None = None
    """Accept and record the send, then never answer it: ``"hang"`` (until ``timeout_s``, a
    client's read timeout) or ``"drop"`` (close the connection). The sender cannot know."""

    def __post_init__(self) -> None:
        """Validate the entry."""
        _status("status", self.status, low=200)
        if self.after_accept not in (None, "hang", "drop"):
            raise FaultConfigError(f"after_accept must be hang or drop, got {self.after_accept!r}")
        _integer("count", self.count, minimum=1)
        _number("delay_ms", self.delay_ms)
        if not isinstance(self.timeout, bool):
            raise FaultConfigError(f"timeout must be a boolean, got {self.timeout!r}")
        if self.to is not None and (not isinstance(self.to, str) or not digits_of(self.to)):
            raise FaultConfigError(f"to must be a phone number string, got {self.to!r}")
        if self.headers is not None:
            headers = _object("headers", self.headers)
            if not all(isinstance(v, str) for v in headers.values()):
                raise FaultConfigError("headers values must be strings")
            object.__setattr__(self, "headers", {str(k): str(v) for k, v in headers.items()})

    @classmethod
    def from_json(cls, data: object) -> ScriptedResponse:
        """Build from one JSON entry; ``status`` is required unless ``timeout`` is true."""
        obj = _object("script entry", data)
        _reject_unknown("script entry", obj, cls.__dataclass_fields__)
        if "status" not in obj and obj.get("timeout") is not True:
            if obj.get("after_accept") is None:
                raise FaultConfigError("script entry needs a status (or timeout: true)")
            obj = {**obj, "status": 200}
        try:
            return cls(**obj)  # type: ignore[arg-type]  # values are validated in __post_init__
        except TypeError as exc:
            raise FaultConfigError(str(exc)) from exc

    @property
    def passes_through(self) -> bool:
        """True if the matching send should be processed normally."""
        return not self.timeout and 200 <= self.status < 300 and self.body is None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form of this entry."""
        return {
            "status": self.status,
            "body": self.body,
            "headers": None if self.headers is None else dict(self.headers),
            "count": self.count,
            "to": self.to,
            "delay_ms": self.delay_ms,
            "timeout": self.timeout,
            "after_accept": self.after_accept,
        }


class ScriptQueue:
    """Scripted responses, consumed in order by the sends they match."""

    def __init__(self) -> None:
        """Create an empty queue."""
        # [entry, recipient digits or None, remaining uses]; a list because
        # entries restricted to other recipients must be skipped, not popped.
        self._entries: list[tuple[ScriptedResponse, str | None, list[int]]] = []

    def extend(self, entries: Iterable[ScriptedResponse]) -> None:
        """Append entries after the ones already queued."""
        for entry in entries:
            wa_id = None if entry.to is None else digits_of(entry.to)
            self._entries.append((entry, wa_id, [entry.count]))

    def take(self, wa_id: str) -> ScriptedResponse | None:
        """Consume one use of the first entry matching recipient ``wa_id``."""
        for index, (entry, target, remaining) in enumerate(self._entries):
            if target is None or target == wa_id:
                remaining[0] -= 1
                if remaining[0] == 0:
                    del self._entries[index]
                return entry
        return None

    def pending(self) -> int:
        """Return how many scripted responses are still to be consumed."""
        return sum(remaining[0] for _, _, remaining in self._entries)

    def clear(self) -> None:
        """Drop all queued entries."""
        self._entries.clear()

    def to_json(self) -> list[dict[str, Any]]:
        """Return the queued entries, ``count`` being the remaining uses."""
        return [{**entry.to_json(), "count": remaining[0]} for entry, _, remaining in self._entries]


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
