"""The outcome middleware: each delivery's typed run, its one log line, retry or dead letter.

It replaces dramatiq's ``Retries``: a returned outcome goes to the finisher; :class:`Deferred`
waits without using a retry; a non-retryable :class:`JobFailure` is dead-lettered at once;
anything else is retried with jittered backoff (each delay under RabbitMQ's consumer timeout),
then dead-lettered ``gave_up``. A delivery is acknowledged only once its job finished or its
retry or dead letter is confirmed, else rejected; nothing raised here reaches dramatiq.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import structlog
from dramatiq.common import q_name
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import Middleware

from worker.errors import Deferred, FailureDetails, InvalidJob, JobFailure, VerloopWorkerError
from worker.finish.deadletters import DeadLetter, publish_dead_letter
from worker.finish.outcome import (
    KEPT_OUTCOMES,
    DeadLetterKind,
    Failure,
    JobContext,
    JobOutcome,
    JobRun,
    Outcome,
)
from worker.jobs.models import lane_of
from worker.jobs.wire import UNDECODABLE_ACTOR, raw_body_of
from worker.observability.logging import log_job_line, scrub_text
from worker.observability.metrics import Metrics
from worker.settings import MAX_SINGLE_DELAY_S

__all__ = ["JobOutcomes", "OnFinal", "RetryPolicy", "current_run"]

#: The longest reason kept (in the log line, the dead letter's header and the event).
MAX_REASON_CHARS = 1000
#: Called with (broker, run) once a job's outcome is final.
OnFinal = Callable[[Any, JobRun], None]

_log = structlog.get_logger()
_LOGGER_NAME = "verloop_worker.job"  # the same "logger" field the library lines carry

_current: ContextVar[JobRun | None] = ContextVar("verloop_current_job", default=None)


def current_run() -> JobRun:
    """The run of the job this thread is running (a throwaway one outside a job)."""
    run = _current.get()
    if run is None:
        return JobRun(
            JobContext(message_id="", actor="", queue="", lane="transactional", attempt=1)
        )
    return run


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in count and in each single delay."""

    max_retries: int
    min_backoff_s: float
    max_backoff_s: float

    def delay_s(self, retries_so_far: int, retry_after: float | None) -> float:
        """Seconds to wait before the next attempt."""
        if retry_after is not None and math.isfinite(retry_after):
            # Verloop said when: wait that long, plus a little spread so a fleet does not
            # come back in one burst.
            delay = retry_after + random.uniform(0, min(1.0, 0.1 * retry_after + 0.1))
        else:
            ceiling = min(self.max_backoff_s, self.min_backoff_s * 2 ** min(retries_so_far, 30))
            delay = random.uniform(ceiling / 2, ceiling)
        return min(delay, MAX_SINGLE_DELAY_S)


def _details_of(exception: BaseException) -> tuple[FailureDetails, bool]:
    """(details, retryable) of a job's failure, its reason scrubbed and cut short (it quotes
    the producer's field names and travels in an AMQP header)."""
    if isinstance(exception, JobFailure):
        details, retryable = exception.details, exception.retryable
    else:
        # Not foreseen (a bug, an interruption): retry it, and keep its class in the reason.
        details = FailureDetails(reason=f"unexpected {type(exception).__name__}: {exception}")
        retryable = True
    return replace(details, reason=scrub_text(details.reason)[:MAX_REASON_CHARS]), retryable


