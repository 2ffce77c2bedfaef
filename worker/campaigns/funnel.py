"""A campaign's delivery funnel: enqueued, sent, then what WhatsApp reported (delivered, read,
failed by error code), with the rates ``campaign status`` shows.

The status actor counts each message once in the campaign's hash: ``status:delivered`` (best
status delivered or read), ``status:read``, ``status:failed`` (failed and never delivered) and
``status:failed:<code>``. Here they are read back; nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from worker.verloop.classify import error_name

__all__ = [
    "DELIVERED_FIELD",
    "FAILED_CODE_PREFIX",
    "FAILED_FIELD",
    "OTHER_CODE",
    "READ_FIELD",
    "FailureCode",
    "Funnel",
]

DELIVERED_FIELD: Final = "status:delivered"
READ_FIELD: Final = "status:read"
FAILED_FIELD: Final = "status:failed"
FAILED_CODE_PREFIX: Final = "status:failed:"
#: Where failures whose code is not a plain number are counted (WhatsApp's codes are numbers;
#: anything else is shown under this name rather than as it is written).
OTHER_CODE: Final = "other"
_MAX_CODE_DIGITS: Final = 10


@dataclass(frozen=True, slots=True)
class FailureCode:
    """How many of a campaign's messages failed with one error code."""

    code: str
    count: int

    @property
    def name(self) -> str | None:
        """The code's short name (``undeliverable``), if it is a well-known one."""
        return error_name(self.code)


@dataclass(frozen=True, slots=True)
class Funnel:
    """A campaign's counts from enqueued to read; rates are None when their base is 0."""

    enqueued: int
    sent: int
    delivered: int
    read: int
    failed: int
    #: Failures by error code, the most frequent first.
    by_code: tuple[FailureCode, ...] = ()

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Funnel:
        """The funnel of a campaign hash's fields (a counter that is not a number counts 0)."""
        codes: dict[str, int] = {}
        for name, value in fields.items():
            if not name.startswith(FAILED_CODE_PREFIX):
                continue
            code = name[len(FAILED_CODE_PREFIX) :]
            if not (code.isascii() and code.isdigit() and len(code) <= _MAX_CODE_DIGITS):
                code = OTHER_CODE
            codes[code] = codes.get(code, 0) + _count(value)
        ranked = sorted(
            (FailureCode(code, count) for code, count in codes.items() if count > 0),
            key=lambda failure: (-failure.count, failure.code),
        )
        return cls(
            enqueued=_count(fields.get("enqueued")),
            sent=_count(fields.get("sent")),
            delivered=_count(fields.get(DELIVERED_FIELD)),
            read=_count(fields.get(READ_FIELD)),
            failed=_count(fields.get(FAILED_FIELD)),
            by_code=tuple(ranked),
        )

    @property
    def awaiting_status(self) -> int:
        """Sent, and neither delivered nor failed yet (statuses come later, or never)."""
        return max(0, self.sent - self.delivered - self.failed)

    @property
    def delivered_of_sent(self) -> float | None:
        return _share(self.delivered, self.sent)

    @property
    def read_of_sent(self) -> float | None:
        return _share(self.read, self.sent)

    @property
    def read_of_delivered(self) -> float | None:
        return _share(self.read, self.delivered)

    @property
    def failed_of_sent(self) -> float | None:
        return _share(self.failed, self.sent)

    def top_codes(self, limit: int) -> tuple[tuple[FailureCode, ...], int]:
        """The ``limit`` most frequent failure codes, and how many failures the rest hold."""
        top = self.by_code[:limit]
        return top, sum(failure.count for failure in self.by_code[limit:])

    def as_dict(self) -> dict[str, Any]:
        """The funnel as ``campaign status --json`` prints it (rates as fractions, 4 places)."""

        def rate(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "enqueued": self.enqueued,
            "sent": self.sent,
            "delivered": self.delivered,
            "read": self.read,
            "failed": self.failed,
            "awaiting_status": self.awaiting_status,
            "failed_by_code": [
                {"code": failure.code, "name": failure.name, "count": failure.count}
                for failure in self.by_code
            ],
            "rates": {
                "delivered_of_sent": rate(self.delivered_of_sent),
                "read_of_sent": rate(self.read_of_sent),
                "read_of_delivered": rate(self.read_of_delivered),
                "failed_of_sent": rate(self.failed_of_sent),
            },
        }


def _count(value: str | None) -> int:
    """A counter's value; missing, not a number or below zero counts 0."""
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None
