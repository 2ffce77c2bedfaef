"""Turning a campaign file's rows into ``send_message`` job kwargs, or a reason to reject
them, exactly as the worker would judge the job (:func:`worker.jobs.registry.parse_job`)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

from worker.campaigns.spec import (
    IDENTIFIER,
    INVALID_PREFIX,
    MAX_BODY_PARAMS,
    CampaignInputError,
    CampaignSpec,
    template_message,
)
from worker.errors import InvalidJob
from worker.jobs.models import SendMessageJob
from worker.jobs.phones import normalize_e164
from worker.jobs.registry import parse_job

if TYPE_CHECKING:
    from worker.campaigns.reader import CampaignFile, RawRow

__all__ = ["RowValidator"]

_BODY_COLUMN = re.compile(r"body_([1-9][0-9]*)")
_JSONL_KEYS: Final = frozenset({"to", "body", "header", "phone_id"})


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
        message = template_message(spec.template, spec.language, header, body)
        shape = (len(header), phone_id is None)
        if self.exact or shape not in self._proven:
            return self._validated(to, message, phone_id, shape)
        # Fast path, for a shape of job the model accepted once: the only values the model
        # checks that differ from row to row are the number and the phone id (parameter texts
        # are free text), so checking those two the model's way is the model's verdict
        # (tests/unit/test_campaign_reader.py holds the two to the same answers). Anything it
        # would refuse goes through the model, for the model's own reason.
        if phone_id is not None and not IDENTIFIER.fullmatch(phone_id):
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
        """Validate with the worker's own model (:func:`worker.jobs.registry.parse_job`)."""
        kwargs = self._kwargs(to, message, phone_id or self.spec.phone_ids[0])
        try:
            job = parse_job("send_message", (), kwargs)
        except InvalidJob as exc:
            return None, str(exc).removeprefix(INVALID_PREFIX)
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
