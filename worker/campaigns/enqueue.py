"""Enqueueing a campaign: stream the file, validate each row, publish it with a publisher confirm.

:func:`enqueue_campaign` defines the campaign in Redis or finds the one to resume, then runs the
publisher (:mod:`worker.campaigns.publisher`) with the rejects file. The checkpoint only ever
covers rows RabbitMQ confirmed, so a run stopped by Ctrl-C (which waits for the confirms in
flight; a second one stops at once) or by a failure (:class:`CampaignEnqueueError`) resumes from
it; rows published again after a crash are suppressed by the workers' idempotency ledger.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from worker.campaigns.publisher import (
    CampaignEnqueueError,
    Checkpoint,
    PublishRun,
    encode_envelope,
)
from worker.campaigns.reader import CampaignFile, FileFormat, file_fingerprint
from worker.campaigns.rejects import RejectsFile, spreadsheet_safe
from worker.campaigns.rows import RowValidator
from worker.campaigns.spec import CampaignInputError, CampaignSpec
from worker.campaigns.store import CampaignStore
from worker.connections.queues import QueueType
from worker.errors import ConfigurationError

__all__ = [
    "CampaignEnqueueError",
    "EnqueueResult",
    "Schedule",
    "default_campaign_id",
    "encode_envelope",
    "enqueue_campaign",
    "spreadsheet_safe",
]


@dataclass(frozen=True)
class Schedule:
    """When the workers may send (stored with the campaign; the workers enforce it)."""

    window_start: str | None = None  #: "HH:MM"
    window_end: str | None = None  #: "HH:MM"
    timezone: str | None = None  #: IANA name
    start_at: float | None = None  #: epoch seconds


@dataclass(frozen=True)
class EnqueueResult:
    """What a run did; the counts are the campaign's totals, earlier runs included."""

    campaign_id: str
    resumed: bool
    already_finished: bool
    #: Data rows read in total (enqueued + rejected + blank).
    rows_read: int
    #: Rows an earlier run had done, skipped by this one.
    skipped: int
    enqueued: int
    rejected: int
    blank: int
    rejects_path: Path | None
    seconds: float

    @property
    def rows_per_s(self) -> float:
        """Rows this run handled per second."""
        done = self.rows_read - self.skipped
        return done / self.seconds if self.seconds > 0 else 0.0


def default_campaign_id(path: Path, *, client_id: str, template: str, language: str) -> str:
    """A campaign id derived from the file (size, sha256 of its first MiB) and the template, so
    running the same command again finds (and resumes) the same campaign."""
    size, head = file_fingerprint(path)
    digest = hashlib.sha256(f"{size}:{head}:{client_id}:{template}:{language}".encode()).hexdigest()
    return f"{template[:40]}-{digest[:16]}"


_SAME_CAMPAIGN: Final = (
    "client_id",
    "phone_ids",
    "template",
    "language",
    "body_params",
    "source_size",
    "source_sha256",
)


