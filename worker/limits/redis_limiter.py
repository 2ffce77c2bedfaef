"""The fleet-wide limiter: the algorithm of :mod:`worker.limits.pacing` in one Lua script.

One round trip decides and reserves atomically for the whole fleet, on Redis's clock (``TIME``)
so skewed hosts agree; times are integer microseconds (exact in Lua's doubles). If Redis does
not answer, :class:`LimiterUnavailable` is raised and the send waits: never a send without the
limiter (fail closed).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import redis

from worker.connections.redis import RedisErrors
from worker.connections.redis_direct import ThreadConnections
from worker.errors import RedisUnavailable
from worker.limits.pacing import MIN_PENALTY_FACTOR, Decision, Lane, LimitPolicy, Verdict

__all__ = ["LimiterUnavailable", "RedisLimiter", "lease_holds"]

_PREFIX = "verloop:rl"

# KEYS: 1 number tat, 2 account tat, 3 pair hold, 4 number pause, 5 quality pause, 6 penalty,
#       7 the recipient's marketing hold
# ARGV: 1 interval µs, 2 tolerance µs, 3 campaign (1/0), 4 lane's max wait µs, 5 account µs
#       (0 = none), 6 key ttl ms, 7 slots wanted (a lease; 1 = just this send)
# Returns {verdict, wait µs, slots granted, interval µs}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local holds = {{KEYS[3], 2}, {KEYS[4], 3}}
if ARGV[3] == '1' then
  holds[3] = {KEYS[5], 4}
  holds[4] = {KEYS[7], 5}
end
for _, hold in ipairs(holds) do
  local untl = tonumber(redis.call('GET', hold[1]) or '0')
  if untl > now then return {hold[2], string.format('%.0f', untl - now), 0, 0} end
end
local factor = tonumber(redis.call('GET', KEYS[6]) or '1')
local interval = tonumber(ARGV[1]) / factor
local tolerance = tonumber(ARGV[2]) / factor
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local wait = math.max(0, tat - tolerance - now)
local account_interval = tonumber(ARGV[5])
local account_tat = 0
if account_interval > 0 then
  account_tat = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now)
  wait = math.max(wait, account_tat - now)
end
if wait > tonumber(ARGV[4]) then
  return {1, string.format('%.0f', wait), 0, 0}
end
-- A lease: further consecutive slots, each still within the maximum wait.
local slots = math.min(tonumber(ARGV[7]), math.floor((tonumber(ARGV[4]) - wait) / interval) + 1)
if slots < 1 then slots = 1 end
-- The send happens at now + wait: each bucket advances from then, not from now, so a send
-- held back by one bucket does not leave the other's slots bunched up.
local sent_at = now + wait
local next_tat = math.max(tat, sent_at) + slots * interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', ARGV[6])
if account_interval > 0 then
  local next_account = math.max(account_tat, sent_at) + account_interval
  redis.call('SET', KEYS[2], string.format('%.0f', next_account), 'PX', ARGV[6])
end
return {0, string.format('%.0f', wait), slots, string.format('%.0f', interval)}
"""

# KEYS: 1 hold key. ARGV: 1 seconds. Holds only ever lengthen.
_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + tonumber(ARGV[1]) * 1000000
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if untl > current then
  redis.call('SET', KEYS[1], string.format('%.0f', untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000))
end
return 1
"""

# KEYS: 1 penalty key. ARGV: 1 factor, 2 seconds, 3 floor. Penalties stack while they last.
_PENALIZE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '1')
local factor = math.max(tonumber(ARGV[3]), current * tonumber(ARGV[1]))
redis.call('SET', KEYS[1], tostring(factor), 'PX', math.ceil(tonumber(ARGV[2]) * 1000))
return tostring(factor)
"""


class LimiterUnavailable(RedisUnavailable):
    """Redis did not answer the limiter: no send may go out until it does."""


#: Every Redis error of the limiter becomes LimiterUnavailable.
_REDIS = RedisErrors("rate limiter unavailable (Redis: {error})", LimiterUnavailable)


