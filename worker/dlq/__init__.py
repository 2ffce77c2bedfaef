"""Dead-letter tooling: read, filter, replay, purge and export the worker's dead letters.

The worker dead-letters a job to ``<queue>.XQ`` with the reason in the AMQP header
:data:`~worker.finish.deadletters.DEAD_LETTER_HEADER` (see :mod:`worker.finish.deadletters`). This
module
reads those queues for ``verloop-worker dlq`` (:mod:`worker.commands.dlq`); it has no command-line
code of its own.

**Reading never loses anything.** Dead letters are taken with ``basic.get`` *without*
acknowledging them, one at a time (bounded memory, however long the queue), on a channel that
is closed at the end: RabbitMQ then puts every unacknowledged message back where it was. A
reader takes at most as many messages as the queue held when it started, so dead letters that
arrive meanwhile (a replayed job that fails again) are not read twice. Removing a dead letter is
acknowledging it, which happens only:

* ``replay``: after RabbitMQ confirmed the re-published job;
* ``export --remove``: after the export file was written, flushed and synced;
* ``purge``: after the operator confirmed the count, for the matching entries only.

An interrupted command therefore leaves each dead letter either in its queue or, at worst for a
replay cut between the confirm and the acknowledgement, in both its queue and the dead-letter
queue; the idempotency ledger keeps such a job from being sent twice.

**Replay safety.** A replayed job is the original body with its options reset (no retry or
deferral counts), published to its original queue, *keeping its dramatiq message_id*: a send
without ``idempotency_key`` or ``campaign_id`` has the ledger key ``message:<message_id>``, so
keeping the id keeps the worker's duplicate check working for it. Before replaying a
``send_message`` job the ledger is consulted: ``sent`` is never replayed (only dropped from the
queue on request); ``pending`` (the outcome of an earlier call is unknown) is replayed only on
request, after the unfinished claim has been forgotten.
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
