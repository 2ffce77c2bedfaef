"""One dead letter as the tooling sees it: what it says (reason, outcome, job, age) and how it is
shown (``dlq list``, ``dlq show``, ``dlq export``), with secrets redacted and recipients
masked."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from dramatiq.common import xq_name

from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.jobs.phones import mask_phone
from worker.jobs.wire import ENVELOPE_FIELDS, UNDECODABLE_ACTOR
from worker.observability.logging import scrub_text

__all__ = [
    "DLQ_QUEUES",
    "NO_REASON",
    "OUTCOMES",
    "DeadLetterEntry",
    "DlqError",
    "redact_secrets",
]

#: The work queues whose dead-letter queues the tooling reads, in this order.
DLQ_QUEUES: tuple[str, ...] = (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE)
#: The reason shown for dead letters without our header (e.g. rejected by RabbitMQ itself).
NO_REASON = "no reason recorded"
#: ``outcome`` values; ``unknown`` is a dead letter without our header.
OUTCOMES: tuple[str, ...] = ("invalid", "failed", "gave_up", "unknown")

_SECRET_KEY = re.compile(r"token|secret|password|passwd|authorization|api[_-]?key", re.I)


class DlqError(Exception):
    """A dead-letter operation could not go on (RabbitMQ gone, a publish not confirmed).
    The message is safe to print: it holds no secrets or recipients."""


def redact_secrets(value: Any) -> Any:
    """``value`` with token-like keys blanked and free text scrubbed (for printing)."""
    if isinstance(value, dict):
        return {
            k: "[REDACTED]" if _SECRET_KEY.search(str(k)) else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


# --- entries -------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """An AMQP table value as plain JSON-able data."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return stamp.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead letter as read from ``<queue>.XQ`` (nothing here is masked)."""

    queue: str
    body: bytes
    header: dict[str, Any]
    payload: dict[str, Any] | None
    x_death: dict[str, Any] | None
    amqp_message_id: str | None
    amqp_timestamp_ms: int | None

    @classmethod
    def from_delivery(cls, queue: str, properties: Any, body: bytes) -> DeadLetterEntry:
        headers = getattr(properties, "headers", None) or {}
        ours = headers.get(DEAD_LETTER_HEADER)
        header = _plain(ours) if isinstance(ours, dict) else {}
        deaths = headers.get("x-death")
        x_death = _plain(deaths[0]) if isinstance(deaths, list) and deaths else None
        try:
            decoded = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            decoded = None
        timestamp = getattr(properties, "timestamp", None)
        return cls(
            queue=queue,
            body=body,
            header=header,
            payload=decoded if isinstance(decoded, dict) else None,
            x_death=x_death,
            amqp_message_id=_str_or_none(getattr(properties, "message_id", None)),
            amqp_timestamp_ms=timestamp * 1000 if isinstance(timestamp, int) else None,
        )

    # --- identity and reason ---------------------------------------------------------------------
    @property
    def id(self) -> str:
        """The dramatiq message id; for a body without one, a hash of the body (stable)."""
        for candidate in (
            self.header.get("message_id"),
            self.amqp_message_id,
            (self.payload or {}).get("message_id"),
        ):
            if isinstance(candidate, str) and candidate:
                return candidate
        return "sha256-" + hashlib.sha256(self.body).hexdigest()[:24]

    @property
    def reason(self) -> str:
        reason = self.header.get("reason")
        return str(reason) if reason else NO_REASON

    @property
    def outcome(self) -> str:
        outcome = self.header.get("outcome")
        return str(outcome) if outcome else "unknown"

    @property
    def actor(self) -> str | None:
        actor = self.header.get("actor") or (self.payload or {}).get("actor_name")
        return str(actor) if actor else None

    @property
    def attempts(self) -> int | None:
        return _int_or_none(self.header.get("attempts"))

    @property
    def http_status(self) -> int | None:
        return _int_or_none(self.header.get("http_status"))

    @property
    def code(self) -> str | None:
        return _str_or_none(self.header.get("code"))

    @property
    def dead_lettered_at_ms(self) -> int | None:
        """When it was dead-lettered: our header, else RabbitMQ's ``x-death``, else the
        publish timestamp."""
        ms = _int_or_none(self.header.get("dead_lettered_at_ms"))
        if ms is not None:
            return ms
        when = (self.x_death or {}).get("time")
        if isinstance(when, str):
            try:
                return int(dt.datetime.fromisoformat(when).timestamp() * 1000)
            except ValueError:
                pass
        return self.amqp_timestamp_ms

    def age_s(self, now_ms: int) -> float | None:
        at = self.dead_lettered_at_ms
        return None if at is None else max(now_ms - at, 0) / 1000

    # --- the job ---------------------------------------------------------------------------------
    @property
    def kwargs(self) -> dict[str, Any]:
        kwargs = (self.payload or {}).get("kwargs")
        return kwargs if isinstance(kwargs, dict) else {}

    def _kwarg(self, name: str) -> str | None:
        value = self.kwargs.get(name)
        return value if isinstance(value, str) else None

    @property
    def client_id(self) -> str | None:
        return self._kwarg("client_id")

    @property
    def phone_id(self) -> str | None:
        return self._kwarg("phone_id")

    @property
    def campaign_id(self) -> str | None:
        return self._kwarg("campaign_id")

    @property
    def recipient(self) -> str | None:
        return self._kwarg("to")

    @property
    def undecodable(self) -> bool:
        """The body is not a job the worker could take (it cannot be replayed)."""
        payload = self.payload
        return (
            self.header.get("actor") == UNDECODABLE_ACTOR
            or payload is None
            or not isinstance(payload.get("actor_name"), str)
            or not isinstance(payload.get("kwargs"), dict)
            or not set(payload) <= ENVELOPE_FIELDS
        )

    # --- views -----------------------------------------------------------------------------------
    def summary(self, now_ms: int) -> dict[str, Any]:
        """What ``dlq list`` shows, recipient masked, free text scrubbed."""
        recipient = self.recipient
        return {
            "id": self.id,
            "queue": self.queue,
            "actor": self.actor,
            "outcome": self.outcome,
            "reason": scrub_text(self.reason),
            "error": _str_or_none(self.header.get("error")),
            "http_status": self.http_status,
            "code": self.code,
            "attempts": self.attempts,
            "dead_lettered_at_ms": self.dead_lettered_at_ms,
            "age_s": None if (age := self.age_s(now_ms)) is None else round(age, 1),
            "client_id": self.client_id,
            "phone_id": self.phone_id,
            "campaign_id": self.campaign_id,
            "to": mask_phone(recipient) if recipient else None,
            "size": len(self.body),
            "undecodable": self.undecodable,
        }

    def details(self, now_ms: int) -> dict[str, Any]:
        """What ``dlq show`` prints: every header field and the body, masked and scrubbed."""
        body: Any
        if self.payload is not None:
            body = copy.deepcopy(self.payload)
            kwargs = body.get("kwargs")
            if isinstance(kwargs, dict) and isinstance(kwargs.get("to"), str):
                kwargs["to"] = mask_phone(kwargs["to"])
        else:
            try:
                body = self.body.decode("utf-8")
            except UnicodeDecodeError:
                body = {"base64": base64.b64encode(self.body).decode("ascii")}
        shown: dict[str, Any] = {
            "summary": self.summary(now_ms),
            "header": self.header or None,
            "x_death": self.x_death,
            "body": body,
        }
        return dict(redact_secrets(shown))

    def export_record(self) -> dict[str, Any]:
        """One line of ``dlq export``: every header field plus the original body, unmasked
        (it is the same data as the queue holds)."""
        record: dict[str, Any] = {
            "id": self.id,
            "queue": self.queue,
            "dead_letter_queue": xq_name(self.queue),
            "actor": self.actor,
            "outcome": self.outcome,
            "reason": self.reason,
            "dead_lettered_at_ms": self.dead_lettered_at_ms,
            "undecodable": self.undecodable,
            "header": self.header or None,
            "x_death": self.x_death,
            "amqp_message_id": self.amqp_message_id,
        }
        if self.payload is not None:
            record["body"] = self.body.decode("utf-8")
            record["body_encoding"] = "text"
        else:
            record["body"] = base64.b64encode(self.body).decode("ascii")
            record["body_encoding"] = "base64"
        return record


# --- filters -------------------------------------------------------------------------------------
