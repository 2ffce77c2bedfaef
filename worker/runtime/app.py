"""Assembling a worker: settings → logging → broker with middleware → actors.

:func:`boot` is what ``verloop-worker run`` hands to dramatiq's process manager; dramatiq calls it
once in every worker process. Settings are read there, at the entry point, not at import.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import dramatiq
from dramatiq.middleware import Middleware

from worker.finish.finish import JobFinisher
from worker.finish.middleware import JobOutcomes, RetryPolicy
from worker.jobs.models import CAMPAIGN_QUEUE
from worker.jobs.registry import JOB_TYPES
from worker.observability.logging import DirectStream, configure_logging
from worker.observability.metrics import Metrics, cache_pid_for_multiprocess_values
from worker.runtime.actors import register_actors
from worker.runtime.broker import VerloopBroker, build_broker
from worker.runtime.health import HEALTH_DIR_ENV, ThreadWatch
from worker.runtime.jobs_exchange import JobsExchange
from worker.runtime.services import Lifecycle
from worker.settings import Settings

__all__ = ["WorkerApp", "boot", "create_app"]


@dataclass(frozen=True)
class WorkerApp:
    """A configured broker with its actors, ready for a dramatiq ``Worker``."""

    settings: Settings
    broker: VerloopBroker
    lifecycle: Lifecycle
    actors: dict[str, dramatiq.Actor[..., None]]


def create_app(settings: Settings) -> WorkerApp:
    """Build the broker, its middleware and its actors from ``settings``."""
    metrics = None
    middleware: list[Middleware] = []
    if settings.metrics_port:
        # Metrics are served by dramatiq's exposition process, forked by its CLI: only worker
        # processes started by ``verloop-worker run`` have one (and the multiprocess folder).
        # Imported here: dramatiq's module reads its metrics settings from the environment and
        # makes its folder when imported, which only a worker process should do.
        from worker.observability.dramatiq_metrics import DramatiqMetrics

        cache_pid_for_multiprocess_values()
        metrics = Metrics(
            {job_type.name: job_type.queue for job_type in JOB_TYPES.values()},
            rate_for=settings.rate_for,
            max_label_values=settings.metrics_max_label_values,
        )
        middleware.append(DramatiqMetrics())
    lifecycle = Lifecycle(settings, metrics)
    health = os.environ.get(HEALTH_DIR_ENV)
    watch = ThreadWatch(
        stuck_after_s=settings.job_stuck_after_s,
        metrics=metrics,
        directory=Path(health) if health else None,
    )
    outcomes = JobOutcomes(
        RetryPolicy(
            max_retries=settings.retry_max_retries,
            min_backoff_s=settings.retry_min_backoff_s,
            max_backoff_s=settings.retry_max_backoff_s,
        ),
        metrics,
        on_final=JobFinisher(lifecycle, settings.outcome_exchange),
    )
    broker = build_broker(
        settings.amqp_url.get_secret_value(),
        max_job_bytes=settings.max_job_bytes,
        known_actors=frozenset(JOB_TYPES),
        low_priority_queues=frozenset({CAMPAIGN_QUEUE}),
        events_exchange=settings.outcome_exchange,
        max_delay_s=settings.max_job_delay_s,
        queue_type=settings.queue_type,
        middleware=[
            *middleware,
            watch,
            lifecycle,
            outcomes,
            JobsExchange(
                settings.amqp_url.get_secret_value(),
                settings.jobs_exchange,
                status_exchange=settings.status_exchange,
            ),
        ],
    )
    actors = register_actors(broker, lifecycle)
    # Campaign sends use the send_message actor from their own queue (its own lane).
    broker.declare_queue(CAMPAIGN_QUEUE)
    return WorkerApp(settings, broker, lifecycle, actors)


def boot() -> None:
    """Entry point for dramatiq's worker processes (``worker.runtime.app:boot``)."""
    settings = Settings.load()
    # CPython's GIL switch interval stays at its default (5 ms): 1 ms cost 2-3 % more CPU per
    # send in forced thread switches, for no gain in sends/s or at one number's 1,000/s.
    # Lines go straight to the inherited stderr, not through dramatiq's pipe to the main
    # process (one system call per line instead of a second process's read and write).
    configure_logging(settings.log_format, settings.log_level, stream=DirectStream(sys.stderr))
    create_app(settings)
