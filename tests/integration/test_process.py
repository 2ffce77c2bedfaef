"""The real ``verloop-worker`` processes: shutdown, secrets in logs, and the CLI commands."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from worker.producer import Producer

from .conftest import (
    SANDBOX_PASSWORD,
    VENV_BIN,
    Simulator,
    dead_letters,
    queue_depth,
    wait_until,
    worker_env,
    worker_process,
)

TEXT = {"type": "text", "text": {"body": "hello"}}


def cli(simulator: Simulator, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "verloop-worker"), *args],
        env=worker_env(simulator, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sigterm_during_in_flight_sends_loses_nothing_and_sends_nothing_twice(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """Stopped mid-run with slow Verloop calls in flight, then restarted: every job is sent
    exactly once."""
    simulator.faults(latency_ms=400)
    keys = [f"job-{n}" for n in range(24)]
    with worker_process(simulator, tmp_path / "first.log", "--threads", "4") as proc:
        for n, key in enumerate(keys):
            producer.send_message(
                client_id="acme",
                phone_id="phone-1",
                to=f"+9198765{n:05d}",
                message=TEXT,
                idempotency_key=key,
            )
        wait_until(lambda: simulator.stats()["in_flight"] >= 2 and simulator.messages())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    sent_before_restart = len(simulator.messages())
    assert 0 < sent_before_restart < len(keys)
    assert simulator.stats()["in_flight"] == 0

    with worker_process(simulator, tmp_path / "second.log", "--threads", "8"):
        wait_until(lambda: len(simulator.messages()) >= len(keys), timeout=30)
    sent_keys = sorted(m["idempotency_key"] for m in simulator.messages())
    assert sent_keys == sorted(keys)
    assert simulator.stats()["duplicates"] == 0
    assert queue_depth("verloop.send") == 0
    assert dead_letters() == []


def test_no_token_or_password_reaches_the_logs_or_dead_letters(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """With DEBUG logging, a token refresh and a dead letter, no secret appears anywhere."""
    log_path = tmp_path / "worker.log"
    first_token = simulator.phone_token("acme", "phone-1")
    with worker_process(simulator, log_path, "--threads", "2", LOG_LEVEL="DEBUG"):
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543210", message=TEXT
        )
        wait_until(simulator.messages)
        second_token = simulator.revoke_phone_token("acme", "phone-1")
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543211", message=TEXT
        )
        wait_until(lambda: len(simulator.messages()) == 2)
        simulator.script({"status": 401, "count": 2})
        producer.send_message(
            client_id="acme", phone_id="phone-1", to="+919876543212", message=TEXT
        )
        letters = wait_until(dead_letters)
    logs = log_path.read_text()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    jobs = [line for line in lines if line.get("event") == "job"]
    assert [j["outcome"] for j in jobs] == ["sent", "sent", "dead_lettered"]  # the log is there
    assert jobs[1]["token_refreshed"] is True
    secrets = [
        SANDBOX_PASSWORD,
        simulator.server.system_user_token,
        first_token,
        second_token,
        "guest:guest@",
    ]
    dead_letter_text = json.dumps([(h, b.decode()) for h, b in letters], default=str)
    for secret in secrets:
        assert secret not in logs
        assert secret not in dead_letter_text
    assert "+919876543210" not in logs  # recipients are masked
    assert "+91******3210" in logs


def test_check_says_in_plain_words_what_works_and_exits_0(simulator: Simulator) -> None:
    """All three services answer: exit 0, passwords masked."""
    result = cli(simulator, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ RabbitMQ" in result.stdout
    assert "✓ Redis" in result.stdout
    assert "✓ Verloop: authenticated" in result.stdout
    assert "guest:***@" in result.stdout
    assert "guest:guest@" not in result.stdout + result.stderr


def test_check_with_a_wrong_password_exits_1_without_printing_it(simulator: Simulator) -> None:
    """Verloop refuses the login: exit 1, the reason, never the password."""
    result = cli(simulator, "check", VERLOOP_PASSWORD="wrong-password-123")
    assert result.returncode == 1
    assert "✗ Verloop: Verloop refused VERLOOP_USERNAME/VERLOOP_PASSWORD" in result.stdout
    assert "wrong-password-123" not in result.stdout + result.stderr


def test_check_reports_a_dead_redis_with_how_to_start_it(simulator: Simulator) -> None:
    """A Redis that does not answer is named, with the command that starts one."""
    result = cli(simulator, "check", REDIS_URL="redis://:s3cret-pass@127.0.0.1:1/0")
    assert result.returncode == 1
    assert "✗ Redis: cannot connect to redis://:***@127.0.0.1:1/0" in result.stdout
    assert "redis-server" in result.stdout
    assert "s3cret-pass" not in result.stdout + result.stderr


def test_run_refuses_to_start_without_verloop_credentials(simulator: Simulator) -> None:
    """No token and no username/password: a usage error that says what to set."""
    result = cli(simulator, "run", VERLOOP_USERNAME="", VERLOOP_PASSWORD="")
    assert result.returncode == 2
    assert "no Verloop credentials" in result.stderr
    assert "--sandbox" in result.stderr


def test_send_enqueues_a_job_and_rejects_a_bad_number(simulator: Simulator) -> None:
    """The send command validates, enqueues with confirms and prints the masked recipient."""
    ok = cli(
        simulator,
        "send",
        "--client-id",
        "acme",
        "--phone-id",
        "p1",
        "--to",
        "+919876543210",
        "--text",
        "hi",
    )
    assert ok.returncode == 0, ok.stderr
    assert "enqueued" in ok.stdout
    assert "+91******3210" in ok.stdout
    assert queue_depth("verloop.send") == 1
    bad = cli(
        simulator,
        "send",
        "--client-id",
        "acme",
        "--phone-id",
        "p1",
        "--to",
        "12345",
        "--text",
        "hi",
    )
    assert bad.returncode == 2
    assert "to: must be in E.164 form" in bad.stderr
    assert queue_depth("verloop.send") == 1
