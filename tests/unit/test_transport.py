"""The Verloop client's transport on real sockets: a request in one write, kernel-kept timeouts,
and failures classified as httpx's own transport classifies them."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from worker.errors import OutcomeUnknown, TransientFailure
from worker.verloop.client import MAX_RESPONSE_BYTES, VerloopClient
from worker.verloop.endpoints import resolve_endpoints
from worker.verloop.transport import KernelTimeoutBackend, open_transport

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
ANSWER = b'{"messages": [{"id": "wamid.1"}]}'

#: What a server does with one connection: gets the socket, returns nothing.
Serve = Callable[[socket.socket], None]


class Server:
    """A TCP server on loopback running ``serve`` for each connection, in threads."""

    def __init__(self, serve: Serve) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.serve = serve
        self.connections = 0
        self.first_reads: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            self.serve(conn)

    def read_request(self, conn: socket.socket) -> bytes:
        """One request's bytes as the first ``recv`` returned them (b"": closed)."""
        data = conn.recv(65536)
        self.first_reads.append(data)
        return data


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.listener.close()


def _client(port: int, read_s: float = 5.0) -> VerloopClient:
    timeout = httpx.Timeout(read_s, connect=2.0)
    return VerloopClient(
        base_url=f"http://127.0.0.1:{port}",
        api_prefix="/api/v2/whatsapp",
        endpoints=resolve_endpoints({}),
        timeout=timeout,
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
    )


def _answering(server_box: list[Server], requests: int = 1) -> Serve:
    def serve(conn: socket.socket) -> None:
        for _ in range(requests):
            if not server_box[0].read_request(conn):
                return
            conn.sendall(OK % (len(ANSWER), ANSWER))

    return serve


def test_a_request_leaves_in_one_write_and_is_answered(servers: list[Server]) -> None:
    box: list[Server] = []
    server = Server(_answering(box))
    box.append(server)
    servers.append(server)
    client = _client(server.port)
    try:
        result = client.send_message("phone-token", {"to": "+919800001234", "type": "text"})
    finally:
        client.close()
    assert result.message_id == "wamid.1"
    [request] = server.first_reads
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/v2/whatsapp/")
    assert body == b'{"to":"+919800001234","type":"text"}'


def test_writes_are_held_until_the_next_read_then_leave_together(servers: list[Server]) -> None:
    got: list[bytes] = []
    wrote = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.settimeout(0.3)
        try:
            got.append(conn.recv(65536))  # nothing comes while the client only writes
        except TimeoutError:
            got.append(b"")
        wrote.wait(5)
        conn.settimeout(5)
        got.append(conn.recv(65536))
        conn.sendall(b"answer")

    server = Server(serve)
    servers.append(server)
    stream = KernelTimeoutBackend(read_s=5, write_s=5).connect_tcp("127.0.0.1", server.port)
    try:
        stream.write(b"head\r\n\r\n")
        stream.write(b"body")
        time.sleep(0.5)
        wrote.set()
        assert stream.read(100) == b"answer"
    finally:
        stream.close()
    assert got == [b"", b"head\r\n\r\nbody"]


def test_its_sockets_are_blocking_with_the_timeouts_kept_by_the_kernel(
    servers: list[Server],
) -> None:
    server = Server(lambda conn: conn.recv(1))
    servers.append(server)
    stream = KernelTimeoutBackend(read_s=2.5, write_s=0.25).connect_tcp("127.0.0.1", server.port)
    try:
        sock = stream.get_extra_info("socket")
        assert sock.gettimeout() is None
        # The kernel keeps them in its own ticks (a few milliseconds).
        assert _kernel_timeout(sock, socket.SO_RCVTIMEO) == pytest.approx(2.5, abs=0.01)
        assert _kernel_timeout(sock, socket.SO_SNDTIMEO) == pytest.approx(0.25, abs=0.01)
    finally:
        stream.close()


def _kernel_timeout(sock: socket.socket, option: int) -> float:
    seconds, micros = struct.unpack(
        "ll", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("ll"))
    )
    return float(seconds + micros / 1_000_000)


def test_open_transport_puts_httpx_pool_on_the_kernel_timeout_backend(
    servers: list[Server],
) -> None:
    """Fails if an httpx release stops keeping its pool where open_transport replaces it."""
    box: list[Server] = []
    server = Server(_answering(box))
    box.append(server)
    servers.append(server)
    transport = open_transport(httpx.Timeout(5.0), httpx.Limits(max_connections=1))
    try:
        response = transport.handle_request(
            httpx.Request("GET", f"http://127.0.0.1:{server.port}/")
        )
        stream = response.extensions["network_stream"]
        response.read()
        response.close()
    finally:
        transport.close()
    assert response.status_code == 200
    assert type(stream).__name__ == "_KernelTimeoutStream"


