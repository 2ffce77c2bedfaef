"""Prometheus metrics of the worker's own domain (dramatiq's middleware adds its generic ones);
the table of metrics and labels is in README.md's "Operations" section.

Written in prometheus-client's multiprocess mode. Labels are bounded: no recipient, message id
or free text, and producers' ids at most ``METRICS_MAX_LABEL_VALUES`` each
(:mod:`worker.observability.labels`). Series with known labels start at zero, so ``increase()``
and the alerts see the first event.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from worker.finish.outbox import PARK_KINDS
from worker.finish.outcome import (
    CAMPAIGN_OUTCOMES,
    SEND_OUTCOMES,
    JobRun,
    Outcome,
)
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.observability.labels import (
    AFTER_SEND_STEPS,
    DEAD_LETTER_KINDS,
    DEFERRAL_KINDS,
    LANES,
    OTHER_LABEL_VALUE,
    Capped,
    actor_lanes,
)
from worker.observability.status_metrics import StatusMetrics
from worker.receipts.models import STATUS_QUEUE
from worker.verloop.endpoints import DEFAULT_ENDPOINTS
from worker.verloop.tokens import TokenSource

__all__ = ["Metrics", "cache_pid_for_multiprocess_values"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)


_pid = os.getpid()


def _cached_pid() -> int:
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def cache_pid_for_multiprocess_values() -> None:
    """Let prometheus-client's multiprocess values read this process's pid from memory.

    Every increment and observation asks for the pid, to notice a fork (a ``getpid`` system
    call each: about 15 a job). The pid cached here is renewed in the child after every fork,
    which is what prometheus-client checks for. Call it in each worker process before any
    metric exists; in single-process mode it changes nothing.
    """
    if values.ValueClass is not values.MutexValue:
        values.ValueClass = values.MultiProcessValue(process_identifier=_cached_pid)  # type: ignore[no-untyped-call]


class Metrics:
    """The worker's metrics. One instance per process, created at worker boot."""

    def __init__(
        self,
        actor_queues: Mapping[str, str],
        registry: CollectorRegistry | None = None,
        rate_for: Callable[[str], float] | None = None,
        max_label_values: int = 500,
    ) -> None:
        """``actor_queues``: each actor's queue (its series start at zero)."""
        self.rate_for = rate_for
        self._actor_queues = dict(actor_queues)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._limits_set: set[str] = set()
        self._other_limit = 0.0
        self._client_ids = Capped(max_label_values)
        self._phone_ids = Capped(max_label_values)
        self._campaign_ids = Capped(max_label_values)
        # A registry of its own: in multiprocess mode values go to files whatever the registry,
        # and a private one lets tests create several instances in one process.
        registry = registry or CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "verloop_jobs_total",
            "Jobs finished by this worker, by how they ended.",
            ["actor", "lane", "outcome"],
            registry=registry,
        )
        self.sends = Counter(
            "verloop_sends_total",
            "send_message jobs by outcome, lane, client and sending number.",
            ["lane", "outcome", "client_id", "phone_id"],
            registry=registry,
        )
        self.campaign_jobs = Counter(
            "verloop_campaign_jobs_total",
            "Campaign jobs by campaign and final outcome (one series per campaign and outcome).",
            ["campaign_id", "outcome"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "verloop_job_duration_seconds",
            "Time from a job's start to its end in the worker, waits included.",
            ["actor", "lane"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "verloop_dead_letters_total",
            "Jobs dead-lettered, by queue, outcome and error class.",
            ["queue", "outcome", "error"],
            registry=registry,
        )
        self.retries = Counter(
            "verloop_retries_total",
            "Jobs scheduled for another attempt after a transient failure.",
            ["actor", "lane"],
            registry=registry,
        )
        self.deferrals = Counter(
            "verloop_deferrals_total",
            "Jobs re-delayed without using a retry (rate limits, holds, limiter down).",
            ["lane", "kind"],
            registry=registry,
        )
        self.limit_wait = Histogram(
            "verloop_rate_limit_wait_seconds",
            "Time a send waited for its number's slot.",
            ["lane"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.number_limit = Gauge(
            "verloop_number_rate_limit",
            "Configured messages per second of a sending number.",
            ["phone_id"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.quality_pauses = Counter(
            "verloop_quality_pauses_total",
            "Campaign sends paused on a number after 131048 (spam rate limit).",
            ["phone_id"],
            registry=registry,
        )
        self.api_requests = Counter(
            "verloop_api_requests_total",
            "Calls to Verloop by endpoint, HTTP status and Verloop/Meta error code.",
            ["endpoint", "status", "code"],
            registry=registry,
        )
        self.api_latency = Histogram(
            "verloop_api_request_duration_seconds",
            "Latency of calls to Verloop.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.token_lookups = Counter(
            "verloop_token_lookups_total",
            "Phone token lookups by where the token came from (cache hits and fetches).",
            ["source"],
            registry=registry,
        )
        self.token_refreshes = Counter(
            "verloop_token_refreshes_total",
            "Phone tokens rejected by Verloop and fetched again.",
            registry=registry,
        )
        self.events_relayed = Counter(
            "verloop_events_relayed_total",
            "Outcome events the outbox relay published to RabbitMQ (result=published), and "
            "relay attempts that failed and left their events in the outbox (result=failed).",
            ["result"],
            registry=registry,
        )
        self.after_send_failures = Counter(
            "verloop_after_send_failures_total",
            "Writes after Verloop accepted a message that failed (ledger record, campaign "
            "progress, outcome event); the message is never sent again for them.",
            ["step"],
            registry=registry,
        )
        self.events_parked = Counter(
            "verloop_events_parked_total",
            "Outbox entries that can never be published, moved to verloop:events:parked.",
            ["kind"],
            registry=registry,
        )
        self.outbox_length = Gauge(
            "verloop_events_outbox_length",
            "Outcome events waiting in the outbox stream (read by the relays now and then).",
            multiprocess_mode="max",
            registry=registry,
        )
        self.outbox_max_length = Gauge(
            "verloop_events_outbox_max_length",
            "The outbox stream's bound (EVENTS_OUTBOX_MAX_LEN): past it the oldest are dropped.",
            multiprocess_mode="max",
            registry=registry,
        )
        self.worker_threads = Gauge(
            "verloop_worker_threads",
            "Worker threads by state: expected (configured), alive, dead (died; the process "
            "must be restarted) and stuck (in one job longer than JOB_STUCK_AFTER_S).",
            ["state"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.thread_deaths = Counter(
            "verloop_worker_thread_deaths_total",
            "Worker threads that died (a bug: the process runs with fewer threads until it is "
            "restarted).",
            registry=registry,
        )
        self.receipts = StatusMetrics(registry, self._child, Capped(max_label_values))
        self._start_known_series()

    def _start_known_series(self) -> None:
        """Create, at zero, every series whose label values are known before any job."""
        child = self._child
        for step in AFTER_SEND_STEPS:
            child(self.after_send_failures, step)
        for kind in PARK_KINDS:
            child(self.events_parked, kind)
        for state in ("expected", "alive", "dead", "stuck"):
            child(self.worker_threads, state)  # set by the thread watch once it has looked
        for actor, lane, outcomes in actor_lanes(self._actor_queues):
            for outcome in outcomes:
                child(self.jobs, actor, lane, outcome)
            if "retrying" in outcomes:
                child(self.retries, actor, lane)
            child(self.job_duration, actor, lane)
        self.receipts.start_known_series()
        for lane in LANES:
            child(self.limit_wait, lane)
            for kind in DEFERRAL_KINDS:
                child(self.deferrals, lane, kind)
        for queue in (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE, STATUS_QUEUE):
            for outcome, error in DEAD_LETTER_KINDS:
                child(self.dead_letters, queue, outcome, error)
        for endpoint in DEFAULT_ENDPOINTS:
            child(self.api_latency, endpoint)
        for source in get_args(TokenSource):
            child(self.token_lookups, source)
        for result in ("published", "failed"):
            child(self.events_relayed, result)

    def add_known_numbers(
        self, pairs: Iterable[tuple[str, str]], phone_ids: Iterable[str] = ()
    ) -> None:
        """Start at zero the series of numbers known from settings: the (client_id, phone_id)
        pairs of the tokens file, and numbers with a rate of their own."""
        for client_id, phone_id in pairs:
            client, _ = self._client_ids(client_id)
            phone = self._phone(phone_id)
            for lane in LANES:
                for outcome in (o.value for o in SEND_OUTCOMES):
                    self._child(self.sends, lane, outcome, client, phone)
        for phone_id in phone_ids:
            self._phone(phone_id)

    def _phone(self, phone_id: str) -> str:
        """The label of a sending number; its per-number series start when it is first seen."""
        label, new = self._phone_ids(phone_id)
        if new:
            self._child(self.quality_pauses, label)
            self.receipts.start_number(label)
        if self.rate_for is not None:
            if label != OTHER_LABEL_VALUE:
                if label not in self._limits_set:
                    self.number_limit.labels(label).set(self.rate_for(phone_id))
                    self._limits_set.add(label)
            else:
                # One gauge for every number beyond the cap: the highest of their limits.
                rate = self.rate_for(phone_id)
                if rate > self._other_limit:
                    self._other_limit = rate
                    self.number_limit.labels(label).set(rate)
        return label

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus-client's labels() validates and locks on every call; a job touches several
        # metrics, so the labelled children are kept here (their label sets are bounded).
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_api_call(self, endpoint: str, status: str, code: str, seconds: float) -> None:
        """One call to Verloop (the client calls this)."""
        self._child(self.api_requests, endpoint, status, code).inc()
        self._child(self.api_latency, endpoint).observe(seconds)

    def observe_after_send_failure(self, step: str) -> None:
        """A write after an accepted send failed (``step``: ledger, campaign, event)."""
        self._child(self.after_send_failures, step).inc()

    def observe_parked(self, kind: str) -> None:
        """The relay parked an outbox entry that cannot be published (``kind``: one of
        ``worker.finish.outbox.PARK_KINDS``)."""
        self._child(self.events_parked, kind).inc()

    def observe_outbox_length(self, length: int) -> None:
        self.outbox_length.set(length)

    def observe_threads(self, expected: int, alive: int, dead: int, stuck: int) -> None:
        """The worker threads of this process, as the thread watch saw them."""
        counts = {"expected": expected, "alive": alive, "dead": dead, "stuck": stuck}
        for state, count in counts.items():
            self._child(self.worker_threads, state).set(count)

    def observe_relay(self, count: int, ok: bool) -> None:
        """One batch of the events relay: ``count`` events published, or a failed attempt."""
        if ok:
            self._child(self.events_relayed, "published").inc(count)
        else:
            self._child(self.events_relayed, "failed").inc()

    def observe_job(self, run: JobRun, seconds: float) -> None:
        """One finished delivery (the outcome middleware calls this with the run it logs, so
        logs and metrics cannot disagree)."""
        ctx, facts, outcome = run.ctx, run.facts, run.outcome
        if outcome is None:
            return
        actor, lane, kind = ctx.actor, ctx.lane, outcome.kind
        failure = outcome.failure
        child = self._child
        child(self.jobs, actor, lane, kind.value).inc()
        child(self.job_duration, actor, lane).observe(seconds)
        if actor == "send_message" and facts.is_valid_send:
            phone = self._phone(facts.phone_id or "")
            client, _ = self._client_ids(facts.client_id or "")
            child(self.sends, lane, kind.value, client, phone).inc()
            if failure is not None and failure.code == "131048":
                child(self.quality_pauses, phone).inc()
        if facts.campaign_id and kind in CAMPAIGN_OUTCOMES:
            campaign, new = self._campaign_ids(facts.campaign_id)
            if new:
                for final in CAMPAIGN_OUTCOMES:
                    child(self.campaign_jobs, campaign, final.value)
            child(self.campaign_jobs, campaign, kind.value).inc()
        if kind is Outcome.DEAD_LETTERED:
            child(
                self.dead_letters,
                ctx.queue,
                outcome.dead_letter or "",
                "" if failure is None else failure.error,
            ).inc()
        elif kind is Outcome.RETRYING:
            child(self.retries, actor, lane).inc()
        elif kind is Outcome.DEFERRED:
            child(self.deferrals, lane, outcome.deferral or "").inc()
        if run.limit_wait_ms is not None:
            child(self.limit_wait, lane).observe(run.limit_wait_ms / 1000)
        if run.token_source:
            child(self.token_lookups, run.token_source).inc()
        if run.token_refreshed:
            self.token_refreshes.inc()
        for step in run.after_send_failures:
            self.observe_after_send_failure(step)
        for status in run.statuses:  # recorded ones count even when others wait
            self.receipts.observe(status, self._phone(status.phone_id) if status.phone_id else None)
