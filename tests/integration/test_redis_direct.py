"""The send path's per-thread Redis connections (worker.connections.redis_direct) against a real
Redis."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from urllib.parse import urlsplit

import pytest
import redis

from tests.integration.conftest import REDIS_URL
from worker.connections.redis_direct import ThreadConnections
from worker.runtime.services import Services, open_redis
from worker.send.ledger import LedgerKey
from worker.settings import Settings


@pytest.fixture
def client() -> redis.Redis:
    """The worker's own kind of client (kernel timeouts, decoded replies)."""
    return open_redis(Settings(redis_url=REDIS_URL))


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def client_id(direct: ThreadConnections) -> int:
    reply: int = direct.execute([("CLIENT", "ID")])[0]
    return reply


def test_commands_go_in_one_write_and_their_replies_come_back_in_order(
    client: redis.Redis,
) -> None:
    direct = ThreadConnections(client)
    replies = direct.execute([("SET", "d:a", "1"), ("INCR", "d:a"), ("GET", "d:a")])
    assert replies == ["OK", 2, "2"]
    direct.close()


def test_values_of_every_kind_the_worker_sends_arrive_as_redis_py_would_write_them(
    client: redis.Redis,
) -> None:
    """Commands are packed by hiredis, not redis-py's encoder: str (UTF-8), int (within 64 bits
    and beyond), float and bytes arrive byte for byte as redis-py writes them; bool and None are
    refused as redis-py refuses them, and nothing is sent."""
    direct = ThreadConnections(client)
    values = ["plain", "é ñ 漢字 🙂", 0, -3, 2**64 + 1, 1.5, 0.1, 1e-7, b"raw\x00\xffbytes", ""]
    pairs = [part for n, value in enumerate(values) for part in (n, value)]
    direct.execute([("HSET", "d:ours", *pairs)])
    client.hset("d:redis-py", mapping=dict(enumerate(values)))
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        assert raw.hgetall("d:ours") == raw.hgetall("d:redis-py")
        assert len(raw.hgetall("d:ours")) == len(values)
    finally:
        raw.close()
    for bad in (True, None):
        with pytest.raises(redis.DataError):
            direct.execute([("SET", "d:bad", bad)])
    assert direct.execute([("EXISTS", "d:bad")]) == [0]
    direct.close()


def test_replies_larger_than_one_read_arrive_whole_and_in_step(client: redis.Redis) -> None:
    """A reply that takes many reads (here 3 MB) and the small ones after it: each command
    gets its own reply, and the next call starts clean."""
    direct = ThreadConnections(client)
    assert direct._own_reads
    big = "é" * 1_500_000
    direct.execute([("SET", "d:big", big)])
    assert direct.execute([("GET", "d:big"), ("STRLEN", "d:big"), ("ECHO", "after")]) == [
        big,
        len(big.encode()),
        "after",
    ]
    assert direct.execute([("PING",)]) == ["PONG"]
    direct.close()


def test_a_refused_command_raises_after_every_reply_was_read(client: redis.Redis) -> None:
    direct = ThreadConnections(client)
    client.set("d:text", "not a number")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        direct.execute([("INCR", "d:text"), ("SET", "d:after", "x")])
    assert client.get("d:after") == "x"  # the command after the refused one ran
    # The connection is still in step: the next call reads its own reply, not a stale one.
    assert direct.execute([("GET", "d:after")]) == ["x"]
    direct.close()


def test_each_thread_has_its_own_connection_and_keeps_it(client: redis.Redis) -> None:
    direct = ThreadConnections(client)
    mine = client_id(direct)
    assert client_id(direct) == mine
    theirs: list[int] = []
    thread = threading.Thread(target=lambda: theirs.append(client_id(direct)))
    thread.start()
    thread.join()
    assert len(theirs) == 1
    assert theirs[0] != mine
    direct.close()


def test_a_connection_closed_by_redis_is_replaced_and_the_call_goes_through(
    client: redis.Redis,
) -> None:
    """What a Redis restart looks like to a worker thread: its old connection is closed."""
    direct = ThreadConnections(client)
    old = client_id(direct)
    client.client_kill_filter(_id=old)
    assert direct.execute([("SET", "d:k", "v")]) == ["OK"]
    assert client_id(direct) != old
    direct.close()


def test_an_unreachable_redis_raises_connection_error(closed_port: int) -> None:
    direct = ThreadConnections(open_redis(Settings(redis_url=f"redis://127.0.0.1:{closed_port}")))
    with pytest.raises(redis.ConnectionError):
        direct.execute([("PING",)])
    direct.close()


def test_a_script_redis_forgot_is_loaded_again(client: redis.Redis) -> None:
    script = client.register_script("return ARGV[1] .. KEYS[1]")
    direct = ThreadConnections(client)
    assert direct.evalsha(script, ["k"], ["x-"]) == "x-k"
    client.script_flush()
    assert direct.evalsha(script, ["k"], ["y-"]) == "y-k"
    direct.close()


def test_close_closes_every_threads_connection_and_a_later_call_reconnects(
    client: redis.Redis,
) -> None:
    direct = ThreadConnections(client)
    ids: list[int] = [client_id(direct)]
    thread = threading.Thread(target=lambda: ids.append(client_id(direct)))
    thread.start()
    thread.join()
    direct.close()
    open_ids = {int(c["id"]) for c in client.client_list()}
    assert not open_ids & set(ids)
    assert client_id(direct) not in ids
    direct.close()


def redis_sockets() -> int:
    """This process's open TCP connections to the test Redis (from /proc)."""
    port = urlsplit(REDIS_URL).port or 6379
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def test_the_ledger_and_the_limiter_share_one_connection_per_thread() -> None:
    baseline = redis_sockets()
    services = Services.open(Settings(redis_url=REDIS_URL))
    # Warm up on this thread: the scripts get loaded (through the client's pool).
    assert (
        services.ledger.claim(LedgerKey("share:0"), "a", take_over_uncertain=False).state
        == "claimed"
    )
    services.gate.limiter.acquire("share-phone", "+919800000000", "campaign")
    before = redis_sockets()

    def one_job() -> None:
        assert (
            services.ledger.claim(LedgerKey("share:1"), "b", take_over_uncertain=False).state
            == "claimed"
        )
        services.gate.limiter.acquire("share-phone", "+919800000001", "campaign")
        services.ledger.mark_sent(LedgerKey("share:1"), "wamid.share")

    thread = threading.Thread(target=one_job)
    thread.start()
    thread.join()
    # The new thread's claim, slot and record took one connection between them.
    assert redis_sockets() == before + 1
    assert services.ledger.lookup(LedgerKey("share:1")).state == "sent"
    services.close()
    assert redis_sockets() <= baseline  # and closing them all leaves none behind
