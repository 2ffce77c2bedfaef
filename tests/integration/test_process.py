"""The real ``verloop-worker`` processes: shutdown, secrets in logs, and the CLI commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import (
    SANDBOX_PASSWORD,
    VENV_BIN,
    Simulator,
    dead_letters,
    free_port,
    queue_depth,
    wait_until,
    worker_env,
    worker_process,
)
from worker.jobs.producer import Producer

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


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] not in ("Z", "X"):
                    parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_sigkilled_run_takes_every_worker_process_with_it_and_loses_no_job(
    simulator: Simulator, producer: Producer, tmp_path: Path
) -> None:
    """`kill -9` of `verloop-worker run` with sends in flight: dramatiq's process manager, its
    worker processes and its metrics process all stop within seconds (in-flight sends finish
    first), the metrics port is free again, and a new worker sends every job exactly once."""
    simulator.faults(latency_ms=400)
    port = free_port()
    keys = [f"job-{n}" for n in range(24)]
    with worker_process(
        simulator,
        tmp_path / "first.log",
        "--processes",
        "2",
        "--threads",
        "2",
        METRICS_PORT=str(port),
        METRICS_BIND="127.0.0.1",
    ) as run:
        fleet = wait_until(lambda: len(descendants(run.pid)) >= 4 and descendants(run.pid))
        assert (
            sum("worker.runtime.supervisor" in command_line(p) for p in fleet) == 4
        )  # 1 + 2 + metrics
        for n, key in enumerate(keys):
            producer.send_message(
                client_id="acme",
                phone_id="phone-1",
                to=f"+9198765{n:05d}",
                message=TEXT,
                idempotency_key=key,
            )
        wait_until(lambda: simulator.stats()["in_flight"] >= 1)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        wait_until(lambda: not any(alive(p) for p in fleet), timeout=10)
    assert port_is_free(port)
    assert simulator.stats()["in_flight"] == 0
    assert len(simulator.messages()) < len(keys)  # the fleet was stopped mid-run

    with worker_process(simulator, tmp_path / "second.log", "--threads", "8"):
        wait_until(lambda: len(simulator.messages()) >= len(keys), timeout=30)
    assert sorted(m["idempotency_key"] for m in simulator.messages()) == sorted(keys)
    assert simulator.stats()["duplicates"] == 0
    assert queue_depth("verloop.send") == 0
    assert dead_letters() == []


def test_a_sigkilled_process_manager_takes_its_worker_processes_with_it(
    simulator: Simulator, tmp_path: Path
) -> None:
    """dramatiq's process manager itself killed: its worker and metrics processes stop, and
    `run` exits with an error instead of waiting for nothing."""
    with worker_process(
        simulator,
        tmp_path / "worker.log",
        "--processes",
        "2",
        METRICS_PORT=str(free_port()),
        METRICS_BIND="127.0.0.1",
    ) as run:
        fleet = wait_until(lambda: len(descendants(run.pid)) >= 4 and descendants(run.pid))
        [manager] = [
            p for p in fleet if descendants(p) and "worker.runtime.supervisor" in command_line(p)
        ]
        os.kill(manager, signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in fleet), timeout=10)
        assert run.wait(timeout=10) != 0
    log = (tmp_path / "worker.log").read_text()
    assert log.count("Stopping worker process") == 2
    assert "Killing worker process" not in log  # one SIGTERM each: a clean stop


def test_a_sigkilled_sandbox_run_takes_its_simulator_with_it(
    simulator: Simulator, tmp_path: Path
) -> None:
    """With --sandbox, `run` also starts the simulator and a status receiver: they stop too."""
    blank = {"VERLOOP_BASE_URL": "", "VERLOOP_USERNAME": "", "VERLOOP_PASSWORD": ""}
    with worker_process(simulator, tmp_path / "worker.log", "--sandbox", **blank) as run:
        fleet = wait_until(lambda: len(descendants(run.pid)) >= 3 and descendants(run.pid))
        assert any("worker.sandbox" in command_line(p) for p in fleet)
        assert any("webhooks" in command_line(p) for p in fleet)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        wait_until(lambda: not any(alive(p) for p in fleet), timeout=10)


def test_run_refuses_to_start_when_its_metrics_port_is_taken(simulator: Simulator) -> None:
    """Exit 2 naming the port and what to do, instead of a worker without metrics."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = cli(simulator, "run", METRICS_PORT=str(port), METRICS_BIND="127.0.0.1")
    assert result.returncode == 2, result.stderr
    assert f"the metrics port 127.0.0.1:{port} (METRICS_BIND:METRICS_PORT)" in result.stderr
    assert "METRICS_PORT=0 turns metrics off" in result.stderr
    assert "Traceback" not in result.stderr
    assert "ready for action" not in result.stdout + result.stderr


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


#: (AMQP_URL, REDIS_URL) pairs whose passwords hold @, : and %40, sit in the userinfo or the
#: query, for every scheme. Each password holds a marker that must never be printed.
_AWKWARD_URLS = [
    (
        "amqp://guest:p@SECRET-A1:x@127.0.0.1:5672/verloop-test-a",
        "redis://:r@SECRET-R1:y@127.0.0.1:6379/13",
    ),
    (
        "amqps://guest:p%40SECRET-A2@127.0.0.1:5672/%2F",
        "rediss://user:r%40SECRET-R2%3A@127.0.0.1:6379/13",
    ),
    (
        "amqp://guest:guest@127.0.0.1:5672/%2F?password=SECRET-A3&heartbeat=5",
        "redis://127.0.0.1:6379/13?password=SECRET-R3",
    ),
    (
        "amqps://guest:pw:SECRET-A4@127.0.0.1:5672/%2F?ssl_options=%7B%27password%27%3A%27SECRET-A5",
        "rediss://127.0.0.1:6379/13?PassWord=SECRET-R4",
    ),
]


