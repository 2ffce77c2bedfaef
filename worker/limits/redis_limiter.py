"""The fleet-wide limiter: the algorithm of :mod:`worker.limits.pacing` in one Lua script.

One round trip per send decides and reserves atomically, for every process on every machine.
Time is Redis's own clock (``TIME``), so workers on hosts with skewed clocks still agree.
Times are kept in microseconds; Lua numbers are doubles, exact far beyond 2**50 µs.

If Redis does not answer, :class:`LimiterUnavailable` is raised and the send waits: the worker
never sends without the limiter (fail closed).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import redis

from ..errors import RedisUnavailable
from .pacing import MIN_PENALTY_FACTOR, Decision, Lane, LimitPolicy, Verdict

__all__ = ["LimiterUnavailable", "RedisLimiter"]

_PREFIX = "verloop:rl"

# KEYS: 1 number tat, 2 account tat, 3 pair hold, 4 number pause, 5 quality pause, 6 penalty
# ARGV: 1 interval µs, 2 tolerance µs, 3 campaign (1/0), 4 lane's max wait µs, 5 account µs
#       (0 = none), 6 key ttl ms, 7 slots wanted (a lease; 1 = just this send)
# Returns {verdict, wait µs, slots granted, interval µs}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local holds = {{KEYS[3], 2}, {KEYS[4], 3}}
if ARGV[3] == '1' then holds[3] = {KEYS[5], 4} end
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


#: A lease covers at most this long of a number's sends, and this many slots.
LEASE_WINDOW_S = 0.02
LEASE_MAX_SLOTS = 16


class RedisLimiter:
    """Implements :class:`worker.limits.pacing.RateLimiter` on Redis.

    **Leases.** At high rates one Redis round trip per send would cost more CPU than the send
    itself, so a transactional send on a fast number takes a short *lease*: the next few
    consecutive slots (those within ``LEASE_WINDOW_S``, at most ``LEASE_MAX_SLOTS``), reserved
    in one call; this process's next sends to that number use them in order, each at its own
    slot time. A slot not used within ``LEASE_WINDOW_S`` of its time is dropped, not used late,
    so a number's sends stay on its schedule, late by at most the lease window. A number at 80/s or
    below leases one slot, as before; campaign sends and an account-wide limit never lease.
    The price: a hold set by another process (131056, a pause) reaches a lease's sends at most
    ``LEASE_WINDOW_S`` late.
    """

    def __init__(self, client: redis.Redis, policy: LimitPolicy) -> None:
        self.policy = policy
        self._client = client
        self._leases: dict[str, deque[float]] = {}
        self._leases_lock = threading.Lock()
        self._acquire = client.register_script(_ACQUIRE)
        self._hold = client.register_script(_HOLD)
        self._penalize = client.register_script(_PENALIZE)

    def acquire(self, phone_id: str, recipient: str, lane: Lane) -> Decision:
        lease = lane == "transactional" and not self.policy.account_rate
        if lease:
            slot = self._leased_slot(phone_id)
            if slot is not None:
                return Decision(Verdict.GO, max(0.0, slot - time.monotonic()))
        rate = self.policy.rate_for(phone_id)
        interval_us = 1_000_000 / rate
        account_us = 1_000_000 / self.policy.account_rate if self.policy.account_rate else 0
        base = f"{_PREFIX}:{{{phone_id}}}"
        keys = [
            f"{base}:tat",
            f"{_PREFIX}:account:tat",
            f"{base}:pair:{recipient}",
            f"{base}:pause",
            f"{base}:quality-pause",
            f"{base}:penalty",
        ]
        args = [
            interval_us,
            self.policy.tolerance_slots(phone_id, lane) * interval_us,
            1 if lane == "campaign" else 0,
            self.policy.max_wait_for(lane) * 1_000_000,
            account_us,
            # Long enough to outlive any reservation, short enough to clean up idle numbers.
            int(max(60_000, 2_000 * self.policy.max_wait_s + 10 * interval_us / 1000)),
            max(1, min(LEASE_MAX_SLOTS, int(rate * LEASE_WINDOW_S))) if lease else 1,
        ]
        asked_at = time.monotonic()
        code, wait_us, slots, granted_interval_us = self._run(self._acquire, keys, args)
        wait_s = int(wait_us) / 1_000_000
        if int(slots) > 1:
            first = asked_at + wait_s
            step = int(granted_interval_us) / 1_000_000
            with self._leases_lock:
                self._leases[phone_id] = deque(first + i * step for i in range(1, int(slots)))
        return Decision(Verdict(int(code)), wait_s)

    def _leased_slot(self, phone_id: str) -> float | None:
        """This process's next leased slot for the number, if it has one still usable."""
        with self._leases_lock:
            slots = self._leases.get(phone_id)
            if not slots:
                return None
            # A slot not used within the lease window is dropped rather than used late (a late
            # send would crowd the slots after it).
            stale = time.monotonic() - LEASE_WINDOW_S
            while slots and slots[0] < stale:
                slots.popleft()
            return slots.popleft() if slots else None

    def penalize(self, phone_id: str, factor: float, seconds: float) -> None:
        self._run(
            self._penalize,
            [f"{_PREFIX}:{{{phone_id}}}:penalty"],
            [factor, seconds, MIN_PENALTY_FACTOR],
        )

    def cool_recipient(self, phone_id: str, recipient: str, seconds: float) -> None:
        self._run(self._hold, [f"{_PREFIX}:{{{phone_id}}}:pair:{recipient}"], [seconds])

    def pause(self, phone_id: str, seconds: float, *, campaign_only: bool) -> None:
        kind = "quality-pause" if campaign_only else "pause"
        self._run(self._hold, [f"{_PREFIX}:{{{phone_id}}}:{kind}"], [seconds])

    def close(self) -> None:
        """The Redis client belongs to the worker's services; nothing to close here."""

    @staticmethod
    def _run(script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise LimiterUnavailable(
                f"rate limiter unavailable (Redis: {type(exc).__name__})"
            ) from None
