"""Send windows, including ones that span midnight and zones with daylight saving."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from worker.campaigns.window import parse_window, seconds_until_open
from worker.errors import ConfigurationError


def at(text: str, zone: str = "Asia/Kolkata") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.mark.parametrize(
    ("now", "window", "wait_s"),
    [
        ("2026-11-25T10:00", ("09:00", "21:00"), 0),
        ("2026-11-25T09:00", ("09:00", "21:00"), 0),  # opens at the start minute
        ("2026-11-25T21:00", ("09:00", "21:00"), 12 * 3600),  # closed at the end minute
        ("2026-11-25T08:30", ("09:00", "21:00"), 1800),
        ("2026-11-25T23:00", ("09:00", "21:00"), 10 * 3600),  # tomorrow morning
        ("2026-11-25T23:00", ("22:00", "06:00"), 0),  # spans midnight
        ("2026-11-26T05:59", ("22:00", "06:00"), 0),
        ("2026-11-26T06:00", ("22:00", "06:00"), 16 * 3600),
    ],
)
def test_seconds_until_the_window_opens(now: str, window: tuple[str, str], wait_s: int) -> None:
    assert seconds_until_open((*window, "Asia/Kolkata"), at(now)) == pytest.approx(wait_s)


def test_a_window_across_a_daylight_saving_change_opens_at_local_time() -> None:
    # Europe/Berlin leaves summer time on 2026-10-25: that day has 25 hours.
    now = at("2026-10-24T22:00", "Europe/Berlin")
    assert seconds_until_open(("09:00", "21:00", "Europe/Berlin"), now) == 12 * 3600


@pytest.mark.parametrize(
    ("text", "zone", "message"),
    [
        ("9-21", "UTC", "not a time of day"),
        ("09:00", "UTC", "not a window"),
        ("09:00-09:00", "UTC", "same time"),
        ("09:00-21:00", "Mars/Olympus", "unknown time zone"),
        ("25:00-21:00", "UTC", "not a time of day"),
    ],
)
def test_a_bad_window_is_refused_with_a_clear_message(text: str, zone: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_window(text, zone)


def test_a_good_window_is_normalized() -> None:
    assert parse_window("9:00-21:30", "Asia/Kolkata") == ("09:00", "21:30", "Asia/Kolkata")


def test_an_en_dash_and_spaces_are_accepted() -> None:
    assert parse_window("22:00 \u2013 06:00", "UTC") == ("22:00", "06:00", "UTC")
