"""Reading a campaign's recipients file, one row at a time, into ``send_message`` job kwargs.

Two formats, told apart by the file name (``.jsonl``/``.ndjson`` is JSON Lines, anything else
CSV) unless given:

* **CSV** (UTF-8, optional BOM), header row required. Columns: ``to`` (E.164), ``body_1`` ..
  ``body_N`` (the template's body parameters, in order), optional ``header_1`` (one text header
  parameter) and optional ``phone_id`` (overrides the sending number for that row). Any other
  column is refused, so a misspelt ``header1`` cannot silently drop a parameter.
* **JSON Lines**: one object per line, ``{"to": "+91...", "body": ["Asha", "42"],
  "header": ["Diwali"], "phone_id": "123"}``; ``header`` and ``phone_id`` are optional.

The file is streamed: only the current row is held. Rows are numbered from 1 after the header;
blank rows (or rows of empty cells) keep their number but are skipped, neither sent nor
rejected. Every other row is validated exactly as the worker validates a job
(:func:`worker.jobs.models.parse_job`, which checks the number with ``phonenumbers``), so a row the
worker would dead-letter as invalid is rejected here instead, with its reason.
"""

from __future__ import annotations

import csv
import hashlib
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

import orjson

from worker.campaigns.store import CampaignRef
from worker.errors import InvalidJob
from worker.jobs.models import SendMessageJob
from worker.jobs.phones import normalize_e164
from worker.jobs.registry import parse_job

__all__ = [
    "MAX_BODY_PARAMS",
    "CampaignFile",
    "CampaignInputError",
    "CampaignSpec",
    "FileFormat",
    "RawRow",
    "RowValidator",
    "file_fingerprint",
]

FileFormat = Literal["csv", "jsonl"]

#: The job model allows at most 100 parameters per template component.
MAX_BODY_PARAMS: Final = 100
_FINGERPRINT_BYTES: Final = 1024 * 1024
_BODY_COLUMN = re.compile(r"body_([1-9][0-9]*)")
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_JSONL_KEYS: Final = frozenset({"to", "body", "header", "phone_id"})
_INVALID_PREFIX: Final = "invalid send_message job: "


class CampaignInputError(ValueError):
    """The file or the options cannot make a campaign at all (a usage error, not a bad row)."""


@dataclass(frozen=True)
class CampaignSpec:
    """What every row of a campaign shares."""

    campaign_id: str
    client_id: str
    phone_ids: tuple[str, ...]
    template: str
    language: str = "en_US"
    #: Body parameters every row must have; None: as many as the CSV has ``body_*`` columns.
    body_params: int | None = None

    @property
    def ref(self) -> CampaignRef:
        """The campaign in the store: this client's campaign id."""
        return CampaignRef(self.client_id, self.campaign_id)

    def check(self) -> None:
        """Validate the shared parts once, with the worker's own model.

        Raises:
            CampaignInputError: naming what is wrong.
        """
        if self.body_params is not None and not 0 <= self.body_params <= MAX_BODY_PARAMS:
            raise CampaignInputError(f"--body-params must be between 0 and {MAX_BODY_PARAMS}")
        probe = {
            "client_id": self.client_id,
            "phone_id": self.phone_ids[0] if self.phone_ids else "probe",
            "to": "+14155550123",  # a valid number: only the shared fields are probed
            "campaign_id": self.campaign_id,
            "message": _template_message(self.template, self.language, None, []),
        }
        for phone_id in self.phone_ids:
            if not _IDENTIFIER.fullmatch(phone_id):
                raise CampaignInputError(f"--phone-id {phone_id!r} is not a Verloop identifier")
        try:
            parse_job("send_message", (), probe)
        except InvalidJob as exc:
            reason = str(exc).removeprefix(_INVALID_PREFIX)
            reason = reason.replace("message.template.name", "--template").replace(
                "message.template.language.code", "--language"
            )
            raise CampaignInputError(reason) from None


@dataclass(frozen=True)
class RawRow:
    """One data row as read: its 1-based number and its original values."""

    number: int
    #: CSV: the cells; JSON Lines: the line's text (one value).
    fields: list[str]
    blank: bool
    #: Set when the row could not even be parsed (a CSV syntax error).
    error: str | None = None


def file_fingerprint(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 of the first MiB): identifies a file cheaply, whatever its size."""
    with path.open("rb") as handle:
        head = handle.read(_FINGERPRINT_BYTES)
    return path.stat().st_size, hashlib.sha256(head).hexdigest()


def detect_format(path: Path) -> FileFormat:
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"


class _CountingLines:
    """The lines of a binary file, decoded, counting the bytes read (for the progress bar).

    Bytes that are not UTF-8 are kept as surrogate escapes: the row is rejected (not the file),
    and the rejects file gets the original bytes back.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.bytes_read = 0
        #: Lines so far that were not valid UTF-8.
        self.undecodable = 0
        self._first = True

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self._handle.readline()
        if not line:
            raise StopIteration
        self.bytes_read += len(line)
        if self._first:
            self._first = False
            line = line.removeprefix(b"\xef\xbb\xbf")
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self.undecodable += 1
            return line.decode("utf-8", "surrogateescape")


