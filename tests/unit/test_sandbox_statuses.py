"""The simulator's status webhooks: what it plans per send (seeded), and what a real HTTP
receiver gets from it (signed bodies in Meta's shape, retries, no effect on the send path)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from aiohttp import web

from worker.receipts.models import WAMID_PATTERN
from worker.sandbox import PhoneNumber, SandboxConfig, SandboxServer, StatusCallbacks
from worker.sandbox.status_plan import plan_statuses
from worker.sandbox.validation import FaultConfigError

SECRET = "app-secret-4f1c9e"
BASE = "/api/v2/whatsapp"
TEXT = {"messaging_product": "whatsapp", "type": "text", "text": {"body": "hi"}}
#: Fast and certain: every send is sent, delivered and read, with no delay.
ALL_READ = {"delay_min_s": 0.0, "delay_max_s": 0.0, "delivered": 1.0, "read": 1.0, "failed": 0.0}


# --- a real webhook receiver -------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One POST the receiver got."""

    body: dict[str, Any]
    signed: bool
    answered: int


class Receiver:
    """An aiohttp server on a background thread standing in for the webhook receiver: it
    records every POST, checks its signature, and answers ``answers`` first (then 200)."""

    def __init__(
        self, secret: str = SECRET, *, answers: Iterable[int] = (), delay_s: float = 0.0
    ) -> None:
        self.secret = secret.encode()
        self.answers = deque(answers)
        self.delay_s = delay_s
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        expected = "sha256=" + hmac.new(self.secret, raw, hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(request.headers.get("X-Hub-Signature-256", ""), expected)
        with self._lock:
            answer = self.answers.popleft() if self.answers else 200
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        with self._lock:
            self.received.append(Received(json.loads(raw), signed, answer))
        return web.Response(status=answer)

    async def _main(self, started: threading.Event) -> None:
        app = web.Application()
        app.router.add_post("/webhooks/whatsapp", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/whatsapp"
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def __enter__(self) -> Self:
        started = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(started)), daemon=True
        )
        self._thread.start()
        assert started.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def statuses(self, *, accepted_only: bool = True) -> list[dict[str, Any]]:
        """Every status in the bodies received (only those answered 2xx by default)."""
        with self._lock:
            received = list(self.received)
        return [
            status
            for r in received
            if not accepted_only or 200 <= r.answered < 300
            for entry in r.body["entry"]
            for change in entry["changes"]
            for status in change["value"]["statuses"]
        ]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``count`` accepted statuses came; return them (fail after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(found := self.statuses()) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} statuses came"
            time.sleep(0.01)
        return found


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def simulator(receiver_url: str | None, **settings: Any) -> SandboxServer:
    statuses = StatusCallbacks(url=receiver_url, app_secret=SECRET, seed=7, **settings)
    return SandboxServer(SandboxConfig(statuses=statuses))


def phone_token(http: httpx.Client, server: SandboxServer, phone_id: str = "demo-phone-1") -> str:
    response = http.get(
        f"{BASE}/get_phone_token",
        params={"client_id": "demo-client", "phone_id": phone_id},
        headers={"Authorization": server.system_user_token},
    )
    token: str = response.json()["token"]
    return token


def send(http: httpx.Client, token: str, to: str = "+91 98765 43210", **body: Any) -> str:
    response = http.post(
        f"{BASE}/send_message",
        json={**TEXT, "to": to, **body},
        headers={"Authorization": token},
    )
    assert response.status_code == 200, response.text
    wamid: str = response.json()["messages"][0]["id"]
    return wamid


