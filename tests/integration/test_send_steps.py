"""The send's steps one at a time (admit, claim, call, record) and the finisher, against a real
Redis and the Verloop simulator."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Simulator, finish_job, redis_client
from worker.campaigns.store import CampaignRef
from worker.errors import Deferred, PermanentFailure, TransientFailure
from worker.finish.outbox import STREAM
from worker.finish.outcome import Failure, JobContext, JobFacts, JobOutcome, JobRun, Outcome
from worker.jobs.models import SendMessageJob
from worker.jobs.registry import parse_job
from worker.runtime.services import Services
from worker.send import steps

pytestmark = pytest.mark.integration

TO = "+919876543210"


def a_job(**overrides: Any) -> SendMessageJob:
    kwargs: dict[str, Any] = {
        "client_id": "acme",
        "phone_id": "phone-1",
        "to": TO,
        "message": {"type": "text", "text": {"body": "hello"}},
        **overrides,
    }
    job = parse_job("send_message", (), kwargs)
    assert isinstance(job, SendMessageJob)
    return job


def a_run(message_id: str = "m-1", lane: Any = "transactional") -> JobRun:
    return JobRun(JobContext(message_id, "send_message", "verloop.send", lane, attempt=1))


def test_claim_takes_a_free_entry_and_finds_a_sent_one(services: Services) -> None:
    job = a_job(idempotency_key="steps-claim")
    key = job.ledger_key("m-1")
    slot = steps.admit(services, job, "transactional", a_run())
    assert steps.claim(services, key, "owner-a", "transactional", slot).state == "claimed"
    # Another delivery while the first holds the claim: it waits, it does not send.
    with pytest.raises(Deferred) as waited:
        steps.claim(services, key, "owner-b", "transactional", slot)
    assert waited.value.kind == "in_flight"
    services.ledger.mark_sent(key, "wamid.claim")
    found = steps.claim(services, key, "owner-c", "transactional", slot)
    assert (found.state, found.detail) == ("sent", "wamid.claim")


def test_call_returns_verloops_answer_and_sent_names_the_ledger_entry(
    services: Services, simulator: Simulator
) -> None:
    job, run = a_job(idempotency_key="steps-call"), a_run()
    key = job.ledger_key("m-1")
    token, _ = services.phone_tokens.get(job.client_id, job.phone_id)
    steps.claim(
        services, key, "owner-a", "transactional", steps.admit(services, job, "transactional", run)
    )
    result = steps.call(services, token, job, key, "owner-a", run)
    outcome = steps.sent(result, key)
    assert outcome.kind is Outcome.SENT
    assert outcome.ledger_key == key
    assert outcome.verloop_message_id == simulator.messages()[0]["id"]
    # Recording is the finisher's: the call alone leaves the claim pending.
    assert services.ledger.lookup(key).state == "pending"


def test_a_failed_call_releases_its_claim(services: Services, simulator: Simulator) -> None:
    job, run = a_job(idempotency_key="steps-fail"), a_run()
    key = job.ledger_key("m-1")
    token, _ = services.phone_tokens.get(job.client_id, job.phone_id)
    slot = steps.admit(services, job, "transactional", run)
    steps.claim(services, key, "owner-a", "transactional", slot)
    simulator.script({"status": 503, "count": 1})
    with pytest.raises(TransientFailure):
        steps.call(services, token, job, key, "owner-a", run)
    # Released: the next delivery claims it at once (no in-flight wait).
    assert steps.claim(services, key, "owner-b", "transactional", slot).state == "claimed"


def test_an_unanswered_call_leaves_the_campaign_lane_an_uncertain_claim(
    services: Services, simulator: Simulator
) -> None:
    """By lane (the default policy): a campaign send whose outcome is unknown is not resent."""
    job, run = a_job(idempotency_key="steps-unknown"), a_run(lane="campaign")
    key = job.ledger_key("m-1")
    token, _ = services.phone_tokens.get(job.client_id, job.phone_id)
    slot = steps.admit(services, job, "campaign", run)
    steps.claim(services, key, "owner-a", "campaign", slot)
    simulator.script({"status": 504, "timeout": True, "count": 1})
    with pytest.raises(PermanentFailure, match="outcome unknown"):
        steps.call(services, token, job, key, "owner-a", run)
    assert "outcome_unknown" in run.log_fields()
    with pytest.raises(PermanentFailure, match="outcome unknown"):
        steps.claim(services, key, "owner-b", "campaign", slot)


def _spring(services: Services) -> CampaignRef:
    ref = CampaignRef("acme", "spring")
    services.campaigns.create(ref, {"client_id": "acme", "template": "spring_sale"})
    return ref


def _stream_events() -> list[dict[str, str]]:
    with redis_client(decode_responses=True) as client:
        return [fields for _, fields in client.xrange(STREAM)]


def test_the_finisher_records_a_send_with_its_campaign_count_and_event(
    services: Services,
) -> None:
    job = a_job(idempotency_key="steps-finish", campaign_id="spring")
    key = job.ledger_key("m-1")
    run = a_run()
    run.facts = JobFacts(
        "acme",
        "phone-1",
        TO,
        message_type="text",
        idempotency_key="steps-finish",
        campaign_id="spring",
    )
    run.outcome = JobOutcome(Outcome.SENT, verloop_message_id="wamid.fin", ledger_key=key)
    spring = _spring(services)
    finish_job(services, run)
    assert services.ledger.lookup(key).message_id == "wamid.fin"
    assert services.campaigns.get(spring).count("sent") == 1
    [event] = _stream_events()
    assert event["k"] == "send.sent.acme.phone-1.spring"
    assert run.after_send_failures == []


def test_the_finisher_counts_a_dead_letter_and_queues_its_event_without_a_ledger_record(
    services: Services,
) -> None:
    run = a_run()
    run.facts = JobFacts("acme", "phone-1", TO, message_type="text", campaign_id="spring")
    failure = Failure("PermanentFailure", "undeliverable", 400, "131026")
    run.outcome = JobOutcome(Outcome.DEAD_LETTERED, failure=failure, dead_letter="failed")
    spring = _spring(services)
    finish_job(services, run)
    status = services.campaigns.get(spring)
    assert status.count("dead_lettered") == 1
    assert status.count("sent") == 0
    assert status.count("dead_lettered:failed") == 1
    [event] = _stream_events()
    assert event["k"] == "send.dead_lettered.acme.phone-1.spring"
    assert '"code":"131026"' in event["b"]
