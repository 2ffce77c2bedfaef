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

from tests.integration.conftest import (
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
from worker.campaigns.store import CampaignRef, CampaignStatus, CampaignStore
from worker.commands.main import cli
from worker.jobs.models import CAMPAIGN_QUEUE
from worker.jobs.producer import Producer
from worker.runtime.app import WorkerApp

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
    ref = CampaignRef("acme", campaign_id)
    store.create(ref, {"client_id": "acme", "template": "spring_sale", **definition})
    store.checkpoint(ref, rows_done=enqueued, enqueued=enqueued, rejected=0)


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
    wait_until(lambda: store.get(CampaignRef("acme", "spring")).count("sent") == 20)
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
    wait_until(lambda: store.get(CampaignRef("acme", "autumn")).count("cancelled") == 10)
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
    opens, closes = (time.gmtime(time.time() + 12 * 3600 + extra) for extra in (0, 60))
    start = f"{opens.tm_hour:02d}:{opens.tm_min:02d}"
    end = f"{closes.tm_hour:02d}:{closes.tm_min:02d}"  # at :59 the hour turns too
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


def test_a_campaign_with_every_job_done_shows_as_done_not_running(store: CampaignStore) -> None:
    """Everything enqueued has an outcome and the file is read: status and list say done.
    A campaign still being enqueued, or with jobs pending, still shows as running."""
    for campaign_id in ("all-sent", "still-reading", "one-pending"):
        create(store, campaign_id, 3)
    for campaign_id, outcomes in (
        ("all-sent", ("sent", "sent", "dead_lettered")),
        ("still-reading", ("sent", "sent", "sent")),
        ("one-pending", ("sent", "sent")),
    ):
        ref = CampaignRef("acme", campaign_id)
        for outcome in outcomes:
            store.count_outcome(ref, outcome)
        if campaign_id != "still-reading":
            store.finish_enqueue(ref, total_rows=3)
    status = cli_run("campaign", "status", "all-sent")
    assert status.exit_code == 0, status.output
    assert "campaign   all-sent  (done)" in status.output
    states = {
        info["campaign_id"]: info["state"]
        for info in map(json.loads, cli_run("campaign", "list", "--json").output.splitlines())
    }
    assert states == {"all-sent": "done", "still-reading": "running", "one-pending": "running"}
    listed = cli_run("campaign", "list").output.splitlines()
    [row] = [line for line in listed if line.startswith("all-sent ")]
    assert row.split()[2] == "done"
    assert store.get(CampaignRef("acme", "all-sent")).state == "running"  # as stored


def test_campaign_status_and_list_show_the_delivery_funnel_the_status_counters_hold(
    store: CampaignStore,
) -> None:
    """The status actor's counters in the campaign's hash (written here as it writes them):
    `campaign status` shows delivered, read, failed by code and awaiting with their rates,
    `--json` has them under "funnel", and `campaign list` has the counts."""
    create(store, "funnel", 10)
    ref = CampaignRef("acme", "funnel")
    for _ in range(8):
        store.count_outcome(ref, "sent")
    store.count_outcome(ref, "dead_lettered", "invalid")
    cache = redis_client(REDIS_URL, decode_responses=True)
    cache.hset(
        ref.key,
        mapping={
            "status:delivered": 5,
            "status:read": 2,
            "status:failed": 2,
            "status:failed:131049": 1,
            "status:failed:131026": 1,
        },
    )
    status = cli_run("campaign", "status", "funnel")
    assert status.exit_code == 0, status.output
    lines = status.output.splitlines()
    assert "sent       8" in lines
    assert "delivered  5 (62.5% of sent)" in lines
    assert "read       2 (25.0% of sent, 40.0% of delivered)" in lines
    assert "failed     2 (25.0% of sent) after sending" in lines
    assert "           131026 undeliverable: 1, 131049 marketing cap: 1" in lines
    assert "awaiting   1 sent, no delivered or failed status yet" in lines
    assert "not sent   1 dead-lettered (0 failed, 1 invalid, 0 gave up)" in lines
    [info] = map(json.loads, cli_run("campaign", "status", "funnel", "--json").output.splitlines())
    assert info["funnel"] == {
        "enqueued": 10,
        "sent": 8,
        "delivered": 5,
        "read": 2,
        "failed": 2,
        "awaiting_status": 1,
        "failed_by_code": [
            {"code": "131026", "name": "undeliverable", "count": 1},
            {"code": "131049", "name": "marketing cap", "count": 1},
        ],
        "rates": {
            "delivered_of_sent": 0.625,
            "read_of_sent": 0.25,
            "read_of_delivered": 0.4,
            "failed_of_sent": 0.25,
        },
    }
    listed = cli_run("campaign", "list").output.splitlines()
    header = ["ENQUEUED", "SENT", "DELIVERED", "READ", "FAILED", "DLQ", "PENDING"]
    assert listed[0].split()[4:] == header
    [row] = [line for line in listed if line.startswith("funnel ")]
    # campaign, client, state, date, time, then the counts
    assert row.split()[5:] == ["10", "8", "5", "2", "2", "1", "1"]
    [listed_info] = map(json.loads, cli_run("campaign", "list", "--json").output.splitlines())
    assert listed_info["funnel"] == info["funnel"]


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
        wait_for_progress(lambda: _settled(store.get(CampaignRef("acme", "crash"))), jobs)
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
        assert store.get(CampaignRef("acme", "crash")).count("dead_lettered") == len(uncertain)
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
    wait_for_progress(lambda: store.get(CampaignRef("acme", "spring-e2e")).count("sent"), rows - 20)
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


# --- campaigns belong to a client ---------------------------------------------------------------
def _campaign_send(producer: Producer, client_id: str, campaign_id: str, to: str) -> None:
    producer.enqueue(
        "send_message",
        {
            "client_id": client_id,
            "phone_id": "phone-1",
            "to": to,
            "message": {"type": "text", "text": {"body": "offer"}},
            "campaign_id": campaign_id,
        },
        queue=CAMPAIGN_QUEUE,
    )


def test_two_clients_with_one_campaign_id_share_nothing(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    store: CampaignStore,
) -> None:
    """acme pauses its campaign "sale"; globex's "sale" goes on, to the same recipient too,
    and each is counted on its own. (Both used to be one campaign: one pause held both, and
    globex's recipients were suppressed as acme's duplicates.)"""
    acme, globex = CampaignRef("acme", "sale"), CampaignRef("globex", "sale")
    for ref in (acme, globex):
        store.create(ref, {"client_id": ref.client_id, "template": "spring_sale"})
    store.set_state(acme, "paused")
    start_worker(**FAST)
    for client in ("acme", "globex"):
        _campaign_send(producer, client, "sale", "+919876543210")
    wait_until(lambda: store.get(globex).count("sent") == 1)
    [record] = simulator.messages()
    assert record["client_id"] == "globex"
    assert store.get(acme).count("sent") == 0
    result = cli_run("campaign", "status", "sale")
    assert result.exit_code == 1
    assert "acme, globex each have a campaign 'sale'" in result.output
    assert cli_run("campaign", "resume", "sale", "--client-id", "acme").exit_code == 0
    wait_until(lambda: store.get(acme).count("sent") == 1, timeout=10)
    assert sorted(m["client_id"] for m in simulator.messages()) == ["acme", "globex"]


def test_a_campaign_cancelled_before_the_upgrade_stays_cancelled(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
    store: CampaignStore,
) -> None:
    """A campaign of an earlier version (verloop:campaign:<id>) is moved to its client's key
    the first time it is looked up, state and counts kept."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    cache.hset(
        "verloop:campaign:old-sale",
        mapping={"id": "old-sale", "client_id": "acme", "state": "cancelled", "enqueued": "3"},
    )
    cache.zadd("verloop:campaigns", {"old-sale": 1000})
    start_worker(**FAST)
    for n in range(3):
        _campaign_send(producer, "acme", "old-sale", f"+91987654321{n}")
    ref = CampaignRef("acme", "old-sale")
    wait_until(lambda: store.get(ref).count("cancelled") == 3)
    assert simulator.messages() == []
    assert not cache.exists("verloop:campaign:old-sale")
    listed = cli_run("campaign", "list", "--json")
    assert json.loads(listed.output)["client_id"] == "acme"


def test_a_campaign_id_no_campaign_start_made_has_counters_that_expire(
    simulator: Simulator,
    producer: Producer,
    start_worker: Callable[..., WorkerApp],
) -> None:
    """A producer's own campaign id is counted, in a hash that expires after its last job
    (workers used to create hashes that lived for ever, one per id a producer made up)."""
    cache = redis_client(REDIS_URL, decode_responses=True)
    start_worker(**FAST, ledger_ttl_s=7200)
    _campaign_send(producer, "acme", "made-up-42", "+919876543210")
    ref = CampaignRef("acme", "made-up-42")
    wait_until(lambda: cache.hget(ref.key, "sent") == "1")
    assert 7000 < cache.ttl(ref.key) <= 7200


def test_a_worker_remembers_a_bounded_number_of_campaign_states(store: CampaignStore) -> None:
    small = CampaignStore(store.cache, max_cached=3)
    for n in range(10):
        small.gate(CampaignRef("acme", f"c-{n}"))
    assert len(small._cached) == 3
    assert list(small._cached) == [CampaignRef("acme", f"c-{n}") for n in (7, 8, 9)]
