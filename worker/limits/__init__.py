"""Rate limits: pacing each sending number to its limit, shared by the fleet through Redis."""

from worker.limits.pacing import Decision, Lane, LimitPolicy, MemoryLimiter, RateLimiter, Verdict
from worker.limits.redis_limiter import LimiterUnavailable, RedisLimiter

__all__ = [
    "Decision",
    "Lane",
    "LimitPolicy",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RateLimiter",
    "RedisLimiter",
    "Verdict",
]
