"""Every error the worker raises, under one root.

Third-party exceptions (httpx, pika, redis, pydantic) are translated where they happen, so code
above the boundary catches only these::

    VerloopWorkerError
    ├── ConfigurationError      settings or files are wrong; the process cannot start
    ├── EnqueueError            a producer could not get RabbitMQ to confirm a job
    ├── RedisUnavailable        shared state (limiter, token cache) cannot be reached: sends
    │                           are held, never made without it
    ├── Deferred                not an error: the job must wait (rate limit, pause); it is
    │                           re-delayed without using up a retry
    └── JobFailure              one job could not be completed; carries a FailureDetails
        ├── InvalidJob          the job itself is malformed: dead-letter at once, never retry
        ├── PermanentFailure    Verloop refused it for good: dead-letter at once, never retry
        ├── TokenInvalid        Verloop rejected the token: refresh it once, then permanent
        └── TransientFailure    may work later: retry with backoff (honouring retry_after)
            └── OutcomeUnknown  the request was written but no answer came back: a send may
                                have been delivered (UNCERTAIN_SEND_POLICY decides)

Messages never contain a token or a password: they are built from field names, HTTP statuses and
Verloop's own error text, never from request headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ConfigurationError",
    "Deferred",
    "EnqueueError",
    "FailureDetails",
    "InvalidJob",
    "JobFailure",
    "OutcomeUnknown",
    "PermanentFailure",
    "RedisUnavailable",
    "TokenInvalid",
    "TransientFailure",
    "VerloopWorkerError",
]


class VerloopWorkerError(Exception):
    """Root of every error raised by verloop-worker."""


class ConfigurationError(VerloopWorkerError):
    """Settings, credentials or a config file are missing or wrong."""


class EnqueueError(VerloopWorkerError):
    """A job was not confirmed by RabbitMQ; the caller must treat it as not enqueued."""


class RedisUnavailable(VerloopWorkerError):
    """Redis, which holds the rate limiter and the token cache, did not answer."""


class LedgerNotReplicated(RedisUnavailable):
    """With ``LEDGER_DURABILITY=replica``: the primary wrote a send's record (and the commands
    that went with it, whose replies are ``replies``) but no replica confirmed it in time; the
    ledger writes it again later. The message was sent."""

    def __init__(self, message: str, replies: list[object]) -> None:
        super().__init__(message)
        self.replies = replies


class Deferred(VerloopWorkerError):
    """Control flow, not a failure: send this job again in ``delay_s`` seconds, with its retry
    count unchanged (its number's slot is far away, its recipient is cooling down...)."""

    def __init__(
        self,
        delay_s: float,
        reason: str,
        *,
        kind: str = "other",
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason
        #: A short, fixed name for metrics: ``rate_limit``, ``recipient_cooling``...
        self.kind = kind
        #: What the copy sent again carries instead of the job's kwargs (the part of a job
        #: still to do: a status job's statuses whose sends are not recorded yet).
        self.kwargs = kwargs


@dataclass(frozen=True, slots=True)
class FailureDetails:
    """What ops need to read about a failure later (it is copied into dead letters).

    Attributes:
        reason: one human sentence saying what went wrong.
        http_status: Verloop's HTTP status, when there was a response.
        code: Verloop's or Meta's error code (``"131056"``, ``"unauthenticated"``), if any.
        retry_after: seconds Verloop asked us to wait (``Retry-After``), if any.
    """

    reason: str
    http_status: int | None = None
    code: str | None = None
    retry_after: float | None = None


class JobFailure(VerloopWorkerError):
    """A job failed; ``details`` says why. Subclasses say whether to retry."""

    #: Whether the retry policy may try this job again.
    retryable: bool = False

    def __init__(
        self,
        reason: str,
        *,
        http_status: int | None = None,
        code: str | int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.details = FailureDetails(
            reason=reason,
            http_status=http_status,
            code=None if code is None else str(code),
            retry_after=retry_after,
        )

    def __str__(self) -> str:
        parts = [self.details.reason]
        if self.details.http_status is not None:
            parts.append(f"HTTP {self.details.http_status}")
        if self.details.code is not None:
            parts.append(f"code {self.details.code}")
        return " | ".join(parts)


class InvalidJob(JobFailure):
    """The job is malformed (bad JSON, missing or unknown field, bad phone number...)."""


class PermanentFailure(JobFailure):
    """Verloop refused the job in a way that retrying will not fix."""


class TokenInvalid(JobFailure):
    """Verloop rejected the token used for the call (401/403, codes 0/190, ``unauthenticated``)."""


class TransientFailure(JobFailure):
    """A failure that may clear up: timeouts, connect errors, 5xx, 429, transient codes."""

    retryable = True


class OutcomeUnknown(TransientFailure):
    """The request reached the network but no answer came back (a read timeout, a connection
    dropped mid-response): Verloop may have acted on it. Harmless to retry for a read; for a
    send, ``UNCERTAIN_SEND_POLICY`` decides."""
