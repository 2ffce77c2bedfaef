"""The worker's metrics, read from a fresh Metrics instance's own registry: series that exist
from the start, and labels whose values a producer chooses kept to a bounded set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from worker import errors
from worker.finish.outcome import Failure, JobContext, JobFacts, JobOutcome, JobRun, Outcome
from worker.jobs.registry import JOB_TYPES
from worker.jobs.wire import UNDECODABLE_ACTOR
from worker.limits.pacing import Lane
from worker.observability import labels as label_values
from worker.observability.labels import DEFERRAL_KINDS, OTHER_LABEL_VALUE
from worker.observability.metrics import Metrics
from worker.send import gate
from worker.verloop.endpoints import DEFAULT_ENDPOINTS

ROOT = Path(__file__).resolve().parents[2]
LANES = ("transactional", "campaign")
ACTOR_QUEUES = {job_type.name: job_type.queue for job_type in JOB_TYPES.values()}


def fresh(**kwargs: Any) -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return Metrics(ACTOR_QUEUES, registry=registry, **kwargs), registry


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``, by its sorted labels."""
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def send_job(
    metrics: Metrics,
    client_id: str,
    phone_id: str,
    *,
    lane: Lane = "transactional",
    campaign_id: str | None = None,
    code: str | None = None,
) -> None:
    """A valid send job's delivery that ended ``sent`` (or dead-lettered, with ``code``)."""
    run = JobRun(JobContext("m-1", "send_message", "verloop.send", lane, attempt=1))
    run.facts = JobFacts(client_id, phone_id, message_type="text", campaign_id=campaign_id)
    if code is None:
        run.outcome = JobOutcome(Outcome.SENT, verloop_message_id="wamid.1")
    else:
        failure = Failure("PermanentFailure", "spam rate limit", 400, code)
        run.outcome = JobOutcome(Outcome.DEAD_LETTERED, failure=failure, dead_letter="failed")
    metrics.observe_job(run, 0.01)


# --- series that exist from the start -----------------------------------------------------------
def test_a_fresh_instance_has_every_series_whose_labels_are_known_at_zero() -> None:
    """Before any job: jobs, retries and durations per actor and lane, deferrals per lane and
    kind, dead letters per queue and error, API latency per endpoint, token lookups per source
    and relay results all exist, at zero."""
    _, registry = fresh()
    for lane in LANES:
        assert value(registry, "verloop_retries_total", actor="send_message", lane=lane) == 0
        assert value(registry, "verloop_rate_limit_wait_seconds_count", lane=lane) == 0
        for outcome in ("sent", "suppressed", "retrying", "deferred", "dead_lettered"):
            labels = {"actor": "send_message", "lane": lane, "outcome": outcome}
            assert value(registry, "verloop_jobs_total", **labels) == 0
        for kind in DEFERRAL_KINDS:
            assert value(registry, "verloop_deferrals_total", lane=lane, kind=kind) == 0
        undecodable = {"actor": UNDECODABLE_ACTOR, "lane": lane, "outcome": "dead_lettered"}
        assert value(registry, "verloop_jobs_total", **undecodable) == 0
    for actor in ("list_clients", "refresh_phone_token", "refresh_client_tokens"):
        labels = {"actor": actor, "lane": "transactional"}
        assert value(registry, "verloop_retries_total", **labels) == 0
        assert value(registry, "verloop_jobs_total", outcome="done", **labels) == 0
        assert value(registry, "verloop_job_duration_seconds_count", **labels) == 0
        assert (
            value(registry, "verloop_jobs_total", actor=actor, lane="campaign", outcome="done")
            is None
        )
    for queue in ("verloop.send", "verloop.campaign", "verloop.manage"):
        for outcome, error in (
            ("invalid", "InvalidJob"),
            ("failed", "PermanentFailure"),
            ("failed", "TokenInvalid"),
            ("gave_up", "TransientFailure"),
        ):
            labels = {"queue": queue, "outcome": outcome, "error": error}
            assert value(registry, "verloop_dead_letters_total", **labels) == 0
    for endpoint in DEFAULT_ENDPOINTS:
        assert value(registry, "verloop_api_request_duration_seconds_count", endpoint=endpoint) == 0
    for source in ("file", "memory", "redis", "verloop"):
        assert value(registry, "verloop_token_lookups_total", source=source) == 0
    for result in ("published", "failed"):
        assert value(registry, "verloop_events_relayed_total", result=result) == 0
    assert value(registry, "verloop_token_refreshes_total") == 0


