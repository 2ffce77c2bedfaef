"""Checks for the simulator's JSON configuration (faults, scripts): each value is checked
on its own, and a bad one raises :class:`FaultConfigError` naming the field."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "FaultConfigError",
    "digits_of",
    "integer",
    "json_object",
    "number",
    "probability",
    "reject_unknown",
    "status_code",
]

_NON_DIGITS: Final = re.compile(r"\D")


class FaultConfigError(ValueError):
    """Raised when a fault or script configuration is invalid."""


def digits_of(phone: str) -> str:
    """Return only the digits of ``phone`` (the WhatsApp ``wa_id`` form)."""
    return _NON_DIGITS.sub("", phone)


def number(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> float:
    # bool is an int subclass; "true" as a latency is a caller bug, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultConfigError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise FaultConfigError(f"{name} must be {relation} {minimum:g}, got {value!r}")
    return float(value)


def probability(name: str, value: object) -> float:
    rate = number(name, value)
    if rate > 1.0:
        raise FaultConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
    return rate


def integer(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise FaultConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def status_code(name: str, value: object, *, low: int, high: int = 599) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    status = integer(name, value, minimum=-(2**31))
    if not low <= status <= high:
        raise FaultConfigError(f"{name} must be an HTTP status in [{low}, {high}], got {value!r}")
    return status


def json_object(name: str, value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise FaultConfigError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def reject_unknown(name: str, data: Mapping[str, object], allowed: Iterable[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise FaultConfigError(
            f"unknown {name} field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
