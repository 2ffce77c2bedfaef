"""The rejects file of a campaign run: one CSV line per rejected row, safe to open in a
spreadsheet, cut back to the checkpoint when a run resumes."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

from worker.campaigns.reader import RawRow

__all__ = ["RejectsFile", "spreadsheet_safe"]

#: Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """``cell``, with a single quote in front if a spreadsheet would run it as a formula.

    OWASP's defence against CSV injection: the rejects file copies cells from a file anyone may
    have written, and operators open it in a spreadsheet. A quote makes the cell text.
    """
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


class RejectsFile:
    """CSV of rejected rows: ``row``, ``reason``, then the row's original values, each made
    :func:`spreadsheet_safe` (so ``+919876543210`` is written ``'+919876543210``).

    On a resume, lines for rows past the checkpoint (written before a crash, not yet covered by
    a checkpoint) are cut off first: those rows are read again and rejected again.
    """

    def __init__(self, path: Path, columns: list[str], *, resume_after: int) -> None:
        self.path = path
        self.columns = columns
        self._handle: IO[str] | None = None
        self._writer: Any = None
        if resume_after == 0:
            path.unlink(missing_ok=True)
        elif path.exists():
            _truncate_rejects(path, resume_after)

    def write(self, row: RawRow, reason: str) -> None:
        if self._writer is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            # Owner-only (it holds recipients), whatever the umask; surrogateescape: bytes that
            # were not UTF-8 in the input go back out unchanged.
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._handle = os.fdopen(
                descriptor, "a", encoding="utf-8", errors="surrogateescape", newline=""
            )
            self._writer = csv.writer(self._handle)
            if fresh:
                self._writer.writerow(["row", "reason", *map(spreadsheet_safe, self.columns)])
        self._writer.writerow(
            [row.number, spreadsheet_safe(reason), *map(spreadsheet_safe, row.fields)]
        )

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _truncate_rejects(path: Path, rows_done: int) -> None:
    with path.open("r+b") as handle:
        offset = 0

        def lines() -> Iterator[str]:
            nonlocal offset
            for raw in handle:
                offset += len(raw)
                yield raw.decode("utf-8", "surrogateescape")

        reader = csv.reader(lines())
        keep = 0
        for record in reader:
            if record and record[0].isdigit() and int(record[0]) > rows_done:
                break
            keep = offset
        handle.truncate(keep)
