"""The worker's Redis client: how it is opened, what its errors become, how its answers read.

:func:`open_redis` makes every Redis client (short timeouts, kept by the kernel on TCP).
:class:`RedisErrors` is the one place redis-py's exceptions become
:class:`~worker.errors.RedisUnavailable`, so code above catches only the worker's errors.
:func:`as_text` reads an answer whatever the client's ``decode_responses``.
"""

from __future__ import annotations

import socket
from contextlib import ContextDecorator
from types import TracebackType
from typing import Any

import redis
from redis.connection import SSLConnection, parse_url
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from worker.connections.sockets import keep_timeouts_in_kernel
from worker.errors import RedisUnavailable
from worker.settings import REDIS_TIMEOUT_S, Settings

__all__ = ["RedisErrors", "as_text", "open_redis"]


class _KernelTimeouts:
    """Makes a TCP connection to Redis keep its timeout in the kernel (``SO_RCVTIMEO`` and
    ``SO_SNDTIMEO`` on a blocking socket) rather than in Python.

    A read is then one ``recv`` instead of a ``poll`` and a ``recv``: one release of the
    interpreter lock fewer per read, on a path that makes a few Redis calls per job. A read or
    write past the timeout still fails as a ``ConnectionError``. ``rediss://`` and ``unix://``
    keep redis-py's own classes.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._io_timeout_s = kwargs.pop("socket_timeout", None) or REDIS_TIMEOUT_S
        super().__init__(socket_timeout=None, **kwargs)  # type: ignore[call-arg]

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()  # type: ignore[misc]
        keep_timeouts_in_kernel(sock, self._io_timeout_s, self._io_timeout_s)
        return sock


class _KernelTimeoutConnection(_KernelTimeouts, redis.Connection):
    """A TCP connection to REDIS_URL's host with kernel-kept timeouts."""

    #: The send path may read its replies from the socket itself
    #: (:mod:`worker.connections.redis_direct`): a plain socket, and reads that do nothing but
    #: parse (unlike a Sentinel-managed connection's, which notice a demoted primary).
    replies_from_socket = True


class _KernelTimeoutSentinelConnection(_KernelTimeouts, SentinelManagedConnection):
    """A TCP connection to the primary the sentinels name (asked again at each connect, and
    dropped when the server says it is a replica now), with kernel-kept timeouts."""


def open_redis(settings: Settings, *, timeout_s: float = REDIS_TIMEOUT_S) -> redis.Redis:
    """A Redis client with short timeouts: a dead Redis fails a call, it does not hang it.
    With REDIS_SENTINELS, it finds the primary through the sentinels (see :func:`_primary`)."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 15,
        "retry_on_timeout": False,
    }
    url = settings.redis_url.get_secret_value()
    if settings.redis_sentinels:
        return _primary(settings, url, options)
    # TLS (rediss://) and Unix sockets keep the classes redis-py picks for them.
    if url.startswith("redis://"):
        options["connection_class"] = _KernelTimeoutConnection
    return redis.Redis.from_url(url, **options)


class _SentinelPrimary(redis.Redis):
    """A client of the sentinels' primary whose ``close`` also closes its connections to the
    sentinels (redis-py leaves them open until they are garbage collected)."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                sentinel.close()


def _primary(settings: Settings, url: str, options: dict[str, Any]) -> redis.Redis:
    """A client of the primary that the sentinels monitor as REDIS_SENTINEL_SERVICE.

    REDIS_URL gives its TLS (``rediss://`` and its ``ssl_*`` parameters), credentials and
    database; its host and port are not used. Each new connection asks the sentinels where the
    primary is, and a connection still open to a primary that became a replica is dropped at
    its first refused write: a failover is followed without a restart. While no primary is
    known, every call fails (``MasterNotFoundError`` is a ``ConnectionError``): the limiter and
    the ledger hold their sends.
    """
    primary: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    for place in ("host", "port", "path"):
        primary.pop(place, None)
    tls = primary.pop("connection_class", None) is SSLConnection
    connection_class = SentinelManagedSSLConnection if tls else _KernelTimeoutSentinelConnection
    to_sentinels: dict[str, Any] = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "decode_responses": True,
    }
    if settings.redis_sentinel_username:
        to_sentinels["username"] = settings.redis_sentinel_username
    if settings.redis_sentinel_password is not None:
        to_sentinels["password"] = settings.redis_sentinel_password.get_secret_value()
    if settings.redis_sentinel_tls:
        to_sentinels["ssl"] = True
        to_sentinels.update({k: v for k, v in primary.items() if k.startswith("ssl_")})
    sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs=to_sentinels)
    client: redis.Redis = sentinel.master_for(
        settings.redis_sentinel_service,
        redis_class=_SentinelPrimary,
        connection_class=connection_class,
        **options,
        **primary,
    )
    return client


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