def _retries_so_far(options: dict[str, Any]) -> int:
    value = options.get("retries", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class JobOutcomes(Middleware):
    """Logs each job once, and retries or dead-letters failed ones (see the module docstring)."""

    def __init__(
        self, policy: RetryPolicy, metrics: Metrics | None = None, on_final: OnFinal | None = None
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self.on_final = on_final

    def before_process_message(self, broker: Any, message: Any) -> None:
        queue = q_name(message.queue_name)
        not_before = message.options.get("not_before")
        context = JobContext(
            message_id=message.message_id,
            actor=message.actor_name,
            queue=queue,
            lane=lane_of(queue),
            attempt=_retries_so_far(message.options) + 1,
            not_before_ms=not_before if isinstance(not_before, int) else None,
        )
        _current.set(JobRun(context))

    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        run = current_run()
        _current.set(None)
        try:
            self._settle(broker, message, run, exception)
        except BaseException:  # noqa: BLE001 - nothing may escape into dramatiq's worker thread
            # What happened to the job is unknown here: reject the delivery (RabbitMQ
            # dead-letters it) rather than let it be acknowledged with nothing kept.
            if run.kind not in KEPT_OUTCOMES:
                message.fail()
            _log.exception("settling a job failed", message_id=message.message_id)

    def _settle(
        self,
        broker: Any,
        message: Any,
        run: JobRun,
        exception: BaseException | None,
    ) -> None:
        if exception is None:
            if run.outcome is None:  # the actor sets it (see worker.runtime.actors)
                run.outcome = JobOutcome(Outcome.DONE)
            self._finish(broker, run)
            if run.written_later is not None:  # a sent job's record is carried by a later call
                run.written_later.then(lambda: self._log(run, "info"))
            else:
                self._log(run, "info")
            return
        failure: Failure | None = None
        try:
            if isinstance(exception, Deferred):
                run.outcome = self._defer(broker, message, exception)
                self._log(run, "info")
                return
            details, retryable = _details_of(exception)
            failure = Failure(
                type(exception).__name__, details.reason, details.http_status, details.code
            )
            invalid = isinstance(exception, InvalidJob)
            level = self._settle_failure(broker, message, details, retryable, invalid, failure, run)
            if run.kind is Outcome.DEAD_LETTERED:
                self._finish(broker, run)
        except (VerloopWorkerError, BrokerConnectionError) as exc:
            # The retry or dead letter was not confirmed: reject the delivery so RabbitMQ
            # dead-letters it itself, rather than acknowledging a job we did not keep.
            message.fail()
            run.outcome = JobOutcome(Outcome.REJECTED, failure=failure)
            run.note(publish_error=f"{type(exc).__name__}: {exc}")
            level = "error"
        except Exception:  # noqa: BLE001 - whatever broke, the delivery must not be acked unkept
            message.fail()
            run.outcome = JobOutcome(Outcome.REJECTED, failure=failure)
            _log.exception("settling a failed job failed; rejected it to the dead-letter queue")
            level = "error"
        # A failure we did not foresee is a bug or an outage: keep its traceback.
        unforeseen = None if isinstance(exception, JobFailure) else exception
        self._log(run, level, unforeseen)

    @staticmethod
    def _defer(broker: Any, message: Any, deferred: Deferred) -> JobOutcome:
        """Send the job again later with its retry count unchanged."""
        delay_s = min(max(deferred.delay_s, 0.0), MAX_SINGLE_DELAY_S)
        deferrals = message.options.get("deferrals", 0)
        deferrals = deferrals + 1 if isinstance(deferrals, int) else 1
        again = message.copy(options={"deferrals": deferrals})
        if deferred.kwargs is not None:
            again = again.copy(kwargs=dict(deferred.kwargs))
        broker.enqueue(again, delay=int(delay_s * 1000))
        return JobOutcome(
            Outcome.DEFERRED,
            deferral=deferred.kind,
            reason=deferred.reason,
            retry_in_s=round(delay_s, 3),
            deferrals=deferrals,
        )

    def _settle_failure(
        self,
        broker: Any,
        message: Any,
        details: FailureDetails,
        retryable: bool,
        invalid: bool,
        failure: Failure,
        run: JobRun,
    ) -> str:
        """Retry or dead-letter a failed job; returns the log line's level."""
        retries = _retries_so_far(message.options)
        if retryable and retries < self.policy.max_retries:
            delay_s = self.policy.delay_s(retries, details.retry_after)
            broker.enqueue(
                message.copy(options={"retries": retries + 1, "last_error": details.reason[:500]}),
                delay=int(delay_s * 1000),
            )
            run.outcome = JobOutcome(
                Outcome.RETRYING, failure=failure, retry_in_s=round(delay_s, 3)
            )
            return "warning"

        kind: DeadLetterKind
        if invalid:
            kind = "invalid"
        elif retryable:
            kind = "gave_up"
            details = replace(
                details,
                reason=f"gave up after {retries + 1} attempts: {details.reason}",
                retry_after=None,
            )
        else:
            kind = "failed"
        body = (
            raw_body_of(message.kwargs)
            if message.actor_name == UNDECODABLE_ACTOR
            else message.encode()
        )
        publish_dead_letter(
            broker,
            body,
            DeadLetter(
                details=details,
                error=failure.error,
                outcome=kind,
                attempts=retries + 1,
                queue=message.queue_name,
                actor=message.actor_name,
                message_id=message.message_id,
            ),
        )
        failure = replace(failure, reason=details.reason)
        run.outcome = JobOutcome(Outcome.DEAD_LETTERED, failure=failure, dead_letter=kind)
        return "error" if kind != "invalid" else "warning"

    def _finish(self, broker: Any, run: JobRun) -> None:
        """Finish a final outcome (record, campaign progress, event); never fails the job."""
        if self.on_final is None:
            return
        try:
            self.on_final(broker, run)
        except Exception:  # noqa: BLE001 - the job's outcome stands whatever finishing does
            run.note(event_published=False)
            _log.exception("finishing a job's outcome failed")

    def _log(self, run: JobRun, level: str, exc_info: BaseException | None = None) -> None:
        seconds = time.perf_counter() - run.started
        if self.metrics is not None:
            try:
                self.metrics.observe_job(run, seconds)
            except Exception:  # noqa: BLE001 - a metric must not change a job's outcome
                _log.exception("counting a job in metrics failed")
        fields = run.log_fields()
        fields["duration_ms"] = round(seconds * 1000, 1)
        if run.after_send_failures:
            fields["after_send_failures"] = run.after_send_failures
        fields["logger"] = _LOGGER_NAME
        try:
            log_job_line(level, fields, exc_info)
        except Exception as exc:  # noqa: BLE001 - the job's outcome stands whatever its line does
            # Validation keeps a job's fields encodable; should one still not be, the line is
            # written without the producer's part of it.
            fields.pop("metadata", None)
            _log.error("job", log_error=type(exc).__name__, **fields)