def test_no_answer_within_the_read_timeout_is_an_unknown_outcome(servers: list[Server]) -> None:
    box: list[Server] = []

    def silent(conn: socket.socket) -> None:
        box[0].read_request(conn)
        time.sleep(3)

    server = Server(silent)
    box.append(server)
    servers.append(server)
    client = _client(server.port, read_s=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(OutcomeUnknown, match="timed out waiting for"):
            client.send_message("phone-token", {"to": "+919800001234"})
    finally:
        client.close()
    assert time.monotonic() - started < 2.0
    assert len(server.first_reads) == 1  # the request did leave


def test_a_connection_dropped_before_the_answer_is_an_unknown_outcome(
    servers: list[Server],
) -> None:
    box: list[Server] = []
    server = Server(lambda conn: box[0].read_request(conn) and None)
    box.append(server)
    servers.append(server)
    client = _client(server.port)
    try:
        with pytest.raises(OutcomeUnknown, match="lost"):
            client.send_message("phone-token", {"to": "+919800001234"})
    finally:
        client.close()


def test_a_kept_alive_connection_the_server_closed_is_not_reused(servers: list[Server]) -> None:
    box: list[Server] = []
    server = Server(_answering(box, requests=1))  # answers once, then closes the connection
    box.append(server)
    servers.append(server)
    client = _client(server.port)
    try:
        for _ in range(2):
            assert client.send_message("phone-token", {"n": 1}).message_id == "wamid.1"
            time.sleep(0.1)  # the server's close reaches the client's socket
    finally:
        client.close()
    assert server.connections == 2


def test_each_thread_keeps_a_connection_of_its_own_and_close_closes_them_all(
    servers: list[Server],
) -> None:
    """A worker thread makes one call at a time: its calls reuse its own connection (httpx's
    pool looks over every connection it holds at each call, so one pool per thread keeps that
    to one), and close() closes every thread's."""
    box: list[Server] = []
    server = Server(_answering(box, requests=100))
    box.append(server)
    servers.append(server)
    client = _client(server.port)
    results: list[str | None] = []

    def calls() -> None:
        for _ in range(5):
            results.append(client.send_message("phone-token", {"n": 1}).message_id)

    threads = [threading.Thread(target=calls) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls()  # and this thread's own
    assert results == ["wamid.1"] * 20
    assert server.connections == 4
    assert len(client._opened) == 4
    client.close()
    assert client._opened == []
    calls()  # a call after close() opens a pool again
    assert server.connections == 5
    client.close()


def _answering_with(box: list[Server], answer: bytes) -> Serve:
    def serve(conn: socket.socket) -> None:
        if box[0].read_request(conn):
            conn.sendall(answer)

    return serve


def test_a_call_carries_the_headers_httpx_would_write(servers: list[Server]) -> None:
    """Called through httpcore directly, a request still names its host, its body's length and
    type, the token and the idempotency key; a GET carries its query and no body length."""
    box: list[Server] = []
    token_answer = b'{"token": "phone-token-1"}'
    server = Server(_answering(box, requests=2))
    box.append(server)
    servers.append(server)
    client = _client(server.port)
    try:
        client.send_message("phone-token", {"to": "+919800001234"}, idempotency_key="key-1")
        server.serve = _answering_with(box, OK % (len(token_answer), token_answer))
        client.close()  # the next call opens a new connection, served by the new function
        assert client.get_phone_token("system-token", "acme", "phone 1") == "phone-token-1"
    finally:
        client.close()
    post, get = (
        request.partition(b"\r\n\r\n")[0].lower() for request in server.first_reads if request
    )
    body = b'{"to":"+919800001234"}'
    for line in (
        f"host: 127.0.0.1:{server.port}".encode(),
        f"content-length: {len(body)}".encode(),
        b"content-type: application/json",
        b"authorization: phone-token",
        b"idempotency-key: key-1",
    ):
        assert line in post.split(b"\r\n")
    assert get.startswith(b"get /api/v2/whatsapp/")
    assert b"?client_id=acme&phone_id=phone+1 http/1.1" in get.split(b"\r\n")[0]
    assert b"content-length" not in get


def test_a_refused_connection_is_a_transient_failure_and_not_an_unknown_outcome(
    servers: list[Server],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = _client(port)
    try:
        with pytest.raises(TransientFailure, match="could not reach Verloop"):
            client.send_message("phone-token", {"to": "+919800001234"})
    finally:
        client.close()


def test_an_error_answer_is_classified_with_its_headers_and_a_long_answer_read_to_the_bound(
    servers: list[Server],
) -> None:
    box: list[Server] = []
    limited = b'{"error": {"code": 130429, "message": "slow down"}}'
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 7\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(limited), limited)
    )
    server = Server(_answering_with(box, answer))
    box.append(server)
    servers.append(server)
    client = _client(server.port)
    try:
        with pytest.raises(TransientFailure) as raised:
            client.send_message("phone-token", {"to": "+919800001234"})
    finally:
        client.close()
    assert raised.value.details.retry_after == 7
    assert raised.value.details.code == "130429"
    huge = b'{"messages": [{"id": "wamid.big"}], "pad": "' + b"x" * (MAX_RESPONSE_BYTES * 2) + b'"}'
    server.serve = _answering_with(box, OK % (len(huge), huge))
    client = _client(server.port)
    try:
        # Cut at the bound, the answer is no longer JSON: the send is still accepted (2xx).
        assert client.send_message("phone-token", {"to": "+919800001234"}).message_id is None
    finally:
        client.close()


def test_an_accepted_answer_cut_short_is_kept_as_far_as_it_came(servers: list[Server]) -> None:
    """The connection drops partway through a 200's body: the send is accepted (never sent
    again for that); what arrived is the body, here not JSON, so no message id."""
    box: list[Server] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    server = Server(_answering_with(box, head + b'{"messages": [{"id"'))
    box.append(server)
    servers.append(server)
    client = _client(server.port)
    try:
        result = client.send_message("phone-token", {"to": "+919800001234"})
    finally:
        client.close()
    assert result.http_status == 200
    assert result.message_id is None
