"""Surviving faults with a real ``verloop-worker run`` process: Verloop answering 5xx, timing out
and rate-limiting, RabbitMQ and Redis going away mid-run. After each run the process's logs and
the dead letters are searched for every secret the worker holds.

The RabbitMQ test stops the machine's broker application (``rabbitmqctl stop_app``), which
closes every connection on it as a restart would; it is always started again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.integration.conftest import (
    AMQP_URL,
    SANDBOX_PASSWORD,
    OwnRedis,
    Simulator,
    dead_letters,
    queue_depth,
    wait_for_progress,
    wait_until,
    worker_process,
)
from worker.finish.deadletters import DEAD_LETTER_HEADER
from worker.jobs.producer import Producer

TEXT = {"type": "text", "text": {"body": "Your code is 4711"}}
PHONES = ("phone-1", "phone-2", "phone-3", "phone-4")


def enqueue(producer: Producer, jobs: int, *, phones: tuple[str, ...] = PHONES) -> list[str]:
    """``jobs`` sends, spread over ``phones``, each with its own idempotency key."""
    keys = []
    for n in range(jobs):
        key = f"job-{n}"
        producer.send_message(
            client_id="acme",
            phone_id=phones[n % len(phones)],
            to=f"+9198765{n:05d}",
            message=TEXT,
            idempotency_key=key,
        )
        keys.append(key)
    return keys


def sent_keys(simulator: Simulator) -> Counter[str]:
    """How many times Verloop accepted each idempotency key."""
    return Counter(str(m["idempotency_key"]) for m in simulator.messages())


def job_lines(log_path: Path) -> list[dict[str, Any]]:
    """The worker's one-per-outcome ``job`` log lines."""
    lines = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "job":
                lines.append(entry)
    return lines


def assert_no_secrets(
    simulator: Simulator,
    log_path: Path,
    letters: list[tuple[dict[str, Any], bytes]],
    phones: tuple[str, ...] = PHONES,
) -> None:
    """Neither the Verloop password, the system token, a phone token nor the RabbitMQ password
    appears in the worker's logs or in a dead letter."""
    secrets = [
        SANDBOX_PASSWORD,
        simulator.server.system_user_token,
        "guest:guest@",
        *(simulator.phone_token("acme", phone) for phone in phones),
    ]
    logs = log_path.read_text(encoding="utf-8", errors="replace")
    letters_text = json.dumps([(h, b.decode("utf-8", "replace")) for h, b in letters], default=str)
    assert logs, "the worker wrote no logs"
    for secret in secrets:
        assert secret not in logs
        assert secret not in letters_text


