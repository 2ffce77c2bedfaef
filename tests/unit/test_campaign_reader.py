"""The campaign file reader: formats, row validation (the worker's verdict), rejects, options."""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker.campaigns.enqueue import default_campaign_id, encode_envelope
from worker.campaigns.reader import CampaignFile, RawRow
from worker.campaigns.rejects import _truncate_rejects
from worker.campaigns.rows import RowValidator
from worker.campaigns.spec import CampaignInputError, CampaignSpec
from worker.commands.campaign_support import parse_start_at
from worker.errors import InvalidJob
from worker.jobs.models import CAMPAIGN_QUEUE
from worker.jobs.producer import encode_job
from worker.jobs.registry import parse_job

SPEC = CampaignSpec(
    campaign_id="camp-1",
    client_id="acme",
    phone_ids=("p1", "p2", "p3"),
    template="diwali_offer",
    language="en_US",
    body_params=2,
)


def write(tmp_path: Path, text: str | bytes, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def read_all(
    path: Path, spec: CampaignSpec = SPEC, *, exact: bool = False
) -> list[tuple[RawRow, dict[str, Any] | None, str | None]]:
    with CampaignFile(path) as source:
        validator = RowValidator(spec, source, exact=exact)
        out = []
        for row in source.rows():
            if row.blank:
                out.append((row, None, None))
            else:
                out.append((row, *validator.validate(row)))
        return out


# --- good rows ------------------------------------------------------------------------------------
def test_csv_row_becomes_the_template_job_the_worker_accepts(tmp_path: Path) -> None:
    path = write(tmp_path, "to,body_1,body_2,header_1\n+91 98765-43210,Asha,₹500 off,Diwali\n")
    [(row, kwargs, reason)] = read_all(path)
    assert reason is None
    assert row.number == 1
    assert kwargs == {
        "client_id": "acme",
        "phone_id": SPEC.phone_ids[zlib.crc32(b"+919876543210") % 3],
        "to": "+919876543210",
        "campaign_id": "camp-1",
        "message": {
            "type": "template",
            "template": {
                "name": "diwali_offer",
                "language": {"code": "en_US"},
                "components": [
                    {"type": "header", "parameters": [{"type": "text", "text": "Diwali"}]},
                    {
                        "type": "body",
                        "parameters": [
                            {"type": "text", "text": "Asha"},
                            {"type": "text", "text": "₹500 off"},
                        ],
                    },
                ],
            },
        },
    }
    parse_job("send_message", (), kwargs)  # the worker takes it as it is


def test_phone_id_column_overrides_and_mapping_is_stable(tmp_path: Path) -> None:
    numbers = [f"+9198765{n:05d}" for n in range(60)]
    text = "to,body_1,body_2,phone_id\n" + "".join(
        f"{to},a,b,{'special' if n == 0 else ''}\n" for n, to in enumerate(numbers)
    )
    path = write(tmp_path, text)
    first = [kwargs["phone_id"] for _, kwargs, _ in read_all(path) if kwargs]
    again = [kwargs["phone_id"] for _, kwargs, _ in read_all(path) if kwargs]
    assert first == again
    assert first[0] == "special"
    assert set(first[1:]) == {"p1", "p2", "p3"}  # spread over every number given


def test_bom_crlf_quoted_newlines_and_blank_lines(tmp_path: Path) -> None:
    text = (
        "\ufeffto,body_1,body_2\r\n"
        '+14155550123,"two\nlines","with, comma"\r\n'
        "\r\n"
        ",,\r\n"
        "+14155550124,x,y\r\n"
    )
    rows = read_all(write(tmp_path, text))
    assert [(r.number, r.blank) for r, _, _ in rows] == [
        (1, False),
        (2, True),
        (3, True),
        (4, False),
    ]
    first = rows[0][1]
    assert first is not None
    params = first["message"]["template"]["components"][0]["parameters"]
    assert [p["text"] for p in params] == ["two\nlines", "with, comma"]
    assert rows[3][1] is not None
    assert rows[3][1]["to"] == "+14155550124"


def test_bytes_read_reaches_the_file_size(tmp_path: Path) -> None:
    path = write(tmp_path, "to,body_1,body_2\n" + "+14155550123,a,b\n" * 100)
    with CampaignFile(path) as source:
        assert sum(1 for _ in source.rows()) == 100
        assert source.bytes_read == path.stat().st_size


# --- bad rows -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("12345,a,b", "to: must be in E.164 form"),
        ("+1,a,b", "to: is not a phone number"),
        ("+919876,a,b", "to: is not a valid phone number"),
        (
            "+\uff19\uff11\uff19\uff18\uff17\uff16\uff15\uff14\uff13\uff12\uff11\uff10,a,b",
            "to: may contain only ASCII digits",
        ),  # full-width
        ("+91\u200e9876543210,a,b", "to: may contain only ASCII digits"),
        ("+919876543210,a,", "has 1 body parameters; the template takes 2"),
        ("+919876543210,,b", "body_1 is empty"),
        ("+919876543210,a, ", "has 1 body parameters"),
        ("+919876543210,a,b,c", "has 4 fields; the header has 3"),
        ("+919876543210,a", "has 2 fields; the header has 3"),
    ],
)
def test_bad_csv_rows_are_rejected_with_their_reason(
    tmp_path: Path, line: str, reason: str
) -> None:
    [(_, kwargs, got)] = read_all(write(tmp_path, f"to,body_1,body_2\n{line}\n"))
    assert kwargs is None
    assert got is not None
    assert got.startswith(reason)


