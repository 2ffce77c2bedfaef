"""The worker's Redis client: timeouts kept by the kernel on TCP, redis-py's own classes else."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.connection import SSLConnection
from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection

from worker.connections.redis import RedisErrors, open_redis
from worker.connections.redis_direct import ThreadConnections
from worker.errors import ConfigurationError
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


def test_the_send_path_s_calls_to_a_silent_redis_fail_within_the_timeout_too(
    silent_server: int,
) -> None:
    """Its replies are read from the socket by a reader of its own: the kernel's timeout still
    ends the wait, as a ConnectionError naming no more than the socket's error."""
    direct = ThreadConnections(open_redis(Settings(redis_url=f"redis://127.0.0.1:{silent_server}")))
    assert direct._own_reads
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        direct.execute([("PING",)])
    took = time.monotonic() - started
    direct.close()
    assert REDIS_TIMEOUT_S * 0.9 <= took < REDIS_TIMEOUT_S * 3


def test_a_reply_the_reader_cannot_parse_fails_the_call_and_drops_the_connection() -> None:
    """A server that answers the handshake, then garbage: the call fails as redis-py's
    InvalidResponse (a RedisError, so callers hold the job), and the connection is dropped so
    no later call reads the rest out of step."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(b"?not redis\r\n" if b"PING" in data else b"+OK\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    direct = ThreadConnections(
        open_redis(Settings(redis_url=f"redis://127.0.0.1:{server.getsockname()[1]}/0"))
    )
    try:
        with pytest.raises(redis.exceptions.InvalidResponse):
            direct.execute([("PING",)])
        assert direct._local.connection._sock is None  # dropped, not reused
    finally:
        direct.close()
        server.close()
        thread.join(timeout=5)


def test_only_plain_tcp_connections_of_the_worker_s_class_read_replies_themselves() -> None:
    """TLS, Unix sockets, Sentinel (whose reads notice a demoted primary), RESP3 and redis-py's
    default class keep redis-py's own reads."""
    assert ThreadConnections(open_redis(Settings(redis_url="redis://127.0.0.1:1/0")))._own_reads
    for url in (
        "rediss://127.0.0.1:1/0",
        "unix:///tmp/redis.sock",
        "redis://127.0.0.1:1/0?protocol=3",
    ):
        assert not ThreadConnections(open_redis(Settings(redis_url=url)))._own_reads, url
    assert not ThreadConnections(redis.Redis.from_url("redis://127.0.0.1:1/0"))._own_reads
    assert not ThreadConnections(open_redis(sentinel_settings()))._own_reads


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


# --- through Sentinel -----------------------------------------------------------------------
PRIMARY_SECRET = "primary-pw-9Zt"
SENTINEL_SECRET = "sentinel-pw-3Hv"


def closed_ports(count: int) -> list[int]:
    """Ports nothing listens on (bound, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def sentinel_settings(url: str = f"redis://:{PRIMARY_SECRET}@unused.invalid:1/5") -> Settings:
    return Settings(
        redis_url=url,
        redis_sentinels=",".join(f"127.0.0.1:{port}" for port in closed_ports(3)),
        redis_sentinel_service="cache",
        redis_sentinel_password=SENTINEL_SECRET,
    )


def test_with_sentinels_the_client_asks_them_for_the_primary_with_the_urls_credentials() -> None:
    settings = sentinel_settings()
    client = open_redis(settings)
    pool = client.connection_pool
    try:
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "cache"
        assert pool.connection_kwargs["db"] == 5
        assert pool.connection_kwargs["password"] == PRIMARY_SECRET
        assert "host" not in pool.connection_kwargs  # REDIS_URL's host is not used
        assert issubclass(pool.connection_class, SentinelManagedConnection)
        assert not issubclass(pool.connection_class, SSLConnection)
        sentinels = pool.sentinel_manager.sentinels
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [
            port for _, port in settings.sentinel_addresses
        ]
        assert all(
            s.connection_pool.connection_kwargs["password"] == SENTINEL_SECRET for s in sentinels
        )
    finally:
        client.close()


def test_with_sentinels_a_rediss_url_makes_tls_connections_to_the_primary() -> None:
    client = open_redis(sentinel_settings(f"rediss://:{PRIMARY_SECRET}@unused.invalid:1/0"))
    try:
        assert issubclass(client.connection_pool.connection_class, SSLConnection)
    finally:
        client.close()


def test_without_a_sentinel_answering_every_call_fails_and_names_no_password() -> None:
    """No primary known: the pool's calls and the send path's per-thread connections both fail
    (the limiter and the ledger then hold their sends). The per-thread connection must ask the
    sentinels too: connecting lazily, it would reach redis-py's default host instead."""
    client = open_redis(sentinel_settings())
    direct = ThreadConnections(client)
    try:
        failures: list[redis.RedisError] = []
        for call in (client.ping, lambda: direct.execute([("SET", "k", "v")])):
            with pytest.raises(redis.ConnectionError) as caught:
                call()
            failures.append(caught.value)
        translated = RedisErrors("ledger: {error}").translate(failures[-1])
        for text in [*map(str, failures), *map(repr, failures), str(translated)]:
            assert PRIMARY_SECRET not in text
            assert SENTINEL_SECRET not in text
    finally:
        direct.close()
        client.close()


@pytest.mark.parametrize(
    "value",
    ["sentinel.example", "sentinel.example:port", ":26399", "s.example:26379,", "s.example:70000"],
)
def test_a_malformed_sentinel_list_is_refused_without_echoing_it(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.load(redis_sentinels=value)
    assert "REDIS_SENTINELS" in str(caught.value)
    assert value not in str(caught.value)


def test_sentinels_need_a_tcp_redis_url() -> None:
    with pytest.raises(ConfigurationError, match="redis:// or rediss://"):
        Settings.load(redis_sentinels="127.0.0.1:26379", redis_url="unix:///tmp/redis.sock")
    assert Settings(redis_sentinels=" 10.0.0.5:26379, [::1]:26380").sentinel_addresses == [
        ("10.0.0.5", 26379),
        ("::1", 26380),
    ]