def settled(http: httpx.Client, timeout: float = 5.0) -> dict[str, Any]:
    """The simulator's status counters once nothing is pending."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = http.get("/admin/stats").json()["statuses"]
        if not stats["pending"]:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)


def by_wamid(statuses: list[dict[str, Any]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for status in statuses:
        found.setdefault(status["id"], []).append(status["status"])
    return found


def plans(config: StatusCallbacks, count: int, seed: int = 1) -> list[Any]:
    rng = random.Random(seed)
    return [
        plan_statuses(
            config, rng, wamid=f"wamid.{n}", recipient_id="91", message_type="text", now=1e9
        )
        for n in range(count)
    ]


# --- what is planned ------------------------------------------------------------------------


def test_a_read_message_reports_sent_delivered_read_in_meta_s_shape() -> None:
    """sent and delivered carry conversation and pricing, read carries neither; timestamps
    are Unix seconds as strings, in order."""
    config = StatusCallbacks(delay_min_s=1.0, delay_max_s=1.0, delivered=1.0, read=1.0, failed=0)
    [plan] = plans(config, 1)
    statuses = [status for _, status in plan.posts]
    assert [s["status"] for s in statuses] == ["sent", "delivered", "read"]
    assert [s["timestamp"] for s in statuses] == ["1000000001", "1000000002", "1000000003"]
    assert {(s["id"], s["recipient_id"]) for s in statuses} == {("wamid.0", "91")}
    sent, delivered, read = statuses
    assert sent["conversation"]["origin"] == {"type": "service"}
    assert sent["conversation"]["expiration_timestamp"] == "1000086401"
    assert delivered["pricing"]["category"] == "service"
    assert "conversation" not in read
    assert "pricing" not in read
    assert plan.best == "read"


def test_a_failed_message_gets_an_error_and_no_delivered_unless_multi_device() -> None:
    """A failure carries Meta's error object; only multi_device adds a delivered after it."""
    config = StatusCallbacks(failed=1.0, delivered=0.0, failure_codes={131048: 1.0})
    [plan] = plans(config, 1)
    assert [s["status"] for _, s in plan.posts] == ["sent", "failed"]
    [error] = plan.posts[1][1]["errors"]
    assert error["code"] == 131048
    assert error["title"] == error["message"] == "Spam rate limit hit"
    assert error["error_data"]["details"]
    assert "pricing" not in plan.posts[1][1]
    assert plan.best == "failed"
    both = StatusCallbacks(failed=1.0, delivered=0.0, multi_device=1.0, read=0.0)
    [later] = plans(both, 1)
    assert [s["status"] for _, s in later.posts] == ["sent", "failed", "delivered"]
    assert later.best == "delivered"


def test_shares_and_failure_codes_come_out_as_configured() -> None:
    """Over 4,000 seeded sends the outcomes match the shares within a few percent."""
    config = StatusCallbacks(
        delivered=0.75, read=0.5, failed=0.2, failure_codes={131026: 1.0, 131049: 1.0}
    )
    drawn = plans(config, 4000)
    best = Counter(plan.best for plan in drawn)
    codes = Counter(
        status["errors"][0]["code"]
        for plan in drawn
        for _, status in plan.posts
        if status["status"] == "failed"
    )
    assert best["failed"] == pytest.approx(800, abs=80)
    assert best["read"] + best["delivered"] == pytest.approx(2400, abs=120)  # 0.75 of 0.8
    assert best["read"] == pytest.approx((best["read"] + best["delivered"]) * 0.5, abs=120)
    assert best["sent"] == pytest.approx(800, abs=80)
    assert codes[131026] == pytest.approx(codes[131049], abs=100)


def test_the_same_seed_plans_the_same_statuses() -> None:
    config = StatusCallbacks(duplicate=0.3, reorder=0.5, multi_device=0.5, failed=0.3)
    assert plans(config, 50, seed=3) == plans(config, 50, seed=3)
    assert plans(config, 50, seed=3) != plans(config, 50, seed=4)


