"""Dead-letter tooling behind ``verloop-worker dlq``: read, filter, replay, purge and export the
dead letters the worker keeps in ``<queue>.XQ`` (format: :mod:`worker.finish.deadletters`).

Reading never loses anything: messages are taken with ``basic.get`` and not acknowledged (at
most as many as the queue held at the start), so closing the channel puts them back. A dead
letter is acknowledged only after RabbitMQ confirmed its replay, after its export file was
synced (``export --remove``), or after the operator confirmed a purge.

A replay keeps the job's dramatiq message id (the ledger key of a send without idempotency key
or campaign) and checks the ledger first: ``sent`` is never replayed; ``pending`` (outcome
unknown) only on request, after its claim is forgotten.
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
