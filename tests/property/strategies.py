"""Hypothesis strategies of jobs as producers publish them: mostly valid, some one field off,
some hostile (envelopes of the wrong shape, odd options, odd identifiers, bodies that are not
JSON at all).

A strategy yields :class:`Job` values whose bodies hold placeholders instead of the strings that
must be unique per run (see :mod:`tests.property.harness`, which renders them): ``NONCE``
inside identifiers, message ids and idempotency keys, and the digits ``PHONE_STEM`` inside
recipients. So a body is the same bytes whenever Hypothesis replays an example, and can be kept
in the corpus as it is.
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import strategies as st

from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, MAX_JSON_DEPTH, SEND_QUEUE

#: Placeholder for the per-run nonce (8 ASCII characters; replaced by as many).
NONCE = "qNONCEq0"
#: Recipients are ``+91`` + ``PHONE_STEM`` + a 4-digit index; the harness replaces the stem
#: with digits unique to the run, so every send has a recipient of its own (its marker).
PHONE_STEM = "955555"

Kind = Literal["valid", "nearly", "hostile", "raw"]

#: The sandbox's own client; refresh_client_tokens needs a client that list_clients lists.
SANDBOX_CLIENT = "demo-client"
SANDBOX_PHONES = ("demo-phone-1", "demo-phone-2")

#: Years ahead, and fixed, so a corpus case stays years ahead: 2100-01-01.
ETA_YEARS_AHEAD_MS = 4_102_444_800_000
#: Fixed, so a replayed example publishes the same bytes.
MESSAGE_TIMESTAMP = 1_764_000_000_000


@dataclass(frozen=True)
class Job:
    """One body published to one queue."""

    queue: str
    body: bytes
    #: valid: must end ``sent``/``done``; nearly: one field off; hostile / raw: anything goes,
    #: as long as it ends once and hurts nobody else.
    kind: Kind
    #: What the strategy did, for failure reports.
    note: str
    #: Simulator script entries (``POST /admin/script``) to set before publishing: a slow
    #: answer for this job's recipient, say.
    script: tuple[dict[str, Any], ...] = ()


def recipient(index: int) -> str:
    return f"+91{PHONE_STEM}{index:04d}"


# --- pieces -------------------------------------------------------------------------------------
_ID_CHARS = string.ascii_letters + string.digits + "._:@-"

#: Identifiers the contract allows (``^[A-Za-z0-9._:@-]{1,128}$``).
valid_ids = st.one_of(
    *[st.sampled_from(["acme", "demo-client", "demo-phone-1", "phone-1", "c.1:x@y-z", "a"])] * 5,
    *[st.text(alphabet=_ID_CHARS, min_size=1, max_size=24)] * 4,
    st.text(alphabet=_ID_CHARS, min_size=100, max_size=128),
)

#: Strings a careless producer puts where an identifier goes.
odd_strings = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "acme#1",
            "acme*",
            "a.b.c",
            "x:y:z",
            "line\r\nbreak",
            "nul\x00byte",
            "tab\tbed",
            "ünïcödé",
            "日本語",
            "\u202eevil",
            "emoji\U0001f600",
            "\ufeffbom",
            "é" * 128,
            "a" * 129,
            "z" * 300,
        ]
    ),
    st.text(min_size=0, max_size=40),
    st.text(min_size=120, max_size=260),
)

#: Any JSON value, small.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

#: Any JSON value the contract takes inside a message: integers within 64 bits.
contract_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

#: Metadata the contract allows and every part of the worker handles: small, plain JSON.
plain_metadata = st.dictionaries(
    st.text(max_size=12),
    st.one_of(
        st.integers(min_value=-(2**53), max_value=2**53),
        st.text(max_size=30),
        st.booleans(),
        st.none(),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
    ),
    max_size=4,
)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = {"n": value} if i % 2 else [value]
    return value


#: Metadata a producer may send and the contract does not forbid: huge integers (a 20-digit
#: order number), deep nesting, odd Unicode, odd keys.
odd_metadata = st.one_of(
    st.builds(lambda n: {"order": n}, st.integers(min_value=2**63, max_value=10**40)),
    st.builds(lambda n: {"order": -n}, st.integers(min_value=2**63, max_value=10**40)),
    st.builds(lambda d: {"deep": _nested(d, 1)}, st.integers(min_value=20, max_value=600)),
    st.builds(lambda s: {"note": s}, st.text(min_size=1000, max_size=4000)),
    st.builds(lambda s: {s: 1}, odd_strings),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
)

_text_bodies = st.one_of(
    st.text(min_size=1, max_size=40),
    st.just("x" * 4096),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=4090, max_size=4096),
)
_links = st.sampled_from(
    ["https://example.com/a.png", "https://cdn.example.org/path/to/file.pdf?x=1", "http://e.x/v"]
)
_captions = st.one_of(st.none(), st.text(max_size=30), st.just("c" * 1024))
_template_params = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
        # Parameters allow extra fields: the content key depends on the type.
        st.fixed_dictionaries(
            {"type": st.sampled_from(["currency", "date_time", "payload", "coupon_code"])},
            optional={"extra": contract_json_values, "text": st.text(max_size=10)},
        ),
    ),
    max_size=5,
)


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(["text", "image", "video", "document", "audio", "template", "interactive"])
    )
    if kind == "text":
        text: dict[str, Any] = {"body": draw(_text_bodies)}
        if draw(st.booleans()):
            text["preview_url"] = draw(st.booleans())
        return {"type": "text", "text": text}
    if kind in ("image", "video", "document"):
        media: dict[str, Any] = {"link": draw(_links)}
        caption = draw(_captions)
        if caption is not None:
            media["caption"] = caption
        if kind == "document" and draw(st.booleans()):
            media["filename"] = draw(st.text(min_size=1, max_size=240))
        return {"type": kind, kind: media}
    if kind == "audio":
        return {"type": "audio", "audio": {"link": draw(_links)}}
    if kind == "template":
        components = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["header", "body", "footer", "button"])},
                    optional={"parameters": _template_params},
                ),
                max_size=3,
            )
        )
        return {
            "type": "template",
            "template": {
                "name": draw(st.from_regex(r"[a-z0-9_]{1,30}", fullmatch=True)),
                "language": {"code": draw(st.sampled_from(["en", "en_US", "pt_BR", "hi"]))},
                "components": components,
            },
        }
    action = draw(
        st.one_of(
            st.just({"buttons": [{"type": "reply", "reply": {"id": "1", "title": "Yes"}}]}),
            # Within the contract: kwargs, message, interactive and action take four levels.
            st.builds(lambda d: {"nested": _nested(d, "leaf")}, st.integers(1, MAX_JSON_DEPTH - 4)),
            st.dictionaries(st.text(max_size=8), contract_json_values, max_size=4),
        )
    )
    return {
        "type": "interactive",
        "interactive": {
            "type": draw(st.sampled_from(["button", "list", "cta_url", "flow"])),
            "body": {"text": draw(st.text(min_size=1, max_size=60))},
            "action": action,
        },
    }


@st.composite
def valid_send_kwargs(draw: st.DrawFn, index: int, campaign: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "client_id": draw(valid_ids),
        "phone_id": draw(valid_ids),
        "to": recipient(index),
        "message": draw(valid_messages()),
    }
    if draw(st.booleans()):
        kwargs["idempotency_key"] = f"{NONCE}-k{index}" + draw(
            st.text(alphabet=string.ascii_letters + string.digits + "-_.:", max_size=20)
        )
    if campaign or draw(st.integers(0, 4)) == 0:
        kwargs["campaign_id"] = f"{NONCE}.{draw(st.text(alphabet=_ID_CHARS, max_size=12))}"
    if draw(st.booleans()):
        kwargs["metadata"] = draw(plain_metadata)
    return kwargs


@st.composite
def valid_manage(draw: st.DrawFn, index: int) -> tuple[str, dict[str, Any]]:
    actor = draw(st.sampled_from(["list_clients", "refresh_phone_token", "refresh_client_tokens"]))
    kwargs: dict[str, Any] = {}
    if actor == "refresh_phone_token":
        kwargs = {"client_id": draw(valid_ids), "phone_id": draw(valid_ids)}
    elif actor == "refresh_client_tokens":
        kwargs = {"client_id": SANDBOX_CLIENT}
    if draw(st.booleans()):
        kwargs["metadata"] = draw(plain_metadata)
    return actor, kwargs


def message_id(index: int) -> str:
    return f"{NONCE}-{index:03d}"


def encode(envelope: Any) -> bytes:
    # ensure_ascii=False: identifiers' odd characters reach the worker as UTF-8, not escapes.
    return json.dumps(envelope, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- one field off ------------------------------------------------------------------------------
_KWARG_MUTATIONS = (
    "drop",
    "wrong_type",
    "odd_string",
    "unknown_field",
    "bad_to",
    "bad_message",
    "odd_metadata",
)


@st.composite
def nearly_valid_kwargs(draw: st.DrawFn, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    kwargs = dict(kwargs)
    how = draw(st.sampled_from(_KWARG_MUTATIONS))
    fields = sorted(kwargs) or ["metadata"]
    field = draw(st.sampled_from(fields))
    if how == "drop" and kwargs:
        del kwargs[field]
    elif how == "wrong_type":
        kwargs[field] = draw(json_values)
    elif how == "odd_string":
        field = draw(st.sampled_from(["client_id", "phone_id", "idempotency_key", "campaign_id"]))
        # The nonce keeps ledger keys apart across examples even when the rest is odd.
        kwargs[field] = draw(st.sampled_from(["", f"{NONCE}"])) + draw(odd_strings)
    elif how == "unknown_field":
        field = draw(st.sampled_from(["idempotncy_key", "prio", "To", "", "\x00"]))
        kwargs[field] = 1
    elif how == "bad_to":
        field = "to"
        kwargs["to"] = draw(
            st.sampled_from(
                ["", "+12", "919876543210", "+91 98765 43210", "+९१९८७६५४३२१०", "+" + "9" * 40]
            )
        )
    elif how == "bad_message":
        field = "message"
        kwargs["message"] = draw(
            st.one_of(
                st.just({"type": "hologram"}),
                st.just({"type": "text", "text": {"body": ""}}),
                st.just({"type": "text", "text": {"body": "y" * 4097}}),
                st.just({"type": "text", "text": {"body": "hi", "extra": 1}}),
                st.just({"type": "image", "image": {"link": "not a url"}}),
                st.just({"type": "template", "template": {"name": "Bad Name", "language": {}}}),
                st.builds(
                    lambda d: {
                        "type": "interactive",
                        "interactive": {"type": "button", "action": _nested(d, 0)},
                    },
                    st.integers(100, 900),
                ),
                json_values,
            )
        )
    else:
        kwargs["metadata"] = draw(odd_metadata)
        return kwargs, "metadata: odd but allowed by the contract"
    return kwargs, f"{how} {field}"


# --- hostile envelopes --------------------------------------------------------------------------
def _eta_values() -> st.SearchStrategy[Any]:
    def soon(ms: int) -> int:
        # Rendered when the example runs: within 2 s of now.
        return int(time.time() * 1000) + ms

    return st.one_of(
        st.just(1_000_000_000_000),  # 2001: long past
        st.just(0),
        st.integers(min_value=-(2**63), max_value=-1),
        st.builds(soon, st.integers(min_value=-2000, max_value=2000)),
        st.just(ETA_YEARS_AHEAD_MS),
        st.just(10**30),
        st.just(float("1e300")),
        st.sampled_from(["soon", "", None, [], {}, True]),
    )


_OPTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "throws": st.one_of(st.sampled_from([1, "ValueError", [], {}, True, 0, None]), json_values),
    "time_limit": st.sampled_from([1, 0, -1, 5, 10**30, "x", 1.5, None, True]),
    "eta": _eta_values(),
    "retries": st.sampled_from([-1, 0, 7, 8, 9, 10**20, 2**64, True, False, "3", None, 1.5]),
    "max_retries": st.sampled_from([-1, 0, 10**9, "x", None]),
    "broker_priority": st.sampled_from([0, 5, 255, 256, -1, "high", 10**20, None]),
    "pipe_target": st.one_of(st.none(), json_values),
    "pipe_ignore": st.booleans(),
    "on_success": st.sampled_from(["send_message", "list_clients", "nope", 1]),
    "on_failure": st.sampled_from(["send_message", "refresh_client_tokens", "nope"]),
    "on_retry_exhausted": st.sampled_from(["send_message", "nope"]),
    "max_age": st.sampled_from([0, 1, -1, "x"]),
    "delay": st.sampled_from([0, 10**12, -1, "x"]),
    "deferrals": st.sampled_from([-1, 10**20, "x", None, True]),
    "last_error": st.text(max_size=600),
    "notify_shutdown": st.sampled_from([True, "x"]),
    "group_completion_uuid": st.text(max_size=10),
    "group_completion_callbacks": json_values,
    "traceback": st.text(max_size=50),
    "redis_message_id": st.text(max_size=10),
    "dead_message": st.booleans(),
    "x-verloop-dead-letter": json_values,
}


@st.composite
def hostile_options(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(st.sampled_from(sorted(_OPTION_VALUES)), min_size=1, max_size=3, unique=True)
    )
    options = {name: draw(_OPTION_VALUES[name]) for name in names}
    if draw(st.integers(0, 3)) == 0:
        options[draw(st.text(max_size=12))] = draw(json_values)
    return options


_ENVELOPE_MUTATIONS = (
    "options",
    "options",
    "options",
    "odd_message_id",
    "message_timestamp",
    "queue_name",
    "actor_name",
    "unknown_top_level",
    "args",
    "kwargs_type",
    "drop_optional",
    "publish_twice",
)


@st.composite
def hostile_envelope(
    draw: st.DrawFn, envelope: dict[str, Any], queue: str
) -> tuple[dict[str, Any], str, str, int, tuple[dict[str, Any], ...]]:
    """(envelope, queue, note, copies, script): one hostile change to a good envelope."""
    envelope = dict(envelope)
    how = draw(st.sampled_from(_ENVELOPE_MUTATIONS))
    copies = 1
    script: tuple[dict[str, Any], ...] = ()
    if how == "options":
        envelope["options"] = draw(hostile_options())
        note = f"options {envelope['options']!r}"[:300]
        to = envelope["kwargs"].get("to")
        if "time_limit" in envelope["options"] and isinstance(to, str) and draw(st.booleans()):
            # dramatiq looks at time limits once a second: a send must be slow to be cut off.
            script = ({"status": 200, "delay_ms": 1300, "to": to},)
            note += ", answered after 1.3 s"
    elif how == "odd_message_id":
        envelope["message_id"] = envelope["message_id"] + draw(odd_strings)
        note = "odd message_id"
    elif how == "message_timestamp":
        envelope["message_timestamp"] = draw(
            st.sampled_from([-1, 0, 10**30, 2**64, 1.5, "now", None, True])
        )
        note = f"message_timestamp {envelope['message_timestamp']!r}"
    elif how == "queue_name":
        envelope["queue_name"] = draw(
            st.sampled_from([queue + ".DQ", queue + ".XQ", "default", "", SEND_QUEUE, MANAGE_QUEUE])
        )
        note = f"queue_name {envelope['queue_name']!r} on {queue}"
    elif how == "actor_name":
        envelope["actor_name"] = draw(
            st.sampled_from(
                [
                    "send_message",
                    "list_clients",
                    "refresh_client_tokens",
                    "verloop.undecodable",
                    "x",
                ]
            )
        )
        queue = draw(st.sampled_from([SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE, queue]))
        note = f"actor {envelope['actor_name']!r} on {queue}"
    elif how == "unknown_top_level":
        envelope[draw(st.sampled_from(["prio", "eta", "delay", "", "Actor_name"]))] = 1
        note = "unknown top-level field"
    elif how == "args":
        envelope["args"] = draw(st.lists(json_values, min_size=1, max_size=3))
        note = "positional args"
    elif how == "kwargs_type":
        envelope["kwargs"] = draw(st.one_of(st.lists(json_values, max_size=2), json_scalars))
        note = "kwargs not an object"
    elif how == "drop_optional":
        for name in draw(
            st.lists(
                st.sampled_from(["queue_name", "args", "options", "message_timestamp"]),
                unique=True,
                min_size=1,
            )
        ):
            envelope.pop(name, None)
        note = "minimal envelope"
    else:
        copies = 2
        note = "published twice"
    return envelope, queue, note, copies, script


# --- bodies that are not JSON objects -----------------------------------------------------------
raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda s: s.encode("utf-8")),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"send_message"',
            b"{",
            b'{"actor_name": "send_message", "kwargs": {',
            b"\xef\xbb\xbf{}",
            b'{"actor_name": "send_message", "kwargs": {}}\x00',
            b"[" * 5000,
            b'{"a":' * 3000,
            b"\xff\xfe",
            b'{"actor_name": "send_message", "kwargs": {"x": NaN}}',
            b'{"actor_name": "send_message", "kwargs": {"x": "\\ud800"}}',
            # Duplicate names: which one counts is up to the parser. (The message_id lets the
            # harness find its outcome if the worker takes the body.)
            b'{"actor_name": "send_message", "actor_name": "list_clients", "kwargs": {}, '
            b'"message_id": "qNONCEq0-dup"}',
        ]
    ),
)


# --- a batch ------------------------------------------------------------------------------------
@st.composite
def jobs(draw: st.DrawFn, index: int) -> list[Job]:
    """One generated job (two copies when it is to be published twice)."""
    kind = draw(st.sampled_from(["valid"] * 5 + ["nearly"] * 2 + ["hostile"] * 2 + ["raw"]))
    if kind == "raw":
        return [
            Job(
                draw(st.sampled_from([SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE])),
                draw(raw_bodies),
                "raw",
                "not a JSON object",
            )
        ]
    target = draw(st.sampled_from(["send", "campaign", "send", "manage"]))
    if target == "manage":
        queue = MANAGE_QUEUE
        actor, kwargs = draw(valid_manage(index))
    else:
        queue = CAMPAIGN_QUEUE if target == "campaign" else SEND_QUEUE
        actor = "send_message"
        kwargs = draw(valid_send_kwargs(index, campaign=target == "campaign"))
    note = f"valid {actor} on {queue}"
    if kind == "nearly":
        kwargs, what = draw(nearly_valid_kwargs(kwargs))
        note = f"{actor} on {queue}, {what}"
    envelope: dict[str, Any] = {
        "queue_name": queue,
        "actor_name": actor,
        "args": [],
        "kwargs": kwargs,
        "options": {},
        "message_id": message_id(index),
        "message_timestamp": MESSAGE_TIMESTAMP,
    }
    copies = 1
    script: tuple[dict[str, Any], ...] = ()
    if kind == "hostile":
        envelope, queue, what, copies, script = draw(hostile_envelope(envelope, queue))
        note = f"{actor}, {what}"
    job = Job(queue, encode(envelope), kind, note, script)
    return [job] * copies


@st.composite
def batches(draw: st.DrawFn, max_jobs: int = 8) -> list[Job]:
    count = draw(st.integers(min_value=1, max_value=max_jobs))
    batch: list[Job] = []
    for index in range(count):
        batch.extend(draw(jobs(index)))
    return batch
