"""Unit tests for the actors' prologue (worker.runtime.actors): a valid job is described by all
its ids, an invalid one by those of its ids that are well-formed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest

from worker.errors import InvalidJob
from worker.finish import middleware
from worker.finish.outcome import JobContext, JobFacts, JobRun
from worker.jobs.registry import JOB_TYPES, parse_job
from worker.runtime.actors import _actor, _describe, _describe_unvalidated
from worker.runtime.services import Lifecycle

SEND = {
    "client_id": "acme",
    "phone_id": "p:1@x",
    "to": "+91 98765 43210",
    "message": {"type": "text", "text": {"body": "hi"}},
    "idempotency_key": "k-1",
    "campaign_id": "camp-1",
    "metadata": {"ticket": 7},
}
VALID = [
    ("send_message", SEND),
    ("refresh_phone_token", {"client_id": "acme", "phone_id": "p-1"}),
    ("refresh_client_tokens", {"client_id": "acme"}),
    ("list_clients", {"metadata": {"by": "ops"}}),
]


@pytest.fixture
def run() -> Iterator[JobRun]:
    """The run of a job this thread is running, as the outcome middleware sets it."""
    current = JobRun(
        JobContext(message_id="m-1", actor="x", queue="q", lane="transactional", attempt=1)
    )
    token = middleware._current.set(current)
    yield current
    middleware._current.reset(token)


@pytest.mark.parametrize(("actor", "kwargs"), VALID, ids=[a for a, _ in VALID])
def test_a_valid_job_is_described_as_when_its_ids_were_read_before_validation(
    actor: str, kwargs: dict[str, Any]
) -> None:
    """The ids are read from the validated job alone now; they are the ones the prologue found
    when it also read them from the kwargs first (the recipient: normalised)."""
    job = parse_job(actor, (), kwargs)
    before = JobFacts()
    _describe_unvalidated(before, kwargs)
    _describe(before, job)
    after = JobFacts()
    _describe(after, job)
    before.unchecked_to = None  # read only when there is no valid recipient
    assert after == before


def test_a_valid_send_is_described_by_every_fact() -> None:
    facts = JobFacts()
    _describe(facts, parse_job("send_message", (), SEND))
    assert facts == JobFacts(
        client_id="acme",
        phone_id="p:1@x",
        to="+919876543210",
        message_type="text",
        idempotency_key="k-1",
        campaign_id="camp-1",
        metadata={"ticket": 7},
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (SEND | {"to": "+91 12345"}, ("acme", "p:1@x", "+91 12345")),
        (SEND | {"client_id": "acme corp", "to": 5}, (None, "p:1@x", None)),
        (SEND | {"message": {"type": "sms"}, "to": "x\r\ny"}, ("acme", "p:1@x", None)),
    ],
)
def test_an_invalid_job_is_described_by_its_well_formed_ids(
    run: JobRun, kwargs: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    """The actor raises InvalidJob (a dead letter), and its run says whose job it was."""
    actor = _actor(JOB_TYPES["send_message"], cast(Lifecycle, None))
    with pytest.raises(InvalidJob):
        actor(**kwargs)
    facts = run.facts
    assert (facts.client_id, facts.phone_id, facts.unchecked_to) == expected
    assert facts.to is None
    assert facts.message_type is None