# --- Verloop misbehaving --------------------------------------------------------------------------
def test_with_5xx_and_timeouts_every_job_is_sent_once_or_dead_lettered_with_its_reason(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """10% 5xx and 5% timeouts over 200 jobs, one retry each: every job ends sent exactly once
    or dead-lettered as gave_up with the last failure as its reason; nothing is lost."""
    jobs = 200
    simulator.faults(error_rates={500: 0.05, 503: 0.05}, timeout_rate=0.05, timeout_s=1.5)
    log_path = tmp_path / "worker.log"
    env = {"VERLOOP_TIMEOUT_S": "0.75", "RETRY_MAX_RETRIES": "1", "LOG_LEVEL": "DEBUG"}
    letters: list[tuple[dict[str, Any], bytes]] = []
    with worker_process(simulator, log_path, "--threads", "16", **env) as proc:
        keys = enqueue(producer, jobs)

        def settled() -> int:
            letters.extend(dead_letters())
            return len(sent_keys(simulator)) + len(letters)

        wait_for_progress(settled, jobs, interval=0.2)
        # A send that timed out may have reached Verloop (so it counts as sent above) while its
        # retry is still to come: stop the worker only once every job has its final line.
        wait_for_progress(
            lambda: sum(
                line["outcome"] in ("sent", "dead_lettered") for line in job_lines(log_path)
            ),
            jobs,
            interval=0.2,
        )
        assert proc.poll() is None
    sent = sent_keys(simulator)
    dead = Counter()
    for headers, body in letters:
        info = headers[DEAD_LETTER_HEADER]
        assert info["outcome"] == "gave_up", info
        assert info["attempts"] == 2, info
        assert info["reason"].startswith("gave up after 2 attempts: send"), info
        assert "timed out" in info["reason"] or info.get("http_status") in (500, 503), info
        dead[json.loads(body)["kwargs"]["idempotency_key"]] += 1
    assert set(sent.values()) == {1}  # nothing sent twice
    assert set(dead.values()) <= {1}
    assert not set(sent) & set(dead)  # a job is either sent or dead-lettered
    assert sorted([*sent, *dead]) == sorted(keys)  # and none is lost
    stats = simulator.stats()
    assert stats["duplicates"] == 0
    assert stats["injected_errors"] > 0
    assert stats["injected_timeouts"] > 0
    assert queue_depth("verloop.send") == 0
    outcomes = Counter(line["outcome"] for line in job_lines(log_path))
    assert outcomes["sent"] == len(sent)
    assert outcomes["dead_lettered"] == len(dead)
    assert outcomes["retrying"] == stats["injected_errors"] + stats["injected_timeouts"] - len(dead)
    assert_no_secrets(simulator, log_path, letters)


def test_a_429_storm_is_waited_out_as_retry_after_says_and_then_every_job_is_sent(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """For 2 s every send gets 429 with Retry-After: 1. Each job calls at most once a second
    (at most 3 times in the storm, not the ~16 its 0.05-0.2 s backoff would allow), and
    every job is sent exactly once after it."""
    jobs, storm_s, retry_after_s = 20, 2.0, 1.0
    simulator.faults(error_rates={429: 1.0})  # the simulator's 429 says Retry-After: 1
    log_path = tmp_path / "worker.log"
    with worker_process(simulator, log_path, "--threads", "8") as proc:
        keys = enqueue(producer, jobs)
        wait_until(simulator.send_requests, interval=0.01)
        started = time.monotonic()
        time.sleep(storm_s)
        simulator.http.put("/admin/faults", json={}).raise_for_status()
        storm = time.monotonic() - started + 0.02  # the first call was up to 0.01 s earlier
        wait_until(lambda: len(simulator.messages()) >= jobs, timeout=20)
        assert proc.poll() is None
    # A job called at most once per Retry-After: at most this many times during the storm.
    most_per_job = int(storm // retry_after_s) + 1
    refused = simulator.stats()["responses"]["429"]
    assert jobs <= refused <= jobs * most_per_job
    retries = [
        line
        for line in job_lines(log_path)
        if line["outcome"] == "retrying" and line.get("http_status") == 429
    ]
    assert len(retries) == refused
    assert min(line["retry_in_s"] for line in retries) >= retry_after_s
    per_job = Counter(line["message_id"] for line in retries)
    assert max(per_job.values()) <= most_per_job
    assert sorted(sent_keys(simulator)) == sorted(keys)
    assert simulator.stats()["duplicates"] == 0
    assert dead_letters() == []
    assert_no_secrets(simulator, log_path, [])


# --- RabbitMQ restarted ---------------------------------------------------------------------------
def rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("rabbitmqctl is not on PATH; this test stops and starts RabbitMQ's app")
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=120)


def broker_answers() -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except pika.exceptions.AMQPError:
        return False
    return True


@pytest.fixture
def restartable_rabbitmq() -> Iterator[None]:
    """Make sure RabbitMQ answers after the test, whatever happened in it."""
    try:
        yield
    finally:
        if not broker_answers():
            rabbitmqctl("start_app")
            wait_until(broker_answers, timeout=60, interval=0.5)


def test_rabbitmq_restarted_mid_run_the_worker_reconnects_and_every_job_is_sent_once(
    simulator: Simulator, tmp_path: Path, restartable_rabbitmq: None
) -> None:
    """300 jobs at 60/s; RabbitMQ's app is stopped for 2.5 s while sends flow and started
    again: the same worker process reconnects by itself and every job is sent exactly once
    (jobs sent while their acknowledgement could not reach RabbitMQ come back, and the
    idempotency ledger acknowledges them without sending again)."""
    jobs = 300
    log_path = tmp_path / "worker.log"
    with worker_process(simulator, log_path, "--threads", "8", RATE_LIMIT_PER_NUMBER="15") as proc:
        with Producer(AMQP_URL) as producer:
            keys = enqueue(producer, jobs)
        wait_until(lambda: len(simulator.messages()) >= 30)
        try:
            rabbitmqctl("stop_app")
            sent_when_stopped = len(simulator.messages())
            time.sleep(2.5)
            assert proc.poll() is None
        finally:
            rabbitmqctl("start_app")
            wait_until(broker_answers, timeout=60, interval=0.5)
        restarted_at = len(simulator.messages())
        wait_for_progress(lambda: len(sent_keys(simulator)), jobs, interval=0.2)
        wait_until(lambda: queue_depth("verloop.send") == 0, timeout=20)
        time.sleep(1.0)  # a redelivered job that were to be sent again would be by now
        assert proc.poll() is None
    assert sent_when_stopped < jobs
    assert restarted_at < jobs  # sends resumed only after the restart
    assert sorted(sent_keys(simulator)) == sorted(keys)
    assert simulator.stats()["duplicates"] == 0
    letters = dead_letters()
    assert letters == []
    logs = log_path.read_text(encoding="utf-8")
    assert "connection error" in logs.lower()  # it did lose RabbitMQ, and got it back
    assert_no_secrets(simulator, log_path, letters)


# --- Redis restarted ------------------------------------------------------------------------------
def test_redis_restarted_under_a_worker_process_holds_sends_then_sends_every_job_once(
    simulator: Simulator, producer: Producer, tmp_path: Path, own_redis: OwnRedis
) -> None:
    """The process (not an in-process worker) survives Redis going away: no call to Verloop
    without the limiter, no crash, and every job sent once, within the limit, afterwards."""
    rate, jobs = 20, 30
    simulator.faults(per_number_rate=rate, enforce_limits=False)
    log_path = tmp_path / "worker.log"
    env = {
        "REDIS_URL": own_redis.url,
        "RATE_LIMIT_PER_NUMBER": str(rate),
        "RATE_LIMIT_MAX_WAIT_S": "0.5",
        "RETRY_MAX_RETRIES": "0",  # a held send that used a retry would be dead-lettered
    }
    with worker_process(simulator, log_path, "--threads", "4", **env) as proc:
        keys = enqueue(producer, jobs, phones=PHONES[:1])
        wait_until(lambda: len(simulator.messages()) >= 5)
        own_redis.kill()
        time.sleep(1.0)  # sends already given a slot (at most max wait away) may still go out
        held, calls = len(simulator.messages()), simulator.send_requests()
        time.sleep(1.5)
        assert proc.poll() is None
        assert simulator.send_requests() == calls  # no call to Verloop without the limiter
        assert held < jobs
        own_redis.start()
        wait_until(lambda: len(simulator.messages()) >= jobs, timeout=20)
        assert proc.poll() is None
    assert sorted(sent_keys(simulator)) == sorted(keys)
    stats = simulator.stats()
    assert stats["duplicates"] == 0
    assert stats["rate_limit_violations"] == 0
    letters = dead_letters()
    assert letters == []
    deferred = [line for line in job_lines(log_path) if line["outcome"] == "deferred"]
    assert deferred  # the held jobs were re-delayed, not failed
    assert_no_secrets(simulator, log_path, letters, phones=PHONES[:1])
