"""Campaigns in Redis: definition, state, enqueue checkpoint and progress counters.

One hash per client's campaign, ``verloop:client-campaign:<client>:<campaign>`` (ids
length-prefixed, so two clients' campaigns never meet), written by the enqueuer (definition,
checkpoint), operators (``state``) and workers (outcome counters, a rate bucket); the sorted set
``verloop:client-campaigns`` lists them by creation time. A campaign id no ``campaign start``
made still gets counters, expiring ``unknown_ttl_s`` after its last job. A hash under the older
``verloop:campaign:<id>`` moves to its client's key when first looked up, state kept.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import redis

from worker.bounded import BoundedDict
from worker.campaigns.funnel import Funnel
from worker.connections.redis import RedisErrors, as_text
from worker.connections.redis_keys import join_parts, split_parts
from worker.errors import ConfigurationError
from worker.finish.outcome import CAMPAIGN_OUTCOMES

__all__ = ["OUTCOME_COUNTERS", "CampaignRef", "CampaignState", "CampaignStatus", "CampaignStore"]

_PREFIX: Final = "verloop:client-campaign:"
_INDEX: Final = "verloop:client-campaigns"
_LEGACY_PREFIX: Final = "verloop:campaign:"
_LEGACY_INDEX: Final = "verloop:campaigns"
_RATE_BUCKET_S: Final = 10
_RATE_WINDOW_BUCKETS: Final = 6  # the current rate is measured over the last minute
#: A worker process remembers at most this many campaigns' states (the least recently used go).
MAX_CACHED_CAMPAIGNS: Final = 10_000
#: Every Redis error of the store becomes RedisUnavailable("campaign store: <error>").
_REDIS: Final = RedisErrors("campaign store: {error}")

CampaignState = Literal["running", "paused", "cancelled"]
STATES: Final = ("running", "paused", "cancelled")
#: Final job outcomes counted per campaign (the outcome middleware's names).
OUTCOME_COUNTERS: Final = tuple(outcome.value for outcome in CAMPAIGN_OUTCOMES)

# KEYS: 1 the campaign's key, 2 its legacy key, 3 the index, 4 the legacy index. ARGV: 1 client
# id, 2 the index member, 3 the campaign id, 4... fields to read. Moves a legacy hash of this
# client to its key (if it has none), then reads the fields: one step, so no reader can see
# the campaign between the two.
_ADOPT_AND_READ: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HGET', KEYS[2], 'client_id') == ARGV[1] then
  redis.call('RENAME', KEYS[2], KEYS[1])
  local since = redis.call('ZSCORE', KEYS[4], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
  redis.call('ZADD', KEYS[3], since or redis.call('TIME')[1], ARGV[2])
end
if #ARGV < 4 then return {} end
return redis.call('HMGET', KEYS[1], unpack(ARGV, 4))
"""


@dataclass(frozen=True, slots=True)
class CampaignRef:
    """Which campaign: a client's campaign id."""

    client_id: str
    campaign_id: str

    @property
    def key(self) -> str:
        return _PREFIX + self.member

    @property
    def member(self) -> str:
        """The campaign as the index lists it."""
        return join_parts(self.client_id, self.campaign_id)

    def __str__(self) -> str:
        return f"{self.campaign_id!r} of client {self.client_id!r}"


@dataclass(frozen=True)
class CampaignStatus:
    """A campaign as ``campaign status`` shows it."""

    ref: CampaignRef
    state: str
    fields: Mapping[str, str]
    rate_per_s: float

    @property
    def campaign_id(self) -> str:
        return self.ref.campaign_id

    def count(self, name: str) -> int:
        try:
            return int(self.fields.get(name, 0))
        except ValueError:
            return 0

    @property
    def finished(self) -> int:
        return sum(self.count(name) for name in OUTCOME_COUNTERS)

    @property
    def funnel(self) -> Funnel:
        """Enqueued, sent, delivered, read and failed (by code), with their rates."""
        return Funnel.from_fields(self.fields)

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
    #: Made by ``campaign start`` (else a producer's own id: its counters expire).
    known: bool
    read_at: float = field(default_factory=time.monotonic)


