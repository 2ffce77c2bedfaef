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


def normalize_e164(raw: str) -> str:
    """Return ``raw`` as E.164 (``+919876543210``) or raise ``ValueError`` saying why not.

    Only the international form is accepted: a job must not depend on a guessed region.
    """
    text = raw.strip()
    if not text.startswith("+"):
        raise ValueError("must be in E.164 form, starting with + and the country code")
    # Only ASCII digits and the usual separators: libphonenumber would otherwise read
    # full-width digits and drop bidi marks, turning a spoofed string into a real number.
    if not _ALLOWED.fullmatch(text):
        raise ValueError("may contain only ASCII digits after the + (spaces, - ( ) . allowed)")
    number = _canonical_number(text)
    if number is None:
        try:
            number = phonenumbers.parse(text, None)
        except phonenumbers.NumberParseException as exc:
            raise ValueError(f"is not a phone number ({exc._msg})") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("is not a valid phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _canonical_number(text: str) -> PhoneNumber | None:
    """``text`` as libphonenumber would parse it, built without its parser, for the canonical
    form in which its parser has nothing to do; None for anything else (the caller parses).

    Skipping ``parse`` matters because validation runs for every campaign row and every job.
    For "+", calling code, national number, the parser only splits off the calling code and
    strips a national prefix (numbers that start with one, or with a zero, are left to it); the
    validity check that follows is libphonenumber's own. A unit test compares the two.
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
    return PhoneNumber(country_code=int(code), national_number=int(national))


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
        if int(digits[:size]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return digits[:size]
    return None


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
