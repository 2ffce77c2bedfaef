"""Delivery receipts against a real Redis: the finisher links a send to its wamid, and the
``record_status`` handler records each status once, in any order, into the campaign's funnel,
the outbox and the limiter."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.integration.conftest import finish_job, free_port, redis_client
from worker.campaigns.store import CampaignRef
from worker.errors import Deferred
from worker.finish.outbox import STREAM
from worker.finish.outcome import (
    JobContext,
    JobFacts,
    JobOutcome,
    JobRun,
    Outcome,
    StatusFacts,
)
from worker.jobs.models import SendMessageJob
from worker.jobs.registry import parse_job
from worker.receipts.actor import record_statuses
from worker.receipts.links import LINK_PREFIX
from worker.receipts.models import STATUS_ACTOR, StatusJob
from worker.runtime.services import Services
from worker.settings import Settings

pytestmark = pytest.mark.integration

TO = "+919876543210"


def _finish(services: Services, run: JobRun) -> None:
    finish_job(services, run)


def _send(services: Services, wamid: str, *, campaign: str | None = "spring", n: int = 1) -> None:
    """What the worker does once Verloop accepted a send: the finisher records it."""
    job = parse_job(
        "send_message",
        (),
        {
            "client_id": "acme",
            "phone_id": "phone-1",
            "to": TO,
            "message": {"type": "text", "text": {"body": "hi"}},
            "idempotency_key": f"k-{wamid}",
            **({"campaign_id": campaign} if campaign else {}),
        },
    )
    assert isinstance(job, SendMessageJob)
    lane: Any = "campaign" if campaign else "transactional"
    run = JobRun(JobContext(f"send-{n}", "send_message", "verloop.send", lane, attempt=1))
    run.facts = JobFacts(
        "acme", "phone-1", TO, message_type="text", idempotency_key=job.idempotency_key
    )
    run.facts.campaign_id = campaign
    run.outcome = JobOutcome(
        Outcome.SENT, verloop_message_id=wamid, ledger_key=job.ledger_key(run.ctx.message_id)
    )
    _finish(services, run)


def _entry(wamid: str, status: str, *, code: int | None = None, age_s: float = 5) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "wamid": wamid,
        "status": status,
        "timestamp": int(time.time() - age_s),
        "recipient_id": TO[1:],
    }
    if code is not None:
        entry["errors"] = [{"code": code, "title": "t", "details": "d"}]
    return entry


def _job(services: Services, *entries: dict[str, Any]) -> JobRun:
    """One status job through the handler and the finisher, as the actor runs it."""
    job = parse_job(STATUS_ACTOR, (), {"statuses": list(entries)})
    assert isinstance(job, StatusJob)
    run = JobRun(JobContext("status-job", STATUS_ACTOR, "verloop.status", "transactional", 1))
    run.outcome = record_statuses(services, job, run)
    _finish(services, run)
    return run


def _status(
    services: Services, wamid: str, status: str, *, code: int | None = None, age_s: float = 5
) -> StatusFacts:
    """One status, alone in its job; what recording it did."""
    [facts] = _job(services, _entry(wamid, status, code=code, age_s=age_s)).statuses
    return facts


def _events() -> list[dict[str, Any]]:
    with redis_client(decode_responses=True) as client:
        entries = [fields for _, fields in client.xrange(STREAM)]
    return [{"key": e["k"], **orjson.loads(e["b"])} for e in entries]


def _status_events() -> list[dict[str, Any]]:
    return [e for e in _events() if e["key"].startswith("status.")]


def _funnel(services: Services) -> dict[str, int]:
    status = services.campaigns.get(CampaignRef("acme", "spring"))
    return {k: int(v) for k, v in status.fields.items() if k.startswith("status:")}


@pytest.fixture
def spring(services: Services) -> CampaignRef:
    ref = CampaignRef("acme", "spring")
    services.campaigns.create(ref, {"client_id": "acme", "template": "spring_sale"})
    return ref


def test_a_recorded_send_is_linked_to_its_wamid_for_the_ledgers_ttl(services: Services) -> None:
    _send(services, "wamid.link1")
    [link] = services.receipts.links(["wamid.link1"])
    assert link is not None
    assert (link.client_id, link.phone_id, link.to, link.campaign_id) == (
        "acme",
        "phone-1",
        TO,
        "spring",
    )
    assert (link.message_id, link.idempotency_key, link.lane) == (
        "send-1",
        "k-wamid.link1",
        "campaign",
    )
    with redis_client() as client:
        ttl = client.ttl(LINK_PREFIX + "wamid.link1")
    assert services.settings.ledger_ttl_s - 5 <= ttl <= services.settings.ledger_ttl_s


def test_statuses_in_order_move_the_funnel_once_each(
    services: Services, spring: CampaignRef
) -> None:
    _send(services, "wamid.a")
    for status in ("sent", "delivered", "read", "read", "delivered"):
        _status(services, "wamid.a", status)
    assert _funnel(services) == {"status:delivered": 1, "status:read": 1}
    # "sent" repeats what the send's own event said: delivered, read and failed get events.
    events = _status_events()
    assert [e["key"] for e in events] == [
        "status.delivered.acme.phone-1.spring",
        "status.read.acme.phone-1.spring",
    ]
    read = events[1]
    assert read["event"] == "status.read"
    assert (read["wamid"], read["status"], read["to"]) == ("wamid.a", "read", TO)
    assert read["send_message_id"] == "send-1"
    assert read["idempotency_key"] == "k-wamid.a"


def test_one_job_records_many_statuses_each_once(services: Services, spring: CampaignRef) -> None:
    for n in range(3):
        _send(services, f"wamid.m{n}", n=n)
    run = _job(
        services,
        *(_entry(f"wamid.m{n}", "delivered") for n in range(3)),
        _entry("wamid.m0", "delivered"),
        _entry("wamid.m1", "read"),
    )
    assert [s.effect for s in run.statuses] == ["recorded"] * 3 + ["duplicate", "recorded"]
    assert _funnel(services) == {"status:delivered": 3, "status:read": 1}
    assert run.log_fields()["status_effects"] == {"recorded": 4, "duplicate": 1}


def test_a_duplicate_changes_nothing_and_says_so(services: Services, spring: CampaignRef) -> None:
    _send(services, "wamid.dup")
    first = _status(services, "wamid.dup", "delivered")
    again = _status(services, "wamid.dup", "delivered")
    assert (first.effect, again.effect) == ("recorded", "duplicate")
    assert len(_status_events()) == 1
    assert _funnel(services) == {"status:delivered": 1}


def test_read_before_delivered_counts_both_and_the_late_delivered_nothing(
    services: Services, spring: CampaignRef
) -> None:
    _send(services, "wamid.r")
    _status(services, "wamid.r", "read")
    assert _funnel(services) == {"status:delivered": 1, "status:read": 1}
    _status(services, "wamid.r", "delivered")
    assert _funnel(services) == {"status:delivered": 1, "status:read": 1}
    # Recorded all the same: upstream systems get both events.
    assert len(_status_events()) == 2


def test_a_failure_counts_by_code_and_a_later_delivered_moves_it(
    services: Services, spring: CampaignRef
) -> None:
    """Multi-device: delivered may follow failed; the best status wins."""
    _send(services, "wamid.f")
    _status(services, "wamid.f", "failed", code=131026)
    assert _funnel(services) == {"status:failed": 1, "status:failed:131026": 1}
    [failed] = _status_events()
    assert failed["key"] == "status.failed.acme.phone-1.spring"
    assert failed["code"] == "131026"
    assert failed["errors"] == [{"code": 131026, "title": "t", "details": "d"}]
    _status(services, "wamid.f", "delivered")
    assert _funnel(services) == {
        "status:failed": 0,
        "status:failed:131026": 0,
        "status:delivered": 1,
    }


def test_a_failure_after_delivered_is_recorded_and_undoes_nothing(
    services: Services, spring: CampaignRef
) -> None:
    _send(services, "wamid.d")
    _status(services, "wamid.d", "delivered")
    assert _status(services, "wamid.d", "failed", code=131026).effect == "recorded"
    assert _funnel(services) == {"status:delivered": 1}
    assert [e["status"] for e in _status_events()] == ["delivered", "failed"]


def test_young_statuses_of_unknown_messages_wait_alone_old_ones_are_counted(
    services: Services, spring: CampaignRef
) -> None:
    """The send may still be being recorded: only the statuses not found go back to wait;
    after the grace period a status is unknown, not an error."""
    _send(services, "wamid.known")
    young = _entry("wamid.nobody", "delivered", age_s=1)
    with pytest.raises(Deferred) as early:
        _job(services, _entry("wamid.known", "delivered"), young)
    assert early.value.kind == "status_early"
    assert early.value.kwargs == {"statuses": [young]}
    assert _funnel(services) == {"status:delivered": 1}  # the known one is recorded already
    old = services.settings.status_unknown_grace_s + 10
    assert _status(services, "wamid.nobody", "delivered", age_s=old).effect == "unknown"
    assert [e["wamid"] for e in _status_events()] == ["wamid.known"]


def test_statuses_without_a_campaign_still_get_events(services: Services) -> None:
    _send(services, "wamid.solo", campaign=None)
    _status(services, "wamid.solo", "delivered")
    assert [e["key"] for e in _status_events()] == ["status.delivered.acme.phone-1.none"]


def test_a_131048_status_pauses_the_numbers_campaign_sends(services: Services) -> None:
    _send(services, "wamid.spam")
    _status(services, "wamid.spam", "failed", code=131048)
    with pytest.raises(Deferred) as paused:
        services.gate.admit("phone-1", "+919811111111", "campaign")
    assert paused.value.kind == "campaign_paused"
    # Transactional sends from the number still go.
    assert services.gate.admit("phone-1", "+919811111111", "transactional").waited_s >= 0


def test_a_duplicate_failure_reacts_once(services: Services) -> None:
    """The reaction follows the record: a duplicate status changes no limiter state."""
    _send(services, "wamid.once")
    _status(services, "wamid.once", "failed", code=130429)
    with redis_client(decode_responses=True) as client:
        first = {k: client.get(k) for k in client.scan_iter("*penalty*")}
        _status(services, "wamid.once", "failed", code=130429)
        again = {k: client.get(k) for k in client.scan_iter("*penalty*")}
    assert first
    assert first == again


def test_a_131049_status_holds_the_recipients_campaign_sends(services: Services) -> None:
    _send(services, "wamid.cap")
    _status(services, "wamid.cap", "failed", code=131049)
    with pytest.raises(Deferred) as held:
        services.gate.admit("phone-2", TO, "campaign")
    assert held.value.kind == "recipient_capped"
    assert services.gate.admit("phone-2", TO, "transactional").waited_s >= 0


def test_redis_down_holds_the_status_job_and_records_nothing(
    make_settings: Callable[..., Settings],
) -> None:
    """The job waits (no retry used) rather than failing or recording half of it."""
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    down = Services.open(make_settings(redis_url=nobody))
    try:
        with pytest.raises(Deferred) as held:
            _job(down, _entry("wamid.down", "delivered"))
    finally:
        down.close()
    assert held.value.kind == "redis_unavailable"


def test_statuses_are_recorded_after_redis_forgot_the_script(
    services: Services, spring: CampaignRef
) -> None:
    """After a restart or SCRIPT FLUSH the record's script is loaded again, and the statuses
    of that round trip are recorded once."""
    _send(services, "wamid.flush")
    with redis_client() as client:
        client.script_flush()
    assert _status(services, "wamid.flush", "delivered").effect == "recorded"
    assert _funnel(services) == {"status:delivered": 1}
