"""Unit tests for worker.jobs.json_limits: the quick look that passes most kwargs never passes
one that the full walk refuses (the walk names the place; its reasons are tested in
test_jobs.py), and passes every plain one the walk passes."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections import Counter, OrderedDict
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.jobs.json_limits import (
    MAX_JSON_DEPTH,
    _plainly_within_limits,
    _walk_json_limits,
    check_json_limits,
)


class _Color(enum.Enum):
    RED = "red"


class _Str(str):
    pass


class _Int(int):
    pass


_EDGE_INTS = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(_EDGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
    st.text(alphabet=st.characters(categories=["Cs", "Ll"]), max_size=3),  # lone surrogates
    st.sampled_from(
        [
            b"bytes",
            uuid.UUID(int=1),
            dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            Decimal("1.5"),
            _Color.RED,
            _Str("sub"),
            _Int(7),
            _Str("\ud800"),
            _Int(2**64),
            (1, "t"),
            {1, 2},
            object(),
        ]
    ),
)
_KEYS = st.one_of(
    st.text(max_size=4),
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=2),
    st.integers(0, 3),
    st.none(),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_KEYS, inner, max_size=4),
        st.dictionaries(st.text(max_size=3), inner, max_size=3).map(OrderedDict),
    ),
    max_leaves=14,
)


#: Values within the limits, mostly: what producers send.
_PLAIN = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=14,
)


def _nest(value: Any, depth: int, dicts: bool) -> Any:
    for i in range(depth):
        value = {"n": value} if dicts and i % 2 else [value]
    return value


_DEEP = st.builds(
    _nest,
    _VALUES,
    st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 2),
    st.booleans(),
)


def _walk_passes(value: Any) -> bool:
    try:
        _walk_json_limits(value, "")
    except ValueError:
        return False
    return True


def _exact_types_only(value: Any) -> bool:
    """Built of dict, list, str, int, float, bool and None themselves (no subclass, no tuple)."""
    if type(value) is dict:
        return all(type(k) is str for k in value) and all(map(_exact_types_only, value.values()))
    if type(value) is list:
        return all(map(_exact_types_only, value))
    return value is None or type(value) in (str, int, float, bool)


def test_the_quick_look_agrees_with_the_walk() -> None:
    """Never passes what the walk refuses; passes all the walk passes, but for subclasses and
    tuples (left to the walk, which may pass them). Run once with 200,000 examples: no
    difference."""
    looks: Counter[str] = Counter()

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.text(max_size=4), st.one_of(_PLAIN, _VALUES, _DEEP), max_size=4))
    def look(kwargs: dict[str, Any]) -> None:
        quick = _plainly_within_limits(kwargs, 0)
        walk = _walk_passes(kwargs)
        if quick:
            assert walk
        elif _exact_types_only(kwargs):
            assert not walk
        looks["quick" if quick else "walk" if walk else "refused"] += 1

    look()
    # The values above are worth something only if they are of every kind.
    assert min(looks[kind] for kind in ("quick", "walk", "refused")) > 50, looks


@pytest.mark.parametrize(
    "value",
    [
        {"a": _nest(1, MAX_JSON_DEPTH - 1, True)},
        {"a": _nest({}, MAX_JSON_DEPTH - 2, False)},  # an object at the last level
        {"m": {"a": 2**64 - 1, "b": -(2**63), "f": 1e308, "s": "😀", "n": None, "t": True}},
    ],
)
def test_values_at_the_limits_pass_quickly(value: dict[str, Any]) -> None:
    assert _plainly_within_limits(value, 0)
    check_json_limits(value)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"a": _nest(1, MAX_JSON_DEPTH, True)}, "nested more than"),
        ({"a": _nest({}, MAX_JSON_DEPTH - 1, False)}, "nested more than"),
        ({"a": 2**64}, "a: an integer of 20 digits"),
        ({"a": [1, -(2**63) - 1]}, "a.1: an integer of 19 digits"),
        ({"a": {"b": float("nan")}}, "a.b: nan is not a JSON number"),
        ({"a": {"\udc00": 1}}, "a: has a lone UTF-16 surrogate"),
        ({1: 1}, "job: object keys must be strings"),
        ({"u": uuid.UUID(int=1)}, "u: a UUID is not a JSON value"),
        ({"e": _Color.RED}, "e: a _Color is not a JSON value"),
    ],
)
def test_values_beyond_the_limits_are_refused_naming_the_place(
    value: dict[str, Any], says: str
) -> None:
    assert not _plainly_within_limits(value, 0)
    with pytest.raises(ValueError, match=says):
        check_json_limits(value)


def test_subclasses_and_tuples_still_pass_through_the_walk() -> None:
    """What the walk always took (a str subclass, a tuple) is still taken."""
    value = {"s": _Str("x"), "t": (1, "y"), "d": OrderedDict(a=_Int(2))}
    assert not _plainly_within_limits(value, 0)
    check_json_limits(value)
