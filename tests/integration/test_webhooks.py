"""The status webhook receiver against a real RabbitMQ: the real aiohttp server (in a thread of
this process, or ``verloop-worker webhooks`` as a subprocess), real HTTP requests."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pika
import pika.exceptions
import pytest
import structlog

from tests.integration import test_security
from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    SANDBOX_PASSWORD,
    SANDBOX_USER,
    VENV_BIN,
    WorkerStarter,
    free_port,
    redis_client,
    wait_until,
)
from tests.integration.tcp_proxy import TcpProxy
from worker.jobs.producer import Producer, queue_arguments
from worker.jobs.registry import parse_job
from worker.jobs.wire import parse_envelope
from worker.observability.logging import configure_logging
from worker.receipts.links import LINK_PREFIX, status_rank
from worker.receipts.models import STATUS_ACTOR, STATUS_QUEUE, StatusJob
from worker.sandbox import SandboxConfig, SandboxServer, StatusCallbacks
from worker.settings import Settings
from worker.webhooks.serve import serve
from worker.webhooks.signature import sign

pytestmark = pytest.mark.integration

SECRET = "app-secret-for-webhook-tests-4b1d"
VERIFY_TOKEN = "verify-token-for-webhook-tests-9c2e"
EVENTS = "verloop.events"
STATUS_EXCHANGE = Settings.model_fields["status_exchange"].default
#: RabbitMQ behind a TLS terminator, and its certificates (the amqps test).
certificates = test_security.certificates
tls_rabbitmq = test_security.tls_rabbitmq


class RunningReceiver:
    """:func:`serve` on an event loop in a thread, on free ports; its log lines in ``log``."""

    def __init__(self, settings: Settings, log: io.StringIO) -> None:
        self.settings = settings
        self.log = log
        self.url = f"http://127.0.0.1:{settings.webhook_port}{settings.webhook_path}"
        self.metrics_url = f"http://127.0.0.1:{settings.webhook_metrics_port}"
        self.http = httpx.Client(timeout=15)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(self._answers, timeout=15)

    def _run(self) -> None:
        self._loop.run_until_complete(serve(self.settings, stop=self._stop))

    def _answers(self) -> bool:
        try:
            return self.http.get(self.metrics_url + "/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def post(
        self, body: bytes, *, signature: str | None = "good", **headers: str
    ) -> httpx.Response:
        if signature == "good":
            signature = sign(body, SECRET.encode())
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        return self.http.post(self.url, content=body, headers=headers)

    def metric(self, name: str) -> float:
        for line in self.http.get(self.metrics_url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()
        self.http.close()


@pytest.fixture
def channel() -> Iterator[Any]:
    """A channel on the test vhost; verloop.status (and its .DQ, .XQ) deleted before and
    after."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    chan = connection.channel()
    queues = [STATUS_QUEUE + suffix for suffix in ("", ".DQ", ".XQ")]
    for queue in queues:
        chan.queue_delete(queue)
    yield chan
    if chan.is_open:
        for queue in queues:
            chan.queue_delete(queue)
    connection.close()


def declare_status_queue(chan: Any) -> None:
    """As a worker declares it at start, bound to the statuses exchange."""
    chan.queue_declare(STATUS_QUEUE, durable=True, arguments=queue_arguments(STATUS_QUEUE))
    chan.exchange_declare(STATUS_EXCHANGE, exchange_type="direct", durable=True)
    chan.queue_bind(STATUS_QUEUE, STATUS_EXCHANGE, routing_key=STATUS_QUEUE)