class CampaignStore:
    """Reads and writes campaigns; every Redis error becomes
    :class:`~worker.errors.RedisUnavailable`.

    Args:
        state_cache_s: how long a worker process trusts a campaign state it read.
        unknown_ttl_s: how long the counters of a campaign no ``campaign start`` made live
            after its last job.
        max_cached: how many campaigns' states a process remembers at most.
    """

    def __init__(
        self,
        cache: redis.Redis,
        *,
        state_cache_s: float = 1.0,
        unknown_ttl_s: int = 30 * 86_400,
        max_cached: int = MAX_CACHED_CAMPAIGNS,
    ) -> None:
        self.cache = cache
        self.state_cache_s = state_cache_s
        self.unknown_ttl_s = unknown_ttl_s
        self._cached: BoundedDict[CampaignRef, _Cached] = BoundedDict(max_cached)
        self._adopt_and_read = cache.register_script(_ADOPT_AND_READ)

    # --- the enqueuer --------------------------------------------------------------------------
    def create(self, ref: CampaignRef, definition: Mapping[str, Any]) -> bool:
        """Create the campaign if it does not exist; return False if it did (a resume)."""
        values = {k: v for k, v in definition.items() if v is not None}
        values.update(id=ref.campaign_id, state="running", created_at=f"{time.time():.3f}")
        with _REDIS:
            self._adopt_legacy(ref)
            created = bool(self.cache.hsetnx(ref.key, "id", ref.campaign_id))
            if created:
                self.cache.hset(ref.key, mapping={k: str(v) for k, v in values.items()})
                self.cache.persist(ref.key)  # counted by workers before it was started
                self.cache.zadd(_INDEX, {ref.member: time.time()})
            return created

    def checkpoint(self, ref: CampaignRef, *, rows_done: int, enqueued: int, rejected: int) -> None:
        """Record how far the file has been read and confirmed by RabbitMQ."""
        self._hset(ref, rows_done=rows_done, enqueued=enqueued, rejected=rejected)

    def finish_enqueue(self, ref: CampaignRef, *, total_rows: int) -> None:
        self._hset(ref, total_rows=total_rows, enqueue_finished=f"{time.time():.3f}")

    # --- operators -----------------------------------------------------------------------------
    def find(self, campaign_id: str, client_id: str | None = None) -> CampaignRef:
        """The campaign an operator names: its id, and its client when two clients use the id.

        Raises:
            ConfigurationError: no such campaign, or several clients have one of that id.
        """
        if client_id is not None:
            return CampaignRef(client_id, campaign_id)
        with _REDIS:
            members = [as_text(m) for m in self.cache.zrange(_INDEX, 0, -1)]
            legacy = self.cache.hget(_LEGACY_PREFIX + campaign_id, "client_id")
        clients = {
            client for client, campaign in map(_parse_member, members) if campaign == campaign_id
        }
        if legacy is not None:
            clients.add(as_text(legacy))
        if not clients:
            raise ConfigurationError(
                f"no campaign {campaign_id!r} (see `verloop-worker campaign list`)"
            )
        if len(clients) > 1:
            raise ConfigurationError(
                f"clients {', '.join(sorted(clients))} each have a campaign {campaign_id!r}: "
                "say which with --client-id"
            )
        return CampaignRef(clients.pop(), campaign_id)

    def set_state(self, ref: CampaignRef, state: CampaignState) -> str:
        """Change the state; returns the previous one. A cancelled campaign stays cancelled."""
        if state not in STATES:
            raise ConfigurationError(f"unknown campaign state {state!r}")
        previous = self.get(ref).state
        if previous == "cancelled" and state != "cancelled":
            raise ConfigurationError(f"campaign {ref} is cancelled; it cannot {state}")
        self._hset(ref, state=state, state_changed_at=f"{time.time():.3f}")
        return previous

    def get(self, ref: CampaignRef) -> CampaignStatus:
        bucket = int(time.time()) // _RATE_BUCKET_S
        with _REDIS:
            self._adopt_legacy(ref)
            pipe = self.cache.pipeline(transaction=False)
            pipe.hgetall(ref.key)
            # Whole buckets only: the current one is still filling.
            for n in range(1, _RATE_WINDOW_BUCKETS + 1):
                pipe.get(f"{ref.key}:rate:{bucket - n}")
            fields, *buckets = pipe.execute()
        if not fields:
            raise ConfigurationError(f"no campaign {ref} (see `verloop-worker campaign list`)")
        fields = {as_text(k): as_text(v) for k, v in fields.items()}
        recent = sum(int(b) for b in buckets if b is not None)
        return CampaignStatus(
            ref,
            fields.get("state", "running"),
            fields,
            recent / (_RATE_BUCKET_S * _RATE_WINDOW_BUCKETS),
        )

    def list(self, limit: int = 100) -> list[CampaignStatus]:
        """The newest ``limit`` campaigns, newest first (those of earlier versions too)."""
        scored: Any
        legacy: Any
        with _REDIS:
            scored = self.cache.zrevrange(_INDEX, 0, limit - 1, withscores=True)
            legacy = self.cache.zrevrange(_LEGACY_INDEX, 0, limit - 1, withscores=True)
            owners = [self.cache.hget(_LEGACY_PREFIX + as_text(c), "client_id") for c, _ in legacy]
        refs: list[tuple[float, CampaignRef]] = [
            (float(score), CampaignRef(*_parse_member(as_text(member)))) for member, score in scored
        ]
        refs += [
            (float(score), CampaignRef(as_text(owner), as_text(campaign)))
            for (campaign, score), owner in zip(legacy, owners, strict=True)
            if owner is not None
        ]
        statuses = []
        for _, ref in sorted(refs, key=lambda item: -item[0])[:limit]:
            try:
                statuses.append(self.get(ref))
            except ConfigurationError:
                continue  # listed but its hash expired or was deleted
        return statuses

    # --- workers -------------------------------------------------------------------------------
    def gate(self, ref: CampaignRef) -> tuple[str, tuple[str, str, str] | None, float | None]:
        """(state, send window (start, end, tz) or None, start time or None) of a campaign,
        read at most once per ``state_cache_s`` per process. An unknown campaign runs: jobs
        published by a producer without ``campaign start`` are sent like any other."""
        cached = self._read(ref)
        return cached.state, cached.window, cached.start_at

    def _read(self, ref: CampaignRef) -> _Cached:
        now = time.monotonic()
        cached = self._cached.get(ref)
        if cached is not None and now - cached.read_at <= self.state_cache_s:
            return cached
        fields = ("id", "state", "window_start", "window_end", "timezone", "start_at")
        with _REDIS:
            found, state, start, end, tz, start_at = self._adopt_legacy(ref, fields)
        window = (as_text(start), as_text(end), as_text(tz or "UTC")) if start and end else None
        cached = _Cached(
            as_text(state or "running"),
            window,
            float(as_text(start_at)) if start_at else None,
            known=found is not None,
        )
        self._cached.put(ref, cached)
        return cached

    def count_outcome(self, ref: CampaignRef, outcome: str, extra: str | None = None) -> None:
        """Count one job's final outcome (and, for sends, the current rate)."""
        with _REDIS:
            pipe = self.cache.pipeline(transaction=False)
            for command in self.outcome_commands(ref, outcome, extra):
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            pipe.execute()

    def outcome_commands(
        self, ref: CampaignRef, outcome: str, extra: str | None = None
    ) -> tuple[tuple[Any, ...], ...]:
        """:meth:`count_outcome`'s Redis commands, for a caller that sends them with others (a
        send records its ledger entry and its campaign progress in one round trip)."""
        if outcome not in OUTCOME_COUNTERS:
            return ()
        key = ref.key
        bucket_key = f"{key}:rate:{int(time.time()) // _RATE_BUCKET_S}"
        by_kind = (("HINCRBY", key, f"{outcome}:{extra}", 1),) if extra else ()
        cached = self._cached.get(ref)  # read by this job's gate a moment ago
        # The counters of a campaign no `campaign start` made would otherwise stay forever.
        unknown = cached is not None and not cached.known
        expire = (("EXPIRE", key, self.unknown_ttl_s),) if unknown else ()
        return (
            ("HINCRBY", key, outcome, 1),
            *by_kind,
            *expire,
            ("INCR", bucket_key),
            ("EXPIRE", bucket_key, _RATE_BUCKET_S * (_RATE_WINDOW_BUCKETS + 2)),
        )

    def _adopt_legacy(self, ref: CampaignRef, read: tuple[str, ...] = ()) -> tuple[Any, ...]:
        """Move this client's campaign of an earlier version to its key (see the module
        docstring), and read the fields ``read`` of the campaign."""
        keys = [ref.key, _LEGACY_PREFIX + ref.campaign_id, _INDEX, _LEGACY_INDEX]
        args = [ref.client_id, ref.member, ref.campaign_id, *read]
        return tuple(self._adopt_and_read(keys=keys, args=args))

    def _hset(self, ref: CampaignRef, **values: Any) -> None:
        with _REDIS:
            self.cache.hset(ref.key, mapping={k: str(v) for k, v in values.items()})


def _parse_member(member: str) -> tuple[str, str]:
    client_id, campaign_id = split_parts(member)
    return client_id, campaign_id
