"""Phone numbers: E.164 validation (with ``phonenumbers``, Google's libphonenumber port) and the
masked form used in logs and CLI output."""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumber

__all__ = ["mask_phone", "normalize_e164"]

_ALLOWED = re.compile(r"\+[0-9 ()./-]{1,30}")
#: The canonical form: "+", no separators, 7 to 15 digits (E.164's longest).
_CANONICAL = re.compile(r"\+[1-9][0-9]{6,14}")
#: The calling codes libphonenumber knows, as the digits that start a number.
_CALLING_CODES = frozenset(str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
_NON_GEO = "001"


def normalize_e164(raw: str) -> str:
    """Return ``raw`` as E.164 (``+919876543210``) or raise ``ValueError`` saying why not.

    Only the international form is accepted: a job must not depend on a guessed region.
    """
    text = raw.strip()
    parts = _canonical_parts(text)
    if parts is not None:
        # E.164 already: libphonenumber's formatting would give back the same text.
        if not _is_valid(*parts):
            raise ValueError("is not a valid phone number for its country code")
        return text
    if not text.startswith("+"):
        raise ValueError("must be in E.164 form, starting with + and the country code")
    # Only ASCII digits and the usual separators: libphonenumber would otherwise read
    # full-width digits and drop bidi marks, turning a spoofed string into a real number.
    if not _ALLOWED.fullmatch(text):
        raise ValueError("may contain only ASCII digits after the + (spaces, - ( ) . allowed)")
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"is not a phone number ({exc._msg})") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("is not a valid phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _canonical_parts(text: str) -> tuple[int, str] | None:
    """The calling code and national number of ``text`` as libphonenumber's parser would read
    them, found without its parser, for the canonical form in which the parser has nothing to
    do; None for anything else (the caller parses).

    Skipping ``parse`` matters because validation runs for every campaign row and every job.
    For "+", calling code, national number, the parser only splits off the calling code and
    strips a national prefix (numbers that start with one, or with a zero, are left to it).
    A unit test compares the two.
    """
    if not _CANONICAL.fullmatch(text):
        return None
    digits = text[1:]
    code = _country_code(digits)
    if code is None:
        return None
    national = digits[len(code) :]
    if national.startswith("0"):
        return None
    national_prefix = _national_prefix(int(code))
    if national_prefix is None or national_prefix.match(national):
        return None
    return int(code), national


def _canonical_number(text: str) -> PhoneNumber | None:
    """:func:`_canonical_parts` as the number libphonenumber's parser would make of ``text``."""
    parts = _canonical_parts(text)
    if parts is None:
        return None
    return PhoneNumber(country_code=parts[0], national_number=int(parts[1]))


_NO_PREFIX = re.compile(r"(?!)")  # matches nothing: the region has no national prefix


@functools.lru_cache(maxsize=512)
def _national_prefix(country_code: int) -> re.Pattern[str] | None:
    """What the parser would strip from the start of a national number of this calling code
    (its main region's ``national_prefix_for_parsing``); None if it has no metadata."""
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    return re.compile(prefix) if prefix else _NO_PREFIX


def _country_code(digits: str) -> str | None:
    """The calling code a string of digits starts with: codes are prefix-free, 1 to 3 digits
    (libphonenumber reads them the same way, from the same table)."""
    if digits.startswith("0"):
        return None
    for size in (1, 2, 3):
        if digits[:size] in _CALLING_CODES:
            return digits[:size]
    return None


# --- validity: libphonenumber's is_valid_number, its patterns compiled once ---------------------
#: A region's test of a national number's type, for one length: the general pattern and every
#: type's pattern in one alternation; None when no number of that length has a type there.
_TypeTest = tuple[re.Pattern[str], re.Pattern[str]] | None
#: How a calling code shared by several regions picks one: (leading digits or, without them,
#: the region's type test; the picked region's validity test), in libphonenumber's order.
_Pick = tuple[re.Pattern[str] | None, _TypeTest, _TypeTest]


def _is_valid(country_code: int, national: str) -> bool:
    """``phonenumbers.is_valid_number`` of the number (no leading zero in ``national``): the
    same metadata and the same steps, with its patterns compiled once per calling code and
    length instead of looked up for every number. A unit test compares the two."""
    plan = _validity_plan(country_code, len(national))
    if isinstance(plan, list):  # several regions share the code: the first that claims it
        for leading, claims, test in plan:
            if leading.match(national) if leading is not None else _has_type(claims, national):
                return _has_type(test, national)
        return False
    return _has_type(plan, national)


def _has_type(test: _TypeTest, national: str) -> bool:
    return (
        test is not None
        and test[0].fullmatch(national) is not None
        and test[1].fullmatch(national) is not None
    )


@functools.lru_cache(maxsize=4096)
def _validity_plan(country_code: int, length: int) -> _TypeTest | list[_Pick]:
    """libphonenumber's ``region_code_for_number`` then ``is_valid_number_for_region``, for
    national numbers of ``length`` digits, as patterns."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(country_code)
    if not regions:
        return None
    if len(regions) == 1:
        return _region_test(country_code, regions[0], length)
    plan: list[_Pick] = []
    for region in regions:
        metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
        if metadata is None:
            continue
        leading = metadata.leading_digits
        leading_re = re.compile(leading) if leading is not None else None
        claims = _type_test(metadata, length) if leading is None else None
        plan.append((leading_re, claims, _region_test(country_code, region, length)))
    return plan


def _region_test(country_code: int, region: str, length: int) -> _TypeTest:
    """``is_valid_number_for_region``: the region's metadata must be the calling code's."""
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region.upper())
    if metadata is None or (
        region != _NON_GEO and country_code != phonenumbers.country_code_for_valid_region(region)
    ):
        return None
    return _type_test(metadata, length)


def _type_test(metadata: PhoneMetadata, length: int) -> _TypeTest:
    """``_number_type_helper(...) != UNKNOWN``: the general description matches, and so does
    one of the types it tries (mobile only when its pattern is not fixed line's)."""
    general = _desc_pattern(metadata.general_desc, length)
    if general is None:
        return None
    descs = [
        metadata.premium_rate,
        metadata.toll_free,
        metadata.shared_cost,
        metadata.voip,
        metadata.personal_number,
        metadata.pager,
        metadata.uan,
        metadata.voicemail,
        metadata.fixed_line,
    ]
    if not metadata.same_mobile_and_fixed_line_pattern:
        descs.append(metadata.mobile)
    types = [p for p in (_desc_pattern(d, length) for d in descs) if p is not None]
    if not types:
        return None
    return re.compile(general), re.compile("|".join(f"(?:{p})" for p in types))


def _desc_pattern(desc: phonenumbers.PhoneNumberDesc | None, length: int) -> str | None:
    """``_is_number_matching_desc``'s pattern for numbers of ``length``; None: none match."""
    if desc is None or (desc.possible_length and length not in desc.possible_length):
        return None
    return desc.national_number_pattern or None


def mask_phone(e164: str) -> str:
    """``+919876543210`` → ``+91******3210``: country code and last four digits kept."""
    if not e164.startswith("+") or len(e164) < 8:
        return "*" * len(e164)
    digits = e164[1:]
    if digits.isascii() and digits.isdigit():
        # The common case, once per job and per log line: a table lookup, not a full parse.
        country = _country_code(digits) or e164[1:3]
    else:
        try:
            country = str(phonenumbers.parse(e164, None).country_code)
        except phonenumbers.NumberParseException:
            country = e164[1:3]
    head = "+" + country
    tail = e164[-4:]
    return head + "*" * max(len(e164) - len(head) - len(tail), 1) + tail