#: A lease covers at most this long of a number's sends (at its rate, and at this process's
#: pace), and at most this many slots.
LEASE_WINDOW_S = 0.02
LEASE_MAX_SLOTS = 16
#: A leased slot may be used at most this late; a later one is dropped (see RedisLimiter).
LEASE_LATE_S = 0.1
#: A process's pace of asks for a number is counted over this long: many lease windows, so
#: that a burst of asks (threads answered at the same moment) does not read as a fast pace.
PACE_WINDOW_S = 0.25
#: A thread waits at most this long for another's lease fetch (a Redis call, bounded by the
#: socket timeout) before asking Redis itself.
_FETCH_WAIT_S = 3.0


class _Pace:
    """How many times this process asked for one number's slots lately (the last
    ``PACE_WINDOW_S``). Sizes that number's leases; used under the limiter's lease lock."""

    __slots__ = ("asks",)

    def __init__(self) -> None:
        self.asks: deque[float] = deque()

    def ask(self, now: float) -> None:
        asks = self.asks
        asks.append(now)
        since = now - PACE_WINDOW_S
        while asks[0] < since:
            asks.popleft()

    def slots_within(self, window_s: float) -> int:
        """How many asks this process will make within ``window_s`` at its recent pace."""
        return int(len(self.asks) * window_s / PACE_WINDOW_S)


