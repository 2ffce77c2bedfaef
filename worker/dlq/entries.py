"""Dead letters as the tooling sees them: entries, filters, edits and small parsers."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from dramatiq.common import xq_name

from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.jobs.phones import mask_phone
from worker.observability.logging import scrub_text
from worker.runtime.broker import UNDECODABLE_ACTOR

__all__ = [
    "DLQ_QUEUES",
    "NO_REASON",
    "OUTCOMES",
    "DeadLetterEntry",
    "DlqError",
    "Edit",
    "Filters",
    "apply_edits",
    "format_age",
    "id_matches",
    "parse_duration",
    "parse_edit",
    "redact_secrets",
    "short_id",
]

#: The work queues whose dead-letter queues the tooling reads, in this order.
DLQ_QUEUES: tuple[str, ...] = (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE)
#: The reason shown for dead letters without our header (e.g. rejected by RabbitMQ itself).
NO_REASON = "no reason recorded"
#: ``outcome`` values; ``unknown`` is a dead letter without our header.
OUTCOMES: tuple[str, ...] = ("invalid", "failed", "gave_up", "unknown")

_ENVELOPE_FIELDS = frozenset(
    {"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"}
)
_SECRET_KEY = re.compile(r"token|secret|password|passwd|authorization|api[_-]?key", re.I)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.I)
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class DlqError(Exception):
    """A dead-letter operation could not go on (RabbitMQ gone, a publish not confirmed).
    The message is safe to print: it holds no secrets or recipients."""


# --- small parsers -------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"7d"`` → seconds.

    Raises:
        ValueError: saying what is accepted.
    """
    compact = text.strip().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts).lower() != compact.lower():
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 2h, 1h30m or 7d")
    return sum(float(n) * _UNITS_S[u.lower()] for n, u in parts)


def format_age(seconds: float | None) -> str:
    """``42s``, ``12m``, ``3h05m``, ``2d04h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


#: The shortest id prefix ``--id`` and ``show`` accept.
MIN_ID_PREFIX = 8


def short_id(entry_id: str) -> str:
    """The id as tables show it: enough characters to find it again with ``--id``."""
    keep = MIN_ID_PREFIX + (len("sha256-") if entry_id.startswith("sha256-") else 0)
    return entry_id[:keep]


def id_matches(entry_id: str, wanted: str) -> bool:
    """``wanted`` is the id itself or a prefix of at least :data:`MIN_ID_PREFIX` characters."""
    return entry_id == wanted or (len(wanted) >= MIN_ID_PREFIX and entry_id.startswith(wanted))


@dataclass(frozen=True, slots=True)
class Edit:
    """``--set message.template.name=order_v2``: a dotted path into the job's kwargs."""

    path: tuple[str, ...]
    value: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def parse_edit(text: str) -> Edit:
    """``PATH=VALUE``; VALUE is JSON if it parses as JSON, else the plain string.

    Raises:
        ValueError: no ``=`` or an empty path segment.
    """
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"{text!r} is not PATH=VALUE (e.g. message.template.name=order_v2)")
    parts = tuple(p.strip() for p in path.split("."))
    if any(not p for p in parts):
        raise ValueError(f"{path!r} has an empty segment")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return Edit(parts, value)


def apply_edits(kwargs: dict[str, Any], edits: Sequence[Edit]) -> dict[str, Any]:
    """A deep copy of ``kwargs`` with each edit applied (lists take integer indexes).

    A missing last key is added; a missing intermediate one is an error (a typo should not
    silently build a new branch).

    Raises:
        ValueError: naming the path that does not fit the job.
    """
    result = copy.deepcopy(kwargs)
    for edit in edits:
        node: Any = result
        for depth, key in enumerate(edit.path):
            last = depth == len(edit.path) - 1
            where = ".".join(edit.path[: depth + 1])
            if isinstance(node, dict):
                if last:
                    node[key] = edit.value
                elif key not in node:
                    raise ValueError(f"{where}: no such field in the job")
                else:
                    node = node[key]
            elif isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ValueError(f"{where}: not an index of a list of {len(node)}")
                if last:
                    node[int(key)] = edit.value
                else:
                    node = node[int(key)]
            else:
                raise ValueError(f"{where}: {'.'.join(edit.path[:depth])} is not an object")
    return result


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
            or not set(payload) <= _ENVELOPE_FIELDS
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
@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command applies to; every given criterion must match."""

    reason: str | None = None
    outcomes: frozenset[str] = frozenset()
    client_id: str | None = None
    phone_id: str | None = None
    campaign_id: str | None = None
    recipient: str | None = None
    older_than_s: float | None = None
    newer_than_s: float | None = None
    ids: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return self == Filters()

    def matches(self, entry: DeadLetterEntry, now_ms: int) -> bool:
        if self.ids and not any(id_matches(entry.id, wanted) for wanted in self.ids):
            return False
        if self.reason is not None and self.reason.casefold() not in entry.reason.casefold():
            return False
        if self.outcomes and entry.outcome not in self.outcomes:
            return False
        if self.client_id is not None and entry.client_id != self.client_id:
            return False
        if self.phone_id is not None and entry.phone_id != self.phone_id:
            return False
        if self.campaign_id is not None and entry.campaign_id != self.campaign_id:
            return False
        if self.recipient is not None and entry.recipient != self.recipient:
            return False
        if self.older_than_s is not None or self.newer_than_s is not None:
            age = entry.age_s(now_ms)
            if age is None:
                return False
            if self.older_than_s is not None and age < self.older_than_s:
                return False
            if self.newer_than_s is not None and age > self.newer_than_s:
                return False
        return True