def test_invalid_utf8_rejects_the_row_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"to,body_1,body_2\n+14155550123,caf\xe9,b\n+14155550124,ok,b\n")
    rows = read_all(path)
    assert rows[0][2] == "not valid UTF-8"
    assert rows[1][1] is not None


def test_bad_phone_id_column_gets_the_models_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "to,body_1,body_2,phone_id\n+14155550123,a,b,has space\n")
    [(_, kwargs, reason)] = read_all(path)
    assert kwargs is None
    assert reason is not None
    assert reason.startswith("phone_id:")


# --- the fast path gives the model's answer ------------------------------------------------------
EQUIVALENCE_ROWS = [
    "+919876543210,a,b,",
    "+91 (98765) 43210,a,b,",
    "+44 20 7946 0958,a,b,p9",
    "+1 415 555 0123,a,b,p:9@x.y-z",
    "+4402079460958,a,b,",  # national prefix after the country code
    "+39 06 698 1234,a,b,",  # Italian leading zero
    "+919876543210,a,b,p 1",
    "+919876543210,a,b," + "p" * 129,
    "+919876543210,a,b," + "p" * 128,
    "+919876543210," + "x" * 5000 + ",b,",
    "+919876543210,\U0001f600,\u202eevil,",
    "+1,a,b,",
    "+999 123 456 789,a,b,",
    "+919876543210x,a,b,",
    "919876543210,a,b,",
    "+91-98765-4321,a,b,",
    "+800 1234 5678,a,b,",
]


def test_fast_path_matches_the_worker_model_row_for_row(tmp_path: Path) -> None:
    text = "to,body_1,body_2,phone_id\n" + "".join(r + "\n" for r in EQUIVALENCE_ROWS * 2)
    path = write(tmp_path, text)
    fast = read_all(path)
    exact = read_all(path, exact=True)
    assert [(k, r) for _, k, r in fast] == [(k, r) for _, k, r in exact]
    for _, kwargs, _ in fast:
        if kwargs is not None:
            assert parse_job("send_message", (), kwargs).to == kwargs["to"]  # type: ignore[union-attr]
    assert sum(k is not None for _, k, _ in fast) >= 10
    assert sum(k is None for _, k, _ in fast) >= 10


