"""Redis answers as text, whatever the client's ``decode_responses`` (the worker's clients
decode; a client made elsewhere, a test's or a tool's, may not)."""

from __future__ import annotations

__all__ = ["as_text"]


def as_text(value: object) -> str:
    """``value`` as ``str``: bytes decoded as UTF-8, anything else through ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)
