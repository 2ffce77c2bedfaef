"""Redis keys made of ids that producers choose.

Ids may contain ``:`` (``^[A-Za-z0-9._:@-]+$``), so joining them with ``:`` is ambiguous: client
``a:b`` with key ``c`` and client ``a`` with key ``b:c`` would share an entry. Here every part
is written as ``<length>:<text>``, which no choice of ids can make look like another: client
``acme`` and key ``otp-1`` give ``4:acme:5:otp-1``. The keys stay readable in ``redis-cli``.
"""

from __future__ import annotations

__all__ = ["join_parts", "split_parts"]


def join_parts(*parts: str) -> str:
    """``("acme", "otp-1")`` → ``"4:acme:5:otp-1"``."""
    return ":".join(f"{len(part)}:{part}" for part in parts)


def split_parts(text: str) -> list[str]:
    """The parts :func:`join_parts` joined.

    Raises:
        ValueError: ``text`` is not in that form.
    """
    parts: list[str] = []
    at = 0
    while at < len(text):
        colon = text.index(":", at)
        size = int(text[at:colon])
        start = colon + 1
        if size < 0 or start + size > len(text):
            raise ValueError(f"not a length-prefixed key: {text[:80]!r}")
        parts.append(text[start : start + size])
        at = start + size
        if at < len(text):
            if text[at] != ":":
                raise ValueError(f"not a length-prefixed key: {text[:80]!r}")
            at += 1
            if at == len(text):
                raise ValueError(f"not a length-prefixed key: {text[:80]!r}")
    return parts
