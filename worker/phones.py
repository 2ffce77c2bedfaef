"""Phone numbers: E.164 validation (with ``phonenumbers``, Google's libphonenumber port) and the
masked form used in logs and CLI output."""

from __future__ import annotations

import re

import phonenumbers

__all__ = ["mask_phone", "normalize_e164"]

_ALLOWED = re.compile(r"\+[0-9 ()./-]{1,30}")


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
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"is not a phone number ({exc._msg})") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("is not a valid phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


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