def test_only_series_of_ids_not_known_yet_are_missing_at_the_start() -> None:
    """Every verloop_* metric the dashboard and the alerts query has series from the start,
    except those labelled by what is only known from jobs (numbers, campaigns) or from Verloop's
    answers (statuses); with the numbers settings know of, those have series too."""
    used: set[str] = set()
    for path in [
        ROOT / "deploy/prometheus/alerts.yml",
        *sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")),
    ]:
        used |= {
            re.sub(r"_(bucket|sum|count)$", "", m)
            for m in re.findall(r"\b(verloop_[a-z_]+)", path.read_text())
        }
    assert "verloop_retries_total" in used
    metrics, registry = fresh(rate_for=lambda phone: 80.0)
    # Only the worker's own: the receiver's (verloop_webhook_*) are another process's, and a
    # delivery-receipt metric the worker does not declare is checked by tests/deploy instead.
    declared = {family.name for family in registry.collect()}
    used = {name for name in used if name.removesuffix("_total") in declared}
    at_start = {name for name in used if samples(registry, name) or _histogram(registry, name)}
    assert used - at_start == {
        "verloop_sends_total",
        "verloop_number_rate_limit",
        "verloop_quality_pauses_total",
        "verloop_campaign_jobs_total",
        "verloop_api_requests_total",
        "verloop_number_statuses_total",
        "verloop_status_failures_total",
    }
    metrics.add_known_numbers([("acme", "phone-1")], ["phone-2"])
    with_numbers = {name for name in used if samples(registry, name) or _histogram(registry, name)}
    assert used - with_numbers == {
        "verloop_campaign_jobs_total",
        "verloop_api_requests_total",
        "verloop_status_failures_total",
    }


def _histogram(registry: CollectorRegistry, name: str) -> bool:
    return bool(samples(registry, name + "_count"))


def test_numbers_known_from_settings_start_at_zero() -> None:
    """Tokens-file pairs get their send series (every lane and outcome), their quality-pause
    series and their rate; RATE_LIMIT_OVERRIDES numbers the last two."""
    metrics, registry = fresh(rate_for=lambda phone: {"phone-2": 20.0}.get(phone, 80.0))
    metrics.add_known_numbers([("acme", "phone-1")], ["phone-2"])
    for lane in LANES:
        for outcome in ("sent", "dead_lettered", "deferred"):
            labels = {"lane": lane, "outcome": outcome, "client_id": "acme", "phone_id": "phone-1"}
            assert value(registry, "verloop_sends_total", **labels) == 0
    assert value(registry, "verloop_quality_pauses_total", phone_id="phone-1") == 0
    assert value(registry, "verloop_quality_pauses_total", phone_id="phone-2") == 0
    assert value(registry, "verloop_number_rate_limit", phone_id="phone-1") == 80
    assert value(registry, "verloop_number_rate_limit", phone_id="phone-2") == 20


def test_a_number_and_a_campaign_get_their_series_at_zero_when_first_seen() -> None:
    """The first job of a number starts its quality-pause series; the first final outcome of a
    campaign starts the campaign's other outcomes, so a later 131048 or dead letter is an
    increase that increase() sees."""
    metrics, registry = fresh()
    send_job(metrics, "acme", "phone-1", campaign_id="spring", lane="campaign")
    assert value(registry, "verloop_quality_pauses_total", phone_id="phone-1") == 0
    assert value(registry, "verloop_campaign_jobs_total", campaign_id="spring", outcome="sent") == 1
    for outcome in ("dead_lettered", "suppressed", "cancelled"):
        labels = {"campaign_id": "spring", "outcome": outcome}
        assert value(registry, "verloop_campaign_jobs_total", **labels) == 0


