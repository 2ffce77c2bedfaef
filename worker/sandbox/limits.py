"""Rate-limit bookkeeping used by the sandbox's fault engine.

Both limiters separate "is there room?" from "use the room" so a send that is
refused for another reason does not consume capacity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

__all__ = ["PairWindow", "TokenBucket"]


class TokenBucket:
    """Continuous-refill token bucket: ``rate`` tokens/s, burst of ``max(1, rate)``.

    A bucket rather than a strict 1-second sliding window because a client that
    paces itself at exactly ``rate`` would otherwise trip the limit on ordinary
    network jitter, making violation counts flaky.
    """

    __slots__ = ("_capacity", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, now: float) -> None:
        """Create a full bucket refilling at ``rate`` tokens per second."""
        self._rate = rate
        self._capacity = max(1.0, rate)
        self._tokens = self._capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
            self._updated = now

    def available(self, now: float) -> bool:
        """Return True if one token is available at ``now``."""
        self._refill(now)
        return self._tokens >= 1.0

    def take(self) -> None:
        """Consume one token (call after :meth:`available` returned True)."""
        self._tokens -= 1.0

    def wait_s(self, now: float) -> float:
        """Return the seconds until one token will be available."""
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self._rate)


class PairWindow:
    """At most ``limit`` events per key in any sliding window of ``window_s`` seconds."""

    __slots__ = ("_events", "_limit", "_window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        """Allow ``limit`` events per key per ``window_s`` seconds."""
        self._limit = limit
        self._window_s = window_s
        self._events: dict[Hashable, deque[float]] = {}

    def _recent(self, key: Hashable, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        cutoff = now - self._window_s
        while events and events[0] <= cutoff:
            events.popleft()
        if not events:
            # Drop idle keys so a benchmark over many recipients doesn't grow forever.
            del self._events[key]
            return None
        return events

    def available(self, key: Hashable, now: float) -> bool:
        """Return True if another event for ``key`` fits in the window at ``now``."""
        events = self._recent(key, now)
        return events is None or len(events) < self._limit

    def take(self, key: Hashable, now: float) -> None:
        """Record one event for ``key`` at ``now``."""
        self._events.setdefault(key, deque()).append(now)

    def wait_s(self, key: Hashable, now: float) -> float:
        """Return the seconds until another event for ``key`` would fit."""
        events = self._recent(key, now)
        if events is None or len(events) < self._limit:
            return 0.0
        return events[-self._limit] + self._window_s - now
