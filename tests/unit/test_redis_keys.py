"""worker.connections.redis_keys: keys made of producers' ids cannot be made to collide."""

from __future__ import annotations

import itertools

import pytest

from worker.connections.redis_keys import join_parts, split_parts

AWKWARD = ["", "a", ":", "a:b", "b:c", "1:a", "4:acme", "::", "é:ü", "x" * 128]


def test_parts_joined_split_back_into_the_same_parts() -> None:
    for parts in itertools.product(AWKWARD, repeat=3):
        assert split_parts(join_parts(*parts)) == list(parts)


def test_different_parts_never_give_the_same_key() -> None:
    """Every pair and triple of awkward ids gives a key of its own (a:b + c is not a + b:c)."""
    seen: dict[str, tuple[str, ...]] = {}
    for size in (1, 2, 3):
        for parts in itertools.product(AWKWARD, repeat=size):
            key = join_parts(*parts)
            assert seen.setdefault(key, parts) == parts


def test_a_key_stays_readable() -> None:
    assert join_parts("acme", "otp-1") == "4:acme:5:otp-1"


@pytest.mark.parametrize("text", ["acme", "4:acm", "4:acme5:otp-1", "x:acme", "4:acme:", "-1:a"])
def test_text_not_in_the_form_is_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is for people, not for matching
        split_parts(text)