def test_reordered_statuses_keep_their_true_timestamps() -> None:
    """With reorder 1 no message's statuses are posted in the order they happened, yet sorted
    by timestamp they are sent, delivered, read."""
    config = StatusCallbacks(**{**ALL_READ, "delay_min_s": 1.0, "delay_max_s": 1.0}, reorder=1.0)
    for plan in plans(config, 20):
        posted = [status["status"] for _, status in plan.posts]
        assert posted != ["sent", "delivered", "read"]
        truth = sorted((s["timestamp"], s["status"]) for _, s in plan.posts)
        assert [name for _, name in truth] == ["sent", "delivered", "read"]


def test_duplicates_are_posted_twice() -> None:
    config = StatusCallbacks(**ALL_READ, duplicate=1.0)
    [plan] = plans(config, 1)
    assert [s["status"] for _, s in plan.posts] == ["sent"] * 2 + ["delivered"] * 2 + ["read"] * 2


def test_templates_are_priced_in_the_template_category() -> None:
    config = StatusCallbacks(template_category="utility", delivered=1.0, failed=0.0)
    plan = plan_statuses(
        config, random.Random(1), wamid="w", recipient_id="1", message_type="template", now=0
    )
    assert plan.posts[0][1]["pricing"]["category"] == "utility"


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"failed": -0.1}, "failed must be >= 0"),
        ({"read": 1.5}, "probability"),
        ({"delay_min_s": 2.0, "delay_max_s": 1.0}, "delay_max_s"),
        ({"failure_codes": {}}, "failure_codes"),
        ({"failure_codes": {"x": 1}}, "error codes"),
        ({"url": "ftp://host/x", "app_secret": "s"}, "http(s) URL"),
        ({"url": "http://u:p@host/x", "app_secret": "s"}, "credentials"),
        ({"url": "http://host/x"}, "app_secret is required"),
        ({"batch": 0}, "batch"),
        ({"numbers": {"p": {"phone_number_id": ""}}}, "phone_number_id"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(
    settings: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(FaultConfigError, match=re.escape(fragment)):
        StatusCallbacks.from_json(settings)


def test_the_app_secret_is_in_no_repr_json_or_error() -> None:
    config = StatusCallbacks(url="http://127.0.0.1:1/x", app_secret=SECRET)
    assert SECRET not in repr(config)
    assert SECRET not in repr(SandboxConfig(statuses=config))
    assert SECRET not in json.dumps(config.to_json())
    assert config.to_json()["app_secret_set"] is True
    with pytest.raises(FaultConfigError) as refused:
        StatusCallbacks(url="http://127.0.0.1:1/x", app_secret=SECRET, read=2.0)
    assert SECRET not in str(refused.value)
    with pytest.raises(FaultConfigError) as wrong_type:
        StatusCallbacks.from_json({"app_secret": [SECRET]})
    assert SECRET not in str(wrong_type.value)


def test_json_round_trips_and_a_base_fills_in_missing_keys() -> None:
    config = StatusCallbacks(
        url="http://127.0.0.1:1/x",
        app_secret=SECRET,
        failure_codes={131049: 1.0},
        numbers={"demo-phone-1": PhoneNumber("106540352242922", "15550783881")},
    )
    again = StatusCallbacks.from_json(config.to_json(), base=config)
    assert again == config
    assert StatusCallbacks.from_json({"read": 0.1}, base=config).app_secret == SECRET
    assert config.number_for("demo-phone-1").phone_number_id == "106540352242922"
    made_up = config.number_for("other")
    assert made_up.phone_number_id == "other"
    assert made_up == config.number_for("other")
    assert re.fullmatch(r"1555\d{7}", made_up.display_phone_number)


# --- through HTTP -----------------------------------------------------------------------------


def test_simulator_message_ids_are_valid_wamids() -> None:
    with SandboxServer() as server, httpx.Client(base_url=server.url) as http:
        wamid = send(http, phone_token(http, server))
    assert wamid.startswith("wamid.")
    assert re.fullmatch(WAMID_PATTERN, wamid)


def test_every_accepted_send_gets_its_signed_statuses(receiver: Receiver) -> None:
    """Twenty sends from two numbers: sixty statuses in order, every body signed and shaped as
    Meta's, with each number's metadata."""
    numbers = {"demo-phone-1": PhoneNumber("106540352242922", "15550783881")}
    with (
        simulator(receiver.url, **ALL_READ, numbers=numbers) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        tokens = {
            phone: phone_token(http, server, phone) for phone in numbers | {"demo-phone-2": 0}
        }
        sent = {
            send(http, tokens[phone], to=f"+9198765{n:05}"): (phone, f"9198765{n:05}")
            for n in range(10)
            for phone in tokens
        }
        statuses = receiver.wait_for(60)
        stats = settled(http)
    assert all(r.signed for r in receiver.received)
    assert by_wamid(statuses) == {wamid: ["sent", "delivered", "read"] for wamid in sent}
    for r in receiver.received:
        assert r.body["object"] == "whatsapp_business_account"
        [entry] = r.body["entry"]
        assert entry["id"] == "100000000000001"
        [change] = entry["changes"]
        assert change["field"] == "messages"
        value = change["value"]
        [status] = value["statuses"]
        phone, recipient = sent[status["id"]]
        assert status["recipient_id"] == recipient
        assert value["messaging_product"] == "whatsapp"
        expected_id = "106540352242922" if phone == "demo-phone-1" else "demo-phone-2"
        assert value["metadata"]["phone_number_id"] == expected_id
    assert stats["planned"] == stats["posted"] == stats["requests"] == 60
    assert (stats["pending"], stats["retried"], stats["dropped"]) == (0, 0, 0)
    assert stats["best"] == {"read": 20}


def test_duplicates_and_reordering_reach_the_receiver(receiver: Receiver) -> None:
    """Seeded: every status comes twice, and each message's statuses out of order."""
    with (
        simulator(receiver.url, **ALL_READ, duplicate=1.0, reorder=1.0) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        token = phone_token(http, server)
        wamids = [send(http, token) for _ in range(5)]
        statuses = receiver.wait_for(30)
    for wamid, posted in by_wamid(statuses).items():
        assert wamid in wamids
        assert Counter(posted) == {"sent": 2, "delivered": 2, "read": 2}
        assert posted[::2] != ["sent", "delivered", "read"]


def test_a_failing_receiver_gets_retries_then_the_status(receiver: Receiver) -> None:
    """Two 500s and a 503: the statuses refused are tried again until they are taken."""
    receiver.answers.extend([500, 500, 503])
    settings = {**ALL_READ, "read": 0.0, "retry_backoff_s": 0.01}
    with simulator(receiver.url, **settings) as server, httpx.Client(base_url=server.url) as http:
        wamid = send(http, phone_token(http, server))
        statuses = receiver.wait_for(2)
        stats = settled(http)
    assert [r.answered for r in receiver.received] == [500, 500, 503, 200, 200]
    posts = Counter(
        r.body["entry"][0]["changes"][0]["value"]["statuses"][0]["status"]
        for r in receiver.received
    )
    assert posts.total() == 5
    assert {wamid: sorted(posted) for wamid, posted in by_wamid(statuses).items()} == {
        wamid: ["delivered", "sent"]
    }
    assert (stats["retried"], stats["failed_requests"], stats["posted"]) == (3, 3, 2)
    assert stats["dropped"] == 0


def test_statuses_are_dropped_and_counted_after_the_last_attempt(receiver: Receiver) -> None:
    receiver.answers.extend([502] * 10)
    settings = {**ALL_READ, "read": 0.0, "retry_backoff_s": 0.0, "max_attempts": 2}
    with simulator(receiver.url, **settings) as server, httpx.Client(base_url=server.url) as http:
        send(http, phone_token(http, server))
        stats = settled(http)
    assert len(receiver.received) == 4
    assert (stats["dropped"], stats["retried"], stats["posted"]) == (2, 2, 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("webhook", ["slow", "down"])
def test_the_send_path_does_not_wait_for_the_webhook(webhook: str) -> None:
    """A receiver that takes a second per POST, or none at all: sends answer as fast as with
    statuses off, and the statuses wait (or are retried) behind them."""

    def timings(url: str | None) -> tuple[float, dict[str, Any]]:
        settings = {**ALL_READ, "concurrency": 1, "retry_backoff_s": 0.05}
        with simulator(url, **settings) as server, httpx.Client(base_url=server.url) as http:
            token = phone_token(http, server)
            send(http, token)  # connection warm
            slowest = 0.0
            for _ in range(30):
                started = time.monotonic()
                send(http, token)
                slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.2)
            return slowest, http.get("/admin/stats").json()["statuses"]

    baseline, _ = timings(None)
    if webhook == "slow":
        with Receiver(delay_s=1.0) as slow:
            slowest, stats = timings(slow.url)
        assert stats["pending"] > 80
    else:
        slowest, stats = timings(f"http://127.0.0.1:{free_port()}/webhooks/whatsapp")
        assert stats["retried"] > 0
        assert stats["posted"] == 0
    assert slowest < max(0.25, baseline * 5)


def test_admin_statuses_change_the_settings_at_runtime_and_reset_restores_them(
    receiver: Receiver,
) -> None:
    """PUT starts from the configured settings (secret kept), PATCH from the active ones; a
    bad body is refused and changes nothing; no answer shows the secret."""
    with simulator(receiver.url, **ALL_READ) as server, httpx.Client(base_url=server.url) as http:
        token = phone_token(http, server)
        put = http.put("/admin/statuses", json={"failed": 1.0, "failure_codes": {"131048": 1}})
        assert put.status_code == 200
        assert put.json()["failure_codes"] == {"131048": 1.0}
        assert put.json()["url"] == receiver.url
        failing = send(http, token)
        statuses = receiver.wait_for(2)
        assert by_wamid(statuses) == {failing: ["sent", "failed"]}
        assert statuses[1]["errors"][0]["code"] == 131048
        patched = http.patch("/admin/statuses", json={"failure_codes": {"131049": 1}})
        assert patched.json()["failed"] == 1.0
        bad = http.patch("/admin/statuses", json={"delivered": 1.5})
        assert (bad.status_code, "probability" in bad.json()["error"]) == (400, True)
        unknown = http.put("/admin/statuses", json={"surprise": 1})
        assert "unknown statuses field" in unknown.json()["error"]
        assert http.get("/admin/statuses").json() == patched.json()
        assert http.post("/admin/reset").json() == {"ok": True}
        restored = http.get("/admin/statuses").json()
        assert restored == server.config.statuses.to_json()
        assert restored["app_secret_set"] is True
        assert http.get("/admin/stats").json()["statuses"]["planned"] == 0
        outputs = [put.text, patched.text, bad.text, unknown.text, json.dumps(restored)]
        outputs.append(http.get("/admin/stats").text)
    assert not any(SECRET in text for text in outputs)


def test_runtime_settings_can_turn_the_webhooks_on() -> None:
    """A simulator started without a URL posts once given one (and a secret) at runtime."""
    with (
        Receiver() as receiver,
        SandboxServer() as server,
        httpx.Client(base_url=server.url) as http,
    ):
        token = phone_token(http, server)
        send(http, token)
        turned_on = http.patch(
            "/admin/statuses", json={"url": receiver.url, "app_secret": SECRET, **ALL_READ}
        )
        assert turned_on.status_code == 200
        assert SECRET not in turned_on.text
        wamid = send(http, token)
        statuses = receiver.wait_for(3)
    assert by_wamid(statuses) == {wamid: ["sent", "delivered", "read"]}
    assert all(r.signed for r in receiver.received)


def test_batches_gather_due_statuses_into_one_signed_post(receiver: Receiver) -> None:
    settings = {**ALL_READ, "batch": 50, "concurrency": 1}
    receiver.delay_s = 0.05  # statuses pile up behind the first POST
    with simulator(receiver.url, **settings) as server, httpx.Client(base_url=server.url) as http:
        token = phone_token(http, server)
        for _ in range(20):
            send(http, token)
        statuses = receiver.wait_for(60)
    assert len(statuses) == 60
    assert (
        max(len(r.body["entry"][0]["changes"][0]["value"]["statuses"]) for r in receiver.received)
        > 1
    )
    assert all(r.signed for r in receiver.received)


def test_a_full_queue_drops_a_send_s_statuses_and_counts_them(receiver: Receiver) -> None:
    settings = {**ALL_READ, "queue_limit": 4, "delay_min_s": 5.0, "delay_max_s": 5.0}
    with simulator(receiver.url, **settings) as server, httpx.Client(base_url=server.url) as http:
        token = phone_token(http, server)
        send(http, token)
        send(http, token)  # its three statuses do not fit behind the first one's
        stats = http.get("/admin/stats").json()["statuses"]
    assert (stats["planned"], stats["pending"]) == (3, 3)
    assert (stats["dropped_queue_full"], stats["dropped"]) == (3, 3)


# --- the command line ---------------------------------------------------------------------


def run_simulator(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    repo_root = Path(__file__).resolve().parents[2]
    return subprocess.Popen(
        [sys.executable, "-m", "worker.sandbox", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONPATH": str(repo_root)},
    )


def test_the_command_line_posts_statuses_signed_with_the_secret_from_the_environment(
    receiver: Receiver,
) -> None:
    """``--status-url`` and shares on the command line, the secret in SANDBOX_WEBHOOK_SECRET;
    it shows in no output of the process."""
    env = {**os.environ, "SANDBOX_WEBHOOK_SECRET": SECRET}
    process = run_simulator(
        "--status-url",
        receiver.url,
        "--status-delay-s",
        "0",
        "--status-delivered",
        "0",
        "--status-failed",
        "1",
        "--status-failure-code",
        "131026=1",
        "--seed",
        "5",
        env=env,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().removeprefix("sandbox listening on ")
        with httpx.Client(base_url=url) as http:
            token = http.get(
                f"{BASE}/get_phone_token",
                params={"client_id": "demo-client", "phone_id": "demo-phone-1"},
                headers={
                    "Authorization": http.post(
                        "/api/v2/auth", json={"username": "sandbox", "password": "sandbox-password"}
                    ).json()["system_user_token"]
                },
            ).json()["token"]
            wamid = send(http, token)
            statuses = receiver.wait_for(2)
            admin = http.get("/admin/statuses").text + http.get("/admin/stats").text
    finally:
        process.terminate()
        out, err = process.communicate(timeout=5)
    assert by_wamid(statuses) == {wamid: ["sent", "failed"]}
    assert all(r.signed for r in receiver.received)
    assert SECRET not in out + err + admin


def test_the_command_line_refuses_a_url_without_a_secret_and_explains_it_in_help() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SANDBOX_WEBHOOK_SECRET"}
    refused = run_simulator("--status-url", "http://127.0.0.1:9/x", env=env)
    _, err = refused.communicate(timeout=10)
    assert refused.returncode == 2
    assert "SANDBOX_WEBHOOK_SECRET" in err
    odd = run_simulator("--status-read", "2", env={**env, "SANDBOX_WEBHOOK_SECRET": SECRET})
    _, err = odd.communicate(timeout=10)
    assert odd.returncode == 2
    assert "status webhooks: read must be a probability" in err
    assert SECRET not in err
    shown = run_simulator("--help", env=env)
    out, _ = shown.communicate(timeout=10)
    assert "--status-url" in out
    assert "SANDBOX_WEBHOOK_SECRET" in out
    assert "X-Hub-Signature-256" in out
