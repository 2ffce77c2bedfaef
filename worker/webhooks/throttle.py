"""Log lines about the same problem at most once every few seconds.

A sender retries a refused body, and a flood of forged requests is a flood: the receiver says
what is wrong once per interval, with how many times it happened meanwhile, instead of once per
request.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

__all__ = ["LogThrottle"]


class LogThrottle:
    """``warning(key, event, **fields)`` logs now, or counts it until ``interval_s`` passed since
    the last line for ``key`` (the next line then says ``repeated=<count>``)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._repeated: dict[str, int] = {}
        self._log = structlog.get_logger("worker.webhooks")

    def warning(self, key: str, event: str, **fields: Any) -> None:
        self._emit("warning", key, event, fields)

    def info(self, key: str, event: str, **fields: Any) -> None:
        self._emit("info", key, event, fields)

    def _emit(self, level: str, key: str, event: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._repeated[key] = self._repeated.get(key, 0) + 1
            return
        self._last[key] = now
        repeated = self._repeated.pop(key, 0)
        if repeated:
            fields["repeated"] = repeated
        getattr(self._log, level)(event, **fields)
