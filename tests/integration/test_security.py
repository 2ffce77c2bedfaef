"""TLS and passwords in the service URLs, where metrics are served, and the job size limit.

Redis over TLS is a real ``redis-server`` with ``--tls-port`` and ``--requirepass``, its
certificate signed by a throwaway CA made with ``openssl``. The machine's RabbitMQ has no TLS
listener (and is shared, so it is not reconfigured): amqps is tested through a TLS terminator
in the test that forwards the decrypted bytes to its plain AMQP port, which is what a TLS
listener does; the worker's side of the connection (TLS, certificate and host name checks) is
the real one.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pika
import pytest
import redis

from tests.integration.conftest import (
    AMQP_URL,
    VENV_BIN,
    Simulator,
    dead_letters,
    free_port,
    queue_depth,
    redis_client,
    wait_until,
    worker_env,
    worker_process,
)
from tests.integration.tcp_proxy import TcpProxy
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.producer import Producer
from worker.runtime.app import WorkerApp

TEXT = {"type": "text", "text": {"body": "hello"}}
REDIS_PASSWORD = "tls-redis-pass-5f2c9"


def cli(simulator: Simulator, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "verloop-worker"), *args],
        env=worker_env(simulator, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- certificates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("openssl is not on PATH; the TLS tests make their certificates with it")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and a server certificate it signed for 127.0.0.1."""
    where = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=verloop-worker test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=where,
    )  # fmt: skip
    openssl(
        "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=where,
    )  # fmt: skip
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
        cwd=where,
    )  # fmt: skip
    return Certificates(where / "ca.crt", where / "server.crt", where / "server.key")


# --- Redis over TLS -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca: Path

    def url(self, password: str = REDIS_PASSWORD, *, trust_ca: bool = True) -> str:
        query = f"?ssl_ca_certs={quote(str(self.ca))}" if trust_ca else ""
        return f"rediss://:{password}@127.0.0.1:{self.port}/0{query}"


@pytest.fixture
def tls_redis(certificates: Certificates) -> Iterator[TlsRedis]:
    """A redis-server that speaks TLS only and wants a password."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; this test starts its own TLS Redis")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certificates.cert),
            "--tls-key-file", str(certificates.key),
            "--tls-ca-cert-file", str(certificates.ca),
            "--tls-auth-clients", "no",
            "--requirepass", REDIS_PASSWORD,
            "--save", "", "--appendonly", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = TlsRedis(port, certificates.ca)
    client = redis_client(server.url(), socket_connect_timeout=0.5)
    try:

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout=10)
        yield server
    finally:
        client.close()
        proc.kill()
        proc.wait(timeout=10)


def test_check_reaches_redis_over_tls_with_the_password_from_redis_url(
    simulator: Simulator, tls_redis: TlsRedis
) -> None:
    """A rediss:// URL with a password and the CA to trust: check says connected, masked."""
    result = cli(simulator, "check", "--services-only", REDIS_URL=tls_redis.url())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"✓ Redis: connected to rediss://:***@127.0.0.1:{tls_redis.port}/0" in result.stdout
    assert REDIS_PASSWORD not in output


def test_a_wrong_redis_password_or_an_untrusted_certificate_fails_clearly(
    simulator: Simulator, tls_redis: TlsRedis
) -> None:
    """A wrong password is reported as such and never printed; so is a certificate the
    worker does not trust (no ssl_ca_certs)."""
    wrong = cli(simulator, "check", "--services-only", REDIS_URL=tls_redis.url("wrong-pass-9d3a"))
    output = wrong.stdout + wrong.stderr
    assert wrong.returncode == 1
    assert "✗ Redis: " in wrong.stdout
    assert "refused the password in REDIS_URL" in wrong.stdout
    assert "wrong-pass-9d3a" not in output
    assert REDIS_PASSWORD not in output

    untrusted = cli(simulator, "check", "--services-only", REDIS_URL=tls_redis.url(trust_ca=False))
    output = untrusted.stdout + untrusted.stderr
    assert untrusted.returncode == 1
    assert f"✗ Redis: cannot connect to rediss://:***@127.0.0.1:{tls_redis.port}/0" in output
    assert "TLS certificate is not trusted: add its CA to REDIS_URL (?ssl_ca_certs=" in output
    assert REDIS_PASSWORD not in output


def test_the_limiter_and_token_cache_live_in_the_tls_redis(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    tls_redis: TlsRedis,
) -> None:
    """A worker given the rediss:// URL paces and caches through it: the send goes out and
    the number's limiter state and phone token are in that Redis."""
    start_worker(redis_url=tls_redis.url())
    producer.send_message(client_id="acme", phone_id="phone-1", to="+919876543210", message=TEXT)
    wait_until(simulator.messages)
    client = redis_client(tls_redis.url(), decode_responses=True)
    try:
        keys = set(client.keys("verloop:*"))
    finally:
        client.close()
    assert "verloop:rl:{phone-1}:tat" in keys
    assert any(key.startswith("verloop:token:phone:") for key in keys), keys


