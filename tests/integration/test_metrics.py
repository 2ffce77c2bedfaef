"""Metrics of a real ``verloop-worker run``: what it exports, and a real Prometheus scraping it."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Simulator, dead_letters, wait_until, worker_process
from worker.jobs.producer import Producer

ROOT = Path(__file__).resolve().parents[2]
TEXT = {"type": "text", "text": {"body": "hello"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def declared_metrics() -> set[str]:
    """Every metric name declared in worker/observability/metrics.py."""
    source = (ROOT / "worker/observability/metrics.py").read_text()
    return set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"([a-z_]+)"', source))


def scrape(port: int) -> str:
    """The worker's /metrics. dramatiq's exposition server is a process of its own, forked
    next to the worker's: it may start listening a moment after the worker says it is ready."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def families(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            names.add(re.sub(r"_(bucket|sum|count|created)$", "", name))
    return names


@pytest.fixture
def metrics_worker(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> Iterator[tuple[int, Path]]:
    """A worker with metrics on, after jobs that go through every path a metric counts."""
    port = free_port()
    log = tmp_path / "worker.log"
    simulator.script(
        {"status": 503, "count": 1, "to": "+919876543201"},  # retried, then sent
        {
            "status": 400,
            "count": 1,
            "to": "+919876543202",
            "body": {"error": {"code": 131026, "message": "undeliverable"}},
        },  # dead letter
        {
            "status": 400,
            "count": 1,
            "to": "+919876543203",
            "body": {"error": {"code": 131056, "message": "pair rate limit"}},
            "headers": {"Retry-After": "1"},
        },  # deferred, then sent
        {
            "status": 400,
            "count": 1,
            "to": "+919876543204",
            "body": {"error": {"code": 131048, "message": "spam rate limit"}},
        },  # quality pause
        {
            "status": 429,
            "count": 1,
            "to": "+919876543205",
            "headers": {"Retry-After": "1"},
        },  # slowed down, retried, sent
        {"status": 401, "count": 1, "to": "+919876543206"},  # token refreshed, sent
    )
    with worker_process(
        simulator, log, "--threads", "4", METRICS_PORT=str(port), METRICS_DIR=str(tmp_path)
    ):
        for n in range(7):
            producer.send_message(
                client_id="acme", phone_id="phone-1", to=f"+91987654320{n}", message=TEXT
            )
        # A campaign job, sent twice: once, then suppressed as a duplicate (from phone-2:
        # the 131048 above pauses campaign sends on phone-1).
        for _ in range(2):
            producer.enqueue(
                "send_message",
                {
                    "client_id": "acme",
                    "phone_id": "phone-2",
                    "to": "+919876543299",
                    "message": TEXT,
                    "campaign_id": "spring",
                },
                queue="verloop.campaign",
            )
        # Sent: 0, 1 (after a retry), 3 (after its hold), 5 (after a 429), 6 (after a refresh),
        # and the campaign's one recipient.
        wait_until(lambda: len(simulator.messages()) == 6, timeout=30)
        letters: list[object] = []
        wait_until(lambda: letters.extend(dead_letters()) or len(letters) == 2, timeout=10)
        yield port, log


def test_a_running_worker_exports_what_its_dashboard_and_alerts_query(
    metrics_worker: tuple[int, Path],
) -> None:
    """After sends, a retry, a deferral, dead letters, a 429, a quality pause and a token
    refresh: every declared metric is exported with counts that match what happened, no label
    holds a recipient, and every metric the dashboard and alert rules query is there."""
    port, _ = metrics_worker
    text = scrape(port)
    exported = families(text)
    missing = declared_metrics() - exported
    assert not missing, f"declared but not exported: {sorted(missing)}"
    assert {"dramatiq_messages_total", "dramatiq_message_duration_milliseconds"} <= exported

    def value(pattern: str) -> float:
        return sum(float(m) for m in re.findall(pattern + r"[^\n]* ([0-9.e+]+)\n", text))

    assert value(r'verloop_sends_total\{[^}]*outcome="sent"') == 6
    # The duplicate campaign job may still be running. Its series exists at zero from the start,
    # so wait for its count, not for its name.
    suppressed = r'verloop_sends_total\{[^}]*outcome="suppressed"'
    deadline = time.monotonic() + 10
    while True:
        text = scrape(port)
        if value(suppressed) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert value(suppressed) == 1
    assert value(r'verloop_campaign_jobs_total\{campaign_id="spring",outcome="sent"') == 1
    assert value(r"verloop_dead_letters_total\{") == 2
    assert value(r"verloop_token_refreshes_total") == 1
    assert value(r'verloop_quality_pauses_total\{phone_id="phone-1"\}') == 1
    assert value(r'verloop_deferrals_total\{kind="recipient_cooling"') == 1
    assert value(r'verloop_api_requests_total\{[^}]*status="429"') == 1
    assert "+9198765" not in text  # no recipient in any label

    used: set[str] = set()
    for path in [
        ROOT / "deploy/prometheus/alerts.yml",
        *sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")),
    ]:
        used |= {
            re.sub(r"_(bucket|sum|count)$", "", m)
            for m in re.findall(r"\b((?:verloop|dramatiq)_[a-z_]+)", path.read_text())
        }
    assert used, "no worker metric found in the dashboard or alerts"
    # The receiver's (verloop_webhook_*) are another process's; a delivery-receipt metric the
    # worker does not declare is checked against its contract by tests/deploy instead.
    used = {m for m in used if m.startswith("dramatiq_") or m in declared_metrics()}
    assert not used - exported, f"queried but not exported: {sorted(used - exported)}"


def test_a_real_prometheus_scrapes_the_worker_and_answers_a_query(
    metrics_worker: tuple[int, Path], tmp_path: Path
) -> None:
    """Prometheus (Debian's package) scrapes the worker and returns the send counter."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `apt-get install prometheus` (make test does)")
    port, _ = metrics_worker
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: verloop-worker\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def sent() -> float | None:
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{prom_port}/api/v1/query",
                    params={"query": 'sum(verloop_sends_total{outcome="sent"})'},
                    timeout=2,
                ).json()
            except (httpx.HTTPError, ValueError):
                return None
            result = answer.get("data", {}).get("result", [])
            return float(result[0]["value"][1]) if result else None

        assert wait_until(sent, timeout=30, interval=0.5) == 6
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def exposed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of a scrape by name: (labels, value) pairs."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def test_a_fresh_worker_exports_its_known_series_at_zero_and_caps_producer_ids(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """Before any job, a real `verloop-worker run` exports at zero the series the dashboard and
    alerts count (retries, every deferral kind, dead letters, the numbers of the tokens file
    and RATE_LIMIT_OVERRIDES); then, with METRICS_MAX_LABEL_VALUES=3 (two taken by those
    numbers), a second new number is counted as _other."""
    port = free_port()
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text('{"acme": {"phone-5": "hand-made-token-5"}}')
    with worker_process(
        simulator,
        tmp_path / "worker.log",
        "--threads",
        "1",
        METRICS_PORT=str(port),
        METRICS_DIR=str(tmp_path),
        VERLOOP_PHONE_TOKENS_FILE=str(tokens_file),
        RATE_LIMIT_OVERRIDES='{"phone-7": 20}',
        METRICS_MAX_LABEL_VALUES="3",
    ):
        at_start = exposed(scrape(port))

        def at(name: str, **labels: str) -> float | None:
            values = [v for found, v in at_start.get(name, []) if found == labels]
            return values[0] if values else None

        for lane in ("transactional", "campaign"):
            assert at("verloop_retries_total", actor="send_message", lane=lane) == 0
            for kind in ("rate_limit", "recipient_cooling", "campaign_paused", "in_flight"):
                assert at("verloop_deferrals_total", lane=lane, kind=kind) == 0
        dead = {"queue": "verloop.send", "outcome": "failed", "error": "PermanentFailure"}
        assert at("verloop_dead_letters_total", **dead) == 0
        known = {"client_id": "acme", "phone_id": "phone-5", "outcome": "sent"}
        assert at("verloop_sends_total", lane="campaign", **known) == 0
        assert at("verloop_quality_pauses_total", phone_id="phone-5") == 0
        assert at("verloop_quality_pauses_total", phone_id="phone-7") == 0
        assert at("verloop_number_rate_limit", phone_id="phone-7") == 20
        assert at("verloop_events_relayed_total", result="failed") == 0
        assert "hand-made-token-5" not in scrape(port)

        for phone in ("phone-a", "phone-b"):
            producer.send_message(
                client_id="acme", phone_id=phone, to="+919876543210", message=TEXT
            )
        wait_until(lambda: len(simulator.messages()) == 2, timeout=30)

        def sent_by_phone() -> dict[str, float]:
            sent: dict[str, float] = {}
            for labels, count in exposed(scrape(port)).get("verloop_sends_total", []):
                if labels["outcome"] == "sent" and count:
                    sent[labels["phone_id"]] = sent.get(labels["phone_id"], 0) + count
            return sent

        sent = wait_until(lambda: (found := sent_by_phone()) and sum(found.values()) == 2 and found)
        assert set(sent) in ({"phone-a", "_other"}, {"phone-b", "_other"})