def test_every_rejected_row_is_one_the_worker_would_reject(tmp_path: Path) -> None:
    text = "to,body_1,body_2,phone_id\n" + "".join(r + "\n" for r in EQUIVALENCE_ROWS)
    for row, kwargs, _ in read_all(write(tmp_path, text)):
        if kwargs is not None:
            continue
        to, body_1, body_2, phone_id = row.fields
        job = {
            "client_id": "acme",
            "phone_id": phone_id or "p1",
            "to": to,
            "campaign_id": "camp-1",
            "message": {
                "type": "template",
                "template": {
                    "name": "diwali_offer",
                    "language": {"code": "en_US"},
                    "components": [
                        {
                            "type": "body",
                            "parameters": [
                                {"type": "text", "text": body_1},
                                {"type": "text", "text": body_2},
                            ],
                        }
                    ],
                },
            },
        }
        with pytest.raises(InvalidJob):
            parse_job("send_message", (), job)


# --- JSON Lines -----------------------------------------------------------------------------------
def test_jsonl_rows(tmp_path: Path) -> None:
    lines = [
        {"to": "+14155550123", "body": ["Asha", 42], "header": ["Sale"]},
        {"to": "+14155550124", "body": ["Ravi", "7"], "phone_id": "p-own"},
        {"to": "+14155550125", "body": ["only one"]},
        {"to": "+14155550126", "body": ["a", "b"], "colour": "red"},
        {"to": 14155550127, "body": ["a", "b"]},
        {"to": "+14155550128", "body": ["a", True]},
        {"to": "+14155550129", "body": ["a", "b"], "header": ["x", "y"]},
        ["not", "an", "object"],
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n{broken\n"
    rows = read_all(write(tmp_path, text, "rows.jsonl"))
    reasons = [reason for _, _, reason in rows]
    assert rows[0][1] is not None
    components = rows[0][1]["message"]["template"]["components"]
    assert components[0] == {"type": "header", "parameters": [{"type": "text", "text": "Sale"}]}
    assert components[1]["parameters"][1] == {"type": "text", "text": "42"}
    assert rows[1][1] is not None
    assert rows[1][1]["phone_id"] == "p-own"
    assert reasons[2] == "has 1 body parameters; the template takes 2"
    assert reasons[3] is not None
    assert reasons[3].startswith("unknown field 'colour'")
    assert reasons[4] == "to: missing or not a string"
    assert reasons[5] == "body[2]: not a string"
    assert reasons[6] == "header: at most one parameter"
    assert reasons[7] == "not a JSON object"
    assert rows[8][0].blank
    assert reasons[9] is not None
    assert reasons[9].startswith("not valid JSON")


def test_jsonl_needs_body_params(tmp_path: Path) -> None:
    path = write(tmp_path, '{"to": "+14155550123", "body": []}\n', "rows.jsonl")
    spec = CampaignSpec("c", "acme", ("p1",), "t", body_params=None)
    with CampaignFile(path) as source, pytest.raises(CampaignInputError, match="--body-params"):
        RowValidator(spec, source)


# --- file and option errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("body_1,body_2", "no 'to' column"),
        ("to,body_1,header1", "unknown column 'header1'"),
        ("to,body_1,body_3", "no gap"),
        ("to,body_1", "--body-params is 2 but the file has 1 body columns"),
        ("to,to,body_1,body_2", "repeats column 'to'"),
    ],
)
def test_bad_headers_are_usage_errors(tmp_path: Path, header: str, message: str) -> None:
    path = write(tmp_path, header + "\n+14155550123,a\n")
    with CampaignFile(path) as source, pytest.raises(CampaignInputError, match=message):
        RowValidator(SPEC, source)


def test_empty_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(CampaignInputError, match="header row is required"):
        CampaignFile(write(tmp_path, ""))


def test_csv_body_params_default_to_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "to,body_1,body_2,body_3\n+14155550123,a,b,c\n+14155550124,a,b,\n")
    spec = CampaignSpec("c", "acme", ("p1",), "t", body_params=None)
    rows = read_all(path, spec)
    assert rows[0][1] is not None
    assert rows[1][2] == "has 2 body parameters; the template takes 3"


