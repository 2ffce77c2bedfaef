"""The fleet-wide limiter: the algorithm of :mod:`worker.limits.pacing` in one Lua script.

One round trip per send decides and reserves atomically, for every process on every machine.
Time is Redis's own clock (``TIME``), so workers on hosts with skewed clocks still agree.
Times are kept in microseconds; Lua numbers are doubles, exact far beyond 2**50 µs.

If Redis does not answer, :class:`LimiterUnavailable` is raised and the send waits: the worker
never sends without the limiter (fail closed).
"""

from __future__ import annotations

from typing import Any

import redis

from ..errors import RedisUnavailable
from .pacing import MIN_PENALTY_FACTOR, Decision, Lane, LimitPolicy, Verdict

__all__ = ["LimiterUnavailable", "RedisLimiter"]

_PREFIX = "verloop:rl"

# KEYS: 1 number tat, 2 account tat, 3 pair hold, 4 number pause, 5 quality pause, 6 penalty
# ARGV: 1 interval µs, 2 tolerance µs, 3 campaign (1/0), 4 max wait µs, 5 account interval µs
#       (0 = none), 6 key ttl ms
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local holds = {{KEYS[3], 2}, {KEYS[4], 3}}
if ARGV[3] == '1' then holds[3] = {KEYS[5], 4} end
for _, hold in ipairs(holds) do
  local untl = tonumber(redis.call('GET', hold[1]) or '0')
  if untl > now then return {hold[2], string.format('%.0f', untl - now)} end
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
if wait > 0 and (ARGV[3] == '1' or wait > tonumber(ARGV[4])) then
  return {1, string.format('%.0f', wait)}
end
-- The send happens at now + wait: each bucket advances from then, not from now, so a send
-- held back by one bucket does not leave the other's slots bunched up.
local sent_at = now + wait
redis.call('SET', KEYS[1], string.format('%.0f', math.max(tat, sent_at) + interval), 'PX', ARGV[6])
if account_interval > 0 then
  local next_account = math.max(account_tat, sent_at) + account_interval
  redis.call('SET', KEYS[2], string.format('%.0f', next_account), 'PX', ARGV[6])
end
return {0, string.format('%.0f', wait)}
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


class RedisLimiter:
    """Implements :class:`worker.limits.pacing.RateLimiter` on Redis."""

    def __init__(self, client: redis.Redis, policy: LimitPolicy) -> None:
        self.policy = policy
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._hold = client.register_script(_HOLD)
        self._penalize = client.register_script(_PENALIZE)

    def acquire(self, phone_id: str, recipient: str, lane: Lane) -> Decision:
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
            self.policy.max_wait_s * 1_000_000,
            account_us,
            # Long enough to outlive any reservation, short enough to clean up idle numbers.
            int(max(60_000, 2_000 * self.policy.max_wait_s + 10 * interval_us / 1000)),
        ]
        code, wait_us = self._run(self._acquire, keys, args)
        return Decision(Verdict(int(code)), int(wait_us) / 1_000_000)

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
