"""Reading a campaign's recipients file, one row at a time, into ``send_message`` job kwargs.

CSV or JSON Lines, told apart by the file name unless given (formats: README, "Campaigns", "The
file"). Any unknown CSV column is refused, so a misspelt ``header1`` cannot drop a parameter.
The file is streamed; rows are numbered from 1 after the header, blank rows keep their number
but are skipped, and every other row is validated as the worker validates a job
(:mod:`worker.campaigns.rows`).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

from worker.campaigns.spec import CampaignInputError

__all__ = [
    "CampaignFile",
    "FileFormat",
    "RawRow",
    "detect_format",
    "file_fingerprint",
]

FileFormat = Literal["csv", "jsonl"]

_FINGERPRINT_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class RawRow:
    """One data row as read: its 1-based number and its original values."""

    #: Among the data rows, from 1, the CSV header not counted (not the file's line number:
    #: the rejects file and the resume checkpoint count rows this way).
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
