"""A WhatsApp webhook body → the statuses to record and the inbound messages to announce.

The body is Meta's Cloud API shape (docs/verloop-api.md): ``entry[].changes[]``, each change
with ``field: "messages"`` and a ``value`` holding ``metadata``, ``statuses`` and ``messages``.
Each status becomes the kwargs of one :class:`~worker.receipts.models.StatusEntry`; a value that
does not fit is passed as it is, so the status actor dead-letters that status with its reason
(nothing is lost, and the valid statuses of the body are not held back by it). Each inbound
message becomes an ``inbound.message`` event. Whatever else a body carries (another field, an
entry that is not an object) is counted as ignored, by a short reason that never quotes it.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from worker.finish.events import EVENT_VERSION, routing_word
from worker.jobs.models import describe_validation_error
from worker.receipts.models import StatusEntry

__all__ = [
    "INBOUND_EVENT",
    "InboundEvent",
    "InvalidStatus",
    "MalformedBody",
    "Mapped",
    "inbound_routing_key",
    "map_body",
    "status_kwargs",
]

INBOUND_EVENT: Final = "inbound.message"
#: Meta's timestamps are Unix seconds as a decimal string.
_DECIMAL = re.compile(r"-?[0-9]{1,20}")


class MalformedBody(ValueError):
    """The body is not a webhook at all (not an object, no ``entry`` list): answered 400."""


@dataclass(frozen=True, slots=True)
class InvalidStatus:
    """A status whose kwargs :class:`StatusEntry` refuses: published alone, as it is."""

    kwargs: dict[str, Any]
    #: Which fields are wrong and why, values left out (for the log line).
    reason: str


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """An inbound message's event: its routing key, body and message id."""

    routing_key: str
    body: dict[str, Any]
    message_id: str


@dataclass(slots=True)
class Mapped:
    """What one body asks for."""

    statuses: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[InvalidStatus] = field(default_factory=list)
    events: list[InboundEvent] = field(default_factory=list)
    #: A short reason for each item ignored.
    ignored: list[str] = field(default_factory=list)


def inbound_routing_key(phone_number_id: Any) -> str:
    """``inbound.message.<phone_number_id as one routing-key word>``."""
    return f"{INBOUND_EVENT}.{routing_word(phone_number_id)}"


def map_body(body: Any, received_at_ms: int | None = None) -> Mapped:
    """Map a parsed webhook body (see the module docstring).

    Raises:
        MalformedBody: ``body`` is not an object with an ``entry`` list.
    """
    if not isinstance(body, dict):
        raise MalformedBody(f"the body is a JSON {_kind(body)}, not an object")
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise MalformedBody(f"'entry' is {_kind(entries)}, not a list")
    if received_at_ms is None:
        received_at_ms = int(time.time() * 1000)
    mapped = Mapped()
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            mapped.ignored.append("an entry without a list of changes")
            continue
        for change in changes:
            _map_change(change, received_at_ms, mapped)
    return mapped


def _map_change(change: Any, received_at_ms: int, mapped: Mapped) -> None:
    if not isinstance(change, dict):
        mapped.ignored.append(f"a change that is {_kind(change)}")
        return
    if change.get("field") != "messages":
        mapped.ignored.append(f"a change of field {str(change.get('field'))[:40]!r}")
        return
    value = change.get("value")
    if not isinstance(value, dict):
        mapped.ignored.append(f"a change whose value is {_kind(value)}")
        return
    metadata = value.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    phone_number_id = metadata.get("phone_number_id")
    for name in ("statuses", "messages"):
        items = value.get(name, [])
        if not isinstance(items, list):
            mapped.ignored.append(f"{name} that is {_kind(items)}, not a list")
            continue
        for item in items:
            if not isinstance(item, dict):
                mapped.ignored.append(f"an item of {name} that is {_kind(item)}")
            elif name == "statuses":
                _add_status(status_kwargs(item, phone_number_id, received_at_ms), mapped)
            else:
                mapped.events.append(_inbound_event(item, value, metadata))


def status_kwargs(
    status: dict[str, Any], phone_number_id: Any, received_at_ms: int
) -> dict[str, Any]:
    """One of Meta's status objects → :class:`StatusEntry` kwargs (unchecked; absent values
    left out)."""
    kwargs: dict[str, Any] = {
        "wamid": status.get("id"),
        "status": status.get("status"),
        "timestamp": _as_int(status.get("timestamp")),
        "recipient_id": status.get("recipient_id"),
        "phone_number_id": phone_number_id,
        "received_at_ms": received_at_ms,
    }
    errors = status.get("errors")
    if errors is not None:
        kwargs["errors"] = [_error(e) for e in errors] if isinstance(errors, list) else errors
    pricing = status.get("pricing")
    if isinstance(pricing, dict):
        kwargs["pricing_category"] = pricing.get("category")
    return {k: v for k, v in kwargs.items() if v is not None}


def _add_status(kwargs: dict[str, Any], mapped: Mapped) -> None:
    try:
        StatusEntry.model_validate(kwargs)
    except ValidationError as exc:
        mapped.invalid.append(InvalidStatus(kwargs, describe_validation_error(exc, limit=2)))
    else:
        mapped.statuses.append(kwargs)


def _error(error: Any) -> Any:
    """``{code, title, message, error_data: {details}}`` → ``{code, title, message, details}``."""
    if not isinstance(error, dict):
        return error
    data = error.get("error_data")
    mapped = {
        "code": error.get("code"),
        "title": error.get("title"),
        "message": error.get("message"),
        "details": data.get("details") if isinstance(data, dict) else None,
    }
    return {k: v for k, v in mapped.items() if v is not None}


def _inbound_event(
    message: dict[str, Any], value: dict[str, Any], metadata: dict[str, Any]
) -> InboundEvent:
    phone_number_id = metadata.get("phone_number_id")
    body: dict[str, Any] = {
        "version": EVENT_VERSION,
        "event": INBOUND_EVENT,
        "at": round(time.time(), 3),
        "phone_number_id": phone_number_id,
        "display_phone_number": metadata.get("display_phone_number"),
        "message": message,
    }
    if "contacts" in value:
        body["contacts"] = value["contacts"]
    return InboundEvent(inbound_routing_key(phone_number_id), body, str(uuid.uuid4()))


def _as_int(value: Any) -> Any:
    """Meta's ``"1700000000"`` → ``1700000000``; anything else as it is."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return int(value)
    return value


def _kind(value: Any) -> str:
    """What a value is, in JSON's words, for a reason that must not quote it."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "missing or null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")
