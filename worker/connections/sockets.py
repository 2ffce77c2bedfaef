"""Socket timeouts kept by the kernel, for the connections the send path uses on every job.

A socket with a Python-kept timeout polls before every ``send`` and ``recv``: one more system
call, and one more release of the interpreter lock. :func:`keep_timeouts_in_kernel` makes it
blocking with ``SO_RCVTIMEO``/``SO_SNDTIMEO`` instead; past them a call fails with
``BlockingIOError`` (``EAGAIN``), which each caller maps to its own timeout error. Used by the
Redis connections (:mod:`worker.connections.redis`) and the Verloop client's transport
(:mod:`worker.verloop.transport`).
"""

from __future__ import annotations

import socket
import struct

__all__ = ["keep_timeouts_in_kernel"]


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval``; None (no timeout) is 0, which the kernel reads as "wait for ever"."""
    if seconds is None:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    return struct.pack("ll", whole, max(int((seconds - whole) * 1_000_000), 0 if whole else 1))


def keep_timeouts_in_kernel(
    sock: socket.socket, read_s: float | None, write_s: float | None
) -> None:
    """Make ``sock`` blocking, its read and write timeouts kept by the kernel."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(read_s))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(write_s))
