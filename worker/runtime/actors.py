"""The actors on the broker: one per job type, each runs the job through the same prologue.

Every actor: validates the job (:func:`worker.jobs.registry.parse_job`; invalid: dead letter,
no retry) and names it by its ids (an invalid one by those that are well-formed, so even its log
line and event say whose it was), sends it back to wait if its ``options.eta`` has not come (no
retry used), then runs its handler, whose outcome it leaves on the job's run for the outcome
middleware.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from typing import Any

import dramatiq

from worker.errors import Deferred
from worker.finish.middleware import current_run
from worker.finish.outcome import JobContext, JobFacts
from worker.jobs.models import (
    ID_PATTERN,
    RefreshClientTokensJob,
    RefreshPhoneTokenJob,
    SendMessageJob,
)
from worker.jobs.registry import JOB_TYPES, AnyJob, JobType, parse_job
from worker.runtime.services import Lifecycle

__all__ = ["SCHEDULE_SLACK_S", "register_actors"]

#: A job due within this long of now runs now (a delay round trip would take about as long).
SCHEDULE_SLACK_S = 0.05
_IDENTIFIER = re.compile(ID_PATTERN)


def register_actors(
    broker: dramatiq.Broker, lifecycle: Lifecycle
) -> dict[str, dramatiq.Actor[..., None]]:
    """Declare every job type's actor on ``broker``."""
    return {
        name: dramatiq.Actor(
            _actor(job_type, lifecycle),
            broker=broker,
            actor_name=name,
            queue_name=job_type.queue,
            priority=0,
            options={},
        )
        for name, job_type in JOB_TYPES.items()
    }


def _actor(job_type: JobType, lifecycle: Lifecycle) -> Callable[..., None]:
    def run(*args: Any, **kwargs: Any) -> None:
        # The outcome goes to the middleware on the run, not as the actor's return value:
        # dramatiq warns about (and discards) a value returned without its Results middleware.
        current = current_run()
        try:
            job = parse_job(job_type.name, args, kwargs)
        except BaseException:
            _describe_unvalidated(current.facts, kwargs)
            raise
        _describe(current.facts, job)
        _wait_for_schedule(current.ctx)
        current.outcome = job_type.handler(lifecycle.services, job, current)

    run.__name__ = run.__qualname__ = job_type.name
    return run


def _describe(facts: JobFacts, job: AnyJob) -> None:
    """What a valid job says about itself."""
    if isinstance(job, SendMessageJob):
        facts.client_id = job.client_id
        facts.phone_id = job.phone_id
        facts.to = job.to
        facts.message_type = job.message.type
        facts.idempotency_key = job.idempotency_key
        facts.campaign_id = job.campaign_id
    elif isinstance(job, RefreshPhoneTokenJob):
        facts.client_id = job.client_id
        facts.phone_id = job.phone_id
    elif isinstance(job, RefreshClientTokensJob):
        facts.client_id = job.client_id
    if job.metadata is not None:
        facts.metadata = job.metadata


def _describe_unvalidated(facts: JobFacts, kwargs: dict[str, Any]) -> None:
    """What an invalid job says about itself: its ids that are well-formed (an id that is not
    goes nowhere; the dead letter's reason names it). A valid job's come from :func:`_describe`,
    which has them all."""
    for key in ("client_id", "phone_id"):
        value = kwargs.get(key)
        if isinstance(value, str) and _IDENTIFIER.match(value):
            setattr(facts, key, value)
    to = kwargs.get("to")
    if isinstance(to, str) and to.isascii() and to.isprintable():
        facts.unchecked_to = to[:32]


def _wait_for_schedule(ctx: JobContext) -> None:
    """A job whose ``options.eta`` has not come yet goes back to wait for it, in hops through
    the delay queue (each under RabbitMQ's consumer timeout), without using a retry."""
    if ctx.not_before_ms is None:
        return
    wait_s = ctx.not_before_ms / 1000 - time.time()
    if wait_s > SCHEDULE_SLACK_S:
        when = dt.datetime.fromtimestamp(ctx.not_before_ms / 1000, dt.UTC)
        raise Deferred(
            wait_s,
            f"scheduled for {when.isoformat(timespec='seconds')} (options.eta)",
            kind="scheduled",
        )
