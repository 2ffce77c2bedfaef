"""The ``record_statuses`` job: statuses of sent messages, as the webhook receiver publishes them.

The receiver (:mod:`worker.webhooks`) turns each entry of a webhook's ``statuses`` array into a
:class:`StatusEntry`, and publishes the statuses that arrive together (from one body, or from
the requests of a few milliseconds) as one job on :data:`STATUS_QUEUE`: a job per status would
cost a RabbitMQ message, a confirm and a dramatiq round per status, three times the sends'. Its
kwargs are a public contract like a send's, so a system that receives the webhooks itself can
publish them too (one status is a list of one). Every value is bounded and checked for where it
goes: the wamid becomes part of a Redis key, codes and statuses metric labels and routing-key
words.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field

from worker.jobs.models import Identifier, Metadata

__all__ = [
    "FUNNEL_STATUSES",
    "MAX_STATUSES_PER_JOB",
    "STATUS_ACTOR",
    "STATUS_QUEUE",
    "WAMID_PATTERN",
    "StatusEntry",
    "StatusError",
    "StatusJob",
]

#: Queue and actor of status jobs (published by the webhook receiver).
STATUS_QUEUE: Final = "verloop.status"
STATUS_ACTOR: Final = "record_statuses"
#: A job carries at most this many statuses.
MAX_STATUSES_PER_JOB: Final = 500
#: The statuses the funnel counts, worst to best; a failure is kept apart (see the actor).
FUNNEL_STATUSES: Final = ("sent", "delivered", "read")
#: Meta's message ids (``wamid.`` and base64); they become part of a Redis key.
WAMID_PATTERN: Final = r"^[A-Za-z0-9._:=+/-]{1,256}$"
Wamid = Annotated[str, Field(pattern=WAMID_PATTERN, description="The message's id (wamid)")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatusError(_Strict):
    """One entry of a failed status's ``errors`` (Meta's ``error_data.details`` is ``details``)."""

    code: int = Field(ge=0, le=10**9)
    title: str | None = Field(default=None, max_length=256)
    message: str | None = Field(default=None, max_length=1024)
    details: str | None = Field(default=None, max_length=2048)


class StatusEntry(_Strict):
    """What WhatsApp reported about one sent message."""

    wamid: Wamid
    #: ``sent``, ``delivered``, ``read``, ``failed``; other words Meta may add are counted as
    #: ``other`` and change nothing.
    status: str = Field(pattern=r"^[a-z_]{1,32}$")
    #: When it happened, by WhatsApp's clock (Unix seconds).
    timestamp: int = Field(ge=0, le=2**40)
    #: The recipient's WhatsApp id (digits), as Meta reports it.
    recipient_id: str | None = Field(default=None, pattern=r"^[0-9]{1,20}$")
    #: The sending number as Meta names it (``metadata.phone_number_id``), for the record only:
    #: the job's own number comes from the send.
    phone_number_id: Identifier | None = None
    errors: tuple[StatusError, ...] = Field(default=(), max_length=10)
    pricing_category: str | None = Field(default=None, pattern=r"^[a-z_]{1,64}$")
    #: When the receiver took it (Unix ms, the receiver's clock).
    received_at_ms: int | None = Field(default=None, ge=0, le=2**50)


class StatusJob(_Strict):
    """kwargs of ``record_statuses``: statuses of sent messages, each recorded on its own."""

    statuses: tuple[StatusEntry, ...] = Field(min_length=1, max_length=MAX_STATUSES_PER_JOB)
    metadata: Metadata = None
