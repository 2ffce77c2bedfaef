"""Turn a failed Verloop response into one of our errors: transient, permanent or bad token.

Verloop publishes no status codes or error bodies (see docs/verloop-api.md), so we classify by
the HTTP status first, and let a recognised code anywhere in a JSON body take precedence: Meta's
WhatsApp error codes (``{"error": {"code": 131056, "message": ...}}``) and Twirp codes
(``{"code": "unavailable", "msg": ...}``), which Verloop uses for its Campaign API.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from worker.errors import JobFailure, PermanentFailure, TokenInvalid, TransientFailure
from worker.observability.logging import scrub_text

__all__ = [
    "DEFAULT_DELAYS_S",
    "ERROR_NAMES",
    "classify_response",
    "error_name",
    "parse_retry_after",
]

#: Meta codes that ask for a retry, and the wait we apply when no Retry-After says otherwise.
DEFAULT_DELAYS_S: Mapping[int, float] = {
    130429: 1.0,  # number throughput exceeded: slow down briefly
    131056: 10.0,  # pair rate limit: this recipient only (pacing comes with the limiter)
    131057: 60.0,  # number in maintenance/upgrade: about a minute
    4: 30.0,  # app call limit: whole account backs off
    80007: 30.0,  # account rate limit
    1: 0.0,  # transient server errors: ordinary backoff
    2: 0.0,
    131000: 0.0,
    131016: 0.0,
}

#: Short names of the Meta codes reports name (``campaign status``'s failures by code): the
#: ones a campaign's failed statuses mostly carry.
ERROR_NAMES: Mapping[int, str] = {
    131026: "undeliverable",
    131049: "marketing cap",
    131048: "spam rate limit",
    131047: "re-engagement window",
    131056: "pair rate limit",
    130429: "rate limit",
}


def error_name(code: int | str) -> str | None:
    """The short name of a Meta error code (``131026`` or ``"131026"``), None if it has none."""
    if isinstance(code, str):
        if not (code.isascii() and code.isdigit()):
            return None
        code = int(code)
    return ERROR_NAMES.get(code)


#: Token invalid or expired: refresh the phone token once.
TOKEN_CODES = frozenset({0, 190})

#: Twirp codes worth retrying; every other Twirp code is permanent.
TWIRP_TRANSIENT = frozenset(
    {"internal", "unavailable", "deadline_exceeded", "resource_exhausted", "aborted", "unknown"}
)
TWIRP_TOKEN = frozenset({"unauthenticated"})

_MAX_REASON_CHARS = 300


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (now if now is not None else time.time()), 0.0)


#: Error codes sit near the top of an error body; deeper levels are not searched.
_MAX_SEARCH_DEPTH = 8


def _walk(body: Any) -> Iterator[dict[str, Any]]:
    """Every object in ``body``, breadth first, down to :data:`_MAX_SEARCH_DEPTH` levels."""
    level = [body]
    for _ in range(_MAX_SEARCH_DEPTH):
        deeper: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                yield node
                deeper.extend(node.values())
            elif isinstance(node, list):
                deeper.extend(node)
        if not deeper:
            return
        level = deeper


def _find_code_and_message(body: Any) -> tuple[int | str | None, str | None]:
    """The first error code (Meta int or Twirp string) and message found in a JSON body."""
    for node in _walk(body):
        code = node.get("code")
        message = node.get("message") or node.get("msg") or node.get("error_user_msg")
        if isinstance(code, bool):
            continue
        if isinstance(code, int):
            return code, message if isinstance(message, str) else None
        if isinstance(code, str) and code:
            if code.isdigit():
                return int(code), message if isinstance(message, str) else None
            return code.lower(), message if isinstance(message, str) else None
    return None, None


def _is_meta_code(code: int, *ranges: tuple[int, int]) -> bool:
    return any(low <= code <= high for low, high in ranges)


def classify_response(
    status: int, content: bytes, headers: Mapping[str, str], *, what: str
) -> JobFailure:
    """The error to raise for a non-2xx Verloop response to the call named ``what``."""
    try:
        body: Any = orjson.loads(content) if content else None
    except ValueError:  # not JSON, or nested beyond any real error body
        body = None
    code, message = _find_code_and_message(body)
    if code == status:
        code = None  # a body that only repeats the HTTP status says nothing more
    retry_after = parse_retry_after(_header(headers, "retry-after"))
    # Verloop's text is kept for ops, minus anything that looks like one of our secrets.
    detail = scrub_text((message or _status_text(status))[:_MAX_REASON_CHARS])
    reason = f"{what} failed: {detail}"

    def transient(delay: float | None = None) -> TransientFailure:
        wait = retry_after if retry_after is not None else (delay or None)
        return TransientFailure(reason, http_status=status, code=code, retry_after=wait)

    def permanent() -> PermanentFailure:
        return PermanentFailure(reason, http_status=status, code=code)

    if isinstance(code, int):
        if code in TOKEN_CODES:
            return TokenInvalid(reason, http_status=status, code=code)
        if code in DEFAULT_DELAYS_S:
            return transient(DEFAULT_DELAYS_S[code])
        # Everything else Meta documents is permanent: undeliverable (131026), outside the
        # 24 h window (131047), bad parameters (100, 132xxx), permissions (10, 200-299),
        # policy/account blocks (368, 131031, 131042), quality (131048), marketing cap (131049).
        if code in {10, 100, 368, 131026, 131031, 131042, 131047, 131048, 131049} or (
            _is_meta_code(code, (200, 299), (132000, 132999))
        ):
            return permanent()
        # An unknown code: the HTTP status decides, below.
    elif isinstance(code, str):
        if code in TWIRP_TOKEN:
            return TokenInvalid(reason, http_status=status, code=code)
        if code in TWIRP_TRANSIENT:
            return transient()
        if 400 <= status < 500 and status not in (408, 429):
            return permanent()

    if status in (401, 403):
        return TokenInvalid(reason, http_status=status, code=code)
    if status in (408, 425, 429) or status >= 500:
        return transient()
    return permanent()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; httpx.Headers is not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def _status_text(status: int) -> str:
    return {
        400: "bad request",
        401: "unauthorized",
        403: "forbidden",
        404: "not found",
        408: "request timeout",
        409: "conflict",
        413: "payload too large",
        422: "unprocessable entity",
        429: "too many requests",
        500: "internal server error",
        502: "bad gateway",
        503: "service unavailable",
        504: "gateway timeout",
    }.get(status, f"HTTP {status}")