# --- RabbitMQ over TLS ----------------------------------------------------------------------------
@pytest.fixture
def tls_rabbitmq(certificates: Certificates) -> Iterator[TcpProxy]:
    """A TLS terminator in front of RabbitMQ's plain AMQP port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    terminator = TcpProxy(tls=context)
    yield terminator
    terminator.close()


def amqps_url(port: int, ca: Path | None) -> str:
    """The test AMQP URL as amqps:// on ``port``, trusting ``ca`` if given."""
    parts = urlsplit(AMQP_URL)
    url = f"amqps://{parts.username}:{parts.password}@127.0.0.1:{port}{parts.path}"
    return url + (f"?ssl_options={quote(repr({'ca_certs': str(ca)}))}" if ca else "")


def test_an_amqps_url_gives_a_verified_tls_connection() -> None:
    """amqps:// turns on TLS with certificate and host name checks, by the URL alone."""
    parameters = pika.URLParameters("amqps://guest:guest@rabbit.example:5671/%2F")
    assert parameters.port == 5671
    assert parameters.ssl_options is not None
    context = parameters.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert pika.URLParameters(AMQP_URL).ssl_options is None


def test_a_worker_on_amqps_and_rediss_sends_a_job_and_serves_metrics_where_told(
    simulator: Simulator,
    producer: Producer,
    tmp_path: Path,
    certificates: Certificates,
    tls_redis: TlsRedis,
    tls_rabbitmq: TcpProxy,
) -> None:
    """A real worker process whose AMQP_URL is amqps:// and REDIS_URL rediss://, both with
    passwords, consumes, sends and acknowledges a job; secrets stay out of its logs; and with
    METRICS_BIND=127.0.0.2 its metrics answer there and not on 127.0.0.1."""
    port = free_port()
    env = {
        "AMQP_URL": amqps_url(tls_rabbitmq.port, certificates.ca),
        "REDIS_URL": tls_redis.url(),
        "METRICS_PORT": str(port),
        "METRICS_BIND": "127.0.0.2",
        "METRICS_DIR": str(tmp_path),
    }
    log_path = tmp_path / "worker.log"
    with worker_process(simulator, log_path, "--threads", "2", **env):
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543210", message=TEXT
        )
        wait_until(simulator.messages)
        wait_until(lambda: metrics_answer("127.0.0.2", port))
        assert not metrics_answer("127.0.0.1", port)
    assert tls_rabbitmq.handshakes >= 2  # the check at start, then the worker's connections
    assert dead_letters() == []
    assert queue_depth("verloop.send") == 0  # acknowledged over the TLS connection
    logs = log_path.read_text()
    for secret in (REDIS_PASSWORD, "guest:guest@", simulator.server.system_user_token):
        assert secret not in logs


def metrics_answer(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/metrics", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_check_explains_an_amqps_url_that_fails_tls(
    simulator: Simulator, tls_rabbitmq: TcpProxy
) -> None:
    """amqps:// against a plain AMQP port, or a server certificate it does not trust: exit 1
    with the masked URL, never the password."""
    parts = urlsplit(AMQP_URL)
    plain_port = amqps_url(parts.port or 5672, None).replace(f":{parts.password}@", ":pw-77c1@")
    untrusted = amqps_url(tls_rabbitmq.port, None).replace(f":{parts.password}@", ":pw-77c1@")
    for url, hint in (
        (plain_port, "The TLS handshake failed: is that port a TLS port"),
        (untrusted, "TLS certificate is not trusted: add its CA to AMQP_URL (?ssl_options="),
    ):
        result = cli(simulator, "check", "--services-only", AMQP_URL=url)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "✗ RabbitMQ: cannot connect to amqps://guest:***@127.0.0.1:" in result.stdout
        assert hint in result.stdout
        assert "pw-77c1" not in output


# --- job size ---------------------------------------------------------------------------------
def test_a_job_over_max_job_bytes_is_dead_lettered_naming_the_limit(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """With MAX_JOB_BYTES=2048 a 3 KB job is dead-lettered unread, a small one is sent."""
    start_worker(max_job_bytes=2048)
    producer.send_message(
        client_id="acme",
        phone_id="phone-1",
        to="+919876543210",
        message=TEXT,
        metadata={"note": "n" * 3000},
    )
    [(headers, body)] = wait_until(dead_letters)
    info = headers[DEAD_LETTER_HEADER]
    assert info["outcome"] == "invalid"
    assert f"body is {len(body)} bytes; the limit is 2048" in info["reason"]
    producer.send_message(client_id="acme", phone_id="phone-1", to="+919876543211", message=TEXT)
    [sent] = wait_until(simulator.messages)
    assert sent["to"] == "+919876543211"
