"""Unit tests for the two JSON readers of worker.jobs.wire: orjson's fast reading of a body is
only ever taken when the strict reader would read the very same value (same types, same float
signs, same key order), and every body the strict reader refuses is left to it, so its reason
is the one producers see."""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from typing import Any

import orjson
import pytest
from dramatiq.encoder import JSONEncoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.jobs import wire
from worker.jobs.models import SEND_QUEUE
from worker.jobs.wire import _UNSURE, _read_fast, _read_strictly, encode_job, parse_envelope

KWARGS: dict[str, Any] = {
    "client_id": "acme",
    "phone_id": "p1",
    "to": "+919876543210",
    "message": {"type": "text", "text": {"body": "Grüße ✓ \u2028 😀 नमस्ते"}},
    "metadata": {"order": 2**63, "neg": -(2**63), "ratio": 0.1, "url": "https://x.example/a:b"},
}


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down: 1 is not 1.0, -0.0 is not 0.0, and the
    keys of an object come in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def reading(body: bytes) -> str:
    """How the body is read: ``fast``, ``strict`` (orjson unsure) or ``refused``; fails the
    test if the fast reading is not the strict one's value."""
    fast = _read_fast(body)
    try:
        strict = _read_strictly(body)
    except ValueError:
        assert fast is _UNSURE, body[:200]
        return "refused"
    if fast is _UNSURE:
        return "strict"
    assert same(fast, strict), body[:200]
    return "fast"


# --- bodies as producers write them ----------------------------------------------------------
def test_the_workers_own_bodies_are_read_fast() -> None:
    """What the producer, the campaign enqueuer and the replay write (compact, UTF-8) is what
    orjson writes back byte for byte: read fast, whatever the text."""
    body = encode_job("send_message", KWARGS, queue=SEND_QUEUE, message_id="m-1")
    assert reading(body) == "fast"
    assert orjson.dumps(orjson.loads(body)) == body


@pytest.mark.parametrize(
    "dump",
    [
        lambda v: json.dumps(v).encode(),  # spaces, \u escapes
        lambda v: json.dumps(v, indent=2).encode(),
        lambda v: JSONEncoder().encode(v),  # dramatiq's own (a retry's copy)
        lambda v: json.dumps(v, ensure_ascii=False, separators=(", ", " : ")).encode(),
    ],
    ids=["json-default", "indented", "dramatiq", "spaced-utf8"],
)
def test_other_writers_bodies_are_read_fast_when_sure(dump: Any) -> None:
    """Another writer's spacing and escapes take the fast reading too (the colons agree);
    an integer of 19 digits or more is left to the strict reader."""
    small = {k: v for k, v in KWARGS.items() if k != "metadata"}
    envelope = {"actor_name": "send_message", "kwargs": small, "message_id": "m-1"}
    assert reading(dump(envelope)) == "fast"
    envelope["kwargs"] = KWARGS
    assert reading(dump(envelope)) == "strict"


# --- hostile bodies --------------------------------------------------------------------------
HOSTILE = [
    b'{"a":1,"a":2}',
    b'{"a": 1, "a" : 1}',
    b'{"k":{"x":1,"y":{"x":[1,{"z":1,"z":1}]}}}',
    # a repeated name hidden by an escaped colon: the counts would agree
    b'{"a":1,"a":"\\u003a"}',
    b'{"a":1,"a":"\\u003A"}',
    b'{"\\u003a":1,"\\u003a":2}',
    b'{"a":":","a":1}',
    b'{"x":NaN}',
    b'{"x":-Infinity}',
    b'{"x":1e400}',
    b'{"x":-1.7976931348623159e308}',
    b'{"x":1e-400}',
    b'{"x":"\\ud800"}',
    b'{"x":"\\udc00x"}',
    b'{"x":"\\ud83d\\ude00"}',
    b'{"x":"\\ud83d\\u0041"}',
    b'{"x":"\xed\xa0\x80"}',
    b'{"x":"caf\xe9"}',
    b'\xef\xbb\xbf{"x":1}',
    b'{"x":"a\tb"}',
    b'{"x":"a\x7fb\xc2\x85"}',
    b'{"x":18446744073709551615}',
    b'{"x":18446744073709551616}',
    b'{"x":-9223372036854775808}',
    b'{"x":-9223372036854775809}',
    b'{"x":1234567890123456789012345678901234567890}',
    b'{"x":"1234567890123456789012"}',
    b'{"x":-0}',
    b'{"x":-0.0}',
    b'{"x":0e0}',
    b'{"x":1E+2,"y":1e-2,"z":1.5E02}',
    b'{"x":0.1000000000000000055511151231257827}',
    b'{"x":4.9e-324,"y":2.2250738585072014e-308}',
    b'{"x":01}',
    b'{"x":1.}',
    b'{"x":.5}',
    b'{"x":+1}',
    b'{"x":1,}',
    b"{'x':1}",
    b'{"x":1}\x00',
    b'{"x":1} x',
    b' \n{"x":1}\r\n\t',
    b'{"x":1}\x0c',
    b'{"x":"\\x"}',
    b'{"x":"\\u12"}',
    b'{"x":"\\/\\b\\f\\n\\r\\t\\"\\\\"}',
    b'{"x":"\\u0000"}',
    b"",
    b"null",
    b'"text"',
    b"[1,2]",
    b"[" * 300 + b"]" * 300,
    b"[" * 1100 + b"]" * 1100,
    b"[" * 100_000,
    b'{"a":' * 200 + b"1" + b"}" * 200,
]


