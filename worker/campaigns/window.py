"""Send windows: campaign jobs go out only between two times of day in a time zone."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from worker.errors import ConfigurationError

__all__ = ["check_zone", "parse_clock", "parse_window", "seconds_until_open"]


def parse_clock(text: str) -> time:
    """``"09:00"`` → 09:00; a clear error otherwise."""
    try:
        hours, minutes = text.strip().split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise ConfigurationError(f"{text!r} is not a time of day like 09:00") from None


def check_zone(timezone: str) -> str:
    """An IANA time zone name, checked; a clear error otherwise."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"unknown time zone {timezone!r} (an IANA name, e.g. Asia/Kolkata)"
        ) from None
    return timezone


def parse_window(text: str, timezone: str) -> tuple[str, str, str]:
    """``"09:00-21:00"`` (an en dash too) and an IANA zone → (start, end, zone), validated."""
    start, sep, end = text.replace("\u2013", "-").partition("-")
    if not sep:
        raise ConfigurationError(f"{text!r} is not a window like 09:00-21:00")
    first, last = parse_clock(start), parse_clock(end)
    if first == last:
        raise ConfigurationError("a send window must not start and end at the same time")
    return first.strftime("%H:%M"), last.strftime("%H:%M"), check_zone(timezone)


def seconds_until_open(window: tuple[str, str, str], now: float) -> float:
    """0 if the window is open at epoch ``now``, else seconds until it next opens.

    A window whose end is before its start spans midnight (``22:00-06:00``).
    """
    start, end, zone = parse_clock(window[0]), parse_clock(window[1]), ZoneInfo(window[2])
    local = datetime.fromtimestamp(now, zone)
    clock = local.time()
    is_open = start <= clock < end if start < end else (clock >= start or clock < end)
    if is_open:
        return 0.0
    opens = datetime.combine(local.date(), start, zone)
    if opens <= local:
        opens = datetime.combine(local.date() + timedelta(days=1), start, zone)
    return max(0.0, opens.timestamp() - now)