class RedisLimiter:
    """Implements :class:`worker.limits.pacing.RateLimiter` on Redis.

    **Leases.** On a fast number a transactional send takes a short *lease*: the next few
    consecutive slots in one call (saving a Redis round trip per send), used in order by this
    process's next sends to that number. A slot nobody uses is lost to the number, so a lease is
    sized to this process's own pace of asks (over ``PACE_WINDOW_S``) times ``LEASE_WINDOW_S``,
    capped by the rate and ``LEASE_MAX_SLOTS`` (one slot at 80/s or below); one thread fetches
    a number's lease while the others wait for it. A leased slot may be used up to
    ``LEASE_LATE_S`` late, so a window may see up to ``rate * LEASE_LATE_S`` more sends than the
    bucket alone, and another process's hold reaches leased sends that late. Campaign sends and
    an account-wide limit never lease.
    """

    def __init__(
        self,
        client: redis.Redis,
        policy: LimitPolicy,
        connections: ThreadConnections | None = None,
    ) -> None:
        self.policy = policy
        self._client = client
        self._leases: dict[str, deque[float]] = {}
        self._paces: dict[str, _Pace] = {}
        #: Numbers whose next lease a thread of this process is fetching right now.
        self._fetching: set[str] = set()
        self._leases_cond = threading.Condition()
        self._acquire = client.register_script(_ACQUIRE)
        #: A send's (or a lease's) slot is asked for on the thread's own connection.
        self._direct = connections or ThreadConnections(client)
        self._hold = client.register_script(_HOLD)
        self._penalize = client.register_script(_PENALIZE)

    def acquire(self, phone_id: str, recipient: str, lane: Lane) -> Decision:
        rate = self.policy.rate_for(phone_id)
        if lane != "transactional" or self.policy.account_rate:
            return self._ask(phone_id, recipient, lane, rate, 1)
        slot, lease_slots = self._leased_slot(phone_id, rate)
        if slot is not None:
            # Taken without a round trip, so without looking at this recipient's and this
            # number's holds: the send looks at them in its next one.
            holds = lease_holds(phone_id, recipient, lane)
            return Decision(Verdict.GO, max(0.0, slot - time.monotonic()), holds)
        # This thread is the one fetching the number's next lease (see _leased_slot).
        leased: list[float] = []
        try:
            return self._ask(phone_id, recipient, lane, rate, lease_slots, leased)
        finally:
            with self._leases_cond:
                self._fetching.discard(phone_id)
                if leased:
                    self._leases.setdefault(phone_id, deque()).extend(leased)
                self._leases_cond.notify_all()

    def _ask(
        self,
        phone_id: str,
        recipient: str,
        lane: Lane,
        rate: float,
        lease_slots: int,
        leased: list[float] | None = None,
    ) -> Decision:
        """One round trip: this send's decision; slots leased beyond it go to ``leased``."""
        interval_us = 1_000_000 / rate
        account_us = 1_000_000 / self.policy.account_rate if self.policy.account_rate else 0
        base = _number_key(phone_id)
        keys = [
            f"{base}:tat",
            f"{_PREFIX}:account:tat",
            _pair_key(phone_id, recipient),
            f"{base}:pause",
            f"{base}:quality-pause",
            f"{base}:penalty",
            _marketing_key(recipient),
        ]
        args = [
            interval_us,
            self.policy.tolerance_slots(phone_id, lane) * interval_us,
            1 if lane == "campaign" else 0,
            self.policy.max_wait_for(lane) * 1_000_000,
            account_us,
            # Long enough to outlive any reservation, short enough to clean up idle numbers.
            int(max(60_000, 2_000 * self.policy.max_wait_s + 10 * interval_us / 1000)),
            lease_slots,
        ]
        asked_at = time.monotonic()
        with _REDIS:
            code, wait_us, slots, granted_interval_us = self._direct.evalsha(
                self._acquire, keys, args
            )
        wait_s = int(wait_us) / 1_000_000
        if leased is not None and int(slots) > 1:
            first = asked_at + wait_s
            step = int(granted_interval_us) / 1_000_000
            leased.extend(first + i * step for i in range(1, int(slots)))
        return Decision(Verdict(int(code)), wait_s)

    def _leased_slot(self, phone_id: str, rate: float) -> tuple[float | None, int]:
        """This process's next leased slot for the number, if it has one still usable.

        If it has none, the caller fetches the next lease and is told how many slots to ask
        for; while one thread fetches a number's lease the others wait for it rather than
        fetch their own (concurrent fetches each leased a full lease, most of it dropped).
        """
        with self._leases_cond:
            now = time.monotonic()
            pace = self._paces.get(phone_id)
            if pace is None:
                pace = self._paces[phone_id] = _Pace()
            pace.ask(now)
            deadline = now + _FETCH_WAIT_S
            while True:
                slots = self._leases.get(phone_id)
                if slots:
                    # A slot more than LEASE_LATE_S late is dropped rather than used (a late
                    # send would crowd the slots after it).
                    stale = now - LEASE_LATE_S
                    while slots and slots[0] < stale:
                        slots.popleft()
                    if slots:
                        return slots.popleft(), 1
                if phone_id not in self._fetching or now >= deadline:
                    self._fetching.add(phone_id)
                    cap = min(LEASE_MAX_SLOTS, int(rate * LEASE_WINDOW_S))
                    return None, max(1, min(cap, pace.slots_within(LEASE_WINDOW_S)))
                self._leases_cond.wait(deadline - now)
                now = time.monotonic()

    def penalize(self, phone_id: str, factor: float, seconds: float) -> None:
        self._run(
            self._penalize,
            [f"{_number_key(phone_id)}:penalty"],
            [factor, seconds, MIN_PENALTY_FACTOR],
        )

    def cool_recipient(self, phone_id: str, recipient: str, seconds: float) -> None:
        self._run(self._hold, [_pair_key(phone_id, recipient)], [seconds])

    def pause(self, phone_id: str, seconds: float, *, campaign_only: bool) -> None:
        kind = "quality-pause" if campaign_only else "pause"
        self._run(self._hold, [f"{_number_key(phone_id)}:{kind}"], [seconds])

    def hold_marketing(self, recipient: str, seconds: float) -> None:
        self._run(self._hold, [_marketing_key(recipient)], [seconds])

    def close(self) -> None:
        """Close the threads' connections; the Redis client belongs to the worker's services."""
        self._direct.close()

    @staticmethod
    @_REDIS
    def _run(script: Any, keys: list[str], args: list[Any]) -> Any:
        return script(keys=keys, args=args)


def _number_key(phone_id: str) -> str:
    return f"{_PREFIX}:{{{phone_id}}}"


def _pair_key(phone_id: str, recipient: str) -> str:
    return f"{_number_key(phone_id)}:pair:{recipient}"


def _marketing_key(recipient: str) -> str:
    """The recipient's marketing hold, for every number: like a pair key, the recipient ends
    the key after a prefix no other key has, so no recipient string names another key."""
    return f"{_PREFIX}:marketing-hold:{recipient}"


def lease_holds(phone_id: str, recipient: str, lane: Lane) -> tuple[str, ...]:
    """The hold keys a send of ``lane`` must respect, for a slot taken from a lease (which
    skipped them; the send's ledger claim checks them): the recipient's pair hold and the
    number's pause, and for campaign sends the quality pause and the recipient's marketing hold.
    Today only transactional sends lease, so a campaign send's own ask checks those two."""
    base = _number_key(phone_id)
    holds = (_pair_key(phone_id, recipient), f"{base}:pause")
    if lane != "campaign":
        return holds
    return (*holds, f"{base}:quality-pause", _marketing_key(recipient))
