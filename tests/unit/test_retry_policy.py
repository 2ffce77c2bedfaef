"""Unit tests for worker.finish.middleware.RetryPolicy: backoff with jitter, bounded per delay."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from worker.finish.middleware import RetryPolicy
from worker.settings import MAX_SINGLE_DELAY_S

POLICY = RetryPolicy(max_retries=8, min_backoff_s=2.0, max_backoff_s=600.0)
SAMPLES = 200


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Jitter is random: seed it so every run draws the same delays."""
    random.seed(20240601)


def delays(retries_so_far: int, retry_after: float | None = None) -> list[float]:
    """SAMPLES delays for the same attempt."""
    return [POLICY.delay_s(retries_so_far, retry_after) for _ in range(SAMPLES)]


@pytest.mark.parametrize("retries_so_far", range(10))
def test_a_backoff_without_retry_after_stays_within_its_jitter_window(retries_so_far: int) -> None:
    """Attempt n waits between half and all of min(max, min * 2**n)."""
    ceiling = min(POLICY.max_backoff_s, POLICY.min_backoff_s * 2**retries_so_far)
    for delay in delays(retries_so_far):
        assert ceiling / 2 <= delay <= ceiling


def test_the_backoff_grows_roughly_exponentially() -> None:
    """The mean delay roughly doubles with each retry until the ceiling."""
    means = [statistics.mean(delays(n)) for n in range(7)]
    for earlier, later in itertools.pairwise(means):
        assert 1.6 < later / earlier < 2.4
    assert means[0] < 2.0 < means[1]


@pytest.mark.parametrize("retries_so_far", [9, 10, 30, 31, 100, 10_000])
def test_the_backoff_never_exceeds_max_backoff(retries_so_far: int) -> None:
    """Once the doubling passes max_backoff_s, every delay is within [max/2, max]."""
    values = delays(retries_so_far)
    assert max(values) <= POLICY.max_backoff_s
    assert min(values) >= POLICY.max_backoff_s / 2


def test_a_retry_after_of_7_seconds_waits_between_7_and_8_seconds() -> None:
    """Verloop's Retry-After is honoured, with under a second of spread."""
    values = delays(0, retry_after=7.0)
    assert all(7.0 <= delay <= 8.0 for delay in values)
    assert len(set(values)) > 1


def test_a_retry_after_takes_precedence_over_the_backoff() -> None:
    """A short Retry-After is used even late in the retries, when the backoff would be long."""
    assert all(delay <= 3.5 for delay in delays(7, retry_after=3.0))


def test_a_huge_retry_after_is_capped_below_rabbitmqs_consumer_timeout() -> None:
    """A 10-hour Retry-After is cut to MAX_SINGLE_DELAY_S (25 min, under RabbitMQ's 30)."""
    values = delays(0, retry_after=10 * 3600.0)
    assert max(values) == MAX_SINGLE_DELAY_S
    assert MAX_SINGLE_DELAY_S < 30 * 60


def test_a_policy_with_a_large_max_backoff_is_still_capped() -> None:
    """Even a policy built with a longer max_backoff never waits past MAX_SINGLE_DELAY_S."""
    policy = RetryPolicy(max_retries=8, min_backoff_s=600.0, max_backoff_s=86_400.0)
    assert max(policy.delay_s(5, None) for _ in range(50)) <= MAX_SINGLE_DELAY_S


def test_a_zero_retry_after_waits_almost_not_at_all() -> None:
    """Retry-After: 0 means come back at once, with at most a tenth of a second of spread."""
    assert all(0.0 <= delay <= 0.1 for delay in delays(3, retry_after=0.0))


def test_a_nan_retry_after_still_gives_a_finite_delay() -> None:
    """Whatever retry_after holds, delay_s returns a finite number of seconds."""
    assert math.isfinite(POLICY.delay_s(0, float("nan")))