def test_every_deferral_kind_and_error_class_the_worker_uses_is_initialised() -> None:
    """DEFERRAL_KINDS lists every kind a Deferred is raised with anywhere in worker/ (so a kind
    added later fails here until it is listed); the dead letters' error classes and the
    undecodable actor are the worker's own."""
    used = {"other"}  # Deferred's default
    used |= set(gate._KINDS.values())
    for path in (ROOT / "worker").rglob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r'\bkind="([a-z_]+)"', text))
        used |= set(re.findall(r'held_while_redis_is_down\(\s*\w+,\s*"([a-z_]+)"', text))
    assert {"in_flight", "redis_unavailable", "limiter_unavailable"} <= used
    assert used <= set(DEFERRAL_KINDS), sorted(used - set(DEFERRAL_KINDS))
    for _, error in label_values.DEAD_LETTER_KINDS:
        assert issubclass(getattr(errors, error), errors.JobFailure)
    assert {actor for actor, _, _ in label_values.actor_lanes(ACTOR_QUEUES)} == {
        *JOB_TYPES,
        UNDECODABLE_ACTOR,
    }


# --- bounded labels -----------------------------------------------------------------------------
def test_client_phone_and_campaign_ids_beyond_the_cap_are_counted_as_other() -> None:
    """With METRICS_MAX_LABEL_VALUES=2 the third and later clients, numbers and campaigns of a
    process share the label value _other; every job is still counted."""
    rates = {"p3": 20.0, "p4": 90.0, "p5": 30.0}
    metrics, registry = fresh(max_label_values=2, rate_for=lambda p: rates.get(p, 80.0))
    for n in range(1, 6):
        send_job(metrics, f"c{n}", f"p{n}", campaign_id=f"camp{n}", code="131048")
    sends = samples(registry, "verloop_sends_total")
    assert {dict(labels)["phone_id"] for labels in sends} == {"p1", "p2", OTHER_LABEL_VALUE}
    assert {dict(labels)["client_id"] for labels in sends} == {"c1", "c2", OTHER_LABEL_VALUE}
    assert sum(sends.values()) == 5
    other = {"lane": "transactional", "outcome": "dead_lettered"}
    assert (
        value(registry, "verloop_sends_total", client_id="_other", phone_id="_other", **other) == 3
    )
    campaigns = samples(registry, "verloop_campaign_jobs_total")
    assert {dict(labels)["campaign_id"] for labels in campaigns} == {
        "camp1",
        "camp2",
        OTHER_LABEL_VALUE,
    }
    assert (
        value(
            registry, "verloop_campaign_jobs_total", campaign_id="_other", outcome="dead_lettered"
        )
        == 3
    )
    assert value(registry, "verloop_quality_pauses_total", phone_id="_other") == 3
    limits = samples(registry, "verloop_number_rate_limit")
    assert limits == {
        (("phone_id", "p1"),): 80.0,
        (("phone_id", "p2"),): 80.0,
        (("phone_id", "_other"),): 90.0,  # the highest limit among the numbers beyond the cap
    }


def test_the_cap_holds_for_many_ids() -> None:
    """Ten thousand numbers from producers make at most the cap + 1 label values."""
    metrics, registry = fresh(max_label_values=300)
    for n in range(10_000):
        send_job(metrics, "acme", f"phone-{n}")
    phones = {dict(labels)["phone_id"] for labels in samples(registry, "verloop_sends_total")}
    assert len(phones) == 301
    assert sum(samples(registry, "verloop_sends_total").values()) == 10_000


_FORK_SCRIPT = """
import os, sys
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from worker.observability.metrics import cache_pid_for_multiprocess_values

cache_pid_for_multiprocess_values()
jobs = Counter("jobs", "test", registry=None)
jobs.inc()
child = os.fork()
if child == 0:
    jobs.inc(2)  # the child's values start at zero, in a file of its own
    os._exit(0)
os.waitpid(child, 0)
jobs.inc()
files = sorted(f for f in os.listdir(sys.argv[1]) if f.startswith("counter_"))
registry = CollectorRegistry()
MultiProcessCollector(registry, sys.argv[1])
print(len(files), registry.get_sample_value("jobs_total"))
"""


def test_the_cached_pid_still_gives_each_forked_process_its_own_values(tmp_path: Path) -> None:
    """prometheus-client notices a fork by the pid; the cached one is renewed in the child, so
    the parent's and the child's counts land in their own files and add up."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.split() == ["2", "4.0"]
