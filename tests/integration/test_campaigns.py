"""Campaigns while they run: pause, resume, cancel, send windows, progress, and crashes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from worker.app import WorkerApp
from worker.campaigns.store import CampaignStatus, CampaignStore
from worker.cli import cli
from worker.jobs import CAMPAIGN_QUEUE
from worker.producer import Producer

from .conftest import (
    AMQP_URL,
    REDIS_URL,
    Simulator,
    dead_letters,
    queue_depth,
    redis_client,
    wait_for_progress,
    wait_until,
    worker_process,
)

FAST = {"campaign_state_cache_s": 0.05, "campaign_pause_recheck_s": 0.2}


def template(name: str = "spring_sale") -> dict[str, Any]:
    return {
        "type": "template",
        "template": {
            "name": name,
            "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "20%"}]}],
        },
    }


@pytest.fixture
def store() -> CampaignStore:
    return CampaignStore(redis_client(REDIS_URL, decode_responses=True))


def enqueue(producer: Producer, campaign_id: str, count: int, phone_id: str = "phone-1") -> None:
    for n in range(count):
        producer.enqueue(
            "send_message",
            {
                "client_id": "acme",
                "phone_id": phone_id,
                "to": f"+9198{n:08d}",
                "message": template(),
                "campaign_id": campaign_id,
            },
            queue=CAMPAIGN_QUEUE,
        )


def create(store: CampaignStore, campaign_id: str, enqueued: int, **definition: Any) -> None:
    store.create(campaign_id, {"client_id": "acme", "template": "spring_sale", **definition})
    store.checkpoint(campaign_id, rows_done=enqueued, enqueued=enqueued, rejected=0)


def cli_run(*args: str) -> Any:
    env = {"REDIS_URL": REDIS_URL, "AMQP_URL": AMQP_URL, "VERLOOP_WORKER_ENV_FILE": None}
    return CliRunner().invoke(cli, list(args), env=env)


def test_a_paused_campaign_holds_its_jobs_without_retries_and_sends_them_on_resume(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    store: CampaignStore,
) -> None:
    create(store, "spring", 20)
    assert cli_run("campaign", "pause", "spring").exit_code == 0
    start_worker(**FAST)
    enqueue(producer, "spring", 20)
    time.sleep(1.0)
    assert simulator.messages() == []
    assert cli_run("campaign", "resume", "spring").exit_code == 0
    wait_until(lambda: len(simulator.messages()) == 20)
    wait_until(lambda: store.get("spring").count("sent") == 20)
    status = cli_run("campaign", "status", "spring", "--json")
    # The in-process worker logs to the stdout CliRunner captures: take the JSON line.
    [info] = [json.loads(line) for line in status.output.splitlines() if line.startswith("{")]
    assert info["state"] == "running"
    assert info["sent"] == 20
    assert info["pending"] == 0
    assert info["dead_lettered"] == 0
    assert dead_letters(CAMPAIGN_QUEUE) == []
    assert simulator.send_requests() == 20  # held, not tried and refused


def test_a_cancelled_campaign_s_jobs_are_acknowledged_as_cancelled_and_not_sent(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    store: CampaignStore,
) -> None:
    create(store, "autumn", 10)
    result = cli_run("campaign", "cancel", "autumn", "--yes")
    assert result.exit_code == 0, result.output
    start_worker(**FAST)
    enqueue(producer, "autumn", 10)
    wait_until(lambda: store.get("autumn").count("cancelled") == 10)
    assert simulator.messages() == []
    assert queue_depth(CAMPAIGN_QUEUE) == 0
    # A cancelled campaign cannot be resumed by mistake.
    refused = cli_run("campaign", "resume", "autumn")
    assert refused.exit_code == 1
    assert "cancelled" in refused.output


def test_jobs_outside_the_send_window_wait_for_it(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    store: CampaignStore,
) -> None:
    # A one-minute window twelve hours from now is closed at the moment.
    opens = time.gmtime(time.time() + 12 * 3600)
    start = f"{opens.tm_hour:02d}:{opens.tm_min:02d}"
    end = f"{opens.tm_hour:02d}:{(opens.tm_min + 1) % 60:02d}"
    create(store, "night", 3, window_start=start, window_end=end, timezone="UTC")
    start_worker(**FAST)
    enqueue(producer, "night", 3)
    wait_until(lambda: queue_depth(CAMPAIGN_QUEUE + ".DQ") == 3 or queue_depth(CAMPAIGN_QUEUE) == 0)
    time.sleep(0.5)
    assert simulator.messages() == []
    assert dead_letters(CAMPAIGN_QUEUE) == []


def test_campaign_list_and_status_say_what_runs(store: CampaignStore) -> None:
    create(store, "list-me", 5)
    listed = cli_run("campaign", "list")
    assert listed.exit_code == 0
    assert "list-me" in listed.output
    status = cli_run("campaign", "status", "list-me")
    assert status.exit_code == 0
    assert "5 enqueued" in status.output
    missing = cli_run("campaign", "status", "no-such-campaign")
    assert missing.exit_code == 1
    assert "no campaign 'no-such-campaign'" in missing.output


def _settled(status: CampaignStatus) -> int:
    # A job sent but not acknowledged before the kill is counted "sent", then "suppressed"
    # when redelivered; sent + dead-lettered counts each recipient once.
    return status.count("sent") + status.count("dead_lettered")


def test_a_worker_killed_mid_campaign_and_restarted_messages_every_recipient_exactly_once(
    simulator: Simulator, producer: Producer, tmp_path: Path, store: CampaignStore
) -> None:
    """SIGKILL with sends in flight: RabbitMQ redelivers them; the ledger stops re-sends."""
    jobs = 150
    simulator.faults(latency_ms=60)
    create(store, "crash", jobs)
    env = {"LEDGER_LEASE_S": "1.5", "RATE_LIMIT_PER_NUMBER": "1000"}
    with worker_process(simulator, tmp_path / "first.log", "--threads", "8", **env) as proc:
        enqueue(producer, "crash", jobs)
        wait_until(lambda: len(simulator.messages()) >= 30 and simulator.stats()["in_flight"] >= 2)
        # `run` starts dramatiq in a session of its own: kill that whole process group (its
        # main process and the worker process) at once, as the OOM killer or a power cut would.
        [dramatiq_pid] = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.killpg(int(dramatiq_pid), signal.SIGKILL)
        proc.wait(timeout=10)
    received_before = len(simulator.messages())
    assert received_before < jobs
    with worker_process(simulator, tmp_path / "second.log", "--threads", "8", **env):
        wait_for_progress(lambda: _settled(store.get("crash")), jobs)
        received = Counter(m["to"] for m in simulator.messages())
        assert max(received.values()) == 1  # nobody messaged twice
        # Jobs whose send was in flight when the worker died: RabbitMQ redelivered them, the
        # ledger found their claim, and (campaign lane) they were dead-lettered as "outcome
        # unknown" instead of being sent again; the others were sent once.
        export = tmp_path / "uncertain.jsonl"
        assert (
            cli_run("dlq", "export", "--queue", "campaign", "--output", str(export)).exit_code == 0
        )
        uncertain = [json.loads(line) for line in export.read_text().splitlines()]
        assert all(entry["reason"].startswith("outcome unknown") for entry in uncertain)
        assert len(uncertain) <= 8  # at most one per worker thread was in flight
        assert store.get("crash").count("dead_lettered") == len(uncertain)
        # Nobody is left out: a recipient not messaged is one of those, and the runbook's
        # replay (after checking it was not delivered) messages it.
        missing = [
            entry
            for entry in uncertain
            if json.loads(entry["body"])["kwargs"]["to"] not in received
        ]
        assert len(received) + len(missing) == jobs
        for entry in missing:
            replayed = cli_run("dlq", "replay", "--id", entry["id"], "--resend-uncertain")
            assert replayed.exit_code == 0, replayed.output
        wait_until(lambda: len(simulator.messages()) == jobs, timeout=20)
    received = Counter(m["to"] for m in simulator.messages())
    assert len(received) == jobs  # everybody messaged
    assert max(received.values()) == 1  # exactly once


@pytest.mark.timeout(300)  # 2,000 sends in one process: about a minute, more on a slow machine
def test_a_campaign_file_is_sent_end_to_end_and_its_status_says_so(
    simulator: Simulator,
    start_worker: Callable[..., WorkerApp],
    store: CampaignStore,
    tmp_path: Path,
) -> None:
    """`campaign start` on a 2,000-row file with bad rows, a worker, and `campaign status`."""
    rows = 2000
    path = tmp_path / "spring.csv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("to,body_1\n")
        for n in range(rows):
            handle.write(f"+9198{n:08d},R{n}\n" if n % 100 else f"12{n},R{n}\n")  # 20 bad
    start_worker(threads=8, rate_limit_per_number=1000)
    started = cli_run(
        "campaign",
        "start",
        str(path),
        "--client-id",
        "acme",
        "--phone-id",
        "phone-1",
        "--phone-id",
        "phone-2",
        "--template",
        "spring_sale",
        "--body-params",
        "1",
        "--campaign-id",
        "spring-e2e",
        "--no-progress",
    )
    assert started.exit_code == 0, started.output
    wait_for_progress(lambda: store.get("spring-e2e").count("sent"), rows - 20)
    received = Counter(m["to"] for m in simulator.messages())
    assert len(received) == rows - 20
    assert max(received.values()) == 1
    assert {m["phone_id"] for m in simulator.messages()} == {"phone-1", "phone-2"}
    status = cli_run("campaign", "status", "spring-e2e")
    assert "1980 enqueued, 20 rejected" in status.output
    assert "sent       1980" in status.output
    assert "pending    0" in status.output
    rejects = (tmp_path / "spring.csv.rejects.csv").read_text().splitlines()
    assert len(rejects) == 1 + 20  # header and the bad rows
