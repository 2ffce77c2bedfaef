"""Dead-letter tooling behind ``verloop-worker dlq``: read, filter, replay, purge and export the
dead letters in ``<queue>.XQ`` (format: :mod:`worker.finish.deadletters`).

Reading never loses anything: messages are taken with ``basic.get`` and not acknowledged, so
closing the channel puts them back; one is acknowledged only after its replay was confirmed,
its export file synced, or its purge confirmed. A replay keeps the job's message id, never
replays a send the ledger records as ``sent``, and an uncertain one only on request.
"""

from worker.dlq.edits import Edit, apply_edits, parse_edit
from worker.dlq.entries import (
    DLQ_QUEUES,
    NO_REASON,
    OUTCOMES,
    DeadLetterEntry,
    DlqError,
    redact_secrets,
)
from worker.dlq.filters import Filters, format_age, id_matches, parse_duration, short_id
from worker.dlq.store import DeadLetterStore, Held, ReplayOptions, ReplayResult

__all__ = [
    "DLQ_QUEUES",
    "NO_REASON",
    "OUTCOMES",
    "DeadLetterEntry",
    "DeadLetterStore",
    "DlqError",
    "Edit",
    "Filters",
    "Held",
    "ReplayOptions",
    "ReplayResult",
    "apply_edits",
    "format_age",
    "id_matches",
    "parse_duration",
    "parse_edit",
    "redact_secrets",
    "short_id",
]
