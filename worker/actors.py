"""The actors: each job's path, step by step, top to bottom.

``send_message``:
  1. validate the job (:func:`worker.jobs.parse_job`)  → invalid: dead letter, no retry
  2. find the phone token (file → memory → Redis → Verloop)
  3. wait for the number's slot (:mod:`worker.limits`)  → too far: re-delayed, no retry used
  4. call Verloop's send endpoint                       → classified failure: retry or dead letter;
                                                          rate-limit answers teach the limiter
  5. on a rejected token: refresh it once and send again; rejected again: dead letter

Failures are raised, not handled here: :mod:`worker.outcomes` retries or dead-letters them and
writes the job's one log line, to which each step adds its fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq

from .errors import JobFailure, PermanentFailure, RedisUnavailable, TokenInvalid
from .jobs import (
    ACTOR_QUEUES,
    Job,
    ListClientsJob,
    RefreshPhoneTokenJob,
    SendMessageJob,
    parse_job,
)
from .limits import Lane
from .limits.gate import held_while_redis_is_down
from .outcomes import JobRecord, current_job
from .phones import mask_phone
from .services import Lifecycle, Services
from .verloop.client import SendResult

__all__ = ["list_clients", "refresh_phone_token", "register_actors", "send_message"]


def send_message(services: Services, job: SendMessageJob, record: JobRecord) -> None:
    """Send one WhatsApp message (see the module docstring for the steps)."""
    tokens = services.phone_tokens
    lane: Lane = "campaign" if record.fields.get("lane") == "campaign" else "transactional"
    try:
        token, source = tokens.get(job.client_id, job.phone_id)
    except RedisUnavailable as exc:
        raise held_while_redis_is_down(exc, "redis_unavailable") from None
    record.bind(token_source=source)
    try:
        result = _paced_send(services, token, job, lane, record)
    except TokenInvalid:
        try:
            token, source = tokens.refresh(job.client_id, job.phone_id, rejected=token)
        except RedisUnavailable as exc:
            raise held_while_redis_is_down(exc, "redis_unavailable") from None
        record.bind(token_source=source, token_refreshed=True)
        try:
            result = _paced_send(services, token, job, lane, record)
        except TokenInvalid as exc:
            raise PermanentFailure(
                "Verloop rejected the phone token again after refreshing it; check the number's "
                "token in Verloop (Client Details → Generate Token)",
                http_status=exc.details.http_status,
                code=exc.details.code,
            ) from None
    record.bind(
        outcome="sent", verloop_message_id=result.message_id, http_status=result.http_status
    )


def _paced_send(
    services: Services, token: str, job: SendMessageJob, lane: Lane, record: JobRecord
) -> SendResult:
    """One call to Verloop in the number's next slot."""
    waited = services.gate.admit(job.phone_id, job.to, lane)
    if waited > 0.0005:
        record.bind(limit_wait_ms=round(waited * 1000, 1))
    try:
        return services.verloop.send_message(
            token, job.request_body(), idempotency_key=job.idempotency_key
        )
    except TokenInvalid:
        raise
    except JobFailure as exc:
        services.gate.react(job.phone_id, job.to, lane, exc)
        raise


def list_clients(services: Services, job: ListClientsJob, record: JobRecord) -> None:
    """List the partner's clients and log how many there are (events come with the events
    exchange)."""
    clients = services.verloop.list_clients(services.system_token.get())
    count = _count_clients(clients)
    record.bind(outcome="done", clients=count)


def _count_clients(body: Any) -> int | None:
    # The response shape is not public: count a top-level list or the first list we find.
    if isinstance(body, list):
        return len(body)
    if isinstance(body, dict):
        for value in body.values():
            if isinstance(value, list):
                return len(value)
    return None


def refresh_phone_token(services: Services, job: RefreshPhoneTokenJob, record: JobRecord) -> None:
    """Forget the cached token of one number and fetch it again from Verloop."""
    _, source = services.phone_tokens.refresh(job.client_id, job.phone_id, rejected=None)
    record.bind(outcome="done", token_source=source)


_Handler = Callable[[Services, Any, JobRecord], None]
_HANDLERS: dict[str, _Handler] = {
    "send_message": send_message,
    "list_clients": list_clients,
    "refresh_phone_token": refresh_phone_token,
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
        )
    elif isinstance(job, RefreshPhoneTokenJob):
        record.bind(client_id=job.client_id, phone_id=job.phone_id)
    if job.metadata is not None:
        record.bind(metadata=job.metadata)


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