@pytest.fixture
def start_receiver() -> Iterator[Callable[..., RunningReceiver]]:
    """Start a receiver with test settings (overridable); stopped at teardown, logging reset."""
    started: list[RunningReceiver] = []
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def start(**overrides: Any) -> RunningReceiver:
        values: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "redis_url": REDIS_URL,
            "webhook_app_secret": SECRET,
            "webhook_verify_token": VERIFY_TOKEN,
            "webhook_bind": "127.0.0.1",
            "webhook_port": free_port(),
            "metrics_bind": "127.0.0.1",
            "webhook_metrics_port": free_port(),
            "webhook_publish_timeout_s": 3.0,
            "webhook_batch_linger_ms": 5.0,
        }
        values.update(overrides)
        log = io.StringIO()
        configure_logging("json", "INFO", stream=log)
        receiver = RunningReceiver(Settings(**values), log)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def webhook(
    statuses: list[Any] | None = None,
    messages: list[Any] | None = None,
    *,
    field: str = "messages",
    phone_number_id: str = "106540352242922",
    contacts: list[Any] | None = None,
) -> bytes:
    """A body in Meta's Cloud API shape."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
    }
    if statuses is not None:
        value["statuses"] = statuses
    if messages is not None:
        value["messages"] = messages
    if contacts is not None:
        value["contacts"] = contacts
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": field}]}],
    }
    return json.dumps(body).encode()


def status(wamid: str = "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJDQjZCMzlEQUE4OTJBMTE4RTUA", **extra: Any):  # type: ignore[no-untyped-def]
    return {
        "id": wamid,
        "status": "delivered",
        "timestamp": "1700000000",
        "recipient_id": "919876543210",
        "conversation": {"id": "c0ffee", "origin": {"type": "marketing"}},
        "pricing": {"billable": True, "pricing_model": "CBP", "category": "marketing"},
        **extra,
    }


def take_jobs(chan: Any) -> list[tuple[Any, dict[str, Any]]]:
    """Every message on verloop.status: (properties, envelope)."""
    jobs = []
    while True:
        method, properties, body = chan.basic_get(STATUS_QUEUE, auto_ack=True)
        if method is None:
            return jobs
        jobs.append((properties, json.loads(body)))


# --- statuses ----------------------------------------------------------------------------------
def test_a_signed_status_becomes_a_confirmed_persistent_status_job(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver()
    failed = status(
        "wamid.failed1",
        status="failed",
        errors=[
            {
                "code": 131026,
                "title": "Message undeliverable",
                "message": "Message undeliverable",
                "error_data": {"details": "Message Undeliverable."},
            }
        ],
    )
    before = int(time.time() * 1000)
    answer = receiver.post(webhook([status(), failed]))
    after = int(time.time() * 1000)
    assert (answer.status_code, answer.text) == (200, "ok")
    # Answered only after the confirm: the job is on the queue already.
    [(properties, envelope)] = take_jobs(channel)
    assert properties.delivery_mode == 2
    assert properties.message_id == envelope["message_id"]
    assert envelope["actor_name"] == STATUS_ACTOR
    first, second = envelope["kwargs"]["statuses"]
    assert before <= first.pop("received_at_ms") <= after
    assert first == {
        "wamid": "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJDQjZCMzlEQUE4OTJBMTE4RTUA",
        "status": "delivered",
        "timestamp": 1700000000,
        "recipient_id": "919876543210",
        "phone_number_id": "106540352242922",
        "pricing_category": "marketing",
    }
    assert second["errors"] == [
        {
            "code": 131026,
            "title": "Message undeliverable",
            "message": "Message undeliverable",
            "details": "Message Undeliverable.",
        }
    ]
    # The worker would take it: a valid envelope and a valid record_statuses job.
    raw = json.dumps(envelope).encode()
    parsed = parse_envelope(raw, queue=STATUS_QUEUE, max_bytes=262144, max_delay_ms=10**9)
    job = parse_job(STATUS_ACTOR, (), parsed["kwargs"])
    assert isinstance(job, StatusJob)
    assert len(job.statuses) == 2
    assert receiver.metric('verloop_webhook_requests_total{result="accepted"}') == 1
    assert receiver.metric('verloop_webhook_items_total{kind="status"}') == 2


def test_statuses_of_concurrent_requests_share_a_job_and_each_waits_for_its_confirm(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver(webhook_batch_linger_ms=300.0, webhook_batch_max=3)
    bodies = [webhook([status(f"wamid.batch{n}")]) for n in range(4)]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(receiver.post, bodies))
    assert [a.status_code for a in answers] == [200] * 4
    jobs = take_jobs(channel)
    sizes = sorted(len(envelope["kwargs"]["statuses"]) for _, envelope in jobs)
    assert sizes == [1, 3]  # three filled a batch at once; the fourth waited for the linger
    assert time.monotonic() - started >= 0.3
    wamids = {s["wamid"] for _, e in jobs for s in e["kwargs"]["statuses"]}
    assert wamids == {f"wamid.batch{n}" for n in range(4)}


def test_a_status_that_does_not_fit_goes_alone_and_the_others_are_not_held_back(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver()
    bad = status("wamid with spaces", timestamp="yesterday")
    answer = receiver.post(webhook([status("wamid.good1"), bad, status("wamid.good2")]))
    assert answer.status_code == 200
    jobs = [envelope["kwargs"]["statuses"] for _, envelope in take_jobs(channel)]
    assert sorted(len(statuses) for statuses in jobs) == [1, 2]
    [alone] = [statuses[0] for statuses in jobs if len(statuses) == 1]
    assert (alone["wamid"], alone["timestamp"]) == ("wamid with spaces", "yesterday")
    assert "published alone" in receiver.log.getvalue()


def test_items_that_are_not_statuses_are_ignored_and_counted(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver()
    assert receiver.post(webhook(["not an object", 42])).status_code == 200
    assert receiver.post(webhook([status()], field="account_update")).status_code == 200
    assert take_jobs(channel) == []
    assert receiver.metric('verloop_webhook_items_total{kind="ignored"}') == 3
    assert "webhook items ignored" in receiver.log.getvalue()


# --- refusals -----------------------------------------------------------------------------------
def test_a_forged_or_missing_signature_is_401_and_publishes_nothing(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver()
    body = webhook([status()])
    forged = sign(body, b"not-the-app-secret")
    other_body = sign(webhook([status("wamid.other")]), SECRET.encode())
    for signature in (forged, other_body, None, "sha256=", "sha1=" + "0" * 40):
        answer = receiver.post(body, signature=signature)
        assert answer.status_code == 401, signature
    time.sleep(0.2)
    assert channel.queue_declare(STATUS_QUEUE, passive=True).method.message_count == 0
    assert receiver.metric('verloop_webhook_requests_total{result="bad_signature"}') == 5


def test_a_body_over_the_limit_is_413_unread(
    start_receiver: Callable[..., RunningReceiver],
) -> None:
    receiver = start_receiver(webhook_max_body_bytes=2048)
    big = webhook([status(f"wamid.n{n}") for n in range(40)])
    assert len(big) > 2048
    answer = receiver.post(big)
    assert answer.status_code == 413
    assert answer.headers.get("Connection", "").lower() == "close"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield big[:1500]
        yield big[1500:]

    answer = receiver.http.post(
        receiver.url, content=chunks(), headers={"X-Hub-Signature-256": sign(big, SECRET.encode())}
    )
    assert answer.status_code == 413
    assert receiver.metric('verloop_webhook_requests_total{result="too_large"}') == 2


def test_a_body_that_is_not_a_webhook_is_400(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver()

    def nest(depth: int) -> list[Any]:
        deep: list[Any] = []
        for _ in range(depth):
            deep = [deep]
        return deep

    nested = (  # bodies that can be read but not written again (orjson: 255 levels; json: 1000)
        webhook([status()], messages=[{"id": "wamid.in", "deep": nest(300)}]),
        webhook([status("wamid.ok"), status("wamid bad", errors=[{"title": "DEEP"}])]).replace(
            b'"DEEP"', b"[" * 1000 + b"]" * 1000
        ),
    )
    for body in (b"{not json", b"[1, 2]", b'{"entry": "x"}', b'"\\ud800"', *nested):
        assert receiver.post(body).status_code == 400, body[:40]
    assert receiver.metric('verloop_webhook_requests_total{result="malformed"}') == 6
    assert take_jobs(channel) == []


def test_other_paths_are_404_and_counted(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver()
    answer = receiver.http.post(receiver.url.replace("whatsapp", "other"), content=b"{}")
    assert answer.status_code == 404
    assert receiver.metric('verloop_webhook_requests_total{result="not_found"}') == 1


# --- RabbitMQ cannot take it ---------------------------------------------------------------------
def test_rabbitmq_unreachable_is_503_at_once(
    start_receiver: Callable[..., RunningReceiver],
) -> None:
    receiver = start_receiver(amqp_url="amqp://guest:guest@127.0.0.1:1/")
    started = time.monotonic()
    answer = receiver.post(webhook([status()]))
    assert answer.status_code == 503
    assert time.monotonic() - started < 2
    assert receiver.http.get(receiver.metrics_url + "/healthz").json()["rabbitmq"] == (
        "not connected"
    )
    assert "RabbitMQ cannot be reached" in receiver.log.getvalue()
    assert receiver.metric('verloop_webhook_requests_total{result="unavailable"}') == 1


def test_the_receiver_reconnects_after_rabbitmq_went_away_without_a_restart(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    proxy = TcpProxy()
    try:
        vhost = urlsplit(AMQP_URL).path
        receiver = start_receiver(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}{vhost}")
        health = receiver.metrics_url + "/healthz"
        answers: dict[str, int] = {}

        def post(n: int) -> int:
            answers[f"wamid.r{n}"] = receiver.post(webhook([status(f"wamid.r{n}")])).status_code
            return answers[f"wamid.r{n}"]

        assert post(0) == 200
        proxy.sever()  # the connection breaks: answered 503 until a new one is open
        wait_until(lambda: post(len(answers)) == 200, timeout=10, interval=0.1)
        proxy.refuse = True  # RabbitMQ unreachable: 503 at once, and said so
        proxy.sever()
        wait_until(lambda: post(len(answers)) == 503, timeout=10, interval=0.1)
        assert receiver.http.get(health).json()["rabbitmq"] == "not connected"
        refused_at = time.monotonic()
        assert post(len(answers)) == 503
        assert time.monotonic() - refused_at < 1
        proxy.refuse = False  # back: tried again within a second
        wait_until(lambda: post(len(answers)) == 200, timeout=10, interval=0.2)
        assert receiver.http.get(health).json()["rabbitmq"] == "connected"
    finally:
        proxy.close()
    assert set(answers.values()) == {200, 503}
    on_queue = {s["wamid"] for _, e in take_jobs(channel) for s in e["kwargs"]["statuses"]}
    assert {wamid for wamid, code in answers.items() if code == 200} <= on_queue
    assert "RabbitMQ cannot be reached" in receiver.log.getvalue()


def test_a_missing_status_queue_is_503_saying_to_start_a_worker(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    channel.exchange_declare(STATUS_EXCHANGE, exchange_type="direct", durable=True)
    receiver = start_receiver()  # verloop.status was deleted (its binding with it)
    assert receiver.post(webhook([status()])).status_code == 503
    assert "start a worker: it declares the queue and binds it" in receiver.log.getvalue()
    declare_status_queue(channel)
    assert receiver.post(webhook([status()])).status_code == 200  # no restart needed
    assert len(take_jobs(channel)) == 1


def test_a_missing_status_exchange_is_503_saying_to_start_a_worker(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver(status_exchange="verloop.statuses-never-declared")
    assert receiver.post(webhook([status()])).status_code == 503
    log = receiver.log.getvalue()
    assert "exchange 'verloop.statuses-never-declared' does not exist: start a worker" in log
    assert take_jobs(channel) == []


# --- inbound messages --------------------------------------------------------------------------
@pytest.fixture
def inbound_queue(channel: Any) -> str:
    """A queue bound to the events exchange for every inbound message."""
    channel.exchange_declare(EVENTS, exchange_type="topic", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, EVENTS, routing_key="inbound.message.#")
    return str(queue)


def test_an_inbound_message_becomes_an_event(
    start_receiver: Callable[..., RunningReceiver], channel: Any, inbound_queue: str
) -> None:
    receiver = start_receiver()
    message = {
        "from": "919876543210",
        "id": "wamid.inbound1",
        "timestamp": "1700000100",
        "type": "text",
        "text": {"body": "STOP"},
    }
    contacts = [{"profile": {"name": "Asha"}, "wa_id": "919876543210"}]
    body = webhook(messages=[message], contacts=contacts, phone_number_id="1065.40*35")
    assert receiver.post(body).status_code == 200
    method, properties, raw = channel.basic_get(inbound_queue, auto_ack=True)
    assert method is not None
    assert method.routing_key == "inbound.message.1065_40_35"
    assert properties.delivery_mode == 2
    event = json.loads(raw)
    assert event.pop("at") > 0
    assert event == {
        "version": 1,
        "event": "inbound.message",
        "phone_number_id": "1065.40*35",
        "display_phone_number": "15550783881",
        "message": message,
        "contacts": contacts,
    }
    assert receiver.metric('verloop_webhook_items_total{kind="message"}') == 1


def test_an_inbound_message_without_the_events_exchange_is_503(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver(events_exchange="verloop.events-never-declared")
    body = webhook(messages=[{"from": "1", "id": "wamid.x", "type": "text"}])
    assert receiver.post(body).status_code == 503
    assert "exchange 'verloop.events-never-declared' does not exist" in receiver.log.getvalue()
    assert receiver.post(webhook([status()])).status_code == 200  # statuses still go


# --- verification -------------------------------------------------------------------------------
def test_the_verification_get_answers_the_challenge_only_for_the_right_token(
    start_receiver: Callable[..., RunningReceiver],
) -> None:
    receiver = start_receiver()

    def verify(**params: str) -> httpx.Response:
        return receiver.http.get(receiver.url, params=params)

    right = {
        "hub.mode": "subscribe",
        "hub.verify_token": VERIFY_TOKEN,
        "hub.challenge": "1158201444",
    }
    answer = verify(**right)
    assert (answer.status_code, answer.text) == (200, "1158201444")
    assert verify(**{**right, "hub.verify_token": "wrong"}).status_code == 403
    assert verify(**{**right, "hub.verify_token": VERIFY_TOKEN[:-1]}).status_code == 403
    assert verify(**{**right, "hub.mode": "unsubscribe"}).status_code == 403
    assert verify(**{k: v for k, v in right.items() if k != "hub.verify_token"}).status_code == 403
    assert receiver.metric('verloop_webhook_requests_total{result="verified"}') == 1
    assert receiver.metric('verloop_webhook_requests_total{result="verify_refused"}') == 4


def test_without_a_verify_token_every_verification_is_refused(
    start_receiver: Callable[..., RunningReceiver],
) -> None:
    receiver = start_receiver(webhook_verify_token=None)
    params = {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"}
    assert receiver.http.get(receiver.url, params=params).status_code == 403
    assert "WEBHOOK_VERIFY_TOKEN is not set" in receiver.log.getvalue()


# --- the command ---------------------------------------------------------------------------------
def _receiver_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "AMQP", "LOG_"))}
    env.update(AMQP_URL=AMQP_URL, LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    return env | extra


def test_the_command_refuses_to_start_without_the_app_secret() -> None:
    done = subprocess.run(
        [str(VENV_BIN / "verloop-worker"), "webhooks"],
        env=_receiver_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "WEBHOOK_APP_SECRET is not set" in done.stderr


def test_the_command_refuses_an_amqp_url_it_cannot_read_without_showing_it() -> None:
    done = subprocess.run(
        [str(VENV_BIN / "verloop-worker"), "webhooks"],
        env=_receiver_env(
            WEBHOOK_APP_SECRET=SECRET, AMQP_URL="amqp://u:hunter2-secret@h/?heartbeat=x"
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "AMQP_URL" in done.stderr
    assert "hunter2-secret" not in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_the_command_help_names_its_settings_and_leaves_tls_to_the_ingress() -> None:
    done = subprocess.run(
        [str(VENV_BIN / "verloop-worker"), "webhooks", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    for name in ("WEBHOOK_APP_SECRET", "WEBHOOK_VERIFY_TOKEN", "WEBHOOK_PORT", "AMQP_URL"):
        assert name in done.stdout
    assert "TLS belongs to the ingress" in " ".join(done.stdout.split())


def test_the_command_answers_in_flight_requests_on_sigterm_and_never_shows_its_secrets(
    channel: Any, tmp_path: Path
) -> None:
    declare_status_queue(channel)
    port, metrics_port = free_port(), free_port()
    env = _receiver_env(
        WEBHOOK_APP_SECRET=SECRET,
        WEBHOOK_VERIFY_TOKEN=VERIFY_TOKEN,
        WEBHOOK_BIND="127.0.0.1",
        WEBHOOK_PORT=str(port),
        WEBHOOK_METRICS_PORT=str(metrics_port),
        METRICS_BIND="127.0.0.1",
        WEBHOOK_BATCH_LINGER_MS="700",  # the request is still waiting when SIGTERM comes
    )
    log_path = tmp_path / "webhooks.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "verloop-worker"), "webhooks"], env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}/webhooks/whatsapp"
    answers: list[httpx.Response] = []
    try:
        wait_until(lambda: b"webhook receiver listening" in log_path.read_bytes(), timeout=30)
        with httpx.Client(timeout=10) as http:
            body = webhook([status("wamid.inflight")])
            bad = http.post(
                url, content=body, headers={"X-Hub-Signature-256": "sha256=" + "0" * 64}
            )
            answers.append(bad)
            params = {"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "7"}
            answers.append(http.get(url, params=params))
            signature = sign(body, SECRET.encode())

            def post() -> None:
                answers.append(
                    http.post(url, content=body, headers={"X-Hub-Signature-256": signature})
                )

            sender = threading.Thread(target=post)
            sender.start()
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            sender.join(15)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [a.status_code for a in answers] == [401, 403, 200]
    [(_, envelope)] = take_jobs(channel)
    assert envelope["kwargs"]["statuses"][0]["wamid"] == "wamid.inflight"
    output = log_path.read_text()
    assert "webhook receiver stopped" in output
    for secret in (SECRET, VERIFY_TOKEN):
        assert secret not in output
        assert all(secret not in a.text and secret not in str(a.headers) for a in answers)


def test_secrets_never_reach_the_log_or_the_answers(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    declare_status_queue(channel)
    receiver = start_receiver()
    body = webhook([status()])
    answers = [
        receiver.post(body),
        receiver.post(body, signature=sign(body, b"forged")),
        receiver.post(b"x" * 10, signature=sign(b"x" * 10, SECRET.encode())),
        receiver.http.get(receiver.url, params={"hub.mode": "subscribe", "hub.verify_token": "x"}),
        receiver.http.get(
            receiver.url,
            params={
                "hub.mode": "subscribe",
                "hub.verify_token": VERIFY_TOKEN,
                "hub.challenge": "5",
            },
        ),
        receiver.http.get(receiver.metrics_url + "/metrics"),
        receiver.http.get(receiver.metrics_url + "/healthz"),
    ]
    assert [a.status_code for a in answers] == [200, 401, 400, 403, 200, 200, 200]
    seen = receiver.log.getvalue() + "".join(a.text + str(a.headers) for a in answers)
    assert SECRET not in seen
    assert VERIFY_TOKEN not in seen
    assert sign(body, SECRET.encode()) not in seen


def test_statuses_reach_the_queue_over_amqps(
    start_receiver: Callable[..., RunningReceiver],
    channel: Any,
    tls_rabbitmq: Any,
    certificates: Any,
) -> None:
    """AMQP_URL is read as the worker reads it (pika's URL, ssl_options included)."""
    declare_status_queue(channel)
    receiver = start_receiver(amqp_url=test_security.amqps_url(tls_rabbitmq.port, certificates.ca))
    assert receiver.post(webhook([status()])).status_code == 200
    assert tls_rabbitmq.handshakes >= 1
    assert len(take_jobs(channel)) == 1


# --- the whole loop -------------------------------------------------------------------------------
def test_the_simulators_statuses_reach_the_status_actor_through_the_receiver(
    start_receiver: Callable[..., RunningReceiver], channel: Any
) -> None:
    """Sends through a real worker; the simulator posts their statuses (duplicated, out of
    order) to the receiver; the worker's status actor records each message as read."""
    receiver = start_receiver()
    statuses = StatusCallbacks(
        url=receiver.url,
        app_secret=SECRET,
        delay_min_s=0.01,
        delay_max_s=0.05,
        delivered=1.0,
        read=1.0,
        failed=0.0,
        duplicate=0.5,
        reorder=0.5,
        seed=15,
    )
    config = SandboxConfig(username=SANDBOX_USER, password=SANDBOX_PASSWORD, statuses=statuses)
    with SandboxServer(config) as server:

        def make_settings(**overrides: Any) -> Settings:
            values: dict[str, Any] = {
                "amqp_url": AMQP_URL,
                "redis_url": REDIS_URL,
                "verloop_base_url": server.url,
                "verloop_username": SANDBOX_USER,
                "verloop_password": SANDBOX_PASSWORD,
                "metrics_port": 0,
            }
            return Settings(**(values | overrides))

        workers = WorkerStarter(make_settings)
        try:
            workers(threads=4)
            with Producer(AMQP_URL) as producer:
                for n in range(3):
                    producer.send_message(
                        client_id="acme",
                        phone_id="phone-1",
                        to=f"+9198765432{n:02d}",
                        message={"type": "text", "text": {"body": f"hi {n}"}},
                    )
            cache = redis_client(decode_responses=True)

            def all_read() -> bool:
                keys = list(cache.scan_iter(match=LINK_PREFIX + "*"))
                best = [cache.hget(key, "best") for key in keys]
                return len(keys) == 3 and best == [str(status_rank("read"))] * 3

            wait_until(all_read, timeout=30)
        finally:
            workers.stop_all()
    assert receiver.metric('verloop_webhook_requests_total{result="bad_signature"}') == 0
    assert receiver.metric('verloop_webhook_items_total{kind="status"}') >= 9
