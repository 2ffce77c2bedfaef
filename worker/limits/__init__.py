"""Rate limits: pacing each sending number to its limit, shared by the fleet through Redis."""

from .gate import GateSettings, SendGate
from .pacing import Decision, Lane, LimitPolicy, MemoryLimiter, RateLimiter, Verdict
from .redis_limiter import LimiterUnavailable, RedisLimiter

__all__ = [
    "Decision",
    "GateSettings",
    "Lane",
    "LimitPolicy",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RateLimiter",
    "RedisLimiter",
    "SendGate",
    "Verdict",
]
