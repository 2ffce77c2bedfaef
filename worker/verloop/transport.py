"""The HTTP transport of the Verloop client: httpx's, on sockets that cost fewer system calls.

httpx (through httpcore) gives every read and write of a call its own Python-kept timeout: a
``poll`` before each ``send`` and ``recv``, and the request's head and body leave in two
``send`` calls. Each system call releases and takes back the interpreter lock, which the worker's
other threads are waiting for. :func:`open_transport` keeps httpx's transport (its pool, TLS,
keep-alive and error mapping) and gives it :class:`KernelTimeoutBackend`, whose connections

* are blocking sockets whose timeouts the kernel keeps (``SO_RCVTIMEO``, ``SO_SNDTIMEO``): a
  read is one ``recv``, a write one ``sendall``; past the timeout they fail as httpcore's
  ``ReadTimeout`` and ``WriteTimeout``, which the client classifies as before;
* hold what is written until the next read: a request leaves in one ``send``. A write that
  fails then fails as a write (httpcore's ``WriteError``), so a request that never left is
  still known to be safe to send again.

Connecting and the TLS handshake keep httpcore's own code and its connect timeout.

:class:`DirectTransport` is what the worker calls through: that same pool, asked directly with
httpcore's request (method, URL, header bytes, body), without httpx's ``Request`` and
``Response`` objects around each call (about a sixth of a call's CPU); httpcore's exceptions
become httpx's, as httpx's own transport maps them, so callers classify them the same way.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
import httpx

from worker.connections.sockets import keep_timeouts_in_kernel

__all__ = ["DirectTransport", "KernelTimeoutBackend", "open_transport", "read_bounded"]


def open_transport(timeout: httpx.Timeout, limits: httpx.Limits) -> httpx.HTTPTransport:
    """httpx's transport, with its connection pool on :class:`KernelTimeoutBackend`."""
    transport = httpx.HTTPTransport(limits=limits, retries=0)
    # httpx.HTTPTransport takes no network backend: its pool (the attribute every httpx 0.28
    # release uses; tests/unit/test_transport.py fails if that changes) is made again with one.
    transport._pool.close()
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        retries=0,
        network_backend=KernelTimeoutBackend(read_s=timeout.read, write_s=timeout.write),
    )
    return transport


class DirectTransport:
    """:func:`open_transport`'s pool, called with httpcore's own request (module docstring)."""

    def __init__(self, timeout: httpx.Timeout, limits: httpx.Limits) -> None:
        self._transport = open_transport(timeout, limits)
        self._pool: httpcore.ConnectionPool = self._transport._pool

    def exchange(
        self,
        method: bytes,
        url: httpcore.URL,
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        extensions: dict[str, Any],
        max_bytes: int,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One call: the answer's status, headers and at most ``max_bytes`` of its body (a body
        cut short, the connection dropped while it came, is what arrived).

        Raises:
            httpx.TransportError: httpx's class for what httpcore raised (no answer).
        """
        request = httpcore.Request(
            method, url, headers=headers, content=content, extensions=extensions
        )
        try:
            response = self._pool.handle_request(request)
        except Exception as exc:
            mapped = _as_httpx(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        try:
            body = read_bounded(
                response.stream,  # type: ignore[arg-type]
                max_bytes,
                cut=lambda exc: _as_httpx(exc) is not exc,  # an httpcore error: keep what came
            )
        finally:
            response.close()
        return response.status, response.headers, body

    def close(self) -> None:
        self._transport.close()


def read_bounded(
    chunks: Iterable[bytes], max_bytes: int, *, cut: Callable[[Exception], bool]
) -> bytes:
    """At most ``max_bytes`` of a body's ``chunks``. A body that fails partway with an error
    ``cut`` accepts (the connection dropped while it came) is what arrived."""
    kept: list[bytes] = []
    size = 0
    try:
        for chunk in chunks:
            kept.append(chunk)
            size += len(chunk)
            if size >= max_bytes:
                break
    except Exception as exc:
        if not cut(exc):
            raise
    return b"".join(kept)[:max_bytes]


def _as_httpx(exc: Exception) -> Exception:
    """httpx's exception for one of httpcore's (the class of the same name, as httpx maps
    them); any other exception as it is."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("httpcore"):
            mapped = getattr(httpx, cls.__name__, None)
            if isinstance(mapped, type) and issubclass(mapped, httpx.TransportError):
                return mapped(str(exc))
    return exc


class KernelTimeoutBackend(httpcore.NetworkBackend):
    """httpcore's synchronous backend, its streams made :class:`_KernelTimeoutStream`."""

    def __init__(self, *, read_s: float | None, write_s: float | None) -> None:
        self._inner = httpcore.SyncBackend()
        self._read_s = read_s
        self._write_s = write_s

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _KernelTimeoutStream(stream.get_extra_info("socket"), self._read_s, self._write_s)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:  # pragma: no cover - the client connects over TCP only
        return self._inner.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:  # pragma: no cover - httpcore's retries are off
        self._inner.sleep(seconds)


class _KernelTimeoutStream(httpcore.NetworkStream):
    """One connection: kernel-kept timeouts, writes held until the next read (module
    docstring). httpcore uses a connection from one thread at a time."""

    def __init__(self, sock: socket.socket, read_s: float | None, write_s: float | None) -> None:
        keep_timeouts_in_kernel(sock, read_s, write_s)
        self._sock = sock
        self._read_s = read_s
        self._write_s = write_s
        self._held: list[bytes] = []

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            self._flush()
        try:
            return self._sock.recv(max_bytes)
        except (BlockingIOError, TimeoutError, ssl.SSLWantReadError) as exc:
            raise httpcore.ReadTimeout(f"no answer within {self._read_s} s") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self._held.append(buffer)

    def _flush(self) -> None:
        data = b"".join(self._held)
        self._held.clear()
        try:
            self._sock.sendall(data)
        except (BlockingIOError, TimeoutError, ssl.SSLWantWriteError) as exc:
            raise httpcore.WriteTimeout(f"could not write within {self._write_s} s") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._held.clear()
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # The handshake runs under the connect timeout (Python-kept, as httpcore does it).
        if self._held:
            self._flush()
        try:
            self._sock.settimeout(timeout)
            wrapped = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._sock.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            self._sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return _KernelTimeoutStream(wrapped, self._read_s, self._write_s)

    def get_extra_info(self, info: str) -> Any:
        sock = self._sock
        if info == "ssl_object":
            return getattr(sock, "_sslobj", None) if isinstance(sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        if info == "socket":
            return sock
        if info == "is_readable":  # a kept-alive connection the server closed has a b"" to read
            if sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return None
