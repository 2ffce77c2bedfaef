"""The wire format of a job: dramatiq's message envelope, built and checked in one place.

Producers, the campaign enqueuer and the dead-letter replay build it with
:func:`build_envelope`; consumers read every body through :func:`parse_envelope`, which fills
in optional fields and refuses what the worker must not act on. Both sides agree because both
are here (the format: README.md, "Wire format").
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import uuid
from collections.abc import Collection
from typing import Any, Final

import orjson
from dramatiq.common import q_name

from worker.settings import MAX_SINGLE_DELAY_S

__all__ = [
    "ENVELOPE_FIELDS",
    "UNDECODABLE_ACTOR",
    "build_envelope",
    "dump_envelope",
    "encode_job",
    "parse_envelope",
    "raw_body_of",
    "undecodable_envelope",
]

#: Actor name given to bodies that are not dramatiq messages; never declared.
UNDECODABLE_ACTOR: Final = "verloop.undecodable"

#: The fields of a dramatiq message; any other top-level field makes a body invalid.
ENVELOPE_FIELDS: Final = frozenset(
    {"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"}
)

#: The options a job may carry, with their JSON types. A producer may set ``eta`` (when to run
#: the job, Unix milliseconds); the rest is the worker's own bookkeeping on the copies it
#: enqueues again (a retry's count and last error, deferrals, the job's schedule), read back as
#: is when those copies come round. Any other option (dramatiq's ``throws``, ``time_limit``,
#: ``max_retries``, callbacks...) would let a job change how the worker treats it: refused.
_OPTION_TYPES: dict[str, tuple[type[Any], ...]] = {
    "eta": (int, float),
    "not_before": (int,),
    "retries": (int,),
    "deferrals": (int,),
    "last_error": (str,),
}
#: Bounds of the bookkeeping counters and text.
_MAX_COUNTER = 1_000_000
_MAX_LAST_ERROR_CHARS = 1000
#: What a message id may be: it becomes an AMQP property and part of a Redis key.
_MESSAGE_ID = re.compile(r"[!-~]{1,128}")
#: A ``\\uD800``-``\\uDFFF`` escape: only bodies that have one need the lone-surrogate check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

#: What :func:`_read_fast` returns when only the strict reader may judge a body.
_UNSURE: Final = object()
#: Every digit as "0", any other byte as " ": runs of digits become runs of zeros.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))

_JSON_TYPE_NAMES = {str: "string", list: "array", dict: "object", int: "integer"}
_ENVELOPE_TYPES = (
    ("actor_name", str),
    ("queue_name", str),
    ("args", list),
    ("kwargs", dict),
    ("options", dict),
    ("message_id", str),
    ("message_timestamp", int),
)


# --- building ------------------------------------------------------------------------------------
def build_envelope(
    actor_name: str, kwargs: dict[str, Any], *, queue: str, message_id: str
) -> dict[str, Any]:
    """A new job's envelope: no args, no options, stamped now (Unix milliseconds).

    The fields come in dramatiq's order, so every encoder writes the same bytes for it.
    """
    return {
        "queue_name": queue,
        "actor_name": actor_name,
        "args": [],
        "kwargs": kwargs,
        "options": {},
        "message_id": message_id,
        "message_timestamp": int(time.time() * 1000),
    }


def undecodable_envelope(data: bytes, reason: str, *, queue: str) -> dict[str, Any]:
    """The stand-in envelope of a body that is not a job: it carries the reason and the
    original bytes, and runs as :data:`UNDECODABLE_ACTOR` (which dead-letters it)."""
    kwargs = {"reason": reason, "raw_body_b64": base64.b64encode(data).decode("ascii")}
    return build_envelope(UNDECODABLE_ACTOR, kwargs, queue=queue, message_id=str(uuid.uuid4()))


def raw_body_of(kwargs: dict[str, Any]) -> bytes:
    """The original bytes of a body that became an :data:`UNDECODABLE_ACTOR` message."""
    return base64.b64decode(str(kwargs.get("raw_body_b64", "")))


def dump_envelope(envelope: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (no ``\\u`` escapes for non-ASCII text): the body as published."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_job(actor_name: str, kwargs: dict[str, Any], *, queue: str, message_id: str) -> bytes:
    """The dramatiq message body (the public wire format; see README, "Wire format")."""
    return dump_envelope(build_envelope(actor_name, kwargs, queue=queue, message_id=message_id))


# --- parsing -------------------------------------------------------------------------------------
def parse_envelope(
    data: bytes,
    *,
    queue: str,
    max_bytes: int,
    max_delay_ms: int,
    known_actors: Collection[str] | None = None,
) -> dict[str, Any]:
    """The envelope of a body that arrived on ``queue``, completed and checked.

    Optional fields get defaults (``args``, ``options``, ``message_id``, ``message_timestamp``,
    and ``queue_name``: ``queue``), so a producer in any language can publish the minimal
    ``{"actor_name": ..., "kwargs": {...}}``. Options are checked and normalised by
    :func:`_check_options`. ``known_actors`` (None: any) turns away names the worker does not
    run, so no label or log line ever carries a name a producer made up.

    Raises:
        ValueError: the body is not a job the worker may run; the message says why, briefly
            (it travels in a dead letter's header) and never quotes more than a few names.
    """
    if len(data) > max_bytes:
        raise ValueError(f"body is {len(data)} bytes; the limit is {max_bytes}")
    envelope = _read_fast(data)
    if envelope is _UNSURE:
        envelope = _read_strictly(data)
    if not isinstance(envelope, dict):
        raise ValueError(f"body is a JSON {type(envelope).__name__}, not an object")
    if not ENVELOPE_FIELDS.issuperset(envelope):
        unknown = sorted(set(envelope) - ENVELOPE_FIELDS)
        raise ValueError(f"unknown top-level field(s) {_names(unknown)}")
    if len(envelope) < len(ENVELOPE_FIELDS):
        # (in this order, as dict.setdefault would; an id and a time only when missing)
        envelope.setdefault("queue_name", queue)
        envelope.setdefault("args", [])
        envelope.setdefault("kwargs", {})
        envelope.setdefault("options", {})
        if "message_id" not in envelope:
            envelope["message_id"] = str(uuid.uuid4())
        if "message_timestamp" not in envelope:
            envelope["message_timestamp"] = int(time.time() * 1000)
    for field, kind in _ENVELOPE_TYPES:
        value = envelope.get(field)
        if type(value) is not kind:  # (the common case at the cost of one test)
            if field not in envelope:
                raise ValueError(f"missing {field!r}")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{field!r} must be a JSON {_JSON_TYPE_NAMES[kind]}")
    if envelope["queue_name"] != queue:
        raise ValueError(
            f"queue_name {envelope['queue_name'][:100]!r} does not match the queue it "
            f"arrived on ({queue!r})"
        )
    if not envelope["actor_name"]:
        raise ValueError("actor_name is empty")
    if known_actors is not None and envelope["actor_name"] not in known_actors:
        raise ValueError(f"unknown actor {envelope['actor_name'][:100]!r}")
    if not _MESSAGE_ID.fullmatch(envelope["message_id"]):
        raise ValueError("message_id must be 1-128 printable ASCII characters")
    if not 0 <= envelope["message_timestamp"] < 2**63:
        raise ValueError("message_timestamp must be Unix milliseconds")
    _check_options(envelope["options"], queue, max_delay_ms)
    return envelope


def _read_strictly(data: bytes) -> Any:
    """The body's JSON, read by the standard library with every check of a hostile body: each
    refusal says why (the reasons producers see)."""
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            parse_constant=_not_a_json_number,
            parse_float=_finite_number,
            object_pairs_hook=_unique_names,
        )
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON ({exc.msg} at position {exc.pos})") from None
    except RecursionError:
        raise ValueError("body is JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        # A lone surrogate is not text: it cannot be logged, published or sent as UTF-8.
        raise ValueError("body has a \\u escape of a lone UTF-16 surrogate, which is not text")
    return value


def _read_fast(data: bytes) -> Any:
    """The body's JSON as :func:`_read_strictly` would read it, by orjson (several times
    faster), when it is sure to be the same; :data:`_UNSURE` when not (the strict reader then
    reads it, and says why it refuses it).

    orjson refuses what the strict reader refuses (NaN, Infinity, 1e400, lone surrogates,
    bytes that are not UTF-8), but reads a name twice in one object (the last wins) and an
    integer beyond 64 bits (as a float). Neither can be in a body that orjson writes back
    byte for byte (the bodies this worker's producers write, mostly). For another body:
    integers of 19 digits or more are left to the strict reader, and a repeated name shows as
    a missing colon when the value is written back (only name separators and colons inside
    strings are colons, and strings come back as they were, unless a colon was escaped).
    A unit test compares both readers over generated and hostile bodies.
    """
    try:
        value = orjson.loads(data)
        again = orjson.dumps(value)  # (deeper than 254 levels: refused, left to the strict one)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return _UNSURE
    if again == data:
        return value
    if (
        again.count(b":") != data.count(b":")
        or b"\\u003a" in data
        or b"\\u003A" in data
        or b"0" * 19 in data.translate(_DIGITS_AS_ZEROS)
    ):
        return _UNSURE
    return value


def _check_options(options: dict[str, Any], queue: str, max_delay_ms: int) -> None:
    """Refuse options a job may not set, and keep a scheduled job off a main queue's prefetch
    (see :data:`_OPTION_TYPES`)."""
    if not options:  # most jobs: nothing to refuse or to rewrite
        return
    unknown = sorted(set(options) - set(_OPTION_TYPES))
    if unknown:
        raise ValueError(
            f"option(s) {_names(unknown)} not accepted: a job may set "
            "only options.eta (Unix milliseconds)"
        )
    now_ms = int(time.time() * 1000)
    value: Any
    for name, value in options.items():
        kinds = _OPTION_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "number" if float in kinds else _JSON_TYPE_NAMES[kinds[0]]
            raise ValueError(f"options.{name} must be a JSON {kind}")
        if name in ("retries", "deferrals") and not 0 <= value <= _MAX_COUNTER:
            raise ValueError(f"options.{name} must be between 0 and {_MAX_COUNTER}")
        if name == "last_error" and len(value) > _MAX_LAST_ERROR_CHARS:
            raise ValueError(f"options.last_error is over {_MAX_LAST_ERROR_CHARS} characters")
        if name in ("eta", "not_before"):
            if not math.isfinite(value) or value - now_ms > max_delay_ms:
                raise ValueError(
                    f"options.{name} is more than {max_delay_ms / 86_400_000:g} days "
                    "ahead (MAX_JOB_DELAY_S)"
                )
            options[name] = int(value)
    eta = options.get("eta")
    if queue == q_name(queue):
        # A main queue's consumer holds a job with an eta in memory until then, in one of
        # the queue's few prefetch slots: enough of them would stop the queue. The job runs
        # now instead, and waits for its time through the delay queue (see worker.runtime.actors).
        options.pop("eta", None)
        if eta is not None and eta > now_ms:
            options["not_before"] = max(eta, options.get("not_before", 0))
    elif eta is not None and eta - now_ms > MAX_SINGLE_DELAY_S * 1000:
        # On a delay queue a job is held unacknowledged until its eta: past RabbitMQ's
        # consumer timeout the channel would be closed. It comes back in hops instead.
        options["not_before"] = max(eta, options.get("not_before", 0))
        options["eta"] = now_ms + MAX_SINGLE_DELAY_S * 1000


def _names(names: list[str]) -> str:
    """A few of a producer's names, each cut short, for a reason (which travels in a header)."""
    return ", ".join(repr(name[:60]) for name in names[:5])


def _not_a_json_number(name: str) -> Any:
    # Python's json module reads NaN and Infinity; JSON has no such numbers.
    raise ValueError(f"body is not JSON ({name} is not a JSON number)")


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers disagree on a repeated name (first wins, last wins, error): a job whose
    # meaning depends on the reader, such as two actor_names, is refused.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"body has the name {name[:60]!r} twice in one object")
            seen.add(name)
    return obj


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a JSON number no encoder can write back
        raise ValueError(f"body has a number too large for a double ({text[:40]})")
    return value


def _has_lone_surrogate(envelope: Any) -> bool:
    try:
        json.dumps(envelope, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
