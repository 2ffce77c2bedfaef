"""A dict that forgets what was least recently used: per-process state keyed by ids that
producers choose (token caches, campaign states) stays bounded however many ids they send."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["BoundedDict"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(Generic[K, V]):
    """A thread-safe dict that forgets its least recently used entries beyond ``maxsize``.

    A dozen lines of OrderedDict rather than a cache library: nothing else is needed, and the
    one read on every send stays a dict lookup under a lock.
    """

    def __init__(self, maxsize: int) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self._maxsize = max(1, maxsize)
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._put(key, value)

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                value = make()
                self._put(key, value)
            else:
                self._data.move_to_end(key)
            return value

    def pop(self, key: K) -> V | None:
        with self._lock:
            return self._data.pop(key, None)

    def pop_if(self, key: K, keep: Callable[[V], bool]) -> None:
        """Remove ``key`` unless ``keep(value)`` (atomically)."""
        with self._lock:
            value = self._data.get(key)
            if value is not None and not keep(value):
                del self._data[key]

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first (a copy: safe while others write)."""
        with self._lock:
            return iter(list(self._data))

    def _put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            self._data.popitem(last=False)