def enqueue_campaign(
    path: Path,
    spec: CampaignSpec,
    *,
    amqp_url: str,
    store: CampaignStore,
    exchange: str = "",
    queue_type: QueueType = "classic",
    rejects_path: Path | None = None,
    file_format: FileFormat | None = None,
    batch_size: int = 2000,
    schedule: Schedule | None = None,
    max_job_bytes: int = 256 * 1024,
    progress: Callable[[int, int], None] | None = None,
) -> EnqueueResult:
    """Enqueue every valid row of ``path`` as a ``send_message`` job, resuming if the campaign
    exists. ``progress(bytes_read, rows_read)`` is called as the file is read. Jobs go to
    ``exchange`` with the queue name as routing key: ``""`` is the default exchange (the queue
    is declared first, as a ``queue_type`` queue), else the jobs exchange (nothing declared; see
    worker.runtime.jobs_exchange). ``amqp_url`` may name several nodes (comma-separated).

    Raises:
        CampaignInputError: the file, its columns or ``spec`` cannot make a campaign.
        ConfigurationError: the campaign exists but was made from another file or template,
            or it is cancelled.
        CampaignEnqueueError: publishing stopped early (resume by calling again).
        RedisUnavailable: the campaign store did not answer.
    """
    if batch_size < 1:
        raise CampaignInputError("--batch-size must be at least 1")
    began = time.monotonic()
    spec.check()
    explicit_rejects = rejects_path is not None
    rejects_path = rejects_path or path.with_name(path.name + ".rejects.csv")
    if rejects_path.resolve() == path.resolve():
        raise CampaignInputError("the rejects file must not be the input file")
    size, head = file_fingerprint(path)
    with CampaignFile(path, file_format) as source:
        validator = RowValidator(spec, source)
        definition: dict[str, Any] = {
            "client_id": spec.client_id,
            "phone_ids": ",".join(spec.phone_ids),
            "template": spec.template,
            "language": spec.language,
            "body_params": validator.body_params,
            "source_file": str(path.resolve()),
            "source_format": source.format,
            "source_size": size,
            "source_sha256": head,
            "rejects_file": str(rejects_path.resolve()),
            "batch_size": batch_size,
            "rows_done": 0,
            "enqueued": 0,
            "rejected": 0,
        }
        if schedule is not None:
            definition.update(
                window_start=schedule.window_start,
                window_end=schedule.window_end,
                timezone=schedule.timezone,
                start_at=schedule.start_at,
            )
        start = Checkpoint(0, 0, 0)
        resumed = not store.create(spec.ref, definition)
        if resumed:
            fields = store.get(spec.ref).fields
            _check_same_campaign(spec.campaign_id, fields, definition)
            start = Checkpoint(*(_int(fields, k) for k in ("rows_done", "enqueued", "rejected")))
            if fields.get("enqueue_finished"):
                return _result(spec, start, start.rows_done, True, True, rejects_path, began)
            if fields.get("state") == "cancelled":
                raise ConfigurationError(
                    f"campaign {spec.campaign_id!r} is cancelled: nothing was enqueued"
                )
            if not explicit_rejects and fields.get("rejects_file"):
                rejects_path = Path(fields["rejects_file"])  # the first run's, wherever FILE is
        rejects = RejectsFile(rejects_path, source.columns, resume_after=start.rows_done)
        rows = source.rows()
        for _ in range(start.rows_done):  # done by an earlier run: skip, do not re-validate
            if next(rows, None) is None:
                break

        def report(rows_read: int) -> None:
            if progress is not None:
                progress(source.bytes_read, rows_read)

        run = PublishRun(
            amqp_url=amqp_url,
            exchange=exchange,
            queue_type=queue_type,
            rows=rows,
            validator=validator,
            rejects=rejects,
            store=store,
            campaign=spec.ref,
            start=start,
            window=batch_size,
            max_job_bytes=max_job_bytes,
            progress=report if progress is not None else None,
        )
        try:
            run.run()
        finally:
            rejects.close()
        store.finish_enqueue(spec.ref, total_rows=run.rows_done)
    return _result(spec, run.confirmed, start.rows_done, resumed, False, rejects_path, began)


def _check_same_campaign(
    campaign_id: str, fields: Mapping[str, str], definition: Mapping[str, Any]
) -> None:
    if "source_sha256" not in fields:
        raise ConfigurationError(
            f"campaign {campaign_id!r} exists and was not made by `campaign start`; "
            "choose another --campaign-id"
        )
    differs = [k for k in _SAME_CAMPAIGN if fields.get(k) != str(definition[k])]
    if differs:
        what = ", ".join("file" if k.startswith("source_") else k for k in differs)
        raise ConfigurationError(
            f"campaign {campaign_id!r} was started with a different {_dedupe(what)}; "
            "resume it with the same file and options, or choose another --campaign-id"
        )


def _dedupe(text: str) -> str:
    return ", ".join(dict.fromkeys(text.split(", ")))


def _int(fields: Mapping[str, str], name: str) -> int:
    try:
        return int(fields.get(name, 0))
    except ValueError:
        return 0


def _result(
    spec: CampaignSpec,
    point: Checkpoint,
    skipped: int,
    resumed: bool,
    finished: bool,
    rejects_path: Path,
    began: float,
) -> EnqueueResult:
    rows_done, enqueued, rejected = point
    return EnqueueResult(
        campaign_id=spec.campaign_id,
        resumed=resumed,
        already_finished=finished,
        rows_read=rows_done,
        skipped=skipped,
        enqueued=enqueued,
        rejected=rejected,
        blank=rows_done - enqueued - rejected,
        rejects_path=rejects_path if rejects_path.exists() else None,
        seconds=time.monotonic() - began,
    )