@pytest.mark.parametrize("body", HOSTILE)
def test_a_hostile_body_is_read_the_strict_way_or_to_the_same_value(body: bytes) -> None:
    reading(body)


@pytest.mark.parametrize("body", HOSTILE)
def test_parse_envelope_says_the_same_with_or_without_the_fast_reader(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end, including what the envelope checks make of the value."""
    envelope = b'{"actor_name":"send_message","message_id":"m","message_timestamp":1,"kwargs":'
    for data in (body, envelope + body + b"}"):
        fast = _outcome(data)
        monkeypatch.setattr(wire, "_read_fast", lambda _data: _UNSURE)
        strict = _outcome(data)
        monkeypatch.undo()
        assert type(fast) is type(strict)
        assert same(fast, strict) if isinstance(fast, dict) else fast == strict


def _outcome(data: bytes) -> dict[str, Any] | str:
    try:
        return parse_envelope(data, queue=SEND_QUEUE, max_bytes=10**6, max_delay_ms=10**9)
    except ValueError as exc:
        return str(exc)


# --- generated bodies: JSON written every way a producer might, and some ways it must not ----
#: Names that repeat often, colons included.
_NAMES = st.one_of(st.sampled_from(["a", "b", ":", "a:b", "", "é"]), st.text(max_size=4))
_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(':"\\/\n\t\x00\x7f\u2028😀é'),
        st.characters(codec="utf-8"),
        st.characters(categories=["Cs"]),  # lone surrogates
    ),
    max_size=12,
)
_INTS = st.one_of(
    st.integers(-1000, 1000),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**18, 10**19]),
)
_FLOATS = st.floats(allow_nan=True, allow_infinity=True)


class _Pairs(list[tuple[str, Any]]):
    """An object as its members, a name maybe more than once."""


_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), _INTS, _FLOATS, _TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(_NAMES, inner), max_size=4).map(_Pairs),
    ),
    max_leaves=16,
)


@st.composite
def json_texts(draw: st.DrawFn) -> bytes:
    """A value written as JSON text, with choices a writer may make: spacing, escapes (a colon
    too), number forms; and some it may not: raw control characters, NaN, lone surrogates."""
    value = draw(_VALUES)
    space = st.sampled_from(["", "", "", " ", "\n  ", "\t", "\r\n"])
    parts: list[str] = []

    def write(node: Any) -> None:
        parts.append(draw(space))
        if isinstance(node, _Pairs):
            parts.append("{")
            for i, (name, item) in enumerate(node):
                parts.append("," if i else "")
                write_text(name)
                parts.append(draw(space) + ":")
                write(item)
            parts.append(draw(space) + "}")
        elif isinstance(node, list):
            parts.append("[")
            for i, item in enumerate(node):
                parts.append("," if i else "")
                write(item)
            parts.append(draw(space) + "]")
        elif isinstance(node, str):
            write_text(node)
        elif isinstance(node, float):
            parts.append(write_float(node))
        else:
            parts.append(json.dumps(node))

    def write_text(text: str) -> None:
        out = ['"']
        for ch in text:
            escape = draw(st.integers(0, 3)) == 0
            if ch in '"\\' or (ch < " " and draw(st.integers(0, 30)) != 0):
                out.append(json.dumps(ch)[1:-1])
            elif escape or "\ud800" <= ch <= "\udfff":
                if ch > "\uffff":
                    high, low = divmod(ord(ch) - 0x10000, 0x400)
                    out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04X}")
                else:
                    out.append(f"\\u{ord(ch):04{draw(st.sampled_from('xX'))}}")
            else:
                out.append(ch)
        out.append('"')
        parts.append("".join(out))

    def write_float(number: float) -> str:
        if not math.isfinite(number):
            return draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]))
        form = draw(st.sampled_from(["repr", "e", "E+", "long"]))
        if form == "e":
            return f"{number:e}"
        if form == "E+":
            return f"{number:.17E}"
        if form == "long":
            return f"{number:.25f}"
        return repr(number)

    write(value)
    parts.append(draw(space))
    text = "".join(parts)
    return text.encode("utf-8", "surrogatepass")


def _plain(node: Any) -> Any:
    """A generated value as Python would hold it (a repeated name: the last one wins)."""
    if isinstance(node, _Pairs):
        return {name: _plain(item) for name, item in node}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    return node


def test_generated_json_text_is_read_fast_only_to_the_strict_value() -> None:
    """Generated bodies of every kind: read fast, left to the strict reader, refused (run once
    with 300,000 examples: no difference)."""
    readings: Counter[str] = Counter()

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(json_texts())
    def read(body: bytes) -> None:
        readings[reading(body)] += 1

    read()
    # The generator is worth something only if it makes bodies of every kind.
    assert min(readings[kind] for kind in ("fast", "strict", "refused")) > 50, readings


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(_VALUES, st.booleans(), st.sampled_from([(",", ":"), (", ", ": ")]))
def test_json_from_the_standard_library_is_read_fast_only_to_the_strict_value(
    value: Any, ascii_only: bool, separators: tuple[str, str]
) -> None:
    try:
        text = json.dumps(_plain(value), ensure_ascii=ascii_only, separators=separators)
        body = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw: not UTF-8
        return
    reading(body)


def test_names_are_any_text() -> None:
    """(A name of every printable ASCII character, once each: read fast.)"""
    body = json.dumps({c: i for i, c in enumerate(string.printable)}).encode()
    assert reading(body) == "fast"