@pytest.mark.parametrize(("amqp_url", "redis_url"), _AWKWARD_URLS)
def test_check_never_prints_a_password_however_the_url_carries_it(
    simulator: Simulator, amqp_url: str, redis_url: str
) -> None:
    """Refused, unreachable over TLS, or not parsable at all: every line names the service and
    its masked URL, and no part of a password reaches the output."""
    result = cli(simulator, "check", "--services-only", AMQP_URL=amqp_url, REDIS_URL=redis_url)
    output = result.stdout + result.stderr
    assert "SECRET" not in output, output
    assert "Traceback" not in output
    assert result.stdout.count("127.0.0.1:5672") == result.stdout.count("127.0.0.1:6379") == 1
    assert "***" in result.stdout


def test_run_sandbox_refuses_a_settings_file_with_real_credentials(
    simulator: Simulator, tmp_path: Path
) -> None:
    """`run --sandbox --env-file prod.env` would send prod.env's system token (and the phone
    tokens file's tokens) to the simulator: exit 2 naming the settings, no secret printed,
    nothing started."""
    tokens = tmp_path / "phone-tokens.json"
    tokens.write_text(json.dumps({"acme": {"phone-1": "real-phone-token-77"}}))
    prod = tmp_path / "prod.env"
    prod.write_text(
        f"VERLOOP_SYSTEM_TOKEN=real-system-token-42\nVERLOOP_PHONE_TOKENS_FILE={tokens}\n"
    )
    result = cli(
        simulator,
        "--env-file",
        str(prod),
        "run",
        "--sandbox",
        VERLOOP_BASE_URL="",
        VERLOOP_USERNAME="",
        VERLOOP_PASSWORD="",
    )
    assert result.returncode == 2, result.stderr
    assert "--sandbox will not run with real Verloop settings" in result.stderr
    assert f"VERLOOP_SYSTEM_TOKEN (from {prod})" in result.stderr
    assert f"VERLOOP_PHONE_TOKENS_FILE (from {prod})" in result.stderr
    assert "SANDBOX MODE" not in result.stderr  # refused before the simulator started
    assert "real-system-token-42" not in result.stdout + result.stderr
    assert "real-phone-token-77" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"VERLOOP_USERNAME": "ops@acme", "VERLOOP_PASSWORD": "real-password-9"},
        {"VERLOOP_BASE_URL": "https://partners.verloop.io"},
    ],
)
def test_run_sandbox_refuses_credentials_or_a_verloop_url_from_the_environment(
    simulator: Simulator, env: dict[str, str]
) -> None:
    """The check looks at what the user gave, before the sandbox sets its own values."""
    blank = {"VERLOOP_BASE_URL": "", "VERLOOP_USERNAME": "", "VERLOOP_PASSWORD": ""}
    result = cli(simulator, "run", "--sandbox", **{**blank, **env})
    assert result.returncode == 2, result.stderr
    for name in env:
        assert f"{name} (from the environment)" in result.stderr
    assert "real-password-9" not in result.stdout + result.stderr


def test_run_sandbox_url_accepts_a_base_url_naming_that_simulator(
    simulator: Simulator, tmp_path: Path
) -> None:
    """VERLOOP_BASE_URL equal to --sandbox-url is not a reason to refuse: the worker starts."""
    with worker_process(
        simulator,
        tmp_path / "worker.log",
        "--sandbox",
        "--sandbox-url",
        simulator.url,
        VERLOOP_USERNAME="",
        VERLOOP_PASSWORD="",
    ) as proc:
        assert proc.poll() is None
    assert b"SANDBOX MODE" in (tmp_path / "worker.log").read_bytes()


def test_check_without_verloop_credentials_points_a_sandbox_setup_to_services_only(
    simulator: Simulator,
) -> None:
    """A setup that only ever runs the simulator has no Verloop login: check says so, exits 1,
    and says how to check the rest (and run) without one."""
    result = cli(simulator, "check", VERLOOP_USERNAME="", VERLOOP_PASSWORD="")
    assert result.returncode == 1
    assert "✓ RabbitMQ" in result.stdout
    assert "✓ Redis" in result.stdout
    assert "✗ Verloop: no credentials" in result.stdout
    assert "verloop-worker check --services-only" in result.stdout
    assert "verloop-worker run --sandbox" in result.stdout
    services_only = cli(simulator, "check", "--services-only", VERLOOP_USERNAME="")
    assert services_only.returncode == 0, services_only.stdout


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


def test_send_and_the_dlq_tools_never_print_a_password_from_a_url_pika_cannot_read(
    simulator: Simulator,
) -> None:
    """pika's error for a bad ssl_options quotes the value, which may hold a key file's
    password: every command that connects says which setting is wrong, masked."""
    url = _AWKWARD_URLS[3][0]
    for args in (
        ("send", "--client-id", "acme", "--phone-id", "p", "--to", "+919876543210", "--text", "hi"),
        ("dlq", "list"),
        ("clients", "--timeout", "1"),
    ):
        result = cli(simulator, *args, AMQP_URL=url)
        output = result.stdout + result.stderr
        assert result.returncode in (1, 2), (args, output)
        assert "SECRET" not in output, (args, output)
        assert "Traceback" not in output, (args, output)
        assert "AMQP_URL amqps://guest:***@127.0.0.1:5672" in output, (args, output)
