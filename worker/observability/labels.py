"""The label values of the worker's metrics: those known in advance, and the cap on those a
producer chooses (client, number and campaign ids)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Final

from worker.finish.outcome import MANAGE_OUTCOMES, SEND_OUTCOMES, Outcome
from worker.jobs.models import lane_of
from worker.jobs.wire import UNDECODABLE_ACTOR

__all__ = [
    "AFTER_SEND_STEPS",
    "DEAD_LETTER_KINDS",
    "DEFERRAL_KINDS",
    "LANES",
    "OTHER_LABEL_VALUE",
    "Capped",
    "actor_lanes",
]

#: The writes after an accepted send (see ``worker.finish.finish``).
AFTER_SEND_STEPS: Final = ("ledger", "campaign", "link", "event")

#: The label value that stands for every client, number or campaign beyond the cap.
OTHER_LABEL_VALUE: Final = "_other"

# --- label values known in advance (their series exist at zero from the start) ---------------
LANES = ("transactional", "campaign")
#: Every ``Deferred.kind`` the worker raises (tests/unit/test_metrics.py keeps this complete).
DEFERRAL_KINDS = (
    "rate_limit",
    "recipient_cooling",
    "number_paused",
    "campaign_paused",
    "recipient_capped",
    "campaign_scheduled",
    "scheduled",
    "send_window",
    "in_flight",
    "limiter_unavailable",
    "redis_unavailable",
    "status_early",
    "other",
)
#: (outcome, error class) of the dead letters the worker's own errors make.
DEAD_LETTER_KINDS = (
    ("invalid", "InvalidJob"),
    ("failed", "PermanentFailure"),
    ("failed", "TokenInvalid"),
    ("gave_up", "TransientFailure"),
)


def actor_lanes(actor_queues: Mapping[str, str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(actor, lane, outcomes) of every job the worker can finish, given each actor's queue."""
    combos: list[tuple[str, str, tuple[str, ...]]] = []
    for actor, queue in actor_queues.items():
        send = actor == "send_message"
        lanes = LANES if send else (lane_of(queue),)
        # rejected: a retry or dead letter RabbitMQ did not confirm (see worker.finish.middleware).
        outcomes = tuple(o.value for o in (SEND_OUTCOMES if send else MANAGE_OUTCOMES))
        combos.extend((actor, lane, outcomes) for lane in lanes)
    undecodable = (Outcome.DEAD_LETTERED.value, Outcome.REJECTED.value)
    combos.extend((UNDECODABLE_ACTOR, lane, undecodable) for lane in LANES)
    return combos


class Capped:
    """Admits at most ``limit`` distinct values of one label; later ones become ``_other``."""

    def __init__(self, limit: int) -> None:
        self._admitted: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def __call__(self, value: str) -> tuple[str, bool]:
        """The label value to use, and whether ``value`` was admitted just now."""
        if value in self._admitted:
            return value, False
        with self._lock:
            if value in self._admitted:
                return value, False
            if len(self._admitted) >= self._limit:
                return OTHER_LABEL_VALUE, False
            self._admitted.add(value)
            return value, True
