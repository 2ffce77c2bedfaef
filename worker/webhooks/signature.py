"""The webhook's signature and verification token, checked in constant time.

WhatsApp signs each POST body with the app secret: ``X-Hub-Signature-256: sha256=<hex
HMAC-SHA256 of the raw body>``. Nothing here logs or returns the header, the secret or the
token: callers get a yes or no.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = ["PREFIX", "sign", "signature_ok", "token_ok"]

#: The header's value starts with this; the rest is the digest in hex.
PREFIX: Final = "sha256="
_HEX_DIGEST_CHARS: Final = 64


def sign(body: bytes, secret: bytes) -> str:
    """The header value WhatsApp sends for ``body`` (tests and the benchmark sign with it)."""
    return PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_ok(header: str | None, body: bytes, secret: bytes) -> bool:
    """Whether ``header`` is ``sha256=`` and the HMAC-SHA256 of ``body`` with ``secret``.

    The digest is compared with :func:`hmac.compare_digest` (hex in either case is accepted);
    a missing, malformed or non-ASCII header is simply wrong.
    """
    if not header or header[: len(PREFIX)].lower() != PREFIX:
        return False
    given = header[len(PREFIX) :].strip().lower()
    if len(given) != _HEX_DIGEST_CHARS or not given.isascii():
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))


def token_ok(given: str | None, expected: bytes | None) -> bool:
    """Whether the verification GET's ``hub.verify_token`` is the configured one (no token
    configured: never)."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected)
