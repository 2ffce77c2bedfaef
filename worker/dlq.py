"""Dead-letter tooling: read, filter, replay, purge and export the worker's dead letters.

The worker dead-letters a job to ``<queue>.XQ`` with the reason in the AMQP header
:data:`~worker.deadletters.DEAD_LETTER_HEADER` (see :mod:`worker.deadletters`). This module
reads those queues for ``verloop-worker dlq`` (:mod:`worker.dlq_cli`); it has no command-line
code of its own.

**Reading never loses anything.** Dead letters are taken with ``basic.get`` *without*
acknowledging them, one at a time (bounded memory, however long the queue), on a channel that
is closed at the end: RabbitMQ then puts every unacknowledged message back where it was. A
reader takes at most as many messages as the queue held when it started, so dead letters that
arrive meanwhile (a replayed job that fails again) are not read twice. Removing a dead letter is
acknowledging it, which happens only:

* ``replay``: after RabbitMQ confirmed the re-published job;
* ``export --remove``: after the export file was written, flushed and synced;
* ``purge``: after the operator confirmed the count, for the matching entries only.

An interrupted command therefore leaves each dead letter either in its queue or, at worst for a
replay cut between the confirm and the acknowledgement, in both its queue and the dead-letter
queue; the idempotency ledger keeps such a job from being sent twice.

**Replay safety.** A replayed job is the original body with its options reset (no retry or
deferral counts), published to its original queue, *keeping its dramatiq message_id*: a send
without ``idempotency_key`` or ``campaign_id`` has the ledger key ``message:<message_id>``, so
keeping the id keeps the worker's duplicate check working for it. Before replaying a
``send_message`` job the ledger is consulted: ``sent`` is never replayed (only dropped from the
queue on request); ``pending`` (the outcome of an earlier call is unknown) is replayed only on
request, after the unfinished claim has been forgotten.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import pika
import pika.exceptions
from dramatiq.common import xq_name

from .broker import UNDECODABLE_ACTOR
from .deadletters import DEAD_LETTER_HEADER
from .errors import InvalidJob
from .jobs import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE, SendMessageJob, parse_job
from .ledger import Ledger
from .observability.logging import scrub_text
from .phones import mask_phone
from .producer import queue_arguments

__all__ = [
    "DLQ_QUEUES",
    "NO_REASON",
    "OUTCOMES",
    "DeadLetterEntry",
    "DeadLetterStore",
    "DlqError",
    "Edit",
    "Filters",
    "Held",
    "ReplayOptions",
    "ReplayResult",
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


# --- reading -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Held:
    """A dead letter taken from its queue and not yet acknowledged."""

    entry: DeadLetterEntry
    channel: Any
    delivery_tag: int

    def remove(self) -> None:
        """Acknowledge it: it leaves the dead-letter queue for good.

        Raises:
            DlqError: the channel is gone (the dead letter is back in its queue).
        """
        try:
            self.channel.basic_ack(self.delivery_tag)
        except pika.exceptions.AMQPError as exc:
            raise DlqError(
                f"could not remove {self.entry.id} from {xq_name(self.entry.queue)} "
                f"({type(exc).__name__}); it is still there"
            ) from None


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    edits: tuple[Edit, ...] = ()
    dry_run: bool = False
    drop_sent: bool = False
    resend_uncertain: bool = False


ReplayStatus = Literal["replayed", "would_replay", "dropped", "would_drop", "skipped"]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    id: str
    queue: str
    status: ReplayStatus
    note: str
    to: str | None = None  # masked

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue": self.queue,
            "status": self.status,
            "note": self.note,
            "to": self.to,
        }


class DeadLetterStore:
    """The dead-letter queues of ``queues`` on one RabbitMQ connection. Not thread-safe.

    Use as a context manager; every method that reads takes messages without acknowledging
    them and returns them to their queue when it finishes (see the module docstring).
    """

    def __init__(self, amqp_url: str, queues: Sequence[str] = DLQ_QUEUES) -> None:
        self.queues = tuple(queues)
        params = pika.URLParameters(amqp_url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.blocked_connection_timeout = 30
        # No heartbeats: the connection idles while an operator reads a purge prompt, and
        # its unacknowledged messages must still be there when they answer. A dead peer is
        # noticed by TCP; RabbitMQ's consumer timeout (30 minutes) bounds the wait.
        params.heartbeat = 0
        try:
            self._connection = pika.BlockingConnection(params)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise DlqError(f"cannot connect to RabbitMQ ({type(exc).__name__})") from None
        self._publisher: Any = None
        self._declared: set[str] = set()
        self._reading: list[Any] = []

    def __enter__(self) -> DeadLetterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection: every dead letter read and not removed is back in its queue."""
        self._reading = []
        if self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()

    # --- reading ---------------------------------------------------------------------------------
    def depths(self) -> dict[str, int]:
        """Dead letters waiting per work queue (0 when its dead-letter queue does not exist)."""
        depths = {}
        for queue in self.queues:
            channel = self._connection.channel()
            try:
                ok = channel.queue_declare(xq_name(queue), passive=True)
                depths[queue] = int(ok.method.message_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise DlqError(f"cannot read {xq_name(queue)}: {exc.reply_text}") from None
                depths[queue] = 0
            finally:
                if channel.is_open:
                    channel.close()
        return depths

    def held(
        self, filters: Filters, *, on_read: Callable[[], None] | None = None
    ) -> Iterator[Held]:
        """Every matching dead letter, held unacknowledged until :meth:`release` (or
        :meth:`close`), which returns every one not removed with :meth:`Held.remove` to its
        queue, in its place.

        Each queue is read up to the depth it had when reading began. ``on_read`` is called
        for every message read, matching or not.
        """
        for queue, depth in self.depths().items():
            if depth == 0:
                continue
            channel = self._connection.channel()
            self._reading.append(channel)
            for _ in range(depth):
                now_ms = int(time.time() * 1000)
                try:
                    method, properties, body = channel.basic_get(xq_name(queue), auto_ack=False)
                except pika.exceptions.AMQPError as exc:
                    raise DlqError(
                        f"reading {xq_name(queue)} failed ({type(exc).__name__}); "
                        "every dead letter not yet handled stays in its queue"
                    ) from None
                if method is None:
                    break
                if on_read is not None:
                    on_read()
                entry = DeadLetterEntry.from_delivery(queue, properties, bytes(body))
                if filters.matches(entry, now_ms):
                    yield Held(entry, channel, method.delivery_tag)

    def release(self) -> None:
        """Return every dead letter read and not removed to its queue."""
        channels, self._reading = self._reading, []
        for channel in channels:
            if channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.close()  # unacknowledged messages return to their queue

    def entries(
        self, filters: Filters, *, on_read: Callable[[], None] | None = None
    ) -> Iterator[DeadLetterEntry]:
        """Every matching dead letter, read-only: all of them are back in their queue when
        the iteration ends (or is closed)."""
        try:
            for held in self.held(filters, on_read=on_read):
                yield held.entry
        finally:
            self.release()

    # --- removing --------------------------------------------------------------------------------
    @staticmethod
    def remove(helds: Iterable[tuple[Any, int]]) -> int:
        """Acknowledge (channel, delivery tag) pairs of dead letters taken by :meth:`held`
        and not released yet; returns how many.

        Raises:
            DlqError: a channel is gone; what was not removed is back in its queue.
        """
        count = 0
        for channel, tag in helds:
            try:
                channel.basic_ack(tag)
            except pika.exceptions.AMQPError as exc:
                raise DlqError(
                    f"removing dead letters failed after {count} ({type(exc).__name__}); "
                    "the others are still in their queue"
                ) from None
            count += 1
        return count

    # --- replay ----------------------------------------------------------------------------------
    def replay(
        self,
        filters: Filters,
        options: ReplayOptions,
        ledger: Ledger | None,
        *,
        on_read: Callable[[], None] | None = None,
    ) -> Iterator[ReplayResult]:
        """Replay every matching dead letter (see the module docstring for the rules).

        Raises:
            DlqError: a publish was not confirmed or RabbitMQ went away; the dead letter
                being replayed and every later one stay in their queue.
            RedisUnavailable: the ledger could not be read; the same holds.
        """
        try:
            for held in self.held(filters, on_read=on_read):
                yield self._replay_one(held, options, ledger)
        finally:
            self.release()

    def _replay_one(
        self, held: Held, options: ReplayOptions, ledger: Ledger | None
    ) -> ReplayResult:
        entry = held.entry
        masked = mask_phone(entry.recipient) if entry.recipient else None

        def result(status: ReplayStatus, note: str) -> ReplayResult:
            return ReplayResult(entry.id, entry.queue, status, note, masked)

        if entry.undecodable:
            return result(
                "skipped",
                "undecodable body: cannot be replayed (export it, fix it, enqueue it again)",
            )
        payload = entry.payload or {}
        actor = str(payload["actor_name"])
        try:
            kwargs = apply_edits(entry.kwargs, options.edits)
        except ValueError as exc:
            return result("skipped", f"edit does not apply: {exc}")
        args = payload.get("args") or []
        try:
            job = parse_job(actor, args if isinstance(args, list) else [args], kwargs)
        except InvalidJob as exc:
            return result("skipped", f"invalid, not replayed: {scrub_text(str(exc))}")
        message_id = str(payload.get("message_id") or entry.id)
        if isinstance(job, SendMessageJob):
            masked = mask_phone(job.to)
            outcome = self._check_ledger(entry, job, message_id, options, ledger, held)
            if outcome is not None:
                status, note = outcome
                return ReplayResult(entry.id, entry.queue, status, note, masked)
        edited = f" with {', '.join(e.dotted for e in options.edits)} set" if options.edits else ""
        if options.dry_run:
            return ReplayResult(
                entry.id, entry.queue, "would_replay", f"would replay{edited}", masked
            )
        body = json.dumps(
            {
                "queue_name": entry.queue,
                "actor_name": actor,
                "args": [],
                "kwargs": kwargs,
                "options": {},
                "message_id": message_id,
                "message_timestamp": int(time.time() * 1000),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        self._publish(entry.queue, body, message_id)
        try:
            held.remove()
        except DlqError:
            raise DlqError(
                f"{entry.id} was replayed but could not be removed from "
                f"{xq_name(entry.queue)}; it is still there (the ledger keeps a second "
                "replay of a send that went out from sending it again)"
            ) from None
        return ReplayResult(
            entry.id, entry.queue, "replayed", f"replayed to {entry.queue}{edited}", masked
        )

    @staticmethod
    def _check_ledger(
        entry: DeadLetterEntry,
        job: SendMessageJob,
        message_id: str,
        options: ReplayOptions,
        ledger: Ledger | None,
        held: Held,
    ) -> tuple[ReplayStatus, str] | None:
        """None to go ahead; else why not. The original job's key is checked too, should an
        edit have changed the key (a message sent under either is not sent again)."""
        if ledger is None:
            raise DlqError("replaying send_message jobs needs the idempotency ledger (Redis)")
        keys = [job.ledger_key(message_id)]
        try:
            original = parse_job("send_message", [], entry.kwargs)
        except InvalidJob:
            original = None
        if isinstance(original, SendMessageJob):
            key = original.ledger_key(message_id)
            if key not in keys:
                keys.append(key)
        pending: list[str] = []
        for key in keys:
            found = ledger.lookup(key)
            if found.state == "sent":
                sent = f"already sent (Verloop id {found.message_id or 'unknown'})"
                if not options.drop_sent:
                    return "skipped", f"{sent}, not replayed (--drop-sent removes it)"
                if options.dry_run:
                    return "would_drop", f"{sent}: would remove it, not replay it"
                held.remove()
                return "dropped", f"{sent}: removed from the dead-letter queue, not replayed"
            if found.state == "pending":
                pending.append(key)
        if pending and not options.resend_uncertain:
            return "skipped", (
                "outcome unknown (the ledger holds an unfinished send): not replayed; "
                "--resend-uncertain sends it again, at the risk of a duplicate"
            )
        if pending and not options.dry_run:
            for key in pending:
                ledger.forget_pending(key)
        return None

    def _publish(self, queue: str, body: bytes, message_id: str) -> None:
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/json",
            message_id=message_id,
            timestamp=int(time.time()),
        )
        try:
            if self._publisher is None or not self._publisher.is_open:
                self._publisher = self._connection.channel()
                self._publisher.confirm_delivery()
                self._declared.clear()
            if queue not in self._declared:
                self._publisher.queue_declare(
                    queue=queue, durable=True, arguments=queue_arguments(queue)
                )
                self._declared.add(queue)
            self._publisher.basic_publish(
                exchange="", routing_key=queue, body=body, properties=properties, mandatory=True
            )
        except pika.exceptions.UnroutableError:
            raise DlqError(f"{queue} did not take {message_id}; it stays a dead letter") from None
        except pika.exceptions.NackError:
            raise DlqError(f"RabbitMQ refused {message_id}; it stays a dead letter") from None
        except pika.exceptions.AMQPError as exc:
            raise DlqError(
                f"publishing {message_id} to {queue} failed ({type(exc).__name__}); "
                "it stays a dead letter"
            ) from None
