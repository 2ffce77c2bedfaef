"""Unit tests for worker.jobs.phones: E.164 normalisation and masking."""

from __future__ import annotations

import random

import phonenumbers
import pytest

from worker.jobs.phones import (
    _canonical_number,
    _canonical_parts,
    _is_valid,
    mask_phone,
    normalize_e164,
)


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


def _parsed(text: str) -> tuple[bool, str] | None:
    """What libphonenumber's own parser makes of ``text``: (valid, E.164), None if it refuses."""
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None
    return (
        phonenumbers.is_valid_number(number),
        phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
    )


def _example_numbers() -> set[str]:
    """libphonenumber's example number of every type for every region and non-geographic code."""
    types = [getattr(phonenumbers.PhoneNumberType, n) for n in dir(phonenumbers.PhoneNumberType)]
    found = set()
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in (t for t in types if isinstance(t, int)):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                found.add(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164))
    for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS:
        example = phonenumbers.example_number_for_non_geo_entity(code)
        if example is not None:
            found.add(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164))
    return found


def test_the_canonical_fast_path_agrees_with_libphonenumbers_parser() -> None:
    """Every example number, and 20,000 random "+digits" strings over every calling code: the
    number built without the parser is valid exactly when the parsed one is, with the same
    E.164 (checked once on 1,000,000 random strings: no difference). Strings it leaves to the
    parser are skipped here; enough are left to it and enough taken to make this mean something.
    """
    rnd = random.Random(20261201)
    codes = [str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE]
    cases = _example_numbers()
    assert len(cases) > 900
    for _ in range(20_000):
        code = rnd.choice(codes)
        length = rnd.randint(7, 15) - len(code)
        cases.add("+" + code + "".join(rnd.choice("0123456789") for _ in range(length)))
    taken = valid = 0
    for text in sorted(cases):
        number = _canonical_number(text)
        if number is None:
            continue
        taken += 1
        ours = (
            phonenumbers.is_valid_number(number),
            phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
        )
        assert ours == _parsed(text), text
        valid += ours[0]
    assert taken > len(cases) * 0.8
    assert valid > 900


def _near_examples(rnd: random.Random) -> set[str]:
    """Every example number, and numbers near each: a digit changed, the last few digits
    drawn anew, one digit fewer or more (many valid, many just not)."""
    cases = set()
    for example in sorted(_example_numbers()):
        cases.add(example)
        cases.add(example[:-1])
        cases.add(example + rnd.choice("0123456789"))
        for i in range(2, len(example)):
            cases.add(example[:i] + rnd.choice("0123456789") + example[i + 1 :])
        for _ in range(20):
            k = rnd.randint(1, min(7, len(example) - 3))
            cases.add(example[:-k] + "".join(rnd.choice("0123456789") for _ in range(k)))
    return cases


def test_the_compiled_validity_check_agrees_with_libphonenumber() -> None:
    """_is_valid is is_valid_number with its patterns compiled once: on every example number,
    the numbers near each and random ones over every calling code (about 48,000 in the
    canonical form, half of them valid; checked once on 1,000,000 more: no difference), it
    says the same."""
    rnd = random.Random(20261202)
    cases = _near_examples(rnd)
    codes = [str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE]
    for _ in range(20_000):
        code = rnd.choice(codes)
        length = rnd.randint(7, 15) - len(code)
        cases.add("+" + code + "".join(rnd.choice("0123456789") for _ in range(length)))
    taken = valid = 0
    for text in sorted(cases):
        parts = _canonical_parts(text)
        if parts is None:
            continue
        taken += 1
        number = phonenumbers.PhoneNumber(country_code=parts[0], national_number=int(parts[1]))
        theirs = phonenumbers.is_valid_number(number)
        assert _is_valid(*parts) == theirs, text
        valid += theirs
    assert taken > 40_000
    assert valid > 20_000


def test_normalize_e164_agrees_with_libphonenumbers_parser() -> None:
    """The whole function, fast path or not: a number is taken exactly when libphonenumber's
    parser finds it valid, and becomes the E.164 the parser formats; separators and spaces
    included."""
    rnd = random.Random(20261203)
    cases = sorted(_near_examples(rnd))
    cases += [f"+{t[1:3]} {t[3:7]}-{t[7:]}" for t in rnd.sample(cases, 2000)]
    cases += [f" {t} " for t in rnd.sample(cases, 500)]
    for text in cases:
        parsed = _parsed(text.strip())
        if parsed is not None and parsed[0]:
            assert normalize_e164(text) == parsed[1], text
        else:
            with pytest.raises(ValueError, match="phone number"):
                normalize_e164(text)


@pytest.mark.parametrize(
    "text",
    [
        "+4402079460958",  # a national prefix (0) after the calling code: the parser drops it
        "+390612345678",  # Italy: the leading zero is part of the number
        "+78001234567",  # Russia's national prefix is 8
        "+44 20 7946 0958",  # separators
        "+123",  # too short to be E.164
        "+9991234567",  # no such calling code
    ],
)
def test_anything_but_the_plain_canonical_form_goes_to_the_parser(text: str) -> None:
    assert _canonical_number(text) is None
    parsed = _parsed(text)
    if parsed is not None and parsed[0]:
        assert normalize_e164(text) == parsed[1]
    else:
        with pytest.raises(ValueError, match="phone number"):
            normalize_e164(text)


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
