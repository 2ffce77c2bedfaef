"""Scripted responses of the simulator (``POST /admin/script``): canned answers for the next
matching sends, consumed in order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.sandbox.validation import (
    FaultConfigError,
    digits_of,
    integer,
    json_object,
    number,
    reject_unknown,
    status_code,
)

__all__ = ["ScriptQueue", "ScriptedResponse"]


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
        status_code("status", self.status, low=200)
        if self.after_accept not in (None, "hang", "drop"):
            raise FaultConfigError(f"after_accept must be hang or drop, got {self.after_accept!r}")
        integer("count", self.count, minimum=1)
        number("delay_ms", self.delay_ms)
        if not isinstance(self.timeout, bool):
            raise FaultConfigError(f"timeout must be a boolean, got {self.timeout!r}")
        if self.to is not None and (not isinstance(self.to, str) or not digits_of(self.to)):
            raise FaultConfigError(f"to must be a phone number string, got {self.to!r}")
        if self.headers is not None:
            headers = json_object("headers", self.headers)
            if not all(isinstance(v, str) for v in headers.values()):
                raise FaultConfigError("headers values must be strings")
            object.__setattr__(self, "headers", {str(k): str(v) for k, v in headers.items()})

    @classmethod
    def from_json(cls, data: object) -> ScriptedResponse:
        """Build from one JSON entry; ``status`` is required unless ``timeout`` is true."""
        obj = json_object("script entry", data)
        reject_unknown("script entry", obj, cls.__dataclass_fields__)
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