class CampaignFile:
    """An open recipients file: its columns, then its rows, streamed.

    Raises:
        CampaignInputError: the file is empty, has no header, or its columns are wrong.
    """

    def __init__(self, path: Path, file_format: FileFormat | None = None) -> None:
        self.path = path
        self.format: FileFormat = file_format or detect_format(path)
        self.size = path.stat().st_size
        self._handle = path.open("rb")
        self._lines = _CountingLines(self._handle)
        self._number = 0
        self.columns: list[str]
        self._csv: Any = None
        if self.format == "csv":
            self._csv = csv.reader(self._lines, strict=False)
            try:
                header = next(self._csv)
            except StopIteration:
                self.close()
                raise CampaignInputError(
                    f"{path.name} is empty: a header row is required"
                ) from None
            except csv.Error as exc:
                self.close()
                raise CampaignInputError(f"{path.name}: unreadable header ({exc})") from None
            self.columns = [name.strip() for name in header]
        else:
            self.columns = ["line"]

    @property
    def bytes_read(self) -> int:
        return self._lines.bytes_read

    def rows(self) -> Iterator[RawRow]:
        """Every data row in order, blank ones included (flagged)."""
        lines = self._lines
        if self.format == "jsonl":
            undecodable = 0
            for line in lines:
                self._number += 1
                text = line.rstrip("\r\n")
                error = "not valid UTF-8" if lines.undecodable != undecodable else None
                undecodable = lines.undecodable
                yield RawRow(self._number, [text], not text.strip(), error)
            return
        while True:
            undecodable = lines.undecodable
            try:
                cells = next(self._csv)
            except StopIteration:
                return
            except csv.Error as exc:
                self._number += 1
                yield RawRow(self._number, [], False, f"unreadable CSV ({exc})")
                continue
            self._number += 1
            blank = not any(cell.strip() for cell in cells)
            error = "not valid UTF-8" if lines.undecodable != undecodable else None
            yield RawRow(self._number, cells, blank, error)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> CampaignFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class RowValidator:
    """Turns rows of one file into job kwargs, or a reason to reject them.

    Raises (when built):
        CampaignInputError: the columns do not fit the template or the options.
    """

    def __init__(self, spec: CampaignSpec, file: CampaignFile, *, exact: bool = False) -> None:
        self.spec = spec
        #: Validate every row with the worker's model (slower; the default is equivalent).
        self.exact = exact
        self._proven: set[tuple[int, bool]] = set()
        self.format = file.format
        self._n_phones = len(spec.phone_ids)
        self._width = len(file.columns)
        if file.format == "csv":
            self._init_csv(file.columns)
        else:
            if spec.body_params is None:
                raise CampaignInputError("JSON Lines files need --body-params")
            self.body_params = spec.body_params
            self.has_header = False  # per row in JSON Lines
            self.has_phone_column = True
        if not self._n_phones and not self.has_phone_column:
            raise CampaignInputError("no sending number: give --phone-id or a phone_id column")

    def _init_csv(self, columns: Sequence[str]) -> None:
        seen: set[str] = set()
        body: dict[int, int] = {}
        self._to = self._header = self._phone = -1
        for index, original in enumerate(columns):
            name = original.lower()
            if name in seen:
                raise CampaignInputError(f"the header repeats column {original!r}")
            seen.add(name)
            if name == "to":
                self._to = index
            elif name == "header_1":
                self._header = index
            elif name == "phone_id":
                self._phone = index
            elif match := _BODY_COLUMN.fullmatch(name):
                body[int(match.group(1))] = index
            else:
                raise CampaignInputError(
                    f"unknown column {original[:40]!r}; "
                    "expected to, body_1..body_N, header_1, phone_id"
                )
        if self._to < 0:
            raise CampaignInputError("the header has no 'to' column")
        if sorted(body) != list(range(1, len(body) + 1)):
            raise CampaignInputError("body columns must be body_1, body_2, ... with no gap")
        self._body = [body[i] for i in range(1, len(body) + 1)]
        expected = len(self._body) if self.spec.body_params is None else self.spec.body_params
        if expected > len(self._body):
            raise CampaignInputError(
                f"--body-params is {expected} but the file has {len(self._body)} body columns"
            )
        if expected > MAX_BODY_PARAMS:
            raise CampaignInputError(f"at most {MAX_BODY_PARAMS} body parameters")
        self.body_params = expected
        self.has_header = self._header >= 0
        self.has_phone_column = self._phone >= 0

    # --- rows ------------------------------------------------------------------------------------
    def validate(self, row: RawRow) -> tuple[dict[str, Any] | None, str | None]:
        """(job kwargs, None) for a good row, (None, reason) for a bad one."""
        if row.error is not None:
            return None, row.error
        if self.format == "csv":
            parts = self._csv_parts(row.fields)
        else:
            parts = self._jsonl_parts(row.fields[0])
        if isinstance(parts, str):
            return None, parts
        return self._job(*parts)

    def _csv_parts(self, cells: list[str]) -> str | tuple[str, list[str], list[str], str | None]:
        if len(cells) != self._width:
            return f"has {len(cells)} fields; the header has {self._width}"
        values = [cells[i] for i in self._body]
        while values and not values[-1].strip():
            values.pop()
        for position, value in enumerate(values, 1):
            if not value.strip():
                return f"body_{position} is empty"
        if len(values) != self.body_params:
            return f"has {len(values)} body parameters; the template takes {self.body_params}"
        header: list[str] = []
        if self._header >= 0:
            if not cells[self._header].strip():
                return "header_1 is empty"
            header = [cells[self._header]]
        phone_id = cells[self._phone].strip() if self._phone >= 0 else ""
        return cells[self._to], values, header, phone_id or None

    def _jsonl_parts(self, line: str) -> str | tuple[str, list[str], list[str], str | None]:
        try:
            obj = orjson.loads(line.encode("utf-8", "surrogateescape"))
        except orjson.JSONDecodeError as exc:
            return f"not valid JSON ({str(exc).split(':')[0]})"
        if not isinstance(obj, dict):
            return "not a JSON object"
        unknown = sorted(set(obj) - _JSONL_KEYS)
        if unknown:
            return f"unknown field {unknown[0][:40]!r}; expected to, body, header, phone_id"
        to = obj.get("to")
        if not isinstance(to, str):
            return "to: missing or not a string"
        body = _texts(obj.get("body", []), "body")
        if isinstance(body, str):
            return body
        header = _texts(obj.get("header", []), "header")
        if isinstance(header, str):
            return header
        if len(header) > 1:
            return "header: at most one parameter"
        if len(body) != self.body_params:
            return f"has {len(body)} body parameters; the template takes {self.body_params}"
        phone_id = obj.get("phone_id")
        if phone_id is not None and not isinstance(phone_id, str):
            return "phone_id: not a string"
        return to, body, header, (phone_id.strip() or None) if phone_id else None

    def _job(
        self, to: str, body: list[str], header: list[str], phone_id: str | None
    ) -> tuple[dict[str, Any] | None, str | None]:
        spec = self.spec
        if phone_id is None and not self._n_phones:
            return None, "phone_id is empty and no --phone-id was given"
        message = _template_message(spec.template, spec.language, header, body)
        shape = (len(header), phone_id is None)
        if self.exact or shape not in self._proven:
            return self._validated(to, message, phone_id, shape)
        # Fast path, for a shape of job the model accepted once: the only values the model
        # checks that differ from row to row are the number and the phone id (parameter texts
        # are free text), so checking those two the model's way is the model's verdict
        # (tests/unit/test_campaign_reader.py holds the two to the same answers). Anything it
        # would refuse goes through the model, for the model's own reason.
        if phone_id is not None and not _IDENTIFIER.fullmatch(phone_id):
            return self._validated(to, message, phone_id, shape)
        try:
            e164 = normalize_e164(to)
        except ValueError:
            return self._validated(to, message, phone_id, shape)
        return self._kwargs(e164, message, phone_id), None

    def _validated(
        self,
        to: str,
        message: dict[str, Any],
        phone_id: str | None,
        shape: tuple[int, bool],
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Validate with the worker's own model (:func:`worker.jobs.models.parse_job`)."""
        kwargs = self._kwargs(to, message, phone_id or self.spec.phone_ids[0])
        try:
            job = parse_job("send_message", (), kwargs)
        except InvalidJob as exc:
            return None, str(exc).removeprefix(_INVALID_PREFIX)
        assert isinstance(job, SendMessageJob)  # parse_job validates send_message with it
        self._proven.add(shape)
        return self._kwargs(job.to, message, phone_id), None

    def _kwargs(self, e164: str, message: dict[str, Any], phone_id: str | None) -> dict[str, Any]:
        return {
            "client_id": self.spec.client_id,
            "phone_id": phone_id or self.phone_for(e164),
            "to": e164,
            "campaign_id": self.spec.campaign_id,
            "message": message,
        }

    def phone_for(self, e164: str) -> str:
        """The sending number of a recipient without a ``phone_id``: stable across runs."""
        return self.spec.phone_ids[zlib.crc32(e164.encode("ascii")) % self._n_phones]


def _template_message(
    name: str, language: str, header: list[str] | None, body: list[str]
) -> dict[str, Any]:
    components: list[dict[str, Any]] = []
    if header:
        components.append(
            {"type": "header", "parameters": [{"type": "text", "text": t} for t in header]}
        )
    components.append({"type": "body", "parameters": [{"type": "text", "text": t} for t in body]})
    return {
        "type": "template",
        "template": {"name": name, "language": {"code": language}, "components": components},
    }


def _texts(value: Any, name: str) -> list[str] | str:
    if not isinstance(value, list):
        return f"{name}: not a list"
    texts = []
    for position, item in enumerate(value, 1):
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            return f"{name}[{position}]: not a string"
        text = str(item)
        if not text.strip():
            return f"{name}[{position}] is empty"
        texts.append(text)
    return texts