def test_no_sending_number_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path, "to,body_1,body_2\n+14155550123,a,b\n")
    spec = CampaignSpec("c", "acme", (), "t", body_params=2)
    with CampaignFile(path) as source, pytest.raises(CampaignInputError, match="--phone-id"):
        RowValidator(spec, source)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (CampaignSpec("c", "acme", ("p1",), "Bad-Name"), "--template"),
        (CampaignSpec("c", "acme", ("p 1",), "t"), "--phone-id"),
        (CampaignSpec("c", "ac me", ("p1",), "t"), "client_id"),
        (CampaignSpec("c", "acme", ("p1",), "t", language="x"), "--language"),
    ],
)
def test_shared_options_are_checked_with_the_model(spec: CampaignSpec, message: str) -> None:
    with pytest.raises(CampaignInputError, match=message):
        spec.check()


# --- helpers of the command -----------------------------------------------------------------------
def test_window_and_start_at() -> None:
    noon_kolkata = parse_start_at("2026-12-01T12:00", "Asia/Kolkata")
    assert noon_kolkata == datetime(2026, 12, 1, 6, 30, tzinfo=UTC).timestamp()
    assert (
        parse_start_at("2026-12-01T12:00Z", "Asia/Kolkata")
        == datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_start_at("tomorrow", None)


def test_default_campaign_id_is_deterministic(tmp_path: Path) -> None:
    path = write(tmp_path, "to,body_1\n+14155550123,a\n")
    first = default_campaign_id(path, client_id="acme", template="t", language="en_US")
    assert first == default_campaign_id(path, client_id="acme", template="t", language="en_US")
    assert first != default_campaign_id(path, client_id="acme", template="u", language="en_US")
    path.write_text("to,body_1\n+14155550124,a\n")
    assert first != default_campaign_id(path, client_id="acme", template="t", language="en_US")
    assert CampaignSpec(first, "acme", ("p1",), "t").check() is None


def test_rejects_file_is_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'row,reason,to\n3,bad,"a\nb"\n7,bad,x\n12,bad,y\n15,bad,z\n',
        "rejects.csv",
    )
    _truncate_rejects(path, 10)
    assert path.read_text() == 'row,reason,to\n3,bad,"a\nb"\n7,bad,x\n'
    _truncate_rejects(path, 2)
    assert path.read_text() == "row,reason,to\n"


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "Näme ₹500 🎉",
        'quote " backslash \\ slash /',
        "ctrl \x01\x1f tab\t nl\n",
        "\u2028\u202e",
    ],
)
def test_envelope_is_byte_for_byte_the_producers(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("time.time", lambda: 1_795_000_000.123)
    kwargs = {
        "client_id": "acme",
        "phone_id": "p1",
        "to": "+919876543210",
        "campaign_id": "camp-1",
        "message": {"type": "template", "template": {"name": "t", "components": [{"text": text}]}},
    }
    ours = encode_envelope(kwargs, "0b1c-id")
    assert ours == encode_job("send_message", kwargs, queue=CAMPAIGN_QUEUE, message_id="0b1c-id")


def test_column_names_ignore_case_and_spaces(tmp_path: Path) -> None:
    path = write(tmp_path, "TO , Body_1,body_2\n+14155550123,a,b\n")
    [(_, kwargs, reason)] = read_all(path)
    assert reason is None
    assert kwargs is not None
    assert kwargs["to"] == "+14155550123"


def test_jsonl_line_that_is_not_utf8_is_rejected(tmp_path: Path) -> None:
    good = b'{"to": "+14155550123", "body": ["a", "b"]}\n'
    path = write(
        tmp_path, good + b'{"to": "+14155550124", "body": ["caf\xe9", "b"]}\n' + good, "r.jsonl"
    )
    assert [reason for _, _, reason in read_all(path)] == [None, "not valid UTF-8", None]
