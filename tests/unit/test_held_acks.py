"""Held acknowledgements are kept by queue and message id (worker.runtime.consumer.HeldAcks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.runtime.consumer import HeldAcks


@dataclass
class _Message:
    message_id: str


@dataclass
class _Consumer:
    """What HeldAcks uses of a consumer: its queue, and sending an acknowledgement."""

    queue_name: str
    sent: list[str] = field(default_factory=list)

    def ack_now(self, message: Any) -> None:
        self.sent.append(message.message_id)


def test_a_delay_queue_delivery_of_the_same_job_is_not_held_with_it() -> None:
    """A retried job's delivery from verloop.send.DQ shares its message id with the job it
    becomes on verloop.send: while that job's record waits, the delay queue's acknowledgement
    leaves at once, and the job's own waits for the record (neither replaces the other)."""
    holds = HeldAcks()
    main, delay = _Consumer("verloop.send"), _Consumer("verloop.send.DQ")
    holds.hold("verloop.send", "job-1")
    assert not holds.park(delay, _Message("job-1"))
    assert holds.park(main, _Message("job-1"))
    assert main.sent == []
    holds.release("verloop.send", "job-1")
    assert main.sent == ["job-1"]
    assert len(holds) == 0


def test_every_acknowledgement_parked_under_a_job_leaves_when_it_is_released() -> None:
    """Two deliveries of one job on one queue (a redelivery while the first ran): both are
    acknowledged once the job is released, not only the last one parked."""
    holds = HeldAcks()
    first, second = _Consumer("verloop.send"), _Consumer("verloop.send")
    holds.hold("verloop.send", "job-2")
    assert holds.park(first, _Message("job-2"))
    assert holds.park(second, _Message("job-2"))
    holds.release("verloop.send", "job-2")
    assert (first.sent, second.sent) == (["job-2"], ["job-2"])


def test_a_job_not_held_is_acknowledged_at_once_and_release_of_it_does_nothing() -> None:
    holds = HeldAcks()
    consumer = _Consumer("verloop.campaign")
    assert not holds.park(consumer, _Message("job-3"))
    holds.release("verloop.campaign", "job-3")
    assert consumer.sent == []
