"""Which dead letters a command applies to: the filters, and the durations and ids an operator
types (``--older-than 2h``, ``--id 3f2a9c1e``) and sees in tables."""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.dlq.entries import DeadLetterEntry

__all__ = ["MIN_ID_PREFIX", "Filters", "format_age", "id_matches", "parse_duration", "short_id"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.I)
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


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
