"""Unit tests for worker.phones: E.164 normalisation and masking."""

from __future__ import annotations

import phonenumbers
import pytest

from worker.phones import mask_phone, normalize_e164


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+919876543210", "+919876543210"),
        ("+91 98765 43210", "+919876543210"),
        (" +91-98765-43210 ", "+919876543210"),
        ("+1 (415) 555-0123", "+14155550123"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+49 30 901820", "+4930901820"),
    ],
)
def test_a_valid_international_number_is_normalised_to_e164(raw: str, expected: str) -> None:
    """Valid numbers in any common international notation become E.164."""
    assert normalize_e164(raw) == expected


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("919876543210", "E.164"),
        ("09876543210", "E.164"),
        ("", "E.164"),
        ("+", ""),
        ("+abc", ""),
        ("+91 12345", ""),
        ("+999 1234567", ""),
        ("+\uff19\uff11 98765 43210", ""),  # full-width digits
        ("+91\u200e9876543210", ""),  # a bidi mark inside the number
    ],
)
def test_an_invalid_number_raises_value_error_saying_why(raw: str, says: str) -> None:
    """Numbers without +, unparsable, spoofed or not valid for their country are refused."""
    with pytest.raises(ValueError, match=says or None) as info:
        normalize_e164(raw)
    assert str(info.value)
    if len(raw) > 3:
        assert raw not in str(info.value)


def test_an_indian_number_is_masked_keeping_country_code_and_last_four() -> None:
    """+919876543210 prints as +91******3210."""
    assert mask_phone("+919876543210") == "+91******3210"


def test_a_north_american_number_keeps_plus_one_and_the_last_four() -> None:
    """A +1 number keeps its one-digit country code and the last four digits."""
    masked = mask_phone("+14155550123")
    assert masked.startswith("+1*")
    assert masked.endswith("0123")
    assert "415" not in masked
    assert masked == "+1******0123"


@pytest.mark.parametrize("value", ["12345", "+12345", "not-a-number"])
def test_a_short_or_odd_value_is_masked_entirely(value: str) -> None:
    """Values too short to mask partly are fully starred, never printed."""
    masked = mask_phone(value)
    assert set(masked) == {"*"}
    assert len(masked) == len(value)


@pytest.mark.parametrize(
    "number",
    ["+442071234567", "+8613812345678", "+353861234567", "+971501234567", "+2348031234567"],
)
def test_the_masked_country_code_is_the_one_libphonenumber_reads(number: str) -> None:
    """Masking reads the calling code from libphonenumber's table (1, 2 or 3 digits) without a
    full parse; it keeps exactly the code a parse finds."""
    code = str(phonenumbers.parse(number, None).country_code)
    masked = mask_phone(number)
    assert masked.startswith(f"+{code}*")
    assert masked.endswith(number[-4:])
    assert len(masked) == len(number)


def test_a_number_with_no_known_calling_code_keeps_only_two_digits() -> None:
    """+0… is no country's code: two digits are kept, as before, the rest starred."""
    assert mask_phone("+0123456789") == "+01****6789"
