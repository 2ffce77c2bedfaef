"""Redis calls on the send path, on one connection per thread, without redis-py's per-call
layers (the pool's lock, its liveness poll, the retry and telemetry wrappers).

Each thread keeps one connection of the pool's class and settings (kernel-kept timeouts, TLS,
credentials; with Sentinel, the primary the sentinels name when it connects, so a failover is
followed), writes its commands in one ``send`` (packed by hiredis) and reads their replies.
Failures are redis-py's own exceptions; a call that fails on a connection used before is tried
once more on a new one (Redis may have restarted). Every call made here is safe to repeat.

On a plain TCP connection of the worker's own class (``redis://``, RESP2) the replies are read
straight from the socket by a hiredis reader of the thread's own, one ``recv`` for all of them,
rather than through redis-py's reply layers once per command (about a quarter of the send
path's Redis CPU). Redis-py's connection still connects, authenticates and selects the
database; TLS, Unix sockets, Sentinel (whose reads notice a demoted primary) and RESP3 keep
redis-py's own reads.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis._parsers.base import BaseParser
from redis.commands.core import Script

try:
    import hiredis
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency (redis[hiredis])
    hiredis = None  # type: ignore[assignment]
    _pack_command = None  # type: ignore[assignment]

__all__ = ["ThreadConnections"]

Command = Sequence[Any]


class ThreadConnections:
    """One connection per thread to the Redis of ``client`` (same connection class and
    settings as its pool); :meth:`close` closes them all."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        self._connection_kwargs = pool.connection_kwargs
        encoding = self._connection_kwargs.get("encoding", "utf-8")
        errors = self._connection_kwargs.get("encoding_errors", "strict")
        self._utf8 = encoding.lower().replace("-", "") == "utf8" and errors == "strict"
        #: Replies read from the socket by a reader of our own (see the module docstring).
        self._own_reads = (
            hiredis is not None
            and self._utf8
            and getattr(self._connection_class, "replies_from_socket", False)
            and str(self._connection_kwargs.get("protocol") or 2) == "2"
        )
        self._reader_options: dict[str, Any] = {
            "protocolError": redis.exceptions.InvalidResponse,
            "replyError": BaseParser.parse_error,
        }
        if self._connection_kwargs.get("decode_responses"):
            self._reader_options |= {"encoding": encoding, "errors": errors}
        self._local = threading.local()
        self._opened: list[Any] = []  # redis-py connections (untyped)
        self._lock = threading.Lock()
        # An owner dropped without close() still closes its sockets, before the garbage
        # collector finalizes them one by one (each would warn that it was left open).
        weakref.finalize(self, _disconnect_all, self._opened)

    def execute(self, commands: Sequence[Command], *, raise_refusals: bool = True) -> list[Any]:
        """Send ``commands`` in one write; their replies, in order (with ``raise_refusals``
        false, a refused command's reply is its ``redis.ResponseError``).

        Raises:
            redis.ResponseError: a command was refused (the first such error, after every
                reply was read, so the connection stays in step).
            redis.ConnectionError, redis.TimeoutError: Redis could not be reached or did not
                answer (after one more try on a new connection if this one had been used).
        """
        for attempt in (1, 2):
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._connection_class(**self._connection_kwargs)
                with self._lock:
                    self._opened.append(connection)
                self._local.connection = connection
            used_before = connection._sock is not None
            try:
                if not used_before:
                    # Through the class's own connect(): a Sentinel-managed connection asks the
                    # sentinels for the primary there (send_packed_command's lazy connect would
                    # skip it and reach the host in its default settings, localhost:6379).
                    connection.connect()
                if self._own_reads:
                    return self._read_own(connection, commands, raise_refusals)
                connection.send_packed_command(self._pack(connection, commands))
                return self._replies(connection, len(commands), raise_refusals)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                connection.disconnect()
                if attempt == 2 or not used_before:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _pack(self, connection: Any, commands: Sequence[Command]) -> Any:
        """The commands in Redis's wire format: packed by hiredis in C (redis-py encodes each
        argument in Python first, about ten times the CPU for a send's record), the same bytes
        for the types the worker sends (str as UTF-8, int, float, bytes)."""
        if _pack_command is None or not self._utf8:
            return connection.pack_commands(commands)
        try:
            return [b"".join([_pack_command(tuple(command)) for command in commands])]
        except TypeError as exc:  # as redis-py's own encoder refuses a bool or None
            raise redis.DataError(f"Invalid input for Redis: {exc}") from None

    def _read_own(
        self, connection: Any, commands: Sequence[Command], raise_refusals: bool
    ) -> list[Any]:
        """Write ``commands`` and read their replies on the connection's socket itself."""
        local = self._local
        sock = connection._sock
        if getattr(local, "sock", None) is not sock:  # a new connection: a new reader
            local.sock, local.reader = sock, hiredis.Reader(**self._reader_options)
        reader = local.reader
        packed = self._pack(connection, commands)[0]
        count = len(commands)
        replies: list[Any] = []
        refused: redis.ResponseError | None = None
        try:
            sock.sendall(packed)
            while len(replies) < count:
                reply = reader.gets()
                if reply is False:  # not all of it is here yet
                    data = sock.recv(65536)
                    if not data:
                        raise redis.ConnectionError("Connection closed by server.")
                    reader.feed(data)
                    continue
                if isinstance(reply, redis.ResponseError):
                    refused = refused or reply
                replies.append(reply)
        except OSError as exc:  # a kernel-kept timeout is one too (EAGAIN), as in redis-py
            connection.disconnect()
            raise redis.ConnectionError(f"Error talking to Redis: {exc.args}") from None
        except BaseException:  # not understood, or interrupted: the rest would be out of step
            connection.disconnect()
            raise
        if refused is not None and raise_refusals:
            raise refused
        return replies

    def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a registered script by its hash, loading it first if Redis does not have it
        (after a restart or a ``SCRIPT FLUSH``)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return self.execute([command])[0]
        except redis.exceptions.NoScriptError:
            script.sha = self._client.script_load(script.script)
            return self.execute([("EVALSHA", script.sha, len(keys), *keys, *args)])[0]

    def close(self) -> None:
        """Close every thread's connection (a later call on a thread connects it again)."""
        with self._lock:
            opened = list(self._opened)
        _disconnect_all(opened)

    @staticmethod
    def _replies(connection: Any, count: int, raise_refusals: bool) -> list[Any]:
        replies: list[Any] = []
        refused: redis.ResponseError | None = None
        for _ in range(count):
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:
                refused = refused or exc
                replies.append(exc)
        if refused is not None and raise_refusals:
            raise refused
        return replies


def _disconnect_all(connections: list[Any]) -> None:
    for connection in list(connections):
        connection.disconnect()
