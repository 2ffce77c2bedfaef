"""Campaigns in Redis: definition, state, enqueue checkpoint and progress counters.

One hash per campaign, ``verloop:campaign:<id>``, written by three parties:

* ``campaign start`` (the enqueuer): the definition, then ``rows_done``/``enqueued``/``rejected``
  after each confirmed batch (the resume point), and ``enqueue_finished`` at the end;
* operators: ``state`` (``running`` → ``paused`` ↔ ``running`` → ``cancelled``);
* workers: one counter per final outcome (``sent``, ``dead_lettered``, ``suppressed``,
  ``cancelled``), plus a 10-second bucket of sends for the current rate.

A sorted set ``verloop:campaigns`` lists every campaign by creation time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import redis

from ..errors import ConfigurationError, RedisUnavailable
from ..redis_text import as_text

__all__ = ["OUTCOME_COUNTERS", "CampaignState", "CampaignStatus", "CampaignStore"]

_PREFIX: Final = "verloop:campaign:"
_INDEX: Final = "verloop:campaigns"
_RATE_BUCKET_S: Final = 10
_RATE_WINDOW_BUCKETS: Final = 6  # the current rate is measured over the last minute

CampaignState = Literal["running", "paused", "cancelled"]
STATES: Final = ("running", "paused", "cancelled")
#: Final job outcomes counted per campaign (the outcome middleware's names).
OUTCOME_COUNTERS: Final = ("sent", "dead_lettered", "suppressed", "cancelled")


@dataclass(frozen=True)
class CampaignStatus:
    """A campaign as ``campaign status`` shows it."""

    campaign_id: str
    state: str
    fields: Mapping[str, str]
    rate_per_s: float

    def count(self, name: str) -> int:
        try:
            return int(self.fields.get(name, 0))
        except ValueError:
            return 0

    @property
    def finished(self) -> int:
        return sum(self.count(name) for name in OUTCOME_COUNTERS)

    @property
    def eta_s(self) -> float | None:
        """Seconds until every enqueued job has an outcome, at the current rate."""
        remaining = self.count("enqueued") - self.finished
        if remaining <= 0:
            return 0.0
        if self.rate_per_s <= 0 or self.state != "running":
            return None
        return remaining / self.rate_per_s


@dataclass
class _Cached:
    state: str
    window: tuple[str, str, str] | None
    start_at: float | None
    read_at: float = field(default_factory=time.monotonic)


class CampaignStore:
    """Reads and writes campaigns; every Redis error becomes :class:`RedisUnavailable`."""

    def __init__(self, cache: redis.Redis, *, state_cache_s: float = 1.0) -> None:
        self.cache = cache
        self.state_cache_s = state_cache_s
        self._cached: dict[str, _Cached] = {}

    # --- the enqueuer --------------------------------------------------------------------------
    def create(self, campaign_id: str, definition: Mapping[str, Any]) -> bool:
        """Create the campaign if it does not exist; return False if it did (a resume)."""
        key = _PREFIX + campaign_id
        values = {k: v for k, v in definition.items() if v is not None}
        values.update(id=campaign_id, state="running", created_at=f"{time.time():.3f}")
        try:
            created = bool(self.cache.hsetnx(key, "id", campaign_id))
            if created:
                self.cache.hset(key, mapping={k: str(v) for k, v in values.items()})
                self.cache.zadd(_INDEX, {campaign_id: time.time()})
            return created
        except redis.RedisError as exc:
            raise RedisUnavailable(f"campaign store: {type(exc).__name__}") from None

    def checkpoint(self, campaign_id: str, *, rows_done: int, enqueued: int, rejected: int) -> None:
        """Record how far the file has been read and confirmed by RabbitMQ."""
        self._hset(campaign_id, rows_done=rows_done, enqueued=enqueued, rejected=rejected)

    def finish_enqueue(self, campaign_id: str, *, total_rows: int) -> None:
        self._hset(campaign_id, total_rows=total_rows, enqueue_finished=f"{time.time():.3f}")

    # --- operators -----------------------------------------------------------------------------
    def set_state(self, campaign_id: str, state: CampaignState) -> str:
        """Change the state; returns the previous one. A cancelled campaign stays cancelled."""
        if state not in STATES:
            raise ConfigurationError(f"unknown campaign state {state!r}")
        previous = self.get(campaign_id).state
        if previous == "cancelled" and state != "cancelled":
            raise ConfigurationError(f"campaign {campaign_id!r} is cancelled; it cannot {state}")
        self._hset(campaign_id, state=state, state_changed_at=f"{time.time():.3f}")
        return previous

    def get(self, campaign_id: str) -> CampaignStatus:
        key = _PREFIX + campaign_id
        bucket = int(time.time()) // _RATE_BUCKET_S
        try:
            pipe = self.cache.pipeline(transaction=False)
            pipe.hgetall(key)
            # Whole buckets only: the current one is still filling.
            for n in range(1, _RATE_WINDOW_BUCKETS + 1):
                pipe.get(f"{key}:rate:{bucket - n}")
            fields, *buckets = pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"campaign store: {type(exc).__name__}") from None
        if not fields:
            raise ConfigurationError(
                f"no campaign {campaign_id!r} (see `verloop-worker campaign list`)"
            )
        fields = {as_text(k): as_text(v) for k, v in fields.items()}
        recent = sum(int(b) for b in buckets if b is not None)
        return CampaignStatus(
            campaign_id,
            fields.get("state", "running"),
            fields,
            recent / (_RATE_BUCKET_S * _RATE_WINDOW_BUCKETS),
        )

    def list(self, limit: int = 100) -> list[CampaignStatus]:
        """The newest ``limit`` campaigns, newest first."""
        try:
            ids = self.cache.zrevrange(_INDEX, 0, limit - 1)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"campaign store: {type(exc).__name__}") from None
        statuses = []
        for campaign_id in ids:
            try:
                statuses.append(self.get(as_text(campaign_id)))
            except ConfigurationError:
                continue  # listed but its hash expired or was deleted
        return statuses

    # --- workers -------------------------------------------------------------------------------
    def gate(self, campaign_id: str) -> tuple[str, tuple[str, str, str] | None, float | None]:
        """(state, send window (start, end, tz) or None, start time or None) of a campaign,
        read at most once per ``state_cache_s`` per process. An unknown campaign runs: jobs
        published by a producer without ``campaign start`` are sent like any other."""
        now = time.monotonic()
        cached = self._cached.get(campaign_id)
        if cached is None or now - cached.read_at > self.state_cache_s:
            try:
                state, start, end, tz, start_at = self.cache.hmget(
                    _PREFIX + campaign_id,
                    ["state", "window_start", "window_end", "timezone", "start_at"],
                )
            except redis.RedisError as exc:
                raise RedisUnavailable(f"campaign store: {type(exc).__name__}") from None
            window = (as_text(start), as_text(end), as_text(tz or "UTC")) if start and end else None
            cached = _Cached(
                as_text(state or "running"), window, float(as_text(start_at)) if start_at else None
            )
            self._cached[campaign_id] = cached
        return cached.state, cached.window, cached.start_at

    def count_outcome(self, campaign_id: str, outcome: str, extra: str | None = None) -> None:
        """Count one job's final outcome (and, for sends, the current rate)."""
        try:
            pipe = self.cache.pipeline(transaction=False)
            for command in self.outcome_commands(campaign_id, outcome, extra):
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"campaign store: {type(exc).__name__}") from None

    @staticmethod
    def outcome_commands(
        campaign_id: str, outcome: str, extra: str | None = None
    ) -> tuple[tuple[Any, ...], ...]:
        """:meth:`count_outcome`'s Redis commands, for a caller that sends them with others (a
        send records its ledger entry and its campaign progress in one round trip)."""
        if outcome not in OUTCOME_COUNTERS:
            return ()
        key = _PREFIX + campaign_id
        bucket_key = f"{key}:rate:{int(time.time()) // _RATE_BUCKET_S}"
        by_kind = (("HINCRBY", key, f"{outcome}:{extra}", 1),) if extra else ()
        return (
            ("HINCRBY", key, outcome, 1),
            *by_kind,
            ("INCR", bucket_key),
            ("EXPIRE", bucket_key, _RATE_BUCKET_S * (_RATE_WINDOW_BUCKETS + 2)),
        )

    def _hset(self, campaign_id: str, **values: Any) -> None:
        try:
            self.cache.hset(_PREFIX + campaign_id, mapping={k: str(v) for k, v in values.items()})
        except redis.RedisError as exc:
            raise RedisUnavailable(f"campaign store: {type(exc).__name__}") from None
