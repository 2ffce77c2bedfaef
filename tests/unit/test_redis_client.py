"""The worker's Redis client: timeouts kept by the kernel on TCP, redis-py's own classes else."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis

from worker.connections.redis import open_redis
from worker.settings import REDIS_TIMEOUT_S, Settings


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung Redis).

    Nothing calls accept(): the kernel completes the handshake into the listen backlog, which
    is all a client sees of a hung server, and closing the listening socket resets those
    connections. (An accept thread raced the teardown: a connection it accepted after the
    teardown had closed the others was left for the garbage collector, and pytest's unraisable
    ResourceWarning failed whichever test ran next.)
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_a_redis_that_never_answers_fails_the_call_within_the_timeout(silent_server: int) -> None:
    """The socket is blocking with SO_RCVTIMEO (one system call per read): a call to a Redis
    that does not answer still fails after the timeout instead of hanging."""
    client = open_redis(Settings(redis_url=f"redis://127.0.0.1:{silent_server}/0"))
    started = time.monotonic()
    with pytest.raises(redis.RedisError):
        client.get("anything")
    took = time.monotonic() - started
    client.close()
    assert REDIS_TIMEOUT_S * 0.9 <= took < REDIS_TIMEOUT_S * 3


def test_a_tcp_connection_is_blocking_with_kernel_timeouts(silent_server: int) -> None:
    """No Python timeout (no poll before each read); the kernel's is the client's timeout."""
    client = open_redis(Settings(redis_url=f"redis://127.0.0.1:{silent_server}/0"))
    connection = client.connection_pool.make_connection()
    sock = connection._connect()  # the socket alone, before redis-py's handshake
    try:
        assert sock.gettimeout() is None
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            seconds = sock.getsockopt(socket.SOL_SOCKET, option, 16)[:8]
            assert int.from_bytes(seconds, "little") == int(REDIS_TIMEOUT_S)
    finally:
        sock.close()
        client.close()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("rediss://127.0.0.1:6380/0", redis.SSLConnection),
        ("unix:///tmp/redis.sock", redis.UnixDomainSocketConnection),
    ],
)
def test_tls_and_unix_socket_urls_keep_redis_pys_connection_classes(
    url: str, kind: type[redis.Connection]
) -> None:
    client = open_redis(Settings(redis_url=url))
    assert client.connection_pool.connection_class is kind
    client.close()
