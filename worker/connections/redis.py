"""The worker's Redis client: how it is opened, what its errors become, how its answers read.

:func:`open_redis` makes every Redis client (short timeouts, kept by the kernel on TCP).
:class:`RedisErrors` is the one place redis-py's exceptions become
:class:`~worker.errors.RedisUnavailable`, so code above catches only the worker's errors.
:func:`as_text` reads an answer whatever the client's ``decode_responses``.
"""

from __future__ import annotations

import socket
import struct
from contextlib import ContextDecorator
from types import TracebackType
from typing import Any

import redis

from worker.errors import RedisUnavailable
from worker.settings import REDIS_TIMEOUT_S, Settings

__all__ = ["RedisErrors", "as_text", "open_redis"]


class _KernelTimeoutConnection(redis.Connection):
    """A TCP connection to Redis whose timeout is kept by the kernel (``SO_RCVTIMEO`` and
    ``SO_SNDTIMEO`` on a blocking socket) rather than by Python.

    A read is then one ``recv`` instead of a ``poll`` and a ``recv``: one release of the
    interpreter lock fewer per read, on a path that makes a few Redis calls per job. A read or
    write past the timeout still fails as a ``ConnectionError``. ``rediss://`` and ``unix://``
    keep redis-py's own classes.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._io_timeout_s = kwargs.pop("socket_timeout", None) or REDIS_TIMEOUT_S
        super().__init__(socket_timeout=None, **kwargs)  # type: ignore[no-untyped-call]

    def _connect(self) -> socket.socket:
        # Connected, and blocking (its Python timeout is None).
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        seconds = int(self._io_timeout_s)
        timeval = struct.pack("ll", seconds, int((self._io_timeout_s - seconds) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return sock


def open_redis(settings: Settings) -> redis.Redis:
    """A Redis client with short timeouts: a dead Redis fails a call, it does not hang it."""
    url = settings.redis_url.get_secret_value()
    # TLS (rediss://) and Unix sockets keep the classes redis-py picks for them.
    tcp = {"connection_class": _KernelTimeoutConnection} if url.startswith("redis://") else {}
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        health_check_interval=15,
        retry_on_timeout=False,
        **tcp,
    )


class RedisErrors(ContextDecorator):
    """Turns any ``redis.RedisError`` raised inside it into ``unavailable`` (a
    :class:`RedisUnavailable`), with ``message`` where ``{error}`` is the redis-py exception's
    class name: never its text, which may quote a URL or a key. Other exceptions pass through.

    One instance per component, used as ``with ERRORS:``, as a decorator (``@ERRORS``), or to
    translate an error a call returned instead of raising (:meth:`translate`). It holds no
    state, so one instance serves every thread. The new exception does not chain the original
    (``from None``): what went wrong is in its message.
    """

    def __init__(
        self, message: str, unavailable: type[RedisUnavailable] = RedisUnavailable
    ) -> None:
        if "{error}" not in message:
            raise ValueError(f"the message must say where the error goes ({{error}}): {message!r}")
        self.message = message
        self.unavailable = unavailable

    def translate(self, error: redis.RedisError) -> RedisUnavailable:
        """The worker's exception for ``error`` (to raise)."""
        return self.unavailable(self.message.format(error=type(error).__name__))

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Returns None, never True: nothing is swallowed (and type checkers know it).
        if isinstance(error, redis.RedisError):
            raise self.translate(error) from None


def as_text(value: object) -> str:
    """``value`` as ``str``: bytes decoded as UTF-8, anything else through ``str``. The worker's
    clients decode answers; a client made elsewhere (a test's, a tool's) may not."""
    return value.decode() if isinstance(value, bytes) else str(value)
